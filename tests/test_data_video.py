"""Video/image IO: exact frame counts, small decode error, geometry and frame sampling."""

import numpy as np
import pytest
import torch
from skimage import data as skdata

from data.video import (
    MediaError,
    decode_image,
    decode_video,
    decode_video_with_info,
    encode_png,
    encode_video,
    resize_center_crop,
    sample_frame_indices,
)


def natural_clip(frames=9, height=48, width=64):
    """A real photograph panning by two pixels per frame (natural content, like generated video)."""
    photo = resize_center_crop(skdata.astronaut(), height, width + 2 * frames)
    return np.stack([photo[:, 2 * t : 2 * t + width] for t in range(frames)])


@pytest.mark.parametrize("frames", [1, 5, 9, 33])
def test_mp4_round_trip_keeps_frame_count_and_pixels(frames):
    clip = natural_clip(frames)
    video, info = decode_video_with_info(encode_video(clip, fps=16))
    assert video.shape == clip.shape and video.dtype == np.uint8
    assert info.num_frames == frames and info.fps == 16.0 and (info.height, info.width) == (48, 64)
    err = np.abs(video.astype(int) - clip.astype(int))
    # 48x64 crops of a detailed photo are the hard case for the codec; typical error is far lower.
    assert err.mean() < 2.0, err.mean()
    assert np.percentile(err, 99) <= 8


def test_mp4_error_is_small_at_model_like_resolution():
    clip = natural_clip(17, height=120, width=208)
    err = np.abs(decode_video(encode_video(clip)).astype(int) - clip.astype(int))
    assert err.mean() < 1.0 and np.percentile(err, 99) <= 4, (err.mean(), np.percentile(err, 99))


def test_fps_fraction_and_odd_size_survive():
    clip = natural_clip(5, height=31, width=45)
    video, info = decode_video_with_info(encode_video(clip, fps=30000 / 1001))
    assert video.shape == clip.shape
    assert abs(info.fps - 30000 / 1001) < 1e-6


def test_encode_accepts_torch_and_rejects_bad_shapes():
    clip = natural_clip(3)
    assert decode_video(encode_video(torch.from_numpy(clip))).shape == clip.shape
    with pytest.raises(MediaError, match="uint8"):
        encode_video(clip.astype(np.float32))
    with pytest.raises(MediaError, match=r"\(F, H, W, 3\)"):
        encode_video(clip[0])


def test_decode_errors_are_clear():
    with pytest.raises(MediaError, match="undecodable video"):
        decode_video(b"\x00\x01 definitely not an mp4" * 50)
    data = encode_video(natural_clip(5))
    with pytest.raises(MediaError, match="5 frames, expected 9"):
        decode_video(data, expected_frames=9)
    with pytest.raises(MediaError, match="undecodable image"):
        decode_image(b"not a png")


def test_png_is_lossless_and_grey_becomes_rgb():
    img = skdata.astronaut()[:40, :30]
    assert np.array_equal(decode_image(encode_png(img)), img)
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(skdata.camera()[:20, :10]).save(buf, format="PNG")
    grey = decode_image(buf.getvalue())
    assert grey.shape == (20, 10, 3) and np.array_equal(grey[..., 0], grey[..., 2])


def test_resize_center_crop_covers_and_keeps_aspect():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255  # a centred square of white: after cover-resize to 50x50 the crop is all white
    out = resize_center_crop(img, 50, 50)
    assert out.shape == (50, 50, 3) and out[:, 1:-1].min() == 255 and out.min() > 200  # antialiased edge
    vid = torch.from_numpy(np.repeat(img[None], 3, axis=0))
    out_t = resize_center_crop(vid, 30, 90)
    assert isinstance(out_t, torch.Tensor) and tuple(out_t.shape) == (3, 30, 90, 3) and out_t.dtype == torch.uint8
    same = resize_center_crop(img, 100, 200)
    assert np.array_equal(same, img)
    up = resize_center_crop(img[:10, :10], 40, 20)  # upscaling works too
    assert up.shape == (40, 20, 3)


def test_sample_frame_indices_uniform():
    """The official reward's frames: torch.linspace(0, N - 1, n).round() (vace_reward/vision_process.py); with its
    config (num_frames 5.0, rounded to a multiple of 2: 4 frames) a 33-frame rollout gives [0, 11, 21, 32], an
    81-frame evaluation video [0, 27, 53, 80]."""
    assert sample_frame_indices(33, 4) == [0, 11, 21, 32] and sample_frame_indices(81, 4) == [0, 27, 53, 80]
    assert sample_frame_indices(33, 5) == [0, 8, 16, 24, 32]
    assert sample_frame_indices(10, 10) == list(range(10))
    assert sample_frame_indices(9, 1) == [0]
    idx = sample_frame_indices(3, 5)
    assert idx == sorted(idx) and set(idx) == {0, 1, 2} and len(idx) == 5
    for bad in [(0, 3), (5, 0)]:
        with pytest.raises(ValueError):
            sample_frame_indices(*bad)


def test_fast_yuv444_conversion_matches_swscale_and_other_formats_decode():
    """decode_video converts our yuv444p streams itself; it must agree with PyAV/swscale's rgb24."""
    import io

    import av

    clip = natural_clip(4)
    for pix_fmt in ("yuv444p", "yuv420p"):
        data = encode_video(clip, pix_fmt=pix_fmt)
        with av.open(io.BytesIO(data)) as container:
            reference = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        ours = decode_video(data)
        assert ours.shape == clip.shape
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_encoding_is_byte_reproducible():
    """Same frames, same bytes, whatever else is in memory (libx264 mbtree broke this; it is off)."""
    from data.demo import compose_clip
    from data.faces import crop_face, load_face_photos

    faces = [crop_face(p.image, p.face_box, 0.15, 64) for p in load_face_photos()]
    clip, _ = compose_clip(faces, skdata.coffee(), 9, 96, 160, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    outputs = set()
    for _ in range(6):
        junk = [rng.integers(0, 255, int(rng.integers(1_000, 400_000)), dtype=np.uint8) for _ in range(3)]
        fresh = np.empty_like(clip)
        fresh[...] = clip
        outputs.add(encode_video(fresh))
        del junk
    assert len(outputs) == 1
