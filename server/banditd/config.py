"""Server configuration: flags with BANDITD_* environment equivalents."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Any

# Default linger of decision-only commits (see `ServerConfig.decision_linger_s`). On this
# VM a synced commit costs the writer ~1 ms of CPU: at 150 decisions/s, 50 ms meant ~0.1 ms
# per decision, 200 ms ~0.03 ms.
LOCAL_LINGER_MS = 200.0
NODES_LINGER_MS = 50.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    data_dir: str = "./data/banditd"
    # "" = the embedded LMDB store under data_dir; "postgresql://..." = a PostgreSQL database
    # that several banditd nodes share (banditd.pgkv).
    store: str = ""
    threads: int = 16
    max_concurrent_rpcs: int = 2000
    max_batch: int = 20000
    queue_limit: int = 200000
    # A commit holding only decision records waits this long for more (fewer fsyncs): the
    # crash window of decision records (README, Guarantees). Rewards never wait. None: 200 ms
    # on LMDB, 50 ms for nodes on PostgreSQL (`decision_linger_s`).
    decision_linger_ms: float | None = None
    seed: int | None = None
    log_level: str = "info"
    # Server processes sharing the port (SO_REUSEPORT) and the store; 0 = one per core.
    workers: int = 0
    # How often a pool process checks the store for other processes' commits.
    refresh_ms: float = 50.0
    # Decision records and reward events older than this are deleted (longer than the
    # longest attribution window: the default window is 7 days).
    retention_hours: float = 8 * 24
    retention_sweep_s: float = 60.0
    # Client streams served at once (beyond: RESOURCE_EXHAUSTED); 0 = half the RPC threads,
    # so streams can never take every thread from Decide.
    max_streams: int = 0
    # A client stream that sends nothing for this long is cancelled.
    stream_idle_s: float = 30.0
    # SIGTERM: calls in flight get this long to finish; the process exits at most a few
    # seconds later whatever they do.
    shutdown_grace_s: float = 5.0
    # TLS: server certificate chain and key (PEM files); with both the server listens with
    # TLS only. With a client CA too, clients must present a certificate it signed (mTLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Dashboard and Prometheus /metrics on this HTTP port (same host); 0 = off.
    http_port: int = 0
    # Seconds between history snapshots (allocation, rewards, posterior, P(best) over time).
    history_seconds: float = 60.0
    # Prometheus gRPC server metrics (grpc_server_*) recorded by an interceptor.
    metrics: bool = True
    # Set on the processes a pool starts (not a user option).
    pool_member: bool = False

    def __post_init__(self) -> None:
        if self.decision_linger_ms is not None and not 0 <= self.decision_linger_ms <= 10_000:
            raise ValueError(f"--decision-linger-ms must be in [0, 10000], got {self.decision_linger_ms}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be in [0, 65535], got {self.http_port}")
        if not self.history_seconds > 0:
            raise ValueError(f"--history-seconds must be positive, got {self.history_seconds}")
        if self.store and not self.store.startswith(("postgresql://", "postgres://")):
            raise ValueError("--store must be a postgresql:// URL (empty: LMDB under --data-dir)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certificates)")

    @property
    def store_location(self) -> str:
        """What `banditd.store.Store` opens: the PostgreSQL URL or the LMDB directory."""
        return self.store or self.data_dir

    @property
    def shared_store(self) -> bool:
        """Other processes may write the store: pool members, and every node on PostgreSQL."""
        return self.pool_member or bool(self.store)

    @property
    def decision_linger_s(self) -> float:
        """A reward through another process or node waits for its decision's commit. The
        members of a --workers pool ask each other to commit at once (`banditd.nudge`), so
        on LMDB a long linger costs nothing but the crash window; nodes on PostgreSQL cannot,
        so their rewards would wait out the linger: a shorter one there."""
        if self.decision_linger_ms is not None:
            return self.decision_linger_ms / 1000.0
        return (NODES_LINGER_MS if self.store else LOCAL_LINGER_MS) / 1000.0

    @property
    def stream_limit(self) -> int:
        return self.max_streams if self.max_streams > 0 else max(1, self.threads // 2)

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def as_dict(self) -> dict[str, Any]:
        """For logs: the store URL without its password."""
        d = asdict(self)
        if self.store:
            from banditd.pgkv import redact_url  # psycopg is only needed with a PostgreSQL store

            d["store"] = redact_url(self.store)
        return d


def _env(name: str, default: Any, cast: type = str) -> Any:
    raw = os.environ.get(f"BANDITD_{name.upper()}")
    return default if raw is None or raw == "" else cast(raw)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    p.add_argument("--host", default=_env("host", d.host), help="address to bind (BANDITD_HOST)")
    p.add_argument("--port", type=int, default=_env("port", d.port, int), help="port (BANDITD_PORT)")
    p.add_argument("--data-dir", default=_env("data_dir", d.data_dir), help="LMDB dir (BANDITD_DATA_DIR)")
    p.add_argument(
        "--store", default=_env("store", d.store),
        help="postgresql://user@host:port/db: keep state in PostgreSQL, shared by several banditd nodes, "
        "instead of LMDB under --data-dir (BANDITD_STORE)",
    )
    p.add_argument("--threads", type=int, default=_env("threads", d.threads, int), help="RPC threads (BANDITD_THREADS)")
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=_env("max_concurrent_rpcs", d.max_concurrent_rpcs, int),
        help="calls beyond this get RESOURCE_EXHAUSTED at once (BANDITD_MAX_CONCURRENT_RPCS)",
    )
    p.add_argument(
        "--max-batch", type=int, default=_env("max_batch", d.max_batch, int),
        help="writes per group commit (BANDITD_MAX_BATCH)",
    )
    p.add_argument(
        "--queue-limit", type=int, default=_env("queue_limit", d.queue_limit, int),
        help="pending writes before RESOURCE_EXHAUSTED (BANDITD_QUEUE_LIMIT)",
    )
    p.add_argument(
        "--decision-linger-ms", type=float, default=_env("decision_linger_ms", d.decision_linger_ms, float),
        help=f"a commit of decision records only waits this long for more; 0 = commit at once; default "
        f"{LOCAL_LINGER_MS:.0f}, {NODES_LINGER_MS:.0f} with --store (BANDITD_DECISION_LINGER_MS)",
    )
    p.add_argument("--seed", type=int, default=_env("seed", None, int), help="RNG seed (BANDITD_SEED)")
    p.add_argument("--log-level", default=_env("log_level", d.log_level), help="log level (BANDITD_LOG_LEVEL)")
    p.add_argument(
        "--workers", type=int, default=_env("workers", d.workers, int),
        help="server processes sharing the port and the store; 0 = one per core (BANDITD_WORKERS)",
    )
    p.add_argument(
        "--refresh-ms", type=float, default=_env("refresh_ms", d.refresh_ms, float),
        help="how often a worker picks up the other workers' commits (BANDITD_REFRESH_MS)",
    )
    p.add_argument(
        "--retention-hours", type=float, default=_env("retention_hours", d.retention_hours, float),
        help="delete decisions and reward events older than this (BANDITD_RETENTION_HOURS)",
    )
    p.add_argument(
        "--retention-sweep-s", type=float, default=_env("retention_sweep_s", d.retention_sweep_s, float),
        help="seconds between retention sweeps (BANDITD_RETENTION_SWEEP_S)",
    )
    p.add_argument(
        "--max-streams", type=int, default=_env("max_streams", d.max_streams, int),
        help="client streams served at once; 0 = half of --threads (BANDITD_MAX_STREAMS)",
    )
    p.add_argument(
        "--stream-idle-s", type=float, default=_env("stream_idle_s", d.stream_idle_s, float),
        help="cancel a client stream silent for this long (BANDITD_STREAM_IDLE_S)",
    )
    p.add_argument(
        "--shutdown-grace-s", type=float, default=_env("shutdown_grace_s", d.shutdown_grace_s, float),
        help="on SIGTERM, time for calls in flight to finish (BANDITD_SHUTDOWN_GRACE_S)",
    )
    p.add_argument(
        "--tls-cert", default=_env("tls_cert", d.tls_cert),
        help="PEM certificate chain; with --tls-key the server listens with TLS only (BANDITD_TLS_CERT)",
    )
    p.add_argument("--tls-key", default=_env("tls_key", d.tls_key), help="PEM private key (BANDITD_TLS_KEY)")
    p.add_argument(
        "--tls-client-ca", default=_env("tls_client_ca", d.tls_client_ca),
        help="PEM CA bundle: require client certificates signed by it, mTLS (BANDITD_TLS_CLIENT_CA)",
    )
    p.add_argument(
        "--http-port", type=int, default=_env("http_port", d.http_port, int),
        help="serve the dashboard and Prometheus /metrics on this port; 0 = off (BANDITD_HTTP_PORT)",
    )
    p.add_argument(
        "--history-seconds", type=float, default=_env("history_seconds", d.history_seconds, float),
        help="seconds between history snapshots for the dashboard (BANDITD_HISTORY_SECONDS)",
    )
    p.add_argument(
        "--no-metrics", action="store_true", default=_env("no_metrics", "") not in ("", "0"),
        help="do not record grpc_server_* metrics (BANDITD_NO_METRICS=1)",
    )
    p.add_argument("--pool-member", action="store_true", help=argparse.SUPPRESS)


def from_args(ns: argparse.Namespace) -> ServerConfig:
    try:
        return _from_args(ns)
    except ValueError as exc:
        raise SystemExit(f"banditd serve: {exc}") from None


def _from_args(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=ns.host,
        port=ns.port,
        data_dir=ns.data_dir,
        store=ns.store,
        threads=ns.threads,
        max_concurrent_rpcs=ns.max_concurrent_rpcs,
        max_batch=ns.max_batch,
        queue_limit=ns.queue_limit,
        decision_linger_ms=ns.decision_linger_ms,
        seed=ns.seed,
        log_level=ns.log_level,
        workers=ns.workers,
        refresh_ms=ns.refresh_ms,
        pool_member=ns.pool_member,
        retention_hours=ns.retention_hours,
        retention_sweep_s=ns.retention_sweep_s,
        max_streams=ns.max_streams,
        stream_idle_s=ns.stream_idle_s,
        shutdown_grace_s=ns.shutdown_grace_s,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        http_port=ns.http_port,
        history_seconds=ns.history_seconds,
        metrics=not ns.no_metrics,
    )
