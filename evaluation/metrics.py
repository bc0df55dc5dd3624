"""Evaluation metrics: per-sample identity scores, per-policy summaries, paired policy comparison.

Why these metrics (DESIGN.md section 4, issue 9):
- `vlm`: the learned identity reward model's score, when one is configured (`reward.vlm.path` set or
  'vlm' in `reward.weights`). It is what the paper reports, but it is also what GRPO optimises, so it
  can be gamed; the face metrics below are the independent check.
- `face_mean` / `face_min`: cosine similarity of each reference person's face to their Hungarian-
  matched face in the video (reward/face.py), averaged over sampled frames, then mean / min over the
  people. The min catches a fine-tuned model that renders one person well and drifts the other.
- `face_found_frac`: fraction of sampled frames in which a face was matched to *every* person (at
  least as many faces as people). A missing person scores `reward.face.missing_penalty`, so a drop
  here explains a drop in similarity.
- `reward_total`, `reward_<name>`: the composite reward exactly as training computes it.
A metric that fails for a sample (e.g. no face in a reference photo) is NaN there (`null` in JSON)
and counted in the summary as `failed`, never averaged in as a zero.

Comparison of two policies runs on the same prompts and seeds, so samples are paired: the delta of a
metric is the mean of per-sample differences, and its confidence interval comes from a bootstrap
that resamples *prompts* (all seeds of a prompt together: they share references and are not
independent). Win rate: P(candidate > baseline) per pair, ties counted half, with the same bootstrap.
Everything is seeded, so the same inputs give the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

SCALAR_METRICS = ("vlm", "face_mean", "face_min", "face_found_frac")  # then reward_total, reward_<name>
WIN_RATE_METRICS = ("vlm", "face_mean", "reward_total")
NUM_RESAMPLES = 1000
CONFIDENCE = 0.95
log = logging.getLogger(__name__)


def vlm_configured(reward_cfg) -> bool:
    """The identity reward model is scored when a checkpoint is given or training uses it by name."""
    v = reward_cfg.vlm
    return "vlm" in reward_cfg.weights or v.path is not None or (v.init == "random" and v.arch is not None)


def trained_components(reward_cfg) -> List[str]:
    """The reward components training optimises (non-zero weight), in `reward.weights` order."""
    return [name for name, weight in reward_cfg.weights.items() if float(weight) != 0]


def _digest(video, references) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for array in [video, *references]:
        a = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


class EvalScorer:
    """Scores videos with every evaluation metric; built once per process (face and VLM models load once).

    The composite reward gets the face and VLM models as prebuilt components, so each video's faces
    are detected once (the composite's `face` score and the face metrics share one FaceScore, found by
    content hash) and the VLM is loaded once.
    """

    def __init__(self, reward_cfg, device: Optional[str] = None):
        from reward.composite import CompositeReward
        from reward.face import FaceIdentityReward

        self.face = FaceIdentityReward.from_config(reward_cfg.face)
        self.vlm = None
        prebuilt = {"face": self._face_reward}
        if vlm_configured(reward_cfg):
            from reward.vlm import reward_model_from_config

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.vlm = reward_model_from_config(reward_cfg.vlm).to(device)
            prebuilt["vlm"] = self.vlm.score
        self.composite = CompositeReward.from_config(reward_cfg, prebuilt=prebuilt)
        self.component_names = list(self.composite.components)
        self.trained_names = trained_components(reward_cfg)
        self._memo: Dict[bytes, object] = {}

    def _face_score(self, video, references):
        """FaceScore of one video (memoised by content for the current `score` call), or the exception."""
        key = _digest(video, references)
        if key not in self._memo:
            try:
                self._memo[key] = self.face.score_video(video, references)
            except Exception as err:  # kept: the composite counts it, the metrics turn it into NaN
                self._memo[key] = err
        return self._memo[key]

    def _face_reward(self, videos, references, prompts=None) -> torch.Tensor:
        out = []
        for video, refs in zip(videos, references, strict=True):
            result = self._face_score(video, refs)
            if isinstance(result, Exception):
                raise result
            out.append(result.score)
        return torch.tensor(out, dtype=torch.float64)

    def score(self, videos: Sequence, references: Sequence[Sequence], prompts: Sequence[str]) -> List[dict]:
        """One dict per video: vlm (if configured), face_*, reward_total, reward_<name>; NaN = failed."""
        self._memo = {}
        rewards = self.composite.score(videos, references, prompts)
        vlm = rewards.get("vlm")
        if vlm is None and self.vlm is not None:  # configured by path only: scored here, not in the composite
            try:
                vlm = self.vlm.score(videos, references, prompts).double()
            except Exception as err:  # one failed batch must not lose the other metrics
                log.warning("identity reward model failed on this batch (%s: %s); vlm = NaN", type(err).__name__, err)
                vlm = torch.full((len(videos),), math.nan, dtype=torch.float64)
        out = []
        for i, (video, refs) in enumerate(zip(videos, references, strict=True)):
            row = {"vlm": None if vlm is None else float(vlm[i])}
            face = self._face_score(video, refs)
            if isinstance(face, Exception):
                row.update(face_mean=math.nan, face_min=math.nan, face_found_frac=math.nan, face_per_identity=None,
                           face_error=f"{type(face).__name__}: {face}")
            else:
                row.update(face_mean=float(face.per_identity.mean()), face_min=float(face.per_identity.min()),
                           face_found_frac=float(face.found_frac),
                           face_per_identity=[float(x) for x in face.per_identity])
            row["reward_total"] = float(rewards["total"][i])
            row.update({f"reward_{name}": float(rewards[name][i]) for name in self.component_names})
            if row["vlm"] is None:
                del row["vlm"]
            out.append(row)
        self._memo = {}
        return out


# ----------------------------------------------------------------------------- summaries


def metric_names(records: Sequence[Mapping]) -> List[str]:
    """The scalar metrics present in the records, in report order."""
    present = set().union(*(r.keys() for r in records)) if records else set()
    rewards = sorted(k for k in present if k.startswith("reward_") and k != "reward_total")
    return [k for k in (*SCALAR_METRICS, "reward_total", *rewards) if k in present]


def _values(records: Sequence[Mapping], name: str) -> np.ndarray:
    return np.array([np.nan if r.get(name) is None else float(r[name]) for r in records], dtype=np.float64)


def summarize_records(records: Sequence[Mapping]) -> dict:
    """Per metric mean/std/n/failed over samples, by number of people, and per identity id."""
    metrics = {}
    for name in metric_names(records):
        v = _values(records, name)
        ok = v[np.isfinite(v)]
        metrics[name] = {"mean": float(ok.mean()) if ok.size else None,
                         "std": float(ok.std()) if ok.size else None, "n": int(ok.size),
                         "failed": int(v.size - ok.size)}
    by_people: Dict[str, dict] = {}
    for n in sorted({int(r["num_people"]) for r in records}):
        subset = [r for r in records if int(r["num_people"]) == n]
        by_people[str(n)] = {"samples": len(subset), **{
            name: _nanmean(_values(subset, name)) for name in ("vlm", "face_mean", "face_min", "face_found_frac")
            if name in metrics}}
    per_identity: Dict[str, List[float]] = {}
    for r in records:
        for ident, sim in zip(r["identity_ids"], r.get("face_per_identity") or [], strict=False):
            per_identity.setdefault(ident, []).append(sim)
    identities = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "n": len(v)}
                  for k, v in sorted(per_identity.items())}
    return {"samples": len(records), "metrics": metrics, "by_num_people": by_people, "per_identity": identities}


def _nanmean(v: np.ndarray) -> Optional[float]:
    ok = v[np.isfinite(v)]
    return float(ok.mean()) if ok.size else None


# ----------------------------------------------------------------------------- paired comparison


def bootstrap_ci(values: Sequence[float], clusters: Optional[Sequence] = None, num_resamples: int = NUM_RESAMPLES,
                 confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, resampling whole clusters (e.g. prompts).

    A resample draws as many clusters as there are, with replacement, and takes the mean over all
    their values (a cluster counts by its size). Seeded: the same inputs give the same interval.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    labels = np.arange(v.size) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    sums = np.bincount(labels, weights=v)
    counts = np.bincount(labels).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, sums.size, size=(num_resamples, sums.size))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class SeedInterval:
    """Mean of one number over seeds with its Student-t interval: mean +- t_{(1+c)/2, n-1} s / sqrt(n), s the
    sample standard deviation (ddof 1). The runs' randomness only (initialisation, data order, sampling): the
    test set is the same in every run, so its own sampling error is not in it. n = 1: no interval (nan)."""

    n: int
    mean: float
    std: float
    half_width: float
    low: float
    high: float
    confidence: float


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedInterval:
    """SeedInterval of `values` (one per seed); NaN values are an error: a failed run is not a sample."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"seed_interval: need finite values, one per seed, got {v.tolist()}")
    mean = float(v.mean())
    if v.size == 1:
        return SeedInterval(1, mean, math.nan, math.nan, math.nan, math.nan, confidence)
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * std / math.sqrt(v.size))
    return SeedInterval(int(v.size), mean, std, half, mean - half, mean + half, confidence)


