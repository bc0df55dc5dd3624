"""Per-GPU memory and seconds per step of a preset at each context-parallel degree (issue #33's arithmetic).

    .venv/bin/python bench/context_parallel_plan.py [--preset cluster_configs/vace_14b_480p_cp.yaml]
        [--degrees 1 2 4 8] [--gpu-gib 79] [--peak-tflops 989] [--mfu 0.35] [--link-gbps 200]

Context parallelism (policy/context_parallel.py) splits each video's tokens over `c` GPUs: a rollout worker and a
learner context group are `c` GPUs. Per GPU, for degree c (everything else the preset's):
    learner   weights (the whole transformer: ZeRO-2 keeps the frozen base whole; the reference is the same network
              with LoRA) + training state (launcher/memory_plan.py's terms, ZeRO sharded over every learner rank) +
              saved activations of one micro-step (bench/gpu_wan_flops.py's measured coefficients, on N / c tokens,
              with the preset's activation checkpointing) + 3 GiB of temporaries, workspace and CUDA context
    rollout   transformer + text encoder + VAE + one forward's temporaries on N / c tokens (the FFN's hidden before
              and after GELU, bf16, and two fp32 residual copies per row: bench/MEMORY_PLAN.md's 1.3B estimate) +
              1.5 GiB of workspace and context; the VAE's decode at full resolution is not estimated
    seconds   model FLOPs (bench/layout_seconds.py, the preset's layout run split and in sync) over the GPUs at
              peak x MFU, plus Ulysses' all-to-alls, not overlapped: per self-attention of every block, q, k, v and
              the output of each row's N / c tokens, of which (c - 1) / c leave the GPU, at --link-gbps (an assumed
              NVLink all-to-all rate); a trained step moves them in its forward, backward, recomputed forward
              (checkpointing) and the reference's forward (KL), a sampling step once.
Weights come from meta-device builds of the preset's architectures (launcher/memory_plan.py `model_bytes`). Nothing
here is measured on a GPU. The last line: `context_parallel_plan: degree=<the preset's> learner_gib=...
rollout_gib=... step_s=... fits=<bool>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_wan_flops import activation_bytes, latent_shape, video_tokens  # noqa: E402
from bench.layout_seconds import step_flops  # noqa: E402
from config import load_config  # noqa: E402
from config.checks import RANDOM_POLICY, context_degree  # noqa: E402
from launcher.memory_plan import learner_state_bytes, model_bytes  # noqa: E402
from policy.arch import transformer_config  # noqa: E402
from policy.policy import guided_passes  # noqa: E402
from workers.update_plan import trained_timesteps  # noqa: E402

GiB = 1024 ** 3
LEARNER_EXTRA, ROLLOUT_EXTRA = 3 * GiB, 1.5 * GiB


def tokens(cfg, people: int = 1) -> int:
    """Video tokens of one row: the latent frames plus one per reference person (VACE and Phantom)."""
    arch = transformer_config(cfg.model.arch, cfg.model.kind)
    shape = latent_shape(arch, cfg.model.num_frames, cfg.model.height, cfg.model.width)
    return video_tokens(arch, (shape[0], shape[1] + (people if cfg.model.kind != "t2v" else 0), *shape[2:]))


def per_gpu(cfg, sizes: Dict[str, int], degree: int, args) -> Dict[str, float]:
    arch = transformer_config(cfg.model.arch, cfg.model.kind)
    blocks = dict(arch, num_layers=arch["num_layers"] + len(arch.get("vace_layers") or []))
    d, n, text = arch["num_attention_heads"] * arch["attention_head_dim"], tokens(cfg), cfg.sampler.max_sequence_length
    rows = guided_passes(cfg.model.kind, cfg.sampler) * (cfg.workers.learner_engine.micro_batch_size or
                                                         cfg.grpo.group_size)
    lora = cfg.model.lora.enabled
    engine = cfg.workers.learner_engine
    state = learner_state_bytes(sizes["trainable_params"], cfg.workers.learner.num_workers, engine.zero_stage,
                                engine.precision == "bf16" and not lora)
    activations = activation_bytes(blocks, "lora" if lora else "full", rows, n // degree, text,
                                   cfg.model.gradient_checkpointing)
    learner = sizes["transformer"] + sizes["reference"] + state + activations + LEARNER_EXTRA
    temporaries = rows * (n // degree) * (4 * arch["ffn_dim"] + 8 * d)
    rollout = sizes["transformer"] + sizes["reference"] + sizes["text_encoder"] + sizes["vae"] + temporaries + \
        ROLLOUT_EXTRA
    flops = step_flops(cfg)
    tflops, link = args.peak_tflops * args.mfu * 1e12, args.link_gbps * 1e9
    exchanged = blocks["num_layers"] * 4 * rows * (n / degree) * d * 2 * (degree - 1) / degree  # bytes, one pass
    w, g = cfg.workers, cfg.grpo
    chunks = g.group_size // (engine.micro_batch_size or g.group_size)  # forwards of a group per step
    sample_passes = cfg.sampler.num_steps * chunks
    learn_passes = trained_timesteps(cfg) * g.num_inner_epochs * chunks * \
        (2 + cfg.model.gradient_checkpointing + (g.kl_beta > 0))
    sample_s = flops["sample"] / (w.rollout.num_workers * tflops) + \
        g.prompts_per_step / (w.rollout.num_workers // degree) * sample_passes * exchanged / link
    learn_s = flops["learn"] / (w.learner.num_workers * tflops) + \
        g.prompts_per_step / (w.learner.num_workers // degree) * learn_passes * exchanged / link
    return {"degree": degree, "tokens_per_gpu": n // degree, "learner_gib": learner / GiB,
            "activations_gib": activations / GiB, "rollout_gib": rollout / GiB, "sample_s": sample_s,
            "learn_s": learn_s, "step_s": sample_s + learn_s,
            "fits": max(learner, rollout) <= args.gpu_gib * GiB}


def main(argv=None) -> List[Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=str(ROOT / "cluster_configs" / "vace_14b_480p_cp.yaml"))
    p.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--gpu-gib", type=float, default=79.0, help="usable memory per GPU (H100 80 GB: about 79 GiB)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (no GPU run yet)")
    p.add_argument("--link-gbps", type=float, default=200.0, help="assumed all-to-all rate per GPU, GB/s")
    args = p.parse_args(argv)
    cfg = load_config(args.preset, ["trainer.output_dir=unused", *RANDOM_POLICY])
    sizes = model_bytes(cfg)
    rows = [per_gpu(cfg, sizes, c, args) for c in args.degrees]
    print(f"{Path(args.preset).name}: {cfg.model.arch} at {cfg.model.num_frames}x{cfg.model.height}x{cfg.model.width},"
          f" {tokens(cfg)} video tokens a row, GPUs rollout {cfg.workers.rollout.num_workers} / learner "
          f"{cfg.workers.learner.num_workers}, micro-batch {cfg.workers.learner_engine.micro_batch_size}, "
          f"checkpointing {cfg.model.gradient_checkpointing}; {args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g}, "
          f"all-to-all {args.link_gbps:g} GB/s")
    print("| degree | tokens per GPU | learner GiB (activations) | rollout GiB | sampling s | learning s | step s | "
          f"fits {args.gpu_gib:g} GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['degree']} | {r['tokens_per_gpu']} | {r['learner_gib']:.1f} ({r['activations_gib']:.1f}) | "
              f"{r['rollout_gib']:.1f} | {r['sample_s']:.0f} | {r['learn_s']:.0f} | {r['step_s']:.0f} | "
              f"{'yes' if r['fits'] else 'no'} |")
    chosen = per_gpu(cfg, sizes, context_degree(cfg), args)
    print(f"context_parallel_plan: degree={chosen['degree']} learner_gib={chosen['learner_gib']:.1f} "
          f"rollout_gib={chosen['rollout_gib']:.1f} step_s={chosen['step_s']:.0f} fits={chosen['fits']}")
    return rows


if __name__ == "__main__":
    main()
