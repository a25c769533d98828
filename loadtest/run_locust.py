"""Runs the Locust gRPC load test headless and checks latency and failures.

Starts a local banditd on a free port with a temporary data dir unless --host is given,
runs `locust -f loadtest/locustfile.py --headless` for a fixed time, writes the CSV and
HTML reports into loadtest/reports/, prints p50/p95/p99 and the failure ratio per request
type, and exits 1 when any request type's p95 exceeds --max-p95-ms or more than
--max-failure-ratio of all calls failed. Unknown arguments go to Locust unchanged (for
example the locustfile's --exp-arms, --decide-ratio, --user-rps, or --processes 2).

    make loadtest                                   # local server, 60 s
    make loadtest HOST=10.0.0.5:50051 LOADTEST_ARGS="--users 50 --run-time 120"
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import LOADTEST_DIR, REPORTS, ServerProcess, cpu_model, fmt_table, temp_workdir


@dataclass(frozen=True)
class Row:
    type: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", help="host:port of a running server; default: start one locally")
    ap.add_argument("-u", "--users", type=int, default=20)
    ap.add_argument("-r", "--spawn-rate", type=float, default=10.0)
    ap.add_argument("-t", "--run-time", type=float, default=60.0, help="seconds")
    ap.add_argument("--reports-dir", type=Path, default=REPORTS)
    ap.add_argument("--name", default=None, help="report file prefix (default: locust-<timestamp>)")
    ap.add_argument("--max-p95-ms", type=float, default=120.0)
    ap.add_argument("--max-failure-ratio", type=float, default=0.001)
    ap.add_argument("--server-args", default="", help='extra `banditd serve` flags, e.g. "--workers 2"')
    return ap.parse_known_args(argv)


def locust_command(args: argparse.Namespace, host: str, prefix: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOADTEST_DIR / "locustfile.py"), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{math.ceil(args.run_time)}s",
        "--host", host, "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--stop-timeout", "5", *extra,
    ]


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def read_stats(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        return [
            Row(r["Type"], r["Name"], int(r["Request Count"]), int(r["Failure Count"]), _num(r["Requests/s"]),
                _num(r["50%"]), _num(r["95%"]), _num(r["99%"]))
            for r in csv.DictReader(f)
        ]


def verdict(rows: list[Row], max_p95_ms: float, max_failure_ratio: float) -> list[str]:
    """Reasons the run failed (empty: passed)."""
    problems = []
    total = next((r for r in rows if r.name == "Aggregated"), None)
    if total is None or total.requests == 0:
        return ["no requests were made"]
    for r in rows:
        if r.requests and r.p95 > max_p95_ms:
            problems.append(f"{r.name}: p95 {r.p95:.0f} ms > {max_p95_ms:.0f} ms")
    if total.failure_ratio > max_failure_ratio:
        problems.append(f"{total.failures} of {total.requests} calls failed "
                        f"({total.failure_ratio:.3%} > {max_failure_ratio:.3%})")
    return problems


def print_summary(rows: list[Row]) -> None:
    table = [
        (r.name, r.requests, r.failures, f"{r.failure_ratio:.3%}", f"{r.rps:.1f}", f"{r.p50:.0f}", f"{r.p95:.0f}",
         f"{r.p99:.0f}")
        for r in rows
    ]
    print(fmt_table(("request", "calls", "failures", "fail ratio", "calls/s", "p50 ms", "p95 ms", "p99 ms"), table))


def run(args: argparse.Namespace, extra: list[str], host: str) -> int:
    args.reports_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.reports_dir / (args.name or time.strftime("locust-%Y%m%d-%H%M%S"))
    cmd = locust_command(args, host, prefix, extra)
    print("$", shlex.join(cmd), flush=True)
    # Locust exits 1 when any call failed; the failure budget below decides instead.
    proc = subprocess.run(cmd, check=False)
    stats_csv = Path(f"{prefix}_stats.csv")
    if proc.returncode not in (0, 1) or not stats_csv.exists():
        print(f"locust failed (exit {proc.returncode}); no {stats_csv}", file=sys.stderr)
        return 2
    rows = read_stats(stats_csv)
    print(f"\nbanditd load test against {host}: {args.users} users, {args.run_time:.0f} s, CPU {cpu_model()}")
    print_summary(rows)
    print(f"reports: {stats_csv}, {prefix}.html")
    problems = verdict(rows, args.max_p95_ms, args.max_failure_ratio)
    for p in problems:
        print(f"FAIL: {p}")
    if not problems:
        print(f"PASS: every p95 <= {args.max_p95_ms:.0f} ms and failures <= {args.max_failure_ratio:.2%}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.host:
        return run(args, extra, args.host)
    with temp_workdir("banditd-locust-") as tmp:
        server = ServerProcess.banditd(Path(tmp), *shlex.split(args.server_args))
        print(f"starting local server: {shlex.join(server.cmd)}", flush=True)
        with server:
            code = run(args, extra, server.target)
            if not server.alive():
                print(f"FAIL: the server died during the test\n{server.log_tail()}")
                return 1
            print(f"server: {server.cpu_seconds():.1f} s CPU, RSS {server.rss_bytes() / 2**20:.0f} MiB")
        return code


if __name__ == "__main__":
    sys.exit(main())
