"""The shard schema (see data/SCHEMA.md): member names, label/meta validation, encode and decode.

One module owns the schema so the writer, the reader, the demo and the synthetic-pair builder
cannot drift apart: they all build members with `prompt_members` / `preference_members` and read
them with `decode_members`. Validation errors carry the offending *field* so that callers can add
where it came from (manifest line, or shard and key).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any


from config import ExpectedError
from data.video import (
    MediaError,
    VideoInfo,
    check_image,
    decode_image,
    decode_video,
    encode_png,
)

SCHEMA_VERSION = 1
KINDS = ("prompt", "preference", "candidate")
PREFERENCES = ("a", "b", "tie")
LABEL_SOURCES = ("human", "auto", "synthetic")
DISTORTION_KINDS = ("swap", "drift", "exchange", "degrade")

PROMPT = "prompt.txt"
META = "meta.json"
LABEL = "label.json"
VIDEO_A = "a.mp4"
VIDEO_B = "b.mp4"
VIDEO = "video.mp4"
CANDIDATE = "candidate.json"
SAMPLERS = ("ode", "sde", "external")  # external: a video not sampled here (real footage, another model's output)
REF_RE = re.compile(r"^ref_(\d+)\.(png|jpg|jpeg)$")
# A key becomes the member-name prefix `<key>.<ext>`; WebDataset splits at the first dot of the
# basename, so a key must not contain dots (or slashes, which would create folders).
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")

_LABEL_FIELDS = {"preference", "source", "distortion", "extra"}
_META_FIELDS = {"schema_version", "num_people", "identity_ids", "source", "videos", "extra"}
_CANDIDATE_FIELDS = {"prompt_key", "generator", "checkpoint", "seed", "sampler", "extra"}
# Which videos a sample of each kind carries, by name in meta.videos (member `<name>.mp4`).
VIDEO_SLOTS = {"prompt": (), "preference": ("a", "b"), "candidate": ("video",)}


class SampleError(ExpectedError, ValueError):
    """A sample's content violates the schema; `field` names the member or JSON field at fault."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def ref_name(i: int) -> str:
    return f"ref_{i}.png"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise SampleError("key", f"{key!r} is not a valid key (letters, digits, '_' and '-', no dots, <= 80 chars)")
    return key


def derived_key(stem: str, suffix: str) -> str:
    """`<stem>-<suffix>`, a sample key made from another (a prompt key + generator and index, or + pair number); a
    hash of the stem stands for it where the key would pass the 80-character limit."""
    key = f"{stem}-{suffix}"
    return key if len(key) <= 80 else f"p{hashlib.sha256(stem.encode('utf-8')).hexdigest()[:16]}-{suffix}"


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SampleError("prompt", "must be a non-empty string")
    return prompt


def check_label(label: Any) -> dict[str, Any]:
    """Validate a label dict and return it normalised (distortion None or {kind, params}, extra {})."""
    if not isinstance(label, Mapping):
        raise SampleError("label", f"must be a JSON object, got {type(label).__name__}")
    unknown = set(label) - _LABEL_FIELDS
    if unknown:
        raise SampleError(f"label.{min(unknown)}", f"unknown field (allowed: {sorted(_LABEL_FIELDS)})")
    pref = label.get("preference")
    if pref not in PREFERENCES:
        raise SampleError("label.preference", f"must be one of {list(PREFERENCES)}, got {pref!r}")
    source = label.get("source")
    if source not in LABEL_SOURCES:
        raise SampleError("label.source", f"must be one of {list(LABEL_SOURCES)}, got {source!r}")
    distortion = label.get("distortion")
    if distortion is not None:
        if not isinstance(distortion, Mapping) or distortion.get("kind") not in DISTORTION_KINDS:
            raise SampleError("label.distortion.kind", f"must be one of {list(DISTORTION_KINDS)}, got "
                              f"{distortion.get('kind') if isinstance(distortion, Mapping) else distortion!r}")
        params = distortion.get("params", {})
        if not isinstance(params, Mapping):
            raise SampleError("label.distortion.params", "must be a JSON object")
        distortion = {"kind": distortion["kind"], "params": dict(params)}
    elif source == "synthetic":
        raise SampleError("label.distortion", "a synthetic pair must record its distortion {kind, params}")
    extra = label.get("extra", {})
    if not isinstance(extra, Mapping):
        raise SampleError("label.extra", "must be a JSON object")
    return {"preference": pref, "source": source, "distortion": distortion, "extra": dict(extra)}


