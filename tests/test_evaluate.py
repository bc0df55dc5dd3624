"""Evaluation: metrics on crafted face clips, paired comparison statistics, the CLI, the report, the monitor.

Tiny 32x32 model videos contain no detectable face (face metrics there are the missing penalty), so the
face metrics are checked on clips pasted together from the real face photographs of data/faces.py.
"""

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config, to_yaml
from evaluation.held_out import eval_seeds, held_out_monitor, load_prompts
from evaluation.metrics import EvalScorer, bootstrap_ci, compare_records, summarize_records, win_rate
from evaluation.policies import EvalError, build_eval_policy, check_compatible, resolve_policy
from launcher.evaluate import main
from runtime.checkpoint import CheckpointManager
from tests.stand_ins import policy_with_visible_lora

FAST = ["sampler.num_steps=2", "reward.face.num_frames=2", "reward.vlm.num_frames=2", "logging.progress_bar=false"]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.demo import build_demo

    prompts, _ = build_demo(tmp_path_factory.mktemp("eval_data"), num_prompts=3, num_pairs=1, samples_per_shard=4)
    return prompts


def config(root, shards, out, *overrides):
    return load_config(root / "cluster_configs" / "local_cpu.yaml",
                       [f"data.prompt_shards={shards}", f"trainer.output_dir={out}", *FAST, *overrides])


def argv(root, shards, out, *args):
    return ["--config", str(root / "cluster_configs" / "local_cpu.yaml"), "--num-prompts", "2",
            "--seeds-per-prompt", "2", *args, f"data.prompt_shards={shards}", f"trainer.output_dir={out}", *FAST]


# ----------------------------------------------------------------------------- metrics with known answers


def test_face_metrics_true_identity_beats_swap_and_ignore_reference_order(root, tmp_path):
    from data.demo import compose_clip
    from data.faces import crop_face, load_face_photos

    photos = load_face_photos()  # eileen_collins, grace_hopper, cameraman
    refs = [crop_face(p.image, p.face_box, margin=0.5, size=128) for p in photos]
    tight = [crop_face(p.image, p.face_box, margin=0.15, size=96) for p in photos]
    background = np.full((112, 192, 3), 90, np.uint8)
    true_clip, _ = compose_clip([tight[0], tight[1]], background, 3, 112, 192, np.random.default_rng(0))
    # identity swap: the second person's face is replaced by the first person's (both faces still found)
    swapped, _ = compose_clip([tight[0], tight[0]], background, 3, 112, 192, np.random.default_rng(0))
    # a missing person: the cameraman's three-quarter profile is not found by dlib's frontal detector
    missing, _ = compose_clip([tight[0], tight[2]], background, 3, 112, 192, np.random.default_rng(0))
    scorer = EvalScorer(config(root, "unused", tmp_path).reward)
    rows = scorer.score([true_clip, swapped, true_clip, missing], [refs[:2], refs[:2], refs[1::-1], refs[:2]],
                        ["p"] * 4)
    real, swap, reordered, gone = rows
    assert real["face_found_frac"] == swap["face_found_frac"] == 1.0 and gone["face_found_frac"] == 0.0
    assert real["face_mean"] > swap["face_mean"] + 0.02 and real["face_min"] > swap["face_min"] + 0.05
    assert gone["face_min"] == 0.0  # reward.face.missing_penalty
    assert real["face_per_identity"][0] == pytest.approx(swap["face_per_identity"][0], abs=0.02)  # person 1 kept
    assert reordered["face_mean"] == pytest.approx(real["face_mean"], abs=1e-12)
    assert reordered["face_min"] == pytest.approx(real["face_min"], abs=1e-12)
    assert reordered["face_per_identity"] == pytest.approx(real["face_per_identity"][::-1], abs=1e-12)
    assert real["reward_face"] == pytest.approx(real["face_mean"])  # the composite shares the FaceScore


