"""Writes official_inputs_golden.json: what the official reward scorer's processor makes of fixed inputs.

Run once, by hand, under the official pin (transformers 4.51.3; alibaba/identity-grpo setup.py), which is not
this project's transformers and lives apart from the venv:

    .venv/bin/pip install --target /tmp/tf451 --no-deps transformers==4.51.3 tokenizers==0.21.1 huggingface_hub==0.30.2
    PYTHONPATH=/tmp/tf451:. .venv/bin/python tests/data/make_official_inputs_golden.py

It renders the chat with Qwen2.5-VL-Instruct's chat template (add_vision_id, generation prompt) as
vace_reward/inference.py does and runs `Qwen2_5_VLProcessor` (slow `Qwen2VLImageProcessor`) on the resized
references (PIL bicubic, as vace_reward/vision_process.py fetch_image) and the resized video frames (float 0-255,
as fetch_video returns them). The resizes themselves come from reward/official_inputs.py: the video's is
torchvision's, which cannot be installed here, so tests/test_reward_official.py checks everything after them.
"""

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor

from reward.official_inputs import (SA_TOKEN, SUBJECT_ALIGNMENT_PROMPT, VIDEO_MIN_PIXELS, IMAGE_MIN_PIXELS,
                                    resize_frames, smart_resize)
from reward.vlm_inputs import build_tiny_tokenizer
from data.video import sample_frame_indices

# Qwen2.5-VL-Instruct chat_template.json (the one transformers' own Qwen2-VL processor tests use)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
MAX_PIXELS, VIDEO_FPS = 399360, 10.0


def golden_inputs():
    """The fixed inputs (also built by the test): one 9-frame 40x64 video, two 50x40 references."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (9, 40, 64, 3), dtype=np.uint8), [rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
                                                                  for _ in range(2)]


def golden_batch():
    """A padded batch of two samples that take the downscaling branches: a 13-frame 480x832 video (the official
    eval size: 476x812) with one 800x600 reference (above 399360 pixels), and a 5-frame 96x160 video with two."""
    rng = np.random.default_rng(11)
    videos = [rng.integers(0, 256, (13, 480, 832, 3), dtype=np.uint8), rng.integers(0, 256, (5, 96, 160, 3),
                                                                                      dtype=np.uint8)]
    refs = [[rng.integers(0, 256, (800, 600, 3), dtype=np.uint8)],
            [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)]]
    return videos, refs


# The tiny Qwen2.5-VL of reward/vlm.py tiny_vlm_config, in transformers 4.51's flat config
TINY_451 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e4,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                   patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                                   fullatt_block_indexes=[1]))


def official_batch(processor, videos, refs) -> dict:
    """What the official scorer's processor makes of a batch: each sample resized as fetch_image / fetch_video."""
    texts, images, clips, fps = [], [], [], []
    for video, sample_refs in zip(videos, refs):
        for r in sample_refs:
            h, w = smart_resize(r.shape[0], r.shape[1], IMAGE_MIN_PIXELS, MAX_PIXELS)
            images.append(Image.fromarray(r).convert("RGB").resize((w, h)))
        h, w = smart_resize(video.shape[1], video.shape[2], VIDEO_MIN_PIXELS, MAX_PIXELS)
        clips.append(resize_frames(video[sample_frame_indices(video.shape[0], 4)], h, w))
        fps.append(4 / video.shape[0] * VIDEO_FPS)
        chat = [{"role": "user", "content": [*({"type": "image", "image": "ref"} for _ in sample_refs),
                                             {"type": "video", "video": "video"},
                                             {"type": "text", "text": SUBJECT_ALIGNMENT_PROMPT}]}]
        texts.append(processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                   add_vision_id=True))
    out = processor(text=texts, images=images, videos=clips, padding=True, return_tensors="pt",
                    videos_kwargs={"do_rescale": True, "fps": fps})
    return {"input_ids": out["input_ids"].tolist(), "attention_mask": out["attention_mask"].tolist(),
            "pixel_values": {"shape": list(out["pixel_values"].shape), "sha256": digest(out["pixel_values"])},
            "image_grid_thw": out["image_grid_thw"].tolist(),
            "pixel_values_videos": {"shape": list(out["pixel_values_videos"].shape),
                                    "sha256": digest(out["pixel_values_videos"])},
            "video_grid_thw": out["video_grid_thw"].tolist(),
            "second_per_grid_ts": [float(x) for x in out["second_per_grid_ts"]]}


def model_keys(vocab: int) -> dict:
    """{name: shape} of the tiny Qwen2.5-VL under transformers 4.51 (the official checkpoint's module names)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vocab_size=vocab, **TINY_451))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def main():
    assert transformers.__version__ == "4.51.3", transformers.__version__
    video, refs = golden_inputs()
    with tempfile.TemporaryDirectory() as d:  # the processor insists on Qwen2's tokenizer class: same vocabulary
        build_tiny_tokenizer().save_pretrained(d)
        tokenizer = Qwen2TokenizerFast.from_pretrained(d)
    tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE)
    images = []
    for r in refs:
        h, w = smart_resize(r.shape[0], r.shape[1], IMAGE_MIN_PIXELS, MAX_PIXELS)
        images.append(Image.fromarray(r).convert("RGB").resize((w, h)))
    frames = video[sample_frame_indices(video.shape[0], 4)]
    h, w = smart_resize(video.shape[1], video.shape[2], VIDEO_MIN_PIXELS, MAX_PIXELS)
    clip = resize_frames(frames, h, w)
    sample_fps = 4 / video.shape[0] * VIDEO_FPS
    chat = [{"role": "user", "content": [*({"type": "image", "image": "ref"} for _ in refs),
                                         {"type": "video", "video": "video"},
                                         {"type": "text", "text": SUBJECT_ALIGNMENT_PROMPT}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    out = processor(text=[text], images=images, videos=[clip], padding=True, return_tensors="pt",
                    videos_kwargs={"do_rescale": True, "fps": [sample_fps]})
    batch = official_batch(processor, *golden_batch())
    golden = {"transformers": transformers.__version__, "text": text,
              "input_ids": out["input_ids"][0].tolist(),
              "pixel_values": {"shape": list(out["pixel_values"].shape), "sha256": digest(out["pixel_values"])},
              "image_grid_thw": out["image_grid_thw"].tolist(),
              "pixel_values_videos": {"shape": list(out["pixel_values_videos"].shape),
                                      "sha256": digest(out["pixel_values_videos"])},
              "video_grid_thw": out["video_grid_thw"].tolist(),
              "second_per_grid_ts": [float(x) for x in out["second_per_grid_ts"]],
              "batch": batch, "model_keys_451": model_keys(len(tokenizer))}
    path = Path(__file__).with_name("official_inputs_golden.json")
    path.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print("wrote", path, {k: v for k, v in golden.items() if k not in ("text", "input_ids")})


if __name__ == "__main__":
    main()
