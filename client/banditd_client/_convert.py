"""Builds requests and reads responses; shared by the sync and async clients."""

from __future__ import annotations

import itertools
import json
import numbers
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from banditd_client.errors import BanditdError
from banditd_client.types import (
    Alarm,
    Allocation,
    Analysis,
    ArmAnalysis,
    ArmDiagnostics,
    ArmInfo,
    ArmModel,
    ArmStat,
    AuditEntry,
    BulkBatch,
    ChosenArm,
    Coefficient,
    Decision,
    Diagnostics,
    ExperimentInfo,
    ExposureItem,
    Feature,
    LocalDecision,
    ModelReport,
    RejectedUnit,
    RewardCounts,
    RewardRejection,
)
from banditd_client.v1 import banditd_pb2 as pb

ArmSpec = str | ArmInfo | Mapping[str, Any]
RewardItem = tuple[str, float] | tuple[str, float, str] | Mapping[str, Any]
# A decision's context: text values are categories, numbers are numbers (bool is text).
Context = Mapping[str, str | int | float]

POLICY_PARAMS = (
    "exploitation",
    "epsilon",
    "epsilon_decay",
    "temperature",
    "ucb_c",
    "half_life",
    "group_prior_strength",
    "prune_epsilon",
    # Contextual policies (lin_ucb, lin_ts, logistic_ucb, logistic_ts, logistic).
    "alpha",
    "ridge",
    "exploration_floor",
    "refit_seconds",
    "encoder_warmup",
    "encoder_refit_seconds",
)
REWARD_TYPES = {"binary": pb.BINARY, "continuous": pb.CONTINUOUS}
OUTCOME_MODES = {"": pb.OUTCOME_MODE_UNSPECIFIED, "decision": pb.DECISION, "explicit": pb.EXPLICIT}
AGGREGATIONS = {"": pb.AGGREGATION_UNSPECIFIED, "max": pb.MAX, "sum": pb.SUM, "first": pb.FIRST, "last": pb.LAST}
STATE_NAMES = {pb.RUNNING: "running", pb.PAUSED: "paused", pb.FALLBACK: "fallback", pb.STATE_UNSPECIFIED: "running"}


def _prior(prior: Sequence[float] | None) -> pb.Prior | None:
    if prior is None:
        return None
    a, b = prior
    return pb.Prior(alpha=float(a), beta=float(b), mean=float(a), strength=float(b))


def arm_proto(spec: ArmSpec) -> pb.Arm:
    if isinstance(spec, str):
        return pb.Arm(id=spec)
    if isinstance(spec, ArmInfo):
        return pb.Arm(id=spec.id, group=spec.group, prior=_prior(spec.prior))
    return pb.Arm(id=str(spec["id"]), group=str(spec.get("group", "")), prior=_prior(spec.get("prior")))


def create_request(
    experiment_id: str,
    arms: Iterable[ArmSpec],
    policy: str,
    reward_type: str,
    sticky: bool,
    attribution_window_seconds: int,
    prior: Sequence[float] | None,
    params: Mapping[str, float],
    outcomes: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> pb.CreateExperimentRequest:
    unknown = set(params) - set(POLICY_PARAMS)
    if unknown:
        raise TypeError(f"unknown policy parameters {sorted(unknown)}; known: {POLICY_PARAMS}")
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"reward_type must be one of {sorted(REWARD_TYPES)}, got {reward_type!r}")
    exp = pb.Experiment(
        id=experiment_id,
        arms=[arm_proto(a) for a in arms],
        policy=pb.Policy(name=policy, **{k: float(v) for k, v in params.items()}),
        reward_type=REWARD_TYPES[reward_type],
        sticky=sticky,
        attribution_window_seconds=int(attribution_window_seconds),
        prior=_prior(prior),
        outcomes=outcomes_proto(outcomes or {}),
        settings=settings_proto(settings or {}),
    )
    return pb.CreateExperimentRequest(experiment=exp)


