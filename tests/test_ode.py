"""The ODE steps outside the SDE window (policy/ode.py): which grid points they visit, DPM-Solver++(2M) against
diffusers' scheduler and against the exact flow, and what the sampler and learner make of a compressed run."""

import math

import pytest
import torch

from config import load_config
from config.checks import ConfigError
from policy.ode import OdeSolver, compressed_stretch, data_prediction, dpm2m_step
from policy.sampler import sample_group, score_step
from policy.schedule import sampling_schedule
from policy.sde import NoiseRule
from tests.test_window import policy  # noqa: F401  (the tiny T2V policy fixture)

PROMPT = "two people talk in a sunny park"


def test_visited_points_keep_the_window_and_both_ends_of_every_stretch():
    half, flash = OdeSolver("dpm2m", 0.5), OdeSolver("dpm2m", 0.4)
    assert flash.visited(10, [0, 1]) == [0, 1, 2, 4, 6, 8, 10]  # tail of 8 steps: ceil(3.2) = 4
    assert half.visited(10, [4, 5]) == [0, 2, 4, 5, 6, 8, 10]  # before (4 -> 2) and after (4 -> 2) alike
    assert half.visited(10, [8, 9]) == [0, 2, 4, 6, 8, 9, 10]
    assert OdeSolver("dpm2m", 1.0).visited(10, [3]) == list(range(11))
    assert half.visited(4, list(range(4))) == half.visited(4, None) == [0, 1, 2, 3, 4]  # all SDE: nothing to skip
    assert half.visited(6, []) == [0, 2, 4, 6]  # deterministic: one stretch
    assert OdeSolver("dpm2m", 0.01).visited(6, [2]) == [0, 2, 3, 6]  # at least one step per stretch
    assert compressed_stretch(3, 10, 0.5) == [3, 5, 7, 8, 10]  # 7 steps -> ceil(3.5) = 4, as even as the grid allows


def test_config_keys_are_checked(root):
    preset = root / "cluster_configs" / "local_cpu.yaml"
    for bad, key in (("sampler.ode_steps_ratio=1.5", "ode_steps_ratio"), ("sampler.ode_solver=rk4", "ode_solver"),
                     ("sampler.ode_steps_ratio=0", "ode_steps_ratio")):
        with pytest.raises(ConfigError, match=key):
            load_config(preset, ["trainer.output_dir=x", bad])
    cfg = load_config(preset, ["trainer.output_dir=x"])
    assert OdeSolver.from_config(cfg.sampler) == OdeSolver("euler", 1.0)  # the official sampler unless asked


def gaussian_flow(mu: torch.Tensor, c: float):
    """Data x0 ~ N(mu, c^2) per element: the exact velocity of x_s = (1 - s) x0 + s eps, and the exact ODE map
    from s = 1 (x_1 = eps): x_s = (1 - s) mu + sd(s) x_1 with sd(s) = sqrt((1 - s)^2 c^2 + s^2)."""
    def sd(s):
        return math.sqrt((1 - s) ** 2 * c * c + s * s)

    def velocity(x, s):
        return -mu + (s - (1 - s) * c * c) / sd(s) ** 2 * (x - (1 - s) * mu)

    def exact(x1, s):
        return (1 - s) * mu + sd(s) * x1

    return velocity, exact


def test_dpm2m_matches_diffusers_scheduler_on_the_same_sigmas():
    from diffusers import DPMSolverMultistepScheduler

    generator = torch.Generator().manual_seed(0)
    mu, x = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    velocity, _ = gaussian_flow(mu.double(), 0.5)
    for steps in (6, 20):
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                                final_sigmas_type="zero", solver_order=2)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.double().tolist()
        ours, theirs, history = x.clone(), x.clone(), None
        for k, t in enumerate(scheduler.timesteps):
            v = velocity(ours.double(), sigmas[k]).float()
            theirs = scheduler.step(velocity(theirs.double(), sigmas[k]).float(), t, theirs).prev_sample
            ours, x0 = dpm2m_step(ours, v, sigmas[k], sigmas[k + 1], history)
            history = (x0, sigmas[k])
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_dpm2m_is_second_order_where_euler_is_first():
    """On a flow with a known solution, from s = 1 to s = 0.14 on a shifted uniform grid: DPM-Solver++(2M) lands
    far closer than Euler on the same steps, and doubling the steps shrinks its error ~4x (order 2) where Euler's
    shrinks ~2x (order 1)."""
    generator = torch.Generator().manual_seed(1)
    mu, x1 = torch.randn(64, generator=generator).double(), torch.randn(64, generator=generator).double()
    velocity, exact = gaussian_flow(mu, 0.3)

    def error(kind, steps):
        sigmas = [3 * t / (1 + 2 * t) for t in torch.linspace(1, 0.05, steps + 1).double().tolist()]  # shift 3
        x, history = x1.clone(), None
        for k in range(steps):
            v = velocity(x, sigmas[k])
            if kind == "euler":
                x = x + v * (sigmas[k + 1] - sigmas[k])
            else:
                x, x0 = dpm2m_step(x, v, sigmas[k], sigmas[k + 1], history)
                history = (x0, sigmas[k])
        return float((x - exact(x1, sigmas[-1])).abs().max())

    euler, dpm = [error("euler", n) for n in (8, 16, 32)], [error("dpm2m", n) for n in (8, 16, 32)]
    assert dpm[0] < euler[0] / 2 and dpm[1] < euler[1] / 10
    assert euler[1] / euler[2] < 2.5 and dpm[1] / dpm[2] > 3.5


