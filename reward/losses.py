"""Pairwise preference losses for the identity reward model: Bradley-Terry, with and without ties.

Notation: r_a, r_b are the model's scalar scores of videos A and B, d = r_a - r_b, theta > 1 the
tie parameter (5 in Identity-GRPO, arXiv 2510.14256, Sec. 3).

Bradley-Terry (Bradley & Terry 1952):
    P(A > B) = e^ra / (e^ra + e^rb) = sigmoid(d)
    log P(A > B) = -softplus(-d)

Bradley-Terry with ties, Rao-Kupper form (Rao & Kupper 1967, "Ties in paired-comparison
experiments: a generalization of the Bradley-Terry model", JASA 62(317)):
    P(A > B) = e^ra / (e^ra + theta e^rb)                 = 1 / (1 + theta e^-d)
    P(B > A) = e^rb / (e^rb + theta e^ra)                 = 1 / (1 + theta e^d)
    P(A = B) = (theta^2 - 1) e^ra e^rb / ((e^ra + theta e^rb)(theta e^ra + e^rb))
             = (theta^2 - 1) / ((1 + theta e^-d)(1 + theta e^d))
(divide numerator and denominator by e^ra e^rb). The three add up to 1: over the common
denominator the numerators sum to 1 + theta e^d + 1 + theta e^-d + theta^2 - 1, which is the
denominator. In log space, with l = log theta:
    log P(A > B) = -softplus(l - d)
    log P(B > A) = -softplus(l + d)
    log P(A = B) = log(theta - 1) + log(theta + 1) - softplus(l - d) - softplus(l + d)
softplus is evaluated stably for any |d| and its gradient is a sigmoid, so losses and gradients stay
finite for arbitrarily large score gaps (a naive e^ra overflows at ra ~ 89 in float32).

Labels: 0 = A preferred ("a"), 1 = B preferred ("b"), 2 = tie ("tie"); `label_indices` maps the
shard schema's strings (data/schema.py PREFERENCES) to these.

Predicting ties (for accuracy with ties): the prediction is the argmax of the three Rao-Kupper
probabilities. P(tie) >= P(A > B) iff theta^2 - 1 >= 1 + theta e^d iff d <= log((theta^2 - 2) / theta),
and symmetrically for B, so a tie is predicted exactly when |d| <= tau(theta) = log((theta^2 - 2)/theta).
tau is positive only for theta > 2 (theta = 5: tau = log 4.6 = 1.526); for 1 < theta <= 2 a tie is
never the most likely outcome and tau = 0 (a tie is then predicted only for d == 0 exactly).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

LABELS = ("a", "b", "tie")
A_WINS, B_WINS, TIE = 0, 1, 2


def label_indices(preferences: Sequence[str], device=None) -> torch.Tensor:
    """Map 'a' | 'b' | 'tie' strings to 0 | 1 | 2 (an unknown label is an error naming it)."""
    out = []
    for i, p in enumerate(preferences):
        if p not in LABELS:
            raise ValueError(f"preference label #{i} is {p!r}; expected one of {list(LABELS)}")
        out.append(LABELS.index(p))
    return torch.tensor(out, dtype=torch.long, device=device)


def _check_theta(theta: float) -> float:
    theta = float(theta)
    if not theta > 1.0 or not math.isfinite(theta):
        raise ValueError(f"tie_theta must be a finite number > 1 (Rao-Kupper), got {theta}")
    return theta


def _check_pair(r_a: torch.Tensor, r_b: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
    if r_a.shape != r_b.shape or r_a.ndim != 1:
        raise ValueError(f"r_a and r_b must be 1-D of the same shape, got {tuple(r_a.shape)} and {tuple(r_b.shape)}")
    if labels is not None:
        if labels.shape != r_a.shape:
            raise ValueError(f"labels must have shape {tuple(r_a.shape)}, got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > 2):
            raise ValueError("labels must be 0 (a), 1 (b) or 2 (tie)")


# ----------------------------------------------------------------------------- log-probabilities


def bt_log_probs(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """(N, 2) log [P(A > B), P(B > A)] under Bradley-Terry."""
    _check_pair(r_a, r_b)
    d = r_a - r_b
    return torch.stack([-F.softplus(-d), -F.softplus(d)], dim=-1)


def rao_kupper_log_probs(r_a: torch.Tensor, r_b: torch.Tensor, theta: float = 5.0) -> torch.Tensor:
    """(N, 3) log [P(A > B), P(B > A), P(A = B)] under Rao-Kupper (see the module docstring)."""
    _check_pair(r_a, r_b)
    theta = _check_theta(theta)
    d = r_a - r_b
    log_theta = math.log(theta)
    lp_a = -F.softplus(log_theta - d)
    lp_b = -F.softplus(log_theta + d)
    lp_tie = math.log(theta - 1.0) + math.log(theta + 1.0) + lp_a + lp_b
    return torch.stack([lp_a, lp_b, lp_tie], dim=-1)


# ----------------------------------------------------------------------------- losses (mean NLL)


BT_TIES = ("half", "ignore")


def bradley_terry_loss(r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor, ties: str = "half") -> torch.Tensor:
    """Mean negative log-likelihood of the labels under Bradley-Terry.

    Plain Bradley-Terry has no tie outcome, so a tie label needs a rule (`ties`):
    - "half": the soft target (1/2, 1/2) over the two wins, whose NLL is minimised at d = 0: ties pull the
      two scores together;
    - "ignore": zero loss, still counted in the mean (VideoAlign's `loss_type="bt"`: the loss times the
      non-tied mask, then `.mean()` over all pairs): ties carry no signal.
    The official Identity-GRPO reward model uses neither: `loss_type="btt"`, Rao-Kupper with theta 5
    (`rao_kupper_loss`, this project's default).
    """
    _check_pair(r_a, r_b, labels)
    if ties not in BT_TIES:
        raise ValueError(f"unknown tie rule {ties!r} for bradley_terry; expected one of {BT_TIES}")
    lp = bt_log_probs(r_a, r_b)
    nll_a, nll_b = -lp[:, 0], -lp[:, 1]
    tie_nll = 0.5 * (nll_a + nll_b) if ties == "half" else torch.zeros_like(nll_a)
    nll = torch.where(labels == A_WINS, nll_a, torch.where(labels == B_WINS, nll_b, tie_nll))
    return nll.mean()


def rao_kupper_loss(r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor,
                    theta: float = 5.0) -> torch.Tensor:
    """Mean negative log-likelihood of the labels (0 a, 1 b, 2 tie) under Bradley-Terry with ties."""
    _check_pair(r_a, r_b, labels)
    lp = rao_kupper_log_probs(r_a, r_b, theta)
    return -lp.gather(1, labels.view(-1, 1)).squeeze(1).mean()


def preference_loss(kind: str, r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor,
                    theta: float = 5.0, bt_ties: str = "half") -> torch.Tensor:
    """Dispatch by name: 'rao_kupper' (ties) or 'bradley_terry' (ties by `bt_ties`)."""
    if kind == "rao_kupper":
        return rao_kupper_loss(r_a, r_b, labels, theta)
    if kind == "bradley_terry":
        return bradley_terry_loss(r_a, r_b, labels, bt_ties)
    raise ValueError(f"unknown loss {kind!r}; expected 'rao_kupper' or 'bradley_terry'")


def label_probability(r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor, theta: float = 5.0) -> torch.Tensor:
    """P(observed label) under Rao-Kupper, per pair (what the teacher filter thresholds)."""
    _check_pair(r_a, r_b, labels)
    return rao_kupper_log_probs(r_a, r_b, theta).gather(1, labels.view(-1, 1)).squeeze(1).exp()


# ----------------------------------------------------------------------------- accuracy


def tie_threshold(theta: float) -> float:
    """tau(theta) = log((theta^2 - 2) / theta) for theta > 2, else 0: predict a tie iff |d| <= tau."""
    theta = _check_theta(theta)
    return math.log((theta * theta - 2.0) / theta) if theta > 2.0 else 0.0


def predict(r_a: torch.Tensor, r_b: torch.Tensor, threshold: float) -> torch.Tensor:
    """0 (A), 1 (B) or 2 (tie, when |r_a - r_b| <= threshold) per pair."""
    _check_pair(r_a, r_b)
    d = (r_a - r_b).detach()
    pred = torch.where(d > 0, A_WINS, B_WINS)
    return torch.where(d.abs() <= threshold, TIE, pred)


def pairwise_accuracy(r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor,
                      theta: float = 5.0, threshold: Optional[float] = None) -> Dict[str, float]:
    """Accuracy without ties (over non-tie pairs: sign of d; d == 0 counts as half right) and with
    ties (three-way, over all pairs, tie predicted when |d| <= threshold, tau(theta) by default).

    Returns counts too, so that accuracies from several ranks or batches can be pooled exactly.
    """
    _check_pair(r_a, r_b, labels)
    threshold = tie_threshold(theta) if threshold is None else float(threshold)
    d = (r_a - r_b).detach().double()
    decisive = labels != TIE
    sign_right = torch.where(d == 0, 0.5, ((d > 0) == (labels == A_WINS)).double())
    correct_nt = float(sign_right[decisive].sum())
    correct_t = float((predict(r_a, r_b, threshold) == labels).sum())
    n_nt, n = int(decisive.sum()), int(labels.numel())
    return {
        "accuracy_without_ties": correct_nt / n_nt if n_nt else float("nan"),
        "accuracy_with_ties": correct_t / n if n else float("nan"),
        "correct_without_ties": correct_nt, "num_without_ties": n_nt,
        "correct_with_ties": correct_t, "num_pairs": n, "tie_threshold": threshold,
    }
