"""Rehearsals of the production presets on CPU (launcher/rehearse.py): real architectures at reduced depth,
random init, bf16, the presets' own ZeRO stage, weight sync and micro-batching.

All of them run under the `rehearsal` marker (`make test-rehearsal`, run in CI). Each rehearsal runs as its own
process, as a user runs it.
"""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from config import load_config
from launcher.rehearse import cpu_overrides
from runtime.metrics import read_metrics

GPU_PRESETS = ["vace_1.3b_8gpu.yaml", "vace_1.3b_8gpu_colocated.yaml", "phantom_1.3b_8gpu.yaml",
               "vace_14b_multinode.yaml", "vace_14b_480p_cp.yaml"]
# The 1.3B LoRA rehearsal-and-resume runs twice; it takes groups of 4: groups of 8 cut in micro-batches are the 14B
# preset's rehearsal (the 1.3B preset runs a group in one forward whatever its size).
SMALLER = ("grpo.group_size=4",)
# The context-parallel 14B preset runs one video per forward (micro-batch 1): groups of 2 here, since the preset's 8
# would be 8 forwards per step in each of 4 processes at 14B width; groups of 8 cut in micro-batches are the
# multinode preset's rehearsal.
PRESET_EXTRA = {"vace_14b_480p_cp.yaml": ("grpo.group_size=2",)}
MEMORY_TOLERANCE = 0.25  # the plan's prediction within 25% of each role's measured peak (issue #15)


