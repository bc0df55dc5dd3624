"""The naive baseline of bench/gpu_wan.py: Wan2.1 GRPO rollout and training written the way the public
single-loop trainers write them (flow_grpo's scripts/train_wan2_1.py): one sample at a time, CFG as two
separate forwards, latents and model outputs upcast to fp32, the SDE step and log-prob in fp32.

It exists only as the benchmark's baseline: for speed (the ours/naive ratios) and for correctness (with
the same seeds it computes the same samples, log-probs and gradients as policy.sampler and policy.grpo).
The training code does not use it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # annotations only: importable without the repo on sys.path
    from policy.policy import Condition
    from policy.sde import NoiseRule


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
    return {"loss": float(torch.cat(losses).mean()), **optimizer.timed_step(args.grad_clip, device)}
