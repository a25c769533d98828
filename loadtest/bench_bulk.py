"""Bulk decisions and SDK-side assignment: what a campaign send and a high-traffic service get.

- DecideBulk: one stream from the Python client, batches of `--batch` units, to one banditd
  process: decisions/s, the server's CPU per decision and its RSS before and after (memory
  must stay bounded however many units stream through);
- local assignment: `LocalAssigner.assign` in one Python thread from an allocation snapshot
  (no RPC per decision), exposures queued and flushed to the server in batches; 3 interleaved
  runs, medians, each also as a ratio to the bare assignment rule (BLAKE2b and a bisection)
  timed over the same units just before it.

    python loadtest/bench_bulk.py [--units 1000000] [--arms 10,10000]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import statistics
import sys
import time
from pathlib import Path

from _common import ExperimentPlan, ServerProcess, channel, cpu_model, ensure_experiment, fmt_table, temp_workdir

from banditd_client import Client
from banditd_client.local import thresholds
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc


def run_bulk(server: ServerProcess, exp: str, units: int, batch: int) -> tuple[float, float, int, int]:
    """(decisions/s, server CPU µs per decision, RSS before, RSS after)."""
    rss0 = server.rss_bytes()
    cpu0 = server.cpu_seconds()
    ids = (f"unit-{i}" for i in range(units))
    n = 0
    t0 = time.perf_counter()
    with Client(server.target, timeout=600) as c:
        for b in c.decide_bulk(exp, ids, batch_size=batch):
            n += len(b)
    dt = time.perf_counter() - t0
    if n != units:
        raise SystemExit(f"{exp}: {n} of {units} units answered")
    return n / dt, (server.cpu_seconds() - cpu0) / n * 1e6, rss0, server.rss_bytes()


def hash_rule_loop(salt: str, probabilities: tuple[float, ...], units: list[str]) -> float:
    """Seconds for the bare assignment rule over `units` in Python (BLAKE2b of salt and unit,
    then a bisection of the thresholds): the reference `assign` is compared with, measured in
    the same run, because this machine's speed moves by 2x between hours."""
    base = hashlib.blake2b((salt + "\x00").encode(), digest_size=8)
    thr = thresholds(probabilities)
    find = bisect.bisect_right
    t0 = time.perf_counter()
    for u in units:
        h = base.copy()
        h.update(u.encode())
        find(thr, h.digest())
    return time.perf_counter() - t0


def run_local(server: ServerProcess, exp: str, n: int, rounds: int = 3) -> tuple[float, float, int, int]:
    """(assignments/s in one thread, its time over the bare hash rule's, exposures made, exposures
    the server accepted): `rounds` interleaved runs of n new units each, medians."""
    rates, ratios = [], []
    with Client(server.target, timeout=60) as c:
        assigner = c.local_assigner(exp)
        try:
            snap = assigner.snapshot
            if snap is None:
                raise SystemExit(f"{exp}: no allocation snapshot")
            assign = assigner.assign
            for r in range(rounds):
                units = [f"u{r}-{i}" for i in range(n)]
                ref = hash_rule_loop(snap.salt, snap.probabilities, units)
                t0 = time.perf_counter()
                for u in units:
                    assign(u)
                dt = time.perf_counter() - t0
                rates.append(n / dt)
                ratios.append(dt / ref)
        finally:
            assigner.close()  # flushes what is still queued
        accepted = assigner.stats().accepted
    return statistics.median(rates), statistics.median(ratios), rounds * n, accepted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=1_000_000)
    ap.add_argument("--arms", default="10,10000")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--local", type=int, default=500_000, help="local assignments to time")
    args = ap.parse_args(argv)
    print("\n== bulk decisions and local assignment", flush=True)
    rows = []
    with temp_workdir("banditd-bulk-") as tmp, ServerProcess.banditd(Path(tmp), "--workers", "1") as server:
        for arms in (int(a) for a in args.arms.split(",")):
            plan = ExperimentPlan(f"bulk-{arms}", arms, posterior="learned")
            with channel(server.target) as ch:
                ensure_experiment(pb_grpc.BanditdStub(ch), plan)
            units = args.units
            rate, cpu, rss0, rss1 = run_bulk(server, plan.id, units, args.batch)
            rows.append((arms, "DecideBulk, 1 stream", f"{units:,}", f"{rate:,.0f}/s", f"{cpu:.2f}",
                         f"{rss0 / 2**20:.0f} → {rss1 / 2**20:.0f} MiB"))  # fmt: skip
            local_rate, vs_rule, made, accepted = run_local(server, plan.id, args.local)
            rows.append((arms, "LocalAssigner.assign, 1 thread", f"{made:,}", f"{local_rate:,.0f}/s",
                         "—", f"{vs_rule:.2f}x the hash rule's time; {accepted:,} exposures accepted"))  # fmt: skip
    print(f"CPU: {cpu_model()}; Python client in this process, server: 1 banditd process; local rate: median of 3 "
          f"runs of {args.local:,} units")
    print(fmt_table(("arms", "path", "units", "rate", "server CPU µs/decision", "notes"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