def make_meta(num_people: int, identity_ids: Sequence[str] | None, source: str,
              videos: Mapping[str, VideoInfo] | None = None, extra: Mapping | None = None) -> dict[str, Any]:
    """Build a valid meta dict; identity ids default to 'unknown-<i>' (identity not known to be shared).
    The kind follows from `videos`: none (prompt), a and b (preference), video (candidate)."""
    ids = list(identity_ids) if identity_ids is not None else [f"unknown-{i}" for i in range(num_people)]
    meta = {"schema_version": SCHEMA_VERSION, "num_people": int(num_people), "identity_ids": ids,
            "source": source, "extra": dict(extra or {})}
    if videos is not None:
        meta["videos"] = {name: info.to_dict() for name, info in videos.items()}
    kind = next((k for k, slots in VIDEO_SLOTS.items() if set(slots) == set(videos or ())), "preference")
    return check_meta(meta, kind)


def check_meta(meta: Any, kind: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise SampleError("meta", f"must be a JSON object, got {type(meta).__name__}")
    unknown = set(meta) - _META_FIELDS
    if unknown:
        raise SampleError(f"meta.{min(unknown)}", f"unknown field (allowed: {sorted(_META_FIELDS)})")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SampleError("meta.schema_version", f"expected {SCHEMA_VERSION}, got {version!r}")
    n = meta.get("num_people")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SampleError("meta.num_people", f"must be an integer >= 1, got {n!r}")
    ids = meta.get("identity_ids")
    if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) and i for i in ids):
        raise SampleError("meta.identity_ids", f"must be {n} non-empty strings, got {ids!r}")
    if not isinstance(meta.get("source"), str):
        raise SampleError("meta.source", "must be a string")
    if not isinstance(meta.get("extra", {}), Mapping):
        raise SampleError("meta.extra", "must be a JSON object")
    if VIDEO_SLOTS[kind]:
        videos, slots = meta.get("videos"), VIDEO_SLOTS[kind]
        if not isinstance(videos, Mapping) or set(videos) != set(slots):
            raise SampleError("meta.videos", f"must hold the VideoInfo of {' and '.join(map(repr, slots))}")
        for name, info in videos.items():
            if not isinstance(info, Mapping) or not isinstance(info.get("num_frames"), int) or info["num_frames"] < 1:
                raise SampleError(f"meta.videos.{name}.num_frames", "must be an integer >= 1")
    return dict(meta)


def check_candidate(info: Any) -> dict[str, Any]:
    """Validate a candidate's provenance (candidate.json): which prompt, generator, checkpoint, seed and sampler
    made the video; returned normalised (extra {})."""
    if not isinstance(info, Mapping):
        raise SampleError("candidate", f"must be a JSON object, got {type(info).__name__}")
    unknown = set(info) - _CANDIDATE_FIELDS
    if unknown:
        raise SampleError(f"candidate.{min(unknown)}", f"unknown field (allowed: {sorted(_CANDIDATE_FIELDS)})")
    for name in ("prompt_key", "generator", "checkpoint"):
        if not isinstance(info.get(name), str) or not info[name]:
            raise SampleError(f"candidate.{name}", f"must be a non-empty string, got {info.get(name)!r}")
    seed = info.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SampleError("candidate.seed", f"must be an integer >= 0, got {seed!r}")
    if info.get("sampler") not in SAMPLERS:
        raise SampleError("candidate.sampler", f"must be one of {list(SAMPLERS)}, got {info.get('sampler')!r}")
    extra = info.get("extra", {})
    if not isinstance(extra, Mapping):
        raise SampleError("candidate.extra", "must be a JSON object")
    return {**{k: info[k] for k in _CANDIDATE_FIELDS - {"extra"}}, "extra": dict(extra)}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _ref_members(refs: Sequence[Any]) -> dict[str, bytes]:
    """Refs are uint8 (H, W, 3) arrays or already-encoded PNG bytes (validated by decoding)."""
    if len(refs) < 1:
        raise SampleError("refs", "a sample needs at least one reference image (one per person)")
    out = {}
    for i, ref in enumerate(refs):
        try:
            if isinstance(ref, (bytes, bytearray)):
                decode_image(bytes(ref))
                out[ref_name(i)] = bytes(ref)
            else:
                out[ref_name(i)] = encode_png(check_image(ref, f"refs[{i}]"))
        except MediaError as err:
            raise SampleError(f"refs[{i}]", str(err)) from None
    return out


def prompt_members(prompt: str, refs: Sequence[Any], meta: Mapping) -> dict[str, bytes]:
    """Members of one prompt sample: prompt.txt, ref_0.png.., meta.json (keys are member names)."""
    members = {PROMPT: check_prompt(prompt).encode("utf-8"), **_ref_members(refs)}
    meta = check_meta(meta, "prompt")
    if meta["num_people"] != len(refs):
        raise SampleError("meta.num_people", f"is {meta['num_people']} but there are {len(refs)} references")
    members[META] = _json(meta)
    return members


