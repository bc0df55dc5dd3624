"""Value checks of the training config beyond types: choices, ranges, combinations, where weights come from.

Run by config/load.py on every load (file, overrides, or a checkpoint's stored copy); each failure is a
ConfigError naming the key and the source. Pure: nothing here knows the models. What only the models' rooms can
answer (is `model.arch` a known architecture of `model.kind`, a reward name in the registry, a valid noise rule)
is asked by policy/checks.py and reward/checks.py, which workers/run_config.py runs after these.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from config.schema import Config


class ExpectedError(Exception):
    """Bad input the user can fix (a config key, a path, a shard or sample, a checkpoint file); the message names the
    culprit. Every entry point answers one in one line with exit status 2 (config/cli.py `expected_errors`): the
    rooms' own error classes derive from it, so the boundary needs no list of them."""


class ConfigError(ExpectedError, ValueError):
    """A config file or override is invalid; the message names the key and the source."""


FAULT_ROLES = ("rollout", "reward", "learner", "publish", "checkpoint", "eval")
# Keys that another key's value makes the run ignore: (key, mode key, mode values, why, the fix). Setting one is an
# error naming both keys: a CPU preset (model.init: random) pointed at real weights with model.path would otherwise
# train its random model without a word.
IGNORED_UNDER = (
    ("model.path", "model.init", ("random",), "model.init=random builds model.arch with random weights and reads no "
     "file", "pass model.init=pretrained to load model.path (with model.arch naming its architecture), or drop it"),
    ("model.phantom_checkpoint", "model.init", ("random",), "random init reads no file",
     "pass model.init=pretrained with model.path, or drop model.phantom_checkpoint"),
    ("model.phantom_checkpoint", "model.kind", ("t2v", "vace"), "only Phantom reads it",
     "pass model.kind=phantom, or drop model.phantom_checkpoint"),
    ("reward.vlm.path", "reward.vlm.init", ("random",), "reward.vlm.init=random builds reward.vlm.arch with random "
     "weights and reads no file", "pass reward.vlm.init=pretrained to load reward.vlm.path, or drop it"),
    ("reward.vlm.base_path", "reward.vlm.init", ("random",), "random init reads no base model",
     "pass reward.vlm.init=pretrained with reward.vlm.path, or drop reward.vlm.base_path"),
    ("reward.vlm.checkpoint_step", "reward.vlm.init", ("random",), "random init reads no checkpoint",
     "pass reward.vlm.init=pretrained with reward.vlm.path, or drop reward.vlm.checkpoint_step"),
    ("reward.face.model_path", "reward.face.backend", ("dlib",), "the dlib backend's weights come from the "
     "face-recognition-models package", "pass reward.face.backend=arcface to use the ONNX file, or drop it"),
)
# What turns a preset that names weight files into a random-init one of the same architectures (rehearsals, memory
# plans): the mode and the files it would ignore, together.
RANDOM_POLICY = ("model.init=random", "model.path=null", "model.phantom_checkpoint=null")
RANDOM_REWARD_MODEL = ("reward.vlm.init=random", "reward.vlm.path=null", "reward.vlm.base_path=null",
                       "reward.vlm.checkpoint_step=null")


def check_nft(cfg: DictConfig, source: str) -> None:
    """What grpo.objective=nft (policy/nft.py) cannot be combined with."""
    if cfg.sampler.sde_window.size:
        raise ConfigError(f"{source}: 'sampler.sde_window.size' ({cfg.sampler.sde_window.size}) is set but "
                          "'grpo.objective' is nft, whose rollouts are deterministic (no SDE steps); drop the window")
    if cfg.sampler.shared_initial_noise:
        raise ConfigError(f"{source}: 'sampler.shared_initial_noise' is set but 'grpo.objective' is nft, whose "
                          "rollouts are deterministic: a group started from one noise would be one video G times")
    if cfg.grpo.nft_old_decay_rate:
        raise NotImplementedError(f"{source}: 'grpo.nft_old_decay_rate' {cfg.grpo.nft_old_decay_rate} (DiffusionNFT's "
                                  "slowly moving sampling policy) is not implemented; 0 samples with the last weights")
    if cfg.trainer.mode == "async" and cfg.trainer.max_staleness >= 1:
        raise NotImplementedError(f"{source}: 'trainer.mode' async with 'grpo.objective' nft is not implemented (its "
                                  "loss needs the sampling policy's velocity, which the learner has only on-policy); "
                                  "use trainer.mode=sync or trainer.max_staleness=0")


def context_degree(cfg: DictConfig) -> int:
    """Ranks one video's sequence is split across (`model.context_parallel`: ulysses x ring; 1 = off)."""
    return int(cfg.model.context_parallel.ulysses) * int(cfg.model.context_parallel.ring)


def data_parallel_size(cfg: DictConfig) -> int:
    """The learner's context groups: how many shares the prompt groups are split into."""
    return cfg.workers.learner.num_workers // context_degree(cfg)


