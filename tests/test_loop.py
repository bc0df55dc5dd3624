"""The distributed GRPO loop on CPU: real Ray (one local cluster for the module), real DeepSpeed (2 learner ranks).

Each run starts its own worker processes (imports and engines: most of a run's time), so each run here proves
as much as it can: one reference run, and the runs compared with it. What each proves:

    straight       4 steps, checkpoint and held-out monitor every 2: ratio exactly 1, checkpoint contents; the
                   reference of the fault, async and resume runs below (and of the random kills at its end)
    kills in turn  a learner rank dies in the update, then while publishing, then a rollout and a reward worker
                   die: the same metrics as straight
    checkpoint     the driver dies mid-commit of step 4; the rerun resumes from step 2's checkpoint in the same
                   directory (not a restart) and ends as straight
    window         a moving SDE window, CFG-free, context-parallel (each video over 2 processes), in bf16 on ZeRO-3
                   LoRA (ratio exactly 1); resumed from its step-2 checkpoint into a new directory, the same steps 3, 4
    context        context parallelism in float32: step 1 equal to straight's, step 2 within 1e-3, through a dead
                   rollout actor (the rollout workers gang-restarted)
    async          staleness bounded by 1; with bound 0, the same metrics as straight
    broadcast      full fine-tuning in bf16 on ZeRO-3, weights broadcast: equal to the object-store run; a dead
                   rollout worker and a dead publishing learner rank in one run; a failed broadcast retried
    EMA            saved, evaluated and resumed exactly
"""

import json
import subprocess
import sys

import pytest
import ray
import torch

from config import load_config
from launcher.train import Trainer
from launcher.train import run as train_run
from runtime.checkpoint import CheckpointManager
from runtime.metrics import read_metrics

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
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def overrides(shards, out, *extra):
    return [f"data.prompt_shards={shards}", f"trainer.output_dir={out}", "trainer.steps=2",
            "trainer.checkpoint_every=1", "logging.progress_bar=false", "logging.video_every=2",
            "sampler.num_steps=3", "grpo.group_size=3", *extra]


def straight_overrides(shards, out, *extra):
    """The reference: 4 steps, checkpoint and held-out monitor every 2."""
    return overrides(shards, out, "trainer.steps=4", "trainer.checkpoint_every=2", "logging.eval_every=2",
                     f"data.eval_prompt_shards={shards}", "logging.eval_num_prompts=1", *extra)


def config(root, shards, out, *extra):
    return load_config(root / "cluster_configs" / "local_cpu.yaml", overrides(shards, out, *extra))


def straight_config(root, shards, out, *extra):
    return load_config(root / "cluster_configs" / "local_cpu.yaml", straight_overrides(shards, out, *extra))


def train_command(args):
    """The driver as its own process (`python -m launcher.train`), on the local CPU preset."""
    return [sys.executable, "-m", "launcher.train", "--config", "cluster_configs/local_cpu.yaml", *args]


def run(cfg):
    train_run(cfg)
    return read_metrics(cfg.trainer.output_dir)


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_exact_ratio(records):
    for r in records:  # fresh rollouts, recomputed on the rollout's shapes: the ratio is exactly 1
        assert r["first_epoch_logprob_dev"] == 0.0 and r["ratio_mean"] == 1.0, r
        assert r["ratio_min"] == r["ratio_max"] == 1.0, r  # reduced by min/max over micro-steps, not summed


