"""Automatic preference labels: pairs of one prompt's candidate videos, labelled by a vote of scorers.

    python -m prefdata.autolabel --config cluster_configs/reward_data_demo.yaml [autolabel.key=value ...] [--overwrite]

Identity-GRPO (Sec. 3.2) labels most of its reward-model pairs automatically, by model voting, and then
keeps those a teacher trained on human pairs agrees with. Here:
1. candidates (prefdata/candidates.py shards) are grouped by prompt; pairs are every two candidates of a prompt
   (or `pairs_per_prompt` of them, drawn at random; `cross_generator_only` keeps pairs from two different
   generators); which of the two is `a` is drawn at random (seeded), so position says nothing;
2. every scorer (`scorers`: face, vlm, any reward of reward/composite.py) scores every video once; on a pair
   it votes `a` or `b` when the scores differ by more than its `margin`, else `tie`; it abstains when its
   score failed, and the face scorer also abstains when neither video shows a face (it has no evidence);
3. the label is the choice with the most votes (a tie between `a` and `b` counts as `tie`); its agreement
   is the fraction of cast votes that chose it; pairs below `min_agreement`, or with no vote, are dropped
   and counted;
4. kept pairs are written as preference shards (`source: auto`) with the candidates' mp4 bytes as they
   are and the provenance in `label.extra`: every scorer's scores and vote, the counts, the agreement, the
   candidate keys, generators and seeds. A summary (`<out>/<prefix>.autolabel.json`) holds the counts,
   the label mix, each scorer's tie rate and agreement with the final label, and generator win rates.
The teacher filter is the reward trainer's (`reward.train`, `teacher.enabled`: trained on the human pairs,
applied to `auto` ones), so it runs where the human labels are.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from prefdata.settings import require, tool_main

log = logging.getLogger("identity_grpo.autolabel")
CHOICES = ("a", "b", "tie")


# ----------------------------------------------------------------------------- the vote (pure)


def scorer_vote(score_a: float, score_b: float, margin: float) -> Optional[str]:
    """One scorer's vote: `a` / `b` when the scores differ by more than `margin`, `tie` within it, None (abstain)
    when either score is missing (NaN)."""
    if not (math.isfinite(score_a) and math.isfinite(score_b)):
        return None
    diff = score_a - score_b
    return "tie" if abs(diff) <= margin else ("a" if diff > 0 else "b")


def tally(votes: Mapping[str, Optional[str]]) -> Tuple[Optional[str], float, Dict[str, int]]:
    """(label, agreement, counts) of the cast votes: the choice with most votes, `tie` when `a` and `b` (or either
    and `tie`) share the most; agreement = votes for the label / votes cast. (None, 0, counts) if none was cast."""
    cast = [v for v in votes.values() if v is not None]
    counts = {c: cast.count(c) for c in CHOICES}
    if not cast:
        return None, 0.0, counts
    top = max(counts.values())
    leaders = [c for c in CHOICES if counts[c] == top]
    label = leaders[0] if len(leaders) == 1 else "tie"
    return label, counts[label] / len(cast), counts


# ----------------------------------------------------------------------------- scorers


@dataclass
class Scored:
    """Every scorer's (B,) scores, NaN where it failed, and per video whether it gave that scorer any evidence.
    Only the face scorer can lack it while scoring: a faceless video scores `missing_penalty`, so two faceless
    videos are no evidence either way."""

    scores: Dict[str, np.ndarray]
    evidence: Dict[str, np.ndarray]


class Scorers:
    """The voting scorers, built by reward name from the autolabel section. Each scorer function returns
    (scores, evidence or None for "every video")."""

    def __init__(self, section):
        from reward.composite import REWARD_BUILDERS

        self.margins = {name: float(s.margin) for name, s in section.scorers.items()}
        self.failures: Counter = Counter()
        self.fns = {}
        for name in self.margins:
            if name == "face":
                from reward.face import FaceIdentityReward

                self.face = FaceIdentityReward.from_config(section.reward.face)
                self.fns[name] = self._face
            else:
                reward = REWARD_BUILDERS[name](section.reward)
                self.fns[name] = lambda videos, references, prompts, reward=reward: (
                    reward(videos, references, prompts), None)

    def _face(self, videos, references, prompts):
        scores = self.face.score_batch(videos, references)
        return (np.array([s.score for s in scores], dtype=np.float64), [bool(s.num_faces.sum() > 0) for s in scores])

    def _one(self, name: str, videos, references, prompts) -> Tuple[np.ndarray, np.ndarray]:
        fn = self.fns[name]
        try:
            scores, evidence = fn(videos, references, prompts)
            out = torch.as_tensor(scores).detach().cpu().double().numpy()
            if out.shape != (len(videos),):
                raise ValueError(f"scorer {name!r} returned shape {out.shape} for {len(videos)} videos")
            return out, np.ones(len(videos), dtype=bool) if evidence is None else np.asarray(evidence, dtype=bool)
        except Exception as err:  # noqa: BLE001 - a scorer that fails abstains (counted); the others still vote
            if len(videos) > 1:
                parts = [self._one(name, videos[i:i + 1], references[i:i + 1], prompts[i:i + 1])
                         for i in range(len(videos))]
                return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            self.failures[name] += 1
            log.warning("scorer %s failed on a video (%s: %s); it abstains on its pairs", name, type(err).__name__, err)
            return np.full(1, math.nan), np.zeros(1, dtype=bool)

    def score(self, videos: Sequence, references: Sequence, prompts: Sequence[str], batch_size: int = 8) -> Scored:
        scored = Scored({}, {})
        for name in self.fns:
            parts = [self._one(name, videos[i:i + batch_size], references[i:i + batch_size], prompts[i:i + batch_size])
                     for i in range(0, len(videos), batch_size)]
            scored.scores[name] = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
            scored.evidence[name] = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=bool)
        return scored

    def vote(self, scored: Scored, i: int, j: int) -> Tuple[Optional[str], float, dict]:
        """Label of the pair (video i as a, video j as b) and its provenance (label.extra). A scorer abstains where
        neither video gave it evidence (and where its score failed: NaN)."""
        scores = scored.scores
        votes = {name: scorer_vote(float(s[i]), float(s[j]), self.margins[name])
                 if scored.evidence[name][i] or scored.evidence[name][j] else None for name, s in scores.items()}
        label, agreement, counts = tally(votes)
        detail = {name: {"a": _finite(scores[name][i]), "b": _finite(scores[name][j]), "margin": self.margins[name],
                         "vote": votes[name]} for name in scores}
        return label, agreement, {"votes": detail, "counts": counts, "agreement": agreement}


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(float(x)) else None


# ----------------------------------------------------------------------------- pairs of candidates


def group_candidates(pattern: str) -> Dict[str, list]:
    """{prompt key: [(SampleRef, candidate.json)]} of the candidate shards, in file order (tar headers and the
    candidate.json members only; a damaged sample is an error naming shard and key)."""
    from data.reader import DataError
    from data.schema import CANDIDATE, SampleError, check_candidate
    from data.tarindex import expand_pattern, index_shard, read_members

    groups: Dict[str, list] = defaultdict(list)
    for path in expand_pattern(pattern):
        index = index_shard(path)
        if index.error:
            raise DataError(path, None, index.error)
        for ref in index.samples:
            if ref.error:
                raise DataError(path, ref.key, ref.error)
            try:
                members = read_members(ref, [CANDIDATE])
                if CANDIDATE not in members:
                    raise SampleError(CANDIDATE, "missing (is this a candidate shard? see data/SCHEMA.md)")
                info = check_candidate(json.loads(members[CANDIDATE]))
            except SampleError as err:
                raise DataError(path, ref.key, err.reason, err.field) from None
            except json.JSONDecodeError as err:
                raise DataError(path, ref.key, f"invalid JSON ({err})", CANDIDATE) from None
            groups[info["prompt_key"]].append((ref, info))
    return groups


def decode_candidate(ref, members: Dict[str, bytes]) -> dict:
    """One candidate's decoded sample; a schema problem is a DataError naming shard, key and field."""
    from data.reader import DataError
    from data.schema import SampleError, decode_members

    try:
        return decode_members("candidate", members)
    except SampleError as err:
        raise DataError(ref.shard, ref.key, err.reason, field=err.field) from None


