"""gRPC servicer: translates protobuf messages to engine calls and back."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, NamedTuple

import grpc
import orjson

from banditd import _core
from banditd.allocation import MAX_EXPOSURES_PER_BATCH, Allocations
from banditd.analysis import analyse
from banditd.auth import KeyRing, actor_of
from banditd.bulk import BulkResult, decide_bulk
from banditd.engine import Engine, RewardInput, RewardResult
from banditd.errors import (
    BanditdError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    map_all_errors,
)
from banditd.experiment import DEFAULT_WINDOW_SECONDS, ArmSpec, ExperimentSpec
from banditd.settings import Criteria, Guardrail, Settings
from banditd.validation import MAX_REWARDS_PER_MESSAGE, ContextScalar, check_context, shown_key
from banditd.writer import wait_for
from banditd_client._convert import POLICY_PARAMS
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

log = logging.getLogger("banditd")

REWARD_TYPE_NAMES = {pb.REWARD_TYPE_UNSPECIFIED: "binary", pb.BINARY: "binary", pb.CONTINUOUS: "continuous"}
REWARD_TYPE_ENUM = {"binary": pb.BINARY, "continuous": pb.CONTINUOUS}
# States a caller may set (FALLBACK is a guardrail's; setting RUNNING leaves it).
STATE_NAMES = {pb.STATE_UNSPECIFIED: None, pb.RUNNING: "running", pb.PAUSED: "paused"}
STATE_ENUM = {"running": pb.RUNNING, "paused": pb.PAUSED, "fallback": pb.FALLBACK}
MODE_NAMES = {pb.OUTCOME_MODE_UNSPECIFIED: "", pb.DECISION: "decision", pb.EXPLICIT: "explicit"}
MODE_ENUM = {"decision": pb.DECISION, "explicit": pb.EXPLICIT}
AGGREGATION_NAMES = {pb.AGGREGATION_UNSPECIFIED: "", pb.MAX: "max", pb.SUM: "sum", pb.FIRST: "first", pb.LAST: "last"}
AGGREGATION_ENUM = {v: k for k, v in AGGREGATION_NAMES.items() if v}
STREAM_CHUNK = 4096
SERVICE = pb.DESCRIPTOR.services_by_name["Banditd"]
MAX_REPORTED_REJECTIONS = 100
# Chunks of one stream queued for commit before the handler waits for the oldest.
MAX_CHUNKS_IN_FLIGHT = 4


def _prior(msg: pb.Arm | pb.Experiment, reward_type: str) -> tuple[float, float] | None:
    if not msg.HasField("prior"):
        return None
    p = msg.prior
    return (p.alpha, p.beta) if reward_type == "binary" else (p.mean, p.strength)


def _arm_from_proto(arm: pb.Arm, reward_type: str) -> ArmSpec:
    return ArmSpec(id=arm.id, group=arm.group, prior=_prior(arm, reward_type))


def _enum_name(names: Mapping[Any, str | None], value: int, what: str) -> str:
    if value not in names:
        raise InvalidArgument(f"unknown {what} {value}; expected one of {sorted(names)}")
    return names[value] or ""


def outcomes_from_proto(o: pb.Outcomes) -> dict[str, Any]:
    return {
        "mode": _enum_name(MODE_NAMES, o.mode, "outcome mode"),
        "aggregation": _enum_name(AGGREGATION_NAMES, o.aggregation, "aggregation"),
        "default_reward": o.default_reward,
        "min_age_s": o.min_age_seconds,
    }


CRITERIA_FIELDS = ("min_uplift", "confidence", "min_days", "min_events_per_arm", "max_days", "horizon")


def settings_from_proto(msg: pb.Settings) -> dict[str, Any]:
    """Settings as stored (guardrails resolved; checked against the arms by the spec)."""
    criteria = Criteria(**{f: getattr(msg.criteria, f) for f in CRITERIA_FIELDS if msg.criteria.HasField(f)})
    guardrails = tuple(
        Guardrail.resolved(g.metric, g.threshold, g.action, g.fallback_arm_id, g.window_seconds, g.min_samples)
        for g in msg.guardrails
    )
    return Settings(
        control_arm_id=msg.control_arm_id,
        criteria=criteria,
        control_share=msg.control_share,
        traffic_floor=msg.traffic_floor,
        arm_floors=dict(msg.arm_floors),
        burn_in=msg.burn_in,
        guardrails=guardrails,
    ).to_json()


def criteria_to_proto(c: Criteria) -> pb.StopCriteria:
    return pb.StopCriteria(**{f: getattr(c, f) for f in CRITERIA_FIELDS})


def settings_to_proto(s: Settings) -> pb.Settings:
    return pb.Settings(
        control_arm_id=s.control_arm_id,
        criteria=criteria_to_proto(s.criteria),
        control_share=s.control_share,
        traffic_floor=s.traffic_floor,
        arm_floors=s.arm_floors,
        burn_in=s.burn_in,
        guardrails=[
            pb.Guardrail(
                metric=g.metric, threshold=g.threshold, action=g.action, fallback_arm_id=g.fallback_arm_id,
                window_seconds=g.window_s, min_samples=g.min_samples,
            )  # fmt: skip
            for g in s.guardrails
        ],
    )


def spec_from_proto(exp: pb.Experiment) -> ExperimentSpec:
    reward_type = _enum_name(REWARD_TYPE_NAMES, exp.reward_type, "reward type")
    params = {name: getattr(exp.policy, name) for name in POLICY_PARAMS if getattr(exp.policy, name)}
    return ExperimentSpec(
        id=exp.id,
        arms=[_arm_from_proto(a, reward_type) for a in exp.arms],
        policy=exp.policy.name or "thompson",
        params=params,
        reward_type=reward_type,
        sticky=exp.sticky,
        window_seconds=exp.attribution_window_seconds or DEFAULT_WINDOW_SECONDS,
        prior=_prior(exp, reward_type),
        outcomes=outcomes_from_proto(exp.outcomes),
        settings=settings_from_proto(exp.settings),
    )


def _prior_proto(prior: tuple[float, float] | None) -> pb.Prior | None:
    if prior is None:
        return None
    return pb.Prior(alpha=prior[0], beta=prior[1], mean=prior[0], strength=prior[1])


def spec_to_proto(spec: ExperimentSpec) -> pb.Experiment:
    return pb.Experiment(
        id=spec.id,
        arms=[
            pb.Arm(id=a.id, group=a.group, prior=_prior_proto(a.prior), active=a.active)
            for a in spec.arms
        ],
        policy=pb.Policy(name=spec.policy, **spec.params),
        reward_type=REWARD_TYPE_ENUM[spec.reward_type],
        sticky=spec.sticky,
        attribution_window_seconds=spec.window_seconds,
        prior=_prior_proto(spec.prior),
        state=STATE_ENUM[spec.state],
        created_unix_ms=spec.created_ms,
        version=spec.version,
        outcomes=pb.Outcomes(
            mode=MODE_ENUM[spec.outcomes["mode"]],
            aggregation=AGGREGATION_ENUM[spec.outcomes["aggregation"]],
            default_reward=spec.outcomes["default_reward"],
            min_age_seconds=spec.outcomes["min_age_s"],
        ),
        settings=settings_to_proto(spec.config),
        serving_arm_id=spec.serving_arm if spec.state == "fallback" else "",
    )


def context_from_request(request: pb.DecideRequest) -> dict[str, ContextScalar] | None:
    """One context from the string map `context` (older clients) and the typed map `features`,
    checked here at the edge so that a refused call reaches neither the engine nor the log."""
    if not request.context and not request.features:
        return None  # the common case, without building a dict
    merged: dict[str, ContextScalar] = dict(request.context)
    for key, value in request.features.items():
        if key in merged:
            # Which of the two would the caller mean? Neither is safe to pick silently.
            raise InvalidArgument(
                f"context key {shown_key(key)} is in both `context` and `features`; send it in one of them"
            )
        kind = value.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(f"features[{shown_key(key)}] has neither `number` nor `text` set")
        merged[key] = value.number if kind == "number" else value.text
    check_context(merged)
    return merged or None


def model_report_proto(report: Mapping[str, Any], experiment_id: str) -> pb.ModelReport:
    """engine.model_report's dict (ModelReport's fields; `features` and `arms` as lists of
    dicts, each arm with a `coefficients` list of dicts) as the message."""
    scalars = {k: v for k, v in report.items() if k not in ("features", "arms")}
    scalars.setdefault("experiment_id", experiment_id)
    return pb.ModelReport(
        features=[pb.Feature(**f) for f in report.get("features", ())],
        arms=[
            pb.ArmModel(
                **{k: v for k, v in a.items() if k != "coefficients"},
                coefficients=[pb.Coefficient(**c) for c in a.get("coefficients", ())],
            )
            for a in report.get("arms", ())
        ],
        **scalars,
    )


def _timeout(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining > 0 else None


class Undecodable:
    """A request message that could not be parsed (garbage bytes, invalid UTF-8): the
    handler refuses it with INVALID_ARGUMENT instead of grpc answering INTERNAL."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