def preference_members(prompt: str, refs: Sequence[Any], video_a: bytes, video_b: bytes,
                       label: Mapping, meta: Mapping) -> dict[str, bytes]:
    """Members of one preference sample: a.mp4, b.mp4 (encoded), refs, prompt.txt, label.json, meta.json."""
    members = prompt_members(prompt, refs, {k: v for k, v in meta.items() if k != "videos"})
    members[META] = _json(check_meta(meta, "preference"))
    members[LABEL] = _json(check_label(label))
    members[VIDEO_A] = bytes(video_a)
    members[VIDEO_B] = bytes(video_b)
    return members


def candidate_members(prompt: str, refs: Sequence[Any], video: bytes, candidate: Mapping,
                      meta: Mapping) -> dict[str, bytes]:
    """Members of one candidate sample (one generated video, prefdata/candidates.py): video.mp4, refs, prompt.txt,
    candidate.json, meta.json."""
    members = prompt_members(prompt, refs, {k: v for k, v in meta.items() if k != "videos"})
    members[META] = _json(check_meta(meta, "candidate"))
    members[CANDIDATE] = _json(check_candidate(candidate))
    members[VIDEO] = bytes(video)
    return members


# ----------------------------------------------------------------------------- decoding


def _load_json(members: Mapping[str, bytes], name: str) -> Any:
    if name not in members:
        raise SampleError(name, "missing")
    try:
        return json.loads(members[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(name, f"invalid JSON ({err})") from None


def _ref_names(members: Mapping[str, Any], num_people: int) -> list[str]:
    """The reference images' member names in order, one per person; a missing or extra one is a SampleError."""
    found = {}
    for name in members:
        m = REF_RE.match(name)
        if m:
            found[int(m.group(1))] = name
    if not found:
        raise SampleError(ref_name(0), "missing: the sample has no reference image")
    for i in range(max(num_people, max(found) + 1)):
        if i not in found:
            raise SampleError(ref_name(i), f"missing (meta.num_people = {num_people}, refs found: "
                                           f"{sorted(found.values())})")
    if len(found) != num_people:
        raise SampleError("meta.num_people", f"is {num_people} but the sample has {len(found)} references")
    return [found[i] for i in range(num_people)]


def check_records(kind: str, members: Mapping[str, Any]) -> dict[str, Any]:
    """One sample's text and JSON members validated and every image and video it must have present, nothing decoded:
    what a run checks of every sample before it starts (data/reader.py require_intact); `members` maps each member
    name to its bytes (only the text and JSON ones are read). Returns {prompt, meta, ref_names} and, by kind, the
    label or the candidate info. Raises SampleError naming the member or field at fault."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if PROMPT not in members:
        raise SampleError(PROMPT, "missing")
    try:
        prompt = check_prompt(members[PROMPT].decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SampleError(PROMPT, f"not UTF-8 ({err})") from None
    meta = check_meta(_load_json(members, META), kind)
    out: dict[str, Any] = {"prompt": prompt, "meta": meta, "ref_names": _ref_names(members, meta["num_people"])}
    if kind == "preference":
        out["label"] = check_label(_load_json(members, LABEL))
    if kind == "candidate":
        out["candidate"] = check_candidate(_load_json(members, CANDIDATE))
    for slot in VIDEO_SLOTS[kind]:
        if f"{slot}.mp4" not in members:
            raise SampleError(f"{slot}.mp4", "missing")
    return out


def decode_members(kind: str, members: Mapping[str, bytes]) -> dict[str, Any]:
    """Decode one sample's members (name -> bytes) into python values, validating the schema (check_records first).

    prompt -> {prompt, refs, meta}; preference -> also {video_a, video_b, label}; candidate -> also {video,
    candidate}. Raises SampleError naming the member or field at fault.
    """
    checked = check_records(kind, members)
    meta = checked["meta"]
    refs = []
    for name in checked["ref_names"]:
        try:
            refs.append(decode_image(members[name]))
        except MediaError as err:
            raise SampleError(name, str(err)) from None
    out: dict[str, Any] = {"prompt": checked["prompt"], "refs": refs, "meta": meta}
    out.update({k: checked[k] for k in ("label", "candidate") if k in checked})
    for slot in VIDEO_SLOTS[kind]:
        name = f"{slot}.mp4"
        try:
            out[f"video_{slot}" if slot != "video" else "video"] = decode_video(
                members[name], meta["videos"][slot]["num_frames"])
        except MediaError as err:
            raise SampleError(name, str(err)) from None
    return out
