"""Stochastic flow-matching step with an exact Gaussian log-probability (Flow-GRPO form).

Wan convention: x_s = (1 - s) x0 + s eps, s runs from 1 (noise) to 0 (data), the model predicts the
velocity v ~ eps - x0, and one step goes from s_k to s_{k+1} with dt = s_{k+1} - s_k < 0.

The deterministic (ODE) step is x + v dt. Flow-GRPO (arXiv 2505.05470, eq. 9) turns it into an SDE with
the same marginals by adding the score correction and noise of scale std_k sqrt(-dt):

    mean  = x (1 + std^2 / (2 s) dt) + v (1 + std^2 (1 - s) / (2 s)) dt
    x'    = mean + std sqrt(-dt) z,      z ~ N(0, I)

Noise rules for std_k (rollout and training must use the same one, else the ratio is silently wrong;
the sampler stores the rule with the trajectory and the learner checks it):
    "eta":    std = eta * sqrt(s / (1 - s)), with 1 - s at s = 1 replaced by 1 - s_next (Flow-GRPO)
    "linear": std = std_min + (std_max - std_min) * s                      (Identity-GRPO code)
With "linear", std_min / std_max may be "schedule": the official code's choice, std_max = sigmas[1] and
std_min = sigmas[-1] of the sampling schedule (about 0.99 and 0 at 25 steps), fixed by `resolve`.

log p(x' | x) is the Gaussian log-density, *averaged* (not summed) over all non-batch dimensions,
so its scale does not depend on the video size. The KL to a reference policy is the closed form for
two Gaussians with equal scale, also averaged: ||mean - mean_ref||^2 / (2 (std sqrt(-dt))^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class NoiseRule:
    """Which std_k the SDE uses; stored with every trajectory so the learner recomputes the same."""

    kind: str = "eta"  # eta | linear
    eta: float = 0.7
    std_min: Union[float, str] = 0.0  # a number, or "schedule" until `resolve`d
    std_max: Union[float, str] = 0.5

    @classmethod
    def from_config(cls, sampler_cfg) -> "NoiseRule":
        return cls(kind=sampler_cfg.noise_rule, eta=float(sampler_cfg.eta),
                   std_min=_bound(sampler_cfg.std_min, "sampler.std_min"),
                   std_max=_bound(sampler_cfg.std_max, "sampler.std_max"))

    def resolve(self, sigmas: torch.Tensor) -> "NoiseRule":
        """The rule with "schedule" bounds replaced by this schedule's: std_max = sigmas[1], std_min =
        sigmas[-1] (official Identity-GRPO: `sigma_max = self.sigmas[1]`, `sigma_min = self.sigmas[-1]`)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        low = float(sigmas[-1]) if self.std_min == SCHEDULE else self.std_min
        high = float(sigmas[1]) if self.std_max == SCHEDULE else self.std_max
        return NoiseRule(self.kind, self.eta, low, high)

    def std(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if SCHEDULE in (self.std_min, self.std_max):
            raise ValueError("NoiseRule: std_min/std_max 'schedule' must be resolved against the sigmas first")
        if self.kind == "eta":
            # At s = 1 the formula diverges; Flow-GRPO uses the next schedule value below 1 there.
            denom_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
            return self.eta * torch.sqrt(sigma / (1.0 - denom_sigma))
        if self.kind == "linear":
            return self.std_min + (self.std_max - self.std_min) * sigma
        raise ValueError(f"sampler.noise_rule: unknown rule {self.kind!r} (expected 'eta' or 'linear')")


SCHEDULE = "schedule"


def _bound(value, key: str) -> Union[float, str]:
    """A linear-rule bound from the config: a number, or "schedule"."""
    if isinstance(value, str) and value.strip() == SCHEDULE:
        return SCHEDULE
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number or '{SCHEDULE}', got {value!r}") from None


@dataclass
class SdeStep:
    prev_sample: torch.Tensor  # x_{k+1}
    log_prob: Optional[torch.Tensor]  # (B,), None for a deterministic (std = 0) step
    mean: torch.Tensor  # mean of x_{k+1} given x_k
    std: torch.Tensor  # (B,) std_k (before the sqrt(-dt) factor)
    scale: torch.Tensor  # (B,) std_k * sqrt(-dt): the Gaussian's scale


def _per_sample(value, batch: int) -> torch.Tensor:
    """(B,) float64 on the value's own device (the CPU for numbers and schedule entries)."""
    value = torch.as_tensor(value, dtype=torch.float64)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
    return value


def host_to_device(values: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without stalling the host on the GPU's queue.

    A copy from pageable host memory to a GPU waits for the stream to drain first (CUDA programming
    guide, "Asynchronous Concurrent Execution"), so a per-step `.to("cuda")` of a sigma or of the noise
    would serialise host and GPU. A constant float vector (a sigma per sample) is made on the device by a
    fill instead; anything else goes through pinned memory, non-blocking.
    """
    device = torch.device(device)
    if device.type != "cuda" or values.device == device:
        return values.to(device)
    flat = values.reshape(-1)
    if values.is_floating_point() and flat.numel() and bool((flat == flat[0]).all()):  # checked on the CPU
        return torch.full(values.shape, float(flat[0]), dtype=values.dtype, device=device)
    return values.pin_memory().to(device, non_blocking=True)


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, scale^2) per element, averaged over non-batch dims -> (B,). Computed in float64."""
    x, mean = x.double(), mean.double()
    scale = _expand(scale.double(), x)
    log_prob = -((x - mean) ** 2) / (2 * scale**2) - torch.log(scale) - LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def sde_step_with_logprob(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    rule: NoiseRule = NoiseRule(),
    prev_sample: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator | list] = None,
    deterministic: bool = False,
) -> SdeStep:
    """One SDE step from sigma to sigma_next (scalars or per-sample (B,) tensors).

    prev_sample given: score that sample (training recomputes log-probs of stored steps).
    noise given: use it as z. Otherwise z is drawn from `generator` (one per sample, or shared).
    deterministic: std = 0, the plain Euler ODE step (diffusers' FlowMatchEulerDiscreteScheduler.step).
    Arithmetic is in float64 and the sample is cast back to the latents' dtype.
    """
    batch = latents.shape[0]
    s, s_next = _per_sample(sigma, batch), _per_sample(sigma_next, batch)
    # Checked where the sigmas live (the sampler passes CPU schedule values: no GPU sync), then moved.
    if (s_next >= s).any():
        raise ValueError(f"sigma_next must be < sigma (got {s.tolist()} -> {s_next.tolist()})")
    if (s <= 0).any():
        raise ValueError("sigma must be > 0 for an SDE step")
    s, s_next = host_to_device(s, latents.device), host_to_device(s_next, latents.device)
    dt = s_next - s
    x, v = latents.double(), velocity.double()
    std = torch.zeros_like(s) if deterministic else rule.std(s, s_next)
    scale = std * torch.sqrt(-dt)
    s_, dt_, std_ = _expand(s, x), _expand(dt, x), _expand(std, x)
    mean = x * (1 + std_**2 / (2 * s_) * dt_) + v * (1 + std_**2 * (1 - s_) / (2 * s_)) * dt_

    if deterministic:
        sample = mean if prev_sample is None else prev_sample.double()
        return SdeStep(sample.to(latents.dtype), None, mean, std, scale)

    if prev_sample is None:
        if noise is None:
            noise = _draw_noise(latents, generator)
        # Cast first, then score: the stored (cast) sample must get exactly this log-prob again.
        prev_sample = (mean + _expand(scale, x) * noise.double()).to(latents.dtype)
    log_prob = gaussian_log_prob(prev_sample, mean, scale)
    return SdeStep(prev_sample.to(latents.dtype), log_prob, mean, std, scale)


def _draw_noise(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise; a list of generators gives each sample its own stream."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32, device=like.device)
                            for g in generator])
    return torch.randn(like.shape, generator=generator, dtype=torch.float32, device=like.device)


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, scale^2) || N(mean_ref, scale^2)) per element, averaged over non-batch dims -> (B,)."""
    diff = (mean.double() - mean_ref.double()) ** 2
    kl = diff / (2 * _expand(scale.double(), diff) ** 2)
    return kl.mean(dim=tuple(range(1, diff.ndim)))
