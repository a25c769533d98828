"""The contextual world: the best arm depends on who is asking.

Every round brings a user: a segment (a, b or c), an age, an activity level, and two numbers
and a device that change nothing. Each segment has its own best arm (a: arm-0, b: arm-2,
c: arm-4); age and activity move every arm's rate a little, differently per arm. Two
variants: `linear` (the rate is linear in the features, clipped to [0.01, 0.99]: ridge
models are well specified) and `logistic` (the rate is the sigmoid of a linear function).

A context-free policy can at best find the arm that is best on average (arm-0, segment a's
best): it keeps losing on segments b and c. The contenders, played in process against the
Rust core (`banditd._core.Linear` for the contextual ones, `Bandit` for Thompson):

- uniform;
- thompson: context-free Beta-Bernoulli Thompson sampling, updated after every round;
- lin_ucb, lin_ts: per-arm Bayesian ridge regression, UCB or Thompson;
- logistic: per-arm logistic regression with Thompson sampling, updated online and refit
  every `refit_every` rounds on each arm's last `refit_window` observations.

Contextual models learn their encoder from the first `warmup` contexts (as the server does:
numbers standardised, frequent strings one-hot) and decide uniformly until then; those first
uniform decisions are then fed to the model, so no observation is wasted. Rewards reach every
contender immediately. Contexts, rates and each round's luck are drawn once per seed and
shared by all contenders (common random numbers: their regrets differ by policy, not luck).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from banditd import _core, features
from banditd.sim import report
from banditd.sim.metrics import CURVE_POINTS

Context = dict[str, str | float]
Numeric = list[tuple[str, float, float]]
Categorical = list[tuple[str, list[str]]]

SEGMENTS = ("a", "b", "c")
SEGMENT_SHARES = (0.5, 0.3, 0.2)
BEST_ARM = (0, 2, 4)  # per segment
# Rate per (segment, arm) for an average user. Averaged over segments arm-0 is best (0.20
# against 0.18 for the others), so context-free Thompson settles on it.
BASE_RATES = (
    (0.30, 0.20, 0.12, 0.16, 0.14),
    (0.12, 0.18, 0.28, 0.20, 0.16),
    (0.08, 0.14, 0.18, 0.22, 0.30),
)
# Change of each arm's rate per standard deviation of age and of activity: small next to the
# gaps between arms within a segment, so a segment's best arm stays the best for ~98% of its
# users, yet large enough that a model using them earns more than one per segment.
AGE_SLOPES = (0.02, -0.015, 0.0, 0.015, -0.02)
ACTIVITY_SLOPES = (-0.01, 0.015, 0.02, -0.015, 0.01)
# The logistic variant uses the same shape on the logit scale: dp/dlogit is ~0.16 at p = 0.2.
LOGIT_SLOPE_SCALE = 6.0
AGE_MEAN, AGE_SD = 40.0, 12.0
ACTIVITY_SHAPE, ACTIVITY_SCALE = 2.0, 3.0  # Gamma: mean 6, sd 4.24 sessions a week
DEVICES = ("ios", "android", "web")
DEVICE_SHARES = (0.45, 0.40, 0.15)
RATE_CLIP = (0.01, 0.99)

CONTENDERS = ("uniform", "thompson", "lin_ucb", "lin_ts", "logistic")
# Server policy names -> (model, policy) of `banditd._core.Linear`; `logistic` is logistic_ts.
LINEAR_POLICIES: dict[str, tuple[str, str]] = {
    "lin_ucb": ("ridge", "ucb"),
    "lin_ts": ("ridge", "thompson"),
    "logistic_ucb": ("logistic", "ucb"),
    "logistic_ts": ("logistic", "thompson"),
    "logistic": ("logistic", "thompson"),
}
ENCODER_CONTEXTS = 200
MAX_LEVELS = 25
MIN_LEVEL_SHARE = 0.01
SHARE_WINDOWS = 50  # windows of the per-segment share plot (fewer: segment c is 20% of each)


# The encoder: which context fields become features, and how.


def learn_encoder(contexts: Sequence[Mapping[str, object]]) -> tuple[Numeric, Categorical]:
    """The feature definition for `Linear.set_encoder`, learnt from a sample of contexts by the
    server's own rule (`banditd.features.learn`), so simulations encode as the server does."""
    fd = features.learn(contexts, 1, 0)  # type: ignore[arg-type]
    return features.core_args(fd)


