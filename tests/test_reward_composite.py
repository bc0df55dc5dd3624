"""CompositeReward (weighted sum, failure counting/masking) and the demo rewards, on real photographs.

Failures come from real inputs: a reference photograph without a human face (skimage.data.chelsea,
a cat) makes the real face reward raise; a black video makes log-brightness -inf.
"""

import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from skimage import data

from config import Config, RewardConfig
from data.faces import crop_face, load_face_photos
from policy.grpo import group_advantages
from reward.composite import REWARD_BUILDERS, CompositeReward, RewardError
from reward.demo import demo_brightness, demo_reference_color
from reward.face import FaceIdentityReward


@pytest.fixture(scope="module")
def sample():
    """One real face clip (Eileen Collins, 2 frames) and its reference; plus the cat photograph."""
    p = {ph.identity_id: ph for ph in load_face_photos()}["eileen_collins"]
    ref = crop_face(p.image, p.face_box, margin=0.5, size=128)
    face = crop_face(p.image, p.face_box, margin=0.3, size=80)[:, ::-1].copy()
    video = np.full((2, 112, 112, 3), 90, np.uint8)
    for t in range(2):
        video[t, 16 + 4 * t: 96 + 4 * t, 16:96] = face
    return video, ref, data.chelsea()


def log_brightness(videos, references, prompts):
    """A user component that is -inf on a black video (a real way to produce a non-finite score)."""
    return torch.log(demo_brightness(videos))


def cfg(**kw) -> RewardConfig:
    return RewardConfig(**kw)


# ---------------------------------------------------------------------------- demo rewards


