"""Prometheus metrics: the standard gRPC server metrics and banditd's own state.

Two sources, one scrape:

* `MetricsInterceptor` (a `grpc.ServerInterceptor` for the sync server) records, per call, the
  metrics of go-grpc-prometheus / py-grpc-prometheus: `grpc_server_started_total`,
  `grpc_server_handled_total`, `grpc_server_msg_received_total`, `grpc_server_msg_sent_total`
  and the histogram `grpc_server_handling_seconds`, labelled `grpc_type` (unary,
  client_stream, server_stream, bidi_stream), `grpc_service`, `grpc_method` and, on handled
  and handling seconds, `grpc_code` (the `grpc.StatusCode` name: OK, INVALID_ARGUMENT, ...).
  Put it first in the server's interceptor list so that calls other interceptors refuse
  (authentication) are counted too.
* `BanditdCollector` reads the engine, writer and store when scraped (nothing is added to the
  decision path): per-experiment and per-arm statistics, learning-loop alarms, the writer's
  queue and group-commit latency, the LMDB map.

`metrics_registry(...)` builds the registry to scrape and `exposition(registry)` renders it.

Single process: the interceptor's metrics live in that registry (give the interceptor the
same registry: `MetricsInterceptor(registry)`).

Several processes (`--workers N`, with `PROMETHEUS_MULTIPROC_DIR` set for every process
before it starts, to an empty directory): the interceptor's metrics are created in the
default registry in prometheus_client's multiprocess mode, whatever registry the interceptor
is given. Each process counts in memory as in a single process and writes what it counted to
its files in that directory every FLUSH_INTERVAL_S (1 s) and at exit (`MetricsInterceptor.flush`
before an `os._exit`), so a scrape lags by up to a second. The registry that
`metrics_registry` returns is a fresh one holding a `MultiProcessCollector` (the gRPC metrics
summed over every process, live or exited, since the directory was emptied) and the
`BanditdCollector` of the process that answers the scrape. Of the latter:

* the same in every process (read from the shared store, each process catching up within its
  refresh interval): `banditd_decisions_total`, `banditd_rewards_total`,
  `banditd_arm_pulls_total`, `banditd_arm_observations`, `banditd_arm_reward_sum`,
  `banditd_arm_posterior_mean`, `banditd_arm_p_best`, `banditd_experiment_paused`,
  `banditd_experiment_arms`, `banditd_lmdb_size_bytes`, `banditd_lmdb_map_bytes`;
* the answering process's own: `banditd_arm_allocation_share` (its recent decisions),
  `banditd_reward_rate_per_second` and `banditd_alarms` (its learning monitor: the rewards it
  committed), `banditd_writer_*` and `banditd_commit_*` (its writer thread),
  `banditd_collector_errors_total`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from time import perf_counter
from typing import Any, Protocol

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from banditd.errors import BanditdError, ExperimentNotFound
from banditd.writer import BATCH_SIZE_BUCKETS, COMMIT_SECONDS_BUCKETS

log = logging.getLogger("banditd.metrics")

# Handling time buckets: 100 µs (a Decide) to 10 s (a long stream or a stalled commit).
HANDLING_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
STARTED_HELP = "RPCs started on the server."
HANDLED_HELP = "RPCs completed on the server, whatever their status code."
RECEIVED_HELP = "Messages received by the server (requests)."
SENT_HELP = "Messages sent by the server (responses)."
HANDLING_HELP = "Time the server took to handle RPCs (to the handler's last response), by method and code."
GRPC_CODE_LABELS = (*GRPC_LABELS, "grpc_code")
UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"
# How long a P(best) estimate is reused (it costs milliseconds per experiment).
ANALYSIS_TTL_S = 30.0
# Arm-level series of an experiment are limited to this many arms (those with most pulls).
MAX_ARM_SERIES = 1000
# Multiprocess mode: how often the gRPC metrics counted in memory are written for the scrape.
FLUSH_INTERVAL_S = 1.0
# Wrapped handlers kept per method (one per distinct handler object; see `_wrap_cached`).
_WRAPPED_PER_METHOD = 16


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, None when it is off."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


# gRPC server metrics.
class MethodRecorder(Protocol):
    """What a wrapped handler records for one (method, type)."""

    def start(self) -> None: ...  # a call started
    start_unary: Callable[[], object]  # a call started with its one request
    def receive(self) -> None: ...  # one request message of a stream
    def send(self) -> None: ...  # one response message
    def ok(self, elapsed: float) -> None: ...  # a unary response call ended OK, its response sent
    def done(self, code: str, elapsed: float) -> None: ...  # a call ended with `code`


class GrpcServerMetrics(Protocol):
    def method(self, full_method: str, grpc_type: str) -> MethodRecorder: ...
    def flush(self) -> None: ...


class _Tally:
    """One (method, type) of one process: plain numbers behind one lock, exposed by
    `LocalGrpcMetrics.collect`. The two records of every unary call stay off the lock: a
    start is a counter's `next` and an OK end an append to a deque (both atomic), counted
    into the numbers when they are read (or every SETTLE_EVERY calls)."""

    __slots__ = ("labels", "lock", "started", "received", "sent", "by_code", "ok_stats", "start_unary", "_unary",
                 "_ok_new")  # fmt: skip
    SETTLE_EVERY = 4096

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.lock = threading.Lock()
        self.started = self.received = self.sent = 0
        # code -> [calls, seconds sum, calls per HANDLING_SECONDS_BUCKETS bucket (+Inf last)]
        self.by_code: dict[str, list[Any]] = {}
        self.ok_stats = self._stats("OK")
        # Calls started with their one request (each counts as started and received).
        self._unary = itertools.count()
        self.start_unary: Callable[[], object] = self._unary.__next__
        self._ok_new: deque[float] = deque()

    def _stats(self, code: str) -> list[Any]:
        found = self.by_code.get(code)
        if found is None:
            found = self.by_code[code] = [0, 0.0, [0] * (len(HANDLING_SECONDS_BUCKETS) + 1)]
        return found

    def start(self) -> None:
        with self.lock:
            self.started += 1

    def receive(self) -> None:
        with self.lock:
            self.received += 1

    def send(self) -> None:
        with self.lock:
            self.sent += 1

    def ok(self, elapsed: float) -> None:
        new = self._ok_new
        new.append(elapsed)
        if len(new) >= self.SETTLE_EVERY:
            self._settle()

    def _settle(self) -> None:
        """Counts the OK ends appended so far (their responses were sent)."""
        new, stats = self._ok_new, self.ok_stats
        with self.lock:
            for _ in range(len(new)):
                elapsed = new.popleft()
                stats[0] += 1
                stats[1] += elapsed
                stats[2][bisect_left(HANDLING_SECONDS_BUCKETS, elapsed)] += 1
                self.sent += 1

    def done(self, code: str, elapsed: float) -> None:
        bucket = bisect_left(HANDLING_SECONDS_BUCKETS, elapsed)
        with self.lock:
            stats = self._stats(code)
            stats[0] += 1
            stats[1] += elapsed
            stats[2][bucket] += 1

    def snapshot(self) -> tuple[int, int, int, list[tuple[str, int, float, list[int]]]]:
        self._settle()
        unary = int(repr(self._unary)[6:-1])  # the count's next value, without taking it
        with self.lock:
            codes = [(code, n, total, list(buckets)) for code, (n, total, buckets) in self.by_code.items()]
            return self.started + unary, self.received + unary, self.sent, codes


class LocalGrpcMetrics(Collector):
    """The gRPC server metrics of this process, as a collector of one registry."""

    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._lock = threading.Lock()

    def method(self, full_method: str, grpc_type: str) -> _Tally:
        key = (full_method, grpc_type)
        with self._lock:
            found = self._tallies.get(key)
            if found is None:
                found = self._tallies[key] = _Tally((grpc_type, *split_method(full_method)))
            return found

    def all(self) -> list[_Tally]:
        with self._lock:
            return list(self._tallies.values())

    def flush(self) -> None:
        """Nothing to do: collected when scraped."""

    def describe(self) -> Iterator[Metric]:
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(self.all())

    def _families(self, tallies: list[_Tally]) -> Iterator[Metric]:
        started = CounterMetricFamily("grpc_server_started_total", STARTED_HELP, labels=GRPC_LABELS)
        handled = CounterMetricFamily("grpc_server_handled_total", HANDLED_HELP, labels=GRPC_CODE_LABELS)
        received = CounterMetricFamily("grpc_server_msg_received_total", RECEIVED_HELP, labels=GRPC_LABELS)
        sent = CounterMetricFamily("grpc_server_msg_sent_total", SENT_HELP, labels=GRPC_LABELS)
        handling = HistogramMetricFamily("grpc_server_handling_seconds", HANDLING_HELP, labels=GRPC_CODE_LABELS)
        bounds = [floatToGoString(b) for b in HANDLING_SECONDS_BUCKETS] + ["+Inf"]
        for tally in tallies:
            n_started, n_received, n_sent, codes = tally.snapshot()
            labels = list(tally.labels)
            started.add_metric(labels, n_started)
            received.add_metric(labels, n_received)
            sent.add_metric(labels, n_sent)
            for code, n, total, buckets in codes:
                handled.add_metric([*labels, code], n)
                handling.add_metric([*labels, code], list(zip(bounds, accumulate(buckets), strict=True)), total)
        return iter((started, handled, received, sent, handling))


class SharedGrpcMetrics:
    """Multiprocess mode: the same in-memory tallies on the call path (an increment of a
    multiprocess value writes to its file: ~2.5 µs, six of them a call), added every
    `FLUSH_INTERVAL_S` by a daemon thread (and by `flush()`, and at exit) to
    prometheus_client metrics of the default registry, whose values go to
    PROMETHEUS_MULTIPROC_DIR for a MultiProcessCollector to sum over the processes."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.tallies = LocalGrpcMetrics()
        self.started = Counter("grpc_server_started_total", STARTED_HELP, GRPC_LABELS, registry=registry)
        self.handled = Counter("grpc_server_handled_total", HANDLED_HELP, GRPC_CODE_LABELS, registry=registry)
        self.msg_received = Counter("grpc_server_msg_received_total", RECEIVED_HELP, GRPC_LABELS, registry=registry)
        self.msg_sent = Counter("grpc_server_msg_sent_total", SENT_HELP, GRPC_LABELS, registry=registry)
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            HANDLING_HELP,
            GRPC_CODE_LABELS,
            registry=registry,
            buckets=HANDLING_SECONDS_BUCKETS,
        )
        # What was flushed of each tally: (started, received, sent, {code: (n, sum, buckets)}).
        self._flushed: dict[int, tuple[int, int, int, dict[str, tuple[int, float, list[int]]]]] = {}
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        atexit.register(self.flush)

    def method(self, full_method: str, grpc_type: str) -> _Tally:
        if self._pid != os.getpid():  # first use (or a forked child): start the flusher
            with self._flush_lock:
                if self._pid != os.getpid():
                    self._pid = os.getpid()
                    self._thread = threading.Thread(target=self._run, name="banditd-metrics-flush", daemon=True)
                    self._thread.start()
        return self.tallies.method(full_method, grpc_type)

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the next round retries
                log.exception("metrics: flushing gRPC metrics failed")

    def flush(self) -> None:
        """Adds what the tallies counted since the last flush to the multiprocess metrics."""
        with self._flush_lock:
            for tally in self.tallies.all():
                started, received, sent, codes = tally.snapshot()
                prev = self._flushed.get(id(tally), (0, 0, 0, {}))
                labels = tally.labels
                if started > prev[0]:
                    self.started.labels(*labels).inc(started - prev[0])
                if received > prev[1]:
                    self.msg_received.labels(*labels).inc(received - prev[1])
                if sent > prev[2]:
                    self.msg_sent.labels(*labels).inc(sent - prev[2])
                flushed_codes = dict(prev[3])
                for code, n, total, buckets in codes:
                    p_n, p_total, p_buckets = prev[3].get(code, (0, 0.0, [0] * len(buckets)))
                    if n > p_n:
                        self.handled.labels(*labels, code).inc(n - p_n)
                        _add_to_histogram(
                            self.handling.labels(*labels, code),
                            total - p_total,
                            [b - p for b, p in zip(buckets, p_buckets, strict=True)],
                        )
                    flushed_codes[code] = (n, total, buckets)
                self._flushed[id(tally)] = (started, received, sent, flushed_codes)


