"""The durable write operations: each runs in a group-commit transaction (see writer.py)."""

from __future__ import annotations

import time
from array import array
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from banditd.errors import ExperimentAlreadyExists, ExperimentNotFound, FailedPrecondition
from banditd.experiment import ExperimentRuntime, ExperimentSpec
from banditd.store import SPECS_COUNTER, key
from banditd.writer import Batch, WriteOp


class PutExperiment(WriteOp):
    """Creates (create=True) or replaces an experiment definition."""

    def __init__(
        self, spec: ExperimentSpec, create: bool, on_commit: Callable[[ExperimentSpec], None]
    ) -> None:
        self.spec = spec
        self.create = create
        self.on_commit = on_commit

    def write(self, batch: Batch) -> ExperimentSpec:
        k = self.spec.id.encode()
        raw = batch.txn.get(k, db=batch.store.experiments)
        exists = raw is not None
        if self.create and exists:
            raise ExperimentAlreadyExists(
                f"experiment {self.spec.id!r} already exists; use UpdateExperiment to change it"
            )
        if not self.create and not exists:
            raise ExperimentNotFound(f"experiment {self.spec.id!r} does not exist")
        if not self.create and orjson.loads(raw)["version"] != self.spec.version - 1:
            # Another server process changed it first (optimistic concurrency).
            raise FailedPrecondition(
                f"experiment {self.spec.id!r} was changed concurrently; read it again and retry the update"
            )
        batch.txn.put(k, orjson.dumps(self.spec.to_json()), db=batch.store.experiments)
        batch.store.bump(batch.txn, SPECS_COUNTER)
        return self.spec

    def after_commit(self, result: ExperimentSpec) -> None:
        self.on_commit(result)


@dataclass(slots=True)
class DecisionRecord:
    decision_id: str
    experiment_id: str
    arms: tuple[str, ...]
    propensities: tuple[float, ...]
    unit_id: str
    ts_ms: int
    model_version: int
    context: dict[str, str] | None = None

    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "e": self.experiment_id,
            "a": self.arms,
            "p": self.propensities,
            "u": self.unit_id,
            "t": self.ts_ms,
            "v": self.model_version,
        }
        if self.context:
            d["c"] = self.context
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, decision_id: str, raw: dict[str, Any]) -> DecisionRecord:
        return cls(
            decision_id,
            raw["e"],
            tuple(raw["a"]),
            tuple(raw["p"]),
            raw["u"],
            raw["t"],
            raw["v"],
            raw.get("c"),
        )


class LogDecision(WriteOp):
    """Stores a decision (and a sticky assignment); the response never waits for it."""

    deferrable = True

    def __init__(self, record: DecisionRecord, sticky: bool, on_commit: Callable[[str], None]) -> None:
        self.record = record
        self.sticky = sticky
        self.on_commit = on_commit

    def write(self, batch: Batch) -> None:
        r = self.record
        batch.txn.put(r.decision_id.encode(), r.to_json(), db=batch.store.decisions)
        if self.sticky and r.unit_id:
            batch.txn.put(
                key(r.experiment_id, r.unit_id), orjson.dumps(r.arms), db=batch.store.assignments
            )
        for arm in r.arms:
            batch.arm_deltas[key(r.experiment_id, arm)][0] += 1

    def after_commit(self, result: None) -> None:
        self.on_commit(self.record.decision_id)


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
    """Counts each reward event once, durably; then applies the batch to the posteriors."""

    def __init__(
        self,
        rewards: list[ResolvedReward],
        runtimes: Callable[[str], ExperimentRuntime | None],
    ) -> None:
        self.rewards = rewards
        self.runtimes = runtimes

    def write(self, batch: Batch) -> list[str]:
        txn, events = batch.txn, batch.store.events
        outcome = []
        for r in self.rewards:
            # The event record doubles as the reward log: decision, arm, value, time.
            record = orjson.dumps((r.decision_id, r.arm_id, r.value, r.ts_ms))
            if not txn.put(key(r.experiment_id, r.event_key), record, db=events, overwrite=False):
                outcome.append(DUPLICATE)
                continue
            delta = batch.arm_deltas[key(r.experiment_id, r.arm_id)]
            delta[1] += 1
            delta[2] += r.value
            delta[3] += r.value * r.value
            outcome.append(ACCEPTED)
        return outcome

    def after_commit(self, outcome: list[str]) -> None:
        # Typed arrays reach the core as buffers (a memcpy instead of converting each item).
        per_experiment: dict[str, tuple[array[int], array[float]]] = defaultdict(lambda: (array("q"), array("d")))
        for r, status in zip(self.rewards, outcome, strict=True):
            if status != ACCEPTED:
                continue
            rt = self.runtimes(r.experiment_id)
            if rt is None:
                continue
            idx = rt.index[r.arm_id]
            rt.rewards[idx] += 1
            rt.reward_sum[idx] += r.value
            arms, values = per_experiment[r.experiment_id]
            arms.append(idx)
            values.append(r.value)
        now = time.time()
        for exp_id, (arms, values) in per_experiment.items():
            rt = self.runtimes(exp_id)
            if rt is not None:
                touched = list(dict.fromkeys(arms))
                before = dict(zip(touched, rt.bandit.means_of(touched), strict=True))
                rt.bandit.apply_rewards(arms, values)
                after = dict(zip(touched, rt.bandit.means_of(touched), strict=True))
                snapshot = rt.bandit.means() if rt.monitor.snapshot_due(now, len(rt.arm_ids)) else None
                rt.monitor.on_update(list(arms), list(values), before, after, now, snapshot)
                # Refreshes pruned-Thompson bounds of the arms just rewarded (large experiments only).
                rt.bandit.maintain()
