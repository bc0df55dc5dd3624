"""Wan2.1 GRPO on one GPU: rollout and training through our policy code, against a naive loop.

    # on a GPU (the defaults of --size 1.3b: group 8, 33x240x416, 25 steps, CFG 4.5, bf16, cuda);
    # --train-steps 10 trains on 10 of the 25 sampled steps (the JSON extrapolates the pass to all 25)
    # and keeps the whole run (all six phases) to about 2-3 minutes on an H100
    python bench/gpu_wan.py --size 1.3b --train-steps 10 --json gpu_wan.json
    # anywhere, in seconds (what tests/test_bench_gpu_wan.py runs)
    .venv/bin/python bench/gpu_wan.py --size tiny --device cpu --peak-tflops 1

The transformer is diffusers' `WanTransformer3DModel` with the real Wan2.1 T2V 1.3B config and random
weights, cast the way `from_pretrained(torch_dtype=...)` casts (the `_keep_in_fp32_modules` stay fp32).
No VAE and no text encoder: prompt embeddings are random (1, 512, 4096) tensors and the rollout starts
from per-seed noise of the latent shape (16, 9, 30, 52) = 33 frames x 240 x 416.

Phases (each timed with the device synchronised, peak memory from torch.cuda.max_memory_allocated):
(a) ours rollout: `policy.sampler.sample_group` over a `policy.policy.WanPolicy`: per step one forward of
    2G rows ([cond; uncond], batched CFG) and `policy.sde.sde_step_with_logprob`, log-probs for every step;
(b) ours training pass over those trajectories: for each trained step `policy.sampler.score_step` on the
    whole group (micro-batch = the group, 2G rows), `policy.grpo.grpo_loss` with the KL to the reference
    (adapters disabled for LoRA, a frozen copy for full fine-tuning), backward, and one AdamW step at the
    end with fp32 master weights (what DeepSpeed's bf16 mode keeps), for LoRA (rank r on to_q, to_k,
    to_v, to_out.0 of both attentions) and for full fine-tuning;
(c) naive: the same work in the style of public single-loop trainers (flow_grpo's
    scripts/train_wan2_1.py): one sample at a time, CFG as two separate forwards, latents and model
    outputs upcast to fp32, the SDE step and log-prob in fp32. Same module, same weights, same dtype:
    the ratio measures the loop, not the model. With the same seeds it computes the same samples, so it
    is also a correctness baseline (the JSON's `check` section: final latents, log-probs, grad norms).

Activation checkpointing (`enable_gradient_checkpointing()`) is switched on by `--grad-ckpt auto` when
the training micro-batch's saved activations, estimated with the coefficients of bench/MEMORY_PLAN.md,
would exceed 40% of the device memory (always for 1.3B at micro-batch = group: about 127 GiB for
LoRA, 224 GiB for full fine-tuning).

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
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from launcher.config import LoraConfig, ModelConfig, SamplerConfig  # noqa: E402
from policy.grpo import group_advantages, grpo_loss  # noqa: E402
from policy.models import (TINY_TRANSFORMER, WanComponents, build_scheduler, build_tiny_text_encoder,  # noqa: E402
                           build_tiny_tokenizer, build_tiny_vae)
from policy.policy import Condition, WanPolicy  # noqa: E402
from policy.sampler import sample_group, score_step  # noqa: E402
from policy.sde import NoiseRule, sigma_schedule  # noqa: E402

# Wan2.1 T2V 1.3B (diffusers' transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# Wan2.1 14B: 40 heads x 128 = 5120, ffn 13824, 40 layers (used by the memory plan only).
WAN21_14B = dict(WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)

SIZES = {
    "tiny": dict(transformer=TINY_TRANSFORMER, text_len=16, frames=9, height=64, width=64, group=4, steps=4,
                 dtype="float32", device="cpu"),
    "1.3b": dict(transformer=WAN21_1_3B, text_len=512, frames=33, height=240, width=416, group=8, steps=25,
                 dtype="bfloat16", device="cuda"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # Wan VAE: 4x in time (plus the first frame), 8x in space
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

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


# ----------------------------------------------------------------------------- model and policy


def build_transformer(cfg: dict, device, dtype: torch.dtype, seed: int):
    """Random-init WanTransformer3DModel built on the device, cast like from_pretrained(torch_dtype=dtype)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    keep = model._keep_in_fp32_modules or []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if dtype != torch.float32 and not any(k in name.split(".") for k in keep):
                param.data = param.data.to(dtype)
    return model