def _add_to_histogram(child: Any, total: float, counts: list[int]) -> None:
    """Adds observations already bucketed (`counts`: one per bucket, +Inf last) to a
    prometheus_client Histogram child. prometheus_client observes one value at a time only,
    so this uses its per-bucket values (`_buckets`, `_sum`; checked by the tests)."""
    buckets, value_sum = child._buckets, child._sum
    if len(buckets) != len(counts):
        raise RuntimeError(f"histogram has {len(buckets)} buckets, expected {len(counts)}")
    value_sum.inc(total)
    for value, n in zip(buckets, counts, strict=True):
        if n:
            value.inc(n)


_metrics_lock = threading.Lock()
_local_metrics: weakref.WeakKeyDictionary[CollectorRegistry, LocalGrpcMetrics] = weakref.WeakKeyDictionary()
_shared_metrics: SharedGrpcMetrics | None = None


def grpc_server_metrics(registry: CollectorRegistry = REGISTRY) -> GrpcServerMetrics:
    """The gRPC server metrics of `registry`, registered in it on first use. In multiprocess
    mode, the process-wide ones of the default registry whatever `registry` (a
    MultiProcessCollector reads them from PROMETHEUS_MULTIPROC_DIR)."""
    global _shared_metrics
    with _metrics_lock:
        if multiprocess_dir():
            if _shared_metrics is None:
                _shared_metrics = SharedGrpcMetrics(REGISTRY)
            return _shared_metrics
        found = _local_metrics.get(registry)
        if found is None:
            found = _local_metrics[registry] = LocalGrpcMetrics()
            registry.register(found)
        return found