def test_demo_brightness_is_mean_intensity():
    videos = [np.full((2, 4, 4, 3), 51, np.uint8), torch.full((1, 3, 5, 3), 255, dtype=torch.uint8)]
    videos.append(np.concatenate([np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)]))
    np.testing.assert_allclose(demo_brightness(videos, None, None).numpy(), [0.2, 1.0, 0.5])
    with pytest.raises(ValueError, match="sample 0: video must be uint8"):
        demo_brightness([np.zeros((2, 4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="sample 0: video is empty"):
        demo_brightness([np.zeros((0, 4, 4, 3), np.uint8)])


def test_demo_reference_color_prefers_the_references_colours(sample):
    _, ref, cat = sample
    target = np.mean([ref.reshape(-1, 3).mean(0), cat.reshape(-1, 3).mean(0)], 0)  # each reference counts once
    exact = np.broadcast_to(np.round(target).astype(np.uint8), (2, 8, 8, 3)).copy()
    off = exact.copy()
    off[1] = np.clip(off[1].astype(int) + [60, 0, 0], 0, 255).astype(np.uint8)
    score = demo_reference_color([exact, off, np.zeros_like(exact)], [[ref, cat]] * 3, ["p"] * 3)
    assert score[0] > score[1] > score[2]
    assert score[0].item() == pytest.approx(-np.linalg.norm(np.round(target) - target) / 255, abs=1e-12)
    assert score[1].item() == pytest.approx(score[0].item() / 2 - np.linalg.norm(off[1, 0, 0] - target) / 255 / 2)
    with pytest.raises(ValueError, match="sample 0: demo_reference_color needs at least one reference"):
        demo_reference_color([exact], [[]], ["p"])
    with pytest.raises(ValueError, match="sample 0: reference 1 must have shape"):
        demo_reference_color([exact], [[ref, ref[..., 0]]], ["p"])


# ---------------------------------------------------------------------------- composite


def test_from_config_weighted_sum_and_zero_weight_monitoring(sample):
    video, ref, _ = sample
    dark = (video // 2).astype(np.uint8)
    rc = cfg(weights={"demo_brightness": 2.0, "demo_reference_color": 0.5, "face": 0.0})
    comp = CompositeReward.from_config(rc)
    assert list(comp.components) == ["demo_brightness", "demo_reference_color", "face"]
    assert isinstance(comp.components["face"], FaceIdentityReward)
    out = comp.score([video, dark], [[ref], [ref]], ["a", "b"])
    assert set(out) == {"demo_brightness", "demo_reference_color", "face", "total"}
    expected = 2.0 * out["demo_brightness"] + 0.5 * out["demo_reference_color"]
    torch.testing.assert_close(out["total"], expected, rtol=0, atol=1e-12)
    assert out["face"][0] > 0.9  # computed for monitoring, not in the total
    assert comp.failures == {"demo_brightness": 0, "demo_reference_color": 0, "face": 0}
    skipped = CompositeReward.from_config(rc, build_zero_weight=False)
    assert list(skipped.components) == ["demo_brightness", "demo_reference_color"]
    torch.testing.assert_close(skipped.score([video, dark], [[ref], [ref]], ["a", "b"])["total"], out["total"])


def test_from_config_accepts_the_full_omegaconf_tree(sample):
    video, ref, _ = sample
    full = OmegaConf.structured(Config)
    full.reward.weights = {"face": 1.0}
    comp = CompositeReward.from_config(full.reward)
    out = comp.score([video], [[ref]], ["p"])
    assert out["total"].item() == out["face"].item() > 0.9


def test_a_failed_sample_is_counted_logged_and_masked_not_zeroed(sample, caplog):
    video, ref, cat = sample
    brighter = (video.astype(int) + 30).clip(0, 255).astype(np.uint8)
    comp = CompositeReward.from_config(cfg(weights={"face": 1.0, "demo_brightness": 0.1}))
    with caplog.at_level("WARNING", logger="reward.composite"):
        out = comp.score([video, video, brighter], [[ref], [cat], [ref]], ["p"] * 3)
    assert torch.isnan(out["face"][1]) and torch.isnan(out["total"][1])
    assert torch.isfinite(out["total"][[0, 2]]).all() and (out["face"][[0, 2]] > 0.9).all()
    assert torch.isfinite(out["demo_brightness"]).all()  # other components keep scoring the sample
    assert comp.failures == {"face": 1, "demo_brightness": 0}
    assert "'face' failed on sample 1" in caplog.text and "FaceNotFoundError" in caplog.text
    assert len(comp.last_errors) == 1
    # GRPO masks the failed sample instead of treating it as a 0 reward
    adv = group_advantages(out["total"].reshape(1, 3))
    assert adv.mask.tolist() == [[True, False, True]]


def test_on_nan_raise_names_component_and_sample(sample):
    video, ref, cat = sample
    comp = CompositeReward.from_config(cfg(weights={"face": 1.0}, on_nan="raise"))
    expected = r"'face' failed on sample 1: \(re-run alone as batch index 0\) FaceNotFoundError: sample 0: reference 0"
    with pytest.raises(RewardError, match=expected):
        comp.score([video, video], [[ref], [cat]], ["p", "p"])
    black = np.zeros_like(video)
    strict = CompositeReward({"logb": log_brightness}, {"logb": 1.0}, on_nan="raise")
    with pytest.raises(RewardError, match=r"'logb' failed on sample 0: non-finite score -inf"):
        strict.score([black, video], [[ref], [ref]], ["p", "p"])


def test_non_finite_scores_become_nan_and_zero_weight_failures_do_not_mask(sample):
    video, ref, _ = sample
    black = np.zeros_like(video)
    comp = CompositeReward({"logb": log_brightness, "demo_brightness": demo_brightness},
                           {"logb": 1.0, "demo_brightness": 1.0})
    out = comp.score([black, video], [[ref], [ref]], ["p", "p"])
    assert torch.isnan(out["logb"][0]) and torch.isnan(out["total"][0])  # -inf reported as NaN
    assert torch.isfinite(out["total"][1]) and comp.failures["logb"] == 1
    monitor = CompositeReward({"logb": log_brightness, "demo_brightness": demo_brightness},
                              {"logb": 0.0, "demo_brightness": 1.0})
    out = monitor.score([black, video], [[ref], [ref]], ["p", "p"])
    assert torch.isnan(out["logb"][0]) and monitor.failures["logb"] == 1
    torch.testing.assert_close(out["total"], out["demo_brightness"])


def test_contract_violations_raise(sample):
    video, ref, _ = sample
    wrong_shape = CompositeReward({"bad": lambda v, r, p: torch.zeros(len(v), 1)}, {"bad": 1.0})
    with pytest.raises(RewardError, match=r"'bad' returned shape \(2, 1\)"):
        wrong_shape.score([video, video], [[ref], [ref]], ["p", "p"])
    comp = CompositeReward({"demo_brightness": demo_brightness}, {"demo_brightness": 1.0})
    with pytest.raises(ValueError, match="2 videos, 1 reference lists and 2 prompts"):
        comp.score([video, video], [[ref]], ["p", "p"])
    with pytest.raises(ValueError, match="unknown reward"):
        CompositeReward.from_config(OmegaConf.create({"weights": {"clip": 1.0}, "on_nan": "mask"}))
    with pytest.raises(ValueError, match="no built component a non-zero weight"):
        CompositeReward({"demo_brightness": demo_brightness}, {"demo_brightness": 0.0})
    with pytest.raises(ValueError, match="reward.weights.face = 1.0 but no such component"):
        CompositeReward({"demo_brightness": demo_brightness}, {"demo_brightness": 1.0, "face": 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        CompositeReward({"demo_brightness": demo_brightness}, {"demo_brightness": float("nan")})
    with pytest.raises(ValueError, match="reward.on_nan"):
        CompositeReward({"demo_brightness": demo_brightness}, {"demo_brightness": 1.0}, on_nan="zero")


def test_vlm_is_imported_only_when_built_and_can_be_prebuilt(root, sample, monkeypatch):
    video, ref, _ = sample
    from config import ConfigError, load_config
    from reward.checks import check_reward_config

    # the registry is the one list: the config accepts a name exactly when it can be built
    preset, extra = root / "cluster_configs" / "local_cpu.yaml", ["trainer.output_dir=x", "reward.weights={extra: 1.0}"]
    with pytest.raises(ConfigError, match="'reward.weights.extra' is not a known reward"):
        load_config(preset, extra, checks=[check_reward_config])
    monkeypatch.setitem(REWARD_BUILDERS, "extra", lambda reward_cfg: None)
    assert dict(load_config(preset, extra, checks=[check_reward_config]).reward.weights) == {"extra": 1.0}
    monkeypatch.setitem(sys.modules, "reward.vlm", None)  # any import of reward/vlm.py now fails
    rc = cfg(weights={"demo_brightness": 1.0, "vlm": 0.0})
    assert list(CompositeReward.from_config(rc, build_zero_weight=False).components) == ["demo_brightness"]
    with pytest.raises(ImportError):
        CompositeReward.from_config(rc)
    comp = CompositeReward.from_config(cfg(weights={"vlm": 1.0}), prebuilt={"vlm": demo_brightness})
    assert comp.score([video], [[ref]], ["p"])["total"].item() == pytest.approx(demo_brightness([video]).item())


@pytest.mark.slow  # imports transformers and builds the tiny Qwen2.5-VL (~10 s on a busy CPU)
def test_vlm_component_builds_from_config_and_scores(sample):
    """The real contract with reward/vlm.py: load_reward_model(cfg.reward.vlm...).score."""
    video, ref, _ = sample
    comp = CompositeReward.from_config(cfg(weights={"vlm": 1.0, "demo_brightness": 0.0}))
    out = comp.score([video, video[::-1].copy()], [[ref], [ref, ref]], ["a woman smiles", "two women talk"])
    assert out["vlm"].shape == (2,) and torch.isfinite(out["vlm"]).all()
    torch.testing.assert_close(out["total"], out["vlm"])


def test_batch_error_and_non_finite_scores_in_one_batch_are_each_counted_once(sample):
    """The batch raises (the cat reference), so samples are re-scored alone; the black video's -inf
    found in that re-scoring is a failure too."""
    video, ref, cat = sample
    black = np.zeros_like(video)

    def picky_log_brightness(videos, references, prompts):
        if any(r is cat for refs in references for r in refs):
            raise ValueError("this component rejects the cat")
        return log_brightness(videos, references, prompts)

    comp = CompositeReward({"picky": picky_log_brightness}, {"picky": 1.0})
    out = comp.score([video, black, video], [[ref], [ref], [cat]], ["p"] * 3)
    assert torch.isfinite(out["total"][0]) and torch.isnan(out["total"][1:]).all()
    assert comp.failures["picky"] == 2 and len(comp.last_errors) == 2
    assert "sample 1: non-finite score -inf" in comp.last_errors[1]
    assert "sample 2: (re-run alone as batch index 0) ValueError: this component rejects the cat" in comp.last_errors[0]
