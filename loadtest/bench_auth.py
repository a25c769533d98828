"""What API keys cost: server CPU per Decide with auth off and with auth on.

Starts one server per configuration (one process each, `--workers 1`): a data dir without
keys (auth off, calls carry no key), one with a key (auth on, every call carries it) and one
with a key limited to an experiment-id prefix (the handler is wrapped to check the request's
experiment). One client sends --calls sequential unary Decides (pre-serialised requests on a
raw channel, so the client adds as little as possible) to each in turn, after a warm-up.
Server CPU is utime + stime of the server process from /proc/PID/stat (every thread: RPC
threads, the writer, background work) before and after. Rounds are interleaved (the order of
the configurations alternates) and the table shows medians over --rounds.

End to end, the difference is a few microseconds in ~1 ms of server CPU per call, below the
noise of a shared machine; a second table therefore times the interceptor alone, in this
process (KeyRing on a temporary store, a no-op handler, the metadata grpc passes): the CPU it
adds per call over calling the handler directly.

    python loadtest/bench_auth.py                   # 5,000 calls, 3 rounds
    python loadtest/bench_auth.py --calls 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from _common import (
    ExperimentPlan,
    ServerProcess,
    cpu_model,
    decide_payloads,
    experiment_proto,
    fmt_table,
    method_path,
    temp_workdir,
)

from banditd.auth import AuthInterceptor, KeyRing, new_key
from banditd.store import Store
from banditd_client.v1 import banditd_pb2 as pb

CLK_TCK = os.sysconf("SC_CLK_TCK")
EXPERIMENT = "team-a/bench"


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Config:
    name: str
    key_scopes: tuple[str, ...] | None  # None: no key in the store, none sent
    prefix: str = ""
    server: ServerProcess | None = None
    key: str | None = None
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def start(cfg: Config, workdir: Path) -> None:
    srv = ServerProcess.banditd(workdir, "--workers", "1", name=cfg.name.replace(" ", "-"))
    admin = None
    if cfg.key_scopes is not None:
        assert srv.data_dir is not None
        store = Store(srv.data_dir)
        admin, admin_rec = new_key(["admin"], name="bench-admin")
        cfg.key, rec = new_key(cfg.key_scopes, prefix=cfg.prefix, name="bench")
        store.add_api_key(admin_rec)
        store.add_api_key(rec)
        store.close()
    srv.start()
    cfg.server = srv
    md = (("authorization", f"Bearer {admin}"),) if admin else None
    with grpc.insecure_channel(srv.target) as ch:
        create = ch.unary_unary(
            method_path("CreateExperiment"),
            request_serializer=pb.CreateExperimentRequest.SerializeToString,
            response_deserializer=pb.Experiment.FromString,
        )
        plan = ExperimentPlan(EXPERIMENT, 10)
        create(pb.CreateExperimentRequest(experiment=experiment_proto(plan)), metadata=md, timeout=30)


def run_once(cfg: Config, payloads: list[bytes], calls: int, warmup: int) -> tuple[float, float]:
    """(calls/s, server CPU µs per call) of `calls` sequential Decides."""
    assert cfg.server is not None and cfg.server.proc is not None
    md = (("authorization", f"Bearer {cfg.key}"),) if cfg.key else None
    with grpc.insecure_channel(cfg.server.target) as ch:
        decide = ch.unary_unary(method_path("Decide"))
        for i in range(warmup):
            decide(payloads[i % len(payloads)], metadata=md, timeout=10)
        time.sleep(0.2)  # let the warm-up's decision records commit
        pid = cfg.server.proc.pid
        cpu0, t0 = proc_cpu_seconds(pid), time.perf_counter()
        for i in range(calls):
            decide(payloads[i % len(payloads)], metadata=md, timeout=10)
        elapsed = time.perf_counter() - t0
        time.sleep(0.05)  # the last group commit (decision records are written behind)
        cpu = proc_cpu_seconds(pid) - cpu0
    return calls / elapsed, cpu / calls * 1e6


HandlerCallDetails = namedtuple("HandlerCallDetails", "method invocation_metadata")


def interceptor_cost(iterations: int, repeats: int = 5) -> list[tuple[str, float, float]]:
    """(configuration, µs per call through the interceptor, µs added over no interceptor),
    best of `repeats` (the least disturbed run)."""
    logging.getLogger("banditd.auth").setLevel(logging.ERROR)
    noop = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    request = pb.DecideRequest(experiment_id=EXPERIMENT, unit_id="u")
    common = (("user-agent", f"grpc-python/{grpc.__version__} grpc-c/50.0.0 (linux; chttp2)"),)
    method = method_path("Decide")

    def timed(fn: object) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(iterations):
                fn()  # type: ignore[operator]
            best = min(best, time.process_time() - t0)
        return best / iterations * 1e6

    plain = HandlerCallDetails(method, common)
    base = timed(lambda: (lambda d: noop)(plain).unary_unary(request, None))
    out = []
    with tempfile.TemporaryDirectory(prefix="banditd-bench-auth-") as tmp:
        off, on = Store(Path(tmp) / "off"), Store(Path(tmp) / "on")
        key, rec = new_key(["decide"])
        pkey, prec = new_key(["decide"], prefix="team-a/")
        on.add_api_key(rec)
        on.add_api_key(prec)
        for name, store, k in (("no keys (auth off)", off, None), ("key (auth on)", on, key),
                               ("key with prefix", on, pkey)):  # fmt: skip
            icpt = AuthInterceptor(KeyRing(store))
            det = HandlerCallDetails(method, common + ((("authorization", f"Bearer {k}"),) if k else ()))
            per = timed(
                lambda icpt=icpt, det=det: icpt.intercept_service(lambda d: noop, det).unary_unary(request, None)
            )
            out.append((name, per, per - base))
        off.close()
        on.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000, help="Decides per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--no-prefix", action="store_true", help="skip the prefix-limited key configuration")
    ap.add_argument("--micro-iterations", type=int, default=100_000, help="calls per in-process timing")
    args = ap.parse_args(argv)
    micro = interceptor_cost(args.micro_iterations)
    configs = [Config("no keys (auth off)", None), Config("key (auth on)", ("decide",))]
    if not args.no_prefix:
        configs.append(Config("key with prefix", ("decide",), prefix="team-a/"))
    payloads = decide_payloads(EXPERIMENT, 10_000)
    with temp_workdir("banditd-bench-auth-") as tmp:
        workdir = Path(tmp)
        try:
            for cfg in configs:
                start(cfg, workdir)
            for r in range(args.rounds):
                order = configs if r % 2 == 0 else configs[::-1]
                for cfg in order:
                    rate, cpu = run_once(cfg, payloads, args.calls, args.warmup)
                    cfg.rates.append(rate)
                    cfg.cpu_us.append(cpu)
                    print(f"round {r + 1} {cfg.name}: {rate:,.0f} calls/s, {cpu:.0f} µs server CPU/call",
                          file=sys.stderr)  # fmt: skip
        finally:
            for cfg in configs:
                if cfg.server is not None:
                    cfg.server.stop()
    base = statistics.median(configs[0].cpu_us)
    rows = []
    for cfg in configs:
        cpu = statistics.median(cfg.cpu_us)
        rows.append((
            cfg.name, f"{statistics.median(cfg.rates):,.0f}", f"{cpu:.0f}",
            "-" if cfg is configs[0] else f"{cpu - base:+.0f} ({(cpu / base - 1) * 100:+.1f}%)",
            " / ".join(f"{c:.0f}" for c in cfg.cpu_us),
        ))  # fmt: skip
    print(f"\n{args.calls:,} sequential unary Decides per run, one client, {args.rounds} interleaved rounds, "
          f"10-arm Thompson; {cpu_model()}")  # fmt: skip
    print(fmt_table(
        ("server", "calls/s (median)", "server CPU µs/call (median)", "vs auth off", "per round µs"), rows
    ))  # fmt: skip
    print(f"\nThe interceptor alone, in process (best of 5 x {args.micro_iterations:,} calls):")
    print(fmt_table(
        ("configuration", "µs/call with interceptor", "µs added by auth"),
        [(n, f"{p:.2f}", f"{a:+.2f}") for n, p, a in micro],
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
