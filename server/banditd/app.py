"""Assembles and runs the server: store, writer, engine, gRPC with health and reflection."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from banditd.auth import AuthInterceptor, KeyRing, server_credentials
from banditd.config import ServerConfig
from banditd.engine import Engine
from banditd.history import Historian, p_best
from banditd.metrics import MetricsInterceptor, metrics_registry
from banditd.nudge import FALLBACK_S, Follower, Nudger
from banditd.retention import Janitor
from banditd.service import BanditdService, add_service
from banditd.store import Store
from banditd.web import WebServer
from banditd.writer import Writer
from banditd_client.v1 import banditd_pb2 as pb

log = logging.getLogger("banditd")
# After the grace period, how long handlers that ignore cancellation may delay the exit.
STOP_BOUND_S = 5.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Banditd"].full_name


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = Store(config.store_location)
        self.writer = Writer(
            self.store,
            max_batch=config.max_batch,
            queue_limit=config.queue_limit,
            linger_s=config.decision_linger_s,
        )
        self.engine = Engine(self.store, self.writer, seed=config.seed)
        # The processes of a pool refresh the same posteriors' propensities: together they
        # stay within the one share a single process has.
        pool_size = max(1, int(os.environ.get("BANDITD_POOL_SIZE", "1") or "1"))
        self.engine.propensity_share /= pool_size
        self.health = health.HealthServicer()
        self.keys = KeyRing(self.store)  # API keys (auth.py): auth is on while one is unrevoked
        self.registry = metrics_registry(self.engine, self.writer, self.store, self._p_best)
        # Metrics first, so calls the auth interceptor refuses are counted too.
        self.metrics = MetricsInterceptor(self.registry) if config.metrics else None
        interceptors: list[grpc.ServerInterceptor] = [AuthInterceptor(self.keys)]
        if self.metrics is not None:
            interceptors.insert(0, self.metrics)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="banditd-rpc"),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 1)],
            interceptors=interceptors,
        )
        add_service(BanditdService(self.engine, config.stream_limit, config.stream_idle_s, self.keys), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)  # TLS only when --tls-cert/--tls-key are set
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"could not bind {config.host}:{config.port}")
        self._stopped = threading.Event()
        self.nudger: Nudger | None = None
        self.follower: Follower | None = None
        self.janitor = Janitor(self.writer, config.retention_hours * 3600.0, config.retention_sweep_s)
        self.historian = Historian(self.engine, self.writer, config.history_seconds)
        self.web = (
            WebServer(self.engine, self.registry, self.keys, config.host, config.http_port)
            if config.http_port
            else None
        )

    def _p_best(self, experiment_id: str) -> dict[str, float]:
        spec = self.engine.get_experiment(experiment_id)
        best = p_best(self.engine, experiment_id) or []
        return {arm.id: p for arm, p in zip(spec.arms, best, strict=False)}

    def start(self) -> None:
        self.engine.load()
        self.writer.start()
        if self.config.shared_store:
            self.engine.shared = True
            # Picks up experiments and rewards the other processes committed: when a member on
            # this machine says it committed, else (nodes on PostgreSQL) every --refresh-ms.
            gap = max(0.001, self.config.refresh_ms / 1000.0)
            follower = Follower(self.engine.refresh_from_store, gap, gap)
            if not self.config.store:  # a pool on one machine (nodes on PostgreSQL: no nudges)
                self.nudger = Nudger.for_pool_member(self.config.data_dir, self.writer.commit_now, follower.poke)
                if self.nudger is not None:
                    self.engine.nudge_others = self.nudger.nudge_others
                    self.writer.notify_commit = self.nudger.committed
                    follower.fallback_s = max(gap, FALLBACK_S)
            self.follower = follower
            follower.start()
        threading.Thread(
            target=self.engine.run_background, args=(self._stopped,), name="banditd-background", daemon=True
        ).start()
        threading.Thread(
            target=self.engine.guardian.run, args=(self._stopped,), name="banditd-guardrails", daemon=True
        ).start()
        if os.environ.get("BANDITD_WORKER_INDEX", "0") == "0":  # one sweeper and historian per pool
            self.janitor.start()
            threading.Thread(
                target=self.historian.run, args=(self._stopped,), name="banditd-history", daemon=True
            ).start()
        self.grpc.start()
        if self.web is not None:
            self.web.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"port": self.port, **self.config.as_dict()}})

    def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets running ones finish (at most `grace` seconds, then they
        are cancelled; a handler that still does not return is abandoned after STOP_BOUND_S),
        commits queued writes, closes."""
        if self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_s if grace is None else grace
        self._stopped.set()
        if self.follower is not None:
            self.follower.stop()
        self.janitor.stop()
        if self.web is not None:
            self.web.stop()
        self.health.enter_graceful_shutdown()
        if not self.grpc.stop(grace).wait(grace + STOP_BOUND_S):
            log.warning("calls still running %.0f s after the grace period; stopping anyway", STOP_BOUND_S)
        self.writer.close()
        if self.nudger is not None:
            self.nudger.close()
        self.store.close()
        if self.metrics is not None:
            self.metrics.flush()  # multiprocess mode: the last counts (os._exit skips atexit)
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()


def serve(config: ServerConfig) -> None:
    if config.worker_count > 1 and not config.pool_member:
        from banditd.pool import run_pool

        run_pool(config)
        return
    server = Server(config)
    server.start()
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Wake now and then: Python runs signal handlers only when the main thread runs bytecode,
    # and a SIGTERM the kernel hands to another thread does not end a lock wait without timeout
    # (seen once: a test's SIGTERM unanswered for 30 s).
    while not done.wait(0.5):
        pass
    server.stop()
    # Handler threads stuck in a client's stream would keep the interpreter alive (the thread
    # pool joins them at exit): everything durable is committed and closed, so leave now.
    logging.shutdown()
    os._exit(0)
