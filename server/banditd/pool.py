"""A pool of server processes on one port (SO_REUSEPORT) sharing one LMDB store.

The parent only supervises: it starts N `banditd serve --pool-member` processes (each creates
its gRPC server and opens LMDB itself, never inheriting them across a fork), forwards SIGTERM
and SIGINT so each drains and commits its queue, and restarts a process that dies.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from banditd.config import ServerConfig

log = logging.getLogger("banditd")
RESTART_BACKOFF_S = 1.0
STOP_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the supervisor dies (even by kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def member_command(config: ServerConfig, index: int) -> list[str]:
    cmd = [
        sys.executable, "-m", "banditd", "serve", "--pool-member", "--workers", "1",
        "--host", config.host, "--port", str(config.port), "--data-dir", config.data_dir,
        "--threads", str(config.threads), "--max-concurrent-rpcs", str(config.max_concurrent_rpcs),
        "--max-batch", str(config.max_batch), "--queue-limit", str(config.queue_limit),
        "--refresh-ms", str(config.refresh_ms), "--log-level", config.log_level,
        "--retention-hours", str(config.retention_hours), "--retention-sweep-s", str(config.retention_sweep_s),
        "--max-streams", str(config.max_streams), "--stream-idle-s", str(config.stream_idle_s),
        "--shutdown-grace-s", str(config.shutdown_grace_s),
        "--http-port", str(config.http_port), "--history-seconds", str(config.history_seconds),
    ]  # fmt: skip
    if config.decision_linger_ms is not None:  # else the members' own default
        cmd += ["--decision-linger-ms", str(config.decision_linger_ms)]
    if config.store:
        cmd += ["--store", config.store]
    if not config.metrics:
        cmd.append("--no-metrics")
    if config.seed is not None:
        cmd += ["--seed", str(config.seed + index)]
    for flag, value in (
        ("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key), ("--tls-client-ca", config.tls_client_ca),
    ):
        if value:
            cmd += [flag, value]
    return cmd


def run_pool(config: ServerConfig) -> None:
    if config.port == 0:
        raise SystemExit("--workers > 1 needs an explicit --port (the processes share it)")
    from banditd.auth import server_credentials

    server_credentials(config)  # unreadable TLS files: fail here, not in a restart loop
    n = config.worker_count
    # prometheus_client's multiprocess mode: the workers' gRPC metrics are summed at a scrape.
    metrics_dir = tempfile.mkdtemp(prefix="banditd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    atexit.register(shutil.rmtree, metrics_dir, True)
    stopping = threading.Event()
    procs: list[subprocess.Popen[bytes]] = []

    def start(index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "BANDITD_WORKER_INDEX": str(index), "BANDITD_POOL_SIZE": str(config.worker_count)}
        return subprocess.Popen(member_command(config, index), env=env, preexec_fn=_die_with_parent)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping %d workers", signum, len(procs))
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs.extend(start(i) for i in range(n))
    log.info("worker pool started", extra={"fields": {"workers": n, "pids": [p.pid for p in procs]}})
    while not stopping.is_set():
        for i, p in enumerate(procs):
            if p.poll() is not None and not stopping.is_set():
                log.warning("worker %d (pid %d) exited with %s; restarting", i, p.pid, p.returncode)
                time.sleep(RESTART_BACKOFF_S)
                procs[i] = start(i)
        stopping.wait(0.2)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    log.info("worker pool stopped")
