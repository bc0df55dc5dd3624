"""Bad input to the entry points: exit status 2, the culprit named in the last line of stderr, no traceback,
no cluster started, and nothing on disk touched (issue #17's table, first part)."""

import time

import pytest
import ray

from data import write_shards
from launcher import evaluate, rehearse
from launcher import train as train_cli
from reward import train as reward_train

CPU = "cluster_configs/local_cpu.yaml"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  kind: vace\n  height: [1,\n")
    (tmp_path / "list.yaml").write_text("- model\n- sampler\n")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "driver.pt").write_text("kept")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000001\n")
    return tmp_path


def train_args(files, *overrides):
    return ["--config", CPU, f"trainer.output_dir={files / 'run'}", *overrides]


CASES = [
    # (entry point, argv builder, text the last stderr line must contain)
    (train_cli, lambda f: train_args(f, "trainer.keep_last=0"), "'trainer.keep_last' must be > 0"),
    (train_cli, lambda f: train_args(f, "reward.weights={face: 0.0}"), "'reward.weights' must be finite and not all"),
    (train_cli, lambda f: train_args(f, "reward.weights.face=nan"), "'reward.weights' must be finite"),
    (train_cli, lambda f: train_args(f, f"data.prompt_shards={f}/none-{{000..002}}.tar"), "'data.prompt_shards'"),
    (train_cli, lambda f: train_args(f, f"trainer.resume={f}/nowhere"), "'trainer.resume'"),
    (train_cli, lambda f: ["--config", str(f / "broken.yaml")], "broken.yaml: line 4, column 1 not valid YAML"),
    (train_cli, lambda f: ["--config", str(f / "list.yaml")], "list.yaml: a config file must be a mapping"),
    (train_cli, lambda f: ["--config", str(f / "missing.yaml")], "config file not found"),
    (train_cli, lambda f: train_args(f, "sampler.schedule=ddim"), "'sampler.schedule'"),
    (train_cli, lambda f: train_args(f, "sampler.nosuch=1"), "sampler.nosuch"),
    (train_cli, lambda f: train_args(f, "sampler.std_max=big"), "sampler.std_max"),
    (train_cli, lambda f: train_args(f, "grpo.optimizer_steps_per_update=3"), "'grpo.optimizer_steps_per_update'"),
    (train_cli, lambda f: train_args(f, "optim.ema.enabled=true", "workers.learner_engine.zero_stage=3"),
     "'optim.ema.enabled'"),
    (train_cli, lambda f: train_args(f, "optim.ema.decay=1.5"), "'optim.ema.decay'"),
    (evaluate, lambda f: train_args(f, "--num-prompts", "0"), "argument --num-prompts: must be >= 1"),
    (evaluate, lambda f: train_args(f, "--seeds-per-prompt", "two"), "argument --seeds-per-prompt: expected int"),
    (evaluate, lambda f: train_args(f, "--weights", "best"), "argument --weights: invalid choice"),
    (rehearse, lambda f: ["--config", "cluster_configs/vace_1.3b_8gpu.yaml", "--learner-ranks", "1"],
     "argument --learner-ranks: must be >= 2"),
    (write_shards, lambda f: ["--kind", "prompt", "--folder", str(f), "--out", str(f / "o"),
                              "--max-samples-per-shard", "0"], "argument --max-samples-per-shard: must be > 0"),
    (write_shards, lambda f: ["--kind", "prompt", "--folder", str(f), "--out", str(f / "o"), "--fps", "-1"],
     "argument --fps: must be > 0"),
    (reward_train, lambda f: ["--config", str(f / "broken.yaml")], "broken.yaml: line 4, column 1 not valid YAML"),
]


@pytest.mark.parametrize("module,argv,culprit", CASES, ids=lambda x: getattr(x, "__name__", None))
def test_bad_input_is_one_line_and_exit_2(files, capsys, module, argv, culprit):
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv(files))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert culprit in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and not ray.is_initialized()
    assert time.monotonic() - start < 20  # config and path mistakes cost seconds, not a cluster start
    assert (files / "run" / "checkpoints" / "step_000001" / "driver.pt").read_text() == "kept"
