import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from launcher.config import ConfigError, config_from_yaml_text, load_config, to_yaml

CONFIGS = ["local_cpu", "demo_cpu", "vace_1.3b_8gpu", "phantom_1.3b_8gpu", "vace_14b_multinode"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_and_validates(root, name):
    cfg = load_config(root / "cluster_configs" / f"{name}.yaml")
    assert cfg.grpo.group_size >= 2
    assert OmegaConf.is_readonly(cfg)


def test_paper_settings_in_vace_1_3b(root):
    cfg = load_config(root / "cluster_configs" / "vace_1.3b_8gpu.yaml")
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (32, 32.0)
    assert cfg.grpo.group_size == 8 and cfg.sampler.num_steps == 25
    assert (cfg.model.num_frames, cfg.model.height, cfg.model.width) == (33, 240, 416)
    assert cfg.sampler.guidance_scale == 4.5 and cfg.grpo.clip_range == 1e-3
    assert cfg.grpo.kl_beta == 0.004 and cfg.optim.lr == 1e-4


def test_overrides_are_typed(root):
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", ["trainer.steps=3", "sampler.eta=0.5"])
    assert cfg.trainer.steps == 3 and isinstance(cfg.trainer.steps, int)
    assert cfg.sampler.eta == 0.5


@pytest.mark.parametrize("override,key", [
    ("nosuch.key=1", "nosuch.key"),
    ("trainer.steps=abc", "trainer.steps"),
    ("trainer.stepz=3", "trainer.stepz"),
    ("model.kind=foo", "model.kind"),
    ("grpo.group_size=1", "grpo.group_size"),
    ("model.num_frames=8", "model.num_frames"),
    ("grpo.prompts_per_step=3", "grpo.prompts_per_step"),
    ("faults.role=driver", "faults.role"),
    ("workers.learner_engine.micro_batch_size=3", "workers.learner_engine.micro_batch_size"),
])
def test_bad_override_names_the_key(root, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(root / "cluster_configs" / "local_cpu.yaml", [override])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "trainer.stepz" in str(err.value) and str(bad) in str(err.value)


def test_missing_required_value_is_an_error(tmp_path):
    bad = tmp_path / "missing.yaml"
    bad.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"data\.prompt_shards.*trainer\.output_dir"):
        load_config(bad)


def test_resolved_yaml_round_trips(root):
    cfg = load_config(root / "cluster_configs" / "vace_14b_multinode.yaml")
    assert config_from_yaml_text(to_yaml(cfg)) == cfg


def _cli(root, *args):
    return subprocess.run([sys.executable, "-m", "launcher.train", *args], cwd=root,
                          capture_output=True, text=True, timeout=120)


def test_cli_print_config_and_errors(root):
    ok = _cli(root, "--config", "cluster_configs/local_cpu.yaml", "--print-config", "trainer.steps=7")
    assert ok.returncode == 0, ok.stderr
    assert OmegaConf.create(ok.stdout).trainer.steps == 7
    bad = _cli(root, "--config", "cluster_configs/local_cpu.yaml", "nosuch.key=1")
    assert bad.returncode != 0 and "nosuch.key" in bad.stderr
    bad = _cli(root, "--config", "cluster_configs/local_cpu.yaml", "trainer.steps=abc")
    assert bad.returncode != 0 and "trainer.steps" in bad.stderr