def rehearse(root, preset, out, *args, timeout=1500):
    cmd = [sys.executable, "-m", "launcher.rehearse", "--config", str(root / "cluster_configs" / preset), *args,
           f"trainer.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "rehearsal.json").read_text()), proc.stdout


def preset_reward_names(root, preset):
    return set(load_config(root / "cluster_configs" / preset).reward.weights)


def check_grpo_rehearsal(root, preset, report, out, steps):
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # fresh rollouts, recomputed by the learner in the same dtypes: exactly the rollout's log-probs
    assert records[0]["first_epoch_logprob_dev"] == 0.0 and records[0]["ratio_mean"] == 1.0, records[0]
    assert records[0]["ratio_min"] == records[0]["ratio_max"] == 1.0
    # reward components: exactly those the preset names (no inherited default such as face: 1.0)
    scored = {k[len("reward_"):] for k in records[0] if k.startswith("reward_")} - {"mean", "std", "failed", "s"}
    assert scored == preset_reward_names(root, preset)
    assert report["dtypes_equal"]
    roles = {r["role"] for r in report["roles"]}
    assert roles == {"rollout", "reward", "learner"}
    for r in report["roles"]:
        if r["role"] == "learner":  # prompt embeddings travel with the trajectory: no text encoder or VAE
            assert set(r["parts"]) <= {"transformer", "reference", "optimizer_state"}, r["parts"]
        assert abs(r["measured_over_plan"] - 1) <= MEMORY_TOLERANCE, r


@pytest.fixture
def out(tmp_path):
    """The rehearsal's output directory, removed afterwards: bf16 checkpoints of real widths are gigabytes."""
    yield tmp_path / "run"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


# ----------------------------------------------------------------------------- config (fast)


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_print_config_lists_only_the_named_reward_components(root, preset, capsys):
    from launcher.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(root / "cluster_configs" / preset), "--print-config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed["reward"]["weights"]) == preset_reward_names(root, preset)
    assert printed["reward"]["vlm"]["image_size"] == 448  # the preset's, not the tiny default
    assert printed["model"]["init"] == "pretrained" and printed["model"]["arch"] != "tiny"


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_cpu_overrides_keep_what_the_preset_trains(root, preset):
    path = root / "cluster_configs" / preset
    original = load_config(path)
    cfg = load_config(path, cpu_overrides(original, learner_ranks=2, output_dir="/tmp/unused"))
    assert cfg.model.init == "random" and cfg.model.arch == original.model.arch
    assert cfg.model.dtype == original.model.dtype == "bfloat16"
    assert cfg.workers.learner_engine == original.workers.learner_engine  # ZeRO stage, precision, micro-batching
    assert cfg.workers.weight_sync == original.workers.weight_sync and cfg.model.lora == original.model.lora
    # a rank's share of groups, in one optimizer step: every recomputed ratio must then be exactly 1 (the check)
    scaled = {"prompts_per_step", "optimizer_steps_per_update"}
    same = lambda section: {k: v for k, v in section.items() if k not in scaled}  # noqa: E731
    assert same(cfg.grpo) == same(original.grpo) and cfg.grpo.optimizer_steps_per_update == 1
    for key in ("schedule", "noise_rule", "std_min", "std_max", "negative_prompt", "shift"):
        assert cfg.sampler[key] == original.sampler[key], key
    assert cfg.optim == original.optim and cfg.sampler.guidance_scale == original.sampler.guidance_scale
    assert cfg.workers.learner.num_workers == 2 and cfg.reward.vlm.arch == original.reward.vlm.arch
    assert set(cfg.reward.weights) == set(original.reward.weights)


# ----------------------------------------------------------------------------- rehearsals


@pytest.mark.rehearsal
@pytest.mark.timeout(1800)
def test_vace_1_3b_preset_rehearsal_and_resume(root, out):
    """The 1.3B VACE preset: 1 step in bf16 on 2 learner ranks, then resumed from its checkpoint to step 2, whose
    rollout samples with the restored LoRA weights (the learner must recompute exactly what was sampled), in the
    SMALLER groups above."""
    report, stdout = rehearse(root, "vace_1.3b_8gpu.yaml", out, "--learner-ranks", "2", *SMALLER, "trainer.steps=1")
    assert "measured/plan" in stdout  # the per-role table is printed
    check_grpo_rehearsal(root, "vace_1.3b_8gpu.yaml", report, out, steps=1)
    assert (out / "checkpoints" / "step_000001" / "driver.pt").is_file()
    before = (out / "metrics.jsonl").read_text().splitlines()
    report, _ = rehearse(root, "vace_1.3b_8gpu.yaml", out, "--learner-ranks", "2", *SMALLER, "trainer.steps=2")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    # resumed at 1, not restarted: step 1 is the first run's record, timings and all
    assert (out / "metrics.jsonl").read_text().splitlines()[:1] == before
    assert records[1]["first_epoch_logprob_dev"] == 0.0 and records[1]["ratio_min"] == records[1]["ratio_max"] == 1.0
    assert records[1]["policy_version"] == 2


@pytest.mark.rehearsal
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("preset", ["phantom_1.3b_8gpu.yaml", "vace_14b_multinode.yaml", "vace_14b_480p_cp.yaml"])
def test_preset_rehearsal(root, out, preset):
    report, _ = rehearse(root, preset, out, "--learner-ranks", "2", "trainer.steps=1", *PRESET_EXTRA.get(preset, ()))
    check_grpo_rehearsal(root, preset, report, out, steps=1)
    if preset == "vace_14b_480p_cp.yaml":  # each video split over a rollout worker of 2 actors and the 2 learner ranks
        assert [r["role"] for r in report["roles"]].count("rollout") == 2


@pytest.mark.rehearsal
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_full_fine_tune_broadcast_rehearsal(root, out, zero_stage):
    """Full fine-tuning of the 1.3B VACE architecture in bf16 (the preset's ZeRO-2 with its EMA, and ZeRO-3, where
    the EMA is not implemented), weights broadcast from learner rank 0. Groups of 2 videos: what is under test
    is the full-weight path, not the group size (the LoRA rehearsal above keeps the preset's 8)."""
    report, _ = rehearse(root, "vace_1.3b_8gpu.yaml", out, "--learner-ranks", "2", "trainer.steps=2",
                         "grpo.group_size=2", "model.lora.enabled=false", "workers.weight_sync=broadcast",
                         "optim.lr=1e-5",
                         f"workers.learner_engine.zero_stage={zero_stage}", f"optim.ema.enabled={zero_stage < 3}")
    check_grpo_rehearsal(root, "vace_1.3b_8gpu.yaml", report, out, steps=2)
    # step 2 sampled with the weights broadcast after step 1: the learner recomputes exactly what was sampled
    assert read_metrics(out)[1]["first_epoch_logprob_dev"] == 0.0


@pytest.mark.rehearsal
@pytest.mark.timeout(1800)
def test_reward_3b_rehearsal(root, out):
    report, _ = rehearse(root, "reward_3b_8gpu.yaml", out)
    assert report["step"] == 2 and report["arch"] == "qwen2.5-vl-3b"
    assert (out / "model" / "model.safetensors").is_file() and (out / "teacher_filter.json").is_file()
    assert abs(report["measured_over_plan"] - 1) <= MEMORY_TOLERANCE, report
