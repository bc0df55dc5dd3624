"""Input checks every reward shares: videos and images arrive as uint8 RGB, numpy or torch."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def as_uint8_rgb(x: ArrayLike, ndim: int, what: str) -> np.ndarray:
    """A contiguous uint8 array of shape (F, H, W, 3) (ndim 4) or (H, W, 3) (ndim 3); errors name `what`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB, got dtype {x.dtype}")
    shape = "(F, H, W, 3)" if ndim == 4 else "(H, W, 3)"
    if x.ndim != ndim or x.shape[-1] != 3:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(x.shape)}")
    if min(x.shape[:-1]) < 1:
        raise ValueError(f"{what} is empty: shape {tuple(x.shape)} (a video needs at least one frame)")
    return np.ascontiguousarray(x)
