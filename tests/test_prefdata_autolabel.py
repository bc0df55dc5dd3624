"""Automatic preference labels (prefdata/autolabel.py): the vote, its accuracy on pairs with known answers, and the
whole command on candidate shards (its pairs, labels, provenance, counts and refusals)."""

import json
import math

import numpy as np
import pytest

from data.reader import ShardReader
from data.schema import candidate_members, make_meta
from data.video import VideoInfo, encode_video
from data.write_shards import ShardWriter
from prefdata.autolabel import Scorers, choose_pairs, main, scorer_vote, tally
from prefdata.settings import load_prefdata_config


def test_scorer_vote_and_tally():
    assert scorer_vote(0.9, 0.5, 0.1) == "a" and scorer_vote(0.5, 0.9, 0.1) == "b"
    assert scorer_vote(0.55, 0.5, 0.1) == "tie" and scorer_vote(0.5, 0.6, 0.1) == "tie"  # |diff| <= margin
    assert scorer_vote(math.nan, 0.5, 0.1) is None and scorer_vote(0.5, math.inf, 0.1) is None
    assert tally({"x": "a", "y": "a", "z": "b"}) == ("a", 2 / 3, {"a": 2, "b": 1, "tie": 0})
    assert tally({"x": "a", "y": "b"})[:2] == ("tie", 0.0)  # a split vote is no preference, and no agreement
    assert tally({"x": "a", "y": "tie", "z": None})[:2] == ("tie", 0.5)  # abstentions are not counted
    assert tally({"x": None}) == (None, 0.0, {"a": 0, "b": 0, "tie": 0})
    assert tally({"x": "b", "y": "b", "z": "tie", "w": None})[:2] == ("b", 2 / 3)


def _distortion_pairs(n: int):
    """n single-person demo clips (real faces over real photographs), each against a swap, drift or degrade
    distortion of itself: pairs whose right answer (the clean clip) is known."""
    from data.demo import background_photos, compose_clip
    from data.distort import CleanClip, DistortionConfig, make_pair
    from data.faces import crop_face, load_face_photos
    from data.schema import decode_members

    photos = load_face_photos()
    refs = [crop_face(p.image, p.face_box, margin=0.5, size=128) for p in photos]
    tight = [crop_face(p.image, p.face_box, margin=0.15, size=96) for p in photos]
    backgrounds = background_photos()
    for i in range(n):
        rng = np.random.default_rng([7, i])
        order = [int(j) for j in rng.permutation(len(photos))]
        video, boxes = compose_clip([tight[order[0]]], backgrounds[i % len(backgrounds)], 5, 128, 128, rng)
        clip = CleanClip(f"c{i}", "a person", video, boxes, [tight[j] for j in order], [refs[order[0]]],
                         [photos[order[0]].identity_id], [photos[j].identity_id for j in order[1:]])
        kind = ("swap", "drift", "degrade")[i % 3]
        members, _ = make_pair(clip, rng, DistortionConfig(min_severity=0.6), kind=kind)
        yield kind, decode_members("preference", members)


def test_face_vote_labels_distortion_pairs():
    """The face scorer's vote on clean-vs-distorted pairs: at least 75% right over 12 pairs (measured: 11 of 12;
    24 pairs: 21), every swap right, and each tie exactly where the two scores are within the margin."""
    margin = 0.03
    scorers = Scorers(load_prefdata_config(None, [f"autolabel.scorers.face.margin={margin}"]).autolabel)
    right, by_kind = 0, {}
    for kind, s in _distortion_pairs(12):
        scores = scorers.score([s["video_a"], s["video_b"]], [s["refs"]] * 2, ["a person"] * 2)
        label, agreement, extra = scorers.vote(scores, 0, 1)
        a, b = scores.scores["face"]
        if label == "tie":
            assert abs(a - b) <= margin, (kind, a, b)
        else:
            assert label == ("a" if a > b else "b") and abs(a - b) > margin and agreement == 1.0
        assert extra["votes"]["face"]["vote"] == label and extra["votes"]["face"]["a"] == pytest.approx(a)
        right += label == s["label"]["preference"]
        by_kind.setdefault(kind, []).append(label == s["label"]["preference"])
    assert right >= 9, by_kind
    assert all(by_kind["swap"]), by_kind


