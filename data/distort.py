"""Synthetic identity distortions: the negative half of a preference pair, from a clean clip.

Why: human-labelled identity pairs are scarce; a clean clip plus a controlled identity error is
a free, unambiguous pair (the clean clip is preferred). The four kinds mirror the failure modes of
multi-person generation the reward model must notice:
- swap:     one person's face is replaced by another identity's face over a span of frames;
- drift:    one person's face blends gradually toward another identity across frames;
- exchange: two people's identities are exchanged (each shows the other's face) over a span;
- degrade:  one face is blurred, warped or colour-shifted (identity made ambiguous).

Contract (tested): only pixels inside the targeted person's face box (boxes, for exchange) in the
affected frames may change; every other pixel of the clip is bit-identical. Edits are blended with
a soft ellipse inside the box, so the corners of a box may stay unchanged as well.

Reproducibility: `sample_params` draws everything from a numpy Generator into a JSON-able params
dict, and `apply_distortion(video, boxes, faces, params)` is a pure function of it; the params are
stored in the pair's label.json, so a pair can be rebuilt from the clean clip, its boxes, the
identity faces and its label.

Conventions: video uint8 (F, H, W, 3); boxes int (F, P, 4) as x0, y0, x1, y1 (exclusive) per frame
and person, inside the frame; faces: one uint8 (h, w, 3) face image per identity, the first P being
the persons of the clip in order, any further ones outsiders that a swap or drift may bring in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from data.schema import DISTORTION_KINDS
from data.video import check_video, resize_center_crop

DEGRADE_OPS = ("blur", "warp", "color")


@dataclass
class DistortionConfig:
    """Which kinds to draw from and how strong. severity in (0, 1]: span fraction for swap/exchange,
    final blend weight for drift, strength for degrade."""

    kinds: tuple[str, ...] = DISTORTION_KINDS
    min_severity: float = 0.4
    max_severity: float = 1.0
    degrade_ops: tuple[str, ...] = DEGRADE_OPS

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in DISTORTION_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"distortion kinds must be a non-empty subset of {DISTORTION_KINDS}, got {self.kinds}")
        if not 0 < self.min_severity <= self.max_severity <= 1:
            raise ValueError("need 0 < min_severity <= max_severity <= 1, "
                             f"got {self.min_severity}, {self.max_severity}")
        if not self.degrade_ops or any(o not in DEGRADE_OPS for o in self.degrade_ops):
            raise ValueError(f"degrade_ops must be a non-empty subset of {DEGRADE_OPS}")


def check_boxes(boxes: np.ndarray, video_shape: Sequence[int]) -> np.ndarray:
    """Validate (F, P, 4) integer boxes against a (F, H, W, 3) video; returns an int64 array."""
    b = np.asarray(boxes)
    f, h, w = video_shape[:3]
    if b.ndim != 3 or b.shape[0] != f or b.shape[2] != 4 or b.shape[1] < 1:
        raise ValueError(f"boxes must have shape (F={f}, P, 4), got {b.shape}")
    b = b.astype(np.int64)
    if (b[..., 0] < 0).any() or (b[..., 1] < 0).any() or (b[..., 2] > w).any() or (b[..., 3] > h).any() \
            or (b[..., 2] - b[..., 0] < 2).any() or (b[..., 3] - b[..., 1] < 2).any():
        raise ValueError(f"boxes must lie inside the {w}x{h} frame and be at least 2x2")
    return b


def feasible_kinds(num_people: int, num_faces: int, kinds: Sequence[str] = DISTORTION_KINDS) -> list[str]:
    """Kinds that make sense for a clip: exchange needs 2 people; swap/drift need a second identity."""
    ok = []
    for k in kinds:
        if k == "exchange" and num_people < 2:
            continue
        if k in ("swap", "drift") and num_faces < 2:
            continue
        ok.append(k)
    return ok


def sample_params(kind: str, rng: np.random.Generator, num_people: int, num_faces: int, num_frames: int,
                  cfg: DistortionConfig | None = None) -> dict[str, Any]:
    """Draw the full, JSON-able parameters of one distortion of `kind`."""
    cfg = cfg or DistortionConfig()
    if kind not in feasible_kinds(num_people, num_faces, (kind,)):
        raise ValueError(f"distortion {kind!r} is not possible with {num_people} people and {num_faces} identities")
    s = float(rng.uniform(cfg.min_severity, cfg.max_severity))
    span = max(1, round(s * num_frames))
    start = int(rng.integers(0, num_frames - span + 1))
    person = int(rng.integers(num_people))
    p: dict[str, Any] = {"kind": kind, "severity": round(s, 6), "person": person}
    if kind in ("swap", "drift"):
        others = [i for i in range(num_faces) if i != person]
        p["identity"] = int(others[int(rng.integers(len(others)))])
        p["frames"] = [start, start + span] if kind == "swap" else [int(rng.integers(0, num_frames)), num_frames]
    elif kind == "exchange":
        other = int(rng.choice([i for i in range(num_people) if i != person]))
        p["persons"] = [person, other]
        p["frames"] = [start, start + span]
        del p["person"]
    else:
        op = str(cfg.degrade_ops[int(rng.integers(len(cfg.degrade_ops)))])
        p.update(op=op, frames=[0, num_frames])
        if op == "blur":
            p["sigma_frac"] = round(0.03 + 0.1 * s, 6)  # gaussian sigma as a fraction of the box size
        elif op == "warp":
            p["amplitude_frac"] = round(0.04 + 0.1 * s, 6)
            p["phase"] = round(float(rng.uniform(0, 2 * np.pi)), 6)
        else:
            direction = rng.normal(size=3)
            p["shift"] = [round(float(v), 3) for v in (40 + 60 * s) * direction / np.linalg.norm(direction)]
    return p


def _ellipse(h: int, w: int) -> np.ndarray:
    """Soft elliptical mask in [0, 1] filling an h x w box, 0 at its corners, 1 in its middle."""
    y = (np.arange(h) + 0.5 - h / 2) / (h / 2)
    x = (np.arange(w) + 0.5 - w / 2) / (w / 2)
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    return np.clip((1.0 - r) / 0.25, 0.0, 1.0).astype(np.float32)


def _blend(frame: np.ndarray, box, patch: np.ndarray, alpha: float) -> None:
    """In place: blend `patch` (box-sized, float) into `frame` inside `box` with the ellipse times alpha."""
    x0, y0, x1, y1 = (int(v) for v in box)
    region = frame[y0:y1, x0:x1]
    m = (alpha * _ellipse(y1 - y0, x1 - x0))[..., None]
    mixed = np.rint(region.astype(np.float32) * (1 - m) + patch * m)
    frame[y0:y1, x0:x1] = np.where(m > 0, np.clip(mixed, 0, 255), region).astype(np.uint8)


def _face_patch(face: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    return resize_center_crop(face, y1 - y0, x1 - x0).astype(np.float32)


def _degrade(region: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    h, w = region.shape[:2]
    x = region.astype(np.float32)
    op = params["op"]
    if op == "blur":
        sigma = params["sigma_frac"] * max(h, w)
        return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    if op == "warp":
        amp, phase = params["amplitude_frac"] * max(h, w), params["phase"]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        sy = yy + amp * np.sin(2 * np.pi * xx / max(w / 2, 1) + phase)
        sx = xx + amp * np.sin(2 * np.pi * yy / max(h / 2, 1) + phase)
        return np.stack([ndimage.map_coordinates(x[..., c], [sy, sx], order=1, mode="reflect")
                         for c in range(3)], axis=-1)
    if op == "color":
        return np.clip(x + np.asarray(params["shift"], dtype=np.float32), 0, 255)
    raise ValueError(f"unknown degrade op {op!r}")


def apply_distortion(video: np.ndarray, boxes: np.ndarray, faces: Sequence[np.ndarray],
                     params: dict[str, Any]) -> np.ndarray:
    """Return a distorted copy of `video` as described by `params` (from `sample_params`)."""
    video = check_video(video)
    boxes = check_boxes(boxes, video.shape)
    out = video.copy()
    kind = params["kind"]
    t0, t1 = params["frames"]
    if not 0 <= t0 < t1 <= video.shape[0]:
        raise ValueError(f"distortion frames {params['frames']} outside the {video.shape[0]}-frame clip")
    for t in range(t0, t1):
        if kind in ("swap", "drift"):
            box = boxes[t, params["person"]]
            alpha = 1.0 if kind == "swap" else params["severity"] * (t - t0 + 1) / (t1 - t0)
            _blend(out[t], box, _face_patch(faces[params["identity"]], box), alpha)
        elif kind == "exchange":
            p, q = params["persons"]
            _blend(out[t], boxes[t, p], _face_patch(faces[q], boxes[t, p]), 1.0)
            _blend(out[t], boxes[t, q], _face_patch(faces[p], boxes[t, q]), 1.0)
        elif kind == "degrade":
            x0, y0, x1, y1 = boxes[t, params["person"]]
            _blend(out[t], (x0, y0, x1, y1), _degrade(video[t, y0:y1, x0:x1], params), 1.0)
        else:
            raise ValueError(f"unknown distortion kind {kind!r}")
    return out


def affected_region(boxes: np.ndarray, params: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Boolean (F, H, W) mask of the pixels `params` may change: the target box(es) in the target frames."""
    boxes = np.asarray(boxes)
    mask = np.zeros((boxes.shape[0], height, width), dtype=bool)
    persons = params["persons"] if params["kind"] == "exchange" else [params["person"]]
    for t in range(*params["frames"]):
        for p in persons:
            x0, y0, x1, y1 = boxes[t, p]
            mask[t, y0:y1, x0:x1] = True
    return mask


