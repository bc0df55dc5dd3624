"""Official Identity-GRPO reward checkpoints (`outputs/identity_reward`): load one and score as the official code.

Layout, files and key names: reward/official_format.py (docs/official_reward_checkpoint.md has every fact with
its citation).

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
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from reward.official_format import (
    ADAPTER_FILE,
    DTYPES,
    LLM_LINEARS,
    LORA_EXCLUDE,
    MAX_FRAME_PIXELS,
    NON_LORA_FILE,
    OFFICIAL_CONFIG_FILE,
    OFFICIAL_LORA,
    OFFLINE_VOCAB,
    PEFT_PREFIX,
    checkpoint_dir,
    language_model_lora_pattern,
    official_base_path,
    official_key_to_ours,
    official_weight_files,
    ours_to_official_key,
    read_official_config,
)
from reward.official_inputs import (
    SA_TOKEN,
    SUBJECT_ALIGNMENT_PROMPT,
    VIDEO_MIN_PIXELS,
    OfficialInputBuilder,
    frame_count,
)
from reward.vlm_inputs import batch_like, score_in_chunks

logger = logging.getLogger(__name__)


class OfficialRewardModel(nn.Module):
    """score(videos, references, prompts) -> (B,) float32, as the official `VideoVLMRewardInference` scores."""

    def __init__(self, vlm: nn.Module, inputs: OfficialInputBuilder, lora_rank: int, lora_alpha: float,
                 lora_dropout: float = 0.0, base_path: Optional[str] = None):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.vlm, self.inputs, self.base_path = vlm, inputs, base_path
        self.lora = {"rank": int(lora_rank), "alpha": float(lora_alpha), "dropout": float(lora_dropout)}
        self.trainable = {"vision": False, "merger": False}
        hidden = vlm.config.text_config.hidden_size
        self.rm_head = nn.Linear(hidden, 1, bias=False).to(next(vlm.parameters()).dtype)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                           target_modules=language_model_lora_pattern(LLM_LINEARS)), self.vlm)
        # The official PeftModel keeps adapters in float32 (get_peft_model's autocast_adapter_dtype): peft then runs
        # the LoRA branch in float32 and adds it to the bf16 base output before one rounding. Do the same.
        for name, p in self.vlm.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        self._embedding_hook = None
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, base_path: str, dtype: str = "bfloat16", lora: Optional[Dict] = None, num_frames: int = 4,
                  max_frame_pixels: int = MAX_FRAME_PIXELS, video_fps: float = 10.0,
                  config_key: str = "model.path") -> "OfficialRewardModel":
        """The official model on a local Qwen2.5-VL directory, as `create_model_and_processor` builds it: the
        <|SA_reward|> token added, the vocabulary resized to the tokenizer, LoRA on the language model, a new
        `rm_head` (untrained)."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if not (Path(base_path) / "config.json").is_file():
            raise FileNotFoundError(f"{config_key}: {base_path!r} has no config.json (a local Qwen2.5-VL directory "
                                    f"in the Hugging Face layout)")
        lora = {**OFFICIAL_LORA, **(lora or {})}
        tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
        tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
        processor = Qwen2VLImageProcessorPil.from_pretrained(base_path, local_files_only=True)
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_path, local_files_only=True,
                                                                 dtype=DTYPES[dtype]).model
        vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        inputs = OfficialInputBuilder(tokenizer, processor.image_mean, processor.image_std, num_frames,
                                      max_frame_pixels, video_fps, patch_size=int(processor.patch_size),
                                      merge_size=int(processor.merge_size),
                                      temporal_patch_size=int(processor.temporal_patch_size))
        return cls(vlm, inputs, lora["rank"], lora["alpha"], lora["dropout"], base_path=str(Path(base_path).resolve()))

    @classmethod
    def build_random(cls, arch: str, dtype: str = "float32", lora: Optional[Dict] = None, num_frames: int = 4,
                     max_frame_pixels: int = MAX_FRAME_PIXELS, video_fps: float = 10.0, seed: int = 0,
                     text_layers: Optional[int] = None, vision_layers: Optional[int] = None,
                     vocab: Optional[int] = None, video_min_pixels: Optional[int] = None) -> "OfficialRewardModel":
        """Random weights (seeded) for CPU tests and rehearsals: the tiny Qwen2.5-VL or a published architecture,
        with the offline tokenizer and <|SA_reward|>; `save_pretrained` writes the base beside the checkpoint.
        `video_min_pixels` (rehearsals) lowers Qwen's 100352-pixel floor for video frames."""
        from transformers import Qwen2_5_VLModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from reward.vlm_arch import published_vlm_config, tiny_vlm_config
        from reward.vlm_inputs import build_tiny_tokenizer

        lora = {**OFFICIAL_LORA, **(lora or {})}
        # the offline tokenizer with merges learnt on the official instruction too: 450 tokens instead of 760 (a
        # real Qwen tokenizer: about 250), which keeps a rehearsal's language model affordable on a CPU
        tokenizer = build_tiny_tokenizer(OFFLINE_VOCAB, extra_corpus=[SUBJECT_ALIGNMENT_PROMPT])
        tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
        config = tiny_vlm_config(tokenizer) if arch == "tiny" else published_vlm_config(
            arch, tokenizer, text_layers, vision_layers, vocab)
        processor = Qwen2VLImageProcessorPil()
        previous = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.set_default_dtype(DTYPES[dtype])
            try:
                vlm = Qwen2_5_VLModel(config)
                inputs = OfficialInputBuilder(tokenizer, processor.image_mean, processor.image_std, num_frames,
                                              max_frame_pixels, video_fps,
                                              video_min_pixels=video_min_pixels or VIDEO_MIN_PIXELS)
                return cls(vlm, inputs, lora["rank"], lora["alpha"], lora["dropout"])
            finally:
                torch.set_default_dtype(previous)

    # ------------------------------------------------------------------ training

    def configure_training(self, vision: bool = True, merger: bool = True) -> None:
        """What the official reward training trains (model_config.json freeze_vision_tower / tune_merger): the LoRA
        of the language model, the vision tower and the merger by flag, `rm_head`, and the <|SA_reward|> row of the
        embedding (VideoAlign trains the whole matrix and restores every other row after each step; here the
        other rows get no gradient, which leaves them as unchanged under AdamW without weight decay on it)."""
        self.requires_grad_(False)
        for name, p in self.vlm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        for name, module in self.vlm.visual.named_children():
            module.requires_grad_(merger if name == "merger" else vision)
        self.rm_head.requires_grad_(True)
        embedding = self.vlm.get_input_embeddings().weight
        embedding.requires_grad_(True)
        if self._embedding_hook is None:
            row = self.inputs.reward_token_id
            self._embedding_hook = embedding.register_hook(
                lambda grad: torch.zeros_like(grad).index_copy_(0, torch.tensor([row], device=grad.device),
                                                                grad[row:row + 1]))
        self.trainable = {"vision": vision, "merger": merger}

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_groups(self, weight_decay: float) -> List[Dict]:
        """AdamW groups: the embedding without weight decay (VideoAlign's special-token group), the rest with it."""
        embedding = self.vlm.get_input_embeddings().weight
        rest = [p for p in self.trainable_parameters() if p is not embedding]
        return [{"params": rest, "weight_decay": weight_decay}] + (
            [{"params": [embedding], "weight_decay": 0.0}] if embedding.requires_grad else [])

    def device_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return batch_like(batch, self.rm_head.weight)  # not a LoRA weight: those stay float32

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str, step: int = 0) -> Path:
        """The official layout: `model_config.json` + `checkpoint-<step>/` with `adapter_model.safetensors` (the
        LoRA, PEFT's names) and `non_lora_state_dict.pth` (the trained non-LoRA weights), keys under transformers
        4.51's names. A random-init model also writes its base (`base/`, the frozen weights in the Hugging Face
        layout), which model_config.json then names."""
        from safetensors.torch import save_file

        d = Path(directory)
        ckpt = d / f"checkpoint-{int(step)}"
        ckpt.mkdir(parents=True, exist_ok=True)
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file({ours_to_official_key(k): v for k, v in state.items() if "lora_" in k},
                  str(ckpt / ADAPTER_FILE))
        torch.save({ours_to_official_key(k): v for k, v in state.items() if k in trained and "lora_" not in k},
                   ckpt / NON_LORA_FILE)
        base = self.base_path
        if base is None:
            self._save_base(d / "base")
            base = "base"
        dtype = next(k for k, v in DTYPES.items() if v == self.rm_head.weight.dtype)
        (d / OFFICIAL_CONFIG_FILE).write_text(json.dumps({
            "data_config": {"max_frame_pixels": self.inputs.max_frame_pixels,
                            "num_frames": float(self.inputs.num_frames), "fps": None, "eval_dim": ["SA"],
                            "prompt_template_type": "subject_alignment_special", "sample_type": "uniform",
                            "use_tied_data": True},
            "model_config": {"model_name_or_path": base, "output_dim": 1, "use_special_tokens": True,
                             "reward_token": "special", "torch_dtype": dtype, "loss_type": "btt",
                             "freeze_vision_tower": not self.trainable["vision"], "freeze_llm": False,
                             "tune_merger": self.trainable["merger"]},
            "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": self.lora["rank"],
                                 "lora_alpha": self.lora["alpha"], "lora_dropout": self.lora["dropout"],
                                 "lora_target_modules": None, "lora_namespan_exclude": list(LORA_EXCLUDE),
                                 "lora_task_type": "CAUSAL_LM", "use_rslora": False, "num_lora_modules": -1},
            "written_by": "identity-grpo reward.train (reward/official.py)"}, indent=2))
        return d

    def _save_base(self, directory: Path) -> None:
        """The frozen weights as a Qwen2.5-VL directory (tokenizer and image processor included)."""
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        base = {re.sub(r"\.base_layer\.", ".", k): v for k, v in self.vlm.state_dict().items() if "lora_" not in k}
        full = Qwen2_5_VLForConditionalGeneration(self.vlm.config)
        full.model.load_state_dict(base)
        full.to(self.rm_head.weight.dtype).save_pretrained(directory)
        self.inputs.tokenizer.save_pretrained(directory)
        Qwen2VLImageProcessorPil(image_mean=self.inputs.mean.tolist(), image_std=self.inputs.std.tolist(),
                                 patch_size=self.inputs.patch, merge_size=self.inputs.merge,
                                 temporal_patch_size=self.inputs.temporal).save_pretrained(directory)

    def forward(self, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                pixel_values_videos, video_grid_thw, second_per_grid_ts, reward_index) -> torch.Tensor:
        self.vlm.rope_deltas = None  # cached by the model for generation; stale across batches
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                       pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                       pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                       second_per_grid_ts=second_per_grid_ts, use_cache=False)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.rm_head(out.last_hidden_state[rows, reward_index.to(input_ids.device)]).squeeze(-1).float()

    def score(self, videos: Sequence, references: Sequence[Sequence], prompts: Sequence[str],
              batch_size: int = 8) -> torch.Tensor:
        """Scores of uint8 (F, H, W, 3) videos given each one's uint8 (H, W, 3) references (CPU float32, (B,))."""
        return score_in_chunks(self, videos, references, prompts, batch_size)

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
                               config_key: str = "reward.vlm.path",
                               expect_frames: Optional[int] = None) -> OfficialRewardModel:
    """Build the official reward model on a local Qwen2.5-VL base and load `directory`'s checkpoint into it. The base:
    `base_path`, else model_config.json's `model_name_or_path` when that is a local directory (absolute, or relative
    to `directory`: what `save_pretrained` of a random-init model writes). `expect_frames` (the configured
    reward.vlm.num_frames, which the face reward shares) must equal the checkpoint's count: checked before the base
    is read."""
    from safetensors.torch import load_file

    cfg = read_official_config(directory, config_key)
    frames = frame_count(float(cfg["data_config"]["num_frames"]))
    if expect_frames is not None and frames != expect_frames:
        raise ValueError(f"reward.vlm.num_frames={expect_frames}, but the official checkpoint {directory} scores "
                         f"{frames} frames (its model_config.json data_config.num_frames, rounded to an even count "
                         f"as Qwen's smart_nframes does); set reward.vlm.num_frames (and reward.face.num_frames) to "
                         f"{frames}")
    trained_dtype = cfg["model_config"].get("torch_dtype")
    if trained_dtype and trained_dtype != dtype:
        logger.warning("%s: the official scorer runs this checkpoint in %s (model_config.json torch_dtype); "
                       "reward.vlm.dtype is %s", config_key, trained_dtype, dtype)
    base_path = official_base_path(directory, cfg, base_path, config_key)
    ckpt = checkpoint_dir(directory, step, config_key)
    data, lora = cfg["data_config"], cfg["peft_lora_config"]
    model = OfficialRewardModel.from_base(
        base_path, dtype, {"rank": int(lora["lora_r"]), "alpha": float(lora["lora_alpha"]),
                           "dropout": float(lora.get("lora_dropout", 0.0))},
        frames, int(data["max_frame_pixels"]), video_fps,
        config_key="reward.vlm.base_path")
    inputs = model.inputs
    files = official_weight_files(ckpt, config_key)
    states = [torch.load(files[0], map_location="cpu", weights_only=True)]
    if len(files) == 2:
        states.append(load_file(str(files[1])))
    model.load_official_state(files, states)
    logger.info("%s: official reward checkpoint %s on base %s (%d frames, max %d pixels, video fps %s)", config_key,
                ckpt, base_path, inputs.num_frames, inputs.max_frame_pixels, video_fps)
    return model
