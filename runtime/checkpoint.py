"""Step checkpoints that are either complete or absent.

Layout under `<output_dir>/checkpoints/`:
    step_000010/            learner/ (DeepSpeed engine state of every rank + RNG), lora/ (diffusers
                            format), driver.pt (step, policy version, reader position, RNG), config.yaml
    latest                  text file naming the newest complete step directory

A checkpoint is written into `step_XXXXXX.tmp-<pid>` and renamed only when every part is on disk;
`latest` is replaced atomically (write a temp file, then os.replace). A crash at any point leaves
the previous checkpoint and pointer intact; stale temp directories are removed on the next save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

LATEST = "latest"
DRIVER_STATE = "driver.pt"


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last must be >= 1 (the checkpoint 'latest' names is always kept), "
                             f"got {keep_last}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def save(self, step: int, write_parts: Callable[[Path], None], driver_state: Dict[str, Any],
             config_yaml: str, before_commit: Optional[Callable[[], None]] = None) -> Path:
        """`write_parts(tmp_dir)` writes the workers' parts; then driver state, rename, pointer."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("step_*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.step_dir(step)
        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        write_parts(tmp)
        torch.save(driver_state, tmp / DRIVER_STATE)
        (tmp / "config.yaml").write_text(config_yaml)
        _fsync_tree(tmp)
        if before_commit is not None:
            before_commit()  # fault injection point: a crash here must leave the old checkpoint usable
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = self.root / f"{LATEST}.tmp-{os.getpid()}"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, self.root / LATEST)
        self._prune()
        return final

    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / DRIVER_STATE).exists():
            raise FileNotFoundError(f"checkpoint pointer {pointer} names {path}, which is incomplete or missing")
        return path

    def resolve(self, resume: str) -> Optional[Path]:
        """`trainer.resume`: auto (latest if any) | never | a checkpoint directory."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / DRIVER_STATE).exists():
            raise FileNotFoundError(f"trainer.resume: {path} is not a complete checkpoint (no {DRIVER_STATE})")
        return path

    @staticmethod
    def load_driver_state(path: Path) -> Dict[str, Any]:
        return torch.load(path / DRIVER_STATE, weights_only=False)

    def _prune(self) -> None:
        """Keep the `keep_last` highest steps, and always the one `latest` names (after a resume from an older
        checkpoint into the same directory, the newest save is not the highest step)."""
        pointer = self.root / LATEST
        protected = pointer.read_text().strip() if pointer.exists() else None
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old.name != protected:
                shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
