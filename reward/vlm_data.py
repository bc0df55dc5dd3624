"""Preference data for the reward trainer: label scan, held-out split, pools and the curriculum.

Pools (Identity-GRPO, Sec. 3.2): *human* pairs (label source "human") and *auto* pairs (sources
"auto" and "synthetic": generator comparisons labelled by model voting, and synthetic identity
distortions). Each training batch comes whole from one pool: from the auto pool with probability
w_t and from the human pool otherwise, where the cosine curriculum is
    w_t = w_end + (w_start - w_end) * 0.5 * (1 + cos(pi * min(t, T) / T))
(w_start = 1, w_end = 0 gives the paper's 0.5 (1 + cos(pi t / T)): auto pairs first, human
pairs last). The draw at step t uses its own generator seeded by (seed, t), so it needs no state
and a resumed run draws exactly what an uninterrupted one would. A pool without pairs is never drawn.

Each pool streams through its own `data.reader.ShardReader` (seeded shuffle, per-rank split,
resumable position) and keeps only its samples: right source, not held out, and (auto pool, teacher
filter on) kept by the teacher. The filter is a pure function of the sample, so the reader's
position alone is the pool's state. Cost: a pool decodes the other pool's samples from shared
shards before skipping them (video decode is the price of reusing the reader's exact resume).

Held-out split: a pair is held out iff sha1(seed:key) falls below the held-out fraction, so the
split depends on nothing but the key (stable across runs, shard orders and world sizes).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import numpy as np

from data.reader import DataError, ShardReader
from data.schema import LABEL, SampleError, check_label
from data.tarindex import expand_pattern, index_shard

HUMAN_SOURCES = ("human",)
AUTO_SOURCES = ("auto", "synthetic")


@dataclass(frozen=True)
class PairInfo:
    shard: str
    key: str
    source: str
    preference: str


def scan_labels(pattern: str) -> List[PairInfo]:
    """Read only the label.json of every sample (tar headers + a few bytes each, no video decode)."""
    out: List[PairInfo] = []
    for path in expand_pattern(pattern):
        index = index_shard(path)
        if index.error is not None:
            raise DataError(path, None, index.error)
        with open(path, "rb") as f:
            for ref in index.samples:
                if ref.error is not None or LABEL not in ref.members:
                    continue  # the reader raises or skips it by name (data.on_error) when it gets there
                offset, size = ref.members[LABEL]
                f.seek(offset)
                try:
                    label = check_label(json.loads(f.read(size)))
                except (ValueError, SampleError):
                    continue
                out.append(PairInfo(path, ref.key, label["source"], label["preference"]))
    return out


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    if fraction <= 0.0:
        return False
    h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16)
    return h / float(16 ** 12) < fraction


def auto_weight(step: int, schedule: str, start: float, end: float, total: int) -> float:
    """Curriculum weight of the auto pool at `step` (0-based) of a T=`total`-step schedule."""
    t = min(max(step, 0), total) / float(total)
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "constant":
        return start
    raise ValueError(f"curriculum.schedule: unknown schedule {schedule!r}")


def choose_pool(step: int, weight: float, seed: int, available: Dict[str, int]) -> str:
    """'auto' with probability `weight`, else 'human'; an empty pool is never chosen."""
    if not available.get("human"):
        return "auto"
    if not available.get("auto"):
        return "human"
    u = np.random.default_rng([seed, 0x5EED, step]).random()
    return "auto" if u < weight else "human"


class PoolStream:
    """The samples of one pool, from a ShardReader, in the reader's resumable order."""

    def __init__(self, name: str, reader: ShardReader, keep: Callable[[Dict[str, Any]], bool]):
        self.name, self.reader, self.keep = name, reader, keep
        self._it: Optional[Iterator[Dict[str, Any]]] = None

    def take(self, n: int) -> List[Dict[str, Any]]:
        """The next n samples of this pool; raises if a whole epoch passes without one."""
        out: List[Dict[str, Any]] = []
        if self._it is None:
            self._it = iter(self.reader)
        empty_since = None
        while len(out) < n:
            sample = next(self._it)
            if self.keep(sample):
                out.append(sample)
                empty_since = None
                continue
            epoch, _ = self.reader.position
            empty_since = epoch if empty_since is None else empty_since
            if epoch >= empty_since + 2:
                raise RuntimeError(f"pool '{self.name}' has no usable sample in {self.reader.shards[:3]}")
        return out

    def state_dict(self) -> Dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reader.load_state_dict(state)
        self._it = None  # the old iterator is stale after a restore


