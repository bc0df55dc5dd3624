"""Value checks of the training config beyond types: choices, ranges, combinations, where weights come from.

Run by config/load.py on every load (file, overrides, or a checkpoint's stored copy); each failure is a
ConfigError naming the key and the source. Pure: nothing here knows the models. What only the models' rooms can
answer (is `model.arch` a known architecture of `model.kind`, a reward name in the registry, a valid noise rule)
is asked by policy/checks.py and reward/checks.py, which workers/run_config.py runs after these.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


CHOICES = {
    "model.kind": {"t2v", "vace", "phantom"},
    "model.init": {"pretrained", "random"},
    "reward.vlm.init": {"pretrained", "random"},
    "reward.vlm.dtype": {"float32", "bfloat16"},
    "model.dtype": {"float32", "bfloat16"},
    "model.lora.init": {"default", "gaussian"},
    "sampler.noise_rule": {"eta", "linear"},
    "sampler.schedule": {"unipc", "euler"},
    "grpo.std_mode": {"group", "global"},
    "grpo.std_ddof": {0, 1},
    "grpo.timestep_order": {"random", "fixed"},
    "reward.on_nan": {"mask", "raise"},
    "reward.face.backend": {"dlib", "arcface"},
    "reward.face.aggregate": {"mean", "min"},
    "data.on_error": {"raise", "skip"},
    "workers.learner_engine.zero_stage": {0, 1, 2, 3},
    "workers.learner_engine.precision": {"fp32", "bf16"},
    "workers.weight_sync": {"auto", "object_store", "broadcast"},
    "trainer.mode": {"sync", "async"},
    "sampler.sde_window.strategy": {"progressive", "random", "fixed"},
}
FAULT_ROLES = ("rollout", "reward", "learner", "publish", "checkpoint", "eval")

POSITIVE = [
    "model.height", "model.width", "model.num_frames", "model.lora.rank", "sampler.num_steps",
    "grpo.group_size", "grpo.prompts_per_step", "grpo.num_inner_epochs", "grpo.optimizer_steps_per_update",
    "trainer.steps", "trainer.checkpoint_every", "trainer.keep_last", "workers.rollout.num_workers",
    "workers.reward.num_workers", "workers.learner.num_workers", "logging.eval_num_prompts",
    "logging.eval_seeds_per_prompt", "workers.weight_sync_timeout_s", "model.vae_decode_batch",
    "optim.ema.update_interval", "optim.ema.repeats", "reward.vlm.image_size", "reward.vlm.num_frames",
    "sampler.sde_window.shift_every", "reward.vlm.video_fps",
]
NON_NEGATIVE = ["trainer.max_staleness", "trainer.max_learner_restarts", "logging.video_every",
                "model.lora.alpha", "optim.lr", "optim.warmup_steps", "optim.grad_clip", "grpo.kl_beta",
                "grpo.clip_range", "sampler.sde_window.size", "sampler.sde_window.start", "sampler.sde_window.stride"]
# Optional counts: None (not set) or > 0.
OPTIONAL_POSITIVE = ["model.num_layers", "model.text_encoder_layers", "model.text_encoder_vocab",
                     "reward.vlm.text_layers", "reward.vlm.vision_layers", "reward.vlm.vocab"]
REHEARSAL_ONLY = {"model": ["num_layers", "text_encoder_layers", "text_encoder_vocab"],
                  "reward.vlm": ["text_layers", "vision_layers", "vocab"]}


def describe_error(err: OmegaConfBaseException, source: str, key: Optional[str] = None) -> str:
    key = key or getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return f"{source}: invalid config key '{key}': {msg}"


def parse_kill(entry: str, source: str = "config") -> Tuple[str, int, int]:
    """One `faults.kills` entry, "role:rank:step", as (role, rank, step)."""
    parts = str(entry).split(":")
    try:
        role, rank, step = parts[0], int(parts[1]), int(parts[2])
        valid = len(parts) == 3 and role in FAULT_ROLES and rank >= 0 and step >= 0
    except (IndexError, ValueError):
        valid = False
    if not valid:
        raise ConfigError(f"{source}: 'faults.kills' entry {entry!r} is not role:rank:step with role one of "
                          f"{list(FAULT_ROLES)} and rank, step >= 0")
    return role, rank, step


def check_values(cfg: DictConfig, source: str) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' is {value!r}; allowed: {sorted(allowed, key=str)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {OmegaConf.select(cfg, key)}")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in OPTIONAL_POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0 (or null), got {value}")
    if cfg.sampler.noise_rule == "eta" and cfg.sampler.schedule == "unipc":
        raise ConfigError(f"{source}: 'sampler.noise_rule' eta needs 'sampler.schedule' euler: UniPC's first sigma is "
                          f"0.999999, not 1, where eta * sqrt(s / (1 - s)) is ~700 (the eta rule replaces only s = 1); "
                          f"use noise_rule=linear with unipc (official) or schedule=euler with eta (Flow-GRPO)")
    if not 0.0 < cfg.grpo.timestep_fraction <= 1.0:
        raise ConfigError(f"{source}: 'grpo.timestep_fraction' must be in (0, 1]")
    if not 0.0 <= cfg.optim.ema.decay < 1.0:
        raise ConfigError(f"{source}: 'optim.ema.decay' must be in [0, 1), got {cfg.optim.ema.decay}")
    if cfg.optim.ema.enabled and cfg.workers.learner_engine.zero_stage == 3:
        raise NotImplementedError(f"{source}: 'optim.ema.enabled' with 'workers.learner_engine.zero_stage' 3 (the EMA "
                                  "of partitioned parameters) is not implemented; use ZeRO stage 0-2")
    if cfg.grpo.prompts_per_step % cfg.workers.learner.num_workers:
        raise ConfigError(f"{source}: 'grpo.prompts_per_step' ({cfg.grpo.prompts_per_step}) must be a multiple of "
                          f"'workers.learner.num_workers' ({cfg.workers.learner.num_workers}): groups split evenly")
    per_rank, steps = cfg.grpo.prompts_per_step // cfg.workers.learner.num_workers, cfg.grpo.optimizer_steps_per_update
    if per_rank % steps:
        raise ConfigError(f"{source}: 'grpo.optimizer_steps_per_update' ({steps}) must divide each learner rank's "
                          f"groups ('grpo.prompts_per_step' / 'workers.learner.num_workers' = {per_rank})")
    mb = cfg.workers.learner_engine.micro_batch_size
    if mb < 0 or (mb and cfg.grpo.group_size % mb):
        raise ConfigError(f"{source}: 'workers.learner_engine.micro_batch_size' ({mb}) must be 0 (whole group) "
                          f"or divide 'grpo.group_size' ({cfg.grpo.group_size})")
    window, steps = cfg.sampler.sde_window, cfg.sampler.num_steps
    if 0 < window.size < steps and window.start > steps - window.size:
        raise ConfigError(f"{source}: 'sampler.sde_window.start' ({window.start}) leaves no room for a window of "
                          f"{window.size} in {steps} steps (at most {steps - window.size})")
    if cfg.grpo.group_size < 2:
        raise ConfigError(f"{source}: 'grpo.group_size' must be >= 2 (advantages are relative)")
    if cfg.logging.eval_every < 0 or (cfg.logging.eval_every and not cfg.data.eval_prompt_shards):
        raise ConfigError(f"{source}: 'logging.eval_every' must be >= 0 and, when > 0, needs 'data.eval_prompt_shards'")
    if cfg.model.num_frames % 4 != 1:
        raise ConfigError(f"{source}: 'model.num_frames' must be 4k+1 (Wan VAE), got {cfg.model.num_frames}")
    if cfg.model.height % 16 or cfg.model.width % 16:
        raise ConfigError(f"{source}: 'model.height'/'model.width' must be multiples of 16")
    if {"face", "vlm"} <= set(cfg.reward.weights) and cfg.reward.face.num_frames != cfg.reward.vlm.num_frames:
        raise ConfigError(f"{source}: 'reward.face.num_frames' ({cfg.reward.face.num_frames}) must equal "
                          f"'reward.vlm.num_frames' ({cfg.reward.vlm.num_frames}): both rewards score the same frames")
    weights = dict(cfg.reward.weights)
    if not all(math.isfinite(w) for w in weights.values()) or not any(w != 0 for w in weights.values()):
        raise ConfigError(f"{source}: 'reward.weights' must be finite and not all zero, got {weights}")
    for entry in cfg.faults.kills:
        parse_kill(entry, source)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing required value(s): {', '.join(missing)}")
    _check_model_source(cfg, source)


def _check_model_source(cfg: DictConfig, source: str) -> None:
    """Where weights come from: a path for `pretrained`, an architecture for `random` (policy/checks.py and
    reward/checks.py check that the names are known); the rehearsal-only reductions only with random init;
    learner precision = model dtype."""
    m = cfg.model
    if m.init == "pretrained" and not m.path:
        raise ConfigError(f"{source}: 'model.init' is pretrained but 'model.path' is not set (a local diffusers "
                          f"directory), or set model.init=random with model.arch")
    if m.init == "random" and not m.arch:
        raise ConfigError(f"{source}: 'model.init' is random but 'model.arch' is not set")
    v = cfg.reward.vlm
    if "vlm" in cfg.reward.weights and v.init == "pretrained" and not v.path:
        raise ConfigError(f"{source}: reward 'vlm' is used but 'reward.vlm.path' is not set (and "
                          f"'reward.vlm.init' is pretrained); or set reward.vlm.init=random with reward.vlm.arch")
    if v.image_size % 28:
        raise ConfigError(f"{source}: 'reward.vlm.image_size' must be a multiple of 28 (Qwen2.5-VL patches of 14, "
                          f"merged 2x2), got {v.image_size}")
    for section, keys in REHEARSAL_ONLY.items():
        node = OmegaConf.select(cfg, section)
        init = node.init
        for key in keys:
            if node[key] is not None and init != "random":
                raise ConfigError(f"{source}: '{section}.{key}' reduces a random-init architecture (rehearsals); "
                                  f"it needs {section}.init=random, not {init}")
    precision = cfg.workers.learner_engine.precision
    if PRECISION_OF_DTYPE.get(m.dtype) != precision:
        raise ConfigError(f"{source}: 'workers.learner_engine.precision' ({precision}) must match 'model.dtype' "
                          f"({m.dtype}): rollout and learner compute in the same dtype "
                          f"({', '.join(f'{d} -> {p}' for d, p in PRECISION_OF_DTYPE.items())})")


PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


# What a checkpoint's weights and optimizer state are shaped by: resuming or evaluating it under another value
# would fail deep inside DeepSpeed or peft, or, worse, load and mean something else.
LORA_KEYS = ("model.kind", "model.lora.rank", "model.lora.alpha", "model.lora.target_modules")
RESUME_KEYS = LORA_KEYS + ("model.init", "model.arch", "model.num_layers", "model.dtype", "model.lora.enabled",
                           "workers.learner.num_workers", "workers.learner_engine.zero_stage",
                           "workers.learner_engine.precision")


def stored_config_mismatches(stored: Path, cfg: DictConfig, keys: Sequence[str]) -> List[Tuple[str, object, object]]:
    """(key, value in the checkpoint's config.yaml, value in `cfg`) for each of `keys` that differs (a key the
    stored config lacks is not compared). `model.tiny_seed` is compared too when the weights are random-init."""
    saved = OmegaConf.create(Path(stored).read_text())
    keys = tuple(keys) + (("model.tiny_seed",) if not cfg.model.path else ())
    out = []
    for key in keys:
        mine, theirs = OmegaConf.select(cfg, key), OmegaConf.select(saved, key)
        mine = OmegaConf.to_container(mine) if OmegaConf.is_config(mine) else mine
        theirs = OmegaConf.to_container(theirs) if OmegaConf.is_config(theirs) else theirs
        if theirs is not None and mine != theirs:
            out.append((key, theirs, mine))
    return out
