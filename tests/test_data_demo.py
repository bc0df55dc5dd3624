"""Demo data: real faces, one to three people, varied prompts, synthetic pairs, reproducible bytes."""

from pathlib import Path

import numpy as np
import pytest

from data.demo import build_demo, main
from data.faces import detect_faces, load_face_photos
from data.reader import ShardReader


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    prompts, pairs = build_demo(out, num_prompts=9, num_pairs=8, samples_per_shard=5)
    return out, prompts, pairs


def test_face_photos_are_real_and_distinct():
    photos = load_face_photos()
    assert [p.identity_id for p in photos] == ["eileen_collins", "grace_hopper", "cameraman"]
    for p in photos:
        x0, y0, x1, y1 = p.face_box
        assert p.image.dtype == np.uint8 and 40 < x1 - x0 < 300 and 40 < y1 - y0 < 300
        if p.detected:  # the frontal detector finds these faces in the photographs themselves
            assert detect_faces(p.image)[0] == p.face_box


def test_prompt_shards(demo):
    _, prompts, _ = demo
    assert prompts.endswith("prompts-{000000..000001}.tar")
    samples = list(ShardReader(prompts, epochs=1, shuffle=False))
    assert len(samples) == 9
    counts = [s["meta"]["num_people"] for s in samples]
    assert set(counts) == {1, 2, 3}
    seen_ids = set()
    for s in samples:
        ids = s["meta"]["identity_ids"]
        assert len(ids) == len(set(ids)) == len(s["refs"])  # distinct people within a sample
        seen_ids.update(ids)
        for ref, identity in zip(s["refs"], ids):
            assert ref.shape == (128, 128, 3)
            if identity != "cameraman":  # references are head-and-shoulders crops dlib finds again
                assert detect_faces(ref), f"no face found in the reference of {identity}"
        assert s["meta"]["source"] == "demo" and s["prompt"][0].isupper()
    assert seen_ids == {"eileen_collins", "grace_hopper", "cameraman"}
    assert len({s["prompt"] for s in samples}) == 9


def test_preference_shards(demo):
    _, _, pairs = demo
    samples = list(ShardReader(pairs, kind="preference", epochs=1, shuffle=False))
    assert len(samples) == 8
    checked = 0
    kinds = [s["label"]["distortion"]["kind"] for s in samples]
    assert set(kinds) == {"swap", "drift", "exchange", "degrade"}
    for s in samples:
        assert s["video_a"].shape == s["video_b"].shape == (9, 96, 160, 3)
        assert s["label"]["source"] == "synthetic" and s["label"]["preference"] in ("a", "b")
        clean = s[f"video_{s['label']['preference']}"]
        boxes = np.asarray(s["meta"]["extra"]["face_boxes"])
        assert boxes.shape == (9, len(s["refs"]), 4)
        if s["meta"]["identity_ids"] == ["eileen_collins"] or s["meta"]["identity_ids"] == ["grace_hopper"]:
            found = detect_faces(clean[0], upsample=1)  # the clean clip shows the person's face
            x0, y0, x1, y1 = boxes[0, 0]
            assert found and any(x0 <= (a + c) / 2 <= x1 and y0 <= (b + d) / 2 <= y1 for a, b, c, d in found)
            checked += 1
    assert checked >= 1


def test_demo_is_reproducible(tmp_path, capsys):
    args = ["--num-prompts", "4", "--num-pairs", "6", "--samples-per-shard", "3", "--seed", "4"]
    assert main(["--out", str(tmp_path / "a")] + args) == 0
    assert "prompts-{000000..000001}.tar" in capsys.readouterr().out
    build_demo(tmp_path / "b", 4, 6, 3, seed=4)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["pairs-000000.tar", "pairs-000001.tar", "prompts-000000.tar", "prompts-000001.tar"]
    for name in names:
        assert Path(tmp_path / "a" / name).read_bytes() == Path(tmp_path / "b" / name).read_bytes()
