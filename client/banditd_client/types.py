"""Plain result types returned by the client (no protobuf objects leak out)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class ChosenArm:
    arm: str
    score: float
    propensity: float


@dataclass(frozen=True, slots=True)
class Decision:
    decision_id: str
    arms: tuple[ChosenArm, ...]
    sticky_hit: bool = False
    # Contextual experiments: the model version (feature definition) that decided; 0 otherwise.
    model_version: int = 0

    @property
    def arm(self) -> str:
        return self.arms[0].arm

    @property
    def score(self) -> float:
        return self.arms[0].score

    @property
    def propensity(self) -> float:
        return self.arms[0].propensity


@dataclass(frozen=True, slots=True)
class ArmInfo:
    id: str
    group: str = ""
    active: bool = True
    prior: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class ExperimentInfo:
    id: str
    arms: tuple[ArmInfo, ...]
    policy: str
    policy_params: dict[str, float]
    reward_type: str
    sticky: bool
    attribution_window_seconds: int
    state: str
    version: int
    created_unix_ms: int
    # Outcome model: mode (decision | explicit), aggregation, default_reward, min_age_seconds.
    outcomes: dict[str, object] = field(default_factory=dict)
    # Settings (control arm, criteria, control_share, floors, burn_in, guardrails): the same
    # dict shape `create_experiment(settings=...)` takes, defaults filled in.
    settings: dict[str, Any] = field(default_factory=dict)
    serving_arm_id: str = ""  # the arm served while state is "fallback"


@dataclass(frozen=True, slots=True)
class ArmStat:
    arm: str
    pulls: int
    rewards: int
    reward_sum: float
    mean: float
    low: float
    high: float
    recent_share: float
    active: bool
    group: str
    observations: int = 0  # matured observations behind the posterior
    rewarded: int = 0  # decisions with at least one reward event


@dataclass(frozen=True, slots=True)
class RewardRejection:
    index: int
    decision_id: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class RewardCounts:
    accepted: int
    duplicate: int
    rejected: int
    rejections: tuple[RewardRejection, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ArmDiagnostics:
    arm: str
    group: str
    active: bool
    pulls: int
    rewards: int
    reward_sum: float
    mean: float
    low: float
    high: float
    recent_share: float
    drift_recent: float
    drift_window: float
    dominated: bool
    observations: int = 0
    rewarded: int = 0


@dataclass(frozen=True, slots=True)
class Alarm:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Diagnostics:
    """Is the experiment learning? See the GetDiagnostics RPC for each field."""

    experiment_id: str
    policy: str
    arms: tuple[ArmDiagnostics, ...]
    decisions: int
    rewards: int
    rise_checks: int
    rise_ok: int
    rise_share: float
    fall_checks: int
    fall_ok: int
    score_histogram: tuple[int, ...]
    scores_out_of_range: int
    top_arm: str
    top_share: float
    uniform_share: float
    traffic_entropy: float
    exploration_share: float
    reward_rate_per_second: float
    seconds_since_last_reward: float
    join_rate: float
    recent_join_rate: float
    dominated_arms: int
    window_seconds: float
    alarms: tuple[Alarm, ...]
    outcome_mode: str = "decision"
    observations: int = 0
    no_event_share: float = 0.0


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature of a contextual experiment's current definition."""

    name: str  # the context key; one-hot levels are "key=level", "key=<other>"
    kind: str  # intercept | number | level | other
    mean: float  # numbers: standardised as (value - mean) / std
    std: float
    coverage: float  # share of logged contexts that had this key (or level)
    importance: float  # largest |coefficient| x (std of the encoded feature) over the arms


@dataclass(frozen=True, slots=True)
class Coefficient:
    feature: str
    value: float
    low: float  # 95% interval
    high: float


@dataclass(frozen=True, slots=True)
class ArmModel:
    arm: str
    active: bool
    observations: float  # behind the model (discounted with a half-life)
    coefficients: tuple[Coefficient, ...]

    def coefficient(self, feature: str) -> Coefficient | None:
        """The coefficient of one feature (by its name in ModelReport.features), if the model has it."""
        return next((c for c in self.coefficients if c.feature == feature), None)


@dataclass(frozen=True, slots=True)
class ModelReport:
    """A contextual experiment's model: see the GetModel RPC for each field."""

    experiment_id: str
    policy: str
    model_version: int
    features: tuple[Feature, ...]
    arms: tuple[ArmModel, ...]
    contexts_seen: int  # decisions with a context behind the feature statistics
    unknown_keys: int  # context keys outside the definition (ignored), since start
    mismatched_values: int  # a string for a number feature or the reverse, since start
    # Targeted versus uniform over the logged decisions with outcomes (current model version):
    # the observed mean reward, and the SNIPS estimate of uniform random allocation with its
    # 95% interval.
    logged_decisions: int
    targeted_mean: float
    uniform_mean: float
    uniform_low: float
    uniform_high: float
    refits: int  # logistic refits since start
    seconds_since_refit: float  # -1 when none yet


@dataclass(frozen=True, slots=True)
class ArmAnalysis:
    arm_id: str
    active: bool
    observations: int
    mean: float  # posterior mean and 95% interval
    low: float
    high: float
    p_best: float
    expected_loss: float
    reference_arm_id: str  # what the uplift is against ("" for the control itself)
    uplift_low: float  # credible interval of mean / reference mean - 1 (criteria's confidence)
    uplift_high: float
    p_uplift: float  # P(mean > reference mean)
    p_min_uplift: float  # P(uplift >= criteria's min_uplift)
    share: float  # of the recent decisions