def test_bootstrap_and_win_rate_known_answers():
    assert win_rate([1, 2, 3, np.nan], [1, 1, 4, 0]) == pytest.approx(0.5)  # tie, win, loss; NaN pair dropped
    assert bootstrap_ci([0.3] * 7) == (pytest.approx(0.3), pytest.approx(0.3))
    values = np.random.default_rng(0).normal(1.0, 0.1, 200)
    lo, hi = bootstrap_ci(values, seed=3)
    assert lo < values.mean() < hi and hi - lo < 0.05
    assert bootstrap_ci(values, seed=3) == (lo, hi)  # seeded
    # one big cluster dominating: resampling clusters widens the interval vs treating samples as independent
    clustered = np.r_[np.zeros(50), np.ones(50)]
    assert np.subtract(*bootstrap_ci(clustered, [0] * 50 + [1] * 50)[::-1]) > \
        np.subtract(*bootstrap_ci(clustered)[::-1])
    base = [{"key": f"k{i // 2}", "seed": i % 2, "num_people": 1, "identity_ids": ["a"], "face_mean": float(i),
             "face_per_identity": [float(i)], "reward_total": 0.0} for i in range(6)]
    better = [dict(r, face_mean=r["face_mean"] + 0.25) for r in base]
    cmp = compare_records(better, base).to_dict()
    assert cmp["deltas"]["face_mean"]["delta"] == pytest.approx(0.25)
    assert cmp["deltas"]["face_mean"]["significant"] and cmp["win_rates"]["face_mean"]["win_rate"] == 1.0
    assert cmp["win_rates"]["reward_total"]["win_rate"] == 0.5 and cmp["win_rates"]["reward_total"]["ties"] == 6
    assert summarize_records(base)["per_identity"]["a"]["mean"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="differ in prompts/seeds"):
        compare_records(better[:-1], base)


# ----------------------------------------------------------------------------- CLI, report, monitor


def test_policy_against_itself_zero_delta_half_win_rate(root, shards, tmp_path):
    out = tmp_path / "run"
    result = main(argv(root, shards, out, "--checkpoint", "base", "--compare", "base", "--no-tensorboard",
                       "reward.weights.vlm=0.0"))  # vlm in the weights: the identity model is scored too
    cmp = result["comparison"]
    assert cmp["pairs"] == 4 and {"vlm", "face_mean", "reward_total"} <= set(cmp["win_rates"])
    for name, d in cmp["deltas"].items():
        assert d["delta"] == 0.0 and d["ci_low"] == d["ci_high"] == 0.0 and not d["significant"], name
    for w in cmp["win_rates"].values():
        assert w["win_rate"] == 0.5 and w["ties"] == 4
    lines = (out / "eval" / "base" / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert len(lines) == 4 and {"vlm", "face_mean", "face_min", "face_found_frac", "reward_total",
                                "reward_demo_reference_color", "face_per_identity", "seed"} <= set(record)
    assert record["face_mean"] == 0.0  # 32x32: no face found, every person scores the missing penalty
    summary = json.loads((out / "eval" / "base_compare" / "summary.json").read_text())
    assert summary["metrics"]["reward_total"]["n"] == 4 and summary["seeds"] == eval_seeds(0, 2)


def _checkpoint(cfg, step=2):
    """A real checkpoint layout whose LoRA visibly changes the policy; returns (step dir, that policy)."""
    from policy.lora import save_lora

    policy = policy_with_visible_lora(cfg)
    path = CheckpointManager(cfg.trainer.output_dir).save(
        step, lambda tmp: save_lora(policy.transformer, tmp / "lora", cfg.model.kind), {"step": step}, to_yaml(cfg))
    return path, policy


def test_checkpoint_vs_base_report(root, shards, tmp_path):
    from policy.sampler import sample_group
    from policy.schedule import schedule_from_config
    from policy.sde import NoiseRule
    from reward.demo import demo_reference_color

    out = tmp_path / "run"
    cfg = config(root, shards, out)
    _, trained = _checkpoint(cfg)
    (out / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "reward_mean": -0.2 + 0.01 * s, "reward_std": 0.02, "reward_demo_reference_color": -0.2 + 0.01 * s,
         "kl": 0.001 * s, "heldout_face_mean": 0.5, "heldout_reward_total": -0.2}) + "\n" for s in (1, 2)))
    result = main(argv(root, shards, out, "--checkpoint", "latest", "--compare", "base", "--grid-prompts", "2"))
    ev = out / "eval"
    for name in ("report.md", "comparison.json", "video_grid.mp4", "step_000002/samples.jsonl", "base/summary.json"):
        assert (ev / name).stat().st_size > 0, name
    for name in ("training_curves", "identity_similarity", "video_grid"):
        with Image.open(ev / f"{name}.png") as image:
            image.verify()
        with Image.open(ev / f"{name}.png") as image:
            assert image.size[0] > 100 and image.size[1] > 100 and np.asarray(image).std() > 0, name
    text = (ev / "report.md").read_text()
    assert "step_000002 vs base" in text and "video_grid.png" in text and "training_curves.png" in text
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the evaluated checkpoint reproduces the policy that wrote it, and 'base' is that policy with adapters off
    from policy.lora import adapters_disabled

    prompt, seeds = load_prompts(shards, 1)[0], eval_seeds(0, 2)
    cond = trained.encode_condition(prompt["prompt"], prompt["refs"])
    for tag, context in (("step_000002", contextlib.nullcontext()), ("base", adapters_disabled(trained.transformer))):
        with context:
            videos = sample_group(trained, cond, seeds, NoiseRule.from_config(cfg.sampler),
                                  schedule_from_config(cfg.sampler, 2), deterministic=True).videos
        expected = demo_reference_color(list(videos), [prompt["refs"]] * 2)
        got = [json.loads(line) for line in (ev / tag / "samples.jsonl").read_text().splitlines()][:2]
        assert [g["reward_demo_reference_color"] for g in got] == pytest.approx(expected.tolist(), abs=1e-9), tag
    assert result["comparison"]["deltas"]["reward_total"]["delta"] != 0.0
    summaries = {s["policy"]: s for s in result["summaries"]}  # the guidance each was trained at: known, unknown
    assert summaries["step_000002"]["trained_guidance_scale"] == cfg.sampler.guidance_scale
    assert summaries["base"]["trained_guidance_scale"] is None


