"""Load Phantom-Wan's released transformer weights into diffusers' `WanTransformer3DModel`.

Phantom-Wan-1.3B ships as one flat `torch.save` state dict (`Phantom-Wan-1.3B.pth`) in the original
Wan2.1 key format (`blocks.0.self_attn.q.weight`, `head.modulation`, ...); its architecture is the
stock Wan2.1 T2V model (Phantom adds no module: references are extra latent frames), so after
renaming the keys it loads strictly into the diffusers class. The 14B release is sharded
safetensors with an index file.

The renames (from the key names of both formats; diffusers' own conversion script uses the same
correspondence) are applied in order, each as a substring replacement. The norm2/norm3 exchange is
needed because the original model's affine cross-attention norm is `norm3` and diffusers calls it
`norm2`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict

import torch

RENAMES = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__swap"),
    ("norm3", "norm2"),
    ("norm__swap", "norm3"),
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
]
# Wrappers some exports add around the original keys.
PREFIXES = ("model.diffusion_model.", "module.", "model.")


def convert_key(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def convert_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        new_key = convert_key(key)
        if new_key in converted:
            raise KeyError(f"Phantom checkpoint: keys collide after conversion at {new_key!r} (from {key!r})")
        converted[new_key] = value
    return converted


def read_checkpoint(path: str | Path) -> Dict[str, torch.Tensor]:
    """A `.pth`/`.pt` state dict, one `.safetensors` file, or a sharded safetensors index."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.phantom_checkpoint: not found: {path}")
    from policy.lora import WeightFileError, read_safetensors

    what = "model.phantom_checkpoint: Phantom-Wan's released transformer"
    if path.suffix == ".json":
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise WeightFileError(f"{path}: not a safetensors index with a weight_map ({what}): {err}") from None
        state = {}
        for shard in shards:
            state.update(read_safetensors(path.parent / shard, what))
        return state
    if path.suffix == ".safetensors":
        return read_safetensors(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise WeightFileError(f"{path}: not a readable torch state dict ({what}): {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_phantom_checkpoint(transformer: torch.nn.Module, path: str | Path) -> None:
    """Convert and load strictly: a missing or unexpected key is an error naming it."""
    state = convert_state_dict(read_checkpoint(path))
    expected = transformer.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"model.phantom_checkpoint {path}: after key conversion, missing {missing[:8]} "
                       f"({len(missing)} in all), unexpected {unexpected[:8]} ({len(unexpected)} in all)")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"model.phantom_checkpoint {path}: {key} has shape {tuple(value.shape)}, "
                             f"model expects {tuple(expected[key].shape)}")
    transformer.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def to_original_format(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse renaming (diffusers -> original Wan keys): writes synthetic Phantom-format checkpoints
    for tests, and exports a trained transformer for Phantom's own inference code."""
    inverse = [(new, old) for old, new in reversed(RENAMES)]
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":  # the head's modulation (blocks' ones are blocks.N.scale_shift_table)
            out["head.modulation"] = value
            continue
        for new, old in inverse:
            key = key.replace(new, old)
        out[key] = value
    return out
