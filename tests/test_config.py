import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from config import ConfigError, config_from_yaml_text, load_config, to_yaml
from workers.run_config import load_run_config

CONFIGS = ["local_cpu", "demo_cpu", "vace_1.3b_8gpu", "vace_1.3b_8gpu_colocated", "vace_1.3b_eval", "phantom_1.3b_8gpu",
           "vace_14b_multinode"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_and_validates(root, name):
    cfg = load_config(root / "cluster_configs" / f"{name}.yaml")
    assert cfg.grpo.group_size >= 2
    assert OmegaConf.is_readonly(cfg)


# The official Identity-GRPO recipe (alibaba/identity-grpo config/dgx.py `vace()`, config/base.py,
# train_wan2_1_vace.py, flow_grpo/diffusers_patch/wan_vace_pipeline_with_logprob.py): docs/FIDELITY.md.
OFFICIAL_RECIPE = {
    "model.lora.rank": 32, "model.lora.alpha": 32.0, "model.lora.init": "gaussian",  # LoraConfig(r, lora_alpha, init)
    "model.height": 240, "model.width": 416, "model.num_frames": 33,  # height, width, frames
    "sampler.num_steps": 25, "sampler.guidance_scale": 4.5, "sampler.shift": 3.0,  # sample.*, scheduler flow_shift
    "sampler.schedule": "unipc", "sampler.noise_rule": "linear",  # UniPC sigmas; std linear in sigma
    "sampler.std_min": "schedule", "sampler.std_max": "schedule",  # sigmas[-1], sigmas[1]
    "sampler.max_sequence_length": 512,  # compute_text_embeddings(..., max_sequence_length=512)
    "sampler.shared_initial_noise": False,  # one initial noise per video
    "grpo.group_size": 8, "grpo.prompts_per_step": 32, "grpo.optimizer_steps_per_update": 2,  # 8 x 4 x 8 / 8; 8 // 2
    "grpo.clip_range": 1e-3, "grpo.kl_beta": 0.004, "grpo.adv_clip": 5.0, "grpo.adv_eps": 1e-4,
    "grpo.std_mode": "group", "grpo.std_ddof": 0,  # PerPromptStatTracker(global_std=False), np.std
    "grpo.timestep_fraction": 0.99, "grpo.timestep_order": "fixed", "grpo.num_inner_epochs": 1,
    "optim.lr": 1e-4, "optim.weight_decay": 1e-4, "optim.betas": [0.9, 0.999], "optim.grad_clip": 1.0,
    "optim.ema.enabled": True, "optim.ema.decay": 0.9, "optim.ema.update_interval": 8, "optim.ema.repeats": 4,
    "trainer.checkpoint_every": 5,  # save_freq
}
# What a preset of a model the official code does not train sets itself (docs/FIDELITY.md).
PRESETS_OWN = {"phantom_1.3b_8gpu": {"sampler.shift"},
               "vace_14b_multinode": {"sampler.shift", "trainer.checkpoint_every"}}
OFFICIAL_EVAL = {"model.height": 480, "model.width": 832, "model.num_frames": 81, "sampler.num_steps": 50}
# Wan2.1 `sample_neg_prompt`, as the official train_wan2_1_vace.py encodes it
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量"
                       "，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸"
                       "形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@pytest.mark.parametrize("name", ["vace_1.3b_8gpu", "vace_1.3b_8gpu_colocated", "phantom_1.3b_8gpu",
                                  "vace_14b_multinode"])
def test_gpu_presets_train_the_official_recipe(root, name):
    cfg = load_config(root / "cluster_configs" / f"{name}.yaml")
    for key, value in OFFICIAL_RECIPE.items():
        if key not in PRESETS_OWN.get(name, ()):
            got = OmegaConf.select(cfg, key)
            assert (list(got) if key == "optim.betas" else got) == value, key
    assert cfg.sampler.negative_prompt == WAN_NEGATIVE_PROMPT


def test_eval_preset_is_the_training_preset_at_the_official_eval_settings(root):
    train = load_config(root / "cluster_configs" / "vace_1.3b_8gpu.yaml")
    evaluation = load_config(root / "cluster_configs" / "vace_1.3b_eval.yaml")
    for key, value in OFFICIAL_EVAL.items():
        assert OmegaConf.select(evaluation, key) == value, key
    for section in ("sampler", "grpo", "optim", "reward"):
        differs = {k for k in train[section] if train[section][k] != evaluation[section][k]}
        assert differs <= {"num_steps"}, (section, differs)
    assert evaluation.model.path == train.model.path and evaluation.model.lora == train.model.lora


