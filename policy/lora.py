"""LoRA on the transformer's attention projections through peft, saved in diffusers' format.

The reference policy of GRPO is the same network with the adapters disabled, so it costs no memory.
Saving goes through `WanPipeline.save_lora_weights`, so the file loads back with
`WanPipeline.load_lora_weights` / `WanVACEPipeline.load_lora_weights` in any diffusers install.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from config import ExpectedError

LORA_FILE = "pytorch_lora_weights.safetensors"
INIT = {"default": True, "gaussian": "gaussian"}  # both start with B = 0: a fresh adapter is a no-op


class WeightFileError(ExpectedError, ValueError):
    """A weights file the user named is missing or not what it should be; the message names the file."""


def read_safetensors(path: str | Path, what: str = "a LoRA file") -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors; a file that is not one (damaged, another format) is a WeightFileError naming
    it and what it should be, not the library's own message alone ("header too large")."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightFileError(f"{path}: not a readable safetensors file ({what}; safetensors says: {err})") from None


def add_lora(transformer: torch.nn.Module, lora_cfg) -> None:
    """Freeze the base weights and add trainable LoRA adapters to the named projections."""
    transformer.requires_grad_(False)
    config = PeftLoraConfig(
        r=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha),
        target_modules=list(lora_cfg.target_modules), init_lora_weights=INIT[lora_cfg.init],
    )
    transformer.add_adapter(config)
    if not any(p.requires_grad for p in transformer.parameters()):
        raise ValueError(f"model.lora.target_modules {list(lora_cfg.target_modules)} matched no module")


def has_lora(transformer: torch.nn.Module) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(transformer: torch.nn.Module):
    """The frozen base model: GRPO's reference policy when training LoRA."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def lora_state_dict(transformer: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Adapter weights only (small: what weight sync ships to rollout workers), detached on CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_state_dict(transformer: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise KeyError(f"LoRA state has keys the model does not: {unexpected[:5]}")


def base_model_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of the transformer without adapters (peft's wrapped `base_layer` keys renamed back)."""
    if not has_lora(transformer):
        return transformer
    state = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    base = type(transformer).from_config(transformer.config)
    base.load_state_dict(state, strict=True)
    return base.to(transformer.dtype)


def save_lora(transformer: torch.nn.Module, directory: str | Path, kind: str = "t2v") -> Path:
    """Write `pytorch_lora_weights.safetensors` in diffusers' format (transformer.* keys).

    The adapter's peft config goes into the file's metadata (as diffusers' own training scripts do):
    without it `load_lora_weights` assumes lora_alpha = rank, and an adapter trained with another
    alpha would load at the wrong strength."""
    from diffusers import WanPipeline, WanVACEPipeline

    pipeline_cls = WanVACEPipeline if kind == "vace" else WanPipeline
    directory = Path(directory)
    metadata = transformer.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   safe_serialization=True, transformer_lora_adapter_metadata=metadata)
    return directory / LORA_FILE