def split_method(full_method: str) -> tuple[str, str]:
    """'/banditd.v1.Banditd/Decide' -> ('banditd.v1.Banditd', 'Decide')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def outcome_code(context: grpc.ServicerContext, failed: bool) -> str:
    """The status code name of a call whose handler just finished (`failed`: it raised).

    As grpc reports it: a call the client cancelled (or whose deadline passed) gets no status
    from the server, so it is CANCELLED (DEADLINE_EXCEEDED when no time was left); otherwise
    the code the handler set (`set_code`, `abort`), else OK, or UNKNOWN for an exception."""
    if not context.is_active():
        try:
            remaining = context.time_remaining()
        except Exception:  # noqa: BLE001 - a context without deadlines
            remaining = None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    # grpc sends the code set even when the handler then raised (`_abortion_code`).
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Records the gRPC server metrics of every call of a sync `grpc.server`.

    Handlers are wrapped once per method (and distinct handler object) and reused. A unary
    call costs two perf_counter reads, `context.code()` and `context.is_active()`, and two
    short lock sections on its method's numbers, in multiprocess mode too (there a thread
    writes them to the metric files every FLUSH_INTERVAL_S). Methods the server does not know
    pass through (None: UNIMPLEMENTED, not counted)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.metrics = grpc_server_metrics(registry)
        self._wrapped: dict[str, dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]] = {}

    def flush(self) -> None:
        """Multiprocess mode: writes what was counted since the last flush (it happens every
        FLUSH_INTERVAL_S and at interpreter exit; call it before `os._exit`). Else nothing."""
        self.metrics.flush()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        slot = self._wrapped.get(method)
        if slot is not None:
            found = slot.get(id(handler))
            if found is not None:
                return found[1]
        return self._wrap_cached(method, handler)

    def _wrap_cached(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # Keyed by the handler's identity, holding the handler so that its id stays its own.
        # Interceptors before this one may build a handler per call: the slot is then bounded.
        wrapped = self.wrap(method, handler)
        slot = self._wrapped.setdefault(method, {})
        if len(slot) >= _WRAPPED_PER_METHOD:
            slot.clear()
        slot[id(handler)] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` with every call recorded (same serializers and kind)."""
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        des, ser = handler.request_deserializer, handler.response_serializer
        if streaming_in and streaming_out:
            m = self.metrics.method(method, BIDI_STREAM)
            return grpc.stream_stream_rpc_method_handler(
                _streaming_response(handler.stream_stream, m, True), request_deserializer=des, response_serializer=ser
            )
        if streaming_in:
            m = self.metrics.method(method, CLIENT_STREAM)
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(handler.stream_unary, m, True), request_deserializer=des, response_serializer=ser
            )
        if streaming_out:
            m = self.metrics.method(method, SERVER_STREAM)
            return grpc.unary_stream_rpc_method_handler(
                _streaming_response(handler.unary_stream, m, False), request_deserializer=des, response_serializer=ser
            )
        m = self.metrics.method(method, UNARY)
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, m, False), request_deserializer=des, response_serializer=ser
        )


