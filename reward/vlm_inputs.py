"""Model inputs of the identity reward VLM: (videos, references, prompts) -> Qwen2.5-VL tensors.

Sequence of one sample (Qwen2.5-VL chat layout; every image becomes its own vision span):

    <|im_start|>user\\n
    Reference 1: <|vision_start|><|image_pad|> x n<|vision_end|>\\n      (one line per person)
    Video frames: <|vision_start|><|image_pad|> x n<|vision_end|> ... (N frames, uniformly sampled)\\n
    <instruction with the prompt><|im_end|>\\n<|im_start|>assistant\\n<|reward|>

The reward head reads the last hidden state at the final <|reward|> token, which (causal
attention) has seen every reference, every frame and the instruction.

Why frames are images and not one Qwen "video": the video path merges pairs of frames into one
temporal patch (5 frames would be padded to 6) and its processor needs torchvision, which must not
be installed here (../shared/CPU_STACK.md). As separate images each frame keeps its own tokens.

Why not `Qwen2_5_VLProcessor`: in transformers 5.23 it cannot be constructed without a video
processor class, which needs torchvision. So this module does what it would do: pixel values and
`image_grid_thw` come from the real `Qwen2VLImageProcessorPil` (the torchvision-free twin of
`Qwen2VLImageProcessor`), and each single <|image_pad|> placeholder in the tokenized text is
expanded to grid_t * grid_h * grid_w / merge^2 copies, with `mm_token_type_ids` = 1 on them so the
model computes its 3-D (M-RoPE) positions exactly as with the processor.

Images are resized to image_size x image_size (bicubic, whole frame, no crop: a crop could cut a
person out of a multi-person frame; the aspect change is the same for both videos of a pair).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from data.video import sample_frame_indices

REWARD_TOKEN = "<|reward|>"
PAD_TOKEN = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
DEFAULT_INSTRUCTION = ("The video was generated for the prompt: {prompt}\nRate how well every person in the video "
                       "keeps the identity shown in their reference image, in every frame.")
INPUTS_FILE = "reward_inputs.json"

# Text the tiny tokenizer learns its merges from: the template words plus common prompt words.
_TINY_CORPUS = [
    DEFAULT_INSTRUCTION, "Reference 1: Reference 2: Reference 3: Video frames:", "user assistant system",
    "A woman with short brown hair walks slowly toward the camera in a sunny park, cinematic lighting",
    "An older woman and a young man with dark hair talk to each other on a city street at night",
    "Two people shake hands, laugh together and look at the camera in a busy kitchen, handheld camera",
    "a man reads a book in a quiet library; soft morning light; 35mm film look; slow motion",
]


def build_tiny_tokenizer(vocab_size: int = 384, with_reward_token: bool = True, extra_corpus: Sequence[str] = ()):
    """A byte-level BPE trained offline on a few sentences (+ `extra_corpus`), with Qwen's special tokens
    (+ <|reward|>).

    Byte-level BPE encodes any text (unknown words fall back to bytes), so prompts never fail;
    training is deterministic, so the same call gives the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = QWEN_SPECIAL_TOKENS + [REWARD_TOKEN] * with_reward_token
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_TINY_CORPUS) + list(extra_corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token="<|im_end|>")


