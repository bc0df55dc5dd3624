"""Named reward-model (Qwen2.5-VL) architectures for `reward.vlm.arch` / reward.train's `model.arch`.

`tiny` is the CPU test model (`tiny_vlm_config`); the others are published configs in `reward/architectures/`
(sources in its SOURCES.md), built by `published_vlm_config`. Importing it loads neither torch nor transformers
(the builders import transformers when called), so the config checks can ask which names exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

ARCH_DIR = Path(__file__).resolve().parent / "architectures"
VLM_ARCH_FILES = {"qwen2.5-vl-3b": "qwen2.5_vl_3b.json"}  # published configs (architectures/SOURCES.md)
VLM_ARCHITECTURES = frozenset({"tiny", *VLM_ARCH_FILES})


def published_vlm_json(arch: str) -> dict:
    """The published config.json values of `arch` (not `tiny`, which has no file)."""
    if arch not in VLM_ARCH_FILES:
        raise ValueError(f"reward.vlm.arch: unknown architecture {arch!r}; known: tiny, {sorted(VLM_ARCH_FILES)}")
    return json.loads((ARCH_DIR / VLM_ARCH_FILES[arch]).read_text())


def _token_ids(tokenizer) -> Dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in
            ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")}


def published_vlm_config(arch: str, tokenizer, text_layers: Optional[int] = None,
                         vision_layers: Optional[int] = None, vocab: Optional[int] = None):
    """A published Qwen2.5-VL architecture (`reward.vlm.arch`) for random init, with the offline tokenizer's
    special-token ids. Rehearsal reductions: fewer language / vision layers (the full-attention vision blocks
    that remain keep their indexes) and a smaller vocabulary; widths, heads and patching stay published."""
    from transformers import Qwen2_5_VLConfig

    pub = published_vlm_json(arch)
    vocab = int(vocab or pub["vocab_size"])
    if vocab < len(tokenizer):
        raise ValueError(f"reward.vlm.vocab={vocab} is below the offline tokenizer's {len(tokenizer)} tokens")
    ids = _token_ids(tokenizer)
    vision = {k: v for k, v in pub["vision_config"].items() if k != "in_chans"}
    vision["in_channels"] = pub["vision_config"]["in_chans"]
    if vision_layers is not None:
        # The published stack alternates windowed blocks with a full-attention one (every 8th). A reduced stack
        # keeps the indexes below its depth, and ends on a full-attention block when none is left, so that even
        # a 2-block rehearsal runs both attention kinds at the published width.
        vision["depth"] = int(vision_layers)
        kept = [i for i in vision["fullatt_block_indexes"] if i < vision_layers]
        vision["fullatt_block_indexes"] = kept or [int(vision_layers) - 1]
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_act",
                 "max_position_embeddings", "rms_norm_eps", "attention_dropout", "tie_word_embeddings",
                 "initializer_range", "sliding_window", "use_sliding_window", "max_window_layers")
    text = {k: pub[k] for k in text_keys}
    text.update(vocab_size=vocab, num_hidden_layers=int(text_layers or pub["num_hidden_layers"]),
                rope_parameters={"rope_type": "default", "rope_theta": pub["rope_theta"],
                                 "mrope_section": pub["rope_scaling"]["mrope_section"]},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


def tiny_vlm_config(tokenizer):
    """The CPU config of ../shared/CPU_STACK.md with the token ids of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = _token_ids(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
