"""Model inputs of an official Identity-GRPO reward checkpoint: the official scorer's input, rebuilt.

The official GRPO trainer scores with `vace_reward.inference.VideoVLMRewardInference` (alibaba/identity-grpo),
which renders a Qwen chat, reads the video through `qwen_vl_utils`-style `fetch_video` and runs transformers
4.51.3's `Qwen2_5_VLProcessor`. A checkpoint trained on that input scores sensibly only on that input, so this
module rebuilds it (docs/official_reward_checkpoint.md, sections 3 and 4, has the facts with citations):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|> x n<|vision_end|> ...   (one per reference image, in order)
    <|vision_start|><|video_pad|> x m<|vision_end|>
    SUBJECT_ALIGNMENT_PROMPT (ends in <|SA_reward|>\\nEND\\n)<|im_end|>\\n<|im_start|>assistant\\n

No "Picture k: " / "Video 1: " labels, although the official scorer asks for them (`add_vision_id=True`): under
its transformers 4.51.3, `ProcessorMixin.apply_chat_template` forwards only the tokenizer's own template keys
(tools, documents, add_generation_prompt, ...) and drops `add_vision_id`, so the checkpoint was trained and is
scored without them (tests/data/official_inputs_golden.json, rendered by 4.51.3 itself).

- the video as a Qwen *video*: `frame_count(data_config.num_frames)` frames (5.0 -> 4: Qwen's `smart_nframes`
  rounds to an even count, ties to even) at `data.video.sample_frame_indices` (the face reward's frames too),
  resized to multiples of 28 between 100352 and `max_frame_pixels` (399360) pixels (`smart_resize`) by
  torchvision's tensor resize (float32 bicubic with antialias, clamped, rounded to uint8), two frames per
  temporal patch; M-RoPE time from the sampling rate `frames / video length x video_fps`;
- reference images resized by PIL (bicubic) to multiples of 28 between 3136 and `max_frame_pixels` pixels, one
  temporal patch each (the frame repeated);
- pixels scaled by 1/255 (in float64, then float32, as transformers 4.51.3's `rescale`) and normalised with the
  base's image mean and std; patches laid out as Qwen2-VL's image processor lays them out.

The text prompt of the video is not part of the input (the official instruction is fixed). Differences that
remain (docs/FIDELITY.md "Reward model"): the official trainer writes each video to an mp4 (fps 10, lossy) and
reads it back; here the decoded frames are scored as they are.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from data.video import sample_frame_indices
from reward.vlm_inputs import _as_uint8, right_pad

SA_TOKEN = "<|SA_reward|>"
# vace_reward/prompt_template.py SUBJECT_ALIGNMENT_PROMPT_WITH_SPECIAL_TOKEN, character for character (trailing
# spaces, en/em dashes and the arrow included): the checkpoint was trained on exactly this text.
SUBJECT_ALIGNMENT_PROMPT = (
    "\n"
    "Your task is to evaluate the quality of the video generated based on the all above reference images in the "
    "Subject alignment criteria. Please provide a rating from 0 to 10 for Subject alignment criteria, with 0 being "
    "the worst and 10 being the best. \n"
    "\n"
    "**Subject Alignment:**  \n"
    "Evaluate the degree of similarity between the human face in the generated video and the human face in all the "
    "reference images above.\n"
    "The following sub-dimensions should be considered:\n"
    "1. **Per-Face Similarity (Highest Priority)**  \n"
    "   For each reference face, evaluate whether it appears in the video and how closely it matches, in this "
    "order:  \n"
    "   a. **Facial structure and expression** \u2013 eye shape, nose, mouth, jawline, symmetry, emotion \u2014 "
    "*most important*  \n"
    "   b. **Hairstyle, hair color, and facial hair**  \n"
    "   c. **Skin tone and complexion**  \n"
    "   d. **Clothing and accessories** (e.g., glasses, hats) \u2014 *only supportive clues*\n"
    "\n"
    "   \u2192 A single strong facial match (especially in structure and expression) outweighs multiple weak or "
    "superficial matches.\n"
    "\n"
    "Please provide the rating of subject alignment: <|SA_reward|>\n"
    "END\n")
# Qwen2.5-VL-Instruct's chat template with add_generation_prompt=True (add_vision_id dropped: see above), as rendered
# for one user turn (no system message given: the template adds its default one).
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SPATIAL_FACTOR = 28  # patch 14 x merge 2
IMAGE_MIN_PIXELS = 4 * 28 * 28  # vision_process.MIN_PIXELS
VIDEO_MIN_PIXELS = 128 * 28 * 28  # vision_process.VIDEO_MIN_PIXELS
VIDEO_MAX_PIXELS = 768 * 28 * 28  # vision_process.VIDEO_MAX_PIXELS
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # vision_process.VIDEO_TOTAL_PIXELS (its env override aside)
TOKENS_PER_SECOND = 2  # Qwen2.5-VL vision_config.tokens_per_second (read from the model at run time)
MAX_RATIO = 200


def frame_count(nframes: float) -> int:
    """Qwen's `smart_nframes` for a fixed `nframes`: the nearest even count, ties to even (5.0 -> 4)."""
    count = round(nframes / 2) * 2
    if count < 2:
        raise ValueError(f"model_config.json data_config.num_frames={nframes} gives {count} frames; at least 2")
    return count


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = SPATIAL_FACTOR) -> Tuple[int, int]:
    """Qwen's size rule: sides rounded to multiples of `factor`, then scaled (floor) under `max_pixels` or
    (ceil) over `min_pixels`, the aspect kept as closely as that allows. Python's round: ties to even."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} is above {MAX_RATIO}")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def video_max_pixels(max_frame_pixels: int, frames: int) -> int:
    """`fetch_video`'s pixel limit: the configured max, capped by the per-video budget (399360 stays 399360)."""
    budget = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / frames * 2), int(VIDEO_MIN_PIXELS * 1.05))
    return int(min(max_frame_pixels, budget))