def _is_number(value: object) -> bool:
    # JSON true/false arrive as bool, a subclass of int: they are categories, not magnitudes.
    return isinstance(value, int | float) and not isinstance(value, bool)


def linear_model(policy: str, n_arms: int, *, binary: bool = True, seed: int | None = None) -> _core.Linear:
    """A `Linear` configured as the server's `policy` (lin_ucb, lin_ts, logistic_ucb, ...)."""
    model, rule = LINEAR_POLICIES[policy]
    m = _core.Linear(model, rule, binary=binary, seed=seed)
    m.add_arms(n_arms)
    return m


# The world.


@dataclass(frozen=True)
class ContextualWorld:
    name: str
    link: str  # "linear" or "logistic": how the features make the rate
    horizon: int = 100_000
    seeds: int = 3
    contenders: tuple[str, ...] = CONTENDERS
    warmup: int = ENCODER_CONTEXTS  # uniform decisions while the encoder's sample is gathered
    refit_every: int = 2_000  # logistic: rounds between refits
    refit_window: int = 20_000  # logistic: each arm's most recent observations a refit uses
    baseline: str = "thompson"  # contender whose regret the others are divided by

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(f"arm-{i}" for i in range(self.n_arms))

    @property
    def n_arms(self) -> int:
        return len(BASE_RATES[0])

    @property
    def title(self) -> str:
        best = "/".join(self.arms[b] for b in BEST_ARM)
        shape = "linear in the features" if self.link == "linear" else "sigmoid of a linear function"
        return f"{self.n_arms} arms, 3 segments (a/b/c best: {best}), rate {shape}, {self.horizon:,} rounds"

    def rates(self, segments: np.ndarray, z_age: np.ndarray, z_activity: np.ndarray) -> np.ndarray:
        """Hidden rates, shape (rounds, arms), from segment indices and standardised features."""
        base = np.asarray(BASE_RATES)[segments]
        slope = np.outer(z_age, AGE_SLOPES) + np.outer(z_activity, ACTIVITY_SLOPES)
        if self.link == "linear":
            return np.clip(base + slope, *RATE_CLIP)
        logit = np.log(base / (1 - base)) + LOGIT_SLOPE_SCALE * slope
        return np.clip(1 / (1 + np.exp(-logit)), *RATE_CLIP)


def contextual(horizon: int = 100_000) -> ContextualWorld:
    return ContextualWorld("contextual", "linear", horizon)


def contextual_logistic(horizon: int = 100_000) -> ContextualWorld:
    return ContextualWorld("contextual-logistic", "logistic", horizon)


WORLDS: dict[str, Callable[[], ContextualWorld]] = {
    "contextual": contextual,
    "contextual-logistic": contextual_logistic,
}


@dataclass
class Rounds:
    """One seed of the world, drawn up front and shared by every contender."""

    contexts: list[Context]
    segments: np.ndarray  # index into SEGMENTS, per round
    rates: np.ndarray  # (rounds, arms)
    wins: np.ndarray  # (rounds, arms) bool: the reward each arm would earn this round
    wins_rows: list[list[bool]] = field(default_factory=list)  # the same as lists (fast to index)

    @property
    def n(self) -> int:
        return len(self.contexts)


