"""Prometheus metrics: the gRPC interceptor through a real server, the banditd collector on a
real engine, multiprocess aggregation, and the interceptor's cost per call."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from banditd.engine import Engine, RewardInput
from banditd.errors import FailedPrecondition
from banditd.experiment import ArmSpec, ExperimentSpec
from banditd.metrics import (
    BanditdCollector,
    MetricsInterceptor,
    exposition,
    metrics_registry,
    outcome_code,
    split_method,
)
from banditd.store import Store
from banditd.writer import Writer

SERVICE = "test.v1.Probe"


# Scrape parsing.
Samples = list[tuple[str, dict[str, str], float]]


def scrape(registry: CollectorRegistry) -> Samples:
    body, content_type = exposition(registry)
    assert content_type.startswith("text/plain")
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def series(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    return [ls for n, ls, _ in samples if n == name and all(ls.get(k) == x for k, x in labels.items())]


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# A tiny service of every kind.
def ok(request: str, context: grpc.ServicerContext) -> str:
    return request.upper()


def invalid(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    raise AssertionError("abort returns by raising")


def boom(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise RuntimeError("bug")


def missing(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("no such thing")
    return b""


def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(0.3)
    return b"late"


def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def count_then_abort(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"1"
    yield b"2"
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stop")


class Endless:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            for _ in range(1000):
                yield b"tick"
                time.sleep(0.005)
        finally:
            self.closed.set()


def total(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return str(sum(1 for _ in requests)).encode()


def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


@pytest.fixture
def probe() -> Iterator[tuple[grpc.Channel, CollectorRegistry, Endless]]:
    registry = CollectorRegistry()
    endless = Endless()
    handlers = {
        "Ok": grpc.unary_unary_rpc_method_handler(
            ok, request_deserializer=bytes.decode, response_serializer=str.encode
        ),
        "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "CountThenAbort": grpc.unary_stream_rpc_method_handler(count_then_abort),
        "Endless": grpc.unary_stream_rpc_method_handler(endless),
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[MetricsInterceptor(registry)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, registry, endless
    channel.close()
    server.stop(None)


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_metrics_by_method_and_code(probe: tuple[grpc.Channel, CollectorRegistry, Endless]) -> None:
    channel, registry, _ = probe

    def uu(name: str) -> Callable[..., Any]:
        return channel.unary_unary(f"/{SERVICE}/{name}")

    for _ in range(3):
        assert uu("Ok")(b"hi", timeout=5) == b"HI"  # the handler's serializers are kept
    assert [_code(lambda: uu("Invalid")(b"x", timeout=5)) for _ in range(2)] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert _code(lambda: uu("Boom")(b"x", timeout=5)) == grpc.StatusCode.UNKNOWN
    assert _code(lambda: uu("Missing")(b"x", timeout=5)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: uu("Nope")(b"x", timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    assert list(channel.unary_stream(f"/{SERVICE}/Count")(b"4", timeout=5)) == [b"0", b"1", b"2", b"3"]
    got: list[bytes] = []
    assert _code(lambda: got.extend(channel.unary_stream(f"/{SERVICE}/CountThenAbort")(b"", timeout=5))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert got == [b"1", b"2"]
    assert channel.stream_unary(f"/{SERVICE}/Total")(iter([b"a"] * 5), timeout=5) == b"5"
    assert list(channel.stream_stream(f"/{SERVICE}/Echo")(iter([b"a", b"b", b"c"]), timeout=5)) == [b"a", b"b", b"c"]

    s = scrape(registry)
    handled, started = "grpc_server_handled_total", "grpc_server_started_total"
    sent, received = "grpc_server_msg_sent_total", "grpc_server_msg_received_total"
    assert value(s, handled, grpc_method="Ok", grpc_code="OK", grpc_type="unary", grpc_service=SERVICE) == 3
    assert value(s, handled, grpc_method="Invalid", grpc_code="INVALID_ARGUMENT") == 2
    assert value(s, handled, grpc_method="Boom", grpc_code="UNKNOWN") == 1
    assert value(s, handled, grpc_method="Missing", grpc_code="NOT_FOUND") == 1
    assert value(s, handled, grpc_method="Count", grpc_code="OK", grpc_type="server_stream") == 1
    assert value(s, handled, grpc_method="CountThenAbort", grpc_code="FAILED_PRECONDITION") == 1
    assert value(s, handled, grpc_method="Total", grpc_code="OK", grpc_type="client_stream") == 1
    assert value(s, handled, grpc_method="Echo", grpc_code="OK", grpc_type="bidi_stream") == 1
    # Every started call is handled, once; unknown methods are neither.
    for method in ("Ok", "Invalid", "Boom", "Missing", "Count", "CountThenAbort", "Total", "Echo"):
        assert value(s, started, grpc_method=method) == value(s, handled, grpc_method=method) > 0, method
    assert not series(s, started, grpc_method="Nope") and not series(s, handled, grpc_method="Nope")
    # Failed unary calls send no message; streams count each message.
    assert value(s, sent, grpc_method="Ok") == 3 and value(s, received, grpc_method="Ok") == 3
    assert value(s, sent, grpc_method="Invalid") == 0 and value(s, sent, grpc_method="Boom") == 0
    assert value(s, sent, grpc_method="Count") == 4 and value(s, sent, grpc_method="CountThenAbort") == 2
    assert value(s, received, grpc_method="Total") == 5 and value(s, sent, grpc_method="Total") == 1
    assert value(s, received, grpc_method="Echo") == 3 and value(s, sent, grpc_method="Echo") == 3
    # The histogram: one observation per handled call, by method and code, in sub-ms buckets.
    hist = "grpc_server_handling_seconds"
    assert value(s, f"{hist}_count", grpc_method="Ok", grpc_code="OK") == 3
    assert value(s, f"{hist}_count", grpc_method="Invalid", grpc_code="INVALID_ARGUMENT") == 2
    assert value(s, f"{hist}_bucket", grpc_method="Ok", grpc_code="OK", le="+Inf") == 3
    assert value(s, f"{hist}_bucket", grpc_method="Ok", grpc_code="OK", le="10.0") == 3
    assert {ls["le"] for ls in series(s, f"{hist}_bucket", grpc_method="Ok")} >= {"0.0001", "0.00025", "0.001", "10.0"}
    assert 0 < value(s, f"{hist}_sum", grpc_method="Ok") < 3.0


def test_cancelled_stream_and_deadline_are_recorded(probe: tuple[grpc.Channel, CollectorRegistry, Endless]) -> None:
    channel, registry, endless = probe
    call = channel.unary_stream(f"/{SERVICE}/Endless")(b"", timeout=10)
    for _ in range(3):
        next(call)
    call.cancel()
    assert endless.closed.wait(5), "the handler's generator is closed when the client cancels"

    def handled(method: str, code: str) -> float:
        return value(scrape(registry), "grpc_server_handled_total", grpc_method=method, grpc_code=code)

    wait_until(lambda: handled("Endless", "CANCELLED") == 1)
    assert value(scrape(registry), "grpc_server_msg_sent_total", grpc_method="Endless") >= 2

    assert _code(lambda: channel.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=0.05)) == (
        grpc.StatusCode.DEADLINE_EXCEEDED
    )
    wait_until(lambda: handled("Slow", "DEADLINE_EXCEEDED") == 1)
    s = scrape(registry)
    assert value(s, "grpc_server_handled_total", grpc_method="Slow") == 1
    assert value(s, "grpc_server_msg_sent_total", grpc_method="Slow") == 0


# Direct invocation (no server): the interceptor's pass-through and its cost.
class FakeContext:
    """The parts of grpc's servicer context the interceptor reads (with its lock, as grpc's)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._code: grpc.StatusCode | None = None
        self.active = True

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise Exception()  # noqa: TRY002 - as grpc does

    def is_active(self) -> bool:
        with self._condition:
            return self.active

    def time_remaining(self) -> float:
        return 5.0


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def wrapped_handler(interceptor: MetricsInterceptor, handler: grpc.RpcMethodHandler, method: str) -> Any:
    got = interceptor.intercept_service(lambda _d: handler, Details(method))
    assert got is not None
    return got


