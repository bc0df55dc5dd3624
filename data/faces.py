"""Real face photographs that ship inside installed PyPI packages, and face cropping with dlib.

Why: demo and test data must show real human faces (the face reward and the identity reward
model are meaningless on drawn blobs) yet the machines have no network. A search of every image
file in the venv (scikit-image's `skimage/data`, matplotlib's `mpl-data/sample_data`, test
folders of other packages) finds three photographs of distinct real people:

- Eileen Collins (NASA astronaut portrait): `skimage.data.astronaut()`; dlib's frontal detector
  finds the face.
- Grace Hopper (US Navy portrait): matplotlib's `sample_data/grace_hopper.jpg`; detected too.
- The "cameraman" (`skimage.data.camera()`, greyscale): the face is in three-quarter profile and
  dlib's *frontal* detector misses it, so its face box is fixed below (checked by eye).

Not usable as identities: `skimage.data.lfw_subset()` has 100 real faces but only at 25x25 grey and
without identity labels (the same person may appear twice); `no_time_for_that_tiny.gif` is 14x25
pixels; `chelsea` is a cat. So the demo has exactly three identities; samples with up to three
people use distinct ones, and a "swap to an outsider" always uses one of these three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data.video import check_image, resize_center_crop

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels


@dataclass(frozen=True)
class FacePhoto:
    identity_id: str
    description: str  # what the prompt calls this person
    source: str  # where the photograph ships
    image: np.ndarray  # uint8 (H, W, 3)
    face_box: Box
    detected: bool  # True: found by dlib's frontal detector; False: fixed box (see module doc)


def _grace_hopper() -> np.ndarray:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _camera() -> np.ndarray:
    from skimage import data

    grey = data.camera()
    return np.repeat(grey[:, :, None], 3, axis=2)


# identity id, description, source, loader, fixed face box (None: detect with dlib)
_PHOTOS: list[tuple[str, str, str, Callable[[], np.ndarray], Box | None]] = [
    ("eileen_collins", "a woman with short brown hair in an orange flight suit",
     "scikit-image: skimage.data.astronaut()", _astronaut, None),
    ("grace_hopper", "an older woman in a dark naval uniform",
     "matplotlib: mpl-data/sample_data/grace_hopper.jpg", _grace_hopper, None),
    ("cameraman", "a young man with dark hair in a black coat",
     "scikit-image: skimage.data.camera()", _camera, (172, 100, 262, 190)),
]


def detect_faces(image: np.ndarray, upsample: int = 0) -> list[Box]:
    """Face boxes found by dlib's HOG frontal detector (weights built into dlib), largest first."""
    detector = _detector()
    rects = detector(check_image(image), upsample)
    boxes = [(max(r.left(), 0), max(r.top(), 0), min(r.right(), image.shape[1]), min(r.bottom(), image.shape[0]))
             for r in rects]
    return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


@lru_cache(maxsize=1)
def _detector():
    import dlib

    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def load_face_photos() -> tuple[FacePhoto, ...]:
    """The three real identities (see module docstring), with their face boxes."""
    photos = []
    for identity, description, source, load, fixed in _PHOTOS:
        image = load()
        if fixed is None:
            boxes = detect_faces(image)
            if not boxes:
                raise RuntimeError(f"dlib found no face in {source} ({identity}); the package data changed?")
            photos.append(FacePhoto(identity, description, source, image, boxes[0], True))
        else:
            photos.append(FacePhoto(identity, description, source, image, fixed, False))
    return tuple(photos)


def crop_face(image: np.ndarray, box: Box, margin: float = 0.5, size: int = 128) -> np.ndarray:
    """Square crop centred on a face box, widened by `margin` x box size on every side, resized to `size`.

    Parts of the square outside the photo are filled by edge replication (faces near a border keep
    a centred square). margin 0.5 gives a head-and-shoulders reference the dlib detector finds again;
    small margins give the tight face patches pasted into demo clips.
    """
    image = check_image(image)
    x0, y0, x1, y1 = box
    side = round(max(x1 - x0, y1 - y0) * (1 + 2 * margin))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, top = cx - side // 2, cy - side // 2
    pad = max(0, -left, -top, left + side - image.shape[1], top + side - image.shape[0])
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else image
    crop = padded[top + pad : top + pad + side, left + pad : left + pad + side]
    return resize_center_crop(crop, size, size)