def binomial_half_width(accuracy: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Normal-approximation half-width of an accuracy measured on n independent test items: the test set's own
    sampling error, which a seed interval over one fixed test set leaves out."""
    from scipy import stats

    return float(stats.norm.ppf((1 + confidence) / 2) * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)) \
        if n > 0 else math.nan


def win_indicators(candidate: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """1 where the candidate scores higher, 0 where lower, 0.5 on a tie (per pair)."""
    a, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def win_rate(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of pairs the candidate wins, ties counting half; NaN pairs are dropped."""
    a, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return float(win_indicators(a[ok], b[ok]).mean()) if ok.any() else math.nan


@dataclass
class Comparison:
    candidate: str
    baseline: str
    pairs: int
    deltas: Dict[str, dict] = field(default_factory=dict)
    win_rates: Dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "baseline": self.baseline, "pairs": self.pairs,
                "confidence": CONFIDENCE, "num_resamples": NUM_RESAMPLES, "deltas": self.deltas,
                "win_rates": self.win_rates}


def pair_records(candidate: Sequence[Mapping], baseline: Sequence[Mapping]) -> List[tuple]:
    """(candidate, baseline) records of the same prompt key and seed; a mismatch in the sets is an error."""
    index = {(r["key"], r["seed"]): r for r in baseline}
    mine = {(r["key"], r["seed"]) for r in candidate}
    if mine != set(index):
        only = sorted(mine ^ set(index))[:3]
        raise ValueError(f"compare: the two evaluations differ in prompts/seeds (e.g. {only}); "
                         "both must use the same prompt shards, --num-prompts and --seeds-per-prompt")
    return [(r, index[(r["key"], r["seed"])]) for r in candidate]


