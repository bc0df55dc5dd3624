"""DiffusionNFT's loss (policy/nft.py) against hand computation and its direction; the config rules around it."""

import pytest
import torch

from config import load_config
from config.checks import ConfigError
from policy.nft import nft_loss, noised, optimality_probability


def test_optimality_probability_maps_clipped_advantages_to_zero_one():
    adv = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    assert optimality_probability(adv, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="adv_clip"):
        optimality_probability(adv, 0.0)


def test_loss_equals_a_hand_computed_case():
    """One element per sample, t = 0.5, x_t = 1, x0 = 0, v_old = 0, v = 1, b = 1, A = 2.5 (A_max 5: r = 0.75).
    v+ = 1: x0+ = 1 - 0.5 = 0.5, w+ = 0.5, fit+ = 0.25 / 0.5 = 0.5. v- = -1: x0- = 1.5, w- = 1.5, fit- = 2.25 / 1.5 =
    1.5. loss = 5 / 1 * (0.75 * 0.5 + 0.25 * 1.5) = 3.75. With b = 0.5: v+ = 0.5 (x0+ = 0.75, fit 0.75), v- = -0.5
    (x0- = 1.25, fit 1.25): loss = 5 / 0.5 * (0.75 * 0.75 + 0.25 * 1.25) = 8.75. KL to v_ref = 0.25: (0.75)^2."""
    one = torch.ones(1, 1)
    v = one.clone().requires_grad_(True)
    loss, stats = nft_loss(v, 0 * one, one, 0 * one, torch.tensor(0.5), torch.tensor([2.5]), 1.0, 5.0)
    assert float(loss.detach()) == pytest.approx(3.75) and float(stats["old_deviation"]) == pytest.approx(1.0)
    loss, _ = nft_loss(v, 0 * one, one, 0 * one, torch.tensor(0.5), torch.tensor([2.5]), 0.5, 5.0)
    assert float(loss.detach()) == pytest.approx(8.75)
    loss, stats = nft_loss(v, 0 * one, one, 0 * one, torch.tensor(0.5), torch.tensor([2.5]), 0.5, 5.0,
                           ref_velocity=0.25 * one, kl_beta=2.0)
    assert float(stats["kl"]) == pytest.approx(0.5625) and float(loss.detach()) == pytest.approx(8.75 + 2 * 0.5625)


def test_gradient_moves_the_clean_prediction_toward_good_samples_and_away_from_bad():
    """From v = v_old, one gradient step on v moves x0(v) = x_t - t v toward a sample with A > 0 and away from one
    with A < 0; A = 0 leaves it (the two fits pull equally); a masked sample does not train."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, generator=generator)
    x_t = noised(x0, torch.randn(4, 2, 3, generator=generator), torch.tensor(0.6))
    v_old = torch.randn(4, 2, 3, generator=generator)
    adv = torch.tensor([3.0, -3.0, 0.0, 3.0])
    mask = torch.tensor([True, True, True, False])
    v = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x_t, x0, torch.tensor(0.6), adv, 1.0, 5.0, mask=mask)
    loss.backward()
    stepped = v_old - 1e-2 * v.grad

    def distance(vel):
        return ((x_t - 0.6 * vel) - x0).pow(2).mean(dim=(1, 2))

    before, after = distance(v_old), distance(stepped)
    assert after[0] < before[0] and after[1] > before[1]
    assert torch.equal(v.grad[2], torch.zeros_like(v.grad[2])) and torch.equal(v.grad[3], torch.zeros_like(v.grad[3]))


def test_shapes_and_beta_are_checked():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        nft_loss(torch.zeros(2, 4), x, x, x, torch.tensor(0.5), torch.zeros(2), 1.0, 5.0)
    with pytest.raises(ValueError, match="nft_beta"):
        nft_loss(x, x, x, x, torch.tensor(0.5), torch.zeros(2), 0.0, 5.0)


def test_config_refuses_what_nft_cannot_do(root):
    preset = root / "cluster_configs" / "local_cpu.yaml"
    base = ["trainer.output_dir=x", "grpo.objective=nft"]
    with pytest.raises(ConfigError, match="'sampler.sde_window.size'"):
        load_config(preset, [*base, "sampler.sde_window.size=1"])
    with pytest.raises(NotImplementedError, match="'trainer.mode' async"):
        load_config(preset, [*base, "trainer.mode=async", "trainer.max_staleness=1"])
    with pytest.raises(NotImplementedError, match="'grpo.nft_old_decay_rate'"):
        load_config(preset, [*base, "grpo.nft_old_decay_rate=0.001"])
    with pytest.raises(ConfigError, match="'sampler.shared_initial_noise' is set but 'grpo.objective' is nft"):
        load_config(preset, [*base, "sampler.shared_initial_noise=true"])
    with pytest.raises(ConfigError, match="grpo.objective"):
        load_config(preset, ["trainer.output_dir=x", "grpo.objective=dpo"])
    assert load_config(preset, [*base, "trainer.mode=async", "trainer.max_staleness=0"]).grpo.objective == "nft"
