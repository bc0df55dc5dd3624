"""Synthetic distortions change the targeted face region(s) and nothing else; pairs are labelled right."""

import json

import numpy as np
import pytest

from data.demo import compose_clip
from data.distort import (
    CleanClip,
    DistortionConfig,
    affected_region,
    apply_distortion,
    feasible_kinds,
    make_pair,
    sample_params,
    write_pairs,
)
from data.faces import crop_face, load_face_photos
from data.reader import ShardReader
from data.schema import decode_members


@pytest.fixture(scope="module")
def scene():
    photos = load_face_photos()
    faces = [crop_face(p.image, p.face_box, margin=0.15, size=64) for p in photos]
    refs = [crop_face(p.image, p.face_box, margin=0.5, size=48) for p in photos]
    background = np.full((60, 100, 3), 90, np.uint8)
    background[::7] = 200  # some texture so edits to the background would show
    video, boxes = compose_clip(faces[:2], background, 8, 60, 100, np.random.default_rng(0))
    return video, boxes, faces, refs, [p.identity_id for p in photos]


def region_change(video, out, boxes, t, p):
    x0, y0, x1, y1 = boxes[t, p]
    h, w = y1 - y0, x1 - x0
    inner = (slice(y0 + h // 4, y1 - h // 4), slice(x0 + w // 4, x1 - w // 4))  # middle of the ellipse
    return np.abs(out[t][inner].astype(int) - video[t][inner].astype(int)).mean()


KIND_OPS = [("swap", None), ("drift", None), ("exchange", None),
            ("degrade", "blur"), ("degrade", "warp"), ("degrade", "color")]


@pytest.mark.parametrize("kind,op", KIND_OPS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distortion_changes_target_region_and_nothing_else(scene, kind, op, seed):
    video, boxes, faces, _, _ = scene
    cfg = DistortionConfig(degrade_ops=(op,) if op else ("blur", "warp", "color"))
    params = sample_params(kind, np.random.default_rng(seed), 2, 3, video.shape[0], cfg)
    out = apply_distortion(video, boxes, faces, params)
    assert out.shape == video.shape and out.dtype == np.uint8
    allowed = affected_region(boxes, params, *video.shape[1:3])
    changed = (out != video).any(axis=-1)
    assert not changed[~allowed].any(), "pixels outside the targeted face box(es) changed"
    t0, t1 = params["frames"]
    assert np.array_equal(out[:t0], video[:t0]) and np.array_equal(out[t1:], video[t1:])
    persons = params["persons"] if kind == "exchange" else [params["person"]]
    last = t1 - 1  # drift is strongest at its last frame
    for p in persons:
        assert region_change(video, out, boxes, last, p) > 8, f"{kind} barely changed person {p}"
    if kind != "drift":
        for t in range(t0, t1):
            for p in persons:
                assert region_change(video, out, boxes, t, p) > 8
    for other in set(range(boxes.shape[1])) - set(persons):
        assert region_change(video, out, boxes, last, other) == 0


def test_params_are_reproducible_and_json(scene):
    video, boxes, faces, _, _ = scene
    for kind in ("swap", "drift", "exchange", "degrade"):
        p1 = sample_params(kind, np.random.default_rng(5), 2, 3, 8)
        p2 = sample_params(kind, np.random.default_rng(5), 2, 3, 8)
        assert p1 == p2 == json.loads(json.dumps(p1)) and p1["kind"] == kind
        out1 = apply_distortion(video, boxes, faces, p1)
        assert np.array_equal(out1, apply_distortion(video, boxes, faces, json.loads(json.dumps(p1))))


def test_severity_controls_span_and_strength(scene):
    video, boxes, faces, _, _ = scene
    weak = DistortionConfig(min_severity=0.2, max_severity=0.2)
    strong = DistortionConfig(min_severity=1.0, max_severity=1.0)
    rng = np.random.default_rng
    assert np.diff(sample_params("swap", rng(0), 2, 3, 10, weak)["frames"])[0] == 2
    assert sample_params("swap", rng(0), 2, 3, 10, strong)["frames"] == [0, 10]
    pw = {**sample_params("drift", rng(0), 2, 3, 8, weak), "frames": [0, 8], "person": 0, "identity": 2}
    ps = {**pw, "severity": 1.0}
    dw = region_change(video, apply_distortion(video, boxes, faces, pw), boxes, 7, 0)
    ds = region_change(video, apply_distortion(video, boxes, faces, ps), boxes, 7, 0)
    assert ds > 3 * dw > 0


def test_infeasible_kinds_are_refused():
    assert feasible_kinds(1, 3) == ["swap", "drift", "degrade"]
    assert feasible_kinds(1, 1) == ["degrade"]
    with pytest.raises(ValueError, match="exchange"):
        sample_params("exchange", np.random.default_rng(0), 1, 3, 8)
    with pytest.raises(ValueError, match="kinds"):
        DistortionConfig(kinds=("melt",))


def test_pair_prefers_the_clean_clip_and_records_the_distortion(scene, tmp_path):
    video, boxes, faces, refs, ids = scene
    clip = CleanClip("c0", "two people talk", video, boxes, faces, refs[:2], ids[:2], outsider_ids=ids[2:])
    slots = set()
    for seed in range(6):
        members, params = make_pair(clip, np.random.default_rng(seed), kind="swap")
        s = decode_members("preference", members)
        label = s["label"]
        assert label["source"] == "synthetic" and label["distortion"] == {"kind": "swap", "params": params}
        assert params["identity_id"] == (ids[:2] + ids[2:])[params["identity"]]
        clean, neg = s[f"video_{label['preference']}"], s[f"video_{'b' if label['preference'] == 'a' else 'a'}"]
        assert np.abs(clean.astype(int) - video).mean() < 2  # the preferred video is the clean clip
        expected_neg = apply_distortion(video, boxes, faces, params)
        assert np.abs(neg.astype(int) - expected_neg).mean() < 2
        assert s["meta"]["extra"]["face_boxes"] == boxes.tolist() and s["meta"]["identity_ids"] == ids[:2]
        slots.add(label["preference"])
    assert slots == {"a", "b"}  # the clean clip is not always in the same slot
    paths = write_pairs([clip, CleanClip("c1", "p", video, boxes, faces, refs[:2], ids[:2])], str(tmp_path), seed=3)
    got = list(ShardReader(paths, kind="preference", epochs=1, shuffle=False))
    assert [g["key"] for g in got] == ["c0", "c1"]
    assert all(g["label"]["distortion"]["kind"] in ("swap", "drift", "exchange", "degrade") for g in got)
