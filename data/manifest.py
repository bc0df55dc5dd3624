"""Input records for the shard writer: a JSONL manifest or a folder, validated before anything is written.

Why validate everything first: a half-written dataset whose bad record is discovered after an hour
of encoding is worse than an immediate list of every problem. Every error names where the record
came from (manifest path and line, or sample folder) and the field at fault, so it can be fixed
without guessing. See data/SCHEMA.md for both input formats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from config import ExpectedError
from data.schema import (
    KEY_RE,
    KINDS,
    SampleError,
    candidate_members,
    check_key,
    check_label,
    check_prompt,
    make_meta,
    preference_members,
    prompt_members,
)
from data.video import (
    DEFAULT_FPS,
    MediaError,
    decode_image,
    decode_video,
    decode_video_with_info,
    encode_png,
    encode_video,
    resize_center_crop,
    sample_frame_indices,
)

_PROMPT_FIELDS = {"key", "prompt", "refs", "identity_ids", "source", "extra"}
_PREF_FIELDS = _PROMPT_FIELDS | {"video_a", "video_b", "label", "num_frames"}
# External candidates (real footage, another model's videos) to pair with generated ones of the same prompt key.
_CAND_FIELDS = _PROMPT_FIELDS | {"video", "prompt_key", "generator", "num_frames"}
# Clean clips of real people (footage) with their reference photos: the input of prefdata.distortion_pairs, not a
# shard kind of their own.
_CLIP_FIELDS = _PROMPT_FIELDS | {"video", "num_frames"}
_FIELDS = {"prompt": _PROMPT_FIELDS, "preference": _PREF_FIELDS, "candidate": _CAND_FIELDS, "clip": _CLIP_FIELDS}
_REQUIRED = {"prompt": ["prompt", "refs"], "preference": ["prompt", "refs", "video_a", "video_b", "label"],
             "candidate": ["prompt", "refs", "video", "prompt_key", "generator"], "clip": ["prompt", "refs", "video"]}
INPUT_KINDS = (*KINDS, "clip")
_FOLDER_REF = re.compile(r"^ref_(\d+)\.(png|jpg|jpeg)$", re.IGNORECASE)


class ManifestError(ExpectedError, ValueError):
    """One or more input records are invalid; each line of the message names origin and field."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems  # (origin, field, reason)
        lines = [f"{origin}: field '{fld}': {reason}" for origin, fld, reason in problems[:50]]
        if len(problems) > 50:
            lines.append(f"... and {len(problems) - 50} more")
        super().__init__(f"{len(problems)} invalid record(s):\n  " + "\n  ".join(lines))


@dataclass
class Record:
    """One sample to write; paths are absolute. `origin` says where it came from, for errors."""

    origin: str
    kind: str
    key: str
    prompt: str
    refs: list[Path]
    identity_ids: list[str] | None = None
    source: str = "manifest"
    extra: dict[str, Any] = field(default_factory=dict)
    video_a: Path | None = None
    video_b: Path | None = None
    label: dict[str, Any] | None = None
    num_frames: int | None = None
    video: Path | None = None  # candidate records
    candidate: dict[str, Any] | None = None


def _problem(origin: str, fld: str, reason: str) -> ManifestError:
    return ManifestError([(origin, fld, reason)])


def _record_from_dict(obj: Any, kind: str, origin: str, base: Path, default_key: str, source: str) -> Record:
    if not isinstance(obj, dict):
        raise _problem(origin, "<record>", f"must be a JSON object, got {type(obj).__name__}")
    allowed = _FIELDS[kind]
    for name in obj:
        if name not in allowed:
            raise _problem(origin, name, f"unknown field for a {kind} record (allowed: {sorted(allowed)})")
    for name in _REQUIRED[kind]:
        if name not in obj:
            raise _problem(origin, name, "missing")
    refs = obj["refs"]
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise _problem(origin, "refs", "must be a list of image paths")
    if not refs:
        raise _problem(origin, "refs", "no references: a sample needs one reference image per person")
    ids = obj.get("identity_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(refs)
                            or not all(isinstance(i, str) and i for i in ids)):
        raise _problem(origin, "identity_ids", f"must be {len(refs)} non-empty strings (one per reference)")
    for name in ("video_a", "video_b", "video"):
        if name in obj and not isinstance(obj[name], str):
            raise _problem(origin, name, "must be a video path")
    for name in ("prompt_key", "generator"):
        if name in obj and not (isinstance(obj[name], str) and KEY_RE.match(obj[name])):
            raise _problem(origin, name, f"must be a key (letters, digits, '_', '-'; <= 80 chars), got {obj[name]!r}")
    num_frames = obj.get("num_frames")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise _problem(origin, "num_frames", f"must be an integer >= 1, got {num_frames!r}")
    if not isinstance(obj.get("extra", {}), dict):
        raise _problem(origin, "extra", "must be a JSON object")
    try:
        key = check_key(obj.get("key", default_key))
        prompt = check_prompt(obj["prompt"])
        label = check_label(obj["label"]) if kind == "preference" else None
    except SampleError as err:
        raise _problem(origin, err.field, err.reason) from None

    def path(p: str) -> Path:  # paths are relative to the manifest (or the sample folder)
        return (base / p).resolve()

    candidate = None
    if kind == "candidate":
        candidate = {"prompt_key": obj["prompt_key"], "generator": obj["generator"], "checkpoint": obj["generator"],
                     "seed": 0, "sampler": "external", "extra": {"file": obj["video"]}}
    return Record(origin, kind, key, prompt, [path(r) for r in refs], ids, str(obj.get("source", source)),
                  dict(obj.get("extra", {})), path(obj["video_a"]) if kind == "preference" else None,
                  path(obj["video_b"]) if kind == "preference" else None, label, num_frames,
                  path(obj["video"]) if kind in ("candidate", "clip") else None, candidate)


