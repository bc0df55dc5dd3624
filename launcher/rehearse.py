"""Rehearse a production preset on this machine's CPU: its real architectures, random weights, tiny sizes.

    python -m launcher.rehearse --config cluster_configs/vace_1.3b_8gpu.yaml [key.sub=value ...]
    make rehearse PRESET=cluster_configs/vace_1.3b_8gpu.yaml ARGS="trainer.output_dir=/tmp/rehearsal"

The preset runs unchanged except for what a CPU forces (`cpu_overrides`, printed at the start):
random init of its own `model.arch` and `reward.vlm.arch` with fewer layers and a smaller vocabulary (widths,
heads, patch sizes and the VACE layer stride stay the published ones), tiny resolution / frames / sampling
steps / text length, 2 training steps (checkpointed at the end, and every `trainer.checkpoint_every`), the
pools on local CPU workers (no GPUs, no node pinning; one rollout and one reward worker; the preset's own
learner rank count, at least 2, or `--learner-ranks`) and one prompt group per learner rank. A context-parallel
preset (`model.context_parallel`) is rehearsed with each video split over 2 processes by Ulysses attention (ring
attention needs a GPU kernel), in a rollout worker of 2 actors and learner context groups of 2, on frames of 2
tokens. Kept from the preset: model kind, dtype (bf16), LoRA or full fine-tuning, ZeRO stage, learner precision,
weight-sync mode, micro-batching, group size, sampler rule, CFG, GRPO and optimizer settings, sync/async mode.
`key=value` arguments are applied last (e.g. `trainer.output_dir=`).

It checks, before starting Ray, that the memory plan (launcher/memory_plan.py) fits this machine; then runs
the training loop as `launcher.train` does (metrics.jsonl, TensorBoard, checkpoints), and prints per role the
peak resident memory and parameter bytes beside the plan's prediction, and whether every role computes
the transformer in the same dtypes. All of it goes to <output_dir>/rehearsal.json.

A `reward_*` preset (the reward-model trainer's config tree) is rehearsed through `reward.train` with the
real Qwen2.5-VL-3B architecture (reward/train_config.py's `model.init=random`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from config import ConfigError
from config.checks import RANDOM_POLICY, RANDOM_REWARD_MODEL, context_degree
from config.cli import at_least, exit_expected, expected_errors
from config.load import sections
from workers.run_config import load_run_config

GiB = 1024 ** 3
# Depth per architecture: enough blocks that VACE keeps two control blocks at its real stride (every 2nd
# block of the 1.3B model; the 14B model's stride of 5 would need 6 blocks of 0.35B parameters: one block).
REHEARSAL_LAYERS = {"wan2.1-vace-1.3b": 3, "wan2.1-vace-14b": 1, "wan2.1-t2v-1.3b": 2, "wan2.1-t2v-14b": 1,
                    "phantom-wan-1.3b": 2, "tiny": None}
# The reward VLM at published widths: 1 language block, 2 vision blocks (a windowed one, then a full-attention one:
# reward.vlm.published_vlm_config). bf16 matmuls run at a fifth of float32's speed on an AVX2-only CPU, so depth here
# is CI minutes: 2 + 8 blocks scored a rehearsal step's 16 videos in ~200 s, 1 + 2 in ~60 s.
VLM_LAYERS = dict(text_layers=1, vision_layers=2)
VOCAB = 512
# A context-parallel preset's degree here (`model.context_parallel`): the smallest split, in 2 processes per video.
CONTEXT_DEGREE = 2


def rehearsal_output_dir(preset, overrides: Sequence[str] = ()) -> str:
    """The user's `trainer.output_dir=` override, else outputs/rehearse/<the preset's output dir name>."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")]
    return given[-1] if given else f"outputs/rehearse/{Path(str(preset.trainer.output_dir)).name}"


