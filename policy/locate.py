"""Where a configured policy's weights are, checked without loading them (launcher/preflight.py): the diffusers
directory `model.path` with every part, its transformer's shapes against `model.arch` (read from its config.json,
as `build_components` checks after loading), and Phantom's `model.phantom_checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from policy.arch import shape_differences, transformer_config
from policy.models import ModelPathError, check_pretrained_dir


def policy_files(model_cfg) -> List[Path]:
    """The directories and files `model` (init: pretrained) will read; raises ModelPathError naming the key."""
    if model_cfg.init != "pretrained":
        return []
    path = check_pretrained_dir(model_cfg.path)
    found = [path]
    if model_cfg.arch:
        config_file = path / "transformer" / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except ValueError as err:
            raise ModelPathError(f"model.path: {config_file} is not JSON ({err})") from None
        diff = shape_differences(transformer_config(model_cfg.arch, model_cfg.kind), config)
        if diff:
            raise ModelPathError(f"model.path {model_cfg.path}: its transformer is not model.arch={model_cfg.arch} "
                                 f"(config key: expected vs found) {diff}")
    if model_cfg.kind == "phantom" and model_cfg.phantom_checkpoint:
        checkpoint = Path(model_cfg.phantom_checkpoint)
        if not checkpoint.is_file():
            raise ModelPathError(f"model.phantom_checkpoint: not found: {checkpoint} (Phantom-Wan's released "
                                 "transformer: a .pth, .safetensors or sharded index .json file)")
        found.append(checkpoint)
    return found
