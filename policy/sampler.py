"""Sample a group of videos for one prompt and record everything the learner needs to replay a step.

Each group member has its own seed: its initial noise and every per-step noise come from its own
`torch.Generator(seed)`, so a sample depends only on (seed, weights, condition), never on which other
samples share the batch. That is what makes a re-queued rollout identical to the lost one.

The transformer runs on the group in row chunks (`forward_chunks`), and the trajectory records them: the
learner recomputes each step's log-probs on exactly those chunks. Kernels are chosen by matrix shape (oneDNN on
CPUs with AMX, cuBLAS on GPUs), and so is their rounding: a recompute on other shapes differs by ~1e-3 in
bf16, which a clip range of 1e-3 then clips. Same rows, same shapes, same bits: the first ratio is exactly 1
by construction, whatever kernel the hardware picks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch

from policy.ode import EULER, OdeSolver, data_prediction, dpm2m_step
from policy.policy import Condition, WanPolicy
from policy.schedule import Schedule
from policy.sde import NoiseRule, host_to_device, kl_to_reference, sde_step_with_logprob


@dataclass
class Trajectory:
    """One prompt group of G samples: latents at every step (G, T+1, C, F, h, w) and per-step log-probs."""

    latents: torch.Tensor
    # (G, T) float64 at the SDE steps, NaN at the ODE steps outside an SDE window; None for a deterministic run
    log_probs: Optional[torch.Tensor]
    sigmas: torch.Tensor  # (T+1,) float64, s_0 = 1 ... s_T = 0: the sigmas visited (see `grid_points`)
    timesteps: torch.Tensor  # (T,) float32: the transformer's timestep at each step (policy/schedule.py)
    seeds: List[int]
    cond: Condition
    rule: NoiseRule  # resolved against `sigmas`: plain numbers
    guidance_scale: float
    policy_version: int = 0
    videos: Optional[torch.Tensor] = None  # (G, F, H, W, 3) uint8
    prompt: str = ""
    references: Optional[list] = None  # uint8 (H, W, 3) arrays, one per person: what rewards compare to
    key: str = ""  # the prompt sample's key in its shard
    rollout_s: float = 0.0
    sde_steps: Optional[List[int]] = None  # the stochastic (recorded, trainable) steps; None: every step
    forward_rows: Optional[List[List[int]]] = None  # the rows of each transformer forward (forward_chunks)
    # the schedule's grid points visited (policy/ode.py: ODE stretches may skip some); None: every one. T, the
    # steps above (and `sde_steps`) count visited points, so the learner reads the trajectory as it is.
    grid_points: Optional[List[int]] = None
    ode_solver: str = "euler"

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def trainable_steps(self) -> List[int]:
        return list(range(self.num_steps)) if self.sde_steps is None else list(self.sde_steps)

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    def to(self, device) -> "Trajectory":
        return replace(self, latents=self.latents.to(device), cond=self.cond.to(device))


def forward_chunks(group_size: int, rows_per_forward: int = 0) -> List[List[int]]:
    """Rows of a group per transformer forward: the whole group (0), or consecutive chunks of `rows_per_forward`
    (the last one shorter when it does not divide). One rule for rollout and learner (see the module docstring)."""
    if group_size < 1 or rows_per_forward < 0:
        raise ValueError(f"forward_chunks: group of {group_size}, {rows_per_forward} rows per forward")
    size = rows_per_forward or group_size
    return [list(range(i, min(i + size, group_size))) for i in range(0, group_size, size)]


def initial_noise(seeds: Sequence[int], shape: tuple, device="cpu", shared: bool = False) -> tuple[torch.Tensor, list]:
    """x_{s=1} per seed, and the generators that then draw that sample's step noise. shared: every sample starts
    from the first seed's x_{s=1} (each generator still draws its own first, so the step noise is the same as
    without)."""
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    if shared:
        noise = noise[:1].expand_as(noise).clone()
    return noise.to(device), generators


@torch.no_grad()
def sample_group(policy: WanPolicy, cond: Condition, seeds: Sequence[int], rule: NoiseRule,
                 schedule: Schedule, deterministic: bool = False, decode: bool = True,
                 policy_version: int = 0, latents: Optional[torch.Tensor] = None,
                 sde_steps: Optional[Sequence[int]] = None, rows_per_forward: int = 0,
                 ode: OdeSolver = EULER, shared_initial_noise: bool = False) -> Trajectory:
    """Run the SDE (or, deterministic, the ODE) from s = 1 to 0 for len(seeds) samples.

    `sde_steps` (an SDE window, policy/window.py): only those steps are stochastic and get a log-prob; the
    others take the ODE step and draw no noise. None: every step (with every step listed, the same samples).
    `ode` (policy/ode.py): the ODE steps' solver and how many of them each ODE stretch keeps; the default, Euler
    on every grid point, is the official sampler's ODE step. `rows_per_forward`: the transformer's batch
    (`forward_chunks`; 0: the whole group), recorded in the trajectory for the learner's recompute.
    `shared_initial_noise`: every sample starts from the first seed's noise (`initial_noise`)."""
    num_steps = schedule.num_steps
    stochastic = set() if deterministic else set(range(num_steps) if sde_steps is None else sde_steps)
    points = ode.visited(num_steps, sorted(stochastic))
    rule = rule.resolve(schedule.sigmas)  # the official "schedule" bounds are the whole grid's, skipped or not
    sigmas, timesteps = schedule.sigmas[points], schedule.timesteps[points[:-1]]
    sde_positions = [j for j in range(len(points) - 1) if points[j] in stochastic]
    chunks = forward_chunks(len(seeds), rows_per_forward)
    noise, generators = initial_noise(seeds, cond.latent_shape, policy.device, shared_initial_noise)
    x = noise if latents is None else latents.to(policy.device, torch.float32)
    states, log_probs, history = [x], [], None
    for j in range(len(points) - 1):
        v = torch.cat([policy.velocity(x[rows[0]:rows[-1] + 1], timesteps[j].expand(len(rows)), cond)
                       for rows in chunks])
        is_ode = j not in sde_positions
        if is_ode and ode.kind == "dpm2m":
            x, x0 = dpm2m_step(x, v, sigmas[j], sigmas[j + 1], history)
        else:
            step_noise = None
            if not is_ode:
                step_noise = host_to_device(torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32)
                                                         for g in generators]), x.device)
            step = sde_step_with_logprob(x, v, sigmas[j], sigmas[j + 1], rule, noise=step_noise, deterministic=is_ode)
            x0 = None if ode.kind == "euler" else data_prediction(x, v, sigmas[j])  # dpm2m: history across the window
            x = step.prev_sample
            if not is_ode:
                log_probs.append(step.log_prob)
        if is_ode and not deterministic:
            log_probs.append(torch.full((len(seeds),), torch.nan, dtype=torch.float64, device=x.device))
        history = None if x0 is None else (x0, float(sigmas[j]))
        states.append(x)
    window = None if sde_steps is None or deterministic else sde_positions
    trajectory = Trajectory(
        latents=torch.stack(states, dim=1).cpu(), log_probs=torch.stack(log_probs, 1).cpu() if log_probs else None,
        sigmas=sigmas, timesteps=timesteps, seeds=[int(s) for s in seeds], cond=cond.to("cpu"), rule=rule,
        guidance_scale=float(policy.sampler_cfg.guidance_scale), policy_version=policy_version, sde_steps=window,
        forward_rows=chunks, grid_points=None if len(points) == num_steps + 1 else points, ode_solver=ode.kind)
    if decode:
        trajectory.videos = policy.decode(x, cond)
    return trajectory


