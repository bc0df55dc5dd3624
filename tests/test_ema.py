"""The EMA of the trainable weights against a hand computation and the official loop's call pattern."""

import pytest
import torch

from policy.ema import Ema


def test_decay_warm_up_and_interval():
    ema = Ema([("w", torch.zeros(1))], decay=0.9, update_interval=8)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(7) == pytest.approx(8 / 17)
    assert ema.decay_at(1000) == 0.9  # (1 + n) / (10 + n) passes 0.9 at n = 80
    assert [n for n in range(1, 40) if ema.due(n)] == [7, 15, 23, 31, 39]


def test_update_is_the_hand_computed_average():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = Ema([("w", w)], decay=0.9, update_interval=1, repeats=2)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 0.0]))
    assert ema.step([("w", w)], 5)
    d = 6 / 15  # min((1 + 5) / (10 + 5), 0.9)
    once = torch.tensor([1.0, -2.0]) + (1 - d) * (torch.tensor([3.0, 0.0]) - torch.tensor([1.0, -2.0]))
    twice = once + (1 - d) * (torch.tensor([3.0, 0.0]) - once)
    torch.testing.assert_close(ema.shadow["w"], twice)


def test_repeats_reproduce_the_official_per_micro_batch_calls():
    """Official loop: 8 micro-batches per epoch, an optimizer step after the 4th and the 8th, and
    `ema.step(params, global_step)` after every micro-batch. Ours: one call per optimizer step, repeats=4."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=gen)
    official, ours = w.clone(), Ema([("w", w)], decay=0.9, update_interval=8, repeats=4)
    global_step = 0
    for _epoch in range(30):
        for batch in range(8):
            if batch in (3, 7):  # the accumulation boundary: the optimizer steps, the counter moves
                w = w + 0.1 * torch.randn(5, generator=gen)
                global_step += 1
                ours.step([("w", w)], global_step)
            if (global_step + 1) % 8 == 0:  # official EMAModuleWrapper.step, called once per micro-batch
                decay = min((1 + global_step) / (10 + global_step), 0.9)
                official = official + (1 - decay) * (w - official)
    assert ours.num_updates == 7  # counters 7, 15, ..., 55 of 60 optimizer steps
    torch.testing.assert_close(ours.shadow["w"], official, rtol=1e-6, atol=1e-6)


def test_swapped_in_restores_and_state_round_trip():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = Ema([("w", w)], decay=0.5, update_interval=1)
    with torch.no_grad():
        w.add_(2.0)
    ema.step([("w", w)], 100)  # decay 0.5: shadow = (1 + 3) / 2, (2 + 4) / 2
    with ema.swapped_in([("w", w)]):
        assert w.tolist() == [2.0, 3.0] and w.dtype == torch.bfloat16
    assert w.tolist() == [3.0, 4.0]
    other = Ema([("w", w)], decay=0.5, update_interval=1)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.num_updates == 1
    with pytest.raises(ValueError, match="do(es)? not match"):
        Ema([("v", w)]).load_state_dict(ema.state_dict())
