"""Run logging: one JSON line per step, the same numbers as TensorBoard scalars, sample videos.

`metrics.jsonl` is appended per step; on resume, lines of steps after the checkpoint are dropped
first, so the file always reads as one clean run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REQUIRED = ("step", "reward_mean", "reward_std", "kl", "policy_loss",
            "policy_version", "staleness_max", "rollout_s", "reward_s", "learn_s", "sync_s", "step_s")

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed or rolled-back run logs them again). The file is
        replaced whole, so a driver killed meanwhile leaves the old file or the new one, never a cut one; a last
        line cut by a crash mid-append is dropped (its step is logged again), not fatal."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{self.path}: line {number} is not a JSON record") from None
                log.warning("%s: dropping its cut last line (%d characters)", self.path, len(line))
                continue
            if record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: Dict[str, float]) -> None:
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise KeyError(f"metrics record lacks {missing}")
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and np.isfinite(value):
                    self.writer.add_scalar(_tag(key), value, step)

    def log_videos(self, step: int, videos: torch.Tensor, references: List[np.ndarray], tag: str = "samples") -> None:
        """Videos (G, F, H, W, 3) uint8 side by side with the references (held as still frames)."""
        if self.writer is None:
            return
        grid = video_with_references(videos, references)
        self.writer.add_video(tag, grid, step, fps=4)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tag(key: str) -> str:
    if key.startswith("heldout_"):
        return f"eval/{key}"
    if key.startswith("reward"):
        return f"reward/{key}"
    if key.endswith("_s"):
        return f"time/{key}"
    return f"train/{key}"


def video_with_references(videos: torch.Tensor, references: List[np.ndarray]) -> torch.Tensor:
    """(1, F, 3, H, (K + G) W) float in [0, 1]: references left, then each sample, in one row."""
    videos = torch.as_tensor(videos)
    g, f, h, w, _ = videos.shape
    panels = []
    for ref in references:
        image = torch.from_numpy(np.array(ref)).permute(2, 0, 1)[None].float()
        image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
        panels.append(image.expand(f, -1, -1, -1))
    panels += [videos[i].permute(0, 3, 1, 2).float() for i in range(g)]
    row = torch.cat(panels, dim=3) / 255.0
    return row.clamp(0, 1)[None]


def read_metrics(output_dir: str | Path) -> List[Dict[str, float]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
