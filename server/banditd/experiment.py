"""Experiment definitions (what is stored) and their live runtime (what decides)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from banditd import _core, features
from banditd.cache import BoundedCache
from banditd.diagnostics import LearningMonitor
from banditd.errors import InvalidArgument
from banditd.outcomes import OutcomeRule, on_maturity
from banditd.settings import Settings
from banditd.store import ArmRow, FeatureDefinition, ModelItems, PolicyState
from banditd.validation import MAX_ARMS, MAX_WINDOW_SECONDS, check_id, check_params, check_prior

# Contextual policies: (model, policy) of `banditd._core.Linear`.
CONTEXTUAL = {
    "lin_ucb": ("ridge", "ucb"),
    "lin_ts": ("ridge", "thompson"),
    "logistic_ucb": ("logistic", "ucb"),
    "logistic_ts": ("logistic", "thompson"),
    "logistic": ("logistic", "thompson"),
}
POLICIES = ("thompson", "ucb1", "kl_ucb", "epsilon_greedy", "softmax", "greedy", "uniform", *CONTEXTUAL)
# Parameters of the context-free core (`_core.Bandit`); the others are the contextual ones.
BANDIT_PARAMS = (
    "exploitation", "epsilon", "epsilon_decay", "temperature", "ucb_c", "half_life", "prune_epsilon",
)  # fmt: skip
CONTEXTUAL_PARAMS = ("alpha", "ridge", "exploration_floor", "refit_seconds", "encoder_warmup", "encoder_refit_seconds")
CONTEXTUAL_DEFAULTS = {
    "alpha": 1.96,
    "ridge": 1.0,
    "exploration_floor": 0.0,
    "refit_seconds": 60.0,
    "encoder_warmup": 200.0,
    "encoder_refit_seconds": 3600.0,
}
DEFAULT_WINDOW_SECONDS = 7 * 24 * 3600
DEFAULT_PRIORS = {"binary": (1.0, 1.0), "continuous": (0.0, 1.0)}
RECENT_DECISIONS = 1000
log = logging.getLogger("banditd")
# Units per sticky experiment whose assignment is kept in memory (BANDITD_ASSIGNMENT_CACHE).
ASSIGNMENT_CACHE = int(os.environ.get("BANDITD_ASSIGNMENT_CACHE", "200000"))
# Core parameters that are not the core constructor's (applied after construction).
GROUP_STRENGTH_DEFAULT = 20.0


@dataclass
class ArmSpec:
    id: str
    group: str = ""
    prior: tuple[float, float] | None = None
    active: bool = True


@dataclass
class ExperimentSpec:
    id: str
    arms: list[ArmSpec]
    policy: str = "thompson"
    params: dict[str, float] = field(default_factory=dict)
    reward_type: str = "binary"
    sticky: bool = False
    window_seconds: int = DEFAULT_WINDOW_SECONDS
    prior: tuple[float, float] | None = None
    state: str = "running"
    created_ms: int = 0
    version: int = 1
    # Outcome model (see `banditd.outcomes`): mode, aggregation, default_reward, min_age_s;
    # empty values take the reward type's defaults. Fixed once the experiment exists.
    outcomes: dict[str, Any] = field(default_factory=dict)
    # `banditd.settings.Settings` as JSON (resolved at validation); changeable while running.
    settings: dict[str, Any] = field(default_factory=dict)
    # The arm every decision gets while state is "fallback" (set by a guardrail).
    serving_arm: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @cached_property
    def rule(self) -> OutcomeRule:
        """The outcome rule (validated; computed once: it is on the write path of every reward)."""
        return OutcomeRule.for_experiment(self.reward_type == "binary", **self.outcomes)

    @cached_property
    def decision_observation(self) -> float | None:
        """The value a decision record is observed with the moment it is stored, when that
        is all the accounting it needs (decision mode, no maturation delay, half-life or
        model: the writer's per-decision fast path); None otherwise."""
        rule = self.rule
        if rule.mode != "decision" or rule.min_age_ms > 0 or self.half_life > 0 or self.contextual:
            return None
        return on_maturity(rule, None).sum

    @cached_property
    def active_indices(self) -> list[int]:
        return [i for i, a in enumerate(self.arms) if a.active]

    @cached_property
    def floor_vector(self) -> list[float]:
        """The traffic floor of each active arm, in `active_indices` order."""
        return self.config.floors([self.arms[i].id for i in self.active_indices])

    @cached_property
    def mixed(self) -> bool:
        """True when decisions go through the control / floor / burn-in path."""
        return self.config.burn_in > 0 or self.config.mixes

    @cached_property
    def plain(self) -> bool:
        """Running, not sticky, no control share / floors / burn-in, no model, and a decision
        is an observation the moment it is stored: a Decide of one arm without a context
        needs only the posterior and its record (the core's fast path, `Engine.fast`)."""
        return (
            self.state == "running"
            and not self.sticky
            and not self.mixed
            and not self.contextual
            and self.decision_observation is not None
        )

    @cached_property
    def config(self) -> Settings:
        """The settings in force (parsed once per spec version: read on every decision)."""
        return Settings.from_json(self.settings)

    @property
    def contextual(self) -> bool:
        return self.policy in CONTEXTUAL

    def param(self, name: str) -> float:
        """A contextual parameter, its default when unset (0)."""
        return float(self.params.get(name) or CONTEXTUAL_DEFAULTS[name])

    @cached_property
    def arm_index(self) -> dict[str, int]:
        """Arm id -> position (the core's arm index); arms are only ever appended."""
        return {a.id: i for i, a in enumerate(self.arms)}

    @property
    def half_life(self) -> float:
        return float(self.params.get("half_life") or 0.0)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExperimentSpec:
        arms = [
            ArmSpec(a["id"], a["group"], tuple(a["prior"]) if a["prior"] else None, a["active"])
            for a in d["arms"]
        ]
        d = {**d, "arms": arms, "prior": tuple(d["prior"]) if d["prior"] else None}
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def validate(self) -> None:
        check_id("experiment id", self.id)
        if not self.arms:
            raise InvalidArgument(f"experiment {self.id!r} needs at least one arm; the arm list is empty")
        if len(self.arms) > MAX_ARMS:
            raise InvalidArgument(f"experiment {self.id!r} has {len(self.arms)} arms; at most {MAX_ARMS} allowed")
        binary = self.reward_type == "binary"
        check_prior(self.prior, binary, "experiment prior")
        seen: set[str] = set()
        for arm in self.arms:
            check_id("arm id", arm.id)
            check_id("group", arm.group, required=False)
            check_prior(arm.prior, binary, f"prior of arm {arm.id!r}")
            if arm.id in seen:
                raise InvalidArgument(f"duplicate arm id {arm.id!r}; arm ids must be unique")
            seen.add(arm.id)
        if self.policy not in POLICIES:
            raise InvalidArgument(f"unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.reward_type not in DEFAULT_PRIORS:
            raise InvalidArgument(f"unknown reward type {self.reward_type!r}")
        if not 0 <= self.window_seconds <= MAX_WINDOW_SECONDS:
            raise InvalidArgument(
                f"attribution window must be between 0 and {MAX_WINDOW_SECONDS} seconds (366 days), "
                f"got {self.window_seconds}"
            )
        check_params(self.params)
        if self.contextual:
            if self.policy.startswith("logistic") and not binary:
                raise InvalidArgument(
                    f"{self.policy!r} models binary rewards; use lin_ucb or lin_ts for continuous rewards"
                )
        else:
            extra = sorted(k for k in CONTEXTUAL_PARAMS if self.params.get(k))
            if extra:
                raise InvalidArgument(
                    f"{', '.join(extra)} apply to contextual policies only, not to {self.policy!r}"
                )
        rule = self.rule  # validates
        if self.window_seconds and rule.min_age_s > self.window_seconds:
            raise InvalidArgument(
                f"min_age ({rule.min_age_s:g} s) is longer than the attribution window ({self.window_seconds} s): "
                "decisions would expire before they count"
            )
        arm_states = {a.id: a.active for a in self.arms}
        Settings.from_json(self.settings).validate(arm_states, self.contextual)
        if self.state not in ("running", "paused", "fallback"):
            raise InvalidArgument(f"unknown experiment state {self.state!r}")
        if self.state == "fallback" and not arm_states.get(self.serving_arm, False):
            raise InvalidArgument(f"fallback arm {self.serving_arm!r} is not an active arm of {self.id!r}")
        # Stored resolved, so the rule in force never depends on a later change of defaults.
        self.outcomes = {
            "mode": rule.mode,
            "aggregation": rule.aggregation,
            "default_reward": rule.default_reward,
            "min_age_s": rule.min_age_s,
        }

    def arm_prior(self, arm: ArmSpec) -> tuple[float, float]:
        return arm.prior or self.prior or DEFAULT_PRIORS[self.reward_type]


# The pruned Thompson draw's order is refreshed at most this often (see `maintain`).
MAINTAIN_EVERY_S = 0.25


# Thompson over many arms: decisions per posterior draw, one per ARMS_PER_SHARED_DRAW active
# arms, at most SHARE_MAX. A draw over 10,000 arms costs ~20-30 µs on AVX2 (~300 µs scalar),
# the rest of a decision a few µs. Each decision still gets an exact draw from the policy's
# distribution (the logged propensities hold); decisions close in time are correlated.
ARMS_PER_SHARED_DRAW = 1_000
SHARE_MAX = 16


def units_per_draw(spec: ExperimentSpec) -> int:
    """Decisions (DecideBulk units, or single Decides within one posterior version) per
    posterior draw: 1 but for Thompson over 2,000 or more active arms."""
    if spec.policy != "thompson" or spec.contextual:
        return 1  # the other policies' decisions cost O(1) or are deterministic
    return max(1, min(SHARE_MAX, len(spec.active_indices) // ARMS_PER_SHARED_DRAW))


class ExperimentRuntime:
    """The live state of one experiment: its Rust posterior and serving counters.

    The posterior is a cache of the stored statistics (`apply_state`): the same committed
    rows give the same posterior in every process and after every restart."""

    def __init__(self, spec: ExperimentSpec, seed: int | None = None) -> None:
        self.spec = spec
        self.rule = spec.rule
        self.lock = threading.Lock()
        self.bandit = _new_bandit(spec, seed)
        self.discount = 0.5 ** (1.0 / spec.half_life) if spec.half_life > 0 else 1.0
        self.arm_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.rows: list[ArmRow] = []
        self.policy = PolicyState()
        # Stats counter of the store state fully applied, and of the newest partial one (an
        # own commit applied while another process's was not yet read).
        self.stats_seen = -1
        self.stats_floor = -1
        self._maintained_at = -1e9  # monotonic time of the last pruning-order refresh
        self._maintain_due = False
        self._burn_in: tuple[int, bool, float] = (-1, False, 0.0)  # (spec version, over, recheck at)
        self._positions: tuple[int, dict[int, int]] = (-1, {})
        self.slate_sizes: set[int] = set()  # k of recent decisions (propensities kept fresh)
        self.recent: deque[int] = deque(maxlen=RECENT_DECISIONS)
        # Sticky assignments seen lately (all of them are in LMDB).
        self.assignments: BoundedCache[str, tuple[str, ...]] = BoundedCache(ASSIGNMENT_CACHE)
        self.monitor = LearningMonitor()
        # Contextual experiments: the per-arm models, their feature definition and the last
        # model log entry applied (see `store` and `apply_model_items`).
        self.model: _core.Linear | None = _new_model(spec, seed) if spec.contextual else None
        self.definition = FeatureDefinition()
        self.model_seq = 0
        self.encoder_checked = 0.0  # time.monotonic() of the last definition check
        self.refitted = 0.0  # time.time() of the last logistic refit
        self.refits = 0
        self._add_arms(spec.arms)
        self.units_per_draw = 1
        self._sync_draw_sharing()

    def _sync_draw_sharing(self) -> None:
        """Thompson over thousands of arms: decisions share posterior draws (each still an
        exact draw from the policy's distribution; see `units_per_draw`)."""
        n = units_per_draw(self.spec)
        if n != self.units_per_draw:
            self.bandit.set_draw_sharing(n)
            self.units_per_draw = n

    @property
    def binary(self) -> bool:
        return self.spec.reward_type == "binary"

    def _add_arms(self, arms: list[ArmSpec]) -> None:
        # Ids first, then the core: a concurrent decision can only get back an index that
        # already names an arm.
        first = len(self.arm_ids)
        for arm in arms:
            self.rows.append(ArmRow())
            self.index[arm.id] = len(self.arm_ids)
            self.arm_ids.append(arm.id)
        priors = [self.spec.arm_prior(a) for a in arms]
        self.bandit.add_arms([p[0] for p in priors], [p[1] for p in priors])
        if self.model is not None:
            self.model.add_arms(len(arms))
        for offset, arm in enumerate(arms):
            if not arm.active:
                self.bandit.set_active(first + offset, False)
                if self.model is not None:
                    self.model.set_active(first + offset, False)
        self._sync_groups()

    def _sync_groups(self) -> None:
        """Arms that name a group share its pooled prior (see core `set_groups`)."""
        names = sorted({a.group for a in self.spec.arms if a.group})
        if not names:
            return
        number = {name: i for i, name in enumerate(names)}
        by_id = {a.id: a.group for a in self.spec.arms}
        groups = [number[by_id[arm_id]] if by_id.get(arm_id) else -1 for arm_id in self.arm_ids]
        strength = float(self.spec.params.get("group_prior_strength") or GROUP_STRENGTH_DEFAULT)
        self.bandit.set_groups(groups, strength)

    def apply_spec_change(self, new: ExperimentSpec) -> None:
        """Brings the runtime in line with an updated definition (arms added or retired)."""
        with self.lock:
            known = len(self.arm_ids)
            was_active = [a.active for a in self.spec.arms]
            self.spec = new
            self._add_arms(new.arms[known:])
            # Only arms whose state changed: with groups each change re-pools every arm.
            for i, arm in enumerate(new.arms[:known]):
                if i >= len(was_active) or arm.active != was_active[i]:
                    self.bandit.set_active(self.index[arm.id], arm.active)
                    if self.model is not None:
                        self.model.set_active(self.index[arm.id], arm.active)
            self._sync_draw_sharing()

    def apply_definition(self, fd: FeatureDefinition) -> None:
        """A new feature definition: every arm's model restarts (its log is replayed next)."""
        assert self.model is not None
        numeric, categorical = features.core_args(fd)
        with self.lock:
            self.model.set_encoder(numeric, categorical)
            self.definition = fd
            self.model_seq = 0

    def apply_model_items(self, version: int, seq: int, items: ModelItems) -> bool:
        """Applies one model log entry if it is the next one of the current version; False
        when it is not (the caller re-reads the log)."""
        assert self.model is not None
        with self.lock:
            if version != self.definition.version or seq != self.model_seq + 1:
                return seq <= self.model_seq and version == self.definition.version
            try:
                self.model.update(items.arms, b"".join(items.xs), items.w, items.wy, items.wyy)
            except _core.CoreError as exc:  # a damaged entry must not stop the others
                log.error("experiment %r: model log entry %d not applied: %s", self.spec.id, seq, exc)
            self.model_seq = seq
            return True

    def maintain(self, now: float, force: bool = False) -> None:
        """Refreshes the pruned Thompson draw's order and bounds (`Bandit.maintain`) at most
        every MAINTAIN_EVERY_S: at 10,000 arms it takes ~1 ms, and commits come every few ms.
        Skipping is safe: arms whose posterior rose since the last refresh are drawn
        unconditionally until the next one (the background thread catches up)."""
        if force or now - self._maintained_at >= MAINTAIN_EVERY_S:
            self.bandit.maintain()
            self._maintained_at = now
            self._maintain_due = False
        else:
            self._maintain_due = True

    def maintain_if_due(self, now: float) -> None:
        if self._maintain_due and now - self._maintained_at >= MAINTAIN_EVERY_S:
            with self.lock:
                self.maintain(now)

    def apply_state(self, policy: PolicyState, rows: dict[str, ArmRow], counter: int, full: bool) -> None:
        """Makes the posterior equal to stored statistics: the policy counters and the given
        arm rows (the others are unchanged). `full`: the store's state at stats counter
        `counter`: every row, or those that changed after `stats_seen` (the arm log); else
        the rows one own commit changed, which took the counter to `counter`. With a
        half-life every arm's discounted statistics move with the clock, so all of them are
        pushed."""
        with self.lock:
            if full:
                if counter < self.stats_floor:
                    return  # older than an own commit already applied; re-read next round
                self.stats_seen = counter
            elif self.stats_seen == counter - 1:
                self.stats_seen = counter
            self.stats_floor = max(self.stats_floor, counter)
            changed: list[int] = []
            for arm_id, row in rows.items():
                idx = self.index.get(arm_id)
                if idx is not None:
                    self.rows[idx] = row
                    changed.append(idx)
            self.policy = policy
            if self.discount < 1.0:
                changed = list(range(len(self.rows)))
                scale = self.discount ** (policy.clock - policy.base)
            else:
                scale = 1.0
            if changed:
                rs = [self._usable(i) for i in changed]
                self.bandit.set_stats_many(
                    changed, [r.n * scale for r in rs], [r.sum * scale for r in rs], [r.sumsq * scale for r in rs]
                )
            self.bandit.set_counters(policy.decisions, policy.clock)
            self.maintain(time.monotonic())
            if self.model is not None and self.discount < 1.0:
                # Stored model weights are relative to the clock's base: the models' variance
                # grows by d^-(clock - base) as observations age (see `Linear.set_inflation`).
                self.model.set_inflation(self.discount ** -(policy.clock - policy.base))

    def _usable(self, idx: int) -> ArmRow:
        """The row, or an empty posterior when its stored statistics cannot be one (a damaged
        or foreign record): the arm keeps serving from its prior and the log says why."""
        row = self.rows[idx]
        values = (row.n, row.sum, row.sumsq)
        ok = all(math.isfinite(v) for v in values) and row.n >= 0
        if ok and self.binary:
            ok = -1e-9 <= row.sum <= row.n * (1 + 1e-9) + 1e-9
        if ok:
            return row
        log.error(
            "experiment %r arm %r: stored statistics n=%r sum=%r sumsq=%r are not a valid posterior; "
            "serving it from its prior", self.spec.id, self.arm_ids[idx], *values,
        )
        return ArmRow(pulls=row.pulls)

    def burning_in(self, burn_in: int) -> bool:
        """True while an active arm has fewer than `burn_in` observations. Rechecked at most
        every 50 ms (it reads every arm), and never again once over for this arm set."""
        now = time.monotonic()
        key = self.spec.version
        if self._burn_in[0] == key and (self._burn_in[1] or now < self._burn_in[2]):
            return not self._burn_in[1]
        rows = self.rows
        done = all(rows[i].observations >= burn_in for i in self.spec.active_indices if i < len(rows))
        self._burn_in = (key, done, now + 0.05)
        return not done

    def active_position(self) -> dict[int, int]:
        """Arm index -> position among the active arms (cached per spec version)."""
        if self._positions[0] != self.spec.version:
            self._positions = (self.spec.version, {a: j for j, a in enumerate(self.spec.active_indices)})
        return self._positions[1]

    def recent_shares(self, newer: Sequence[int] = ()) -> list[float]:
        """Each arm's share of the last RECENT_DECISIONS decisions (`newer`: arms of decisions
        made after those in `recent`, not yet counted there)."""
        last = [*self.recent, *newer][-RECENT_DECISIONS:] if newer else self.recent
        counts = Counter(last)
        total = len(last) or 1
        return [counts.get(i, 0) / total for i in range(len(self.arm_ids))]


def _new_model(spec: ExperimentSpec, seed: int | None) -> _core.Linear:
    model, policy = CONTEXTUAL[spec.policy]
    try:
        return _core.Linear(
            model,
            policy,
            binary=spec.reward_type == "binary",
            alpha=spec.param("alpha"),
            ridge=spec.param("ridge"),
            floor=float(spec.params.get("exploration_floor") or 0.0),
            seed=seed,
        )
    except _core.CoreError as exc:
        raise InvalidArgument(str(exc)) from None


def _new_bandit(spec: ExperimentSpec, seed: int | None) -> _core.Bandit:
    """The context-free posterior; for contextual experiments it is a Thompson posterior
    behind the per-arm statistics and diagnostics (the average over contexts)."""
    params: dict[str, Any] = {k: float(v) for k, v in spec.params.items() if k in BANDIT_PARAMS}
    if not params.get("prune_epsilon"):
        params.pop("prune_epsilon", None)
    strength = spec.params.get("group_prior_strength", 0.0)
    if not (strength >= 0.0 and strength < float("inf")):
        raise InvalidArgument(f"group_prior_strength must be a finite number >= 0, got {strength}")
    try:
        policy = "thompson" if spec.contextual else spec.policy
        return _core.Bandit(spec.reward_type, policy, seed=seed, **params)
    except _core.CoreError as exc:
        raise InvalidArgument(str(exc)) from None


def now_ms() -> int:
    return int(time.time() * 1000)