@dataclass(frozen=True, slots=True)
class Analysis:
    """Winner analysis and the stop rule's verdict: see the Analyse RPC for each field."""

    experiment_id: str
    arms: tuple[ArmAnalysis, ...]
    verdict: str  # ship | iterate | kill
    reason: str
    stop: bool
    best_arm_id: str
    control_arm_id: str
    criteria: dict[str, float]
    days_running: float
    min_observations: int
    control_decisions: int
    bandit_decisions: int
    control_mean: float
    bandit_mean: float
    bandit_uplift_mean: float
    bandit_uplift_low: float
    bandit_uplift_high: float
    decisions_scanned: int

    def arm(self, arm_id: str) -> ArmAnalysis:
        return next(a for a in self.arms if a.arm_id == arm_id)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts_unix_ms: int
    experiment_id: str
    action: str  # create | update | pause | resume | settings | fallback | guardrail_*
    actor: str
    details: dict[str, Any]


# Arm index of a unit DecideBulk refused (DecideBulkResponse.arms).
REJECTED_ARM = 4294967295


@dataclass(frozen=True, slots=True)
class RejectedUnit:
    """A unit of a DecideBulk batch that got no decision."""

    index: int  # within the batch
    unit_id: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class BulkBatch:
    """The answer to one batch of `decide_bulk`, kept columnar (no object per decision).

    Unit i of the batch (`unit_ids[i]`, stream index `first_index + i`) got the arms
    `arm_ids[arm_index[i*k + j]]` for j < k with `propensities[i*k + j]`; a rejected unit has
    arm index REJECTED_ARM (4294967295), propensity 0, and an entry in `rejected`. Its decision
    id is `decision_id(i)`: `explicit_ids[i]` when the server sent per-unit ids (experiments
    decided unit by unit), else `f"{batch_id}.{i}"`; reward it like any decision id."""

    first_index: int
    unit_ids: list[str]
    batch_id: str
    arm_ids: tuple[str, ...]
    arm_index: array[int]
    propensities: array[float]
    k: int
    rejected: tuple[RejectedUnit, ...]
    model_version: int
    explicit_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.unit_ids)

    def decision_id(self, i: int) -> str:
        if self.explicit_ids:
            return self.explicit_ids[i]
        if not 0 <= i < len(self.unit_ids):
            raise IndexError(f"unit index {i} outside the batch of {len(self.unit_ids)}")
        return f"{self.batch_id}.{i}"

    @property
    def decision_ids(self) -> list[str]:
        """Every unit's decision id, in order (built on demand)."""
        if self.explicit_ids:
            return list(self.explicit_ids)
        prefix = self.batch_id + "."
        return list(map(prefix.__add__, map(str, range(len(self.unit_ids)))))

    def arm(self, i: int) -> str | None:
        """Unit i's arm (the first of a slate); None for a rejected unit."""
        j = self.arm_index[i * self.k]
        return None if j == REJECTED_ARM else self.arm_ids[j]

    def arms(self, i: int) -> tuple[str, ...]:
        """Unit i's k arms, best slot first; () for a rejected unit."""
        k = self.k
        idx = self.arm_index[i * k : i * k + k]
        if not idx or idx[0] == REJECTED_ARM:
            return ()
        table = self.arm_ids
        return tuple(table[j] for j in idx)

    def propensity(self, i: int) -> float:
        """Propensity of unit i's first arm (0 for a rejected unit)."""
        return self.propensities[i * self.k]

    @property
    def first_arms(self) -> list[str | None]:
        """Every unit's (first) arm, in order; None for rejected units."""
        table = self.arm_ids + (None,)  # REJECTED_ARM never indexes a real arm: map it to None
        none = len(table) - 1
        return [table[j if j < none else none] for j in self.arm_index[:: self.k]]


@dataclass(frozen=True, slots=True)
class Allocation:
    """A versioned allocation snapshot (GetAllocation): assign units in the SDK with it."""

    experiment_id: str
    version: int
    arm_ids: tuple[str, ...]
    probabilities: tuple[float, ...]
    salt: str
    issued_unix_ms: int
    ttl_seconds: float  # refresh after this
    max_age_seconds: float  # never assign from it past this age
    sticky: bool  # sticky experiments assign on the server only (use decide)


class ExposureItem(NamedTuple):
    """A unit assigned in the SDK from a snapshot, for `log_exposures` (a plain 5-tuple in the
    same order works too; ts_unix_ms 0 = the time in the decision id)."""

    decision_id: str
    unit_id: str
    arm_id: str
    allocation_version: int
    ts_unix_ms: int = 0


class LocalDecision(NamedTuple):
    """An assignment by `LocalAssigner.assign`: from the allocation snapshot in the SDK
    (source "snapshot", logged as an exposure) or, when no usable snapshot is at hand, from
    a Decide call (source "rpc", allocation_version 0). Reward `decision_id` either way. A
    NamedTuple: built by `tuple.__new__` in one call, ~2x cheaper than a frozen dataclass
    on the hot path of local assignment."""

    decision_id: str
    unit_id: str
    arm: str
    propensity: float
    allocation_version: int
    source: str  # "snapshot" | "rpc"
