"""The distributed GRPO loop on CPU: real Ray (local cluster), real DeepSpeed (2 learner ranks, ZeRO-2)."""

import json
import os
import subprocess
import sys

import psutil
import pytest
import ray
import torch

from config import load_config
from launcher.checkpoint import CheckpointManager
from launcher.metrics import read_metrics
from launcher.train import Trainer
from launcher.train import run as train_run

pytestmark = pytest.mark.slow

TIMING = {"rollout_s", "reward_s", "learn_s", "sync_s", "step_s", "eval_s"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.demo import build_demo

    prompts, _ = build_demo(tmp_path_factory.mktemp("demo_data"), num_prompts=8, num_pairs=2, samples_per_shard=4)
    return prompts


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def config(root, shards, out, *overrides):
    return load_config(root / "cluster_configs" / "local_cpu.yaml", [
        f"data.prompt_shards={shards}", f"trainer.output_dir={out}", "trainer.steps=2",
        "trainer.checkpoint_every=1", "logging.progress_bar=false", "logging.video_every=2",
        "sampler.num_steps=3", "grpo.group_size=3", *overrides])


def run(cfg):
    train_run(cfg)
    return read_metrics(cfg.trainer.output_dir)


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_two_step_sync_run(root, shards, tmp_path):
    records = run(config(root, shards, tmp_path / "run", "logging.eval_every=2", f"data.eval_prompt_shards={shards}",
                         "logging.eval_num_prompts=2"))
    assert [r["step"] for r in records] == [1, 2]
    assert "heldout_face_mean" not in records[0] and "heldout_face_mean" in records[1]  # the monitor ran
    for r in records:
        assert r["first_epoch_logprob_dev"] == 0.0 and r["ratio_mean"] == 1.0  # fresh rollouts: ratio 1
        assert r["ratio_min"] == r["ratio_max"] == 1.0  # reduced by min/max over micro-steps, not summed
        assert r["staleness_max"] == 0 and r["policy_version"] == r["step"]
    ckpt = CheckpointManager(tmp_path / "run").latest()
    assert ckpt.name == "step_000002"
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (ckpt / "config.yaml").is_file() and (ckpt / "driver.pt").is_file()
    assert any((ckpt / "learner").rglob("*optim_states.pt"))
    assert list((tmp_path / "run" / "tb").glob("events.*"))


@pytest.fixture(scope="module")
def straight(root, shards, tmp_path_factory):
    """The reference run: 4 steps, checkpoint every 2."""
    out = tmp_path_factory.mktemp("straight")
    return strip(run(config(root, shards, out, "trainer.steps=4", "trainer.checkpoint_every=2")))


def test_exact_resume(root, shards, tmp_path, straight):
    run(config(root, shards, tmp_path, "trainer.steps=2", "trainer.checkpoint_every=2"))
    resumed = strip(run(config(root, shards, tmp_path, "trainer.steps=4", "trainer.checkpoint_every=2")))
    assert resumed == straight


@pytest.mark.parametrize("role", ["rollout", "reward"])
def test_killed_worker_gives_same_metrics(root, shards, tmp_path, straight, role):
    records = strip(run(config(root, shards, tmp_path, "trainer.steps=4", "trainer.checkpoint_every=2",
                               f"faults.role={role}", "faults.rank=0", "faults.step=3")))
    assert (tmp_path / "faults" / f"{role}_0_step3.done").exists()  # the worker really died
    assert records == straight


@pytest.mark.parametrize("role,step", [("learner", 4), ("publish", 3)])
def test_killed_learner_rank_resumes_from_checkpoint(root, shards, tmp_path, straight, role, step):
    """A learner rank dies in the update, or while publishing the new version's weights."""
    records = strip(run(config(root, shards, tmp_path, "trainer.steps=4", "trainer.checkpoint_every=2",
                               f"faults.role={role}", "faults.rank=1", f"faults.step={step}")))
    assert (tmp_path / "faults" / f"{role}_1_step{step}.done").exists()
    assert records == straight


def test_moving_sde_window_trains_its_steps_and_resumes_exactly(root, shards, tmp_path, straight):
    """A one-step SDE window moving every step (MixGRPO, policy/window.py): the learner trains the window's step only
    (a quarter of the full run's passes here), log-probs recomputed exactly, and a resumed run sees the same windows."""
    window = ["trainer.steps=4", "trainer.checkpoint_every=2", "grpo.timestep_fraction=1.0",
              "sampler.sde_window.size=1", "sampler.sde_window.shift_every=1", "sampler.sde_window.roll_back=true"]
    whole = strip(run(config(root, shards, tmp_path / "whole", *window)))
    for r in whole:
        assert r["first_epoch_logprob_dev"] == 0.0 and r["ratio_mean"] == 1.0
        assert r["rollout_nfe"] == straight[0]["rollout_nfe"] == 3 * 2  # every step still sampled (CFG: 2 passes)
    assert whole[0]["learn_passes"] * 3 == trained_passes(root, shards, tmp_path) and whole != straight
    run(config(root, shards, tmp_path / "resumed", *window, "trainer.steps=2"))  # later overrides win
    assert strip(run(config(root, shards, tmp_path / "resumed", *window))) == whole


def trained_passes(root, shards, tmp_path):
    """learn_passes of the same config without a window (every one of the 3 steps trained)."""
    from workers.learner import transformer_passes

    return transformer_passes(config(root, shards, tmp_path, "grpo.timestep_fraction=1.0"))["learn_passes"]


@pytest.fixture(scope="module")
def monitored(root, shards, tmp_path_factory):
    """The reference for kills from outside: 4 steps, checkpoint and held-out monitor every 2."""
    out = tmp_path_factory.mktemp("monitored")
    return strip(run(config(root, shards, out, *MONITORED, f"data.eval_prompt_shards={shards}")))


MONITORED = ["trainer.steps=4", "trainer.checkpoint_every=2", "logging.eval_every=2", "logging.eval_num_prompts=1"]
# Processes killed from outside (SIGKILL, found by what they are doing: tests/process_killer.py), in
# phases the `faults` hooks do not reach, all in one run. A learner rank: the group restarts and the run
# replays from step 2's checkpoint; a rollout or reward worker: Ray restarts it and re-runs the call.
# (title, n-th process to enter it, once metrics.jsonl holds this many records); there is one rollout and
# one reward worker, and two learner ranks, each of which counts.
KILLED = [
    ("ray::RolloutWorker.held_out", 1, 0),  # step 2's held-out monitor: the restarted worker must fetch
    ("ray::RewardWorker.score", 2, 0),      # version 2, not monitor with its initial weights
    ("ray::LearnerWorker", 1, 3),  # a rank idle between two calls, once step 3 is logged
    ("ray::LearnerWorker.save", 1, 4),  # then, replaying, step 4's checkpoint, mid-write
]


@pytest.mark.faults
def test_workers_killed_from_outside_give_same_metrics(root, shards, tmp_path, monitored):
    from tests.process_killer import Kill, ProcessKiller

    kills = [Kill(title, nth, after, metrics=tmp_path / "metrics.jsonl") for title, nth, after in KILLED]
    with ProcessKiller(kills):
        records = strip(run(config(root, shards, tmp_path, *MONITORED, f"data.eval_prompt_shards={shards}")))
    for kill in kills:
        assert kill.killed_pid is not None, f"{kill.title} was never seen (seen {kill.seen}x)"
        assert not psutil.pid_exists(kill.killed_pid) or psutil.Process(kill.killed_pid).status() == "zombie"
    assert records == monitored


@pytest.mark.faults
def test_learner_restarts_are_bounded(root, shards, tmp_path):
    """A learner that keeps dying (out of memory, a bad node) stops the run, naming the key, instead of looping."""
    with pytest.raises(RuntimeError, match=r"more than 'trainer.max_learner_restarts' \(0\)"):
        run(config(root, shards, tmp_path, "trainer.steps=1", "trainer.max_learner_restarts=0", "sampler.num_steps=2",
                   "faults.role=learner", "faults.rank=0", "faults.step=1"))
    assert (tmp_path / "faults" / "learner_0_step1.done").exists()


def test_async_staleness_bound(root, shards, tmp_path, straight):
    records = run(config(root, shards, tmp_path / "a1", "trainer.steps=4", "trainer.mode=async",
                         "trainer.max_staleness=1"))
    assert [r["staleness_max"] for r in records] == [0, 1, 1, 1]
    assert all(r["staleness_max"] <= 1 for r in records)
    same = strip(run(config(root, shards, tmp_path / "a0", "trainer.steps=4", "trainer.checkpoint_every=2",
                            "trainer.mode=async", "trainer.max_staleness=0")))
    assert same == straight


def test_kill_during_checkpoint_write_keeps_previous(root, shards, tmp_path):
    out = tmp_path / "run"
    args = [f"data.prompt_shards={shards}", f"trainer.output_dir={out}", "trainer.steps=3",
            "trainer.checkpoint_every=1", "logging.progress_bar=false", "sampler.num_steps=2",
            "grpo.group_size=2", "faults.role=checkpoint", "faults.step=2"]
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.run([sys.executable, "-m", "launcher.train", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    manager = CheckpointManager(out)
    assert manager.latest().name == "step_000001"
    assert list(manager.root.glob("step_000002.tmp-*"))  # the half-written one, never renamed
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    records = run(load_config(root / "cluster_configs" / "local_cpu.yaml", args[:-2]))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert manager.latest().name == "step_000003" and not list(manager.root.glob("*.tmp-*"))


# ----------------------------------------------------------------------------- full weights by broadcast

FULL = ["model.lora.enabled=false", "trainer.checkpoint_every=2", "logging.video_every=0"]


def run_with_weight_status(cfg):
    """Train; then, before the workers go, ask each rollout worker how it got its weights."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
        status = ray.get(trainer.workers.rollout.run("weight_status"))
    finally:
        trainer.close()
    return strip(read_metrics(cfg.trainer.output_dir)), status


@pytest.fixture(scope="module")
def broadcast_run(root, shards, tmp_path_factory):
    """2 steps of full fine-tuning, weights broadcast from learner rank 0 (workers/weight_sync.py)."""
    out = tmp_path_factory.mktemp("broadcast")
    return run_with_weight_status(config(root, shards, out, *FULL, "workers.weight_sync=broadcast"))


def test_full_weights_by_broadcast_equal_object_store(root, shards, tmp_path, broadcast_run):
    records, status = broadcast_run
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # step 2 sampled with version 1, received by broadcast: recomputed log-probs are exact
        assert r["first_epoch_logprob_dev"] == 0.0 and r["ratio_mean"] == 1.0 and r["staleness_max"] == 0
    assert status == [{"version": 2, "epoch": 1, "fetched": []}]  # never needed the object-store copy
    by_store, store_status = run_with_weight_status(config(root, shards, tmp_path, *FULL,
                                                           "workers.weight_sync=object_store"))
    assert store_status == [{"version": 2, "epoch": None, "fetched": []}]
    assert records == by_store


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_zero3_ratio_is_exactly_one(root, shards, tmp_path, lora):
    """bf16 rollout and ZeRO-3 learner in separate processes compute the same log-probs: nothing in the learner
    (DeepSpeed's process-wide F.linear replacement, a cast) rounds differently from the rollout."""
    records = run(config(root, shards, tmp_path, f"model.lora.enabled={str(lora).lower()}", "model.dtype=bfloat16",
                         "workers.learner_engine.precision=bf16", "workers.learner_engine.zero_stage=3",
                         "trainer.checkpoint_every=2", "logging.video_every=0"))
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["first_epoch_logprob_dev"] == 0.0 and r["ratio_min"] == r["ratio_max"] == 1.0, r


def test_killed_rollout_worker_with_broadcast(root, shards, tmp_path, broadcast_run):
    records, status = run_with_weight_status(config(root, shards, tmp_path, *FULL, "workers.weight_sync=broadcast",
                                                    "faults.role=rollout", "faults.rank=0", "faults.step=2"))
    assert (tmp_path / "faults" / "rollout_0_step2.done").exists()  # the worker really died
    assert records == broadcast_run[0]
    # The restarted worker re-ran step 2 with version 1's recovery copy (the object store), then joined
    # a rebuilt group (epoch 2) for version 2's broadcast.
    assert status == [{"version": 2, "epoch": 2, "fetched": [1]}]


def test_killed_learner_rank_while_broadcasting(root, shards, tmp_path, broadcast_run):
    """A learner rank dies while broadcasting version 2: the learner group restarts from the
    step-1 checkpoint, the weight group is rebuilt for the new learner rank 0, and the run ends exactly
    as the clean broadcast run."""
    records, status = run_with_weight_status(config(root, shards, tmp_path, *FULL, "workers.weight_sync=broadcast",
                                                    "trainer.checkpoint_every=1", "faults.role=publish",
                                                    "faults.rank=1", "faults.step=2"))
    assert (tmp_path / "faults" / "publish_1_step2.done").exists()  # the rank really died
    assert records == broadcast_run[0]
    assert status == [{"version": 2, "epoch": 2, "fetched": []}]  # epoch 2: rebuilt after the restart


def test_failed_broadcast_is_retried_on_a_rebuilt_group(root, shards, tmp_path, caplog):
    trainer = Trainer(config(root, shards, tmp_path, *FULL, "workers.weight_sync=broadcast"))
    try:
        sync = trainer.weight_sync
        assert sync.epoch == 1  # built for the first publish (version 0)
        ray.kill(trainer.workers.rollout.actors[0], no_restart=False)  # Ray restarts it, in no group
        sync.ensure_group = lambda: None  # skip the membership check: the broadcast itself must fail
        recovery_copy = ray.get(sync.publish(1))
        status = ray.get(trainer.workers.rollout.run("weight_status"))
    finally:
        trainer.close()
    assert "broadcast of version 1 failed" in caplog.text  # the first attempt did fail
    assert sync.epoch == 2 and status == [{"version": 1, "epoch": 2, "fetched": []}]
    assert recovery_copy and all(isinstance(v, torch.Tensor) for v in recovery_copy.values())


def test_ema_is_saved_evaluated_and_resumed(root, shards, tmp_path):
    """optim.ema: every checkpoint holds the EMA beside the live weights; the EMA follows the official update
    (decay min((1 + n) / (10 + n), 0.9) every 2nd optimizer step here); the monitor runs on it; resume is exact."""
    from safetensors.torch import load_file

    ema = ["optim.ema.enabled=true", "optim.ema.update_interval=2", "trainer.keep_last=3"]
    monitor = ["logging.eval_every=3", f"data.eval_prompt_shards={shards}", "logging.eval_num_prompts=1"]
    out = tmp_path / "run"
    records = run(config(root, shards, out, "trainer.steps=3", *ema, *monitor))
    assert "heldout_face_mean" in records[2]

    def lora(step, kind):
        return load_file(out / "checkpoints" / f"step_{step:06d}" / kind / "pytorch_lora_weights.safetensors")

    for step in (1, 2, 3):
        assert (out / "checkpoints" / f"step_{step:06d}" / "learner" / "ema.pt").is_file()
    ema1, ema2, ema3, live1, live3 = lora(1, "lora_ema"), lora(2, "lora_ema"), lora(3, "lora_ema"), lora(1, "lora"), \
        lora(3, "lora")
    d3 = min(4 / 13, 0.9)  # optimizer steps 1 and 3 update ((n + 1) % 2 == 0); step 2 does not
    assert all(torch.equal(ema1[k], ema2[k]) for k in ema1)
    assert any(not torch.equal(ema1[k], live1[k]) for k in ema1)  # the EMA lags the live weights
    for k in ema3:
        torch.testing.assert_close(ema3[k], ema1[k] + (1 - d3) * (live3[k] - ema1[k]), rtol=1e-5, atol=1e-7)

    resumed = tmp_path / "resumed"
    run(config(root, shards, resumed, "trainer.steps=3", *ema, *monitor,
               f"trainer.resume={out / 'checkpoints' / 'step_000002'}"))
    again = load_file(resumed / "checkpoints" / "step_000003" / "lora_ema" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(again[k], ema3[k]) for k in ema3)
