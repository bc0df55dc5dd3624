"""Video and image IO for shards: mp4 (PyAV, libx264) and PNG, resize/centre-crop, frame sampling.

Why these choices:
- Videos live in shards as mp4 so that a shard of 33-frame 240x416 pairs stays small, but the
  reward model must see the pixels that were labelled. We therefore encode with libx264 in
  4:4:4 chroma (no chroma subsampling: faces are small and colour matters for identity) at a low
  CRF: mean decode error is about half a grey level on natural content (tests pin the bound).
- The frame count must survive the round trip exactly (the reward model samples frames uniformly
  and the policy is trained on 4k+1 frames), so `decode_video` counts frames and checks them against
  an expected count when given; the count and fps also live in the sample's `meta.json`.
- Arrays are uint8 (F, H, W, 3) RGB, numpy or torch: the rest of the system converts to float only
  where it needs to (the VAE, the reward model).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from config import ExpectedError

ArrayLike = Union[np.ndarray, torch.Tensor]  # noqa: UP007 - runtime alias, keep 3.9-safe

DEFAULT_FPS = 16  # Wan2.1 generates at 16 fps
DEFAULT_CRF = 4
DEFAULT_PIX_FMT = "yuv444p"


class MediaError(ExpectedError, ValueError):
    """Bytes that should be an image or a video cannot be decoded, or have the wrong shape."""


@dataclass(frozen=True)
class VideoInfo:
    """What `meta.json` records about a video: the decoded frame count, fps and size."""

    num_frames: int
    fps: float
    height: int
    width: int

    def to_dict(self) -> dict:
        return asdict(self)


def _as_numpy_uint8(x: ArrayLike, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise MediaError(f"{what} must be uint8, got {x.dtype}")
    return x


def check_video(video: ArrayLike, what: str = "video") -> np.ndarray:
    """Return `video` as a contiguous uint8 numpy array of shape (F, H, W, 3), or raise MediaError."""
    v = _as_numpy_uint8(video, what)
    if v.ndim != 4 or v.shape[-1] != 3 or min(v.shape[:3]) < 1:
        raise MediaError(f"{what} must have shape (F, H, W, 3) with F, H, W >= 1, got {tuple(v.shape)}")
    return np.ascontiguousarray(v)


def check_image(image: ArrayLike, what: str = "image") -> np.ndarray:
    """Return `image` as a contiguous uint8 numpy array of shape (H, W, 3), or raise MediaError."""
    im = _as_numpy_uint8(image, what)
    if im.ndim != 3 or im.shape[-1] != 3 or min(im.shape[:2]) < 1:
        raise MediaError(f"{what} must have shape (H, W, 3) with H, W >= 1, got {tuple(im.shape)}")
    return np.ascontiguousarray(im)


# ----------------------------------------------------------------------------- mp4


def encode_video(
    video: ArrayLike,
    fps: float | Fraction = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    pix_fmt: str = DEFAULT_PIX_FMT,
    preset: str = "medium",
    threads: int = 0,
) -> bytes:
    """Encode uint8 (F, H, W, 3) RGB frames as an mp4 (H.264, libx264) and return its bytes.

    Every input frame becomes exactly one output frame (the encoder is flushed at the end), and the
    stream's frame rate is `fps` (kept as an exact fraction, so 30000/1001 survives).
    threads: x264 threads, 0 = auto.
    Output bytes are a pure function of the input: x264's macroblock-tree rate control (mbtree) is
    off because with it the bytes were measured to vary between runs on identical yuv444p input
    (it depended on unrelated memory state); without it quality and size are unchanged at low CRF.
    Reproducible bytes make shards reproducible (same input and seed, same tar).
    """
    frames = check_video(video)
    rate = Fraction(fps).limit_denominator(1_000_000) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise MediaError(f"fps must be > 0, got {fps}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(int(crf)), "preset": preset, "threads": str(int(threads)),
                          "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


BROWSER_PIX_FMT = "yuv420p"


def browser_mp4(data: bytes) -> bytes:
    """The video as web pages play it everywhere: H.264 in 4:2:0. Our shards hold 4:4:4 (High 4:4:4 Predictive
    profile, for exact pixels), which Chromium's own decoder plays but browsers that hand H.264 to the platform's
    decoder (Safari; Firefox on most systems) generally do not. 4:2:0 needs even sizes: an odd last row or column
    is dropped. Frame count and rate are kept; a video already in H.264 4:2:0 is returned as is."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.codec_context.name == "h264" and stream.format.name == BROWSER_PIX_FMT:
                return data
    except (av.FFmpegError, ValueError, EOFError, OSError) as err:
        raise MediaError(f"undecodable video ({type(err).__name__}: {err})") from None
    video, info = decode_video_with_info(data)
    even = video[:, : video.shape[1] // 2 * 2, : video.shape[2] // 2 * 2]
    if even.shape[1] == 0 or even.shape[2] == 0:
        raise MediaError(f"video of {video.shape[1]}x{video.shape[2]} pixels is too small for 4:2:0")
    return encode_video(even, info.fps or DEFAULT_FPS, pix_fmt=BROWSER_PIX_FMT, preset="veryfast")


# BT.601 limited range, the conversion swscale applies (both ways) when a stream does not say
# otherwise; this is what `encode_video` produces.
_BT601_LIMITED_SPACES = {2, 5, 6}  # AVColorSpace: unspecified, BT470BG, SMPTE170M
_LIMITED_RANGES = {0, 1}  # AVColorRange: unspecified, MPEG (limited)


def _frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """One decoded frame as uint8 (H, W, 3) RGB.

    Fast path for our own encodes (yuv444p, BT.601 limited): convert the planes with numpy, about
    8x faster than swscale's unscaled yuv444p->rgb24 path (which dominated reader time) and at
    least as exact. Anything else goes through swscale, which honours the stream's colour tags.
    """
    if (frame.format.name == "yuv444p" and frame.colorspace in _BT601_LIMITED_SPACES
            and frame.color_range in _LIMITED_RANGES):
        yuv = frame.to_ndarray().astype(np.float32)  # (3, H, W)
        y = (yuv[0] - 16.0) * (255.0 / 219.0)
        u = (yuv[1] - 128.0) * (255.0 / 224.0)
        v = (yuv[2] - 128.0) * (255.0 / 224.0)
        rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], axis=-1)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return frame.to_ndarray(format="rgb24")


