"""Transformer passes and wall time to the same reward, per variant against the official recipe (issues #18, #32).

    .venv/bin/python bench/fast_grpo.py [--seeds 0 1 2] [--steps 120] [--window 1] [--smooth 10]
                                        [--variants window window_cfg_free]

Per seed, the demo task (cluster_configs/demo_cpu.yaml: tiny VACE with the demo VAE, LoRA, `demo_brightness`
reward, Ray + 2 DeepSpeed ZeRO-2 learner ranks on this CPU) is trained from the same base model, data order and
seed once per variant, and once as the reference:
- full:            every sampling step an SDE step, recorded and trained, CFG (the official recipe; the reference);
- window:          `sampler.sde_window.size=W`, progressive (policy/window.py): W SDE steps, ODE steps elsewhere,
                   only the window's steps trained;
- window_cfg_free: the window, and no classifier-free guidance (`sampler.guidance_scale=1`): one transformer
                   pass per step instead of two, in rollout and learner;
- window_cfg_free_dpm: that, and MixGRPO-Flash's ODE outside the window (`sampler.ode_solver=dpm2m`,
                   `sampler.ode_steps_ratio=0.4`, policy/ode.py): fewer, second-order ODE steps;
- nft:             DiffusionNFT's objective (`grpo.objective=nft`, policy/nft.py) with its published defaults:
                   deterministic CFG-free DPM-Solver++(2M) rollouts, trained on their final latents only.
Target = the full run's mean reward over its last quarter. A run reaches it at the first step where the mean
of `reward_mean` over the last `--smooth` steps is at least the target; its cost to get there is the sum of
its per-step transformer passes ((rollout_nfe + learn_passes) x videos per step, from metrics.jsonl) and of
its step times (`step_s`: start-up not counted, the same for all). Ratios are variant / full per seed, and the
final reward delta is the variant's last-quarter mean minus the full run's. One line per variant with the
medians, then the best variant (the lowest median time ratio among those whose median final reward delta is
not below 0; else the lowest overall, marked; ties to the higher final reward):

    fast_grpo: <variant> passes_ratio=<r> time_ratio=<r> final_reward_delta=<d> seeds=<n>
    fast_grpo: best=<variant> passes_ratio=<r> time_ratio=<r> final_reward_delta=<d> seeds=<n>

A variant run that never reaches the target gets ratio inf (and the median says so).
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


VARIANTS = {
    "window": lambda window: [f"sampler.sde_window.size={window}", "sampler.sde_window.strategy=progressive",
                              "sampler.sde_window.roll_back=true"],
    "window_cfg_free": lambda window: VARIANTS["window"](window) + ["sampler.guidance_scale=1"],
    "window_cfg_free_dpm": lambda window: VARIANTS["window_cfg_free"](window) + [
        "sampler.ode_solver=dpm2m", "sampler.ode_steps_ratio=0.4"],
    # DiffusionNFT's published defaults (config/nft.py at 24af555): b = 1 (grpo.nft_beta's default), A_max 5, KL
    # 1e-4, 99% of the sampler's levels, per-prompt mean over the batch's std, CFG-free, deterministic 2nd order
    "nft": lambda window: ["grpo.objective=nft", "sampler.guidance_scale=1", "sampler.ode_solver=dpm2m",
                           "grpo.kl_beta=0.0001", "grpo.std_mode=global", "grpo.timestep_fraction=0.99"],
    # Without CFG a LoRA step moves the sampled velocity less (CFG multiplies the conditional branch's change by
    # the guidance scale): the same variants at 3x the demo's learning rate
    "window_cfg_free_dpm_lr3x": lambda window: VARIANTS["window_cfg_free_dpm"](window) + [triple_lr()],
    "nft_lr3x": lambda window: VARIANTS["nft"](window) + [triple_lr()],
}
PHASES = ("rollout_s", "reward_s", "learn_s", "sync_s")


def triple_lr() -> str:
    """The override for 3x the demo config's learning rate."""
    return f"optim.lr={3 * load_config(DEMO).optim.lr}"


def run_variant(out: Path, seed: int, steps: int, overrides: List[str], reuse: bool = False) -> List[dict]:
    """One run's records (with each step's transformer passes); `reuse`: an earlier run's in `out`, if it ran to
    `steps` with the same overrides (its config.yaml says), instead of a new run."""
    from launcher.demo import ensure_demo_model, ensure_demo_shards
    from launcher.train import run
    from runtime.metrics import read_metrics

    overrides = [f"trainer.seed={seed}", f"trainer.steps={steps}", f"trainer.output_dir={out}",
                 f"trainer.checkpoint_every={steps}", "trainer.resume=never", "logging.tensorboard=false",
                 "logging.video_every=0", "logging.progress_bar=false", *overrides]
    cfg = load_config(DEMO, overrides)  # its model.path and shards are relative to the repository root (main)
    if not (reuse and _finished(out, cfg, steps)):
        ensure_demo_shards(cfg.data.prompt_shards)
        ensure_demo_model(cfg.model)
        run(cfg)
    videos = cfg.grpo.group_size * cfg.grpo.prompts_per_step
    records = read_metrics(out)
    for r in records:
        r["passes"] = (r["rollout_nfe"] + r["learn_passes"]) * videos
    return records


