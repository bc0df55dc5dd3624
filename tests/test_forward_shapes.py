"""The first importance ratio is exactly 1 by construction: for every GRPO preset, the learner recomputes the
rollout's log-probs with transformer forwards of exactly the shapes the rollout ran.

Why a test of shapes and not only of the ratio: matmul kernels, and so their rounding, are chosen by matrix
shape on CPUs with AMX (oneDNN) and on GPUs (cuBLAS), but not on AVX2-only CPUs, where bf16 runs a
shape-independent loop. A ratio test passes there whatever the shapes (issue #28: the 14B preset's learner cut
groups of 8 into micro-batches of 4, its rollout ran all 8, and only an AMX machine saw the ratio move). This
test fails on any CPU when the shapes differ.

Each preset keeps what decides the shapes (model kind, group size, micro-batch, CFG, dtype, LoRA, ZeRO stage)
on the tiny architecture; one real rollout worker and one real DeepSpeed learner rank, in one fresh process. A
context-parallel preset runs unsplit here (one process): its split is the same in both roles by construction
(policy/context_parallel.py), and test_loop's bf16 ZeRO-3 window run checks that its ratio is exactly 1.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from config import ConfigError, load_config, to_yaml
from tests.fresh_process import in_fresh_process

ROOT = Path(__file__).resolve().parents[1]


def grpo_presets():
    """Every preset the GRPO trainer loads (the reward trainer's and the preference tools' trees it refuses)."""
    found = []
    for path in sorted((ROOT / "cluster_configs").glob("*.yaml")):
        try:
            load_config(path)
        except ConfigError:
            continue
        found.append(path.name)
    return found


def tiny(preset: str, out: Path):
    """The preset with the tiny architecture and sizes; what shapes the forwards is the preset's own."""
    return load_config(ROOT / "cluster_configs" / preset, [
        "model.init=random", "model.arch=tiny", "model.path=null", "model.phantom_checkpoint=null",
        "model.num_layers=null", "model.height=16", "model.width=16", "model.num_frames=5",
        "model.gradient_checkpointing=false", "sampler.num_steps=2", "sampler.max_sequence_length=16",
        "trainer.device=cpu", f"trainer.output_dir={out}", "data.prompt_shards=unused",
        "workers.learner.num_workers=1", "grpo.prompts_per_step=1", "grpo.optimizer_steps_per_update=1",
        "optim.ema.enabled=false", "model.context_parallel.ulysses=1", "model.context_parallel.ring=1"])


def _record_batches(module, into: list):
    """Append the `hidden_states` shape of every forward of `module` to `into`."""
    return module.register_forward_pre_hook(lambda m, args, kwargs: into.append(tuple(kwargs["hidden_states"].shape)),
                                            with_kwargs=True)


def _forward_shapes(out: Path, presets):
    """{preset: (rollout forward shapes, learner forward shapes, first log-prob deviation, refusal message)}."""
    from runtime.distributed import free_port
    from workers.learner import LearnerWorker
    from workers.rollout import RolloutWorker

    torch.set_num_threads(1)
    refs = [np.random.RandomState(0).randint(0, 255, (40, 30, 3), dtype=np.uint8)]
    port, found, learner = free_port(), {}, None
    try:
        for preset in presets:
            cfg = tiny(preset, out / preset)
            learner = LearnerWorker(0, 1, to_yaml(cfg))
            learner.setup("127.0.0.1", port)  # the process group is made once; each preset its own engine
            rollout = RolloutWorker(0, 1, to_yaml(cfg))
            rollout.set_weights(0, learner.publish(0)[1])
            sampled, recomputed = [], []
            hook = _record_batches(rollout.policy.transformer, sampled)
            group = cfg.grpo.group_size
            traj = rollout.generate(1, {"prompt": "a person smiles", "refs": refs}, list(range(1, group + 1)), 0)
            hook.remove()
            hook = _record_batches(learner.policy.transformer, recomputed)
            adv = torch.linspace(-1, 1, group)
            stats = learner.update(1, [0], [adv], [torch.ones(group, dtype=torch.bool)], traj)
            hook.remove()
            traj.forward_rows = [list(range(group))] if len(traj.forward_rows) > 1 else [[r] for r in range(group)]
            try:  # a trajectory cut otherwise than the learner's config: refused, not recomputed on other shapes
                learner.update(2, [0], [adv], [torch.ones(group, dtype=torch.bool)], traj)
                refusal = None
            except ValueError as err:
                refusal = str(err)
            found[preset] = (sampled, recomputed, stats["first_epoch_logprob_dev"], refusal)
    finally:
        if learner is not None:
            learner.shutdown()
    return found


def test_learner_recomputes_on_the_rollouts_shapes_for_every_preset(tmp_path):
    presets = grpo_presets()
    assert {"local_cpu.yaml", "vace_1.3b_8gpu.yaml", "phantom_1.3b_8gpu.yaml", "vace_14b_multinode.yaml"} <= {*presets}
    found = in_fresh_process(_forward_shapes, tmp_path, presets)
    for preset, (sampled, recomputed, deviation, _) in found.items():
        cfg = tiny(preset, tmp_path)
        chunk = cfg.workers.learner_engine.micro_batch_size or cfg.grpo.group_size
        guided = 3 if cfg.model.kind == "phantom" else 2  # CFG terms in one batched forward
        assert {s[0] for s in sampled} == {guided * chunk}, (preset, sampled)
        assert set(recomputed) == set(sampled), (preset, sampled, recomputed)  # the rule itself
        assert deviation == 0.0, preset
    assert {s[0] for s in found["vace_14b_multinode.yaml"][0]} == {2 * 4}  # the 14B preset's groups of 8 in 4s
    for preset, (_, _, _, refusal) in found.items():
        assert refusal and "workers.learner_engine.micro_batch_size" in refusal, (preset, refusal)


@pytest.mark.parametrize("group,rows,chunks", [(4, 0, [[0, 1, 2, 3]]), (4, 2, [[0, 1], [2, 3]]),
                                               (5, 2, [[0, 1], [2, 3], [4]]), (3, 8, [[0, 1, 2]])])
def test_forward_chunks(group, rows, chunks):
    from policy.sampler import forward_chunks

    assert forward_chunks(group, rows) == chunks
