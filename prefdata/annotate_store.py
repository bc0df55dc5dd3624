"""The annotation page's data: the pairs to label, the durable label log, the agreement report and the export.

Why a plain append-only JSON-lines log: a label is acknowledged to the browser only after its line is
written and fsync'ed, so a crash, a killed server or a closed tab loses nothing that was acknowledged; a
restart replays the log to know where each annotator stopped. A line cut short by a crash mid-write (never
acknowledged) is cut off on the next start, with a warning; any other unreadable line is an error naming
the line, never skipped. A later label of the same annotator for the same pair replaces the earlier one
(both stay in the log); an `undo` record takes the annotator's label of that pair back (the pair is theirs to
label again, and the label they give then is the one that counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from config import ExpectedError

log = logging.getLogger("identity_grpo.annotate")
CHOICES = ("a", "b", "tie", "skip", "undo")
LABEL_FIELDS = ("seq", "time", "annotator", "session", "pair", "choice", "left")
TASK_FILE, LOG_FILE = "task.json", "labels.jsonl"


class StoreError(ExpectedError, ValueError):
    """The annotation directory, its log or its pairs are not usable; the message names the file and line."""


# ----------------------------------------------------------------------------- pairs


@dataclass
class PairSet:
    """The preference pairs to label (any preference shards: auto-labelled, synthetic, ...), by key, in file order."""

    pattern: str
    refs: Dict[str, object]  # key -> data.tarindex.SampleRef
    order: List[str]

    def __post_init__(self):
        self.position = {key: i for i, key in enumerate(self.order)}  # key -> its place in `order`

    @classmethod
    def open(cls, pattern: str) -> "PairSet":
        from data.tarindex import expand_pattern, index_shard

        refs, order = {}, []
        for path in expand_pattern(pattern):
            index = index_shard(path)
            if index.error:
                raise StoreError(f"{path}: {index.error}")
            for ref in index.samples:
                if ref.error:
                    raise StoreError(f"{path}: sample {ref.key!r}: {ref.error}")
                if ref.key in refs:
                    raise StoreError(f"{path}: key {ref.key!r} also in {refs[ref.key].shard}; pair keys must be unique")
                refs[ref.key] = ref
                order.append(ref.key)
        if not order:
            raise StoreError(f"--pairs {pattern}: no pair")
        return cls(pattern, refs, order)

    def sample(self, key: str) -> dict:
        """The decoded pair (prompt, refs, videos, label, meta); a bad sample is an error naming shard and key."""
        from data.reader import load_sample

        return load_sample("preference", self.refs[key])

    def members(self, key: str) -> Dict[str, bytes]:
        from data.tarindex import read_members

        return read_members(self.refs[key])

    def fingerprint(self) -> Dict[str, object]:
        """What the labels refer to: the pattern, and every shard's name and size (a changed set is refused)."""
        shards = sorted({ref.shard for ref in self.refs.values()})
        return {"pairs": self.pattern, "num_pairs": len(self.order),
                "shards": [[os.path.basename(s), os.path.getsize(s)] for s in shards]}


def left_slot(pair: str, annotator: str) -> str:
    """Which video ('a' or 'b') this annotator sees on the left: a fixed coin per (pair, annotator), so position
    says nothing about the stored order and a reload shows the same layout."""
    return "a" if hashlib.sha256(f"{pair}\0{annotator}".encode()).digest()[0] % 2 == 0 else "b"


# ----------------------------------------------------------------------------- the label log


