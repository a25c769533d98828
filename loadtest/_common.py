"""Helpers shared by the load tests: server processes, experiments, raw RPC handles, stats."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

LOADTEST_DIR = Path(__file__).resolve().parent
REPO = LOADTEST_DIR.parent
REPORTS = LOADTEST_DIR / "reports"
SERVICE = pb.DESCRIPTOR.services_by_name["Banditd"]
# Every client call carries a deadline (a call without one waits forever on a stuck server).
SETUP_TIMEOUT = 30.0


# Polling a starting server: grpc backs a refused connection off for 1 s and more (each
# start waited ~0.3 s longer than the server needed); retry every 20-50 ms instead.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def method_path(name: str) -> str:
    """The HTTP/2 path of a Banditd RPC, as the generated stub uses it."""
    return f"/{SERVICE.full_name}/{SERVICE.methods_by_name[name].name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel(target: str) -> grpc.Channel:
    """A channel with its own TCP connection: channels otherwise share subchannels, and
    SO_REUSEPORT spreads connections, not calls, over server processes."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def banditd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "banditd", *args]


def banditd_supports_workers() -> bool:
    out = subprocess.run(banditd_cmd("serve", "--help"), capture_output=True, text=True, check=False)
    return "--workers" in out.stdout


class ServerProcess:
    """A server (banditd or the reference server) on a free local port, in its own process
    group so that worker processes it forks are stopped with it."""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: Path, data_dir: Path | None = None) -> None:
        self.nice = 0  # < 0 (root only): ahead of other programs on a shared machine
        self.name = name
        self.cmd = cmd
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.data_dir = data_dir
        self.log_path = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def banditd(cls, workdir: Path, *extra: str, name: str = "banditd") -> ServerProcess:
        port = free_port()
        data_dir = workdir / f"data-{port}"
        cmd = banditd_cmd(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), *extra
        )
        return cls(name, cmd, port, workdir, data_dir)

    @classmethod
    def reference(cls, workdir: Path, mode: str) -> ServerProcess:
        port = free_port()
        cmd = [sys.executable, str(LOADTEST_DIR / "reference_server.py"), "--port", str(port), "--mode", mode]
        return cls(f"reference-{mode}", cmd, port, workdir)

    def start(self, timeout: float = 60.0) -> ServerProcess:  # a loaded 2-core CI box is slow
        nice = self.nice
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=(lambda: renice(nice)) if nice else None,  # worker processes inherit it
            )
        wait_healthy(self.target, timeout, self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """The server process and every process it started (worker processes)."""
        if not self.alive():
            return []
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_bytes(self) -> int:
        return self.memory()[0]

    def memory(self) -> tuple[int, int]:
        """(RSS, anonymous part of it) over all processes. The rest of RSS is file-backed,
        mostly LMDB's memory map: pages the kernel can drop and re-read at will."""
        rss = anon = 0
        for pid in self.pids():
            try:
                info = psutil.Process(pid).memory_info()
            except psutil.NoSuchProcess:
                continue
            rss += info.rss
            anon += info.rss - info.shared
        return rss, anon

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        # Workers left behind by a parent that exited first.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group: a crash, nothing flushed on the way out."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def renice(increment: int) -> bool:
    """Changes this process's niceness; False when not allowed (negative needs root)."""
    try:
        os.nice(increment)
        return True
    except OSError:
        return False


def wait_healthy(target: str, timeout: float, server: ServerProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=FAST_RECONNECT) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if server is not None and not server.alive():
                raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.05)
    tail = server.log_tail() if server is not None else ""
    raise RuntimeError(f"{target} did not become healthy within {timeout:.0f}s\n{tail}")


def temp_workdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)


@dataclass(frozen=True)
class ExperimentPlan:
    id: str
    arms: int
    sticky: bool = False
    policy: str = "thompson"
    # "flat": Beta(1, 1) everywhere (a fresh experiment); "learned": per-arm priors as if
    # thousands of rewards had arrived (the steady state of a running experiment).
    posterior: str = "flat"


def learned_priors(arms: int, seed: int = 7) -> list[tuple[float, float]]:
    """Posteriors of a long-running experiment: true rates ~ Beta(2, 40), 50..5,000 pulls each."""
    rng = np.random.default_rng(seed)
    rates = rng.beta(2.0, 40.0, arms)
    pulls = np.exp(rng.uniform(np.log(50), np.log(5000), arms))
    wins = np.round(rates * pulls)
    return [(1.0 + w, 1.0 + n - w) for w, n in zip(wins, np.round(pulls), strict=True)]


def experiment_proto(plan: ExperimentPlan) -> pb.Experiment:
    arms = [pb.Arm(id=f"arm-{i}") for i in range(plan.arms)]
    if plan.posterior == "learned":
        for arm, (a, b) in zip(arms, learned_priors(plan.arms), strict=True):
            arm.prior.CopyFrom(pb.Prior(alpha=a, beta=b))
    return pb.Experiment(id=plan.id, arms=arms, policy=pb.Policy(name=plan.policy), sticky=plan.sticky)


