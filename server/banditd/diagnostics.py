"""Learning-loop diagnostics: is the bandit learning, and if not, why.

Each experiment runtime owns a `LearningMonitor` fed by the decision and reward paths. It
answers the questions a team otherwise needs hand-written SQL for: did every reward of 1
raise its arm's score at the next update, are scores valid probabilities, is traffic
concentrating on what works or staying near-uniform, are rewards still arriving.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

# Rates and join rates look back this far.
RATE_WINDOW_S = 300.0
# A snapshot of every arm's score at most this often, this many kept (drift).
SNAPSHOT_EVERY_S = 10.0
SNAPSHOTS_KEPT = 360
# Drift is tracked for experiments up to this size (snapshots cost memory per arm).
DRIFT_MAX_ARMS = 10_000
DEFAULT_SILENCE_S = 900.0
HISTOGRAM_BINS = 10
# Traffic this close to uniform (normalised entropy) counts as "near uniform".
NEAR_UNIFORM_ENTROPY = 0.95
# Time tolerance for "rose": posterior means are floats.
EPS = 1e-12


class SecondBuckets:
    """Event counts per wall-clock second over the last RATE_WINDOW_S."""

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()

    def add(self, now: float, count: int = 1) -> None:
        sec = math.floor(now)
        if self._buckets and self._buckets[-1][0] == sec:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([sec, count])
        while self._buckets and self._buckets[0][0] < now - RATE_WINDOW_S:
            self._buckets.popleft()

    def total(self, now: float) -> float:
        return sum(c for s, c in self._buckets if s >= now - RATE_WINDOW_S)


@dataclass
class LearningMonitor:
    decisions: int = 0
    rewards: int = 0
    rise_checks: int = 0
    rise_ok: int = 0
    fall_checks: int = 0
    fall_ok: int = 0
    last_reward_at: float | None = None
    started_at: float = field(default_factory=time.time)
    decision_rate: SecondBuckets = field(default_factory=SecondBuckets)
    reward_rate: SecondBuckets = field(default_factory=SecondBuckets)
    snapshots: deque[tuple[float, list[float]]] = field(default_factory=lambda: deque(maxlen=SNAPSHOTS_KEPT))
    lock: threading.Lock = field(default_factory=threading.Lock)

    # On every decision's path: an append to a deque (atomic, no lock); the counters take
    # what was appended when they are read (`settle`), or every SETTLE_EVERY decisions.
    new_decisions: deque[tuple[float, int]] = field(default_factory=deque)
    SETTLE_EVERY = 4096

    def on_decision(self, now: float, arms: int) -> None:
        new = self.new_decisions
        new.append((now, arms))
        if len(new) >= self.SETTLE_EVERY:
            self.settle()

    def settle(self) -> None:
        """Counts the decisions appended since the last call (under the lock)."""
        new = self.new_decisions
        with self.lock:
            for _ in range(len(new)):
                now, arms = new.popleft()
                self.decisions += arms
                self.decision_rate.add(now, arms)

    def on_update(
        self,
        rises: list[int],
        falls: list[int],
        before: dict[int, float],
        after: dict[int, float],
        events: int,
        now: float,
        means: list[float] | None,
    ) -> None:
        """One commit applied: arms whose every change in it must raise their score (a click
        swapped in for a 0, a new observation at the top of the range) and arms whose every
        change must not raise it; check each moved that way."""
        with self.lock:
            if events:
                self.rewards += events
                self.reward_rate.add(now, events)
                self.last_reward_at = now
            for arm in rises:
                self.rise_checks += 1
                self.rise_ok += after[arm] >= before[arm] - EPS
            for arm in falls:
                self.fall_checks += 1
                self.fall_ok += after[arm] <= before[arm] + EPS
            if means is not None:
                self.snapshots.append((now, means))

    def snapshot_due(self, now: float, n_arms: int) -> bool:
        """Whether the next update should also record every arm's score (for drift)."""
        if n_arms > DRIFT_MAX_ARMS:
            return False
        with self.lock:
            return not self.snapshots or now - self.snapshots[-1][0] >= SNAPSHOT_EVERY_S


@dataclass
class ArmView:
    """What the engine knows about one arm right now."""

    arm_id: str
    group: str
    active: bool
    pulls: int
    rewards: int
    reward_sum: float
    mean: float
    low: float
    high: float
    recent_share: float
    observations: int = 0  # matured observations behind the posterior
    rewarded: int = 0  # decisions with at least one reward event


def traffic_summary(recent: list[int], arm_ids: list[str], active: list[bool]) -> tuple[str, float, float]:
    """(top arm, its share, normalised entropy) of recent traffic; entropy 1 = uniform."""
    n_active = max(1, sum(active))
    if not recent:
        return "", 0.0, 1.0
    counts = Counter(recent)
    total = len(recent)
    top, top_count = counts.most_common(1)[0]
    entropy = -sum((c / total) * math.log(c / total) for c in counts.values())
    normalised = entropy / math.log(n_active) if n_active > 1 else 1.0
    return arm_ids[top], top_count / total, normalised


