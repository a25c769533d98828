"""Smoke test of the Locust load test: a short headless run against a local server."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "loadtest" / "run_locust.py"


def test_run_locust_passes_and_writes_reports(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(RUNNER), "-u", "4", "-r", "4", "-t", "8", "--reports-dir", str(tmp_path),
        "--name", "smoke", "--user-rps", "10", "--reward-delay", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = tmp_path / "smoke_stats.csv"
    assert stats.exists() and (tmp_path / "smoke.html").exists()
    with stats.open(newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Request Count"]) > 50
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert any(name.startswith("Decide ") for name in rows) and "Reward" in rows
