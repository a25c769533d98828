"""Experiment definitions (what is stored) and their live runtime (what decides)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from banditd import _core
from banditd.errors import InvalidArgument
from banditd.validation import check_id

POLICIES = ("thompson", "ucb1", "epsilon_greedy", "softmax", "greedy", "uniform")
POLICY_PARAMS = ("exploitation", "epsilon", "epsilon_decay", "temperature", "ucb_c", "half_life")
DEFAULT_WINDOW_SECONDS = 7 * 24 * 3600
DEFAULT_PRIORS = {"binary": (1.0, 1.0), "continuous": (0.0, 1.0)}
RECENT_DECISIONS = 1000


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExperimentSpec:
        arms = [
            ArmSpec(a["id"], a["group"], tuple(a["prior"]) if a["prior"] else None, a["active"])
            for a in d["arms"]
        ]
        d = {**d, "arms": arms, "prior": tuple(d["prior"]) if d["prior"] else None}
        return cls(**d)

    def validate(self) -> None:
        check_id("experiment id", self.id)
        if not self.arms:
            raise InvalidArgument(f"experiment {self.id!r} needs at least one arm; the arm list is empty")
        seen: set[str] = set()
        for arm in self.arms:
            check_id("arm id", arm.id)
            if arm.id in seen:
                raise InvalidArgument(f"duplicate arm id {arm.id!r}; arm ids must be unique")
            seen.add(arm.id)
        if self.policy not in POLICIES:
            raise InvalidArgument(f"unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.reward_type not in DEFAULT_PRIORS:
            raise InvalidArgument(f"unknown reward type {self.reward_type!r}")
        if self.window_seconds < 0:
            raise InvalidArgument(f"attribution window must be >= 0 seconds, got {self.window_seconds}")

    def arm_prior(self, arm: ArmSpec) -> tuple[float, float]:
        return arm.prior or self.prior or DEFAULT_PRIORS[self.reward_type]


class ExperimentRuntime:
    """The live state of one experiment: its Rust posterior and serving counters."""

    def __init__(self, spec: ExperimentSpec, seed: int | None = None) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.bandit = _new_bandit(spec, seed)
        self.arm_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.pulls: list[int] = []
        self.rewards: list[int] = []
        self.reward_sum: list[float] = []
        self.recent: deque[int] = deque(maxlen=RECENT_DECISIONS)
        self.assignments: dict[str, tuple[str, ...]] = {}
        self._add_arms(spec.arms)

    @property
    def binary(self) -> bool:
        return self.spec.reward_type == "binary"

    def _add_arms(self, arms: list[ArmSpec]) -> None:
        priors = [self.spec.arm_prior(a) for a in arms]
        self.bandit.add_arms([p[0] for p in priors], [p[1] for p in priors])
        for arm in arms:
            self.index[arm.id] = len(self.arm_ids)
            self.arm_ids.append(arm.id)
            self.pulls.append(0)
            self.rewards.append(0)
            self.reward_sum.append(0.0)
            if not arm.active:
                self.bandit.set_active(self.index[arm.id], False)

    def apply_spec_change(self, new: ExperimentSpec) -> None:
        """Brings the runtime in line with an updated definition (arms added or retired)."""
        with self.lock:
            known = len(self.arm_ids)
            self._add_arms(new.arms[known:])
            for arm in new.arms[:known]:
                idx = self.index[arm.id]
                self.bandit.set_active(idx, arm.active)
            self.spec = new

    def restore_totals(self, arm_id: str, pulls: int, rewards: int, s: float, s2: float) -> None:
        idx = self.index.get(arm_id)
        if idx is None:
            return
        self.pulls[idx] = pulls
        self.rewards[idx] = rewards
        self.reward_sum[idx] = s
        self.bandit.set_stats(idx, float(rewards), s, s2)

    def recent_shares(self) -> list[float]:
        counts = Counter(self.recent)
        total = len(self.recent) or 1
        return [counts.get(i, 0) / total for i in range(len(self.arm_ids))]


def _new_bandit(spec: ExperimentSpec, seed: int | None) -> _core.Bandit:
    params = {k: float(v) for k, v in spec.params.items() if k in POLICY_PARAMS}
    try:
        return _core.Bandit(spec.reward_type, spec.policy, seed=seed, **params)
    except _core.CoreError as exc:
        raise InvalidArgument(str(exc)) from None


def now_ms() -> int:
    return int(time.time() * 1000)
