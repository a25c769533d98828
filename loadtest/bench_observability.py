"""What metrics and history snapshots cost on Decide: server CPU per decision of the same
banditd with and without them, in one run, rounds interleaved, medians.

Configurations (one process each, all running at once, measured in turn):
- bare: `--no-metrics`, snapshots hourly (never, within the run);
- metrics: the gRPC metrics interceptor on, `/metrics` scraped every 5 s;
- metrics+snapshots: as metrics, and a history snapshot every second (60x the default rate,
  so their cost is large enough to see).

    python loadtest/bench_observability.py [--arms 10,10000] [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request

from _common import (
    ExperimentPlan,
    LoadGenerator,
    ServerProcess,
    channel,
    cpu_model,
    decide_payloads,
    ensure_experiment,
    fmt_table,
    free_port,
    method_path,
    temp_workdir,
)

from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

CONFIGS = {
    "bare": ("--no-metrics", "--history-seconds", "3600"),
    "metrics": ("--history-seconds", "3600"),
    "metrics+snapshots": ("--history-seconds", "1"),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="10,10000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    decide = method_path("Decide")
    stop = threading.Event()
    print(f"CPU: {cpu_model()}; closed loop x{args.concurrency}, {args.seconds:g} s per measurement, "
          f"{args.rounds} interleaved rounds, medians", flush=True)
    rows = []
    with temp_workdir("bench-obs-") as tmp, LoadGenerator(processes=1, channels=4) as gen:
        from pathlib import Path

        work = Path(tmp)
        servers: dict[str, ServerProcess] = {}
        scrape_urls = []
        for name, flags in CONFIGS.items():
            extra = ["--workers", "1", *flags]
            if name != "bare":
                port = free_port()
                extra += ["--http-port", str(port)]
                scrape_urls.append(f"http://127.0.0.1:{port}/metrics")
            servers[name] = ServerProcess.banditd(work, *extra, name=name).start()

        def scrape() -> None:
            while not stop.wait(5.0):
                for url in scrape_urls:
                    try:
                        urllib.request.urlopen(url, timeout=5).read()
                    except OSError:
                        pass

        threading.Thread(target=scrape, daemon=True).start()
        try:
            for arms in (int(a) for a in args.arms.split(",")):
                plan = ExperimentPlan(f"obs-{arms}", arms, posterior="learned")
                for s in servers.values():
                    with channel(s.target) as ch:
                        ensure_experiment(pb_grpc.BanditdStub(ch), plan)
                payloads = decide_payloads(plan.id, 20_000)
                cpu: dict[str, list[float]] = {n: [] for n in servers}
                gen_cpu: dict[str, list[float]] = {n: [] for n in servers}
                rate: dict[str, list[float]] = {n: [] for n in servers}
                for s in servers.values():  # warm-up
                    gen.closed_loop(s.target, decide, payloads, args.concurrency, 1.0)
                for r in range(args.rounds):
                    order = list(servers) if r % 2 == 0 else list(reversed(servers))
                    for name in order:
                        s = servers[name]
                        c0 = s.cpu_seconds()
                        res = gen.closed_loop(s.target, decide, payloads, args.concurrency, args.seconds)
                        n = max(1, res.completed)
                        cpu[name].append((s.cpu_seconds() - c0) / n * 1e6)
                        gen_cpu[name].append(res.cpu / n * 1e6)
                        rate[name].append(res.throughput)
                        time.sleep(0.3)
                base = statistics.median(cpu["bare"])
                for name in servers:
                    med = statistics.median(cpu[name])
                    rows.append((
                        arms, name, f"{statistics.median(rate[name]):,.0f}", f"{med:.0f}",
                        f"{med / base:.3f}x", f"{med - base:+.0f}", f"{statistics.median(gen_cpu[name]):.0f}",
                    ))
                print(f"  {arms} arms done", flush=True)
        finally:
            stop.set()
            for s in servers.values():
                s.stop()
    print()
    print(fmt_table(
        ("arms", "server", "decisions/s", "server CPU us/decision", "vs bare", "us added", "generator CPU us/call"),
        rows,
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
