"""What one update is made of and costs: the steps trained per trajectory, the micro-steps per optimizer step
(DeepSpeed's accumulation count), the row chunks of a micro-step, and the transformer passes per video. The driver,
the learner ranks and the benchmarks all count with these, so they agree.
"""

from __future__ import annotations

from typing import Dict, List

from policy.grpo import trained_step_count
from policy.policy import guided_passes
from policy.sampler import forward_chunks
from policy.window import window_size


def trained_timesteps(cfg) -> int:
    """Steps trained per trajectory: the `grpo.timestep_fraction` of its SDE steps (all, or the SDE window's; NFT,
    which has no window: of the sampler's levels)."""
    return trained_step_count(window_size(cfg.sampler.sde_window, cfg.sampler.num_steps), cfg.grpo.timestep_fraction)


def transformer_passes(cfg) -> Dict[str, int]:
    """What one video costs in transformer passes (per step, policy/policy.py guided_passes: 2 with CFG for VACE and
    T2V, 3 for Phantom's text + image guidance, 1 without guidance): `rollout_nfe` to sample it on every grid step
    (the train loop logs it as sampled: `sampler.ode_steps_ratio` skips ODE steps), `learn_passes` to learn from it
    (the trained steps of every inner epoch, each a policy forward + backward, and with a KL term the reference's
    forward too)."""
    guided = guided_passes(cfg.model.kind, cfg.sampler)
    forwards = 1 + (cfg.grpo.kl_beta > 0) + (cfg.grpo.objective == "nft" and nft_needs_old_pass(cfg))
    learn = trained_timesteps(cfg) * cfg.grpo.num_inner_epochs * guided * forwards
    return {"rollout_nfe": cfg.sampler.num_steps * guided, "learn_passes": learn}


def nft_needs_old_pass(cfg) -> bool:
    """Whether an NFT update spans more than one optimizer step (then the sampling policy's velocities are computed
    before the first)."""
    return cfg.grpo.num_inner_epochs * cfg.grpo.optimizer_steps_per_update > 1


def micro_steps_per_optimizer_step(cfg, world_size: int) -> int:
    """DeepSpeed's gradient_accumulation_steps: a rank's micro-steps of one update, over the optimizer steps."""
    groups_per_rank = cfg.grpo.prompts_per_step // world_size
    micro_steps = groups_per_rank * trained_timesteps(cfg) * len(row_chunks(cfg))
    return micro_steps // cfg.grpo.optimizer_steps_per_update


def row_chunks(cfg) -> List[List[int]]:
    """Rows of a group per micro-step, and per rollout transformer forward: the whole group, or chunks of
    `workers.learner_engine.micro_batch_size`."""
    return forward_chunks(cfg.grpo.group_size, cfg.workers.learner_engine.micro_batch_size)


def recorded_chunks(cfg, trajectory) -> List[List[int]]:
    """The rollout's forward chunks, which the learner's micro-steps follow; an error if they are not the ones
    the engine's accumulation count was set for (a rollout made under another config)."""
    if trajectory.forward_rows != row_chunks(cfg):
        raise ValueError(f"trajectory {trajectory.key!r} was sampled in transformer batches of rows "
                         f"{trajectory.forward_rows}, the learner's 'workers.learner_engine.micro_batch_size' "
                         f"({cfg.workers.learner_engine.micro_batch_size}) cuts {row_chunks(cfg)}: the recomputed "
                         "log-probs would not be the rollout's")
    return trajectory.forward_rows
