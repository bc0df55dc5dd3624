"""Face-identity reward: does each reference person appear, with their own face, in the video?

Why this design (DESIGN.md section 4):
- Faces are detected in `num_frames` frames spread uniformly over the clip (data.video's
  sample_frame_indices, the official reward's frames: with equal `num_frames` the VLM reward sees the
  same ones, which the config requires when both are used), embedded, and compared with the embedding of each
  reference image's face by cosine similarity.
- Per frame, detected faces are matched to reference identities by Hungarian assignment (maximising
  total similarity), so with several people every identity gets its *own* face: a clip that shows one
  person twice cannot score well for both identities, and the score does not depend on the order of
  the references.
- An identity left unmatched in a frame (fewer faces found than people) gets `missing_penalty` as its
  similarity there: a missing person must never look like a neutral zero by accident, so the value is
  explicit config. Tiny videos (e.g. the 32x32 CPU demo) contain no detectable face: every identity
  then scores `missing_penalty`, which is expected, not an error.
- Per identity the similarities are averaged over frames, then identities are combined by mean (the
  usual reward) or min (the worst-rendered person decides).
- A reference image in which no face is found raises FaceNotFoundError naming the reference: without
  its face the reward cannot know whom to look for, and guessing (e.g. embedding the whole image)
  would give a confident but meaningless score. The composite reward counts and masks such samples.
  If a reference shows several faces the largest is taken (references are portraits of one person).
- Backends: `dlib` (default, offline): HOG detector built into dlib, 5-point landmarks and the 128-d
  ResNet embedder whose weights ship in the PyPI package face-recognition-models. `arcface`: an
  insightface-style ArcFace ONNX model by local path (input 1x3x112x112 RGB, (x - 127.5) / 127.5;
  output 512-d) run by onnxruntime, on faces aligned from dlib's 5 landmarks (see `align_face`).
  Both backends use dlib for detection and landmarks.

Note on scale: dlib descriptors are not zero-centred, so cosine similarities of *different* people
are high too (about 0.8-0.9 on the test photographs, against about 0.95-1.0 for the same person).
The ranking is what GRPO uses (advantages are normalised per group), so no rescaling is applied.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from data.video import sample_frame_indices
from reward.inputs import ArrayLike, as_uint8_rgb

# Where dlib's 5 landmarks (in dlib's order: eye corners image-right outer/inner, image-left
# outer/inner, base of the nose) sit in the standard ArcFace 112x112 crop. Derived by fitting the
# insightface template (eye centres, nose tip, mouth corners) to dlib's 68-point landmarks on the
# test photographs (data/faces.py) and reading where the 5 points land; symmetrised about x = 56.
DLIB5_ARCFACE_112 = np.array([[81.8, 54.0], [67.4, 54.8], [30.2, 54.0], [44.6, 54.8], [56.0, 81.7]])
REFERENCE_CACHE_SIZE = 256


class FaceNotFoundError(ValueError):
    """No face was detected in a reference image, so the reward cannot know whom to look for."""


@dataclass(frozen=True)
class FaceScore:
    """One video's result. per_frame: (N, K) similarity of identity k in sampled frame n (the
    missing_penalty where unmatched); per_identity: (K,) mean over frames; found_frac: fraction of
    sampled frames in which every identity was matched to a face; num_faces: faces embedded per frame."""

    score: float
    per_identity: np.ndarray
    found_frac: float
    per_frame: np.ndarray
    num_faces: np.ndarray
    frame_indices: List[int]  # the frames looked at (sample_frame_indices, repeats removed)


def _face_model_dir() -> str:
    """Directory of face-recognition-models' weight files.

    Located without importing the package: its __init__ imports pkg_resources, which setuptools
    >= 81 no longer ships, so `import face_recognition_models` fails on a current stack.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("reward.face.backend=dlib needs the PyPI package face-recognition-models "
                          "(see requirements.txt)")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


