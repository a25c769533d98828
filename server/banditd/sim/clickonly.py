"""The click-only world's player: clicks are reported after a random delay, non-clicks never.

The core's `Bandit.simulate` sees every outcome at once, so this world is played in Python
against the same core (`choose`, `set_stats_many`). Each arm's sufficient statistics are kept
here and changed only by the `Delta`s of `banditd.outcomes` (`on_maturity`, `on_event`): the
rules the server's write path applies, in the contender's outcome mode.

The clock counts decisions: decision t is made at time t, its click (if any) arrives at
t + delay, it matures at t + min_age (min_age is the rule's `min_age_s`, one decision per
second). After each batch of `update_every` decisions, the events of that stretch of time
(maturities and click arrivals) are applied and the touched arms' statistics set in the core,
as a group commit would. Every click or maturity falls in one of four cases; the rule gives
the delta of each case once, and the player counts, per arm, how many decisions are in it.
"""

from __future__ import annotations

import numpy as np

from banditd import _core
from banditd.outcomes import Delta, OutcomeRule, combine, on_event, on_maturity
from banditd.sim.metrics import Trace
from banditd.sim.worlds import Contender, World

CHECKPOINTS = 200
CLICK = 1.0
PROPENSITY_DRAWS = 50


def rule_for(contender: Contender) -> OutcomeRule:
    return OutcomeRule.for_experiment(binary=True, mode=contender.outcome_mode, min_age_s=contender.min_age)


def run(world: World, contender: Contender, seed: int, horizon: int | None = None) -> Trace:
    """One run; `seed` fixes the policy's randomness and the world's luck (clicks and their
    delays are drawn per decision, the same for every contender)."""
    horizon = horizon or world.horizon
    if len(world.phases) != 1:
        raise ValueError("the click-only player takes a world with one phase")
    rates = np.asarray(world.phases[0].rates, dtype=np.float64)
    n_arms = len(rates)
    rule = rule_for(contender)
    min_age = rule.min_age_s
    aggregate = combine(rule.aggregation, None, CLICK)  # a decision's aggregate after its click
    cases = {
        "mature, no click yet": on_maturity(rule, None),
        "mature, clicked": on_maturity(rule, aggregate),
        "click, matured": on_event(rule, True, None, aggregate),
        "click, not matured": on_event(rule, False, None, aggregate),  # kept for its maturity
    }

    bandit = _core.Bandit("binary", contender.policy, seed=seed)
    bandit.add_arms([1.0] * n_arms, [1.0] * n_arms)
    stats = np.zeros((n_arms, 3))  # n, sum, sumsq per arm

    world_rng = np.random.default_rng(10_000 + seed)
    luck = world_rng.random(horizon)
    delays = world_rng.exponential(world.click_delay, horizon)
    arrivals = np.arange(horizon) + delays
    by_arrival = np.argsort(arrivals, kind="stable")
    sorted_arrivals = arrivals[by_arrival]

    arms = np.zeros(horizon, dtype=np.int64)
    clicked = np.zeros(horizon, dtype=bool)
    checkpoints = np.linspace(0, horizon - 1, min(CHECKPOINTS, horizon)).astype(int)
    means: list[list[float]] = []
    next_checkpoint = 0
    choose = bandit.choose
    batch = max(1, contender.update_every)
    for lo in range(0, horizon, batch):
        hi = min(lo + batch, horizon)
        # The posterior holds still within a batch: its means at lo are those of every round.
        while next_checkpoint < len(checkpoints) and checkpoints[next_checkpoint] < hi:
            means.append(bandit.means())
            next_checkpoint += 1
        arms[lo:hi] = [choose(1)[0][0] for _ in range(hi - lo)]
        clicked[lo:hi] = luck[lo:hi] < rates[arms[lo:hi]]

        # Events at times [lo, hi): decisions maturing, then clicks arriving.
        touched = np.zeros(n_arms, dtype=bool)
        first, last = max(0, int(np.ceil(lo - min_age))), max(0, int(np.ceil(hi - min_age)))
        maturing = np.arange(first, last)
        early = clicked[maturing] & (delays[maturing] < min_age)  # its click came first
        touched |= _apply(stats, arms[maturing[~early]], cases["mature, no click yet"], n_arms)
        touched |= _apply(stats, arms[maturing[early]], cases["mature, clicked"], n_arms)
        i0, i1 = np.searchsorted(sorted_arrivals, (lo, hi), side="left")
        arriving = by_arrival[i0:i1]
        arriving = arriving[clicked[arriving]]
        matured = delays[arriving] >= min_age
        touched |= _apply(stats, arms[arriving[matured]], cases["click, matured"], n_arms)
        touched |= _apply(stats, arms[arriving[~matured]], cases["click, not matured"], n_arms)

        if touched.any():
            idx = np.flatnonzero(touched)
            bandit.set_stats_many(idx.tolist(), stats[idx, 0].tolist(), stats[idx, 1].tolist(), stats[idx, 2].tolist())
            # No propensity is read here: a cheap estimate now spares the next choose a
            # full-size Monte Carlo one after every update (for speed only).
            bandit.refresh_propensities(1, PROPENSITY_DRAWS)
    return Trace(
        arms=arms,
        rewards=clicked.astype(np.uint8),
        checkpoints=checkpoints,
        means=np.asarray(means).reshape(len(checkpoints), n_arms),
        final_means=np.asarray(bandit.means()),
    )


def _apply(stats: np.ndarray, arms: np.ndarray, delta: Delta, n_arms: int) -> np.ndarray:
    """Adds `delta` once per decision in `arms` to its arm; returns the arms it changed."""
    if delta.empty or not len(arms):
        return np.zeros(n_arms, dtype=bool)
    counts = np.bincount(arms, minlength=n_arms).astype(np.float64)
    stats += counts[:, None] * np.array([delta.n, delta.sum, delta.sumsq])
    return counts > 0
