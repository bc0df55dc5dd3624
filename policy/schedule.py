"""The sigma schedule a rollout samples on, and the timesteps the transformer sees at each step.

Two schedules, both read off diffusers' own schedulers (so they agree with diffusers to the last bit):

    "unipc": Wan's shipped scheduler (`scheduler/scheduler_config.json` of the Wan2.1 diffusers repos,
             policy/architectures/wan2.1_scheduler.json): UniPCMultistepScheduler with flow sigmas, flow
             shift, final sigma 0. The official Identity-GRPO code samples on these sigmas and passes the
             scheduler's integer timesteps (999, 986, ...) to the transformer, stepping with its own SDE
             step, not UniPC's multistep solver (flow_grpo/diffusers_patch/wan_vace_pipeline_with_logprob.py).
    "euler": FlowMatchEulerDiscreteScheduler with Wan's shift (Flow-GRPO's schedule); timesteps are
             sigma * 1000 as floats.

The two differ a lot near the data end: at 25 steps and shift 3 UniPC's last non-zero sigma is 0.114,
Euler's 0.009. Rollout and learner must use the same one: the trajectory carries both tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEDULES = ("unipc", "euler")
WAN_SCHEDULER_CONFIG = Path(__file__).parent / "architectures" / "wan2.1_scheduler.json"


@dataclass(frozen=True)
class Schedule:
    kind: str
    sigmas: torch.Tensor  # (T+1,) float64, s_0 ~ 1 > ... > s_T = 0
    timesteps: torch.Tensor  # (T,) float32: the transformer's timestep input at each step

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1


def sampling_schedule(kind: str, num_steps: int, shift: float) -> Schedule:
    """The `kind` schedule of `num_steps` steps with flow shift `shift` (sampler.schedule, sampler.shift)."""
    if num_steps < 1:
        raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
    if kind == "unipc":
        from diffusers import UniPCMultistepScheduler

        config = json.loads(WAN_SCHEDULER_CONFIG.read_text())
        scheduler = UniPCMultistepScheduler.from_config({**config, "flow_shift": float(shift)})
    elif kind == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        raise ValueError(f"sampler.schedule: unknown schedule {kind!r} (expected one of {', '.join(SCHEDULES)})")
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.to(torch.float64)
    timesteps = scheduler.timesteps.to(torch.float32)
    if sigmas.shape != (num_steps + 1,) or timesteps.shape != (num_steps,) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sampler.schedule={kind}: diffusers returned {tuple(sigmas.shape)} sigmas ending at "
                         f"{float(sigmas[-1])} and {tuple(timesteps.shape)} timesteps for {num_steps} steps")
    return Schedule(kind, sigmas, timesteps)


def schedule_from_config(sampler_cfg, num_steps: int | None = None) -> Schedule:
    steps = sampler_cfg.num_steps if num_steps is None else num_steps
    return sampling_schedule(sampler_cfg.schedule, int(steps), float(sampler_cfg.shift))