@dataclass
class DataPlan:
    """What the label scan found: the training pairs of each pool, held-out keys, counts by source."""

    pools: Dict[str, List[PairInfo]]
    held_out: Set[str]
    counts: Dict[str, int]

    def pool_sizes(self, auto_keep: Optional[Set[str]] = None, filtered_sources: Sequence[str] = ()) -> Dict[str, int]:
        auto = [p for p in self.pools["auto"]
                if auto_keep is None or p.source not in filtered_sources or p.key in auto_keep]
        return {"human": len(self.pools["human"]), "auto": len(auto)}


def plan_data(data_cfg) -> DataPlan:
    """Scan the labels of the training shards, split off the held-out keys, sort pairs into pools."""
    pairs = scan_labels(data_cfg.preference_shards)
    if not pairs:
        raise ValueError(f"data.preference_shards: no readable preference pair in {data_cfg.preference_shards!r}")
    fraction = 0.0 if data_cfg.eval_shards else float(data_cfg.held_out_fraction)
    held = {p.key for p in pairs if is_held_out(p.key, fraction, int(data_cfg.seed))}
    counts: Dict[str, int] = {}
    for p in pairs:
        counts[p.source] = counts.get(p.source, 0) + 1
    pools = {"human": [p for p in pairs if p.source in HUMAN_SOURCES and p.key not in held],
             "auto": [p for p in pairs if p.source in AUTO_SOURCES and p.key not in held]}
    if not pools["human"] and not pools["auto"]:
        raise ValueError("data: every training pair is held out; lower data.held_out_fraction")
    return DataPlan(pools, held, counts)


def make_reader(data_cfg, pattern: str, seed_offset: int, rank: int, world_size: int,
                epochs: Optional[int] = None, shuffle: bool = True) -> ShardReader:
    return ShardReader(pattern, kind="preference", rank=rank, world_size=world_size,
                       shuffle_buffer=int(data_cfg.shuffle_buffer), seed=int(data_cfg.seed) + seed_offset,
                       on_error=str(data_cfg.on_error), epochs=epochs,
                       num_workers=int(data_cfg.num_loader_workers), shuffle=shuffle)


def make_pools(data_cfg, plan: DataPlan, rank: int, world_size: int, auto_keep: Optional[Set[str]] = None,
               filtered_sources: Sequence[str] = (), human_only: bool = False) -> Dict[str, PoolStream]:
    """The non-empty pool streams (different seeds, so their orders are independent)."""
    held = plan.held_out

    def human(s):
        return s["label"]["source"] in HUMAN_SOURCES and s["key"] not in held

    def auto(s):
        if s["label"]["source"] not in AUTO_SOURCES or s["key"] in held:
            return False
        return auto_keep is None or s["label"]["source"] not in filtered_sources or s["key"] in auto_keep

    sizes = plan.pool_sizes(auto_keep, filtered_sources)
    if human_only:
        if not sizes["human"]:
            raise ValueError("teacher: the training shards hold no human pair to train the teacher on")
        sizes["auto"] = 0
    pools = {}
    for i, (name, keep) in enumerate((("human", human), ("auto", auto))):
        if sizes[name]:
            reader = make_reader(data_cfg, data_cfg.preference_shards, 1000 * (i + 1), rank, world_size)
            pools[name] = PoolStream(name, reader, keep)
    if not pools:
        raise ValueError("data: no training pair left (the teacher filter rejected every auto pair?)")
    return pools


def candidate_samples(data_cfg, plan: DataPlan, sources: Sequence[str], rank: int, world_size: int):
    """One pass over this rank's share of the training pairs whose source is in `sources`."""
    reader = make_reader(data_cfg, data_cfg.preference_shards, 0, rank, world_size, epochs=1, shuffle=False)
    return (s for s in reader if s["label"]["source"] in sources and s["key"] not in plan.held_out)


def eval_samples(data_cfg, plan: DataPlan, rank: int, world_size: int) -> Iterator[Dict[str, Any]]:
    """One pass over this rank's share of the held-out pairs (fixed order)."""
    sources = set(data_cfg.eval_sources)
    if data_cfg.eval_shards:
        reader = make_reader(data_cfg, data_cfg.eval_shards, 0, rank, world_size, epochs=1, shuffle=False)
        return (s for s in reader if s["label"]["source"] in sources)
    reader = make_reader(data_cfg, data_cfg.preference_shards, 0, rank, world_size, epochs=1, shuffle=False)
    return (s for s in reader if s["key"] in plan.held_out and s["label"]["source"] in sources)


def pair_inputs(samples: Sequence[Dict[str, Any]]):
    """(videos, references, prompts) for one forward over A then B of every pair, and the labels."""
    videos = [s["video_a"] for s in samples] + [s["video_b"] for s in samples]
    refs = [s["refs"] for s in samples] * 2
    prompts = [s["prompt"] for s in samples] * 2
    return videos, refs, prompts, [s["label"]["preference"] for s in samples]
