import math

import pytest
import torch

from policy.grpo import advantage_stats, group_advantages, grpo_loss, select_timesteps, trained_step_count


@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_closed_form(ddof):
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    adv = group_advantages(r, "group", eps=1e-4, clip=5.0, ddof=ddof)
    for p in range(2):
        expected = (r[p] - r[p].mean()) / (r[p].std(correction=ddof) + 1e-4)
        torch.testing.assert_close(adv.values[p].float(), expected)
    assert adv.mask.all()


def test_default_std_is_the_official_population_std():
    """Official flow_grpo/stat_tracking.py: (r - mean) / (np.std(r) + 1e-4), np.std with ddof 0."""
    r = [1.0, 2.0, 3.0, 6.0]
    mean = sum(r) / 4
    population_std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)  # by hand: sqrt(3.5)
    adv = group_advantages(torch.tensor([r]))
    assert population_std == pytest.approx(math.sqrt(3.5))
    assert adv.values[0].tolist() == pytest.approx([(x - mean) / (population_std + 1e-4) for x in r])


@pytest.mark.parametrize("ddof", [0, 1])
def test_global_std_and_clipping(ddof):
    r = torch.tensor([[0.0, 10.0], [1.0, 1.5]])
    adv = group_advantages(r, "global", eps=0.0, clip=0.5, ddof=ddof)
    centred = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(adv.values.float(), (centred / r.std(correction=ddof)).clamp(-0.5, 0.5))


def test_equal_groups_and_nan_are_masked():
    r = torch.tensor([[2.0, 2.0, 2.0], [1.0, float("nan"), 3.0], [float("nan"), 1.0, float("nan")]])
    adv = group_advantages(r)
    assert not adv.mask[0].any() and torch.equal(adv.values[0], torch.zeros(3, dtype=torch.float64))
    assert adv.mask[1].tolist() == [True, False, True]
    assert adv.values[1, 0] < 0 < adv.values[1, 2] and adv.values[1, 1] == 0
    assert not adv.mask[2].any()  # one valid sample: nothing to compare with
    assert advantage_stats(adv)["trained_frac"] == pytest.approx(2 / 9)


def test_ratio_one_gives_minus_mean_advantage_and_clipping():
    adv = torch.tensor([1.0, -1.0, 2.0])
    lp = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    loss, stats = grpo_loss(lp, torch.zeros(3), adv, clip_range=0.1)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
    # ratio e^0.5 > 1 + c with positive advantage: clipped, no gradient
    lp2 = torch.tensor([0.5], requires_grad=True)
    loss2, stats2 = grpo_loss(lp2, torch.zeros(1), torch.tensor([1.0]), clip_range=0.1)
    loss2.backward()
    assert loss2.item() == pytest.approx(-1.1) and lp2.grad.item() == 0.0 and stats2["clip_frac"] == 1.0
    # with negative advantage the unclipped (larger) term wins and still pushes down
    lp3 = torch.tensor([0.5], requires_grad=True)
    loss3, _ = grpo_loss(lp3, torch.zeros(1), torch.tensor([-1.0]), clip_range=0.1)
    loss3.backward()
    assert loss3.item() == pytest.approx(torch.exp(torch.tensor(0.5)).item()) and lp3.grad.item() > 0


def test_kl_term_and_mask():
    lp = torch.zeros(4)
    kl = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    loss, stats = grpo_loss(lp, lp, torch.zeros(4), 0.1, kl=kl, kl_beta=0.5, mask=mask)
    assert stats["kl"] == pytest.approx(2.0) and loss.item() == pytest.approx(1.0)


def test_ratio_stats_skip_masked_elements():
    lp = torch.log(torch.tensor([0.5, 1.0, 2.0, 50.0]))
    mask = torch.tensor([True, True, True, False])
    _, stats = grpo_loss(lp, torch.zeros(4), torch.ones(4), 0.2, mask=mask)
    assert float(stats["ratio_min"]) == pytest.approx(0.5) and float(stats["ratio_max"]) == pytest.approx(2.0)
    assert float(stats["ratio_mean"]) == pytest.approx(3.5 / 3) and float(stats["clip_frac"]) == pytest.approx(2 / 3)
    assert float(stats["num_trained"]) == 3
    _, none = grpo_loss(lp, torch.zeros(4), torch.ones(4), 0.2, mask=torch.zeros(4, dtype=torch.bool))
    assert float(none["ratio_min"]) == float("inf") and float(none["ratio_max"]) == float("-inf")  # min/max skip it
    assert float(none["clip_frac"]) == 0.0 and float(none["num_trained"]) == 0


def test_select_timesteps():
    g = torch.Generator().manual_seed(0)
    assert select_timesteps(10, 0.3, "fixed", g).tolist() == [0, 1, 2]
    picked = select_timesteps(10, 0.5, "random", g)
    assert len(set(picked.tolist())) == 5 and picked.max() < 10
    assert len(select_timesteps(4, 1.0, "random", g)) == 4


def test_trained_step_count_truncates_as_the_official_code():
    """Official: int(num_steps * timestep_fraction): 0.99 of 25 sampled steps trains the first 24."""
    assert trained_step_count(25, 0.99) == 24
    assert select_timesteps(25, 0.99, "fixed", torch.Generator()).tolist() == list(range(24))
    assert trained_step_count(25, 1.0) == 25 and trained_step_count(10, 0.05) == 1
    assert trained_step_count(4, 0.6) == 2  # round() would give 3