def _finished(out: Path, cfg, steps: int) -> bool:
    """Whether `out` holds a run of exactly this config that logged all `steps` steps."""
    from config import to_yaml
    from runtime.checkpoint import CheckpointManager

    metrics, latest = out / "metrics.jsonl", CheckpointManager(out).latest()
    if not metrics.is_file() or latest is None or not (latest / "config.yaml").is_file():
        return False
    same = (latest / "config.yaml").read_text() == to_yaml(cfg)
    return same and sum(1 for line in metrics.read_text().splitlines() if line.strip()) == steps


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


def compare(full: List[dict], variant: List[dict], smooth: int) -> dict:
    """One variant against the full run of the same seed: its cost to the full run's last-quarter reward, as ratios."""
    quarter = max(1, len(full) // 4)
    target = statistics.fmean(r["reward_mean"] for r in full[-quarter:])
    # a trailing mean reaches the last quarter's mean somewhere in it, except by rounding: then the whole run
    reach_full = cost_to_reach(full, target, smooth) or {
        "step": full[-1]["step"], "passes": sum(r["passes"] for r in full), "seconds": sum(r["step_s"] for r in full)}
    reach = cost_to_reach(variant, target, smooth)
    last_quarter = statistics.fmean(r["reward_mean"] for r in variant[-quarter:])
    return {"target": target, "full": reach_full, "variant": reach, "last_quarter": last_quarter,
            "final_reward_delta": last_quarter - target,
            "passes_per_video": statistics.fmean(r["rollout_nfe"] + r["learn_passes"] for r in variant),
            "phase_s": {p: statistics.fmean(r.get(p, 0.0) for r in variant) for p in PHASES},
            "passes_ratio": reach["passes"] / reach_full["passes"] if reach else float("inf"),
            "time_ratio": reach["seconds"] / reach_full["seconds"] if reach else float("inf")}


def summary_line(name: str, rows: List[dict]) -> str:
    med = {k: statistics.median(r[k] for r in rows) for k in ("passes_ratio", "time_ratio", "final_reward_delta")}
    return (f"{name} passes_ratio={med['passes_ratio']:.3f} time_ratio={med['time_ratio']:.3f} "
            f"final_reward_delta={med['final_reward_delta']:+.4f} seeds={len(rows)}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=1, help="SDE window size (the demo samples 4 steps)")
    parser.add_argument("--smooth", type=int, default=10, help="steps in the trailing mean of the reward")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write every run's summary here")
    parser.add_argument("--reuse", action="store_true", help="read runs already finished under --out, same config")
    args = parser.parse_args(argv)
    base = Path(args.out or tempfile.mkdtemp(prefix="fast_grpo_")).resolve()
    os.chdir(ROOT)  # as `make demo`: the demo config's paths (outputs/demo_model, outputs/demo_data) are relative
    rows: Dict[str, List[dict]] = {name: [] for name in args.variants}
    for seed in args.seeds:
        full = run_variant(base / f"seed{seed}_full", seed, args.steps, [], args.reuse)
        print(f"seed {seed}: full: {full[0]['rollout_nfe'] + full[0]['learn_passes']} passes per video, "
              f"mean step {statistics.fmean(r['step_s'] for r in full):.2f} s", flush=True)
        for name in args.variants:
            records = run_variant(base / f"seed{seed}_{name}", seed, args.steps, VARIANTS[name](args.window),
                                  args.reuse)
            row = {"seed": seed, "variant": name, **compare(full, records, args.smooth),
                   "mean_step_s": statistics.fmean(r["step_s"] for r in records)}
            rows[name].append(row)
            print(f"seed {seed}: {name}: target {row['target']:.4f}; full reaches it at step {row['full']['step']}, "
                  f"{name} " + (f"at step {row['variant']['step']}" if row["variant"] else "never")
                  + f"; last-quarter reward {row['last_quarter']:.4f} (delta {row['final_reward_delta']:+.4f}); "
                  f"{row['passes_per_video']:.2f} passes per video, mean step {row['mean_step_s']:.2f} s ("
                  + ", ".join(f"{p} {t:.2f}" for p, t in row["phase_s"].items()) + "); "
                  f"passes ratio {row['passes_ratio']:.3f}, time ratio {row['time_ratio']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    for name in args.variants:
        print("fast_grpo: " + summary_line(name, rows[name]))
    # the fastest to the target, ties (every run of both never reaching it) to the higher final reward
    medians = {name: (statistics.median(r["time_ratio"] for r in rows[name]),
                      -statistics.median(r["final_reward_delta"] for r in rows[name])) for name in args.variants}
    kept = [n for n in args.variants if medians[n][1] <= 0]
    best = min(kept or args.variants, key=medians.get)
    print(f"fast_grpo: best={summary_line(best, rows[best])}" + ("" if kept else " (every variant ends below full)"))


if __name__ == "__main__":
    main()
