"""The Slurm batch scripts, submitted with `sbatch` to a real one-node Slurm on localhost.

tests/slurm_cluster.py starts slurmctld + slurmd from Debian's packages (installing them when missing);
a machine that cannot (not root, no apt) skips with the reason. Each job starts its own Ray head with
per-job ports and temp dir, then the driver on the tiny CPU config.

Preemption is tested the way Slurm announces it: `scancel --batch --signal=USR1` is exactly what
`#SBATCH --signal=B:USR1@180` (time limit) or PreemptParameters=send_user_signal delivers. The script
forwards it to the driver, which checkpoints after its current step and exits 143; the script then
runs `scontrol requeue` on itself and the second run resumes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.slurm_cluster import SlurmCluster

# `slurm`: needs root and Debian's Slurm packages, and takes minutes; `make test-slurm` runs it (CI does).
pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "cluster_configs" / "slurm"
TINY = ["logging.progress_bar=false", "logging.tensorboard=false", "sampler.num_steps=2", "grpo.group_size=2"]


def cannot_run(reason: str):
    """A skip with the reason, or, where IDENTITY_GRPO_REQUIRE_SLURM=1 (CI: .ci/run sets it), a failure: CI must
    not pass `make test-slurm` by skipping every job."""
    if os.environ.get("IDENTITY_GRPO_REQUIRE_SLURM") == "1":
        pytest.fail(f"IDENTITY_GRPO_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        cannot_run("the CPU config needs 2 CPUs for its 2 learner ranks; this machine has 1")
    # Random first job id: job ids pick the Ray ports and temp dirs, so a concurrent run of this module
    # on the same machine (another Slurm test cluster) does not reuse ours.
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), first_job_id=random.randrange(1000, 10**6, 100) + 1)
    reason = cluster.unavailable()
    if reason:
        cannot_run(f"cannot run a local Slurm: {reason}")
    try:
        cluster.start()
    except Exception as err:  # installed but broken: a failure, not a skip
        cluster.stop()
        pytest.fail(f"local Slurm did not start: {err}\n{cluster.log_tail('slurmctld')}{cluster.log_tail('slurmd')}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    from data.demo import build_demo

    pattern, _ = build_demo(tmp_path_factory.mktemp("shards"), num_prompts=8, num_pairs=2)
    return pattern


@pytest.fixture
def jobs(slurm):
    """Job ids a test submits; afterwards none may be left running, nor any Ray process of theirs."""
    ids: List[int] = []
    yield ids
    slurm.cancel_all()
    for job in ids:
        for pid in ray_pids(job):  # only a broken script leaves these; kill exactly those
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for tmp in Path("/tmp").glob(f"ray_{job}_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def ray_pids(job: int) -> List[int]:
    """Processes whose command line names this job's Ray temp dir (/tmp/ray_<job>_<restart>)."""
    mark = f"/tmp/ray_{job}_".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def submit(slurm: SlurmCluster, jobs: List[int], script: str, log_dir: Path, env: Dict[str, str],
           sbatch_args=()) -> int:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "RAY_ADDRESS"}
    full_env.update(CONFIG="cluster_configs/local_cpu.yaml", PYTHON=sys.executable, RAY_AUTH_MODE="disabled",
                    RAY_OBJECT_STORE_BYTES=str(300 * 1024 * 1024), SLURM_CONF=str(slurm.conf), **env)
    args = ["-c", "2", "-o", str(log_dir / "job-%j.out"), *sbatch_args, str(SCRIPTS / script)]
    proc = slurm.run(["sbatch", "--parsable", *args], env=full_env, cwd=ROOT)
    job = int(proc.stdout.strip().split(";")[0])
    jobs.append(job)
    return job