def outcomes_proto(o: Mapping[str, Any]) -> pb.Outcomes:
    """{"mode": "decision" | "explicit", "aggregation": "max" | "sum" | "first" | "last",
    "default_reward": float, "min_age_seconds": float}; missing keys take the defaults."""
    unknown = set(o) - {"mode", "aggregation", "default_reward", "min_age_seconds"}
    if unknown:
        raise TypeError(f"unknown outcome settings {sorted(unknown)}")
    mode, agg = o.get("mode", ""), o.get("aggregation", "")
    if mode not in OUTCOME_MODES:
        raise ValueError(f"outcome mode must be one of {sorted(m for m in OUTCOME_MODES if m)}, got {mode!r}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(a for a in AGGREGATIONS if a)}, got {agg!r}")
    return pb.Outcomes(
        mode=OUTCOME_MODES[mode],
        aggregation=AGGREGATIONS[agg],
        default_reward=float(o.get("default_reward", 0.0)),
        min_age_seconds=float(o.get("min_age_seconds", 0.0)),
    )


CRITERIA_KEYS = ("min_uplift", "confidence", "min_days", "min_events_per_arm", "max_days", "horizon")
GUARDRAIL_KEYS = ("metric", "threshold", "action", "fallback_arm_id", "window_seconds", "min_samples")
SETTINGS_KEYS = ("control_arm_id", "criteria", "control_share", "traffic_floor", "arm_floors", "burn_in", "guardrails")


