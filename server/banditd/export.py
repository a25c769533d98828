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
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import lmdb
import orjson

from banditd.errors import BanditdError, ExperimentNotFound, InvalidArgument

COLUMNS = (
    "decision_id", "experiment", "unit", "time_ms", "model_version", "position", "k",
    "action", "propensity", "reward", "reward_events", "settled", "context",
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


class LogReader:
    """Read-only view of a data dir's experiments, decisions and reward events."""

    def __init__(self, data_dir: str | Path) -> None:
        path = Path(data_dir)
        if not (path / "data.mdb").exists():
            raise InvalidArgument(f"no banditd store at {path} (data.mdb is missing)")
        self.env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=16, max_readers=512)
        self.experiments_db = self.env.open_db(b"experiments", create=False)
        self.decisions_db = self.env.open_db(b"decisions", create=False)
        self.events_db = self.env.open_db(b"events", create=False)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def experiments(self) -> dict[str, dict[str, Any]]:
        with self.env.begin(db=self.experiments_db) as txn:
            return {k.decode(): orjson.loads(v) for k, v in txn.cursor()}

    def rows(
        self, experiment: str, since_ms: int = 0, until_ms: int | None = None, settled_only: bool = False
    ) -> Iterator[LoggedRow]:
        specs = self.experiments()
        if experiment not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise ExperimentNotFound(f"experiment {experiment!r} is not in this store (it has: {known})")
        window_ms = int(specs[experiment]["window_seconds"]) * 1000
        now_ms = int(time.time() * 1000)
        with self.env.begin() as txn:
            rewards = self._rewards(txn, experiment)
            cur = txn.cursor(db=self.decisions_db)
            # Decision ids start with the decision time as 11 hex digits, so time is key order.
            if since_ms and not cur.set_range(f"{since_ms:011x}".encode()):
                return
            if not since_ms and not cur.first():
                return
            for k, v in cur:
                raw = orjson.loads(v)
                if until_ms is not None and raw["t"] >= until_ms:
                    break
                if raw["e"] != experiment:
                    continue
                settled = raw["t"] + window_ms <= now_ms
                if settled_only and not settled:
                    continue
                did = k.decode()
                for pos, (arm, prop) in enumerate(zip(raw["a"], raw["p"], strict=True)):
                    total, count = rewards.get((did, arm), (0.0, 0))
                    yield LoggedRow(
                        did, experiment, raw["u"], raw["t"], raw["v"], pos, len(raw["a"]),
                        arm, prop, total, count, settled, raw.get("c"),
                    )

    def _rewards(self, txn: Any, experiment: str) -> dict[tuple[str, str], tuple[float, int]]:
        """(decision id, arm) -> (reward total, events) from the experiment's reward events."""
        out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        prefix = experiment.encode() + b"\x00"
        cur = txn.cursor(db=self.events_db)
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                decision_id, arm, value, _ms = orjson.loads(v)
                acc = out[(decision_id, arm)]
                acc[0] += value
                acc[1] += 1
        return {key: (acc[0], int(acc[1])) for key, acc in out.items()}


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
            args.data_dir, args.experiment, args.out, fmt,
            since_ms=args.since_ms, until_ms=args.until_ms, settled_only=args.settled_only,
        )
    except BanditdError as e:
        print(f"banditd export: {e}", file=sys.stderr)
        return 2
    print(f"exported {n:,} rows of experiment {args.experiment!r}", file=sys.stderr)
    return 0
