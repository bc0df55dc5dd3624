"""One config tree for the whole system.

Every knob lives in a dataclass below; OmegaConf turns the tree into a *structured* config, so a
YAML file or a `key.sub=value` override that names an unknown key, or gives a value of the wrong type,
fails at load time with a message naming the key (and the file). Defaults here are the tiny CPU
preset (`cluster_configs/local_cpu.yaml` only restates the important ones); the GPU presets override
them with the paper's settings.

Usage:
    cfg = load_config("cluster_configs/local_cpu.yaml", ["trainer.steps=3"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


# ----------------------------------------------------------------------------- model


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 4
    alpha: float = 4.0
    # Attention projections of diffusers' Wan blocks (attn1 = self, attn2 = cross).
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # peft init of A: "default" (Kaiming) or "gaussian"; B starts at zero either way, so a fresh
    # adapter is an exact no-op (policy == reference at step 0).
    init: str = "default"


@dataclass
class ModelConfig:
    # t2v: Wan2.1 text-to-video; vace: Wan2.1 VACE (refs as control); phantom: refs concatenated.
    kind: str = "vace"
    # pretrained: load `path`. random: build `arch` with random weights, nothing read or downloaded (the
    # tiny CPU models, or a real architecture for a rehearsal: launcher/rehearse.py).
    init: str = "pretrained"
    # A named architecture (policy/arch.py): tiny | wan2.1-vace-1.3b | wan2.1-vace-14b | wan2.1-t2v-1.3b |
    # wan2.1-t2v-14b | phantom-wan-1.3b. With init=pretrained it is checked against `path`'s transformer.
    arch: Optional[str] = None
    # Local diffusers-format directory (model_index.json, transformer/, vae/, text_encoder/, tokenizer/).
    path: Optional[str] = None
    # Phantom's released transformer checkpoint (original Wan key format), converted on load.
    phantom_checkpoint: Optional[str] = None
    tiny_seed: int = 0  # seed of random init (any arch): every role builds the same weights
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # Rehearsal only (init=random): fewer transformer blocks (VACE control blocks kept at the architecture's
    # stride), text-encoder layers and vocabulary. Widths, heads and patch sizes stay the architecture's.
    num_layers: Optional[int] = None
    text_encoder_layers: Optional[int] = None
    text_encoder_vocab: Optional[int] = None
    vae_decode_batch: int = 1  # videos the VAE decodes at once (its activations dominate a rollout's peak)
    height: int = 32
    width: int = 32
    num_frames: int = 9
    max_references: int = 3
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


# ----------------------------------------------------------------------------- sampler


@dataclass
class SamplerConfig:
    num_steps: int = 4
    guidance_scale: float = 4.5
    shift: float = 3.0  # Wan's flow shift of the sigma schedule
    # Sigmas and transformer timesteps (policy/schedule.py): "unipc" = Wan's shipped UniPC flow schedule
    # (official Identity-GRPO), "euler" = FlowMatchEulerDiscreteScheduler's (Flow-GRPO).
    schedule: str = "unipc"
    # "linear": std = std_min + (std_max - std_min) * s (official Identity-GRPO code);
    # "eta": std = eta * sqrt(s / (1 - s)) (Flow-GRPO).
    noise_rule: str = "linear"
    eta: float = 0.7
    # Numbers, or "schedule": std_max = the schedule's sigmas[1], std_min = its last sigma (official).
    std_min: Any = "schedule"
    std_max: Any = "schedule"
    # Phantom's image guidance (its CFG has text and image terms; guidance_scale is the text one).
    image_guidance_scale: float = 5.0
    negative_prompt: str = ""
    max_sequence_length: int = 32


# ----------------------------------------------------------------------------- GRPO


@dataclass
class GrpoConfig:
    group_size: int = 4
    prompts_per_step: int = 2
    clip_range: float = 1e-3
    kl_beta: float = 0.004
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    std_mode: str = "group"  # group | global
    std_ddof: int = 0  # 0: population std (official np.std), 1: sample std
    # Which sampled steps are trained: a fraction of them, in "fixed" (first ones) or "random" order.
    timestep_fraction: float = 1.0
    timestep_order: str = "random"  # random | fixed
    num_inner_epochs: int = 1
    # Optimizer steps per update, each over an equal share of every learner rank's groups (official: 2 per
    # epoch of 32 prompts). 1 = one step over all groups (on-policy: every ratio starts at exactly 1).
    optimizer_steps_per_update: int = 1


@dataclass
class EmaConfig:
    """EMA of the trainable weights (policy/ema.py): evaluated and saved beside the live weights."""

    enabled: bool = False
    decay: float = 0.9
    update_interval: int = 8  # optimizer steps between updates
    repeats: int = 1  # applications per update (official loop: 4, see policy/ema.py)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0
    ema: EmaConfig = field(default_factory=EmaConfig)


# ----------------------------------------------------------------------------- reward


@dataclass
class VlmRewardConfig:
    # pretrained: `path` (a trained reward-model directory, or a Qwen2.5-VL base); random: `arch` with random
    # weights (tiny | qwen2.5-vl-3b), for CPU tests and rehearsals.
    init: str = "pretrained"
    arch: Optional[str] = None
    path: Optional[str] = None
    num_frames: int = 5
    tie_theta: float = 5.0
    image_size: int = 448  # multiple of 28; the CPU presets use 56
    dtype: str = "float32"  # float32 | bfloat16: the VLM's weights (the GPU presets: bfloat16)
    # A `path` that is a Qwen2.5-VL base (no trained head) is an error unless this is set (its scores are noise).
    allow_untrained_head: bool = False
    # Rehearsal only (init=random, arch qwen2.5-vl-3b): fewer language / vision layers and a smaller vocabulary.
    text_layers: Optional[int] = None
    vision_layers: Optional[int] = None
    vocab: Optional[int] = None


@dataclass
class FaceRewardConfig:
    backend: str = "dlib"  # dlib (weights from face-recognition-models) | arcface (local ONNX)
    model_path: Optional[str] = None
    num_frames: int = 5
    aggregate: str = "mean"  # mean | min over identities
    missing_penalty: float = 0.0
    upsample: int = 1  # dlib HOG upsampling passes: 0 finds faces >= ~80 px, 1 >= ~40 px (about 4x slower)
    max_extra_faces: int = 2  # embed at most (people + this) largest faces per frame; bounds cost on crowds


@dataclass
class RewardConfig:
    # Named components and their weights; the composite reward is their weighted sum.
    weights: Dict[str, float] = field(default_factory=lambda: {"face": 1.0})
    on_nan: str = "mask"  # mask the sample (counted) | raise
    vlm: VlmRewardConfig = field(default_factory=VlmRewardConfig)
    face: FaceRewardConfig = field(default_factory=FaceRewardConfig)


# ----------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    prompt_shards: str = MISSING  # required: local paths or a brace pattern of prompt shards
    preference_shards: Optional[str] = None  # reward-model training only
    eval_prompt_shards: Optional[str] = None  # held-out prompts: launcher.evaluate's default and the training monitor
    shuffle_buffer: int = 16
    seed: int = 0
    on_error: str = "raise"  # raise | skip
    num_loader_workers: int = 0


# ----------------------------------------------------------------------------- workers


@dataclass
class PoolConfig:
    num_workers: int = 1
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    # Ray custom resource a node must offer to host this pool (e.g. "reward_node"); None = any.
    node_resource: Optional[str] = None


@dataclass
class LearnerConfig:
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16
    # Samples of one group per forward/backward; 0 = the whole group (the rollout's own batch, so the
    # first recomputed log-prob matches bit for bit). Large models split a group (e.g. 14B: 4).
    micro_batch_size: int = 0


@dataclass
class WorkersConfig:
    colocate: bool = True
    ray_address: Optional[str] = None  # attach to this cluster; None starts a local one
    rollout: PoolConfig = field(default_factory=PoolConfig)
    reward: PoolConfig = field(default_factory=PoolConfig)
    learner: PoolConfig = field(default_factory=lambda: PoolConfig(num_workers=2))
    learner_engine: LearnerConfig = field(default_factory=LearnerConfig)
    # How a new policy version reaches the rollout workers: "broadcast" = a process group of learner
    # rank 0 + the rollout workers (workers/weight_sync.py), "object_store" = a Ray object ref each
    # worker fetches, "auto" = broadcast for full fine-tuning, the object store for (small) LoRA.
    weight_sync: str = "auto"
    weight_sync_timeout_s: float = 600.0  # a broadcast (or group build) slower than this raises


# ----------------------------------------------------------------------------- trainer / logging


@dataclass
class TrainerConfig:
    steps: int = 10
    seed: int = 0
    device: str = "cpu"
    output_dir: str = MISSING  # required
    resume: str = "auto"  # auto | never | <checkpoint path>
    checkpoint_every: int = 5
    keep_last: int = 3
    mode: str = "sync"  # sync | async
    max_staleness: int = 1
    # A dead learner rank restarts the learner group from the last checkpoint; more restarts than this in
    # one run stop it (a rank that dies every time: out of memory, a bad node).
    max_learner_restarts: int = 10


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    video_every: int = 5
    progress_bar: bool = True
    eval_every: int = 0  # held-out over-optimisation monitor every N steps (0 = off); needs data.eval_prompt_shards
    eval_num_prompts: int = 4
    eval_seeds_per_prompt: int = 1


@dataclass
class FaultsConfig:
    """Deliberate failures for tests and demos: kill `role` worker `rank` at `step` (-1 = never)."""

    # rollout | reward | learner (in the update) | publish (a learner rank, while publishing that step's
    # weights) | checkpoint (the driver, mid-commit)
    role: Optional[str] = None
    rank: int = 0
    step: int = -1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


# ----------------------------------------------------------------------------- loading

CHOICES = {
    "model.kind": {"t2v", "vace", "phantom"},
    "model.init": {"pretrained", "random"},
    "reward.vlm.init": {"pretrained", "random"},
    "reward.vlm.dtype": {"float32", "bfloat16"},
    "model.dtype": {"float32", "bfloat16", "float16"},
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
    "faults.role": {None, "rollout", "reward", "learner", "publish", "checkpoint"},
}

POSITIVE = [
    "model.height", "model.width", "model.num_frames", "model.lora.rank", "sampler.num_steps",
    "grpo.group_size", "grpo.prompts_per_step", "grpo.num_inner_epochs", "grpo.optimizer_steps_per_update",
    "trainer.steps", "trainer.checkpoint_every", "trainer.keep_last", "workers.rollout.num_workers",
    "workers.reward.num_workers", "workers.learner.num_workers", "logging.eval_num_prompts",
    "logging.eval_seeds_per_prompt", "workers.weight_sync_timeout_s", "model.vae_decode_batch",
    "optim.ema.update_interval", "optim.ema.repeats", "reward.vlm.image_size", "reward.vlm.num_frames",
]
NON_NEGATIVE = ["trainer.max_staleness", "trainer.max_learner_restarts", "logging.video_every",
                "model.lora.alpha", "optim.lr", "optim.warmup_steps", "optim.grad_clip", "grpo.kl_beta",
                "grpo.clip_range"]
# Optional counts: None (not set) or > 0.
OPTIONAL_POSITIVE = ["model.num_layers", "model.text_encoder_layers", "model.text_encoder_vocab",
                     "reward.vlm.text_layers", "reward.vlm.vision_layers", "reward.vlm.vocab"]
REHEARSAL_ONLY = {"model": ["num_layers", "text_encoder_layers", "text_encoder_vocab"],
                  "reward.vlm": ["text_layers", "vision_layers", "vocab"]}


def describe_error(err: OmegaConfBaseException, source: str, key: Optional[str] = None) -> str:
    key = key or getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return f"{source}: invalid config key '{key}': {msg}"


def _check_values(cfg: DictConfig, source: str) -> None:
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
    from policy.sde import NoiseRule

    try:
        NoiseRule.from_config(cfg.sampler)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
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
    for name in cfg.reward.weights:
        if name not in KNOWN_REWARDS:
            raise ConfigError(f"{source}: 'reward.weights.{name}' is not a known reward {sorted(KNOWN_REWARDS)}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing required value(s): {', '.join(missing)}")
    _check_model_source(cfg, source)


def _check_model_source(cfg: DictConfig, source: str) -> None:
    """Where weights come from: a path for `pretrained`, a known architecture for `random`; the
    rehearsal-only reductions only with random init; learner precision = model dtype."""
    from policy.arch import ARCHITECTURES, get_architecture

    m = cfg.model
    if m.init == "pretrained" and not m.path:
        raise ConfigError(f"{source}: 'model.init' is pretrained but 'model.path' is not set (a local diffusers "
                          f"directory), or set model.init=random with model.arch (one of {sorted(ARCHITECTURES)})")
    if m.init == "random":
        if not m.arch:
            raise ConfigError(f"{source}: 'model.init' is random but 'model.arch' is not set "
                              f"(one of {sorted(ARCHITECTURES)})")
    if m.arch is not None:
        try:
            get_architecture(m.arch, m.kind)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    v = cfg.reward.vlm
    if "vlm" in cfg.reward.weights:
        if v.init == "pretrained" and not v.path:
            raise ConfigError(f"{source}: reward 'vlm' is used but 'reward.vlm.path' is not set (and "
                              f"'reward.vlm.init' is pretrained); or set reward.vlm.init=random with reward.vlm.arch")
        if v.init == "random" and v.arch not in VLM_ARCHITECTURES:
            raise ConfigError(f"{source}: 'reward.vlm.arch' must be one of {sorted(VLM_ARCHITECTURES)} with "
                              f"reward.vlm.init=random, got {v.arch!r}")
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
VLM_ARCHITECTURES = {"tiny", "qwen2.5-vl-3b"}

# Names a composite reward may use (reward/composite.py registers the implementations).
KNOWN_REWARDS = {"face", "vlm", "demo_brightness", "demo_reference_color"}


def load_structured(schema, check: Callable[[DictConfig, str], None], path: Optional[str | Path] = None,
                    overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults of dataclass `schema` <- YAML file <- `key=value` overrides, type-checked, then `check`ed.

    Shared by every config tree of the project (training here, reward-model training in
    reward/train_config.py), so all of them report bad keys the same way. Returns a read-only tree.
    """
    cfg = OmegaConf.structured(schema)
    mappings = _mapping_keys(cfg)
    source, key = "defaults", None
    try:
        for file_name, incoming in _file_chain(path) if path is not None else []:
            source = file_name  # named in an error
            cfg = OmegaConf.merge(_cleared(cfg, [k for k in mappings if OmegaConf.select(incoming, k) is not None]),
                                  incoming)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key.sub=value")
            source, key = f"override '{item}'", item.split("=", 1)[0]
            cfg = OmegaConf.merge(_cleared(cfg, [k for k in mappings if k == key]), OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err, source, key)) from None
    origin = " + ".join([str(path)] * (path is not None) + [f"overrides {list(overrides)}"] * bool(overrides))
    check(cfg, origin or "defaults")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _file_chain(path: str | Path, seen: Sequence[Path] = ()) -> List[tuple]:
    """(source, tree) of a YAML file and the files it builds on, base first. A file may name one other by
    `base: FILE` (relative to itself): an evaluation preset is its training preset plus what differs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the 'base' of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(map(str, [*seen, path.resolve()]))}")
    try:
        tree = OmegaConf.load(path)
    except yaml.YAMLError as err:  # one line: file, line, column, what the parser says
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(tree, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of sections (model:, sampler:, ...), "
                          f"got a {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be one file name, got {base!r}")
    chain = _file_chain(path.parent / base, [*seen, path.resolve()]) if base else []
    return chain + [(str(path), tree)]


def _mapping_keys(node: DictConfig, prefix: str = "") -> List[str]:
    """Dotted keys of the free-form mappings in a structured tree (e.g. `reward.weights`), not dataclasses."""
    out = []
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                out.append(f"{prefix}{key}")
            else:
                out += _mapping_keys(child, f"{prefix}{key}.")
    return out


def _cleared(cfg: DictConfig, keys: Sequence[str]) -> DictConfig:
    """`cfg` with the mappings at `keys` emptied: a mapping that a file (or a `key={...}` override) gives
    replaces the one before it instead of merging into it. A preset that says `reward.weights: {vlm: 1.0}`
    scores with the VLM alone, not beside an inherited `face: 1.0`. (`reward.weights.face=0.5` still sets
    one entry.)"""
    for key in keys:
        OmegaConf.update(cfg, key, {}, merge=False)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config: defaults <- YAML file <- `key=value` overrides."""
    return load_structured(Config, _check_values, path, overrides)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_from_yaml_text(text: str) -> DictConfig:
    """Rebuild a validated config from a resolved YAML dump (as stored in checkpoints)."""
    try:
        base, stored = OmegaConf.structured(Config), OmegaConf.create(text)
        cleared = [k for k in _mapping_keys(base) if OmegaConf.select(stored, k) is not None]
        cfg = OmegaConf.merge(_cleared(base, cleared), stored)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err, "stored config")) from None
    _check_values(cfg, "stored config")
    return cfg



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