def _collect(items, make, problems: list | None = None) -> list[Record]:
    """Build records; problems go to `problems` if given (to be reported with later ones), else raise."""
    own = problems is None
    problems = [] if own else problems
    records, seen = [], {}
    for item in items:
        try:
            rec = make(item)
        except ManifestError as err:
            problems.extend(err.problems)
            continue
        if rec.key in seen:
            problems.append((rec.origin, "key", f"duplicate key {rec.key!r} (first used at {seen[rec.key]})"))
            continue
        seen[rec.key] = rec.origin
        records.append(rec)
    if own and problems:
        raise ManifestError(problems)
    return records


def read_manifest(path: str | Path, kind: str, problems: list | None = None) -> list[Record]:
    """Parse a JSONL manifest (one JSON object per line; blank lines ignored). Paths are relative to it.

    Invalid records raise ManifestError, or, when a `problems` list is given, are appended to it
    and left out (so the caller can report them together with file-level problems).
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise _problem(f"manifest {path}", "<file>", f"not UTF-8 text (byte {err.start}: {err.reason}); a manifest "
                       "is JSON lines in UTF-8") from None
    except OSError as err:
        raise _problem(f"manifest {path}", "<file>", f"cannot be read ({err.strerror or err})") from None
    if not any(line.strip() for line in lines):
        raise _problem(f"manifest {path}", "<file>", "has no record (empty, or blank lines only); a manifest is "
                       "one JSON object per line")

    def make(item):
        no, line = item
        origin = f"{path} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise _problem(origin, "<line>", f"invalid JSON ({err})") from None
        return _record_from_dict(obj, kind, origin, path.parent, f"{no:08d}", "manifest")

    return _collect(((no, line) for no, line in enumerate(lines, 1) if line.strip()), make, problems)


def read_folder(path: str | Path, kind: str, problems: list | None = None) -> list[Record]:
    """Parse a folder of sample folders: DIR/<key>/{prompt.txt, ref_<i>.png, [meta.json], and a.mp4, b.mp4, label.json
    (preference), video.mp4, candidate.json (candidate) or video.mp4 (clip)}."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")

    def make(sample_dir: Path) -> Record:
        origin = f"folder {sample_dir}"
        if not (sample_dir / "prompt.txt").is_file():
            raise _problem(origin, "prompt.txt", "missing")
        refs = sorted((int(m.group(1)), p.name) for p in sample_dir.iterdir() if (m := _FOLDER_REF.match(p.name)))
        if [i for i, _ in refs] != list(range(len(refs))):
            raise _problem(origin, "refs", f"ref_<i> images must be numbered 0..K-1, found {[n for _, n in refs]}")
        obj: dict[str, Any] = {"key": sample_dir.name, "refs": [n for _, n in refs],
                               "prompt": (sample_dir / "prompt.txt").read_text(encoding="utf-8")}
        for name, wanted in (("meta.json", ("identity_ids", "source", "extra")), ("label.json", None),
                             ("candidate.json", ("prompt_key", "generator"))):
            file = sample_dir / name
            if not file.is_file():
                if (name, kind) in (("label.json", "preference"), ("candidate.json", "candidate")):
                    raise _problem(origin, name, "missing")
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise _problem(origin, name, f"invalid JSON ({err})") from None
            if wanted is None:
                obj["label"] = data
            elif not isinstance(data, dict) or set(data) - set(wanted):
                raise _problem(origin, name, f"must be a JSON object with fields among {list(wanted)}")
            else:
                obj.update(data)
        if kind == "preference":
            obj["video_a"], obj["video_b"] = "a.mp4", "b.mp4"
        if kind in ("candidate", "clip"):
            obj["video"] = "video.mp4"
        return _record_from_dict(obj, kind, origin, sample_dir, sample_dir.name, "folder")

    return _collect(sorted(p for p in root.iterdir() if p.is_dir()), make, problems)