def build_image_processor(image_size: int, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """Qwen2VLImageProcessorPil whose smart-resize keeps an image_size x image_size image as it is."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    area = image_size * image_size
    return Qwen2VLImageProcessorPil(size={"shortest_edge": area, "longest_edge": area}, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size)


def _as_uint8(x, what: str, ndim: int) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != ndim or arr.shape[-1] != 3:
        shape = "(F, H, W, 3)" if ndim == 4 else "(H, W, 3)"
        raise ValueError(f"{what} must be uint8 {shape}, got {arr.dtype} {arr.shape}")
    return arr


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), (B, longest) long tensors padded on the right."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
    return input_ids, attention


def batch_like(batch: Dict[str, torch.Tensor], weight: torch.Tensor) -> Dict[str, torch.Tensor]:
    """A model batch on `weight`'s device, its pixel values (images and videos) in `weight`'s dtype."""
    return {k: (v.to(weight.device, weight.dtype) if k.startswith("pixel_values") else v.to(weight.device))
            for k, v in batch.items()}


@torch.no_grad()
def score_in_chunks(model, videos: Sequence, references: Sequence[Sequence], prompts: Sequence[str],
                    batch_size: int) -> torch.Tensor:
    """`model(**model.device_inputs(model.inputs(chunk)))` over chunks of `batch_size`, in eval mode (restored
    afterwards): a CPU float32 (B,). The `score` of both reward-model formats."""
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for i in range(0, len(videos), batch_size):
            batch = model.inputs(videos[i:i + batch_size], references[i:i + batch_size], prompts[i:i + batch_size])
            chunks.append(model(**model.device_inputs(batch)).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0)
    finally:
        model.train(was_training)


class RewardInputBuilder:
    """Turns (videos, references, prompts) into the reward VLM's input tensors (the 'processor')."""

    def __init__(self, tokenizer, image_processor, image_size: int, num_frames: int,
                 instruction: str = DEFAULT_INSTRUCTION):
        factor = int(image_processor.patch_size) * int(image_processor.merge_size)
        if image_size <= 0 or image_size % factor:
            raise ValueError(f"reward.vlm.image_size must be a positive multiple of {factor} (patch "
                             f"{image_processor.patch_size} x merge {image_processor.merge_size}), got {image_size}")
        if num_frames < 1:
            raise ValueError(f"reward.vlm.num_frames must be >= 1, got {num_frames}")
        if "{prompt}" not in instruction:
            raise ValueError("the reward instruction must contain '{prompt}'")
        for token in QWEN_SPECIAL_TOKENS[1:6] + [REWARD_TOKEN]:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no token {token!r}")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_size, self.num_frames, self.instruction = int(image_size), int(num_frames), instruction
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        patches = (image_size // int(image_processor.patch_size)) ** 2
        self.tokens_per_image = patches // int(image_processor.merge_size) ** 2

    # ------------------------------------------------------------------ text

    def text(self, num_refs: int, prompt: str) -> str:
        refs = "".join(f"Reference {i + 1}: <|vision_start|><|image_pad|><|vision_end|>\n" for i in range(num_refs))
        frames = "<|vision_start|><|image_pad|><|vision_end|>" * self.num_frames
        return (f"<|im_start|>user\n{refs}Video frames: {frames}\n{self.instruction.format(prompt=prompt)}"
                f"<|im_end|>\n<|im_start|>assistant\n{REWARD_TOKEN}")

    def _ids(self, num_refs: int, prompt: str) -> List[int]:
        ids = self.tokenizer(self.text(num_refs, prompt), add_special_tokens=False)["input_ids"]
        out: List[int] = []
        for t in ids:
            out.extend([t] * self.tokens_per_image if t == self.image_token_id else [t])
        if out.count(self.reward_token_id) != 1 or out[-1] != self.reward_token_id:
            raise ValueError(f"prompt {prompt!r} must not contain the reward token {REWARD_TOKEN}")
        return out

    # ------------------------------------------------------------------ images

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if image.shape[0] == image.shape[1] == self.image_size:
            return image
        pil = Image.fromarray(image).resize((self.image_size, self.image_size), Image.BICUBIC)
        return np.asarray(pil)

    def images(self, video, references: Sequence) -> List[np.ndarray]:
        """The sample's images in sequence order: every reference, then the sampled frames, resized."""
        video = _as_uint8(video, "video", 4)
        refs = [_as_uint8(r, f"references[{i}]", 3) for i, r in enumerate(references)]
        if not refs:
            raise ValueError("each video needs at least one reference image")
        frames = [video[i] for i in sample_frame_indices(video.shape[0], self.num_frames)]
        return [self._resize(x) for x in refs + frames]

    # ------------------------------------------------------------------ batch

    def __call__(self, videos: Sequence, references: Sequence[Sequence],
                 prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, mm_token_type_ids, pixel_values,
        image_grid_thw, reward_index (position of <|reward|> per row)."""
        if not len(videos) == len(references) == len(prompts) or not len(videos):
            raise ValueError(f"need equally many videos, reference lists and prompts (>= 1), got "
                             f"{len(videos)}, {len(references)}, {len(prompts)}")
        seqs, images = [], []
        for b, (video, refs, prompt) in enumerate(zip(videos, references, prompts)):
            try:
                images.extend(self.images(video, refs))
            except ValueError as err:
                raise ValueError(f"sample {b}: {err}") from None
            seqs.append(self._ids(len(refs), prompt))
        pixels = self.image_processor(images, do_resize=False, return_tensors="pt")
        input_ids, attention = right_pad(seqs, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention,
                "mm_token_type_ids": (input_ids == self.image_token_id).long() * attention,
                "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
                "reward_index": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)}

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (directory / INPUTS_FILE).write_text(json.dumps(
            {"image_size": self.image_size, "num_frames": self.num_frames, "instruction": self.instruction}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, image_size: Optional[int] = None,
                        num_frames: Optional[int] = None) -> "RewardInputBuilder":
        """Load what `save_pretrained` wrote (image_size / num_frames may be overridden)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        directory = Path(directory)
        settings = json.loads((directory / INPUTS_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        size = int(image_size or settings["image_size"])
        area = size * size
        proc = Qwen2VLImageProcessorPil.from_pretrained(directory, local_files_only=True,
                                                        size={"shortest_edge": area, "longest_edge": area})
        return cls(tokenizer, proc, size, int(num_frames or settings["num_frames"]), settings["instruction"])
