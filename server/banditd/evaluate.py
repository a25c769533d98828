"""`banditd evaluate`: what would a candidate policy have earned on this log?

Reads a decision log (the output of `banditd export`, or any CSV/JSONL with columns
action, reward, propensity and optionally unit, context, ctx_* fields, position, k) and
prints IPS, SNIPS, DM and DR estimates with 95% intervals (plus replay for uniform logs)
for each candidate policy:

- `uniform`, `arm:ID`, `mix:ID=W,ID=W,...` (fixed action distributions);
- `greedy`, `epsilon_greedy:E`, `thompson`: fitted on the first --train-fraction of the
  log (per context cell when --context-keys is given) and evaluated on the rest;
- `--policy-file F.json`: {"arm": weight, ...} or
  {"by": "context field", "policies": {"value": {"arm": weight}}, "default": {...}}.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from banditd import ope
from banditd.errors import BanditdError, InvalidArgument

REQUIRED = ("action", "reward", "propensity")
THOMPSON_DRAWS = 4000


@dataclass
class LoadedLog:
    log: ope.Log
    contexts: list[dict[str, str]]
    skipped_slate_rows: int
    unsettled_rows: int


def _read_rows(path: Path, fmt: str | None) -> list[dict[str, Any]]:
    fmt = fmt or ("jsonl" if path.suffix in (".jsonl", ".json", ".ndjson") else "csv")
    if fmt == "jsonl":
        with open(path, "rb") as fb:
            return [orjson.loads(line) for line in fb if line.strip()]
    with open(path, newline="") as ft:
        return list(csv.DictReader(ft))


def _context(row: dict[str, Any], line: int) -> dict[str, str]:
    raw = row.get("context")
    ctx: dict[str, str] = {}
    if isinstance(raw, dict):
        ctx.update({str(k): str(v) for k, v in raw.items()})
    elif raw:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise InvalidArgument(f"row {line}: context is not a JSON object: {e}") from e
        if not isinstance(parsed, dict):
            raise InvalidArgument(f"row {line}: context must be a JSON object, got {raw!r}")
        ctx.update({str(k): str(v) for k, v in parsed.items()})
    ctx.update({k[4:]: str(v) for k, v in row.items() if k.startswith("ctx_") and v not in (None, "")})
    return ctx


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
        contexts.append(_context(row, line))
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
    return LoadedLog(log, contexts, skipped, unsettled)


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


@dataclass
class Candidate:
    name: str
    learned: bool
    spec: str | dict[str, Any]

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


LEARNED = ("greedy", "epsilon_greedy", "thompson")


def parse_candidate(spec: str) -> Candidate:
    kind, sep, arg = spec.partition(":")
    if kind in ("uniform", "greedy", "thompson") and not arg:
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
        "epsilon_greedy[:E], thompson or --policy-file"
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
        train, test, contexts = None, log, loaded.contexts
    reports = []
    for cand in candidates:
        pi = cand.matrix(test, contexts, train, seed)
        w = ope.weights(test, pi)
        ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
        reports.append(
            Report(
                cand.name, test.n, train.n if train is not None and cand.learned else 0, ess, float(w.max()),
                ope.on_policy(test), ope.estimate_all(test, pi, seed),
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
        help="candidate: uniform | arm:ID | mix:ID=W,... | greedy | epsilon_greedy[:E] | thompson (repeatable)",
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
