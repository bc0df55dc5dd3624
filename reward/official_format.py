"""The official Identity-GRPO reward checkpoint's format: its files, its model_config.json, its key names.

Layout (docs/official_reward_checkpoint.md has every fact with its citation):

    <dir>/model_config.json           VideoAlign's data_config / model_config / peft_lora_config
    <dir>/checkpoint-<step>/adapter_model.safetensors + non_lora_state_dict.pth      (the published layout)
    <dir>/checkpoint-<step>/model.pth                                                (save_full_model=true)

What the loader (reward/official.py), the preflight check (reward/locate.py) and the trainer's export
(reward/train.py) share: no model is built here, so checking a checkpoint's files needs no torch model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

OFFICIAL_CONFIG_FILE = "model_config.json"
ADAPTER_FILE, NON_LORA_FILE, FULL_FILE = "adapter_model.safetensors", "non_lora_state_dict.pth", "model.pth"
PEFT_PREFIX = "base_model.model."
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_EXCLUDE = ("lm_head", "rm_head", "embed_tokens", "visual")  # model_config.json lora_namespan_exclude
OFFICIAL_LORA = {"rank": 64, "alpha": 128.0, "dropout": 0.05}  # model_config.json peft_lora_config
MAX_FRAME_PIXELS = 399360  # model_config.json data_config.max_frame_pixels
OFFLINE_VOCAB = 448  # the random-init models' offline tokenizer (below the rehearsals' 512-row vocabulary)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def language_model_lora_pattern(targets: Sequence[str]) -> str:
    """peft's target_modules regex for `targets` in every language-model layer of a `Qwen2_5_VLModel` (never the
    vision tower's linears of the same names). Both reward-model formats put their LoRA there."""
    return r".*language_model\.layers\.\d+\..*\.(" + "|".join(targets) + r")$"


def read_official_config(directory: str | Path, config_key: str = "reward.vlm.path") -> Dict:
    """model_config.json, checked for what this loader builds (else NotImplementedError naming the key)."""
    path = Path(directory) / OFFICIAL_CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
        data, model, lora = cfg["data_config"], cfg["model_config"], cfg["peft_lora_config"]
        for section, keys in (("data_config", ("num_frames", "max_frame_pixels")),
                              ("peft_lora_config", ("lora_r", "lora_alpha"))):
            for key in keys:
                if key not in cfg[section]:
                    raise KeyError(f"{section}.{key}")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{config_key}: {path} is not an official reward model_config.json (missing or "
                         f"unreadable: {err})") from None
    supported = {
        "model_config.use_special_tokens": (model.get("use_special_tokens"), True),
        "model_config.reward_token": (model.get("reward_token"), "special"),
        "model_config.output_dim": (model.get("output_dim"), 1),
        "data_config.prompt_template_type": (data.get("prompt_template_type"), "subject_alignment_special"),
        "data_config.eval_dim": (data.get("eval_dim"), ["SA"]),
        "data_config.fps": (data.get("fps"), None),
        "peft_lora_config.lora_enable": (lora.get("lora_enable"), True),
        "peft_lora_config.vision_lora": (lora.get("vision_lora"), False),
        "peft_lora_config.use_rslora": (lora.get("use_rslora"), False),
    }
    for key, (got, want) in supported.items():
        if got != want:
            raise NotImplementedError(f"{config_key}: {path}: {key}={got!r}; this loader reads official reward "
                                      f"checkpoints with {key}={want!r} (the published Identity-GRPO reward)")
    return cfg


def checkpoint_dir(directory: str | Path, step: Optional[int] = None, config_key: str = "reward.vlm.path") -> Path:
    """`checkpoint-<step>`: the highest step when `step` is None, else exactly that one."""
    found = {}
    for d in Path(directory).glob("checkpoint-*"):
        suffix = d.name.split("-")[-1]
        if d.is_dir() and suffix.isdigit():
            found[int(suffix)] = d
    if not found:
        raise FileNotFoundError(f"{config_key}: {directory} has {OFFICIAL_CONFIG_FILE} but no checkpoint-<step>/")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"reward.vlm.checkpoint_step={step}: {directory} has steps {sorted(found)}")
    return found[step]


def official_base_path(directory: str | Path, cfg: Dict, base_path: Optional[str], config_key: str) -> str:
    """The Qwen2.5-VL base: `base_path`, else model_config.json's `model_name_or_path` when it is a local directory
    (relative to `directory`); a hub id alone is an error (no downloads)."""
    hub_name = cfg["model_config"].get("model_name_or_path")
    if not base_path and hub_name and (Path(directory) / hub_name / "config.json").is_file():
        base_path = str(Path(directory) / hub_name)
    if not base_path:
        raise ValueError(f"{config_key}: {directory} is an official reward checkpoint built on {hub_name!r} (a hub "
                         f"id); set reward.vlm.base_path to a local copy of that model (no hub downloads)")
    return base_path


def official_weight_files(ckpt: Path, config_key: str) -> List[Path]:
    """checkpoint-<step>/'s weights: the full model.pth, else the non-LoRA state and the adapter (both required),
    each checked for its format from its first bytes (a torch zip archive; a safetensors header), so a damaged or
    foreign file is named before any model is built."""
    if (ckpt / FULL_FILE).is_file():
        return [check_weight_format(ckpt / FULL_FILE, config_key)]
    files = [ckpt / NON_LORA_FILE, ckpt / ADAPTER_FILE]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{config_key}: {ckpt} has neither {FULL_FILE} nor {f.name}")
    return [check_weight_format(f, config_key) for f in files]


def check_weight_format(path: Path, config_key: str) -> Path:
    """`path` if it is what its name says (a `.safetensors` header that parses, or a `torch.save` zip archive), else
    a ValueError naming the file, what it should be and what is wrong. Reads a header only, never the weights."""
    import zipfile

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{config_key}: {path} is not a readable safetensors file (the official LoRA adapter; "
                             f"safetensors says: {err})") from None
    elif not zipfile.is_zipfile(path):
        raise ValueError(f"{config_key}: {path} is not a torch.save archive (the official checkpoint's {path.name}; "
                         "damaged, cut short, or another format)")
    return path


def official_key_to_ours(key: str) -> Optional[str]:
    """A PEFT-wrapped transformers-4.51 key of the official reward model -> this model's key (None: not used)."""
    if not key.startswith(PEFT_PREFIX):
        return None
    key = key[len(PEFT_PREFIX):]
    # the adapter file stores LoRA weights without the adapter name; the model holds them under "default"
    key = re.sub(r"\.lora_(A|B)\.weight$", r".lora_\1.default.weight", key)
    if key.startswith("model."):
        return "vlm.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "vlm." + key
    if key == "rm_head.weight":
        return key
    return None  # lm_head.weight: tied to the embedding, unused by a scalar reward


def ours_to_official_key(key: str) -> str:
    """This model's key -> the official checkpoint's (the inverse of `official_key_to_ours`; LoRA names as the
    adapter file stores them, without the adapter name)."""
    key = re.sub(r"\.lora_(A|B)\.default\.weight$", r".lora_\1.weight", key)
    if key.startswith("vlm.language_model."):
        return PEFT_PREFIX + "model." + key[len("vlm.language_model."):]
    if key.startswith("vlm.visual."):
        return PEFT_PREFIX + key[len("vlm."):]
    if key == "rm_head.weight":
        return PEFT_PREFIX + key
    raise KeyError(f"{key!r} has no place in an official reward checkpoint")
