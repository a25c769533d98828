"""Locust gRPC user for banditd: a realistic Decide/Reward mix over three experiment sizes.

Follows Locust's gRPC recipe: gevent-patched grpc, and a client interceptor that fires
`events.request` for every call (response time, size, exception). Run it through
`loadtest/run_locust.py` (`make loadtest`), or directly:

    locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 60s --host localhost:50051

Custom arguments (also settable in the web UI): --exp-arms, --sticky-arms, --decide-ratio,
--reward-delay, --units, --hot-units, --hot-fraction, --user-rps, --rpc-timeout, --exp-prefix.
"""

from __future__ import annotations

import csv
import random
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant_throughput, events, task
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

# Locust has already monkey-patched the standard library; grpc must follow before any
# channel exists, or every call blocks the whole gevent hub.
grpc_gevent.init_gevent()

# Decisions a user remembers for later rewards; older ones are forgotten (never converted).
PENDING_PER_USER = 5000
_environment: Environment | None = None


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("banditd", "experiments and traffic mix")
    group.add_argument("--exp-arms", default="10,1000,10000", help="arm counts, one experiment each")
    group.add_argument("--sticky-arms", type=int, default=1000, help="arm count of the sticky experiment; 0: none")
    group.add_argument("--decide-ratio", type=float, default=0.8, help="share of calls that are Decide (rest Reward)")
    group.add_argument("--reward-delay", type=float, default=3.0, help="seconds between a decision and its reward")
    group.add_argument("--units", type=int, default=1_000_000, help="unit id population")
    group.add_argument("--hot-units", type=int, default=10_000, help="returning units (sticky hits)")
    group.add_argument("--hot-fraction", type=float, default=0.3, help="share of decisions for returning units")
    group.add_argument("--user-rps", type=float, default=15.0, help="calls per second per user; 0: as fast as possible")
    group.add_argument("--rpc-timeout", type=float, default=5.0, help="deadline of every call, seconds")
    group.add_argument("--exp-prefix", default="loadtest", help="experiment id prefix")


@events.init.add_listener
def _remember_environment(environment: Environment, **_: object) -> None:
    global _environment
    _environment = environment


@events.quit.add_listener
def _write_final_stats_csv(**_: object) -> None:
    """Locust refreshes <prefix>_stats.csv once a second, so it can miss the last second;
    rewrite it from the final statistics (run_locust.py reads it)."""
    env = _environment
    prefix = getattr(env.parsed_options, "csv_prefix", None) if env is not None else None
    if env is None or env.runner is None or not prefix or env.parsed_options.worker:
        return
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        StatsCSV(env, PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))


def experiment_ids(options: Any) -> list[tuple[str, int, bool]]:
    """(id, arms, sticky) per experiment; the sticky one carries it in its id so a changed
    configuration never reuses an experiment created with a different one."""
    out = []
    for raw in str(options.exp_arms).split(","):
        arms = int(raw)
        sticky = arms == options.sticky_arms
        out.append((f"{options.exp_prefix}-{arms}{'-sticky' if sticky else ''}", arms, sticky))
    return out


def target_of(host: str) -> str:
    """Accepts host:port or a URL-ish grpc://host:port (Locust's --host is free text)."""
    return host.split("://", 1)[-1].rstrip("/")


@events.test_start.add_listener
def _create_experiments(environment: Environment, **_: Any) -> None:
    if not environment.host:
        raise RuntimeError("pass --host host:port")
    with grpc.insecure_channel(target_of(environment.host)) as ch:
        stub = pb_grpc.BanditdStub(ch)
        for exp_id, arms, sticky in experiment_ids(environment.parsed_options):
            exp = pb.Experiment(
                id=exp_id, arms=[pb.Arm(id=f"arm-{i}") for i in range(arms)], policy=pb.Policy(name="thompson"),
                sticky=sticky,
            )
            try:
                stub.CreateExperiment(pb.CreateExperimentRequest(experiment=exp), timeout=30)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:  # left over from a previous run: fine
                    raise


def _call_name(method: str, request: Any) -> str:
    """Decide rows per experiment (10 vs 10,000 arms differ); other RPCs by method name."""
    name = method.rsplit("/", 1)[-1]
    exp = getattr(request, "experiment_id", "")
    return f"{name} {exp}" if exp else name


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Reports every call to Locust: response time from send to the last byte, and the error."""

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    def _observe(self, name: str, invoke: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        exception: BaseException | None = None
        response, length = None, 0
        call = invoke()
        try:
            response = call.result()
            length = response.ByteSize()
        except grpc.RpcError as err:
            exception = err
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            response=response,
            context={},
            exception=exception,
        )
        return call

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return self._observe(_call_name(details.method, request), lambda: continuation(details, request))

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, request_iterator: Any) -> Any:
        return self._observe(_call_name(details.method, None), lambda: continuation(details, request_iterator))


def conversion_rate(arm_id: str) -> float:
    """A fixed hidden rate per arm (2% to 10%), so the posteriors have something to learn."""
    return 0.02 + 0.08 * (zlib.crc32(arm_id.encode()) % 1000) / 1000


class BanditdUser(User):
    """One calling service: decides for units, and reports conversions a few seconds later."""

    def wait_time(self) -> float:
        rps = self.environment.parsed_options.user_rps
        return constant_throughput(rps)(self) if rps > 0 else 0.0

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.experiments = experiment_ids(opts)
        # One connection per user, like one client process each (and so that several
        # server processes behind SO_REUSEPORT all get traffic).
        raw = grpc.insecure_channel(target_of(self.host or ""), options=[("grpc.use_local_subchannel_pool", 1)])
        self.channel = grpc.intercept_channel(raw, LocustInterceptor(self.environment))
        self.stub = pb_grpc.BanditdStub(self.channel)
        self.pending: deque[tuple[float, str, str]] = deque(maxlen=PENDING_PER_USER)
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.channel.close()

    def _unit(self) -> str:
        if self.rng.random() < self.opts.hot_fraction:
            return f"u{self.rng.randrange(self.opts.hot_units)}"
        return f"u{self.rng.randrange(self.opts.units)}"

    def _due_reward(self) -> tuple[str, str] | None:
        """The oldest remembered decision, once it is reward_delay old."""
        if self.pending and time.monotonic() - self.pending[0][0] >= self.opts.reward_delay:
            _, decision_id, arm = self.pending.popleft()
            return decision_id, arm
        return None

    @task
    def decide_or_reward(self) -> None:
        due = self._due_reward() if self.rng.random() >= self.opts.decide_ratio else None
        try:
            if due is not None:
                self.reward(*due)
            else:  # includes the first reward_delay seconds, before any decision is due
                self.decide()
        except grpc.RpcError:
            pass  # already reported by the interceptor; the user keeps going

    def decide(self) -> None:
        exp_id, _, _ = self.rng.choice(self.experiments)
        req = pb.DecideRequest(experiment_id=exp_id, unit_id=self._unit())
        resp = self.stub.Decide(req, timeout=self.opts.rpc_timeout)
        self.pending.append((time.monotonic(), resp.decision_id, resp.arms[0].arm_id))

    def reward(self, decision_id: str, arm: str) -> None:
        value = 1.0 if self.rng.random() < conversion_rate(arm) else 0.0
        self.stub.Reward(pb.RewardRequest(decision_id=decision_id, value=value), timeout=self.opts.rpc_timeout)
