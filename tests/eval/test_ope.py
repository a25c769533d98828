"""Off-policy estimators against simulated logs whose true policy value is known.

Each trial draws a fresh log from a contextual world (3 context cells, 5 arms, rewards
Bernoulli with a cell- and arm-dependent rate) under a non-uniform logging policy, and
checks whether each estimator's 95% interval covers the candidate's exact value."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pytest

from banditd import evaluate, ope
from banditd.cli import main
from banditd.errors import FailedPrecondition, InvalidArgument

ARMS = ("a", "b", "c", "d", "e")
CELL_P = np.array([0.5, 0.3, 0.2])
RATES = np.random.default_rng(7).uniform(0.02, 0.30, size=(3, 5))
# Logging: softmax of fixed scores per cell (propensities 0.05..0.6); candidate: mostly the
# cell's best arm.
_scores = np.random.default_rng(8).normal(0, 1, size=(3, 5))
LOGGING = np.exp(_scores) / np.exp(_scores).sum(axis=1, keepdims=True)
CANDIDATE = 0.1 / 5 + 0.9 * np.eye(5)[RATES.argmax(axis=1)]
TRUE_VALUE = float((CELL_P * (CANDIDATE * RATES).sum(axis=1)).sum())
TRIALS = 150
ROWS = 2000


def simulated_log(
    rng: np.random.Generator, logging: np.ndarray, n_cells_seen: int = 3
) -> tuple[ope.Log, np.ndarray]:
    cells = rng.choice(3, size=ROWS, p=CELL_P)
    u = rng.random(ROWS)[:, None]
    actions = np.minimum((u >= np.cumsum(logging[cells], axis=1)).sum(axis=1), 4)
    rewards = (rng.random(ROWS) < RATES[cells, actions]).astype(float)
    props = logging[cells, actions]
    # n_cells_seen=1 hides the context from the reward model (a misspecified model).
    seen = cells if n_cells_seen == 3 else np.zeros_like(cells)
    return ope.Log(ARMS, actions, rewards, props, seen, n_cells_seen), cells


def coverage_and_bias(logging: np.ndarray, n_cells_seen: int) -> dict[str, tuple[float, float, float]]:
    rng = np.random.default_rng(2026)
    hits: dict[str, list[bool]] = {}
    values: dict[str, list[float]] = {}
    for trial in range(TRIALS):
        log, cells = simulated_log(rng, logging, n_cells_seen)
        pi = CANDIDATE[cells]
        for est in ope.estimate_all(log, pi, seed=trial):
            hits.setdefault(est.estimator, []).append(est.low <= TRUE_VALUE <= est.high)
            values.setdefault(est.estimator, []).append(est.value)
    return {
        name: (float(np.mean(h)), float(np.mean(values[name]) - TRUE_VALUE), float(np.std(values[name])))
        for name, h in hits.items()
    }


def test_intervals_cover_the_true_value_with_a_correct_reward_model() -> None:
    out = coverage_and_bias(LOGGING, n_cells_seen=3)
    assert set(out) == {"IPS", "SNIPS", "DM", "DR"}  # logging is not uniform: no replay
    for name, (cover, bias, _sd) in out.items():
        assert cover >= 0.90, f"{name} covered the true value in {cover:.0%} of trials"
        assert abs(bias) < 0.01, f"{name} bias {bias:+.4f}"
    # The model part earns its keep: DR is tighter than plain IPS.
    assert out["DR"][2] < out["IPS"][2]


def test_doubly_robust_stays_unbiased_when_the_reward_model_is_wrong() -> None:
    """The model cannot see the context; DM is then biased, DR and IPS are not."""
    out = coverage_and_bias(LOGGING, n_cells_seen=1)
    for name in ("IPS", "SNIPS", "DR"):
        assert out[name][0] >= 0.90, f"{name} covered the true value in {out[name][0]:.0%} of trials"
    assert abs(out["DM"][1]) > 3 * abs(out["DR"][1])
    assert out["DM"][0] < 0.5


def test_replay_covers_the_true_value_on_uniform_logs() -> None:
    uniform = np.full((3, 5), 0.2)
    out = coverage_and_bias(uniform, n_cells_seen=3)
    assert "replay" in out
    for name, (cover, _bias, _sd) in out.items():
        assert cover >= 0.90, f"{name} covered the true value in {cover:.0%} of trials"


def _log(props: list[float]) -> ope.Log:
    n = len(props)
    return ope.Log(ARMS[:2], np.zeros(n, dtype=np.int64), np.ones(n), np.array(props), np.zeros(n, dtype=np.int64), 1)


def test_zero_missing_or_invalid_propensities_are_refused() -> None:
    for bad in (0.0, float("nan"), -0.5, 1.5):
        with pytest.raises(InvalidArgument, match="propensity"):
            _log([0.5, bad, 0.5])


def test_replay_refuses_a_non_uniform_log() -> None:
    log = ope.Log(
        ARMS[:2], np.array([0, 1, 0]), np.ones(3), np.array([0.9, 0.1, 0.9]), np.zeros(3, dtype=np.int64), 1
    )
    with pytest.raises(FailedPrecondition, match="uniform"):
        ope.replay(log, np.full((3, 2), 0.5))


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def uniform_rows(n: int = 3000) -> list[dict[str, object]]:
    rng = np.random.default_rng(3)
    rows: list[dict[str, object]] = []
    for i in range(n):
        cell = int(rng.choice(3, p=CELL_P))
        a = int(rng.integers(5))
        rows.append({
            "unit": f"u{i}", "action": ARMS[a], "reward": int(rng.random() < RATES[cell, a]),
            "propensity": 0.2, "context": orjson.dumps({"segment": f"s{cell}"}).decode(),
        })
    return rows


def test_cli_evaluates_fixed_learned_and_file_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.csv"
    write_csv(path, uniform_rows())
    policy = tmp_path / "best-per-segment.json"
    best = {f"s{c}": {ARMS[int(RATES[c].argmax())]: 1.0} for c in range(3)}
    policy.write_bytes(orjson.dumps({"by": "segment", "policies": best}))
    code = main([
        "evaluate", str(path), "--policy", "uniform", "--policy", "thompson", "--policy-file", str(policy),
        "--context-keys", "segment", "--json",
    ])
    assert code == 0
    reports = {r["candidate"]: r for r in orjson.loads(capsys.readouterr().out)}
    assert set(reports) == {"uniform", "thompson", "best-per-segment.json"}
    # Learned policies split the log, so every candidate is scored on the same second half.
    assert all(r["evaluated_rows"] == 1500 for r in reports.values())
    assert {name: r["trained_rows"] for name, r in reports.items()} == {
        "uniform": 0, "thompson": 1500, "best-per-segment.json": 0
    }
    est = {e["estimator"]: e for e in reports["uniform"]["estimates"]}
    assert set(est) == {"IPS", "SNIPS", "DM", "DR", "replay"}
    # Uniform candidate on a uniform log: every weight is 1, IPS is the logged mean exactly.
    assert est["IPS"]["value"] == pytest.approx(reports["uniform"]["logged"]["value"])
    best_value = float((CELL_P * RATES.max(axis=1)).sum())
    file_est = {e["estimator"]: e for e in reports["best-per-segment.json"]["estimates"]}
    for name in ("IPS", "SNIPS", "DR", "replay"):
        assert file_est[name]["low"] <= best_value <= file_est[name]["high"], name
    # Thompson fitted on the first half does better than uniform traffic.
    thompson = {e["estimator"]: e for e in reports["thompson"]["estimates"]}
    assert thompson["DR"]["value"] > est["DR"]["value"]


def test_cli_refuses_logs_without_propensities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = uniform_rows(10)
    no_column = tmp_path / "no-column.csv"
    write_csv(no_column, [{k: v for k, v in r.items() if k != "propensity"} for r in rows])
    assert main(["evaluate", str(no_column)]) == 2
    assert "propensity" in capsys.readouterr().err
    blank = tmp_path / "blank.jsonl"
    rows[4]["propensity"] = ""
    blank.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    assert main(["evaluate", str(blank)]) == 2
    assert "row 5 has no propensity" in capsys.readouterr().err
    rows[4]["propensity"] = 0
    blank.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    assert main(["evaluate", str(blank)]) == 2
    assert "zero" in capsys.readouterr().err


def test_candidates_naming_unlogged_arms_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    write_csv(path, uniform_rows(50))
    loaded = evaluate.load(path)
    with pytest.raises(InvalidArgument, match="never appear"):
        evaluate.evaluate(loaded, [evaluate.parse_candidate("arm:zzz")])
    with pytest.raises(InvalidArgument, match="unknown candidate"):
        evaluate.parse_candidate("softmax")