# Methods whose handler parses the request itself: Decide's fast path works on the bytes.
RAW_METHODS = frozenset({"Decide"})


def _bytes_or_message(response: Any) -> bytes:
    return response if type(response) is bytes else response.SerializeToString()


def parse_raw(method: str, data: bytes) -> Any:
    """A RAW_METHODS request as its message (an `Undecodable` when it cannot be parsed)."""
    return _RAW_PARSERS[method](data)


def _tolerant(message_cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bytes
            return Undecodable(f"{message_cls.DESCRIPTOR.name}: {type(exc).__name__}: {exc}")

    return parse


_RAW_PARSERS = {name: _tolerant(getattr(pb, SERVICE.methods_by_name[name].input_type.name)) for name in RAW_METHODS}


def _reward_input(r: pb.RewardRequest | Undecodable) -> RewardInput:
    if isinstance(r, Undecodable):
        return RewardInput("", 0.0, refused=f"undecodable RewardRequest message ({r.error})")
    return RewardInput(r.decision_id, r.value, r.event_id, r.arm_id)


class StreamGuard:
    """Caps the client streams served at once and cancels the ones that go silent, so
    streams can never hold every handler thread away from Decide."""

    def __init__(self, limit: int, idle_s: float) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._live: dict[int, list[Any]] = {}
        self._watcher: threading.Thread | None = None
        self.cancelled_idle = 0

    @contextmanager
    def admit(self, context: grpc.ServicerContext) -> Iterator[Callable[[], None]]:
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{self.limit} client streams are open already (--max-streams); retry with backoff"
            )
        entry: list[Any] = [time.monotonic(), context]
        with self._lock:
            self._live[id(entry)] = entry
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="banditd-streams", daemon=True)
                self._watcher.start()
        try:
            yield lambda: entry.__setitem__(0, time.monotonic())
        finally:
            with self._lock:
                self._live.pop(id(entry), None)
            self._slots.release()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.idle_s / 4))
            now = time.monotonic()
            with self._lock:
                idle = [e for e in self._live.values() if now - e[0] > self.idle_s]
            for entry in idle:
                log.info("cancelling a client stream silent for %.0f s", now - entry[0])
                self.cancelled_idle += 1
                entry[0] = float("inf")
                entry[1].cancel()


