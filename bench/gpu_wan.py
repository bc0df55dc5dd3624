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
from pathlib import Path
from typing import Sequence

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
from bench.gpu_wan_report import phase_record, print_header, print_phase, print_summary  # noqa: E402
from bench.gpu_wan_setup import DTYPES, SIZES, MasterAdamW, Phase, build_transformer, make_policy, sync  # noqa: E402
from policy.grpo import group_advantages, grpo_loss  # noqa: E402
from policy.policy import Condition, WanPolicy  # noqa: E402
from policy.sampler import sample_group, score_step  # noqa: E402
from policy.schedule import sampling_schedule  # noqa: E402
from policy.sde import NoiseRule  # noqa: E402


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