def compare_records(candidate: Sequence[Mapping], baseline: Sequence[Mapping], candidate_tag: str = "candidate",
                    baseline_tag: str = "baseline", seed: int = 0) -> Comparison:
    """Paired deltas (candidate - baseline) with cluster-bootstrap CIs, and win rates, per metric."""
    pairs = pair_records(candidate, baseline)
    out = Comparison(candidate_tag, baseline_tag, len(pairs))
    keys = np.array([a["key"] for a, _ in pairs])
    names = [n for n in metric_names([a for a, _ in pairs]) if n in metric_names([b for _, b in pairs])]
    for name in names:
        a, b = _values([p[0] for p in pairs], name), _values([p[1] for p in pairs], name)
        ok = np.isfinite(a) & np.isfinite(b)
        d = a[ok] - b[ok]
        lo, hi = bootstrap_ci(d, keys[ok], seed=seed)
        out.deltas[name] = {"candidate": _nanmean(a), "baseline": _nanmean(b),
                            "delta": float(d.mean()) if d.size else None, "ci_low": _finite(lo),
                            "ci_high": _finite(hi), "n": int(ok.sum()),
                            "significant": bool(d.size and (lo > 0 or hi < 0))}
        if name in WIN_RATE_METRICS:
            w = win_indicators(a[ok], b[ok])
            lo, hi = bootstrap_ci(w, keys[ok], seed=seed)
            out.win_rates[name] = {"win_rate": float(w.mean()) if w.size else None, "ci_low": _finite(lo),
                                   "ci_high": _finite(hi), "wins": int((w == 1).sum()),
                                   "ties": int((w == 0.5).sum()), "losses": int((w == 0).sum())}
    return out


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None