def add_service(servicer: BanditdService, server: grpc.Server) -> None:
    """Registers the service with request parsers that never raise (see `Undecodable`)."""
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        if method.name in RAW_METHODS:
            # The handler gets the request's bytes and may answer bytes (see Decide).
            handlers[method.name] = factory(
                getattr(servicer, method.name), request_deserializer=None, response_serializer=_bytes_or_message
            )
            continue
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def analysis_to_proto(a: Mapping[str, Any]) -> pb.Analysis:
    return pb.Analysis(
        arms=[pb.ArmAnalysis(**arm) for arm in a["arms"]],
        criteria=criteria_to_proto(a["criteria"]),
        **{k: v for k, v in a.items() if k not in ("arms", "criteria")},
    )


def audit_to_proto(entries: list[dict[str, Any]]) -> pb.AuditLog:
    return pb.AuditLog(
        entries=[
            pb.AuditEntry(
                ts_unix_ms=e["ts_unix_ms"], experiment_id=e["experiment_id"], action=e["action"],
                actor=e["actor"], details=orjson.dumps(e["details"]).decode(),
            )  # fmt: skip
            for e in entries
        ]
    )


def _bulk_context(c: pb.BulkContext) -> dict[str, ContextScalar] | None:
    ctx = context_from_request(pb.DecideRequest(features=c.features))
    check_context(ctx)
    return ctx


