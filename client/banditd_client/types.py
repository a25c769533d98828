"""Plain result types returned by the client (no protobuf objects leak out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