Behavior = Callable[[Any, grpc.ServicerContext], Any]
_NOT_SENT = ("CANCELLED", "DEADLINE_EXCEEDED")


def _unary_response(behavior: Behavior, m: MethodRecorder, streaming_in: bool) -> Behavior:
    """unary and client_stream calls: one response, returned by the handler."""
    start, start_unary, receive, ok, done, send = m.start, m.start_unary, m.receive, m.ok, m.done, m.send

    def recorded(request: Any, context: grpc.ServicerContext) -> Any:
        if streaming_in:
            start()
            request = _counted(request, receive)
        else:
            start_unary()
        t0 = perf_counter()
        try:
            response = behavior(request, context)
        except BaseException:
            done(outcome_code(context, True), perf_counter() - t0)
            raise
        elapsed = perf_counter() - t0
        if context.code() is None and context.is_active():  # the common case
            ok(elapsed)
        else:
            code = outcome_code(context, False)
            done(code, elapsed)
            if code not in _NOT_SENT:
                send()  # the response goes out with the status the handler set
        return response

    return recorded


def _streaming_response(behavior: Behavior, m: MethodRecorder, streaming_in: bool) -> Behavior:
    """server_stream and bidi_stream calls: the handler returns an iterator of responses."""

    def recorded(request: Any, context: grpc.ServicerContext) -> Any:
        if streaming_in:
            m.start()
            request = _counted(request, m.receive)
        else:
            m.start_unary()
        t0 = perf_counter()
        try:
            responses = behavior(request, context)
        except BaseException:
            m.done(outcome_code(context, True), perf_counter() - t0)
            raise
        return _responses(responses, context, m, t0)

    return recorded


