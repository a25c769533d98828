"""Helpers shared by the load tests: server processes, experiments, raw RPC handles, stats."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

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

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_healthy(target: str, timeout: float, server: ServerProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
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