def cpu_overrides(preset, learner_ranks: Optional[int] = None, output_dir: Optional[str] = None) -> List[str]:
    """What a CPU forces on a GRPO preset, as `key=value` overrides."""
    ranks = max(2, learner_ranks or preset.workers.learner.num_workers)
    # a context-parallel preset: each video over CONTEXT_DEGREE processes, so learner ranks in whole context groups
    context = context_degree(preset) > 1
    ranks += ranks % CONTEXT_DEGREE if context else 0
    out = output_dir or rehearsal_output_dir(preset)
    arch = preset.model.arch
    if arch is None:
        raise ConfigError("model.arch is not set: a rehearsal builds the preset's named architecture "
                          "(policy/arch.py ARCHITECTURES)")
    overrides = [
        *RANDOM_POLICY, "model.text_encoder_layers=1", f"model.text_encoder_vocab={VOCAB}",
        "model.height=16", "model.width=16", "model.num_frames=5", "model.gradient_checkpointing=false",
        "sampler.num_steps=2", "sampler.max_sequence_length=16",
        "trainer.device=cpu", "trainer.steps=2", "trainer.keep_last=1",
        f"trainer.output_dir={out}",
        "logging.progress_bar=false", "logging.video_every=2", "logging.eval_every=0",
        f"data.prompt_shards={out}/data/prompts-{{000000..000001}}.tar", "data.eval_prompt_shards=null",
        f"grpo.prompts_per_step={ranks}", "grpo.optimizer_steps_per_update=1", "workers.ray_address=null",
    ]
    if REHEARSAL_LAYERS.get(arch):
        overrides.append(f"model.num_layers={REHEARSAL_LAYERS[arch]}")
    if context:  # Ulysses (ring needs a GPU), a rollout worker of CONTEXT_DEGREE actors, frames of as many tokens
        overrides += [f"model.context_parallel.ulysses={CONTEXT_DEGREE}", "model.context_parallel.ring=1",
                      f"model.width={16 * CONTEXT_DEGREE}"]
    for pool, count in (("rollout", CONTEXT_DEGREE if context else 1), ("reward", 1), ("learner", ranks)):
        overrides += [f"workers.{pool}.num_workers={count}", f"workers.{pool}.num_gpus_per_worker=0",
                      f"workers.{pool}.num_cpus_per_worker=0.5", f"workers.{pool}.node_resource=null"]
    if "vlm" in preset.reward.weights and preset.reward.vlm.arch not in (None, "tiny"):
        overrides += [*RANDOM_REWARD_MODEL, "reward.vlm.image_size=56", f"reward.vlm.vocab={VOCAB}",
                      *(f"reward.vlm.{k}={v}" for k, v in VLM_LAYERS.items())]
    return overrides


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def check_fits(plan: Dict[str, Dict[str, int]], cfg) -> int:
    """Total predicted bytes of all worker processes; refuses (exit 2) when more than 90% of free memory."""
    counts = {"rollout": cfg.workers.rollout.num_workers, "reward": cfg.workers.reward.num_workers,
              "learner": cfg.workers.learner.num_workers}
    total = sum(plan[role]["total"] * n for role, n in counts.items())
    free = _available_bytes()
    if total > 0.9 * free:
        raise SystemExit(f"rehearse: the memory plan needs {total / GiB:.1f} GiB for {counts} workers, this machine "
                         f"has {free / GiB:.1f} GiB free; use fewer learner ranks (--learner-ranks) or layers "
                         "(model.num_layers=)")
    return total


def report(plan, memory: List[dict], dtypes_equal: bool) -> Dict[str, object]:
    """Per role: measured peak RSS and parameter bytes, the plan's prediction and the ratio."""
    rows = []
    for m in memory:
        predicted = plan[m["role"]]["total"]
        rows.append(dict(m, predicted_bytes=predicted, measured_over_plan=m["peak_rss_bytes"] / predicted))
    print(f"\n{'role':<10}{'rank':>5}{'peak RSS':>12}{'params':>12}{'plan':>12}{'measured/plan':>15}")
    for r in rows:
        print(f"{r['role']:<10}{r['rank']:>5}{r['peak_rss_bytes'] / GiB:>10.2f}Gi{r['param_bytes'] / GiB:>10.2f}Gi"
              f"{r['predicted_bytes'] / GiB:>10.2f}Gi{r['measured_over_plan']:>15.2f}")
    print(f"rollout and learner transformer dtypes identical: {dtypes_equal}")
    return {"roles": rows, "plan": plan, "dtypes_equal": dtypes_equal}


def rehearse_grpo(preset_path: str, learner_ranks: Optional[int], user_overrides: Sequence[str]) -> dict:
    import ray

    from data.demo import build_demo
    from launcher.memory_plan import model_bytes, predict
    from launcher.train import Trainer

    preset = load_run_config(preset_path)
    forced = cpu_overrides(preset, learner_ranks, rehearsal_output_dir(preset, user_overrides))
    cfg = load_run_config(preset_path, forced + list(user_overrides))
    print("rehearse: CPU overrides of " + preset_path + ":\n  " + "\n  ".join(forced), flush=True)
    plan = predict(cfg, model_bytes(cfg))
    check_fits(plan, cfg)
    out = Path(cfg.trainer.output_dir)
    if not (out / "data" / "prompts-000001.tar").exists():
        build_demo(out / "data", num_prompts=8, num_pairs=2, samples_per_shard=4)
    trainer = Trainer(cfg)
    try:
        trainer.train()
        w = trainer.workers
        memory = ray.get([a.memory_report.remote() for g in (w.rollout, w.reward, w.learner) for a in g.actors])
        dtypes = ray.get([w.rollout.actors[0].policy_dtypes.remote(), w.learner.actors[0].policy_dtypes.remote()])
    finally:
        trainer.close()
    result = report(plan, memory, dtypes[0] == dtypes[1])
    result.update(preset=preset_path, overrides=forced + list(user_overrides), steps=trainer.state.step)
    (out / "rehearsal.json").write_text(json.dumps(result, indent=2))
    print(f"rehearse: {preset_path}: {trainer.state.step} steps; metrics {out / 'metrics.jsonl'}, "
          f"report {out / 'rehearsal.json'}")
    return result


