"""Synthetic preference pairs from real clips: each person's face tracked, then swapped, drifted, exchanged or degraded.

    python -m prefdata.distortion_pairs --config cluster_configs/reward_data_demo.yaml \\
        distortions.clips=CLIPS distortions.out=DIR [distortions.key=value ...] [--overwrite]

Input (`distortions.clips`): clean clips of real people with one reference photo per person, as a JSONL
manifest of clip records or a folder of clip folders (data/SCHEMA.md, "Clips"). Each clip's people are found
and followed through the frames by prefdata/face_track.py (dlib's detector and embeddings, matched to the
reference photos by embedding); each pair is the clean clip against a distortion of data/distort.py confined
to the tracked face boxes, its kind and full parameters in label.json (`source: synthetic`) and the boxes in
meta.json. The faces pasted by swaps and exchanges are the people's own reference photos (the face found there,
widened like the tracked boxes); a swap or drift may bring in someone from another clip's references.

Skips: a clip whose reference shows no face, or whose person cannot be tracked (never matched, lost for more
than `tracking.max_gap` frames, an identity switch), is skipped with its reason; the counts and each skipped
clip's reason are printed and written to `<out>/<prefix>.report.json`.

Seeded and resumable: pair j of clip `key` draws its kind, parameters and a/b order from (seed, key, j), and the
outsiders a swap or drift may bring in from a stream of their own, so a pair does not depend on interruptions or
on the order of the clips; which outsiders exist depends on the other clips' people (those with `identity_ids`:
without ids, the same person in two clips would count as two), and whether any exists decides whether a one-person
clip can be swapped or drifted at all. Shards are written whole; a rerun reads the keys
already written and makes only the missing pairs (data/write_shards.py, as prefdata.candidates does); the section
is stored as `<out>/<prefix>.config.yaml` and a rerun with other settings is refused unless `--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from prefdata.settings import distortion_settings, require, tool_main, track_settings

log = logging.getLogger("identity_grpo.distortion_pairs")
SEED_DOMAIN = 0xD157_0127  # keeps these draws apart from the other tools' seed streams
OUTSIDER_STREAM = 1 << 32  # pair j's outsiders are drawn from index OUTSIDER_STREAM + j


@dataclass
class Person:
    identity_id: str
    embedding: np.ndarray  # unit (D,)
    face: np.ndarray  # uint8 (h, w, 3): the reference photo's face, what a swap pastes


def read_clips(path: str):
    """Clip records of a manifest (a file) or a folder of clip folders; invalid records raise ManifestError."""
    from data.manifest import read_folder, read_manifest

    return read_folder(path, "clip") if Path(path).is_dir() else read_manifest(path, "clip")


def reference_people(rec, refs: Sequence[np.ndarray], model, margin: float) -> List[Person]:
    """The people of one clip from its reference photos; FaceNotFoundError names the photo without a face."""
    from data.faces import crop_face
    from reward.face import FaceNotFoundError

    ids = rec.identity_ids or [f"{rec.key}/{k}" for k in range(len(refs))]
    people = []
    for k, ref in enumerate(refs):
        boxes, emb = model.detect_and_embed(ref, limit=1)
        if not boxes:
            raise FaceNotFoundError(f"refs[{k}] ({rec.refs[k].name}): no face found in the {ref.shape[1]}x"
                                    f"{ref.shape[0]} photo")
        x0, y0, x1, y1 = boxes[0]
        face = crop_face(ref, boxes[0], margin=margin, size=max(x1 - x0, y1 - y0, 32))
        people.append(Person(ids[k], emb[0], face))
    return people


def clip_rng(seed: int, key: str, index: int) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([SEED_DOMAIN, int(seed), digest, int(index)])


def pair_key(clip_key: str, index: int) -> str:
    from data.schema import derived_key

    return derived_key(clip_key, f"distort{index}")


@dataclass
class Tracker:
    """What a run builds once: the face model, the tracker's settings and the distortions' (data.distort)."""

    model: object
    cfg: object
    distortion: object


def make_clip_pairs(rec, video, refs, fps, people, pool, section, track):
    """The members of clip `rec`'s pairs (one per index), after tracking; TrackingError when it cannot be tracked."""
    from data.distort import CleanClip, make_pair
    from prefdata.face_track import track_faces

    ids = [p.identity_id for p in people]
    tracked = track_faces(video, np.stack([p.embedding for p in people]), track.model, track.cfg, ids)
    strangers = [p for p in pool if p.identity_id not in ids]
    out = []
    for j in range(section.pairs_per_clip):
        rng = clip_rng(section.seed, rec.key, j)
        chooser = clip_rng(section.seed, rec.key, OUTSIDER_STREAM + j)  # the pool's size moves no other draw
        picked = sorted(chooser.permutation(len(strangers))[: section.max_outsiders].tolist()) if strangers else []
        outsiders = [strangers[i] for i in picked]
        clip = CleanClip(rec.key, rec.prompt, video, tracked.boxes, [p.face for p in people + outsiders], list(refs),
                         ids, [p.identity_id for p in outsiders], fps=fps, source=rec.source)
        extra = {**rec.extra, "clip": rec.key, "face_tracking": {
            "found_frames": tracked.found.sum(0).astype(int).tolist(), "num_frames": int(len(video)),
            "min_similarity": float(np.nanmin(tracked.similarity))}}
        members, params = make_pair(clip, rng, track.distortion, extra=extra)
        out.append((pair_key(rec.key, j), members, params["kind"]))
    return out


