"""`banditd export` reads a running server's decision log; `banditd evaluate` scores it."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import orjson
import pytest

from banditd.cli import main
from banditd.export import LogReader
from banditd_client import Client
from conftest import ServerProcess

DECISIONS = 300


def wait_for_rows(data_dir: Path, experiment: str, n: int) -> None:
    """Decisions are logged after their response; give the writer a moment to commit them."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with LogReader(data_dir) as reader:
            if sum(1 for _ in reader.rows(experiment)) >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} decision rows after 10 s")


def run_uniform_campaign(client: Client) -> dict[str, str]:
    """Uniform traffic over 3 arms; only arm b converts. Returns decision id -> arm."""
    client.create_experiment("ope", arms=["a", "b", "c"], policy="uniform")
    chosen: dict[str, str] = {}
    for i in range(DECISIONS):
        d = client.decide("ope", unit_id=f"u{i}", context={"segment": f"s{i % 3}"})
        chosen[d.decision_id] = d.arm
    counts = client.reward_many(
        [(did, 1.0, f"ev-{did}") for did, arm in chosen.items() if arm == "b"]
        + [(did, 0.0, f"ev-{did}") for did, arm in chosen.items() if arm == "a"]
    )
    assert counts.rejected == 0
    return chosen


def test_export_joins_decisions_with_rewards_while_the_server_runs(
    server: ServerProcess, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = run_uniform_campaign(client)
    wait_for_rows(server.data_dir, "ope", DECISIONS)
    out_csv, out_jsonl = tmp_path / "ope.csv", tmp_path / "ope.jsonl"
    assert main(["export", "ope", "--data-dir", str(server.data_dir), "--out", str(out_csv)]) == 0
    assert main(["export", "ope", "--data-dir", str(server.data_dir), "--out", str(out_jsonl)]) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [orjson.loads(line) for line in out_jsonl.read_bytes().splitlines()]
    assert len(rows) == len(lines) == DECISIONS
    for row, line in zip(rows, lines, strict=True):
        assert row["decision_id"] == line["decision_id"]
        assert row["action"] == line["action"] == chosen[row["decision_id"]]
        assert float(row["propensity"]) == pytest.approx(1 / 3)
        assert float(row["reward"]) == line["reward"] == (1.0 if row["action"] == "b" else 0.0)
        assert line["reward_events"] == (0 if row["action"] == "c" else 1)
        assert orjson.loads(row["context"]) == line["context"]
        assert line["context"]["segment"] in {"s0", "s1", "s2"}
        assert line["settled"] is False  # default attribution window (7 days) is still open
    # The server kept serving while the store was read.
    assert client.decide("ope", unit_id="after-export").arm in {"a", "b", "c"}

    capsys.readouterr()
    assert main(["evaluate", str(out_csv), "--policy", "arm:b", "--policy", "uniform", "--json"]) == 0
    reports = {r["candidate"]: r for r in orjson.loads(capsys.readouterr().out)}
    always_b = {e["estimator"]: e["value"] for e in reports["arm:b"]["estimates"]}
    # Every kept or weighted round of "always b" converted.
    assert always_b["SNIPS"] == pytest.approx(1.0)
    assert always_b["replay"] == pytest.approx(1.0)
    share_b = sum(1 for a in chosen.values() if a == "b") / DECISIONS
    assert always_b["IPS"] == pytest.approx(3 * share_b)
    uniform = {e["estimator"]: e["value"] for e in reports["uniform"]["estimates"]}
    assert uniform["IPS"] == pytest.approx(share_b)


def test_export_of_an_unknown_experiment_or_missing_store_fails_clearly(
    server: ServerProcess, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_experiment("known", arms=["a", "b"])
    assert main(["export", "nope", "--data-dir", str(server.data_dir)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "known" in err
    assert main(["export", "known", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no banditd store" in capsys.readouterr().err
