"""FLOP and activation-memory accounting for bench/gpu_wan.py: the analytic model FLOPs behind its
TFLOP/s, MFU and HFU figures, and the saved-activation estimate behind `--grad-ckpt auto`.

FLOP count (model FLOPs, what MFU counts). Per CFG row and forward, with N = F*H*W/(pt*ph*pw) video
tokens, T text tokens, d = heads * head_dim, f = ffn_dim, L layers, r the LoRA rank (0 without),
c = in_channels*pt*ph*pw, c' = out_channels*pt*ph*pw, d_txt = text_dim, d_t = freq_dim:
    per layer (x L):
        self-attention projections q, k, v, o      8 N d^2        (4 x 2 d^2 per token)
        self-attention scores and values           4 N^2 d        (2 x 2 N d per token)
        cross-attention projections q, o           4 N d^2
        cross-attention projections k, v           4 T d^2        (= 4 (T/N) d^2 per video token)
        cross-attention scores and values          4 N T d
        feed-forward                               4 N d f
        LoRA adapters (2 r (d_in + d_out) a row)   4 r d (6 N + 2 T)
    once: patch embedding 2 N c d; text embedding 2 T (d_txt d + d^2); time embedding
          2 (d_t d + d^2 + 6 d^2); head 2 N d c'.
    For 1.3B at 33x240x416 (N = 3510, T = 512): 11.54 TFLOP per row (23% in attention scores/values),
    23.1 TFLOP per sample with CFG; the flop counter agrees exactly (tests/test_bench_gpu_wan.py).
Training: full fine-tuning backward = 2 x forward (input and weight gradients), so 3 x forward; LoRA
backward = block and head linears x 1 (input gradients only; frozen weights) + attention scores/values
x 2 + adapters x 2; the KL adds 1 forward of the reference (no adapters). Hardware FLOPs (HFU) add one
forward of the blocks for the recompute when activation checkpointing is on. MFU = model FLOPs /
seconds / the card's dense bf16 peak (table below by device name, else --peak-tflops). The formula is
checked against torch.utils.flop_counter on a forward (JSON `check.flop_counter_ratio`; on CPU the
attention runs through SDPA's math backend for that count, because the CPU flash kernel is not counted).

Saved activations (`activation_bytes`) use the per-token coefficients `ACT_COEF`, measured by
`saved_bytes` / `activation_report` (`python bench/gpu_wan.py --activation-report`; bench/MEMORY_PLAN.md).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch

VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # Wan VAE: 4x in time (plus the first frame), 8x in space

# Saved activations for backward, bytes per token per layer, as coefficients of d and f (bf16 weights, a
# fused attention kernel that saves q, k, v, out and the log-sum-exp): measured with autograd
# saved-tensor hooks on CPU at d in {768, 1536}, f in {4480, 8960} (`--activation-report`; see
# bench/MEMORY_PLAN.md). video_*: per video token; text_d: per text token (cross-attention k, v).
# With checkpointing each layer keeps only its bf16 input (2 d bytes per video token).
ACT_COEF = {
    "full": dict(video_d=68, video_f=4, text_d=12),
    "lora": dict(video_d=40, video_f=2, text_d=8),
}

# Dense bf16 tensor-core peak, TFLOP/s, by device name. Variants not listed (H100 NVL, H200 NVL, ...)
# return None: pass --peak-tflops rather than get a wrong MFU.
def peak_bf16_tflops(device_name: str) -> Optional[float]:
    name = device_name.upper()
    if "NVL" in name:
        return None
    if "H100" in name:
        return 756.0 if "PCIE" in name else 989.0
    if "H200" in name:
        return 989.0
    if "A100" in name:
        return 312.0
    if "L40S" in name:
        return 362.0
    return None


# ----------------------------------------------------------------------------- FLOPs


def latent_shape(cfg: dict, frames: int, height: int, width: int) -> tuple:
    if (frames - 1) % VAE_TEMPORAL or height % (VAE_SPATIAL * 2) or width % (VAE_SPATIAL * 2):
        raise SystemExit(f"--frames must be 4k+1 and --height/--width multiples of 16, got "
                         f"{frames}x{height}x{width}")
    return (cfg["in_channels"], (frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL)


def video_tokens(cfg: dict, shape: tuple) -> int:
    pt, ph, pw = cfg["patch_size"]
    return (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)


def flop_terms(cfg: dict, n: int, t: int, lora_rank: int = 0) -> Dict[str, float]:
    """Forward FLOPs of one CFG row (see the module docstring for the formula)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, layers = cfg["ffn_dim"], cfg["num_layers"]
    patch = math.prod(cfg["patch_size"])
    terms = {
        "self_proj": 8 * n * d * d,
        "self_attn": 4 * n * n * d,
        "cross_proj_qo": 4 * n * d * d,
        "cross_proj_kv": 4 * t * d * d,
        "cross_attn": 4 * n * t * d,
        "ffn": 4 * n * d * f,
        "lora": 4 * lora_rank * d * (6 * n + 2 * t),
    }
    terms = {k: float(v * layers) for k, v in terms.items()}
    terms.update(
        patch=float(2 * n * cfg["in_channels"] * patch * d),
        text=float(2 * t * (cfg["text_dim"] * d + d * d)),
        time=float(2 * (cfg["freq_dim"] * d + d * d + 6 * d * d)),
        head=float(2 * n * d * cfg["out_channels"] * patch),
    )
    terms["block_linear"] = terms["self_proj"] + terms["cross_proj_qo"] + terms["cross_proj_kv"] + terms["ffn"]
    terms["attention"] = terms["self_attn"] + terms["cross_attn"]
    terms["base"] = (terms["block_linear"] + terms["attention"] + terms["patch"] + terms["text"] + terms["time"]
                     + terms["head"])
    terms["forward"] = terms["base"] + terms["lora"]
    return terms


