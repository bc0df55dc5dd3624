"""bf16 linear and 3D-convolution layers on CPUs without native bf16 matrix multiply (AVX2-only x86): computed in
float32.

Measured on this project's CI machines (AMD EPYC, AVX2, torch 2.13 CPU build, one thread, 256x2048 @ 2048x2048):
float32 gemm 47-72 GFLOP/s in any layout; bf16 with the second operand transposed ("NT", what a linear layer's
forward does) 10 GFLOP/s, but bf16 in plain layout ("NN", a linear layer's input gradient) 0.3 GFLOP/s. oneDNN's
bf16 GEMM is only used on CPUs with AVX512-BF16 / AMX; elsewhere torch falls back to its reference cpublas loop.
A rehearsal's reward step (the real-width Qwen2.5-VL scoring 16 videos) spent 85 of its 97 s in that loop, and
a reward-model training step 12.6 of its 19.6 s in the backward of the vision tower's bf16 patch-embedding conv3d.

`bf16_matmuls_in_fp32()` swaps `torch.nn.functional.linear` (what nn.Linear and peft's LoRA layers call) and
`conv3d` (nn.Conv3d: Wan's and Qwen2.5-VL's patch embeddings), for bf16 weights on such a CPU, for ones that
multiply the bf16 values in float32 and round the output to bf16:
what a GPU's bf16 GEMM does (bf16 products are exact in float32, accumulated in float32), in float32 GEMMs,
5-6x faster forward and up to 100x backward. Its outputs differ from torch's reference loop in the last bf16
bit where the float32 sums are ordered otherwise; a float32 GEMM picks its kernel by shape, as oneDNN's bf16
and cuBLAS do, so bit-exact recomputes need equal shapes here as on every other device (policy/sampler.py).
Every role that must agree bit for bit uses it alike: rollout sampling, the learner's update, reward scoring,
the reward trainer. Only bf16 inputs and weights are affected; float32 and GPUs go to torch's own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

_ORIGINAL_LINEAR = F.linear
_ORIGINAL_CONV3D = F.conv3d


def native_bf16_gemm() -> bool:
    """Whether torch's CPU bf16 matmuls use oneDNN (AVX512-BF16 / AMX) rather than the slow reference loop."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


# A weight is converted to float32 a block of rows at a time, into one scratch buffer of this many floats (8 MB: it
# stays in cache, and no fresh pages are faulted in; converting a whole 14B-width weight per call took longer than
# its product).
SCRATCH_FLOATS = 1 << 21


def _row_blocks(weight):
    """(start, stop) of the weight's row blocks, and a float32 scratch buffer for one block."""
    n, k = weight.shape
    rows = max(1, min(n, SCRATCH_FLOATS // k))
    return [(j, min(j + rows, n)) for j in range(0, n, rows)], torch.empty(rows, k)


def _fp32_linear(x, weight, bias):
    """bf16 x @ weight.T (+ bias), products and sums in float32, the output rounded to bf16 once."""
    n, k = weight.shape
    x2d = x.reshape(-1, k).float()
    out = torch.empty(n, x2d.shape[0])  # transposed: each block of output features is a contiguous row block
    blocks, scratch = _row_blocks(weight)
    for start, stop in blocks:
        block = scratch[:stop - start].copy_(weight[start:stop])
        torch.mm(block, x2d.t(), out=out[start:stop])
    if bias is not None:
        out += bias.float()[:, None]
    return out.t().to(x.dtype).reshape(*x.shape[:-1], n)


class _Fp32Linear(torch.autograd.Function):
    """`_fp32_linear` with gradients computed the same way; it keeps the bf16 tensors, not float32 copies."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _fp32_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        grad2d = grad.reshape(-1, n).float()
        x2d = x.reshape(-1, k).float() if ctx.needs_input_grad[1] else None
        grad_x = torch.zeros(grad2d.shape[0], k) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        blocks, scratch = _row_blocks(weight)
        for start, stop in blocks:
            if grad_x is not None:
                grad_x.addmm_(grad2d[:, start:stop], scratch[:stop - start].copy_(weight[start:stop]))
            if grad_w is not None:
                grad_w[start:stop] = torch.mm(grad2d[:, start:stop].t(), x2d)
        grad_b = grad2d.sum(0).to(grad.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype).reshape(*grad.shape[:-1], k)
        return grad_x, grad_w, grad_b


def _linear(x, weight, bias=None):
    if weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return _ORIGINAL_LINEAR(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Fp32Linear.apply(x, weight, bias)
    return _fp32_linear(x, weight, bias)  # the same values as the autograd path: rollout == learner recompute


def _conv3d(x, weight, bias=None, *args, **kwargs):
    """A bf16 conv3d in float32 through autograd's own casts (patch embeddings: small weights and inputs)."""
    if weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return _ORIGINAL_CONV3D(x, weight, bias, *args, **kwargs)
    out = _ORIGINAL_CONV3D(x.float(), weight.float(), None if bias is None else bias.float(), *args, **kwargs)
    return out.to(x.dtype)


@contextlib.contextmanager
def bf16_matmuls_in_fp32(device: str, dtype: str) -> Iterator[bool]:
    """Within the block, bf16 linear and conv3d layers on this CPU compute in float32 (see the module docstring);
    yields whether it is on. A no-op on GPUs, for float32 models, on CPUs with native bf16 GEMM, and inside a block
    that already swapped them."""
    if device != "cpu" or dtype != "bfloat16" or native_bf16_gemm() or F.linear is not _ORIGINAL_LINEAR:
        yield False
        return
    F.linear, F.conv3d = _linear, _conv3d
    try:
        yield True
    finally:
        F.linear, F.conv3d = _ORIGINAL_LINEAR, _ORIGINAL_CONV3D
