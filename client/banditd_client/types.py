"""Plain result types returned by the client (no protobuf objects leak out)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