def bulk_response(r: BulkResult, first: int) -> pb.DecideBulkResponse:
    resp = pb.DecideBulkResponse(
        batch_id=r.batch_id, decision_ids=r.decision_ids, arm_ids=r.arm_ids, k=r.k, first_index=first,
        model_version=r.model_version,
        rejected=[pb.RejectedUnit(index=i, unit_id=u, code=c, reason=m) for i, u, c, m in r.rejected],
    )  # fmt: skip
    resp.arms.extend(r.arms.tolist())
    resp.propensities.extend(r.propensities.tolist())
    return resp


class ExposureIn(NamedTuple):
    decision_id: str
    unit_id: str
    arm_id: str
    allocation_version: int
    ts_unix_ms: int


def columnar_exposures(batch: pb.ExposureBatch) -> list[ExposureIn]:
    """The columnar part of an ExposureBatch as items (an arm index outside the table gives
    an empty arm id, refused per item)."""
    n = len(batch.decision_ids)
    if not n and not batch.unit_ids and not batch.arms:
        return []
    if len(batch.unit_ids) != n or len(batch.arms) != n or (batch.ts_unix_ms and len(batch.ts_unix_ms) != n):
        raise InvalidArgument(
            f"columnar exposures need as many unit_ids, arms (and ts_unix_ms, if any) as decision_ids ({n}); got "
            f"{len(batch.unit_ids)}, {len(batch.arms)}, {len(batch.ts_unix_ms)}"
        )
    table = list(batch.arm_ids)
    arms = [table[a] if a < len(table) else "" for a in batch.arms]
    ts = list(batch.ts_unix_ms) or [0] * n
    version = batch.allocation_version
    return [
        ExposureIn(d, u, a, version, t)
        for d, u, a, t in zip(batch.decision_ids, batch.unit_ids, arms, ts, strict=True)
    ]


ALLOCATION_FIELDS = (
    "experiment_id", "version", "arm_ids", "probabilities", "salt", "issued_unix_ms", "ttl_seconds",
    "max_age_seconds", "sticky",
)  # fmt: skip
MAX_AUDIT_ENTRIES = 10_000
SERVER_FAULTS = (Internal, Unavailable, ResourceExhausted, DeadlineExceeded)


