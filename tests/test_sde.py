"""The SDE step against closed forms and against diffusers' own scheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from policy.schedule import sampling_schedule
from policy.sde import (NoiseRule, gaussian_log_prob, kl_to_reference, sde_step_with_logprob)

RULES = [NoiseRule("eta", eta=0.7), NoiseRule("linear", std_min=0.1, std_max=0.6)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.kind)
def test_log_prob_equals_torch_normal(rule):
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    out = sde_step_with_logprob(x, v, sigma, sigma_next, rule, generator=torch.Generator().manual_seed(1))
    normal = torch.distributions.Normal(out.mean, out.scale.view(-1, 1, 1, 1, 1))
    expected = normal.log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.log_prob, expected, rtol=0, atol=1e-10)
    # the scale is std * sqrt(-dt), with std from the chosen rule
    s, dt = sigma.double(), (sigma_next - sigma).double()
    std = 0.7 * torch.sqrt(s / (1 - s)) if rule.kind == "eta" else 0.1 + 0.5 * s
    torch.testing.assert_close(out.scale, std * torch.sqrt(-dt))


def test_mean_formula_closed_form():
    x, v = torch.full((1, 2), 2.0), torch.full((1, 2), -1.0)
    s, s_next, eta = 0.5, 0.25, 0.5
    out = sde_step_with_logprob(x, v, s, s_next, NoiseRule("eta", eta=eta), noise=torch.zeros(1, 2))
    std2, dt = eta**2 * s / (1 - s), s_next - s
    mean = 2.0 * (1 + std2 / (2 * s) * dt) + (-1.0) * (1 + std2 * (1 - s) / (2 * s)) * dt
    assert out.mean[0, 0].item() == pytest.approx(mean, abs=1e-12)
    assert out.prev_sample[0, 0].item() == pytest.approx(mean, abs=1e-6)


def test_eta_rule_at_sigma_one_uses_next_value():
    rule = NoiseRule("eta", eta=1.0)
    std = rule.std(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64))
    assert std.item() == pytest.approx(math.sqrt(1.0 / 0.1))


def test_prev_sample_is_scored_not_drawn():
    torch.manual_seed(0)
    x, v, target = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    out = sde_step_with_logprob(x, v, 0.7, 0.5, prev_sample=target)
    assert torch.equal(out.prev_sample, target)
    torch.testing.assert_close(out.log_prob, gaussian_log_prob(target, out.mean, out.scale))


def test_per_generator_noise_is_independent_of_batch():
    x, v = torch.zeros(2, 6), torch.zeros(2, 6)
    both = sde_step_with_logprob(x, v, 0.8, 0.6, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    alone = sde_step_with_logprob(x[:1], v[:1], 0.8, 0.6, generator=[torch.Generator().manual_seed(5)])
    assert torch.equal(both.prev_sample[:1], alone.prev_sample)
    assert not torch.equal(both.prev_sample[0], both.prev_sample[1])


def test_zero_noise_is_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sigmas = sampling_schedule("euler", 6, 3.0).sigmas
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 4)
    ours = x.clone()
    for k, t in enumerate(scheduler.timesteps):
        v = torch.sin(3 * x + k)  # any velocity field, the same for both
        x = scheduler.step(v, t, x, return_dict=False)[0]
        ours = sde_step_with_logprob(ours, torch.sin(3 * ours + k), sigmas[k], sigmas[k + 1],
                                     deterministic=True).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_kl_closed_form_and_zero_for_equal_means():
    mean, ref = torch.randn(2, 10), torch.randn(2, 10)
    scale = torch.tensor([0.3, 0.5])
    kl = kl_to_reference(mean, ref, scale)
    p = torch.distributions.Normal(mean.double(), scale.double().view(-1, 1))
    q = torch.distributions.Normal(ref.double(), scale.double().view(-1, 1))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).mean(1))
    assert torch.equal(kl_to_reference(mean, mean, scale), torch.zeros(2, dtype=torch.float64))


def test_bad_sigmas_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        sde_step_with_logprob(x, x, 0.5, 0.6)
    with pytest.raises(ValueError, match="shape"):
        sde_step_with_logprob(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.1)
    with pytest.raises(ValueError, match="noise_rule"):
        sde_step_with_logprob(x, x, 0.5, 0.4, NoiseRule("cosine"))


def test_unipc_schedule_is_wans_shipped_scheduler():
    """Official Identity-GRPO samples on the Wan pipeline's UniPC flow schedule; diffusers' Wan docs build it
    as UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=...)."""
    from diffusers import UniPCMultistepScheduler

    theirs = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                     num_train_timesteps=1000, flow_shift=3.0)
    theirs.set_timesteps(25)
    ours = sampling_schedule("unipc", 25, 3.0)
    assert torch.equal(ours.sigmas, theirs.sigmas.double()) and torch.equal(ours.timesteps, theirs.timesteps.float())
    assert ours.timesteps[:3].tolist() == [999.0, 986.0, 971.0]  # integer timesteps, as the transformer gets them
    assert ours.sigmas[1].item() == pytest.approx(0.98632, abs=1e-5) and ours.sigmas[-1] == 0
    assert ours.sigmas[-2].item() == pytest.approx(0.11358, abs=1e-5)  # Euler's: 0.0089
    euler = sampling_schedule("euler", 25, 3.0)
    assert euler.sigmas[-2].item() == pytest.approx(0.00893, abs=1e-5)
    assert torch.equal(euler.timesteps, (euler.sigmas[:-1].float() * 1000))
    with pytest.raises(ValueError, match="sampler.schedule"):
        sampling_schedule("ddim", 25, 3.0)


def test_linear_rule_with_schedule_bounds_is_the_official_std():
    """std = sigma_min + (sigma_max - sigma_min) * sigma with sigma_max = sigmas[1], sigma_min = sigmas[-1]
    (official wan_vace_pipeline_with_logprob.py), checked by hand at every step of the 25-step schedule."""
    sigmas = sampling_schedule("unipc", 25, 3.0).sigmas
    rule = NoiseRule("linear", std_min="schedule", std_max="schedule")
    with pytest.raises(ValueError, match="resolved"):
        rule.std(sigmas[:1], sigmas[1:2])
    resolved = rule.resolve(sigmas)
    assert resolved.std_max == sigmas[1].item() and resolved.std_min == 0.0
    for k in range(25):
        expected = 0.0 + (sigmas[1].item() - 0.0) * sigmas[k].item()
        assert resolved.std(sigmas[k:k + 1], sigmas[k + 1:k + 2]).item() == pytest.approx(expected, rel=1e-12)
    assert NoiseRule("linear", std_min=0.1, std_max="schedule").resolve(sigmas).std_min == 0.1
