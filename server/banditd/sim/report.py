"""Tables and PNG plots of a world's summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from banditd.sim.metrics import Summary
from banditd.sim.worlds import World

TOP_SHARES = 3


def table(world: World, summaries: list[Summary], seeds: int) -> str:
    base = next((s for s in summaries if s.name == world.baseline), None)
    horizon = len(summaries[0].traces[0].arms)
    bound = world.lai_robbins(horizon) if world.show_bound else None
    uniform_share = 1.0 / world.n_arms
    head = (
        f"{'policy':32} {'reward':>10} {'regret':>16} {'÷ baseline':>16}"
        + (f" {'÷ Lai-Robbins':>13}" if bound else "")
        + f" {'best share':>10} {'last 10%':>9}  final shares (last 10%)"
    )
    lines = [f"{world.title} · {seeds} seed(s)", head, "-" * len(head)]
    for s in summaries:
        ratio = f"{s.regret / base.regret:16.3f}" if base and base.regret > 0 else f"{'-':>16}"
        top = np.argsort(s.final_shares)[::-1][:TOP_SHARES]
        shares = ", ".join(f"{world.arms[i]} {s.final_shares[i]:.0%}" for i in top)
        lines.append(
            f"{s.name[:32]:32} {s.reward:10.1f} {s.regret:9.1f} ±{s.regret_sd:5.1f} {ratio}"
            + (f" {s.regret / bound:13.3f}" if bound else "")
            + f" {s.best_share:10.1%} {s.late_best_share:9.1%}  {shares}"
        )
    notes = [
        f"baseline: {world.baseline}; uniform share per arm {uniform_share:.1%}; "
        "regret = Σ (best rate − chosen arm's rate), mean ± sd over seeds"
    ]
    if bound:
        notes.append(f"Lai-Robbins bound Σ Δ/KL(p, p*) · ln T at T={horizon:,}: {bound:.1f}")
    if world.click_delay:
        notes += [
            f"only clicks are reported, {world.click_delay:,.0f} decisions late on average; non-clicks never are",
            "explicit: only reported outcomes are observations; decision: every decision is a 0 until its "
            "click arrives (min_age: from that age on, with the clicks it has by then)",
        ]
    blocks = [_means_table(world, summaries)] if world.show_means else []
    return "\n".join(lines + notes + blocks)


def _means_table(world: World, summaries: list[Summary]) -> str:
    """Final posterior mean per arm (mean over seeds) against the hidden rates."""
    rates = world.phases[-1].rates
    head = f"{'final posterior means':32}" + "".join(f" {a:>8}" for a in world.arms)
    rows = [f"{'true rate':32}" + "".join(f" {r:8.3f}" for r in rates)]
    rows += [f"{s.name[:32]:32}" + "".join(f" {m:8.3f}" for m in s.final_means) for s in summaries]
    return "\n".join(["", head, "-" * len(head), *rows])


def plots(world: World, summaries: list[Summary], out_dir: Path) -> list[Path]:
    """Writes cumulative regret, best-arm traffic share over time and per-arm scores over
    time (the featured contender, first seed) as PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summaries:
        ax.plot(s.curve_rounds, s.regret_curve, label=s.name)
    if world.show_bound:
        t = summaries[0].curve_rounds
        ax.plot(t, [world.lai_robbins(int(x)) if x > 1 else 0 for x in t], "k--", label="Lai-Robbins bound")
    _finish(ax, world, "cumulative regret (mean over seeds)", "rounds", "regret")
    written.append(save(fig, out_dir / f"{world.name}-regret.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summaries:
        best = _best_arm_share(world, s)
        ax.plot(s.curve_rounds, best, label=s.name)
    ax.axhline(1.0 / world.n_arms, color="grey", linestyle=":", label="uniform")
    _finish(ax, world, "traffic share of the best arm over time (seed 0)", "rounds", "share")
    written.append(save(fig, out_dir / f"{world.name}-share.png"))

    featured = next((s for s in summaries if s.name == world.featured), summaries[-1])
    trace = featured.traces[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    many = world.n_arms > 10
    for arm in range(world.n_arms):
        ax.plot(trace.checkpoints, trace.means[:, arm], linewidth=0.8 if many else 1.5,
                label=None if many else world.arms[arm])
    _finish(ax, world, f"posterior mean per arm over time: {featured.name} (seed 0)", "rounds", "score")
    written.append(save(fig, out_dir / f"{world.name}-scores.png"))
    return written


def _best_arm_share(world: World, s: Summary) -> np.ndarray:
    """Share of each window's traffic on the arm that was best in that window."""
    best = world.rates_at(s.curve_rounds - 1).argmax(axis=1)
    return s.share_curve[np.arange(len(best)), best]


def _finish(ax, world: World, what: str, xlabel: str, ylabel: str) -> None:  # type: ignore[no-untyped-def]
    style(ax, f"{world.name}: {what}", xlabel, ylabel)


def style(ax, title: str, xlabel: str, ylabel: str) -> None:  # type: ignore[no-untyped-def]
    """Title, labels, legend and grid of one plot (every simulation plot looks alike)."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
