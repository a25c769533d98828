"""`banditd evaluate`: what would a candidate policy have earned on this log?

Reads a decision log (the output of `banditd export`, or any CSV/JSONL with columns
action, reward, propensity and optionally unit, context, ctx_* fields, position, k) and
prints IPS, SNIPS, DM and DR estimates with 95% intervals (plus replay for uniform logs)
for each candidate policy:

- `uniform`, `arm:ID`, `mix:ID=W,ID=W,...` (fixed action distributions);
- `greedy`, `epsilon_greedy:E`, `thompson`: fitted on the first --train-fraction of the
  log (per context cell when --context-keys is given) and evaluated on the rest;
- `lin_ucb`, `lin_ts`, `logistic_ucb`, `logistic_ts` (`logistic`): the server's contextual
  policies (`banditd._core.Linear`), trained on the first --train-fraction of the log (encoder
  learnt from those rows' contexts, every row an observation of its logged arm), then frozen
  and evaluated on the rest. UCB is deterministic: its target is one-hot on its choice.
  Thompson's target is its action distribution, P(arm's posterior draw is the largest),
  integrated numerically from the frozen per-arm posteriors;
- `--policy-file F.json`: {"arm": weight, ...} or
  {"by": "context field", "policies": {"value": {"arm": weight}}, "default": {...}}.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from banditd import ope
from banditd.errors import BanditdError, InvalidArgument
from banditd.sim.contextual import LINEAR_POLICIES, Context, learn_encoder, linear_model

REQUIRED = ("action", "reward", "propensity")
THOMPSON_DRAWS = 4000
# Thompson's action probabilities: midpoint rule over u = Phi(z) of the arm's own draw. A
# step in the integrand (an arm far more certain than another) costs at most 1/(2*NODES).
THOMPSON_NODES = 128
THOMPSON_CHUNK = 2048  # rows per block (memory: chunk x nodes floats per array)


@dataclass
class LoadedLog:
    log: ope.Log
    contexts: list[dict[str, str]]  # as text: context cells and policy files match on it
    skipped_slate_rows: int
    unsettled_rows: int
    features: list[Context] = field(default_factory=list)  # numbers kept as floats, for the models


def _read_rows(path: Path, fmt: str | None) -> list[dict[str, Any]]:
    fmt = fmt or ("jsonl" if path.suffix in (".jsonl", ".json", ".ndjson") else "csv")
    if fmt == "jsonl":
        with open(path, "rb") as fb:
            return [orjson.loads(line) for line in fb if line.strip()]
    with open(path, newline="") as ft:
        return list(csv.DictReader(ft))


def _raw_context(row: dict[str, Any], line: int) -> dict[str, Any]:
    raw = row.get("context")
    ctx: dict[str, Any] = {}
    if isinstance(raw, dict):
        ctx.update({str(k): v for k, v in raw.items()})
    elif raw:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise InvalidArgument(f"row {line}: context is not a JSON object: {e}") from e
        if not isinstance(parsed, dict):
            raise InvalidArgument(f"row {line}: context must be a JSON object, got {raw!r}")
        ctx.update({str(k): v for k, v in parsed.items()})
    ctx.update({k[4:]: v for k, v in row.items() if k.startswith("ctx_") and v not in (None, "")})
    return ctx


def _features(raw: dict[str, Any]) -> Context:
    """A context for the models: JSON numbers stay numbers (as floats), the rest is text.
    CSV ctx_* columns carry no type: they stay text (use the JSON `context` column, as
    `banditd export` writes it, for numeric features)."""
    out: Context = {}
    for k, v in raw.items():
        if v is None:  # JSON null: the field is missing
            continue
        number = isinstance(v, int | float) and not isinstance(v, bool)
        out[k] = float(v) if number else str(v)
    return out


def _number(row: dict[str, Any], column: str, line: int) -> float:
    value = row.get(column)
    if value is None or value == "":
        if column == "propensity":
            raise InvalidArgument(
                f"row {line} has no propensity; importance weighting needs the probability with "
                "which the logged action was chosen"
            )
        raise InvalidArgument(f"row {line} has no {column}")
    try:
        return float(value)
    except ValueError as e:
        raise InvalidArgument(f"row {line}: {column} {value!r} is not a number") from e


def load(path: str | Path, fmt: str | None = None, context_keys: tuple[str, ...] = ()) -> LoadedLog:
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"no such log file: {path}")
    rows = _read_rows(path, fmt)
    if not rows:
        raise InvalidArgument(f"{path} holds no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise InvalidArgument(
            f"{path} lacks column(s) {', '.join(missing)}; a log needs action, reward and propensity "
            "(the probability the logging policy gave the logged action)"
        )
    actions: list[str] = []
    rewards: list[float] = []
    props: list[float] = []
    contexts: list[dict[str, str]] = []
    features: list[Context] = []
    skipped = unsettled = 0
    for line, row in enumerate(rows, start=1):
        # A slate's per-arm propensity is an inclusion probability, not the chance of the
        # action alone: single-arm estimators do not apply to it.
        if int(row.get("k") or 1) > 1 or int(row.get("position") or 0) > 0:
            skipped += 1
            continue
        if str(row.get("settled", "true")).lower() == "false":
            unsettled += 1
        actions.append(str(row["action"]))
        rewards.append(_number(row, "reward", line))
        props.append(_number(row, "propensity", line))
        raw = _raw_context(row, line)
        contexts.append({k: str(v) for k, v in raw.items()})
        features.append(_features(raw))
    if not actions:
        raise InvalidArgument(f"{path}: all {skipped} rows belong to slates (k > 1); nothing to evaluate")
    arms = tuple(sorted(set(actions)))
    index = {a: i for i, a in enumerate(arms)}
    cell_keys = [tuple(c.get(k, "") for k in context_keys) for c in contexts]
    cell_index: dict[tuple[str, ...], int] = {}
    cells = [cell_index.setdefault(ck, len(cell_index)) for ck in cell_keys]
    log = ope.Log(
        arms,
        np.array([index[a] for a in actions], dtype=np.int64),
        np.array(rewards, dtype=np.float64),
        np.array(props, dtype=np.float64),
        np.array(cells, dtype=np.int64),
        len(cell_index),
    )
    return LoadedLog(log, contexts, skipped, unsettled, features)


# Candidate policies: each turns (log, contexts, training log) into pi[n, K].


def _distribution(weights: dict[str, float], arms: tuple[str, ...], where: str) -> NDArray[np.float64]:
    unknown = sorted(set(weights) - set(arms))
    if unknown:
        raise InvalidArgument(
            f"{where} names arm(s) {', '.join(unknown)} that never appear in the log; "
            "nothing logged can tell what they earn"
        )
    vec = np.array([float(weights.get(a, 0.0)) for a in arms])
    if (vec < 0).any() or not np.isfinite(vec).all() or vec.sum() <= 0:
        raise InvalidArgument(f"{where}: weights must be finite, non-negative and not all zero")
    return vec / vec.sum()


def _parse_weights(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep:
            raise InvalidArgument(f"mix entry {part!r} is not ID=WEIGHT")
        try:
            out[name.strip()] = float(weight)
        except ValueError as e:
            raise InvalidArgument(f"mix weight {weight!r} is not a number") from e
    return out


def _fitted(kind: str, train: ope.Log, epsilon: float, seed: int) -> NDArray[np.float64]:
    """pi[cell, action] of a policy learned from the training rows."""
    k = len(train.arms)
    if kind in ("greedy", "epsilon_greedy"):
        q = ope.reward_model(train)
        greedy = np.eye(k)[q.argmax(axis=1)]
        return (1 - epsilon) * greedy + epsilon / k
    # Thompson: each action's probability of having the highest posterior draw.
    rng = np.random.default_rng(seed)
    flat = train.cells * k + train.actions
    n = np.bincount(flat, minlength=train.n_cells * k).reshape(train.n_cells, k)
    s = np.bincount(flat, weights=train.rewards, minlength=train.n_cells * k).reshape(train.n_cells, k)
    binary = bool(((train.rewards >= 0) & (train.rewards <= 1)).all())
    pi = np.empty((train.n_cells, k))
    for cell in range(train.n_cells):
        if binary:
            draws = rng.beta(1 + s[cell], 1 + n[cell] - s[cell], size=(THOMPSON_DRAWS, k))
        else:
            sd = float(train.rewards.std()) or 1.0
            mean = s[cell] / np.maximum(n[cell], 1)
            draws = rng.normal(mean, sd / np.sqrt(n[cell] + 1), size=(THOMPSON_DRAWS, k))
        pi[cell] = np.bincount(draws.argmax(axis=1), minlength=k) / THOMPSON_DRAWS
    return pi


def contextual_policy(
    kind: str,
    train: ope.Log,
    train_features: list[Context],
    test: ope.Log,
    test_features: list[Context],
    seed: int,
) -> tuple[NDArray[np.float64], str]:
    """pi[test row, action] of a `Linear` policy trained on the training rows and frozen: it
    never sees the rows it is scored on. Returns the matrix and a note saying what it is."""
    model, rule = LINEAR_POLICIES[kind]
    k = len(train.arms)
    binary = bool(((train.rewards >= 0) & (train.rewards <= 1)).all())
    if model == "logistic" and not binary:
        raise InvalidArgument(f"{kind} models a probability: it needs rewards in [0, 1]")
    m = linear_model(kind, k, binary=binary, seed=seed)
    numeric, categorical = learn_encoder(train_features)
    m.set_encoder(numeric, categorical)
    xs = [m.encode(c) for c in train_features]
    # Every training row is an observation of its logged arm (w = 1, wy = r, wyy = r*r): a
    # per-arm regression's target E[r | x, arm] does not depend on who chose the arm, so the
    # logging policy needs no correction here (only in the estimators).
    y = train.rewards
    m.update(train.actions.tolist(), b"".join(xs), [1.0] * train.n, y.tolist(), (y * y).tolist())
    if model == "logistic":
        # The online updates are one Newton step each; the refit is the penalised MLE.
        for arm in range(k):
            rows = np.flatnonzero(train.actions == arm)
            if len(rows):
                m.refit_logistic(arm, b"".join(xs[i] for i in rows), y[rows].tolist(), [1.0] * len(rows))
    test_xs = [m.encode(c) for c in test_features]
    shape = f"{m.n_features()} features ({len(numeric)} numeric, {len(categorical)} categorical fields)"
    if rule == "ucb":
        pi = np.zeros((test.n, k))
        pi[np.arange(test.n), [m.choose_x(x, 1)[0][0] for x in test_xs]] = 1.0
        return pi, f"{kind}: one-hot on the frozen model's UCB choice; {shape}"
    mean = np.empty((test.n, k))
    se = np.empty((test.n, k))
    for i, x in enumerate(test_xs):
        for arm in range(k):
            mean[i, arm], se[i, arm] = m.predict(arm, x)
    return thompson_probabilities(mean, se), (
        f"{kind}: Thompson's action probabilities P(arm's posterior draw is the largest) under the "
        f"frozen model; {shape}"
    )


def thompson_probabilities(mean: NDArray[np.float64], se: NDArray[np.float64]) -> NDArray[np.float64]:
    """P(arm a's draw is the largest) per row, for independent Gaussian draws N(mean, se^2):
    the integral over a's draw v of prod_{b != a} Phi((v - mean_b) / se_b), by the midpoint
    rule in u = Phi(z) (v = mean_a + se_a z), rows renormalised to sum to 1."""
    n, k = mean.shape
    dist = NormalDist()
    z = np.array([dist.inv_cdf((j + 0.5) / THOMPSON_NODES) for j in range(THOMPSON_NODES)])
    se = np.maximum(se, 1e-12)
    out = np.empty((n, k))
    for lo in range(0, n, THOMPSON_CHUNK):
        mu, sd = mean[lo : lo + THOMPSON_CHUNK], se[lo : lo + THOMPSON_CHUNK]
        for a in range(k):
            v = mu[:, a, None] + sd[:, a, None] * z[None, :]
            p = np.ones_like(v)
            for b in range(k):
                if b != a:
                    p *= _normal_cdf((v - mu[:, b, None]) / sd[:, b, None])
            out[lo : lo + THOMPSON_CHUNK, a] = p.mean(axis=1)
    return out / out.sum(axis=1, keepdims=True)


def _normal_cdf(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Phi(x) to ~1e-7 (Abramowitz & Stegun 7.1.26 for erf): numpy has no erf."""
    t = np.abs(x) / math.sqrt(2)
    k = 1.0 / (1.0 + 0.3275911 * t)
    poly = k * (0.254829592 + k * (-0.284496736 + k * (1.421413741 + k * (-1.453152027 + k * 1.061405429))))
    tail = 0.5 * poly * np.exp(-t * t)  # P(Z > |x|)
    return np.where(x >= 0, 1.0 - tail, tail)


@dataclass
class Candidate:
    name: str
    learned: bool
    spec: str | dict[str, Any]

    @property
    def contextual(self) -> bool:
        return isinstance(self.spec, str) and self.spec in LINEAR_POLICIES

    def matrix(
        self, log: ope.Log, contexts: list[dict[str, str]], train: ope.Log | None, seed: int
    ) -> NDArray[np.float64]:
        k = len(log.arms)
        if isinstance(self.spec, dict):
            return self._table(log, contexts)
        kind, _, arg = self.spec.partition(":")
        if kind == "uniform":
            return np.full((log.n, k), 1.0 / k)
        if kind == "arm":
            return np.tile(_distribution({arg: 1.0}, log.arms, self.name), (log.n, 1))
        if kind == "mix":
            return np.tile(_distribution(_parse_weights(arg), log.arms, self.name), (log.n, 1))
        if self.contextual:
            raise InvalidArgument(f"{self.name} needs the log's contexts: evaluate it with evaluate()")
        assert train is not None
        epsilon = float(arg) if kind == "epsilon_greedy" and arg else (0.1 if kind == "epsilon_greedy" else 0.0)
        return _fitted(kind, train, epsilon, seed)[log.cells]

    def _table(self, log: ope.Log, contexts: list[dict[str, str]]) -> NDArray[np.float64]:
        spec = self.spec
        assert isinstance(spec, dict)
        if "policies" not in spec:
            return np.tile(_distribution(spec, log.arms, self.name), (log.n, 1))
        by = spec.get("by")
        if not by:
            raise InvalidArgument(f"{self.name}: a policy file with 'policies' needs 'by' (a context field)")
        default = spec.get("default")
        table = {v: _distribution(w, log.arms, f"{self.name} [{by}={v}]") for v, w in spec["policies"].items()}
        fallback = _distribution(default, log.arms, f"{self.name} default") if default else None
        rows = []
        for i, ctx in enumerate(contexts):
            value = ctx.get(by)
            if value in table:
                rows.append(table[value])
            elif fallback is not None:
                rows.append(fallback)
            else:
                raise InvalidArgument(
                    f"{self.name}: row {i + 1} has {by}={value!r}, which has no policy and no default"
                )
        return np.array(rows)


LEARNED = ("greedy", "epsilon_greedy", "thompson", *LINEAR_POLICIES)


def parse_candidate(spec: str) -> Candidate:
    kind, sep, arg = spec.partition(":")
    if kind in ("uniform", "greedy", "thompson", *LINEAR_POLICIES) and not arg:
        return Candidate(spec, kind in LEARNED, spec)
    if kind == "epsilon_greedy":
        if arg:
            try:
                eps = float(arg)
            except ValueError as e:
                raise InvalidArgument(f"epsilon {arg!r} is not a number") from e
            if not 0 <= eps <= 1:
                raise InvalidArgument(f"epsilon must be in [0, 1], got {eps}")
        return Candidate(spec, True, spec)
    if kind in ("arm", "mix") and arg:
        if kind == "mix":
            _parse_weights(arg)
        return Candidate(spec, False, spec)
    raise InvalidArgument(
        f"unknown candidate policy {spec!r}; expected uniform, arm:ID, mix:ID=W,..., greedy, "
        f"epsilon_greedy[:E], thompson, {', '.join(LINEAR_POLICIES)} or --policy-file"
    )


def policy_file(path: str) -> Candidate:
    try:
        spec = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise InvalidArgument(f"cannot read policy file {path}: {e}") from e
    if not isinstance(spec, dict):
        raise InvalidArgument(f"policy file {path} must hold a JSON object")
    return Candidate(Path(path).name, False, spec)


@dataclass
class Report:
    candidate: str
    evaluated_rows: int
    trained_rows: int
    effective_sample_size: float
    max_weight: float
    logged: ope.Estimate
    estimates: list[ope.Estimate]
    note: str = ""  # what the candidate's action distribution is, when it is not obvious


def evaluate(
    loaded: LoadedLog, candidates: list[Candidate], train_fraction: float = 0.5, seed: int = 0
) -> list[Report]:
    log = loaded.log
    if any(c.learned for c in candidates):
        if not 0 < train_fraction < 1:
            raise InvalidArgument(f"--train-fraction must be in (0, 1), got {train_fraction}")
        cut = int(log.n * train_fraction)
        if cut == 0 or cut == log.n:
            raise InvalidArgument(f"a log of {log.n} rows is too short to split for fitting")
        train, test = log.subset(np.arange(cut)), log.subset(np.arange(cut, log.n))
        contexts = loaded.contexts[cut:]
    else:
        train, test, contexts, cut = None, log, loaded.contexts, 0
    reports = []
    for cand in candidates:
        note = ""
        if cand.contextual:
            assert train is not None and isinstance(cand.spec, str)
            features = loaded.features
            pi, note = contextual_policy(cand.spec, train, features[:cut], test, features[cut:], seed)
        else:
            pi = cand.matrix(test, contexts, train, seed)
        w = ope.weights(test, pi)
        ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
        reports.append(
            Report(
                cand.name, test.n, train.n if train is not None and cand.learned else 0, ess, float(w.max()),
                ope.on_policy(test), ope.estimate_all(test, pi, seed), note,
            )
        )
    return reports


def render(reports: list[Report], loaded: LoadedLog) -> str:
    log = loaded.log
    lines = [f"log: {log.n:,} single-arm decisions over {len(log.arms)} arms, {log.n_cells} context cell(s)"]
    if loaded.skipped_slate_rows:
        lines.append(f"skipped {loaded.skipped_slate_rows:,} rows of slate decisions (k > 1)")
    if loaded.unsettled_rows:
        lines.append(
            f"warning: {loaded.unsettled_rows:,} decisions are inside their attribution window; "
            "late rewards are missing (export with --settled-only)"
        )
    if ope.is_uniform(log):
        lines.append("logging policy was uniform: replay applies")
    for r in reports:
        fitted = f"; fitted on the first {r.trained_rows:,} rows" if r.trained_rows else ""
        lines += [
            "",
            f"candidate {r.candidate}: evaluated on {r.evaluated_rows:,} rows{fitted}; "
            f"effective sample size {r.effective_sample_size:,.0f} "
            f"({r.effective_sample_size / r.evaluated_rows:.0%}), largest weight {r.max_weight:.1f}",
            *([f"  target: {r.note}"] if r.note else []),
            f"  {'estimator':10} {'value':>10} {'95% interval':>24} {'rounds':>9} {'÷ logged':>9}",
        ]
        for e in [r.logged, *r.estimates]:
            ratio = e.value / r.logged.value if r.logged.value else math.nan
            lines.append(
                f"  {e.estimator:10} {e.value:10.5f} [{e.low:10.5f}, {e.high:10.5f}] {e.rounds:9,} {ratio:9.3f}"
            )
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("evaluate", help="off-policy estimates (IPS, SNIPS, DM, DR, replay) from a decision log")
    p.add_argument("log", help="CSV or JSONL log (e.g. from `banditd export`)")
    p.add_argument(
        "--policy", action="append", default=[],
        help="candidate: uniform | arm:ID | mix:ID=W,... | greedy | epsilon_greedy[:E] | thompson | lin_ucb | "
        "lin_ts | logistic_ucb | logistic_ts (logistic) (repeatable)",
    )
    p.add_argument("--policy-file", action="append", default=[], help="JSON action distribution(s) (repeatable)")
    p.add_argument("--context-keys", default="", help="comma-separated context fields that define cells")
    p.add_argument("--train-fraction", type=float, default=0.5, help="share of rows that fit learned policies")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None, help="default: from the file suffix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        keys = tuple(k for k in args.context_keys.split(",") if k)
        candidates = [parse_candidate(s) for s in args.policy] + [policy_file(f) for f in args.policy_file]
        if not candidates:
            candidates = [parse_candidate("uniform")]
        loaded = load(args.log, args.format, keys)
        reports = evaluate(loaded, candidates, args.train_fraction, args.seed)
    except BanditdError as e:
        print(f"banditd evaluate: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(orjson.dumps([asdict(r) for r in reports], option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(reports, loaded))
    return 0
