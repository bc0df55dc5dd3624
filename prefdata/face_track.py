"""Each reference person's face box in every frame of a real clip: what a synthetic distortion edits.

Why tracking and not detection alone: a distortion needs the box of *this* person in *every* frame it
touches (data/distort.py), but a detector answers per frame, without names, and misses frames (motion blur,
a turned head). The tracker names each detection by embedding and bridges short misses:

1. every frame: faces detected and embedded (reward.face's dlib HOG detector and ResNet embedder, or ArcFace);
2. every frame: detections assigned to the reference identities by Hungarian assignment on cosine similarity
   plus `iou_weight` x the overlap with the person's last box (identity decides; position breaks near-ties
   between look-alikes); an assignment below `min_similarity` is no match (a stranger is nobody);
3. per person: frames without a match are filled by linear interpolation between the neighbouring matches
   (held at the clip's ends), at most `max_gap` consecutive frames; a longer miss fails the clip;
4. a match whose box does not overlap the person's previous box at all after a one-frame step is an identity
   switch or a false detection: the clip fails rather than paste a face in the wrong place;
5. boxes widened by `box_margin` of their side on every side: dlib's box runs from the brows to the chin, the
   face with hair and jaw line is about a quarter larger (measured on data/faces.py's photographs: the detector's
   box is 0.81 of a `crop_face(margin=0.15)` patch's side, hence 0.12 per side).

A clip that cannot be tracked raises TrackingError with the reason, which prefdata.distortion_pairs counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

Box = tuple[int, int, int, int]


class TrackingError(ValueError):
    """The clip cannot be tracked; `reason` is a short category for the skip counts, the message the details."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class TrackConfig:
    backend: str = "dlib"  # face embedder, as reward.face.backend: dlib | arcface (with model_path)
    model_path: Optional[str] = None
    upsample: int = 1  # dlib HOG upsampling passes: 0 finds faces >= ~80 px, 1 >= ~40 px (4x slower)
    box_margin: float = 0.12
    max_gap: int = 2
    min_similarity: float = 0.93
    iou_weight: float = 0.05
    max_extra_faces: int = 2  # detections embedded per frame beyond the number of people (largest first)

    def __post_init__(self):
        if self.backend not in ("dlib", "arcface") or self.upsample < 0:
            raise ValueError(f"tracking.backend must be dlib or arcface and upsample >= 0, got {self.backend!r}, "
                             f"{self.upsample}")
        if not 0 <= self.box_margin <= 1:
            raise ValueError(f"tracking.box_margin must be in [0, 1], got {self.box_margin}")
        if self.max_gap < 0 or self.max_extra_faces < 0:
            raise ValueError(f"tracking.max_gap and max_extra_faces must be >= 0, got {self.max_gap}, "
                             f"{self.max_extra_faces}")
        if not -1 <= self.min_similarity <= 1 or self.iou_weight < 0:
            raise ValueError(f"tracking.min_similarity must be in [-1, 1] and iou_weight >= 0, got "
                             f"{self.min_similarity}, {self.iou_weight}")


@dataclass(frozen=True)
class Track:
    """boxes int64 (F, P, 4) x0 y0 x1 y1 exclusive, widened, inside the frame; found bool (F, P): matched in that
    frame (else interpolated); similarity (F, P): the match's cosine similarity (nan where not found)."""

    boxes: np.ndarray
    found: np.ndarray
    similarity: np.ndarray


