"""Named reward-model (Qwen2.5-VL) architectures for `reward.vlm.arch` / reward.train's `model.arch`.

`tiny` is the CPU test model (reward/vlm.py `tiny_vlm_config`); the others are published configs in
`reward/architectures/` (sources in its SOURCES.md). Pure (json and paths only), so the config checks can ask
which names exist without importing torch or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCH_DIR = Path(__file__).resolve().parent / "architectures"
VLM_ARCH_FILES = {"qwen2.5-vl-3b": "qwen2.5_vl_3b.json"}  # published configs (architectures/SOURCES.md)
VLM_ARCHITECTURES = frozenset({"tiny", *VLM_ARCH_FILES})


def published_vlm_json(arch: str) -> dict:
    """The published config.json values of `arch` (not `tiny`, which has no file)."""
    if arch not in VLM_ARCH_FILES:
        raise ValueError(f"reward.vlm.arch: unknown architecture {arch!r}; known: tiny, {sorted(VLM_ARCH_FILES)}")
    return json.loads((ARCH_DIR / VLM_ARCH_FILES[arch]).read_text())