@map_all_errors
class BanditdService(pb_grpc.BanditdServicer):
    def __init__(
        self, engine: Engine, max_streams: int = 8, stream_idle_s: float = 30.0, keys: KeyRing | None = None
    ) -> None:
        self.engine = engine
        self.streams = StreamGuard(max_streams, stream_idle_s)
        self.keys = keys  # names the caller in the audit log
        self.allocations = Allocations(engine)

    def _actor(self, context: grpc.ServicerContext) -> str:
        return actor_of(self.keys, context.invocation_metadata())

    def CreateExperiment(self, request: pb.CreateExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        spec = self.engine.create_experiment(
            spec_from_proto(request.experiment), _timeout(context), actor=self._actor(context)
        )
        return spec_to_proto(spec)

    def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        return spec_to_proto(self.engine.get_experiment(request.experiment_id))

    def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> pb.ListExperimentsResponse:
        return pb.ListExperimentsResponse(
            experiments=[spec_to_proto(s) for s in self.engine.list_experiments()]
        )

    def UpdateExperiment(self, request: pb.UpdateExperimentRequest, context: grpc.ServicerContext) -> pb.Experiment:
        reward_type = self.engine.get_experiment(request.experiment_id).reward_type
        spec = self.engine.update_experiment(
            request.experiment_id,
            [_arm_from_proto(a, reward_type) for a in request.add_arms],
            list(request.retire_arm_ids),
            _enum_name(STATE_NAMES, request.set_state, "experiment state") or None,
            _timeout(context),
            settings=settings_from_proto(request.settings) if request.HasField("settings") else None,
            actor=self._actor(context),
        )
        return spec_to_proto(spec)

    def Analyse(self, request: pb.AnalyseRequest, context: grpc.ServicerContext) -> pb.Analysis:
        return analysis_to_proto(analyse(self.engine, request.experiment_id, request.draws))

    def DecideBulk(
        self, request_iterator: Iterator[pb.DecideBulkRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DecideBulkResponse]:
        """Batches in, one answer per batch once its decisions are durable (see banditd.bulk).
        A bad batch (unknown or paused experiment, too many units) ends the stream with its
        status; a bad unit is refused in the answer and the others are decided."""
        with self.streams.admit(context) as touch:
            experiment_id = ""
            first = 0
            for req in request_iterator:
                touch()
                if isinstance(req, Undecodable):
                    raise InvalidArgument(f"undecodable DecideBulkRequest message ({req.error})")
                if req.experiment_id and experiment_id and req.experiment_id != experiment_id:
                    raise InvalidArgument(
                        f"one experiment per DecideBulk stream: {experiment_id!r} then {req.experiment_id!r}"
                    )
                experiment_id = req.experiment_id or experiment_id
                if not experiment_id:
                    raise InvalidArgument("the first DecideBulkRequest must name the experiment")
                units = list(req.unit_ids)
                contexts = None
                if req.contexts:
                    contexts = [_bulk_context(c) for c in req.contexts]
                result = decide_bulk(self.engine, experiment_id, units, req.k, contexts, _timeout(context))
                yield bulk_response(result, first)
                first += len(units)

    def GetAllocation(self, request: pb.GetAllocationRequest, context: grpc.ServicerContext) -> pb.Allocation:
        snap = self.allocations.current(request.experiment_id, _timeout(context))
        return pb.Allocation(**{f: snap[f] for f in ALLOCATION_FIELDS})

    def LogExposures(
        self, request_iterator: Iterator[pb.ExposureBatch], context: grpc.ServicerContext
    ) -> pb.RewardStreamResponse:
        """Per-exposure results as RewardStream reports them; each batch is committed durably.
        Columnar batches of valid exposures are committed while the next ones are read (a
        few in flight); any other batch is checked and committed item by item."""
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        rejections: list[pb.RejectedReward] = []
        in_flight: deque[Future[list[str]]] = deque()
        index = 0

        def settle() -> None:
            statuses = wait_for(in_flight.popleft(), _timeout(context))
            accepted = statuses.count("accepted")
            counts["accepted"] += accepted
            counts["duplicate"] += len(statuses) - accepted

        with self.streams.admit(context) as touch:
            for batch in request_iterator:
                touch()
                if isinstance(batch, Undecodable):
                    raise InvalidArgument(f"undecodable ExposureBatch message ({batch.error})")
                size = len(batch.exposures) + len(batch.decision_ids)
                if size > MAX_EXPOSURES_PER_BATCH:
                    raise InvalidArgument(
                        f"an ExposureBatch holds at most {MAX_EXPOSURES_PER_BATCH} exposures, got {size}"
                    )
                if not batch.experiment_id:
                    raise InvalidArgument("ExposureBatch.experiment_id is required")
                queued = self.allocations.submit_columnar(batch.experiment_id, batch)
                if queued is not None:  # every item valid: each is accepted or a duplicate
                    in_flight.append(queued)
                    index += size
                    if len(in_flight) > MAX_CHUNKS_IN_FLIGHT:
                        settle()
                    continue
                items = [*batch.exposures, *columnar_exposures(batch)]
                results = self.allocations.log_exposures(batch.experiment_id, items, _timeout(context))
                for item, (status, reason) in zip(items, results, strict=True):
                    if status in ("accepted", "duplicate"):
                        counts[status] += 1
                    else:
                        counts["rejected"] += 1
                        if len(rejections) < MAX_REPORTED_REJECTIONS:
                            rejections.append(pb.RejectedReward(
                                index=index, decision_id=item.decision_id[:128], code=status, reason=reason
                            ))  # fmt: skip
                    index += 1
            while in_flight:
                settle()
        return pb.RewardStreamResponse(rejections=rejections, **counts)

    def GetAuditLog(self, request: pb.GetAuditLogRequest, context: grpc.ServicerContext) -> pb.AuditLog:
        limit = request.limit or 100
        if limit > MAX_AUDIT_ENTRIES:
            raise InvalidArgument(f"limit must be at most {MAX_AUDIT_ENTRIES}, got {limit}")
        if request.experiment_id:
            self.engine.get_experiment(request.experiment_id)  # NOT_FOUND for an unknown one
        return audit_to_proto(self.engine.store.audit_log(request.experiment_id, limit))

    def Decide(self, request: bytes | pb.DecideRequest, context: grpc.ServicerContext) -> bytes | pb.DecideResponse:
        if type(request) is bytes:
            # Plain experiments, one arm, no context: decided and answered by the core
            # (`_core.FastDecide`); None sends the call down the general path below.
            answer = self.engine.fast.decide(request)
            if answer is not None:
                return answer
            request = parse_raw("Decide", request)
            if isinstance(request, Undecodable):
                raise InvalidArgument(f"the request could not be decoded: {request.error}")
        assert isinstance(request, pb.DecideRequest)
        started = time.perf_counter()
        try:
            if request.allocation_version:
                if request.k > 1 or request.context or request.features:
                    raise InvalidArgument("allocation_version assigns one arm without a context; drop k and context")
                result = self.allocations.decide(request.experiment_id, request.unit_id, request.allocation_version)
            else:
                result = self.engine.decide(
                    request.experiment_id, request.unit_id, request.k, context_from_request(request)
                )
        except Exception as exc:
            # Guardrails count server-side failures only (see banditd.guardrails).
            failed = isinstance(exc, SERVER_FAULTS) or not isinstance(exc, BanditdError | _core.CoreError)
            self.engine.guardian.note_decide(request.experiment_id, time.perf_counter() - started, failed)
            raise
        rec = result.record
        response = pb.DecideResponse(
            decision_id=rec.decision_id, sticky_hit=result.sticky_hit, model_version=result.model_version
        )
        add = response.arms.add  # half the cost of building ChosenArm messages and a list
        for a, s, p in zip(rec.arms, result.scores, rec.propensities, strict=True):
            add(arm_id=a, score=s, propensity=p)
        self.engine.guardian.note_decide(request.experiment_id, time.perf_counter() - started, False)
        return response

    def Reward(self, request: pb.RewardRequest, context: grpc.ServicerContext) -> pb.RewardResponse:
        accepted = self.engine.reward(
            RewardInput(request.decision_id, request.value, request.event_id, request.arm_id),
            _timeout(context),
        )
        return pb.RewardResponse(accepted=accepted)

    def RewardStream(
        self, request_iterator: Iterator[pb.RewardRequest], context: grpc.ServicerContext
    ) -> pb.RewardStreamResponse:
        with self.streams.admit(context) as touch:

            def chunks() -> Iterator[list[RewardInput]]:
                chunk: list[RewardInput] = []
                for r in request_iterator:
                    touch()
                    chunk.append(_reward_input(r))
                    if len(chunk) >= STREAM_CHUNK:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk

            return self._ingest(chunks(), context)

    def RewardBatchStream(
        self, request_iterator: Iterator[pb.RewardBatch], context: grpc.ServicerContext
    ) -> pb.RewardStreamResponse:
        with self.streams.admit(context) as touch:

            def batches() -> Iterator[list[RewardInput]]:
                for batch in request_iterator:
                    touch()
                    if isinstance(batch, Undecodable):
                        yield [RewardInput("", 0.0, refused=f"undecodable RewardBatch message ({batch.error})")]
                        continue
                    items = [_reward_input(r) for r in batch.rewards]
                    for item in items[MAX_REWARDS_PER_MESSAGE:]:
                        item.refused = (
                            f"this RewardBatch has {len(items)} rewards; at most {MAX_REWARDS_PER_MESSAGE} "
                            "per message are taken"
                        )
                    yield items

            return self._ingest(batches(), context)

    def _ingest(self, chunks: Iterable[list[RewardInput]], context: grpc.ServicerContext) -> pb.RewardStreamResponse:
        """Resolves each chunk while earlier ones are being committed (a few in flight), then
        answers once every reward of the stream is durable."""
        resp = pb.RewardStreamResponse()
        in_flight: deque[tuple[int, list[RewardInput], Callable[[float | None], list[RewardResult]]]] = deque()
        index = 0

        def settle() -> None:
            start, chunk, wait = in_flight.popleft()
            for offset, result in enumerate(wait(_timeout(context))):
                if result.status == "accepted":
                    resp.accepted += 1
                elif result.status == "duplicate":
                    resp.duplicate += 1
                else:
                    resp.rejected += 1
                    if len(resp.rejections) < MAX_REPORTED_REJECTIONS and result.error is not None:
                        resp.rejections.add(
                            index=start + offset,
                            decision_id=chunk[offset].decision_id,
                            code=result.error.code.name,
                            reason=result.error.message,
                        )

        for chunk in chunks:
            if not chunk:
                continue
            in_flight.append((index, chunk, self.engine.submit_rewards(chunk)))
            index += len(chunk)
            if len(in_flight) > MAX_CHUNKS_IN_FLIGHT:
                settle()
        while in_flight:
            settle()
        return resp

    def GetDiagnostics(self, request: pb.GetDiagnosticsRequest, context: grpc.ServicerContext) -> pb.Diagnostics:
        d = self.engine.diagnostics(request.experiment_id, request.reward_silence_seconds)
        arms = [
            pb.ArmDiagnostics(
                arm_id=a.arm_id,
                group=a.group,
                active=a.active,
                pulls=a.pulls,
                rewards=a.rewards,
                reward_sum=a.reward_sum,
                mean=a.mean,
                low=a.low,
                high=a.high,
                recent_share=a.recent_share,
                drift_recent=d["drift_recent"][i],
                drift_window=d["drift_window"][i],
                dominated=d["dominated"][i],
                observations=a.observations,
                rewarded=a.rewarded,
            )
            for i, a in enumerate(d["arms"])
        ]
        per_arm = ("arms", "drift_recent", "drift_window", "dominated", "alarms")
        scalars = {k: v for k, v in d.items() if k not in per_arm}
        return pb.Diagnostics(
            experiment_id=request.experiment_id,
            arms=arms,
            alarms=[pb.Alarm(code=c, message=m) for c, m in d["alarms"]],
            **scalars,
        )

    def GetArmStats(self, request: pb.GetArmStatsRequest, context: grpc.ServicerContext) -> pb.GetArmStatsResponse:
        rows = self.engine.arm_stats(request.experiment_id)
        return pb.GetArmStatsResponse(
            experiment_id=request.experiment_id,
            arms=[
                pb.ArmStats(
                    arm_id=r.arm_id,
                    pulls=r.pulls,
                    rewards=r.rewards,
                    reward_sum=r.reward_sum,
                    mean=r.mean,
                    low=r.low,
                    high=r.high,
                    recent_share=r.recent_share,
                    active=r.active,
                    group=r.group,
                    observations=r.observations,
                    rewarded=r.rewarded,
                )
                for r in rows
            ],
            total_decisions=sum(r.pulls for r in rows),
            total_rewards=sum(r.rewards for r in rows),
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelReport:
        # The engine raises FailedPrecondition for an experiment without a contextual policy.
        return model_report_proto(self.engine.model_report(request.experiment_id), request.experiment_id)