def _read_bytes(rec: Record, fld: str, path: Path) -> bytes:
    if not path.is_file():
        raise _problem(rec.origin, fld, f"file not found: {path}")
    return path.read_bytes()


def _load_video(rec: Record, fld: str, path: Path, num_frames: int | None,
                size: tuple[int, int] | None, fps: float | None, resample: bool = False):
    data = _read_bytes(rec, fld, path)
    try:
        video, info = decode_video_with_info(data, None if resample else num_frames)
    except MediaError as err:
        raise _problem(rec.origin, fld, f"{err} ({path})") from None
    rate = fps or info.fps or DEFAULT_FPS
    retimed = resample and num_frames is not None and video.shape[0] != num_frames
    if retimed:
        # Real clips rarely have the model's 4k+1 frames: take `num_frames` frames spread uniformly over the clip,
        # first and last included (the frames the rewards sample too), at the rate that keeps its duration.
        if not fps:
            rate = rate * num_frames / video.shape[0]
        video = video[sample_frame_indices(video.shape[0], num_frames)]
    if retimed or size is not None or path.suffix.lower() != ".mp4" or (fps and abs(fps - info.fps) > 1e-6):
        if size is not None:
            video = resize_center_crop(video, *size)
        data = encode_video(video, fps=rate)
        video, info = decode_video_with_info(data, video.shape[0])
    return data, info


def load_record(rec: Record, num_frames: int | None = None, video_size: tuple[int, int] | None = None,
                fps: float | None = None, resample_frames: bool = False) -> dict[str, bytes]:
    """Read, check and encode one record into shard members. Raises ManifestError naming origin and field.

    num_frames: required frame count of both videos (the record's own `num_frames` wins).
    resample_frames: a video with another frame count is resampled to `num_frames` (uniform over the clip,
        duration kept) instead of refused.
    video_size: (height, width) to resize and centre-crop videos to (re-encoded); None keeps mp4 bytes.
    fps: frame rate to re-encode at; None keeps the source's rate.
    """
    refs = []
    for i, path in enumerate(rec.refs):
        data = _read_bytes(rec, f"refs[{i}]", path)
        try:
            refs.append(encode_png(decode_image(data)))  # normalise to RGB PNG
        except MediaError as err:
            raise _problem(rec.origin, f"refs[{i}]", f"unreadable image: {err} ({path})") from None
    try:
        if rec.kind == "prompt":
            meta = make_meta(len(refs), rec.identity_ids, rec.source, extra=rec.extra)
            return prompt_members(rec.prompt, refs, meta)
        expected = rec.num_frames if rec.num_frames is not None else num_frames
        if rec.kind == "candidate":
            video, info = _load_video(rec, "video", rec.video, expected, video_size, fps, resample_frames)
            meta = make_meta(len(refs), rec.identity_ids, rec.source, {"video": info}, rec.extra)
            return candidate_members(rec.prompt, refs, video, rec.candidate, meta)
        a, info_a = _load_video(rec, "video_a", rec.video_a, expected, video_size, fps, resample_frames)
        b, info_b = _load_video(rec, "video_b", rec.video_b, expected, video_size, fps, resample_frames)
        meta = make_meta(len(refs), rec.identity_ids, rec.source, {"a": info_a, "b": info_b}, rec.extra)
        return preference_members(rec.prompt, refs, a, b, rec.label, meta)
    except SampleError as err:
        raise _problem(rec.origin, err.field, err.reason) from None


def load_clip_refs(rec: Record) -> list[np.ndarray]:
    """A record's reference photos, decoded uint8 (H, W, 3); ManifestError names the record and the photo."""
    refs = []
    for i, path in enumerate(rec.refs):
        try:
            refs.append(decode_image(_read_bytes(rec, f"refs[{i}]", path)))
        except MediaError as err:
            raise _problem(rec.origin, f"refs[{i}]", f"unreadable image: {err} ({path})") from None
    return refs


def load_clip(rec: Record, num_frames: int | None = None,
              video_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """A clip record's frames uint8 (F, H, W, 3) and frame rate, decoded; resampled to `num_frames` (uniform over
    the clip; the record's own `num_frames` wins, as in load_record) and resized as load_record does. Raises
    ManifestError naming origin and field."""
    if rec.kind != "clip":
        raise ValueError(f"{rec.origin}: a {rec.kind} record is not a clip")
    expected = rec.num_frames if rec.num_frames is not None else num_frames
    data, info = _load_video(rec, "video", rec.video, expected, video_size, None, resample=True)
    return decode_video(data), float(info.fps)


def validate_records(records: list[Record], problems: list | None = None, **load_kwargs) -> None:
    """Load every record (nothing is written); raise one ManifestError listing every problem
    (including `problems` found earlier, e.g. while parsing)."""
    problems = list(problems or [])
    for rec in records:
        try:
            load_record(rec, **load_kwargs)
        except ManifestError as err:
            problems.extend(err.problems)
    if problems:
        raise ManifestError(problems)
