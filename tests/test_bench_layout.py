"""bench/layout_seconds.py: the busy / idle GPU-seconds arithmetic per layout (issue #18)."""

import pytest

from bench.gpu_wan_flops import flop_terms, latent_shape, video_tokens
from bench.layout_seconds import layouts, main, step_flops
from config import load_config
from config.checks import RANDOM_POLICY
from policy.arch import transformer_config


def test_layouts_closed_form():
    flops = {"sample": 3e15, "learn": 8e15}
    out = layouts(flops, rollout_gpus=3, learner_gpus=4, reward_gpus=1, tflops=100.0)
    assert out["split_sync"]["step_s"] == pytest.approx(10 + 20)  # 3e15 / 3e14, then 8e15 / 4e14
    assert out["split_async"]["step_s"] == pytest.approx(20)
    assert out["colocated"]["step_s"] == pytest.approx(11e15 / 8e14)
    assert out["colocated"]["idle_fraction"] == pytest.approx(0.0)
    assert out["split_sync"]["idle_fraction"] == pytest.approx(1 - 110 / (30 * 8))


def test_preset_flops_follow_the_architecture_and_the_window(root):
    preset = root / "cluster_configs" / "vace_1.3b_8gpu.yaml"
    cfg = load_config(preset, ["trainer.output_dir=x", *RANDOM_POLICY])
    flops = step_flops(cfg)
    arch = transformer_config("wan2.1-vace-1.3b", "vace")
    shape = latent_shape(arch, 33, 240, 416)
    n = video_tokens(arch, (shape[0], shape[1] + 1, shape[2], shape[3]))  # + one reference frame
    per_pass = flop_terms(dict(arch, num_layers=30 + 15), n, 512, 32)["forward"]  # 15 VACE control blocks
    assert flops["sample_video"] == pytest.approx(25 * 2 * per_pass)
    assert flops["videos"] == 256 and flops["sample"] == pytest.approx(256 * flops["sample_video"])
    windowed = step_flops(load_config(preset, ["trainer.output_dir=x", *RANDOM_POLICY,
                                               "sampler.sde_window.size=4"]))
    assert windowed["sample"] == flops["sample"]  # the ODE steps are still sampled
    assert windowed["learn"] == pytest.approx(flops["learn"] * 3 / 24)  # int(4 x 0.99) = 3 of 24 trained steps


def test_cli_last_line(capsys):
    result = main([])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("layout_seconds: split_sync=") and "colocated=" in last
    assert result["colocated"]["step_s"] < result["split_async"]["step_s"] < result["split_sync"]["step_s"]