def ensure_experiment(stub: pb_grpc.BanditdStub, plan: ExperimentPlan) -> bool:
    """Creates the experiment; True if created, False if it already existed."""
    try:
        stub.CreateExperiment(pb.CreateExperimentRequest(experiment=experiment_proto(plan)), timeout=SETUP_TIMEOUT)
        return True
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.ALREADY_EXISTS:
            return False
        raise


def decide_payloads(experiment_id: str, count: int, population: int = 1_000_000, seed: int = 1) -> list[bytes]:
    """Pre-serialised DecideRequests with unit ids drawn from a large population."""
    rng = np.random.default_rng(seed)
    units = rng.integers(0, population, count)
    return [pb.DecideRequest(experiment_id=experiment_id, unit_id=f"u{u}").SerializeToString() for u in units]


def percentiles_ms(latencies_s: np.ndarray, qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    if latencies_s.size == 0:
        return [float("nan")] * len(qs)
    return [float(v) * 1e3 for v in np.percentile(latencies_s, qs)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"unknown CPU x{os.cpu_count()}"


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, right-aligned numbers, that stays readable in a terminal or a report."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                       strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Load generation. Work happens in spawned worker processes (grpc and fork do not mix, and
# a worker's GIL is its own), each with one asyncio loop and a few grpc.aio channels that
# send pre-serialised requests: no protobuf work and no convenience client on the hot path.


@dataclass
class GenResult:
    """What one run of the generator measured (merged over worker processes)."""

    latencies: np.ndarray  # seconds, completed OK calls only
    failed: int
    elapsed: float
    lag: np.ndarray  # open loop: actual send minus scheduled send, seconds
    cpu: float  # generator CPU seconds
    responses: list[bytes]

    @property
    def completed(self) -> int:
        return int(self.latencies.size)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0


def _worker_main(conn: Any, nice: int = 0) -> None:
    """Worker process: runs commands from the parent until told to stop."""
    import asyncio

    if nice:
        renice(nice)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    state: dict[str, Any] = {"target": None, "channels": []}
    while True:
        cmd = conn.recv()
        if cmd["op"] == "stop":
            break
        calls = loop.run_until_complete(_calls_for(state, cmd["target"], cmd["method"], cmd["channels"]))
        runner = _open_loop if cmd["op"] == "open" else _closed_loop
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        out = loop.run_until_complete(runner(calls, cmd))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu"] = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
        conn.send(out)
    loop.run_until_complete(_close_channels(state))


async def _close_channels(state: dict[str, Any]) -> None:
    for ch in state["channels"]:
        await ch.close()
    state["channels"] = []


async def _calls_for(state: dict[str, Any], target: str, method: str, count: int) -> list[Any]:
    if state["target"] != target or len(state["channels"]) != count:
        await _close_channels(state)
        opts = [("grpc.use_local_subchannel_pool", 1)]
        state["channels"] = [grpc.aio.insecure_channel(target, options=opts) for _ in range(count)]
        state["target"] = target
        for ch in state["channels"]:
            await asyncio_wait_ready(ch)
    return [ch.unary_unary(method) for ch in state["channels"]]


async def asyncio_wait_ready(ch: grpc.aio.Channel, timeout: float = 10.0) -> None:
    import asyncio

    await asyncio.wait_for(ch.channel_ready(), timeout)


async def _open_loop(calls: list[Any], cmd: dict[str, Any]) -> dict[str, Any]:
    """Fixed arrival rate. Each call's latency counts from its scheduled send time, so a
    stalled server (or generator) cannot hide its queueing (coordinated omission)."""
    import asyncio

    payloads: list[bytes] = cmd["payloads"]
    n, period, timeout = cmd["count"], cmd["period"], cmd["timeout"]
    t0 = time.perf_counter() + (cmd["start_at"] - time.time())
    scheduled = t0 + cmd["offset"] + np.arange(n) * period
    done_at = np.full(n, np.nan)
    sent_at = np.full(n, np.nan)
    failed = 0

    async def one(i: int, call: Any, payload: bytes) -> None:
        nonlocal failed
        try:
            await call(payload, timeout=timeout)
            done_at[i] = time.perf_counter()
        except grpc.RpcError:
            failed += 1

    tasks = []
    i, nc, npl = 0, len(calls), len(payloads)
    loop = asyncio.get_running_loop()
    while i < n:
        now = time.perf_counter()
        while i < n and scheduled[i] <= now:
            tasks.append(loop.create_task(one(i, calls[i % nc], payloads[i % npl])))
            sent_at[i] = now
            i += 1
        if i < n:
            # epoll sleeps in whole milliseconds (rounded up): the oversleep, at most ~1 ms,
            # counts against the server (reported as generator lag); spinning instead would
            # take a CPU the server needs.
            await asyncio.sleep(max(0.0, scheduled[i] - time.perf_counter()))
    await asyncio.gather(*tasks)
    ok = np.isfinite(done_at)
    return {
        "latencies": done_at[ok] - scheduled[ok],
        "failed": failed,
        "elapsed": float(n * period),
        "lag": sent_at - scheduled,
        "responses": [],
    }


async def _closed_loop(calls: list[Any], cmd: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` callers, each sending its next call when the previous one returns."""
    import asyncio

    payloads: list[bytes] = cmd["payloads"]
    limit: int | None = cmd.get("count")
    keep: bool = cmd.get("keep_responses", False)
    stop_at = time.perf_counter() + cmd["duration"]
    latencies: list[float] = []
    responses: list[bytes] = []
    failed = 0
    sent = 0

    async def caller(k: int) -> None:
        nonlocal failed, sent
        call = calls[k % len(calls)]
        while time.perf_counter() < stop_at and (limit is None or sent < limit):
            payload = payloads[sent % len(payloads)]
            sent += 1
            start = time.perf_counter()
            try:
                raw = await call(payload, timeout=cmd["timeout"])
                latencies.append(time.perf_counter() - start)
                if keep:
                    responses.append(raw)
            except grpc.RpcError:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(cmd["concurrency"])))
    return {
        "latencies": np.array(latencies),
        "failed": failed,
        "elapsed": time.perf_counter() - started,
        "lag": np.zeros(0),
        "responses": responses,
    }


class LoadGenerator:
    """A few worker processes driving one target; the parent only coordinates."""

    def __init__(self, processes: int = 1, channels: int = 4, nice: int = 0) -> None:
        ctx = mp.get_context("spawn")
        self.channels = max(1, channels // processes)
        self.workers = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, nice), daemon=True)
            proc.start()
            self.workers.append((proc, parent))

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                conn.send({"op": "stop"})
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, cmds: list[dict[str, Any]]) -> GenResult:
        for (_, conn), cmd in zip(self.workers, cmds, strict=True):
            conn.send(cmd)
        outs = [conn.recv() for _, conn in self.workers]
        return GenResult(
            latencies=np.concatenate([o["latencies"] for o in outs]),
            failed=sum(o["failed"] for o in outs),
            elapsed=max(o["elapsed"] for o in outs),
            lag=np.concatenate([o["lag"] for o in outs]),
            cpu=sum(o["cpu"] for o in outs),
            responses=[r for o in outs for r in o["responses"]],
        )

    def open_loop(
        self, target: str, method: str, payloads: list[bytes], rate: float, duration: float, timeout: float = 2.0
    ) -> GenResult:
        """Sends at `rate` calls/s for `duration` s, interleaved over the workers."""
        procs = len(self.workers)
        per_worker = int(rate * duration / procs)
        start_at = time.time() + 0.2  # every worker starts on the same clock
        cmds = [
            {"op": "open", "target": target, "method": method, "channels": self.channels, "payloads": payloads,
             "count": per_worker, "period": procs / rate, "offset": k / rate, "start_at": start_at,
             "timeout": timeout}
            for k in range(procs)
        ]
        return self._run(cmds)

    def closed_loop(
        self, target: str, method: str, payloads: list[bytes], concurrency: int, duration: float,
        count: int | None = None, keep_responses: bool = False, timeout: float = 10.0,
    ) -> GenResult:
        """`concurrency` calls in flight for `duration` s (or until `count` calls)."""
        procs = len(self.workers)
        cmds = [
            {"op": "closed", "target": target, "method": method, "channels": self.channels, "payloads": payloads,
             "concurrency": max(1, concurrency // procs), "duration": duration,
             "count": None if count is None else count // procs, "keep_responses": keep_responses,
             "timeout": timeout}
            for _ in range(procs)
        ]
        return self._run(cmds)


def process_cpu_seconds() -> float:
    """This process's CPU time, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used (steal and idle excluded)."""
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def steal_cpu_seconds() -> float:
    """CPU time the hypervisor gave to other guests while ours wanted it."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


def wait_for_quiet(max_busy: float = 0.15, window: float = 1.0, max_wait: float = 60.0) -> float:
    """Waits until the machine is mostly idle and the hypervisor steals little (other builds
    or tests would skew latencies); returns the busy-or-stolen fraction seen last."""
    deadline = time.monotonic() + max_wait
    busy = 1.0
    while time.monotonic() < deadline:
        t = psutil.cpu_times_percent(interval=window)
        busy = (100.0 - t.idle - getattr(t, "iowait", 0.0)) / 100.0  # steal counts as busy
        if busy <= max_busy:
            break
    return busy
