"""The simulation worlds: hidden conversion rates, the horizon, and the contenders compared."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SUBJECT_LINE_RATES = {"plain": 0.040, "question": 0.045, "emoji": 0.050, "urgent": 0.035, "personal": 0.075}


@dataclass(frozen=True)
class Contender:
    """One policy configuration, as an experiment would be created on the server."""

    name: str
    policy: str
    params: dict[str, float] = field(default_factory=dict)
    prior: tuple[float, float] | None = None
    use_groups: bool = False
    update_every: int = 1  # decisions between posterior updates (reward delay)
    # Click-only worlds: the outcome mode ("decision" or "explicit", see banditd.outcomes) and
    # the maturation delay min_age, in decisions (the world's clock).
    outcome_mode: str = "decision"
    min_age: float = 0.0


@dataclass(frozen=True)
class Phase:
    start: int
    rates: tuple[float, ...]


@dataclass(frozen=True)
class World:
    name: str
    title: str
    arms: tuple[str, ...]
    phases: tuple[Phase, ...]
    horizon: int
    contenders: tuple[Contender, ...]
    seeds: int = 5
    groups: tuple[str, ...] | None = None
    baseline: str = "uniform"  # contender whose regret the others are divided by
    period: int = 0  # decisions per reporting period (a day in the campaign world)
    show_bound: bool = False  # report regret against the Lai-Robbins bound
    featured: str = "thompson"  # contender whose per-arm scores are plotted
    # > 0: only clicks are reported, after an exponential delay with this mean (in decisions),
    # and non-clicks never are; played in Python by sim.clickonly, in process only.
    click_delay: float = 0.0
    show_means: bool = False  # report final posterior means against the true rates

    @property
    def in_process_only(self) -> bool:
        return self.click_delay > 0

    @property
    def n_arms(self) -> int:
        return len(self.arms)

    def rates_at(self, rounds: np.ndarray) -> np.ndarray:
        """Hidden rates per round, shape (len(rounds), n_arms)."""
        starts = np.array([p.start for p in self.phases])
        table = np.array([p.rates for p in self.phases])
        return table[np.searchsorted(starts, rounds, side="right") - 1]

    def lai_robbins(self, horizon: int | None = None) -> float:
        """Σ_a Δ_a / KL(p_a, p*) · ln T: the asymptotic lower bound on any consistent policy's
        regret (first phase's rates)."""
        rates = self.phases[0].rates
        best = max(rates)
        t = horizon or self.horizon
        return sum((best - p) / bernoulli_kl(p, best) for p in rates if p < best) * math.log(t)


def bernoulli_kl(p: float, q: float) -> float:
    eps = 1e-12
    p, q = min(max(p, eps), 1 - eps), min(max(q, eps), 1 - eps)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def subject_lines(update_every: int = 50) -> World:
    """5 subject lines, 10,000 sends; rewards reach the policy in batches of 50."""
    comps = (
        Contender("uniform", "uniform", update_every=update_every),
        Contender("epsilon-greedy 0.1", "epsilon_greedy", {"epsilon": 0.1}, update_every=update_every),
        Contender("ucb1", "ucb1", update_every=update_every),
        Contender("kl-ucb", "kl_ucb", update_every=update_every),
        Contender("thompson", "thompson", update_every=update_every),
    )
    return World(
        "subject-lines",
        "5 subject lines, hidden conversion rates, 10,000 sends",
        tuple(SUBJECT_LINE_RATES),
        (Phase(0, tuple(SUBJECT_LINE_RATES.values())),),
        10_000,
        comps,
        seeds=20,
    )


def sparse_campaign(days: int = 30, sends_per_day: int = 2_000, seed: int = 2026) -> World:
    """33 treatments in 3 groups (CTR around 3%, spread within and between groups), a few
    thousand sends a day, the posterior updated once a day: the regime where flat Beta(1,1)
    priors never separate the arms."""
    rng = np.random.default_rng(seed)
    group_rates = {"promo": 0.02, "news": 0.03, "personal": 0.045}
    arms, groups, rates = [], [], []
    for g, base in group_rates.items():
        for i in range(11):
            arms.append(f"{g}-{i:02d}")
            groups.append(g)
            rates.append(float(np.clip(base * rng.lognormal(0.0, 0.3), 0.002, 0.2)))
    daily = sends_per_day
    comps = (
        Contender("uniform", "uniform"),
        Contender("flat Beta(1,1)", "thompson", prior=(1.0, 1.0), update_every=daily),
        Contender("informative Beta(3,97)", "thompson", prior=(3.0, 97.0), update_every=daily),
        Contender("group priors", "thompson", prior=(1.0, 1.0), use_groups=True, update_every=daily),
    )
    return World(
        "sparse-campaign",
        f"{len(arms)} treatments in 3 groups, CTR ~3%, {sends_per_day:,} sends/day, daily updates, {days} days",
        tuple(arms),
        (Phase(0, tuple(rates)),),
        days * sends_per_day,
        comps,
        seeds=20,
        groups=tuple(groups),
        period=sends_per_day,
        featured="group priors",
    )


LIMIT_RATES = (0.5,) + (0.4,) * 9


def limit(horizon: int = 1_000_000) -> World:
    """10 arms, best 0.5, the others 0.4: regret against the Lai-Robbins bound."""
    comps = (
        Contender("thompson", "thompson"),
        Contender("kl-ucb", "kl_ucb"),
        Contender("ucb1", "ucb1"),
    )
    return World(
        "limit",
        f"10 arms (0.5 vs 0.4), {horizon:,} rounds: regret against the Lai-Robbins bound",
        tuple(f"arm-{i}" for i in range(10)),
        (Phase(0, LIMIT_RATES),),
        horizon,
        comps,
        seeds=10,
        baseline="thompson",
        show_bound=True,
    )


def delay(horizon: int = 1_000_000) -> World:
    """The limit world with the posterior updated every 1, 10, 100 and 1,000 decisions."""
    comps = tuple(Contender(f"thompson, update every {n:,}", "thompson", update_every=n) for n in (1, 10, 100, 1000))
    return World(
        "delay",
        f"limit world, posterior updated every 1/10/100/1,000 decisions, {horizon:,} rounds",
        tuple(f"arm-{i}" for i in range(10)),
        (Phase(0, LIMIT_RATES),),
        horizon,
        comps,
        seeds=10,
        baseline=comps[0].name,
        show_bound=True,
        featured=comps[-1].name,
    )


def drift(horizon: int = 200_000, half_lives: tuple[float, ...] = (5_000.0, 20_000.0)) -> World:
    """The best arm changes halfway: arm-0 drops from 0.5 to 0.4 and arm-9 rises to 0.5.
    Discounting (half-life in rewards) trades steady exploration for a fast reaction."""
    after = (0.4,) * 9 + (0.5,)
    comps = (
        Contender("uniform", "uniform"),
        Contender("thompson, stationary", "thompson"),
        *(Contender(f"thompson, half-life {h:,.0f}", "thompson", {"half_life": h}) for h in half_lives),
    )
    return World(
        "drift",
        f"limit world whose best arm changes at round {horizon // 2:,} of {horizon:,}",
        tuple(f"arm-{i}" for i in range(10)),
        (Phase(0, LIMIT_RATES), Phase(horizon // 2, after)),
        horizon,
        comps,
        seeds=5,
        featured=comps[-1].name,
    )


CLICK_ONLY_RATES = (0.02, 0.03, 0.04, 0.05, 0.06)


def click_only(
    horizon: int = 30_000, click_delay: float = 300.0, update_every: int = 50, min_age: float = 900.0
) -> World:
    """Clicks are reported after a random delay (exponential, mean `click_delay` decisions) and
    non-clicks never are. `explicit` mode (only reported outcomes are observations) sees only
    1s: its posterior means go to ~1 and traffic follows click counts, not rates; `decision`
    mode counts every decision as a 0 until its click arrives;
    with `min_age` (about the delay's 95th percentile) a decision counts only once it is that
    old, with the clicks it has by then."""
    comps = (
        Contender("uniform", "uniform", update_every=update_every),
        Contender("thompson, explicit", "thompson", update_every=update_every, outcome_mode="explicit"),
        Contender("thompson, decision", "thompson", update_every=update_every, outcome_mode="decision"),
        Contender(
            f"thompson, decision, min_age {min_age:,.0f}",
            "thompson",
            update_every=update_every,
            outcome_mode="decision",
            min_age=min_age,
        ),
    )
    return World(
        "click-only",
        f"5 arms, click rates 2-6%, only clicks reported (delay ~ exp, mean {click_delay:,.0f} decisions), "
        f"posterior updated every {update_every}, {horizon:,} decisions",
        tuple(f"arm-{i}" for i in range(len(CLICK_ONLY_RATES))),
        (Phase(0, CLICK_ONLY_RATES),),
        horizon,
        comps,
        seeds=10,
        featured="thompson, decision",
        click_delay=click_delay,
        show_means=True,
    )


WORLDS: dict[str, Callable[[], World]] = {
    "subject-lines": subject_lines,
    "sparse-campaign": sparse_campaign,
    "limit": limit,
    "delay": delay,
    "drift": drift,
    "click-only": click_only,
}
