"""The durable write operations: each runs in a group-commit transaction (see writer.py).

Statistics change only here, inside the transaction that stores what caused the change
(a decision, a reward event, a maturation), following the outcome model of
`banditd.outcomes`. The engine's posteriors are rebuilt from what these commit.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from banditd.errors import ExperimentAlreadyExists, ExperimentNotFound, FailedPrecondition
from banditd.experiment import ExperimentSpec
from banditd.outcomes import Delta, combine, on_event, on_maturity
from banditd.store import DecisionBatch, DecisionRecord, EventRecord, FeatureDefinition, Outcome, WriteTxn
from banditd.writer import WriteOp

# Stored weights are rescaled once the clock has run this many half-lives past their base
# (2^-128: far from the limits of a double either way).
RESCALE_HALF_LIVES = 128.0
CONTEXTUAL_RESCALE_HALF_LIVES = 2.0
# Model log item that rescales every arm's model by its weight (see `_core.Linear.update`).
RESCALE_ITEM = 0xFFFFFFFF


class Accounting:
    """Adds observations to an experiment's arm statistics, with the half-life clock.

    An observation made at clock t gets stored weight d^-(t - base); the discounted
    statistic is the stored one times d^(clock - base). A later change of the same
    observation's value (an event) uses the weight it was made with."""

    def __init__(self, txn: WriteTxn, spec: ExperimentSpec) -> None:
        self.txn = txn
        self.spec = spec
        self.exp = spec.id
        self.discount = 0.5 ** (1.0 / spec.half_life) if spec.half_life > 0 else 1.0
        self.binary = spec.reward_type == "binary"
        self.contextual = spec.contextual

    def features(self, rec: DecisionRecord | None) -> bytes | None:
        """The decision's encoded features when they feed the current model version (a
        decision of an older version changes nothing: that model restarted)."""
        if not self.contextual or rec is None or rec.features is None:
            return None
        fd = self.txn.model_definition(self.exp)
        if rec.model_version != fd.version or len(rec.features) != 8 * fd.dimension:
            return None
        return rec.features

    def _weight(self, clock: float | None) -> float:
        if self.discount >= 1.0 or clock is None:
            return 1.0
        base = self.txn.policy(self.exp).base
        return float(self.discount ** -(clock - base))

    def _event(self, arm_id: str, n: float, dsum: float, dsumsq: float, up: bool, down: bool) -> None:
        """Records what a reward event did to an arm (stored units), for the rise/fall check:
        the engine compares the score with and without the batch's event changes."""
        ch = self.txn.changes[self.exp]
        acc = ch.event_deltas.setdefault(arm_id, [0.0, 0.0, 0.0])
        acc[0] += n
        acc[1] += dsum
        acc[2] += dsumsq
        if up and arm_id not in ch.falls and arm_id not in ch.mixed:
            ch.rises.add(arm_id)
        elif down and arm_id not in ch.rises and arm_id not in ch.mixed:
            ch.falls.add(arm_id)
        elif up or down:
            ch.rises.discard(arm_id)
            ch.falls.discard(arm_id)
            ch.mixed.add(arm_id)

    def observe(self, arm_id: str, value: float, event: bool = False, x: bytes | None = None) -> float:
        """A new observation (`event`: made by a reward event); returns its clock. With
        features `x` (contextual) it is also an update item of the arm's model."""
        policy = self.txn.policy(self.exp)
        clock = policy.clock
        w = self._weight(clock)
        row = self.txn.arm(self.exp, arm_id)
        row.n += w
        row.sum += w * value
        row.sumsq += w * value * value
        row.observations += 1
        row.value_sum += value
        if x is not None:
            self.txn.model_item(self.exp, self.spec.arm_index[arm_id], x, w, w * value, w * value * value)
        policy.clock = clock + 1
        if event:  # raises the mean only at the top of the range, lowers it only at the bottom
            self._event(arm_id, w, w * value, w * value * value, self.binary and value >= 1.0, value <= 0.0)
        # Contextual models rescale every CONTEXTUAL_RESCALE_HALF_LIVES: the rescale restores
        # their ridge prior, which decays with the stored weights in between.
        every = CONTEXTUAL_RESCALE_HALF_LIVES if self.contextual else RESCALE_HALF_LIVES
        if self.discount < 1.0 and (policy.clock - policy.base) > every * self.spec.half_life:
            self._rescale()
        return clock

    def observe_many(self, arm_id: str, count: int, value: float) -> None:
        """`count` observations of `value` at once (a decision batch). Only without a
        half-life and a model: the engine sends other experiments' batches decision by decision."""
        assert self.discount >= 1.0 and not self.contextual
        row = self.txn.arm(self.exp, arm_id)
        row.n += count
        row.sum += count * value
        row.sumsq += count * value * value
        row.observations += count
        row.value_sum += count * value
        self.txn.policy(self.exp).clock += count

    def swap(self, arm_id: str, delta: Delta, clock: float | None, x: bytes | None = None) -> None:
        """An observed decision's value changed by `delta` (count unchanged)."""
        w = self._weight(clock)
        if x is not None:
            self.txn.model_item(self.exp, self.spec.arm_index[arm_id], x, 0.0, w * delta.sum, w * delta.sumsq)
        row = self.txn.arm(self.exp, arm_id)
        before = row.sum
        row.sum += w * delta.sum
        row.sumsq += w * delta.sumsq
        row.value_sum += delta.sum
        if self.binary:  # a success weighs no more than its trial, whatever the rounding
            row.sum = min(max(row.sum, 0.0), row.n)
        self._event(arm_id, 0.0, row.sum - before, w * delta.sumsq, delta.sum > 0, delta.sum < 0)

    def _rescale(self) -> None:
        self.txn.changes[self.exp].rescaled = True  # event deltas no longer in stored units
        policy = self.txn.policy(self.exp)
        f = self.discount ** (policy.clock - policy.base)
        for row in self.txn.all_arms(self.exp).values():
            row.n *= f
            row.sum *= f
            row.sumsq *= f
        if self.contextual:  # the models' stored weights move with the rows (a logged item)
            d = self.txn.model_definition(self.exp).dimension
            self.txn.model_item(self.exp, RESCALE_ITEM, bytes(8 * d), f, 0.0, 0.0)
        policy.base = policy.clock