def rehearse_reward(preset_path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """`launcher.rehearse` of a reward-model preset: the preset's own trainer settings (LoRA, trainable parts,
    loss, teacher filter, curriculum, ZeRO stage, precision) on the real Qwen2.5-VL-3B architecture with random
    weights and fewer layers, tiny images, 2 steps, on mixed-source demo pairs, on CPU."""
    import resource

    from data.demo import write_mixed_pairs
    from launcher.memory_plan import reward_trainer_plan
    from reward.train import train
    from reward.train_config import load_reward_config

    preset = load_reward_config(preset_path)
    if preset.model.arch in (None, "tiny"):
        raise ConfigError(f"{preset_path}: model.arch names no published architecture to rehearse")
    out = rehearsal_output_dir(preset, overrides)
    shards = Path(out) / "data"
    if not (shards / "pairs-000000.tar").exists():
        write_mixed_pairs(shards, 24, ("human", "auto", "synthetic"), flip_auto=0.3)
    forced = ["model.init=random", "model.path=null", *(f"model.{k}={v}" for k, v in VLM_LAYERS.items()),
              f"model.vocab={VOCAB}", "model.image_size=56", "model.num_frames=2", "trainer.device=cpu",
              "trainer.steps=2",
              *(["model.video_min_pixels=3136", "model.max_frame_pixels=3136"] if preset.model.format == "official"
                else []),
              "trainer.keep_last=1", "trainer.eval_every=0", "trainer.log_every=1",
              "trainer.num_threads=1",
              "trainer.batch_size=2", "trainer.grad_accum=1", "trainer.eval_batch_size=4", "teacher.train_steps=2",
              "teacher.batch_size=4", "data.num_loader_workers=0", "data.held_out_fraction=0.25",
              f"data.preference_shards={shards}/pairs-000000.tar", "data.eval_shards=null",
              f"trainer.output_dir={out}", "data.eval_sources=[human,auto,synthetic]"]
    cfg = load_reward_config(preset_path, forced + list(overrides))
    print(f"rehearse: CPU overrides of {preset_path}:\n  " + "\n  ".join(forced), flush=True)
    plan = reward_trainer_plan(cfg)
    result = train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {k: result[k] for k in ("losses", "eval", "step", "model_dir")}
    summary.update(arch=cfg.model.arch, peak_rss_bytes=peak, plan=plan, measured_over_plan=peak / plan["total"])
    (Path(out) / "rehearsal.json").write_text(json.dumps(dict(summary, preset=preset_path, overrides=forced), indent=2))
    print(f"rehearse: {preset_path}: {result['step']} steps, losses {result['losses']}, peak RSS "
          f"{peak / 2**30:.2f} GiB, plan {plan['total'] / 2**30:.2f} GiB (measured/plan "
          f"{peak / plan['total']:.2f}); report {Path(out) / 'rehearsal.json'}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a preset in cluster_configs/")
    parser.add_argument("--learner-ranks", type=at_least(2), default=None,
                        help="learner ranks, >= 2 (a group of one is no test of the distributed path; default: "
                             "the preset's own count, at least 2)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, applied after the CPU overrides")
    args = parser.parse_args(argv)
    if args.learner_ranks is not None and args.learner_ranks < 2:
        parser.error(f"--learner-ranks must be >= 2 (a distributed learner), got {args.learner_ranks}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        named = sections(args.config)
    except ConfigError as err:
        exit_expected("rehearse", f"--config {args.config}: {err}")
    with expected_errors("rehearse"):
        if {"grpo", "sampler"} & named:  # a GRPO preset (or one built on one), else the reward-model trainer's
            rehearse_grpo(args.config, args.learner_ranks, args.overrides)
        else:
            from reward.train import end_process_group

            try:
                rehearse_reward(args.config, args.overrides)
            finally:
                end_process_group()


if __name__ == "__main__":
    main()