class LabelLog:
    """Append-only, fsync'ed JSON lines in `<dir>/labels.jsonl` (see the module doc). `read_only` (report, export,
    which may run beside a live server): an unfinished last line is ignored, not cut, and nothing can be appended."""

    def __init__(self, directory: str | Path, read_only: bool = False):
        self.path = Path(directory) / LOG_FILE
        self.records: List[dict] = []
        # per annotator: the pairs whose label is in force, oldest label first (a relabel moves its pair last, an
        # undo drops it), and their last record: what each request asks, kept as records come, not rescanned
        self._in_force: Dict[str, Dict[str, int]] = defaultdict(dict)
        self._last: Dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._replay(read_only)
        self._file = None if read_only else open(self.path, "ab")  # noqa: SIM115 - held open; closed by close()

    def _replay(self, read_only: bool) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and not read_only:  # a crash cut the last line short: it was never acknowledged
            log.warning("%s: dropping an unfinished last line (%d bytes; a crash mid-write, never acknowledged)",
                        self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or any(k not in record for k in LABEL_FIELDS):
                    raise ValueError(f"needs the fields {list(LABEL_FIELDS)}")
            except ValueError as err:
                raise StoreError(f"{self.path} line {n}: unreadable label ({err}); fix or remove that line") from None
            self._add(record)

    def append(self, annotator: str, session: str, pair: str, choice: str, left: str) -> dict:
        """Write one label durably (written, flushed, fsync'ed) and return it; only then may it be acknowledged."""
        record = self.write(annotator, session, pair, choice, left)
        self.sync()
        return record

    def write(self, annotator: str, session: str, pair: str, choice: str, left: str) -> dict:
        """Write one label to the file (flushed to the OS, not yet durable: `sync` makes every label written before
        it durable, so one sync can cover many; prefdata/annotate_io.py GroupCommit)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
        if self._file is None:
            raise ValueError(f"{self.path}: opened read-only")
        with self._lock:
            record = {"seq": len(self.records), "time": time.time(), "annotator": annotator, "session": session,
                      "pair": pair, "choice": choice, "left": left}
            self._file.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            self._file.flush()
            self._add(record)
        return record

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def _add(self, record: dict) -> None:
        self.records.append(record)
        mine = self._in_force[record["annotator"]]
        mine.pop(record["pair"], None)
        if record["choice"] != "undo":
            mine[record["pair"]] = record["seq"]
        self._last[record["annotator"]] = record

    def latest(self) -> Dict[Tuple[str, str], dict]:
        """{(annotator, pair): that annotator's latest label of the pair}, labels taken back by `undo` left out."""
        latest = {(r["annotator"], r["pair"]): r for r in self.records}
        return {key: r for key, r in latest.items() if r["choice"] != "undo"}

    def in_force(self, annotator: str) -> List[str]:
        """The pairs this annotator's labels are in force for, the most recently labelled last."""
        return list(self._in_force.get(annotator, {}))

    def last_record(self, annotator: str) -> Optional[dict]:
        return self._last.get(annotator)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def open_task(directory: str | Path, pairs: Optional[str], read_only: bool = False) -> Tuple[PairSet, LabelLog]:
    """The pairs and the log of an annotation directory. The first `serve` records the pairs in task.json; later
    calls may omit `pairs` and must not change them (labels refer to their keys). `read_only`: see LabelLog."""
    directory = Path(directory)
    task_file = directory / TASK_FILE
    stored = json.loads(task_file.read_text()) if task_file.exists() else None
    if pairs is None:
        if stored is None:
            raise StoreError(f"{directory}: no {TASK_FILE}; start with `serve --pairs PATTERN --dir {directory}`")
        pairs = stored["pairs"]
    pair_set = PairSet.open(pairs)
    now = pair_set.fingerprint()
    if stored is not None and stored != now:
        raise StoreError(f"{task_file}: this directory labels {stored['pairs']} ({stored['num_pairs']} pairs, shards "
                         f"{stored['shards']}), not {now['pairs']} ({now['num_pairs']} pairs, {now['shards']}); use "
                         "another --dir for other pairs")
    directory.mkdir(parents=True, exist_ok=True)
    if stored is None:
        task_file.write_text(json.dumps(now, indent=2))
    label_log = LabelLog(directory, read_only)
    unknown = sorted({r["pair"] for r in label_log.records} - set(pair_set.refs))
    if unknown:
        raise StoreError(f"{label_log.path}: labels of pairs not in {pairs}: {unknown[:3]}")
    return pair_set, label_log


# ----------------------------------------------------------------------------- progress, agreement, export


def progress(pairs: PairSet, label_log: LabelLog, annotator: str) -> Tuple[Optional[str], int]:
    """(next pair this annotator has not labelled yet, or None when done; how many they labelled or skipped).
    Right after an undo, the next pair is the one taken back, wherever it is in the order."""
    done = set(label_log.in_force(annotator))
    last = label_log.last_record(annotator)
    if last is not None and last["choice"] == "undo" and last["pair"] not in done:
        return last["pair"], len(done)
    return next((k for k in pairs.order if k not in done), None), len(done)


def cohen_kappa(x: List[str], y: List[str]) -> Optional[float]:
    """Cohen's kappa of two annotators' labels of the same pairs (None when chance agreement is 1)."""
    n = len(x)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(x, y, strict=True)) / n
    cx, cy = Counter(x), Counter(y)
    expected = sum(cx[c] * cy[c] for c in set(cx) | set(cy)) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def human_labels(label_log: LabelLog) -> Dict[str, Dict[str, str]]:
    """{pair: {annotator: a|b|tie}}, each annotator's latest label, skips left out."""
    out: Dict[str, Dict[str, str]] = defaultdict(dict)
    for (who, pair), r in label_log.latest().items():
        if r["choice"] != "skip":
            out[pair][who] = r["choice"]
    return dict(out)


def majority(votes: Iterable[str]) -> Tuple[Optional[str], float]:
    """(the label most annotators gave, its share); None when two labels share the most."""
    counts = Counter(votes)
    if not counts:
        return None, 0.0
    top = max(counts.values())
    leaders = [c for c in counts if counts[c] == top]
    return (leaders[0] if len(leaders) == 1 else None), top / sum(counts.values())


def report(pairs: PairSet, label_log: LabelLog) -> dict:
    """Per-annotator counts and sessions, inter-annotator agreement (raw and Cohen's kappa per annotator pair, on
    the pairs both labelled), and agreement with the pairs' stored `auto` labels (per annotator and majority)."""
    humans = human_labels(label_log)
    latest = label_log.latest()
    annotators = sorted({r["annotator"] for r in label_log.records})
    per = {}
    for who in annotators:
        mine = [r for (w, _), r in latest.items() if w == who]
        written = [r for r in label_log.records if r["annotator"] == who]
        skipped = sum(r["choice"] == "skip" for r in mine)
        per[who] = {"labelled": len(mine) - skipped, "skipped": skipped,
                    "undone": sum(r["choice"] == "undo" for r in written),
                    "sessions": len({r["session"] for r in written}), "labels_written": len(written)}
    between = {}
    for x, y in combinations(annotators, 2):
        both = [p for p, votes in humans.items() if x in votes and y in votes]
        lx, ly = [humans[p][x] for p in both], [humans[p][y] for p in both]
        between[f"{x}|{y}"] = {"pairs": len(both), "agreement": (sum(a == b for a, b in zip(lx, ly)) / len(both))
                               if both else None, "kappa": cohen_kappa(lx, ly)}
    auto = {}
    for pair in humans:
        label = json.loads(pairs.members(pair)["label.json"])
        if label.get("source") == "auto":
            auto[pair] = label["preference"]
    with_auto = {who: [humans[p][who] == auto[p] for p in auto if who in humans[p]] for who in annotators}
    majorities = {p: majority(humans[p].values())[0] for p in auto}
    decided = [p for p, m in majorities.items() if m is not None]
    return {"pairs": len(pairs.order), "labelled_pairs": len(humans), "annotators": per, "between_annotators": between,
            "with_auto_labels": {"pairs": len(auto),
                                 "per_annotator": {w: (sum(v) / len(v) if v else None) for w, v in with_auto.items()},
                                 "majority": (sum(majorities[p] == auto[p] for p in decided) / len(decided))
                                 if decided else None}}


def export(pairs: PairSet, label_log: LabelLog, out: str | Path, prefix: str = "human", min_annotators: int = 1,
           on_conflict: str = "drop", samples_per_shard: int = 256, overwrite: bool = False) -> dict:
    """Write the human-labelled pairs as preference shards (`source: human`): the pair's videos, references, prompt
    and meta as they are, the label from the annotators' majority, and in `label.extra` every annotator's label,
    the share that agreed and the label the pair had before. Pairs with fewer than `min_annotators` labels are left
    out; with no majority (`on_conflict`) a pair is dropped or labelled tie. Returns the counts and pattern."""
    from data.schema import LABEL, check_label
    from data.write_shards import replacing_writer

    if on_conflict not in ("drop", "tie"):
        raise ValueError(f"--on-conflict must be drop or tie, got {on_conflict!r}")
    humans = human_labels(label_log)
    counts = Counter()
    with replacing_writer(out, prefix, samples_per_shard, overwrite) as writer:
        for pair in pairs.order:
            votes = humans.get(pair, {})
            if len(votes) < min_annotators or not votes:
                counts["too_few_annotators" if votes else "unlabelled"] += 1
                continue
            label, share = majority(votes.values())
            if label is None:
                counts["conflict_" + on_conflict] += 1
                if on_conflict == "drop":
                    continue
                label, share = "tie", list(votes.values()).count("tie") / len(votes)  # the share that said tie
            members = pairs.members(pair)
            before_label = json.loads(members[LABEL])
            members[LABEL] = json.dumps(check_label({
                "preference": label, "source": "human", "distortion": before_label.get("distortion"),
                "extra": {"annotators": dict(sorted(votes.items())), "agreement": share,
                          "previous_label": {"preference": before_label.get("preference"),
                                             "source": before_label.get("source")}}}), sort_keys=True).encode()
            writer.write(pair, members)
            counts["exported"] += 1
    return {**counts, "pattern": writer.pattern if writer.paths else None}
