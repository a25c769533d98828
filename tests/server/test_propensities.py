"""Logged propensities are the probabilities the policy really chose with, also after the
posterior has moved: compared with empirical selection frequencies at 10 and 1,000 arms."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from banditd.engine import PROPENSITY_REFRESH_S, Engine, RewardInput
from banditd.experiment import ArmSpec, ExperimentSpec
from banditd.store import Store
from banditd.writer import Writer

DECISIONS = 20_000


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=0.005)
    writer.start()
    eng = Engine(store, writer, seed=7)
    stopped = threading.Event()
    threading.Thread(target=eng.run_background, args=(stopped,), daemon=True).start()
    yield eng
    stopped.set()
    writer.close()
    store.close()


def _moved_posterior(engine: Engine, n_arms: int, history: int, spread: float, power: float) -> None:
    """A Thompson experiment whose posterior moved after its propensities were first estimated."""
    spec = ExperimentSpec(
        id="p", arms=[ArmSpec(f"a{i}") for i in range(n_arms)], outcomes={"mode": "explicit"}
    )
    engine.create_experiment(spec, timeout=10)
    rates = [0.3 + spread * (i / (n_arms - 1)) ** power for i in range(n_arms)]
    rng = random.Random(1)
    decisions = [engine.decide("p", f"h{i}", 1).record for i in range(history)]
    rewards = [RewardInput(d.decision_id, float(rng.random() < rates[int(d.arms[0][1:])])) for d in decisions]
    results = engine.reward_batch(rewards, timeout=30)
    assert all(r.error is None for r in results)
    # The refresher catches up with the moved posterior within its stated bound:
    # max(PROPENSITY_REFRESH_S, cost / CPU share) + cost (seconds at 1,000 arms on a busy machine).
    rt = engine.runtime("p")
    assert rt is not None
    deadline = time.monotonic() + 120
    while rt.bandit.propensities_stale(1) and time.monotonic() < deadline:
        time.sleep(PROPENSITY_REFRESH_S)
    assert not rt.bandit.propensities_stale(1), "propensities were not refreshed"


def _measure(engine: Engine) -> tuple[Counter[str], dict[str, float]]:
    counts: Counter[str] = Counter()
    logged: dict[str, float] = {}
    version = engine.runtime("p").bandit.version  # type: ignore[union-attr]
    for i in range(DECISIONS):
        rec = engine.decide("p", f"u{i}", 1).record
        counts[rec.arms[0]] += 1
        logged[rec.arms[0]] = rec.propensities[0]
    # The posterior stayed put while measuring (explicit mode, no rewards).
    assert engine.runtime("p").bandit.version == version  # type: ignore[union-attr]
    return counts, logged


def test_propensities_match_selection_frequencies_at_10_arms(engine: Engine) -> None:
    _moved_posterior(engine, 10, 150, 0.2, 1.0)
    counts, logged = _measure(engine)
    assert max(counts.values()) < 0.9 * DECISIONS  # the check is not trivial
    worst = max(abs(n / DECISIONS - logged[arm]) for arm, n in counts.items())
    print(f"10 arms: {len(counts)} arms chosen, largest |frequency - propensity| {worst:.4f}")
    for arm, n in counts.items():
        assert abs(n / DECISIONS - logged[arm]) < 0.02, (arm, n / DECISIONS, logged[arm])


def test_propensities_match_selection_frequencies_at_1000_arms(engine: Engine) -> None:
    _moved_posterior(engine, 1000, 4000, 0.5, 6.0)
    counts, logged = _measure(engine)
    checked = 0
    z = [
        abs(n / DECISIONS - logged[a]) / (max(logged[a], 1e-4) * (1 / DECISIONS + 1 / 2000)) ** 0.5
        for a, n in counts.items()
    ]
    share = sum(x > 2 for x in z) / len(z)
    print(f"1,000 arms: {len(counts)} arms chosen, largest |z| {max(z):.2f}, share |z| > 2: {share:.3f}")
    for arm, n in counts.items():
        p = logged[arm]
        freq = n / DECISIONS
        # Sampling error of the frequency and of the 2,000-draw Monte Carlo estimate.
        sd = (max(p, 1e-4) * (1 - p) * (1 / DECISIONS + 1 / 2000)) ** 0.5
        assert abs(freq - p) < 5 * sd + 1e-3, (arm, freq, p)
        checked += 1
    assert checked > 20