def decode_video(data: bytes, expected_frames: int | None = None) -> np.ndarray:
    """Decode mp4 (or any container PyAV reads) bytes to uint8 (F, H, W, 3) RGB frames.

    Raises MediaError when the bytes do not decode, hold no video stream or no frame, or (when
    `expected_frames` is given) decode to a different number of frames.
    """
    video, _ = decode_video_with_info(data, expected_frames)
    return video


def decode_video_with_info(data: bytes, expected_frames: int | None = None):
    """Like `decode_video`, also returning the `VideoInfo` (decoded frame count, stream fps, size)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or stream.guessed_rate
            frames = [_frame_to_rgb(f) for f in container.decode(stream)]
    except MediaError:
        raise
    except (av.FFmpegError, ValueError, EOFError, OSError) as err:
        raise MediaError(f"undecodable video ({type(err).__name__}: {err})") from None
    if not frames:
        raise MediaError("video has no decodable frame")
    if len({f.shape for f in frames}) != 1:
        raise MediaError("video frames change size mid-stream")
    video = np.stack(frames)
    if expected_frames is not None and video.shape[0] != expected_frames:
        raise MediaError(f"video has {video.shape[0]} frames, expected {expected_frames}")
    info = VideoInfo(int(video.shape[0]), float(rate) if rate else 0.0, int(video.shape[1]), int(video.shape[2]))
    return video, info


# ----------------------------------------------------------------------------- images


def encode_png(image: ArrayLike) -> bytes:
    """Encode a uint8 (H, W, 3) RGB image losslessly as PNG."""
    buf = io.BytesIO()
    Image.fromarray(check_image(image)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to a uint8 (H, W, 3) RGB array (grey and RGBA are converted)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, OSError...)
        raise MediaError(f"undecodable image ({type(err).__name__}: {err})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- geometry / sampling


def resize_center_crop(x: ArrayLike, height: int, width: int) -> ArrayLike:
    """Scale an image (H, W, 3) or video (F, H, W, 3) so it covers `height` x `width`, then crop the centre.

    Aspect ratio is kept (no stretching faces); downscaling is antialiased. Returns the same kind
    (numpy or torch) as the input, uint8.
    """
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    is_torch = isinstance(x, torch.Tensor)
    arr = _as_numpy_uint8(x, "input")
    single = arr.ndim == 3
    video = check_video(arr[None] if single else arr)
    h, w = video.shape[1:3]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    t = torch.from_numpy(video)
    if (new_h, new_w) != (h, w):
        t = t.permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        t = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    t = t[:, top : top + height, left : left + width].contiguous()
    if single:
        t = t[0]
    return t if is_torch else t.numpy()


def sample_frame_indices(num_frames: int, n: int) -> list[int]:
    """`n` frame indices spread uniformly over a `num_frames` clip, first and last frame included: the official
    reward's `torch.linspace(0, num_frames - 1, n).round()` (vace_reward/vision_process.py, float32, ties to
    even), so 4 of 33 frames are [0, 11, 21, 32]. The one frame sampler of every reward: the VLM and the face
    reward look at the same frames. Non-decreasing; when n > num_frames some indices repeat.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()
