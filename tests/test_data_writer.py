"""Shard writer: manifest/folder -> shards -> reader round trip, validation errors, atomic shards."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from data.manifest import ManifestError, read_folder, read_manifest
from data.reader import ShardReader
from data.video import decode_image, decode_video, encode_video, resize_center_crop
from data.write_shards import ShardWriter, main, write_records


def clip(seed, frames=5, height=32, width=48):
    photo = resize_center_crop(skdata.astronaut(), height + 8, width + 8)
    return np.stack([photo[(seed + t) % 8 : (seed + t) % 8 + height, t : t + width] for t in range(frames)])


@pytest.fixture
def inputs(tmp_path):
    """Real-photo refs, small mp4s and broken files next to a manifest location."""
    root = tmp_path / "in"
    (root / "refs").mkdir(parents=True)
    (root / "vids").mkdir()
    photo = skdata.astronaut()
    for i in range(3):
        Image.fromarray(photo[60 * i : 60 * i + 24, 100 : 100 + 20]).save(root / "refs" / f"p{i}.png")
    Image.fromarray(skdata.camera()[:16, :16]).save(root / "refs" / "grey.jpg")
    (root / "refs" / "broken.png").write_bytes(b"\x89PNG but not really")
    clips = {}
    for i in range(4):
        clips[f"v{i}"] = clip(i)
        (root / "vids" / f"v{i}.mp4").write_bytes(encode_video(clips[f"v{i}"]))
    (root / "vids" / "short.mp4").write_bytes(encode_video(clip(0, frames=3)))
    (root / "vids" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    return root, clips


def write_manifest(path: Path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def pref(key, a="vids/v0.mp4", b="vids/v1.mp4", pref_="a", refs=("refs/p0.png",), **kw):
    rec = {"key": key, "prompt": f"prompt of {key}", "refs": list(refs), "video_a": a, "video_b": b,
           "label": {"preference": pref_, "source": "human", "distortion": None}}
    rec.update(kw)
    return rec


def test_prompt_round_trip_over_several_shards(inputs, tmp_path):
    root, _ = inputs
    records = [{"key": f"s{i}", "prompt": f"person {i} waves ✓", "refs": [f"refs/p{j}.png" for j in range(1 + i % 3)],
                "identity_ids": [f"id{j}" for j in range(1 + i % 3)], "extra": {"i": i}} for i in range(5)]
    records[4]["refs"][0] = "refs/grey.jpg"  # grey JPEG in, RGB PNG out
    m = write_manifest(root / "m.jsonl", records)
    assert main(["--kind", "prompt", "--manifest", str(m), "--out", str(tmp_path / "out"),
                 "--max-samples-per-shard", "2"]) == 0
    shards = sorted((tmp_path / "out").glob("prompts-*.tar"))
    assert [s.name for s in shards] == ["prompts-000000.tar", "prompts-000001.tar", "prompts-000002.tar"]
    got = list(ShardReader(str(tmp_path / "out/prompts-{000000..000002}.tar"), epochs=1, shuffle=False))
    assert [s["key"] for s in got] == [f"s{i}" for i in range(5)]
    for rec, s in zip(records, got):
        assert s["prompt"] == rec["prompt"]
        assert s["meta"]["identity_ids"] == rec["identity_ids"] and s["meta"]["extra"] == {"i": rec["extra"]["i"]}
        assert s["meta"]["num_people"] == len(s["refs"]) == len(rec["refs"])
        for path, ref in zip(rec["refs"], s["refs"]):
            assert ref.dtype == np.uint8 and ref.shape[2] == 3
            assert np.array_equal(ref, decode_image((root / path).read_bytes()))


def test_preference_round_trip_frame_exact(inputs, tmp_path):
    root, clips = inputs
    records = [pref("p0"), pref("p1", a="vids/v2.mp4", b="vids/v3.mp4", pref_="tie",
                                refs=("refs/p1.png", "refs/p2.png"), identity_ids=["x", "y"]),
               pref("p2", a="vids/v3.mp4", b="vids/v0.mp4", pref_="b")]
    records[2]["label"] = {"preference": "b", "source": "synthetic",
                           "distortion": {"kind": "drift", "params": {"t": 1}}}
    m = write_manifest(root / "p.jsonl", records)
    out = tmp_path / "out"
    assert main(["--kind", "preference", "--manifest", str(m), "--out", str(out), "--num-frames", "5"]) == 0
    got = list(ShardReader(str(out / "pairs-{000000..000000}.tar"), kind="preference", epochs=1, shuffle=False))
    assert [s["key"] for s in got] == ["p0", "p1", "p2"]
    for rec, s in zip(records, got):
        for slot in "ab":
            original = clips[Path(rec[f"video_{slot}"]).stem]
            video = s[f"video_{slot}"]
            assert video.shape == original.shape == (5, 32, 48, 3) and video.dtype == np.uint8
            assert np.abs(video.astype(int) - original.astype(int)).mean() < 2.0
            assert s["meta"]["videos"][slot] == {"num_frames": 5, "fps": 16.0, "height": 32, "width": 48}
        assert s["label"]["preference"] == rec["label"]["preference"]
    assert got[2]["label"] == {"preference": "b", "source": "synthetic",
                               "distortion": {"kind": "drift", "params": {"t": 1}}, "extra": {}}
    assert got[1]["meta"]["identity_ids"] == ["x", "y"] and got[0]["meta"]["identity_ids"] == ["unknown-0"]


def test_folder_input_with_resize(inputs, tmp_path):
    root, _ = inputs
    folder = tmp_path / "folder"
    for key, pref_ in (("f1", "a"), ("f0", "tie")):
        d = folder / key
        d.mkdir(parents=True)
        (d / "prompt.txt").write_text(f"prompt {key}")
        shutil.copy(root / "refs/p0.png", d / "ref_0.png")
        shutil.copy(root / "refs/grey.jpg", d / "ref_1.jpg")
        shutil.copy(root / "vids/v0.mp4", d / "a.mp4")
        shutil.copy(root / "vids/v1.mp4", d / "b.mp4")
        (d / "label.json").write_text(json.dumps({"preference": pref_, "source": "auto"}))
        (d / "meta.json").write_text(json.dumps({"identity_ids": ["ann", "bob"]}))
    assert main(["--kind", "preference", "--folder", str(folder), "--out", str(tmp_path / "out"),
                 "--video-size", "16x24", "--prefix", "fold"]) == 0
    got = list(ShardReader(str(tmp_path / "out/fold-000000.tar"), kind="preference", epochs=1, shuffle=False))
    assert [s["key"] for s in got] == ["f0", "f1"]
    assert got[0]["video_a"].shape == (5, 16, 24, 3) and len(got[0]["refs"]) == 2
    assert got[0]["meta"]["identity_ids"] == ["ann", "bob"] and got[0]["meta"]["source"] == "folder"
    (folder / "f0" / "label.json").unlink()
    with pytest.raises(ManifestError, match=r"folder .*f0: field 'label.json': missing"):
        write_records(read_folder(folder, "preference"), tmp_path / "o2", "x")


def test_shards_are_valid_webdataset(inputs, tmp_path):
    root, _ = inputs
    m = write_manifest(root / "p.jsonl", [pref("p0"), pref("p1", refs=("refs/p1.png", "refs/p2.png"))])
    paths, pattern = write_records(read_manifest(m, "preference"), tmp_path / "out", "pairs", 1, num_frames=5)
    assert pattern.endswith("pairs-{000000..000001}.tar") and len(paths) == 2
    ours = {s["key"]: s for s in ShardReader(pattern, kind="preference", epochs=1)}
    seen = 0
    for s in wds.WebDataset(pattern, shardshuffle=False).decode("rgb8"):
        mine = ours[s["__key__"]]
        assert s["prompt.txt"] == mine["prompt"] and s["label.json"]["preference"] == mine["label"]["preference"]
        assert np.array_equal(s["ref_0.png"], mine["refs"][0])
        assert np.array_equal(decode_video(s["a.mp4"]), mine["video_a"])
        seen += 1
    assert seen == 2


BAD = [
    (pref("k", refs=("refs/missing.png",)), "refs[0]", "file not found"),
    (pref("k", refs=("refs/p0.png", "refs/broken.png")), "refs[1]", "unreadable image"),
    (pref("k", a="vids/broken.mp4"), "video_a", "undecodable video"),
    (pref("k", b="vids/short.mp4"), "video_b", "3 frames, expected 5"),
    (pref("k", a="vids/nope.mp4"), "video_a", "file not found"),
    (pref("k", refs=()), "refs", "no references"),
    (pref("k", pref_="c"), "label.preference", "must be one of"),
    ({**pref("k"), "label": {"preference": "a", "source": "crowd"}}, "label.source", "must be one of"),
    ({**pref("k"), "label": {"preference": "a", "source": "synthetic"}}, "label.distortion", "must record"),
    ({**pref("k"), "label": {"preference": "a", "source": "human", "distortion": {"kind": "melt"}}},
     "label.distortion.kind", "must be one of"),
    ({**pref("k"), "label": {"preference": "a", "source": "human", "prefernce": "a"}}, "label.prefernce", "unknown"),
    ({k: v for k, v in pref("k").items() if k != "label"}, "label", "missing"),
    (pref("k", refs=("refs/p0.png",), identity_ids=["a", "b"]), "identity_ids", "1 non-empty"),
    (pref("k", colour="red"), "colour", "unknown field"),
    (pref("bad.key"), "key", "not a valid key"),
    (pref("k", prompt="  "), "prompt", "non-empty"),
    (pref("first"), "key", "duplicate key 'first'"),
]


@pytest.mark.parametrize("record,field,reason", BAD, ids=[f"{b[1]}-{b[2][:12]}" for b in BAD])
def test_validation_error_names_line_and_field(inputs, tmp_path, record, field, reason):
    root, _ = inputs
    m = write_manifest(root / "bad.jsonl", [pref("first"), record])
    with pytest.raises(ManifestError) as info:
        write_records(read_manifest(m, "preference"), tmp_path / "out", "pairs", num_frames=5)
    assert f"bad.jsonl line 2: field '{field}'" in str(info.value)
    assert reason in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_resample_frames_to_the_model_count(inputs, tmp_path):
    """--resample-frames: a longer and a shorter clip both come out with --num-frames frames, taken uniformly over
    the clip (first and last kept), at the frame rate that keeps the clip's duration."""
    root, _ = inputs
    long_clip = clip(1, frames=9)
    (root / "vids" / "long.mp4").write_bytes(encode_video(long_clip))  # 9 frames at 16 fps
    m = write_manifest(root / "r.jsonl", [pref("r0", a="vids/long.mp4", b="vids/short.mp4")])
    out = tmp_path / "out"
    args = ["--kind", "preference", "--manifest", str(m), "--out", str(out), "--num-frames", "5"]
    assert main(args) == 2  # without the flag, other lengths are refused
    assert main([*args, "--resample-frames"]) == 0
    (got,) = ShardReader(str(out / "pairs-{000000..000000}.tar"), kind="preference", epochs=1, shuffle=False)
    assert got["video_a"].shape == got["video_b"].shape == (5, 32, 48, 3)
    for k, source in enumerate([0, 2, 4, 6, 8]):  # linspace(0, 8, 5)
        assert np.abs(got["video_a"][k].astype(int) - long_clip[source].astype(int)).mean() < 2.0
    short = clip(0, frames=3)
    for k, source in enumerate([0, 0, 1, 2, 2]):  # linspace(0, 2, 5).round(), halves to even
        assert np.abs(got["video_b"][k].astype(int) - short[source].astype(int)).mean() < 2.0
    assert got["meta"]["videos"]["a"]["fps"] == pytest.approx(16 * 5 / 9, abs=0.05)  # 9 frames' duration kept
    assert got["meta"]["videos"]["b"]["fps"] == pytest.approx(16 * 5 / 3, abs=0.05)