def job_log(log_dir: Path, job: int) -> str:
    path = log_dir / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def metric_steps(out: Path) -> List[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_steps(slurm, job: int, out: Path, log_dir: Path, n: int, timeout: float = 300) -> None:
    """Poll until the running job has logged n steps; fail (with its log) if it stops or stalls."""
    deadline = time.monotonic() + timeout
    while len(metric_steps(out)) < n:
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{job_log(log_dir, job)[-6000:]}"
        assert time.monotonic() < deadline, f"no {n} steps within {timeout:.0f} s\n" + job_log(log_dir, job)[-6000:]
        time.sleep(0.5)


def ray_port(job: int) -> int:
    return 20000 + (job % 100) * 120  # the scripts' per-job port slot


def start_training(slurm, jobs, tmp_path, prompts, steps: int, checkpoint_every: int):
    """Submit train.sbatch on the tiny CPU config; returns (job id, the run's output dir)."""
    out = tmp_path / "run"
    args = [f"trainer.steps={steps}", f"trainer.output_dir={out}", f"data.prompt_shards={prompts}",
            f"trainer.checkpoint_every={checkpoint_every}", *TINY]
    return submit(slurm, jobs, "train.sbatch", tmp_path, {"ARGS": " ".join(args)}), out


def finished_after_one_requeue(slurm, job: int, log_dir: Path) -> str:
    """Wait for a job that was requeued once to complete; returns its log."""
    info = slurm.wait_done(job, timeout=420)
    log = job_log(log_dir, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-8000:]
    return log


def assert_every_step_once(job: int, out: Path, log: str, steps: int) -> None:
    """The run ended, each step logged exactly once (none lost, none twice), and the job's Ray is gone."""
    assert f"done: {steps} steps" in log
    assert metric_steps(out) == list(range(1, steps + 1))
    assert not ray_pids(job) and not list(Path("/tmp").glob(f"ray_{job}_*"))


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, prompts, jobs, tmp_path):
    steps = 10  # the signal comes once 2 steps are logged; 8 more (seconds each) leave it time to arrive
    # checkpoint_every > steps: the only checkpoint before the end is the one the signal makes.
    job, out = start_training(slurm, jobs, tmp_path, prompts, steps, checkpoint_every=1000)
    wait_for_steps(slurm, job, out, tmp_path, 2)
    done_at_signal = len(metric_steps(out))
    # What Slurm sends at --signal=B:USR1@<t> before the time limit, or on preemption with send_user_signal.
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])

    log = finished_after_one_requeue(slurm, job, tmp_path)
    assert "got USR1" in log and "will checkpoint after the current step" in log, log[-8000:]
    stopped = re.search(r"interrupted at step (\d+) of %d" % steps, log)
    assert stopped, log[-8000:]
    k = int(stopped.group(1))
    assert done_at_signal <= k < steps
    assert "driver exited with 143" in log and f"requeueing job {job}" in log
    assert "restart 1 on" in log and f"tmp=/tmp/ray_{job}_1" in log
    assert re.search(r"resumed from \S+step_%06d \(step %d," % (k, k), log), log[-8000:]
    assert_every_step_once(job, out, log, steps)
    # the job's own Ray (per-job port and temp dir, stopped by the script: assert_every_step_once) and its last
    # checkpoint, as a job that is never interrupted leaves them
    assert f"ray 127.0.0.1:{ray_port(job)}" in log and f"tmp=/tmp/ray_{job}_0" in log
    assert (out / "checkpoints" / "latest").read_text().strip().endswith(f"step_{steps:06d}")


def test_plain_scontrol_requeue_resumes_from_last_checkpoint(slurm, prompts, jobs, tmp_path):
    """`scontrol requeue` gives no warning (SIGTERM to every process of the job at once): the step in
    progress is lost, and the requeued job resumes from the last periodic checkpoint."""
    steps = 8
    job, out = start_training(slurm, jobs, tmp_path, prompts, steps, checkpoint_every=2)
    wait_for_steps(slurm, job, out, tmp_path, 3)
    slurm.run(["scontrol", "requeue", str(job)])

    log = finished_after_one_requeue(slurm, job, tmp_path)
    resumed = re.search(r"resumed from \S+step_(\d{6}) \(step (\d+),", log)
    assert resumed and int(resumed.group(2)) >= 2 and int(resumed.group(2)) % 2 == 0, log[-8000:]
    assert_every_step_once(job, out, log, steps)  # steps after the checkpoint were redone once


def test_multinode_script_roles_and_address(slurm, jobs, tmp_path):
    # One node here, so this checks the script's mechanics: Ray head through srun, the node's role
    # resources, the driver pointed at the head (--print-config: the resolved config, no training).
    # A real multi-node run needs a multi-node cluster.
    job = submit(slurm, jobs, "train_multinode.sbatch", tmp_path,
                 {"NODE_ROLES": "learner+rollout", "ARGS": "--print-config"}, sbatch_args=["--nodes=1"])
    info = slurm.wait_done(job, timeout=240)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    usage = log[log.index("Total Usage:"):]
    assert re.search(r"0\.0/1\.0 learner_node", usage) and re.search(r"0\.0/1\.0 rollout_node", usage), log[-4000:]
    assert re.search(r"ray_address: \S+:%d\b" % ray_port(job), log), log[-4000:]
    assert not ray_pids(job) and not list(Path("/tmp").glob(f"ray_{job}_*"))

    # A role list that does not match the node count stops before anything starts.
    bad = submit(slurm, jobs, "train_multinode.sbatch", tmp_path, {"NODE_ROLES": "learner reward"},
                 sbatch_args=["--nodes=1"])
    info = slurm.wait_done(bad, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert "NODE_ROLES has 2 words for 1 nodes" in job_log(tmp_path, bad)


def test_evaluation_script_spreads_prompts_over_workers(slurm, prompts, jobs, tmp_path):
    # evaluate.sbatch: launcher.evaluate on NUM_WORKERS Ray evaluation workers of a local cluster private to the job
    # (tests/test_evaluate_workers.py proves the files equal one process's); flags and overrides mixed in ARGS.
    out = tmp_path / "run"
    args = [f"trainer.output_dir={out}", "--checkpoint", "base", f"data.prompt_shards={prompts}", "--num-prompts",
            "3", "--seeds-per-prompt", "1", "--no-tensorboard", *TINY, "reward.face.num_frames=2"]
    job = submit(slurm, jobs, "evaluate.sbatch", tmp_path, {"NUM_WORKERS": "2", "ARGS": " ".join(args)})
    info = slurm.wait_done(job, timeout=240)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    summary = json.loads((out / "eval" / "base" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["num_prompts"] == 3, summary
    assert len((out / "eval" / "base" / "samples.jsonl").read_text().splitlines()) == 3
    assert "evaluation on 2 Ray worker(s)" in log and "evaluation exited with 0" in log, log[-4000:]
    assert not ray_pids(job) and not list(Path("/tmp").glob(f"ray_{job}_*"))
