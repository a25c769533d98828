"""banditd nodes on PostgreSQL vs one node on LMDB: reward ingestion, propagation, Decide.

Starts a private PostgreSQL cluster from the machine's binaries (tests/pg.py; fsync on, as in
production) and, per configuration, a fresh database with 1, 2 or 3 banditd nodes on it (one
process each, its own port), or one node on LMDB.

1. Ingestion: --decisions decisions (DecideBulk, node 0), then --rewards rewards (unique
   event ids) in RewardBatch messages of --batch through RewardBatchStream, --streams streams
   per node, the rewards split evenly over the nodes. A stream answers once every reward in it
   is committed, so accepted/s over the wall time is durable rewards/s. CPU per reward is the
   nodes' plus PostgreSQL's.
2. Propagation (2 nodes): a reward acknowledged by node A, then GetArmStats on node B polled
   until its reward sum moved (the statistics B's Decide samples from). Median and p99.
3. Decide latency on one node, LMDB vs PostgreSQL: closed loop, --concurrency calls in
   flight from the Python load generator (decisions are served from memory either way).

    python loadtest/bench_nodes.py [--rewards 60000] [--nodes 1,2,3]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
from _common import (
    ExperimentPlan,
    LoadGenerator,
    ServerProcess,
    channel,
    cpu_model,
    decide_payloads,
    ensure_experiment,
    fmt_table,
    method_path,
    percentiles_ms,
    temp_workdir,
)
from bench_ingest import batch_payloads, reward_payloads, stream_rewards

from banditd_client import Client
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import pg  # noqa: E402 - the private cluster helper the tests use


def postgres_cpu_seconds(cluster: pg.PostgresCluster) -> float:
    total = 0.0
    for p in psutil.process_iter(["username", "cmdline"]):
        try:
            if p.info["username"] == "postgres" or "postgres" in " ".join(p.info["cmdline"] or [])[:60]:
                t = p.cpu_times()
                total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def start_nodes(tmp: Path, store: str | None, n: int) -> list[ServerProcess]:
    nodes = []
    for i in range(n):
        extra = ("--workers", "1") + (("--store", store) if store else ())
        node = ServerProcess.banditd(tmp / f"node{i}-{uuid.uuid4().hex[:6]}", *extra, name=f"node{i}")
        node.log_path.parent.mkdir(parents=True, exist_ok=True)
        nodes.append(node.start())
    return nodes


def decisions_on(target: str, experiment: str, count: int) -> list[str]:
    ids: list[str] = []
    with Client(target, timeout=600) as c:
        for batch in c.decide_bulk(experiment, (f"u{i}" for i in range(count)), batch_size=10_000):
            ids.extend(batch.decision_ids)
    return ids


def ingest(args: argparse.Namespace, label: str, nodes: list[ServerProcess], cluster: pg.PostgresCluster | None
           ) -> tuple[str, int, float, int, float, float]:
    run = uuid.uuid4().hex[:8]
    exp = f"ingest-{run}"
    with channel(nodes[0].target) as ch:
        ensure_experiment(pb_grpc.BanditdStub(ch), ExperimentPlan(exp, 10))
    ids = decisions_on(nodes[0].target, exp, args.decisions)
    payloads = batch_payloads(reward_payloads(ids, args.rewards, run), args.batch)
    parts = [payloads[k::len(nodes)] for k in range(len(nodes))]
    time.sleep(1.0)  # the nodes' writers and the follow threads settle
    cpu0 = sum(n.cpu_seconds() for n in nodes) + (postgres_cpu_seconds(cluster) if cluster else 0.0)
    results: list[object] = [None] * len(nodes)

    def send(k: int) -> None:
        results[k] = stream_rewards(nodes[k].target, parts[k], args.streams, "RewardBatchStream")

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(nodes))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = sum(n.cpu_seconds() for n in nodes) + (postgres_cpu_seconds(cluster) if cluster else 0.0) - cpu0
    accepted = 0
    for r in results:
        if not isinstance(r, tuple):
            raise SystemExit(f"{label}: a reward stream failed")
        accepted += sum(resp.accepted for resp in r[1])
    # Every node ends up with every reward (read on the last node).
    deadline = time.monotonic() + 30
    with Client(nodes[-1].target) as c:
        while time.monotonic() < deadline and sum(s.rewards for s in c.arm_stats(exp)) < accepted:
            time.sleep(0.1)
        seen = int(sum(s.rewards for s in c.arm_stats(exp)))
    return label, accepted, accepted / wall, seen, cpu / max(1, accepted) * 1e6, wall


def propagation(nodes: list[ServerProcess], trials: int) -> np.ndarray:
    a, b = Client(nodes[0].target), Client(nodes[1].target)
    exp = f"prop-{uuid.uuid4().hex[:8]}"
    a.create_experiment(exp, arms=["x", "y"], reward_type="continuous", outcomes={"mode": "explicit"})
    ds = [a.decide(exp, unit_id=f"u{i}") for i in range(trials)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(s.pulls for s in b.arm_stats(exp)) < trials:
        time.sleep(0.05)
    delays = []
    total = 0.0
    for i, d in enumerate(ds):
        a.reward(d.decision_id, 1.0, event_id=f"p{i}")
        acked = time.perf_counter()
        total += 1.0
        while sum(s.reward_sum for s in b.arm_stats(exp)) < total - 1e-9:
            if time.perf_counter() - acked > 10:
                raise SystemExit("a reward did not reach the other node within 10 s")
        delays.append(time.perf_counter() - acked)
        time.sleep(0.02)
    a.close()
    b.close()
    return np.array(delays)


def decide_latency(node: ServerProcess, concurrency: int, seconds: float) -> tuple[float, float, float, float]:
    plan = ExperimentPlan(f"lat-{uuid.uuid4().hex[:6]}", 10, posterior="learned")
    with channel(node.target) as ch:
        ensure_experiment(pb_grpc.BanditdStub(ch), plan)
    payloads = decide_payloads(plan.id, 2048)
    with LoadGenerator(1, 4) as gen:
        gen.closed_loop(node.target, method_path("Decide"), payloads, concurrency, 1.0)  # warm-up
        cpu0 = node.cpu_seconds()
        res = gen.closed_loop(node.target, method_path("Decide"), payloads, concurrency, seconds)
        cpu = node.cpu_seconds() - cpu0
    p50, p99 = percentiles_ms(res.latencies, (50, 99))
    return res.throughput, p50, p99, cpu / max(1, res.completed) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2,3", help="node counts on PostgreSQL")
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--rewards", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=1_000, help="rewards per RewardBatch")
    ap.add_argument("--streams", type=int, default=2, help="RewardBatchStream calls per node")
    ap.add_argument("--trials", type=int, default=100, help="propagation measurements")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="Decide latency run")
    args = ap.parse_args(argv)
    bindir = pg.ensure_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries")
    rows = []
    with temp_workdir("banditd-nodes-") as tmp_s, pg.PostgresCluster(bindir=bindir) as cluster:
        tmp = Path(tmp_s)
        print(f"PostgreSQL {bindir.parent.name} on {cluster.url} (fsync on)", flush=True)
        lmdb_node = start_nodes(tmp, None, 1)
        try:
            rows.append(ingest(args, "LMDB, 1 node", lmdb_node, None))
            lat_lmdb = decide_latency(lmdb_node[0], args.concurrency, args.seconds)
        finally:
            for n in lmdb_node:
                n.stop()
        delays = None
        lat_pg = None
        for count in (int(x) for x in args.nodes.split(",")):
            nodes = start_nodes(tmp, cluster.fresh_database(), count)
            try:
                rows.append(ingest(args, f"PostgreSQL, {count} node{'s' if count > 1 else ''}", nodes, cluster))
                if count == 1:
                    lat_pg = decide_latency(nodes[0], args.concurrency, args.seconds)
                if count >= 2 and delays is None:
                    delays = propagation(nodes, args.trials)
            finally:
                for n in nodes:
                    n.stop()
            print(f"  {rows[-1][0]}: {rows[-1][2]:,.0f} rewards/s", flush=True)
    print(f"\n== banditd nodes on PostgreSQL vs LMDB ({cpu_model()}; client, nodes and PostgreSQL on this machine)")
    print(fmt_table(
        ("store", "rewards accepted", "rewards/s", "seen on the last node", "CPU µs/reward (nodes + PG)", "seconds"),
        [(r[0], f"{r[1]:,}", f"{r[2]:,.0f}", f"{r[3]:,}", f"{r[4]:.0f}", f"{r[5]:.1f}") for r in rows],
    ))
    if delays is not None:
        print(f"\npropagation, reward ack on node A -> node B's statistics ({len(delays)} trials): "
              f"median {np.median(delays) * 1000:.0f} ms, p99 {np.percentile(delays, 99) * 1000:.0f} ms, "
              f"max {delays.max() * 1000:.0f} ms")
    lat_rows = [("LMDB", *lat_lmdb)] + ([("PostgreSQL", *lat_pg)] if lat_pg else [])
    print(f"\nDecide on one node, closed loop x{args.concurrency} (Python generator), 10 arms:")
    print(fmt_table(("store", "decisions/s", "p50 ms", "p99 ms", "server CPU µs/call"),
                    [(r[0], f"{r[1]:,.0f}", f"{r[2]:.2f}", f"{r[3]:.2f}", f"{r[4]:.0f}") for r in lat_rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