def make_policy(transformer, args, lora: bool, ckpt: bool) -> WanPolicy:
    """A real WanPolicy around the big transformer (tiny tokenizer/text encoder/VAE: never run here)."""
    model_cfg = ModelConfig(kind="t2v", dtype=args.dtype, height=args.height, width=args.width,
                            num_frames=args.frames, gradient_checkpointing=ckpt,
                            lora=LoraConfig(enabled=lora, rank=args.lora_rank, alpha=float(args.lora_rank),
                                            target_modules=list(LORA_TARGETS)))
    sampler_cfg = SamplerConfig(num_steps=args.steps, guidance_scale=args.cfg, shift=args.shift,
                                max_sequence_length=args.text_len)
    components = WanComponents(kind="t2v", tokenizer=build_tiny_tokenizer(), text_encoder=build_tiny_text_encoder(),
                               vae=build_tiny_vae(), transformer=transformer, scheduler=build_scheduler(args.shift))
    policy = WanPolicy(components, model_cfg, sampler_cfg, device=args.device)
    for model in (policy.transformer, policy.reference_transformer):
        if model is None:
            continue
        if args.attn_backend != "native":
            model.set_attention_backend(args.attn_backend)
        if args.compile:
            model.compile_repeated_blocks(dynamic=False)
    return policy


