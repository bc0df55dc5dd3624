"""Busy and idle GPU-seconds per GRPO step for a GPU layout, from FLOP counts (issue #18's arithmetic).

    .venv/bin/python bench/layout_seconds.py [--preset cluster_configs/vace_1.3b_8gpu.yaml] [--mfu 0.35]
        [--peak-tflops 989] [--window 0]

Per step the preset samples P x G videos (T steps, every step a guided pass: 2 rows with CFG, Phantom's 3, 1
without guidance), scores them, and trains on the trained steps of each (the same rows per step: a forward and
backward through them, plus the reference's forward for the KL). FLOPs come from bench/gpu_wan_flops.py's
formula on the preset's real architecture; a VACE model's control blocks are counted as extra blocks on the same
tokens (they have the main blocks' width), and each reference person adds one latent frame of tokens. The reward
models' cost (a 3B VLM on 4 frames, about 0.4% of the sampling) and the VAE are left out. Seconds = FLOPs / (GPUs x
peak x MFU).

Layouts, for the same GPUs:
    split sync    rollout, reward and learner pools apart (the preset's numbers): the learners wait for the
                  rollouts, then the rollout GPUs wait for the learners
    split async   the next step's rollouts overlap this step's update (trainer.mode=async, staleness 1): a step
                  takes the longer of the two phases
    colocated     every role on every GPU, phases in turn (workers.colocate=true; the official code's and
                  verl's hybrid engine): each phase on all GPUs; the switches (moving weights and optimizer
                  state out of the way) are not counted
The last line: `layout_seconds: split_sync=<s> split_async=<s> colocated=<s> idle_split_sync=<fraction>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_wan_flops import flop_terms, latent_shape, train_step_flops, video_tokens  # noqa: E402
from config import load_config  # noqa: E402
from config.checks import RANDOM_POLICY  # noqa: E402
from policy.arch import transformer_config  # noqa: E402
from policy.policy import guided_passes  # noqa: E402
from policy.window import window_size  # noqa: E402
from workers.update_plan import trained_timesteps  # noqa: E402

def step_flops(cfg, text_len: int = 512, people: int = 1) -> Dict[str, float]:
    """Model FLOPs of one GRPO step of the preset: sampling, learning, and per video."""
    arch = transformer_config(cfg.model.arch, cfg.model.kind)
    blocks = dict(arch, num_layers=arch["num_layers"] + len(arch.get("vace_layers") or []))
    shape = latent_shape(arch, cfg.model.num_frames, cfg.model.height, cfg.model.width)
    if cfg.model.kind in ("vace", "phantom"):  # one latent frame per reference person
        shape = (shape[0], shape[1] + people, shape[2], shape[3])
    rank = cfg.model.lora.rank if cfg.model.lora.enabled else 0
    terms = flop_terms(blocks, video_tokens(arch, shape), text_len, rank)
    mode = "lora" if cfg.model.lora.enabled else "full"
    train_row, _ = train_step_flops(terms, mode, kl=cfg.grpo.kl_beta > 0, ckpt=False)
    videos = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    rows = guided_passes(cfg.model.kind, cfg.sampler)  # rows per step: CFG's 2 (Phantom's 3), or 1 without guidance
    sample_video = cfg.sampler.num_steps * rows * terms["forward"]
    learn_video = trained_timesteps(cfg) * cfg.grpo.num_inner_epochs * rows * train_row
    return {"videos": videos, "sample_video": sample_video, "learn_video": learn_video,
            "sample": videos * sample_video, "learn": videos * learn_video}


def layouts(flops: Dict[str, float], rollout_gpus: int, learner_gpus: int, reward_gpus: int,
            tflops: float) -> Dict[str, Dict[str, float]]:
    """Step seconds and busy / total GPU-seconds per layout; `tflops` = achieved TFLOP/s per GPU."""
    total_gpus = rollout_gpus + learner_gpus + reward_gpus
    sample_s = flops["sample"] / (rollout_gpus * tflops * 1e12)
    learn_s = flops["learn"] / (learner_gpus * tflops * 1e12)
    busy = (flops["sample"] + flops["learn"]) / (tflops * 1e12)
    colocated_s = (flops["sample"] + flops["learn"]) / (total_gpus * tflops * 1e12)
    out = {"split_sync": sample_s + learn_s, "split_async": max(sample_s, learn_s), "colocated": colocated_s}
    return {name: {"step_s": s, "busy_gpu_s": busy, "total_gpu_s": s * total_gpus,
                   "idle_fraction": 1.0 - busy / (s * total_gpus)} for name, s in out.items()}


def main(argv=None) -> Dict[str, Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=str(ROOT / "cluster_configs" / "vace_1.3b_8gpu.yaml"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (no GPU run yet)")
    p.add_argument("--window", type=int, default=None, help="sampler.sde_window.size to apply (default: the preset's)")
    args = p.parse_args(argv)
    overrides = ["trainer.output_dir=unused", *RANDOM_POLICY]
    if args.window is not None:
        overrides.append(f"sampler.sde_window.size={args.window}")
    cfg = load_config(args.preset, overrides)
    flops = step_flops(cfg)
    w = cfg.workers
    result = layouts(flops, w.rollout.num_workers, w.learner.num_workers, w.reward.num_workers,
                     args.peak_tflops * args.mfu)
    sde = window_size(cfg.sampler.sde_window, cfg.sampler.num_steps)
    print(f"{Path(args.preset).name}: {flops['videos']} videos/step, {cfg.sampler.num_steps} steps "
          f"({sde} stochastic, {trained_timesteps(cfg)} trained); per video {flops['sample_video'] / 1e12:.0f} "
          f"TFLOP sampling, {flops['learn_video'] / 1e12:.0f} TFLOP learning; {args.peak_tflops:g} TFLOP/s x MFU "
          f"{args.mfu:g}; GPUs rollout {w.rollout.num_workers} / reward {w.reward.num_workers} / learner "
          f"{w.learner.num_workers}")
    for name, r in result.items():
        print(f"  {name:<12} step {r['step_s']:7.1f} s   busy {r['busy_gpu_s']:7.0f} of {r['total_gpu_s']:7.0f} "
              f"GPU-s   idle {r['idle_fraction']:.0%}")
    print(f"layout_seconds: split_sync={result['split_sync']['step_s']:.1f} "
          f"split_async={result['split_async']['step_s']:.1f} colocated={result['colocated']['step_s']:.1f} "
          f"idle_split_sync={result['split_sync']['idle_fraction']:.2f}")
    return result


if __name__ == "__main__":
    main()