def settings_proto(s: Mapping[str, Any]) -> pb.Settings:
    """{"control_arm_id": str, "criteria": {min_uplift, confidence, min_days,
    min_events_per_arm, max_days, horizon}, "control_share": float, "traffic_floor": float,
    "arm_floors": {arm: float}, "burn_in": int, "guardrails": [{metric, threshold, action,
    fallback_arm_id, window_seconds, min_samples}]}; missing keys take the defaults."""
    unknown = set(s) - set(SETTINGS_KEYS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {SETTINGS_KEYS}")
    crit = dict(s.get("criteria") or {})
    if set(crit) - set(CRITERIA_KEYS):
        raise TypeError(f"unknown criteria {sorted(set(crit) - set(CRITERIA_KEYS))}; known: {CRITERIA_KEYS}")
    guardrails = []
    for g in s.get("guardrails") or ():
        if set(g) - set(GUARDRAIL_KEYS):
            raise TypeError(f"unknown guardrail fields {sorted(set(g) - set(GUARDRAIL_KEYS))}; known: {GUARDRAIL_KEYS}")
        guardrails.append(pb.Guardrail(**g))
    return pb.Settings(
        control_arm_id=s.get("control_arm_id", ""),
        criteria=pb.StopCriteria(**crit),
        control_share=float(s.get("control_share", 0.0)),
        traffic_floor=float(s.get("traffic_floor", 0.0)),
        arm_floors={str(k): float(v) for k, v in (s.get("arm_floors") or {}).items()},
        burn_in=int(s.get("burn_in", 0)),
        guardrails=guardrails,
    )


def settings_dict(msg: pb.Settings) -> dict[str, Any]:
    return {
        "control_arm_id": msg.control_arm_id,
        "criteria": {k: getattr(msg.criteria, k) for k in CRITERIA_KEYS},
        "control_share": msg.control_share,
        "traffic_floor": msg.traffic_floor,
        "arm_floors": dict(msg.arm_floors),
        "burn_in": msg.burn_in,
        "guardrails": [{k: getattr(g, k) for k in GUARDRAIL_KEYS} for g in msg.guardrails],
    }


def update_request(
    experiment_id: str,
    add_arms: Iterable[ArmSpec] = (),
    retire_arms: Iterable[str] = (),
    state: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> pb.UpdateExperimentRequest:
    states = {None: pb.STATE_UNSPECIFIED, "paused": pb.PAUSED, "running": pb.RUNNING}
    if state not in states:
        raise ValueError(f"state must be 'paused', 'running' or None, got {state!r}")
    return pb.UpdateExperimentRequest(
        experiment_id=experiment_id,
        add_arms=[arm_proto(a) for a in add_arms],
        retire_arm_ids=list(retire_arms),
        set_state=states[state],
        settings=settings_proto(settings) if settings is not None else None,
    )


def analysis(resp: pb.Analysis) -> Analysis:
    arm_fields = ArmAnalysis.__dataclass_fields__
    return Analysis(
        arms=tuple(ArmAnalysis(**{f: getattr(a, f) for f in arm_fields}) for a in resp.arms),
        criteria={k: getattr(resp.criteria, k) for k in CRITERIA_KEYS},
        **{f: getattr(resp, f) for f in Analysis.__dataclass_fields__ if f not in ("arms", "criteria")},
    )


def audit_log(resp: pb.AuditLog) -> list[AuditEntry]:
    return [
        AuditEntry(e.ts_unix_ms, e.experiment_id, e.action, e.actor, json.loads(e.details or "{}"))
        for e in resp.entries
    ]


def context_value(key: str, value: object) -> pb.ContextValue:
    """One context entry as a typed value. bool is tested first: it is an int, and a flag is
    a category ("true" / "false"), not the number 1 / 0. Any real number (numpy scalars too)
    is a number; anything else is refused here, where the caller's traceback is."""
    if isinstance(value, bool):
        return pb.ContextValue(text="true" if value else "false")
    if isinstance(value, str):
        return pb.ContextValue(text=value)
    if isinstance(value, numbers.Real):
        try:
            return pb.ContextValue(number=float(value))
        except OverflowError:
            raise ValueError(f"context value of {key!r} ({value}) is too large for a double") from None
    raise TypeError(
        f"context value of {key!r} must be str, int or float, got {type(value).__name__}: {value!r}"
    )


def context_features(context: Context | None) -> dict[str, pb.ContextValue]:
    """The context as DecideRequest.features (typed values; the string map `context` is only
    for older clients)."""
    features: dict[str, pb.ContextValue] = {}
    for key, value in (context or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"context keys must be str, got {type(key).__name__}: {key!r}")
        features[key] = context_value(key, value)
    return features


def decide_request(
    experiment_id: str, unit_id: str, k: int | None, context: Context | None, allocation_version: int = 0
) -> pb.DecideRequest:
    return pb.DecideRequest(
        experiment_id=experiment_id,
        unit_id=unit_id,
        k=k or 0,
        features=context_features(context),
        allocation_version=allocation_version,
    )


def reward_request(item: RewardItem) -> pb.RewardRequest:
    if isinstance(item, Mapping):
        return pb.RewardRequest(
            decision_id=item["decision_id"],
            value=float(item["value"]),
            event_id=item.get("event_id", ""),
            arm_id=item.get("arm", ""),
        )
    if len(item) == 2:
        decision_id, value = item  # type: ignore[misc]
        return pb.RewardRequest(decision_id=decision_id, value=float(value))
    decision_id, value, event_id = item  # type: ignore[misc]
    return pb.RewardRequest(decision_id=decision_id, value=float(value), event_id=event_id)


def decision(resp: pb.DecideResponse) -> Decision:
    return Decision(
        decision_id=resp.decision_id,
        arms=tuple(ChosenArm(a.arm_id, a.score, a.propensity) for a in resp.arms),
        sticky_hit=resp.sticky_hit,
        model_version=resp.model_version,
    )


def experiment(exp: pb.Experiment) -> ExperimentInfo:
    params = {name: getattr(exp.policy, name) for name in POLICY_PARAMS}
    return ExperimentInfo(
        id=exp.id,
        arms=tuple(
            ArmInfo(
                id=a.id,
                group=a.group,
                active=a.active,
                prior=(a.prior.alpha, a.prior.beta) if a.HasField("prior") else None,
            )
            for a in exp.arms
        ),
        policy=exp.policy.name,
        policy_params={k: v for k, v in params.items() if v},
        reward_type="continuous" if exp.reward_type == pb.CONTINUOUS else "binary",
        sticky=exp.sticky,
        attribution_window_seconds=exp.attribution_window_seconds,
        state=STATE_NAMES.get(exp.state, "running"),
        version=exp.version,
        created_unix_ms=exp.created_unix_ms,
        outcomes={
            "mode": {pb.EXPLICIT: "explicit"}.get(exp.outcomes.mode, "decision"),
            "aggregation": {v: k for k, v in AGGREGATIONS.items()}.get(exp.outcomes.aggregation, ""),
            "default_reward": exp.outcomes.default_reward,
            "min_age_seconds": exp.outcomes.min_age_seconds,
        },
        settings=settings_dict(exp.settings),
        serving_arm_id=exp.serving_arm_id,
    )


def arm_stats(resp: pb.GetArmStatsResponse) -> list[ArmStat]:
    return [
        ArmStat(
            arm=s.arm_id,
            pulls=s.pulls,
            rewards=s.rewards,
            reward_sum=s.reward_sum,
            mean=s.mean,
            low=s.low,
            high=s.high,
            recent_share=s.recent_share,
            active=s.active,
            group=s.group,
            observations=s.observations,
            rewarded=s.rewarded,
        )
        for s in resp.arms
    ]


# Rewards per RewardBatch message: large enough to amortise per-message costs, small enough
# to keep messages far below gRPC's 4 MB default limit.
REWARD_BATCH = 2000


def reward_batches(items: Iterable[RewardItem]) -> Iterator[pb.RewardBatch]:
    batch = pb.RewardBatch()
    for item in items:
        batch.rewards.append(reward_request(item))
        if len(batch.rewards) >= REWARD_BATCH:
            yield batch
            batch = pb.RewardBatch()
    if len(batch.rewards):
        yield batch


def reward_counts(resp: pb.RewardStreamResponse) -> RewardCounts:
    return RewardCounts(
        accepted=resp.accepted,
        duplicate=resp.duplicate,
        rejected=resp.rejected,
        rejections=tuple(
            RewardRejection(r.index, r.decision_id, r.code, r.reason) for r in resp.rejections
        ),
    )


def diagnostics(resp: pb.Diagnostics) -> Diagnostics:
    scalars = {
        f.name: getattr(resp, f.name)
        for f in resp.DESCRIPTOR.fields
        if f.name not in ("arms", "alarms", "score_histogram")
    }
    arms = tuple(
        ArmDiagnostics(
            arm=a.arm_id,
            **{f.name: getattr(a, f.name) for f in a.DESCRIPTOR.fields if f.name != "arm_id"},
        )
        for a in resp.arms
    )
    return Diagnostics(
        arms=arms,
        alarms=tuple(Alarm(a.code, a.message) for a in resp.alarms),
        score_histogram=tuple(resp.score_histogram),
        **scalars,
    )


def model_report(resp: pb.ModelReport) -> ModelReport:
    scalars = {f.name: getattr(resp, f.name) for f in resp.DESCRIPTOR.fields if f.name not in ("features", "arms")}
    return ModelReport(
        features=tuple(
            Feature(name=f.name, kind=f.kind, mean=f.mean, std=f.std, coverage=f.coverage, importance=f.importance)
            for f in resp.features
        ),
        arms=tuple(
            ArmModel(
                arm=a.arm_id,
                active=a.active,
                observations=a.observations,
                coefficients=tuple(Coefficient(c.feature, c.value, c.low, c.high) for c in a.coefficients),
            )
            for a in resp.arms
        ),
        **scalars,
    )


# DecideBulk: units per DecideBulkRequest; the server refuses batches above MAX_BULK_BATCH.
BULK_BATCH = 10_000
MAX_BULK_BATCH = 100_000
# Batches sent ahead of their answers: keeps the server busy without holding every unit.
BULK_IN_FLIGHT = 8


def check_bulk_args(k: int, batch_size: int, max_in_flight: int) -> None:
    """Refuses bad arguments before the stream starts (where the caller's traceback is)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BULK_BATCH:
        raise ValueError(f"batch_size must be an int in [1, {MAX_BULK_BATCH}], got {batch_size!r}")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")


def bulk_requests(
    experiment_id: str,
    unit_ids: Iterable[str],
    k: int,
    contexts: Iterable[Context | None] | None,
    batch_size: int,
) -> Iterator[tuple[int, list[str], pb.DecideBulkRequest]]:
    """(first index, units, request) per batch, pulling `batch_size` units at a time from
    `unit_ids` (and `contexts`, one per unit: both must have the same length), so a stream of
    any length holds one batch at a time here. Every request names the experiment."""
    first = 0
    if contexts is None:
        ids = iter(unit_ids)
        while units := list(itertools.islice(ids, batch_size)):
            yield first, units, pb.DecideBulkRequest(experiment_id=experiment_id, unit_ids=units, k=k)
            first += len(units)
        return
    pairs = zip(unit_ids, contexts, strict=True)
    while chunk := list(itertools.islice(pairs, batch_size)):
        units = [u for u, _ in chunk]
        req = pb.DecideBulkRequest(
            experiment_id=experiment_id,
            unit_ids=units,
            k=k,
            contexts=[pb.BulkContext(features=context_features(c)) for _, c in chunk],
        )
        yield first, units, req
        first += len(units)


def bulk_batch(resp: pb.DecideBulkResponse, units: list[str]) -> BulkBatch:
    """One answer, columnar: a few C-level copies per batch, no object per decision."""
    k = resp.k or 1
    arm_index = array("I", resp.arms)
    if len(arm_index) != len(units) * k:
        raise BanditdError(
            f"DecideBulk answered {len(arm_index)} arms for {len(units)} units at k={k} "
            f"(batch at index {resp.first_index})"
        )
    return BulkBatch(
        first_index=resp.first_index,
        unit_ids=units,
        batch_id=resp.batch_id,
        arm_ids=tuple(resp.arm_ids),
        arm_index=arm_index,
        propensities=array("d", resp.propensities),
        k=k,
        rejected=tuple(RejectedUnit(r.index, r.unit_id, r.code, r.reason) for r in resp.rejected),
        model_version=resp.model_version,
        explicit_ids=tuple(resp.decision_ids),
    )


class BulkStream:
    """The units of the batches sent and not yet answered, by first index, between the request
    side (grpc's sending thread, or task) and the response side; and the error that stopped
    the request side, if any (raised to the caller once the batches already sent are in)."""

    def __init__(self) -> None:
        self._units: dict[int, list[str]] = {}
        self.error: BaseException | None = None

    def sent(self, first: int, units: list[str]) -> None:
        self._units[first] = units

    def answered(self, resp: pb.DecideBulkResponse) -> BulkBatch:
        units = self._units.pop(resp.first_index, None)
        if units is None:
            raise BanditdError(
                f"DecideBulk answered a batch at index {resp.first_index}, which no batch sent starts at"
            )
        return bulk_batch(resp, units)

    @property
    def pending(self) -> int:
        return len(self._units)


def allocation(msg: pb.Allocation) -> Allocation:
    return Allocation(
        experiment_id=msg.experiment_id,
        version=msg.version,
        arm_ids=tuple(msg.arm_ids),
        probabilities=tuple(msg.probabilities),
        salt=msg.salt,
        issued_unix_ms=msg.issued_unix_ms,
        ttl_seconds=msg.ttl_seconds,
        max_age_seconds=msg.max_age_seconds,
        sticky=msg.sticky,
    )


# An exposure: ExposureItem, a plain (decision_id, unit_id, arm_id, allocation_version[,
# ts_unix_ms]) tuple, a mapping with those keys ("arm" for arm_id works too), or a
# LocalDecision from a snapshot (its time is the one in its decision id).
ExposureLike = (
    ExposureItem | LocalDecision | tuple[str, str, str, int] | tuple[str, str, str, int, int] | Mapping[str, Any]
)
# Exposures per ExposureBatch by default; the server takes at most MAX_EXPOSURE_BATCH.
EXPOSURE_BATCH = 1000
MAX_EXPOSURE_BATCH = 10_000


class FlatExposures:
    """Exposures in one flat list: decision id, unit id, arm index, allocation version, then
    the next exposure's (`LocalAssigner`'s queue); `arm_ids[version]` names the arms of each
    version's snapshot. Iterates as (decision id, unit id, arm id, version); sent columnar,
    each column a slice, the arm indexes as they are."""

    __slots__ = ("flat", "arm_ids")

    def __init__(self, flat: list[Any], arm_ids: Mapping[int, Sequence[str]]) -> None:
        if len(flat) % 4:
            raise ValueError(f"a flat exposure list holds 4 values per exposure, got {len(flat)} values")
        self.flat = flat
        self.arm_ids = arm_ids

    def __len__(self) -> int:
        return len(self.flat) // 4

    def __iter__(self) -> Iterator[tuple[str, str, str, int]]:
        it = iter(self.flat)
        tables = self.arm_ids
        for did, unit, arm, version in zip(it, it, it, it, strict=True):
            yield did, unit, tables[version][arm], version


def exposure_batches(
    experiment_id: str, exposures: Iterable[ExposureLike], batch_size: int = EXPOSURE_BATCH
) -> Iterator[pb.ExposureBatch]:
    """ExposureBatch messages of `batch_size` exposures, pulled lazily from `exposures`. The
    arguments are checked here, at once; a bad item raises when the stream reaches it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_EXPOSURE_BATCH:
        raise ValueError(f"batch_size must be an int in [1, {MAX_EXPOSURE_BATCH}], got {batch_size!r}")
    if not experiment_id:
        raise ValueError("experiment_id is required")
    return _exposure_batches(experiment_id, exposures, batch_size)


def _exposure_batches(
    experiment_id: str, exposures: Iterable[ExposureLike], batch_size: int
) -> Iterator[pb.ExposureBatch]:
    if isinstance(exposures, FlatExposures):
        flat = exposures.flat
        for start in range(0, len(flat), 4 * batch_size):
            part = flat[start : start + 4 * batch_size]
            versions = part[3::4]
            if len(set(versions)) > 1:  # a snapshot changed meanwhile: name the arms
                it = iter(part)
                rows = [(d, u, exposures.arm_ids[v][a], v) for d, u, a, v in zip(it, it, it, it, strict=True)]
                yield from _columnar_exposures(experiment_id, rows, batch_size)
                continue
            batch = pb.ExposureBatch(experiment_id=experiment_id, allocation_version=versions[0])
            batch.decision_ids.extend(part[0::4])
            batch.unit_ids.extend(part[1::4])
            batch.arm_ids.extend(exposures.arm_ids[versions[0]])
            batch.arms.extend(part[2::4])
            yield batch
        return
    if isinstance(exposures, list) and exposures and type(exposures[0]) in (LocalDecision, tuple):
        # LocalAssigner's queue (plain 4-tuples), LocalDecisions or 5-tuples: sent columnar,
        # a few C calls per batch instead of a message per exposure.
        try:
            yield from _columnar_exposures(experiment_id, exposures, batch_size)
            return
        except (TypeError, ValueError):
            pass  # mixed items: the general path below says which one is wrong
    batch = pb.ExposureBatch(experiment_id=experiment_id)
    add = batch.exposures.add
    n = 0
    for item in exposures:
        if isinstance(item, Mapping):
            add(
                decision_id=item["decision_id"],
                unit_id=item["unit_id"],
                arm_id=item["arm_id"] if "arm_id" in item else item["arm"],
                allocation_version=int(item["allocation_version"]),
                ts_unix_ms=int(item.get("ts_unix_ms", 0)),
            )
        elif isinstance(item, LocalDecision):
            add(decision_id=item.decision_id, unit_id=item.unit_id, arm_id=item.arm,
                allocation_version=item.allocation_version)  # fmt: skip
        elif len(item) == 5:
            decision_id, unit_id, arm_id, version, ts = item  # type: ignore[misc]
            add(decision_id=decision_id, unit_id=unit_id, arm_id=arm_id, allocation_version=version, ts_unix_ms=ts)
        elif len(item) == 4:
            decision_id, unit_id, arm_id, version = item  # type: ignore[misc]
            add(decision_id=decision_id, unit_id=unit_id, arm_id=arm_id, allocation_version=version)
        else:
            raise ValueError(
                "an exposure is (decision_id, unit_id, arm_id, allocation_version[, ts_unix_ms]), "
                f"got {len(item)} values"
            )
        n += 1
        if n == batch_size:
            yield batch
            batch = pb.ExposureBatch(experiment_id=experiment_id)
            add = batch.exposures.add
            n = 0
    if n:
        yield batch


def _columnar_exposures(
    experiment_id: str, exposures: list[Any], batch_size: int
) -> Iterator[pb.ExposureBatch]:
    first = exposures[0]
    local = type(first) is LocalDecision
    width = len(first)
    messages = []
    for start in range(0, len(exposures), batch_size):
        chunk = exposures[start : start + batch_size]
        ts: tuple[Any, ...] = ()  # none: the server takes each exposure's time from its decision id
        if local:
            ids, units, arms, _, versions, sources = zip(*chunk, strict=True)
            if set(map(type, chunk)) != {LocalDecision} or set(sources) != {"snapshot"}:
                raise ValueError("not only LocalDecisions from a snapshot")
        elif width == 4:
            ids, units, arms, versions = zip(*chunk, strict=True)
        else:
            ids, units, arms, versions, ts = zip(*chunk, strict=True)
        messages += _columnar_batches(experiment_id, ids, units, arms, versions, ts)
    # Built before the first is sent: a bad item (TypeError, ValueError) falls back whole.
    yield from messages


def _columnar_batches(
    experiment_id: str, ids: Sequence[Any], units: Sequence[Any], arms: Sequence[Any], versions: Sequence[Any],
    ts: Sequence[Any],
) -> list[pb.ExposureBatch]:
    """Columnar ExposureBatch messages, one per allocation version among the exposures."""
    out = []
    distinct = set(versions)
    groups = [(distinct.pop(), None)] if len(distinct) == 1 else _rows_by_version(versions)
    for version, rows in groups:
        gi, gu, ga, gt = (ids, units, arms, ts) if rows is None else _pick_rows(rows, ids, units, arms, ts)
        table = {a: n for n, a in enumerate(dict.fromkeys(ga))}
        batch = pb.ExposureBatch(experiment_id=experiment_id, allocation_version=int(version))
        batch.decision_ids.extend(gi)
        batch.unit_ids.extend(gu)
        batch.ts_unix_ms.extend(gt)
        batch.arm_ids.extend(table)
        batch.arms.extend(map(table.__getitem__, ga))
        out.append(batch)
    return out


def _rows_by_version(versions: Sequence[Any]) -> list[tuple[Any, list[int] | None]]:
    by_version: dict[Any, list[int]] = {}
    for i, v in enumerate(versions):
        by_version.setdefault(v, []).append(i)
    return list(by_version.items())  # type: ignore[arg-type]


def _pick_rows(rows: list[int], *columns: Sequence[Any]) -> list[list[Any]]:
    return [[col[i] for i in rows] if col else [] for col in columns]


class Capture:
    """Wraps a request iterator: an exception raised while producing requests (a bad item) is
    kept and ends the stream instead of cancelling the call, so the caller can raise it
    itself once the call returns (grpc would report it as a bare CANCELLED)."""

    def __init__(self, requests: Iterator[Any]) -> None:
        self._requests = requests
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._requests
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller
            self.error = exc
