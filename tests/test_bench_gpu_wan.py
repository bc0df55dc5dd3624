"""bench/gpu_wan.py at tiny size on CPU: it runs end to end, and its figures and FLOP formula hold.

The GPU run itself (Wan2.1 1.3B) is not run here; these tests pin what it relies on: the phases run,
ours and the naive loop compute the same samples and gradients, and the analytic FLOP count agrees
with torch.utils.flop_counter (on CPU the default SDPA kernel is not in the counter's table, so the
attention is counted through the math backend, or left out and compared with the formula's rest).
"""

import json
import time

import pytest
import torch

from bench import gpu_wan
from bench.gpu_wan_setup import SIZES, WAN21_1_3B, build_transformer
from bench.gpu_wan_flops import (
    ACT_COEF,
    counted_forward_flops,
    flop_terms,
    latent_shape,
    peak_bf16_tflops,
    saved_bytes,
    train_step_flops,
    video_tokens,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The run the brief asks for; main() uses one CPU thread for tiny and restores the setting."""
    out = tmp_path_factory.mktemp("gpu_wan") / "tiny.json"
    before = torch.get_num_threads()
    start = time.perf_counter()
    result = gpu_wan.main(["--size", "tiny", "--device", "cpu", "--peak-tflops", "1", "--grad-ckpt", "on",
                           "--group", "4", "--steps", "4", "--json", str(out)])
    assert torch.get_num_threads() == before
    return result, json.loads(out.read_text()), time.perf_counter() - start


def test_tiny_run_reports_every_phase(tiny_run):
    result, written, seconds = tiny_run
    assert written["phases"].keys() == result["phases"].keys()
    assert set(written["phases"]) == {"ours_rollout", "naive_rollout", "ours_train_lora", "naive_train_lora",
                                      "ours_train_full", "naive_train_full"}
    for name, phase in written["phases"].items():
        assert phase["seconds"] > 0 and phase["videos_per_s"] > 0, name
        assert phase["mfu"] is not None and phase["mfu"] > 0, name
        assert phase["hfu"] >= phase["mfu"], name
    assert written["config"]["grad_ckpt"] is True
    assert written["ratios"]["rollout_videos_per_s_ours_over_naive"] > 0
    assert written["peak_source"] == "--peak-tflops"
    assert seconds < 60, f"tiny bench took {seconds:.1f} s"  # about 3 s on one thread


def test_ours_and_naive_compute_the_same_samples_and_gradients(tiny_run):
    check = tiny_run[1]["check"]
    assert check["finite"]
    assert check["final_latents_max_abs"] > 0.1  # the samples moved away from zero
    assert check["final_latents_max_abs_diff"] <= 1e-4 * check["final_latents_max_abs"]
    assert check["log_probs_max_abs_diff"] < 1e-4
    assert check["lora_grad_norm_rel_diff"] < 1e-4
    assert check["full_grad_norm_rel_diff"] < 1e-4
    assert abs(check["flop_counter_ratio"] - 1) < 0.01


def test_flop_formula_matches_flop_counter_on_tiny(one_thread):
    """Forward of the tiny config: the formula and torch's FLOP counter agree exactly."""
    cfg = SIZES["tiny"]["transformer"]
    shape = latent_shape(cfg, 9, 64, 64)
    n, t, rows = video_tokens(cfg, shape), 16, 2
    model = build_transformer(cfg, "cpu", torch.float32, 0)
    x, e = torch.randn(rows, *shape), torch.randn(rows, t, cfg["text_dim"])
    timestep = torch.tensor([500.0] * rows)
    terms = flop_terms(cfg, n, t)
    counted = counted_forward_flops(model, x, timestep, e)  # attention via SDPA's math backend
    assert counted == rows * terms["forward"]
    # With the default CPU kernel (_scaled_dot_product_flash_attention_for_cpu, not in the counter's
    # table) the counter sees every matmul but the attention scores and values: the formula's rest.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(hidden_states=x, timestep=timestep, encoder_hidden_states=e, return_dict=False)
    assert counter.get_total_flops() == rows * (terms["forward"] - terms["attention"])


def test_flop_formula_lora_terms(one_thread):
    from config import LoraConfig
    from policy.lora import add_lora

    cfg = SIZES["tiny"]["transformer"]
    shape = latent_shape(cfg, 9, 64, 64)
    n, t = video_tokens(cfg, shape), 16
    model = build_transformer(cfg, "cpu", torch.float32, 0)
    add_lora(model, LoraConfig(rank=4, alpha=4.0))
    counted = counted_forward_flops(model, torch.randn(1, *shape), torch.tensor([500.0]),
                                    torch.randn(1, t, cfg["text_dim"]))
    assert counted == flop_terms(cfg, n, t, lora_rank=4)["forward"]


def test_flop_formula_at_real_1_3b_size_on_meta_device():
    """The real config at 33x240x416 with 512 text tokens, counted on meta tensors (no memory, no time)."""
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN21_1_3B)
        x = torch.empty(1, *latent_shape(WAN21_1_3B, 33, 240, 416))
        e = torch.empty(1, 512, 4096)
        timestep = torch.empty(1)
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(hidden_states=x, timestep=timestep, encoder_hidden_states=e, return_dict=False)
    terms = flop_terms(WAN21_1_3B, video_tokens(WAN21_1_3B, x.shape[1:]), 512)
    assert video_tokens(WAN21_1_3B, x.shape[1:]) == 3510
    assert counter.get_total_flops() == terms["forward"] == 11_535_310_209_024


