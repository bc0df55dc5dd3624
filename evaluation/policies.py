"""Which policy to evaluate: the base model or a checkpoint's LoRA (live or EMA), checked against the config.

A PATH is a checkpoint step directory (`<output_dir>/checkpoints/step_NNNNNN`), a run's output directory
(its latest checkpoint), a `lora/` directory or the `pytorch_lora_weights.safetensors` file itself
(diffusers format, `transformer.`-prefixed keys). The LoRA must have been trained with this config's model
settings (kind, base model, rank, alpha, targets); a checkpoint's stored config.yaml is checked and a
mismatch names the key.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from config import LORA_KEYS, ExpectedError, stored_config_mismatches
from runtime.checkpoint import CheckpointManager

log = logging.getLogger("identity_grpo.evaluate")


class EvalError(ExpectedError, ValueError):
    """A policy to evaluate cannot be found or does not fit the config; the message names it."""


# ----------------------------------------------------------------------------- which policy


LORA_DIRS = ("lora", "lora_ema")  # a checkpoint's live and EMA adapters (workers/learner.py save)


@dataclass(frozen=True)
class PolicySpec:
    tag: str  # directory name and label in the report
    source: str  # what the user asked for, for the report
    lora_file: Optional[Path] = None  # None: the base model (adapters off)
    checkpoint: Optional[Path] = None  # step directory, when known (holds config.yaml)
    step: int = 0


def resolve_policy(spec: str, output_dir: str | Path, weights: str = "ema") -> PolicySpec:
    """'base' | 'latest' | a checkpoint dir, run dir, lora dir or LoRA file -> PolicySpec (see module doc).
    weights: of a checkpoint directory, "ema" takes its EMA weights (lora_ema/) when it has them (what the
    official code evaluates), "live" the trained ones (lora/)."""
    from policy.lora import LORA_FILE

    if weights not in ("ema", "live"):
        raise EvalError(f"--weights must be ema or live, got {weights!r}")
    if spec == "base":
        return PolicySpec("base", "base")
    if spec == "latest":
        try:
            path = CheckpointManager(output_dir).latest()
        except FileNotFoundError as err:
            raise EvalError(f"--checkpoint latest: {err}") from None
        if path is None:
            raise EvalError(f"--checkpoint latest: no checkpoint under {Path(output_dir) / 'checkpoints'} "
                            "(trainer.output_dir); pass a checkpoint path or 'base'")
    else:
        path = Path(spec)
    if not path.exists():
        raise EvalError(f"checkpoint {spec!r}: {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / "lora").exists():
        latest = CheckpointManager(path).latest()  # a run's output directory
        if latest is None:
            raise EvalError(f"checkpoint {spec!r}: run directory {path} has no complete checkpoint")
        path = latest
    if path.is_file():
        lora_file, step_dir = path, path.parent.parent if path.parent.name in LORA_DIRS else None
    elif (path / LORA_FILE).is_file():
        lora_file, step_dir = path / LORA_FILE, path.parent if path.name in LORA_DIRS else None
    elif weights == "ema" and (path / "lora_ema" / LORA_FILE).is_file():
        lora_file, step_dir = path / "lora_ema" / LORA_FILE, path
    elif (path / "lora" / LORA_FILE).is_file():
        lora_file, step_dir = path / "lora" / LORA_FILE, path
    else:
        raise EvalError(f"checkpoint {spec!r}: no LoRA weights at {path} (looked for {LORA_FILE}, lora/{LORA_FILE}); "
                        "full fine-tuning checkpoints (model.lora.enabled=false) are not supported yet")
    match = re.match(r"step_(\d+)$", step_dir.name) if step_dir is not None else None
    tag = step_dir.name if step_dir is not None else lora_file.parent.name
    if step_dir is not None and lora_file.parent.name == "lora_ema":
        tag += "_ema"
    return PolicySpec(tag, spec, lora_file, step_dir, int(match.group(1)) if match else 0)


def check_compatible(spec: PolicySpec, cfg) -> None:
    """The checkpoint's stored model settings must equal this config's (a LoRA means nothing on another base)."""
    if spec.lora_file is None:
        return
    if not cfg.model.lora.enabled:
        raise EvalError(f"{spec.source}: a LoRA checkpoint needs model.lora.enabled=true")
    stored = spec.checkpoint / "config.yaml" if spec.checkpoint is not None else None
    if stored is None or not stored.is_file():
        log.warning("%s: no stored config.yaml; assuming it was trained with this config's model settings", spec.source)
        return
    saved = OmegaConf.create(stored.read_text())
    if saved.model.get("path") != cfg.model.path:  # may be the same weights in another place: only warn
        log.warning("%s: trained on model.path=%s, evaluating on %s", spec.source, saved.model.get("path"),
                    cfg.model.path)
    for key, theirs, mine in stored_config_mismatches(stored, cfg, LORA_KEYS)[:1]:
        raise EvalError(f"{spec.source}: trained with {key}={theirs!r} ({stored}) but the config has {mine!r}; "
                        f"pass {key}={theirs} or the training config")


def trained_guidance(spec: PolicySpec) -> Optional[float]:
    """The text guidance scale the checkpoint was trained at (its stored config; 1: CFG-free), None when unknown
    (the base model, a bare LoRA file)."""
    stored = spec.checkpoint / "config.yaml" if spec.checkpoint is not None else None
    if stored is None or not stored.is_file():
        return None
    return float(OmegaConf.create(stored.read_text()).sampler.guidance_scale)


def read_lora(path: Path) -> Dict[str, torch.Tensor]:
    """diffusers-format LoRA file -> peft state dict of the transformer (the `transformer.` prefix removed)."""
    from policy.lora import read_safetensors

    state = read_safetensors(path, "a transformer LoRA in diffusers format")
    foreign = [k for k in state if not k.startswith("transformer.")]
    if foreign:
        raise EvalError(f"{path}: not a transformer LoRA in diffusers format (keys like {foreign[:3]})")
    return {k[len("transformer."):]: v for k, v in state.items()}


@contextlib.contextmanager
def policy_weights(policy, spec: PolicySpec, lora_state: Optional[Dict[str, torch.Tensor]] = None):
    """Within the block the policy samples with `spec`'s weights: adapters off for 'base', else its LoRA
    (`lora_state`, when the caller already holds the file's tensors, e.g. a Ray worker sent them)."""
    from policy.lora import adapters_disabled, has_lora, load_lora_state_dict

    if spec.lora_file is None:
        with adapters_disabled(policy.transformer) if has_lora(policy.transformer) else contextlib.nullcontext():
            yield
        return
    try:
        load_lora_state_dict(policy.transformer, read_lora(spec.lora_file) if lora_state is None else lora_state)
    except (KeyError, RuntimeError) as err:
        raise EvalError(f"{spec.lora_file}: does not fit the model of this config: {err}") from None
    yield


def build_eval_policy(cfg):
    """The policy once (base weights + adapters); each PolicySpec then only swaps the LoRA."""
    from policy.models import build_components
    from policy.policy import WanPolicy

    torch.manual_seed(cfg.trainer.seed)
    policy = WanPolicy(build_components(cfg.model, cfg.sampler.shift), cfg.model, cfg.sampler, cfg.trainer.device)
    policy.transformer.eval()
    return policy
