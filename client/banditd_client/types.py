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
