"""Overhead of the distributed loop over a plain single-process loop doing the same tiny work.

    .venv/bin/python bench/loop_overhead.py [--steps 8]

Prints (and appends to bench/RESULTS.md with --record):
- sync ratio  = median step time of the Ray + DeepSpeed loop (1 rollout, 1 reward, 1 learner rank)
                / median step time of one process running the same phases (target <= 1.15);
- async ratio = median step time of async mode / median max(rollout_s, learn_s) of the same run
                (target <= 1.10).
The first two steps of every run are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import load_config  # noqa: E402

WARMUP = 2


def bench_config(shards: str, out: Path, steps: int, *extra):
    return load_config(ROOT / "cluster_configs" / "local_cpu.yaml", [
        f"data.prompt_shards={shards}", f"trainer.output_dir={out}", f"trainer.steps={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.resume=never", "logging.progress_bar=false",
        "logging.video_every=0", "logging.tensorboard=false", "workers.learner.num_workers=1",
        "reward.weights={demo_reference_color: 1.0}", *extra])


def plain_loop(cfg) -> list:
    """The same phases in one process: no Ray, no DeepSpeed (torch AdamW on the LoRA parameters)."""
    from data.reader import ShardReader
    from policy.grpo import group_advantages, grpo_loss, select_timesteps
    from policy.models import build_components
    from policy.policy import WanPolicy
    from policy.sampler import sample_group, score_step
    from policy.schedule import schedule_from_config
    from policy.sde import NoiseRule
    from reward.composite import CompositeReward
    from workers.common import sample_seed

    torch.set_num_threads(1)
    torch.manual_seed(cfg.trainer.seed)
    policy = WanPolicy(build_components(cfg.model, cfg.sampler.shift), cfg.model, cfg.sampler)
    reward = CompositeReward.from_config(cfg.reward)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    stream = iter(ShardReader.from_config(cfg.data, "prompt"))
    rule, schedule, times = NoiseRule.from_config(cfg.sampler), schedule_from_config(cfg.sampler), []
    for step in range(1, cfg.trainer.steps + 1):
        start = time.perf_counter()
        trajs = []
        for g in range(cfg.grpo.prompts_per_step):
            sample = next(stream)
            cond = policy.encode_condition(sample["prompt"], sample["refs"])
            seeds = [sample_seed(cfg.trainer.seed, step, g, i) for i in range(cfg.grpo.group_size)]
            traj = sample_group(policy, cond, seeds, rule, schedule)
            traj.references, traj.prompt = sample["refs"], sample["prompt"]
            trajs.append(traj)
        totals = torch.stack([reward.score(list(t.videos), [t.references] * len(t.videos),
                                           [t.prompt] * len(t.videos))["total"] for t in trajs])
        adv = group_advantages(totals, cfg.grpo.std_mode, cfg.grpo.adv_eps, cfg.grpo.adv_clip, cfg.grpo.std_ddof)
        opt.zero_grad()
        for g, traj in enumerate(trajs):
            gen = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, step, g, 10_000))
            for k in select_timesteps(traj.num_steps, cfg.grpo.timestep_fraction, cfg.grpo.timestep_order, gen):
                score = score_step(policy, traj, int(k), with_kl=cfg.grpo.kl_beta > 0)
                loss, _ = grpo_loss(score.log_prob, traj.log_probs[:, int(k)], adv.values[g], cfg.grpo.clip_range,
                                    kl=score.kl, kl_beta=cfg.grpo.kl_beta, mask=adv.mask[g])
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def distributed_loop(cfg) -> list:
    from launcher.train import run
    from runtime.metrics import read_metrics

    run(cfg)
    return read_metrics(cfg.trainer.output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    from data.demo import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        shards, _ = build_demo(Path(tmp) / "data", num_prompts=16, num_pairs=2)
        plain = plain_loop(bench_config(shards, Path(tmp) / "plain", args.steps))[WARMUP:]
        sync = distributed_loop(bench_config(shards, Path(tmp) / "sync", args.steps))[WARMUP:]
        asyn = distributed_loop(bench_config(shards, Path(tmp) / "async", args.steps, "trainer.mode=async",
                                             "trainer.max_staleness=1"))[WARMUP:]
    plain_s = statistics.median(plain)
    sync_s = statistics.median(r["step_s"] for r in sync)
    async_s = statistics.median(r["step_s"] for r in asyn)
    bound_s = statistics.median(max(r["rollout_s"], r["learn_s"]) for r in asyn)
    lines = [
        f"loop_overhead ({time.strftime('%Y-%m-%d')}, CPU, {args.steps} steps, first {WARMUP} not counted):",
        f"  plain single-process step  {plain_s:.3f} s",
        f"  distributed sync step      {sync_s:.3f} s   ratio {sync_s / plain_s:.3f}  (target <= 1.15)",
        f"  async step                 {async_s:.3f} s   / max(rollout, learn) {bound_s:.3f} s = "
        f"ratio {async_s / bound_s:.3f}  (target <= 1.10)",
    ]
    print("\n".join(lines))
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as handle:
            handle.write("\n```\n" + "\n".join(lines) + "\n```\n")
    np.set_printoptions()


if __name__ == "__main__":
    main()
