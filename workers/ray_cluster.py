"""Attaching to the Ray cluster (or starting a local one sized for the config), and how worker actors restart."""

from __future__ import annotations

import os

import ray

from workers.group import POOLS

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