@dataclass
class StepScore:
    log_prob: torch.Tensor  # (B,) under the current weights
    mean: torch.Tensor
    scale: torch.Tensor  # (B,)
    kl: Optional[torch.Tensor] = None  # (B,) to the reference, when asked for


def score_step(policy: WanPolicy, trajectory: Trajectory, step: int, rows: Optional[Sequence[int]] = None,
               with_kl: bool = False) -> StepScore:
    """Recompute log p(x_{k+1} | x_k) of stored samples with the current weights (differentiable).

    The noise rule and guidance must be those the rollout used; a mismatch would make the importance
    ratio silently wrong, so it is an error.
    """
    if float(policy.sampler_cfg.guidance_scale) != trajectory.guidance_scale:
        raise ValueError(f"sampler.guidance_scale {policy.sampler_cfg.guidance_scale} differs from the "
                         f"rollout's {trajectory.guidance_scale}")
    rows = list(range(trajectory.latents.shape[0])) if rows is None else list(rows)
    x = host_to_device(trajectory.latents[rows, step], policy.device)
    x_next = host_to_device(trajectory.latents[rows, step + 1], policy.device)
    cond = trajectory.cond.to(policy.device)
    s, s_next = trajectory.sigmas[step], trajectory.sigmas[step + 1]
    timestep = trajectory.timesteps[step].expand(len(rows))
    v = policy.velocity(x, timestep, cond)
    out = sde_step_with_logprob(x, v, s, s_next, trajectory.rule, prev_sample=x_next)
    kl = None
    if with_kl:
        with torch.no_grad():
            v_ref = policy.velocity(x, timestep, cond, reference=True)
            ref = sde_step_with_logprob(x, v_ref, s, s_next, trajectory.rule, prev_sample=x_next)
        kl = kl_to_reference(out.mean, ref.mean, out.scale)
    return StepScore(out.log_prob, out.mean, out.scale, kl)
