"""Winner analysis (issue 18): P(best), expected loss and relative uplift from the posterior."""

from __future__ import annotations

import math

import numpy as np
import pytest

from banditd import _core

KEYS = {"p_best", "expected_loss", "uplift_low", "uplift_high", "p_uplift", "p_min_uplift", "reference", "control"}


def binary(n: list[float], s: list[float], seed: int = 1) -> _core.Bandit:
    b = _core.Bandit("binary", "thompson", seed=seed)
    b.add_arms([1.0] * len(n), [1.0] * len(n))
    b.set_stats_many(list(range(len(n))), n, s, s)
    return b


def test_shape_and_p_best_sum() -> None:
    b = binary([1000.0, 1000.0, 1000.0], [100.0, 110.0, 95.0])
    r = b.winner_analysis()
    assert set(r) == KEYS
    for key in KEYS - {"control"}:
        assert len(r[key]) == 3
    assert r["control"] is None
    assert math.isclose(sum(r["p_best"]), 1.0, abs_tol=1e-9)
    assert all(x >= 0.0 for x in r["expected_loss"])
    assert r["reference"] == [1, 0, 1]  # each arm against the best other arm by mean


def test_clearly_better_arm() -> None:
    b = binary([998.0, 998.0, 998.0], [299.0, 99.0, 99.0])  # Beta(300, 700) vs Beta(100, 900)
    r = b.winner_analysis(draws=20000, control=1)
    assert r["control"] == 1
    assert r["p_best"][0] > 0.999
    assert r["uplift_low"][0] > 0.0
    assert r["p_uplift"][0] > 0.999
    assert math.isnan(r["uplift_low"][1]) and r["reference"][1] is None


def test_uplift_interval_covers_the_truth() -> None:
    trials, rates = 20000, (0.10, 0.12)
    covered = 0
    for seed in range(20):
        gen = np.random.default_rng(seed)
        s = [float(gen.binomial(trials, p)) for p in rates]
        r = binary([float(trials)] * 2, s, seed=seed).winner_analysis(draws=20000, control=0)
        covered += r["uplift_low"][1] <= 0.2 <= r["uplift_high"][1]
    assert covered >= 18


def test_invalid_inputs() -> None:
    b = binary([100.0, 100.0], [10.0, 12.0])
    for kwargs in ({"control": 2}, {"draws": 10}, {"draws": 2_000_000}):
        with pytest.raises(ValueError):
            b.winner_analysis(**kwargs)
    b.set_active(1, False)
    with pytest.raises(ValueError):
        b.winner_analysis()


def test_continuous() -> None:
    b = _core.Bandit("continuous", "thompson", seed=3)
    b.add_arms([0.0, 0.0], [1.0, 1.0])
    # Means 10 and 11, sd 2, 400 observations each.
    b.set_stats_many([0, 1], [400.0, 400.0], [4000.0, 4400.0], [400.0 * 104.0, 400.0 * 125.0])
    r = b.winner_analysis(draws=20000, control=0)
    assert r["p_best"][1] > 0.99
    assert 0.0 < r["uplift_low"][1] < 0.1 < r["uplift_high"][1]


def test_min_uplift_probability_and_level() -> None:
    """p_min_uplift is P(theta_a / theta_ref - 1 >= m): 1 at m far below, falls as m grows, and
    equals p_uplift at m = 0; the interval at a lower level is inside the 95% one."""
    b = binary([2000.0, 2000.0], [200.0, 260.0])  # rates 0.10 and 0.13: uplift ~ +30%
    wide = b.winner_analysis(20_000, control=0)
    zero = b.winner_analysis(20_000, control=0, min_uplift=0.0)
    assert zero["p_min_uplift"][1] == pytest.approx(zero["p_uplift"][1], abs=1e-9)
    probs = [b.winner_analysis(20_000, control=0, min_uplift=m)["p_min_uplift"][1] for m in (-0.5, 0.1, 0.3, 0.6)]
    assert probs[0] == 1.0 and probs[0] > probs[1] > probs[2] > probs[3]
    assert 0.3 < probs[2] < 0.7  # the truth is near the middle of the posterior
    narrow = b.winner_analysis(20_000, control=0, level=0.5)
    assert wide["uplift_low"][1] < narrow["uplift_low"][1] < narrow["uplift_high"][1] < wide["uplift_high"][1]
    for bad in ({"level": 1.0}, {"level": 0.0}, {"min_uplift": -1.0}, {"min_uplift": float("nan")}):
        with pytest.raises(_core.CoreError):
            b.winner_analysis(1_000, control=0, **bad)
