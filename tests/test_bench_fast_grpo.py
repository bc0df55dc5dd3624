"""bench/fast_grpo.py's arithmetic on made-up runs: the cost to reach the reference's last-quarter reward, the
ratios, the summary line, and which variant is best."""

import pytest

from bench import fast_grpo


def records(rewards, passes, step_s):
    return [{"step": i + 1, "reward_mean": r, "passes": passes, "step_s": step_s, "rollout_nfe": passes,
             "learn_passes": 0} for i, r in enumerate(rewards)]


def test_compare_counts_the_cost_to_the_reference_last_quarter():
    full = records([0.1 * i for i in range(8)], passes=10, step_s=2.0)  # last quarter: 0.6, 0.7 -> target 0.65
    fast = records([0.2 * i for i in range(8)], passes=4, step_s=1.0)
    row = fast_grpo.compare(full, fast, smooth=2)
    assert row["target"] == pytest.approx(0.65)
    # full: trailing mean of 2 >= 0.65 first at step 8 (0.6, 0.7): 80 passes, 16 s; fast: at step 5 (0.6, 0.8)
    assert row["full"] == {"step": 8, "passes": 80, "seconds": 16.0}
    assert row["variant"] == {"step": 5, "passes": 20, "seconds": 5.0}
    assert row["passes_ratio"] == pytest.approx(0.25) and row["time_ratio"] == pytest.approx(5 / 16)
    assert row["final_reward_delta"] == pytest.approx((1.2 + 1.4) / 2 - 0.65)
    never = fast_grpo.compare(full, records([0.0] * 8, passes=4, step_s=1.0), smooth=2)
    assert never["variant"] is None and never["time_ratio"] == float("inf")


def test_summary_line_takes_medians():
    rows = [{"passes_ratio": p, "time_ratio": t, "final_reward_delta": d}
            for p, t, d in ((0.2, 0.3, 0.01), (0.4, float("inf"), -0.02), (0.3, 0.5, 0.03))]
    assert fast_grpo.summary_line("nft", rows) == \
        "nft passes_ratio=0.300 time_ratio=0.500 final_reward_delta=+0.0100 seeds=3"


def test_best_variant_breaks_ties_by_final_reward(capsys, monkeypatch, tmp_path):
    """With every variant short of the target (all ratios inf), the best is the one ending highest."""
    def fake_run(out, seed, steps, overrides, reuse=False):
        top = 0.5 if not overrides else (0.45 if "grpo.objective=nft" in overrides else 0.40)
        return records([top * i / 7 for i in range(8)], passes=4, step_s=1.0)

    monkeypatch.setattr(fast_grpo, "run_variant", fake_run)
    fast_grpo.main(["--seeds", "0", "--steps", "8", "--smooth", "2", "--variants", "window", "nft",
                    "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fast_grpo: best=nft passes_ratio=inf") and last.endswith("(every variant ends below full)")
