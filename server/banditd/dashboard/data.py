"""What the dashboard shows, read from the engine, the guardian and the store (the rendering
in `render.py` only formats it). The winner analysis of a page is cached for a few seconds:
it is the expensive part (Monte Carlo over every arm), and pages refresh themselves."""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson

from banditd.analysis import analyse
from banditd.errors import BanditdError
from banditd.guardrails import LATENCY_BOUNDS, quantile

if TYPE_CHECKING:
    from banditd.engine import Engine

ANALYSIS_DRAWS = 0  # the analysis' default: fewer for large experiments
ANALYSIS_TTL_S = 5.0
HISTORY_DAYS = 14
PAGE_EVENTS = 200
CSV_EVENTS = 10_000


class DashboardData:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._analyses: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def analysis(self, experiment_id: str) -> dict[str, Any] | None:
        """The cached winner analysis, None when there is none (fewer than 2 active arms)."""
        now = time.monotonic()
        with self._lock:
            hit = self._analyses.get(experiment_id)
        if hit is not None and now - hit[0] < ANALYSIS_TTL_S:
            return hit[1]
        try:
            result: dict[str, Any] | None = analyse(self.engine, experiment_id, ANALYSIS_DRAWS)
        except BanditdError:
            result = None
        with self._lock:
            self._analyses[experiment_id] = (now, result)
        return result

    def index(self, prefix: str = "") -> list[dict[str, Any]]:
        out = []
        for spec in self.engine.list_experiments():
            if not spec.id.startswith(prefix):
                continue
            stats = self.engine.arm_stats(spec.id)
            a = self.analysis(spec.id)
            diag = self.engine.diagnostics(spec.id)
            rails = self.engine.guardian.status(spec.id)
            out.append(
                {
                    "id": spec.id,
                    "policy": spec.policy,
                    "state": spec.state,
                    "arms": len(stats),
                    "active_arms": sum(s.active for s in stats),
                    "decisions": sum(s.pulls for s in stats),
                    "observations": sum(s.observations for s in stats),
                    "verdict": a["verdict"] if a else "",
                    "alarms": len(diag["alarms"]),  # type: ignore[arg-type]
                    "guardrail_breaches": sum(r["status"] == "breached" for r in rails),
                    "best_arm_id": a["best_arm_id"] if a else "",
                }
            )
        return out

    def view(self, experiment_id: str) -> dict[str, Any]:
        engine = self.engine
        spec = engine.get_experiment(experiment_id)  # NOT_FOUND for an unknown id
        cfg = spec.config
        stats = engine.arm_stats(experiment_id)
        a = self.analysis(experiment_id)
        by_arm = {x["arm_id"]: x for x in a["arms"]} if a else {}
        nan = math.nan
        leaderboard = []
        for s in stats:
            x = by_arm.get(s.arm_id, {})
            leaderboard.append(
                {
                    "arm_id": s.arm_id, "active": s.active, "share": s.recent_share, "observations": s.observations,
                    "pulls": s.pulls, "rewards": s.rewards, "reward_sum": s.reward_sum, "mean": s.mean,
                    "low": s.low, "high": s.high, "p_best": x.get("p_best", nan),
                    "expected_loss": x.get("expected_loss", nan),
                    "uplift_low": _num(x.get("uplift_low")), "uplift_high": _num(x.get("uplift_high")),
                }
            )  # fmt: skip
        vs_control = None
        if a and a["control_decisions"]:
            vs_control = {
                "control_decisions": a["control_decisions"], "bandit_decisions": a["bandit_decisions"],
                "control_mean": a["control_mean"], "bandit_mean": a["bandit_mean"],
                "uplift_low": a["bandit_uplift_low"], "uplift_high": a["bandit_uplift_high"],
                "uplift_mean": a["bandit_uplift_mean"],
            }  # fmt: skip
        history = engine.store.history(experiment_id, int((time.time() - HISTORY_DAYS * 86400) * 1000))
        diag = engine.diagnostics(experiment_id)
        calls = engine.guardian.calls.get(experiment_id)
        counts = list(calls.total) if calls else [0] * (len(LATENCY_BOUNDS) + 1)
        return {
            "experiment": {
                "id": spec.id, "policy": spec.policy, "state": spec.state, "reward_type": spec.reward_type,
                "created_ms": spec.created_ms, "version": spec.version, "control_arm_id": cfg.control_arm_id,
                "control_share": cfg.control_share, "burn_in": cfg.burn_in,
                "serving_arm_id": spec.serving_arm if spec.state == "fallback" else "",
            },  # fmt: skip
            "verdict": (
                {"verdict": a["verdict"], "reason": a["reason"], "best_arm_id": a["best_arm_id"], "stop": a["stop"]}
                if a else None
            ),  # fmt: skip
            "leaderboard": leaderboard,
            "bandit_vs_control": vs_control,
            "history": over_time(history),
            "cumulative": cumulative(history),
            "alarms": [{"code": c, "message": m} for c, m in diag["alarms"]],  # type: ignore[attr-defined]
            "guardrails": engine.guardian.status(experiment_id),
            "latency": {
                "bounds": list(LATENCY_BOUNDS), "counts": counts, "p50": quantile(counts, 0.5),
                "p95": quantile(counts, 0.95), "p99": quantile(counts, 0.99),
            },  # fmt: skip
            "events": self.events(experiment_id, PAGE_EVENTS),
            "audit": [
                {"ts_ms": e["ts_unix_ms"], "action": e["action"], "actor": e["actor"],
                 "details": orjson.dumps(e["details"]).decode()}
                for e in engine.store.audit_log(experiment_id, 50)
            ],  # fmt: skip
        }

    def events(self, experiment_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest decisions with their outcome so far (value None: no reward event yet)."""
        store = self.engine.store
        self.engine.get_experiment(experiment_id)
        recs = store.recent_decisions(experiment_id, limit, 50 * limit)
        outs = store.outcomes_many([(r.decision_id, a) for r in recs for a in r.arms])
        rows = []
        for r in recs:
            for arm, p in zip(r.arms, r.propensities, strict=True):
                out = outs.get((r.decision_id, arm))
                rows.append(
                    {
                        "ts_ms": r.ts_ms, "kind": "decision", "decision_id": r.decision_id, "unit_id": r.unit_id,
                        "arm_id": arm, "value": out.value if out is not None else None, "propensity": p,
                        "source": r.source or "policy",
                    }
                )  # fmt: skip
        return rows


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def over_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per snapshot and arm: the share of the decisions made since the previous snapshot
    (the recent share for the first), observations, reward sum, posterior and P(best)."""
    out = []
    prev: dict[str, Any] | None = None
    for snap in history:
        arms = {}
        total = snap["decisions"] - (prev["decisions"] if prev else 0)
        for arm_id, x in snap["arms"].items():
            if prev is not None and total > 0:
                before = prev["arms"].get(arm_id, {}).get("pulls", 0)
                share = (x["pulls"] - before) / total
            else:
                share = x["share"]
            arms[arm_id] = {
                "share": share, "observations": x["observations"], "reward_sum": x["reward_sum"],
                "mean": _nan(x["mean"]), "low": _nan(x["low"]), "high": _nan(x["high"]), "p_best": _nan(x["p_best"]),
            }  # fmt: skip
        out.append({"t": snap["t"], "arms": arms})
        prev = snap
    return out


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def cumulative(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cumulative reward, what uniform allocation would have earned (the observations of each
    interval at the mean of the active arms' posterior means), and the estimated regret
    (the same observations at the best posterior mean, minus the reward)."""
    out = []
    uniform = best = 0.0
    prev: dict[str, Any] | None = None
    for snap in history:
        means = [x["mean"] for x in snap["arms"].values() if x.get("active", True) and x["mean"] is not None]
        if prev is not None and means:
            d_obs = snap["observations"] - prev["observations"]
            uniform += d_obs * math.fsum(means) / len(means)
            best += d_obs * max(means)
        elif prev is None:
            uniform = best = snap["reward_sum"]
        out.append({"t": snap["t"], "reward": snap["reward_sum"], "uniform": uniform,
                    "regret": max(0.0, best - snap["reward_sum"])})  # fmt: skip
        prev = snap
    return out
