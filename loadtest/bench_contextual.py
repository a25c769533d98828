"""Contextual decision benchmark (part of `make bench`): `banditd._core.Linear` from Python as
the server calls it (`choose(context_dict)`, which encodes the dict in Rust; `choose_x` for an
encoded vector), against numpy implementations and MABWiser (when installed:
`pip install mabwiser`), measured interleaved in the same run, medians.

Models are trained on 2,000 observations first; contexts are dense (every feature set), the
worst case for the quadratic forms.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from bench_core import cpu_model, medians_us, print_table  # noqa: E402

from banditd import _core  # noqa: E402

CONFIGS = ((10, 20), (100, 50))
TARGETS = {(100, 50, "lin_ucb"): 10.0, (100, 50, "lin_ts"): 15.0, (10, 20, "lin_ucb"): 3.0, (10, 20, "lin_ts"): 3.0}
Row = tuple[str, float, float, str]


class NumpyLin:
    """Disjoint LinUCB / LinTS with precomputed inverses (the plain numpy reference)."""

    def __init__(self, arms: int, d: int, X: np.ndarray, A: np.ndarray, y: np.ndarray) -> None:
        self.inv = np.stack([np.eye(d) for _ in range(arms)])
        self.b = np.zeros((arms, d))
        for x, a, r in zip(X, A, y, strict=True):
            u = self.inv[a] @ x
            self.inv[a] -= np.outer(u, u) / (1 + x @ u)
            self.b[a] += r * x
        self.theta = np.einsum("aij,aj->ai", self.inv, self.b)
        self.chol = np.linalg.cholesky(self.inv)
        self.rng = np.random.default_rng(1)

    def ucb(self, x: np.ndarray) -> int:
        q = np.einsum("i,aij,j->a", x, self.inv, x)
        return int((self.theta @ x + 1.96 * 0.5 * np.sqrt(q)).argmax())

    def ts(self, x: np.ndarray) -> int:
        z = self.rng.standard_normal(self.theta.shape)
        draws = self.theta + 0.5 * np.einsum("aij,aj->ai", self.chol, z)
        return int((draws @ x).argmax())

    def update(self, a: int, x: np.ndarray, r: float) -> None:
        u = self.inv[a] @ x
        self.inv[a] -= np.outer(u, u) / (1 + x @ u)
        self.b[a] += r * x
        self.theta[a] = self.inv[a] @ self.b[a]


def rows_for(arms: int, d: int, budget: float, rng: np.random.Generator) -> tuple[list[Row], dict[str, float], int]:
    names = [f"f{i}" for i in range(d - 1)]
    n = 2_000
    X = rng.normal(size=(n, d))
    X[:, 0] = 1.0
    A = rng.integers(0, arms, n)
    y = (rng.random(n) < 0.3).astype(float)
    models = {}
    for name, (model, policy) in {
        "lin_ucb": ("ridge", "ucb"),
        "lin_ts": ("ridge", "thompson"),
        "logistic_ts": ("logistic", "thompson"),
    }.items():
        m = _core.Linear(model, policy, seed=1)
        m.set_encoder([(f, 0.0, 1.0) for f in names], [])
        m.add_arms(arms)
        m.update(A.tolist(), X.tobytes(), [1.0] * n, y.tolist(), y.tolist())
        models[name] = m
    ctx = {f: float(v) for f, v in zip(names, rng.normal(size=d - 1), strict=True)}
    x = models["lin_ucb"].encode(ctx)
    xv = np.frombuffer(x, dtype=np.float64).copy()
    ref = NumpyLin(arms, d, X, A, y)
    fns = {
        "numpy LinUCB (precomputed inverses)": lambda: ref.ucb(xv),
        "numpy LinTS (Cholesky draws)": lambda: ref.ts(xv),
        "banditd lin_ucb choose(dict)": lambda: models["lin_ucb"].choose(ctx),
        "banditd lin_ucb choose_x(vector)": lambda: models["lin_ucb"].choose_x(x),
        "banditd lin_ts choose(dict)": lambda: models["lin_ts"].choose(ctx),
        "banditd lin_ts choose_x(vector)": lambda: models["lin_ts"].choose_x(x),
        "banditd logistic_ts choose(dict)": lambda: models["logistic_ts"].choose(ctx),
    }
    notes = {}
    try:
        import pandas as pd  # noqa: F401  # MABWiser's dependency
        from mabwiser.mab import MAB, LearningPolicy  # type: ignore[import-not-found]

        for label, lp in (("LinUCB", LearningPolicy.LinUCB(alpha=1.96)), ("LinTS", LearningPolicy.LinTS(alpha=0.5))):
            mab = MAB(list(range(arms)), lp, seed=1)
            mab.fit(A.tolist(), y.tolist(), X)
            row = xv.reshape(1, -1)
            fns[f"MABWiser {label}.predict"] = lambda mab=mab, row=row: mab.predict(row)
    except ImportError:
        notes["MABWiser"] = "not installed (pip install mabwiser)"
    us = medians_us(fns, budget)
    base = us["numpy LinUCB (precomputed inverses)"]
    rows: list[Row] = [(name, t, base / t, "") for name, t in us.items()]
    rows += [(name, float("nan"), float("nan"), note) for name, note in notes.items()]
    # One ridge update, as the writer applies a committed decision or reward.
    um = models["lin_ucb"]
    upd = medians_us(
        {
            "numpy Sherman-Morrison update": lambda: ref.update(3, xv, 1.0),
            "banditd ridge update": lambda: um.update([3], x, [1.0], [1.0], [1.0]),
        },
        budget,
    )
    ubase = upd["numpy Sherman-Morrison update"]
    rows += [(name, t, ubase / t, "vs numpy update") for name, t in upd.items()]
    return rows, us | upd, um.memory_per_arm()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row")
    args = ap.parse_args()
    rng = np.random.default_rng(11)
    probe = _core.Linear()
    print(f"CPU: {cpu_model()}; contextual kernel: {probe.isa()}; numpy {np.__version__}")
    summary = []
    for arms, d in CONFIGS:
        rows, us, mem = rows_for(arms, d, args.budget, rng)
        print_table(f"Contextual decide, {arms} arms x {d} features (ratio: numpy LinUCB time / row time)", rows)
        print(f"memory per arm at {d} features: {mem:,} bytes ({arms} arms: {arms * mem / 1e6:.2f} MB)")
        for pol in ("lin_ucb", "lin_ts"):
            target = TARGETS.get((arms, d, pol))
            got = us[f"banditd {pol} choose(dict)"]
            if target:
                verdict = "met" if got <= target else "MISSED"
                summary.append(f"{pol} {arms} arms x {d} features: {got:.2f} µs (target <= {target:g} µs) {verdict}")
        if d == 50:
            got = us["banditd ridge update"]
            verdict = "met" if got <= 2 else "MISSED"
            summary.append(f"ridge update, 50 features: {got:.2f} µs (target <= 2 µs) {verdict}")
    print("\nTargets")
    for line in summary:
        print(" -", line)


if __name__ == "__main__":
    main()
