"""Experiment settings that can change while it runs: the control arm and stop criteria of the
winner analysis, the random control share, traffic floors, burn-in and guardrails.

Stored inside the experiment's JSON (`ExperimentSpec.settings`) in resolved form: defaults are
filled in at validation, so what is in force never depends on a later change of defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from banditd.errors import InvalidArgument

# Guardrail metric -> (default threshold, (low, high) admissible threshold, unit for messages).
GUARDRAIL_METRICS: dict[str, tuple[float, tuple[float, float], str]] = {
    "reward_drop": (0.05, (1e-6, 1.0), "relative drop"),
    "concentration": (0.5, (1e-6, 1.0), "share"),
    "error_rate": (0.01, (1e-6, 1.0), "share"),
    "latency_p95": (0.12, (1e-6, 60.0), "seconds"),
}
GUARDRAIL_ACTIONS = ("alert", "pause", "fallback")
MAX_GUARDRAILS = 16
DEFAULT_GUARDRAIL_WINDOW_S = 300.0
MAX_GUARDRAIL_WINDOW_S = 7 * 24 * 3600.0
DEFAULT_MIN_SAMPLES = 100
MAX_COUNT = 10**12


@dataclass(frozen=True)
class Criteria:
    """The stop rule's criteria (see `banditd.analysis.verdict`)."""

    min_uplift: float = 0.03
    confidence: float = 0.95
    min_days: float = 7.0
    min_events_per_arm: int = 1000
    max_days: float = 14.0
    horizon: int = 0  # expected decisions over the experiment's life; 0 = unknown

    def validate(self) -> None:
        if not (math.isfinite(self.min_uplift) and -1.0 < self.min_uplift <= 100.0):
            raise InvalidArgument(f"criteria.min_uplift must be in (-1, 100], got {self.min_uplift}")
        if not 0.5 < self.confidence < 1.0:
            raise InvalidArgument(f"criteria.confidence must be in (0.5, 1), got {self.confidence}")
        if not (math.isfinite(self.min_days) and 0.0 <= self.min_days <= 3660.0):
            raise InvalidArgument(f"criteria.min_days must be in [0, 3660], got {self.min_days}")
        if not (math.isfinite(self.max_days) and self.min_days <= self.max_days <= 3660.0 and self.max_days > 0):
            raise InvalidArgument(
                f"criteria.max_days must be positive, at least min_days ({self.min_days:g}) and at most 3660, "
                f"got {self.max_days}"
            )
        for name in ("min_events_per_arm", "horizon"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_COUNT:
                raise InvalidArgument(f"criteria.{name} must be in [0, {MAX_COUNT}], got {value}")


@dataclass(frozen=True)
class Guardrail:
    metric: str
    threshold: float
    action: str
    fallback_arm_id: str = ""
    window_s: float = DEFAULT_GUARDRAIL_WINDOW_S
    min_samples: int = DEFAULT_MIN_SAMPLES

    @classmethod
    def resolved(
        cls, metric: str, threshold: float, action: str, fallback_arm_id: str, window_s: float, min_samples: int
    ) -> Guardrail:
        """Validates one rule and fills in its defaults."""
        if metric not in GUARDRAIL_METRICS:
            raise InvalidArgument(
                f"unknown guardrail metric {metric!r}; expected one of {', '.join(GUARDRAIL_METRICS)}"
            )
        default, (low, high), unit = GUARDRAIL_METRICS[metric]
        if not math.isfinite(threshold) or threshold < 0:
            raise InvalidArgument(f"guardrail {metric}: threshold must be a finite number >= 0, got {threshold}")
        threshold = threshold or default
        if not low <= threshold <= high:
            raise InvalidArgument(
                f"guardrail {metric}: threshold ({unit}) must be in ({low:g}, {high:g}], got {threshold}"
            )
        action = action or "alert"
        if action not in GUARDRAIL_ACTIONS:
            raise InvalidArgument(
                f"unknown guardrail action {action!r} for {metric}; expected one of {', '.join(GUARDRAIL_ACTIONS)}"
            )
        if action == "fallback" and not fallback_arm_id:
            raise InvalidArgument(f"guardrail {metric}: action 'fallback' needs fallback_arm_id")
        if action != "fallback" and fallback_arm_id:
            raise InvalidArgument(f"guardrail {metric}: fallback_arm_id is only used with action 'fallback'")
        if not (math.isfinite(window_s) and 0 <= window_s <= MAX_GUARDRAIL_WINDOW_S):
            raise InvalidArgument(
                f"guardrail {metric}: window_seconds must be in [0, {MAX_GUARDRAIL_WINDOW_S:g}], got {window_s}"
            )
        if not 0 <= min_samples <= MAX_COUNT:
            raise InvalidArgument(f"guardrail {metric}: min_samples must be in [0, {MAX_COUNT}], got {min_samples}")
        return cls(
            metric, float(threshold), action, fallback_arm_id,
            float(window_s or DEFAULT_GUARDRAIL_WINDOW_S), int(min_samples or DEFAULT_MIN_SAMPLES),
        )  # fmt: skip


@dataclass(frozen=True)
class Settings:
    control_arm_id: str = ""
    criteria: Criteria = field(default_factory=Criteria)
    control_share: float = 0.0
    traffic_floor: float = 0.0
    arm_floors: dict[str, float] = field(default_factory=dict)
    burn_in: int = 0
    guardrails: tuple[Guardrail, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Settings:
        if not d:
            return cls()
        return cls(
            control_arm_id=d.get("control_arm_id", ""),
            criteria=Criteria(**d.get("criteria", {})),
            control_share=float(d.get("control_share", 0.0)),
            traffic_floor=float(d.get("traffic_floor", 0.0)),
            arm_floors={k: float(v) for k, v in d.get("arm_floors", {}).items()},
            burn_in=int(d.get("burn_in", 0)),
            guardrails=tuple(Guardrail(**g) for g in d.get("guardrails", ())),
        )

    @property
    def mixes(self) -> bool:
        """True when some decisions are not the policy's own (control share or floors)."""
        return self.control_share > 0 or self.traffic_floor > 0 or any(v > 0 for v in self.arm_floors.values())

    def floors(self, active: list[str]) -> list[float]:
        """Each active arm's floor, in the order given."""
        return [self.arm_floors.get(a, self.traffic_floor) for a in active]

    def validate(self, arms: dict[str, bool], contextual: bool) -> None:
        """Checks the settings against the experiment's arms (id -> active)."""
        active = [a for a, on in arms.items() if on]
        if self.control_arm_id and not arms.get(self.control_arm_id, False):
            state = "is retired" if self.control_arm_id in arms else "does not exist"
            raise InvalidArgument(f"control arm {self.control_arm_id!r} {state}; name an active arm")
        self.criteria.validate()
        if not (math.isfinite(self.control_share) and 0.0 <= self.control_share < 1.0):
            raise InvalidArgument(f"control_share must be in [0, 1), got {self.control_share}")
        for name, value in (("traffic_floor", self.traffic_floor), *self.arm_floors.items()):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidArgument(f"traffic floor of {name!r} must be in [0, 1], got {value}")
        unknown = sorted(a for a in self.arm_floors if a not in arms)
        if unknown:
            raise InvalidArgument(f"arm_floors name arms the experiment does not have: {unknown[:5]}")
        total = math.fsum(self.floors(active))
        if total > 1.0 + 1e-9:
            raise InvalidArgument(
                f"the traffic floors of the {len(active)} active arms sum to {total:.4g}; they may sum to at most 1"
            )
        if contextual and self.mixes:
            raise InvalidArgument(
                "control_share and traffic floors apply to context-free policies; contextual policies "
                "keep every arm's propensity up with policy.exploration_floor"
            )
        if not 0 <= self.burn_in <= MAX_COUNT:
            raise InvalidArgument(f"burn_in must be in [0, {MAX_COUNT}], got {self.burn_in}")
        horizon = self.criteria.horizon
        if horizon and self.burn_in * len(active) > horizon:
            raise InvalidArgument(
                f"a burn-in of {self.burn_in} observations for each of {len(active)} active arms needs "
                f"{self.burn_in * len(active)} decisions, more than the horizon of {horizon}"
            )
        if len(self.guardrails) > MAX_GUARDRAILS:
            raise InvalidArgument(f"at most {MAX_GUARDRAILS} guardrails, got {len(self.guardrails)}")
        for g in self.guardrails:
            if g.action == "fallback" and not arms.get(g.fallback_arm_id, False):
                state = "is retired" if g.fallback_arm_id in arms else "does not exist"
                raise InvalidArgument(f"guardrail {g.metric}: fallback arm {g.fallback_arm_id!r} {state}")