def test_unknown_methods_pass_through_and_handlers_are_wrapped_once() -> None:
    interceptor = MetricsInterceptor(CollectorRegistry())
    assert interceptor.intercept_service(lambda _d: None, Details(f"/{SERVICE}/Nope")) is None
    handler = grpc.unary_unary_rpc_method_handler(ok, request_deserializer=bytes.decode, response_serializer=str.encode)
    first = wrapped_handler(interceptor, handler, f"/{SERVICE}/Ok")
    assert wrapped_handler(interceptor, handler, f"/{SERVICE}/Ok") is first
    assert first.request_deserializer is bytes.decode and first.response_serializer is str.encode
    assert not first.request_streaming and not first.response_streaming
    # A handler built per call (an interceptor before this one) does not grow the cache.
    for _ in range(100):
        wrapped_handler(interceptor, grpc.unary_unary_rpc_method_handler(ok), f"/{SERVICE}/Ok")
    assert len(interceptor._wrapped[f"/{SERVICE}/Ok"]) <= 16


def test_outcome_codes() -> None:
    ctx = FakeContext()
    assert outcome_code(ctx, False) == "OK"  # type: ignore[arg-type]
    assert outcome_code(ctx, True) == "UNKNOWN"  # type: ignore[arg-type]
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    assert outcome_code(ctx, False) == "NOT_FOUND"  # type: ignore[arg-type]
    assert outcome_code(ctx, True) == "NOT_FOUND"  # type: ignore[arg-type]  # grpc sends the code set
    ctx.active = False
    assert outcome_code(ctx, True) == "CANCELLED"  # type: ignore[arg-type]
    assert split_method("/banditd.v1.Banditd/Decide") == ("banditd.v1.Banditd", "Decide")
    assert split_method("odd") == ("unknown", "odd")


