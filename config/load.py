"""Loading the config tree: defaults <- YAML file(s) <- `key=value` overrides, type-checked, then checked.

Usage:
    cfg = load_config("cluster_configs/local_cpu.yaml", ["trainer.steps=3"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from config.checks import ConfigError, check_values, describe_error
from config.schema import Config


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
        value = item.split("=", 1)[1] if key is not None else ""
        hint = f"; quote a value that starts with '{{' or '[': {key}='...'" if value[:1] in "{[" and value else ""
        raise ConfigError(describe_error(err, source, key) + hint) from None
    except yaml.YAMLError as err:  # an override's value is parsed as YAML: `k={a,b}` is an unclosed flow mapping
        raise ConfigError(f"{source}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); quote a "
                          f"value that starts with '{{' or '[': {key}='...'") from None
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


def sections(path: str | Path) -> set:
    """The top-level sections a config file sets, with those of the files it builds on (`base:`): which tree it is
    (a GRPO run's `grpo`/`sampler`, or the reward trainer's) before it is loaded as either."""
    return {key for _, tree in _file_chain(path) for key in tree}


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


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                checks: Sequence[Callable[[DictConfig, str], None]] = ()) -> DictConfig:
    """The training config: defaults <- YAML file <- `key=value` overrides, checked by config/checks.py, then by
    each of `checks` (the model rooms' own: workers/run_config.py `load_run_config` passes them)."""
    def check(cfg: DictConfig, source: str) -> None:
        check_values(cfg, source)
        for extra in checks:
            extra(cfg, source)

    return load_structured(Config, check, path, overrides)


def to_yaml(cfg: DictConfig) -> str:
    """Resolved: `${paths.models}` and environment lookups take this process's values, so that workers on other
    nodes and a checkpoint's stored config see the paths this run used."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_yaml_text(text: str) -> DictConfig:
    """Rebuild a validated config from a resolved YAML dump (as stored in checkpoints)."""
    try:
        base, stored = OmegaConf.structured(Config), OmegaConf.create(text)
        cleared = [k for k in _mapping_keys(base) if OmegaConf.select(stored, k) is not None]
        cfg = OmegaConf.merge(_cleared(base, cleared), stored)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err, "stored config")) from None
    check_values(cfg, "stored config")
    return cfg



