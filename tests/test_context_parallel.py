"""Context parallelism of the policy's transformers (policy/context_parallel.py), on 2 CPU processes over gloo.

One group of 2 spawned processes runs every case: each computes a policy's guided velocity (and its gradient) in one
process, then splits its transformers over both (Ulysses degree 2) and computes them again on the same inputs.
- VACE (our plan: the control branch split with the main one), LoRA: the velocity bit-equal; the adapters'
  gradients, summed over the two ranks, equal the single process's (float32 sums in another order: 2e-6 relative).
- Phantom (Wan's own plan; two reference latent frames appended to the video's, three-term guidance), full
  fine-tuning: the velocity and the frozen reference copy's velocity bit-equal; the gradients as above.
- VACE with activation checkpointing (each block's forward run again in the backward, through the split hooks).
The loop with context-parallel rollout and learner (Ray, DeepSpeed, bf16 ZeRO-3) is in tests/test_loop.py.
"""

import io
import multiprocessing as mp
import os

import pytest
import torch

from config import ConfigError, load_config
from runtime.distributed import free_port

# float32 gradients: one rank's share of the tokens + the other's, against all tokens at once.
GRADIENT_RTOL = 1e-5


# (case, model kind, LoRA, activation checkpointing): the split hooks must also hold when a block's forward runs again
# in the backward (the 14B preset checkpoints).
CASES = (("vace", "vace", True, False), ("phantom", "phantom", False, False), ("vace_checkpointed", "vace", True, True))


def policy_config(root, kind: str, lora: bool, checkpointing: bool):
    return load_config(root / "cluster_configs" / "local_cpu.yaml",
                       ["trainer.output_dir=/tmp/unused", f"model.kind={kind}", f"model.lora.enabled={lora}",
                        "model.lora.init=gaussian", "sampler.image_guidance_scale=2.0",
                        f"model.gradient_checkpointing={checkpointing}"])


def velocity_and_gradients(policy, latents, timestep, cond, weight, reference: bool):
    """The guided velocity, its gradient w.r.t. the trainable parameters under a fixed linear loss, and the frozen
    reference's velocity."""
    velocity = policy.velocity(latents, timestep, cond)
    (velocity * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
    policy.transformer.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref = policy.velocity(latents, timestep, cond, reference=True) if reference else None
    return velocity.detach(), grads, ref


def member(rank: int, port: int, root, results) -> None:
    from policy.context_parallel import ContextDegrees, context_mesh, parallelize_policy
    from policy.models import TRANSFORMER_ONLY, build_components
    from policy.policy import Condition, WanPolicy

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    degrees = ContextDegrees(ulysses=2)
    mesh = context_mesh(degrees, "cpu")
    gen = torch.Generator().manual_seed(0)
    for case, kind, lora, checkpointing in CASES:
        cfg = policy_config(root, kind, lora, checkpointing)
        torch.manual_seed(0)
        policy = WanPolicy(build_components(cfg.model, parts=TRANSFORMER_ONLY), cfg.model, cfg.sampler)
        frames, refs = 3, 2  # latent frames of the video, and of references (VACE: leading, Phantom: appended)
        shape = (16, frames + (refs if kind == "vace" else 0), 4, 6)
        cond = Condition(torch.randn(1, 5, 32, generator=gen), torch.randn(1, 5, 32, generator=gen), shape)
        if kind == "vace":
            cond.control, cond.num_ref_frames = torch.randn(1, 96, *shape[1:], generator=gen), refs
        else:
            cond.ref_latents = torch.randn(1, 16, refs, 4, 6, generator=gen)
        latents, timestep = torch.randn(2, *shape, generator=gen), torch.tensor([700.0, 250.0])
        weight = torch.randn(2, *shape, generator=gen)
        whole = velocity_and_gradients(policy, latents, timestep, cond, weight, reference=not lora)
        parallelize_policy(policy, degrees, mesh)
        split = velocity_and_gradients(policy, latents, timestep, cond, weight, reference=not lora)
        summed = {}
        for name, grad in split[1].items():
            summed[name] = grad.clone()
            torch.distributed.all_reduce(summed[name])
        buffer = io.BytesIO()  # bytes, not tensors: a tensor sent through a queue lives in its sender's shared memory
        torch.save({"whole": whole, "split": (split[0], summed, split[2]), "own": split[1]}, buffer)
        results.put((rank, case, buffer.getvalue()))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(root):
    """{(rank, case): {"whole": (velocity, gradients, reference velocity), "split": the same with the gradients summed
    over the ranks, "own": this rank's gradients}}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=member, args=(rank, port, root, results)) for rank in range(2)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(2 * len(CASES)):
            rank, case, value = results.get(timeout=240)
            out[rank, case] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.parametrize("case", [case for case, *_ in CASES])
def test_split_velocity_is_bit_equal_and_gradients_sum_to_the_whole(outcomes, case):
    for rank in (0, 1):
        whole, split = outcomes[rank, case]["whole"], outcomes[rank, case]["split"]
        assert torch.equal(split[0], whole[0])  # every rank holds the whole, gathered velocity
        if case == "phantom":  # full fine-tuning: the frozen reference copy is split too
            assert torch.equal(split[2], whole[2])
        assert set(split[1]) == set(whole[1])
        assert sum(bool(g.abs().max() > 0) for g in whole[1].values()) > 10  # (LoRA A's are 0 while B is 0)
        for name, grad in whole[1].items():
            torch.testing.assert_close(split[1][name], grad, rtol=GRADIENT_RTOL,
                                       atol=GRADIENT_RTOL * float(grad.abs().max()))
        # a rank's own gradient is its tokens' share, not the whole: the sum is needed (the learner's loss scaling)
        own = outcomes[rank, case]["own"]
        assert any(not torch.allclose(own[name], grad, rtol=0.01) for name, grad in whole[1].items())


@pytest.mark.parametrize("override, message", [
    (["model.context_parallel.ulysses=2", "workers.rollout.num_workers=1"], "workers.rollout.num_workers"),
    (["model.context_parallel.ulysses=2", "workers.rollout.num_workers=2", "workers.learner.num_workers=3",
      "grpo.prompts_per_step=3"], "workers.learner.num_workers"),
    (["model.context_parallel.ulysses=3", "workers.rollout.num_workers=3", "workers.learner.num_workers=3",
      "grpo.prompts_per_step=3"], "do not split into 3 equal parts"),
    (["model.context_parallel.ulysses=4", "workers.rollout.num_workers=4", "workers.learner.num_workers=4",
      "model.height=64", "model.width=64"], "model.context_parallel.ulysses' (4) must divide tiny's 2 attention"),
    (["model.context_parallel.ring=2", "workers.rollout.num_workers=2"], "model.context_parallel.ring' > 1 needs"),
    (["model.context_parallel.ulysses=2", "workers.rollout.num_workers=2", "workers.learner.num_workers=4",
      "grpo.prompts_per_step=3"], "data-parallel size (2"),
])
def test_config_refuses_what_cannot_be_split(root, override, message):
    from workers.run_config import load_run_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(root / "cluster_configs" / "local_cpu.yaml", ["trainer.output_dir=/tmp/unused", *override])


def test_context_groups_across_nodes_are_found():
    from workers.group import groups_across_nodes

    assert groups_across_nodes(["a", "a", "b", "b"], 2) == []
    assert groups_across_nodes(["a", "a", "a", "b", "b", "b"], 2) == [1]  # actors 2-3 straddle nodes a and b
    assert groups_across_nodes(["a", "b"], 1) == []