def test_training_flops_multiples():
    terms = flop_terms(WAN21_1_3B, 3510, 512, lora_rank=32)
    full, full_hw = train_step_flops(flop_terms(WAN21_1_3B, 3510, 512), "full", kl=False, ckpt=True)
    assert full == pytest.approx(3 * flop_terms(WAN21_1_3B, 3510, 512)["forward"])
    assert full < full_hw < full * 4 / 3 + 1
    lora, _ = train_step_flops(terms, "lora", kl=True, ckpt=False)
    # LoRA: no weight gradients for the frozen base, so between 2 and 3 forwards, plus the reference.
    assert 3 * terms["base"] < lora < 4 * terms["forward"]


def test_peak_table():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_bf16_tflops("NVIDIA L40S") == 362
    assert peak_bf16_tflops("NVIDIA H100 NVL") is None  # not in the table: needs --peak-tflops
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


def test_activation_coefficients_match_saved_tensors(one_thread):
    """ACT_COEF (used by --grad-ckpt auto and MEMORY_PLAN.md) against a fresh hook measurement."""
    cfg = dict(WAN21_1_3B, num_attention_heads=6, ffn_dim=4480, text_dim=64)
    d = 6 * 128
    for mode in ("full", "lora"):
        per_layer = []
        for frames in (2, 4):
            one = saved_bytes(dict(cfg, num_layers=1), (16, frames, 16, 16), 64, mode)
            two = saved_bytes(dict(cfg, num_layers=2), (16, frames, 16, 16), 64, mode)
            per_layer.append(two - one)
        measured = (per_layer[1] - per_layer[0]) / 128
        coef = ACT_COEF[mode]
        assert measured == pytest.approx(coef["video_d"] * d + coef["video_f"] * 4480, rel=0.05), mode


def test_a_failing_phase_still_writes_what_was_measured(tmp_path, monkeypatch, one_thread):
    """An OOM in a late phase of a GPU run must not lose the phases before it."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(gpu_wan, "naive_train_pass", out_of_memory)
    out = tmp_path / "partial.json"
    with pytest.raises(RuntimeError, match="simulated"):
        gpu_wan.main(["--size", "tiny", "--device", "cpu", "--group", "2", "--steps", "2", "--skip-full-ft",
                      "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["error"] == "RuntimeError: simulated out of memory"
    assert {"ours_rollout", "naive_rollout", "ours_train_lora"} <= set(written["phases"])
    assert "rollout_videos_per_s_ours_over_naive" in written["ratios"]
    assert written["phases"]["ours_rollout"]["mfu"] is None  # no peak known for a CPU without --peak-tflops
