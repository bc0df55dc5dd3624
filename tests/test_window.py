"""The SDE window (policy/window.py): which steps are stochastic as training goes on, and what the sampler and
the learner do with them."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from config import load_config
from config.schema import SdeWindowConfig
from policy.models import build_components
from policy.policy import WanPolicy
from policy.sampler import sample_group, score_step
from policy.schedule import sampling_schedule
from policy.sde import NoiseRule
from policy.window import sde_steps, window_size
from workers.update_plan import trained_timesteps, transformer_passes

PROMPT = "two people talk in a sunny park"


def window(**kw):
    return OmegaConf.structured(SdeWindowConfig(**kw))


def test_size_zero_or_whole_is_every_step():
    for cfg in (window(), window(size=10), window(size=12, strategy="random")):
        assert all(sde_steps(cfg, 10, t) == list(range(10)) for t in (1, 7, 500))
        assert window_size(cfg, 10) == 10


def test_progressive_slides_then_stays_or_rolls_back():
    """10 steps, window 3 from step 1, moving by its size every 2 training steps: positions 1, 4, 7 (the last
    that fits), then 7 for good, or with roll_back 1 again."""
    stay = window(size=3, start=1, shift_every=2)
    starts = [sde_steps(stay, 10, t)[0] for t in range(1, 11)]
    assert starts == [1, 1, 4, 4, 7, 7, 7, 7, 7, 7]
    assert sde_steps(stay, 10, 5) == [7, 8, 9]  # the whole window stays inside the trajectory
    back = window(size=3, start=1, shift_every=2, roll_back=True)
    assert [sde_steps(back, 10, t)[0] for t in range(1, 11)] == [1, 1, 4, 4, 7, 7, 1, 1, 4, 4]
    overlap = window(size=4, shift_every=1, stride=1)  # MixGRPO's prog_overlap with prog_overlap_step 1
    assert [sde_steps(overlap, 6, t) for t in (1, 2, 3, 4)] == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [2, 3, 4, 5]]


def test_random_and_fixed_are_functions_of_the_step():
    cfg = window(size=2, strategy="random")
    draws = [sde_steps(cfg, 8, t, seed=3)[0] for t in range(1, 41)]
    assert draws == [sde_steps(cfg, 8, t, seed=3)[0] for t in range(1, 41)]  # a resumed run sees the same windows
    assert set(draws) == set(range(7))  # every position 0..6 comes up
    assert draws != [sde_steps(cfg, 8, t, seed=4)[0] for t in range(1, 41)]
    assert all(sde_steps(window(size=2, start=5, strategy="fixed"), 8, t) == [5, 6] for t in (1, 100))


def test_config_refuses_a_window_that_does_not_fit(root):
    from config import ConfigError

    preset = root / "cluster_configs" / "local_cpu.yaml"
    with pytest.raises(ConfigError, match="'sampler.sde_window.start' \\(3\\) leaves no room"):
        load_config(preset, ["trainer.output_dir=x", "sampler.num_steps=4", "sampler.sde_window.size=2",
                             "sampler.sde_window.start=3"])
    with pytest.raises(ConfigError, match="'sampler.sde_window.strategy'"):
        load_config(preset, ["trainer.output_dir=x", "sampler.sde_window.strategy=decay"])


@pytest.fixture(scope="module")
def policy(root):
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", ["trainer.output_dir=x", "model.kind=t2v"])
    torch.manual_seed(0)
    return WanPolicy(build_components(cfg.model), cfg.model, cfg.sampler), cfg


def test_sampler_is_stochastic_only_inside_the_window(policy):
    policy, cfg = policy
    rule, schedule = NoiseRule.from_config(cfg.sampler), sampling_schedule("euler", 4, cfg.sampler.shift)
    cond = policy.encode_condition(PROMPT, [])
    full = sample_group(policy, cond, [1, 2], rule, schedule, decode=False)
    listed = sample_group(policy, cond, [1, 2], rule, schedule, decode=False, sde_steps=[0, 1, 2, 3])
    assert torch.equal(full.latents, listed.latents) and torch.equal(full.log_probs, listed.log_probs)  # bit for bit
    traj = sample_group(policy, cond, [1, 2], rule, schedule, decode=False, sde_steps=[1, 2])
    assert traj.trainable_steps == [1, 2] and full.trainable_steps == [0, 1, 2, 3]
    assert torch.isnan(traj.log_probs[:, [0, 3]]).all() and torch.isfinite(traj.log_probs[:, [1, 2]]).all()
    assert not torch.equal(traj.latents[:, 1], full.latents[:, 1])  # step 0 took the ODE, not the SDE
    sigmas, resolved = schedule.sigmas.double(), rule.resolve(schedule.sigmas)
    with torch.no_grad():
        for k in range(4):
            x, x_next = traj.latents[:, k].double(), traj.latents[:, k + 1].double()
            v = policy.velocity(traj.latents[:, k], schedule.timesteps[k].expand(2), cond).double()
            s, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
            if k in (0, 3):  # outside the window: the Euler ODE step, no noise
                torch.testing.assert_close(x_next, (x + v * dt).float().double(), rtol=0, atol=1e-6)
                continue
            # inside: Flow-GRPO's SDE step; the recorded log-prob is the closed-form Gaussian's at the sample
            std = resolved.std(s.expand(2), sigmas[k + 1].expand(2)).view(2, 1, 1, 1, 1)
            mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
            scale = std * torch.sqrt(-dt)
            closed = (-((x_next - mean) ** 2) / (2 * scale**2) - torch.log(scale)
                      - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3, 4))
            torch.testing.assert_close(closed, traj.log_probs[:, k], rtol=1e-9, atol=1e-9)
            assert torch.equal(score_step(policy, traj, k).log_prob, traj.log_probs[:, k])  # what the learner sees


def test_learner_counts_and_passes_follow_the_window(root):
    preset = root / "cluster_configs" / "local_cpu.yaml"
    base = ["trainer.output_dir=x", "sampler.num_steps=8", "grpo.timestep_fraction=0.5", "grpo.kl_beta=0.01"]
    full, win = load_config(preset, base), load_config(preset, [*base, "sampler.sde_window.size=2"])
    assert (trained_timesteps(full), trained_timesteps(win)) == (4, 1)  # 0.5 of 8 steps; 0.5 of the window's 2
    epochs = full.grpo.num_inner_epochs
    assert transformer_passes(full) == {"rollout_nfe": 16, "learn_passes": 4 * epochs * 2 * 2}
    assert transformer_passes(win) == {"rollout_nfe": 16, "learn_passes": 1 * epochs * 2 * 2}
    assert math.isclose(transformer_passes(win)["learn_passes"] / transformer_passes(full)["learn_passes"], 0.25)
