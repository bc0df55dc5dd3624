"""bf16 backward passes on CPUs without native bf16 matrix multiply (AVX2-only x86).

Measured on this project's CI machines (AMD EPYC, AVX2, torch 2.13 CPU build, one thread, 256x2048 @ 2048x2048):
float32 gemm 47-72 GFLOP/s in any layout; bf16 with the second operand transposed ("NT", what a linear layer's
forward does) 10 GFLOP/s, but bf16 in plain layout ("NN") 0.3 GFLOP/s. oneDNN's bf16 GEMM is only used on
CPUs with AVX512-BF16 / AMX; elsewhere torch falls back to its reference cpublas loop, which is fast only
for some layouts. A linear layer's input gradient (grad_out @ weight) is an NN product, so one backward of a
bf16 2048-wide MLP over a few hundred tokens took minutes: a reward-model rehearsal step took 7 minutes.
Used by the reward trainer (reward/train.py) and the GRPO learner's update (workers/learner.py).

`fast_bf16_linear_backward()` swaps `torch.nn.functional.linear` (what nn.Linear and peft's LoRA layers call)
for an autograd function whose forward *is* the original call (bit-identical outputs, so scores and
log-probs do not move) and whose backward computes the input gradient with a transposed-contiguous copy
of the weight (the fast layout). Gradients are the same products in the same dtype, summed by another
kernel, so they may differ from autograd's in the last bf16 bit. It applies only where it helps: float
weights of dtype bfloat16 on a CPU without native bf16 GEMM; everything else goes to the original.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

_ORIGINAL_LINEAR = F.linear


def native_bf16_gemm() -> bool:
    """Whether torch's CPU bf16 matmuls use oneDNN (AVX512-BF16 / AMX) rather than the slow reference loop."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


class _Bf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ORIGINAL_LINEAR(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # weight.t().contiguous().t(): the same (out, in) matrix stored column-major: the fast "NT" layout
            grad_x = torch.mm(grad2d, weight.t().contiguous().t()).reshape(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad2d.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def _linear(x, weight, bias=None):
    if (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)):
        return _Bf16Linear.apply(x, weight, bias)
    return _ORIGINAL_LINEAR(x, weight, bias)


@contextlib.contextmanager
def fast_bf16_linear_backward(device: str, dtype: str) -> Iterator[bool]:
    """Within the block, bf16 linear layers on this CPU train with the fast backward (see the module docstring);
    yields whether it is on. A no-op on GPUs, in float32, and on CPUs with native bf16 GEMM."""
    if device != "cpu" or dtype != "bfloat16" or native_bf16_gemm() or F.linear is not _ORIGINAL_LINEAR:
        yield False
        return
    F.linear = _linear
    try:
        yield True
    finally:
        F.linear = _ORIGINAL_LINEAR