def build(
    monitor: LearningMonitor,
    arms: list[ArmView],
    recent: list[int],
    policy: str,
    binary: bool,
    now: float,
    silence_s: float,
    outcome_mode: str = "decision",
) -> dict[str, object]:
    """The diagnostics of one experiment as plain values (the service turns it into protobuf)."""
    monitor.settle()
    with monitor.lock:
        snapshots = list(monitor.snapshots)
        m: dict[str, Any] = {
            "decisions": monitor.decisions,
            "rewards": monitor.rewards,
            "rise_checks": monitor.rise_checks,
            "rise_ok": monitor.rise_ok,
            "fall_checks": monitor.fall_checks,
            "fall_ok": monitor.fall_ok,
            "recent_decisions": monitor.decision_rate.total(now),
            "recent_rewards": monitor.reward_rate.total(now),
            "last_reward_at": monitor.last_reward_at,
            "started_at": monitor.started_at,
        }
    active = [a.active for a in arms]
    means = [a.mean for a in arms]
    histogram = [0] * HISTOGRAM_BINS
    out_of_range = 0
    for a in arms:
        if not math.isfinite(a.mean) or (binary and not 0.0 <= a.mean <= 1.0):
            out_of_range += 1
        elif binary:
            histogram[min(HISTOGRAM_BINS - 1, int(a.mean * HISTOGRAM_BINS))] += 1
    live = [i for i, a in enumerate(arms) if a.active]
    leader = max(live, key=lambda i: means[i]) if live else None
    dominated = [
        leader is not None and a.active and i != leader and a.high < arms[leader].low for i, a in enumerate(arms)
    ]
    top_arm, top_share, entropy = traffic_summary(recent, [a.arm_id for a in arms], active)
    leader_share = (sum(1 for i in recent if i == leader) / len(recent)) if recent and leader is not None else 0.0
    drift_recent = [0.0] * len(arms)
    drift_window = [0.0] * len(arms)
    window_s = 0.0
    if snapshots:
        first_t, first = snapshots[0]
        _, last = snapshots[-1]
        prev = snapshots[-2][1] if len(snapshots) > 1 else first
        window_s = now - first_t
        for i in range(min(len(arms), len(first))):
            drift_window[i] = means[i] - first[i]
            drift_recent[i] = last[i] - prev[i] if i < len(prev) and i < len(last) else 0.0
    since_last = now - m["last_reward_at"] if m["last_reward_at"] is not None else -1.0
    span = max(1.0, min(RATE_WINDOW_S, now - m["started_at"]))
    alarms: list[tuple[str, str]] = []
    if out_of_range:
        alarms.append(("SCORE_OUT_OF_RANGE", f"{out_of_range} scores are outside [0, 1]"))
    if m["rise_ok"] < m["rise_checks"]:
        alarms.append(
            (
                "REWARD_LOWERED_SCORE",
                f"{m['rise_checks'] - m['rise_ok']} of {m['rise_checks']} arms rewarded with positive values "
                "had a lower score after the update (expected only with discounting, half_life > 0)",
            )
        )
    if m["decisions"] >= 1000 and m["rewards"] == 0:
        alarms.append(("NO_REWARDS", f"{m['decisions']} decisions and no reward yet: is the reward path wired?"))
    elif since_last > silence_s and m["recent_decisions"] > 0:
        alarms.append(
            (
                "REWARDS_STOPPED",
                f"no reward for {since_last:.0f}s while decisions continue ({m['recent_decisions']:.0f} in the "
                f"last {RATE_WINDOW_S:.0f}s)",
            )
        )
    pulls = sum(a.pulls for a in arms)
    no_event_share = 1.0 - sum(a.rewarded for a in arms) / pulls if pulls else 0.0
    observations = sum(a.observations for a in arms)
    if outcome_mode == "explicit" and binary and observations >= 20 and all(
        a.reward_sum >= a.observations for a in arms
    ):
        alarms.append(
            (
                "ONLY_POSITIVE_REWARDS",
                f"all {observations} observations of this explicit-mode experiment are 1s: the 0s are probably "
                "never reported, so every score tends to 1. Use outcome mode 'decision' (a decision without a "
                "reward counts as 0) or report the 0s",
            )
        )
    n_dominated = sum(dominated)
    if policy != "uniform" and len(recent) >= 200 and entropy >= NEAR_UNIFORM_ENTROPY and n_dominated > 0:
        alarms.append(
            (
                "NEAR_UNIFORM_TRAFFIC",
                f"traffic is near-uniform (entropy {entropy:.2f}) although {n_dominated} arms are clearly worse "
                "than the leader: check exploitation / priors / update frequency",
            )
        )
    if m["rewards"] >= 50 * max(1, len(live)) and n_dominated == 0 and len(live) > 1:
        alarms.append(
            (
                "NOT_SEPARATING",
                f"{m['rewards']} rewards and no arm is separated from the leader yet: arms may be equal, or "
                "too sparse for flat priors (consider informative or group priors)",
            )
        )
    return {
        "policy": policy,
        "arms": arms,
        "drift_recent": drift_recent,
        "drift_window": drift_window,
        "dominated": dominated,
        "decisions": m["decisions"],
        "rewards": m["rewards"],
        "rise_checks": m["rise_checks"],
        "rise_ok": m["rise_ok"],
        "rise_share": m["rise_ok"] / m["rise_checks"] if m["rise_checks"] else 1.0,
        "fall_checks": m["fall_checks"],
        "fall_ok": m["fall_ok"],
        "score_histogram": histogram,
        "scores_out_of_range": out_of_range,
        "top_arm": top_arm,
        "top_share": top_share,
        "uniform_share": 1.0 / max(1, len(live)),
        "traffic_entropy": entropy,
        "exploration_share": 1.0 - leader_share if recent else 0.0,
        "reward_rate_per_second": m["recent_rewards"] / span,
        "seconds_since_last_reward": since_last,
        "join_rate": m["rewards"] / m["decisions"] if m["decisions"] else 0.0,
        "recent_join_rate": m["recent_rewards"] / m["recent_decisions"] if m["recent_decisions"] else 0.0,
        "dominated_arms": n_dominated,
        "window_seconds": window_s,
        "outcome_mode": outcome_mode,
        "observations": observations,
        "no_event_share": no_event_share,
        "alarms": alarms,
    }