def test_data_prediction_of_a_step_from_sigma_one_is_the_euler_step():
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    step, x0 = dpm2m_step(x, v, 1.0, 0.7)
    torch.testing.assert_close(step.double(), (x + v * (0.7 - 1.0)).double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x0, data_prediction(x, v, 1.0))
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        dpm2m_step(x, v, 0.5, 0.5)


def test_compressed_dpm2m_rollout_keeps_the_window_exact(policy):  # noqa: F811
    """Window at the start: the window's latents and log-probs are those of the Euler run, bit for bit; the tail
    visits fewer grid points, each step the solver's own from the stored states; the learner's recompute of the
    window's steps equals the recorded log-probs (first ratio 1)."""
    policy, cfg = policy
    rule, schedule = NoiseRule.from_config(cfg.sampler), sampling_schedule("unipc", 8, cfg.sampler.shift)
    cond = policy.encode_condition(PROMPT, [])
    euler = sample_group(policy, cond, [1, 2], rule, schedule, decode=False, sde_steps=[0, 1])
    fast = sample_group(policy, cond, [1, 2], rule, schedule, decode=False, sde_steps=[0, 1],
                        ode=OdeSolver("dpm2m", 0.5))
    assert fast.grid_points == [0, 1, 2, 4, 6, 8] and euler.grid_points is None
    assert fast.num_steps == 5 and fast.trainable_steps == [0, 1] and fast.ode_solver == "dpm2m"
    assert torch.equal(fast.sigmas, schedule.sigmas[[0, 1, 2, 4, 6, 8]])
    assert torch.equal(fast.timesteps, schedule.timesteps[[0, 1, 2, 4, 6]])
    assert torch.equal(fast.latents[:, :3], euler.latents[:, :3])
    assert torch.equal(fast.log_probs[:, :2], euler.log_probs[:, :2]) and torch.isnan(fast.log_probs[:, 2:]).all()
    for k in fast.trainable_steps:
        assert torch.equal(score_step(policy, fast, k).log_prob, fast.log_probs[:, k])
    with torch.no_grad():
        def v_at(j):
            return policy.velocity(fast.latents[:, j], fast.timesteps[j].expand(2), cond)

        sig = fast.sigmas.tolist()
        history = (data_prediction(fast.latents[:, 1], v_at(1), sig[1]), sig[1])  # carried across the window
        for j in range(2, 5):
            x_next, x0 = dpm2m_step(fast.latents[:, j], v_at(j), sig[j], sig[j + 1], history)
            assert torch.equal(x_next, fast.latents[:, j + 1])
            history = (x0, sig[j])
    assert (fast.latents[:, -1] - euler.latents[:, -1]).abs().max() < 0.5 * euler.latents[:, -1].abs().max()


def test_a_window_in_the_middle_is_scored_where_it_was_sampled(policy):  # noqa: F811
    policy, cfg = policy
    rule, schedule = NoiseRule.from_config(cfg.sampler), sampling_schedule("unipc", 8, cfg.sampler.shift)
    cond = policy.encode_condition(PROMPT, [])
    traj = sample_group(policy, cond, [3, 4], rule, schedule, decode=False, sde_steps=[4, 5],
                        ode=OdeSolver("euler", 0.5))
    assert traj.grid_points == [0, 2, 4, 5, 6, 8] and traj.trainable_steps == [2, 3]
    assert torch.equal(traj.sigmas[2:4], schedule.sigmas[4:6])
    assert torch.isfinite(traj.log_probs[:, [2, 3]]).all() and torch.isnan(traj.log_probs[:, [0, 1, 4]]).all()
    for k in traj.trainable_steps:
        assert torch.equal(score_step(policy, traj, k).log_prob, traj.log_probs[:, k])
