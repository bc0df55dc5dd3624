"""Checkpoint retention (runtime/checkpoint.py): never the checkpoint `latest` names, never all of them; the metrics
log a resume rolls back (runtime/metrics.py)."""

import json

import pytest

from config import ConfigError, load_config
from runtime.checkpoint import CheckpointManager
from runtime.metrics import MetricsLogger


def save(manager, step):
    return manager.save(step, lambda tmp: (tmp / "part").write_text(str(step)), {"step": step}, "")


def test_keep_last_prunes_the_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        save(manager, step)
    assert sorted(p.name for p in manager.root.glob("step_*")) == ["step_000002", "step_000003"]
    assert manager.latest().name == "step_000003"


def test_a_resumed_older_run_keeps_its_latest_checkpoint(tmp_path):
    """Resumed from step 1 into the same directory, the next save (step 2) is not the highest step on disk;
    with keep_last=1 it must survive beside the old step 5, and `latest` must name it."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 5):
        save(manager, step)
    (manager.root / "step_000001").mkdir()  # as if the older checkpoint were still there to resume from
    newest = save(manager, 2)
    assert manager.latest() == newest and newest.is_dir()
    assert (newest / "part").read_text() == "2"


@pytest.mark.parametrize("keep_last", [0, -1])
def test_keep_last_below_one_is_refused(root, tmp_path, keep_last):
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=keep_last)
    with pytest.raises(ConfigError, match="'trainer.keep_last' must be > 0"):
        load_config(root / "cluster_configs" / "local_cpu.yaml", [f"trainer.keep_last={keep_last}"])


def test_resumed_metrics_drop_later_steps_and_a_cut_last_line(tmp_path):
    """A driver killed mid-append leaves a cut last line: the resume drops it with the steps after its checkpoint
    (they are logged again); a damaged line before the last is not a crash's doing and is refused, naming the file."""
    lines = [json.dumps({"step": step}) for step in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[2][:7])
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # replaced whole: no temp file left
    path.write_text(lines[0] + "\n{cut\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
