"""Demo rewards for the CPU demo: cheap, dependency-free, and learnable by a tiny model in minutes.

Why they exist: a tiny random-init video model cannot draw faces within a CPU demo's budget, so the
face and VLM identity rewards would give it no signal (every sample scores `missing_penalty` or
noise). These two rewards still exercise the whole GRPO loop with a signal the policy can move, given
a decoder that passes latent changes to pixels (the demo's trained tiny VAE, policy/demo_vae.py; the
random tiny VAE does not, so with it neither rises):
- `demo_brightness`: mean pixel intensity of the video, in [0, 1];
- `demo_reference_color`: minus the mean L2 distance (in [0, 1] RGB units) between each frame's mean
  colour and the mean colour of the sample's reference images, in [-sqrt(3), 0]; higher = the video's
  colours match the references. Each reference counts equally, whatever its size.
They say nothing about identity; never use them to judge a real model.

Both follow the composite RewardFn interface:
`fn(videos: list of uint8 (F, H, W, 3), references: list of lists of uint8 (H, W, 3), prompts) -> (B,) float64`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from reward.inputs import ArrayLike, as_uint8_rgb


def _as_float(x: ArrayLike, ndim: int, what: str) -> torch.Tensor:
    """uint8 array/tensor -> float64 tensor in [0, 1], shape-checked (errors name `what`)."""
    # np.array copies: inputs may be read-only views (decoded shards), which torch will not wrap.
    return torch.from_numpy(np.array(as_uint8_rgb(x, ndim, what))).double() / 255.0


def demo_brightness(videos: Sequence[ArrayLike], references: Optional[Sequence] = None,
                    prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Mean intensity of each video in [0, 1] (DEMO reward; references and prompts unused)."""
    return torch.stack([_as_float(v, 4, f"sample {i}: video").mean() for i, v in enumerate(videos)]) \
        if len(videos) else torch.zeros(0, dtype=torch.float64)


def demo_reference_color(videos: Sequence[ArrayLike], references: Sequence[Sequence[ArrayLike]],
                         prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    """-mean_t || mean colour of frame t - mean colour of the references ||_2 (DEMO reward)."""
    if len(videos) != len(references):
        raise ValueError(f"demo_reference_color: {len(videos)} videos but {len(references)} reference lists")
    out = []
    for i, (video, refs) in enumerate(zip(videos, references, strict=True)):
        if len(refs) == 0:
            raise ValueError(f"sample {i}: demo_reference_color needs at least one reference image")
        target = torch.stack([_as_float(r, 3, f"sample {i}: reference {k}").mean((0, 1))
                              for k, r in enumerate(refs)]).mean(0)  # (3,)
        frame_colour = _as_float(video, 4, f"sample {i}: video").mean((1, 2))  # (F, 3)
        out.append(-(frame_colour - target).norm(dim=1).mean())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)