def run(cfg, overwrite: bool = False) -> Dict[str, object]:
    """Write the missing pairs; returns {pattern, written, already_there, skipped (reason -> count), kinds}."""
    from data.manifest import load_clip, load_clip_refs
    from data.write_shards import ShardWriter
    from prefdata.candidates import check_resumable
    from prefdata.face_track import TrackingError, face_model
    from reward.face import FaceNotFoundError

    section = cfg.distortions
    require(section, "distortions")
    out = Path(section.out)
    records = read_clips(section.clips)
    track_cfg = track_settings(section)
    track = Tracker(face_model(track_cfg), track_cfg, distortion_settings(section))
    first_shard, done = check_resumable(section, out, section.prefix, overwrite, "distortions", ())
    size = (section.height, section.width) if section.height is not None else None
    skipped: Dict[str, List[dict]] = {}
    people, pool = {}, {}
    for rec in records:  # every clip's people first: the pool of outsiders is the same however the run goes
        try:
            people[rec.key] = reference_people(rec, load_clip_refs(rec), track.model, track.cfg.box_margin)
        except FaceNotFoundError as err:
            skipped.setdefault("reference without a face", []).append({"clip": rec.key, "detail": str(err)})
            continue
        if rec.identity_ids:  # without ids, the same person in two clips would look like two people
            for person in people[rec.key]:
                pool.setdefault(person.identity_id, person)
    pool_list = [pool[k] for k in sorted(pool)]
    written, already, kinds = 0, 0, Counter()
    with ShardWriter(out, section.prefix, section.samples_per_shard, first_index=first_shard) as writer:
        for rec in records:
            if rec.key not in people:
                continue
            wanted = [pair_key(rec.key, j) for j in range(section.pairs_per_clip)]
            if all(k in done for k in wanted):
                already += len(wanted)
                continue
            video, fps = load_clip(rec, section.num_frames, size)
            try:
                pairs = make_clip_pairs(rec, video, load_clip_refs(rec), fps, people[rec.key], pool_list, section,
                                        track)
            except TrackingError as err:
                log.info("clip %s skipped: %s", rec.key, err)
                skipped.setdefault(err.reason, []).append({"clip": rec.key, "detail": str(err)})
                continue
            for key, members, kind in pairs:
                if key in done:
                    already += 1
                    continue
                writer.write(key, members)
                written, kinds[kind] = written + 1, kinds[kind] + 1
    pattern = writer.pattern if first_shard + len(writer.paths) else None
    counts = {reason: len(clips) for reason, clips in sorted(skipped.items())}
    report = {"clips": len(records), "pattern": pattern, "written": written, "already_there": already,
              "kinds_written": dict(sorted(kinds.items())), "skipped": counts, "skipped_clips": skipped}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{section.prefix}.report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"distortion pairs: {len(records)} clips, wrote {written} pairs ({already} already there; kinds "
          f"{dict(sorted(kinds.items()))}), skipped {sum(counts.values())} clips {counts}: {pattern}")
    for _, clips in sorted(skipped.items()):
        for clip in clips:
            print(f"  skipped {clip['clip']}: {clip['detail']}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    return tool_main(run, __doc__, "distortion_pairs", "remove the pair shards there and start over", argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