def check_same_prompt(prompt_key: str, decoded: Sequence[dict], refs: Sequence) -> None:
    """Candidates paired under one prompt key must share its text and reference photos (a pair is written with one
    copy of them); an external candidate with other photos is an error naming both samples."""
    from data.reader import DataError

    first = decoded[0]
    for other, ref in zip(decoded[1:], refs[1:], strict=True):
        same_refs = len(other["refs"]) == len(first["refs"]) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(other["refs"], first["refs"], strict=True))
        if other["prompt"] != first["prompt"] or not same_refs:
            what = "prompt text" if other["prompt"] != first["prompt"] else "reference photos"
            raise DataError(ref.shard, ref.key, f"its {what} differ from those of {refs[0].key} ({refs[0].shard}), "
                            f"though both have prompt_key {prompt_key!r}", field="candidate.prompt_key")


def choose_pairs(infos: Sequence[dict], prompt_key: str, section) -> List[Tuple[int, int]]:
    """Index pairs (a, b) of one prompt's candidates: every pair or `pairs_per_prompt` drawn at random, each in
    random order; seeded by (seed, prompt key), so a rerun makes the same pairs."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(infos)), 2)
             if not section.cross_generator_only or infos[i]["generator"] != infos[j]["generator"]]
    digest = int.from_bytes(hashlib.sha256(prompt_key.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([int(section.seed), digest])
    if section.pairs_per_prompt is not None and len(pairs) > section.pairs_per_prompt:
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), section.pairs_per_prompt, replace=False))]
    return [(j, i) if rng.random() < 0.5 else (i, j) for i, j in pairs]


def pair_key(prompt_key: str, n: int) -> str:
    """`<prompt key>-pair<n>` (data.schema.derived_key)."""
    from data.schema import derived_key

    return derived_key(prompt_key, f"pair{n}")


def for_people(prompt_key: str, section) -> bool:
    """Whether this prompt's pairs go to people (`people_fraction` of the prompts, drawn by key and seed)."""
    digest = hashlib.sha256(f"{int(section.seed)}/{prompt_key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < section.people_fraction


class Summary:
    """What `run` counts: pairs, drops, labels, each scorer's ties and agreement, generator wins."""

    def __init__(self, scorers: Scorers):
        self.stats, self.labels, self.wins = Counter(), Counter(), defaultdict(Counter)
        self.scorers = {name: Counter() for name in scorers.margins}

    def add(self, label: str, extra: dict, gen_a: str, gen_b: str) -> None:
        self.labels[label] += 1
        for name, detail in extra["votes"].items():
            if detail["vote"] is not None:
                self.scorers[name]["votes"] += 1
                self.scorers[name]["ties"] += detail["vote"] == "tie"
                self.scorers[name]["with_label"] += detail["vote"] == label
        if gen_a != gen_b and label != "tie":
            self.wins[gen_a if label == "a" else gen_b][gen_b if label == "a" else gen_a] += 1

    def to_dict(self, scorers: Scorers) -> dict:
        return {**self.stats, "kept": sum(self.labels.values()), "labels": dict(self.labels),
                "scorer_failures": dict(scorers.failures),
                "scorers": {name: {"margin": scorers.margins[name], "votes": s["votes"],
                                   "tie_rate": s["ties"] / s["votes"] if s["votes"] else None,
                                   "agreement_with_label": s["with_label"] / s["votes"] if s["votes"] else None}
                            for name, s in self.scorers.items()},
                "generator_wins": {w: dict(c) for w, c in self.wins.items()}}


def pair_members(prompt_key: str, raw: Sequence[dict], decoded: Sequence[dict], infos: Sequence[dict],
                 keys: Sequence[str], i: int, j: int, label: str, extra: dict) -> Dict[str, bytes]:
    """The preference sample of candidates i (as a) and j (as b): their mp4 bytes as they are, label and provenance."""
    from data.schema import VIDEO, make_meta, preference_members
    from data.video import VideoInfo

    extra = {**extra, "candidates": {"a": keys[i], "b": keys[j]},
             "generators": {"a": infos[i]["generator"], "b": infos[j]["generator"]},
             "seeds": {"a": infos[i]["seed"], "b": infos[j]["seed"]}}
    src = decoded[i]
    meta = make_meta(src["meta"]["num_people"], src["meta"]["identity_ids"], "autolabel",
                     {"a": VideoInfo(**src["meta"]["videos"]["video"]),
                      "b": VideoInfo(**decoded[j]["meta"]["videos"]["video"])},
                     {**src["meta"]["extra"], "prompt_key": prompt_key})
    label_json = {"preference": label, "source": "auto", "distortion": None, "extra": extra}
    return preference_members(src["prompt"], src["refs"], raw[i][VIDEO], raw[j][VIDEO], label_json, meta)


def run(cfg, overwrite: bool = False) -> Dict[str, object]:
    """Label the candidates' pairs and write the kept ones (and the people's share apart); returns the summary
    (also written as `<out>/<prefix>.autolabel.json`)."""
    from contextlib import ExitStack

    from data.tarindex import read_members
    from data.write_shards import replacing_writer

    section = cfg.autolabel
    require(section, "autolabel")
    out = Path(section.out)
    with ExitStack() as stack:  # both shard sets are checked (refused unless --overwrite) before any work
        writers = {to_people: stack.enter_context(replacing_writer(out, prefix, section.samples_per_shard, overwrite,
                                                                   "autolabel.out: "))
                   for to_people, prefix in ((False, section.prefix), (True, section.people_prefix))}
        groups = group_candidates(section.candidate_shards)
        scorers = Scorers(section)
        auto, people = Summary(scorers), Summary(scorers)
        for prompt_key, members in groups.items():
            to_people = for_people(prompt_key, section)
            summary = people if to_people else auto
            summary.stats["prompts"] += 1
            raw = [read_members(ref) for ref, _ in members]
            decoded = [decode_candidate(ref, m) for (ref, _), m in zip(members, raw, strict=True)]
            infos, keys = [info for _, info in members], [ref.key for ref, _ in members]
            check_same_prompt(prompt_key, decoded, [ref for ref, _ in members])
            scores = scorers.score([d["video"] for d in decoded], [d["refs"] for d in decoded],
                                   [d["prompt"] for d in decoded], section.batch_size)
            for n, (i, j) in enumerate(choose_pairs(infos, prompt_key, section)):
                summary.stats["pairs"] += 1
                label, agreement, extra = scorers.vote(scores, i, j)
                if label is None:
                    summary.stats["dropped_no_vote"] += 1
                    continue
                if agreement < section.min_agreement and not to_people:  # people decide their pairs themselves
                    summary.stats["dropped_low_agreement"] += 1
                    continue
                summary.add(label, extra, infos[i]["generator"], infos[j]["generator"])
                writers[to_people].write(pair_key(prompt_key, n),
                                         pair_members(prompt_key, raw, decoded, infos, keys, i, j, label, extra))
    result = {"candidate_shards": section.candidate_shards, **auto.to_dict(scorers),
              "pattern": writers[False].pattern if writers[False].paths else None,
              "people": {**people.to_dict(scorers), "pattern": writers[True].pattern if writers[True].paths else None}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{section.prefix}.autolabel.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"autolabel: {auto.stats['pairs']} pairs of {auto.stats['prompts']} prompts, kept {result['kept']} "
          f"{dict(auto.labels)}, dropped {auto.stats['dropped_low_agreement']} below agreement {section.min_agreement} "
          f"and {auto.stats['dropped_no_vote']} without a vote: {result['pattern']}")
    if people.stats["prompts"]:
        print(f"autolabel: for people: {result['people']['kept']} pairs of {people.stats['prompts']} prompts: "
              f"{result['people']['pattern']}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    return tool_main(run, __doc__, "autolabel", "replace existing pair shards in autolabel.out", argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