def resize_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, height, width) with integral values: torchvision's tensor resize
    (v1 `_functional_tensor.resize`: float32 bicubic interpolate with antialias, clamped to [0, 255], rounded
    to uint8), then `.float()` as `fetch_video` does."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if video.shape[-2:] == (height, width):
        return video.float()
    out = torch.nn.functional.interpolate(video.float(), size=[height, width], mode="bicubic", align_corners=False,
                                          antialias=True)
    return out.clamp(0, 255).round().to(torch.uint8).float()


def resize_reference(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3): `fetch_image` (PIL's bicubic resize to the smart size)."""
    h, w = smart_resize(image.shape[0], image.shape[1], IMAGE_MIN_PIXELS, max_pixels)
    pil = Image.fromarray(image).convert("RGB")
    return np.asarray(pil.resize((w, h), Image.BICUBIC)) if (h, w) != image.shape[:2] else np.asarray(pil)


class OfficialInputBuilder:
    """Turns (videos, references, prompts) into the official reward model's input tensors."""

    def __init__(self, tokenizer, image_mean: Sequence[float], image_std: Sequence[float], num_frames: int,
                 max_frame_pixels: int, video_fps: float, patch_size: int = 14, merge_size: int = 2,
                 temporal_patch_size: int = 2, video_min_pixels: int = VIDEO_MIN_PIXELS):
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", SA_TOKEN)}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"the reward tokenizer has no token(s) {missing}")
        if patch_size * merge_size != SPATIAL_FACTOR:
            raise ValueError(f"patch {patch_size} x merge {merge_size} must be {SPATIAL_FACTOR} (Qwen2.5-VL)")
        if video_fps <= 0:
            raise ValueError(f"reward.vlm.video_fps must be > 0, got {video_fps}")
        self.tokenizer = tokenizer
        self.image_token_id, self.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        self.reward_token_id = ids[SA_TOKEN]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)
        self.num_frames, self.max_frame_pixels, self.video_fps = int(num_frames), int(max_frame_pixels), video_fps
        self.video_min_pixels = int(video_min_pixels)  # Qwen's 100352; smaller only in CPU rehearsals
        self.patch, self.merge, self.temporal = patch_size, merge_size, temporal_patch_size

    # ------------------------------------------------------------------ text

    def text(self, num_refs: int) -> str:
        pictures = "<|vision_start|><|image_pad|><|vision_end|>" * num_refs
        return (f"{SYSTEM_TURN}<|im_start|>user\n{pictures}<|vision_start|><|video_pad|><|vision_end|>"
                f"{SUBJECT_ALIGNMENT_PROMPT}<|im_end|>\n<|im_start|>assistant\n")

    def _ids(self, num_refs: int, image_tokens: List[int], video_tokens: int) -> List[int]:
        ids = self.tokenizer(self.text(num_refs), add_special_tokens=False)["input_ids"]
        out: List[int] = []
        images = iter(image_tokens)
        for t in ids:
            if t == self.image_token_id:
                out.extend([t] * next(images))
            elif t == self.video_token_id:
                out.extend([t] * video_tokens)
            else:
                out.append(t)
        if out.count(self.reward_token_id) != 1:
            raise ValueError(f"the reward text must hold exactly one {SA_TOKEN}")
        return out

    # ------------------------------------------------------------------ pixels

    def _patches(self, frames: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """float (T, 3, H, W) in 0..255 -> ((grid_t * grid_h * grid_w, 3 * temporal * patch * patch), grid): rescale,
        normalise, then Qwen2-VL's patch layout (each merge window's patches next to each other)."""
        x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        if x.shape[0] % self.temporal:
            x = np.concatenate([x, np.repeat(x[-1:], self.temporal - x.shape[0] % self.temporal, axis=0)])
        t, c, h, w = x.shape
        gt, gh, gw, p, m = t // self.temporal, h // self.patch, w // self.patch, self.patch, self.merge
        x = x.reshape(gt, self.temporal, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, c * self.temporal * p * p)), (gt, gh, gw)

    def video(self, video) -> Tuple[np.ndarray, Tuple[int, int, int], float]:
        """Patches, grid and seconds per temporal patch of one uint8 (F, H, W, 3) video."""
        video = _as_uint8(video, "video", 4)
        total = video.shape[0]
        frames = video[sample_frame_indices(total, self.num_frames)]
        h, w = smart_resize(video.shape[1], video.shape[2], self.video_min_pixels,
                            video_max_pixels(self.max_frame_pixels, self.num_frames))
        patches, grid = self._patches(resize_frames(frames, h, w).numpy())
        sample_fps = self.num_frames / max(total, 1e-6) * self.video_fps
        return patches, grid, self.temporal / sample_fps

    def reference(self, image, what: str) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        image = resize_reference(_as_uint8(image, what, 3), self.max_frame_pixels)
        return self._patches(image.transpose(2, 0, 1)[None].astype(np.float32))

    # ------------------------------------------------------------------ batch

    def __call__(self, videos: Sequence, references: Sequence[Sequence],
                 prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Right-padded batch for `Qwen2_5_VLModel` + `reward_index` (each row's <|SA_reward|> position). `prompts`
        are accepted for the common reward signature and not used (the official instruction is fixed)."""
        if not len(videos) == len(references) == len(prompts) or not len(videos):
            raise ValueError(f"need equally many videos, reference lists and prompts (>= 1), got "
                             f"{len(videos)}, {len(references)}, {len(prompts)}")
        seqs, images, image_grids, clips, video_grids, seconds = [], [], [], [], [], []
        per_token = self.merge ** 2
        for b, (video, refs) in enumerate(zip(videos, references)):
            if not len(refs):
                raise ValueError(f"sample {b}: each video needs at least one reference image")
            try:
                ref_patches = [self.reference(r, f"references[{i}]") for i, r in enumerate(refs)]
                patches, grid, second = self.video(video)
            except ValueError as err:
                raise ValueError(f"sample {b}: {err}") from None
            images += [p for p, _ in ref_patches]
            image_grids += [g for _, g in ref_patches]
            clips.append(patches)
            video_grids.append(grid)
            seconds.append(second)
            seqs.append(self._ids(len(refs), [int(np.prod(g)) // per_token for _, g in ref_patches],
                                  int(np.prod(grid)) // per_token))
        input_ids, attention = right_pad(seqs, self.pad_token_id)
        kinds = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
        return {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": kinds * attention,
                "pixel_values": torch.from_numpy(np.concatenate(images)),
                "image_grid_thw": torch.tensor(image_grids, dtype=torch.long),
                "pixel_values_videos": torch.from_numpy(np.concatenate(clips)),
                "video_grid_thw": torch.tensor(video_grids, dtype=torch.long),
                "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32),
                "reward_index": (input_ids == self.reward_token_id).long().argmax(dim=1)}