def draw(world: ContextualWorld, seed: int, horizon: int | None = None) -> Rounds:
    """Contexts, rates and luck of `horizon` rounds; the same for a given seed."""
    n = horizon or world.horizon
    rng = np.random.default_rng(10_000 + seed)
    segments = rng.choice(len(SEGMENTS), size=n, p=SEGMENT_SHARES)
    age = np.clip(np.round(rng.normal(AGE_MEAN, AGE_SD, n)), 18, 80)
    activity = np.round(rng.gamma(ACTIVITY_SHAPE, ACTIVITY_SCALE, n), 1)
    tenure = np.round(rng.uniform(0, 1000, n))  # days: irrelevant
    noise = np.round(rng.normal(0, 1, n), 3)  # irrelevant
    device = rng.choice(len(DEVICES), size=n, p=DEVICE_SHARES)  # irrelevant
    activity_sd = math.sqrt(ACTIVITY_SHAPE) * ACTIVITY_SCALE
    rates = world.rates(
        segments, (age - AGE_MEAN) / AGE_SD, (activity - ACTIVITY_SHAPE * ACTIVITY_SCALE) / activity_sd
    )
    # One uniform per round decides every arm's reward: arm a wins if luck < its rate.
    wins = rng.random(n)[:, None] < rates
    seg_names = np.array(SEGMENTS)[segments].tolist()
    dev_names = np.array(DEVICES)[device].tolist()
    contexts: list[Context] = [
        {"segment": s, "device": d, "age": a, "activity": act, "tenure": t, "noise": z}
        for s, d, a, act, t, z in zip(
            seg_names, dev_names, age.tolist(), activity.tolist(), tenure.tolist(), noise.tolist(), strict=True
        )
    ]
    return Rounds(contexts, segments, rates, wins, wins.tolist())


# Players: each returns the arm chosen at every round.


def play(world: ContextualWorld, contender: str, rounds: Rounds, seed: int) -> np.ndarray:
    if contender == "uniform":
        return np.random.default_rng(20_000 + seed).integers(world.n_arms, size=rounds.n)
    if contender == "thompson":
        return _play_thompson(world, rounds, seed)
    if contender in LINEAR_POLICIES:
        return _play_linear(world, contender, rounds, seed)
    raise ValueError(f"unknown contender {contender!r}; expected uniform, thompson or {', '.join(LINEAR_POLICIES)}")


def _play_thompson(world: ContextualWorld, rounds: Rounds, seed: int) -> np.ndarray:
    bandit = _core.Bandit("binary", "thompson", seed=seed)
    bandit.add_arms([1.0] * world.n_arms, [1.0] * world.n_arms)
    choose, apply, wins = bandit.choose, bandit.apply_rewards, rounds.wins_rows
    arms: list[int] = []
    for t in range(rounds.n):
        a = choose(1)[0][0]
        arms.append(a)
        apply([a], [1.0 if wins[t][a] else 0.0])
    return np.array(arms, dtype=np.int64)


def _play_linear(world: ContextualWorld, name: str, rounds: Rounds, seed: int) -> np.ndarray:
    m = linear_model(name, world.n_arms, seed=seed)
    contexts, wins = rounds.contexts, rounds.wins_rows
    warm = min(world.warmup, rounds.n)
    arms: list[int] = np.random.default_rng(20_000 + seed).integers(world.n_arms, size=warm).tolist()
    m.set_encoder(*learn_encoder(contexts[:warm]))
    # Per-arm history (encoded x, y) for the logistic refits; trimmed to the window.
    refit = LINEAR_POLICIES[name][0] == "logistic"
    hist_x: list[list[bytes]] = [[] for _ in range(world.n_arms)]
    hist_y: list[list[float]] = [[] for _ in range(world.n_arms)]
    if warm:
        xs = [m.encode(c) for c in contexts[:warm]]
        ys = [1.0 if wins[t][a] else 0.0 for t, a in enumerate(arms)]
        m.update(arms, b"".join(xs), [1.0] * warm, ys, ys)  # binary: y*y == y
        if refit:
            for a, x, y in zip(arms, xs, ys, strict=True):
                hist_x[a].append(x)
                hist_y[a].append(y)
    choose, update = m.choose, m.update
    one = (1.0,)
    window, every = world.refit_window, world.refit_every
    for t in range(warm, rounds.n):
        chosen, _, _, x = choose(contexts[t], 1)
        a = chosen[0]
        arms.append(a)
        y = 1.0 if wins[t][a] else 0.0
        update(chosen, x, one, (y,), (y,))  # a new observation: w = 1, wy = y, wyy = y*y = y
        if refit:
            hist_x[a].append(x)
            hist_y[a].append(y)
            if (t + 1 - warm) % every == 0:
                _refit(m, hist_x, hist_y, window)
    return np.array(arms, dtype=np.int64)


