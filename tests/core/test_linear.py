"""Property tests of the contextual core (`banditd._core.Linear`): the encoder against a
reference encoding, rank-1 updates against a refit, refused input changing nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditd import _core

NUMERIC = [("age", 40.0, 10.0), ("spend", 5.0, 2.5)]
CATEGORICAL = [("segment", ["young", "mid", "old"]), ("device", ["ios", "android"])]
NAMES = ["(intercept)", "age", "spend", "segment=young", "segment=mid", "segment=old", "segment=<other>",
         "device=ios", "device=android", "device=<other>"]  # fmt: skip

values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.integers(-10**6, 10**6),
    st.sampled_from(["young", "mid", "old", "ios", "android", "other", ""]),
)
contexts = st.dictionaries(st.sampled_from(["age", "spend", "segment", "device", "unknown"]), values, max_size=5)


def reference(ctx: dict[str, object]) -> tuple[list[float], int, int]:
    x = [1.0] + [0.0] * (len(NAMES) - 1)
    unknown = mismatched = 0
    for k, v in ctx.items():
        num = isinstance(v, int | float) and not isinstance(v, bool)
        if k in ("age", "spend"):
            if not num:
                mismatched += 1
                continue
            mean, std = (40.0, 10.0) if k == "age" else (5.0, 2.5)
            x[NAMES.index(k)] = max(-10.0, min(10.0, (float(v) - mean) / std))  # type: ignore[arg-type]
        elif k in ("segment", "device"):
            if num:
                mismatched += 1
                continue
            name = f"{k}={v}"
            x[NAMES.index(name) if name in NAMES else NAMES.index(f"{k}=<other>")] = 1.0
        else:
            unknown += 1
    return x, unknown, mismatched


@settings(max_examples=300, deadline=None)
@given(contexts)
def test_encoder_matches_the_reference(ctx: dict[str, object]) -> None:
    m = _core.Linear("ridge", "ucb")
    m.set_encoder(NUMERIC, CATEGORICAL)
    assert m.feature_names() == NAMES
    x = np.frombuffer(m.encode(ctx), dtype=np.float64)
    want, unknown, mismatched = reference(ctx)
    np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-12)
    assert m.encoder_counters() == (unknown, mismatched)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 60),
    st.floats(0.01, 100.0),
    st.integers(0, 2**32 - 1),
)
def test_rank_one_updates_equal_a_refit(d: int, n: int, ridge: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = _core.Linear("ridge", "ucb", binary=False, ridge=ridge)
    m.set_encoder([(f"f{i}", 0.0, 1.0) for i in range(d - 1)], [])
    m.add_arms(2)
    X = rng.normal(size=(n, d))
    X[:, 0] = 1.0
    w = rng.uniform(0.1, 2.0, n)
    y = rng.normal(size=n)
    # A decision first (value 0), then its reward swapped in (w = 0 items), as the server does.
    m.update([1] * n, X.tobytes(), w.tolist(), [0.0] * n, [0.0] * n)
    m.update([1] * n, X.tobytes(), [0.0] * n, (w * y).tolist(), (w * y * y).tolist())
    A = ridge * np.eye(d) + (X * w[:, None]).T @ X
    theta = np.linalg.solve(A, (X * (w * y)[:, None]).sum(axis=0))
    got, se = m.coefficients(1)
    np.testing.assert_allclose(got, theta, rtol=1e-6, atol=1e-8)
    # The untouched arm is still its prior.
    assert m.coefficients(0)[0] == [0.0] * d
    rss = max(0.0, float(np.sum(w * y * y) - theta @ (X * (w * y)[:, None]).sum(axis=0)))
    sigma = math.sqrt((1 + rss) / (1 + w.sum()))
    np.testing.assert_allclose(se, sigma * np.sqrt(np.diag(np.linalg.inv(A))), rtol=1e-5)


def test_refused_input_changes_nothing() -> None:
    m = _core.Linear("ridge", "thompson", seed=1)
    m.set_encoder(NUMERIC, CATEGORICAL)
    m.add_arms(3)
    x = m.encode({"age": 30, "segment": "mid"})
    m.update([0], x, [1.0], [1.0], [1.0])
    before, version = m.state(), m.version()
    for bad in (
        lambda: m.update([0], x, [float("nan")], [1.0], [1.0]),
        lambda: m.update([0], x, [-1.0], [1.0], [1.0]),
        lambda: m.update([5], x, [1.0], [1.0], [1.0]),
        lambda: m.update([0, 1], x, [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]),  # one x for two items
        lambda: m.update([0], x[:-8], [1.0], [1.0], [1.0]),
        lambda: m.choose({"age": float("inf")}),
        lambda: m.choose({"age": [1, 2]}),
        lambda: m.choose({1: "x"}),
        lambda: m.choose_x(x[:-8]),
        lambda: m.choose(None, 4),
        lambda: m.load_state(before[:-1]),
    ):
        with pytest.raises(_core.CoreError):
            bad()
    assert m.state() == before and m.version() == version


def test_thompson_propensities_match_the_choice_frequencies() -> None:
    m = _core.Linear("ridge", "thompson", seed=3)
    m.set_encoder([("f", 0.0, 1.0)], [])
    m.add_arms(4)
    rng = np.random.default_rng(2)
    X = np.column_stack([np.ones(200), rng.normal(size=200)])
    m.update([i % 4 for i in range(200)], X.tobytes(), [1.0] * 200, (rng.random(200) < 0.3).astype(float).tolist(),
             [0.0] * 200)  # fmt: skip
    ctx = {"f": 0.7}
    n = 20_000
    counts = np.zeros(4)
    logged: dict[int, float] = {}
    for _ in range(n):
        arms, _, props, _ = m.choose(ctx)
        counts[arms[0]] += 1
        logged[arms[0]] = props[0]
    for arm, p in logged.items():
        f = counts[arm] / n
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (arm, f, p)