def test_every_problem_listed_and_cli_fails_cleanly(inputs, tmp_path, capsys):
    root, _ = inputs
    m = root / "many.jsonl"
    m.write_text(json.dumps(pref("ok")) + "\n\n{not json\n" + json.dumps(pref("x", refs=())) + "\n"
                 + json.dumps(pref("y", b="vids/short.mp4")) + "\n")
    code = main(["--kind", "preference", "--manifest", str(m), "--out", str(tmp_path / "out"), "--num-frames", "5"])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ["3 invalid record(s)", "many.jsonl line 3: field '<line>': invalid JSON",
                     "many.jsonl line 4: field 'refs'", "many.jsonl line 5: field 'video_b'"]:
        assert expected in err
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


def test_shard_is_renamed_only_when_complete(tmp_path):
    writer = ShardWriter(tmp_path, "x", max_samples_per_shard=2)
    members = {"prompt.txt": b"p", "meta.json": b"{}"}
    for i in range(3):
        writer.write(f"k{i}", members)
    # Shard 0 is complete; shard 1 is still being written: only its hidden temporary exists.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0].startswith(".x-000001.tar.tmp") and names[1:] == ["x-000000.tar"]
    writer.abort()  # what a crash leaves behind is never a file named like a shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]
    with pytest.raises(ValueError, match="duplicate key 'k0'"):
        writer.write("k0", members)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "y", 5) as w:
        w.write("a", members)
        raise RuntimeError("crash mid-shard")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".y", "y"))]