class PutExperiment(WriteOp):
    """Creates (create=True) or replaces an experiment definition."""

    def __init__(
        self,
        spec: ExperimentSpec,
        create: bool,
        on_commit: Callable[[ExperimentSpec], None],
        audit: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.create = create
        self.on_commit = on_commit
        self.audit = audit  # recorded in the same transaction as the change

    def write(self, batch: WriteTxn) -> ExperimentSpec:
        stored = batch.experiment_json(self.spec.id)
        exists = stored is not None
        if self.create and exists:
            raise ExperimentAlreadyExists(
                f"experiment {self.spec.id!r} already exists; use UpdateExperiment to change it"
            )
        if not self.create and not exists:
            raise ExperimentNotFound(f"experiment {self.spec.id!r} does not exist")
        if not self.create and stored is not None and stored["version"] != self.spec.version - 1:
            # Another server process changed it first (optimistic concurrency).
            raise FailedPrecondition(
                f"experiment {self.spec.id!r} was changed concurrently; read it again and retry the update"
            )
        batch.put_experiment(self.spec.id, self.spec.to_json())
        if self.audit is not None:
            batch.add_audit(self.audit)
        return self.spec

    def after_commit(self, result: ExperimentSpec) -> None:
        self.on_commit(result)


def record_decision(batch: WriteTxn, acct: Accounting, r: DecisionRecord) -> None:
    """Stores a decision and counts it: pulls, and in decision mode an observation now (or
    once it matures)."""
    rule = acct.spec.rule
    batch.policy(r.experiment_id).decisions += 1
    for arm in r.arms:
        batch.arm(r.experiment_id, arm).pulls += 1
    if rule.min_age_ms > 0:
        batch.add_maturing(r.experiment_id, r.decision_id)
    elif rule.mode == "decision":
        x = acct.features(r)
        clocks = tuple(acct.observe(arm, on_maturity(rule, None).sum, x=x) for arm in r.arms)
        if acct.discount < 1.0:
            r.clocks = clocks
    batch.put_decision(r)


class LogDecision(WriteOp):
    """Stores a decision (and a sticky assignment); in decision mode it is an observation
    from now on (or once it matures). The response never waits for it."""

    deferrable = True

    def __init__(
        self,
        record: DecisionRecord,
        spec: ExperimentSpec,
        sticky: bool,
        on_done: Callable[[str], None],
    ) -> None:
        self.record = record
        self.spec = spec
        self.sticky = sticky
        self.on_done = on_done

    def write(self, batch: WriteTxn) -> None:
        if self.retried and batch.has_decision(self.record.decision_id):
            return  # the failed commit was applied after all
        value = self.spec.decision_observation
        if value is None:
            record_decision(batch, Accounting(batch, self.spec), self.record)
        else:
            rec = self.record
            observe_at_once(batch, rec.experiment_id, 1, ((a, 1) for a in rec.arms), value)
            batch.put_decision(rec)
        if self.sticky and self.record.unit_id:
            batch.put_assignment(self.record.experiment_id, self.record.unit_id, self.record.arms)

    def after_commit(self, result: None) -> None:
        self.on_done(self.record.decision_id)

    def failed(self, exc: BaseException) -> None:
        self.on_done(self.record.decision_id)


def observe_at_once(
    batch: WriteTxn, experiment_id: str, decisions: int, arm_counts: Iterable[tuple[str, int]], value: float
) -> None:
    """Counts decisions that are observations of `value` the moment they are stored
    (`decision_observation`): what record_decision and Accounting.observe do at weight 1,
    inlined, per arm with how many of the decisions chose it."""
    policy = batch.policy(experiment_id)
    policy.decisions += decisions
    for arm_id, c in arm_counts:
        row = batch.arm(experiment_id, arm_id)
        row.pulls += c
        row.n += c
        row.sum += c * value
        row.sumsq += c * value * value
        row.observations += c
        row.value_sum += c * value
        policy.clock += c


# What `_core.FastDecide.take` gives per experiment: (experiment id, [(decision id, record
# JSON)] sorted, [(arm id, decisions)], arm indices u32 LE, unix ms u64 LE, seconds f64 LE).
FastGroup = tuple[str, list[tuple[bytes, bytes]], list[tuple[str, int]], bytes, bytes, bytes]


class LogFastDecisions(WriteOp):
    """Stores the Decide fast path's records (taken by the writer for this commit) and counts
    them as `LogDecision` counts each: per arm at once, as they are all observed at weight 1.
    Retried after an unreachable database like it."""

    deferrable = True

    def __init__(
        self,
        groups: list[FastGroup],
        specs: Callable[[str], ExperimentSpec | None],
        on_done: Callable[[], None],
    ) -> None:
        self.groups = groups
        self.specs = specs
        self.on_done = on_done

    def write(self, batch: WriteTxn) -> None:
        first = self.groups[0][1][0][0].decode() if self.groups and self.groups[0][1] else ""
        if self.retried and first and batch.has_decision(first):
            return  # the failed commit was applied after all (one transaction: all of them)
        for exp, items, counts, _, _, _ in self.groups:
            spec = self.specs(exp)
            value = spec.decision_observation if spec is not None else None
            if spec is None or value is None:
                # The definition changed since (or is gone): each record the general way.
                acct = Accounting(batch, spec) if spec is not None else None
                for k, v in items:
                    rec = DecisionRecord.decode(k.decode(), v)
                    if acct is None:
                        batch.put_decision(rec)
                    else:
                        record_decision(batch, acct, rec)
                continue
            observe_at_once(batch, exp, len(items), counts, value)
            batch.put_decision_items(items)

    def after_commit(self, result: None) -> None:
        self.on_done()

    def failed(self, exc: BaseException) -> None:
        self.on_done()


class ClaimAssignment(WriteOp):
    """A sticky unit's first assignment when other processes or nodes share the store: made
    durable before the decision is answered, and the first claim wins (a later one gets the
    arms already held), so a unit keeps its arm whichever process or node it reaches."""

    def __init__(self, experiment_id: str, unit_id: str, arms: tuple[str, ...], active: frozenset[str]) -> None:
        self.experiment_id = experiment_id
        self.unit_id = unit_id
        self.arms = arms
        self.active = active

    def write(self, batch: WriteTxn) -> tuple[str, ...]:
        held = batch.assignment(self.experiment_id, self.unit_id)
        if held is not None and len(held) == len(self.arms) and all(a in self.active for a in held):
            return held
        batch.put_assignment(self.experiment_id, self.unit_id, self.arms)
        return self.arms


class LogDecisionBatch(WriteOp):
    """Stores a decision batch (one columnar record) and counts its decisions: pulls per
    arm and, in decision mode, one observation each (experiments without maturation delay,
    half-life or model: the engine decides the others one by one)."""

    def __init__(self, batch: DecisionBatch, spec: ExperimentSpec, counts: dict[str, int]) -> None:
        self.batch = batch
        self.spec = spec
        self.counts = counts

    def write(self, txn: WriteTxn) -> None:
        exp, rule = self.spec.id, self.spec.rule
        txn.policy(exp).decisions += len(self.batch.units)
        acct = Accounting(txn, self.spec)
        value = on_maturity(rule, None).sum
        for arm_id, count in self.counts.items():
            txn.arm(exp, arm_id).pulls += count
            if rule.mode == "decision":
                acct.observe_many(arm_id, count, value)
        txn.put_decision_batch(self.batch)


@dataclass(slots=True)
class ResolvedReward:
    """A reward that passed validation: its decision and arm are known."""

    index: int
    decision_id: str
    experiment_id: str
    arm_id: str
    value: float
    event_key: str
    ts_ms: int


ACCEPTED, DUPLICATE = "accepted", "duplicate"


class RecordRewards(WriteOp):
    """Counts each reward event once, durably, and moves its decision's outcome."""

    def __init__(self, rewards: list[ResolvedReward], specs: Callable[[str], ExperimentSpec | None]) -> None:
        self.rewards = rewards
        self.specs = specs

    def write(self, batch: WriteTxn) -> list[str]:
        outcome: list[str] = []
        accounts: dict[str, Accounting] = {}
        batch.prefetch_rewards(
            [(r.experiment_id, r.event_key) for r in self.rewards], [(r.decision_id, r.arm_id) for r in self.rewards]
        )
        for r in self.rewards:
            spec = self.specs(r.experiment_id)
            if spec is None or not batch.add_event(
                r.experiment_id, r.event_key, EventRecord(r.decision_id, r.arm_id, r.value, r.ts_ms)
            ):
                outcome.append(DUPLICATE if spec is not None else "rejected")
                continue
            acct = accounts.get(r.experiment_id) or accounts.setdefault(r.experiment_id, Accounting(batch, spec))
            apply_event(acct, r)
            batch.changes[r.experiment_id].events += 1
            outcome.append(ACCEPTED)
        return outcome


def apply_event(acct: Accounting, r: ResolvedReward) -> None:
    batch, rule = acct.txn, acct.spec.rule
    row = batch.arm(r.experiment_id, r.arm_id)
    old = batch.outcome(r.decision_id, r.arm_id)
    row.events += 1
    row.rewarded += old is None
    new_value = combine(rule.aggregation, old.value if old else None, r.value)
    new = Outcome(new_value, (old.events if old else 0) + 1, old.clock if old else None)
    matured = rule.min_age_ms <= 0 or not batch.is_maturing(r.experiment_id, r.decision_id)
    delta = on_event(rule, matured, old.value if old else None, new_value)
    rec = batch.decision(r.decision_id) if acct.contextual or (acct.discount < 1.0 and not delta.n) else None
    x = acct.features(rec)
    if delta.n:  # explicit mode: the decision's first event makes it an observation
        new.clock = acct.observe(r.arm_id, new_value, event=True, x=x)
    elif not delta.empty:
        clock = new.clock
        if clock is None and rec is not None and rec.clocks is not None:
            clock = rec.clocks[rec.arms.index(r.arm_id)]
        acct.swap(r.arm_id, delta, clock, x)
    batch.put_outcome(r.decision_id, r.arm_id, new)


class PutFeatureDefinition(WriteOp):
    """Stores a new feature definition (model version) of a contextual experiment, unless
    another process stored one first (the version must follow the stored one)."""

    def __init__(self, experiment_id: str, fd: FeatureDefinition, on_commit: Callable[[str], None]) -> None:
        self.experiment_id = experiment_id
        self.fd = fd
        self.on_commit = on_commit

    def write(self, batch: WriteTxn) -> bool:
        if batch.model_definition(self.experiment_id).version != self.fd.version - 1:
            return False
        batch.put_model_definition(self.experiment_id, self.fd)
        return True

    def after_commit(self, result: bool) -> None:
        self.on_commit(self.experiment_id)


class MatureDecisions(WriteOp):
    """Decisions of min_age experiments that are old enough become observations, with the
    reward events they have by now."""

    def __init__(self, specs: list[ExperimentSpec], now_ms: int, limit: int = 20_000) -> None:
        self.specs = specs
        self.now_ms = now_ms
        self.limit = limit

    def write(self, batch: WriteTxn) -> int:
        done = 0
        for spec in self.specs:
            rule = spec.rule
            ids = batch.take_matured(spec.id, self.now_ms - rule.min_age_ms, self.limit - done)
            acct = Accounting(batch, spec)
            for decision_id in ids:
                rec = batch.decision(decision_id)
                if rec is None:
                    continue
                clocks = []
                x = acct.features(rec)
                for arm in rec.arms:
                    out = batch.outcome(decision_id, arm)
                    d = on_maturity(rule, out.value if out else None)
                    clocks.append(acct.observe(arm, d.sum, x=x) if d.n else None)
                if acct.discount < 1.0 and any(c is not None for c in clocks):
                    rec.clocks = tuple(c if c is not None else -1.0 for c in clocks)
                    batch.put_decision(rec)
                    for arm, c in zip(rec.arms, clocks, strict=True):
                        out = batch.outcome(decision_id, arm)
                        if out is not None and c is not None:
                            out.clock = c
                            batch.put_outcome(decision_id, arm, out)
            done += len(ids)
            if done >= self.limit:
                break
        return done


class AddAudit(WriteOp):
    """An audit entry without a definition change (a guardrail's alert)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry

    def write(self, batch: WriteTxn) -> None:
        batch.add_audit(self.entry)


class SaveSnapshots(WriteOp):
    """History snapshots of experiments, one (experiment, unix ms, snapshot) each."""

    def __init__(self, snapshots: list[tuple[str, int, dict[str, Any]]]) -> None:
        self.snapshots = snapshots

    def write(self, batch: WriteTxn) -> None:
        for exp, ts_ms, snap in self.snapshots:
            batch.put_snapshot(exp, ts_ms, snap)


class ThinHistory(WriteOp):
    """Coarsens old history snapshots (see `WriteTxn.thin_history`)."""

    def __init__(self, now_ms: int, rules: tuple[tuple[int, int], ...], limit: int) -> None:
        self.now_ms = now_ms
        self.rules = rules
        self.limit = limit

    def write(self, batch: WriteTxn) -> int:
        return batch.thin_history(self.now_ms, self.rules, self.limit)


class LogExposures(WriteOp):
    """Decisions the SDK made from an allocation snapshot: each stored and counted like a
    Decide's, once per decision id (a repeated id is a duplicate)."""

    def __init__(self, records: list[DecisionRecord], spec: ExperimentSpec) -> None:
        self.records = records
        self.spec = spec

    def write(self, batch: WriteTxn) -> list[str]:
        acct = Accounting(batch, self.spec)
        out = []
        for r in self.records:
            if batch.has_decision(r.decision_id):
                out.append(DUPLICATE)
                continue
            record_decision(batch, acct, r)
            out.append(ACCEPTED)
        return out


class LogExposureBatch(WriteOp):
    """Exposures of one snapshot as one columnar record (`WriteTxn.put_exposure_batch`),
    counted like a DecisionBatch (same experiments: no maturation delay, half-life or
    model). An id stored already is a duplicate: the batch keeps only the new ones."""

    def __init__(self, batch: DecisionBatch, spec: ExperimentSpec) -> None:
        self.batch = batch
        self.spec = spec

    def write(self, txn: WriteTxn) -> list[str]:
        b = self.batch
        assert b.ids is not None
        known = txn.known_decisions(b.ids)
        out = [DUPLICATE if d in known else ACCEPTED for d in b.ids]
        if known:
            keep = [i for i, d in enumerate(b.ids) if d not in known]
            if not keep:
                return out
            arms, props = array("I"), array("d")
            arms.frombytes(b.arms)
            props.frombytes(b.propensities)
            b = replace(b, ids=[b.ids[i] for i in keep], units=[b.units[i] for i in keep],
                        arms=array("I", [arms[i] for i in keep]).tobytes(),
                        propensities=array("d", [props[i] for i in keep]).tobytes())  # fmt: skip
        idx = array("I")
        idx.frombytes(b.arms)
        counts = Counter(idx)
        exp, rule = self.spec.id, self.spec.rule
        txn.policy(exp).decisions += len(b.units)
        acct = Accounting(txn, self.spec)
        value = on_maturity(rule, None).sum
        for a, count in counts.items():
            arm_id = b.arm_ids[a]
            txn.arm(exp, arm_id).pulls += count
            if rule.mode == "decision":
                acct.observe_many(arm_id, count, value)
        txn.put_exposure_batch(b)
        return out


class PutAllocation(WriteOp):
    """Issues an allocation snapshot: stores it under the experiment's next version."""

    def __init__(self, experiment_id: str, snapshot: dict[str, Any]) -> None:
        self.experiment_id = experiment_id
        self.snapshot = snapshot

    def write(self, batch: WriteTxn) -> int:
        return batch.put_allocation(self.experiment_id, self.snapshot)
