"""Decision-core benchmark (`make bench`): banditd._core from Python, as the server calls it.

Prints medians over many runs, each as a ratio against numpy measured in the same run:
Thompson top-1 (full vector draw, scalar fallback, pruned draw), top-10, UCB1, KL-UCB and
applying a batch of 10,000 rewards, for 10 / 1,000 / 10,000 / 100,000 arms in three worlds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

# Single-threaded measurements: idle OpenBLAS threads spinning would steal a core here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from banditd import _core  # noqa: E402

ARMS = (10, 1_000, 10_000, 100_000)
WORLDS = ("spread", "ctr3", "equal")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def world(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Beta posterior shapes (a, b) per arm."""
    if name == "spread":
        return rng.uniform(1, 500, n), rng.uniform(1, 5000, n)
    if name == "ctr3":
        pulls = rng.integers(100, 10_001, n).astype(float)
        rates = np.clip(rng.normal(0.03, 0.008, n), 0.002, 0.2)
        clicks = rng.binomial(pulls.astype(int), rates).astype(float)
        return 1 + clicks, 1 + pulls - clicks
    # near-equal: every arm at ~3% with 1,000 pulls and almost the same count of clicks
    return 31 + rng.uniform(0, 1, n), 971 + rng.uniform(0, 1, n)


