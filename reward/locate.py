"""Where a configured reward's files are, checked without loading them: a wrong path must cost a second before
any cluster starts, not a traceback in a reward worker after the GPUs are up (launcher/preflight.py).

Each check raises FileNotFoundError or ValueError whose message names the config key and the path, as the
loaders themselves do (reward/vlm.py `load_reward_model`, reward/official.py, reward/face.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from reward.official_format import (
    OFFICIAL_CONFIG_FILE,
    checkpoint_dir,
    official_base_path,
    official_weight_files,
    read_official_config,
)
from reward.official_inputs import frame_count
from reward.vlm import SETTINGS_FILE


def vlm_files(vlm_cfg, config_key: str = "reward.vlm.path") -> List[Path]:
    """The files `reward.vlm` (init: pretrained) will read: a reward model trained here, or the official
    Identity-GRPO checkpoint (model_config.json + checkpoint-<step>/) on its local Qwen2.5-VL base."""
    path = vlm_cfg.path
    if not path:
        raise ValueError(f"{config_key} is not set: give a local reward model directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{config_key}: directory {path!r} does not exist (local paths only, no hub "
                                "downloads)")
    directory = Path(path)
    if (directory / SETTINGS_FILE).is_file():
        return [directory / SETTINGS_FILE]
    if not (directory / OFFICIAL_CONFIG_FILE).is_file():
        if vlm_cfg.allow_untrained_head and (directory / "config.json").is_file():
            return [directory / "config.json"]
        raise FileNotFoundError(f"{config_key}: {path!r} has neither {SETTINGS_FILE} (a reward model trained by "
                                f"python -m reward.train) nor {OFFICIAL_CONFIG_FILE} (the official Identity-GRPO "
                                "reward checkpoint, unpacked)")
    official = read_official_config(directory, config_key)
    frames = frame_count(float(official["data_config"]["num_frames"]))
    if frames != vlm_cfg.num_frames:
        raise ValueError(f"reward.vlm.num_frames={vlm_cfg.num_frames}, but the official checkpoint {path} scores "
                         f"{frames} frames (its {OFFICIAL_CONFIG_FILE} data_config.num_frames); set "
                         f"reward.vlm.num_frames (and reward.face.num_frames) to {frames}")
    ckpt = checkpoint_dir(directory, vlm_cfg.checkpoint_step, config_key)
    weights = official_weight_files(ckpt, config_key)
    base = official_base_path(directory, official, vlm_cfg.base_path, config_key)
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"reward.vlm.base_path: {base!r} has no config.json (a local Qwen2.5-VL directory "
                                "such as Qwen/Qwen2.5-VL-3B-Instruct)")
    return [directory / OFFICIAL_CONFIG_FILE, *weights, Path(base) / "config.json"]


def face_file(face_cfg) -> List[Path]:
    """The ArcFace ONNX file of `reward.face` (backend arcface); dlib's weights ship in a PyPI package."""
    if face_cfg.backend != "arcface":
        return []
    if not face_cfg.model_path:
        raise ValueError("reward.face.backend=arcface needs reward.face.model_path (a local ArcFace .onnx file)")
    if not os.path.isfile(face_cfg.model_path):
        raise FileNotFoundError(f"reward.face.model_path: no such ArcFace ONNX file: {face_cfg.model_path}")
    return [Path(face_cfg.model_path)]


def reward_files(reward_cfg) -> List[Path]:
    """Every file the configured reward components read (only the components `reward.weights` names)."""
    files = []
    if "vlm" in reward_cfg.weights and reward_cfg.vlm.init == "pretrained":
        files += vlm_files(reward_cfg.vlm)
    if "face" in reward_cfg.weights:
        files += face_file(reward_cfg.face)
    return files
