"""Contextual experiments through a real server (issue 17): three user segments whose best
arm differs; lin_ts / lin_ucb / logistic learn to send each segment to its arm, the models
survive a restart and are the same in every process of a pool, the feature definition is
learnt from the logged contexts and versioned, and GetModel explains the models."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from banditd_client import Client, InvalidArgument
from conftest import ServerProcess

ARMS = ["a0", "a1", "a2"]
# Click rate per (segment, arm): each segment's best arm differs.
RATES = {
    "young": {"a0": 0.30, "a1": 0.05, "a2": 0.05},
    "mid": {"a0": 0.05, "a1": 0.30, "a2": 0.05},
    "old": {"a0": 0.05, "a1": 0.05, "a2": 0.30},
}
BEST = {"young": "a0", "mid": "a1", "old": "a2"}


def _context(rng: random.Random) -> dict[str, str | float]:
    seg = rng.choice(list(RATES))
    # A number that carries the same signal (age) and one that is noise.
    age = {"young": 22.0, "mid": 40.0, "old": 65.0}[seg] + rng.gauss(0, 3)
    return {"segment": seg, "age": age, "noise": rng.random()}


def _play(client: Client, exp: str, rounds: int, rng: random.Random, only_clicks: bool = True) -> list[tuple[str, str]]:
    """Decides and reports clicks only (non-clicks never reported); returns (segment, arm)."""
    served = []
    for i in range(rounds):
        ctx = _context(rng)
        d = client.decide(exp, unit_id=f"u{i}", context=ctx)
        arm = d.arms[0].arm
        if rng.random() < RATES[str(ctx["segment"])][arm]:
            client.reward(d.decision_id, 1.0)
        elif not only_clicks:
            client.reward(d.decision_id, 0.0)
        served.append((str(ctx["segment"]), arm))
    return served


def _best_share(served: list[tuple[str, str]]) -> dict[str, float]:
    by_seg: dict[str, Counter[str]] = {}
    for seg, arm in served:
        by_seg.setdefault(seg, Counter())[arm] += 1
    return {seg: c[BEST[seg]] / sum(c.values()) for seg, c in by_seg.items()}


def _wait_for_version(client: Client, exp: str, at_least: int = 1, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get_model(exp).model_version
        if v >= at_least:
            return v
        time.sleep(0.1)
    raise AssertionError(f"no feature definition after {timeout}s")


@pytest.mark.parametrize("policy", ["lin_ts", "lin_ucb", "logistic"])
def test_each_segment_gets_its_best_arm(server: ServerProcess, policy: str) -> None:
    rng = random.Random(7)
    exp = f"ctx-{policy}-{uuid.uuid4().hex[:6]}"
    params = {"encoder_warmup": 100.0}
    if policy == "logistic":
        params["refit_seconds"] = 1.0
    with server.client() as client:
        client.create_experiment(exp, ARMS, policy=policy, **params)
        _play(client, exp, 150, rng)
        version = _wait_for_version(client, exp)
        served = _play(client, exp, 1200, rng)
        shares = _best_share(served[-500:])
        assert all(s > 0.6 for s in shares.values()), shares
        model = client.get_model(exp)
        assert model.model_version == version
        names = [f.name for f in model.features]
        assert {"segment=young", "segment=mid", "segment=old", "age"} <= set(names)
        # The clicked arm's coefficient for its segment is the largest of the arms'.
        coef = {a.arm: {c.feature: c.value for c in a.coefficients} for a in model.arms}
        for seg, best in BEST.items():
            assert max(coef, key=lambda a: coef[a][f"segment={seg}"]) == best, (seg, coef)
        # Decisions are logged with the model version; propensities are probabilities.
        d = client.decide(exp, unit_id="probe", context=_context(rng))
        assert d.model_version == version
        assert 0.0 < d.arms[0].propensity <= 1.0
        assert model.logged_decisions > 0
        if policy == "lin_ucb":
            # Deterministic decisions: no estimate of uniform allocation is possible.
            assert math.isnan(model.uniform_mean)
        else:
            assert model.uniform_low <= model.uniform_mean <= model.uniform_high
            # Targeted traffic earns more than uniform allocation would have on the same units.
            assert model.targeted_mean > model.uniform_mean


def test_models_survive_a_restart_and_are_shared_by_a_pool(tmp_path: Path) -> None:
    rng = random.Random(3)
    exp = "ctx-restart"
    srv = ServerProcess(tmp_path / "data", ("--workers", "2"))
    srv.start()
    try:
        with srv.client() as client:
            client.create_experiment(exp, ARMS, policy="lin_ucb", encoder_warmup=100.0)
            _play(client, exp, 150, rng)
            _wait_for_version(client, exp)
            _play(client, exp, 600, rng)
            time.sleep(1.0)  # pool refresh
            # Every process (several channels land on both) reports the same model.
            reports = []
            for _ in range(6):
                with srv.client() as c:
                    reports.append(c.get_model(exp))
            coefs = {tuple(round(c.value, 9) for c in r.arms[0].coefficients) for r in reports}
            assert len(coefs) == 1, coefs
            before = reports[0]
        srv.stop()
        srv.start()
        with srv.client() as client:
            after = client.get_model(exp)
            assert after.model_version == before.model_version
            for a, b in zip(before.arms, after.arms, strict=True):
                for ca, cb in zip(a.coefficients, b.coefficients, strict=True):
                    assert ca.value == pytest.approx(cb.value, abs=1e-9)
            # And it keeps learning from where it was.
            served = _play(client, exp, 300, rng)
            assert all(s > 0.6 for s in _best_share(served).values())
    finally:
        srv.stop()


def test_reward_for_a_decision_moves_its_arms_model(server: ServerProcess) -> None:
    """A click raises the clicked arm's estimate for that context (the 'updating but not
    learning' symptom must be impossible here too)."""
    exp = f"ctx-rise-{uuid.uuid4().hex[:6]}"
    rng = random.Random(1)
    with server.client() as client:
        client.create_experiment(exp, ARMS, policy="lin_ucb", encoder_warmup=50.0)
        _play(client, exp, 80, rng)
        _wait_for_version(client, exp)
        ctx = {"segment": "mid", "age": 40.0, "noise": 0.5}
        d = client.decide(exp, unit_id="x", context=ctx)
        arm = d.arms[0].arm
        before = {a.arm: a for a in client.get_model(exp).arms}[arm]
        client.reward(d.decision_id, 1.0)
        after = {a.arm: a for a in client.get_model(exp).arms}[arm]
        b = {c.feature: c.value for c in before.coefficients}
        a = {c.feature: c.value for c in after.coefficients}
        assert a["segment=mid"] > b["segment=mid"]


