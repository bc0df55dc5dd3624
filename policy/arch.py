"""Named Wan architectures: the published configs of the models the GPU presets load, and the tiny CPU one.

`model.arch` names one of `ARCHITECTURES`. With `model.init=random` the policy is built from it with
random weights (nothing downloaded): the tiny CPU models, or a real architecture for a rehearsal of a
GPU preset (launcher/rehearse.py). With `model.init=pretrained` it is the expected shape of `model.path`,
checked on load, so a 14B preset pointed at a 1.3B directory fails naming the differing keys.

The JSON files in `policy/architectures/` are the published `config.json` values (sources in its
SOURCES.md). Rehearsal-only reductions keep what makes the architecture itself: `model.num_layers`
truncates the transformer (VACE keeps its control blocks at the real stride: every 2nd block of the 1.3B,
every 5th of the 14B, those below the new depth), `model.text_encoder_layers` / `_vocab` shrink UMT5-XXL's
depth and vocabulary. Widths, heads, head dims, patch sizes and norms stay the published ones.

Dtypes follow `from_pretrained`: `cast_like_pretrained` keeps the parameters of a model's
`_keep_in_fp32_modules` in float32 (diffusers keeps the Wan norms, time embedder, modulation tables and
RoPE there), so a random-init model has the dtypes a loaded one has.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

ARCH_DIR = Path(__file__).resolve().parent / "architectures"

TINY_TEXT_DIM = 32
TINY_VOCAB = 297
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
    out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
# VACE: control = 2 x z_dim latent channels (inactive, reactive) + 64 mask channels (8x8 pixels).
TINY_VACE = dict(TINY_TRANSFORMER, num_layers=3, vace_layers=[0, 2], vace_in_channels=96)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])
TINY_TEXT_ENCODER = dict(vocab_size=TINY_VOCAB, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=8)


@dataclass(frozen=True)
class Architecture:
    """Which config file (or tiny dict) each part is built from, and which `model.kind`s it serves."""

    kinds: Tuple[str, ...]
    transformer: Optional[str] = None  # file in ARCH_DIR; None = the tiny dicts above
    vae: Optional[str] = None
    text_encoder: Optional[str] = None


ARCHITECTURES: Dict[str, Architecture] = {
    "tiny": Architecture(kinds=("t2v", "vace", "phantom")),
    "wan2.1-vace-1.3b": Architecture(("vace",), "wan2.1_vace_1.3b_transformer.json", "wan2.1_vae.json",
                                     "umt5_xxl_encoder.json"),
    "wan2.1-vace-14b": Architecture(("vace",), "wan2.1_vace_14b_transformer.json", "wan2.1_vae.json",
                                    "umt5_xxl_encoder.json"),
    "wan2.1-t2v-1.3b": Architecture(("t2v",), "wan2.1_t2v_1.3b_transformer.json", "wan2.1_vae.json",
                                    "umt5_xxl_encoder.json"),
    "wan2.1-t2v-14b": Architecture(("t2v",), "wan2.1_t2v_14b_transformer.json", "wan2.1_vae.json",
                                   "umt5_xxl_encoder.json"),
    # Phantom-Wan-1.3B is Wan2.1-T2V-1.3B's transformer with other weights (SOURCES.md).
    "phantom-wan-1.3b": Architecture(("phantom",), "wan2.1_t2v_1.3b_transformer.json", "wan2.1_vae.json",
                                     "umt5_xxl_encoder.json"),
}

# Config keys that describe a transformer's shape (compared with a loaded model's config).
SHAPE_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
              "text_dim", "freq_dim", "ffn_dim", "num_layers", "qk_norm", "vace_layers", "vace_in_channels")


@lru_cache(maxsize=None)
def _published(filename: str) -> dict:
    """A published config without its metadata keys (`_class_name`, `architectures`, ...)."""
    data = json.loads((ARCH_DIR / filename).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def get_architecture(name: Optional[str], kind: str, key: str = "model.arch") -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"{key}: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    if kind not in arch.kinds:
        raise ValueError(f"{key}={name} is a {'/'.join(arch.kinds)} architecture, but model.kind is {kind!r}")
    return arch


def transformer_config(name: str, kind: str, num_layers: Optional[int] = None) -> dict:
    """The transformer's constructor kwargs, truncated to `num_layers` blocks (VACE mapping kept)."""
    arch = get_architecture(name, kind)
    if arch.transformer is None:
        cfg = dict(TINY_VACE if kind == "vace" else TINY_TRANSFORMER)
    else:
        cfg = dict(_published(arch.transformer))
        cfg["patch_size"] = tuple(cfg["patch_size"])
    if num_layers is not None:
        cfg["num_layers"] = int(num_layers)
        if "vace_layers" in cfg:
            # Control blocks sit beside main blocks at the architecture's own stride; keep those that exist.
            cfg["vace_layers"] = [layer for layer in cfg["vace_layers"] if layer < num_layers]
    return cfg


def vae_config(name: str, kind: str) -> dict:
    arch = get_architecture(name, kind)
    return dict(TINY_VAE) if arch.vae is None else dict(_published(arch.vae))


def text_encoder_config(name: str, kind: str, num_layers: Optional[int] = None,
                        vocab_size: Optional[int] = None) -> dict:
    arch = get_architecture(name, kind)
    cfg = dict(TINY_TEXT_ENCODER) if arch.text_encoder is None else dict(_published(arch.text_encoder))
    if num_layers is not None:
        cfg["num_layers"] = cfg["num_decoder_layers"] = int(num_layers)
    if vocab_size is not None:
        cfg["vocab_size"] = int(vocab_size)
    return cfg


def shape_differences(expected: dict, actual) -> Dict[str, tuple]:
    """{key: (expected, actual)} for the shape keys where a loaded model's config differs from `expected`."""
    out = {}
    for key in SHAPE_KEYS:
        if key not in expected:
            continue
        want, got = expected[key], actual.get(key) if isinstance(actual, dict) else getattr(actual, key, None)
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        if norm(want) != norm(got):
            out[key] = (want, got)
    return out


# ----------------------------------------------------------------------------- dtypes


def keeps_fp32(module: torch.nn.Module, param_name: str) -> bool:
    """diffusers' and transformers' rule: a parameter stays float32 when one of its dotted name parts is
    in the model's `_keep_in_fp32_modules` (diffusers `model_loading_utils.load_model_dict_into_meta`)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    parts = param_name.split(".")
    return any(name in parts for name in keep)


def cast_like_pretrained(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to `dtype`, except `_keep_in_fp32_modules`' (float32), as
    `from_pretrained(torch_dtype=dtype)` leaves a model."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.is_floating_point():
                want = torch.float32 if dtype != torch.float32 and keeps_fp32(module, name) else dtype
                if param.dtype != want:
                    param.data = param.data.to(want)
        for name, buf in module.named_buffers():
            if buf.is_floating_point() and buf.dtype in (torch.float32, torch.bfloat16, torch.float16):
                want = torch.float32 if dtype != torch.float32 and keeps_fp32(module, name) else dtype
                if buf.dtype != want:
                    buf.data = buf.data.to(want)
    return module


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Construct a large model directly in `dtype` (a float32 build then a cast would hold both copies)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
