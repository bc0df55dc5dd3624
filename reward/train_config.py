"""Config tree of the reward-model trainer (`python -m reward.train`), separate from the GRPO tree.

Same rules as the training config (config/): OmegaConf structured configs from the dataclasses below; a YAML
file and then `key.sub=value` overrides are merged onto the defaults, and an unknown key, a value of
the wrong type, a value outside its choices or a missing required value is a `ConfigError` naming
the key and where it came from. Defaults are the tiny CPU preset; cluster_configs/reward_3b_8gpu.yaml
holds the paper's settings (Qwen2.5-VL-3B, LoRA r64 alpha128 on the LLM, vision + merger trained).

    cfg = load_reward_config("cluster_configs/reward_local_cpu.yaml", ["trainer.steps=3"])
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from config import ConfigError, describe_error, load_structured
from config.checks import check_field_rules, check_ignored
from config.cli import build_parser, parse_config
from config.schema import PathsConfig, one_of, positive
from reward.vlm import LLM_LORA_TARGETS
from reward.vlm_arch import VLM_ARCHITECTURES
from reward.vlm_inputs import DEFAULT_INSTRUCTION


@dataclass
class RewardLoraConfig:
    enabled: bool = False
    rank: int = positive(64)
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(LLM_LORA_TARGETS))


@dataclass
class RewardModelConfig:
    # pretrained: the local Qwen2.5-VL directory `path` (or a trained reward model, `init_from`); random: `arch`
    # with random weights (tiny: the CPU model; qwen2.5-vl-3b: the real architecture, for rehearsals).
    init: str = one_of("pretrained", "random", default="pretrained")
    # ours: reward/vlm.py (<|reward|>, each frame an image at image_size, the prompt in `instruction`, our save
    # layout); official: the official Identity-GRPO reward model, input and checkpoint layout (reward/official.py:
    # <|SA_reward|>, the fixed subject-alignment instruction, Qwen's video path; model_config.json + checkpoint-N/),
    # which the GRPO presets' `reward.vlm.path` also loads.
    format: str = one_of("ours", "official", default="ours")
    arch: Optional[str] = None
    path: Optional[str] = None  # local Qwen2.5-VL directory (no hub downloads)
    init_from: Optional[str] = None  # a trained reward-model directory to start from (fine-tuning)
    tiny_seed: int = 0  # seed of random init
    # Rehearsal only (init=random): fewer language / vision layers, a smaller vocabulary and (format official)
    # video frames below Qwen's 100352-pixel floor.
    text_layers: Optional[int] = None
    vision_layers: Optional[int] = None
    vocab: Optional[int] = None
    video_min_pixels: Optional[int] = None
    dtype: str = one_of("float32", "bfloat16", default="float32")  # trainer.precision=bf16 trains in bf16
    image_size: int = positive(56)  # multiple of 28
    num_frames: int = positive(5)
    max_frame_pixels: int = 399360  # format official: the video's and references' pixel limit (official value)
    video_fps: float = 10.0  # format official: the frame rate M-RoPE time assumes (official: 10)
    instruction: str = DEFAULT_INSTRUCTION  # must contain {prompt}
    lora: RewardLoraConfig = field(default_factory=RewardLoraConfig)
    train_language_model: bool = True  # full fine-tuning of the LLM (only without LoRA)
    train_vision: bool = True
    train_merger: bool = True


@dataclass
class RewardDataConfig:
    preference_shards: str = MISSING  # required: local brace pattern of preference shards
    eval_shards: Optional[str] = None  # held-out shards; None: a held_out_fraction of preference_shards' keys
    held_out_fraction: float = 0.1
    eval_sources: List[str] = field(default_factory=lambda: ["human", "auto", "synthetic"])
    shuffle_buffer: int = 16
    seed: int = 0
    on_error: str = one_of("raise", "skip", default="raise")
    num_loader_workers: int = 0


@dataclass
class CurriculumConfig:
    """Weight of the auto pool at step t: end + (start - end) * 0.5 (1 + cos(pi min(t, T) / T))."""

    schedule: str = one_of("cosine", "linear", "constant", default="cosine")  # constant: always start
    auto_weight_start: float = 1.0
    auto_weight_end: float = 0.0
    steps: Optional[int] = None  # T; None = trainer.steps


@dataclass
class TeacherConfig:
    """Filter auto pairs by a teacher trained on human pairs: keep P_teacher(label) >= threshold.
    The decision is stored in <output_dir>/teacher_filter.json and reused by every later run of that
    output_dir (also with trainer.resume=never) as long as threshold and tie_theta match."""

    enabled: bool = False
    checkpoint: Optional[str] = None  # trained reward-model directory; None: train one on human pairs first
    train_steps: int = 100  # when checkpoint is None: steps of the teacher run (in <output_dir>/teacher)
    threshold: float = 0.5
    sources: List[str] = field(default_factory=lambda: ["auto"])  # label sources the filter applies to
    batch_size: int = positive(8)


@dataclass
class RewardOptimConfig:
    lr: float = positive(1e-3)
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # After the warmup: constant (the official reward training's `constant_with_warmup`) or cosine down to 0 at
    # trainer.steps, so the last model is not wherever the last full-size steps left it (the demo's setting).
    schedule: str = one_of("constant", "cosine", default="constant")


@dataclass
class RewardTrainerConfig:
    steps: int = positive(200)
    batch_size: int = positive(4)  # pairs per micro-batch per rank (2x that many videos per forward)
    grad_accum: int = positive(1)
    # rao_kupper: Bradley-Terry with ties (the official reward's `loss_type="btt"`, theta 5) | bradley_terry
    loss: str = one_of("rao_kupper", "bradley_terry", default="rao_kupper")
    tie_theta: float = 5.0
    # bradley_terry only: a tie is the target (1/2, 1/2) ("half") or zero loss ("ignore": VideoAlign's "bt")
    bt_ties: str = one_of("half", "ignore", default="half")
    seed: int = 0
    device: str = one_of("cpu", "cuda", default="cpu")
    # torch intra-op threads (null: torch's default). Tiny CPU models run several times faster with 1 thread
    # on a shared machine: with more, OpenMP threads spin-wait for cores other processes hold.
    num_threads: Optional[int] = None
    zero_stage: int = one_of(0, 1, 2, 3, default=2)
    precision: str = one_of("fp32", "bf16", default="fp32")
    output_dir: str = MISSING  # required
    resume: str = "auto"  # auto | never | <checkpoint dir>
    max_steps_per_run: Optional[int] = None  # stop (with a checkpoint) after this many steps: time-limited jobs
    checkpoint_every: int = positive(50)
    keep_last: int = positive(2)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int = positive(8)
    log_every: int = positive(10)


@dataclass
class RewardLoggingConfig:
    tensorboard: bool = True


@dataclass
class RewardTrainConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)  # as the GRPO config's: ${paths.models}, ${paths.data}
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: RewardOptimConfig = field(default_factory=RewardOptimConfig)
    trainer: RewardTrainerConfig = field(default_factory=RewardTrainerConfig)
    logging: RewardLoggingConfig = field(default_factory=RewardLoggingConfig)


# Keys that another key's value makes the trainer ignore (config/checks.py `check_ignored`).
IGNORED_UNDER = (
    ("model.path", "model.init", ("random",), "model.init=random builds model.arch with random weights and reads no "
     "file", "pass model.init=pretrained to start from model.path, or drop it"),
)
SOURCES = {"human", "auto", "synthetic"}


def _check(cfg: DictConfig, source: str) -> None:
    def fail(key: str, why: str):
        raise ConfigError(f"{source}: '{key}' {why}")

    check_field_rules(cfg, RewardTrainConfig, source)
    if cfg.model.image_size % 28:
        fail("model.image_size", f"must be a multiple of 28 (patch 14 x merge 2), got {cfg.model.image_size}")
    if "{prompt}" not in cfg.model.instruction:
        fail("model.instruction", "must contain '{prompt}'")
    if cfg.model.lora.enabled and cfg.model.train_language_model:
        fail("model.train_language_model", "must be false when model.lora.enabled (LoRA trains the LLM)")
    if cfg.model.format == "official":
        if not cfg.model.lora.enabled:
            fail("model.lora.enabled", "must be true with model.format=official (its checkpoint layout is LoRA + "
                 "trained non-LoRA weights)")
        if cfg.model.num_frames % 2:
            fail("model.num_frames", f"must be even with model.format=official (Qwen's smart_nframes rounds the "
                 f"checkpoint's count to even), got {cfg.model.num_frames}")
        floor = cfg.model.video_min_pixels or 128 * 28 * 28
        if cfg.model.max_frame_pixels < floor or cfg.model.video_fps <= 0:
            fail("model.max_frame_pixels", f"must be >= {floor} (the video's pixel floor), and model.video_fps > 0; "
                 f"got {cfg.model.max_frame_pixels}, {cfg.model.video_fps}")
    if not 0.0 <= cfg.data.held_out_fraction < 1.0:
        fail("data.held_out_fraction", f"must be in [0, 1), got {cfg.data.held_out_fraction}")
    for key in ("data.eval_sources", "teacher.sources"):
        bad = [s for s in OmegaConf.select(cfg, key) if s not in SOURCES]
        if bad:
            fail(key, f"has unknown source(s) {bad}; allowed: {sorted(SOURCES)}")
    for key in ("curriculum.auto_weight_start", "curriculum.auto_weight_end", "teacher.threshold"):
        if not 0.0 <= OmegaConf.select(cfg, key) <= 1.0:
            fail(key, f"must be in [0, 1], got {OmegaConf.select(cfg, key)}")
    if cfg.trainer.num_threads is not None and cfg.trainer.num_threads <= 0:
        fail("trainer.num_threads", f"must be > 0 (or null), got {cfg.trainer.num_threads}")
    if cfg.trainer.max_steps_per_run is not None and cfg.trainer.max_steps_per_run <= 0:
        fail("trainer.max_steps_per_run", f"must be > 0 (or null), got {cfg.trainer.max_steps_per_run}")
    if cfg.curriculum.steps is not None and cfg.curriculum.steps <= 0:
        fail("curriculum.steps", f"must be > 0 (or null), got {cfg.curriculum.steps}")
    if cfg.trainer.loss == "rao_kupper" and not cfg.trainer.tie_theta > 1.0:
        fail("trainer.tie_theta", f"must be > 1 for Rao-Kupper, got {cfg.trainer.tie_theta}")
    if cfg.teacher.enabled and cfg.teacher.checkpoint is None and cfg.teacher.train_steps <= 0:
        fail("teacher.train_steps", "must be > 0 when the teacher is enabled without a checkpoint")
    if len(cfg.optim.betas) != 2:
        fail("optim.betas", f"must have two values, got {list(cfg.optim.betas)}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing required value(s): {', '.join(missing)}")
    check_ignored(cfg, IGNORED_UNDER, source)
    m = cfg.model
    if m.init == "pretrained" and not (m.path or m.init_from):
        fail("model.path", "is not set (model.init is pretrained): give a local Qwen2.5-VL directory, a trained "
             "reward model as model.init_from, or model.init=random with model.arch")
    if m.init == "random" and m.arch not in VLM_ARCHITECTURES:
        fail("model.arch", f"must be one of {sorted(VLM_ARCHITECTURES)} with model.init=random, got {m.arch!r}")
    for key in ("text_layers", "vision_layers", "vocab", "video_min_pixels"):
        if m[key] is not None and (m.init != "random" or m[key] <= 0):
            fail(f"model.{key}", f"reduces a random-init architecture (rehearsals): needs model.init=random and "
                 f"a value > 0, got {m[key]} with model.init={m.init}")


def load_reward_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML file <- `key=value` overrides, type-checked and validated; read-only."""
    return load_structured(RewardTrainConfig, _check, path, overrides)


def with_updates(cfg: DictConfig, updates: Dict[str, Any], source: str) -> DictConfig:
    """A validated, read-only copy of `cfg` with {dotted key: value} updates (e.g. the teacher run)."""
    merged = OmegaConf.merge(OmegaConf.structured(RewardTrainConfig), OmegaConf.to_container(cfg))
    try:
        for key, value in updates.items():
            OmegaConf.update(merged, key, value, merge=False)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err, source)) from None
    _check(merged, source)
    OmegaConf.set_readonly(merged, True)
    return merged


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "") -> DictConfig:
    """`--config FILE key=value ... [--print-config]`; a bad key or value exits 2 naming it.
    Also accepts `--local_rank=N`, which the `deepspeed` launcher appends."""
    parser = build_parser(description, default_config="cluster_configs/reward_local_cpu.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    cfg, _ = parse_config(description, argv, parser=parser, loader=load_reward_config, command="reward.train")
    return cfg
