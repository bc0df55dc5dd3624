"""One dtype for every parameter of the policy transformer, the same in the rollout and the learner.

Why: the learner recomputes the rollout's log-probabilities and the first importance ratio must be exactly
1; at the paper's clip range 1e-3 a ratio off by rounding is clipped noise. A module that computes in bf16
in one role and in fp32 in the other (diffusers keeps some Wan modules in fp32 on load; DeepSpeed's bf16
mode casts every parameter) breaks that. So both roles call `set_policy_dtypes` on the same module
structure, and the learner's engine is configured not to change them (workers/learner.py):

- LoRA: the frozen base as `from_pretrained(torch_dtype=model.dtype)` leaves it (bf16, with the norms, time
  embedder, modulation tables and RoPE of `_keep_in_fp32_modules` in fp32); the adapters in fp32. The
  learner's DeepSpeed engine then runs its fp32 path over the adapters alone: fp32 master weights (the
  adapters themselves), fp32 optimizer state, fp32 gradient accumulation across micro-steps. This is how
  the official Identity-GRPO code trains LoRA (fp32 adapters, under accelerate's bf16 autocast: README "Precision").
- Full fine-tuning in bf16: every parameter bf16, as DeepSpeed's bf16 mode casts them; its optimizer keeps
  fp32 master weights and gradients accumulate in fp32 (`data_types.grad_accum_dtype`).
- float32: every parameter fp32.
"""

from __future__ import annotations

from typing import Dict

import torch

from policy.arch import cast_like_pretrained


def set_policy_dtypes(transformer: torch.nn.Module, dtype: torch.dtype, lora: bool) -> torch.nn.Module:
    """Apply the rule above in place; returns the module."""
    if lora or dtype == torch.float32:
        cast_like_pretrained(transformer, dtype)
        with torch.no_grad():
            for param in transformer.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()  # trainable = the adapters: fp32 master weights
    else:  # full fine-tuning in bf16/fp16: every tensor, as DeepSpeed's mixed precision casts them
        with torch.no_grad():  # (not `.to(dtype)`: diffusers' ModelMixin.to warns about its fp32-kept modules)
            for tensor in list(transformer.parameters()) + list(transformer.buffers()):
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
    return transformer


def dtype_map(module: torch.nn.Module) -> Dict[str, str]:
    """{parameter name: dtype}: what two roles compare to prove they compute alike."""
    return {name: str(p.dtype).replace("torch.", "") for name, p in module.named_parameters()}


def dtype_counts(module: torch.nn.Module) -> Dict[str, int]:
    """{dtype: number of parameters}, for logs."""
    counts: Dict[str, int] = {}
    for p in module.parameters():
        key = str(p.dtype).replace("torch.", "")
        counts[key] = counts.get(key, 0) + p.numel()
    return counts
