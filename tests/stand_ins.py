"""Stand-ins. Layouts for the files a GPU preset names: every directory and file in the place and layout the
preset's config says, with the named architectures' config.json files, but no weights (the official reward
checkpoint's files in their formats, holding no tensor: the checks read their headers). What the checks before a
run read (launcher/preflight.py, launcher/doctor.py: names, layouts, configs, file formats), never weights. And a
trained policy's stand-in: the tiny policy with LoRA adapters that visibly change its videos."""

import json
from pathlib import Path

import braceexpand
import torch
from safetensors.torch import save_file

from policy.arch import transformer_config
from policy.models import REQUIRED_SUBFOLDERS

# docs/official_reward_checkpoint.md: the published outputs/identity_reward/model_config.json, in the parts read
OFFICIAL_MODEL_CONFIG = {
    "data_config": {"max_frame_pixels": 399360, "num_frames": 5.0, "fps": None, "eval_dim": ["SA"],
                    "prompt_template_type": "subject_alignment_special", "sample_type": "uniform"},
    "training_args": {"bf16": True},
    "model_config": {"model_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct", "output_dim": 1, "use_special_tokens": True,
                     "torch_dtype": "bfloat16", "reward_token": "special", "loss_type": "btt"},
    "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": 64, "lora_alpha": 128,
                         "lora_dropout": 0.05, "lora_target_modules": None,
                         "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
                         "lora_task_type": "CAUSAL_LM", "use_rslora": False, "num_lora_modules": -1},
}


def policy_stand_in(directory, arch: str, kind: str) -> Path:
    """A diffusers directory whose transformer/config.json is `arch`'s: what `model.path` must look like."""
    directory = Path(directory)
    for name in REQUIRED_SUBFOLDERS:
        (directory / name).mkdir(parents=True, exist_ok=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in transformer_config(arch, kind).items()}
    (directory / "transformer" / "config.json").write_text(json.dumps(config))
    for name in ("vae", "text_encoder"):
        (directory / name / "config.json").write_text("{}")
    for name in ("transformer", "vae", "text_encoder"):
        (directory / name / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (directory / "model_index.json").write_text("{}")
    return directory


def official_reward_stand_in(directory, base) -> None:
    """The official reward checkpoint's layout (model_config.json + checkpoint-<step>/) on a Qwen2.5-VL base dir."""
    directory, base = Path(directory), Path(base)
    (directory / "checkpoint-21").mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(OFFICIAL_MODEL_CONFIG))
    # the files' formats (the loader's checks read their headers), with no tensor in them
    save_file({}, str(directory / "checkpoint-21" / "adapter_model.safetensors"))
    torch.save({}, directory / "checkpoint-21" / "non_lora_state_dict.pth")
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")


def preset_stand_ins(cfg) -> None:
    """Everything a loaded GRPO config names, at its paths: policy, Phantom checkpoint, reward files, shards."""
    m, r = cfg.model, cfg.reward
    if m.init == "pretrained":
        policy_stand_in(m.path, m.arch, m.kind)
        if m.kind == "phantom" and m.phantom_checkpoint:
            Path(m.phantom_checkpoint).parent.mkdir(parents=True, exist_ok=True)
            Path(m.phantom_checkpoint).write_bytes(b"")
    if "vlm" in r.weights and r.vlm.init == "pretrained":
        official_reward_stand_in(r.vlm.path, r.vlm.base_path)
    if "face" in r.weights and r.face.backend == "arcface":
        Path(r.face.model_path).parent.mkdir(parents=True, exist_ok=True)
        Path(r.face.model_path).write_bytes(b"")
    for pattern in (cfg.data.prompt_shards, cfg.data.eval_prompt_shards):
        for shard in braceexpand.braceexpand(pattern) if pattern else []:
            Path(shard).parent.mkdir(parents=True, exist_ok=True)
            Path(shard).write_bytes(b"")


def policy_with_visible_lora(cfg):
    """The config's evaluation policy with random LoRA B matrices (seeded), so its adapters change every video:
    what a checkpoint's LoRA stands in for when a test needs the weights to matter."""
    import torch

    from evaluation.policies import build_eval_policy

    policy = build_eval_policy(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return policy
