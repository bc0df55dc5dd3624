"""Official Identity-GRPO reward checkpoints (`outputs/identity_reward`): load one and score as the official code.

Layout (docs/official_reward_checkpoint.md has every fact with its citation):

    <dir>/model_config.json           VideoAlign's data_config / model_config / peft_lora_config
    <dir>/checkpoint-<step>/adapter_model.safetensors + non_lora_state_dict.pth      (the published layout)
    <dir>/checkpoint-<step>/model.pth                                                (save_full_model=true)

The model is rebuilt as the official `create_model_and_processor` builds it, then the files are applied as its
`load_model_from_checkpoint` applies them:
- Qwen2.5-VL from the base model_config.json names (a hub id there, so here a local directory:
  `reward.vlm.base_path`); `<|SA_reward|>` added to the tokenizer and the vocabulary resized to the tokenizer's
  length (151665 + 1 = 151666 for Qwen2.5-VL: a truncation, as the official code does);
- LoRA (model_config.json's r and alpha) on every linear layer of the language model (what its
  `find_target_linear_names` finds outside `lora_namespan_exclude`: the 7 projections of each layer);
- `rm_head` = Linear(hidden, 1, bias=False), read at the <|SA_reward|> position of the last hidden state;
- the non-LoRA file (vision tower, merger, the whole embedding matrix, `rm_head`), then the adapter file.
Keys are the PEFT-wrapped transformers-4.51 names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
`base_model.model.visual.blocks.0...`, `base_model.model.rm_head.weight`); `official_key_to_ours` maps them onto
this transformers' `Qwen2_5_VLModel` (`language_model.*`, `visual.*`). A key that maps nowhere, or a LoRA or head
weight that no file provides, is an error naming the file and the key.

Deliberate differences from the official loader: a requested step that does not exist is an error (the official
code silently takes the newest); attention is transformers' default kernel (SDPA), where the official code asks
for flash-attention 2 (same math, different rounding). As there, LoRA stays unmerged and in float32 (merging, or
bf16 adapters, would round differently).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from reward.official_inputs import SA_TOKEN, OfficialInputBuilder, frame_count

logger = logging.getLogger(__name__)
OFFICIAL_CONFIG_FILE = "model_config.json"
ADAPTER_FILE, NON_LORA_FILE, FULL_FILE = "adapter_model.safetensors", "non_lora_state_dict.pth", "model.pth"
PEFT_PREFIX = "base_model.model."
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class OfficialRewardModel(nn.Module):
    """score(videos, references, prompts) -> (B,) float32, as the official `VideoVLMRewardInference` scores."""

    def __init__(self, vlm: nn.Module, inputs: OfficialInputBuilder, lora_rank: int, lora_alpha: float):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.vlm, self.inputs = vlm, inputs
        hidden = vlm.config.text_config.hidden_size
        self.rm_head = nn.Linear(hidden, 1, bias=False).to(next(vlm.parameters()).dtype)
        pattern = r".*language_model\.layers\.\d+\..*\.(" + "|".join(LLM_LINEARS) + r")$"
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=pattern), self.vlm)
        # The official PeftModel keeps adapters in float32 (get_peft_model's autocast_adapter_dtype): peft then runs
        # the LoRA branch in float32 and adds it to the bf16 base output before one rounding. Do the same.
        for name, p in self.vlm.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        self.requires_grad_(False)
        self.eval()

    def forward(self, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                pixel_values_videos, video_grid_thw, second_per_grid_ts, reward_index) -> torch.Tensor:
        self.vlm.rope_deltas = None  # cached by the model for generation; stale across batches
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                       pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                       pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                       second_per_grid_ts=second_per_grid_ts, use_cache=False)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.rm_head(out.last_hidden_state[rows, reward_index.to(input_ids.device)]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, videos: Sequence, references: Sequence[Sequence], prompts: Sequence[str],
              batch_size: int = 8) -> torch.Tensor:
        """Scores of uint8 (F, H, W, 3) videos given each one's uint8 (H, W, 3) references (CPU float32, (B,))."""
        p = next(self.parameters())
        chunks = []
        for i in range(0, len(videos), batch_size):
            batch = self.inputs(videos[i:i + batch_size], references[i:i + batch_size], prompts[i:i + batch_size])
            batch = {k: (v.to(p.device, p.dtype) if k.startswith("pixel_values") else v.to(p.device))
                     for k, v in batch.items()}
            chunks.append(self(**batch).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def load_official_state(self, files: Sequence[Path], states: Sequence[Dict[str, torch.Tensor]]) -> None:
        """Apply the checkpoint's state dicts in order (later files win, as `sd.update` in the official loader)."""
        own = self.state_dict()
        given: Dict[str, torch.Tensor] = {}
        for file, state in zip(files, states):
            for key, value in state.items():
                ours = official_key_to_ours(key)
                if ours is None:
                    if key == PEFT_PREFIX + "lm_head.weight":
                        continue
                    raise KeyError(f"{file}: key {key!r} is not part of an official Qwen2.5-VL reward model")
                if ours not in own:
                    raise KeyError(f"{file}: key {key!r} ({ours}) has no counterpart in the model built from the base")
                if tuple(value.shape) != tuple(own[ours].shape):
                    raise ValueError(f"{file}: {key!r} has shape {tuple(value.shape)}, the model "
                                     f"{tuple(own[ours].shape)} (LoRA rank, vocabulary or base differ?)")
                given[ours] = value
        needed = [k for k in own if "lora_" in k or k.startswith("rm_head.")]
        missing = [k for k in needed if k not in given]
        if missing:
            raise KeyError(f"{files[-1].parent}: no weights for {missing[:4]} ({len(missing)} of the LoRA / rm_head "
                           f"weights missing)")
        self.load_state_dict(given, strict=False)


def load_official_reward_model(directory: str, base_path: Optional[str], dtype: str = "bfloat16",
                               step: Optional[int] = None, video_fps: float = 10.0,
                               config_key: str = "reward.vlm.path") -> OfficialRewardModel:
    """Build the official reward model on a local Qwen2.5-VL base and load `directory`'s checkpoint into it."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = read_official_config(directory, config_key)
    hub_name = cfg["model_config"].get("model_name_or_path")
    trained_dtype = cfg["model_config"].get("torch_dtype")
    if trained_dtype and trained_dtype != dtype:
        logger.warning("%s: the official scorer runs this checkpoint in %s (model_config.json torch_dtype); "
                       "reward.vlm.dtype is %s", config_key, trained_dtype, dtype)
    if not base_path:
        raise ValueError(f"{config_key}: {directory} is an official reward checkpoint built on {hub_name!r} (a hub "
                         f"id); set reward.vlm.base_path to a local copy of that model (no hub downloads)")
    if not (Path(base_path) / "config.json").is_file():
        raise FileNotFoundError(f"reward.vlm.base_path: {base_path!r} has no config.json (a local {hub_name} "
                                f"directory in the Hugging Face layout)")
    ckpt = checkpoint_dir(directory, step, config_key)
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
    processor = Qwen2VLImageProcessorPil.from_pretrained(base_path, local_files_only=True)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_path, local_files_only=True,
                                                             dtype=DTYPES[dtype]).model
    vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    data = cfg["data_config"]
    inputs = OfficialInputBuilder(tokenizer, processor.image_mean, processor.image_std,
                                  frame_count(float(data["num_frames"])), int(data["max_frame_pixels"]), video_fps,
                                  patch_size=int(processor.patch_size), merge_size=int(processor.merge_size),
                                  temporal_patch_size=int(processor.temporal_patch_size))
    lora = cfg["peft_lora_config"]
    model = OfficialRewardModel(vlm, inputs, int(lora["lora_r"]), float(lora["lora_alpha"]))
    if (ckpt / FULL_FILE).is_file():
        files = [ckpt / FULL_FILE]
        states = [torch.load(files[0], map_location="cpu", weights_only=True)]
    else:
        files = [ckpt / NON_LORA_FILE, ckpt / ADAPTER_FILE]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{config_key}: {ckpt} has neither {FULL_FILE} nor {f.name}")
        states = [torch.load(files[0], map_location="cpu", weights_only=True), load_file(str(files[1]))]
    model.load_official_state(files, states)
    logger.info("%s: official reward checkpoint %s on base %s (%d frames, max %d pixels, video fps %s)", config_key,
                ckpt, base_path, inputs.num_frames, inputs.max_frame_pixels, video_fps)
    return model
