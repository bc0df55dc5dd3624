"""FaceIdentityReward on real photographs with the real dlib weights (no mocks).

Photos (see data/faces.py): Eileen Collins (skimage.data.astronaut) and Grace Hopper (matplotlib's
sample_data/grace_hopper.jpg), two different real people that dlib detects; skimage.data.chelsea
(a cat) as an image without a human face. References are head-and-shoulders crops; clips show
*mirrored, darkened* tighter crops, so a video face is never the reference's pixels.
"""

import sys

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data

from config import FaceRewardConfig
from data.faces import crop_face, load_face_photos
from reward.face import DLIB5_ARCFACE_112, FaceIdentityReward, FaceNotFoundError, align_face, similarity_transform

H, W = 112, 224  # two 80 px faces side by side; dlib (upsample=1) finds both


@pytest.fixture(scope="module")
def photos():
    ph = {p.identity_id: p for p in load_face_photos()}
    refs = {k: crop_face(ph[k].image, ph[k].face_box, margin=0.5, size=128) for k in ("eileen_collins", "grace_hopper")}
    faces = {k: (crop_face(ph[k].image, ph[k].face_box, margin=0.3, size=80)[:, ::-1] * 0.85).astype(np.uint8)
             for k in refs}
    return ({"E": refs["eileen_collins"], "G": refs["grace_hopper"]},
            {"E": faces["eileen_collins"], "G": faces["grace_hopper"]})


@pytest.fixture(scope="module")
def reward():
    return FaceIdentityReward(num_frames=5)


def clip(faces_per_frame):
    """Frames with the given faces (None = nobody there) left to right, drifting a few pixels."""
    video = np.full((len(faces_per_frame), H, W, 3), 90, np.uint8)
    for t, faces in enumerate(faces_per_frame):
        for i, face in enumerate(faces):
            if face is not None:
                x0, y0 = 16 + 112 * i + 4 * (t % 3), 16 + 4 * (t % 2)
                video[t, y0:y0 + face.shape[0], x0:x0 + face.shape[1]] = face
    return video


def pan(image, num_frames=5, size=256, step=12):
    """A camera pan over a real photograph: the person in their original context."""
    return np.stack([image[40 + step * t: 40 + step * t + size, 100 + step * t: 100 + step * t + size]
                     for t in range(num_frames)])


def test_same_identity_scores_higher_than_a_different_identity(photos, reward):
    refs, faces = photos
    for me, other in (("E", "G"), ("G", "E")):
        video = clip([[faces[me]]] * 2)
        same, diff = reward.score_video(video, [refs[me]]), reward.score_video(video, [refs[other]])
        assert same.found_frac == diff.found_frac == 1.0
        assert same.score > diff.score + 0.05, (me, same.score, diff.score)
    # the unedited photograph, panned: Eileen's photo matches Eileen's reference, not Grace's
    video = pan(data.astronaut(), num_frames=2)
    assert reward.score_video(video, [refs["E"]]).score > reward.score_video(video, [refs["G"]]).score + 0.05


def test_identity_swap_over_some_frames_scores_lower(photos, reward):
    refs, f = photos
    clean = reward.score_video(clip([[f["E"], f["G"]]] * 4), [refs["E"], refs["G"]])
    swapped = reward.score_video(clip([[f["E"], f["G"]]] + [[f["G"], f["G"]]] * 2 + [[f["E"], f["G"]]]),
                                 [refs["E"], refs["G"]])
    assert clean.found_frac == swapped.found_frac == 1.0
    assert swapped.score < clean.score - 0.01
    assert swapped.per_identity[0] < clean.per_identity[0] - 0.02  # Eileen is the one replaced
    assert abs(swapped.per_identity[1] - clean.per_identity[1]) < 0.01
    assert (swapped.per_frame[1:3, 0] < clean.per_frame[1:3, 0] - 0.05).all()
    np.testing.assert_allclose(swapped.per_frame[[0, 3]], clean.per_frame[[0, 3]], atol=1e-9)


def test_two_person_matching_ignores_reference_order(photos, reward):
    refs, f = photos
    video = clip([[f["G"], f["E"]], [f["E"], f["E"]]])  # the second frame shows Eileen twice: a conflict
    a = reward.score_video(video, [refs["E"], refs["G"]])
    b = reward.score_video(video, [refs["G"], refs["E"]])
    assert a.score == pytest.approx(b.score, abs=1e-12)
    np.testing.assert_allclose(a.per_identity, b.per_identity[::-1], atol=1e-12)
    assert min(a.per_identity) > 0.8  # each identity matched to a real face


