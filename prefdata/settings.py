"""Config tree of the preference-data tools: `python -m prefdata.candidates` and `python -m prefdata.autolabel`.

One YAML file holds both sections (cluster_configs/reward_data_demo.yaml), loaded like every config of
the project (config/load.py): defaults <- file <- `key=value` overrides, an unknown key or a bad value is a
ConfigError naming the key. Each tool reads its own section.

    cfg = load_prefdata_config("cluster_configs/reward_data_demo.yaml", ["candidates.videos_per_generator=3"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig

from config import ConfigError, load_structured
from config.schema import RewardConfig
from data.distort import DEGRADE_OPS, DistortionConfig
from data.schema import DISTORTION_KINDS, KEY_RE, SAMPLERS
from prefdata.face_track import TrackConfig


@dataclass
class GeneratorConfig:
    """One generator: a training config's model + sampler, with the base weights or a checkpoint's LoRA."""

    name: str = MISSING  # recorded in every candidate; letters, digits, '_' and '-'
    config: str = MISSING  # a training config (cluster_configs/*.yaml): model, sampler, workers.rollout
    overrides: List[str] = field(default_factory=list)  # key=value on that config, e.g. sampler.guidance_scale=6
    checkpoint: str = "base"  # base | latest | PATH, as `launcher.evaluate --checkpoint`
    weights: str = "ema"  # of a checkpoint directory: ema (when it has them) | live


@dataclass
class CandidatesConfig:
    prompt_shards: str = MISSING
    num_prompts: Optional[int] = None  # the first N prompt samples in file order; None: all
    videos_per_generator: int = 2  # videos per prompt from each generator
    # ode: the deterministic sampler (what the model gives at inference); sde: the training sampler's noise.
    sampler: str = "ode"
    seed: int = 0  # candidate seeds derive from (seed, prompt key, index); generators share them per prompt
    fps: float = 16.0  # of the written mp4 (Wan2.1 generates at 16 fps)
    out: str = MISSING
    prefix: str = "candidates"
    samples_per_shard: int = 256
    generators: List[GeneratorConfig] = field(default_factory=list)


@dataclass
class ScorerConfig:
    # |score_a - score_b| <= margin: this scorer votes tie. In the scorer's own units (face: cosine similarity).
    margin: float = 0.0


@dataclass
class AutoLabelConfig:
    candidate_shards: str = MISSING
    out: str = MISSING
    prefix: str = "pairs"
    samples_per_shard: int = 256
    # Pairs of one prompt's candidates: every pair (null), or this many drawn at random (seeded) per prompt.
    pairs_per_prompt: Optional[int] = None
    cross_generator_only: bool = False  # only pairs whose two videos come from different generators
    # The pairs of this fraction of the prompts (drawn by prompt key, seeded) go to people instead: written apart as
    # `<out>/<people_prefix>-NNNNNN.tar`, whatever their agreement (the vote stays in the label, for the annotation
    # report's agreement with the auto labels), for `python -m prefdata.annotate serve --pairs`. Human and auto pairs
    # then never share a prompt.
    people_fraction: float = 0.0
    people_prefix: str = "for_people"
    # Scorers that vote, by reward name (reward/composite.py REWARD_BUILDERS: face, vlm, demo_*), each with its
    # tie margin; settings of face and vlm come from `reward` below.
    scorers: Dict[str, ScorerConfig] = field(default_factory=lambda: {"face": ScorerConfig(margin=0.02)})
    # A pair is kept when at least this fraction of the scorers that voted (a failed score abstains) voted for
    # the winning label; others are dropped and counted.
    min_agreement: float = 0.5
    seed: int = 0  # pair sampling and the a/b order (which candidate is shown as a)
    batch_size: int = 8  # videos per scorer call
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class DistortionsConfig:
    """`python -m prefdata.distortion_pairs`: synthetic pairs (clean clip vs distorted) from real clips."""

    clips: str = MISSING  # a JSONL manifest of clip records or a folder of clip folders (data/SCHEMA.md, "Clips")
    out: str = MISSING
    prefix: str = "synthetic"
    samples_per_shard: int = 256
    pairs_per_clip: int = 1  # each a distortion of its own kind and parameters, drawn from (seed, clip key, index)
    kinds: List[str] = field(default_factory=lambda: list(DISTORTION_KINDS))
    min_severity: float = 0.4
    max_severity: float = 1.0
    degrade_ops: List[str] = field(default_factory=lambda: list(DEGRADE_OPS))
    # A swap or drift may bring in the face of someone who is not in the clip: one of at most this many people
    # drawn from the other clips' reference photos (by identity id; none: only the clip's own people).
    max_outsiders: int = 4
    num_frames: Optional[int] = None  # resample each clip to this many frames, uniform over it (null: as it is)
    height: Optional[int] = None  # with width: resize and centre-crop each clip (null: as it is)
    width: Optional[int] = None
    seed: int = 0
    tracking: TrackConfig = field(default_factory=TrackConfig)


@dataclass
class PrefDataConfig:
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    autolabel: AutoLabelConfig = field(default_factory=AutoLabelConfig)
    distortions: DistortionsConfig = field(default_factory=DistortionsConfig)


def _check(cfg: DictConfig, source: str) -> None:
    def fail(key: str, why: str):
        raise ConfigError(f"{source}: {key} {why}")

    c, a = cfg.candidates, cfg.autolabel
    if c.sampler not in SAMPLERS:
        fail("candidates.sampler", f"must be one of {list(SAMPLERS)}, got {c.sampler!r}")
    for key, value in (("candidates.videos_per_generator", c.videos_per_generator),
                       ("candidates.samples_per_shard", c.samples_per_shard), ("candidates.fps", c.fps),
                       ("autolabel.samples_per_shard", a.samples_per_shard), ("autolabel.batch_size", a.batch_size)):
        if value <= 0:
            fail(key, f"must be > 0, got {value}")
    for key, value in (("candidates.num_prompts", c.num_prompts), ("autolabel.pairs_per_prompt", a.pairs_per_prompt)):
        if value is not None and value <= 0:
            fail(key, f"must be > 0 (or null), got {value}")
    names = [g.name for g in c.generators]
    for i, g in enumerate(c.generators):
        if g.name is not MISSING and not KEY_RE.match(str(g.name)):
            fail(f"candidates.generators[{i}].name", f"{g.name!r}: letters, digits, '_' and '-' only")
        if g.weights not in ("ema", "live"):
            fail(f"candidates.generators[{i}].weights", f"must be ema or live, got {g.weights!r}")
    if len(set(names)) != len(names):
        fail("candidates.generators", f"names must be unique, got {names}")
    if not 0.0 <= a.people_fraction <= 1.0:
        fail("autolabel.people_fraction", f"must be in [0, 1], got {a.people_fraction}")
    if a.people_prefix == a.prefix:
        fail("autolabel.people_prefix", f"must differ from autolabel.prefix ({a.prefix!r})")
    if not 0.0 < a.min_agreement <= 1.0:
        fail("autolabel.min_agreement", f"must be in (0, 1], got {a.min_agreement}")
    d = cfg.distortions
    for key in ("pairs_per_clip", "samples_per_shard", "num_frames", "height", "width"):
        if getattr(d, key) is not None and getattr(d, key) <= 0:
            fail(f"distortions.{key}", f"must be > 0, got {getattr(d, key)}")
    if (d.height is None) != (d.width is None):
        fail("distortions.height", "and distortions.width are set together (or both null)")
    if d.max_outsiders < 0:
        fail("distortions.max_outsiders", f"must be >= 0, got {d.max_outsiders}")
    try:
        distortion_settings(d)
        track_settings(d)
    except ValueError as err:
        fail("distortions", f"settings: {err}")
    if not a.scorers:
        fail("autolabel.scorers", "needs at least one scorer")
    from reward.composite import REWARD_BUILDERS

    for name, scorer in a.scorers.items():
        if name not in REWARD_BUILDERS:
            fail(f"autolabel.scorers.{name}", f"unknown reward (known: {sorted(REWARD_BUILDERS)})")
        if not scorer.margin >= 0:
            fail(f"autolabel.scorers.{name}.margin", f"must be >= 0, got {scorer.margin}")


def distortion_settings(section) -> DistortionConfig:
    """data.distort's DistortionConfig from the distortions section (it checks kinds, severities and ops)."""
    return DistortionConfig(tuple(section.kinds), section.min_severity, section.max_severity,
                            tuple(section.degrade_ops))


