"""Host-memory plan per role: the arithmetic of bench/MEMORY_PLAN.md ("Per role"), as code.

A role's peak resident memory is predicted as

    peak = process base + model bytes + training state

- process base: what a worker process holds before any model (Python, torch, diffusers, transformers,
  DeepSpeed, Ray's core worker): a measured constant per role (`BASE_BYTES`, recorded in MEMORY_PLAN.md).
- model bytes: exact, from the configured architectures built on the meta device (no memory) with the
  dtypes both roles compute in (policy/precision.py): rollout = transformer (+ frozen reference copy when
  fine-tuning fully) + text encoder + VAE; learner = transformer (+ reference); reward = the VLM.
- training state (learner), per rank of `world` ranks, with N trained parameters and a rank's share N/world
  (DeepSpeed's ZeRO-1/2/3 optimizers, bench/MEMORY_PLAN.md "Per role"):
    fp32 gradients       4 B x N (ZeRO-1) or 4 B x share (ZeRO-2/3 partition them)
    bf16 gradients       2 B x N, mixed precision only (each parameter's .grad before it is reduced)
    reduce bucket        2 B (mixed) or 4 B x min(N, reduce_bucket_size): contiguous gradients are copied into
                         one flat bucket before the reduce (DeepSpeed's default bucket of 5e8 elements)
    fp32 master + Adam   12 B x share (4 master, 8 the two moments)
    optimizer step       8 B x share of temporaries (torch AdamW's foreach step: the second moment's square
                         root and the update, fp32)
  ZeRO-3 partitions the parameters only after each rank has built the whole model (no zero.Init), so the model
  counts whole in the peak at every stage; ZeRO-3 adds the parameters it keeps gathered for forward and
  backward (up to stage3_max_live_parameters, 1e9: the whole transformer at rehearsal sizes).
- process base: the reward-model trainer (reward/train.py) runs without Ray: its own measured constant.

`launcher.rehearse` prints this prediction beside each role's measured peak. Activations are left out:
at rehearsal sizes they are small; at real sizes MEMORY_PLAN.md's GPU tables cover them.
"""

from __future__ import annotations

from typing import Dict

import torch

GiB = 1024 ** 3
# Resident memory of a worker process before it builds a model, measured on CPU (MEMORY_PLAN.md "Per role").
BASE_BYTES = {"rollout": int(0.80 * GiB), "learner": int(0.85 * GiB), "reward": int(0.75 * GiB),
              "reward_trainer": int(0.50 * GiB)}
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (we keep it)
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def model_bytes(cfg) -> Dict[str, int]:
    """Bytes of each model part the configured run holds, from meta-device builds of its architectures."""
    from policy.models import DTYPES, build_random_components, load_pretrained_components
    from policy.precision import set_policy_dtypes

    m = cfg.model
    with torch.device("meta"):
        if m.init == "random":
            c = build_random_components(m.arch, m.kind, 0, DTYPES[m.dtype], cfg.sampler.shift,
                                        num_layers=m.num_layers, text_encoder_layers=m.text_encoder_layers,
                                        text_encoder_vocab=m.text_encoder_vocab)
        else:  # configs only: the weights are not read on the meta device
            c = load_pretrained_components(m.path, m.kind, DTYPES[m.dtype], cfg.sampler.shift)
        if m.lora.enabled:
            from policy.lora import add_lora

            add_lora(c.transformer, m.lora)
        else:
            c.transformer.requires_grad_(True)
        set_policy_dtypes(c.transformer, DTYPES[m.dtype], lora=m.lora.enabled)
        trainable = sum(p.numel() for p in c.transformer.parameters() if p.requires_grad)
        numel = sum(p.numel() for p in c.transformer.parameters())
        out = {"transformer": _bytes(c.transformer), "text_encoder": _bytes(c.text_encoder), "vae": _bytes(c.vae),
               "reference": 0 if m.lora.enabled else _bytes(c.transformer), "trainable_params": trainable,
               "transformer_bytes_per_param": _bytes(c.transformer) / max(1, numel),
               "trainable_bytes": sum(p.numel() * p.element_size() for p in c.transformer.parameters()
                                      if p.requires_grad)}
        out["vlm"] = _vlm_bytes(cfg) if "vlm" in cfg.reward.weights else 0
    return out


