"""The weight checks before any cluster starts (policy/locate.py, reward/locate.py, launcher/preflight.py): every
file a role will load is found, in its layout and of the architecture the config names, without loading it."""

import pytest

from config import ConfigError, load_config
from launcher.preflight import weight_files
from policy.locate import policy_files
from policy.models import ModelPathError, save_tiny_pretrained
from reward.locate import reward_files
from tests.stand_ins import official_reward_stand_in

CPU = "cluster_configs/local_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny") / "vace", "vace")


def policy_cfg(root, *overrides):
    return load_config(root / CPU, ["model.init=pretrained", *overrides]).model


def test_policy_directory_is_checked_against_the_named_architecture(root, tiny_dir):
    assert policy_files(policy_cfg(root, f"model.path={tiny_dir}", "model.arch=tiny")) == [tiny_dir]
    with pytest.raises(ModelPathError, match=r"model.path .*: its transformer is not model.arch=wan2.1-vace-1.3b"):
        policy_files(policy_cfg(root, f"model.path={tiny_dir}", "model.arch=wan2.1-vace-1.3b"))
    assert policy_files(load_config(root / CPU).model) == []  # random init reads nothing


def test_phantom_checkpoint_must_exist(root, tiny_dir, tmp_path):
    keys = [f"model.path={tiny_dir}", "model.kind=phantom", "model.arch=null"]
    with pytest.raises(ModelPathError, match=r"model.phantom_checkpoint: not found: .*phantom.pth"):
        policy_files(policy_cfg(root, *keys, f"model.phantom_checkpoint={tmp_path / 'phantom.pth'}"))
    (tmp_path / "phantom.pth").write_bytes(b"weights")
    found = policy_files(policy_cfg(root, *keys, f"model.phantom_checkpoint={tmp_path / 'phantom.pth'}"))
    assert found == [tiny_dir, tmp_path / "phantom.pth"]


def test_official_reward_checkpoint_on_its_base(root, tmp_path):
    official_reward_stand_in(tmp_path / "identity_reward", tmp_path / "qwen")
    keys = ["reward.weights={vlm: 1.0}", "reward.vlm.init=pretrained",
            f"reward.vlm.path={tmp_path / 'identity_reward'}", "reward.vlm.num_frames=4"]
    cfg = load_config(root / CPU, keys + [f"reward.vlm.base_path={tmp_path / 'qwen'}"])
    assert reward_files(cfg.reward)[-1] == tmp_path / "qwen" / "config.json"
    with pytest.raises(ValueError, match=r"built on 'Qwen/Qwen2.5-VL-3B-Instruct'.*set reward.vlm.base_path"):
        reward_files(load_config(root / CPU, keys).reward)
    with pytest.raises(FileNotFoundError, match=r"reward.vlm.base_path: .*nowhere.* has no config.json"):
        reward_files(load_config(root / CPU, keys + [f"reward.vlm.base_path={tmp_path / 'nowhere'}"]).reward)
    with pytest.raises(ValueError, match=r"reward.vlm.num_frames=5, but the official checkpoint .* scores 4 frames"):
        reward_files(load_config(root / CPU, keys[:-1] + ["reward.vlm.num_frames=5",
                                                          f"reward.vlm.base_path={tmp_path / 'qwen'}"]).reward)
    (tmp_path / "identity_reward" / "checkpoint-21" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint-21 has neither model.pth nor adapter_model.safetensors"):
        weight_files(cfg)  # the preflight's form: a ConfigError, one line at the entry point


def test_unused_components_are_not_checked(root, tmp_path):
    """A path under a component the run does not score with (not in reward.weights) is not read, so not checked."""
    cfg = load_config(root / CPU, ["reward.vlm.init=pretrained", f"reward.vlm.path={tmp_path / 'none'}",
                                   "reward.face.backend=arcface", f"reward.face.model_path={tmp_path / 'none.onnx'}",
                                   "reward.weights={face: 1.0}"])
    with pytest.raises(FileNotFoundError, match="reward.face.model_path"):
        reward_files(cfg.reward)