class MasterAdamW:
    """AdamW over fp32 master copies of low-precision parameters (DeepSpeed bf16 keeps the same states)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay = lr, weight_decay
        self.opt = None
        self.masters: List[torch.Tensor] = []

    def _build(self):
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        fused = self.params[0].device.type == "cuda"
        self.opt = torch.optim.AdamW(self.masters, lr=self.lr, weight_decay=self.weight_decay, fused=fused)

    def step(self, max_norm: float) -> float:
        """Clip (norm computed in fp32 over the master gradients, as DeepSpeed does) and step; returns
        the gradient norm before clipping."""
        if self.opt is None:
            self._build()
        for master, p in zip(self.masters, self.params):
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.masters, max_norm)
        self.opt.step()
        with torch.no_grad():
            for master, p in zip(self.masters, self.params):
                if master is not p:
                    p.copy_(master)
        return float(norm)

    def zero_grad(self):
        for master, p in zip(self.masters, self.params):
            p.grad = None
            master.grad = None
        for p in self.params:
            p.grad = None


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phase:
    """Wall time with the device synchronised at both ends; peak memory allocated within (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds, self.peak_bytes, self.start_bytes = 0.0, None, None

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        return False


# ----------------------------------------------------------------------------- ours


def our_train_pass(policy: WanPolicy, traj, adv, mask, steps: Sequence[int], args, optimizer) -> dict:
    """GRPO pass through score_step + grpo_loss; micro-batch = the group; one optimizer step at the end."""
    device = policy.device
    policy.transformer.train()
    old = traj.log_probs.to(device)  # the learner hands grpo_loss CPU log-probs; on a GPU they must move
    losses = []
    for k in steps:
        score = score_step(policy, traj, k, with_kl=args.kl_beta > 0)
        loss, _ = grpo_loss(score.log_prob, old[:, k], adv, args.clip_range, kl=score.kl, kl_beta=args.kl_beta,
                            mask=mask)
        (loss / len(steps)).backward()
        losses.append(loss.detach())
    sync(device)
    t0 = time.perf_counter()
    grad_norm = optimizer.step(args.grad_clip)
    optimizer.zero_grad()
    sync(device)
    return {"loss": float(torch.stack(losses).mean()), "grad_norm": grad_norm,
            "optimizer_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- naive


def naive_velocity(model, x: torch.Tensor, s: float, pos, neg, w: float) -> torch.Tensor:
    """CFG as two forwards of one sample; outputs upcast to fp32 (as the public scripts do)."""
    t = torch.full((x.shape[0],), s * 1000.0, dtype=torch.float32, device=x.device)
    inp = x.to(model.dtype)
    v_cond = model(hidden_states=inp, timestep=t, encoder_hidden_states=pos, return_dict=False)[0].float()
    v_uncond = model(hidden_states=inp, timestep=t, encoder_hidden_states=neg, return_dict=False)[0].float()
    return v_uncond + w * (v_cond - v_uncond)


def naive_sde_step(x, v, s: float, s_next: float, rule: NoiseRule, prev=None, noise=None):
    """Flow-GRPO's SDE step in fp32 with python-float coefficients; log-prob averaged over elements."""
    dt = s_next - s
    if rule.kind == "eta":
        std = rule.eta * math.sqrt(s / (1.0 - (s_next if s >= 1.0 else s)))
    else:
        std = rule.std_min + (rule.std_max - rule.std_min) * s
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * math.sqrt(-dt)
    if prev is None:
        prev = mean + scale * noise
    log_prob = -((prev.detach() - mean) ** 2) / (2 * scale**2) - math.log(scale) - 0.5 * math.log(2 * math.pi)
    return prev, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, scale


@torch.no_grad()
def naive_rollout(model, cond: Condition, seeds, sigmas, rule: NoiseRule, w: float, device):
    """One sample at a time; noise from the same per-seed CPU generators as policy.sampler."""
    pos, neg = cond.prompt_embeds.to(device), cond.negative_embeds.to(device)
    shape = tuple(cond.latent_shape)
    latents, log_probs = [], []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x = torch.randn(shape, generator=gen, dtype=torch.float32)[None].to(device)
        states, lps = [x], []
        for k in range(len(sigmas) - 1):
            s, s_next = float(sigmas[k]), float(sigmas[k + 1])
            v = naive_velocity(model, x, s, pos, neg, w)
            z = torch.randn(shape, generator=gen, dtype=torch.float32)[None].to(device)
            x, lp, _, _ = naive_sde_step(x, v, s, s_next, rule, noise=z)
            states.append(x)
            lps.append(lp)
        latents.append(states)
        log_probs.append(torch.cat(lps))
    return latents, torch.stack(log_probs)


def naive_train_pass(model, reference, latents, old_log_probs, cond: Condition, sigmas, rule, adv, mask,
                     steps: Sequence[int], args, optimizer) -> dict:
    """Per sample, per step: two forwards with grad, two reference forwards, fp32 loss, backward."""
    device = old_log_probs.device
    pos, neg = cond.prompt_embeds.to(device), cond.negative_embeds.to(device)
    model.train()
    rows = [i for i in range(len(latents)) if bool(mask[i])]
    denom = max(1, len(rows)) * len(steps)
    losses = []
    for i in rows:
        for k in steps:
            s, s_next = float(sigmas[k]), float(sigmas[k + 1])
            x, x_next = latents[i][k], latents[i][k + 1]
            v = naive_velocity(model, x, s, pos, neg, args.cfg)
            _, lp, mean, scale = naive_sde_step(x, v, s, s_next, rule, prev=x_next)
            ratio = torch.exp(lp - old_log_probs[i, k])
            a = adv[i].float()
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - args.clip_range, 1 + args.clip_range))
            if args.kl_beta > 0:
                with torch.no_grad(), reference() as ref:
                    v_ref = naive_velocity(ref, x, s, pos, neg, args.cfg)
                    _, _, mean_ref, _ = naive_sde_step(x, v_ref, s, s_next, rule, prev=x_next)
                kl = ((mean - mean_ref) ** 2).mean() / (2 * scale**2)
                loss = loss + args.kl_beta * kl
            (loss.sum() / denom).backward()
            losses.append(loss.detach())
    sync(device)
    t0 = time.perf_counter()
    grad_norm = optimizer.step(args.grad_clip)
    optimizer.zero_grad()
    sync(device)
    return {"loss": float(torch.cat(losses).mean()), "grad_norm": grad_norm,
            "optimizer_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- warm-up


def warm_up(policy: WanPolicy, cond: Condition, traj, args, naive: bool):
    """One untimed forward (+ backward when training) of each shape a phase will use (kernel choice,
    allocator, torch.compile)."""
    device = policy.device
    x = traj.latents[:, 0].to(device)
    sigma = traj.sigmas[0].expand(x.shape[0])
    with torch.no_grad():
        policy.velocity(x, sigma, cond.to(device))
        if naive:
            naive_velocity(policy.transformer, x[:1], float(traj.sigmas[0]), cond.prompt_embeds.to(device),
                           cond.negative_embeds.to(device), args.cfg)
    sync(device)


def warm_up_train(policy: WanPolicy, traj, args, naive: bool):
    device = policy.device
    score = score_step(policy, traj, 0, with_kl=args.kl_beta > 0)
    score.log_prob.sum().mul(0).backward()
    if naive:
        cond = traj.cond.to(device)
        x = traj.latents[:1, 0].to(device)
        v = naive_velocity(policy.transformer, x, float(traj.sigmas[0]), cond.prompt_embeds, cond.negative_embeds,
                           args.cfg)
        v.sum().mul(0).backward()
        if args.kl_beta > 0:
            with torch.no_grad(), policy.reference() as ref:
                naive_velocity(ref, x, float(traj.sigmas[0]), cond.prompt_embeds, cond.negative_embeds, args.cfg)
    for p in policy.transformer.parameters():
        p.grad = None
    sync(device)


# ----------------------------------------------------------------------------- report


def phase_record(phase: Phase, videos: int, flops: float, hw_flops: float, peak: Optional[float], **extra) -> dict:
    rec = {"seconds": phase.seconds, "videos_per_s": videos / phase.seconds if phase.seconds > 0 else None,
           "peak_mem_bytes": phase.peak_bytes, "resident_at_start_bytes": phase.start_bytes,
           "model_tflop": flops / 1e12, "tflops_per_s": flops / phase.seconds / 1e12 if phase.seconds > 0 else None}
    rec["mfu"] = rec["tflops_per_s"] / peak if peak and rec["tflops_per_s"] is not None else None
    rec["hfu"] = hw_flops / phase.seconds / 1e12 / peak if peak and phase.seconds > 0 else None
    rec.update(extra)
    return rec


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


PHASE_HEADER = f"{'phase':<22}{'seconds':>10}{'videos/s':>11}{'peak GiB':>10}{'TFLOP/s':>10}{'MFU':>8}{'HFU':>8}"


def print_header(result: dict):
    cfg = result["config"]
    print(f"device: {cfg['device_name']}  peak bf16: {_fmt(result['peak_tflops'], '.0f')} TFLOP/s "
          f"({result['peak_source']})")
    print(f"model: Wan2.1 {cfg['size']} random init, {cfg['dtype']}, attention {cfg['attn_backend']}, "
          f"grad ckpt {cfg['grad_ckpt']}, compile {cfg['compile']}, LoRA r{cfg['lora_rank']}, KL beta {cfg['kl_beta']}")
    print(f"work: group {cfg['group']} x {cfg['frames']}x{cfg['height']}x{cfg['width']} "
          f"(latent {'x'.join(map(str, cfg['latent_shape']))}, {cfg['video_tokens']} video + {cfg['text_len']} "
          f"text tokens), {cfg['steps']} steps, CFG {cfg['cfg']}, trained steps {cfg['train_steps']}/{cfg['steps']}")
    print(f"flops: forward {result['flops']['forward_per_row'] / 1e12:.4g} TFLOP per CFG row")
    print(PHASE_HEADER, flush=True)


def print_phase(name: str, rec: dict):
    print(f"{name:<22}{rec['seconds']:>10.3f}{_fmt(rec['videos_per_s'], '.4f'):>11}"
          f"{_gib(rec['peak_mem_bytes']):>10}{_fmt(rec['tflops_per_s'], '.1f'):>10}"
          f"{_fmt(rec['mfu'], '.3f'):>8}{_fmt(rec['hfu'], '.3f'):>8}", flush=True)


def print_summary(result: dict):
    cfg = result["config"]
    if cfg["params"]:
        print(f"params: {cfg['params']:,} (LoRA trainable: {cfg['params_lora'] or 0:,})")
    for name, rec in result["phases"].items():
        if name.startswith("ours_train") or name.startswith("naive_train"):
            print(f"{name}: loss {rec['loss']:.4g}, grad norm {rec['grad_norm']:.4g}, "
                  f"optimizer {rec['optimizer_s']:.3f} s, pass over all {cfg['steps']} steps "
                  f"~{rec['pass_s_all_steps_est']:.2f} s")
    for name, value in result["ratios"].items():
        print(f"ratio {name}: {value:.2f}x")
    check = result["check"]
    print("check: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()))
    if result["error"]:
        print(f"error: {result['error']}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="default: 1.3b when CUDA is available, else tiny (so `make bench` runs anywhere)")
    p.add_argument("--device", default=None, help="default: cuda for 1.3b, cpu for tiny")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 (1.3b), float32 (tiny)")
    p.add_argument("--group", type=int, default=None, help="videos per prompt group G (default 8 / 4)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25 / 4)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="train on the first K sampled steps (default all); the JSON extrapolates to all")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 512 / 16)")
    p.add_argument("--cfg", type=float, default=4.5, help="guidance scale")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--kl-beta", type=float, default=0.004)
    p.add_argument("--clip-range", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--attn-backend", default="auto",
                   help="diffusers attention backend: auto (flash-attn 3/2 when installed on CUDA, else native "
                        "SDPA), native, _native_cudnn, flash, _flash_3, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks (regional)")
    p.add_argument("--warmup", type=int, default=1, choices=[0, 1], help="untimed warm-up forward/backward")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    p.add_argument("--skip-full-ft", action="store_true", help="skip the full fine-tuning phases")
    p.add_argument("--skip-naive-train", action="store_true", help="naive rollout only (no naive training)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for a CPU run (default 1 for tiny: its many small ops run best on one)")
    p.add_argument("--json", dest="json_out", default=None, help="write all figures here")
    p.add_argument("--activation-report", action="store_true",
                   help="measure saved-activation bytes per token per layer on CPU and exit")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = "1.3b" if torch.cuda.is_available() else "tiny"
    preset = SIZES[args.size]
    for key in ("group", "steps", "frames", "height", "width", "text_len", "dtype", "device"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.train_steps is None:
        args.train_steps = args.steps
    if not 1 <= args.train_steps <= args.steps:
        raise SystemExit(f"--train-steps must be in 1..{args.steps}")
    if args.group < 2:
        raise SystemExit("--group must be >= 2 (GRPO advantages need a group)")
    return args


def resolve_attention(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn_interface"):
            return "_flash_3"
        if importlib.util.find_spec("flash_attn"):
            return "flash"
    return "native"


def decide_ckpt(args, cfg, n, t, device) -> bool:
    if args.grad_ckpt != "auto":
        return args.grad_ckpt == "on"
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    need = activation_bytes(cfg, "full" if not args.skip_full_ft else "lora", 2 * args.group, n, t, ckpt=False)
    return need > 0.4 * total


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.activation_report:
        return activation_report()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and (args.threads or args.size == "tiny"):
        torch.set_num_threads(args.threads or 1)
    try:
        return _main(args, device)
    finally:
        torch.set_num_threads(threads)


def _main(args, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    cfg = dict(SIZES[args.size]["transformer"])
    shape = latent_shape(cfg, args.frames, args.height, args.width)
    n, t, G = video_tokens(cfg, shape), args.text_len, args.group
    args.attn_backend = resolve_attention(args.attn_backend, device)
    ckpt = decide_ckpt(args, cfg, n, t, device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    peak, peak_source = args.peak_tflops, "--peak-tflops"
    if peak is None:
        peak = peak_bf16_tflops(device_name) if device.type == "cuda" else None
        peak_source = "table" if peak else "unknown: pass --peak-tflops"
    if dtype != torch.bfloat16 and peak_source == "table":
        peak_source += f" (bf16 peak; run is {args.dtype})"

    terms_lora = flop_terms(cfg, n, t, args.lora_rank)
    terms_full = flop_terms(cfg, n, t, 0)
    rows = 2 * G  # CFG rows per group
    rollout_flops = args.steps * rows * terms_lora["forward"]
    lora_model, lora_hw = train_step_flops(terms_lora, "lora", args.kl_beta > 0, ckpt)
    full_model, full_hw = train_step_flops(terms_full, "full", args.kl_beta > 0, ckpt)
    phases, check, ratios = {}, {}, {}
    result = {
        "config": dict(size=args.size, device=str(device), device_name=device_name, dtype=args.dtype, group=G,
                       steps=args.steps, train_steps=args.train_steps, frames=args.frames, height=args.height,
                       width=args.width, latent_shape=list(shape), video_tokens=n, text_len=t, cfg=args.cfg,
                       shift=args.shift, lora_rank=args.lora_rank, kl_beta=args.kl_beta,
                       attn_backend=args.attn_backend, compile=args.compile, grad_ckpt=ckpt, params=None,
                       params_lora=None, torch=torch.__version__, transformer=cfg),
        "peak_tflops": peak, "peak_source": peak_source,
        "flops": {"forward_per_row": terms_full["forward"], "forward_per_row_lora": terms_lora["forward"],
                  "rollout_total": rollout_flops, "train_row_lora_model": lora_model, "train_row_lora_hw": lora_hw,
                  "train_row_full_model": full_model, "train_row_full_hw": full_hw, "terms_per_row": terms_lora},
        "phases": phases, "ratios": ratios, "check": check, "error": None,
    }
    print_header(result)
    try:
        run_phases(args, cfg, shape, device, dtype, ckpt, peak, result)
    except BaseException as exc:  # keep what was measured (an OOM in the last phase, a timeout, ^C)
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        for tag in ("rollout", "train_lora", "train_full"):
            ours, naive = phases.get(f"ours_{tag}"), phases.get(f"naive_{tag}")
            if ours and naive:
                ratios[f"{tag}_videos_per_s_ours_over_naive"] = naive["seconds"] / ours["seconds"]
        print_summary(result)
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


def run_phases(args, cfg, shape, device, dtype, ckpt: bool, peak, result: dict):
    phases, check, flops = result["phases"], result["check"], result["flops"]
    t, G = args.text_len, args.group
    rows, K = 2 * G, args.train_steps
    rule = NoiseRule()
    sigmas = sigma_schedule(args.steps, args.shift)
    seeds = [args.seed * 1000 + i for i in range(G)]
    train_steps = list(range(K))
    gen = torch.Generator().manual_seed(args.seed + 1)
    embeds = torch.randn(2, t, cfg["text_dim"], generator=gen).to(device, dtype)
    cond = Condition(embeds[:1], embeds[1:], latent_shape=shape)
    adv = group_advantages(torch.randn(1, G, generator=gen))
    adv_values, adv_mask = adv.values[0].to(device), adv.mask[0].to(device)

    def record(name: str, phase: Phase, model_flops: float, hw_flops: float, **extra):
        phases[name] = phase_record(phase, G, model_flops, hw_flops, peak, **extra)
        print_phase(name, phases[name])

    # ---------------------------------------------------------------- LoRA policy: rollouts + LoRA training
    transformer = build_transformer(cfg, device, dtype, args.seed)
    result["config"]["params"] = sum(p.numel() for p in transformer.parameters())
    x0 = torch.randn(1, *shape, generator=gen).to(device, dtype)
    try:
        counted = counted_forward_flops(transformer, x0, torch.tensor([500.0], device=device), embeds[:1])
        check["flop_counter_ratio"] = counted / flops["forward_per_row"]
    except Exception as exc:  # an optional cross-check must not cost the run
        check["flop_counter_error"] = f"{type(exc).__name__}: {exc}"
    policy = make_policy(transformer, args, lora=True, ckpt=ckpt)
    result["config"]["params_lora"] = sum(p.numel() for p in policy.transformer.parameters() if p.requires_grad)

    if args.warmup:
        dummy = sample_group(policy, cond, seeds, rule, 1, args.shift, decode=False)
        warm_up(policy, cond, dummy, args, naive=True)
    with Phase(device) as ph:
        traj = sample_group(policy, cond, seeds, rule, args.steps, args.shift, decode=False)
    record("ours_rollout", ph, flops["rollout_total"], flops["rollout_total"])
    with Phase(device) as ph:
        naive_lat, naive_lp = naive_rollout(policy.transformer, cond, seeds, sigmas, rule, args.cfg, device)
    record("naive_rollout", ph, flops["rollout_total"], flops["rollout_total"])
    ours_final = traj.final_latents.float()
    naive_final = torch.cat([lat[-1] for lat in naive_lat]).float().cpu()
    check["final_latents_max_abs_diff"] = float((ours_final - naive_final).abs().max())
    check["final_latents_max_abs"] = float(ours_final.abs().max())
    check["final_latents_rel_rms_diff"] = float((ours_final - naive_final).norm() / ours_final.norm())
    check["log_probs_max_abs_diff"] = float((traj.log_probs - naive_lp.double().cpu()).abs().max())
    check["finite"] = bool(torch.isfinite(ours_final).all() and torch.isfinite(traj.log_probs).all())

    def train_phases(tag: str, pol: WanPolicy, model_flops: float, hw_flops: float):
        trainable = [p for p in pol.transformer.parameters() if p.requires_grad]
        snapshot = [p.detach().to("cpu", copy=True) for p in trainable]
        if args.warmup:
            warm_up_train(pol, traj, args, naive=not args.skip_naive_train)
        opt = MasterAdamW(trainable, args.lr, 1e-4)
        with Phase(device) as ph:
            out = our_train_pass(pol, traj, adv_values, adv_mask, train_steps, args, opt)
        est = (ph.seconds - out["optimizer_s"]) / K * args.steps + out["optimizer_s"]
        record(f"ours_train_{tag}", ph, K * rows * model_flops, K * rows * hw_flops, pass_s_all_steps_est=est, **out)
        del opt
        if args.skip_naive_train:
            return
        with torch.no_grad():
            for p, s in zip(trainable, snapshot):
                p.copy_(s)
        opt = MasterAdamW(trainable, args.lr, 1e-4)
        with Phase(device) as ph:
            out_n = naive_train_pass(pol.transformer, pol.reference, naive_lat, naive_lp, cond, sigmas, rule,
                                     adv_values, adv_mask, train_steps, args, opt)
        est = (ph.seconds - out_n["optimizer_s"]) / K * args.steps + out_n["optimizer_s"]
        record(f"naive_train_{tag}", ph, K * rows * model_flops, K * rows * hw_flops, pass_s_all_steps_est=est,
               **out_n)
        check[f"{tag}_grad_norm_rel_diff"] = abs(out["grad_norm"] - out_n["grad_norm"]) / max(out["grad_norm"], 1e-30)

    train_phases("lora", policy, flops["train_row_lora_model"], flops["train_row_lora_hw"])
    del policy, transformer
    free()

    # ---------------------------------------------------------------- full fine-tuning
    if not args.skip_full_ft:
        transformer = build_transformer(cfg, device, dtype, args.seed)
        policy = make_policy(transformer, args, lora=False, ckpt=ckpt)
        train_phases("full", policy, flops["train_row_full_model"], flops["train_row_full_hw"])
        del policy, transformer
        free()


# ----------------------------------------------------------------------------- activation report


def saved_bytes(cfg: dict, latent: tuple, text_len: int, mode: str, dtype=torch.bfloat16) -> int:
    """Bytes autograd saves for backward in one forward (parameters excluded, shared storage counted once)."""
    model = build_transformer(cfg, "cpu", dtype, 0)
    if mode == "lora":
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


if __name__ == "__main__":
    main()