def test_interceptor_overhead_per_call(capsys: pytest.CaptureFixture[str]) -> None:
    registry = CollectorRegistry()
    interceptor = MetricsInterceptor(registry)

    def decide(request: bytes, context: Any) -> bytes:
        return request

    behavior = wrapped_handler(interceptor, grpc.unary_unary_rpc_method_handler(decide), "/b.v1.B/Decide").unary_unary
    ctx = FakeContext()
    n = 20_000

    def per_call(fn: Callable[[bytes, Any], bytes]) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(b"r", ctx)
            best = min(best, time.perf_counter() - t0)
        return best / n * 1e6

    bare, recorded = per_call(decide), per_call(behavior)
    with capsys.disabled():
        print(f"\ninterceptor, unary call: bare {bare:.2f} us, recorded {recorded:.2f} us, "
              f"overhead {recorded - bare:.2f} us per call")  # fmt: skip
    s = scrape(registry)
    assert value(s, "grpc_server_handled_total", grpc_method="Decide", grpc_code="OK") == 3 * n
    assert recorded - bare < 50.0  # a few µs in practice; generous for slow machines


# The banditd collector on a real engine.
@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=0.001)
    writer.start()
    eng = Engine(store, writer, seed=3)
    eng.load()
    yield eng
    writer.close()
    store.close()


def _populate(engine: Engine) -> int:
    engine.create_experiment(ExperimentSpec(id="exp", arms=[ArmSpec("a"), ArmSpec("b"), ArmSpec("c")]), timeout=10)
    engine.create_experiment(ExperimentSpec(id="other", arms=[ArmSpec("x"), ArmSpec("y")]), timeout=10)
    decisions = [engine.decide("exp", f"u{i}", 1).record for i in range(20)]
    engine.decide("other", "u", 1)
    results = engine.reward_batch([RewardInput(d.decision_id, 1.0) for d in decisions[:7]], timeout=10)
    assert all(r.error is None for r in results)
    engine.update_experiment("other", [], [], "paused", timeout=10)
    engine.writer.sync(timeout=10)
    return 7


