"""What a run shows: from the arm chosen at each round to reward, regret and traffic shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from banditd.sim.worlds import World

CURVE_POINTS = 200


@dataclass
class Trace:
    """One run: the arm chosen and reward seen at each round; posterior means per checkpoint."""

    arms: np.ndarray  # int, one per round
    rewards: np.ndarray  # 0/1, one per round
    checkpoints: np.ndarray  # rounds at which `means` were read
    means: np.ndarray  # (len(checkpoints), n_arms)
    final_means: np.ndarray | None = None  # after the last update (default: the last checkpoint's)

    @property
    def last_means(self) -> np.ndarray:
        return self.means[-1] if self.final_means is None else self.final_means


@dataclass
class Summary:
    """A contender over all seeds of a world (means over seeds, and the spread of regret)."""

    name: str
    reward: float
    regret: float
    regret_sd: float
    best_share: float  # share of all traffic on the (current) best arm
    late_best_share: float  # the same over the last 10% of rounds
    final_shares: np.ndarray  # per arm, over the last 10% of rounds
    curve_rounds: np.ndarray
    regret_curve: np.ndarray  # mean cumulative regret at curve_rounds
    share_curve: np.ndarray  # (len(curve_rounds), n_arms): traffic share per window, seed 0
    final_means: np.ndarray  # per arm: posterior mean at the end of a run, mean over seeds
    traces: list[Trace]


def expected_regret(world: World, trace: Trace) -> np.ndarray:
    """Per-round pseudo-regret: best rate minus the chosen arm's rate (no reward noise)."""
    rates = world.rates_at(np.arange(len(trace.arms)))
    return rates.max(axis=1) - rates[np.arange(len(trace.arms)), trace.arms]


def best_arm_mask(world: World, trace: Trace) -> np.ndarray:
    rates = world.rates_at(np.arange(len(trace.arms)))
    return trace.arms == rates.argmax(axis=1)


def window_shares(arms: np.ndarray, n_arms: int, windows: int) -> np.ndarray:
    """Traffic share of each arm within `windows` equal slices of the run."""
    edges = np.linspace(0, len(arms), windows + 1).astype(int)
    out = np.zeros((windows, n_arms))
    for i in range(windows):
        chunk = arms[edges[i] : edges[i + 1]]
        if len(chunk):
            out[i] = np.bincount(chunk, minlength=n_arms) / len(chunk)
    return out


def summarise(world: World, name: str, traces: list[Trace]) -> Summary:
    horizon = len(traces[0].arms)
    late = slice(horizon - max(1, horizon // 10), horizon)
    points = min(CURVE_POINTS, horizon)
    curve_rounds = np.linspace(horizon / points, horizon, points).astype(int)
    regrets, rewards, best, late_best, finals, curves = [], [], [], [], [], []
    for t in traces:
        per_round = expected_regret(world, t)
        cumulative = np.cumsum(per_round)
        regrets.append(float(cumulative[-1]))
        rewards.append(float(t.rewards.sum()))
        mask = best_arm_mask(world, t)
        best.append(float(mask.mean()))
        late_best.append(float(mask[late].mean()))
        finals.append(np.bincount(t.arms[late], minlength=world.n_arms) / len(t.arms[late]))
        curves.append(cumulative[curve_rounds - 1])
    return Summary(
        name=name,
        reward=float(np.mean(rewards)),
        regret=float(np.mean(regrets)),
        regret_sd=float(np.std(regrets)),
        best_share=float(np.mean(best)),
        late_best_share=float(np.mean(late_best)),
        final_shares=np.mean(finals, axis=0),
        curve_rounds=curve_rounds,
        regret_curve=np.mean(curves, axis=0),
        share_curve=window_shares(traces[0].arms, world.n_arms, points),
        final_means=np.mean([t.last_means for t in traces], axis=0),
        traces=traces,
    )