def check_context_parallel(cfg: DictConfig, source: str) -> None:
    """What `model.context_parallel` (policy/context_parallel.py) needs: whole context groups of GPUs in both pools, a
    video size whose every latent frame splits evenly, and for ring attention a GPU attention kernel that returns the
    log-sum-exp (diffusers' cuDNN one, bf16); what the heads allow is policy/checks.py's."""
    degree, cp = context_degree(cfg), cfg.model.context_parallel
    if degree == 1:
        return
    for pool in ("rollout", "learner"):
        n = cfg.workers[pool].num_workers
        if n % degree:
            raise ConfigError(f"{source}: 'workers.{pool}.num_workers' ({n}) must be a multiple of the "
                              f"context-parallel degree ('model.context_parallel' ulysses x ring = {degree}): each "
                              f"video takes {degree}")
    per_frame = (cfg.model.height // 16) * (cfg.model.width // 16)
    if per_frame % degree:
        raise ConfigError(f"{source}: a latent frame of 'model.height' x 'model.width' ({cfg.model.height}x"
                          f"{cfg.model.width}) has {per_frame} tokens, which do not split into {degree} equal parts "
                          f"('model.context_parallel' ulysses x ring)")
    if cp.ring > 1 and not (cfg.trainer.device.startswith("cuda") and cfg.model.dtype == "bfloat16"):
        raise ConfigError(f"{source}: 'model.context_parallel.ring' > 1 needs 'trainer.device' cuda and "
                          f"'model.dtype' bfloat16: ring attention merges blocks by their log-sum-exp, which "
                          f"diffusers' CPU attention does not return (its cuDNN kernel does); use "
                          f"'model.context_parallel.ulysses' on CPU")


def check_ignored(cfg: DictConfig, rules, source: str) -> None:
    """A ConfigError for the first key that is set while its mode key makes the run ignore it (`IGNORED_UNDER`)."""
    for key, mode_key, modes, why, fix in rules:
        value, mode = OmegaConf.select(cfg, key), OmegaConf.select(cfg, mode_key)
        if value is not None and mode in modes:
            raise ConfigError(f"{source}: '{key}' is set ({value!r}) but '{mode_key}' is {mode!r}: {why}, so '{key}' "
                              f"would be ignored; {fix}")


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


def field_rules(schema, prefix: str = "") -> Iterator[Tuple[str, Dict]]:
    """(dotted key, metadata) of every field of dataclass `schema` (nested ones included) that carries a rule:
    `choices`, or `min` with `exclusive` (config/schema.py `one_of`, `positive`, `non_negative`)."""
    instance = schema() if isinstance(schema, type) else schema
    for f in fields(instance):
        value = getattr(instance, f.name)
        if is_dataclass(value):
            yield from field_rules(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata or "min" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata


def check_field_rules(cfg: DictConfig, schema, source: str) -> None:
    """Each field's own rule (its metadata), with a ConfigError naming the key, the value and what is allowed.
    A None passes a range rule: such fields are Optional (not set)."""
    for key, rule in field_rules(schema):
        value = OmegaConf.select(cfg, key)
        if "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"{source}: '{key}' is {value!r}; allowed: {list(rule['choices'])}")
        if "min" in rule and value is not None:
            low, exclusive = rule["min"], rule["exclusive"]
            if value < low or (exclusive and value == low):
                raise ConfigError(f"{source}: '{key}' must be {'>' if exclusive else '>='} {low}, got {value}")


def check_values(cfg: DictConfig, source: str) -> None:
    check_field_rules(cfg, Config, source)
    if cfg.sampler.noise_rule == "eta" and cfg.sampler.schedule == "unipc":
        raise ConfigError(f"{source}: 'sampler.noise_rule' eta needs 'sampler.schedule' euler: UniPC's first sigma is "
                          f"0.999999, not 1, where eta * sqrt(s / (1 - s)) is ~700 (the eta rule replaces only s = 1); "
                          f"use noise_rule=linear with unipc (official) or schedule=euler with eta (Flow-GRPO)")
    if not 0.0 < cfg.grpo.timestep_fraction <= 1.0:
        raise ConfigError(f"{source}: 'grpo.timestep_fraction' must be in (0, 1]")
    if not 0.0 < cfg.sampler.ode_steps_ratio <= 1.0:
        raise ConfigError(f"{source}: 'sampler.ode_steps_ratio' must be in (0, 1], got {cfg.sampler.ode_steps_ratio}")
    if not 0.0 <= cfg.optim.ema.decay < 1.0:
        raise ConfigError(f"{source}: 'optim.ema.decay' must be in [0, 1), got {cfg.optim.ema.decay}")
    if cfg.optim.ema.enabled and cfg.workers.learner_engine.zero_stage == 3:
        raise NotImplementedError(f"{source}: 'optim.ema.enabled' with 'workers.learner_engine.zero_stage' 3 (the EMA "
                                  "of partitioned parameters) is not implemented; use ZeRO stage 0-2")
    check_context_parallel(cfg, source)
    shares = data_parallel_size(cfg)
    if cfg.grpo.prompts_per_step % shares:
        raise ConfigError(f"{source}: 'grpo.prompts_per_step' ({cfg.grpo.prompts_per_step}) must be a multiple of the "
                          f"learner's data-parallel size ({shares}: 'workers.learner.num_workers' / "
                          f"'model.context_parallel' degree): groups split evenly")
    per_rank, steps = cfg.grpo.prompts_per_step // shares, cfg.grpo.optimizer_steps_per_update
    if per_rank % steps:
        raise ConfigError(f"{source}: 'grpo.optimizer_steps_per_update' ({steps}) must divide each learner rank's "
                          f"groups ('grpo.prompts_per_step' / the learner's data-parallel size = {per_rank})")
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
    if cfg.grpo.objective == "nft":
        check_nft(cfg, source)
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
    reward/checks.py check that the names are known), no file that the mode ignores; the rehearsal-only reductions
    only with random init; learner precision = model dtype."""
    check_ignored(cfg, IGNORED_UNDER, source)
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