def test_invalid_contexts_change_nothing(server: ServerProcess) -> None:
    exp = f"ctx-bad-{uuid.uuid4().hex[:6]}"
    with server.client() as client:
        client.create_experiment(exp, ARMS, policy="lin_ts")
        before = sum(a.pulls for a in client.arm_stats(exp))
        with pytest.raises(InvalidArgument):
            client.decide(exp, unit_id="u", context={"age": float("nan")})
        with pytest.raises(InvalidArgument):
            client.create_experiment(exp + "-l", ARMS, policy="logistic", reward_type="continuous")
        with pytest.raises(InvalidArgument):
            client.create_experiment(exp + "-t", ARMS, policy="thompson", ridge=2.0)
        time.sleep(0.3)
        assert sum(a.pulls for a in client.arm_stats(exp)) == before


def test_half_life_follows_a_change_of_the_best_arm(server: ServerProcess) -> None:
    """Discounting applies to contextual models too: after the segments' best arms rotate, a
    lin_ucb model with a half-life moves to the new best arms while one without lags."""
    rotated = {"young": "a1", "mid": "a2", "old": "a0"}

    def play(client: Client, exp: str, rounds: int, rng: random.Random, best: dict[str, str]) -> list[tuple[str, str]]:
        served = []
        for i in range(rounds):
            ctx = _context(rng)
            seg = str(ctx["segment"])
            d = client.decide(exp, unit_id=f"u{i}", context=ctx)
            arm = d.arms[0].arm
            if rng.random() < (0.4 if arm == best[seg] else 0.05):
                client.reward(d.decision_id, 1.0)
            served.append((seg, arm))
        return served

    shares = {}
    with server.client() as client:
        for label, params in (("plain", {}), ("half_life", {"half_life": 150.0})):
            exp = f"ctx-drift-{label}-{uuid.uuid4().hex[:6]}"
            rng = random.Random(5)
            client.create_experiment(exp, ARMS, policy="lin_ucb", encoder_warmup=50.0, exploration_floor=0.05, **params)
            play(client, exp, 60, rng, BEST)
            _wait_for_version(client, exp)
            play(client, exp, 2000, rng, BEST)
            served = play(client, exp, 450, rng, rotated)
            tail = served[-200:]
            shares[label] = sum(arm == rotated[seg] for seg, arm in tail) / len(tail)
    assert shares["half_life"] > 0.6, shares
    assert shares["half_life"] > shares["plain"] + 0.15, shares


def test_model_command_prints_the_features_and_coefficients(server: ServerProcess) -> None:
    import subprocess
    import sys

    exp = f"ctx-cli-{uuid.uuid4().hex[:6]}"
    rng = random.Random(9)
    with server.client() as client:
        client.create_experiment(exp, ARMS, policy="lin_ts", encoder_warmup=50.0)
        _play(client, exp, 80, rng)
        _wait_for_version(client, exp)
        _play(client, exp, 100, rng)
    out = subprocess.run(
        [sys.executable, "-m", "banditd", "model", exp, "--target", server.target],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "model version 1" in out and "segment=young" in out and "arm a0" in out
    assert "uniform allocation on the same units" in out


def test_feature_definitions_fit_the_memory_budget_of_many_arms() -> None:
    """An experiment with very many arms gets fewer features (each arm's model costs ~10 d^2
    bytes), so learning a definition can never ask the core for more memory than allowed."""
    from banditd import _core, features

    contexts = [{f"k{j}": f"v{(i + j) % 30}" for j in range(12)} | {"n": float(i)} for i in range(3000)]
    wide = features.learn(contexts, 1, 0)
    assert wide.dimension == features.MAX_FEATURES
    limit = features.max_features_for(100_000)
    narrow = features.learn(contexts, 1, 0, limit)
    assert 4 <= narrow.dimension <= limit < 40
    m = _core.Linear("ridge", "ucb")
    m.add_arms(100_000)
    m.set_encoder(*features.core_args(narrow))  # within the core's limit
    assert m.n_features() == narrow.dimension
