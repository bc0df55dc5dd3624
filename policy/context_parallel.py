"""Context parallelism: one video's token sequence split across a group of processes, so the 14B transformer samples
and trains at 480x832x81 (about 32.8k tokens) where one GPU's memory and time do not suffice.

Built on diffusers' own implementation (0.42: `ContextParallelConfig`, `ModelMixin.enable_parallelism`, Ulysses and
ring attention with their backward ops), not collective code of ours. A plan names where the sequence is split and
where it is gathered; diffusers hooks those modules:
- T2V and Phantom: `WanTransformer3DModel`'s own `_cp_plan`. Phantom's references are latent frames appended after the
  video's on the frame axis before patchifying, so they are tokens of the same sequence: the rotary embedding and the
  hidden states are split at the same positions whatever the number of references (tested equal to one process).
- VACE: `WanVACETransformer3DModel` declares none; `VACE_PLAN` is ours. The control branch runs before the main blocks:
  `vace_blocks.0` gets the hidden states and the (padded) control states split; every control block then works on its
  slice and returns its hint split the same way, which the main blocks (split at `blocks.0`) add at the same positions.
  The rotary embedding is split as Wan's, `proj_out` gathered.
Text embeddings and timesteps are replicated: cross-attention's keys and values are the whole prompt on every rank.

Gradients: the gather's backward hands each rank the gradient of its own slice (diffusers' AllGatherFunction), so a
rank's parameter gradients are its tokens' share, and the full gradient is their sum over the context group. The
learner makes DeepSpeed's average over all its ranks that sum (workers/learner.py: the loss times the degree).

Every rank of a context group computes the same output, the whole video: a group must be given identical inputs.

On CPU (tests, CI) two things need help, both measured (../shared/CPU_STACK.md): diffusers places the model on
`rank % torch.accelerator.device_count()`, zero without an accelerator (`_one_device_without_accelerator`), and it
slices the mesh by the names "ring" and "ulysses", so `context_mesh` names them so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict

import torch
from diffusers import ContextParallelConfig, WanVACETransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

# Outputs of the rotary embedding (cos, sin: batch, sequence, 1, head dim) are split as they leave it; the blocks'
# hidden states (batch, sequence, width) as they enter; the projection's output gathered on the sequence axis.
_ROPE = {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
         1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)}
_SEQUENCE = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
VACE_PLAN = {
    "rope": _ROPE,
    "vace_blocks.0": {"hidden_states": _SEQUENCE, "control_hidden_states": _SEQUENCE},
    "blocks.0": {"hidden_states": _SEQUENCE},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
# The attention kernel under diffusers' context-parallel attention, set before `enable_parallelism`: Ulysses runs
# torch's scaled_dot_product_attention (the models' default); ring attention merges key/value blocks by their
# log-sum-exp, which only the cuDNN kernel of those that support context parallelism without extra packages returns
# (CUDA, bf16: config/checks.py refuses ring elsewhere).
ULYSSES_BACKEND = "native"
RING_BACKEND = "_native_cudnn"


@dataclass(frozen=True)
class ContextDegrees:
    """`model.context_parallel`: Ulysses (all-to-all of heads) and ring (key/value blocks passed around) degrees; the
    group a video is split across has `ulysses x ring` ranks."""

    ulysses: int = 1
    ring: int = 1

    @classmethod
    def from_config(cls, model_cfg) -> "ContextDegrees":
        cp = model_cfg.context_parallel
        return cls(int(cp.ulysses), int(cp.ring))

    @property
    def size(self) -> int:
        return self.ulysses * self.ring

    @property
    def enabled(self) -> bool:
        return self.size > 1


def plan_for(transformer: torch.nn.Module) -> Dict[str, object]:
    """The split/gather plan of a Wan transformer: ours for VACE, the class's own otherwise."""
    if isinstance(transformer, WanVACETransformer3DModel):
        return VACE_PLAN
    plan = getattr(type(transformer), "_cp_plan", None)
    if plan is None:
        raise NotImplementedError(f"model.context_parallel: {type(transformer).__name__} has no context-parallel plan")
    return plan


def context_mesh(degrees: ContextDegrees, device_type: str) -> "torch.distributed.device_mesh.DeviceMesh":
    """The default process group's ranks as ("dp", "ring", "ulysses"): consecutive ranks form a context group (one
    node's GPUs, the fast links), and the groups are data-parallel to each other. Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    if world % degrees.size:
        raise ValueError(f"model.context_parallel: {degrees.size} ranks per video do not divide the {world} ranks")
    return init_device_mesh(device_type, (world // degrees.size, degrees.ring, degrees.ulysses),
                            mesh_dim_names=("dp", "ring", "ulysses"))


@contextlib.contextmanager
def _one_device_without_accelerator():
    """diffusers computes its device as `rank % torch.accelerator.device_count()`; on a machine without one (CPU runs)
    that count is 0. For the duration it is 1, so the device is cpu:0. A machine with an accelerator is untouched."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable_context_parallel(transformer: torch.nn.Module, degrees: ContextDegrees, mesh) -> None:
    """Split `transformer`'s sequence over `mesh`'s ("ring", "ulysses") group from now on (diffusers' hooks; a model
    can be made parallel once). Collective: every rank of the mesh calls it with its copy of the same model."""
    heads = transformer.config.num_attention_heads
    if heads % degrees.ulysses:
        raise ValueError(f"model.context_parallel.ulysses={degrees.ulysses} does not divide the model's {heads} heads")
    transformer.set_attention_backend(RING_BACKEND if degrees.ring > 1 else ULYSSES_BACKEND)
    config = ContextParallelConfig(ring_degree=degrees.ring, ulysses_degree=degrees.ulysses, mesh=mesh)
    with _one_device_without_accelerator():
        transformer.enable_parallelism(config=config, cp_plan=plan_for(transformer))


def parallelize_policy(policy, degrees: ContextDegrees, mesh) -> None:
    """Both networks a policy runs split the same way: the trained transformer and, when fine-tuning fully, the frozen
    reference copy (with LoRA the reference is the same module, adapters off)."""
    for model in (policy.transformer, policy.reference_transformer):
        if model is not None:
            enable_context_parallel(model, degrees, mesh)
