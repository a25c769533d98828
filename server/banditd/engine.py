"""The decision engine: experiments, decisions and rewards, independent of gRPC."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from banditd import _core, diagnostics, features
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
from banditd.guardrails import Guardian
from banditd.ops import (
    ACCEPTED,
    ClaimAssignment,
    FastGroup,
    LogDecision,
    LogFastDecisions,
    MatureDecisions,
    PutExperiment,
    PutFeatureDefinition,
    RecordRewards,
    ResolvedReward,
)
from banditd.store import (
    MODEL_SEQ,
    MODELS_COUNTER,
    SPECS_COUNTER,
    STATS_COUNTER,
    ArmRow,
    DecisionRecord,
    ExperimentChanges,
    Store,
    decision_time_ms,
    new_decision_id,
)
from banditd.validation import (
    MAX_ARMS,
    check_context,
    check_id,
    check_k,
    check_prior,
    check_reward_value,
)
from banditd.writer import Probe, Writer, wait_for

log = logging.getLogger("banditd.engine")
REJECTED = "rejected"


@dataclass(slots=True)
class RewardInput:
    decision_id: str
    value: float
    event_id: str = ""
    arm_id: str = ""
    # Set when the message itself was refused at the edge (undecodable, over a limit).
    refused: str = ""


@dataclass(slots=True)
class RewardResult:
    status: str  # accepted | duplicate | rejected
    error: BanditdError | None = None


@dataclass(slots=True)
class DecisionResult:
    record: DecisionRecord
    scores: tuple[float, ...]
    sticky_hit: bool
    model_version: int = 0  # contextual experiments: the feature definition that decided


# Per-arm statistics rows are the diagnostics' arm view (one shape for both).
ArmStatsRow = ArmView


# How long a pool process or node waits for another one to commit the decisions a reward
# batch names (once per batch, not per reward): at least DECISION_WAIT_S, and for a decision
# made less than DECISION_GRACE_S ago (its id carries its time) until that age: its record
# may still be in its process's write queue (--decision-linger-ms plus a commit).
DECISION_WAIT_S = 0.25
DECISION_GRACE_S = 2.0
# A sticky unit's first assignment in a shared store waits at most this long for its commit.
CLAIM_TIMEOUT_S = 10.0
# Propensity refresher: at least this often, and at most this share of one core. In decision
# mode every commit of decision records moves the posterior (an observation each), so at a
# steady load the refresher always has work: at 10 arms 10% of a core was ~20 µs per Decide
# at 3,000/s, a tenth of what the gRPC call itself costs.
PROPENSITY_REFRESH_S = 0.5
PROPENSITY_CPU_SHARE = 0.04
# Monte Carlo draws per refresh: at least 2,000 (standard error <= 0.5/sqrt(2000) = 0.011),
# more for small experiments while a refresh stays within this many arm-draws.
MIN_DRAWS, MAX_DRAWS, DRAW_BUDGET = 2_000, 10_000, 200_000


def propensity_draws(n_arms: int) -> int:
    return max(MIN_DRAWS, min(MAX_DRAWS, DRAW_BUDGET // max(1, n_arms)))


# Maturation sweep of min_age experiments: at most this often.
MATURE_EVERY_S = 0.2
# Contextual experiments: model maintenance round, retry of a first feature definition that
# found too few contexts, and the observations a logistic refit uses (the newest).
MODELS_EVERY_S = 0.5
DEFINITION_RETRY_S = 5.0
REFIT_OBSERVATIONS = 50_000
# Logged decisions behind GetModel's targeted-versus-uniform comparison (the newest).
COMPARISON_DECISIONS = 20_000


def _minus(row: ArmRow, delta: list[float]) -> ArmRow:
    """The row without `delta`; rounding residue around 0 is 0 (a Beta count is never < 0)."""

    def sub(x: float, d: float) -> float:
        y = x - d
        return 0.0 if abs(y) <= 1e-9 * max(1.0, abs(x), abs(d)) else y

    return replace(row, n=sub(row.n, delta[0]), sum=sub(row.sum, delta[1]), sumsq=sub(row.sumsq, delta[2]))


def audit_entry(experiment_id: str, action: str, actor: str, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "ts_unix_ms": now_ms(),
        "experiment_id": experiment_id,
        "action": action,
        "actor": actor or "anonymous",
        "details": details,
    }


def _made_ms(decision_id: str) -> int:
    """When the decision was made, from its time-ordered id (0 when it is not one)."""
    try:
        return decision_time_ms(decision_id)
    except ValueError:
        return 0


def _plausible_decision_id(decision_id: str) -> bool:
    """Worth looking up (the lookup of anything else is refused by `_resolve`'s checks)."""
    try:
        check_id("decision id", decision_id)
    except InvalidArgument:
        return False
    return True


class Engine:
    def __init__(self, store: Store, writer: Writer, seed: int | None = None) -> None:
        self.store = store
        self.writer = writer
        self.seed = seed
        self._runtimes: dict[str, ExperimentRuntime] = {}
        self._pending: dict[str, DecisionRecord] = {}
        # Share of a core the propensity refresher may use (a pool's processes split it).
        self.propensity_share = PROPENSITY_CPU_SHARE
        # Decide's fast path (see core `fastpath.rs`): plain experiments, records drained by
        # the writer for each commit, off while the store cannot write or the writer stops.
        self.fast = _core.FastDecide(writer.queue_limit, writer.wake)
        writer.attach_source(self._take_fast, lambda: self.fast.queued, self.fast.set_enabled)
        # Sticky assignments of decisions not committed yet, by (experiment, unit): a unit
        # evicted from the assignment cache before its decision reached the store keeps it.
        self._pending_sticky: dict[tuple[str, str], tuple[str, ...]] = {}
        self._admin_lock = threading.RLock()
        # Set when other processes share the store (a worker pool): look there on misses,
        # after asking the pool's other members to commit what lingers (app: `nudge.Nudger`).
        self.shared = False
        self.nudge_others: Callable[[], None] = lambda: None
        self._seen_specs = -1
        self.skipped: dict[str, str] = {}  # experiments that could not be loaded, and why
        self.propensity_lag_s = 0.0  # how far behind the posterior the last refresh round ran
        self._seen_models = -1
        self._rng = random.Random(seed)  # control shares, floors, burn-in
        self.guardian = Guardian(self)
        writer.on_commit = self._on_commit

    # Lifecycle.
    def _seed_for(self, experiment_id: str) -> int | None:
        if self.seed is None:
            return None
        return zlib.crc32(experiment_id.encode(), self.seed & 0xFFFFFFFF)

    def load(self) -> None:
        """Rebuilds every experiment and its posterior from the store. A record that cannot
        be read is reported and its experiment skipped; the others are served."""
        for raw in self.store.experiment_specs():
            exp_id = str(raw.get("id", "?"))
            try:
                spec = ExperimentSpec.from_json(raw)
                rt = ExperimentRuntime(spec, self._seed_for(spec.id))
                policy, rows, counter = self.store.experiment_state(spec.id)
                rt.apply_state(policy, rows, counter, full=True)
                self._sync_model(rt)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the server
                log.error("experiment %r could not be loaded and is not served: %s", exp_id, exc)
                self.skipped[exp_id] = f"{type(exc).__name__}: {exc}"
                continue
            self._runtimes[spec.id] = rt
            self._route(rt)
        self._seen_specs = self.store.counter(SPECS_COUNTER)
        self._seen_models = self.store.counter(MODELS_COUNTER)
        log.info("loaded %d experiments", len(self._runtimes))

    def _sync_model(self, rt: ExperimentRuntime) -> None:
        """Brings a contextual experiment's models up to the store: its feature definition,
        then the model log entries of that version not applied yet."""
        if rt.model is None:
            return
        fd = self.store.model_definition(rt.spec.id)
        if fd.version != rt.definition.version:
            rt.apply_definition(fd)
        for seq, items in self.store.model_log(rt.spec.id, fd.version, rt.model_seq):
            if not rt.apply_model_items(fd.version, seq, items):
                break

    def runtime(self, experiment_id: str) -> ExperimentRuntime | None:
        return self._runtimes.get(experiment_id)

    def spec_of(self, experiment_id: str) -> ExperimentSpec | None:
        rt = self._runtimes.get(experiment_id)
        return rt.spec if rt is not None else None

    def require(self, experiment_id: str) -> ExperimentRuntime:
        """The experiment's runtime; NOT_FOUND when it does not exist (in a pool, one another
        process just created is adopted first)."""
        rt = self._runtimes.get(experiment_id)
        if rt is None:
            check_id("experiment id", experiment_id)
            if self.shared:
                # Created by another process of the pool a moment ago?
                raw = self.store.experiment_spec(experiment_id)
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
                policy, rows, counter = self.store.experiment_state(spec.id)
                rt.apply_state(policy, rows, counter, full=True)
                self._sync_model(rt)
                self._runtimes[spec.id] = rt
            elif spec.version > rt.spec.version:
                rt.apply_spec_change(spec)
            self._route(rt)
            return rt

    def refresh_from_store(self) -> None:
        """Brings this process up to date with what other processes committed: new or changed
        experiments, and statistics that moved. Costs one read transaction when nothing
        changed, whatever the number of arms."""
        # Every counter in one read transaction: this runs 20 times a second in each process.
        runtimes = list(self._runtimes.items())
        contextual = [rt for _, rt in runtimes if rt.model is not None]
        names = [SPECS_COUNTER, MODELS_COUNTER, *(STATS_COUNTER + exp_id.encode() for exp_id, _ in runtimes)]
        names += [MODEL_SEQ + rt.spec.id.encode() for rt in contextual]
        specs, models, *rest = self.store.counters(names)
        counters, seqs = rest[: len(runtimes)], rest[len(runtimes) :]
        if specs != self._seen_specs:
            for raw in self.store.experiment_specs():
                spec = ExperimentSpec.from_json(raw)
                rt = self._runtimes.get(spec.id)
                if rt is None or spec.version > rt.spec.version:
                    self._adopt(spec)
            self._seen_specs = specs
        for (exp_id, rt), seen in zip(runtimes, counters, strict=True):
            if seen != rt.stats_seen:
                # The rows that moved since the state applied (or all of them): either way
                # the posterior then equals the store at `counter`.
                policy, rows, counter, _ = self.store.experiment_state_since(exp_id, rt.stats_seen)
                rt.apply_state(policy, rows, counter, full=True)
        for rt, seq in zip(contextual, seqs, strict=True):
            if models != self._seen_models or seq != rt.model_seq:
                self._sync_model(rt)
        self._seen_models = models

    def _on_commit(self, changes: dict[str, ExperimentChanges]) -> None:
        """Writer thread, right after a commit: the posteriors take the committed statistics
        before any write is acknowledged."""
        now = time.time()
        for exp_id, ch in changes.items():
            rt = self._runtimes.get(exp_id)
            if rt is None:
                continue
            names = [a for a in (*ch.rises, *ch.falls) if a in rt.index] if not ch.rescaled else []
            checked = [rt.index[a] for a in names]
            before: dict[int, float] = {}
            if checked:
                # The score without this commit's reward events (decisions in the same commit
                # are 0-observations that may lower it): the check is about what events do.
                without = {a: _minus(ch.arms[a], ch.event_deltas[a]) for a in names}
                try:
                    rt.apply_state(ch.policy, without, ch.counter_after, full=False)
                    before = dict(zip(checked, rt.bandit.means_of(checked), strict=True))
                except _core.CoreError:
                    names, checked = [], []  # no check this commit; the real state follows
            rt.apply_state(ch.policy, ch.arms, ch.counter_after, full=False)
            if rt.model is not None and ch.model_items is not None:
                if not rt.apply_model_items(ch.model_version, ch.model_seq, ch.model_items):
                    self._sync_model(rt)  # another process's entries came first: read them
            after = dict(zip(checked, rt.bandit.means_of(checked), strict=True)) if checked else {}
            if ch.events or checked:
                snapshot = rt.bandit.means() if rt.monitor.snapshot_due(now, len(rt.arm_ids)) else None
                rt.monitor.on_update(
                    [rt.index[a] for a in names if a in ch.rises],
                    [rt.index[a] for a in names if a in ch.falls],
                    before,
                    after,
                    ch.events,
                    now,
                    snapshot,
                )

    # Background work (off the request path).
    def refresh_propensities(self) -> float:
        """Brings every experiment's cached propensities up to its posterior: Monte Carlo
        estimates (Thompson) always, exact ones of experiments too large to recompute inline.
        Runs on a snapshot of the posterior, so decisions are not held up. Returns the
        seconds spent."""
        started = time.perf_counter()
        now = time.monotonic()
        for rt in list(self._runtimes.values()):
            rt.maintain_if_due(now)
            for k in list(rt.slate_sizes):
                try:
                    if k <= rt.bandit.n_arms and rt.bandit.propensities_stale(k):
                        rt.bandit.refresh_propensities(k, propensity_draws(len(rt.arm_ids)))
                except _core.CoreError:  # e.g. k above the active arms after a retirement
                    rt.slate_sizes.discard(k)
        return time.perf_counter() - started

    def maintain_models(self) -> None:
        """Contextual experiments, off the request path: learn or re-check the feature
        definition, refit logistic models on their cadence."""
        for rt in list(self._runtimes.values()):
            if rt.model is None:
                continue
            try:
                self._check_definition(rt)
                if rt.spec.policy.startswith("logistic"):
                    self._refit(rt)
            except BanditdError as exc:
                log.warning("experiment %r: model maintenance failed: %s", rt.spec.id, exc)
            except Exception:
                log.exception("experiment %r: model maintenance failed", rt.spec.id)

    def _check_definition(self, rt: ExperimentRuntime) -> None:
        spec, fd, mono = rt.spec, rt.definition, time.monotonic()
        warmup = spec.param("encoder_warmup")
        if fd.version == 0:
            if rt.policy.decisions < warmup or mono - rt.encoder_checked < DEFINITION_RETRY_S:
                return
        elif mono - rt.encoder_checked < spec.param("encoder_refit_seconds"):
            return
        first_check = rt.encoder_checked == 0.0 and fd.version > 0
        rt.encoder_checked = mono
        if first_check:
            return  # just loaded: the stored definition is recent enough to start from
        recs = self.store.recent_decisions(spec.id, features.SAMPLE, 20 * features.SAMPLE)
        if len(recs) < min(warmup, features.SAMPLE):
            return
        limit = features.max_features_for(len(rt.arm_ids))
        new = features.learn((r.context for r in recs), fd.version + 1, now_ms(), limit)
        if new.same_features(fd):
            return
        log.info(
            "experiment %r: feature definition version %d (%d features from %d contexts)",
            spec.id, new.version, new.dimension, new.contexts,
        )
        self.writer.submit_and_wait(
            PutFeatureDefinition(spec.id, new, lambda _exp: self._sync_model(rt)), timeout=30.0
        )

    def training_data(self, rt: ExperimentRuntime, limit: int) -> tuple[list[DecisionRecord], list[float]]:
        """The current model version's observations, newest first: decisions with features
        and the value each is worth now under the outcome rule (one arm per decision: the
        first of a slate)."""
        fd = rt.definition
        recs = [
            r for r in self.store.recent_decisions(rt.spec.id, limit, 20 * limit, fd.version)
            if r.features is not None and len(r.features) == 8 * fd.dimension
        ]
        return self._values(rt, recs)

    def observed(
        self, rt: ExperimentRuntime, limit: int, scan: int
    ) -> tuple[list[DecisionRecord], list[float]]:
        """The experiment's newest logged decisions (at most `limit`, among the newest `scan`
        of all experiments) that are observations now, newest first, with the value each is
        worth under the outcome rule (first arm of a slate)."""
        return self._values(rt, self.store.recent_decisions(rt.spec.id, limit, scan))

    def _values(self, rt: ExperimentRuntime, recs: list[DecisionRecord]) -> tuple[list[DecisionRecord], list[float]]:
        rule = rt.rule
        outs = self.store.outcomes_many([(r.decision_id, r.arms[0]) for r in recs])
        maturing = (
            self.store.maturing_many(rt.spec.id, [r.decision_id for r in recs]) if rule.min_age_ms > 0 else set()
        )
        kept, values = [], []
        for r in recs:
            out = outs.get((r.decision_id, r.arms[0]))
            if r.decision_id in maturing or (rule.mode == "explicit" and out is None):
                continue
            kept.append(r)
            values.append(out.value if out is not None else rule.default_reward)
        return kept, values

    def _refit(self, rt: ExperimentRuntime) -> None:
        assert rt.model is not None
        now = time.time()
        if now - rt.refitted < rt.spec.param("refit_seconds"):
            return
        rt.refitted = now
        recs, values = self.training_data(rt, REFIT_OBSERVATIONS)
        by_arm: dict[int, tuple[list[bytes], list[float]]] = {}
        for r, v in zip(recs, values, strict=True):
            idx = rt.index.get(r.arms[0])
            if idx is not None and r.features is not None:
                xs, ys = by_arm.setdefault(idx, ([], []))
                xs.append(r.features)
                ys.append(min(1.0, max(0.0, v)))
        for idx, (xs, ys) in by_arm.items():
            rt.model.refit_logistic(idx, b"".join(xs), ys, [1.0] * len(ys))
        rt.refits += 1

    def mature(self) -> int:
        """Turns decisions of min_age experiments that are old enough into observations."""
        specs = [rt.spec for rt in self._runtimes.values() if rt.rule.min_age_ms > 0]
        if not specs:
            return 0
        return int(self.writer.submit_and_wait(MatureDecisions(specs, now_ms()), timeout=60.0))

    def run_background(self, stopped: threading.Event) -> None:
        """Propensity refresh and maturation until `stopped`; the refresh's pace keeps its
        cost under `propensity_share` of a core, so propensities lag the posterior by at
        most max(PROPENSITY_REFRESH_S, cost / share) plus one refresh."""
        last_mature = last_models = 0.0
        wait = PROPENSITY_REFRESH_S
        while not stopped.wait(wait):
            try:
                if self.writer.storage_error is not None:
                    self.writer.submit(Probe())  # clears the error once a commit succeeds
                spent = self.refresh_propensities()
                wait = max(PROPENSITY_REFRESH_S, spent / self.propensity_share)
                self.propensity_lag_s = wait + spent
                if time.monotonic() - last_mature >= MATURE_EVERY_S:
                    last_mature = time.monotonic()
                    self.mature()
                if time.monotonic() - last_models >= MODELS_EVERY_S:
                    last_models = time.monotonic()
                    self.maintain_models()
            except BanditdError as exc:
                log.warning("background round failed: %s", exc)
            except Exception:  # keep going; the next round retries
                log.exception("background round failed")

    # Experiments.
    def create_experiment(
        self, spec: ExperimentSpec, timeout: float | None = None, actor: str = ""
    ) -> ExperimentSpec:
        spec.validate()
        spec = replace(spec, created_ms=now_ms(), version=1, state="running")
        runtime = ExperimentRuntime(spec, self._seed_for(spec.id))  # validates policy params
        runtime.stats_seen = 0
        with self._admin_lock:
            if spec.id in self._runtimes:
                raise ExperimentAlreadyExists(
                    f"experiment {spec.id!r} already exists; use UpdateExperiment to change it"
                )

            def register(_: ExperimentSpec) -> None:
                self._runtimes[spec.id] = runtime
                self._route(runtime)

            details = {"arms": [a.id for a in spec.arms], "policy": spec.policy, "settings": spec.settings}
            entry = audit_entry(spec.id, "create", actor, details)
            return self.writer.submit_and_wait(PutExperiment(spec, True, register, entry), timeout)

    def get_experiment(self, experiment_id: str) -> ExperimentSpec:
        return self.require(experiment_id).spec

    def list_experiments(self) -> list[ExperimentSpec]:
        return [rt.spec for rt in sorted(self._runtimes.values(), key=lambda r: r.spec.id)]

    def update_experiment(
        self,
        experiment_id: str,
        add_arms: list[ArmSpec],
        retire_arm_ids: list[str],
        state: str | None,
        timeout: float | None = None,
        settings: dict[str, Any] | None = None,
        actor: str = "",
        serving_arm: str = "",
        action: str = "",
    ) -> ExperimentSpec:
        """Adds and retires arms, sets the state ("running" also ends a guardrail's fallback;
        "fallback" needs `serving_arm`), replaces the settings; one audit entry (`action`
        overrides the one derived from the change, e.g. "guardrail_pause")."""
        if self.shared:  # start from the newest definition any process committed
            raw = self.store.experiment_spec(experiment_id)
            if raw is not None:
                self._adopt(ExperimentSpec.from_json(raw))
        with self._admin_lock:
            rt = self.require(experiment_id)
            old = rt.spec
            arms = [replace(a) for a in old.arms]
            by_id = {a.id: a for a in arms}
            if len(arms) + len(add_arms) > MAX_ARMS:
                raise InvalidArgument(f"experiment {experiment_id!r} would have more than {MAX_ARMS} arms")
            for arm in add_arms:
                check_id("arm id", arm.id)
                check_id("group", arm.group, required=False)
                check_prior(arm.prior, old.reward_type == "binary", f"prior of arm {arm.id!r}")
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
            new_state = state or old.state
            new = replace(
                old,
                arms=arms,
                state=new_state,
                version=old.version + 1,
                settings=old.settings if settings is None else settings,
                serving_arm=serving_arm if new_state == "fallback" else "",
            )
            new.validate()
            self._check_priors(new, add_arms)
            details: dict[str, Any] = {}
            if add_arms:
                details["added_arms"] = [a.id for a in add_arms]
            if retire_arm_ids:
                details["retired_arms"] = list(retire_arm_ids)
            if new_state != old.state:
                details["state"] = [old.state, new_state]
            if new.serving_arm:
                details["serving_arm"] = new.serving_arm
            if new.settings != old.settings:
                details["settings"] = new.settings
            if not action:
                action = {"paused": "pause", "running": "resume", "fallback": "fallback"}.get(new_state, "update")
                action = action if new_state != old.state else ("settings" if "settings" in details else "update")
            entry = audit_entry(experiment_id, action, actor, details)

            def apply(spec: ExperimentSpec) -> None:
                rt.apply_spec_change(spec)
                self._route(rt)

            return self.writer.submit_and_wait(PutExperiment(new, False, apply, entry), timeout)

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
        self, experiment_id: str, unit_id: str, k: int, context: dict[str, Any] | None = None
    ) -> DecisionResult:
        rt = self.require(experiment_id)
        spec = rt.spec
        if spec.state != "running":
            if spec.state == "paused":
                raise ExperimentPaused(
                    f"experiment {experiment_id!r} is paused; resume it to get decisions"
                )
        k = check_k(k or 1)
        check_context(context)
        if self.writer.storage_error is not None:
            self.writer.refuse_if_failing()
        if unit_id:
            check_id("unit id", unit_id)
        elif spec.sticky:
            raise InvalidArgument(f"experiment {experiment_id!r} is sticky: unit_id is required")
        if spec.state == "fallback":
            return self._fallback(rt, unit_id, k, context)
        x: bytes | None = None
        if spec.sticky:
            held = self._assignment(rt, unit_id)
            if held is not None and len(held) == k and all(self._is_active(rt, a) for a in held):
                # Only the held arms' means: `means()` would build a list of every arm.
                scores = tuple(rt.bandit.means_of([rt.index[a] for a in held]))
                x = rt.model.encode(context) if rt.model is not None else None
                return self._record(rt, unit_id, held, (1.0,) * k, scores, True, context, x)
        source = ""
        try:
            if rt.model is not None:
                if spec.config.burn_in and rt.burning_in(spec.config.burn_in):
                    x = rt.model.encode(context)
                    arms, props, source = self._uniform(rt, k), (k / len(spec.active_indices),) * k, "burn_in"
                    scores = tuple(rt.bandit.means_of(list(arms)))
                else:
                    try:
                        arms, scores, props, x = rt.model.choose(context, k)
                    except _core.CoreError:
                        # The feature definition may have changed between encoding and scoring.
                        arms, scores, props, x = rt.model.choose(context, k)
            elif spec.mixed:
                arms, scores, props, source = self._mixed_choice(rt, k)
            else:
                arms, scores, props = rt.bandit.choose(k)
        except _core.CoreError as exc:
            raise InvalidArgument(f"experiment {experiment_id!r}: {exc}") from None
        arm_ids = rt.arm_ids  # extended before the core learns of new arms: every index is in it
        chosen = (arm_ids[arms[0]],) if k == 1 else tuple(arm_ids[i] for i in arms)
        if rt.model is None and k not in rt.slate_sizes:
            rt.slate_sizes.add(k)
        if spec.sticky and self.shared:
            held = self._claim(rt, unit_id, chosen)
            if held != chosen:  # another process or node assigned the unit first
                rt.assignments.put(unit_id, held)
                scores = tuple(rt.bandit.means_of([rt.index[a] for a in held]))
                return self._record(rt, unit_id, held, (1.0,) * k, scores, True, context, x)
        if spec.sticky:
            self._pending_sticky[(spec.id, unit_id)] = chosen
        try:
            result = self._record(rt, unit_id, chosen, tuple(props), tuple(scores), False, context, x, source)
        except BaseException:
            if spec.sticky:
                self._pending_sticky.pop((spec.id, unit_id), None)
            raise
        if spec.sticky:
            rt.assignments.put(unit_id, chosen)
        return result

    def _route(self, rt: ExperimentRuntime) -> None:
        """Serves a plain experiment's Decide calls on the fast path (`fast`), the others on
        the general one; called whenever a runtime is made or its definition changes."""
        if rt.spec.plain:
            rt.slate_sizes.add(1)
            self.fast.set(rt.spec.id, rt.bandit, list(rt.arm_ids))
        else:
            self.fast.remove(rt.spec.id)

    def _take_fast(self) -> LogFastDecisions | None:
        """Writer thread, for each commit: the fast path's records answered so far."""
        if not self.fast.queued:  # most reward commits: nothing to take
            return None
        token, groups = self.fast.take()
        if not groups:
            self.fast.committed(token)
            return None
        return LogFastDecisions(groups, self.spec_of, lambda: self._fast_done(token, groups))

    def _fast_done(self, token: int, groups: list[FastGroup]) -> None:
        """After the commit of fast-path records (or their final failure): they leave the
        fast path's memory, and the serving counters of `_record` take them."""
        self.fast.committed(token)
        for exp_id, _, _, arms, times, seconds in groups:
            rt = self._runtimes.get(exp_id)
            if rt is None:
                continue
            idx = array("I")
            idx.frombytes(arms)
            rt.recent.extend(idx)
            rt.monitor.on_decision(int.from_bytes(times[-8:], "little") / 1000.0, len(idx))
            self.guardian.note_decides(exp_id, times, seconds)

    def _pending_arms(self, experiment_id: str) -> array[int]:
        """Arms of the fast path's decisions not yet committed (newer than `recent`'s)."""
        arms = array("I")
        if len(self.fast):
            arms.frombytes(self.fast.pending_arms(experiment_id))
        return arms

    def _settle(self, timeout: float = 5.0) -> None:
        """Before reading counters: decision records wait up to --decision-linger-ms for
        their group commit (the fast path's in the core, the others in the writer's queue),
        so a read first lets the writer commit what is waiting (one commit, a few ms) and
        reflects every decision answered before it."""
        if not (self.fast.queued or self.writer.pending) or self.writer.is_writer_thread():
            return
        try:
            self.writer.sync(timeout)
        except BanditdError:
            pass  # a failing store or a stopping writer: read what is committed

    def _claim(self, rt: ExperimentRuntime, unit_id: str, arms: tuple[str, ...]) -> tuple[str, ...]:
        """The unit's arms after a durable first-claim-wins write (shared stores only: alone,
        `_pending_sticky` and the in-order writer already keep a unit's arm)."""
        active = frozenset(a.id for a in rt.spec.arms if a.active)
        held: tuple[str, ...] = self.writer.submit_and_wait(
            ClaimAssignment(rt.spec.id, unit_id, arms, active), CLAIM_TIMEOUT_S
        )
        return held

    def _uniform(self, rt: ExperimentRuntime, k: int) -> tuple[int, ...]:
        active = rt.spec.active_indices
        if k > len(active):
            raise InvalidArgument(
                f"k = {k} exceeds the {len(active)} active arms of experiment {rt.spec.id!r}"
            )
        return tuple(self._rng.sample(active, k))

    def _mixed_choice(
        self, rt: ExperimentRuntime, k: int
    ) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], str]:
        """A decision of an experiment with a burn-in, a random control share or traffic
        floors. Slates: the control share draws a uniform slate; a floor draw puts the
        floored arm (chosen with probability f_i / sum f) in the slate and fills the rest
        uniformly. The logged propensity is the exact mixture: for arm j in slates of k of
        n active arms, with control share c, floors f (sum F) and the policy's own
        probability w_j,  p_j = c k/n + (1 - c) (f_j + (F - f_j)(k - 1)/(n - 1) + (1 - F) w_j).
        Each part is logged as its source, so the analysis can compare control and bandit."""
        spec = rt.spec
        cfg = spec.config
        active = spec.active_indices
        n = len(active)
        if cfg.burn_in and rt.burning_in(cfg.burn_in):
            arms = self._uniform(rt, k)
            return arms, tuple(rt.bandit.means_of(list(arms))), (k / n,) * k, "burn_in"
        c = cfg.control_share
        floors = spec.floor_vector
        total = math.fsum(floors)
        u = self._rng.random()
        if u < c:
            arms, source = self._uniform(rt, k), "control"
        elif u < c + (1.0 - c) * total:
            if k > n:
                raise InvalidArgument(f"k = {k} exceeds the {n} active arms of experiment {spec.id!r}")
            seed = self._rng.choices(range(n), weights=floors)[0]
            rest = self._rng.sample([a for j, a in enumerate(active) if j != seed], k - 1)
            arms, source = (active[seed], *rest), "floor"
        else:
            arms, scores, w = rt.bandit.choose(k)
            source = ""
        if source:
            scores = tuple(rt.bandit.means_of(list(arms)))
            w = tuple(rt.bandit.propensities_of(list(arms), k))
        position = rt.active_position()
        spread = (k - 1) / (n - 1) if n > 1 else 0.0
        props = tuple(
            c * k / n + (1.0 - c) * (f + (total - f) * spread + (1.0 - total) * wj)
            for f, wj in ((floors[position[a]], wj) for a, wj in zip(arms, w, strict=True))
        )
        return tuple(arms), tuple(scores), props, source

    def _fallback(
        self, rt: ExperimentRuntime, unit_id: str, k: int, context: dict[str, Any] | None
    ) -> DecisionResult:
        """A guardrail fell back: every decision gets the serving arm (propensity 1), logged
        with source "fallback"; sticky assignments are left alone."""
        spec = rt.spec
        if k != 1:
            raise FailedPrecondition(
                f"experiment {spec.id!r} is in fallback to arm {spec.serving_arm!r}: only single-arm "
                "decisions are served until it is set RUNNING again"
            )
        idx = rt.index[spec.serving_arm]
        x = rt.model.encode(context) if rt.model is not None else None
        scores = tuple(rt.bandit.means_of([idx]))
        return self._record(rt, unit_id, (spec.serving_arm,), (1.0,), scores, False, context, x, "fallback")

    def _is_active(self, rt: ExperimentRuntime, arm_id: str) -> bool:
        idx = rt.index.get(arm_id)
        return idx is not None and rt.spec.arms[idx].active

    def _assignment(self, rt: ExperimentRuntime, unit_id: str) -> tuple[str, ...] | None:
        held = rt.assignments.get(unit_id) or self._pending_sticky.get((rt.spec.id, unit_id))
        if held is None:
            held = self.store.assignment(rt.spec.id, unit_id)
            if held is not None:
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
        context: dict[str, Any] | None,
        features: bytes | None = None,
        source: str = "",
    ) -> DecisionResult:
        ts = now_ms()
        version = rt.definition.version if rt.model is not None else rt.bandit.version
        record = DecisionRecord(
            new_decision_id(ts), rt.spec.id, arms, props, unit_id, ts, version, context, None, features, source
        )
        self._pending[record.decision_id] = record
        try:
            assign = rt.spec.sticky and not sticky_hit and source != "fallback"
            self.writer.submit(LogDecision(record, rt.spec, assign, self._committed))
        except BanditdError:
            del self._pending[record.decision_id]
            raise
        # Counted only once queued: a refused decision leaves no trace.
        for a in arms:
            rt.recent.append(rt.index[a])
        rt.monitor.on_decision(record.ts_ms / 1000.0, len(arms))
        return DecisionResult(record, scores, sticky_hit, version if rt.model is not None else 0)

    def _committed(self, decision_id: str) -> None:
        rec = self._pending.pop(decision_id, None)
        if rec is not None and rec.unit_id:
            key = (rec.experiment_id, rec.unit_id)
            if self._pending_sticky.get(key) == rec.arms:
                del self._pending_sticky[key]

    # Rewards.
    def _resolve(
        self, index: int, r: RewardInput, now: int, found: dict[str, DecisionRecord]
    ) -> ResolvedReward:
        if r.refused:
            raise InvalidArgument(r.refused)
        check_id("decision id", r.decision_id)
        check_id("event id", r.event_id, required=False)
        check_id("arm id", r.arm_id, required=False)
        if not math.isfinite(r.value):
            raise InvalidArgument(f"reward value {r.value} is not a finite number")
        rec = self._pending.get(r.decision_id) or found.get(r.decision_id)
        if rec is None:  # committed (and so no longer pending) since the batch looked
            rec = self.store.decision(r.decision_id)
        if rec is None:
            raise DecisionNotFound(
                f"decision {r.decision_id!r} is unknown: it was never issued by this server or has expired"
            )
        rt = self.require(rec.experiment_id)
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

    def _find_decisions(self, ids: list[str]) -> dict[str, DecisionRecord]:
        """Stored decisions among `ids`. In a pool, ids still missing may be in another
        process's next group commit: wait for them once per batch, not once per id."""
        found: dict[str, DecisionRecord] = {}
        missing: list[str] = []
        for d in dict.fromkeys(ids):
            if not d or d in self._pending:
                continue
            fast = self.fast.get(d) if len(self.fast) else None
            if fast is not None:
                found[d] = DecisionRecord(d, fast[0], (fast[1],), (fast[2],), fast[3], fast[4], fast[5])
            else:
                missing.append(d)
        if missing:
            found.update(self.store.decisions_many(missing))
        if self.shared and len(found) < len(missing):
            self.nudge_others()  # pool members commit their lingering records now
            wall = time.time()
            # Ids claiming to be from the future (beyond a second of clock skew) earn no wait.
            made = [t for t in (_made_ms(d) / 1000.0 for d in missing if d not in found) if t <= wall + 1.0]
            young = max(made, default=0.0) + DECISION_GRACE_S - wall
            deadline = time.monotonic() + max(DECISION_WAIT_S, min(DECISION_GRACE_S, young))
            while time.monotonic() < deadline:
                time.sleep(0.01)
                rest = [d for d in missing if d not in found]
                found.update(self.store.decisions_many(rest))
                if len(found) == len(missing):
                    break
        return found

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
        found = self._find_decisions([r.decision_id for r in rewards if _plausible_decision_id(r.decision_id)])
        for i, r in enumerate(rewards):
            try:
                resolved.append(self._resolve(i, r, now, found))
            except BanditdError as exc:
                results[i] = RewardResult(REJECTED, exc)
        if not resolved:
            return lambda _timeout: results
        op = RecordRewards(resolved, self.spec_of)
        op.future = Future()
        self.writer.submit(op)

        def wait(timeout: float | None) -> list[RewardResult]:
            assert op.future is not None
            outcome = wait_for(op.future, timeout)
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
        rt = self.require(experiment_id)
        self._settle()
        means = rt.bandit.means()
        lows, highs = rt.bandit.intervals(0.95)
        shares = rt.recent_shares(self._pending_arms(experiment_id))
        rows = rt.rows
        return [
            ArmStatsRow(
                arm_id=arm.id,
                group=arm.group,
                active=arm.active,
                pulls=int(rows[i].pulls),
                rewards=int(rows[i].events),
                reward_sum=rows[i].value_sum,
                mean=means[i],
                low=lows[i],
                high=highs[i],
                recent_share=shares[i],
                observations=int(rows[i].observations),
                rewarded=int(rows[i].rewarded),
            )
            for i, arm in enumerate(rt.spec.arms)
        ]

    def diagnostics(self, experiment_id: str, silence_s: float = 0.0) -> dict[str, Any]:
        """Learning-loop diagnostics of one experiment (see `banditd.diagnostics`)."""
        rt = self.require(experiment_id)
        views = self.arm_stats(experiment_id)  # settles first: the monitor counts committed decisions
        report = diagnostics.build(
            rt.monitor,
            views,
            list(rt.recent),
            rt.spec.policy,
            rt.binary,
            time.time(),
            silence_s or diagnostics.DEFAULT_SILENCE_S,
            rt.rule.mode,
        )
        alarms: list[tuple[str, str]] = report["alarms"]  # type: ignore[assignment]
        for g in self.guardian.status(experiment_id):
            if g["status"] == "breached":
                alarms.append(("GUARDRAIL_BREACHED", f"guardrail {g['metric']} ({g['action']}): {g['detail']}"))
        if rt.spec.state == "fallback":
            alarms.append(
                ("FALLBACK", f"a guardrail fell back to arm {rt.spec.serving_arm!r}; set the experiment RUNNING "
                 "to resume learning")
            )  # fmt: skip
        return report

    def model_report(self, experiment_id: str) -> dict[str, Any]:
        """A contextual experiment's model: feature definition, per-arm coefficients with 95%
        intervals, feature importance and targeted-versus-uniform reward (the keys are the
        fields of the ModelReport message)."""
        rt = self.require(experiment_id)
        if rt.model is None:
            raise FailedPrecondition(
                f"experiment {experiment_id!r} uses the context-free policy {rt.spec.policy!r}; "
                "models exist for lin_ucb, lin_ts and logistic experiments"
            )
        fd = rt.definition
        names = rt.model.feature_names()
        coefs = [rt.model.coefficients(i) for i in range(len(rt.arm_ids))]
        spread = features.encoded_std(fd)
        if len(spread) != len(names):  # a definition change is being applied: no importances
            spread = [0.0] * len(names)
        kinds = ["intercept"] + ["number"] * len(fd.numeric)
        means = [0.0] + [n[1] for n in fd.numeric]
        stds = [0.0] + [n[2] for n in fd.numeric]
        coverage = [1.0] + [n[3] for n in fd.numeric]
        for _, cov, levels in fd.categorical:
            kinds += ["level"] * len(levels) + ["other"]
            coverage += [c for _, c in levels] + [max(0.0, cov - sum(c for _, c in levels))]
            means += [0.0] * (len(levels) + 1)
            stds += [0.0] * (len(levels) + 1)
        feats = [
            {
                "name": name,
                "kind": kinds[j] if j < len(kinds) else "",
                "mean": means[j] if j < len(means) else 0.0,
                "std": stds[j] if j < len(stds) else 0.0,
                "coverage": coverage[j] if j < len(coverage) else 0.0,
                "importance": max((abs(c[0][j]) * spread[j] for c in coefs if j < len(c[0])), default=0.0),
            }
            for j, name in enumerate(names)
        ]
        observations = rt.model.observations()
        arms = [
            {
                "arm_id": arm.id,
                "active": arm.active,
                "observations": observations[i],
                "coefficients": [
                    {"feature": n, "value": v, "low": v - 1.96 * se, "high": v + 1.96 * se}
                    for n, v, se in zip(names, *coefs[i], strict=False)
                ],
            }
            for i, arm in enumerate(rt.spec.arms)
        ]
        unknown, mismatched = rt.model.encoder_counters()
        report = {
            "experiment_id": experiment_id,
            "policy": rt.spec.policy,
            "model_version": fd.version,
            "features": feats,
            "arms": arms,
            "contexts_seen": fd.contexts,
            "unknown_keys": unknown,
            "mismatched_values": mismatched,
            "refits": rt.refits,
            "seconds_since_refit": time.time() - rt.refitted if rt.refits else -1.0,
        }
        report.update(self._targeted_vs_uniform(rt))
        return report

    def _targeted_vs_uniform(self, rt: ExperimentRuntime) -> dict[str, Any]:
        """Observed mean reward of the logged single-arm decisions of the current model
        version, and the self-normalised inverse-propensity estimate of uniform random
        allocation on the same units (weights (1/arms) / logged propensity), with a 95%
        delta-method interval."""
        recs, values = self.training_data(rt, COMPARISON_DECISIONS)
        pairs = [(r, v) for r, v in zip(recs, values, strict=True) if len(r.arms) == 1 and r.propensities[0] > 0]
        active = sum(a.active for a in rt.spec.arms) or 1
        if not pairs:
            return {"logged_decisions": 0, "targeted_mean": 0.0, "uniform_mean": 0.0, "uniform_low": 0.0,
                    "uniform_high": 0.0}  # fmt: skip
        n = len(pairs)
        if active > 1 and any(r.propensities[0] >= 1.0 - 1e-12 for r, _ in pairs):
            # Deterministic decisions (UCB without an exploration floor): uniform allocation
            # would have chosen arms these units never got; nothing estimates its reward.
            nan = float("nan")
            y = [v for _, v in pairs]
            return {"logged_decisions": n, "targeted_mean": math.fsum(y) / n, "uniform_mean": nan,
                    "uniform_low": nan, "uniform_high": nan}  # fmt: skip
        w = [1.0 / active / r.propensities[0] for r, _ in pairs]
        y = [v for _, v in pairs]
        sw = math.fsum(w)
        est = math.fsum(wi * yi for wi, yi in zip(w, y, strict=True)) / sw
        # Delta method for a ratio estimator: var = sum w_i^2 (y_i - est)^2 / (sum w_i)^2.
        se = math.sqrt(math.fsum((wi * (yi - est)) ** 2 for wi, yi in zip(w, y, strict=True))) / sw
        return {
            "logged_decisions": n,
            "targeted_mean": math.fsum(y) / n,
            "uniform_mean": est,
            "uniform_low": est - 1.96 * se,
            "uniform_high": est + 1.96 * se,
        }

    def status(self) -> dict[str, Any]:
        return {
            "experiments": len(self._runtimes),
            "pending_decisions": len(self._pending) + len(self.fast),
            "writer_queue": self.writer.pending,
            "commits": self.writer.commits,
            "propensity_lag_s": self.propensity_lag_s,
        }