def test_collector_reads_engine_writer_and_store(engine: Engine) -> None:
    rewarded = _populate(engine)
    calls: list[str] = []

    def analysis(experiment_id: str) -> dict[str, float]:
        calls.append(experiment_id)
        return {"a": 0.5, "b": 0.3, "c": 0.2} if experiment_id == "exp" else {"x": 0.9, "y": 0.1}

    registry = metrics_registry(engine, engine.writer, engine.store, analysis)
    s = scrape(registry)
    assert value(s, "banditd_decisions_total", experiment="exp") == 20
    assert value(s, "banditd_decisions_total", experiment="other") == 1
    assert value(s, "banditd_rewards_total", experiment="exp") == rewarded
    assert value(s, "banditd_arm_pulls_total", experiment="exp") == 20
    assert {ls["arm"] for ls in series(s, "banditd_arm_posterior_mean", experiment="exp")} == {"a", "b", "c"}
    assert all(0.0 <= v <= 1.0 for n, ls, v in s if n == "banditd_arm_posterior_mean")
    assert value(s, "banditd_arm_allocation_share", experiment="exp") == pytest.approx(1.0)
    assert value(s, "banditd_arm_reward_sum", experiment="exp") == rewarded
    assert value(s, "banditd_arm_observations", experiment="exp") == 20  # decision mode: each decision observes
    assert value(s, "banditd_arm_p_best", experiment="exp", arm="a") == 0.5
    assert value(s, "banditd_experiment_paused", experiment="other") == 1
    assert value(s, "banditd_experiment_paused", experiment="exp") == 0
    assert value(s, "banditd_experiment_arms", experiment="exp") == 3
    assert series(s, "banditd_reward_rate_per_second", experiment="exp")
    assert value(s, "banditd_writer_queue_depth") == 0
    commits = value(s, "banditd_commit_seconds_count")
    assert commits == engine.writer.commits > 0
    assert value(s, "banditd_commit_seconds_bucket", le="+Inf") == commits
    assert value(s, "banditd_commit_batch_size_count") == commits
    assert value(s, "banditd_commit_batch_size_sum") == engine.writer.ops_committed
    assert 0 < value(s, "banditd_lmdb_size_bytes") <= value(s, "banditd_lmdb_map_bytes")
    assert value(s, "banditd_collector_errors_total") == 0
    # Labels are experiment and arm only (and the alarm's code).
    assert all(set(ls) <= {"experiment", "arm", "code", "le"} for n, ls, _ in s if n.startswith("banditd_"))
    # The gRPC metrics are declared in the same registry.
    body = exposition(registry)[0].decode()
    assert "# TYPE grpc_server_handled_total counter" in body
    # P(best) is reused between scrapes.
    scrape(registry)
    assert sorted(calls) == ["exp", "other"]


def test_collector_skips_a_failing_experiment_and_reports_alarms(engine: Engine, monkeypatch: Any) -> None:
    _populate(engine)
    engine.create_experiment(ExperimentSpec(id="quiet", arms=[ArmSpec("q1"), ArmSpec("q2")]), timeout=10)
    for i in range(1000):
        engine.decide("quiet", f"u{i}", 1)
    original = engine.diagnostics

    def diagnostics(experiment_id: str, silence_s: float = 0.0) -> dict[str, Any]:
        if experiment_id == "exp":
            raise RuntimeError("broken")
        return original(experiment_id, silence_s)

    monkeypatch.setattr(engine, "diagnostics", diagnostics)
    registry = CollectorRegistry()
    registry.register(BanditdCollector(engine, engine.writer, engine.store, max_arms=1))
    s = scrape(registry)
    assert not series(s, "banditd_decisions_total", experiment="exp")
    assert value(s, "banditd_decisions_total", experiment="other") == 1
    assert value(s, "banditd_collector_errors_total") == 1
    assert value(s, "banditd_alarms", experiment="quiet", code="NO_REWARDS") == 1
    assert not series(s, "banditd_alarms", experiment="other")
    assert len(series(s, "banditd_arm_pulls_total", experiment="quiet")) == 1  # max_arms
    assert value(s, "banditd_experiment_arms", experiment="quiet") == 2
    assert value(scrape(registry), "banditd_collector_errors_total") == 2


