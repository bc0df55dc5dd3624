"""The reward trainer's model, DeepSpeed engine and checkpoints (reward/train.py runs the algorithm with them).

Model: tiny random-init, a local Qwen2.5-VL (`model.path`) or a trained reward model (`model.init_from`), in our
format or the official one (`model.format`); engine: ZeRO stage by config, client AdamW, linear warm-up then
constant or cosine (`optim.schedule`);
checkpoints: engine state + step + reader positions + RNG, the last K kept; export: `save_pretrained` on rank 0.
"""


import math
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from reward.official import OfficialRewardModel, load_official_reward_model
from reward.official_format import DTYPES
from reward.vlm import IdentityRewardModel

CKPT_DIR, TAG_PREFIX, MODEL_DIR = "checkpoints", "step_", "model"


# ----------------------------------------------------------------------------- setup


def setup_distributed(device: str):
    """One rank unless launched by torchrun (runtime/distributed.py), and init torch.distributed once."""
    from runtime.distributed import init_distributed, single_process_defaults

    single_process_defaults()
    if not dist.is_initialized():
        init_distributed("gloo" if device == "cpu" else "nccl")
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg) -> nn.Module:
    m = cfg.model
    if m.format == "official":
        return build_official_model(cfg)
    if m.init_from:
        model = IdentityRewardModel.from_pretrained(m.init_from, config_key="model.init_from")
    elif m.init == "pretrained":
        model = IdentityRewardModel.from_base(m.path, m.image_size, m.num_frames, cfg.trainer.tie_theta, m.dtype,
                                              m.instruction, seed=m.tiny_seed, config_key="model.path")
    elif m.arch == "tiny":
        model = IdentityRewardModel.build_tiny(m.image_size, m.num_frames, cfg.trainer.tie_theta, m.tiny_seed,
                                               m.instruction).to(DTYPES[m.dtype])
    else:
        model = IdentityRewardModel.build_random(m.arch, m.image_size, m.num_frames, cfg.trainer.tie_theta,
                                                 m.tiny_seed, m.dtype, m.text_layers, m.vision_layers, m.vocab,
                                                 m.instruction)
    lora = OmegaConf.to_container(m.lora) if m.lora.enabled else None
    if lora is not None:
        lora.pop("enabled")
    model.configure_training(lora, language_model=m.train_language_model, vision=m.train_vision,
                             merger=m.train_merger)
    return model


def build_official_model(cfg) -> OfficialRewardModel:
    """model.format=official: the official reward model (reward/official.py) from a base, a random architecture or
    an official checkpoint (`model.init_from`), trainable parts as the official training's."""
    m = cfg.model
    lora = {"rank": m.lora.rank, "alpha": m.lora.alpha, "dropout": m.lora.dropout}
    if m.init_from:
        model = load_official_reward_model(m.init_from, m.path if m.init == "pretrained" else None, m.dtype,
                                           video_fps=m.video_fps, config_key="model.init_from")
    elif m.init == "pretrained":
        model = OfficialRewardModel.from_base(m.path, m.dtype, lora, m.num_frames, m.max_frame_pixels, m.video_fps)
    else:
        model = OfficialRewardModel.build_random(m.arch, m.dtype, lora, m.num_frames, m.max_frame_pixels,
                                                 m.video_fps, m.tiny_seed, m.text_layers, m.vision_layers, m.vocab,
                                                 m.video_min_pixels)
    model.configure_training(vision=m.train_vision, merger=m.train_merger)
    return model


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate's factor at optimizer step `step` (0-based): (step + 1) / warmup over the first `warmup`
    steps, then 1 (constant) or 0.5 (1 + cos(pi p)) with p = (step - warmup) / (total - warmup), capped at 1
    (cosine: from 1 after the warmup to 0 at `total`)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(cfg, model: nn.Module, world: int):
    import deepspeed

    t, o = cfg.trainer, cfg.optim
    ds_config = {
        "train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world, "gradient_clipping": o.grad_clip,
        # memory_efficient_linear off: at stage 3 DeepSpeed would replace torch.nn.functional.linear process-wide,
        # and the trainer's eval scores would round differently from the reward workers' (workers/learner.py).
        "zero_optimization": {"stage": t.zero_stage, "memory_efficient_linear": False},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
    }
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(model.optimizer_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, int(o.warmup_steps), int(t.steps), str(o.schedule)))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    return engine


# ----------------------------------------------------------------------------- checkpoints


def resume_target(cfg, out: Path):
    """(load_dir, tag) to resume from, or None. resume = auto | never | <checkpoints dir or step dir>."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        root = out / CKPT_DIR
        return (root, (root / "latest").read_text().strip()) if (root / "latest").is_file() else None
    path = Path(mode)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and path.name.startswith(TAG_PREFIX):
        return path.parent, path.name
    raise FileNotFoundError(f"trainer.resume: {mode!r} is neither 'auto', 'never', a checkpoints folder with a "
                            f"'latest' file nor a {TAG_PREFIX}* folder")


def save_checkpoint(engine, out: Path, step: int, pools, rank: int, keep_last: int) -> None:
    """Per-rank trainer state (reader positions, RNG), then the engine state (model, optimizer, scheduler):
    DeepSpeed rewrites the `latest` pointer only after its own files, so `latest` never names a partial step."""
    root, tag = out / CKPT_DIR, f"{TAG_PREFIX}{step:06d}"
    (root / tag).mkdir(parents=True, exist_ok=True)
    state = {"step": step, "pools": {name: p.state_dict() for name, p in pools.items()},
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    torch.save(state, root / tag / f"trainer_state_rank{rank}.pt")
    dist.barrier()
    # Frozen weights (a LoRA'd 3B base) are not saved: a resume rebuilds them from model.path / the seed.
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
        latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        for old in tags[:-keep_last]:
            if old.name != latest:  # after a resume from an older step, the newest save is not the highest
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, target, pools, rank: int) -> int:
    load_dir, tag = target
    path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"trainer.resume: no DeepSpeed checkpoint {tag!r} in {load_dir}")
    state = torch.load(Path(load_dir) / tag / f"trainer_state_rank{rank}.pt", weights_only=False)
    if set(state["pools"]) != set(pools):
        raise ValueError(f"checkpoint {tag} has pools {sorted(state['pools'])}, this run {sorted(pools)}")
    for name, pool in pools.items():
        pool.load_state_dict(state["pools"][name])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(client["step"])


def export_model(engine, directory: Path, zero_stage: int, rank: int, step: int) -> None:
    """save_pretrained of the trained model (ZeRO-3 parameters gathered first), atomically renamed."""
    import deepspeed

    tmp = directory.with_name(f".{directory.name}.tmp")
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            engine.module.save_pretrained(str(tmp), step=step)
            shutil.rmtree(directory, ignore_errors=True)
            tmp.rename(directory)
    dist.barrier()
