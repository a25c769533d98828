"""Off-policy estimators: the value of a candidate policy from logs of another one.

Vocabulary as in Open Bandit Pipeline: a log holds, per round i, a context cell x_i, the
logged action a_i, its logging propensity p_i and the reward r_i; the candidate policy is
an action distribution pi[i, a]. Estimators return a value with a 95% confidence interval:

- IPS: mean of w_i r_i with w_i = pi[i, a_i] / p_i (unbiased; variance grows with w);
- SNIPS: sum(w r) / sum(w) (self-normalised; small bias, often much lower variance);
- DM: mean of sum_a pi[i, a] q(x_i, a) with q a tabular reward model (interval by bootstrap);
- DR: DM plus the IPS-weighted residual r_i - q(x_i, a_i), q cross-fitted on two folds;
- replay (Li et al., 2011): for uniformly logged data, rounds where an action drawn from the
  candidate equals the logged one are kept; their mean reward is the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from banditd.errors import FailedPrecondition, InvalidArgument

Z95 = 1.959963984540054
# Pseudo-counts that pull a sparse (cell, action) mean toward its action's mean, and that
# toward the global mean: keeps q finite for cells with one or no observations.
SHRINK = 1.0


@dataclass(frozen=True)
class Log:
    """A validated log: actions index `arms`, cells index context cells (0 without context)."""

    arms: tuple[str, ...]
    actions: NDArray[np.int64]
    rewards: NDArray[np.float64]
    propensities: NDArray[np.float64]
    cells: NDArray[np.int64]
    n_cells: int

    def __post_init__(self) -> None:
        n = len(self.actions)
        if n == 0:
            raise InvalidArgument("the log has no rows to evaluate")
        if not (len(self.rewards) == len(self.propensities) == len(self.cells) == n):
            raise InvalidArgument("log columns have different lengths")
        p = self.propensities
        bad = ~np.isfinite(p) | (p <= 0) | (p > 1)
        if bad.any():
            first = int(np.argmax(bad))
            raise InvalidArgument(
                f"{int(bad.sum())} rows have a missing, zero or invalid propensity (first at row {first}: "
                f"{p[first]!r}); importance weights need the probability the logged action had"
            )
        if not np.isfinite(self.rewards).all():
            raise InvalidArgument("rewards must be finite numbers")

    @property
    def n(self) -> int:
        return len(self.actions)

    def subset(self, rows: NDArray[np.int64] | NDArray[np.bool_]) -> Log:
        return Log(
            self.arms, self.actions[rows], self.rewards[rows], self.propensities[rows],
            self.cells[rows], self.n_cells,
        )


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    low: float
    high: float
    rounds: int  # rounds the estimate rests on (replay keeps only matching ones)


def _normal(name: str, terms: NDArray[np.float64]) -> Estimate:
    mean = float(terms.mean())
    se = float(terms.std(ddof=1) / np.sqrt(len(terms))) if len(terms) > 1 else float("inf")
    return Estimate(name, mean, mean - Z95 * se, mean + Z95 * se, len(terms))


def weights(log: Log, pi: NDArray[np.float64]) -> NDArray[np.float64]:
    return pi[np.arange(log.n), log.actions] / log.propensities


def on_policy(log: Log) -> Estimate:
    """The logging policy's own mean reward (what the log shows happened)."""
    return _normal("logged", log.rewards)


def ips(log: Log, pi: NDArray[np.float64]) -> Estimate:
    return _normal("IPS", weights(log, pi) * log.rewards)


def snips(log: Log, pi: NDArray[np.float64]) -> Estimate:
    w = weights(log, pi)
    total = w.sum()
    if total <= 0:
        raise FailedPrecondition("the candidate never chooses a logged action: SNIPS is undefined")
    value = float((w * log.rewards).sum() / total)
    # Delta method for a ratio of means.
    se = float(np.sqrt(np.sum((w * (log.rewards - value)) ** 2)) / total)
    return Estimate("SNIPS", value, value - Z95 * se, value + Z95 * se, log.n)