def track_settings(section) -> TrackConfig:
    """The tracker's frozen config from the distortions section (its __post_init__ checks the values)."""
    from omegaconf import OmegaConf

    return TrackConfig(**OmegaConf.to_container(section.tracking))


def load_prefdata_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML file <- `key=value` overrides, type-checked and validated; read-only. Missing required
    values are reported by the tool that needs them (`require`), so one file can hold a half-filled section."""
    return load_structured(PrefDataConfig, _check, path, overrides)


def require(section: DictConfig, name: str) -> None:
    """ConfigError naming every unset required key of one section (e.g. `candidates.out`)."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(section))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(f'{name}.{k}' for k in missing)}")


def tool_main(run, doc: str, command: str, overwrite_help: str, argv: Optional[Sequence[str]] = None):
    """The command line both tools share: `--config FILE [--overwrite] [key=value ...]`, then `run(cfg, overwrite)`;
    an expected error (config, data, files) is one line `<command>: ...` and status 2."""
    import argparse
    import logging

    from config.cli import build_parser, expected_errors, parse_config

    parser = build_parser(doc.split("\n")[0], default_config="cluster_configs/reward_data_demo.yaml")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    cfg, args = parse_config(doc, argv, parser, loader=load_prefdata_config, command=command)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with expected_errors(command, ValueError, FileNotFoundError, FileExistsError):
        return run(cfg, args.overwrite)