def train_step_flops(terms: Dict[str, float], mode: str, kl: bool, ckpt: bool) -> tuple:
    """(model, hardware) FLOPs of one training row: forward + backward (+ reference forward)."""
    if mode == "full":
        model = 3 * terms["base"]
    else:
        backward = terms["block_linear"] + terms["head"] + 2 * terms["attention"] + 2 * terms["lora"]
        model = terms["forward"] + backward
    if kl:
        model += terms["base"]
    recompute = terms["block_linear"] + terms["attention"] + (terms["lora"] if mode == "lora" else 0.0)
    return model, model + (recompute if ckpt else 0.0)


def activation_bytes(cfg: dict, mode: str, rows: int, n: int, t: int, ckpt: bool) -> float:
    """Saved activations of one training micro-batch of `rows` CFG rows (estimate, bytes)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    c = ACT_COEF[mode]
    per_layer = n * (c["video_d"] * d + c["video_f"] * cfg["ffn_dim"]) + t * c["text_d"] * d
    if ckpt:  # one bf16 block input per layer, plus one block's activations while it is recomputed
        return rows * (cfg["num_layers"] * n * 2 * d + per_layer)
    return rows * cfg["num_layers"] * per_layer


def counted_forward_flops(model, x, timestep, embeds) -> float:
    """FLOPs of one forward as torch.utils.flop_counter counts them (math attention on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    kernel = contextlib.nullcontext()
    if x.device.type == "cpu":  # the CPU flash kernel is not in the counter's table; the math one is matmuls
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), kernel, counter:
        model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- activation report


def saved_bytes(cfg: dict, latent: tuple, text_len: int, mode: str, dtype=torch.bfloat16) -> int:
    """Bytes autograd saves for backward in one forward (parameters excluded, shared storage counted once)."""
    from bench.gpu_wan_setup import LORA_TARGETS, build_transformer

    model = build_transformer(cfg, "cpu", dtype, 0)
    if mode == "lora":
        from config import LoraConfig
        from policy.lora import add_lora

        add_lora(model, LoraConfig(rank=32, alpha=32.0, target_modules=list(LORA_TARGETS)))
    else:
        model.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, *latent).to(dtype)
    embeds = torch.randn(1, text_len, cfg["text_dim"]).to(dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds, return_dict=False)
    return sum(seen.values())


def activation_report() -> dict:
    """Per-layer saved bytes per video token and per text token, by differences of 1- and 2-layer models."""
    from bench.gpu_wan_setup import WAN21_1_3B

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = {}
    for label, heads, ffn in (("1.3b", 12, 8960), ("d1536_f4480", 12, 4480), ("d768_f8960", 6, 8960)):
        for mode in ("full", "lora"):
            cfg = dict(WAN21_1_3B, num_attention_heads=heads, ffn_dim=ffn, text_dim=64)

            def per_layer(frames, text, cfg=cfg, mode=mode):
                one = saved_bytes(dict(cfg, num_layers=1), (16, frames, 16, 16), text, mode)
                two = saved_bytes(dict(cfg, num_layers=2), (16, frames, 16, 16), text, mode)
                return two - one

            base = per_layer(2, 64)
            video = (per_layer(4, 64) - base) / 128  # 2 more latent frames = 128 more tokens
            text = (per_layer(2, 128) - base) / 64
            d = heads * 128
            out[f"{label}_{mode}"] = {"d": d, "ffn": ffn, "bytes_per_video_token_layer": video,
                                      "bytes_per_text_token_layer": text}
            print(f"{label:<12} {mode:<5} d={d:<5} f={ffn:<5} per video token per layer {video:>9.0f} B "
                  f"({video / d:.2f} d), per text token per layer {text:>7.0f} B ({text / d:.2f} d)")
    return out