# ----------------------------------------------------------------------------- pairs and shards


@dataclass
class CleanClip:
    """A clean multi-person clip with what a distortion needs (see the module docstring)."""

    key: str
    prompt: str
    video: np.ndarray  # uint8 (F, H, W, 3)
    boxes: np.ndarray  # int (F, P, 4)
    faces: list[np.ndarray]  # identity faces pasted by swaps: P persons first, then outsiders
    refs: list[np.ndarray]  # one reference image per person (what the sample stores)
    identity_ids: list[str]  # one per person
    outsider_ids: list[str] | None = None  # ids of faces[P:], if known
    fps: float = 16.0
    source: str = "synthetic"


def make_pair(clip: CleanClip, rng: np.random.Generator, cfg: DistortionConfig | None = None,
              kind: str | None = None, extra: dict[str, Any] | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Distort `clip` and build a preference sample (members) whose label prefers the clean video.

    The clean video goes to slot a or b at random (so position carries no signal); the label
    records source=synthetic and the distortion's kind and full params; meta.extra holds the face
    boxes and `extra`. Returns (members, params).
    """
    from data.schema import make_meta, preference_members
    from data.video import VideoInfo, encode_video

    cfg = cfg or DistortionConfig()
    num_people = len(clip.refs)
    if kind is None:
        options = feasible_kinds(num_people, len(clip.faces), cfg.kinds)
        if not options:
            raise ValueError(f"clip {clip.key}: none of {cfg.kinds} is possible with {num_people} people")
        kind = options[int(rng.integers(len(options)))]
    params = sample_params(kind, rng, num_people, len(clip.faces), clip.video.shape[0], cfg)
    if "identity" in params:  # name the identity brought in, for humans reading label.json
        names = list(clip.identity_ids) + list(clip.outsider_ids or [])
        q = params["identity"]
        params["identity_id"] = names[q] if q < len(names) else f"outsider-{q - num_people}"
    distorted = apply_distortion(clip.video, clip.boxes, clip.faces, params)
    clean_slot = "a" if rng.random() < 0.5 else "b"
    videos = {clean_slot: clip.video, ("b" if clean_slot == "a" else "a"): distorted}
    encoded = {slot: encode_video(v, fps=clip.fps) for slot, v in videos.items()}
    infos = {slot: VideoInfo(*v.shape[:1], float(clip.fps), *v.shape[1:3]) for slot, v in videos.items()}
    label = {"preference": clean_slot, "source": "synthetic", "distortion": {"kind": kind, "params": params}}
    meta = make_meta(num_people, clip.identity_ids, clip.source, infos,
                     extra={**(extra or {}), "face_boxes": np.asarray(clip.boxes).astype(int).tolist()})
    return preference_members(clip.prompt, clip.refs, encoded["a"], encoded["b"], label, meta), params


def write_pairs(clips, out_dir: str, prefix: str = "pairs", seed: int = 0, cfg: DistortionConfig | None = None,
                max_samples_per_shard: int = 1000, kinds: Sequence[str | None] | None = None) -> list[str]:
    """Write one synthetic pair per clean clip into preference shards; returns the shard paths.

    Clip i draws from Generator(seed, i), so each pair is reproducible on its own. `kinds`, if
    given, forces the kind of pair i (None entries draw from cfg).
    """
    from data.write_shards import ShardWriter

    with ShardWriter(out_dir, prefix, max_samples_per_shard) as writer:
        for i, clip in enumerate(clips):
            kind = kinds[i] if kinds is not None else None
            members, _ = make_pair(clip, np.random.default_rng([seed, i]), cfg, kind)
            writer.write(clip.key, members)
    return writer.paths