def medians_us(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    """Median time of one call of each function, measured interleaved: one sample of each in
    turn, round after round, so that a slow minute of this shared machine slows every row
    alike and the ratios hold. Each sample times a batch of calls lasting ~2 ms (up to 1,000 calls), so the
    timer and loop overhead (~0.1 µs) do not count as the measured call's time."""
    batches: dict[str, range] = {}
    for name, fn in fns.items():
        fn()  # warm up
        t = time.perf_counter()
        fn()
        once = time.perf_counter() - t
        batches[name] = range(max(1, min(1000, int(2e-3 / max(once, 1e-9)))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s * len(fns)
    rounds = 0
    while rounds < 7 or (rounds < 50_000 and time.perf_counter() < deadline):
        for name, fn in fns.items():
            calls = batches[name]
            t = time.perf_counter()
            for _ in calls:
                fn()
            times[name].append((time.perf_counter() - t) / len(calls))
        rounds += 1
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def bandit(a: np.ndarray, b: np.ndarray, **kw: object) -> _core.Bandit:
    bd = _core.Bandit("binary", kw.pop("policy", "thompson"), seed=1, **kw)  # type: ignore[arg-type]
    # Priors carry the posterior shapes directly (no rewards needed to set a state).
    bd.add_arms(a.tolist(), b.tolist())
    return bd


Row = tuple[str, float, float, str]


def thompson_rows(n: int, wname: str, budget: float, rng: np.random.Generator) -> list[Row]:
    a, b = world(wname, n, rng)
    nrng = np.random.default_rng(2)
    full = bandit(a, b, thompson_path="full")
    top10 = min(10, n)
    fns: dict[str, Callable[[], object]] = {
        "numpy beta().argmax()": lambda: int(nrng.beta(a, b).argmax()),
        "thompson full " + full.isa: partial(full.choose, 1),
    }
    if n <= 10_000:
        scalar = bandit(a, b, thompson_path="full", isa="scalar")
        fns["thompson full scalar"] = partial(scalar.choose, 1)
    pruned = bandit(a, b, thompson_path="pruned")
    t0 = time.perf_counter()
    pruned.maintain()
    build_ms = (time.perf_counter() - t0) * 1e3
    drawn: list[int] = []

    def pruned_choose() -> None:
        pruned.choose(1)
        drawn.append(pruned.last_drawn)

    fns["thompson pruned"] = pruned_choose
    fns[f"thompson full top-{top10}"] = partial(full.choose, top10)
    us = medians_us(fns, budget)
    ref, t1, t10 = us["numpy beta().argmax()"], us["thompson full " + full.isa], us[f"thompson full top-{top10}"]
    notes = {
        "thompson pruned": f"drew {int(statistics.median(drawn))} of {n} arms; ordering {build_ms:.1f} ms",
        f"thompson full top-{top10}": f"top-{top10}/top-1 = {t10 / t1:.2f}x",
    }
    return [(name, t, ref / t, notes.get(name, "")) for name, t in us.items()]


def ucb_rows(n: int, budget: float, rng: np.random.Generator) -> list[Row]:
    a, b = world("ctr3", n, rng)
    pulls = a + b - 2
    means = a / (a + b)
    t = float(pulls.sum())
    ucb = bandit(np.ones(n), np.ones(n), policy="ucb1")
    ucb.set_stats_many(list(range(n)), pulls.tolist(), (a - 1).tolist(), (a - 1).tolist())
    kl = bandit(np.ones(n), np.ones(n), policy="kl_ucb")
    kl.set_stats_many(list(range(n)), pulls.tolist(), (a - 1).tolist(), (a - 1).tolist())
    arm0, zero = [0], [0.0]
    us = medians_us(
        {
            "numpy UCB1 index + argmax": lambda: int((means + np.sqrt(2 * np.log(t) / pulls)).argmax()),
            "ucb1 (state unchanged: memoised)": partial(ucb.choose, 1),
            "one reward": lambda: ucb.apply_rewards(arm0, zero),
            "one reward + choose": lambda: (ucb.apply_rewards(arm0, zero), ucb.choose(1)),
            "kl_ucb (cached indices)": partial(kl.choose, 1),
        },
        budget,
    )
    ref = us["numpy UCB1 index + argmax"]
    after = us["one reward + choose"] - us["one reward"]
    rows = [
        ("numpy UCB1 index + argmax", ref, 1.0, ""),
        ("ucb1 (state unchanged: memoised)", us["ucb1 (state unchanged: memoised)"], 0.0, ""),
        ("ucb1 (after a reward: recomputed)", after, 0.0, "apply time subtracted"),
        ("kl_ucb (cached indices)", us["kl_ucb (cached indices)"], 0.0, ""),
    ]
    return [(name, t, ref / t, note) for name, t, _, note in rows]


def apply_rows(n: int, budget: float, rng: np.random.Generator) -> list[Row]:
    arms = rng.integers(0, n, 10_000)
    values = (rng.random(10_000) < 0.03).astype(float)
    arm_list, value_list = arms.tolist(), values.tolist()
    arm_buf, value_buf = arms.astype(np.int64), values.astype(np.float64)
    bd = bandit(np.ones(n), np.ones(n))
    counts = np.zeros(n)
    sums = np.zeros(n)

    def numpy_apply() -> None:
        np.add.at(counts, arms, 1.0)
        np.add.at(sums, arms, values)

    bd.choose(1)  # the Thompson arrays exist, so applying keeps them current too
    names = (
        "numpy add.at x2 (10,000 rewards)",
        "apply_rewards (10,000 rewards, buffers)",
        "apply_rewards (10,000 rewards, lists)",
    )
    fns: dict[str, Callable[[], object]] = {
        names[0]: numpy_apply,
        names[1]: lambda: bd.apply_rewards(arm_buf, value_buf),
        names[2]: lambda: bd.apply_rewards(arm_list, value_list),
    }
    # One after the other, not interleaved: interleaving would evict each one's arrays from
    # the cache between calls, and the target here is a time, not a ratio.
    us = {name: medians_us({name: fn}, budget)[name] for name, fn in fns.items()}
    ref = us[names[0]]
    notes = ("", "int64/float64 arrays, as the server passes", "incl. converting 2 Python lists")
    return [(name, us[name], ref / us[name], note) for name, note in zip(names, notes, strict=True)]


def optional_rows(n: int, budget: float, rng: np.random.Generator) -> list[Row]:
    """MABWiser and Vowpal Wabbit, for reference, when they are installed (not dependencies of
    banditd: `pip install mabwiser vowpalwabbit` to see these rows), next to numpy and
    banditd on the same spread world, measured interleaved like the other tables."""
    a, b = world("spread", n, rng)
    nrng = np.random.default_rng(3)
    full = bandit(a, b, thompson_path="full")
    fns: dict[str, Callable[[], object]] = {
        "numpy beta().argmax()": lambda: int(nrng.beta(a, b).argmax()),
        "banditd thompson full " + full.isa: partial(full.choose, 1),
    }
    missing: list[Row] = []
    try:
        from mabwiser.mab import MAB, LearningPolicy  # type: ignore[import-not-found]

        mab = MAB(list(range(n)), LearningPolicy.ThompsonSampling())
        mab.fit([0, 1] * 5, [0, 1] * 5)
        fns["MABWiser ThompsonSampling.predict"] = mab.predict
    except ImportError:
        missing.append(("MABWiser", float("nan"), float("nan"), "not installed"))
    try:
        import vowpalwabbit  # type: ignore[import-not-found]

        vw = vowpalwabbit.Workspace("--cb_explore_adf --epsilon 0.1 --quiet")
        # One shared context and n actions, as VW's contextual-bandit examples do.
        example = ["shared |s user=u1"] + [f"|a arm={i}" for i in range(n)]
        vw.learn(["shared |s user=u1", "0:1:0.5 |a arm=0"] + [f"|a arm={i}" for i in range(1, n)])
        fns["Vowpal Wabbit cb_explore_adf predict"] = lambda: vw.predict(example)
    except ImportError:
        missing.append(("Vowpal Wabbit cb_explore_adf", float("nan"), float("nan"), "not installed"))
    us = medians_us(fns, budget)
    ref = us["numpy beta().argmax()"]
    return [(name, t, ref / t, "") for name, t in us.items()] + missing


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"| {'what':40} | {'median µs':>10} | {'vs numpy':>9} | note")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 11}|------")
    for name, us, ratio, note in rows:
        print(f"| {name:40} | {us:10.2f} | {ratio:8.2f}x | {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row")
    ap.add_argument("--arms", type=int, nargs="*", default=list(ARMS))
    ap.add_argument("--worlds", nargs="*", default=list(WORLDS))
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    probe = _core.Bandit("binary", "thompson")
    print(f"CPU: {cpu_model()}; kernel instruction set: {probe.isa}; numpy {np.__version__}")
    summary: list[str] = []
    for n in args.arms:
        for w in args.worlds:
            rows = thompson_rows(n, w, args.budget, rng)
            print_table(f"Thompson top-1, {n:,} arms, world '{w}'", rows)
            by = {r[0]: r for r in rows}
            full = by.get("thompson full " + probe.isa)
            if full and n >= 1_000 and w == "spread":
                summary.append(f"full Thompson {n:,} arms: {full[2]:.1f}x numpy (target >= 25x)")
            pruned = by.get("thompson pruned")
            if pruned and n == 100_000 and w == "ctr3":
                summary.append(f"pruned Thompson 100,000 arms, 3% world: {pruned[1]:.1f} µs (target <= 50 µs)")
            top = [r for r in rows if "top-" in r[0]]
            if top and n >= 1_000 and w == "spread":
                summary.append(f"{n:,} arms: {top[0][3]} (target <= 1.3x)")
        rows = ucb_rows(n, args.budget, rng)
        print_table(f"Index policies, {n:,} arms", rows)
        if n == 10_000:
            summary.append(f"UCB1 10,000 arms: {rows[1][2]:.1f}x numpy (target >= 20x)")
        rows = apply_rows(n, args.budget, rng)
        print_table(f"Applying rewards, {n:,} arms", rows)
        if n >= 10_000:
            summary.append(f"apply 10,000 rewards, {n:,} arms: {rows[1][1]:.0f} µs (target <= 200 µs)")
        if n in (1_000, 10_000):
            print_table(f"Other libraries, {n:,} arms, world 'spread'", optional_rows(n, args.budget, rng))
    print("\nTargets")
    for line in summary:
        print(" -", line)


if __name__ == "__main__":
    main()