def test_base_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrainer: {steps: 7}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml \(the 'base' of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override,message", [
    ("sampler.schedule=unipc", "noise_rule' eta needs 'sampler.schedule' euler"),
    ("grpo.optimizer_steps_per_update=2", "must divide each learner rank's groups"),
    ("sampler.std_max=big", "sampler.std_max: expected a number or 'schedule'"),
])
def test_recipe_keys_are_checked(root, override, message):
    with pytest.raises(ConfigError, match=message):  # the noise rule is the policy room's check (policy/checks.py)
        load_run_config(root / "cluster_configs" / "local_cpu.yaml", [override])


def test_unknown_reward_model_architecture_names_the_key(root, tmp_path):
    from reward.train_config import load_reward_config

    with pytest.raises(ConfigError, match=r"'reward.vlm.arch' must be one of \['qwen2.5-vl-3b', 'tiny'\].*'qwen-9b'"):
        load_run_config(root / "cluster_configs" / "local_cpu.yaml",
                        ["reward.weights={vlm: 1.0}", "reward.vlm.init=random", "reward.vlm.arch=qwen-9b"])
    with pytest.raises(ConfigError, match=r"'model.arch'.*must be one of \['qwen2.5-vl-3b', 'tiny'\]"):
        load_reward_config(None, ["data.preference_shards=x", f"trainer.output_dir={tmp_path}", "model.init=random",
                                  "model.arch=qwen-9b"])


def test_ema_at_zero3_is_not_implemented(root):
    with pytest.raises(NotImplementedError, match="optim.ema.enabled"):
        load_config(root / "cluster_configs" / "local_cpu.yaml", ["optim.ema.enabled=true",
                                                                   "workers.learner_engine.zero_stage=3"])


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
    ("faults.kills=[driver:0:1]", "faults.kills"),
    ("faults.kills=[learner:1]", "faults.kills"),
    ("workers.learner_engine.micro_batch_size=3", "workers.learner_engine.micro_batch_size"),
    ("sampler.guidance_scale=0.5", "'sampler.guidance_scale' must be >= 1.0"),
    ("sampler.image_guidance_scale=0", "'sampler.image_guidance_scale' must be >= 1.0"),
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


def test_cli_print_config_and_errors(root, capsys):
    # `python -m launcher.train` itself, once (its imports take seconds); the errors through the same main()
    ok = subprocess.run([sys.executable, "-m", "launcher.train", "--config", "cluster_configs/local_cpu.yaml",
                         "--print-config", "trainer.steps=7"], cwd=root, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert OmegaConf.create(ok.stdout).trainer.steps == 7
    from launcher.train import main

    for override, key in (("nosuch.key=1", "nosuch.key"), ("trainer.steps=abc", "trainer.steps")):
        with pytest.raises(SystemExit) as exit_:
            main(["--config", str(root / "cluster_configs" / "local_cpu.yaml"), override])
        assert exit_.value.code == 2 and key in capsys.readouterr().err


@pytest.mark.parametrize("override,mode_key", [
    ("model.path=/models/Wan2.1-VACE-1.3B-diffusers", "model.init"),  # the CPU preset is random-init
    ("model.phantom_checkpoint=/models/phantom.pth", "model.init"),
    ("reward.vlm.path=/models/identity_reward", "reward.vlm.init"),
    ("reward.vlm.base_path=/models/Qwen2.5-VL-3B-Instruct", "reward.vlm.init"),
    ("reward.face.model_path=/models/arcface/w600k_r50.onnx", "reward.face.backend"),
])
def test_a_key_the_mode_ignores_is_an_error_naming_both(root, override, mode_key):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"local_cpu.yaml.*'{key}' is set .* but '{mode_key}' is .*would be ignored"):
        load_config(root / "cluster_configs" / "local_cpu.yaml", ["trainer.output_dir=x", override])
    # a preset made random-init together with its paths cleared loads (what rehearsals and memory plans do)
    from config.checks import RANDOM_POLICY, RANDOM_REWARD_MODEL

    cfg = load_config(root / "cluster_configs" / "vace_1.3b_8gpu.yaml",
                      ["trainer.output_dir=x", *RANDOM_POLICY, *RANDOM_REWARD_MODEL])
    assert cfg.model.init == cfg.reward.vlm.init == "random" and cfg.model.path is None


def test_reward_trainer_refuses_a_path_its_random_init_ignores(tmp_path):
    from reward.train_config import load_reward_config

    with pytest.raises(ConfigError, match="'model.path' is set .* but 'model.init' is 'random'"):
        load_reward_config(None, ["data.preference_shards=x", f"trainer.output_dir={tmp_path}", "model.init=random",
                                  "model.arch=tiny", "model.path=/models/Qwen2.5-VL-3B-Instruct"])
