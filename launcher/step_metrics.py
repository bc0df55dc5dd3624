"""One training step's numbers: the learner ranks' statistics reduced to one set, the step's timings, and the
record the driver logs (metrics.jsonl, TensorBoard, the progress bar)."""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, List, Sequence

import torch

from policy.grpo import Advantages, advantage_stats


class StepTimer:
    """Seconds per named phase of one step (`with timer("learn_s"): ...`), and since the step began."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def reduce_learner_stats(per_rank: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The learner ranks' sums (workers/learner.py `update`) -> the step's means. GRPO: ratios and clip fraction are
    over trained elements only; a step with nothing trained logs ratio 1. NFT (no ratio): the velocity's mean
    squared deviation from the sampling policy's. Gradient norm and learning rate are rank 0's (equal on every rank
    after the all-reduce)."""
    summed = {k: sum(r[k] for r in per_rank) for k in per_rank[0]}
    micro, trained = max(1, summed["micro_steps"]), summed["num_trained"]
    stats = {k: summed[k] / micro for k in ("policy_loss", "kl", "loss")}
    stats.update(grad_norm=per_rank[0]["grad_norm"], lr=per_rank[0]["lr"])
    if "old_deviation" in summed:
        stats["old_deviation"] = summed["old_deviation"] / micro
        return stats
    low, high = min(r["ratio_min"] for r in per_rank), max(r["ratio_max"] for r in per_rank)
    stats.update(ratio_mean=summed["ratio_mean"] / trained if trained else 1.0,
                 clip_frac=summed["clip_frac"] / trained if trained else 0.0,
                 ratio_min=low if trained else 1.0, ratio_max=high if trained else 1.0,
                 first_epoch_logprob_dev=max(r["first_epoch_logprob_dev"] for r in per_rank))
    return stats


def _finite_mean(values: torch.Tensor) -> float:
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else float("nan")


def measured_rollout_nfe(scored: List[dict], passes_per_step: int) -> float:
    """Transformer passes per video of this step's rollouts, as sampled: the ODE solver's compression
    (policy/ode.py) makes the step count depend on where the SDE window is."""
    return passes_per_step * sum(s["rollout_steps"] for s in scored) / len(scored)


def step_record(*, step: int, scored: List[dict], advantages: Advantages, learner: Dict[str, float],
                staleness: Sequence[int], timer: StepTimer, policy_version: int, data_skipped: int,
                passes_per_step: int, learn_passes: int) -> Dict[str, float]:
    """The step's record: reward mean/std/failures and per component (failed scores are NaN and left out), the
    learner's statistics, advantages, staleness, each phase's seconds and the whole step's, data skips."""
    totals = torch.stack([s["scores"]["total"] for s in scored]).flatten()
    finite = totals[torch.isfinite(totals)]
    record = {
        "step": step, "reward_mean": _finite_mean(totals),
        "reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
        "reward_failed": int((~torch.isfinite(totals)).sum()), "policy_version": policy_version,
        "staleness_max": max(staleness), "rollout_s": max(s["rollout_s"] for s in scored),
        **timer.seconds, "step_s": timer.elapsed(), "data_skipped": data_skipped,
        "rollout_nfe": measured_rollout_nfe(scored, passes_per_step), "learn_passes": learn_passes,
    }
    for name in scored[0]["scores"]:
        if name != "total":
            record[f"reward_{name}"] = _finite_mean(torch.stack([s["scores"][name] for s in scored]).flatten())
    record.update(learner)
    record.update(advantage_stats(advantages))
    return record