def reward_model(log: Log) -> NDArray[np.float64]:
    """q[cell, action]: shrunk tabular mean reward, (cell, action) -> action -> global."""
    k = len(log.arms)
    glob = float(log.rewards.mean())
    n_a = np.bincount(log.actions, minlength=k)
    s_a = np.bincount(log.actions, weights=log.rewards, minlength=k)
    q_a = (s_a + SHRINK * glob) / (n_a + SHRINK)
    flat = log.cells * k + log.actions
    n_xa = np.bincount(flat, minlength=log.n_cells * k).reshape(log.n_cells, k)
    s_xa = np.bincount(flat, weights=log.rewards, minlength=log.n_cells * k).reshape(log.n_cells, k)
    return (s_xa + SHRINK * q_a) / (n_xa + SHRINK)


def _dm_value(log: Log, pi: NDArray[np.float64], q: NDArray[np.float64]) -> NDArray[np.float64]:
    return (pi * q[log.cells]).sum(axis=1)


def dm(log: Log, pi: NDArray[np.float64], bootstrap: int = 200, seed: int = 0) -> Estimate:
    """Direct method; the interval resamples rounds and refits the model (its error dominates)."""
    value = float(_dm_value(log, pi, reward_model(log)).mean())
    rng = np.random.default_rng(seed)
    draws = np.empty(bootstrap)
    for b in range(bootstrap):
        rows = rng.integers(0, log.n, log.n)
        sample = log.subset(rows)
        draws[b] = _dm_value(sample, pi[rows], reward_model(sample)).mean()
    low, high = np.quantile(draws, [0.025, 0.975])
    return Estimate("DM", value, float(low), float(high), log.n)


def dr(log: Log, pi: NDArray[np.float64], seed: int = 0) -> Estimate:
    """Doubly robust, with the reward model cross-fitted: each half is scored by a model
    fitted on the other half, so a round's own reward never enters its baseline."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, 2, log.n).astype(bool)
    q_rows = np.empty((log.n, len(log.arms)))
    for part in (fold, ~fold):
        if not part.any() or part.all():
            q_rows[:] = reward_model(log)[log.cells]
            break
        q_rows[part] = reward_model(log.subset(~part))[log.cells[part]]
    rows = np.arange(log.n)
    terms = (pi * q_rows).sum(axis=1) + weights(log, pi) * (log.rewards - q_rows[rows, log.actions])
    return _normal("DR", terms)


def is_uniform(log: Log, tolerance: float = 0.01) -> bool:
    """Were all logged actions chosen uniformly at random among the logged arms?"""
    expected = 1.0 / len(np.unique(log.actions))
    return bool(np.all(np.abs(log.propensities - expected) <= tolerance * expected))


def replay(log: Log, pi: NDArray[np.float64], seed: int = 0) -> Estimate:
    if not is_uniform(log):
        raise FailedPrecondition(
            "replay needs uniformly logged data (every propensity 1/K); this log was not uniform: "
            "use IPS, SNIPS or DR"
        )
    rng = np.random.default_rng(seed)
    cum = np.cumsum(pi, axis=1)
    u = rng.random(log.n)[:, None] * cum[:, -1:]
    chosen = np.minimum((u >= cum).sum(axis=1), pi.shape[1] - 1)
    kept = log.rewards[chosen == log.actions]
    if len(kept) == 0:
        raise FailedPrecondition("replay kept no rounds: the candidate never matched a logged action")
    return _normal("replay", kept)


def estimate_all(log: Log, pi: NDArray[np.float64], seed: int = 0) -> list[Estimate]:
    """Every estimator that applies to this log (replay only for uniform logs)."""
    if pi.shape != (log.n, len(log.arms)):
        raise InvalidArgument(f"policy matrix has shape {pi.shape}, expected {(log.n, len(log.arms))}")
    out = [ips(log, pi), snips(log, pi), dm(log, pi, seed=seed), dr(log, pi, seed=seed)]
    if is_uniform(log):
        out.append(replay(log, pi, seed=seed))
    return out