def box_iou(a, b) -> float:
    """Intersection over union of two x0 y0 x1 y1 boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_frames(detections, references: np.ndarray, cfg: TrackConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the detection assigned to each reference person (steps 2 and 4).

    detections: per frame (boxes list, embeddings (n, D)); references: (P, D) unit embeddings.
    Returns raw boxes float (F, P, 4) (nan where unmatched) and similarities (F, P) (nan where unmatched)."""
    num_people = len(references)
    boxes = np.full((len(detections), num_people, 4), np.nan)
    sims = np.full((len(detections), num_people), np.nan)
    last: list[tuple[int, Box] | None] = [None] * num_people
    for t, (found, emb) in enumerate(detections):
        keep = [j for j, b in enumerate(found) if b[2] > b[0] and b[3] > b[1]]  # a box clipped to nothing is no face
        found, emb = [found[j] for j in keep], np.asarray(emb)[keep]
        if not found:
            continue
        sim = references @ np.asarray(emb).T  # (P, n)
        score = sim.copy()
        for p, prev in enumerate(last):
            if prev is not None:
                score[p] += cfg.iou_weight * np.array([box_iou(prev[1], b) for b in found])
        for p, j in zip(*linear_sum_assignment(score, maximize=True), strict=True):
            if sim[p, j] < cfg.min_similarity:
                continue
            prev = last[p]
            if prev is not None and t - prev[0] == 1 and box_iou(prev[1], found[j]) == 0:
                raise TrackingError("identity switch", f"person {p}'s face jumps between frames {prev[0]} and {t} "
                                    f"({list(prev[1])} -> {list(found[j])}) without overlapping")
            boxes[t, p], sims[t, p] = found[j], sim[p, j]
            last[p] = (t, tuple(found[j]))
    return boxes, sims


def fill_gaps(boxes: np.ndarray, max_gap: int, names) -> np.ndarray:
    """Step 3: linear interpolation over unmatched frames (held at the ends); a run of more than `max_gap` unmatched
    frames raises TrackingError naming the person."""
    out = boxes.copy()
    frames = np.arange(len(boxes))
    for p in range(boxes.shape[1]):
        hit = ~np.isnan(boxes[:, p, 0])
        if not hit.any():
            raise TrackingError("face not found", f"person {p} ({names[p]}) matched in none of {len(boxes)} frames")
        longest = current = 0
        for t in range(len(boxes)):
            current = 0 if hit[t] else current + 1
            longest = max(longest, current)
        if longest > max_gap:
            raise TrackingError("face lost", f"person {p} ({names[p]}) unmatched in {longest} consecutive frames "
                                f"(tracking.max_gap {max_gap}); matched in {int(hit.sum())} of {len(boxes)}")
        for c in range(4):
            out[:, p, c] = np.interp(frames, frames[hit], boxes[hit, p, c])
    return out


def widen(boxes: np.ndarray, margin: float, height: int, width: int) -> np.ndarray:
    """Step 5: each side moved out by `margin` x the box's side, rounded, clipped to the frame, at least 2x2."""
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    out = np.stack([np.floor(x0 - dx), np.floor(y0 - dy), np.ceil(x1 + dx), np.ceil(y1 + dy)], -1)
    out = np.clip(out, 0, [width, height, width, height]).astype(np.int64)
    out[..., 2] = np.maximum(out[..., 2], np.minimum(out[..., 0] + 2, width))
    out[..., 3] = np.maximum(out[..., 3], np.minimum(out[..., 1] + 2, height))
    out[..., 0] = np.minimum(out[..., 0], out[..., 2] - 2)
    out[..., 1] = np.minimum(out[..., 1], out[..., 3] - 2)
    return out


def face_model(cfg: TrackConfig):
    """The detector and embedder the tracker uses: reward.face's, with the tracker's backend and upsampling."""
    from reward.face import FaceIdentityReward

    return FaceIdentityReward(backend=cfg.backend, model_path=cfg.model_path, upsample=cfg.upsample)


def track_faces(video: np.ndarray, references: np.ndarray, face_model, cfg: TrackConfig | None = None,
                names=None) -> Track:
    """Track each reference person (references: (P, D) unit embeddings, from face_model.embed_references) through
    the uint8 (F, H, W, 3) `video`; face_model: a reward.face.FaceIdentityReward. Raises TrackingError."""
    cfg = cfg or TrackConfig()
    names = list(names) if names is not None else [f"person {p}" for p in range(len(references))]
    limit = len(references) + cfg.max_extra_faces
    detections = [face_model.detect_and_embed(frame, limit) for frame in video]
    raw, sims = match_frames(detections, references, cfg)
    boxes = widen(fill_gaps(raw, cfg.max_gap, names), cfg.box_margin, video.shape[1], video.shape[2])
    return Track(boxes, ~np.isnan(sims), sims)