def test_face_abstains_without_faces_but_prefers_a_face():
    """Two faceless videos are no evidence (the face scorer abstains); a faceless video against one showing the
    person loses."""
    scorers = Scorers(load_prefdata_config(None, ["autolabel.scorers.face.margin=0.03"]).autolabel)
    _, s = next(_distortion_pairs(1))
    clean = s["video_a"] if s["label"]["preference"] == "a" else s["video_b"]
    blank = np.full_like(clean, 90)
    scores = scorers.score([blank, blank.copy(), clean], [s["refs"]] * 3, ["x"] * 3)
    assert scorers.vote(scores, 0, 1)[0] is None
    assert scorers.vote(scores, 2, 0)[:2] == ("a", 1.0) and scorers.vote(scores, 0, 2)[0] == "b"


def _candidate_shards(out, brightness):
    """Candidate shards by hand: brightness[prompt][generator] = per-video grey levels (uniform videos), so the
    demo_brightness scorer's answer for every pair is known."""
    rng = np.random.default_rng(0)
    ref = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    with ShardWriter(out, "candidates", 5) as writer:
        for p, gens in brightness.items():
            for gen, levels in gens.items():
                for k, level in enumerate(levels):
                    video = np.full((3, 16, 16, 3), level, dtype=np.uint8)
                    meta = make_meta(1, ["ann"], "test", {"video": VideoInfo(3, 16.0, 16, 16)})
                    cand = {"prompt_key": p, "generator": gen, "checkpoint": "base", "seed": 100 * k + len(gen),
                            "sampler": "ode"}
                    writer.write(f"{p}-{gen}-{k}", candidate_members(f"prompt {p}", [ref], encode_video(video), cand,
                                                                     meta))
    return writer.pattern


def test_autolabel_command_on_candidates(tmp_path, capsys):
    levels = {"p0": {"dim": [40, 60], "bright": [200, 120]}, "p1": {"dim": [100, 101], "bright": [180, 30]}}
    pattern = _candidate_shards(tmp_path / "cand", levels)
    out = tmp_path / "auto"
    args = ["--config", "cluster_configs/reward_data_demo.yaml", f"autolabel.candidate_shards={pattern}",
            "autolabel.people_fraction=0.0", f"autolabel.out={out}",
            "autolabel.scorers={demo_brightness: {margin: 0.02}}", "autolabel.min_agreement=1.0"]
    summary = main(args)
    pairs = list(ShardReader(summary["pattern"], kind="preference", shuffle=False, epochs=1))
    assert summary["pairs"] == 12 and summary["kept"] == len(pairs) == 12  # 6 pairs of 4 candidates per prompt
    grey = {f"{p}-{g}-{k}": v for p, gens in levels.items() for g, vs in gens.items() for k, v in enumerate(vs)}
    orders = set()
    for s in pairs:
        label, extra = s["label"], s["label"]["extra"]
        a, b = grey[extra["candidates"]["a"]], grey[extra["candidates"]["b"]]
        want = "tie" if abs(a - b) / 255 <= 0.02 else ("a" if a > b else "b")
        assert label["source"] == "auto" and label["preference"] == want, (a, b, label)
        assert extra["votes"]["demo_brightness"]["vote"] == want and extra["agreement"] == 1.0
        assert np.abs(s["video_a"].astype(int) - a).max() <= 2 and np.abs(s["video_b"].astype(int) - b).max() <= 2
        assert extra["generators"]["a"] in ("dim", "bright") and s["meta"]["extra"]["prompt_key"] == s["key"][:2]
        orders.add(extra["candidates"]["a"] < extra["candidates"]["b"])
    assert orders == {True, False}  # which candidate is `a` is drawn, not file order
    assert summary["labels"]["tie"] == 1  # grey 100 vs 101 only
    written = json.loads((out / "pairs.autolabel.json").read_text())
    assert written["kept"] == 12 and written["scorers"]["demo_brightness"]["votes"] == 12
    assert "kept 12" in capsys.readouterr().out

    # again without --overwrite: refused, naming the key; a second, disagreeing scorer drops split votes
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2 and "autolabel.out" in capsys.readouterr().err
    both = "autolabel.scorers={demo_brightness: {margin: 0.02}, demo_reference_color: {margin: 0.0}}"
    two = main(args[:-2] + [both, "autolabel.min_agreement=1.0", "autolabel.cross_generator_only=true", "--overwrite"])
    assert two["pairs"] == 8  # 2 x 2 cross-generator pairs per prompt
    assert two["kept"] + two["dropped_low_agreement"] == 8 and two["dropped_low_agreement"] > 0
    # every prompt to people: the same pairs, none dropped for agreement (people decide), written apart
    people = main(args[:-2] + [both, "autolabel.min_agreement=1.0", "autolabel.cross_generator_only=true",
                               "autolabel.people_fraction=1.0", "--overwrite"])
    assert people["pattern"] is None and people["kept"] == 0 and not list(out.glob("pairs-*.tar"))
    assert people["people"]["kept"] == 8 and people["people"]["pattern"].endswith("for_people-{000000..000000}.tar")


