"""`make demo`: the whole system on this machine, in minutes, on CPU.

1. builds demo prompt shards (real face photographs, see data/demo.py) unless they exist;
2. writes the demo base model unless it exists (`model.path`, a local diffusers directory: the tiny
   random-init VACE transformer and text encoder with the trained demo VAE of policy/demo_vae.py);
3. starts a local Ray cluster and trains a LoRA on it with GRPO: rollout, reward and 2 DeepSpeed
   ZeRO-2 learner ranks, colocated on the CPU (cluster_configs/demo_cpu.yaml);
4. prints how the mean reward moved, where the logs, metrics and final LoRA are, and loads the LoRA
   into a stock diffusers `WanVACEPipeline` to show it is usable as is.

The tiny model cannot draw faces, so the demo trains on a *demo reward* a tiny model can learn in
minutes (`demo_brightness`); the reference-colour demo reward and the face-identity reward are computed
and logged alongside (weight 0), as they would be on a real model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

import numpy as np

from config import ConfigError
from workers.run_config import load_run_config

DEMO_CONFIG = "cluster_configs/demo_cpu.yaml"


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


def ensure_demo_model(model_cfg) -> None:
    """Write the demo base model to `model.path` unless it is there: the tiny random-init parts of
    policy/models.py with the shipped, trained demo VAE (why: policy/demo_vae.py)."""
    from policy.demo_vae import load_demo_vae
    from policy.models import build_tiny_components, save_pretrained

    path = Path(model_cfg.path)
    if (path / "model_index.json").exists():
        return
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"model.path: {path} exists but holds no model_index.json; not writing the demo "
                              "model over it (remove it, or point model.path elsewhere)")
    print(f"[demo] writing the demo base model to {path}")
    components = build_tiny_components(model_cfg.kind, model_cfg.tiny_seed)
    components.vae = load_demo_vae()
    save_pretrained(components, path)


def show_lora_in_pipeline(cfg, lora_dir: Path) -> tuple:
    """Load the trained LoRA into a stock diffusers pipeline over the same base weights and run it, with and
    without the LoRA, on the first demo prompt and its references. Returns (base, LoRA) mean brightness.

    The pipeline gets the training's text length (`sampler.max_sequence_length`), negative prompt, guidance
    and step count: the LoRA was trained on text embeddings of that length, and diffusers' default of 512
    tokens puts 480 padding positions it never saw into every cross-attention (README, "Demo").
    """
    import torch
    from diffusers import WanVACEPipeline
    from PIL import Image

    from data.reader import ShardReader
    from policy.models import save_tiny_pretrained

    base = Path(cfg.model.path or Path(cfg.trainer.output_dir) / "base_model")
    if not (base / "model_index.json").exists():
        save_tiny_pretrained(base, cfg.model.kind, cfg.model.tiny_seed)
    sample = next(iter(ShardReader.from_config(cfg.data, "prompt")))
    pipe = WanVACEPipeline.from_pretrained(base)

    def video():
        return pipe(prompt=sample["prompt"], negative_prompt=cfg.sampler.negative_prompt,
                    reference_images=[Image.fromarray(r) for r in sample["refs"]],
                    max_sequence_length=cfg.sampler.max_sequence_length, guidance_scale=cfg.sampler.guidance_scale,
                    height=cfg.model.height, width=cfg.model.width, num_frames=cfg.model.num_frames,
                    num_inference_steps=cfg.sampler.num_steps, generator=torch.Generator().manual_seed(0),
                    output_type="np").frames[0]

    before = video()
    pipe.load_lora_weights(lora_dir)
    frames = video()
    print(f"[demo] WanVACEPipeline.from_pretrained({base}) + load_lora_weights({lora_dir}) -> video {frames.shape}")
    print(f"[demo] mean brightness in the stock pipeline ({cfg.sampler.max_sequence_length}-token text, "
          f"{cfg.sampler.num_steps} steps): base {before.mean():.4f}, with the LoRA {frames.mean():.4f}")
    return float(before.mean()), float(frames.mean())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEMO_CONFIG)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, list(args.overrides))
    except ConfigError as err:
        raise SystemExit(f"demo: config error: {err}") from None
    logging.basicConfig(level=logging.WARNING)
    ensure_demo_shards(cfg.data.prompt_shards)
    if cfg.model.path:
        ensure_demo_model(cfg.model)

    from launcher.train import run
    from runtime.checkpoint import CheckpointManager
    from runtime.metrics import read_metrics

    run(cfg)

    out = Path(cfg.trainer.output_dir)
    records = read_metrics(out)
    rewards = np.array([r["reward_mean"] for r in records])
    k = max(1, len(rewards) // 4)
    latest = CheckpointManager(out).latest()
    kls = np.array([r["kl"] for r in records])
    print(f"\n[demo] {len(records)} steps; mean reward over the first {k} steps {rewards[:k].mean():.4f}, "
          f"over the last {k} steps {rewards[-k:].mean():.4f}; KL to the reference {kls[0]:.2e} -> {kls[-1]:.2e}")
    marks = np.linspace(0, len(rewards) - 1, min(len(rewards), 6)).round().astype(int)
    print("[demo] mean reward by step: " + ", ".join(f"{records[i]['step']}: {rewards[i]:.3f}" for i in marks))
    print(f"[demo] metrics:     {out / 'metrics.jsonl'}")
    print(f"[demo] tensorboard: .venv/bin/tensorboard --logdir {out / 'tb'}")
    print(f"[demo] checkpoint:  {latest}")
    print(f"[demo] final LoRA:  {latest / 'lora' / 'pytorch_lora_weights.safetensors'}")
    show_lora_in_pipeline(cfg, latest / "lora")


if __name__ == "__main__":
    main()
