"""Experiment definitions (what is stored) and their live runtime (what decides)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from banditd import _core
from banditd.cache import BoundedCache
from banditd.diagnostics import LearningMonitor
from banditd.errors import InvalidArgument
from banditd.validation import check_id
from banditd_client._convert import POLICY_PARAMS

POLICIES = ("thompson", "ucb1", "kl_ucb", "epsilon_greedy", "softmax", "greedy", "uniform")
DEFAULT_WINDOW_SECONDS = 7 * 24 * 3600
DEFAULT_PRIORS = {"binary": (1.0, 1.0), "continuous": (0.0, 1.0)}
RECENT_DECISIONS = 1000
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
        # Sticky assignments seen lately (all of them are in LMDB).
        self.assignments: BoundedCache[str, tuple[str, ...]] = BoundedCache(ASSIGNMENT_CACHE)
        self.monitor = LearningMonitor()
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
            self._add_arms(new.arms[known:])
            for arm in new.arms[:known]:
                idx = self.index[arm.id]
                self.bandit.set_active(idx, arm.active)
            self.spec = new
            self._sync_groups()

    def restore_totals(self, totals: dict[str, tuple[int, int, float, float]]) -> None:
        """Restores durable per-arm totals (pulls, rewards, sum, sum of squares) in one call."""
        arms: list[int] = []
        n: list[float] = []
        sums: list[float] = []
        sumsq: list[float] = []
        for arm_id, (pulls, rewards, s, s2) in totals.items():
            idx = self.index.get(arm_id)
            if idx is None:
                continue
            self.pulls[idx] = pulls
            self.rewards[idx] = rewards
            self.reward_sum[idx] = s
            arms.append(idx)
            n.append(float(rewards))
            sums.append(s)
            sumsq.append(s2)
        self.bandit.set_stats_many(arms, n, sums, sumsq)
        self.bandit.maintain()

    def recent_shares(self) -> list[float]:
        counts = Counter(self.recent)
        total = len(self.recent) or 1
        return [counts.get(i, 0) / total for i in range(len(self.arm_ids))]


def _new_bandit(spec: ExperimentSpec, seed: int | None) -> _core.Bandit:
    params = {k: float(v) for k, v in spec.params.items() if k in POLICY_PARAMS and k != "group_prior_strength"}
    if not params.get("prune_epsilon"):
        params.pop("prune_epsilon", None)
    strength = spec.params.get("group_prior_strength", 0.0)
    if not (strength >= 0.0 and strength < float("inf")):
        raise InvalidArgument(f"group_prior_strength must be a finite number >= 0, got {strength}")
    try:
        return _core.Bandit(spec.reward_type, spec.policy, seed=seed, **params)
    except _core.CoreError as exc:
        raise InvalidArgument(str(exc)) from None


def now_ms() -> int:
    return int(time.time() * 1000)