def test_existing_shards_need_overwrite_and_output_is_reproducible(inputs, tmp_path):
    root, _ = inputs
    m = write_manifest(root / "m.jsonl", [{"prompt": f"p{i}", "refs": ["refs/p0.png"]} for i in range(3)])
    records = read_manifest(m, "prompt")
    assert [r.key for r in records] == ["00000001", "00000002", "00000003"]
    paths, _ = write_records(records, tmp_path / "out", "prompts", 1)
    first = [Path(p).read_bytes() for p in paths]
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_records(records, tmp_path / "out", "prompts", 1)
    paths2, _ = write_records(records, tmp_path / "out", "prompts", 2, overwrite=True)
    assert [Path(p).name for p in paths2] == ["prompts-000000.tar", "prompts-000001.tar"]
    assert not (tmp_path / "out" / "prompts-000002.tar").exists()  # stale shard removed
    paths3, _ = write_records(records, tmp_path / "out", "prompts", 1, overwrite=True)
    assert [Path(p).read_bytes() for p in paths3] == first  # byte-identical


def test_external_candidates_resampled_to_the_model_count(inputs, tmp_path):
    """Real videos as candidates (`--kind candidate`): resampled to the model's frame count, recorded as external,
    and paired by `prefdata.autolabel` with the generated candidates of the same prompt key."""
    from prefdata.autolabel import main as autolabel

    root, _ = inputs
    long_clip = clip(1, frames=9)
    (root / "vids" / "long.mp4").write_bytes(encode_video(long_clip))
    records = [{"key": f"real{i}", "prompt": "a woman in a spacesuit", "refs": ["refs/p0.png"], "video": video,
                "prompt_key": "prompt00000", "generator": "footage"}
               for i, video in enumerate(["vids/long.mp4", "vids/short.mp4"])]
    m = write_manifest(root / "c.jsonl", records)
    bad = write_manifest(root / "bad.jsonl", [{**records[0], "generator": "no spaces"}])
    out = tmp_path / "cand"
    args = ["--kind", "candidate", "--out", str(out), "--num-frames", "5", "--resample-frames"]
    assert main([*args, "--manifest", str(bad)]) == 2
    assert main([*args, "--manifest", str(m)]) == 0
    got = list(ShardReader(str(out / "candidates-000000.tar"), kind="candidate", epochs=1, shuffle=False))
    assert [s["video"].shape for s in got] == [(5, 32, 48, 3)] * 2
    for k, source in enumerate([0, 2, 4, 6, 8]):
        assert np.abs(got[0]["video"][k].astype(int) - long_clip[source].astype(int)).mean() < 2.0
    assert got[0]["candidate"] == {"prompt_key": "prompt00000", "generator": "footage", "checkpoint": "footage",
                                   "seed": 0, "sampler": "external", "extra": {"file": "vids/long.mp4"}}
    # a generated candidate of the same prompt key joins them in pairs
    generated = tmp_path / "gen"
    with ShardWriter(generated, "candidates") as writer:
        from data.schema import candidate_members, make_meta
        from data.video import VideoInfo

        video = np.full((5, 32, 48, 3), 120, dtype=np.uint8)
        meta = make_meta(1, None, "test", {"video": VideoInfo(5, 16.0, 32, 48)})
        info = {"prompt_key": "prompt00000", "generator": "tiny", "checkpoint": "base", "seed": 3, "sampler": "ode"}
        ref = decode_image((root / "refs" / "p0.png").read_bytes())  # the external candidates' reference
        writer.write("prompt00000-tiny-0", candidate_members("a woman in a spacesuit", [ref], encode_video(video),
                                                             info, meta))
    summary = autolabel(["--config", "cluster_configs/reward_data_demo.yaml", "autolabel.people_fraction=0",
                         f"autolabel.candidate_shards='{{{out},{generated}}}/candidates-000000.tar'",
                         f"autolabel.out={tmp_path / 'auto'}", "autolabel.scorers={demo_brightness: {margin: 0.0}}"])
    assert summary["pairs"] == 3 and summary["kept"] == 3
    pairs = list(ShardReader(summary["pattern"], kind="preference", epochs=1, shuffle=False))
    mixed = [p for p in pairs if set(p["label"]["extra"]["generators"].values()) == {"footage", "tiny"}]
    assert len(mixed) == 2 and sum(sum(c.values()) for c in summary["generator_wins"].values()) == 2
    for p in mixed:  # the brighter video wins (margin 0): the grey-120 clip against the photo clips
        a, b = p["video_a"].mean(), p["video_b"].mean()
        assert p["label"]["preference"] == ("a" if a > b else "b")


