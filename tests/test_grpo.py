import pytest
import torch

from policy.grpo import advantage_stats, group_advantages, grpo_loss, select_timesteps


def test_group_advantages_closed_form():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    adv = group_advantages(r, "group", eps=1e-4, clip=5.0)
    for p in range(2):
        expected = (r[p] - r[p].mean()) / (r[p].std() + 1e-4)
        torch.testing.assert_close(adv.values[p].float(), expected)
    assert adv.mask.all()


def test_global_std_and_clipping():
    r = torch.tensor([[0.0, 10.0], [1.0, 1.5]])
    adv = group_advantages(r, "global", eps=0.0, clip=0.5)
    centred = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(adv.values.float(), (centred / r.std()).clamp(-0.5, 0.5))


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