def test_choose_pairs_is_seeded_and_bounded():
    infos = [{"generator": g} for g in ("x", "x", "y", "y", "z")]
    section = load_prefdata_config(None, ["autolabel.pairs_per_prompt=4",
                                          "autolabel.cross_generator_only=true"]).autolabel
    pairs = choose_pairs(infos, "p0", section)
    assert len(pairs) == 4 and pairs == choose_pairs(infos, "p0", section)
    assert all(infos[i]["generator"] != infos[j]["generator"] for i, j in pairs)
    assert len({frozenset(p) for p in pairs}) == 4


def test_the_vlm_reward_model_votes(tmp_path):
    """`vlm` (the identity reward model, here the tiny random-init one) scores and votes like any scorer: its
    provenance holds its two scores, and its vote follows them."""
    pattern = _candidate_shards(tmp_path / "cand", {"p0": {"g": [40, 200, 120]}})
    summary = main(["--config", "cluster_configs/reward_data_demo.yaml", f"autolabel.candidate_shards={pattern}",
                    "autolabel.people_fraction=0.0", f"autolabel.out={tmp_path / 'auto'}",
                    "autolabel.scorers={vlm: {margin: 0.0}}", "autolabel.reward.vlm.init=random",
                    "autolabel.reward.vlm.arch=tiny", "autolabel.reward.vlm.image_size=56",
                    "autolabel.reward.vlm.num_frames=2"])
    pairs = list(ShardReader(summary["pattern"], kind="preference", shuffle=False, epochs=1))
    assert summary["pairs"] == len(pairs) == 3 and summary["scorers"]["vlm"]["votes"] == 3
    for s in pairs:
        vote = s["label"]["extra"]["votes"]["vlm"]
        assert math.isfinite(vote["a"]) and math.isfinite(vote["b"]) and vote["a"] != vote["b"]
        assert s["label"]["preference"] == vote["vote"] == ("a" if vote["a"] > vote["b"] else "b")


def test_candidates_of_one_prompt_key_must_share_prompt_and_references(tmp_path, capsys):
    """A pair is written with one copy of the prompt and references: candidates grouped under one prompt key with
    other photos are an error naming both samples."""
    pattern = _candidate_shards(tmp_path / "cand", {"p0": {"g": [40, 200]}})
    other = np.full((32, 32, 3), 7, dtype=np.uint8)
    meta = make_meta(1, ["ann"], "test", {"video": VideoInfo(3, 16.0, 16, 16)})
    cand = {"prompt_key": "p0", "generator": "x", "checkpoint": "x", "seed": 0, "sampler": "external"}
    with ShardWriter(tmp_path / "ext", "candidates") as writer:
        writer.write("p0-x-0", candidate_members("prompt p0", [other], encode_video(np.zeros((3, 16, 16, 3), np.uint8)),
                                                 cand, meta))
    with pytest.raises(SystemExit) as err:
        main(["--config", "cluster_configs/reward_data_demo.yaml", f"autolabel.out={tmp_path / 'auto'}",
              f"autolabel.candidate_shards='{{{pattern},{writer.pattern}}}'",
              "autolabel.scorers={demo_brightness: {}}"])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "p0-x-0" in message and "p0-g-0" in message and "reference photos" in message
