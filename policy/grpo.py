"""GRPO for diffusion: group-relative advantages and the clipped-ratio loss with a KL penalty.

For prompt p with G samples and rewards r_{p,i}:
    A_{p,i} = (r_{p,i} - mean_i r_{p,.}) / (std + eps),   clipped to [-A_max, A_max]
with std the group's own std ("group") or the std over the whole batch ("global"), with `ddof` 0 (the
population std: the official code's np.std) or 1 (the sample std). A group whose
rewards are all equal carries no preference: its advantages are 0 and its samples are masked out of
the loss. Samples whose reward is NaN (a failed score) are masked too, never treated as 0.

Per sampled step k of sample i:
    ratio = exp(logp_theta - logp_old)
    policy_loss = max(-A ratio, -A clip(ratio, 1 - c, 1 + c))
    loss = policy_loss + beta * KL(pi_theta || pi_ref)    (KL: closed form of policy/sde.py)
averaged over the unmasked (sample, step) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # (P, G)
    mask: torch.Tensor  # (P, G) bool: True where the sample trains


def group_advantages(rewards: torch.Tensor, std_mode: str = "group", eps: float = 1e-4,
                     clip: float = 5.0, ddof: int = 0) -> Advantages:
    """rewards (P, G) -> advantages (P, G) and the training mask (NaN and all-equal groups masked)."""
    if ddof not in (0, 1):
        raise ValueError(f"grpo.std_ddof must be 0 or 1, got {ddof}")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group >= 2), got {tuple(rewards.shape)}")
    rewards = rewards.double()
    valid = torch.isfinite(rewards)
    count = valid.sum(1, keepdim=True)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    if std_mode == "group":
        std = (centred.pow(2).sum(1, keepdim=True) / (count - ddof).clamp(min=1)).sqrt()
    elif std_mode == "global":
        flat = rewards[valid]
        std = flat.std(correction=ddof) if flat.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        std = std.expand_as(mean)
    else:
        raise ValueError(f"grpo.std_mode: unknown mode {std_mode!r} (expected 'group' or 'global')")
    advantages = (centred / (std + eps)).clamp(-clip, clip)
    informative = (centred.abs().amax(1, keepdim=True) > 0) & (count >= 2)
    mask = valid & informative
    return Advantages(torch.where(mask, advantages, torch.zeros_like(advantages)), mask)


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float):
    """Per-element PPO-clip loss and the ratio, for log-probs and advantages of the same shape."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              clip_range: float, kl: Optional[torch.Tensor] = None, kl_beta: float = 0.0,
              mask: Optional[torch.Tensor] = None):
    """Mean GRPO loss over unmasked elements, plus detached stats for logging.

    The stats are 0-dim tensors on the log-prob's device, computed without boolean indexing or
    `.item()` (no host sync of their own); callers convert them once, when they log. With nothing
    trained (all masked), ratio_min/ratio_max are +inf/-inf, so a min/max over calls ignores the call.
    """
    # Stored rollout values live on the CPU; follow the log-prob's device and dtype.
    advantages = advantages.to(log_prob)
    mask = torch.ones_like(advantages, dtype=torch.bool) if mask is None else mask.to(log_prob.device).bool()
    weights = mask.to(log_prob.dtype)
    denom = weights.sum().clamp(min=1)
    per_elem, ratio = clipped_policy_loss(log_prob, old_log_prob.to(log_prob), advantages, clip_range)
    policy_loss = (per_elem * weights).sum() / denom
    loss = policy_loss
    kl_mean = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    if kl is not None:
        kl_mean = (kl * weights).sum() / denom
        loss = loss + kl_beta * kl_mean
    with torch.no_grad():
        r = ratio.detach()
        any_trained = mask.any()  # a tensor: no host sync
        inf = torch.full_like(r, float("inf"))
        stats: Dict[str, torch.Tensor] = {
            "policy_loss": policy_loss.detach(), "kl": kl_mean.detach(), "loss": loss.detach(),
            "ratio_mean": torch.where(any_trained, (r * weights).sum() / denom, torch.ones_like(denom)),
            "ratio_min": torch.where(mask, r, inf).min(),
            "ratio_max": torch.where(mask, r, -inf).max(),
            "clip_frac": (((r - 1).abs() > clip_range).to(r.dtype) * weights).sum() / denom,
            "num_trained": weights.sum(),
        }
    return loss, stats


def advantage_stats(adv: Advantages) -> Dict[str, float]:
    values = adv.values[adv.mask]
    if values.numel() == 0:
        return {"adv_mean": 0.0, "adv_abs_mean": 0.0, "adv_max": 0.0, "trained_frac": 0.0}
    return {"adv_mean": float(values.mean()), "adv_abs_mean": float(values.abs().mean()),
            "adv_max": float(values.abs().max()), "trained_frac": float(adv.mask.float().mean())}


def trained_step_count(num_steps: int, fraction: float) -> int:
    """How many of T sampled steps train: int(T * fraction), at least 1. Truncated as the official code does
    (`int(config.sample.num_steps * config.train.timestep_fraction)`: 0.99 of 25 steps trains 24)."""
    return max(1, int(num_steps * fraction))


def select_timesteps(num_steps: int, fraction: float, order: str, generator: torch.Generator) -> torch.Tensor:
    """Which sampled steps to train on: trained_step_count of them, the first ones or a random subset."""
    count = trained_step_count(num_steps, fraction)
    if order == "fixed":
        return torch.arange(count)
    if order == "random":
        return torch.randperm(num_steps, generator=generator)[:count]
    raise ValueError(f"grpo.timestep_order: unknown order {order!r} (expected 'random' or 'fixed')")
