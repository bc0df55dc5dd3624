"""Held-out evaluation and the teacher filter of the reward trainer (both score pairs, no gradients).

Evaluation: pairwise accuracy without ties (sign of r_a - r_b on decisive pairs) and with ties
(three-way, tie predicted when |r_a - r_b| <= tau(theta), see reward/losses.py), plus the mean
Rao-Kupper / Bradley-Terry NLL, pooled over ranks from exact counts.

Teacher filter (Identity-GRPO, Sec. 3.2): automatic pairs are labelled by model voting and are
noisy; a teacher reward model trained on human pairs scores each one, and a pair is kept iff the
teacher gives its label probability P_teacher(label) >= threshold under Rao-Kupper (P(A > B),
P(B > A) or P(tie)). The kept keys, every probability and the kept fraction are written to
`<output_dir>/teacher_filter.json`, so a resumed run reuses the same decision.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

import torch
import torch.distributed as dist

from reward.losses import label_indices, label_probability, pairwise_accuracy, preference_loss
from reward.vlm_data import pair_inputs


def _batches(samples: Iterable[Dict[str, Any]], size: int):
    batch: List[Dict[str, Any]] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def score_pairs(model, samples: Sequence[Dict[str, Any]]):
    """(r_a, r_b, labels) for a list of pair samples, A and B scored in one batch."""
    videos, refs, prompts, prefs = pair_inputs(samples)
    scores = model.score(videos, refs, prompts, batch_size=len(videos))
    n = len(samples)
    return scores[:n], scores[n:], label_indices(prefs)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def evaluate(model, samples: Iterable[Dict[str, Any]], theta: float, loss_kind: str,
             batch_size: int = 8, bt_ties: str = "half") -> Dict[str, float]:
    """Metrics over this rank's samples, summed over ranks (every rank gets the same dict)."""
    r_a, r_b, labels = [], [], []
    for batch in _batches(samples, batch_size):
        a, b, y = score_pairs(model, batch)
        r_a.append(a), r_b.append(b), labels.append(y)
    if r_a:
        a, b, y = torch.cat(r_a), torch.cat(r_b), torch.cat(labels)
        acc = pairwise_accuracy(a, b, y, theta)
        nll_sum = float(preference_loss(loss_kind, a, b, y, theta, bt_ties)) * len(y)
    else:
        acc = {"correct_without_ties": 0.0, "num_without_ties": 0, "correct_with_ties": 0.0, "num_pairs": 0,
               "tie_threshold": pairwise_accuracy(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                                  theta)["tie_threshold"]}
        nll_sum = 0.0
    totals = torch.tensor([acc["correct_without_ties"], acc["num_without_ties"], acc["correct_with_ties"],
                           acc["num_pairs"], nll_sum], dtype=torch.float64)
    if _world() > 1:
        dist.all_reduce(totals)
    c_nt, n_nt, c_t, n, nll = totals.tolist()
    nan = float("nan")
    return {"accuracy_without_ties": c_nt / n_nt if n_nt else nan, "accuracy_with_ties": c_t / n if n else nan,
            "loss": nll / n if n else nan, "num_pairs": int(n), "num_without_ties": int(n_nt),
            "tie_threshold": acc["tie_threshold"]}


def teacher_filter(model, samples: Iterable[Dict[str, Any]], threshold: float, theta: float,
                   batch_size: int = 8) -> Dict[str, Any]:
    """Score candidate pairs with the teacher and keep those with P(label) >= threshold (all ranks)."""
    local: List[List[Any]] = []
    for batch in _batches(samples, batch_size):
        a, b, y = score_pairs(model, batch)
        probs = label_probability(a, b, y, theta)
        local.extend([s["key"], s["label"]["source"], float(p)] for s, p in zip(batch, probs))
    if _world() > 1:
        gathered: List[Any] = [None] * _world()
        dist.all_gather_object(gathered, local)
        local = [row for part in gathered for row in part]
    local.sort(key=lambda row: row[0])
    kept = [key for key, _, p in local if p >= threshold]
    return {"threshold": threshold, "tie_theta": theta, "num_candidates": len(local), "num_kept": len(kept),
            "kept_fraction": len(kept) / len(local) if local else math.nan, "kept_keys": kept,
            "probabilities": {key: p for key, _, p in local}}


def write_json(path: Path, obj: Dict[str, Any]) -> None:
    """Atomic write (temporary name, then rename), so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True))
    tmp.replace(path)
