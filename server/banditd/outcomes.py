"""The outcome model: what counts as an observation, and what its value is.

A decision (each arm of a slate) becomes an observation once it has *matured* (immediately,
or `min_age_s` after it was made). Its value is the aggregate of the reward events received
for that decision and arm, or, in `decision` mode, the experiment's default reward (0) when
none arrived. So a caller that reports only the clicks and a caller that reports 0s and 1s
teach the posterior the same rates.

In `explicit` mode only decisions with at least one reward event are observations (the
caller defines the trial, e.g. "an opened email").

Events for one decision and arm are combined by the experiment's aggregation rule: `max`
(binary default: a click is a click), `sum` (continuous default), `first` or `last`. When
the aggregate of an observed decision changes, the posterior swaps the old value for the
new one: its count does not change, its sum and sum of squares move by the difference.

These are pure functions of (rule, state), shared by the server's write path and the
simulator, so both play by exactly the same rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from banditd.errors import InvalidArgument

MODES = ("decision", "explicit")
AGGREGATIONS = ("max", "sum", "first", "last")
# Maturation delays beyond this are surely a unit mistake (milliseconds given as seconds).
MAX_MIN_AGE_S = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class OutcomeRule:
    mode: str = "decision"
    aggregation: str = "max"
    default_reward: float = 0.0
    min_age_s: float = 0.0

    @classmethod
    def for_experiment(
        cls,
        binary: bool,
        mode: str = "",
        aggregation: str = "",
        default_reward: float = 0.0,
        min_age_s: float = 0.0,
    ) -> OutcomeRule:
        """The rule with defaults filled in for the reward type; validated."""
        rule = cls(
            mode=mode or "decision",
            aggregation=aggregation or ("max" if binary else "sum"),
            default_reward=float(default_reward),
            min_age_s=float(min_age_s),
        )
        rule.validate(binary)
        return rule

    def validate(self, binary: bool) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"unknown outcome mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgument(
                f"unknown aggregation {self.aggregation!r}; expected one of {', '.join(AGGREGATIONS)}"
            )
        if binary and self.aggregation == "sum":
            raise InvalidArgument(
                "aggregation 'sum' can exceed 1 per decision, which a binary (Beta) posterior cannot "
                "take; use max (a click is a click), first or last"
            )
        if not math.isfinite(self.default_reward):
            raise InvalidArgument(f"default reward {self.default_reward} is not a finite number")
        if binary and not 0.0 <= self.default_reward <= 1.0:
            raise InvalidArgument(f"default reward {self.default_reward} is outside [0, 1] (binary experiment)")
        if abs(self.default_reward) > 1e12:
            raise InvalidArgument(f"default reward {self.default_reward:g} is outside [-1e12, 1e12]")
        if not (math.isfinite(self.min_age_s) and 0.0 <= self.min_age_s <= MAX_MIN_AGE_S):
            raise InvalidArgument(
                f"min_age must be between 0 and {MAX_MIN_AGE_S:.0f} seconds, got {self.min_age_s}"
            )

    @property
    def min_age_ms(self) -> int:
        return int(round(self.min_age_s * 1000))


def combine(aggregation: str, old: float | None, value: float) -> float:
    """The aggregate after one more event (`old` is None before the first event)."""
    if old is None:
        return value
    if aggregation == "max":
        return max(old, value)
    if aggregation == "sum":
        return old + value
    if aggregation == "first":
        return old
    return value  # last


def observed_value(rule: OutcomeRule, aggregate: float | None) -> float | None:
    """The value a matured decision contributes, or None when it is no observation."""
    if aggregate is not None:
        return aggregate
    return rule.default_reward if rule.mode == "decision" else None


@dataclass(frozen=True, slots=True)
class Delta:
    """Change of an arm's sufficient statistics (unweighted: the caller applies discounting)."""

    n: float = 0.0
    sum: float = 0.0
    sumsq: float = 0.0

    @property
    def empty(self) -> bool:
        return self.n == 0.0 and self.sum == 0.0 and self.sumsq == 0.0


NO_CHANGE = Delta()


def value_delta(old: float | None, new: float | None) -> Delta:
    """Statistics change when an observation's value goes from `old` to `new` (None: absent)."""
    n = float(new is not None) - float(old is not None)
    o = old or 0.0
    v = new or 0.0
    return Delta(n, v - o, v * v - o * o)


def on_maturity(rule: OutcomeRule, aggregate: float | None) -> Delta:
    """A decision becomes an observation with the events it has by now."""
    return value_delta(None, observed_value(rule, aggregate))


def on_event(rule: OutcomeRule, matured: bool, old: float | None, new: float) -> Delta:
    """An event moved the aggregate from `old` to `new`; what changes in the posterior."""
    if not matured:
        return NO_CHANGE
    return value_delta(observed_value(rule, old), observed_value(rule, new))
