"""Reference servers on banditd's gRPC stack (sync grpcio, thread pool, same contract).

--mode numpy: in-memory Thompson sampling the textbook way, `rng.beta(a, b).argmax()` over
  all arms per decision; rewards update a and b at once (no durability, no decision log).
  What banditd is compared with: same transport, a straightforward policy.
--mode noop: Decide returns one constant response; the floor of a Python gRPC round trip.
--mode noop-aio: the same on grpc.aio (asyncio): the other server model grpcio offers, to
  measure which of the two is faster here (banditd uses the sync one).
--processes N (no-op modes): N server processes on one port (SO_REUSEPORT), the shape of
  `banditd serve --workers N`; the parent only starts them, forwards SIGTERM / SIGINT and
  exits when one of them dies. The default, 1, is one process without SO_REUSEPORT.

Implements CreateExperiment, GetExperiment, Decide, Reward, RewardStream and GetArmStats,
plus grpc.health.v1 so the benchmarks can wait for it like for banditd.

    python loadtest/reference_server.py --port 50061 --mode numpy
    python loadtest/reference_server.py --port 50061 --mode noop --processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import itertools
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

# Decisions remembered for rewards; the oldest are forgotten beyond this (bounded memory).
MAX_DECISIONS = 2_000_000


class NumpyExperiment:
    """Beta-Bernoulli posteriors in two arrays; one lock guards draw and update."""

    def __init__(self, spec: pb.Experiment, seed: int | None) -> None:
        self.spec = spec
        self.arm_ids = [a.id for a in spec.arms]
        default = (spec.prior.alpha, spec.prior.beta) if spec.HasField("prior") else (1.0, 1.0)
        priors = [(a.prior.alpha, a.prior.beta) if a.HasField("prior") else default for a in spec.arms]
        self.a = np.array([p[0] for p in priors], dtype=np.float64)
        self.b = np.array([p[1] for p in priors], dtype=np.float64)
        self.pulls = np.zeros(len(priors), dtype=np.int64)
        self.rewards = np.zeros(len(priors), dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.assignments: dict[str, int] = {}

    def choose(self, unit_id: str) -> tuple[int, bool]:
        with self.lock:
            if self.spec.sticky and unit_id in self.assignments:
                arm, hit = self.assignments[unit_id], True
            else:
                arm, hit = int(self.rng.beta(self.a, self.b).argmax()), False
                if self.spec.sticky:
                    self.assignments[unit_id] = arm
            self.pulls[arm] += 1
            return arm, hit

    def reward(self, arm: int, value: float) -> None:
        with self.lock:
            self.a[arm] += value
            self.b[arm] += 1.0 - value
            self.rewards[arm] += 1

    def mean(self, arm: int) -> float:
        return float(self.a[arm] / (self.a[arm] + self.b[arm]))


class NumpyService(pb_grpc.BanditdServicer):
    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.experiments: dict[str, NumpyExperiment] = {}
        self.decisions: OrderedDict[str, tuple[NumpyExperiment, int]] = OrderedDict()
        self.events: set[str] = set()
        self.ids = itertools.count()
        self.lock = threading.Lock()

    def _experiment(self, experiment_id: str, context: grpc.ServicerContext) -> NumpyExperiment:
        exp = self.experiments.get(experiment_id)
        if exp is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"experiment {experiment_id!r} does not exist")
        return exp

    def CreateExperiment(self, request: pb.CreateExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        spec = request.experiment
        if not spec.id or not spec.arms:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "experiment id and at least one arm are required")
        with self.lock:
            if spec.id in self.experiments:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"experiment {spec.id!r} already exists")
            self.experiments[spec.id] = NumpyExperiment(spec, self.seed)
        return spec

    def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        return self._experiment(request.experiment_id, context).spec

    def Decide(self, request: pb.DecideRequest, context: grpc.ServicerContext) -> pb.DecideResponse:
        exp = self._experiment(request.experiment_id, context)
        arm, hit = exp.choose(request.unit_id)
        decision_id = f"{next(self.ids):x}"
        with self.lock:
            self.decisions[decision_id] = (exp, arm)
            if len(self.decisions) > MAX_DECISIONS:
                self.decisions.popitem(last=False)
        # Propensity is not estimated (it would cost Monte Carlo draws banditd caches).
        chosen = pb.ChosenArm(arm_id=exp.arm_ids[arm], score=exp.mean(arm), propensity=0.0)
        return pb.DecideResponse(decision_id=decision_id, arms=[chosen], sticky_hit=hit)

    def _reward(self, r: pb.RewardRequest) -> str:
        """accepted | duplicate | an error message."""
        found = self.decisions.get(r.decision_id)
        if found is None:
            return f"decision {r.decision_id!r} is unknown"
        if not 0.0 <= r.value <= 1.0:
            return f"binary reward {r.value} is outside [0, 1]"
        event = r.event_id or r.decision_id
        with self.lock:
            if event in self.events:
                return "duplicate"
            self.events.add(event)
        exp, arm = found
        exp.reward(arm, r.value)
        return "accepted"

    def Reward(self, request: pb.RewardRequest, context: grpc.ServicerContext) -> pb.RewardResponse:
        outcome = self._reward(request)
        if outcome not in ("accepted", "duplicate"):
            context.abort(grpc.StatusCode.NOT_FOUND, outcome)
        return pb.RewardResponse(accepted=outcome == "accepted")

    def RewardStream(
        self, request_iterator: Iterator[pb.RewardRequest], context: grpc.ServicerContext
    ) -> pb.RewardStreamResponse:
        resp = pb.RewardStreamResponse()
        for index, r in enumerate(request_iterator):
            outcome = self._reward(r)
            if outcome == "accepted":
                resp.accepted += 1
            elif outcome == "duplicate":
                resp.duplicate += 1
            else:
                resp.rejected += 1
                if len(resp.rejections) < 100:
                    resp.rejections.add(index=index, decision_id=r.decision_id, code="NOT_FOUND", reason=outcome)
        return resp

    def GetArmStats(self, request: pb.GetArmStatsRequest, context: grpc.ServicerContext) -> pb.GetArmStatsResponse:
        exp = self._experiment(request.experiment_id, context)
        with exp.lock:
            rows = [
                pb.ArmStats(arm_id=arm_id, pulls=int(exp.pulls[i]), rewards=int(exp.rewards[i]),
                            reward_sum=float(exp.a[i] - 1.0), mean=exp.mean(i), active=True)
                for i, arm_id in enumerate(exp.arm_ids)
            ]
        return pb.GetArmStatsResponse(
            experiment_id=request.experiment_id, arms=rows, total_decisions=int(exp.pulls.sum()),
            total_rewards=int(exp.rewards.sum()),
        )


class NoopService(pb_grpc.BanditdServicer):
    """Constant answers: what a call costs with no work behind it."""

    DECISION = pb.DecideResponse(
        decision_id="0000000000000000000000", arms=[pb.ChosenArm(arm_id="arm-0", score=0.5, propensity=1.0)]
    )
    ACCEPTED = pb.RewardResponse(accepted=True)

    def CreateExperiment(self, request: pb.CreateExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        return request.experiment

    def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        return pb.Experiment(id=request.experiment_id)

    def Decide(self, request: pb.DecideRequest, context: grpc.ServicerContext) -> pb.DecideResponse:
        return self.DECISION

    def Reward(self, request: pb.RewardRequest, context: grpc.ServicerContext) -> pb.RewardResponse:
        return self.ACCEPTED

    def RewardStream(
        self, request_iterator: Iterator[pb.RewardRequest], context: grpc.ServicerContext
    ) -> pb.RewardStreamResponse:
        return pb.RewardStreamResponse(accepted=sum(1 for _ in request_iterator))

    def GetArmStats(self, request: pb.GetArmStatsRequest, context: grpc.ServicerContext) -> pb.GetArmStatsResponse:
        return pb.GetArmStatsResponse(experiment_id=request.experiment_id)


class AioNoopService(pb_grpc.BanditdServicer):
    """NoopService on grpc.aio: coroutine handlers, one event loop."""

    async def CreateExperiment(self, request: pb.CreateExperimentRequest, context: object) -> pb.Experiment:
        return request.experiment

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: object) -> pb.Experiment:
        return pb.Experiment(id=request.experiment_id)

    async def Decide(self, request: pb.DecideRequest, context: object) -> pb.DecideResponse:
        return NoopService.DECISION

    async def Reward(self, request: pb.RewardRequest, context: object) -> pb.RewardResponse:
        return NoopService.ACCEPTED


async def serve_aio(host: str, port: int, reuseport: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuseport))])
    pb_grpc.add_BanditdServicer_to_server(AioNoopService(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"could not bind {host}:{port}")
    await server.start()
    print(f"reference server (noop-aio) on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2)


def build_server(
    mode: str, host: str, port: int, threads: int, seed: int | None, reuseport: bool = False
) -> tuple[grpc.Server, int]:
    # The same server shape as banditd's app.py: sync grpcio on a thread pool.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", int(reuseport))]
    )
    service = NumpyService(seed) if mode == "numpy" else NoopService()
    pb_grpc.add_BanditdServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"could not bind {host}:{port}")
    return server, bound


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the parent dies (even by kill -9), as in banditd's pool."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def serve_pool(args: argparse.Namespace) -> int:
    """`--processes` children on one port with SO_REUSEPORT; each binds it and serves health
    itself, like the members of `banditd serve --workers N` (the kernel spreads connections)."""
    if args.port == 0:
        raise SystemExit("--processes > 1 needs an explicit --port (the processes share it)")
    cmd = [sys.executable, __file__, "--host", args.host, "--port", str(args.port), "--mode", args.mode,
           "--threads", str(args.threads), "--pool-member"]
    stopping = threading.Event()
    procs: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs.extend(subprocess.Popen(cmd, preexec_fn=_die_with_parent) for _ in range(args.processes))
    print(f"reference server ({args.mode}) x {args.processes} processes on {args.host}:{args.port}: "
          f"pids {' '.join(str(p.pid) for p in procs)}", flush=True)
    code = 0
    while not stopping.is_set():
        dead = [p for p in procs if p.poll() is not None]
        if dead:  # a benchmark must not go on with fewer processes than it says
            print(f"process {dead[0].pid} exited with {dead[0].returncode}: stopping", flush=True)
            code = 1
            on_signal(signal.SIGTERM, None)
        stopping.wait(0.2)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50061)
    ap.add_argument("--mode", choices=("numpy", "noop", "noop-aio"), default="numpy")
    ap.add_argument("--threads", type=int, default=16, help="RPC threads (banditd's default)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--processes", type=int, default=1,
                    help="no-op modes: server processes sharing the port with SO_REUSEPORT (like banditd --workers)")
    ap.add_argument("--pool-member", action="store_true", help=argparse.SUPPRESS)  # a child of --processes N
    args = ap.parse_args()
    if args.processes < 1:
        raise SystemExit("--processes must be >= 1")
    if args.processes > 1:
        if args.mode == "numpy":  # each process would have its own experiments and posteriors
            raise SystemExit("--processes > 1 is for the no-op modes only")
        sys.exit(serve_pool(args))
    reuseport = args.pool_member
    if args.mode == "noop-aio":
        asyncio.run(serve_aio(args.host, args.port, reuseport))
        return
    server, port = build_server(args.mode, args.host, args.port, args.threads, args.seed, reuseport)
    server.start()
    print(f"reference server ({args.mode}) on {args.host}:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
