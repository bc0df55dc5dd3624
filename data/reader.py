"""Streaming, resumable reader of prompt and preference shards.

Deterministic design (why resume is exact):
1. Epoch e's *global order* is a pure function of (seed, e, the shards' headers): the shard list
   is permuted with a numpy Generator seeded by (seed, e); the samples of the shards, in that
   order, pass through a shuffle buffer driven by the same Generator. The buffer holds only
   `SampleRef`s (where a sample's members lie in its tar), never decoded media, so it costs nothing
   to make it large and nothing to replay it.
2. Rank r of R takes the elements j of the global order with j % R == r (disjoint, covering
   everything, sizes within one of each other). Its *position* is (epoch, number of its elements
   of that epoch already consumed).
3. Loader worker w of W takes the rank's elements g (counted from where this iteration started)
   with g % W == w; torch's DataLoader returns worker outputs round-robin, so the main process
   sees exactly the rank's order whatever W is. Bad samples travel as markers, so they keep their
   slot in that round-robin and the main process does the raising, skipping, counting and logging.
4. `state_dict()` is (epoch, position, skip count) plus the settings the order depends on. A
   restored reader recomputes the order from tar headers (seeks, 512 bytes per member) and skips
   `position` elements without reading or decoding any sample, so it yields exactly what the
   uninterrupted reader would have yielded next. The number of loader workers may change between
   save and restore; the seed, shuffle settings, world size, rank and shard list may not.

Trade-off: every rank and worker scans the headers of all shards each epoch (cheap next to video
decode; see bench/data_throughput.py) and shards must be local, seekable files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from config import ExpectedError
from data.schema import CANDIDATE, KINDS, LABEL, META, PROMPT, SampleError, check_records, decode_members
from data.tarindex import SampleRef, expand_pattern, index_shard, read_members

RECORD_MEMBERS = (PROMPT, META, LABEL, CANDIDATE)  # what require_intact reads of each sample: text and JSON

logger = logging.getLogger(__name__)
STATE_VERSION = 1


class DataError(ExpectedError, RuntimeError):
    """A sample (or a whole shard) cannot be read; names the shard, the key and the field at fault."""

    def __init__(self, shard: str, key: str | None, reason: str, field: str | None = None):
        where = f"shard '{shard}'" + (f", key '{key}'" if key else " (whole shard)")
        super().__init__(f"{where}: " + (f"{field}: " if field else "") + reason)
        self.shard, self.key, self.reason, self.field = shard, key, reason, field


def require_intact(cfg, kinds: Mapping[str, str], on_error: str) -> None:
    """With `data.on_error=raise`, a damaged shard stops a run before anything starts: the shards of each config key
    in `kinds` (key -> sample kind) are scanned, headers and each sample's text and JSON members (its label, its meta:
    data/schema.py check_records; no image or video decoded), and the first damaged sample or shard is a DataError
    naming the shard, key and field. With `skip`, the reader counts and logs those samples instead."""
    from omegaconf import OmegaConf

    if on_error != "raise":
        return
    for key, kind in kinds.items():
        pattern = OmegaConf.select(cfg, key)
        for path in expand_pattern(pattern) if pattern is not None else []:
            index = index_shard(path)
            if index.error:
                raise DataError(path, None, f"{index.error} ({key})")
            with open(path, "rb") as shard:  # one open per shard, not per sample
                for ref in index.samples:
                    if ref.error:
                        raise DataError(path, ref.key, f"{ref.error} ({key})")
                    members: dict = dict.fromkeys(ref.members, b"")
                    try:
                        members.update(read_members(ref, RECORD_MEMBERS, shard))
                        check_records(kind, members)
                    except OSError as err:
                        raise DataError(path, ref.key, f"{err} ({key})") from None
                    except SampleError as err:
                        raise DataError(path, ref.key, f"{err.reason} ({key})", field=err.field) from None


@dataclass(frozen=True)
class _Spec:
    """Everything the order depends on; small and picklable (it is sent to loader workers)."""

    paths: tuple[str, ...]
    kind: str
    rank: int
    world_size: int
    shuffle: bool
    shuffle_buffer: int
    seed: int
    epochs: int | None


def epoch_order(spec: _Spec, epoch: int) -> Iterator[SampleRef]:
    """The global order of epoch `epoch` (all ranks), as SampleRefs; unreadable shards appear once."""
    rng = np.random.default_rng([spec.seed, epoch])
    order = rng.permutation(len(spec.paths)) if spec.shuffle else np.arange(len(spec.paths))

    def source() -> Iterator[SampleRef]:
        for i in order:
            index = index_shard(spec.paths[int(i)])
            if index.error is not None:
                yield SampleRef(index.path, "", error=index.error)
            yield from index.samples

    if not spec.shuffle or spec.shuffle_buffer <= 1:
        yield from source()
        return
    buf: list[SampleRef] = []
    for ref in source():
        if len(buf) < spec.shuffle_buffer:
            buf.append(ref)
            continue
        k = int(rng.integers(len(buf)))
        yield buf[k]
        buf[k] = ref
    for k in rng.permutation(len(buf)):
        yield buf[int(k)]


def rank_positions(spec: _Spec, start_epoch: int, start_pos: int) -> Iterator[tuple[int, int, SampleRef]]:
    """(epoch, position, ref) of this rank's elements from the given position on, over epochs."""
    epoch = start_epoch
    while spec.epochs is None or epoch < spec.epochs:
        total = mine = 0
        for j, ref in enumerate(epoch_order(spec, epoch)):
            total = j + 1
            if j % spec.world_size != spec.rank:
                continue
            if epoch > start_epoch or mine >= start_pos:
                yield epoch, mine, ref
            mine += 1
        if mine == 0:
            raise ValueError(f"rank {spec.rank} of {spec.world_size} gets no sample in epoch {epoch}: "
                             f"the {len(spec.paths)} shard(s) hold {total} sample(s)")
        epoch += 1


