"""Winner analysis and the stop rule: which arm is best, by how much, and whether to ship it,
keep going, or stop without a winner.

The posterior numbers (P(best), expected loss, uplift intervals, P(uplift >= min_uplift)) come
from the Rust core (`Bandit.winner_analysis`, Monte Carlo over every arm's posterior). The
bandit-versus-control comparison comes from the decision log: decisions the random control
share made (source "control") against those the policy made; burn-in and fallback decisions
belong to neither.

The stop rule (criteria per experiment, `banditd.settings.Criteria`):
* before `min_days` or while the best arm or its reference has fewer than
  `min_events_per_arm` observations: iterate (keep running), unless `max_days` is already over
  (kill: out of time). Only the two arms the verdict compares need the minimum: a bandit
  starves clear losers by design, and waiting for them would hold every verdict back;
  losers with little data have wide intervals, so they never make a kill verdict early;
* ship when the best arm (highest P(best)) beats its reference (the control arm, else the
  runner-up) by at least `min_uplift` with probability >= `confidence`, and it is the best:
  P(best) >= `confidence`, or its expected loss is at most (1 - confidence) x min_uplift x
  its mean (two equally good challengers never separate, but their expected loss shrinks);
* kill when with that confidence no arm reaches `min_uplift` over its reference (the control
  arm holds, or the arms are practically equal), or when `max_days` passed without a winner;
* iterate otherwise.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from banditd.errors import FailedPrecondition, InvalidArgument
from banditd.settings import Criteria

if TYPE_CHECKING:
    from banditd.engine import Engine

DEFAULT_DRAWS = 20_000
MAX_DRAWS = 1_000_000
# Default draws shrink for large experiments so one analysis stays within this many
# arm-draws (16 MB of draws, well under a second), never below 100 draws.
DEFAULT_CELLS = 2_000_000
# Newest decisions read for the bandit-versus-control comparison, and the most decision
# records (of every experiment) looked at to find them.
COMPARISON_DECISIONS = 100_000
COMPARISON_SCAN = 1_000_000
DAY_S = 86_400.0


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def analyse(engine: Engine, experiment_id: str, draws: int = 0) -> dict[str, Any]:
    """The analysis of one experiment (keys are the fields of the Analysis message)."""
    if draws and not 100 <= draws <= MAX_DRAWS:
        raise InvalidArgument(f"draws must be between 100 and {MAX_DRAWS}, got {draws}")
    rt = engine.require(experiment_id)
    spec = rt.spec
    draws = draws or max(100, min(DEFAULT_DRAWS, DEFAULT_CELLS // max(1, len(spec.active_indices))))
    cfg = spec.config
    crit = cfg.criteria
    stats = engine.arm_stats(experiment_id)
    active = [s for s in stats if s.active]
    if len(active) < 2:
        raise FailedPrecondition(
            f"experiment {experiment_id!r} has {len(active)} active arm; the analysis compares at least 2"
        )
    control = spec.arm_index[cfg.control_arm_id] if cfg.control_arm_id else None
    posterior = rt.bandit.winner_analysis(draws, control, crit.confidence, crit.min_uplift)
    arms = []
    for i, s in enumerate(stats):
        ref = posterior["reference"][i]
        arms.append(
            {
                "arm_id": s.arm_id,
                "active": s.active,
                "observations": s.observations,
                "mean": s.mean,
                "low": s.low,
                "high": s.high,
                "p_best": posterior["p_best"][i],
                "expected_loss": posterior["expected_loss"][i],
                "reference_arm_id": spec.arms[ref].id if ref is not None else "",
                "uplift_low": posterior["uplift_low"][i],
                "uplift_high": posterior["uplift_high"][i],
                "p_uplift": posterior["p_uplift"][i],
                "p_min_uplift": posterior["p_min_uplift"][i],
                "share": s.recent_share,
            }
        )
    days = max(0.0, time.time() - spec.created_ms / 1000.0) / DAY_S
    verdict, reason = decide_verdict(arms, crit, days, cfg.control_arm_id)
    best = max((a for a in arms if a["active"]), key=lambda a: a["p_best"])
    min_obs = min(s.observations for s in active)
    out: dict[str, Any] = {
        "experiment_id": experiment_id,
        "arms": arms,
        "verdict": verdict,
        "reason": reason,
        "stop": verdict != "iterate",
        "best_arm_id": best["arm_id"],
        "control_arm_id": cfg.control_arm_id,
        "criteria": crit,
        "days_running": days,
        "min_observations": min_obs,
    }
    out.update(bandit_vs_control(engine, rt))
    return out


def decide_verdict(
    arms: list[dict[str, Any]], crit: Criteria, days: float, control_arm_id: str
) -> tuple[str, str]:
    """ship / iterate / kill and the reason (see the module doc)."""
    conf = crit.confidence
    uplift = f"{100 * crit.min_uplift:g}%"
    active = [a for a in arms if a["active"]]
    best = max(active, key=lambda a: a["p_best"])
    compared = [best] + [a for a in active if a["arm_id"] == best["reference_arm_id"]]
    if best["arm_id"] == control_arm_id:  # the control leads: it is compared with the runner-up
        compared += sorted((a for a in active if a is not best), key=lambda a: -a["p_best"])[:1]
    min_obs = min(a["observations"] for a in compared)
    if days < crit.min_days or min_obs < crit.min_events_per_arm:
        if days >= crit.max_days:
            return "kill", (
                f"{crit.max_days:g} days passed and the compared arms have only {min_obs} of the "
                f"{crit.min_events_per_arm} observations each the criteria ask for: stop"
            )
        needs = []
        if days < crit.min_days:
            needs.append(f"{crit.min_days - days:.1f} more days (minimum {crit.min_days:g})")
        if min_obs < crit.min_events_per_arm:
            short = min(compared, key=lambda a: a["observations"])
            needs.append(
                f"{crit.min_events_per_arm - min_obs} more observations on arm {short['arm_id']!r} "
                f"(minimum {crit.min_events_per_arm} per arm)"
            )
        return "iterate", "keep running: needs " + " and ".join(needs)
    p_ship = best["p_min_uplift"]
    # Beating the reference is not enough with several challengers: the best must also be the
    # best (P(best) >= confidence), or so close to it that choosing it costs less than a
    # (1 - confidence) share of the minimum uplift in expectation (two equally good
    # challengers never separate; their expected loss shrinks as data come).
    caring = (1.0 - conf) * crit.min_uplift * abs(best["mean"])
    settled = best["p_best"] >= conf or best["expected_loss"] <= caring
    if best["reference_arm_id"] and p_ship >= conf and settled:
        return "ship", (
            f"arm {best['arm_id']!r} beats {best['reference_arm_id']!r} by at least {uplift} with probability "
            f"{p_ship:.3f} >= {conf:g} (uplift {100 * best['uplift_low']:+.1f}% to {100 * best['uplift_high']:+.1f}%, "
            f"P(best) {best['p_best']:.3f}, expected loss {best['expected_loss']:.3g})"
        )
    if best["reference_arm_id"] and p_ship >= conf:
        runner = max((a for a in active if a is not best), key=lambda a: a["p_best"])
        return "iterate", (
            f"arm {best['arm_id']!r} beats {best['reference_arm_id']!r} by at least {uplift} with probability "
            f"{p_ship:.3f}, but it is not yet the clear best: P(best) {best['p_best']:.3f} < {conf:g} "
            f"({runner['arm_id']!r} {runner['p_best']:.3f}), expected loss {best['expected_loss']:.3g} > {caring:.3g}"
        )
    challengers = [a for a in active if a["reference_arm_id"]]
    if challengers and all(a["p_min_uplift"] <= 1.0 - conf for a in challengers):
        if control_arm_id:
            return "kill", (
                f"with probability >= {conf:g} no arm beats the control {control_arm_id!r} by {uplift}: "
                "keep the control"
            )
        return "kill", (
            f"with probability >= {conf:g} no arm beats the others by {uplift}: the arms are practically equal"
        )
    if days >= crit.max_days:
        return "kill", f"{crit.max_days:g} days passed without an arm beating its reference by {uplift}"
    if not best["reference_arm_id"]:
        return "iterate", f"no winner yet: the control {best['arm_id']!r} leads, no arm is ruled out yet"
    return "iterate", (
        f"no winner yet: the leader {best['arm_id']!r} beats {best['reference_arm_id']!r} by "
        f"{uplift} with probability {p_ship:.3f} (needs {conf:g})"
    )


def bandit_vs_control(engine: Engine, rt: Any) -> dict[str, Any]:
    """Mean reward per decision of the random control share and of the policy's decisions,
    and the relative uplift of the policy with a 95% delta-method interval."""
    recs, values = engine.observed(rt, COMPARISON_DECISIONS, COMPARISON_SCAN)
    groups: dict[str, list[float]] = {"control": [], "bandit": []}
    for r, v in zip(recs, values, strict=True):
        if r.source == "control":
            groups["control"].append(v)
        elif r.source in ("", "floor"):
            groups["bandit"].append(v)
    nan = float("nan")
    out: dict[str, Any] = {
        "control_decisions": len(groups["control"]),
        "bandit_decisions": len(groups["bandit"]),
        "control_mean": nan,
        "bandit_mean": nan,
        "bandit_uplift_mean": nan,
        "bandit_uplift_low": nan,
        "bandit_uplift_high": nan,
        "decisions_scanned": len(recs),
    }
    stats = {}
    for name, ys in groups.items():
        if ys:
            m = math.fsum(ys) / len(ys)
            var = math.fsum((y - m) ** 2 for y in ys) / max(1, len(ys) - 1)
            stats[name] = (m, var, len(ys))
            out[f"{name}_mean"] = m
    if len(stats) == 2 and stats["control"][0] != 0:
        (mb, vb, nb), (mc, vc, nc) = stats["bandit"], stats["control"]
        try:
            ratio = mb / mc
            # Delta method for a ratio of independent means, in a form that never squares
            # the control mean (continuous rewards may be tiny or huge).
            se = math.hypot(math.sqrt(vb / nb) / abs(mc), abs(ratio) * math.sqrt(vc / nc) / abs(mc))
        except (ZeroDivisionError, OverflowError):
            ratio, se = nan, nan
        if math.isfinite(ratio) and math.isfinite(se):
            out["bandit_uplift_mean"] = ratio - 1.0
            out["bandit_uplift_low"] = ratio - 1.0 - 1.96 * se
            out["bandit_uplift_high"] = ratio - 1.0 + 1.96 * se
    return out
