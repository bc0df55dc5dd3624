"""Connecting to Ray and standing up the three worker groups the driver calls."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import ray

from config import to_yaml
from workers.group import POOLS, Placement, WorkerGroup, plan_placements, release
from workers.learner import LearnerWorker
from workers.reward_worker import RewardWorker
from workers.rollout import RolloutWorker

log = logging.getLogger(__name__)

# Rollout and reward actors come back after a crash and Ray re-runs the lost call with the same
# arguments (seed, policy version, weights ref), so the sample is identical. The learner does not:
# a collective group is gang-restarted by the driver instead.
RESTARTABLE = dict(max_restarts=3, max_task_retries=3)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "PYTHONUNBUFFERED": "1"}


def connect_ray(cfg) -> bool:
    """Attach to `workers.ray_address` (or $RAY_ADDRESS, as `ray job submit` sets); else start a local
    cluster sized for the config. Returns True when this call started Ray (and so should stop it)."""
    if ray.is_initialized():
        return False
    address = cfg.workers.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        # A `ray job submit` job already carries its runtime env (cluster_configs/runtime_env.yaml);
        # Ray refuses to merge a second one, so attach plainly: workers set their own threads.
        ray.init(address=address, log_to_driver=True)
        return True
    needed = _cpus_needed(cfg.workers)
    ray.init(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env,
             object_store_memory=512 * 1024 * 1024, log_to_driver=True)
    return True


def _cpus_needed(workers_cfg) -> int:
    if workers_cfg.colocate:
        slots = max(workers_cfg[p].num_workers for p in POOLS)
        return int(slots * max(workers_cfg[p].num_cpus_per_worker for p in POOLS) + 0.999)
    return int(sum(workers_cfg[p].num_workers * workers_cfg[p].num_cpus_per_worker for p in POOLS) + 0.999)


@dataclass
class Workers:
    rollout: WorkerGroup
    reward: WorkerGroup
    learner: WorkerGroup
    placements: Dict[str, Placement]

    def shutdown(self) -> None:
        try:
            ray.get(self.learner.run("shutdown"), timeout=30)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        for group in (self.rollout, self.reward, self.learner):
            group.kill()
        release(self.placements)


def build_workers(cfg) -> Workers:
    cfg_yaml = to_yaml(cfg)
    placements = plan_placements(cfg.workers, device_is_gpu=cfg.trainer.device.startswith("cuda"))
    return Workers(
        rollout=WorkerGroup("rollout", RolloutWorker, placements["rollout"], (cfg_yaml,), **RESTARTABLE),
        reward=WorkerGroup("reward", RewardWorker, placements["reward"], (cfg_yaml,), **RESTARTABLE),
        learner=WorkerGroup("learner", LearnerWorker, placements["learner"], (cfg_yaml,)),
        placements=placements,
    )


def start_learner(learner: WorkerGroup) -> int:
    """Rank 0 picks the rendezvous address; every rank joins and builds its DeepSpeed engine."""
    addr, port = ray.get(learner.run_rank(0, "rendezvous"))
    counts = ray.get(learner.run("setup", addr, port))
    return counts[0]


def restart_learner(learner: WorkerGroup) -> None:
    """Gang restart: fresh actors on the same bundles, a new rendezvous port, a new process group."""
    learner.respawn()
    start_learner(learner)


def split_groups(num_groups: int, world: int) -> List[List[int]]:
    """Contiguous, equal shares of prompt groups per learner rank."""
    per = num_groups // world
    return [list(range(r * per, (r + 1) * per)) for r in range(world)]


def pool_nodes(group: WorkerGroup) -> List[str]:
    return ray.get([actor.node_id.remote() for actor in group.actors])


def stop_ray(started: bool, workers: Optional[Workers]) -> None:
    if workers is not None:
        workers.shutdown()
    if started:
        ray.shutdown()
