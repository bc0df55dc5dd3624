"""Pairwise preference losses (reward/losses.py) against hand-computed values; stability; accuracy."""

import math

import pytest
import torch

from reward.losses import (bradley_terry_loss, bt_log_probs, label_indices, label_probability, pairwise_accuracy,
                           predict, preference_loss, rao_kupper_log_probs, rao_kupper_loss, tie_threshold)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_rao_kupper_hand_computed():
    # r_a = r_b, theta = 5: P(A) = P(B) = 1 / (1 + 5) = 1/6, P(tie) = 24 / 36 = 2/3.
    p = rao_kupper_log_probs(t(0.0), t(0.0), 5.0).exp()[0]
    torch.testing.assert_close(p, t(1 / 6, 1 / 6, 2 / 3))
    # r_a = 1, r_b = 0, theta = 5: P(A) = e / (e + 5), P(B) = 1 / (1 + 5e), P(tie) = 24e / ((e + 5)(5e + 1)).
    e = math.e
    p = rao_kupper_log_probs(t(1.0), t(0.0), 5.0).exp()[0]
    torch.testing.assert_close(p, t(e / (e + 5), 1 / (1 + 5 * e), 24 * e / ((e + 5) * (5 * e + 1))))
    torch.testing.assert_close(p, t(0.352187, 0.068533, 0.579279), atol=1e-6, rtol=0)
    # the loss is the mean NLL of the observed labels: -log P(A), -log P(B), -log P(tie) = 1.043592, 2.680433, 0.545971
    r_a, r_b = t(1.0, 1.0, 1.0), t(0.0, 0.0, 0.0)
    assert rao_kupper_loss(r_a, r_b, torch.tensor([0, 1, 2]), 5.0).item() == pytest.approx(
        (1.043592 + 2.680433 + 0.545971) / 3, abs=1e-6)
    assert rao_kupper_loss(t(-0.5), t(1.5), torch.tensor([1]), 2.0).item() == pytest.approx(0.239545, abs=1e-6)


def test_bradley_terry_hand_computed():
    # P(A > B) = sigmoid(1) = 0.731059; NLL(a) = log(1 + e^-1) = 0.313262, NLL(b) = log(1 + e) = 1.313262.
    p = bt_log_probs(t(1.0), t(0.0)).exp()[0]
    torch.testing.assert_close(p, t(0.7310586, 1 - 0.7310586), atol=1e-7, rtol=0)
    assert bradley_terry_loss(t(1.0), t(0.0), torch.tensor([0])).item() == pytest.approx(0.313262, abs=1e-6)
    assert bradley_terry_loss(t(1.0), t(0.0), torch.tensor([1])).item() == pytest.approx(1.313262, abs=1e-6)
    # a tie is the soft target (1/2, 1/2): mean of the two NLLs
    assert bradley_terry_loss(t(1.0), t(0.0), torch.tensor([2])).item() == pytest.approx(0.813262, abs=1e-6)
    loss = preference_loss("bradley_terry", t(1.0), t(0.0), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    # VideoAlign's "bt": a tie has zero loss but still counts in the mean: (0.313262 + 0) / 2
    ignored = bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0), torch.tensor([0, 2]), ties="ignore")
    assert ignored.item() == pytest.approx(0.313262 / 2, abs=1e-6)
    with pytest.raises(ValueError, match="tie rule"):
        bradley_terry_loss(t(1.0), t(0.0), torch.tensor([2]), ties="drop")


def test_rao_kupper_is_the_official_btt_loss():
    """VideoAlign / Identity-GRPO `loss_type="btt"` (k = 5), by hand: a win costs -logsigmoid(d - ln 5), a tie
    -logsigmoid(d - ln 5) - logsigmoid(-d - ln 5) - ln 24, d = r_chosen - r_rejected."""
    def logsigmoid(x):
        return -math.log1p(math.exp(-x))

    d = 0.7
    win = -logsigmoid(d - math.log(5))
    tie = -logsigmoid(d - math.log(5)) - logsigmoid(-d - math.log(5)) - math.log(24)
    assert rao_kupper_loss(t(d), t(0.0), torch.tensor([0]), 5.0).item() == pytest.approx(win, abs=1e-6)
    assert rao_kupper_loss(t(0.0), t(d), torch.tensor([1]), 5.0).item() == pytest.approx(win, abs=1e-6)
    assert rao_kupper_loss(t(d), t(0.0), torch.tensor([2]), 5.0).item() == pytest.approx(tie, abs=1e-6)


