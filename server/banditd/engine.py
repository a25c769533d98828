"""The decision engine: experiments, decisions and rewards, independent of gRPC."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import orjson

from banditd import _core, diagnostics
from banditd.diagnostics import ArmView
from banditd.errors import (
    AlreadyExists,
    ArmNotFound,
    BanditdError,
    DecisionNotFound,
    ExperimentAlreadyExists,
    ExperimentNotFound,
    ExperimentPaused,
    FailedPrecondition,
    InvalidArgument,
    OutsideAttributionWindow,
)
from banditd.experiment import ArmSpec, ExperimentRuntime, ExperimentSpec, now_ms
from banditd.ops import (
    ACCEPTED,
    DecisionRecord,
    LogDecision,
    PutExperiment,
    RecordRewards,
    ResolvedReward,
)
from banditd.store import SEP, SPECS_COUNTER, STATS_COUNTER, Store, key
from banditd.validation import check_id, check_reward_value
from banditd.writer import Writer

log = logging.getLogger("banditd.engine")
REJECTED = "rejected"


@dataclass(slots=True)
class RewardInput:
    decision_id: str
    value: float
    event_id: str = ""
    arm_id: str = ""


@dataclass(slots=True)
class RewardResult:
    status: str  # accepted | duplicate | rejected
    error: BanditdError | None = None


@dataclass(slots=True)
class DecisionResult:
    record: DecisionRecord
    scores: tuple[float, ...]
    sticky_hit: bool


# Per-arm statistics rows are the diagnostics' arm view (one shape for both).
ArmStatsRow = ArmView


def new_decision_id() -> str:
    """Time-ordered (ms, hex) then random: sorts by age, which keeps expiry scans cheap."""
    return f"{now_ms():011x}{os.urandom(6).hex()}"


# How long a pool process waits for another process to commit a decision it is asked about.
DECISION_WAIT_S = 0.25


class Engine:
    def __init__(self, store: Store, writer: Writer, seed: int | None = None) -> None:
        self.store = store
        self.writer = writer
        self.seed = seed
        self._runtimes: dict[str, ExperimentRuntime] = {}
        self._pending: dict[str, DecisionRecord] = {}
        self._admin_lock = threading.RLock()
        # Set when other processes share the store (a worker pool): look there on misses.
        self.shared = False
        self._seen_specs = -1
        self._seen_stats: dict[str, int] = {}

    # Lifecycle.
    def _seed_for(self, experiment_id: str) -> int | None:
        if self.seed is None:
            return None
        return zlib.crc32(experiment_id.encode(), self.seed & 0xFFFFFFFF)

    def load(self) -> None:
        """Rebuilds every experiment and its posterior from the store."""
        for _, raw in self.store.items(self.store.experiments):
            spec = ExperimentSpec.from_json(raw)
            self._runtimes[spec.id] = ExperimentRuntime(spec, self._seed_for(spec.id))
        totals: dict[str, dict[str, tuple[int, int, float, float]]] = defaultdict(dict)
        for k, (pulls, rewards, s, s2) in self.store.items(self.store.arms):
            exp_id, arm_id = (p.decode() for p in k.split(SEP, 1))
            totals[exp_id][arm_id] = (int(pulls), int(rewards), float(s), float(s2))
        for exp_id, arms in totals.items():
            rt = self._runtimes.get(exp_id)
            if rt is not None:
                rt.restore_totals(arms)
        log.info("loaded %d experiments", len(self._runtimes))

    def runtime(self, experiment_id: str) -> ExperimentRuntime | None:
        return self._runtimes.get(experiment_id)

    def _require(self, experiment_id: str) -> ExperimentRuntime:
        rt = self._runtimes.get(experiment_id)
        if rt is None:
            check_id("experiment id", experiment_id)
            if self.shared:
                # Created by another process of the pool a moment ago?
                raw = self.store.get(self.store.experiments, experiment_id.encode())
                if raw is not None:
                    return self._adopt(ExperimentSpec.from_json(raw))
            raise ExperimentNotFound(f"experiment {experiment_id!r} does not exist")
        return rt

    def _adopt(self, spec: ExperimentSpec) -> ExperimentRuntime:
        """Takes over an experiment another process created or changed."""
        with self._admin_lock:
            rt = self._runtimes.get(spec.id)
            if rt is None:
                rt = ExperimentRuntime(spec, self._seed_for(spec.id))
                self._runtimes[spec.id] = rt
                self._seen_stats.pop(spec.id, None)
            elif spec.version > rt.spec.version:
                rt.apply_spec_change(spec)
            return rt

    def refresh_from_store(self) -> None:
        """Brings this process up to date with what other processes committed: new or changed
        experiments, and arm totals (posteriors) that moved. Cheap when nothing changed."""
        specs = self.store.counter(SPECS_COUNTER)
        if specs != self._seen_specs:
            for _, raw in self.store.items(self.store.experiments):
                spec = ExperimentSpec.from_json(raw)
                rt = self._runtimes.get(spec.id)
                if rt is None or spec.version > rt.spec.version:
                    self._adopt(spec)
            self._seen_specs = specs
        for exp_id, rt in list(self._runtimes.items()):
            seen = self.store.counter(STATS_COUNTER + exp_id.encode())
            if seen == self._seen_stats.get(exp_id):
                continue
            prefix = key(exp_id, "")
            totals = {
                k[len(prefix) :].decode(): (int(p), int(r), float(s), float(s2))
                for k, (p, r, s, s2) in self.store.items(self.store.arms, prefix)
            }
            rt.restore_totals(totals)
            self._seen_stats[exp_id] = seen

    # Experiments.
    def create_experiment(self, spec: ExperimentSpec, timeout: float | None = None) -> ExperimentSpec:
        spec.validate()
        spec = replace(spec, created_ms=now_ms(), version=1, state="running")
        runtime = ExperimentRuntime(spec, self._seed_for(spec.id))  # validates policy params
        with self._admin_lock:
            if spec.id in self._runtimes:
                raise ExperimentAlreadyExists(
                    f"experiment {spec.id!r} already exists; use UpdateExperiment to change it"
                )

            def register(_: ExperimentSpec) -> None:
                self._runtimes[spec.id] = runtime

            return self.writer.submit_and_wait(PutExperiment(spec, True, register), timeout)

    def get_experiment(self, experiment_id: str) -> ExperimentSpec:
        return self._require(experiment_id).spec

    def list_experiments(self) -> list[ExperimentSpec]:
        return [rt.spec for rt in sorted(self._runtimes.values(), key=lambda r: r.spec.id)]

    def update_experiment(
        self,
        experiment_id: str,
        add_arms: list[ArmSpec],
        retire_arm_ids: list[str],
        state: str | None,
        timeout: float | None = None,
    ) -> ExperimentSpec:
        if self.shared:  # start from the newest definition any process committed
            raw = self.store.get(self.store.experiments, experiment_id.encode())
            if raw is not None:
                self._adopt(ExperimentSpec.from_json(raw))
        with self._admin_lock:
            rt = self._require(experiment_id)
            old = rt.spec
            arms = [replace(a) for a in old.arms]
            by_id = {a.id: a for a in arms}
            for arm in add_arms:
                check_id("arm id", arm.id)
                if arm.id in by_id:
                    raise AlreadyExists(
                        f"arm {arm.id!r} already exists in experiment {experiment_id!r}"
                    )
                new_arm = ArmSpec(arm.id, arm.group, arm.prior, True)
                arms.append(new_arm)
                by_id[arm.id] = new_arm
            for arm_id in retire_arm_ids:
                if arm_id not in by_id:
                    raise ArmNotFound(f"experiment {experiment_id!r} has no arm {arm_id!r}")
                by_id[arm_id].active = False
            if not any(a.active for a in arms):
                raise FailedPrecondition(
                    f"retiring {retire_arm_ids} would leave experiment {experiment_id!r} "
                    "with no active arm"
                )
            new = replace(old, arms=arms, state=state or old.state, version=old.version + 1)
            new.validate()
            self._check_priors(new, add_arms)
            return self.writer.submit_and_wait(PutExperiment(new, False, rt.apply_spec_change), timeout)

    def _check_priors(self, spec: ExperimentSpec, arms: list[ArmSpec]) -> None:
        probe = _core.Bandit(spec.reward_type, "uniform")
        try:
            for arm in arms:
                a, b = spec.arm_prior(arm)
                probe.add_arms([a], [b])
        except _core.CoreError as exc:
            raise InvalidArgument(f"arm prior: {exc}") from None

    # Decisions.
    def decide(
        self, experiment_id: str, unit_id: str, k: int, context: dict[str, str] | None = None
    ) -> DecisionResult:
        rt = self._require(experiment_id)
        spec = rt.spec
        if spec.state == "paused":
            raise ExperimentPaused(
                f"experiment {experiment_id!r} is paused; resume it to get decisions"
            )
        k = k or 1
        if unit_id:
            check_id("unit id", unit_id)
        elif spec.sticky:
            raise InvalidArgument(f"experiment {experiment_id!r} is sticky: unit_id is required")
        if spec.sticky:
            held = self._assignment(rt, unit_id)
            if held is not None and len(held) == k and all(self._is_active(rt, a) for a in held):
                # Only the held arms' means: `means()` would build a list of every arm.
                scores = tuple(rt.bandit.means_of([rt.index[a] for a in held]))
                return self._record(rt, unit_id, held, (1.0,) * k, scores, True, context)
        try:
            arms, scores, props = rt.bandit.choose(k)
        except _core.CoreError as exc:
            raise InvalidArgument(f"experiment {experiment_id!r}: {exc}") from None
        chosen = tuple(rt.arm_ids[i] for i in arms)
        if spec.sticky:
            rt.assignments.put(unit_id, chosen)
        return self._record(rt, unit_id, chosen, tuple(props), tuple(scores), False, context)

    def _is_active(self, rt: ExperimentRuntime, arm_id: str) -> bool:
        idx = rt.index.get(arm_id)
        return idx is not None and rt.spec.arms[idx].active

    def _assignment(self, rt: ExperimentRuntime, unit_id: str) -> tuple[str, ...] | None:
        held = rt.assignments.get(unit_id)
        if held is None:
            stored = self.store.get(self.store.assignments, key(rt.spec.id, unit_id))
            if stored is not None:
                held = tuple(stored)
                rt.assignments.put(unit_id, held)
        return held

    def _record(
        self,
        rt: ExperimentRuntime,
        unit_id: str,
        arms: tuple[str, ...],
        props: tuple[float, ...],
        scores: tuple[float, ...],
        sticky_hit: bool,
        context: dict[str, str] | None,
    ) -> DecisionResult:
        record = DecisionRecord(
            new_decision_id(), rt.spec.id, arms, props, unit_id, now_ms(), rt.bandit.version, context
        )
        for a in arms:
            idx = rt.index[a]
            rt.pulls[idx] += 1
            rt.recent.append(idx)
        rt.monitor.on_decision(record.ts_ms / 1000.0, len(arms))
        self._pending[record.decision_id] = record
        self.writer.submit(LogDecision(record, rt.spec.sticky and not sticky_hit, self._committed))
        return DecisionResult(record, scores, sticky_hit)

    def _committed(self, decision_id: str) -> None:
        self._pending.pop(decision_id, None)

    def _lookup_decision(self, decision_id: str, prefetched: dict[bytes, bytes] | None = None) -> DecisionRecord:
        rec = self._pending.get(decision_id)
        if rec is not None:
            return rec
        raw = None
        if prefetched is not None:  # the batch's snapshot; a miss may be a commit since it began
            raw_bytes = prefetched.get(decision_id.encode())
            raw = orjson.loads(raw_bytes) if raw_bytes is not None else None
        if raw is None:
            raw = self.store.get(self.store.decisions, decision_id.encode())
        if raw is None and self.shared:
            # Another process of the pool may not have committed it yet (group commit).
            deadline = time.monotonic() + DECISION_WAIT_S
            while raw is None and time.monotonic() < deadline:
                time.sleep(0.005)
                raw = self.store.get(self.store.decisions, decision_id.encode())
        if raw is None:
            raise DecisionNotFound(
                f"decision {decision_id!r} is unknown: it was never issued by this server or has expired"
            )
        return DecisionRecord.from_json(decision_id, raw)

    # Rewards.
    def _resolve(
        self, index: int, r: RewardInput, now: int, prefetched: dict[bytes, bytes] | None = None
    ) -> ResolvedReward:
        check_id("decision id", r.decision_id)
        if not math.isfinite(r.value):
            raise InvalidArgument(f"reward value {r.value} is not a finite number")
        rec = self._lookup_decision(r.decision_id, prefetched)
        rt = self._require(rec.experiment_id)
        arm = r.arm_id or rec.arms[0]
        if arm not in rec.arms:
            raise ArmNotFound(
                f"decision {r.decision_id!r} chose {list(rec.arms)}, not arm {arm!r}"
            )
        window_ms = rt.spec.window_seconds * 1000
        if window_ms and now - rec.ts_ms > window_ms:
            raise OutsideAttributionWindow(
                f"reward for decision {r.decision_id!r} arrived {(now - rec.ts_ms) / 1000:.0f}s "
                f"after it, outside the {rt.spec.window_seconds}s attribution window"
            )
        check_reward_value(r.value, rt.binary)
        event_key = r.event_id or f"{r.decision_id}/{arm}"
        return ResolvedReward(index, r.decision_id, rec.experiment_id, arm, r.value, event_key, now)

    def reward_batch(self, rewards: list[RewardInput], timeout: float | None = None) -> list[RewardResult]:
        """Validates, durably records and applies a batch; returns one result per input."""
        return self.submit_rewards(rewards)(timeout)

    def submit_rewards(self, rewards: list[RewardInput]) -> Callable[[float | None], list[RewardResult]]:
        """Validates a batch and queues it for the group commit without waiting; the returned
        function waits for the commit and gives one result per input. Lets a stream handler
        resolve the next batch while this one is being committed."""
        results: list[RewardResult] = [RewardResult(REJECTED)] * len(rewards)
        resolved: list[ResolvedReward] = []
        now = now_ms()
        # One multi-get for the batch's decisions: a get per reward would release and
        # re-acquire the GIL each time.
        keys = [r.decision_id.encode() for r in rewards if r.decision_id not in self._pending]
        prefetched: dict[bytes, bytes] = {}
        if keys:
            with self.store.env.begin(db=self.store.decisions) as txn:
                prefetched = {bytes(k): bytes(v) for k, v in txn.cursor().getmulti(sorted(set(keys)))}
        for i, r in enumerate(rewards):
            try:
                resolved.append(self._resolve(i, r, now, prefetched))
            except BanditdError as exc:
                results[i] = RewardResult(REJECTED, exc)
        if not resolved:
            return lambda _timeout: results
        op = RecordRewards(resolved, self.runtime)
        op.future = Future()
        self.writer.submit(op)

        def wait(timeout: float | None) -> list[RewardResult]:
            assert op.future is not None
            outcome = op.future.result(timeout=timeout)
            for rr, status in zip(resolved, outcome, strict=True):
                results[rr.index] = RewardResult(status)
            return results

        return wait

    def reward(self, r: RewardInput, timeout: float | None = None) -> bool:
        result = self.reward_batch([r], timeout)[0]
        if result.error is not None:
            raise result.error
        return result.status == ACCEPTED

    # Statistics.
    def arm_stats(self, experiment_id: str) -> list[ArmStatsRow]:
        rt = self._require(experiment_id)
        means = rt.bandit.means()
        lows, highs = rt.bandit.intervals(0.95)
        shares = rt.recent_shares()
        return [
            ArmStatsRow(
                arm_id=arm.id,
                group=arm.group,
                active=arm.active,
                pulls=rt.pulls[i],
                rewards=rt.rewards[i],
                reward_sum=rt.reward_sum[i],
                mean=means[i],
                low=lows[i],
                high=highs[i],
                recent_share=shares[i],
            )
            for i, arm in enumerate(rt.spec.arms)
        ]

    def diagnostics(self, experiment_id: str, silence_s: float = 0.0) -> dict[str, Any]:
        """Learning-loop diagnostics of one experiment (see `banditd.diagnostics`)."""
        rt = self._require(experiment_id)
        views = self.arm_stats(experiment_id)
        return diagnostics.build(
            rt.monitor,
            views,
            list(rt.recent),
            rt.spec.policy,
            rt.binary,
            time.time(),
            silence_s or diagnostics.DEFAULT_SILENCE_S,
        )

    def status(self) -> dict[str, Any]:
        return {
            "experiments": len(self._runtimes),
            "pending_decisions": len(self._pending),
            "writer_queue": self.writer.pending,
            "commits": self.writer.commits,
        }
