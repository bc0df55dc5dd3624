"""Cluster launch paths, for real: `ray job submit` to a loopback head, and pools pinned to nodes."""

import re
import subprocess
import sys

import pytest
import ray

from config import load_config
from runtime.metrics import read_metrics
from tests.ray_nodes import LocalRayCluster, ray_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.demo import build_demo

    prompts, _ = build_demo(tmp_path_factory.mktemp("demo_data"), num_prompts=4, num_pairs=2, samples_per_shard=4)
    return prompts


def test_ray_job_submit_runs_a_step(root, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = LocalRayCluster(port=6481, dashboard_port=8481).start_head(num_cpus=4)
    out = tmp_path / "run"
    try:
        entry = [sys.executable, "-m", "launcher.train", "--config", "cluster_configs/local_cpu.yaml",
                 f"data.prompt_shards={shards}", f"trainer.output_dir={out}", "trainer.steps=1",
                 "logging.progress_bar=false", "sampler.num_steps=2", "grpo.group_size=2"]
        # launcher.submit (what `make submit` runs) waits for the fresh head's job agent, bounded, then
        # follows the job's log; its exit status is the job's
        submit = subprocess.run(
            [sys.executable, "-m", "launcher.submit", "--address", "http://127.0.0.1:8481", "--agent-timeout-s",
             "240", "--", *entry], cwd=root, env=ray_env(), capture_output=True, text=True, timeout=700)
        assert submit.returncode == 0, submit.stderr[-3000:] + submit.stdout[-3000:]
        assert re.search(r"submit: job raysubmit_\w+ SUCCEEDED", submit.stdout), submit.stdout[-3000:]
        assert [r["step"] for r in read_metrics(out)] == [1]
        assert (out / "checkpoints" / "step_000001" / "lora").is_dir()
    finally:
        cluster.stop()
    assert not cluster.processes()  # only what this test started is gone, and all of it


def test_pools_land_on_the_nodes_the_config_names(root, shards, tmp_path):
    from launcher.cluster import build_workers, pool_nodes

    cluster = LocalRayCluster(port=6482).start_head(
        num_cpus=4, resources={"rollout_node": 1, "learner_node": 1})
    cluster.add_node(num_cpus=2, resources={"reward_node": 1})
    workers = None
    try:
        ray.init(address=cluster.address)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", [
            f"data.prompt_shards={shards}", f"trainer.output_dir={tmp_path / 'run'}", "workers.colocate=false",
            "workers.rollout.node_resource=rollout_node", "workers.reward.node_resource=reward_node",
            "workers.learner.node_resource=learner_node"])
        workers = build_workers(cfg)
        reward_nodes = pool_nodes(workers.reward)
        assert all("reward_node" in nodes[n] for n in reward_nodes)
        for pool in (workers.rollout, workers.learner):
            assert all("rollout_node" in nodes[n] and "reward_node" not in nodes[n] for n in pool_nodes(pool))
    finally:
        if workers is not None:
            workers.shutdown()
        ray.shutdown()
        cluster.stop()


def test_colocated_preset_puts_one_of_each_role_on_every_gpu(root):
    """cluster_configs/vace_1.3b_8gpu_colocated.yaml on a (fake) 8-GPU node: rollout i, reward i and learner rank i
    share GPU i, each with 0.3 of it, and the 24 actors fit the node's 8 bundles."""
    from tests.gpu_probe import GpuProbe  # a light module: 24 worker processes import it
    from workers.group import POOLS, WorkerGroup, plan_placements, release

    cfg = load_config(root / "cluster_configs" / "vace_1.3b_8gpu_colocated.yaml")
    ray.init(num_cpus=64, num_gpus=8, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    placements = None
    try:
        placements = plan_placements(cfg.workers, device_is_gpu=True, timeout_s=60)
        assert len({id(p.group) for p in placements.values()}) == 1  # one placement group for all roles
        assert placements["learner"].group.bundle_specs == [{"CPU": 8.0, "GPU": 1.0}] * 8
        assert all(placements[pool].num_gpus == pytest.approx(0.3) for pool in POOLS)
        groups = {pool: WorkerGroup(pool, GpuProbe, placements[pool]) for pool in POOLS}  # all 24 alive at once
        gpus = {pool: dict(ray.get(group.run("gpu"), timeout=300)) for pool, group in groups.items()}
        assert all(len(ids) == 1 for pool in POOLS for ids in gpus[pool].values())
        assert sorted(ids[0] for ids in gpus["learner"].values()) == list(range(8))  # one learner rank per GPU
        for rank in range(8):
            assert gpus["rollout"][rank] == gpus["reward"][rank] == gpus["learner"][rank], (rank, gpus)
    finally:
        release(placements)
        ray.shutdown()