@pytest.mark.parametrize("theta", [1.01, 2.0, 5.0, 50.0])
def test_probabilities_sum_to_one(theta):
    g = torch.Generator().manual_seed(0)
    r_a = torch.randn(200, generator=g, dtype=torch.float64) * 10
    r_b = torch.randn(200, generator=g, dtype=torch.float64) * 10
    p = rao_kupper_log_probs(r_a, r_b, theta).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(200, dtype=torch.float64))
    assert (p >= 0).all()
    # swapping A and B swaps the two win probabilities and keeps the tie probability
    q = rao_kupper_log_probs(r_b, r_a, theta).exp()
    torch.testing.assert_close(q, p[:, [1, 0, 2]])
    torch.testing.assert_close(bt_log_probs(r_a, r_b).exp().sum(-1), torch.ones(200, dtype=torch.float64))


@pytest.mark.parametrize("gap", [50.0, 200.0, 1e4])
def test_finite_loss_and_gradients_for_large_gaps(gap):
    for dtype in (torch.float32, torch.float64):
        r_a = torch.tensor([gap, -gap, gap, 0.0], dtype=dtype, requires_grad=True)
        r_b = torch.tensor([-gap, gap, -gap, 0.0], dtype=dtype, requires_grad=True)
        labels = torch.tensor([0, 0, 2, 2])  # right, badly wrong, a tie far apart, a tie at d = 0
        for loss in (rao_kupper_loss(r_a, r_b, labels, 5.0), bradley_terry_loss(r_a, r_b, labels)):
            (ga, gb) = torch.autograd.grad(loss, (r_a, r_b))
            assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
            assert ga[1] < 0  # the wrong pair is pushed the right way


def test_gradient_matches_autograd_of_naive_formula():
    r_a = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    r_b = torch.tensor([0.1, 0.4, -0.7], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    theta = 5.0
    ea, eb = r_a.exp(), r_b.exp()
    naive = torch.stack([ea / (ea + theta * eb), eb / (eb + theta * ea),
                         (theta ** 2 - 1) * ea * eb / ((ea + theta * eb) * (theta * ea + eb))], -1)
    naive_loss = -naive.gather(1, labels.view(-1, 1)).log().mean()
    (g_naive,) = torch.autograd.grad(naive_loss, r_a)
    (g,) = torch.autograd.grad(rao_kupper_loss(r_a, r_b, labels, theta), r_a)
    torch.testing.assert_close(g, g_naive)


def test_tie_threshold_is_where_tie_is_argmax():
    theta = 5.0
    tau = tie_threshold(theta)
    assert tau == pytest.approx(math.log(4.6))  # log((25 - 2) / 5)
    d = torch.linspace(-4, 4, 801, dtype=torch.float64)
    p = rao_kupper_log_probs(d, torch.zeros_like(d), theta).exp()
    argmax_tie = p.argmax(-1) == 2
    assert torch.equal(argmax_tie, d.abs() <= tau + 1e-12)
    assert tie_threshold(1.5) == 0.0 and tie_threshold(2.0) == 0.0
    with pytest.raises(ValueError, match="tie_theta"):
        tie_threshold(1.0)


def test_pairwise_accuracy_with_and_without_ties():
    r_a = t(3.0, 0.5, -2.0, 0.2, 4.0, 0.0)
    r_b = t(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    labels = label_indices(["a", "a", "a", "tie", "b", "b"])
    acc = pairwise_accuracy(r_a, r_b, labels, theta=5.0)  # tau = 1.526
    # without ties: decisive pairs 0,1,2,4,5 -> right, right, wrong, wrong, d == 0 half -> 2.5 / 5
    assert acc["accuracy_without_ties"] == pytest.approx(0.5) and acc["num_without_ties"] == 5
    # with ties: predictions a, tie, b, tie, a, tie vs a, a, a, tie, b, b -> right: 0 and 3 -> 2 / 6
    assert predict(r_a, r_b, acc["tie_threshold"]).tolist() == [0, 2, 1, 2, 0, 2]
    assert acc["accuracy_with_ties"] == pytest.approx(2 / 6) and acc["num_pairs"] == 6
    assert pairwise_accuracy(r_a, r_b, labels, threshold=0.0)["accuracy_with_ties"] == pytest.approx(2 / 6)


def test_label_probability_and_errors():
    p = label_probability(t(1.0, 1.0), t(0.0, 0.0), torch.tensor([0, 2]), 5.0)
    torch.testing.assert_close(p, t(0.352187, 0.579279), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="'maybe'"):
        label_indices(["a", "maybe"])
    with pytest.raises(ValueError, match="same shape"):
        rao_kupper_loss(t(1.0, 2.0), t(0.0), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss("hinge", t(1.0), t(0.0), torch.tensor([0]))