@pytest.fixture(scope="module")
def straight(root, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, strip(run(straight_config(root, shards, out)))


@pytest.mark.faults  # runs with the kills it is the reference of, and takes its run's time there, not a seed's test
def test_straight_run(straight):
    out, records = straight
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert ["heldout_face_mean" in r for r in records] == [False, True, False, True]  # the monitor ran
    assert_exact_ratio(records)
    assert all(r["staleness_max"] == 0 and r["policy_version"] == r["step"] for r in records)
    ckpt = CheckpointManager(out).latest()
    assert ckpt.name == "step_000004" and (CheckpointManager(out).root / "step_000002").is_dir()
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (ckpt / "config.yaml").is_file() and (ckpt / "driver.pt").is_file()
    assert any((ckpt / "learner").rglob("*optim_states.pt"))
    assert list((out / "tb").glob("events.*"))


# A learner rank dies while the group starts (a gang restart before step 1), learner restarts next (each rolls the
# run back to step 2's checkpoint and replays step 3), then Ray's restarts of a rollout and a reward worker at step
# 4, which no rollback replays: each recovery shows in the metrics.
KILLS_IN_TURN = ["learner:1:0", "learner:1:3", "publish:1:3", "rollout:0:4", "reward:0:4"]


def test_killed_workers_in_turn_give_the_same_metrics(root, shards, tmp_path, straight):
    records = strip(run(straight_config(root, shards, tmp_path, f"faults.kills=[{','.join(KILLS_IN_TURN)}]")))
    for kill in KILLS_IN_TURN:
        role, rank, step = kill.split(":")
        assert (tmp_path / "faults" / f"{role}_{rank}_step{step}.done").exists(), kill  # it really died
    assert records == straight[1]


def test_kill_during_checkpoint_write_keeps_previous_and_resumes_exactly(root, shards, tmp_path, straight, ray_cluster):
    """The driver (its own process, on this module's cluster) dies while committing step 4's checkpoint: step 2's
    stays the latest, the half-written one is never renamed; the rerun resumes from step 2, not from the start."""
    args = straight_overrides(shards, tmp_path, f"workers.ray_address={ray_cluster}", "faults.kills=[checkpoint:0:4]")
    proc = subprocess.run(train_command(args), cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and (tmp_path / "faults" / "checkpoint_0_step4.done").exists(), proc.stderr[-3000:]
    manager = CheckpointManager(tmp_path)
    assert manager.latest().name == "step_000002"
    assert list(manager.root.glob("step_000004.tmp-*"))  # the half-written one, never renamed
    before = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2, 3, 4]
    records = run(straight_config(root, shards, tmp_path))
    assert strip(records) == straight[1]
    # resumed, not restarted: steps 1-2 are the first process's records, timings and all (a run that started over
    # would have written them anew)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[:2] == before[:2]
    assert manager.latest().name == "step_000004" and not list(manager.root.glob("*.tmp-*"))


# Context parallelism (policy/context_parallel.py): each video split over 2 processes by Ulysses attention, in the
# rollout (one worker of 2 actors) and the learner (its 2 ranks one context group).
CONTEXT_PARALLEL = ["model.context_parallel.ulysses=2", "workers.rollout.num_workers=2"]
# What step 1 computes after the gradient's all-reduce, whose order context parallelism changes.
STEP_1_ROUNDED = {"grad_norm", "heldout_reward_demo_reference_color", "heldout_reward_total", "heldout_vlm",
                  "heldout_face_mean", "heldout_face_std"}


WINDOW = ["trainer.steps=4", "trainer.checkpoint_every=2", "grpo.timestep_fraction=1.0", "sampler.sde_window.size=1",
          "sampler.sde_window.shift_every=1", "sampler.sde_window.roll_back=true", "model.dtype=bfloat16",
          "workers.learner_engine.precision=bf16", "workers.learner_engine.zero_stage=3", "logging.video_every=0",
          "sampler.guidance_scale=1", "sampler.ode_solver=dpm2m", "sampler.ode_steps_ratio=0.5",
          *CONTEXT_PARALLEL]


def test_moving_sde_window_in_bf16_zero3_context_parallel_trains_its_steps_and_resumes_exactly(root, shards, tmp_path,
                                                                                              straight):
    """A one-step SDE window moving every step (MixGRPO, policy/window.py), CFG-free (guidance 1: one transformer
    pass per step, rollout and learner), DPM-Solver++(2M) on half the ODE steps outside it (MixGRPO-Flash,
    policy/ode.py): the learner trains the window's step only (a third of the full run's passes here), in bf16 on
    a ZeRO-3 LoRA learner with log-probs recomputed exactly (nothing in the learner, e.g. DeepSpeed's process-wide
    F.linear, rounds otherwise than the rollout), each video split over two processes in rollout and learner alike
    (context parallelism: in bf16 the split changes the matmuls' shapes, so only the same split on both sides is
    exact); resumed from step 2's checkpoint into a new directory, the run sees the same windows and ends the same."""
    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    whole = strip(run(config(root, shards, whole_dir, *WINDOW)))
    assert_exact_ratio(whole)
    assert straight[1][0]["rollout_nfe"] == 2 * 3  # the 3 grid steps, two passes each with CFG
    # measured, one pass per visited step: windows at steps 0, 1, 2, 0 (rolling back) with the ODE stretches
    # beside them halved (rounded up): [0, 1, 3], [0, 1, 2, 3], [0, 2, 3], [0, 1, 3]
    assert [r["rollout_nfe"] for r in whole] == [2, 3, 2, 2]
    assert whole[0]["learn_passes"] * 3 == trained_passes(root, shards, tmp_path)
    resumed = strip(run(config(root, shards, resumed_dir, *WINDOW,
                               f"trainer.resume={whole_dir / 'checkpoints' / 'step_000002'}")))
    assert [r["step"] for r in resumed] == [3, 4]  # resumed at 2: a run that started over would log steps 1-4
    assert resumed == whole[2:]


def test_context_parallel_rollout_and_learner_equal_the_run_without(root, shards, tmp_path, straight):
    """Each video split over 2 processes (Ulysses attention, policy/context_parallel.py) in the rollout (one worker
    of 2 actors) and the learner (its 2 ranks one context group, so both prompt groups on each), in float32: the
    forward is bit-equal to one process's, so step 1's videos, rewards, advantages and (exactly 1) ratios are the
    straight run's; the gradient is summed over the group in another order, so what follows is equal within the
    tolerance (measured at step 2: 4e-5 relative in the advantages, 1.6e-4 in the held-out VLM score). The rollout
    worker's second actor dies at step 2, mid-collective for the first: the rollout workers are gang-restarted and,
    with no checkpoint yet, the learner too; the run starts over and ends the same."""
    records = strip(run(straight_config(root, shards, tmp_path, "trainer.steps=2", *CONTEXT_PARALLEL,
                                        "faults.kills=[rollout:1:2]")))
    assert (tmp_path / "faults" / "rollout_1_step2.done").is_file()  # it died, and the run recovered
    assert_exact_ratio(records)
    expected = straight[1][:2]
    assert {k: v for k, v in records[0].items() if k not in STEP_1_ROUNDED} == \
        {k: v for k, v in expected[0].items() if k not in STEP_1_ROUNDED}
    assert [sorted(r) for r in records] == [sorted(r) for r in expected]
    for got, want in zip(records, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-9), (got["step"], key)


def trained_passes(root, shards, tmp_path):
    """learn_passes of the same config without a window (every one of the 3 steps trained), CFG-free."""
    from workers.update_plan import transformer_passes

    return transformer_passes(config(root, shards, tmp_path, "grpo.timestep_fraction=1.0",
                                     "sampler.guidance_scale=1"))["learn_passes"]


def test_async_staleness_bound(root, shards, tmp_path, straight):
    records = run(config(root, shards, tmp_path / "a1", "trainer.steps=3", "trainer.mode=async",
                         "trainer.max_staleness=1"))
    assert [r["staleness_max"] for r in records] == [0, 1, 1]
    same = strip(run(straight_config(root, shards, tmp_path / "a0", "trainer.mode=async", "trainer.max_staleness=0")))
    assert same == straight[1]


# ----------------------------------------------------------------------------- full weights by broadcast

FULL = ["model.lora.enabled=false", "model.dtype=bfloat16", "workers.learner_engine.precision=bf16",
        "workers.learner_engine.zero_stage=3", "trainer.checkpoint_every=2", "logging.video_every=0"]


def run_with_weight_status(cfg, then=None):
    """Train; then, before the workers go, ask each rollout worker how it got its weights (and run `then`)."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
        status = ray.get(trainer.workers.rollout.run("weight_status"))
        after = then(trainer) if then else None
    finally:
        trainer.close()
    return strip(read_metrics(cfg.trainer.output_dir)), status, after


def fail_a_broadcast(trainer):
    """A rollout worker Ray restarts (in no weight group) makes the next broadcast fail: it is retried once, on a
    rebuilt group, and the workers get the version; returns (warnings logged, sync epoch, status, recovery copy)."""
    import logging

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("workers.weight_sync").addHandler(handler)
    sync = trainer.weight_sync
    try:
        ray.kill(trainer.workers.rollout.actors[0], no_restart=False)
        sync.ensure_group = lambda: None  # skip the membership check: the broadcast itself must fail
        recovery_copy = ray.get(sync.publish(3))
    finally:
        logging.getLogger("workers.weight_sync").removeHandler(handler)
    return warnings, sync.epoch, ray.get(trainer.workers.rollout.run("weight_status")), recovery_copy


@pytest.fixture(scope="module")
def broadcast_run(root, shards, tmp_path_factory):
    """2 steps of full fine-tuning in bf16 on ZeRO-3, weights broadcast from learner rank 0 (workers/weight_sync.py);
    then a failed broadcast."""
    out = tmp_path_factory.mktemp("broadcast")
    return run_with_weight_status(config(root, shards, out, *FULL, "workers.weight_sync=broadcast"), fail_a_broadcast)


def test_full_weights_by_broadcast_equal_object_store(root, shards, tmp_path, broadcast_run):
    records, status, _ = broadcast_run
    assert [r["step"] for r in records] == [1, 2]
    assert_exact_ratio(records)  # step 2 sampled with version 1, received by broadcast: recomputed exactly
    assert all(r["staleness_max"] == 0 for r in records)
    assert status == [{"version": 2, "epoch": 1, "fetched": []}]  # never needed the object-store copy
    by_store, store_status, _ = run_with_weight_status(config(root, shards, tmp_path, *FULL,
                                                              "workers.weight_sync=object_store"))
    assert store_status == [{"version": 2, "epoch": None, "fetched": []}]
    assert records == by_store


def test_failed_broadcast_is_retried_on_a_rebuilt_group(broadcast_run):
    warnings, epoch, status, recovery_copy = broadcast_run[2]
    assert any("broadcast of version 3 failed" in w for w in warnings), warnings  # the first attempt did fail
    assert epoch == 2 and status == [{"version": 3, "epoch": 2, "fetched": []}]  # the retry's group, the version
    assert recovery_copy and all(isinstance(v, torch.Tensor) for v in recovery_copy.values())


def test_killed_rollout_then_publishing_learner_with_broadcast(root, shards, tmp_path, broadcast_run):
    """Step 2: the rollout worker dies (Ray restarts it; it re-runs step 2 with version 1's recovery copy from the
    object store), then a learner rank dies while broadcasting version 2 (the learner group restarts from step 1's
    checkpoint and the weight group is rebuilt for the new learner rank 0): the run ends as the clean one."""
    records, status, _ = run_with_weight_status(config(root, shards, tmp_path, *FULL, "workers.weight_sync=broadcast",
                                                       "trainer.checkpoint_every=1",
                                                       "faults.kills=[rollout:0:2,publish:1:2]"))
    for marker in ("rollout_0_step2", "publish_1_step2"):
        assert (tmp_path / "faults" / f"{marker}.done").exists(), marker  # it really died
    assert records == broadcast_run[0]
    assert status == [{"version": 2, "epoch": 3, "fetched": [1]}]


# ----------------------------------------------------------------------------- EMA


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
    assert [r["step"] for r in read_metrics(resumed)] == [3]  # resumed at 2, not started over
    again = load_file(resumed / "checkpoints" / "step_000003" / "lora_ema" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(again[k], ema3[k]) for k in ema3)


# ----------------------------------------------------------------------------- kills from outside (`make test-faults`)

# Processes killed from outside (SIGKILL, found by what they are doing: tests/process_killer.py) at moments drawn
# from a seed (random_kills): a worker of a random role, a node (rollout, reward and learner processes at once), the
# driver (the same command run again resumes) and a random role while that rerun starts and resumes from the
# checkpoint. Each seed's schedule is printed with the test's output. These seeds' kills reach, between them, the
# phases the `faults` hooks do not (checked below): the held-out monitor (a restarted worker must fetch the current
# version, not monitor with its initial weights), a checkpoint's write, a reward worker scoring, a learner rank idle
# between two calls, and a rank loading the checkpoint.
RANDOM_KILL_SEEDS = [3, 22, 65]
RANDOM_KILLS_REACH = {"ray::RolloutWorker.held_out", "ray::LearnerWorker.save", "ray::RewardWorker.score",
                      "ray::LearnerWorker", "ray::LearnerWorker.load"}


def test_the_random_kill_seeds_reach_every_phase(tmp_path):
    from tests.process_killer import random_kills

    reached = {kill.title for seed in RANDOM_KILL_SEEDS for kill in random_kills(seed, tmp_path, 4, 2)}
    assert RANDOM_KILLS_REACH <= reached, RANDOM_KILLS_REACH - reached


@pytest.mark.faults
@pytest.mark.parametrize("seed", RANDOM_KILL_SEEDS)
def test_random_kills_of_every_role_and_the_driver_give_same_metrics(root, shards, tmp_path, straight, ray_cluster,
                                                                    seed):
    import psutil

    from tests.process_killer import ProcessKiller, random_kills

    kills = random_kills(seed, tmp_path / "metrics.jsonl", steps=4, checkpoint_every=2)
    print(f"seed {seed}:", *kills, sep="\n  ")
    command = train_command(straight_overrides(shards, tmp_path, f"workers.ray_address={ray_cluster}"))
    exits, logs = [], []
    with ProcessKiller(kills) as killer:
        while not exits or exits[-1] != 0 and len(exits) < 3:  # the driver killed once: the same command again
            log = tmp_path / f"driver_{len(exits)}.log"
            with open(log, "w") as out:
                driver = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT)
                killer.driver_pid = driver.pid
                exits.append(driver.wait(timeout=600))
            logs.append(log.read_text()[-3000:])
    assert exits == [-9, 0], (exits, logs)
    for kill in kills:
        assert kill.killed_at is not None, f"seed {seed}: never happened: {kill} (title entered {kill.seen}x)"
        for pid in kill.killed_pids:  # gone, or a zombie its parent has not reaped yet
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, (kill, pid)
    assert strip(read_metrics(tmp_path)) == straight[1]


@pytest.mark.faults
def test_learner_restarts_are_bounded(root, shards, tmp_path):
    """A learner that keeps dying (out of memory, a bad node) stops the run, naming the key, instead of looping."""
    with pytest.raises(RuntimeError, match=r"more than 'trainer.max_learner_restarts' \(0\)"):
        run(config(root, shards, tmp_path, "trainer.steps=1", "trainer.max_learner_restarts=0", "sampler.num_steps=2",
                   "faults.kills=[learner:0:1]"))
    assert (tmp_path / "faults" / "learner_0_step1.done").exists()
