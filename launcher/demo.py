"""`make demo`: the whole system on this machine, in minutes, on CPU.

1. builds demo prompt shards (real face photographs, see data/demo.py) unless they exist;
2. starts a local Ray cluster and trains a tiny random-init VACE policy with GRPO: rollout, reward and
   2 DeepSpeed ZeRO-2 learner ranks, colocated on the CPU;
3. prints where the logs, metrics and the final LoRA are, how the mean reward moved, and loads the
   LoRA into a diffusers `WanVACEPipeline` to show it is usable as is.

The tiny model cannot draw faces, so the demo trains on a *demo reward* a tiny model can learn in
minutes (`demo_reference_color`: the video's colours should match the reference photos'); the face
identity reward is computed and logged alongside (weight 0), as it would be on a real model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

import numpy as np

from launcher.cli import DEFAULT_CONFIG
from launcher.config import ConfigError, load_config

DEMO_OVERRIDES = ["trainer.output_dir=outputs/demo", "trainer.resume=never"]


def ensure_demo_shards(pattern: str) -> None:
    from data.demo import build_demo
    from data.tarindex import expand_pattern

    try:
        expand_pattern(pattern)  # raises FileNotFoundError naming the first missing shard
        return
    except FileNotFoundError:
        pass  # not built yet (first run): build them below
    out = Path(pattern).parent
    print(f"[demo] building demo shards in {out}")
    build_demo(out)


def show_lora_in_pipeline(cfg, lora_dir: Path) -> None:
    """Load the trained LoRA into a stock diffusers pipeline over the same base weights and run it."""
    import torch
    from diffusers import WanVACEPipeline

    from policy.models import save_tiny_pretrained

    base = Path(cfg.trainer.output_dir) / "base_model"
    if not (base / "model_index.json").exists():
        save_tiny_pretrained(base, cfg.model.kind, cfg.model.tiny_seed)
    pipe = WanVACEPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora_dir)
    frames = pipe(prompt="a person smiles at the camera", height=cfg.model.height, width=cfg.model.width,
                  num_frames=cfg.model.num_frames, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    print(f"[demo] WanVACEPipeline.from_pretrained({base}) + load_lora_weights({lora_dir}) -> video {frames.shape}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, DEMO_OVERRIDES + list(args.overrides))
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    logging.basicConfig(level=logging.WARNING)
    ensure_demo_shards(cfg.data.prompt_shards)

    from launcher.checkpoint import CheckpointManager
    from launcher.metrics import read_metrics
    from launcher.train import run

    run(cfg)

    out = Path(cfg.trainer.output_dir)
    records = read_metrics(out)
    rewards = np.array([r["reward_mean"] for r in records])
    k = max(1, len(rewards) // 4)
    latest = CheckpointManager(out).latest()
    kls = np.array([r["kl"] for r in records])
    print(f"\n[demo] {len(records)} steps; mean reward over the first {k} steps {rewards[:k].mean():.4f}, "
          f"over the last {k} steps {rewards[-k:].mean():.4f}; KL to the reference {kls[0]:.2e} -> {kls[-1]:.2e}")
    print("[demo] note: the tiny random-init VAE barely passes latent changes to pixels, so this demo reward is "
          "not expected to rise visibly (README, 'Demo'); the KL shows the policy moving.")
    print(f"[demo] metrics:     {out / 'metrics.jsonl'}")
    print(f"[demo] tensorboard: .venv/bin/tensorboard --logdir {out / 'tb'}")
    print(f"[demo] checkpoint:  {latest}")
    print(f"[demo] final LoRA:  {latest / 'lora' / 'pytorch_lora_weights.safetensors'}")
    show_lora_in_pipeline(cfg, latest / "lora")


if __name__ == "__main__":
    main()