def test_split_by_prompt_copies_every_sample_and_keeps_each_prompt_on_one_side(tmp_path):
    """The reward-data study's human test split: samples copied byte for byte, a prompt (meta.extra.prompt_key)
    never on both sides."""
    import json

    from data.demo import write_mixed_pairs
    from data.tarindex import expand_pattern, index_shard, read_members
    from data.write_shards import ShardWriter, split_by_prompt

    source = {ref.key: read_members(ref) for path in expand_pattern(write_mixed_pairs(tmp_path / "src", 12))
              for ref in index_shard(path).samples}
    with ShardWriter(tmp_path / "keyed", "pairs") as writer:  # three pairs per prompt
        for i, (key, members) in enumerate(sorted(source.items())):
            meta = json.loads(members["meta.json"])
            meta["extra"]["prompt_key"] = f"prompt{i // 3}"
            writer.write(key, {**members, "meta.json": json.dumps(meta).encode()})
    train, test = split_by_prompt(writer.pattern, tmp_path / "split", ("train", "test"), 0.5)

    def read(pattern):
        return {ref.key: read_members(ref) for path in expand_pattern(pattern) for ref in index_shard(path).samples}

    sides = [read(train), read(test)]
    assert sides[0] and sides[1] and sorted([*sides[0], *sides[1]]) == sorted(source)
    prompts = [{json.loads(m["meta.json"])["extra"]["prompt_key"] for m in side.values()} for side in sides]
    assert not prompts[0] & prompts[1] and len(prompts[0] | prompts[1]) == 4
    keyed = read(writer.pattern)
    assert all(members == keyed[key] for side in sides for key, members in side.items())  # every member, as written
    assert (train, test) == split_by_prompt(writer.pattern, tmp_path / "split", ("train", "test"), 0.5)
    with ShardWriter(tmp_path / "one", "pairs") as single:  # every pair of one prompt: one side would be empty
        for key in sorted(keyed)[:3]:
            single.write(key, keyed[key])
    with pytest.raises(ValueError, match="no sample falls in the (train|test) split"):
        split_by_prompt(single.pattern, tmp_path / "split1", ("train", "test"), 0.5)
    assert not list((tmp_path / "split1").glob("*.tar"))  # refused before anything was written
