"""The deterministic steps outside the SDE window: which sigmas they visit, and the solver that takes them.

With an SDE window (policy/window.py) only the window's steps are stochastic and trained; the steps before and
after it merely carry the sample to the window and on to the clean video. Their cost is still a transformer
pass (or two, with CFG) each. MixGRPO-Flash (Tencent-Hunyuan/MixGRPO, fastvideo/utils/sampling_utils.py) cuts it
two ways, both here as options (`sampler.ode_solver`, `sampler.ode_steps_ratio`):

    fewer steps   each ODE stretch of the grid keeps ceil(len * ratio) of its steps (at least one); the points
                  visited are grid points, spread evenly over the stretch, its two ends always kept, so the
                  window's steps keep their exact sigmas, timesteps and log-probs
    a better step DPM-Solver++(2M) (Lu et al. 2022, multistep, midpoint form) in the flow parametrisation:
                  alpha_s = 1 - s, sigma_s = s, data prediction x0 = x - s v; the first step of a run and the
                  final one (to s = 0) are first order, which in flow form is exactly the Euler step

Differences from MixGRPO, named: MixGRPO re-grids only the tail after the window and keeps Euler before it; here
every ODE stretch is treated alike (with the progressive window starting at 0 there is nothing before it at
first). MixGRPO's tail of `int(len * ratio)` points can leave the rollout short of s = 0; here the final sigma is
always visited. Like MixGRPO, the multistep history carries across the window: the last window step's data
prediction is the previous point of the first step after it.

The math here is pure (tensors in, tensors out); policy/sampler.py runs it. Checked against diffusers'
DPMSolverMultistepScheduler (use_flow_sigmas, flow_prediction, final_sigmas_type "zero") on the same sigmas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

@dataclass(frozen=True)
class OdeSolver:
    """How the deterministic steps are taken: `kind` (euler | dpm2m) and the fraction of each ODE stretch kept."""

    kind: str = "euler"
    steps_ratio: float = 1.0

    @classmethod
    def from_config(cls, sampler_cfg) -> "OdeSolver":
        """From a loaded config, whose checks (config/schema.py choices, config/checks.py range) already hold."""
        return cls(str(sampler_cfg.ode_solver), float(sampler_cfg.ode_steps_ratio))

    def visited(self, num_steps: int, sde_steps: Optional[Sequence[int]]) -> List[int]:
        """The grid points (0 ... num_steps) a rollout visits: every point of an SDE step, and of each ODE stretch
        its kept points. `sde_steps` None: every step is an SDE step (nothing to compress)."""
        if sde_steps is None:
            return list(range(num_steps + 1))
        stochastic = set(sde_steps)
        points, k = [0], 0
        while k < num_steps:
            if k in stochastic:
                points.append(k + 1)
                k += 1
                continue
            end = k
            while end < num_steps and end not in stochastic:
                end += 1
            points += compressed_stretch(k, end, self.steps_ratio)[1:]
            k = end
        return points


EULER = OdeSolver()  # the official ODE step on every grid point


def compressed_stretch(start: int, end: int, ratio: float) -> List[int]:
    """Grid points from `start` to `end` (both kept) for ceil((end - start) * ratio) steps, at least one."""
    length = end - start
    steps = max(1, min(length, math.ceil(length * ratio - 1e-9)))
    return [start + round(i * length / steps) for i in range(steps + 1)]


def data_prediction(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x - s v (float64): the clean sample the velocity points at, from x at noise level s."""
    return x.double() - float(sigma) * velocity.double()


def dpm2m_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float,
               previous: Optional[Tuple[torch.Tensor, float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step from `sigma` to `sigma_next` < sigma. `previous`: (x0, sigma) of the step before
    (None: first order). Returns (x at sigma_next in x's dtype, this step's x0 for the next step's history).

    First order (DDIM in data prediction): x' = (s'/s) x + (a' - s' a / s) x0, with a = 1 - s; written without
    the log-SNR so that s = 1 (a = 0) and s' = 0 need no special case. Second order, midpoint: x0 is replaced by
    x0 + (x0 - x0_prev) / (2 r), r = h_prev / h, h the log-SNR step; at s' = 0 the step stays first order."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not 0.0 <= sigma_next < sigma <= 1.0:
        raise ValueError(f"dpm2m_step: sigmas must satisfy 0 <= sigma_next < sigma <= 1, got {sigma} -> {sigma_next}")
    x0 = data_prediction(x, velocity, sigma)
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    target = x0
    if previous is not None and sigma_next > 0.0 and previous[1] < 1.0:
        x0_prev, sigma_prev = previous
        h = _log_snr(sigma_next) - _log_snr(sigma)
        h_prev = _log_snr(sigma) - _log_snr(sigma_prev)
        target = x0 + (x0 - x0_prev.to(x0.device, x0.dtype)) * (h / (2.0 * h_prev))
    x_next = (sigma_next / sigma) * x.double() + (alpha_next - sigma_next * alpha / sigma) * target
    return x_next.to(x.dtype), x0


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (finite for 0 < sigma < 1)."""
    return math.log(1.0 - sigma) - math.log(sigma)