def test_held_out_monitor_is_deterministic_and_leaves_state(root, shards, tmp_path):
    cfg = config(root, shards, tmp_path / "run")
    policy = build_eval_policy(cfg)
    policy.transformer.train()
    prompts, seeds = load_prompts(shards, 2), eval_seeds(cfg.trainer.seed, 1)
    rng = torch.get_rng_state()
    first = held_out_monitor(policy, cfg, prompts, seeds)
    assert torch.equal(rng, torch.get_rng_state()) and policy.transformer.training
    assert {"heldout_face_mean", "heldout_face_min", "heldout_face_found_frac", "heldout_reward_total",
            "heldout_reward_demo_reference_color", "heldout_failed"} <= set(first)
    assert all(np.isfinite(v) for v in first.values()) and first["heldout_failed"] == 0
    assert held_out_monitor(policy, cfg, prompts, seeds) == first


def test_errors_name_the_culprit(root, shards, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(EvalError, match="no checkpoint under .*checkpoints"):
        resolve_policy("latest", out)
    with pytest.raises(EvalError, match="nowhere"):
        resolve_policy(str(tmp_path / "nowhere"), out)
    cfg = config(root, shards, out)
    step_dir, _ = _checkpoint(cfg, step=3)
    assert resolve_policy(str(out), "unused").lora_file == step_dir / "lora" / "pytorch_lora_weights.safetensors"
    spec = resolve_policy("latest", out)
    assert (spec.tag, spec.step) == ("step_000003", 3)
    with pytest.raises(EvalError, match="model.lora.rank=4 .* has 8"):
        check_compatible(spec, config(root, shards, out, "model.lora.rank=8", "model.lora.alpha=4.0"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv(root, shards, out, "--checkpoint", str(tmp_path / "missing")))
    assert exit_info.value.code == 2


def test_a_checkpoint_with_an_ema_is_evaluated_on_it(root, shards, tmp_path):
    """Official eval swaps the EMA weights in: a checkpoint's lora_ema/ is the default, --weights live the other."""
    import shutil

    out = tmp_path / "run"
    step_dir, _ = _checkpoint(config(root, shards, out), step=2)
    assert resolve_policy(str(step_dir), out).tag == "step_000002"  # no EMA: the live weights
    shutil.copytree(step_dir / "lora", step_dir / "lora_ema")
    ema, live = resolve_policy("latest", out), resolve_policy("latest", out, "live")
    assert ema.lora_file == step_dir / "lora_ema" / "pytorch_lora_weights.safetensors" and ema.tag == "step_000002_ema"
    assert live.lora_file == step_dir / "lora" / "pytorch_lora_weights.safetensors" and live.tag == "step_000002"
    assert resolve_policy(str(step_dir / "lora_ema"), out).checkpoint == step_dir  # its config.yaml is checked
    with pytest.raises(EvalError, match="--weights"):
        resolve_policy("latest", out, "best")
