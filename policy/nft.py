"""DiffusionNFT's objective (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT): reinforcement on the forward
process, with no per-step log-probs.

GRPO needs the sampler's transition densities, so it trains only what a stochastic sampler recorded. DiffusionNFT
needs only each rollout's final clean latents x0 and its reward: it noises x0 afresh to a training level t,
x_t = (1 - t) x0 + t eps, and fits two implicit policies around the sampling ("old") policy's velocity v_old,

    v+ = b v_theta + (1 - b) v_old          (positive: what training moves toward)
    v- = (1 + b) v_old - b v_theta          (negative: its reflection through v_old)

each through its clean-sample prediction x0(v) = x_t - t v, weighting the positive fit by the optimality
probability r and the negative by 1 - r:

    r    = clamp(0.5 + 0.5 A / A_max, 0, 1)          (A: the group-normalised, clipped advantage)
    loss = A_max / b * [ r |x0(v+) - x0|^2 / w+ + (1 - r) |x0(v-) - x0|^2 / w- ]
    w    = mean |x0(v) - x0|, detached, at least 1e-5 (adaptive weighting, per sample)

with |.|^2 the mean over a sample's elements, plus kl_beta * mean (v_theta - v_ref)^2 to the frozen reference.
At v_theta = v_old the gradient is 2 t (1 - 2 r) (x0(v_old) - x0) / w (b = 1, w+ = w-): a sample with r > 1/2
pulls the clean prediction toward itself, one with r < 1/2 pushes it away.

Read at NVlabs/DiffusionNFT 24af555 (scripts/train_nft_sd3.py, config/nft.py), written anew. Its defaults:
b = 1, A_max = 5, kl_beta = 1e-4, a random 99% of the sampler's timesteps per sample, CFG-free sampling with a
deterministic second-order solver. Pure torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

WEIGHT_FLOOR = 1e-5


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (like.ndim - 1)))


def _per_sample_mean(value: torch.Tensor) -> torch.Tensor:
    return value.mean(dim=tuple(range(1, value.ndim)))


def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = clamp(0.5 + 0.5 A / A_max, 0, 1): 1 for the best samples of a group, 0 for the worst, 1/2 for average."""
    if adv_clip <= 0:
        raise ValueError(f"grpo.adv_clip must be > 0 for the NFT objective, got {adv_clip}")
    return advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2.0 + 0.5


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, per sample (sigma: (B,) or a scalar): the forward process at level t."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device).expand(x0.shape[0])
    t = _expand(sigma, x0)
    return (1 - t) * x0.float() + t * noise.float()


def nft_loss(velocity: torch.Tensor, old_velocity: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
             sigma: torch.Tensor, advantages: torch.Tensor, beta: float, adv_clip: float,
             ref_velocity: Optional[torch.Tensor] = None, kl_beta: float = 0.0,
             mask: Optional[torch.Tensor] = None):
    """Mean NFT loss over the unmasked samples, and detached stats (0-dim tensors, no host sync).

    `velocity` carries the gradient; `old_velocity` and `ref_velocity` are the sampling policy's and the
    reference's at the same (x_t, t), without it. `sigma` (B,) or a scalar is t. `mask` False: not trained (a
    failed score), as in grpo_loss."""
    if beta <= 0:
        raise ValueError(f"grpo.nft_beta must be > 0, got {beta}")
    if velocity.shape != x_t.shape or old_velocity.shape != x_t.shape or x0.shape != x_t.shape:
        raise ValueError(f"nft_loss: velocity {tuple(velocity.shape)}, old {tuple(old_velocity.shape)}, x_t "
                         f"{tuple(x_t.shape)} and x0 {tuple(x0.shape)} must have one shape")
    v, v_old = velocity.float(), old_velocity.detach().float()
    x_t, x0 = x_t.float(), x0.float()
    t = _expand(torch.as_tensor(sigma, dtype=torch.float32, device=v.device).expand(v.shape[0]), v)
    r = optimality_probability(advantages.to(v.device, torch.float32), adv_clip)
    positive = x_t - t * (beta * v + (1 - beta) * v_old)
    negative = x_t - t * ((1 + beta) * v_old - beta * v)
    positive_loss = _weighted_fit(positive, x0)
    negative_loss = _weighted_fit(negative, x0)
    per_sample = (r * positive_loss + (1 - r) * negative_loss) / beta * adv_clip
    mask = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.to(v.device).bool()
    weights = mask.to(v.dtype)
    denom = weights.sum().clamp(min=1)
    policy_loss = (per_sample * weights).sum() / denom
    loss, kl_mean = policy_loss, torch.zeros((), dtype=v.dtype, device=v.device)
    if ref_velocity is not None:
        kl_mean = (_per_sample_mean((v - ref_velocity.detach().float()) ** 2) * weights).sum() / denom
        loss = loss + kl_beta * kl_mean
    with torch.no_grad():
        stats: Dict[str, torch.Tensor] = {
            "policy_loss": policy_loss.detach(), "kl": kl_mean.detach(), "loss": loss.detach(),
            "old_deviation": (_per_sample_mean((v.detach() - v_old) ** 2) * weights).sum() / denom,
            "num_trained": weights.sum(),
        }
    return loss, stats


def _weighted_fit(x0_prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """|x0_prediction - x0|^2 / w per sample, w = its detached mean absolute error (DiffusionNFT's weighting)."""
    with torch.no_grad():
        weight = _per_sample_mean((x0_prediction.double() - x0.double()).abs()).clamp(min=WEIGHT_FLOOR)
    return _per_sample_mean((x0_prediction - x0) ** 2 / _expand(weight, x0).to(x0_prediction.dtype))
