"""Evaluation output files: JSON any reader accepts (NaN and inf written as null)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Sequence

import numpy as np


def json_clean(value):
    """NaN/inf -> None (JSON null), numpy scalars -> Python: output any JSON reader accepts."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_clean(value), indent=2, allow_nan=False) + "\n")
    return path


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(json_clean(r), allow_nan=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