def _refit(m: _core.Linear, hist_x: list[list[bytes]], hist_y: list[list[float]], window: int) -> None:
    for arm in range(len(hist_x)):
        if len(hist_x[arm]) > window:
            del hist_x[arm][:-window], hist_y[arm][:-window]
        if hist_y[arm]:
            n = len(hist_y[arm])
            m.refit_logistic(arm, b"".join(hist_x[arm]), hist_y[arm], [1.0] * n)


# Summaries.


@dataclass
class ContextualSummary:
    """A contender over all seeds (means over seeds, and the spread of regret)."""

    name: str
    reward: float
    regret: float  # cumulative expected regret at the horizon
    regret_sd: float
    segment_best_share: np.ndarray  # per segment: share of its last-10% traffic on its best arm
    context_best_share: float  # last 10%: share on the best arm for the round's own context
    curve_rounds: np.ndarray
    regret_curve: np.ndarray  # mean cumulative regret at curve_rounds
    segment_share_curve: np.ndarray  # (SHARE_WINDOWS, segments): seed 0, per window
    seconds: float  # mean time per run
    arms: list[np.ndarray]  # per seed: the arm chosen at each round


@dataclass
class _Run:
    rounds: Rounds
    arms: np.ndarray
    seconds: float


def simulate(world: ContextualWorld, seeds: int, contenders: Sequence[str] | None = None) -> list[ContextualSummary]:
    """Every contender over `seeds` runs; a seed's rounds are drawn once for all of them."""
    names = list(contenders or world.contenders)
    runs: dict[str, list[_Run]] = {name: [] for name in names}
    for seed in range(seeds):
        rounds = draw(world, seed)
        for name in names:
            started = time.perf_counter()
            arms = play(world, name, rounds, seed)
            runs[name].append(_Run(rounds, arms, time.perf_counter() - started))
    return [summarise(name, runs[name]) for name in names]