def test_p_best_refusals_are_not_errors_and_failures_are_cached(engine: Engine) -> None:
    _populate(engine)
    calls: list[str] = []

    def analysis(experiment_id: str) -> dict[str, float]:
        calls.append(experiment_id)
        if experiment_id == "other":
            raise FailedPrecondition("fewer than 2 active arms")
        raise RuntimeError("bug")

    registry = CollectorRegistry()
    registry.register(BanditdCollector(engine, engine.writer, engine.store, analysis))
    s = scrape(registry)
    assert not series(s, "banditd_arm_p_best")
    assert value(s, "banditd_arm_posterior_mean", experiment="exp", arm="a") > 0  # the rest is there
    assert value(s, "banditd_collector_errors_total") == 1  # the RuntimeError only
    s = scrape(registry)
    assert value(s, "banditd_collector_errors_total") == 1 and sorted(calls) == ["exp", "other"]


# Multiprocess mode: each worker process writes its values; the scrape sums them.
WORKER = """
import os, sys, time
import grpc
from prometheus_client import CollectorRegistry
import banditd.metrics
from banditd.metrics import MetricsInterceptor

class Ctx:
    def __init__(self): self._c = None
    def code(self): return self._c
    def is_active(self): return True
    def abort(self, code, details):
        self._c = code
        raise Exception()

class Details:
    method = "/banditd.v1.Banditd/Decide"
    invocation_metadata = ()

def decide(request, context):
    if request == b"bad":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    return request

n, how = int(sys.argv[1]), sys.argv[2]
banditd.metrics.FLUSH_INTERVAL_S = 0.05
handler = grpc.unary_unary_rpc_method_handler(decide)
interceptor = MetricsInterceptor(CollectorRegistry())
behavior = interceptor.intercept_service(lambda d: handler, Details()).unary_unary
for _ in range(n):
    behavior(b"ok", Ctx())
try:
    behavior(b"bad", Ctx())
except Exception:
    pass
if how == "thread":  # the flusher thread writes within FLUSH_INTERVAL_S
    time.sleep(0.5)
    os._exit(0)
if how == "flush":
    interceptor.flush()
    os._exit(0)
# else: written at interpreter exit
"""


def test_multiprocess_aggregation(engine: Engine, tmp_path: Path, monkeypatch: Any) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    runs = [(3, "thread"), (4, "flush"), (5, "exit")]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(n), how], env=env) for n, how in runs]
    assert [w.wait(timeout=60) for w in workers] == [0, 0, 0]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    s = scrape(metrics_registry(engine, engine.writer, engine.store))
    handled, hist = "grpc_server_handled_total", "grpc_server_handling_seconds"
    assert value(s, handled, grpc_method="Decide", grpc_code="OK", grpc_service="banditd.v1.Banditd") == 12
    assert value(s, handled, grpc_method="Decide", grpc_code="INVALID_ARGUMENT") == 3
    assert value(s, "grpc_server_started_total", grpc_method="Decide", grpc_type="unary") == 15
    assert value(s, "grpc_server_msg_received_total", grpc_method="Decide") == 15
    assert value(s, "grpc_server_msg_sent_total", grpc_method="Decide") == 12
    assert value(s, f"{hist}_count", grpc_method="Decide", grpc_code="OK") == 12
    assert value(s, f"{hist}_bucket", grpc_method="Decide", grpc_code="OK", le="+Inf") == 12
    assert value(s, f"{hist}_bucket", grpc_method="Decide", grpc_code="OK", le="10.0") == 12
    assert 0 < value(s, f"{hist}_sum", grpc_method="Decide") < 1.0
    assert len(series(s, handled, grpc_method="Decide", grpc_code="OK")) == 1  # summed, not per process
    assert series(s, "banditd_lmdb_map_bytes")  # the collector is there too
