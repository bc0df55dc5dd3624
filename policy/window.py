"""Which denoising steps are stochastic (and recorded, and trainable) at a training step: MixGRPO's SDE window.

Video GRPO pays for every denoising step it trains on. MixGRPO (Tencent-Hunyuan/MixGRPO,
fastvideo/utils/grpo_states.py `GRPOTrainingStates`) samples with the SDE only inside a window of
`size` consecutive steps and with the deterministic ODE step elsewhere, and trains only the window's
steps; the window slides over training, from the high-noise end on:

    progressive  starts at `start`, moves by `stride` (MixGRPO's group_size, or prog_overlap_step with
                 prog_overlap) every `shift_every` training steps (iters_per_group); past the last position it
                 stays there, or with `roll_back` starts again at `start`
    random       a position drawn per training step
    fixed        always at `start`

Differences from MixGRPO, named: the position is a pure function of the training step (and run seed), not
a counter advanced in the loop, so a resumed or recovered run sees exactly the windows of an uninterrupted
one; the last position keeps the whole window inside the trajectory (MixGRPO clips its start to
`sampling_steps - 2`, where its window shrinks to nothing); every step, the last one included, may be in the
window (MixGRPO leaves out the final step, at sigma 0). `size = 0` (or >= the step count) makes every step
stochastic: today's full-SDE trajectory, bit for bit.
"""

from __future__ import annotations

from typing import List

import numpy as np

STRATEGIES = ("progressive", "random", "fixed")
RANDOM_DOMAIN = 0x5DE_3177  # keeps the random window's draws apart from every other seed stream


def window_size(window_cfg, num_steps: int) -> int:
    """How many steps of `num_steps` are stochastic at every training step."""
    size = int(window_cfg.size)
    return num_steps if size <= 0 or size >= num_steps else size


def sde_steps(window_cfg, num_steps: int, train_step: int, seed: int = 0) -> List[int]:
    """The SDE (recorded, trainable) steps of a trajectory of `num_steps` at training step `train_step` (1-based)."""
    size = window_size(window_cfg, num_steps)
    if size == num_steps:
        return list(range(num_steps))
    last = num_steps - size  # the last position that keeps the window inside the trajectory
    start = min(int(window_cfg.start), last)
    strategy = window_cfg.strategy
    if strategy == "fixed":
        position = start
    elif strategy == "progressive":
        stride = int(window_cfg.stride) or size
        moves = (max(1, train_step) - 1) // int(window_cfg.shift_every)
        if window_cfg.roll_back:
            positions = (last - start) // stride + 1  # start, start + stride, ... <= last
            position = start + (moves % positions) * stride
        else:
            position = min(start + moves * stride, last)
    elif strategy == "random":
        rng = np.random.default_rng([RANDOM_DOMAIN, int(seed), int(train_step)])
        position = int(rng.integers(0, last + 1))
    else:
        raise ValueError(f"sampler.sde_window.strategy: {strategy!r} is not one of {STRATEGIES}")
    return list(range(position, position + size))