def summarise(name: str, runs: list[_Run]) -> ContextualSummary:
    horizon = runs[0].rounds.n
    late = slice(horizon - max(1, horizon // 10), horizon)
    points = min(CURVE_POINTS, horizon)
    curve_rounds = np.linspace(horizon / points, horizon, points).astype(int)
    regrets, rewards, curves, seg_shares, ctx_shares = [], [], [], [], []
    for run in runs:
        r, arms, rows = run.rounds, run.arms, np.arange(horizon)
        cumulative = np.cumsum(r.rates.max(axis=1) - r.rates[rows, arms])
        regrets.append(float(cumulative[-1]))
        rewards.append(float(r.wins[rows, arms].sum()))
        curves.append(cumulative[curve_rounds - 1])
        seg_shares.append(segment_best_shares(r.segments[late], arms[late]))
        ctx_shares.append(float(np.mean(arms[late] == r.rates[late].argmax(axis=1))))
    first = runs[0]
    edges = np.linspace(0, horizon, min(SHARE_WINDOWS, horizon) + 1).astype(int)
    share_curve = np.array([
        segment_best_shares(first.rounds.segments[lo:hi], first.arms[lo:hi])
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ])
    return ContextualSummary(
        name=name,
        reward=float(np.mean(rewards)),
        regret=float(np.mean(regrets)),
        regret_sd=float(np.std(regrets)),
        segment_best_share=np.mean(seg_shares, axis=0),
        context_best_share=float(np.mean(ctx_shares)),
        curve_rounds=curve_rounds,
        regret_curve=np.mean(curves, axis=0),
        segment_share_curve=share_curve,
        seconds=float(np.mean([run.seconds for run in runs])),
        arms=[run.arms for run in runs],
    )


def segment_best_shares(segments: np.ndarray, arms: np.ndarray) -> np.ndarray:
    """Per segment, the share of its rounds that went to its best arm (nan if none)."""
    out = np.full(len(SEGMENTS), np.nan)
    for s, best in enumerate(BEST_ARM):
        mine = segments == s
        if mine.any():
            out[s] = float(np.mean(arms[mine] == best))
    return out


def table(world: ContextualWorld, summaries: list[ContextualSummary], seeds: int) -> str:
    base = next((s for s in summaries if s.name == world.baseline), None)
    seg_heads = "".join(f" {f'{seg}: {world.arms[b]}':>10}" for seg, b in zip(SEGMENTS, BEST_ARM, strict=True))
    head = (
        f"{'policy':12} {'reward':>10} {'expected regret':>17} {f'÷ {world.baseline}':>11}"
        f"{seg_heads} {'ctx best':>9} {'s/run':>6}"
    )
    horizon = summaries[0].curve_rounds[-1]
    lines = [f"{world.name}: {world.title} · {seeds} seed(s)", head, "-" * len(head)]
    for s in summaries:
        ratio = f"{s.regret / base.regret:11.3f}" if base and base.regret > 0 else f"{'-':>11}"
        shares = "".join(f" {v:10.1%}" for v in s.segment_best_share)
        lines.append(
            f"{s.name[:12]:12} {s.reward:10.1f} {s.regret:9.1f} ±{s.regret_sd:6.1f} {ratio}{shares}"
            f" {s.context_best_share:9.1%} {s.seconds:6.1f}"
        )
    lines += [
        "expected regret = Σ (best rate for the round's context − chosen arm's rate), mean ± sd over seeds; "
        f"÷ {world.baseline}: context-free Thompson's regret",
        "a/b/c: share of each segment's traffic on its best arm over the last 10% of rounds; ctx best: share on "
        "the best arm for the round's own context (last 10%)",
        f"lin_*/logistic: encoder learnt from the first {world.warmup} contexts (uniform decisions until then); "
        f"logistic = logistic_ts refit every {world.refit_every:,} rounds on each arm's last "
        f"{world.refit_window:,} observations; horizon {horizon:,}",
    ]
    return "\n".join(lines)


def plots(world: ContextualWorld, summaries: list[ContextualSummary], out_dir: Path) -> list[Path]:
    """Writes cumulative regret over rounds and, per segment, the share of its best arm over
    time (seed 0) as PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summaries:
        ax.plot(s.curve_rounds, s.regret_curve, label=s.name)
    report.style(ax, f"{world.name}: cumulative expected regret (mean over seeds)", "rounds", "regret")
    written.append(report.save(fig, out_dir / f"{world.name}-regret.png"))

    fig, axes = plt.subplots(1, len(SEGMENTS), figsize=(13, 4.5), sharey=True)
    horizon = summaries[0].curve_rounds[-1]
    for i, (ax, seg) in enumerate(zip(axes, SEGMENTS, strict=True)):
        for s in summaries:
            windows = len(s.segment_share_curve)
            ends = np.linspace(horizon / windows, horizon, windows)
            ax.plot(ends, s.segment_share_curve[:, i], label=s.name)
        ax.axhline(1.0 / world.n_arms, color="grey", linestyle=":")
        report.style(ax, f"segment {seg}: share on {world.arms[BEST_ARM[i]]} (seed 0)", "rounds", "share")
    written.append(report.save(fig, out_dir / f"{world.name}-segments.png"))
    return written
