"""Synthetic pairs from real clips (prefdata/distortion_pairs.py): the tracker finds each person's true face box,
the distortions stay inside it, skips are counted with their reason, and an interrupted run resumes to the same
bytes. Clips: real face photographs composited on real backgrounds (data.demo.write_demo_clips), boxes known."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data.demo import write_demo_clips
from data.distort import affected_region
from data.manifest import load_clip, load_clip_refs, read_folder
from data.reader import ShardReader
from prefdata.distortion_pairs import main
from prefdata.face_track import TrackConfig, TrackingError, box_iou, face_model, match_frames, track_faces

MIN_IOU, MEAN_IOU = 0.65, 0.8  # tracked (widened) box against the pasted face's box, every frame / on average
PAST_TRUTH = 1 / 8  # a distortion's box reaches at most this fraction of the face's side past the true box
CONFIG = "cluster_configs/reward_data_demo.yaml"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return folder, write_demo_clips(folder, 6)


@pytest.fixture(scope="module")
def model():
    return face_model(TrackConfig())


def tracked(model, rec, video=None):
    video = load_clip(rec)[0] if video is None else video
    return track_faces(video, model.embed_references(load_clip_refs(rec)), model, TrackConfig(), rec.identity_ids)


def ious(boxes, truth):
    return np.array([[box_iou(boxes[t, p], truth[t, p]) for p in range(truth.shape[1])] for t in range(len(truth))])


def test_tracked_boxes_match_the_true_face_boxes_in_reference_order(clips, model):
    folder, truths = clips
    records = read_folder(folder, "clip")
    assert {len(t[0]) for t in truths} == {1, 2}  # one- and two-person clips
    for rec, truth in zip(records, truths, strict=True):
        track = tracked(model, rec)
        overlap = ious(track.boxes, truth)  # truth is in reference order, not left to right: identity decides
        assert overlap.min() >= MIN_IOU and overlap.mean() >= MEAN_IOU, (rec.key, overlap.round(3))
        assert track.found.all() and np.nanmin(track.similarity) > 0.95


def test_a_short_miss_is_bridged_and_a_long_one_skips_the_clip(clips, model):
    folder, truths = clips
    rec, truth = read_folder(folder, "clip")[1], truths[1]  # two people
    video = load_clip(rec)[0]

    def hide(frames):
        out = video.copy()
        for t in frames:
            x0, y0, x1, y1 = truth[t, 0]
            out[t, y0:y1, x0:x1] = 128  # person 0's face gone in frame t
        return out

    track = tracked(model, rec, hide([4]))
    assert not track.found[4, 0] and track.found[:, 1].all() and track.found[[3, 5], 0].all()
    assert box_iou(track.boxes[4, 0], truth[4, 0]) >= MIN_IOU  # interpolated between frames 3 and 5
    with pytest.raises(TrackingError, match="unmatched in 3 consecutive frames") as err:
        tracked(model, rec, hide([3, 4, 5]))
    assert err.value.reason == "face lost"


def test_matching_ignores_strangers_and_refuses_an_identity_switch():
    refs = np.eye(3)[:2]  # two people's unit embeddings
    stranger = np.array([0.0, 0.0, 1.0])
    box_a, box_b = (0, 0, 10, 10), (50, 0, 60, 10)
    frames = [([box_a, box_b], np.stack([refs[0], stranger])), ([box_a], refs[:1])]
    boxes, sims = match_frames(frames, refs, TrackConfig())
    assert np.array_equal(boxes[:, 0], [box_a, box_a]) and np.isnan(sims[:, 1]).all()  # the stranger is nobody
    with pytest.raises(TrackingError, match="jumps between frames 0 and 1") as err:
        match_frames([([box_a], refs[:1]), ([box_b], refs[:1])], refs, TrackConfig())
    assert err.value.reason == "identity switch"


def test_command_writes_pairs_confined_to_the_faces_skips_with_reasons_and_resumes(tmp_path, capsys):
    clips, out = tmp_path / "clips", tmp_path / "pairs"
    truths = write_demo_clips(clips, 6, with_camera=True)  # the cameraman is in profile: those clips are skipped
    args = ["--config", CONFIG, f"distortions.clips={clips}", f"distortions.out={out}", "distortions.pairs_per_clip=2",
            "distortions.samples_per_shard=2"]
    report = main(args)
    skipped = {clip["clip"] for reasons in report["skipped_clips"].values() for clip in reasons}
    ids = {rec.key: rec.identity_ids for rec in read_folder(clips, "clip")}
    assert skipped == {key for key, people in ids.items() if "cameraman" in people} and skipped
    assert report["written"] == 2 * (6 - len(skipped)) and set(report["skipped"]) <= {"face lost", "face not found"}
    assert json.loads((out / "synthetic.report.json").read_text())["skipped"] == report["skipped"]

    truth = {f"clip{i:05d}": t for i, t in enumerate(truths)}
    pattern = report["pattern"]
    samples = list(ShardReader(pattern, kind="preference", shuffle=False, epochs=1, on_error="raise"))
    assert len(samples) == report["written"]
    for sample in samples:
        label, meta = sample["label"], sample["meta"]
        assert label["source"] == "synthetic"
        assert label["distortion"]["kind"] in ("swap", "drift", "exchange", "degrade")
        params, clip = label["distortion"]["params"], meta["extra"]["clip"]
        boxes, frames = np.array(meta["extra"]["face_boxes"]), truth[clip].shape[0]
        clean, bad = (sample["video_a"], sample["video_b"]) if label["preference"] == "a" else \
            (sample["video_b"], sample["video_a"])
        region = affected_region(boxes, params, *clean.shape[1:3])
        inside_truth = affected_region(truth[clip], params, *clean.shape[1:3])
        reach = int(np.ceil(PAST_TRUTH * (truth[clip][..., 2] - truth[clip][..., 0]).max()))
        grown = ndimage.binary_dilation(inside_truth, np.ones((1, 2 * reach + 1, 2 * reach + 1), bool))
        assert not (region & ~grown).any(), f"{sample['key']}: the distortion reaches past the true face box"
        diff = np.abs(clean.astype(int) - bad.astype(int)).max(-1)
        assert diff[region].mean() > 4 * max(diff[~region].mean(), 0.25), sample["key"]
        assert frames == clean.shape[0]

    first = {Path(p).name: Path(p).read_bytes() for p in sorted(out.glob("synthetic-*.tar"))}
    last = sorted(first)[-1]
    (out / last).unlink()  # interrupted before the last shard was written
    again = main(args)
    assert again["written"] == len(list(ShardReader(str(out / last), kind="preference", shuffle=False, epochs=1)))
    assert again["already_there"] == report["written"] - again["written"]
    assert (out / last).read_bytes() == first[last]  # the same pairs, byte for byte

    with pytest.raises(SystemExit) as stop:  # other settings over the same pairs: refused, naming the key
        main([*args, "distortions.seed=1"])
    assert stop.value.code == 2 and "distortions.seed: " in capsys.readouterr().err