def load_sample(kind: str, ref: SampleRef) -> dict[str, Any]:
    """Read and decode one sample; any failure becomes a DataError naming shard, key and field."""
    if ref.error is not None:
        raise DataError(ref.shard, ref.key or None, ref.error)
    try:
        members = read_members(ref)
    except OSError as err:
        raise DataError(ref.shard, ref.key, str(err)) from None
    try:
        decoded = decode_members(kind, members)
    except SampleError as err:
        raise DataError(ref.shard, ref.key, err.reason, field=err.field) from None
    return {"key": ref.key, "shard": ref.shard, **decoded}


def _stream(spec: _Spec, start_epoch: int, start_pos: int, worker: int, num_workers: int):
    """Tagged items (epoch, position, sample or None, error args or None) of one worker's share."""
    for g, (epoch, pos, ref) in enumerate(rank_positions(spec, start_epoch, start_pos)):
        if g % num_workers != worker:
            continue
        try:
            yield epoch, pos, load_sample(spec.kind, ref), None
        except DataError as err:
            yield epoch, pos, None, (err.shard, err.key, err.reason, err.field)


class _WorkerStream(IterableDataset):
    """What each DataLoader worker runs: its round-robin share of the rank's stream."""

    def __init__(self, spec: _Spec, start_epoch: int, start_pos: int):
        self.spec, self.start_epoch, self.start_pos = spec, start_epoch, start_pos

    def __iter__(self):
        info = get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        return _stream(self.spec, self.start_epoch, self.start_pos, worker, num)


def _identity(x):
    return x  # collate_fn: keep numpy arrays as they are (the default would turn them into tensors)


