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
(c) naive (bench/gpu_wan_naive.py): the same work in the style of public single-loop trainers (flow_grpo's
    scripts/train_wan2_1.py): one sample at a time, CFG as two separate forwards, latents and model
    outputs upcast to fp32, the SDE step and log-prob in fp32. Same module, same weights, same dtype:
    the ratio measures the loop, not the model. With the same seeds it computes the same samples, so it
    is also a correctness baseline (the JSON's `check` section: final latents, log-probs, grad norms).

Activation checkpointing (`enable_gradient_checkpointing()`) is switched on by `--grad-ckpt auto` when
the training micro-batch's saved activations, estimated with the coefficients of bench/MEMORY_PLAN.md,
would exceed 40% of the device memory (always for 1.3B at micro-batch = group: about 127 GiB for
LoRA, 224 GiB for full fine-tuning).

FLOP count and MFU/HFU, and the saved-activation estimate: see bench/gpu_wan_flops.py.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_wan_flops import (  # noqa: E402
    activation_bytes,
    activation_report,
    counted_forward_flops,
    flop_terms,
    latent_shape,
    peak_bf16_tflops,
    train_step_flops,
    video_tokens,
)
from bench.gpu_wan_naive import naive_rollout, naive_train_pass, naive_velocity  # noqa: E402
from config import LoraConfig, ModelConfig, SamplerConfig  # noqa: E402
from policy.arch import TINY_TRANSFORMER, transformer_config  # noqa: E402
from policy.grpo import group_advantages, grpo_loss  # noqa: E402
from policy.models import WanComponents, build_scheduler, build_tiny_text_encoder, build_tiny_tokenizer, build_tiny_vae  # noqa: E402
from policy.policy import Condition, WanPolicy  # noqa: E402
from policy.sampler import sample_group, score_step  # noqa: E402
from policy.schedule import sampling_schedule  # noqa: E402
from policy.sde import NoiseRule  # noqa: E402

# Wan2.1 T2V 1.3B and 14B: the published transformer configs (policy/architectures/, sources in its SOURCES.md).
WAN21_1_3B = transformer_config("wan2.1-t2v-1.3b", "t2v")
WAN21_14B = transformer_config("wan2.1-t2v-14b", "t2v")  # used by the memory plan only

SIZES = {
    "tiny": dict(transformer=TINY_TRANSFORMER, text_len=16, frames=9, height=64, width=64, group=4, steps=4,
                 dtype="float32", device="cpu"),
    "1.3b": dict(transformer=WAN21_1_3B, text_len=512, frames=33, height=240, width=416, group=8, steps=25,
                 dtype="bfloat16", device="cuda"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


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

    def timed_step(self, max_norm: float, device: torch.device) -> dict:
        """The end of a training pass (ours and naive): step and zero_grad, timed with the device
        synchronised at both ends."""
        sync(device)
        t0 = time.perf_counter()
        grad_norm = self.step(max_norm)
        self.zero_grad()
        sync(device)
        return {"grad_norm": grad_norm, "optimizer_s": time.perf_counter() - t0}


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
    return {"loss": float(torch.stack(losses).mean()), **optimizer.timed_step(args.grad_clip, device)}


# ----------------------------------------------------------------------------- warm-up


def warm_up(policy: WanPolicy, cond: Condition, traj, args, naive: bool):
    """One untimed forward (+ backward when training) of each shape a phase will use (kernel choice,
    allocator, torch.compile)."""
    device = policy.device
    x = traj.latents[:, 0].to(device)
    with torch.no_grad():
        policy.velocity(x, traj.timesteps[0].expand(x.shape[0]), cond.to(device))
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
    # Euler: the naive reference computes its timesteps as sigma * 1000 (bench/gpu_wan_naive.py).
    schedule = sampling_schedule("euler", args.steps, args.shift)
    sigmas = schedule.sigmas
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
        dummy = sample_group(policy, cond, seeds, rule, sampling_schedule("euler", 1, args.shift), decode=False)
        warm_up(policy, cond, dummy, args, naive=True)
    with Phase(device) as ph:
        traj = sample_group(policy, cond, seeds, rule, schedule, decode=False)
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


if __name__ == "__main__":
    main()