@lru_cache(maxsize=1)
def _dlib_models():
    """(detector, 5-point shape predictor, ResNet recognizer), loaded once per process (~0.5 s)."""
    try:
        import dlib
    except ImportError as err:
        raise ImportError("the face reward needs dlib: install the PyPI package dlib-bin "
                          "(see requirements.txt)") from err
    d = _face_model_dir()
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(os.path.join(d, "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(os.path.join(d, "dlib_face_recognition_resnet_model_v1.dat")))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the rotation + uniform scale + translation mapping `src` points closest (least
    squares) to `dst`: x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty)."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    n = len(src)
    A = np.zeros((2 * n, 4))
    A[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], 1)
    A[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], 1)
    a, b, tx, ty = np.linalg.lstsq(A, dst.reshape(-1), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Crop the face with dlib 5-point `landmarks` (5, 2) into the ArcFace `size` x `size` frame
    (bilinear, borders replicated); uint8 (size, size, 3)."""
    M = similarity_transform(landmarks, DLIB5_ARCFACE_112 * (size / 112.0))
    inv = np.linalg.inv(M[:, :2])
    v, u = np.mgrid[0:size, 0:size].astype(float)
    src = inv @ (np.stack([u.ravel(), v.ravel()]) - M[:, 2:])  # (2, size*size) x, y in the image
    coords = [src[1], src[0]]
    out = np.stack([ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="nearest")
                    for c in range(3)], -1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(size, size, 3)


class _ArcFace:
    """ArcFace ONNX embedder on aligned 112x112 faces (insightface preprocessing)."""

    def __init__(self, model_path: Optional[str], mean: float = 127.5, std: float = 127.5):
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError("reward.face.backend=arcface needs the PyPI package onnxruntime "
                              "(pip install onnxruntime, or onnxruntime-gpu on GPU clusters)") from err
        if not model_path:
            raise ValueError("reward.face.backend=arcface needs reward.face.model_path (a local ArcFace .onnx file)")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"reward.face.model_path: no such ArcFace ONNX file: {model_path}")
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1  # deterministic and does not fight the trainer for cores
        self.session = onnxruntime.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.one_at_a_time = inp.shape[0] == 1  # many exported ArcFace models fix the batch size to 1
        self.mean, self.std = mean, std

    def __call__(self, image: np.ndarray, landmarks: List[np.ndarray]) -> np.ndarray:
        faces = np.stack([align_face(image, lm) for lm in landmarks]).astype(np.float32)
        blob = np.ascontiguousarray(((faces - self.mean) / self.std).transpose(0, 3, 1, 2))
        chunks = [blob[i:i + 1] for i in range(len(blob))] if self.one_at_a_time else [blob]
        out = np.concatenate([np.asarray(self.session.run(None, {self.input_name: c})[0]) for c in chunks])
        if out.ndim != 2 or out.shape[0] != len(landmarks):
            raise ValueError(f"reward.face.model_path: ArcFace model output has shape {out.shape}, "
                             f"expected ({len(landmarks)}, D)")
        return out.astype(np.float64)


class FaceIdentityReward:
    """Reward = how well each reference identity's face is rendered in the video (see module doc).

    Pure (no Ray, no DeepSpeed); callable as a composite RewardFn:
    `reward(videos, references_per_video, prompts=None) -> torch.Tensor (B,)`.
    """

    def __init__(self, backend: str = "dlib", model_path: Optional[str] = None, num_frames: int = 5,
                 aggregate: str = "mean", missing_penalty: float = 0.0, upsample: int = 1,
                 max_extra_faces: int = 2):
        if backend not in ("dlib", "arcface"):
            raise ValueError(f"reward.face.backend must be 'dlib' or 'arcface', got {backend!r}")
        if aggregate not in ("mean", "min"):
            raise ValueError(f"reward.face.aggregate must be 'mean' or 'min', got {aggregate!r}")
        if num_frames < 1:
            raise ValueError(f"reward.face.num_frames must be >= 1, got {num_frames}")
        if upsample < 0 or max_extra_faces < 0:
            raise ValueError(f"upsample and max_extra_faces must be >= 0, got {upsample}, {max_extra_faces}")
        if not np.isfinite(missing_penalty):
            raise ValueError(f"reward.face.missing_penalty must be finite, got {missing_penalty}")
        self.backend, self.num_frames, self.aggregate = backend, num_frames, aggregate
        self.missing_penalty = float(missing_penalty)
        # Each HOG upsampling pass doubles the image side: 0 finds faces >= ~80 px, 1 >= ~40 px (4x slower).
        self.upsample = upsample
        # At most K + max_extra_faces (largest) faces are embedded per frame: bounds cost on crowds,
        # while a spare face or two still lets the right face win the assignment.
        self.max_extra_faces = max_extra_faces
        self._detector, self._shapes, self._recognizer = _dlib_models()
        self._arcface = _ArcFace(model_path) if backend == "arcface" else None
        self._ref_cache: "OrderedDict[tuple, np.ndarray]" = OrderedDict()

    @classmethod
    def from_config(cls, face_cfg) -> "FaceIdentityReward":
        """From `cfg.reward.face` (FaceRewardConfig); `upsample` and `max_extra_faces` are optional there."""
        return cls(backend=face_cfg.backend, model_path=face_cfg.model_path, num_frames=face_cfg.num_frames,
                   aggregate=face_cfg.aggregate, missing_penalty=face_cfg.missing_penalty,
                   upsample=getattr(face_cfg, "upsample", 1), max_extra_faces=getattr(face_cfg, "max_extra_faces", 2))

    # ------------------------------------------------------------------ detection and embedding

    def _detect(self, image: np.ndarray, limit: Optional[int] = None):
        """dlib 5-point shapes of the faces in `image`, largest first (at most `limit`)."""
        rects = sorted(self._detector(image, self.upsample), key=lambda r: -r.area())
        return [self._shapes(image, r) for r in rects[:limit]]

    def _embed(self, image: np.ndarray, shapes) -> np.ndarray:
        """Unit-norm embeddings (n, D) of the detected faces."""
        if not shapes:
            return np.zeros((0, 1))
        if self._arcface is not None:
            emb = self._arcface(image, [np.array([[p.x, p.y] for p in s.parts()], float) for s in shapes])
        else:
            emb = np.array([np.array(self._recognizer.compute_face_descriptor(image, s)) for s in shapes])
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if not np.all(np.isfinite(emb)) or np.any(norms == 0):
            raise ValueError(f"face embedder ({self.backend}) returned a zero or non-finite embedding")
        return emb / norms

    def detect_and_embed(self, image: ArrayLike, limit: Optional[int] = None):
        """The faces in one image, largest first (at most `limit`): boxes (x0, y0, x1, y1), clipped to the image,
        exclusive) and unit-norm embeddings (n, D). What a face tracker needs (prefdata.face_track)."""
        image = as_uint8_rgb(image, 3, "image")
        shapes = self._detect(image, limit)
        height, width = image.shape[:2]
        boxes = [(max(s.rect.left(), 0), max(s.rect.top(), 0), min(s.rect.right() + 1, width),
                  min(s.rect.bottom() + 1, height)) for s in shapes]
        return boxes, self._embed(image, shapes)

    def embed_references(self, references: Sequence[ArrayLike], num_people: Optional[int] = None,
                         where: str = "") -> np.ndarray:
        """Unit-norm embeddings (K, D) of each reference's (largest) face; cached by image content,
        since all G videos of a GRPO group share their references."""
        pre = f"{where}: " if where else ""
        if isinstance(references, (np.ndarray, torch.Tensor)) and references.ndim == 4:
            references = list(references)  # a stack of K same-sized images
        if not isinstance(references, (list, tuple)) or len(references) == 0:
            raise ValueError(f"{pre}references must be a non-empty list of (H, W, 3) uint8 images, one per person")
        if num_people is not None and len(references) != num_people:
            raise ValueError(f"{pre}{len(references)} reference image(s) given for {num_people} expected people")
        out = []
        for k, ref in enumerate(references):
            img = as_uint8_rgb(ref, 3, f"{pre}reference {k}")
            key = (self.backend, self.upsample, img.shape, hashlib.blake2b(img.tobytes(), digest_size=16).digest())
            emb = self._ref_cache.get(key)
            if emb is None:
                shapes = self._detect(img, limit=1)
                if not shapes:
                    raise FaceNotFoundError(
                        f"{pre}reference {k} (of {len(references)}): no face detected in the {img.shape[1]}x"
                        f"{img.shape[0]} image (dlib HOG, upsample={self.upsample}); a reference must show "
                        f"the person's face, frontal and at least ~{80 >> self.upsample} px wide")
                emb = self._embed(img, shapes)[0]
                self._ref_cache[key] = emb
                if len(self._ref_cache) > REFERENCE_CACHE_SIZE:
                    self._ref_cache.popitem(last=False)
            else:
                self._ref_cache.move_to_end(key)
            out.append(emb)
        return np.stack(out)

    # ------------------------------------------------------------------ scoring

    def score_video(self, video: ArrayLike, references: Sequence[ArrayLike], num_people: Optional[int] = None,
                    where: str = "video") -> FaceScore:
        """Score one video (F, H, W, 3) uint8 against K reference images (one per person, any order).

        `num_people`, when given, must equal len(references) (a mismatch is a data error).
        """
        frames = as_uint8_rgb(video, 4, where)
        refs = self.embed_references(references, num_people, where)
        k = len(refs)
        idx = sorted(set(sample_frame_indices(len(frames), self.num_frames)))  # short clips: no repeats
        per_frame = np.full((len(idx), k), self.missing_penalty)
        num_faces = np.zeros(len(idx), dtype=np.int64)
        for row, t in enumerate(idx):
            frame = frames[t]
            emb = self._embed(frame, self._detect(frame, limit=k + self.max_extra_faces))
            num_faces[row] = len(emb)
            if len(emb):
                sim = refs @ emb.T  # (K identities, n faces)
                ids, faces = linear_sum_assignment(sim, maximize=True)
                per_frame[row, ids] = sim[ids, faces]
        per_identity = per_frame.mean(0)
        score = per_identity.mean() if self.aggregate == "mean" else per_identity.min()
        return FaceScore(float(score), per_identity, float(np.mean(num_faces >= k)), per_frame, num_faces, idx)

    def score_batch(self, videos: Sequence[ArrayLike], references_per_video: Sequence[Sequence[ArrayLike]],
                    num_people: Optional[Sequence[int]] = None) -> List[FaceScore]:
        """FaceScore per video; errors name the sample index."""
        if len(videos) != len(references_per_video):
            raise ValueError(f"face reward: {len(videos)} videos but {len(references_per_video)} reference lists")
        if num_people is not None and len(num_people) != len(videos):
            raise ValueError(f"face reward: {len(videos)} videos but {len(num_people)} num_people entries")
        return [self.score_video(v, r, None if num_people is None else num_people[i], where=f"sample {i}")
                for i, (v, r) in enumerate(zip(videos, references_per_video, strict=True))]

    def __call__(self, videos: Sequence[ArrayLike], references_per_video: Sequence[Sequence[ArrayLike]],
                 prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Scores (B,) float64; prompts are accepted for the RewardFn interface and not used."""
        return torch.tensor([s.score for s in self.score_batch(videos, references_per_video)], dtype=torch.float64)
