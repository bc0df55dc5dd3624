"""Identity reward model: Qwen2.5-VL + one reward token + a linear head (Identity-GRPO, Sec. 3).

The VLM (transformers' `Qwen2_5_VLModel`, the body of `Qwen2_5_VLForConditionalGeneration`
without its LM head, which a scalar reward does not use) reads each reference image, N uniformly
sampled video frames and an instruction, then the added special token <|reward|>
(reward/vlm_inputs.py). `head` maps that token's last hidden state to one score. Scores compare
videos of the same prompt and references (reward/losses.py), so only differences carry meaning.

Bases:
- `build_tiny(...)`: random-init config for CPU tests (../shared/CPU_STACK.md): text hidden 64,
  2 layers, 4 heads, 2 KV heads, M-RoPE sections [2, 3, 3]; vision depth 2, hidden 32, patch 14,
  temporal patch 2, spatial merge 2; a tiny offline byte-level BPE tokenizer.
- `from_base(path)`: a local Qwen2.5-VL directory (HF layout: config, weights, tokenizer,
  preprocessor config), never a hub download. <|reward|> is added to its tokenizer; the embedding
  matrix grows only if the new id does not fit (Qwen2.5-VL reserves spare rows).
- `from_pretrained(dir)` / `load_reward_model(path)`: a directory written by `save_pretrained`.

Trainable parts (`configure_training`; paper: LoRA r64 alpha128 on the language model, vision tower
and merger trained in full): LoRA through peft on the language model's projections only, or the
whole language model, vision blocks (+ patch embedding) and merger each on/off; the head always.

Saved directory (`save_pretrained`): `reward_model.json` (settings, base, LoRA config, trainable
parts), `base_config.json` (the VLM config), `model.safetensors` (every weight, for a tiny base or
`full=True`) or `trained.safetensors` (only trained weights, the head and the reward token's
embedding row, for a base loaded by path), `processor/` (tokenizer + image processor).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from reward.official import load_official_reward_model
from reward.official_format import DTYPES, LLM_LINEARS, OFFICIAL_CONFIG_FILE, language_model_lora_pattern
from reward.vlm_arch import published_vlm_config, tiny_vlm_config
from reward.vlm_inputs import (
    DEFAULT_INSTRUCTION,
    REWARD_TOKEN,
    RewardInputBuilder,
    batch_like,
    build_image_processor,
    build_tiny_tokenizer,
    score_in_chunks,
)

logger = logging.getLogger(__name__)
FORMAT = "identity-reward-model"
VERSION = 1
SETTINGS_FILE = "reward_model.json"
LLM_LORA_TARGETS = list(LLM_LINEARS)



class IdentityRewardModel(nn.Module):
    """score(videos, references, prompts) -> (B,) float32: higher = identities better preserved."""

    def __init__(self, vlm: nn.Module, inputs: RewardInputBuilder, tie_theta: float = 5.0,
                 base_path: Optional[str] = None):
        super().__init__()
        self.vlm = vlm
        self.inputs = inputs
        hidden = vlm.config.text_config.hidden_size
        self.head = nn.Linear(hidden, 1).to(next(vlm.parameters()).dtype)
        self.tie_theta = float(tie_theta)
        self.base_path = base_path  # None: tiny (weights saved in full)
        self.lora: Optional[Dict] = None
        self.trainable: Dict[str, bool] = {"language_model": True, "vision": True, "merger": True}
        if inputs.reward_token_id >= vlm.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"reward token id {inputs.reward_token_id} is outside the VLM's embedding matrix")

    # ------------------------------------------------------------------ construction

    @classmethod
    def build_tiny(cls, image_size: int = 56, num_frames: int = 5, tie_theta: float = 5.0, seed: int = 0,
                   instruction: str = DEFAULT_INSTRUCTION) -> "IdentityRewardModel":
        """Random-init tiny model (seeded: the same seed gives the same weights)."""
        from transformers import Qwen2_5_VLModel

        tokenizer = build_tiny_tokenizer()
        inputs = RewardInputBuilder(tokenizer, build_image_processor(image_size), image_size, num_frames, instruction)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vlm = Qwen2_5_VLModel(tiny_vlm_config(tokenizer))
            model = cls(vlm, inputs, tie_theta)
        return model

    @classmethod
    def build_random(cls, arch: str, image_size: int = 448, num_frames: int = 5, tie_theta: float = 5.0,
                     seed: int = 0, dtype: str = "float32", text_layers: Optional[int] = None,
                     vision_layers: Optional[int] = None, vocab: Optional[int] = None,
                     instruction: str = DEFAULT_INSTRUCTION) -> "IdentityRewardModel":
        """A published architecture (`published_vlm_config`) with random weights, for rehearsals on CPU."""
        from transformers import Qwen2_5_VLModel

        tokenizer = build_tiny_tokenizer()
        config = published_vlm_config(arch, tokenizer, text_layers, vision_layers, vocab)
        inputs = RewardInputBuilder(tokenizer, build_image_processor(image_size), image_size, num_frames, instruction)
        previous = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.set_default_dtype(DTYPES[dtype])  # built in its dtype: no float32 copy of a large model
            try:
                model = cls(Qwen2_5_VLModel(config), inputs, tie_theta)
            finally:
                torch.set_default_dtype(previous)
        return model

    @classmethod
    def from_base(cls, path: str, image_size: int = 448, num_frames: int = 5, tie_theta: float = 5.0,
                  dtype: str = "bfloat16", instruction: str = DEFAULT_INSTRUCTION, seed: int = 0,
                  config_key: str = "reward.vlm.path") -> "IdentityRewardModel":
        """An untrained reward model on a local Qwen2.5-VL checkpoint directory (no hub access)."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        _check_dir(path, config_key, "config.json")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if REWARD_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>"
        area = image_size * image_size
        proc = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True,
                                                        size={"shortest_edge": area, "longest_edge": area})
        full = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype])
        vlm = full.model
        rows = vlm.get_input_embeddings().weight.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if len(tokenizer) > rows:
                vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            inputs = RewardInputBuilder(tokenizer, proc, image_size, num_frames, instruction)
            model = cls(vlm, inputs, tie_theta, base_path=str(Path(path).resolve()))
        token_id = inputs.reward_token_id
        logger.warning("%s %s: a Qwen2.5-VL base: created the reward token %s (id %d, %s) and a new reward head "
                       "(random init, seed %d); train it before scoring with it", config_key, path, REWARD_TOKEN,
                       token_id, "a spare embedding row" if token_id < rows else "a new embedding row", seed)
        return model

    @classmethod
    def from_pretrained(cls, directory: str, base_path: Optional[str] = None,
                        config_key: str = "reward.vlm.path") -> "IdentityRewardModel":
        """Load a `save_pretrained` directory. `base_path` relocates the base of a partial save."""
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        _check_dir(directory, config_key, SETTINGS_FILE)
        d = Path(directory)
        s = json.loads((d / SETTINGS_FILE).read_text())
        if s.get("format") != FORMAT or s.get("version") != VERSION:
            raise ValueError(f"{d / SETTINGS_FILE}: not a {FORMAT} v{VERSION} file")
        inputs = RewardInputBuilder.from_pretrained(d / "processor")
        full_file = d / "model.safetensors"
        if full_file.is_file():
            vlm = Qwen2_5_VLModel(Qwen2_5_VLConfig.from_json_file(str(d / "base_config.json")))
            model = cls(vlm.to(DTYPES[s["dtype"]]), inputs, s["tie_theta"], base_path=s["base_path"])
        else:
            base = base_path or s["base_path"]
            model = cls.from_base(base, inputs.image_size, inputs.num_frames, s["tie_theta"], s["dtype"],
                                  inputs.instruction, config_key=f"{config_key} (base of {d})")
            model.inputs = inputs  # the saved tokenizer: same ids as at training time
        model.configure_training(s["lora"], **s["trainable"])
        state = load_file(str(full_file if full_file.is_file() else d / "trained.safetensors"))
        model._load_weights(state, strict=full_file.is_file(), source=str(d))
        return model

    # ------------------------------------------------------------------ trainable parts

    def configure_training(self, lora: Optional[Dict] = None, language_model: bool = False, vision: bool = True,
                           merger: bool = True) -> None:
        """Set requires_grad by part; `lora` = {rank, alpha, dropout, target_modules} adds adapters to
        the language model (then language_model=True, full fine-tuning of it, is refused)."""
        if lora is not None and language_model:
            raise ValueError("LoRA on the language model and full language-model training exclude each other")
        self.vlm.requires_grad_(False)
        if lora is not None:
            lora = {"rank": int(lora["rank"]), "alpha": float(lora["alpha"]),
                    "dropout": float(lora.get("dropout", 0.0)),
                    "target_modules": list(lora.get("target_modules") or LLM_LORA_TARGETS)}
            if self.lora is not None and self.lora != lora:
                raise ValueError(f"LoRA already configured as {self.lora}, cannot change to {lora}")
            if self.lora is None:
                self._add_lora(lora)
        self.vlm.language_model.requires_grad_(language_model)
        if lora is not None:
            for name, p in self.vlm.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
        for name, module in self.vlm.visual.named_children():
            module.requires_grad_(merger if name == "merger" else vision)
        self.head.requires_grad_(True)
        self.trainable = {"language_model": language_model, "vision": vision, "merger": merger}

    def _add_lora(self, lora: Dict) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora["target_modules"]
        cfg = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=language_model_lora_pattern(targets))
        inject_adapter_in_model(cfg, self.vlm)
        if not any("lora_" in n for n, _ in self.vlm.named_parameters()):
            raise ValueError(f"LoRA target_modules {targets} matched nothing in the language model")
        self.lora = lora

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_groups(self, weight_decay: float) -> List[Dict]:
        return [{"params": self.trainable_parameters(), "weight_decay": weight_decay}]

    # ------------------------------------------------------------------ forward / score

    def forward(self, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                reward_index) -> torch.Tensor:
        """(B,) scores from a batch built by `self.inputs` (float32 whatever the model dtype)."""
        self.vlm.rope_deltas = None  # cached by the model for generation; stale across batches
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                       pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden = out.last_hidden_state[rows, reward_index.to(input_ids.device)]
        return self.head(hidden).squeeze(-1).float()

    def device_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return batch_like(batch, next(self.parameters()))

    @torch.no_grad()
    def score(self, videos: Sequence, references: Sequence[Sequence], prompts: Sequence[str],
              batch_size: int = 8) -> torch.Tensor:
        """Scores of uint8 (F, H, W, 3) videos given each one's uint8 (H, W, 3) references and prompt.

        Runs in eval mode (restored afterwards), in chunks of `batch_size`; returns a CPU float32 (B,).
        """
        return score_in_chunks(self, videos, references, prompts, batch_size)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str, full: Optional[bool] = None, step: Optional[int] = None) -> Path:
        """Write the directory described in the module docstring (`step`: the training step, recorded); returns
        its path."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        full = self.base_path is None if full is None else full
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if not full:
            # Only what training changed: the base weights are re-read from base_path on load.
            keep = {n for n, p in self.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in keep or k.startswith("head.")}
            emb = self.vlm.get_input_embeddings().weight
            state["reward_token_embedding"] = emb[self.inputs.reward_token_id].detach().cpu().clone()
        (d / "model.safetensors").unlink(missing_ok=True)
        (d / "trained.safetensors").unlink(missing_ok=True)
        save_file(state, str(d / ("model.safetensors" if full else "trained.safetensors")))
        self.vlm.config.to_json_file(str(d / "base_config.json"))
        self.inputs.save_pretrained(d / "processor")
        dtype = next(k for k, v in DTYPES.items() if v == next(self.vlm.parameters()).dtype)
        settings = {"format": FORMAT, "version": VERSION, "base_path": None if full else self.base_path,
                    "tie_theta": self.tie_theta, "dtype": dtype, "lora": self.lora, "trainable": self.trainable,
                    "reward_token": REWARD_TOKEN, "trained_steps": step}
        (d / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        return d

    def _load_weights(self, state: Dict[str, torch.Tensor], strict: bool, source: str) -> None:
        row = state.pop("reward_token_embedding", None)
        own = self.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state)) if strict else sorted(
            n for n, p in self.named_parameters() if p.requires_grad and n not in state)
        if unexpected or missing:
            raise KeyError(f"{source}: weights do not match the model: unexpected {unexpected[:5]}, "
                           f"missing {missing[:5]}")
        self.load_state_dict(state, strict=strict)
        if row is not None:
            with torch.no_grad():
                self.vlm.get_input_embeddings().weight[self.inputs.reward_token_id] = row.to(
                    self.vlm.get_input_embeddings().weight.dtype)


def _check_dir(path: Optional[str], config_key: str, marker: str) -> None:
    if not path:
        raise ValueError(f"{config_key} is not set: give a local directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{config_key}: directory {path!r} does not exist (local paths only, no hub downloads)")
    if not os.path.isfile(os.path.join(path, marker)):
        raise FileNotFoundError(f"{config_key}: {path!r} has no {marker}")


def reward_model_from_config(v, config_key: str = "reward.vlm.path") -> nn.Module:
    """The identity reward model a `reward.vlm` section names: random weights (`init=random`: the tiny
    CPU model or a published architecture) or `path` (a trained reward directory, an official Identity-GRPO
    reward checkpoint, or a Qwen2.5-VL base); each has `score(videos, references, prompts)`."""
    if v.init == "random":
        if v.arch == "tiny":
            return IdentityRewardModel.build_tiny(v.image_size, v.num_frames, v.tie_theta).to(DTYPES[v.dtype])
        return IdentityRewardModel.build_random(v.arch, v.image_size, v.num_frames, v.tie_theta, dtype=v.dtype,
                                                text_layers=v.text_layers, vision_layers=v.vision_layers,
                                                vocab=v.vocab)
    return load_reward_model(v.path, image_size=v.image_size, num_frames=v.num_frames, tie_theta=v.tie_theta,
                             dtype=v.dtype, config_key=config_key, allow_untrained_head=v.allow_untrained_head,
                             base_path=v.base_path, checkpoint_step=v.checkpoint_step, video_fps=v.video_fps)


def load_trained_reward_model(path: str, base_path: Optional[str] = None, dtype: str = "bfloat16",
                              config_key: str = "reward.vlm.path") -> nn.Module:
    """A trained reward model in either layout: ours (reward_model.json) or the official one (model_config.json,
    on `base_path` or the base its model_config.json names)."""
    if os.path.isfile(os.path.join(path, OFFICIAL_CONFIG_FILE)):
        return load_official_reward_model(path, base_path, dtype, config_key=config_key)
    return IdentityRewardModel.from_pretrained(path, config_key=config_key)


def load_reward_model(path: Optional[str], image_size: int = 56, num_frames: int = 5, tie_theta: float = 5.0,
                      seed: int = 0, dtype: str = "float32", config_key: str = "reward.vlm.path",
                      allow_untrained_head: bool = False, base_path: Optional[str] = None,
                      checkpoint_step: Optional[int] = None, video_fps: float = 10.0) -> nn.Module:
    """What the reward worker calls with `reward.vlm` settings: a trained reward directory (has
    reward_model.json), None (tiny), an official Identity-GRPO reward checkpoint (model_config.json: reward/official.py,
    on the Qwen2.5-VL directory `base_path`; its frame count must equal `num_frames`, which the face reward shares),
    or, only with `allow_untrained_head`, a plain Qwen2.5-VL base directory (its head is random: its scores mean
    nothing, so scoring with it by mistake is an error)."""
    if path is None:
        return IdentityRewardModel.build_tiny(image_size, num_frames, tie_theta, seed)
    if os.path.isfile(os.path.join(path, OFFICIAL_CONFIG_FILE)):
        return load_official_reward_model(path, base_path, dtype, checkpoint_step, video_fps, config_key,
                                          expect_frames=num_frames)
    if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
        model = IdentityRewardModel.from_pretrained(path, config_key=config_key)
        saved = (model.inputs.image_size, model.inputs.num_frames, model.tie_theta)
        if saved != (image_size, num_frames, float(tie_theta)):
            logger.warning("%s: using the trained model's image_size, num_frames, tie_theta %s, not the "
                           "configured %s", config_key, saved, (image_size, num_frames, float(tie_theta)))
        return model
    if not allow_untrained_head:
        _check_dir(path, config_key, "config.json")
        raise ValueError(f"{config_key}: {path} has no trained reward head ({SETTINGS_FILE} missing): it is a "
                         f"Qwen2.5-VL base, whose new head is random. Give a trained reward model (python -m "
                         f"reward.train writes one), or set reward.vlm.allow_untrained_head=true")
    return IdentityRewardModel.from_base(path, image_size, num_frames, tie_theta, dtype, config_key=config_key,
                                         seed=seed)
