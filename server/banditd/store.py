"""LMDB persistence: one environment, named databases, orjson values.

Databases and their records (keys join ids with NUL; values are orjson):
- meta: b"schema_version" -> version number; change counters (STATS_COUNTER, SPECS_COUNTER)
- experiments: experiment id -> ExperimentSpec.to_json()
- arms: experiment\0arm -> [pulls, rewards, reward_sum, reward_sumsq] (durable totals)
- decisions: decision id -> {"e": experiment, "a": [arms], "p": [propensities], "u": unit,
  "t": unix ms, "v": model version, "c": context (optional)}
- events: experiment\0event key -> [decision id, arm, value, unix ms]: each reward event
  counted once; doubles as the reward log
- assignments: experiment\0unit -> [arms] (sticky experiments)

Writes happen only on the writer thread (write transactions must stay on the thread that
opened them); reads from any thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import orjson

log = logging.getLogger("banditd.store")

SCHEMA_VERSION = 1
DEFAULT_MAP_SIZE = 1 << 30
SEP = b"\x00"


# meta keys: per-experiment counter of committed changes to arm totals, and a counter of
# experiment definition changes (polled by the other processes of a worker pool).
STATS_COUNTER = b"stats\0"
SPECS_COUNTER = b"specs"


def key(*parts: str) -> bytes:
    """Composite key; ids are validated to contain no NUL, so the separator is unambiguous."""
    return SEP.join(p.encode() for p in parts)


class Store:
    def __init__(self, path: str | os.PathLike[str], map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # sync/metasync stay on and writemap off: durability comes from group commit, and
        # writemap would turn a full disk into SIGBUS.
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=16,
            sync=True,
            metasync=True,
            writemap=False,
            max_readers=512,
        )
        self.meta = self.env.open_db(b"meta")
        self.experiments = self.env.open_db(b"experiments")
        self.arms = self.env.open_db(b"arms")
        self.decisions = self.env.open_db(b"decisions")
        self.events = self.env.open_db(b"events")
        self.assignments = self.env.open_db(b"assignments")
        self._check_schema()

    def _check_schema(self) -> None:
        with self.env.begin(write=True, db=self.meta) as txn:
            found = txn.get(b"schema_version")
            if found is None:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode())
            elif int(found) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"store at {self.path} has schema version {int(found)}, this server reads "
                    f"version {SCHEMA_VERSION}"
                )

    def grow(self) -> None:
        """Doubles the map after MapFullError (called by the writer with no txn open)."""
        new_size = self.env.info()["map_size"] * 2
        log.warning("LMDB map full; growing map to %d bytes", new_size)
        self.env.set_mapsize(new_size)

    def bump(self, txn: Any, counter: bytes) -> None:
        """Increments a meta counter inside the caller's write transaction."""
        raw = txn.get(counter, db=self.meta)
        txn.put(counter, str(int(raw or b"0") + 1).encode(), db=self.meta)

    def counter(self, counter: bytes) -> int:
        with self.env.begin(db=self.meta) as txn:
            return int(txn.get(counter) or b"0")

    def close(self) -> None:
        self.env.close()

    # Reads (any thread).
    def get(self, db: Any, k: bytes) -> Any | None:
        with self.env.begin(db=db) as txn:
            raw = txn.get(k)
        return None if raw is None else orjson.loads(raw)

    def items(self, db: Any, prefix: bytes = b"") -> Iterator[tuple[bytes, Any]]:
        with self.env.begin(db=db) as txn:
            cur = txn.cursor()
            if prefix and not cur.set_range(prefix):
                return
            for k, v in cur:
                if prefix and not k.startswith(prefix):
                    break
                yield k, orjson.loads(v)

    def stat(self) -> dict[str, int]:
        info = self.env.info()
        st = self.env.stat()
        return {"map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * st["psize"]}
