"""bench/gpu_wan.py's figures: one record per timed phase (seconds, videos/s, peak memory, TFLOP/s, MFU, HFU) and the
terminal table and summary."""

from __future__ import annotations

import sys
from typing import Optional

from bench.gpu_wan_setup import Phase


def phase_record(phase: Phase, videos: int, flops: float, hw_flops: float, peak: Optional[float], **extra) -> dict:
    rec = {"seconds": phase.seconds, "videos_per_s": videos / phase.seconds if phase.seconds > 0 else None,
           "peak_mem_bytes": phase.peak_bytes, "resident_at_start_bytes": phase.start_bytes,
           "model_tflop": flops / 1e12, "tflops_per_s": flops / phase.seconds / 1e12 if phase.seconds > 0 else None}
    rec["mfu"] = rec["tflops_per_s"] / peak if peak and rec["tflops_per_s"] is not None else None
    rec["hfu"] = hw_flops / phase.seconds / 1e12 / peak if peak and phase.seconds > 0 else None
    rec.update(extra)
    return rec


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


PHASE_HEADER = f"{'phase':<22}{'seconds':>10}{'videos/s':>11}{'peak GiB':>10}{'TFLOP/s':>10}{'MFU':>8}{'HFU':>8}"


def print_header(result: dict):
    cfg = result["config"]
    print(f"device: {cfg['device_name']}  peak bf16: {_fmt(result['peak_tflops'], '.0f')} TFLOP/s "
          f"({result['peak_source']})")
    print(f"model: Wan2.1 {cfg['size']} random init, {cfg['dtype']}, attention {cfg['attn_backend']}, "
          f"grad ckpt {cfg['grad_ckpt']}, compile {cfg['compile']}, LoRA r{cfg['lora_rank']}, KL beta {cfg['kl_beta']}")
    print(f"work: group {cfg['group']} x {cfg['frames']}x{cfg['height']}x{cfg['width']} "
          f"(latent {'x'.join(map(str, cfg['latent_shape']))}, {cfg['video_tokens']} video + {cfg['text_len']} "
          f"text tokens), {cfg['steps']} steps, CFG {cfg['cfg']}, trained steps {cfg['train_steps']}/{cfg['steps']}")
    print(f"flops: forward {result['flops']['forward_per_row'] / 1e12:.4g} TFLOP per CFG row")
    print(PHASE_HEADER, flush=True)


def print_phase(name: str, rec: dict):
    print(f"{name:<22}{rec['seconds']:>10.3f}{_fmt(rec['videos_per_s'], '.4f'):>11}"
          f"{_gib(rec['peak_mem_bytes']):>10}{_fmt(rec['tflops_per_s'], '.1f'):>10}"
          f"{_fmt(rec['mfu'], '.3f'):>8}{_fmt(rec['hfu'], '.3f'):>8}", flush=True)


def print_summary(result: dict):
    cfg = result["config"]
    if cfg["params"]:
        print(f"params: {cfg['params']:,} (LoRA trainable: {cfg['params_lora'] or 0:,})")
    for name, rec in result["phases"].items():
        if name.startswith("ours_train") or name.startswith("naive_train"):
            print(f"{name}: loss {rec['loss']:.4g}, grad norm {rec['grad_norm']:.4g}, "
                  f"optimizer {rec['optimizer_s']:.3f} s, pass over all {cfg['steps']} steps "
                  f"~{rec['pass_s_all_steps_est']:.2f} s")
    for name, value in result["ratios"].items():
        print(f"ratio {name}: {value:.2f}x")
    check = result["check"]
    print("check: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()))
    if result["error"]:
        print(f"error: {result['error']}")
    sys.stdout.flush()
