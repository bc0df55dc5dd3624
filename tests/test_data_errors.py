"""Bad data: truncated tars, missing references, undecodable mp4s -> named error, or counted skip."""

import logging
import os
import tarfile

import numpy as np
import pytest

from data.reader import DataError, ShardReader
from data.schema import make_meta, preference_members
from data.video import VideoInfo, encode_video
from data.write_shards import ShardWriter

PER_SHARD = 4


def sample(i, rng):
    video = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    mp4 = encode_video(video)
    info = VideoInfo(3, 16.0, 8, 8)
    meta = make_meta(1, [f"id{i}"], "test", {"a": info, "b": info})
    label = {"preference": "a", "source": "human"}
    return preference_members(f"prompt {i}", [video[0]], mp4, mp4, label, meta)


def build(out, corrupt=True):
    """Two shards p0..p7; with `corrupt`, p1 lacks its reference and p5's a.mp4 is garbage."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, "pairs", PER_SHARD) as w:
        for i in range(2 * PER_SHARD):
            members = sample(i, rng)
            if corrupt and i == 1:
                del members["ref_0.png"]
            if corrupt and i == 5:
                members["a.mp4"] = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4
            w.write(f"p{i}", members)
    return str(out / "pairs-{000000..000001}.tar"), [str(out / f"pairs-00000{j}.tar") for j in range(2)]


def member_offsets(path):
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tf.getmembers()}


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def read_all(pattern, **kw):
    return [s["key"] for s in ShardReader(pattern, kind="preference", epochs=1, shuffle=False, **kw)]


def first_error(pattern):
    with pytest.raises(DataError) as info:
        read_all(pattern)
    return info.value


def test_missing_reference_raises_naming_shard_and_key(tmp_path):
    pattern, paths = build(tmp_path)
    err = first_error(pattern)
    assert (err.shard, err.key, err.field) == (paths[0], "p1", "ref_0.png")
    assert f"shard '{paths[0]}', key 'p1': ref_0.png: missing" in str(err)


def test_undecodable_mp4_raises_naming_shard_and_key(tmp_path):
    pattern, paths = build(tmp_path)
    r = ShardReader(pattern, kind="preference", epochs=1, shuffle=False)
    it = iter(r)
    assert next(it)["key"] == "p0"
    with pytest.raises(DataError, match="key 'p1'"):
        next(it)
    assert r.position == (0, 1)  # a raise leaves the position on the bad sample
    r.load_state_dict({**r.state_dict(), "position": 2})
    keys = []
    with pytest.raises(DataError) as info:
        for s in r:
            keys.append(s["key"])
    assert keys == ["p2", "p3", "p4"]
    assert (info.value.shard, info.value.key, info.value.field) == (paths[1], "p5", "a.mp4")
    assert "undecodable video" in str(info.value)


def test_truncated_tar_inside_member_data(tmp_path):
    pattern, paths = build(tmp_path, corrupt=False)
    _, data_at, size = member_offsets(paths[1])["p6.a.mp4"]
    truncate(paths[1], data_at + size // 2)
    err = first_error(pattern)
    assert (err.shard, err.key) == (paths[1], "p6")
    assert "truncated inside member 'p6.a.mp4'" in str(err)
    assert read_all(pattern, on_error="skip") == ["p0", "p1", "p2", "p3", "p4", "p5"]  # p7 is gone


def test_truncated_tar_inside_a_header_names_the_cut_sample(tmp_path):
    pattern, paths = build(tmp_path, corrupt=False)
    header_at = member_offsets(paths[0])["p3.a.mp4"][0]  # first member of p3 (members are sorted)
    truncate(paths[0], header_at + 300)
    err = first_error(pattern)
    assert (err.shard, err.key) == (paths[0], "p3") and "'p3.a.mp4' is cut" in str(err)


def test_truncated_tar_at_a_member_boundary_flags_the_last_sample(tmp_path):
    pattern, paths = build(tmp_path, corrupt=False)
    truncate(paths[0], member_offsets(paths[0])["p3.a.mp4"][0])  # p2 complete, no end-of-archive block
    err = first_error(pattern)
    assert (err.shard, err.key) == (paths[0], "p2") and "may be incomplete" in str(err)


def test_skip_counts_and_logs_every_bad_sample(tmp_path, caplog):
    pattern, paths = build(tmp_path)
    _, data_at, size = member_offsets(paths[1])["p6.prompt.txt"]
    truncate(paths[1], data_at + size - 1)
    r = ShardReader(pattern, kind="preference", epochs=1, shuffle=False, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        good = [s["key"] for s in r]
    assert good == ["p0", "p2", "p3", "p4"]
    assert r.num_skipped == 3 and r.state_dict()["num_skipped"] == 3
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "data.reader"]
    assert len(logged) == 3
    for msg, key in zip(logged, ["p1", "p5", "p6"]):
        assert f"key '{key}'" in msg and "skipped sample" in msg


def test_skip_with_shuffle_and_resume_counts_consistently(tmp_path):
    pattern, _ = build(tmp_path)
    kw = {"kind": "preference", "on_error": "skip", "shuffle_buffer": 3, "seed": 1}
    uninterrupted = ShardReader(pattern, **kw)
    it = iter(uninterrupted)
    full = [next(it)["key"] for _ in range(15)]
    assert "p1" not in full and "p5" not in full
    a = ShardReader(pattern, **kw)
    it = iter(a)
    head = [next(it)["key"] for _ in range(5)]
    b = ShardReader(pattern, **kw)
    b.load_state_dict(a.state_dict())
    it = iter(b)
    assert head + [next(it)["key"] for _ in range(10)] == full
    # the resumed reader's count carries the skips before the resume point and counts the rest once each
    assert a.num_skipped >= 1 and b.num_skipped == uninterrupted.num_skipped


def test_restore_does_not_decode_skipped_samples(tmp_path):
    """Fast-forward reads tar headers only: a corrupt sample before the restore point is never touched."""
    pattern, _ = build(tmp_path)
    r = ShardReader(pattern, kind="preference", epochs=1, shuffle=False)
    r.load_state_dict({**r.state_dict(), "position": 6})
    assert [s["key"] for s in r] == ["p6", "p7"]


def test_unreadable_shard_is_a_whole_shard_error(tmp_path):
    pattern, paths = build(tmp_path, corrupt=False)
    with open(paths[0], "wb") as f:
        f.write(os.urandom(3000))
    with pytest.raises(DataError, match=r"\(whole shard\): not a readable tar file"):
        read_all(pattern)
    r = ShardReader(pattern, kind="preference", epochs=1, shuffle=False, on_error="skip")
    assert [s["key"] for s in r] == ["p4", "p5", "p6", "p7"] and r.num_skipped == 1


def test_all_bad_samples_stop_an_infinite_reader(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, "bad", 4) as w:
        for i in range(3):
            members = sample(i, rng)
            members["b.mp4"] = b"nope"
            w.write(f"b{i}", members)
    r = ShardReader(str(tmp_path / "bad-000000.tar"), kind="preference", on_error="skip")
    with pytest.raises(DataError, match="every sample of epoch 0 .* was skipped"):
        next(iter(r))
    assert r.num_skipped == 3
