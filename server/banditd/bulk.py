"""Bulk decisions (DecideBulk): a batch of units decided at once, for campaign sends.

Fast path (context-free policies, not sticky, no control share / floors / burn-in, no
half-life, no maturation delay, running): the Rust core makes the batch's decisions in one
call (`Bandit.choose_many`, the state lock taken per 512 decisions; Thompson over 2,000 or
more arms lets units share posterior draws, `experiment.units_per_draw`), and the batch is stored as
ONE columnar record (`store.DecisionBatch`) with per-arm counts applied in the same
transaction: decision i of batch B is "B.i", rewarded like any decision. Every other
experiment takes the same path as Decide, unit by unit (sticky rules, contexts, control
share, floors, burn-in and fallback all apply), with per-unit decision ids. Either way the
answer is sent once the batch is durable.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from banditd import _core
from banditd.errors import BanditdError, ExperimentPaused, InvalidArgument, ResourceExhausted, Unavailable
from banditd.experiment import now_ms
from banditd.ops import LogDecisionBatch
from banditd.store import BATCH_REJECTED, DecisionBatch, new_decision_id
from banditd.validation import check_id, check_k

if TYPE_CHECKING:
    from banditd.engine import Engine
    from banditd.experiment import ExperimentRuntime

MAX_BATCH_UNITS = 100_000
REJECTED = BATCH_REJECTED


@dataclass
class BulkResult:
    batch_id: str = ""  # set on the fast path: decision i is f"{batch_id}.{i}"
    decision_ids: list[str] = field(default_factory=list)  # set on the unit-by-unit path
    arm_ids: list[str] = field(default_factory=list)  # arm table
    arms: Any = None  # array('I') or numpy uint32: k per unit, REJECTED for refused units
    propensities: Any = None  # array('d') or numpy float64
    k: int = 1
    rejected: list[tuple[int, str, str, str]] = field(default_factory=list)  # index, unit, code, reason
    model_version: int = 0


def fast_path(rt: ExperimentRuntime) -> bool:
    spec = rt.spec
    return (
        rt.model is None and not spec.sticky and not spec.mixed and spec.state == "running"
        and spec.half_life <= 0 and rt.rule.min_age_ms <= 0
    )  # fmt: skip


def decide_bulk(
    engine: Engine,
    experiment_id: str,
    units: list[str],
    k: int,
    contexts: list[dict[str, Any] | None] | None,
    timeout: float | None,
) -> BulkResult:
    rt = engine.require(experiment_id)
    if len(units) > MAX_BATCH_UNITS:
        raise InvalidArgument(f"a batch holds at most {MAX_BATCH_UNITS} units, got {len(units)}; send more batches")
    if contexts and len(contexts) != len(units):
        raise InvalidArgument(f"{len(contexts)} contexts for {len(units)} units: send one per unit or none")
    k = check_k(k or 1)
    if rt.spec.state == "paused":
        raise ExperimentPaused(f"experiment {experiment_id!r} is paused; resume it to get decisions")
    engine.writer.refuse_if_failing()
    if not contexts and fast_path(rt):
        return _columnar(engine, rt, units, k, timeout)
    return _unit_by_unit(engine, experiment_id, units, k, contexts, timeout)


def _check_units(units: list[str]) -> list[tuple[int, str, str, str]]:
    rejected = []
    for i, u in enumerate(units):
        try:
            if u:
                check_id("unit id", u)
        except BanditdError as exc:
            rejected.append((i, u[:128], exc.code.name, exc.message))
    return rejected


def _columnar(
    engine: Engine, rt: ExperimentRuntime, units: list[str], k: int, timeout: float | None
) -> BulkResult:
    experiment_id = rt.spec.id
    rejected = _check_units(units)
    n_ok = len(units) - len(rejected)
    try:
        raw_arms, raw_props = rt.bandit.choose_many(n_ok, k, rt.units_per_draw)
    except _core.CoreError as exc:
        raise InvalidArgument(f"experiment {experiment_id!r}: {exc}") from None
    idx = np.frombuffer(raw_arms, dtype=np.uint32)
    props = np.frombuffer(raw_props, dtype=np.float64)
    if rejected:  # refused units keep their place, with REJECTED and propensity 0
        keep = np.ones(len(units), dtype=bool)
        keep[[r[0] for r in rejected]] = False
        full_idx = np.full(len(units) * k, REJECTED, dtype=np.uint32)
        full_props = np.zeros(len(units) * k)
        mask = np.repeat(keep, k)
        full_idx[mask] = idx
        full_props[mask] = props
        idx, props = full_idx, full_props
    valid = idx != REJECTED
    used, compact = np.unique(idx[valid], return_inverse=True)
    table = [rt.arm_ids[int(a)] for a in used]
    remapped = np.full(len(idx), REJECTED, dtype=np.uint32)
    remapped[valid] = compact.astype(np.uint32)
    counts = np.bincount(compact, minlength=len(used)) if len(used) else np.zeros(0, dtype=np.int64)
    ts = now_ms()
    batch_id = new_decision_id(ts)
    batch = DecisionBatch(
        batch_id, experiment_id, ts, rt.bandit.version, k, table, remapped.tobytes(), props.tobytes(), units
    )
    engine.writer.submit_and_wait(
        LogDecisionBatch(batch, rt.spec, {table[i]: int(c) for i, c in enumerate(counts) if c}), timeout
    )
    # Counted once durable (the batch is answered only then): recent shares and monitors.
    chosen = idx[valid]
    rt.recent.extend(int(a) for a in chosen[-(rt.recent.maxlen or 1000) :])
    rt.monitor.on_decision(ts / 1000.0, int(chosen.size))
    if k not in rt.slate_sizes:
        rt.slate_sizes.add(k)
    return BulkResult(batch_id, [], table, remapped, props, k, rejected, 0)


def _unit_by_unit(
    engine: Engine,
    experiment_id: str,
    units: list[str],
    k: int,
    contexts: list[dict[str, Any] | None] | None,
    timeout: float | None,
) -> BulkResult:
    table: dict[str, int] = {}
    arms = array("I")
    props = array("d")
    ids: list[str] = []
    rejected: list[tuple[int, str, str, str]] = []
    version = 0
    for i, unit in enumerate(units):
        try:
            result = engine.decide(experiment_id, unit, k, contexts[i] if contexts else None)
        except BanditdError as exc:
            if isinstance(exc, ExperimentPaused | ResourceExhausted | Unavailable):
                raise  # the whole batch: nothing more can be decided (paused, or the store failing)
            rejected.append((i, unit[:128], exc.code.name, exc.message))
            ids.append("")
            arms.extend([REJECTED] * k)
            props.extend([0.0] * k)
            continue
        rec = result.record
        version = result.model_version or version
        ids.append(rec.decision_id)
        arms.extend(table.setdefault(a, len(table)) for a in rec.arms)
        props.extend(rec.propensities)
    engine.writer.sync(timeout)  # answered once durable, like the columnar path
    return BulkResult("", ids, list(table), arms, props, k, rejected, version)