def test_missing_person_gets_the_penalty_and_min_aggregate(photos):
    refs, f = photos
    r = FaceIdentityReward(num_frames=5, missing_penalty=-1.0, aggregate="min")
    s = r.score_video(clip([[f["E"], f["G"]]] * 2 + [[None, f["G"]]] * 3), [refs["E"], refs["G"]])
    assert s.found_frac == pytest.approx(2 / 5)
    np.testing.assert_array_equal(s.num_faces, [2, 2, 1, 1, 1])
    np.testing.assert_array_equal(s.per_frame[2:, 0], -1.0)
    assert (s.per_frame[:, 1] > 0.9).all()  # Grace, present throughout, is never penalised
    assert s.per_identity[0] == pytest.approx((s.per_frame[0, 0] + s.per_frame[1, 0] - 3) / 5)
    assert s.score == s.per_identity.min() == s.per_identity[0]


def test_tiny_video_has_no_detectable_face_and_scores_the_penalty(photos):
    refs, f = photos
    tiny = ndimage.zoom(clip([[f["E"], f["G"]]] * 3), (1, 32 / H, 32 / W, 1), order=1)
    s = FaceIdentityReward(missing_penalty=-0.5).score_video(tiny, [refs["E"], refs["G"]])
    assert s.score == -0.5 and s.found_frac == 0.0


def test_batch_call_accepts_torch_and_matches_score_video(photos, reward):
    refs, f = photos
    videos = [clip([[f["E"]]] * 2), torch.from_numpy(clip([[f["G"], f["E"]]] * 2))]
    references = [[refs["E"]], torch.from_numpy(np.stack([refs["E"], refs["G"]]))]  # a list, or a (K, H, W, 3) stack
    out = reward(videos, references, ["a", "b"])
    assert out.shape == (2,) and out.dtype == torch.float64
    assert out[0].item() == reward.score_video(videos[0], references[0]).score
    assert out[1].item() == reward.score_video(videos[1].numpy(), [refs["E"], refs["G"]]).score  # deterministic


def test_bad_inputs_raise_clear_errors(photos, reward):
    refs, f = photos
    video = clip([[f["E"]]] * 2)
    with pytest.raises(ValueError, match="empty"):
        reward.score_video(np.zeros((0, H, W, 3), np.uint8), [refs["E"]])
    with pytest.raises(ValueError, match="uint8"):
        reward.score_video(video.astype(np.float32), [refs["E"]])
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        reward.score_video(video[0], [refs["E"]])
    with pytest.raises(ValueError, match="1 reference image.*2 expected people"):
        reward.score_video(video, [refs["E"]], num_people=2)
    with pytest.raises(ValueError, match="non-empty list"):
        reward.score_video(video, [])
    with pytest.raises(ValueError, match="non-empty list"):
        reward.score_video(video, refs["E"])  # one bare image, not a list of them
    with pytest.raises(ValueError, match="2 videos but 1 reference lists"):
        reward([video, video], [[refs["E"]]])
    cat = data.chelsea()  # a real photograph, but of a cat: no human face
    with pytest.raises(FaceNotFoundError, match=r"sample 1: reference 1 \(of 2\): no face detected"):
        reward([video, video], [[refs["E"]], [refs["E"], cat]])


def test_config_and_constructor_validation():
    r = FaceIdentityReward.from_config(FaceRewardConfig(num_frames=3, aggregate="min", missing_penalty=-2.0))
    assert (r.backend, r.num_frames, r.aggregate, r.missing_penalty, r.upsample) == ("dlib", 3, "min", -2.0, 1)
    with pytest.raises(ValueError, match="reward.face.backend"):
        FaceIdentityReward(backend="facenet")
    with pytest.raises(ValueError, match="reward.face.aggregate"):
        FaceIdentityReward(aggregate="max")
    with pytest.raises(ValueError, match="reward.face.num_frames"):
        FaceIdentityReward(num_frames=0)


# ---------------------------------------------------------------------------- ArcFace alignment / backend