def _vlm_bytes(cfg) -> int:
    v = cfg.reward.vlm
    if v.init != "random":
        return 0  # a trained directory: its size is the files' (not predicted here)
    from reward.vlm import reward_model_from_config

    return _bytes(reward_model_from_config(v))


def learner_state_bytes(trainable: int, world: int, zero_stage: int, mixed: bool) -> int:
    """Gradients, reduce bucket, fp32 master partition, Adam moments and step temporaries of one rank (see the
    module docstring)."""
    share = trainable / world
    grads = 4 * (share if zero_stage >= 2 else trainable) + (2 * trainable if mixed else 0)
    bucket = (2 if mixed else 4) * min(trainable, REDUCE_BUCKET_ELEMENTS)
    return int(grads + bucket + 12 * share + 8 * share)


def ema_bytes(cfg, sizes: Dict[str, int]) -> int:
    """optim.ema on a learner rank: an fp32 copy of the trained weights (policy/ema.py), plus a copy of the live
    ones while the EMA is swapped in: for a LoRA checkpoint's lora_ema/, or the held-out monitor."""
    if not cfg.optim.ema.enabled:
        return 0
    swapped = cfg.model.lora.enabled or cfg.logging.eval_every > 0
    return 4 * sizes["trainable_params"] + (sizes["trainable_bytes"] if swapped else 0)


def predict(cfg, sizes: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    """{role: {term: bytes, ..., "total": bytes}} for one process of each role."""
    world = cfg.workers.learner.num_workers
    mixed = cfg.workers.learner_engine.precision == "bf16" and not cfg.model.lora.enabled
    # Every rank builds the whole transformer before DeepSpeed partitions it (ZeRO-3 without zero.Init), so the
    # peak holds it whole at any stage. ZeRO-3 then gathers the partitions again for each forward and backward
    # and keeps up to stage3_max_live_parameters (1e9) of them gathered: the whole model at these sizes.
    learner_model = sizes["transformer"] + sizes["reference"]
    if cfg.workers.learner_engine.zero_stage >= 3:
        learner_model += min(sizes["transformer"], int(MAX_LIVE_PARAMETERS * sizes["transformer_bytes_per_param"]))
    plan = {
        "rollout": {"base": BASE_BYTES["rollout"], "transformer": sizes["transformer"],
                    "reference": sizes["reference"], "text_encoder": sizes["text_encoder"], "vae": sizes["vae"]},
        "learner": {"base": BASE_BYTES["learner"], "model": learner_model,
                    "training_state": learner_state_bytes(sizes["trainable_params"], world,
                                                          cfg.workers.learner_engine.zero_stage, mixed),
                    "ema": ema_bytes(cfg, sizes)},
        "reward": {"base": BASE_BYTES["reward"], "vlm": sizes["vlm"]},
    }
    for terms in plan.values():
        terms["total"] = sum(terms.values())
    return plan


def reward_trainer_plan(cfg) -> Dict[str, int]:
    """The reward-model trainer (reward/train.py, one process per rank): base + model + training state, as the
    GRPO learner's, for the configured VLM's trainable parameters."""
    from reward.train_engine import build_model

    t = cfg.trainer
    with torch.device("meta"):
        model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = 1  # the rehearsal's; a launcher's world size divides the partitioned terms
    plan = {"base": BASE_BYTES["reward_trainer"], "model": _bytes(model),
            "training_state": learner_state_bytes(trainable, world, t.zero_stage, t.precision == "bf16")}
    plan["total"] = sum(plan.values())
    return plan
