"""Reward ingestion benchmark: durable rewards/s through RewardStream, and how soon an
acknowledged reward shows in the next Decide.

1. Throughput: makes --decisions decisions, then sends --rewards rewards (unique event ids,
   cycling over those decisions) on --streams concurrent client streams of pre-serialised
   RewardRequests. RewardStream answers once every reward of the stream is committed
   (synced LMDB group commit), so accepted/s over the wall time is durable rewards/s.
   Against a server it started, it then kills the server with SIGKILL, restarts it on the
   same data dir and checks that every acknowledged reward is still counted.
2. Time to effect: a 2-arm greedy experiment; each trial rewards the trailing arm (one win
   on each of just enough k=2 slate decisions) to make it lead, then polls Decide, round robin over
   --channels connections (so every server process is asked), until each connection has
   returned the new leader. Reported: ack -> first Decide showing it, and ack -> every
   connection showing it.

    python loadtest/bench_ingest.py                       # local server, 1 and 2 processes
    python loadtest/bench_ingest.py --target host:50051 --rewards 200000
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from _common import (
    SERVICE,
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
    process_cpu_seconds,
    temp_workdir,
    wait_healthy,
)

from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

TARGET_REWARDS_PER_S = 100_000


@dataclass
class IngestResult:
    mode: str
    rewards: int
    streams: int
    seconds: float
    accepted: int
    duplicate: int
    rejected: int
    server_cpu_us: float
    client_cpu_us: float
    survived_kill: str  # "yes", "NO (...)" or "not checked"

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


def make_decisions(target: str, experiment: str, count: int) -> list[str]:
    """Decision ids for `count` decisions, made with the closed-loop generator."""
    with LoadGenerator(1, 4) as gen:
        res = gen.closed_loop(target, method_path("Decide"), decide_payloads(experiment, 4096), 32, 3600.0,
                              count=count, keep_responses=True)
    if res.failed:
        raise RuntimeError(f"{res.failed} of {count} decisions failed")
    return [pb.DecideResponse.FromString(raw).decision_id for raw in res.responses]


def reward_payloads(decision_ids: list[str], count: int, run: str) -> list[bytes]:
    """Binary rewards with unique event ids, cycling over the decisions; serialised now so
    the timed part does no protobuf work."""
    n = len(decision_ids)
    return [
        pb.RewardRequest(decision_id=decision_ids[i % n], value=float(i & 1), event_id=f"{run}-{i}").SerializeToString()
        for i in range(count)
    ]


def stream_rewards(
    target: str, payloads: list[bytes], streams: int, method: str = "RewardStream"
) -> tuple[float, list[pb.RewardStreamResponse]]:
    """Sends the payloads on `streams` concurrent streams (one connection each); returns the
    wall time until the last stream was acknowledged."""
    path = method_path(method)
    parts = [payloads[k::streams] for k in range(streams)]
    results: list[pb.RewardStreamResponse | BaseException] = [RuntimeError("not run")] * streams
    channels = [channel(target) for _ in range(streams)]
    calls = [ch.stream_unary(path, response_deserializer=pb.RewardStreamResponse.FromString) for ch in channels]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=10)
    barrier = threading.Barrier(streams + 1)

    def send(k: int) -> None:
        barrier.wait()
        try:
            results[k] = calls[k](iter(parts[k]), timeout=600)
        except grpc.RpcError as err:
            results[k] = err

    threads = [threading.Thread(target=send, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for ch in channels:
        ch.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} reward streams failed: {errors[0]}")
    return elapsed, [r for r in results if isinstance(r, pb.RewardStreamResponse)]


def total_rewards(target: str, experiment: str) -> int:
    with channel(target) as ch:
        stats = pb_grpc.BanditdStub(ch).GetArmStats(pb.GetArmStatsRequest(experiment_id=experiment), timeout=30)
    return stats.total_rewards


def batch_payloads(payloads: list[bytes], size: int) -> list[bytes]:
    """RewardBatch messages of `size` rewards, serialised now."""
    return [
        pb.RewardBatch(rewards=[pb.RewardRequest.FromString(p) for p in payloads[i:i + size]]).SerializeToString()
        for i in range(0, len(payloads), size)
    ]


def ingest_modes(args: argparse.Namespace) -> list[str]:
    """RewardStream always; RewardBatchStream too when the contract has it."""
    modes = ["RewardStream"]
    if args.batch > 0 and "RewardBatchStream" in SERVICE.methods_by_name:
        modes.append("RewardBatchStream")
    return modes


def bench_throughput(args: argparse.Namespace, target: str, server: ServerProcess | None) -> list[IngestResult]:
    run = uuid.uuid4().hex[:8]
    experiment = f"ingest-{run}"
    with channel(target) as ch:
        ensure_experiment(pb_grpc.BanditdStub(ch), ExperimentPlan(experiment, args.arms))
    print(f"  {args.decisions:,} decisions ...", flush=True)
    decisions = make_decisions(target, experiment, args.decisions)
    results = []
    for mode in ingest_modes(args):
        payloads = reward_payloads(decisions, args.rewards, f"{run}-{mode}")  # fresh event ids per mode
        if mode == "RewardBatchStream":
            payloads = batch_payloads(payloads, args.batch)
        print(f"  {args.rewards:,} rewards on {args.streams} {mode} calls ...", flush=True)
        cpu0, client0 = (server.cpu_seconds() if server else 0.0), process_cpu_seconds()
        seconds, responses = stream_rewards(target, payloads, args.streams, mode)
        cpu = (server.cpu_seconds() - cpu0) if server else float("nan")
        client_cpu = process_cpu_seconds() - client0
        results.append(IngestResult(
            mode=mode if mode == "RewardStream" else f"{mode} x{args.batch}", rewards=args.rewards,
            streams=args.streams, seconds=seconds, accepted=sum(r.accepted for r in responses),
            duplicate=sum(r.duplicate for r in responses), rejected=sum(r.rejected for r in responses),
            server_cpu_us=cpu / max(1, args.rewards) * 1e6, client_cpu_us=client_cpu / max(1, args.rewards) * 1e6,
            survived_kill="not checked",
        ))
        first_rejection = next((r.rejections[0] for r in responses if r.rejections), None)
        if first_rejection is not None:
            print(f"  first rejection: {first_rejection.code} {first_rejection.reason}")
    if server is not None and args.kill_check:
        acked = sum(r.accepted for r in results)
        before = total_rewards(target, experiment)
        server.kill()
        server.start()
        after = total_rewards(target, experiment)
        verdict = "yes" if after >= acked else f"NO ({after:,} of {acked:,} after kill -9)"
        for r in results:
            r.survived_kill = verdict
        print(f"  after kill -9 and restart: {after:,} rewards counted (acknowledged {acked:,}; "
              f"GetArmStats just before the kill: {before:,})", flush=True)
    return results


@dataclass
class EffectResult:
    trials: int
    first_ms: np.ndarray  # ack -> first Decide returning the new leader
    all_ms: np.ndarray  # ack -> every connection returned it
    polls: np.ndarray  # Decide calls until every connection saw it
    timeouts: int
    connections: int


SETTLE_S = 0.5  # > the default --decision-linger-ms (200) + --refresh-ms (50)


def _leader_and_needed(stub: pb_grpc.BanditdStub, experiment: str) -> tuple[str, str, int]:
    """(leader, trailer, m): m slates of both arms, each with a win for the trailer, make the
    trailer lead. Beta(1, 1) priors; every decision is an observation (decision mode: 0 unless
    rewarded) and the events of one decision count once (`max`), so each win needs its own
    decision, which also counts a 0 for the leader."""
    stats = stub.GetArmStats(pb.GetArmStatsRequest(experiment_id=experiment), timeout=10).arms
    lead, trail = sorted(stats, key=lambda s: s.mean, reverse=True)
    a_t, n_t = 1.0 + trail.reward_sum, 2.0 + trail.observations
    a_l, n_l = 1.0 + lead.reward_sum, 2.0 + lead.observations
    need = 1
    while (a_t + need) / (n_t + need) <= a_l / (n_l + need) + 1e-9:  # strictly ahead, with margin
        need += 1
    return lead.arm_id, trail.arm_id, need


def bench_effect(args: argparse.Namespace, target: str) -> EffectResult:
    experiment = f"effect-{uuid.uuid4().hex[:8]}"
    channels = [channel(target) for _ in range(args.channels)]
    stubs = [pb_grpc.BanditdStub(ch) for ch in channels]
    ensure_experiment(stubs[0], ExperimentPlan(experiment, 2, policy="greedy"))
    decide = pb.DecideRequest(experiment_id=experiment, unit_id="probe")
    first, full, polls, timeouts = [], [], [], 0
    for trial in range(args.trials):
        # The previous trial's polls are decisions (trials of 0 for the arm they returned);
        # with several processes those answered elsewhere commit within their linger. The
        # wins needed must be counted on the settled posterior, else a trial's reward makes
        # the trailer lead in this process's view only until they land, and the trial times
        # the other arm's polls wearing it down (~the 200 ms linger), not the reward.
        time.sleep(SETTLE_S)
        _, trailer, need = _leader_and_needed(stubs[0], experiment)
        slates = [
            stubs[0].Decide(pb.DecideRequest(experiment_id=experiment, unit_id=f"slate-{j}", k=2), timeout=10)
            for j in range(need)
        ]
        rewards = [
            pb.RewardRequest(decision_id=slate.decision_id, value=1.0, arm_id=trailer, event_id=f"{trial}-{j}")
            for j, slate in enumerate(slates)
        ]
        resp = stubs[0].RewardStream(iter(rewards), timeout=30)
        acked = time.perf_counter()
        if resp.accepted != need:
            raise RuntimeError(f"trial {trial}: {resp.accepted} of {need} rewards accepted: {resp.rejections}")
        seen: dict[int, float] = {}
        count = 0
        while len(seen) < len(stubs) and time.perf_counter() - acked < args.effect_timeout:
            k = count % len(stubs)
            count += 1
            if k in seen:
                continue
            arm = stubs[k].Decide(decide, timeout=10).arms[0].arm_id
            if arm == trailer:
                seen[k] = time.perf_counter()
        if len(seen) < len(stubs):
            timeouts += 1
            continue
        first.append((min(seen.values()) - acked) * 1e3)
        full.append((max(seen.values()) - acked) * 1e3)
        polls.append(count)
    for ch in channels:
        ch.close()
    return EffectResult(args.trials, np.array(first), np.array(full), np.array(polls), timeouts, len(stubs))


def _pct(a: np.ndarray, q: float) -> str:
    return f"{np.percentile(a, q):.2f}" if a.size else "-"


def report(ing: list[IngestResult], eff: EffectResult | None, where: str) -> None:
    print(f"\nIngest benchmark against {where}; {cpu_model()}")
    if ing:
        print(fmt_table(
            ("RPC", "rewards", "streams", "seconds", "durable rewards/s", "accepted", "duplicate", "rejected",
             "server us/reward", "client us/reward", "kill -9 survived"),
            [(r.mode, f"{r.rewards:,}", r.streams, f"{r.seconds:.2f}", f"{r.rate:,.0f}", f"{r.accepted:,}",
              r.duplicate, r.rejected, f"{r.server_cpu_us:.1f}", f"{r.client_cpu_us:.1f}", r.survived_kill)
             for r in ing],
        ))
        for r in ing:
            met = "MET" if r.rate >= TARGET_REWARDS_PER_S else "NOT MET"
            print(f"target >= {TARGET_REWARDS_PER_S:,} durable rewards/s via {r.mode}: {r.rate:,.0f}/s -> {met}")
    if eff is not None:
        print(fmt_table(
            ("reward ack -> Decide shows it", "trials", "p50 ms", "p95 ms", "max ms", "Decide calls p50", "timeouts"),
            [("first connection", eff.trials, _pct(eff.first_ms, 50), _pct(eff.first_ms, 95),
              _pct(eff.first_ms, 100), _pct(eff.polls, 50), eff.timeouts),
             ("every connection", eff.trials, _pct(eff.all_ms, 50), _pct(eff.all_ms, 95),
              _pct(eff.all_ms, 100), "", "")],
        ))
        print(f"(Decide calls until all {eff.connections} connections showed the new leader; {eff.connections} = "
              "each did on its first Decide after the ack)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="host:port of a running server; default: start one locally")
    ap.add_argument("--workers", default="1,2", help="local server: one run per process count")
    ap.add_argument("--server-args", default="", help="extra `banditd serve` flags for the local server")
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--rewards", type=int, default=500_000)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000, help="rewards per RewardBatch (0: skip RewardBatchStream)")
    ap.add_argument("--arms", type=int, default=100)
    ap.add_argument("--trials", type=int, default=50, help="time-to-effect trials")
    ap.add_argument("--channels", type=int, default=8, help="time to effect: connections polled")
    ap.add_argument("--effect-timeout", type=float, default=10.0)
    ap.add_argument("--no-kill-check", dest="kill_check", action="store_false")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-effect", action="store_true")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, target: str, server: ServerProcess | None) -> None:
    ing = [] if args.skip_throughput else bench_throughput(args, target, server)
    eff = None if args.skip_effect else bench_effect(args, target)
    report(ing, eff, target if server is None else f"a local server ({target}): {' '.join(server.cmd[2:])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("\n== ingest", flush=True)
    if args.target:
        wait_healthy(args.target, 10)
        run(args, args.target, None)
        return 0
    worker_counts: list[int | None] = [int(w) for w in args.workers.split(",")]
    if not banditd_supports_workers():
        print("`banditd serve` has no --workers: one run with its defaults")
        worker_counts = [None]
    for workers in worker_counts:
        extra = [*shlex.split(args.server_args), *(("--workers", str(workers)) if workers else ())]
        with temp_workdir("banditd-ingest-") as tmp, ServerProcess.banditd(Path(tmp), *extra) as server:
            run(args, server.target, server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
