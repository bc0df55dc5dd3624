"""Export a trained policy for stock diffusers: one folder with the LoRA and a model card.

    python -m launcher.export RUN_DIR --out DIR [--weights ema|live] [--step N]

RUN_DIR is a training run's `trainer.output_dir`. The checkpoint is its `latest` (or step N); `--weights ema`
(the default, what the official code evaluates and what evaluation loads) takes the EMA of the LoRA, `live` the
trained weights. DIR receives:

    pytorch_lora_weights.safetensors   diffusers format; `WanVACEPipeline.load_lora_weights(DIR)` (or
                                       WanPipeline for t2v) on the same base model loads it, alpha included
    README.md                          model card: base model, preset, step, weights, the sampling settings the
                                       policy was trained at (guidance, steps, shift), training and held-out figures
    training_config.yaml               the run's resolved config at that checkpoint
    export.json                        the same facts, machine-readable, with the file's sha256

Full fine-tuning checkpoints (model.lora.enabled=false) are not exported yet (README, "Not built yet").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from omegaconf import OmegaConf

from config import ExpectedError
from config.cli import at_least, expected_errors
from policy.lora import LORA_FILE, read_safetensors
from runtime.checkpoint import CheckpointManager
from runtime.metrics import read_metrics

PIPELINES = {"vace": "WanVACEPipeline", "phantom": "WanPipeline", "t2v": "WanPipeline"}
FIGURES_OVER = 10  # training reward: the mean over the last N logged steps up to the checkpoint


class ExportError(ExpectedError, ValueError):
    """An expected failure; the message names the run, checkpoint or path."""


def find_checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    manager = CheckpointManager(run_dir)
    if step is None:
        try:
            latest = manager.latest()
        except FileNotFoundError as err:
            raise ExportError(f"{run_dir}: {err}") from None
        if latest is None:
            raise ExportError(f"{run_dir}: no checkpoint (looked for {manager.root / 'latest'}); is it a run's "
                              "trainer.output_dir?")
        return latest
    path = manager.step_dir(step)
    if not path.is_dir():
        have = sorted(p.name for p in manager.root.glob("step_*") if ".tmp-" not in p.name)
        raise ExportError(f"--step {step}: {path} does not exist (checkpoints here: {have or 'none'})")
    return path


def lora_file(checkpoint: Path, cfg, weights: str) -> Path:
    if not cfg.model.lora.enabled:
        raise ExportError(f"{checkpoint}: a full fine-tuning checkpoint (model.lora.enabled=false); exporting full "
                          "transformer weights is not implemented yet")
    sub = "lora_ema" if weights == "ema" else "lora"
    path = checkpoint / sub / LORA_FILE
    if not path.is_file():
        hint = ("; it was trained without optim.ema: pass --weights live" if weights == "ema" and
                (checkpoint / "lora" / LORA_FILE).is_file() else "")
        raise ExportError(f"{checkpoint}: no {sub}/{LORA_FILE}{hint}")
    return path


def training_figures(run_dir: Path, step: int) -> Dict[str, float]:
    """The training reward near the checkpoint and the last held-out monitor figures (heldout_*) up to it."""
    if not (run_dir / "metrics.jsonl").is_file():
        return {}
    records = [r for r in read_metrics(run_dir) if r["step"] <= step]
    if not records:
        return {}
    last = records[-FIGURES_OVER:]
    out = {"reward_mean_last_steps": sum(r["reward_mean"] for r in last) / len(last),
           "reward_mean_steps": [last[0]["step"], last[-1]["step"]]}
    held = [r for r in records if any(k.startswith("heldout_") for k in r)]
    if held:
        out["heldout_step"] = held[-1]["step"]
        out.update({k: v for k, v in held[-1].items() if k.startswith("heldout_")})
    return out


def model_card(facts: dict) -> str:
    s, m = facts["sampling"], facts["model"]
    fig = facts["figures"]
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) and math.isfinite(v) else f"| {k} | {v} |"
            for k, v in fig.items()]
    pipeline = facts["pipeline"]
    return "\n".join([
        f"# Identity-GRPO LoRA: {m['kind']} policy, step {facts['step']} ({facts['weights']} weights)",
        "",
        f"Trained with identity-grpo from `{facts['run_dir']}` (checkpoint `{facts['checkpoint']}`), "
        f"policy version {facts['policy_version']}.",
        "",
        f"- base model: `{m['path']}` (model.arch: {m['arch']}, model.kind: {m['kind']}, dtype {m['dtype']})"
        + (f", Phantom checkpoint `{m['phantom_checkpoint']}`" if m.get("phantom_checkpoint") else ""),
        f"- LoRA: rank {m['lora_rank']}, alpha {m['lora_alpha']}, targets {m['lora_targets']}",
        f"- trained at: guidance scale {s['guidance_scale']}"
        + (f", image guidance {s['image_guidance_scale']}" if m["kind"] == "phantom" else "")
        + f", {s['num_steps']} steps, shift {s['shift']}, {s['height']}x{s['width']}x{s['num_frames']}, "
        f"negative prompt {s['negative_prompt']!r}",
        f"- rewards: {facts['reward_weights']}; objective: {facts['objective']}",
        "",
        "## Load it",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        f"pipe = {pipeline}.from_pretrained(\"{m['path']}\")",
        "pipe.load_lora_weights(\"<this folder>\")",
        "```",
        "",
        "## Figures",
        "",
        "| metric | value |",
        "|---|---|",
        *(rows or ["| (no metrics.jsonl in the run directory) | |"]),
        "",
    ])


def export(run_dir: str | Path, out: str | Path, weights: str = "ema", step: Optional[int] = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if weights not in ("ema", "live"):
        raise ExportError(f"--weights must be ema or live, got {weights!r}")
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    checkpoint = find_checkpoint(run_dir, step)
    stored = checkpoint / "config.yaml"
    if not stored.is_file():
        raise ExportError(f"{checkpoint}: no config.yaml (written with every checkpoint); not a training checkpoint")
    cfg = OmegaConf.create(stored.read_text())
    source = lora_file(checkpoint, cfg, weights)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory")
    driver = CheckpointManager.load_driver_state(checkpoint)
    step_done = int(driver.get("step", 0))
    m, s = cfg.model, cfg.sampler
    facts = {
        "run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.name, "step": step_done,
        "policy_version": int(driver.get("version", step_done)), "weights": weights,
        "pipeline": PIPELINES[m.kind],
        "model": {"kind": m.kind, "arch": m.arch, "path": m.path, "dtype": m.dtype,
                  "phantom_checkpoint": m.get("phantom_checkpoint"), "lora_rank": m.lora.rank,
                  "lora_alpha": m.lora.alpha, "lora_targets": list(m.lora.target_modules)},
        "sampling": {"guidance_scale": s.guidance_scale, "image_guidance_scale": s.get("image_guidance_scale"),
                     "num_steps": s.num_steps, "shift": s.shift, "negative_prompt": s.negative_prompt,
                     "height": m.height, "width": m.width, "num_frames": m.num_frames},
        "reward_weights": dict(cfg.reward.weights),
        "objective": cfg.grpo.objective,  # grpo (clipped ratio) or nft (DiffusionNFT, policy/nft.py)
        "figures": training_figures(run_dir, step_done),
    }
    read_safetensors(source, "the checkpoint's LoRA in diffusers format")  # exported only when it reads back
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / LORA_FILE)
    facts["sha256"] = hashlib.sha256((out / LORA_FILE).read_bytes()).hexdigest()
    shutil.copyfile(stored, out / "training_config.yaml")
    (out / "export.json").write_text(json.dumps(facts, indent=2, allow_nan=True) + "\n")
    (out / "README.md").write_text(model_card(facts))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launcher.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", help="a training run's trainer.output_dir")
    parser.add_argument("--out", required=True, help="a new (or empty) directory")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema")
    parser.add_argument("--step", type=at_least(1), default=None, help="that step's checkpoint (default: latest)")
    args = parser.parse_args(argv)
    with expected_errors("export"):
        out = export(args.run_dir, args.out, args.weights, args.step)
    print(f"export: {out / LORA_FILE} ({args.weights} weights); model card {out / 'README.md'}")


if __name__ == "__main__":
    main()