class ShardReader(IterableDataset):
    """Iterable over decoded samples of prompt or preference shards; resumable with state_dict().

    Yields dicts: prompt -> {key, shard, prompt, refs, meta}; preference -> also
    {video_a, video_b, label}. Images are uint8 (H, W, 3), videos uint8 (F, H, W, 3) numpy arrays.
    `epochs=None` iterates forever (training); iterating again continues from the current position.
    Only the most recent iterator of a reader may be used (an older one raises).

    Loader workers: pass `num_workers` (the reader runs its own DataLoader and keeps the position
    exact). It is also an IterableDataset, so a DataLoader of yours splits it across its workers
    correctly, but then the position lives in the worker copies and state_dict() is not usable.
    """

    def __init__(self, pattern: str | Sequence[str], kind: str = "prompt", rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 16, seed: int = 0, on_error: str = "raise",
                 epochs: int | None = None, num_workers: int = 0, shuffle: bool = True):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0 or shuffle_buffer < 0 or num_workers < 0 or (epochs is not None and epochs < 1):
            raise ValueError("seed, shuffle_buffer and num_workers must be >= 0 and epochs >= 1 (or None)")
        paths = tuple(expand_pattern(pattern))
        self._spec = _Spec(paths, kind, rank, world_size, shuffle, shuffle_buffer, seed, epochs)
        self.on_error = on_error
        self.num_workers = num_workers
        self._epoch = 0
        self._pos = 0
        self._num_skipped = 0
        self._generation = 0

    @classmethod
    def from_config(cls, data_cfg, kind: str, rank: int = 0, world_size: int = 1,
                    epochs: int | None = None) -> ShardReader:
        """Build from config.schema.DataConfig fields (prompt_shards or preference_shards by kind)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        pattern = data_cfg.prompt_shards if kind == "prompt" else data_cfg.preference_shards
        return cls(pattern, kind=kind, rank=rank, world_size=world_size,
                   shuffle_buffer=int(data_cfg.shuffle_buffer), seed=int(data_cfg.seed),
                   on_error=str(data_cfg.on_error), epochs=epochs,
                   num_workers=int(data_cfg.num_loader_workers))

    # ------------------------------------------------------------------ properties / state

    @property
    def shards(self) -> list[str]:
        return list(self._spec.paths)

    @property
    def num_skipped(self) -> int:
        """Samples (or unreadable shards) skipped so far with on_error='skip', across restores."""
        return self._num_skipped

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, number of this rank's elements of that epoch consumed)."""
        return self._epoch, self._pos

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position plus the settings it is only valid with."""
        s = self._spec
        return {"version": STATE_VERSION, "kind": s.kind, "epoch": self._epoch, "position": self._pos,
                "num_skipped": self._num_skipped, "seed": s.seed, "shuffle": s.shuffle,
                "shuffle_buffer": s.shuffle_buffer, "rank": s.rank, "world_size": s.world_size,
                "shards": [os.path.basename(p) for p in s.paths]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict()`; refuses a state whose order would differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for name in ("kind", "seed", "shuffle", "shuffle_buffer", "rank", "world_size", "shards"):
            if state.get(name) != mine[name]:
                raise ValueError(f"reader state was saved with {name}={state.get(name)!r} but this reader has "
                                 f"{name}={mine[name]!r}: the sample order would differ, cannot resume exactly")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])
        self._num_skipped = int(state["num_skipped"])
        self._generation += 1  # an iterator created before the restore must not continue

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        info = get_worker_info()
        if info is not None:
            # Wrapped in someone else's DataLoader: split by its workers (state stays per copy).
            source = _stream(self._spec, self._epoch, self._pos, info.id, info.num_workers)
        elif self.num_workers > 0:
            loader = DataLoader(_WorkerStream(self._spec, self._epoch, self._pos), batch_size=None,
                                num_workers=self.num_workers, collate_fn=_identity)
            source = iter(loader)
        else:
            source = _stream(self._spec, self._epoch, self._pos, 0, 1)
        return self._consume(source, self._generation)

    def _consume(self, source, generation: int) -> Iterator[dict[str, Any]]:
        epoch_seen = None  # (epoch, started at position 0, samples yielded)
        try:
            for epoch, pos, sample, error in source:
                if generation != self._generation:
                    raise RuntimeError("this iterator is stale: the reader was iterated again or restored")
                if epoch_seen is None or epoch_seen[0] != epoch:
                    self._check_not_all_skipped(epoch_seen)
                    epoch_seen = [epoch, pos == 0, 0]
                if error is not None:
                    err = DataError(*error)
                    if self.on_error == "raise":
                        raise err  # position stays on the bad sample: a resume retries it
                    self._num_skipped += 1
                    self._epoch, self._pos = epoch, pos + 1
                    logger.warning("skipped sample #%d (epoch %d, position %d of rank %d): %s",
                                   self._num_skipped, epoch, pos, self._spec.rank, err)
                    continue
                self._epoch, self._pos = epoch, pos + 1
                epoch_seen[2] += 1
                yield sample
            self._check_not_all_skipped(epoch_seen)
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _check_not_all_skipped(self, epoch_seen) -> None:
        if epoch_seen is not None and epoch_seen[1] and epoch_seen[2] == 0:
            raise DataError(", ".join(self._spec.paths[:3]) + (" ..." if len(self._spec.paths) > 3 else ""),
                            None, f"every sample of epoch {epoch_seen[0]} for rank {self._spec.rank} was "
                                  f"skipped ({self._num_skipped} skipped in total); refusing to loop forever")


def from_config(data_cfg, kind: str, rank: int = 0, world_size: int = 1,
                epochs: int | None = None) -> ShardReader:
    """Module-level alias of `ShardReader.from_config`."""
    return ShardReader.from_config(data_cfg, kind, rank, world_size, epochs)
