"""`banditd diagnose`, `banditd model` and `banditd analyse`: the learning-loop report, the
contextual model and the winner analysis with its ship / iterate / kill verdict, of a running
server's experiment, as text (or JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

import orjson

from banditd_client import Analysis, Client, Diagnostics, ModelReport

BAR = "█"


def render(d: Diagnostics) -> str:
    lines = [
        f"experiment {d.experiment_id} · policy {d.policy} · {d.decisions:,} decisions · {d.rewards:,} rewards "
        f"(join rate {d.join_rate:.2f}, last 5 min {d.recent_join_rate:.2f})",
        "",
        f"{'arm':20} {'pulls':>8} {'rewards':>8} {'score':>7} {'95% interval':>17} {'traffic':>8} "
        f"{'drift':>8} {'dominated':>9}",
    ]
    for a in sorted(d.arms, key=lambda a: -a.mean):
        lines.append(
            f"{a.arm[:20]:20} {a.pulls:8,} {a.rewards:8,} {a.mean:7.4f} [{a.low:7.4f}, {a.high:7.4f}] "
            f"{a.recent_share:8.1%} {a.drift_window:+8.4f} {'yes' if a.dominated else '':>9}"
        )
    rise = f"{d.rise_ok}/{d.rise_checks}" if d.rise_checks else "no positive rewards yet"
    lines += [
        "",
        f"rewarded arms whose score rose at the next update: {rise} ({d.rise_share:.0%}); "
        f"zero rewards that did not raise a score: {d.fall_ok}/{d.fall_checks}",
        f"scores outside [0, 1]: {d.scores_out_of_range}",
        f"traffic: top arm {d.top_arm or '-'} at {d.top_share:.1%} (uniform would be {d.uniform_share:.1%}, "
        f"{d.top_share / d.uniform_share if d.uniform_share else 0:.1f}x); entropy {d.traffic_entropy:.2f} "
        f"(1 = uniform); exploration {d.exploration_share:.1%}",
        f"arms clearly worse than the leader: {d.dominated_arms} of {len(d.arms)}",
        f"reward rate {d.reward_rate_per_second:.2f}/s; last reward "
        + (f"{d.seconds_since_last_reward:.0f}s ago" if d.seconds_since_last_reward >= 0 else "never"),
        "",
        "score histogram (posterior means):",
    ]
    peak = max(d.score_histogram) if d.score_histogram else 0
    for i, count in enumerate(d.score_histogram):
        width = int(30 * count / peak) if peak else 0
        lines.append(f"  [{i / 10:.1f}, {(i + 1) / 10:.1f}) {BAR * width} {count}")
    lines.append("")
    lines += [f"ALARM {a.code}: {a.message}" for a in d.alarms] or ["no alarms"]
    return "\n".join(lines)


def render_model(m: ModelReport, top: int = 12) -> str:
    """Feature definition with importances, then each arm's largest coefficients."""
    lines = [
        f"experiment {m.experiment_id} · policy {m.policy} · model version {m.model_version} · "
        f"{len(m.features)} features from {m.contexts_seen:,} contexts · unknown keys {m.unknown_keys:,} · "
        f"mismatched values {m.mismatched_values:,}",
        "",
        f"{'feature':32} {'kind':9} {'coverage':>8} {'mean':>10} {'std':>9} {'importance':>10}",
    ]
    for f in sorted(m.features, key=lambda f: -f.importance):
        lines.append(
            f"{f.name[:32]:32} {f.kind:9} {f.coverage:8.1%} {f.mean:10.4g} {f.std:9.4g} {f.importance:10.4f}"
        )
    for a in m.arms:
        lines += ["", f"arm {a.arm}{'' if a.active else ' (retired)'} · {a.observations:,.0f} observations"]
        for c in sorted(a.coefficients, key=lambda c: -abs(c.value))[:top]:
            lines.append(f"  {c.feature[:32]:32} {c.value:+9.4f} [{c.low:+9.4f}, {c.high:+9.4f}]")
    lines.append("")
    if m.logged_decisions:
        uniform = (
            "no estimate (deterministic decisions: set exploration_floor)"
            if math.isnan(m.uniform_mean)
            else f"{m.uniform_mean:.4f} [{m.uniform_low:.4f}, {m.uniform_high:.4f}]"
        )
        lines.append(
            f"targeted: mean reward {m.targeted_mean:.4f} over {m.logged_decisions:,} logged decisions; "
            f"uniform allocation on the same units: {uniform}"
        )
    if m.refits:
        lines.append(f"logistic refits: {m.refits} (last {m.seconds_since_refit:.0f}s ago)")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:+.1f}%"


