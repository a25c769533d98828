"""Memory and disk after many decisions: RSS of the server (all its processes) and the
LMDB file (data.mdb), every --every decisions up to --decisions (default 1,000,000).

Decisions go to three experiments like the Locust mix (10 arms, 1,000 arms sticky, 10,000
arms), one third each, unit ids drawn from a 1,000,000 population, sent closed-loop by the
load generator (--concurrency calls in flight). A sticky experiment stores one assignment
per new unit, so it grows both the store and the server's in-memory assignment map.

    python loadtest/bench_memory.py                       # ~10 minutes on 2 cores
    python loadtest/bench_memory.py --decisions 200000 --every 50000
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    ExperimentPlan,
    LoadGenerator,
    ServerProcess,
    banditd_supports_workers,
    channel,
    cpu_model,
    decide_payloads,
    ensure_experiment,
    fmt_table,
    method_path,
    temp_workdir,
)

from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

MIB = 2**20
EXPERIMENTS = (ExperimentPlan("mem-10", 10), ExperimentPlan("mem-1000-sticky", 1000, sticky=True),
               ExperimentPlan("mem-10000", 10000))


@dataclass
class Checkpoint:
    decisions: int
    seconds: float
    rate: float  # decisions/s since the previous checkpoint
    failed: int
    rss: int
    anon: int  # anonymous RSS: the heap (RSS less LMDB's file-backed map)
    mdb_size: int  # data.mdb length
    mdb_disk: int  # blocks actually allocated


def mdb_sizes(data_dir: Path) -> tuple[int, int]:
    st = (data_dir / "data.mdb").stat()
    return st.st_size, st.st_blocks * 512


def payload_chunk(start: int, count: int, population: int) -> list[bytes]:
    """`count` requests round robin over the experiments; distinct seeds keep unit ids fresh."""
    per = -(-count // len(EXPERIMENTS))
    chunks = [decide_payloads(p.id, per, population, seed=start * 7 + i) for i, p in enumerate(EXPERIMENTS)]
    return [req for group in zip(*chunks, strict=True) for req in group][:count]


def run(args: argparse.Namespace, server: ServerProcess) -> list[Checkpoint]:
    assert server.data_dir is not None
    with channel(server.target) as ch:
        stub = pb_grpc.BanditdStub(ch)
        for plan in EXPERIMENTS:
            ensure_experiment(stub, plan)
    rss0, anon0 = server.memory()
    size0, disk0 = mdb_sizes(server.data_dir)
    points = [Checkpoint(0, 0.0, 0.0, 0, rss0, anon0, size0, disk0)]
    decide = method_path("Decide")
    started = time.monotonic()
    with LoadGenerator(args.gen_procs, args.channels) as gen:
        done = 0
        while done < args.decisions:
            n = min(args.every, args.decisions - done)
            payloads = payload_chunk(done, n, args.population)
            t0 = time.monotonic()
            res = gen.closed_loop(server.target, decide, payloads, args.concurrency, 3600.0, count=n)
            done += n
            time.sleep(args.settle)  # the decision log is written behind the responses
            size, disk = mdb_sizes(server.data_dir)
            points.append(Checkpoint(done, time.monotonic() - started, res.completed / (time.monotonic() - t0),
                                     res.failed, *server.memory(), size, disk))
            p = points[-1]
            print(f"  {done:>9,} decisions  {p.rate:6.0f}/s  RSS {p.rss / MIB:7.1f} MiB (anon {p.anon / MIB:6.1f})  "
                  f"data.mdb {p.mdb_size / MIB:7.1f} MiB  failed {p.failed}", flush=True)
    return points


def report(points: list[Checkpoint], where: str) -> None:
    base = points[0]
    rows = []
    for p in points:
        per = p.decisions or 1
        rows.append((
            f"{p.decisions:,}", f"{p.seconds:.0f}", f"{p.rate:,.0f}" if p.decisions else "-", p.failed,
            f"{p.rss / MIB:.1f}", f"{(p.rss - base.rss) / per:.0f}" if p.decisions else "-",
            f"{p.anon / MIB:.1f}", f"{(p.anon - base.anon) / per:.0f}" if p.decisions else "-",
            f"{p.mdb_size / MIB:.1f}", f"{p.mdb_disk / MIB:.1f}",
            f"{(p.mdb_size - base.mdb_size) / per:.0f}" if p.decisions else "-",
        ))
    print(f"\nMemory and store after N decisions ({where}); {cpu_model()}")
    print(fmt_table(("decisions", "seconds", "decisions/s", "failed", "RSS MiB", "RSS B/decision",
                     "anon MiB", "anon B/decision", "data.mdb MiB",
                     "on disk MiB", "mdb B/decision"), rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000, help="checkpoint interval")
    ap.add_argument("--population", type=int, default=1_000_000, help="unit ids")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--gen-procs", type=int, default=1)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before measuring a checkpoint")
    ap.add_argument("--workers", type=int, default=1, help="server processes (banditd --workers)")
    ap.add_argument("--server-args", default="", help="extra `banditd serve` flags")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = shlex.split(args.server_args)
    if banditd_supports_workers():
        extra += ["--workers", str(args.workers)]
    with temp_workdir("banditd-memory-") as tmp, ServerProcess.banditd(Path(tmp), *extra) as server:
        print(f"server: {' '.join(server.cmd[2:])}", flush=True)
        points = run(args, server)
        if not server.alive():
            raise SystemExit(f"server died:\n{server.log_tail()}")
        report(points, f"banditd, {args.workers} process(es), 3 experiments, {args.population:,} units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