def _counted(requests: Iterable[Any], receive: Callable[[], None]) -> Iterator[Any]:
    for request in requests:
        receive()
        yield request


def _responses(responses: Iterable[Any], context: grpc.ServicerContext, m: MethodRecorder, t0: float) -> Iterator[Any]:
    send = m.send
    try:
        for response in responses:
            yield response
            send()  # grpc asks for the next response once this one is sent
    except GeneratorExit:
        # grpc stopped asking: the client cancelled or went away (or the server is stopping).
        m.done(outcome_code(context, False), perf_counter() - t0)
        close = getattr(responses, "close", None)
        if close is not None:
            close()  # the handler's own clean-up runs now, not at garbage collection
        raise
    except BaseException:
        m.done(outcome_code(context, True), perf_counter() - t0)
        raise
    m.done(outcome_code(context, False), perf_counter() - t0)


# banditd state, read at scrape time.
def _histogram(
    name: str, documentation: str, bounds: Iterable[float], counts: list[int], total: float
) -> HistogramMetricFamily:
    counts = list(counts)  # one snapshot: _count is the +Inf bucket
    buckets: list[tuple[str, float]] = []
    acc = 0
    for bound, n in zip(bounds, counts, strict=False):
        acc += n
        buckets.append((floatToGoString(bound), acc))
    buckets.append(("+Inf", sum(counts)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


class BanditdCollector(Collector):
    """banditd's state as Prometheus metrics, read from the engine, writer and store when
    scraped. An experiment that fails to read is left out of that scrape and counted in
    `banditd_collector_errors_total`.

    `analysis(experiment_id) -> {arm_id: P(best)}` is optional; its result is reused for
    `analysis_ttl_s`. Arm-level series are limited to the `max_arms` arms of an experiment
    with most pulls."""

    def __init__(
        self,
        engine: Any,
        writer: Any,
        store: Any,
        analysis: Callable[[str], dict[str, float]] | None = None,
        *,
        analysis_ttl_s: float = ANALYSIS_TTL_S,
        max_arms: int = MAX_ARM_SERIES,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.store = store
        self.analysis = analysis
        self.analysis_ttl_s = analysis_ttl_s
        self.max_arms = max_arms
        self.errors = 0
        self._p_best: dict[str, tuple[float, dict[str, float]]] = {}

    def describe(self) -> list[Metric]:
        return []  # generated at scrape time; registering must not run a scrape

    def collect(self) -> Iterator[Metric]:
        exp, arm, code = ["experiment"], ["experiment", "arm"], ["experiment", "code"]
        decisions = CounterMetricFamily(
            "banditd_decisions_total",
            "Decisions served since the experiment was created (durable: survives restarts; every worker "
            "process's decisions).",
            labels=exp,
        )
        rewards = CounterMetricFamily(
            "banditd_rewards_total",
            "Reward events accepted since the experiment was created (durable; duplicates not counted).",
            labels=exp,
        )
        paused = GaugeMetricFamily("banditd_experiment_paused", "1 when the experiment is paused.", labels=exp)
        n_arms = GaugeMetricFamily("banditd_experiment_arms", "Arms of the experiment (retired included).", labels=exp)
        rate = GaugeMetricFamily(
            "banditd_reward_rate_per_second",
            "Reward events per second over the last 5 minutes (this process's commits).",
            labels=exp,
        )
        alarms = GaugeMetricFamily(
            "banditd_alarms", "Active learning-loop alarms (1 each; see GetDiagnostics).", labels=code
        )
        pulls = CounterMetricFamily(
            "banditd_arm_pulls_total", "Decisions that chose the arm since the experiment was created.", labels=arm
        )
        observations = GaugeMetricFamily(
            "banditd_arm_observations", "Matured observations behind the arm's posterior (undiscounted).", labels=arm
        )
        reward_sum = GaugeMetricFamily(
            "banditd_arm_reward_sum", "Sum of the arm's observed reward values (undiscounted).", labels=arm
        )
        share = GaugeMetricFamily(
            "banditd_arm_allocation_share",
            "Share of the arm among this process's last 1000 decisions of the experiment.",
            labels=arm,
        )
        mean = GaugeMetricFamily("banditd_arm_posterior_mean", "Posterior mean of the arm's reward.", labels=arm)
        p_best = GaugeMetricFamily(
            "banditd_arm_p_best",
            f"Posterior probability that the arm is the best (estimated at most every {self.analysis_ttl_s:g} s).",
            labels=arm,
        )
        specs = self._experiments()
        for gone in self._p_best.keys() - {s.id for s in specs}:
            self._p_best.pop(gone, None)  # deleted experiments
        for spec in specs:
            try:
                rows = self._experiment(spec)
            except ExperimentNotFound:
                continue  # deleted while scraping
            except Exception:  # noqa: BLE001 - one experiment must not break the scrape
                self.errors += 1
                log.exception("metrics: experiment %r could not be read", getattr(spec, "id", "?"))
                continue
            e = [spec.id]
            policy_decisions, diag, views, probs = rows
            decisions.add_metric(e, policy_decisions)
            rewards.add_metric(e, sum(v.rewards for v in views))
            paused.add_metric(e, 1.0 if spec.state == "paused" else 0.0)
            n_arms.add_metric(e, len(views))
            rate.add_metric(e, float(diag.get("reward_rate_per_second", 0.0)))
            for alarm in sorted({a[0] for a in diag.get("alarms", ())}):
                alarms.add_metric([spec.id, alarm], 1.0)
            if len(views) > self.max_arms:
                views = sorted(views, key=lambda v: v.pulls, reverse=True)[: self.max_arms]
            for v in views:
                a = [spec.id, v.arm_id]
                pulls.add_metric(a, v.pulls)
                observations.add_metric(a, v.observations)
                reward_sum.add_metric(a, v.reward_sum)
                share.add_metric(a, v.recent_share)
                mean.add_metric(a, v.mean)
                if probs is not None and v.arm_id in probs:
                    p_best.add_metric(a, probs[v.arm_id])
        yield from (decisions, rewards, paused, n_arms, rate, alarms)
        yield from (pulls, observations, reward_sum, share, mean)
        if self.analysis is not None:
            yield p_best
        yield from self._writer_metrics()
        yield from self._store_metrics()
        yield CounterMetricFamily(
            "banditd_collector_errors_total",
            "Parts of scrapes left out because reading them failed (see the server log).",
            value=self.errors,
        )

    def _experiments(self) -> list[Any]:
        try:
            return list(self.engine.list_experiments())
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("metrics: experiments could not be listed")
            return []

    def _experiment(self, spec: Any) -> tuple[int, dict[str, Any], list[Any], dict[str, float] | None]:
        rt = self.engine.runtime(spec.id)
        if rt is None:
            raise ExperimentNotFound(spec.id)
        diag = self.engine.diagnostics(spec.id)
        views = list(diag["arms"])
        return int(rt.policy.decisions), diag, views, self._probabilities(spec.id)

    def _probabilities(self, experiment_id: str) -> dict[str, float] | None:
        if self.analysis is None:
            return None
        now = time.monotonic()
        cached = self._p_best.get(experiment_id)
        if cached is not None and now - cached[0] < self.analysis_ttl_s:
            return cached[1]
        try:
            probs = {str(k): float(v) for k, v in self.analysis(experiment_id).items()}
        except ExperimentNotFound:
            raise
        except BanditdError:  # refused, e.g. fewer than 2 active arms: no P(best), no error
            probs = {}
        except Exception:  # noqa: BLE001 - kept (empty) for the TTL: not retried every scrape
            self.errors += 1
            log.exception("metrics: P(best) of experiment %r failed", experiment_id)
            probs = {}
        self._p_best[experiment_id] = (now, probs)
        return probs

    def _writer_metrics(self) -> Iterator[Metric]:
        w = self.writer
        try:
            families: list[Metric] = [
                GaugeMetricFamily(
                    "banditd_writer_queue_depth", "Write operations queued for the group commit.", value=w.pending
                ),
                CounterMetricFamily(
                    "banditd_writer_failed_commits_total",
                    "Group commits the store refused (nothing of them was written).",
                    value=w.failed_commits,
                ),
                GaugeMetricFamily(
                    "banditd_writer_storage_error",
                    "1 while the store refuses writes (disk or map full, I/O error); decisions are refused.",
                    value=0.0 if w.storage_error is None else 1.0,
                ),
                _histogram(
                    "banditd_commit_seconds",
                    "Time of each group commit's LMDB transaction commit (its fsync).",
                    COMMIT_SECONDS_BUCKETS,
                    w.commit_seconds_counts,
                    w.commit_seconds_sum,
                ),
                _histogram(
                    "banditd_commit_batch_size",
                    "Write operations per group commit.",
                    BATCH_SIZE_BUCKETS,
                    w.batch_size_counts,
                    float(w.ops_committed),
                ),
            ]
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("metrics: writer statistics could not be read")
            return
        yield from families

    def _store_metrics(self) -> Iterator[Metric]:
        try:
            info = self.store.env.info()
            page = self.store.env.stat()["psize"]
            used = (info["last_pgno"] + 1) * page
            size = info["map_size"]
        except Exception:  # noqa: BLE001 - e.g. the store is closed
            self.errors += 1
            log.exception("metrics: LMDB statistics could not be read")
            return
        yield GaugeMetricFamily(
            "banditd_lmdb_size_bytes", "Bytes of the LMDB map in use (last page number x page size).", value=used
        )
        yield GaugeMetricFamily(
            "banditd_lmdb_map_bytes", "Size of the LMDB memory map (it doubles when full).", value=size
        )


def metrics_registry(
    engine: Any, writer: Any, store: Any, analysis: Callable[[str], dict[str, float]] | None = None
) -> CollectorRegistry:
    """The registry to scrape: gRPC server metrics and `BanditdCollector`. In multiprocess
    mode (PROMETHEUS_MULTIPROC_DIR set) the gRPC metrics come through a
    MultiProcessCollector, summed over the worker processes (see the module doc)."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        grpc_server_metrics(registry)  # MetricsInterceptor(registry) then records into these
    registry.register(BanditdCollector(engine, writer, store, analysis))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of a scrape of `registry` in the Prometheus text format."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
