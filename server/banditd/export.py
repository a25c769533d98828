"""`banditd export`: the server's decision log joined with its rewards, as CSV or JSONL.

One row per (decision, chosen arm): what off-policy evaluation needs (action, propensity,
reward) plus unit, time, model version, position in the slate and context. The store is
opened read-only, so a running server keeps serving while it is read.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from banditd.errors import BanditdError, ExperimentNotFound, InvalidArgument
from banditd.experiment import ExperimentSpec
from banditd.outcomes import observed_value
from banditd.store import SchemaError, Store

COLUMNS = (
    "decision_id", "experiment", "unit", "time_ms", "model_version", "position", "k",
    "action", "propensity", "reward", "reward_events", "settled", "context", "source",
)


@dataclass(slots=True)
class LoggedRow:
    decision_id: str
    experiment: str
    unit: str
    time_ms: int
    model_version: int
    position: int
    k: int
    action: str
    propensity: float
    reward: float
    reward_events: int
    settled: bool
    context: dict[str, str] | None
    # Who chose: "policy", or "control" (the random control share), "floor", "burn_in",
    # "fallback" (see the decision record).
    source: str = "policy"


class LogReader:
    """Read-only view of a data dir's experiments, decisions and their outcomes (through the
    store module, which owns the layout)."""

    def __init__(self, data_dir: str | Path) -> None:
        try:
            self.store = Store.open_readonly(data_dir)
        except FileNotFoundError as exc:
            raise InvalidArgument(str(exc)) from None
        except SchemaError as exc:
            raise InvalidArgument(str(exc)) from None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def experiments(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.store.experiment_specs()}

    def rows(
        self, experiment: str, since_ms: int = 0, until_ms: int | None = None, settled_only: bool = False
    ) -> Iterator[LoggedRow]:
        specs = self.experiments()
        if experiment not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise ExperimentNotFound(f"experiment {experiment!r} is not in this store (it has: {known})")
        spec = ExperimentSpec.from_json(specs[experiment])
        rule = spec.rule
        window_ms = spec.window_seconds * 1000
        now_ms = int(time.time() * 1000)
        outcomes = self.store.outcomes_of(experiment)
        # Records come in key order, which is time order but for exposure batches: stored when
        # they arrive, holding exposures up to one attribution window older. So a record
        # before `since` may follow it, and one before `until` may come up to a window later.
        horizon = None if until_ms is None or not window_ms else until_ms + window_ms
        for rec in self.store.iter_decisions(since_ms):
            if until_ms is not None and rec.ts_ms >= until_ms:
                if horizon is not None and rec.ts_ms >= horizon:
                    break
                continue
            if rec.ts_ms < since_ms or rec.experiment_id != experiment:
                continue
            settled = rec.ts_ms + window_ms <= now_ms
            if settled_only and not settled:
                continue
            for pos, (arm, prop) in enumerate(zip(rec.arms, rec.propensities, strict=True)):
                out = outcomes.get((rec.decision_id, arm))
                value = observed_value(rule, out.value if out else None)
                yield LoggedRow(
                    rec.decision_id, experiment, rec.unit_id, rec.ts_ms, rec.model_version, pos, len(rec.arms),
                    arm, prop, value if value is not None else 0.0, out.events if out else 0, settled, rec.context,
                    rec.source or "policy",
                )


def write_jsonl(rows: Iterable[LoggedRow], out: IO[bytes]) -> int:
    n = 0
    for row in rows:
        out.write(orjson.dumps(asdict(row)) + b"\n")
        n += 1
    return n


def write_csv(rows: Iterable[LoggedRow], out: IO[str]) -> int:
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    n = 0
    for row in rows:
        d = asdict(row)
        d["context"] = orjson.dumps(d["context"]).decode() if d["context"] else ""
        d["settled"] = "true" if d["settled"] else "false"
        writer.writerow([d[c] for c in COLUMNS])
        n += 1
    return n


def export(
    data_dir: str | Path, experiment: str, out_path: str | None, fmt: str, **filters: Any
) -> int:
    with LogReader(data_dir) as reader:
        rows = reader.rows(experiment, **filters)
        if fmt == "jsonl":
            if out_path in (None, "-"):
                return write_jsonl(rows, sys.stdout.buffer)
            with open(out_path, "wb") as fb:
                return write_jsonl(rows, fb)
        if out_path in (None, "-"):
            return write_csv(rows, sys.stdout)
        with open(out_path, "w", newline="") as ft:
            return write_csv(rows, ft)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="decision log with rewards and propensities, as CSV or JSONL")
    p.add_argument("experiment", help="experiment id")
    p.add_argument("--data-dir", default="./data/banditd", help="the server's data dir (read-only)")
    p.add_argument("--store", default="", help="the nodes' postgresql:// URL instead of --data-dir")
    p.add_argument("--out", default=None, help="output file (default: standard output)")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None, help="default: from --out's suffix, else csv")
    p.add_argument("--since-ms", type=int, default=0, help="decisions at or after this unix time (ms)")
    p.add_argument("--until-ms", type=int, default=None, help="decisions before this unix time (ms)")
    p.add_argument(
        "--settled-only", action="store_true",
        help="skip decisions whose attribution window is still open (their rewards may still come)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("jsonl" if args.out and args.out.endswith((".jsonl", ".json")) else "csv")
    try:
        n = export(
            args.store or args.data_dir, args.experiment, args.out, fmt,
            since_ms=args.since_ms, until_ms=args.until_ms, settled_only=args.settled_only,
        )
    except BanditdError as e:
        print(f"banditd export: {e}", file=sys.stderr)
        return 2
    print(f"exported {n:,} rows of experiment {args.experiment!r}", file=sys.stderr)
    return 0
