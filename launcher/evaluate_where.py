"""Where `launcher.evaluate` samples and scores: in its own process, or on Ray evaluation workers.

Both are an `evaluate(spec, prompts, seeds, keep_videos, video_dir) -> (records, kept)` with the contract of
evaluation/held_out.py `evaluate_policy` (records in prompt order, the first `keep_videos` prompts' videos kept
for the report's grid, every video written as mp4 under `video_dir` when given), built by `evaluator(cfg, n)`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from evaluation.held_out import write_videos
from evaluation.policies import PolicySpec, read_lora

log = logging.getLogger("identity_grpo.evaluate")
IN_FLIGHT_PER_WORKER = 2  # prompts queued per worker: keeps each busy while bounding the videos held at once
Evaluate = Callable[[PolicySpec, Sequence[dict], Sequence[int], int, Optional[Path]], tuple]


@contextlib.contextmanager
def evaluator(cfg, num_workers: int) -> Iterator[Evaluate]:
    """`num_workers` 0: this process; else that many Ray workers (each `workers.rollout`'s GPUs and CPUs)."""
    if num_workers == 0:
        yield _in_process(cfg)
    else:
        with _on_workers(cfg, num_workers) as evaluate:
            yield evaluate


def _in_process(cfg) -> Evaluate:
    from evaluation.held_out import evaluate_policy
    from evaluation.metrics import EvalScorer
    from evaluation.policies import build_eval_policy, policy_weights
    from runtime.cpu_bf16 import bf16_matmuls_in_fp32

    policy, scorer = build_eval_policy(cfg), EvalScorer(cfg.reward)

    def evaluate(spec, prompts, seeds, keep_videos, video_dir):
        with bf16_matmuls_in_fp32(cfg.trainer.device, cfg.model.dtype), policy_weights(policy, spec):
            return evaluate_policy(policy, cfg, prompts, seeds, scorer, spec.tag, keep_videos, video_dir)

    return evaluate


@contextlib.contextmanager
def _on_workers(cfg, num_workers: int) -> Iterator[Evaluate]:
    import ray
    from omegaconf import OmegaConf

    from config import to_yaml
    from workers.eval_worker import EvalWorker
    from workers.group import WorkerGroup, plan_pool, release
    from workers.ray_cluster import RESTARTABLE, connect_ray

    rollout = cfg.workers.rollout
    # The rollout's per-worker resources, without its node_resource: evaluation runs on whatever node has them.
    pool = OmegaConf.create({"eval": {"num_workers": num_workers, "num_cpus_per_worker": rollout.num_cpus_per_worker,
                                      "num_gpus_per_worker": rollout.num_gpus_per_worker, "node_resource": None}})
    started = connect_ray(cfg)
    placement = group = None
    try:
        placement = plan_pool(pool, "eval", device_is_gpu=cfg.trainer.device.startswith("cuda"))
        group = WorkerGroup("eval", EvalWorker, placement, (to_yaml(cfg),), **RESTARTABLE)
        log.info("evaluation on %d Ray worker(s), %s GPU(s) and %s CPU(s) each", num_workers,
                 placement.num_gpus, placement.num_cpus)

        def evaluate(spec, prompts, seeds, keep_videos, video_dir):
            # A box around the ref: each worker fetches the LoRA once (and again after Ray restarts it).
            lora_box = [ray.put(read_lora(spec.lora_file) if spec.lora_file is not None else None)]
            records: List[dict] = []
            kept = {}

            def submit(actor, indexed):
                i, sample = indexed
                return actor.evaluate_prompt.remote(spec, lora_box, i, sample, list(seeds), i < keep_videos,
                                                    video_dir is not None)

            for (_, sample), (rows, videos, mp4s) in group.map_ordered(enumerate(prompts), submit,
                                                                         IN_FLIGHT_PER_WORKER):
                records.extend(rows)
                if videos is not None:
                    kept[sample["key"]] = videos
                if mp4s is not None:
                    write_videos(video_dir, sample["key"], mp4s)
            return records, kept

        yield evaluate
    finally:
        if group is not None:
            group.kill()
        if placement is not None:
            release({"eval": placement})
        if started:
            ray.shutdown()