def render_analysis(a: Analysis) -> str:
    crit = a.criteria
    lines = [
        f"experiment {a.experiment_id} · {a.days_running:.1f} days · verdict: {a.verdict.upper()}",
        f"  {a.reason}",
        f"  criteria: uplift >= {100 * crit['min_uplift']:g}% with probability >= {crit['confidence']:g}, "
        f"{crit['min_days']:g}-{crit['max_days']:g} days, {crit['min_events_per_arm']:,} observations per compared arm",
        "",
        f"{'arm':20} {'obs':>8} {'mean':>7} {'95% interval':>17} {'P(best)':>8} {'exp. loss':>9} "
        f"{'vs':>10} {'uplift interval':>19} {'P(>=min)':>8}",
    ]
    for x in sorted(a.arms, key=lambda x: -x.p_best):
        ref = x.reference_arm_id or ("control" if x.arm_id == a.control_arm_id else "")
        p_min = "" if math.isnan(x.p_min_uplift) else f"{x.p_min_uplift:.3f}"
        lines.append(
            f"{x.arm_id[:20]:20} {x.observations:8,} {x.mean:7.4f} [{x.low:7.4f}, {x.high:7.4f}] {x.p_best:8.3f} "
            f"{x.expected_loss:9.4f} {ref[:10]:>10} {_pct(x.uplift_low):>9}..{_pct(x.uplift_high):<9} {p_min:>8}"
        )
    if a.control_decisions:
        lines += [
            "",
            f"bandit vs random control: {a.bandit_mean:.4f} over {a.bandit_decisions:,} decisions vs "
            f"{a.control_mean:.4f} over {a.control_decisions:,}: uplift {_pct(a.bandit_uplift_mean)} "
            f"(95% {_pct(a.bandit_uplift_low)} .. {_pct(a.bandit_uplift_high)})",
        ]
    return "\n".join(lines)


def run_analyse(args: argparse.Namespace) -> int:
    with Client(args.target, api_key=args.api_key or None) as c:
        a = c.analyse(args.experiment, draws=args.draws)
    if args.json:
        print(orjson.dumps(dataclasses.asdict(a), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_analysis(a))
    return 0  # whatever the verdict: a scheduled job must not read "iterate" as a failure


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("analyse", aliases=["analyze"], help="winner analysis and ship / iterate / kill (Analyse)")
    p.add_argument("experiment", help="experiment id")
    p.add_argument("--target", default="localhost:50051", help="server address (host:port)")
    p.add_argument("--api-key", default=os.environ.get("BANDITD_API_KEY", ""), help="API key (BANDITD_API_KEY)")
    p.add_argument("--draws", type=int, default=0, help="Monte Carlo draws (default 20,000)")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.set_defaults(func=run_analyse)
    p = sub.add_parser("model", help="a contextual experiment's features and per-arm coefficients (GetModel)")
    p.add_argument("experiment", help="experiment id")
    p.add_argument("--target", default="localhost:50051", help="server address (host:port)")
    p.add_argument("--top", type=int, default=12, help="coefficients shown per arm (largest first)")
    p.set_defaults(func=run_model)
    p = sub.add_parser("diagnose", help="is an experiment learning? (GetDiagnostics of a running server)")
    p.add_argument("experiment", help="experiment id")
    p.add_argument("--target", default="localhost:50051", help="server address (host:port)")
    p.add_argument("--reward-silence-seconds", type=float, default=0.0, help="REWARDS_STOPPED after this long")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Client(args.target) as c:
        print(render(c.diagnostics(args.experiment, reward_silence_seconds=args.reward_silence_seconds)))
    return 0


def run_model(args: argparse.Namespace) -> int:
    with Client(args.target) as c:
        print(render_model(c.get_model(args.experiment), args.top))
    return 0
