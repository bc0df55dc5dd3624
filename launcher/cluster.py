"""Connecting to Ray and standing up the three worker groups the driver calls."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import ray

from config import to_yaml
from config.checks import context_degree, data_parallel_size
from workers.group import Placement, WorkerGroup, plan_placements, release, warn_split_across_nodes
from workers.learner import LearnerWorker
from workers.ray_cluster import RESTARTABLE
from workers.reward_worker import RewardWorker
from workers.rollout import rollout_group

log = logging.getLogger(__name__)

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
    workers = Workers(
        rollout=rollout_group("rollout", placements["rollout"], cfg),
        reward=WorkerGroup("reward", RewardWorker, placements["reward"], (cfg_yaml,), **RESTARTABLE),
        learner=WorkerGroup("learner", LearnerWorker, placements["learner"], (cfg_yaml,)),
        placements=placements,
    )
    if context_degree(cfg) > 1:  # the learner's context groups: consecutive ranks (a respawn keeps the bundles)
        warn_split_across_nodes(workers.learner, context_degree(cfg))
    return workers


def start_learner(learner: WorkerGroup) -> int:
    """Rank 0 picks the rendezvous address; every rank joins and builds its DeepSpeed engine. The ranks' answers are
    taken as they come, so a rank that dies raises at once (RayActorError) while the others still wait for it in
    the rendezvous, instead of the driver waiting on them forever; the caller gang-restarts the group."""
    addr, port = ray.get(learner.run_rank(0, "rendezvous"))
    refs = learner.run("setup", addr, port)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])
    return ray.get(refs[0])


def restart_learner(learner: WorkerGroup) -> None:
    """Gang restart: fresh actors on the same bundles, a new rendezvous port, a new process group."""
    learner.respawn()
    start_learner(learner)


def restart_rollouts(rollout: WorkerGroup) -> None:
    """Gang restart of the rollout workers: fresh actors on the same bundles, context groups formed anew."""
    rollout.respawn()
    rollout.join_context_groups()


def rollout_gang_failure(workers: Workers, err: Exception) -> bool:
    """Whether `err` is a context-parallel rollout worker's failure: one of its actors died (RayActorError) or its
    call failed (a peer died mid-collective). Ray restarts single-actor rollout workers itself."""
    return workers.rollout.actors_per_call > 1 and "RolloutWorker" in str(err)


def split_groups(num_groups: int, world: int) -> List[List[int]]:
    """Contiguous, equal shares of prompt groups per learner rank."""
    per = num_groups // world
    return [list(range(r * per, (r + 1) * per)) for r in range(world)]


def learner_shares(num_groups: int, cfg) -> List[List[int]]:
    """The prompt groups of each learner rank: equal shares per data-parallel rank, the same share for every rank of
    a context group (`model.context_parallel`: consecutive ranks split each video between them)."""
    degree = context_degree(cfg)
    return [ids for ids in split_groups(num_groups, data_parallel_size(cfg)) for _ in range(degree)]


def context_leaders(per_rank: List, cfg) -> List:
    """The answers of each context group's first rank: its other ranks trained on the same share and say the same."""
    return per_rank[::context_degree(cfg)]


def pool_nodes(group: WorkerGroup) -> List[str]:
    return group.nodes()


def stop_ray(started: bool, workers: Optional[Workers]) -> None:
    if workers is not None:
        workers.shutdown()
    if started:
        ray.shutdown()
