"""Transformer passes and wall time to the same reward: every step stochastic vs MixGRPO's SDE window (issue #18).

    .venv/bin/python bench/fast_grpo.py [--seeds 0 1 2] [--steps 120] [--window 1] [--smooth 10]

Per seed, the demo task (cluster_configs/demo_cpu.yaml: tiny VACE with the demo VAE, LoRA, `demo_brightness`
reward, Ray + 2 DeepSpeed ZeRO-2 learner ranks on this CPU) is trained twice from the same base model, data
order and seed:
- full:   every sampling step is an SDE step, recorded and trained (Flow-GRPO, the official recipe);
- window: `sampler.sde_window.size=W`, progressive (policy/window.py): W SDE steps, ODE steps elsewhere, only
          the window's steps trained.
Target = the full run's mean reward over its last quarter. A run reaches it at the first step where the mean
of `reward_mean` over the last `--smooth` steps is at least the target; its cost to get there is the sum of
its per-step transformer passes ((rollout_nfe + learn_passes) x videos per step, from metrics.jsonl) and of
its step times (`step_s`: start-up not counted, the same for both). Ratios are window / full per seed;
the last line gives their medians:

    fast_grpo: passes_ratio=<r> time_ratio=<r> seeds=<n>

A window run that never reaches the target gets ratio inf (and the median says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402

DEMO = ROOT / "cluster_configs" / "demo_cpu.yaml"


def run_variant(out: Path, seed: int, steps: int, window: int) -> List[dict]:
    from launcher.demo import ensure_demo_model, ensure_demo_shards
    from launcher.train import run
    from runtime.metrics import read_metrics

    overrides = [f"trainer.seed={seed}", f"trainer.steps={steps}", f"trainer.output_dir={out}",
                 f"trainer.checkpoint_every={steps}", "trainer.resume=never", "logging.tensorboard=false",
                 "logging.video_every=0", "logging.progress_bar=false"]
    if window:
        overrides += [f"sampler.sde_window.size={window}", "sampler.sde_window.strategy=progressive",
                      "sampler.sde_window.roll_back=true"]
    cfg = load_config(DEMO, overrides)  # its model.path and shards are relative to the repository root (main)
    ensure_demo_shards(cfg.data.prompt_shards)
    ensure_demo_model(cfg.model)
    run(cfg)
    videos = cfg.grpo.group_size * cfg.grpo.prompts_per_step
    records = read_metrics(out)
    for r in records:
        r["passes"] = (r["rollout_nfe"] + r["learn_passes"]) * videos
    return records


def cost_to_reach(records: List[dict], target: float, smooth: int) -> Optional[Dict[str, float]]:
    """Passes and seconds summed up to the first step whose trailing mean reward reaches `target`."""
    passes = seconds = 0.0
    for i, r in enumerate(records):
        passes += r["passes"]
        seconds += r["step_s"]
        recent = [x["reward_mean"] for x in records[max(0, i + 1 - smooth): i + 1]]
        if i + 1 >= smooth and statistics.fmean(recent) >= target:
            return {"step": r["step"], "passes": passes, "seconds": seconds}
    return None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=1, help="SDE window size (the demo samples 4 steps)")
    parser.add_argument("--smooth", type=int, default=10, help="steps in the trailing mean of the reward")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write every run's summary here")
    args = parser.parse_args(argv)
    base = Path(args.out or tempfile.mkdtemp(prefix="fast_grpo_")).resolve()
    os.chdir(ROOT)  # as `make demo`: the demo config's paths (outputs/demo_model, outputs/demo_data) are relative
    passes_ratios, time_ratios, rows = [], [], []
    for seed in args.seeds:
        full = run_variant(base / f"seed{seed}_full", seed, args.steps, 0)
        windowed = run_variant(base / f"seed{seed}_window{args.window}", seed, args.steps, args.window)
        quarter = max(1, len(full) // 4)
        target = statistics.fmean(r["reward_mean"] for r in full[-quarter:])
        # a trailing mean reaches the last quarter's mean somewhere in it, except by rounding: then the whole run
        reach_full = cost_to_reach(full, target, args.smooth) or {
            "step": full[-1]["step"], "passes": sum(r["passes"] for r in full),
            "seconds": sum(r["step_s"] for r in full)}
        reach_window = cost_to_reach(windowed, target, args.smooth)
        if reach_window is None:
            passes_ratio = time_ratio = float("inf")
        else:
            passes_ratio = reach_window["passes"] / reach_full["passes"]
            time_ratio = reach_window["seconds"] / reach_full["seconds"]
        passes_ratios.append(passes_ratio)
        time_ratios.append(time_ratio)
        row = {"seed": seed, "target": target, "full": reach_full, "window": reach_window,
               "full_last_quarter": target,
               "window_last_quarter": statistics.fmean(r["reward_mean"] for r in windowed[-quarter:]),
               "passes_per_video": {"full": full[0]["rollout_nfe"] + full[0]["learn_passes"],
                                    "window": windowed[0]["rollout_nfe"] + windowed[0]["learn_passes"]},
               "passes_ratio": passes_ratio, "time_ratio": time_ratio}
        rows.append(row)
        print(f"seed {seed}: target {target:.4f}; full reaches it at step {reach_full['step']}; window "
              + (f"at step {reach_window['step']}" if reach_window else "never")
              + f"; last-quarter reward full {target:.4f} window {row['window_last_quarter']:.4f}; "
              f"passes ratio {passes_ratio:.3f}, time ratio {time_ratio:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"spread over seeds: passes_ratio {min(passes_ratios):.3f}-{max(passes_ratios):.3f}, "
          f"time_ratio {min(time_ratios):.3f}-{max(time_ratios):.3f}")
    print(f"fast_grpo: passes_ratio={statistics.median(passes_ratios):.3f} "
          f"time_ratio={statistics.median(time_ratios):.3f} seeds={len(args.seeds)}")


if __name__ == "__main__":
    main()