def _landmarks(reward, image):
    shape = reward._detect(image, limit=1)[0]
    return np.array([[p.x, p.y] for p in shape.parts()], float)


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, t = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    M = similarity_transform(DLIB5_ARCFACE_112, DLIB5_ARCFACE_112 @ rot.T + t)
    np.testing.assert_allclose(M, np.c_[rot, t], atol=1e-9)


def test_align_face_undoes_rotation_and_scale_of_a_real_photo(reward):
    im = data.astronaut()
    ref = align_face(im, _landmarks(reward, im)).astype(int)
    assert ref.shape == (112, 112, 3)
    for variant in (ndimage.rotate(im, 15, reshape=False, order=1, mode="nearest"),
                    ndimage.zoom(im, (0.5, 0.5, 1), order=1)):
        aligned = align_face(variant, _landmarks(reward, variant))
        assert np.abs(aligned - ref).mean() < 8  # same crop up to resampling
        assert np.abs(align_face(variant, _landmarks(reward, im)) - ref).mean() > 40  # wrong landmarks: not


def test_arcface_backend_names_config_and_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match=r"reward\.face\.backend=arcface.*onnxruntime"):
        FaceIdentityReward(backend="arcface", model_path=str(tmp_path / "x.onnx"))
    monkeypatch.delitem(sys.modules, "onnxruntime")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="reward.face.model_path"):
        FaceIdentityReward(backend="arcface")
    with pytest.raises(FileNotFoundError, match="reward.face.model_path"):
        FaceIdentityReward(backend="arcface", model_path=str(tmp_path / "missing.onnx"))


def _tiny_arcface_onnx(path, batch):
    """A random ONNX net with ArcFace's interface: (batch, 3, 112, 112) float -> (batch, 512)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.normal(size=(8, 3, 16, 16)).astype(np.float32), "conv_w")
    proj = numpy_helper.from_array(rng.normal(size=(392, 512)).astype(np.float32), "proj_w")
    nodes = [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[16, 16]),
             helper.make_node("Flatten", ["c"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "proj_w"], ["683"])]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, 512])],
                              initializer=[conv, proj])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize("batch", ["N", 1])  # dynamic batch, and the fixed batch of 1 many exports have
def test_arcface_backend_runs_an_onnx_model_end_to_end(photos, tmp_path, batch):
    """Untrained weights, so identities are not meaningful: this checks the plumbing (alignment,
    preprocessing, 512-d output, matching, determinism), not the discrimination."""
    pytest.importorskip("onnxruntime")
    _tiny_arcface_onnx(tmp_path / "arcface.onnx", batch)
    refs, f = photos
    r = FaceIdentityReward(backend="arcface", model_path=str(tmp_path / "arcface.onnx"), num_frames=3)
    assert r.embed_references([refs["E"], refs["G"]]).shape == (2, 512)
    video = clip([[f["E"], f["G"]]] * 3)
    a, b = r.score_video(video, [refs["E"], refs["G"]]), r.score_video(video, [refs["G"], refs["E"]])
    assert a.found_frac == 1.0 and np.isfinite(a.score) and -1 <= a.score <= 1
    assert a.score == pytest.approx(b.score, abs=1e-12)
    assert r.score_video(video, [refs["E"], refs["G"]]).score == a.score


def test_face_and_vlm_rewards_look_at_the_same_frames(photos):
    """One frame sampler (data.video.sample_frame_indices) for both rewards: frame t of the clip is painted with
    grey level 7 t, so the VLM's input images and the face reward's frame list name the frames they used."""
    from reward.vlm_inputs import RewardInputBuilder, build_image_processor, build_tiny_tokenizer

    refs, _ = photos
    video = np.stack([np.full((56, 56, 3), 7 * t, np.uint8) for t in range(33)])
    builder = RewardInputBuilder(build_tiny_tokenizer(), build_image_processor(56), 56, num_frames=4)
    vlm_frames = [int(img[0, 0, 0]) // 7 for img in builder.images(video, [refs["E"]])[1:]]
    face = FaceIdentityReward(num_frames=4).score_video(video, [refs["E"]])
    assert vlm_frames == face.frame_indices == [0, 11, 21, 32]


def test_face_and_vlm_frame_counts_must_agree(root):
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.face.num_frames.*reward.vlm.num_frames"):
        load_config(root / "cluster_configs" / "local_cpu.yaml", ["reward.weights.vlm=1.0", "reward.vlm.num_frames=4"])
