"""The on-disk schema: the ONLY module that knows LMDB keys, codecs and the schema version.

One LMDB environment with named databases (keys join ids with NUL; ids never contain NUL):

| database    | key                      | value                                                   |
|-------------|--------------------------|---------------------------------------------------------|
| meta        | b"schema_version"        | version number (ASCII)                                  |
|             | b"stats\\0" + experiment | change counter of the experiment's statistics (ASCII)   |
|             | b"specs"                 | change counter of experiment definitions (ASCII)        |
|             | b"keys"                  | change counter of API keys (ASCII)                      |
|             | b"armlog\\0" + experiment | ids of the arms whose rows the commit that took the   |
|             |  + \\0 + counter(16 hex) | stats counter there wrote, NUL-joined; the last      |
|             |                          | ARMLOG_KEEP commits (pool members read only those rows) |
| experiments | experiment               | ExperimentSpec as JSON                                  |
| arms        | experiment\\0arm         | ArmRow, 8 little-endian doubles                         |
| policy      | experiment               | PolicyState: decisions u64, clock f64, base f64         |
| decisions   | decision id              | DecisionRecord as JSON, or a DecisionBatch (columnar,   |
|             |                          | DecideBulk): decision "B.i" is unit i of batch B, or an |
|             |                          | exposure reference: (index, batch id) of an exposure    |
|             |                          | batch, a DecisionBatch holding the SDK's decision ids   |
| outcomes    | decision id\\0arm        | Outcome: aggregate, events, observation clock (JSON)    |
| maturing    | experiment\\0decision id | empty: decisions waiting for their min_age              |
| events      | experiment\\0event key   | [decision id, arm, value, unix ms]: idempotency + log   |
| assignments | experiment\\0unit        | [arms] of a sticky unit (JSON)                          |
| keys        | key id                   | ApiKeyRecord: name, sha256 of the key, scopes, prefix,  |
|             |                          | created / expires / revoked unix ms (JSON)              |
| models      | experiment               | FeatureDefinition of a contextual experiment (JSON)     |
| modellog    | experiment\\0version(8 hex) | ModelItems of one commit: the rank-1 updates of the  |
|             |   seq(16 hex)            | arms' models, in commit order (see `pack_items`)        |
| audit       | unix ms(16 hex)\\0experiment\\0seq(8 hex) | change record: action, actor, details (JSON) |
| history_db  | experiment\\0unix ms(16 hex) | snapshot of every arm: share, observations, rewards,  |
|             |                          | posterior mean and interval, P(best) (JSON)             |
| allocations | experiment\\0version(16 hex) | allocation snapshot issued for SDK assignment: arms, |
|             |                          | probabilities, salt, time (JSON)                        |

Contextual experiments (`models`, `modellog`, added in schema 2 without a layout change of the
other databases): a model is a function of its feature definition and the ordered update items
of its version, so every process and every restart replays the same items to the same model.
Decision records of contextual experiments carry the encoded features ("x", base64 of float64)
and the model version ("v"): a reward changes the model of that version only.

`audit` and `history` (schema 2, added without a layout change: a store without them is read
as having no entries) are in time order; history is thinned with age by the retention sweep.

Decision ids start with their creation time (11 hex digits of unix ms), so the decisions and
outcomes databases are in time order: expiry and maturation are prefix scans.

Arm statistics are kept as the posterior needs them (`n`, `sum`, `sumsq`, discounted when the
experiment has a half-life) next to undiscounted display counts. Discounting uses a clock
instead of rewriting every arm per observation: the clock counts observations; an observation
made at clock t is stored with weight d^-(t - base), and the discounted statistic is the stored
one times d^(clock - base) (see `ops.Accounting`).

Writes happen only on the writer thread, inside a `WriteTxn`; reads from any thread. The one
exception is API keys: `banditd keys` writes them from its own process, one short transaction
each (`add_api_key`, `revoke_api_key`), and bumps the `keys` counter that servers poll. A store
written before the keys database existed and opened read-only has none: no keys.
`Store.open_readonly` is what `banditd export` uses while a server keeps serving.
"""

from __future__ import annotations

import base64
import logging
import os
import struct
import threading
from array import array
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import orjson

log = logging.getLogger("banditd.store")

SCHEMA_VERSION = 2
DEFAULT_MAP_SIZE = 1 << 30
SEP = b"\x00"
DATABASES = (
    "meta", "experiments", "arms", "policy", "decisions", "outcomes", "maturing", "events", "assignments",
    "keys", "models", "modellog", "audit", "history_db", "allocations",
)  # fmt: skip

# meta keys: per-experiment counter of committed changes to arm statistics, and a counter of
# experiment definition changes (polled by the other processes of a worker pool).
STATS_COUNTER = b"stats\0"
# meta keys: per experiment and stats counter value, the arms that commit changed; a process
# that saw counter c reads only the rows named in c+1.. instead of every arm (10,000 rows
# cost ~9 ms, twenty times a second, while the other process decides).
ARMLOG = b"armlog\0"
ARMLOG_KEEP = 256
SPECS_COUNTER = b"specs"
# meta key: counter of API key changes (created, revoked), polled by servers.
KEYS_COUNTER = b"keys"
# meta keys: counter of feature-definition changes (all experiments), and per experiment the
# sequence number of its last model log entry.
MODELS_COUNTER = b"models"
MODEL_SEQ = b"modelseq\0"
# meta key: per experiment, the last allocation snapshot version issued.
ALLOCATION_SEQ = b"allocseq\0"
SCHEMA_KEY = b"schema_version"
# Characters of a decision id that encode its creation time.
DECISION_TIME_CHARS = 11


def armlog_key(experiment: bytes, counter: int) -> bytes:
    return b"%s%s\0%016x" % (ARMLOG, experiment, counter)


def _arms_changed(cur: Any, experiment: bytes, seen: int, counter: int) -> set[str] | None:
    """The arms the commits seen+1..counter changed, from the arm log; None when it no longer
    holds every one of them."""
    if counter <= seen:
        return set()
    if counter - seen > ARMLOG_KEEP or not cur.set_key(armlog_key(experiment, seen + 1)):
        return None
    names: set[str] = set()
    expected = seen + 1
    for k, v in cur:
        if k != armlog_key(experiment, expected):
            return None
        if v:
            names.update(bytes(v).decode().split("\0"))
        if expected == counter:
            return names
        expected += 1
    return None


class SchemaError(RuntimeError):
    """The data dir was written by a layout this server cannot read."""


def key(*parts: str) -> bytes:
    """Composite key; ids are validated to contain no NUL, so the separator is unambiguous."""
    return "\x00".join(parts).encode()


_RANDOM_IDS_PER_READ = 4096
_random_hex: deque[str] = deque()  # 12 hex digits each, made 4,096 at a time; popped once


def _random_hex12() -> str:
    """48 bits from the OS's CSPRNG (decision ids must not be guessable: auth.py), read
    4,096 ids at a time: one getrandom call per decision cost up to ~40 µs on a VM, more than
    the rest of a Decide. `popleft` is atomic: threads never get the same digits."""
    try:
        return _random_hex.popleft()
    except IndexError:
        raw = os.urandom(6 * _RANDOM_IDS_PER_READ).hex()
        _random_hex.extend([raw[i : i + 12] for i in range(12, len(raw), 12)])
        return raw[:12]


def new_decision_id(ms: int) -> str:
    """Time-ordered (ms, hex) then random: sorts by age, which keeps expiry and maturation
    scans to a prefix of the database."""
    return f"{ms:011x}{_random_hex12()}"


def decision_time_prefix(ms: int) -> bytes:
    return f"{ms:011x}".encode()


def decision_time_ms(decision_id: str | bytes) -> int:
    raw = decision_id[:DECISION_TIME_CHARS]
    return int(raw.decode() if isinstance(raw, bytes) else raw, 16)


# Records and codecs.
_ARM = struct.Struct("<8d")
_POLICY = struct.Struct("<Qdd")


@dataclass(slots=True)
class ArmRow:
    """One arm's durable statistics."""

    pulls: float = 0.0  # decisions that chose the arm
    events: float = 0.0  # reward events accepted for it
    observations: float = 0.0  # matured observations, undiscounted
    value_sum: float = 0.0  # sum of the observations' values, undiscounted
    n: float = 0.0  # posterior statistics (stored weights; see the module doc)
    sum: float = 0.0
    sumsq: float = 0.0
    rewarded: float = 0.0  # decisions (per arm) with at least one reward event

    def encode(self) -> bytes:
        return _ARM.pack(
            self.pulls, self.events, self.observations, self.value_sum, self.n, self.sum, self.sumsq, self.rewarded
        )

    @classmethod
    def decode(cls, raw: bytes) -> ArmRow:
        return cls(*_ARM.unpack(raw))


@dataclass(slots=True)
class PolicyState:
    """An experiment's policy counters: decisions (ε decay), observation clock (UCB's t and
    the half-life clock) and the clock value the stored weights are relative to."""

    decisions: int = 0
    clock: float = 0.0
    base: float = 0.0

    def encode(self) -> bytes:
        return _POLICY.pack(self.decisions, self.clock, self.base)

    @classmethod
    def decode(cls, raw: bytes) -> PolicyState:
        return cls(*_POLICY.unpack(raw))


@dataclass(slots=True)
class DecisionRecord:
    decision_id: str
    experiment_id: str
    arms: tuple[str, ...]
    propensities: tuple[float, ...]
    unit_id: str
    ts_ms: int
    model_version: int
    context: dict[str, str] | None = None
    # Observation clock of each arm (half-life experiments), once it is an observation.
    clocks: tuple[float, ...] | None = None
    # Contextual experiments: the encoded feature vector (float64 little-endian).
    features: bytes | None = None
    # Who chose the arms when not the policy: "control" (the random control share), "floor"
    # (a traffic floor), "burn_in", "fallback" (a guardrail's); "" = the policy.
    source: str = ""

    def encode(self) -> bytes:
        d: dict[str, Any] = {
            "e": self.experiment_id,
            "a": self.arms,
            "p": self.propensities,
            "u": self.unit_id,
            "t": self.ts_ms,
            "v": self.model_version,
        }
        if self.context:
            d["c"] = self.context
        if self.clocks is not None:
            d["o"] = self.clocks
        if self.features is not None:
            d["x"] = base64.b64encode(self.features).decode()
        if self.source:
            d["s"] = self.source
        return orjson.dumps(d)

    @classmethod
    def decode(cls, decision_id: str, raw: bytes | dict[str, Any]) -> DecisionRecord:
        d = orjson.loads(raw) if isinstance(raw, bytes | memoryview) else raw
        return cls(
            decision_id,
            d["e"],
            tuple(d["a"]),
            tuple(d["p"]),
            d["u"],
            d["t"],
            d["v"],
            d.get("c"),
            tuple(d["o"]) if d.get("o") is not None else None,
            base64.b64decode(d["x"]) if d.get("x") else None,
            d.get("s", ""),
        )


# A decision batch (DecideBulk): one columnar record for many decisions, told apart from a
# JSON decision record by its first byte. Decision i of batch B is "B.i" (decimal).
BATCH_MAGIC = b"\x00B1"
BATCH_REJECTED = 0xFFFFFFFF
_U32 = struct.Struct("<I")
# Exposures (LogExposures, columnar) are a DecisionBatch too, keyed by a server-made id, that
# also holds the SDK's decision ids; each of those ids is a key whose value is a reference
# (magic, u32 index, batch id): one small put per exposure instead of a JSON record. Such a
# batch's decisions are known by their SDK ids only (never as "B.i").
EXPOSURE_REF = b"\x00R1"
SDK_ID_CHARS = 23


def exposure_ref(batch_id: str, index: int) -> bytes:
    return EXPOSURE_REF + _U32.pack(index) + batch_id.encode()


def _ref_target(raw: bytes) -> tuple[str, int] | None:
    """(batch id, index) of an exposure reference; None for any other value."""
    if raw[:3] != EXPOSURE_REF:
        return None
    return raw[7:].decode(), _U32.unpack_from(raw, 3)[0]


@dataclass(slots=True)
class DecisionBatch:
    """Columnar decisions of one experiment made at one time: header JSON (experiment, time,
    model version, k, arm table, source, count; "d" = width of the SDK decision ids when it
    holds exposures), then u32 arm indexes (k per unit, REJECTED for a refused unit), f64
    propensities, the SDK decision ids (n x 23 ASCII bytes, exposures only: each exposure's
    time is the one in its id), u32 offsets of the unit ids (n + 1) and the unit ids' UTF-8
    bytes."""

    batch_id: str
    experiment_id: str
    ts_ms: int
    model_version: int
    k: int
    arm_ids: list[str]
    arms: bytes  # u32 little endian, n * k
    propensities: bytes  # f64 little endian, n * k
    units: list[str]
    source: str = ""
    ids: list[str] | None = None  # exposures: the SDK's decision ids (23 hex digits each)

    def encode(self) -> bytes:
        head: dict[str, Any] = {"e": self.experiment_id, "t": self.ts_ms, "v": self.model_version, "k": self.k,
                                "a": self.arm_ids, "s": self.source, "n": len(self.units)}  # fmt: skip
        ids = b""
        if self.ids is not None:
            head["d"] = SDK_ID_CHARS
            ids = "".join(self.ids).encode()
            if len(ids) != SDK_ID_CHARS * len(self.units):
                raise ValueError(f"exposure ids must be {SDK_ID_CHARS} ASCII characters each")
        header = orjson.dumps(head)
        encoded = [u.encode() for u in self.units]
        offsets = array("I", [0])
        total = 0
        for b in encoded:
            total += len(b)
            offsets.append(total)
        return b"".join((BATCH_MAGIC, _U32.pack(len(header)), header, self.arms, self.propensities, ids,
                         offsets.tobytes(), *encoded))  # fmt: skip

    @staticmethod
    def is_batch(raw: bytes) -> bool:
        return raw[:3] == BATCH_MAGIC


def _batch_header(raw: bytes) -> tuple[dict[str, Any], int]:
    (hlen,) = _U32.unpack_from(raw, 3)
    return orjson.loads(raw[7 : 7 + hlen]), 7 + hlen


def _offsets_at(head: dict[str, Any], pos: int) -> int:
    """Where the unit offsets start (after arms, propensities and any SDK ids)."""
    n, k = head["n"], head["k"]
    return pos + 12 * n * k + head.get("d", 0) * n


def _batch_record(head: dict[str, Any], pos: int, raw: bytes, i: int, decision_id: str) -> DecisionRecord | None:
    n, k = head["n"], head["k"]
    idx = struct.unpack_from(f"<{k}I", raw, pos + 4 * i * k)
    if idx[0] == BATCH_REJECTED:
        return None
    props = struct.unpack_from(f"<{k}d", raw, pos + 4 * n * k + 8 * i * k)
    off_at = _offsets_at(head, pos)
    start, end = struct.unpack_from("<2I", raw, off_at + 4 * i)
    units_at = off_at + 4 * (n + 1)
    unit = raw[units_at + start : units_at + end].decode()
    table = head["a"]
    ts = int(decision_id[:DECISION_TIME_CHARS], 16) if head.get("d") else head["t"]
    return DecisionRecord(decision_id, head["e"], tuple(table[a] for a in idx), props, unit, ts, head["v"],
                          None, None, None, head["s"])  # fmt: skip


def batch_item(decision_id: str, raw: bytes) -> DecisionRecord | None:
    """Decision "B.i" of a batch record (None: no such index, the unit was refused, or the
    batch holds exposures, whose decisions are known by their SDK ids only)."""
    head, pos = _batch_header(raw)
    try:
        i = int(decision_id.rpartition(".")[2])
    except ValueError:
        return None
    if not 0 <= i < head["n"] or head.get("d"):
        return None
    return _batch_record(head, pos, raw, i, decision_id)


def exposure_item(decision_id: str, raw: bytes, i: int) -> DecisionRecord | None:
    """Exposure i of an exposure batch, if its SDK id is `decision_id`."""
    if not DecisionBatch.is_batch(raw):
        return None
    head, pos = _batch_header(raw)
    width = head.get("d", 0)
    if not width or not 0 <= i < head["n"]:
        return None
    at = pos + 12 * head["n"] * head["k"] + width * i
    if raw[at : at + width] != decision_id.encode():
        return None
    return _batch_record(head, pos, raw, i, decision_id)


def batch_items(batch_id: str, raw: bytes) -> Iterator[DecisionRecord]:
    """Every decision of a batch record (refused units skipped), in order."""
    head, pos = _batch_header(raw)
    n, k, table = head["n"], head["k"], head["a"]
    idx = array("I")
    idx.frombytes(raw[pos : pos + 4 * n * k])
    props = array("d")
    props.frombytes(raw[pos + 4 * n * k : pos + 12 * n * k])
    width = head.get("d", 0)
    ids_at = pos + 12 * n * k
    offsets = array("I")
    off_at = _offsets_at(head, pos)
    offsets.frombytes(raw[off_at : off_at + 4 * (n + 1)])
    units = raw[off_at + 4 * (n + 1) :]
    for i in range(n):
        if idx[i * k] == BATCH_REJECTED:
            continue
        if width:
            did = raw[ids_at + width * i : ids_at + width * (i + 1)].decode()
            ts = int(did[:DECISION_TIME_CHARS], 16)
        else:
            did, ts = f"{batch_id}.{i}", head["t"]
        yield DecisionRecord(
            did, head["e"], tuple(table[a] for a in idx[i * k : i * k + k]),
            tuple(props[i * k : i * k + k]), units[offsets[i] : offsets[i + 1]].decode(), ts, head["v"],
            None, None, None, head["s"],
        )  # fmt: skip


def decode_records(key_: str, raw: bytes) -> Iterator[DecisionRecord]:
    """The decision(s) a `decisions` record holds (a batch holds many; an exposure
    reference none: its batch holds it)."""
    if DecisionBatch.is_batch(raw):
        yield from batch_items(key_, raw)
    elif raw[:3] == EXPOSURE_REF:
        return
    else:
        yield DecisionRecord.decode(key_, raw)


@dataclass(slots=True)
class FeatureDefinition:
    """One version of a contextual experiment's encoder: numbers (name, mean, std, coverage)
    and categories (name, coverage, [(level, coverage)]), learnt from `contexts` logged
    contexts. Version 0 (no record) is the intercept alone."""

    version: int = 0
    numeric: list[tuple[str, float, float, float]] = field(default_factory=list)
    categorical: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)
    contexts: int = 0
    created_ms: int = 0

    def encode(self) -> bytes:
        return orjson.dumps(
            {"v": self.version, "n": self.numeric, "c": self.categorical, "k": self.contexts, "t": self.created_ms}
        )

    @classmethod
    def decode(cls, raw: bytes) -> FeatureDefinition:
        d = orjson.loads(raw)
        return cls(
            d["v"],
            [(str(n), float(m), float(sd), float(c)) for n, m, sd, c in d["n"]],
            [(str(n), float(c), [(str(lv), float(lc)) for lv, lc in levels]) for n, c, levels in d["c"]],
            d["k"],
            d["t"],
        )

    @property
    def dimension(self) -> int:
        """Entries of the encoded feature vector: intercept, numbers, levels and "other"."""
        return 1 + len(self.numeric) + sum(len(levels) + 1 for _, _, levels in self.categorical)

    def same_features(self, other: FeatureDefinition) -> bool:
        """Same keys and levels (means and coverages may differ): no new model version."""
        return [n[0] for n in self.numeric] == [n[0] for n in other.numeric] and [
            (c[0], [lv[0] for lv in c[2]]) for c in self.categorical
        ] == [(c[0], [lv[0] for lv in c[2]]) for c in other.categorical]


# One model update item: arm index, w, wy, wyy, then the float64 features.
_ITEM = struct.Struct("<Iddd")
_ITEMS_HEAD = struct.Struct("<II")


@dataclass(slots=True)
class ModelItems:
    """Update items of one commit for one experiment (see `banditd._core.Linear.update`)."""

    arms: list[int] = field(default_factory=list)
    xs: list[bytes] = field(default_factory=list)
    w: list[float] = field(default_factory=list)
    wy: list[float] = field(default_factory=list)
    wyy: list[float] = field(default_factory=list)

    def add(self, arm: int, x: bytes, w: float, wy: float, wyy: float) -> None:
        self.arms.append(arm)
        self.xs.append(x)
        self.w.append(w)
        self.wy.append(wy)
        self.wyy.append(wyy)

    def extend(self, other: ModelItems) -> None:
        self.arms += other.arms
        self.xs += other.xs
        self.w += other.w
        self.wy += other.wy
        self.wyy += other.wyy

    def encode(self) -> bytes:
        d = len(self.xs[0]) // 8 if self.xs else 0
        parts = [_ITEMS_HEAD.pack(len(self.arms), d)]
        for i, arm in enumerate(self.arms):
            parts.append(_ITEM.pack(arm, self.w[i], self.wy[i], self.wyy[i]))
            parts.append(self.xs[i])
        return b"".join(parts)

    @classmethod
    def decode(cls, raw: bytes) -> ModelItems:
        n, d = _ITEMS_HEAD.unpack_from(raw)
        out, pos, size = cls(), _ITEMS_HEAD.size, 8 * d
        for _ in range(n):
            arm, w, wy, wyy = _ITEM.unpack_from(raw, pos)
            pos += _ITEM.size
            out.add(arm, raw[pos : pos + size], w, wy, wyy)
            pos += size
        return out


def model_log_key(experiment_id: str, version: int, seq: int = 0) -> bytes:
    return key(experiment_id, f"{version:08x}{seq:016x}")


@dataclass(slots=True)
class Outcome:
    """The aggregate of one decision's reward events for one arm."""

    value: float
    events: int
    clock: float | None = None  # observation clock, when it became one by this event

    def encode(self) -> bytes:
        return orjson.dumps((self.value, self.events, self.clock))

    @classmethod
    def decode(cls, raw: bytes) -> Outcome:
        v, e, c = orjson.loads(raw)
        return cls(v, e, c)


@dataclass(slots=True)
class EventRecord:
    decision_id: str
    arm_id: str
    value: float
    ts_ms: int

    def encode(self) -> bytes:
        return orjson.dumps((self.decision_id, self.arm_id, self.value, self.ts_ms))

    @classmethod
    def decode(cls, raw: bytes) -> EventRecord:
        d, a, v, t = orjson.loads(raw)
        return cls(d, a, v, t)


@dataclass(slots=True)
class ApiKeyRecord:
    """An API key as stored: never the key itself, only its sha256 (hex)."""

    key_id: str
    name: str
    digest: str
    scopes: tuple[str, ...]
    prefix: str = ""  # experiment ids the key may touch start with this ("" = any)
    created_ms: int = 0
    expires_ms: int | None = None
    revoked_ms: int | None = None

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "n": self.name,
                "h": self.digest,
                "s": self.scopes,
                "p": self.prefix,
                "c": self.created_ms,
                "x": self.expires_ms,
                "r": self.revoked_ms,
            }
        )

    @classmethod
    def decode(cls, key_id: str, raw: bytes) -> ApiKeyRecord:
        d = orjson.loads(raw)
        return cls(key_id, d["n"], d["h"], tuple(d["s"]), d["p"], d["c"], d.get("x"), d.get("r"))


@dataclass(slots=True)
class ExperimentChanges:
    """What one committed transaction changed in one experiment's statistics."""

    policy: PolicyState
    arms: dict[str, ArmRow] = field(default_factory=dict)
    # Stats counter before this transaction and after it.
    counter_before: int = 0
    counter_after: int = 0
    # Reward events' part of the change, per arm: (n, sum, sumsq) in stored units; arms whose
    # every event change must raise / must lower the mean, and arms with both.
    event_deltas: dict[str, list[float]] = field(default_factory=dict)
    rises: set[str] = field(default_factory=set)
    falls: set[str] = field(default_factory=set)
    mixed: set[str] = field(default_factory=set)
    rescaled: bool = False
    events: int = 0
    # Contextual experiments: this commit's model log entry (version, seq, items).
    model_version: int = 0
    model_seq: int = 0
    model_items: ModelItems | None = None


# Connections per banditd process to a PostgreSQL store: the writer's, the follower's and
# handler threads' reads (reads are short; more would only queue in the database).
PG_POOL_SIZE = 6


def is_database_url(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


class Store:
    # The named databases (bound by `_bind`; None in a read-only store written before the
    # database existed).
    meta: Any
    experiments: Any
    arms: Any
    policy: Any
    decisions: Any
    outcomes: Any
    maturing: Any
    events: Any
    assignments: Any
    keys: Any
    models: Any
    modellog: Any
    audit: Any
    history_db: Any
    allocations: Any

    def __init__(self, path: str | os.PathLike[str], map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False) -> None:
        """`path`: an LMDB directory (the embedded default), or a postgresql:// URL: the same
        databases as rows of one PostgreSQL table (`banditd.pgkv`), shared by several nodes."""
        self.readonly = readonly
        self.env: Any  # lmdb.Environment, or banditd.pgkv.Environment (the same interface)
        self.shared_database = is_database_url(path)
        if self.shared_database:
            from banditd import pgkv  # psycopg is only needed here

            self.path = Path(".")  # no directory of its own
            self.env = pgkv.Environment(str(path), readonly=readonly, pool_size=PG_POOL_SIZE)
            self.location = self.env.path()  # the URL without its password
        else:
            self.path = Path(path)
            self.location = str(self.path)
            if readonly:
                if not (self.path / "data.mdb").exists():
                    raise FileNotFoundError(f"no banditd store at {self.path} (data.mdb is missing)")
            else:
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
                readonly=readonly,
                lock=True,
            )
        # Map growth needs every read transaction of this process closed: readers hold the
        # shared side, `grow` the exclusive side (see `reading`).
        self._growth = _SharedExclusive()
        if readonly:
            self._open_existing()
            self._check_version(self._read_version())
        else:
            with self.env.begin(write=True) as txn:
                dbs = {name: self.env.open_db(name.encode(), txn=txn) for name in DATABASES}
                self._bind(dbs)
                found = txn.get(SCHEMA_KEY, db=self.meta)
                if found is None:
                    if self._has_data(txn):
                        raise SchemaError(f"store at {self.location} has data but no schema version; refusing to guess")
                    txn.put(SCHEMA_KEY, str(SCHEMA_VERSION).encode(), db=self.meta)
                else:
                    version = int(found)
                    if version == 1:
                        from banditd.migrations import upgrade_v1

                        upgrade_v1(self, txn)
                        txn.put(SCHEMA_KEY, str(SCHEMA_VERSION).encode(), db=self.meta)
                        log.warning("upgraded store at %s from schema 1 to %d", self.location, SCHEMA_VERSION)
                    else:
                        self._check_version(version)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Store:
        return cls(path, readonly=True)

    def _bind(self, dbs: dict[str, Any]) -> None:
        for name, db in dbs.items():
            setattr(self, name, db)

    def _open_existing(self) -> None:
        dbs: dict[str, Any] = {}
        for name in DATABASES:
            try:
                dbs[name] = self.env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                dbs[name] = None
        self._bind(dbs)

    def _read_version(self) -> int | None:
        if self.meta is None:
            return None
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(SCHEMA_KEY)
        return None if raw is None else int(raw)

    def _check_version(self, version: int | None) -> None:
        if version != SCHEMA_VERSION:
            hint = "start this version of banditd on it once to upgrade it" if version == 1 else (
                "it was written by a newer banditd" if (version or 0) > SCHEMA_VERSION else "it is no banditd store"
            )
            raise SchemaError(
                f"store at {self.location} has schema version {version}, this banditd reads version "
                f"{SCHEMA_VERSION}: {hint}"
            )

    def _has_data(self, txn: Any) -> bool:
        return any(txn.stat(getattr(self, name))["entries"] for name in DATABASES if name != "meta")

    # Map size.
    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A read transaction that map growth waits for (use for every read)."""
        while True:
            with self._growth.shared():
                try:
                    txn = self.env.begin()
                except lmdb.MapResizedError:
                    pass  # another process grew the map: adopt its size (below), then retry
                else:
                    with txn:
                        yield txn
                    return
            self.adopt_map_size()

    def begin_write(self) -> Any:
        """A write transaction (writer thread), on the map size another process grew to."""
        try:
            return self.env.begin(write=True)
        except lmdb.MapResizedError:
            self.adopt_map_size()
            return self.env.begin(write=True)

    def abort_write(self, txn: Any) -> None:
        """Aborts a write transaction while no read of this process is in flight: py-lmdb (3.0)
        makes the abort wait until no operation at all is in flight on the environment, which
        reads from two busy threads can postpone forever."""
        with self._growth.exclusive():
            txn.abort()

    def adopt_map_size(self) -> None:
        """Takes over the map size another process grew to (after MDB_MAP_RESIZED): LMDB
        needs no read transaction of this process open for it, as for growth."""
        with self._growth.exclusive():
            self.env.set_mapsize(0)

    def grow(self) -> None:
        """Doubles the map after MapFullError (writer thread, no write txn open). Waits until
        no read transaction of this process is open: LMDB requires it for set_mapsize. Other
        processes adopt the new size when their next transaction sees it (MDB_MAP_RESIZED,
        see `reading` and `begin_write`)."""
        with self._growth.exclusive():
            new_size = self.env.info()["map_size"] * 2
            log.warning("LMDB map full; growing map to %d bytes", new_size)
            self.env.set_mapsize(new_size)

    def close(self) -> None:
        self.env.close()

    def lead(self, job: str) -> bool:
        """Whether this process should run `job` (history snapshots, retention sweeps) for
        everyone sharing the store: on PostgreSQL one node at a time (a session lock, taken
        over when its holder dies); on LMDB the pool already starts such jobs in one process."""
        return bool(self.env.hold(job)) if self.shared_database else True

    # Reads (any thread).
    def counter(self, counter: bytes) -> int:
        with self.reading() as txn:
            return int(txn.get(counter, db=self.meta) or b"0")

    def counters(self, names: list[bytes]) -> list[int]:
        with self.reading() as txn:
            return [int(txn.get(n, db=self.meta) or b"0") for n in names]

    def experiment_specs(self) -> list[dict[str, Any]]:
        with self.reading() as txn:
            return [orjson.loads(v) for _, v in txn.cursor(db=self.experiments)]

    def experiment_spec(self, experiment_id: str) -> dict[str, Any] | None:
        with self.reading() as txn:
            raw = txn.get(experiment_id.encode(), db=self.experiments)
        return None if raw is None else orjson.loads(raw)

    def experiment_state(self, experiment_id: str) -> tuple[PolicyState, dict[str, ArmRow], int]:
        """An experiment's policy counters, arm rows and stats counter, read consistently."""
        with self.reading() as txn:
            policy, arms = self._state(txn, experiment_id)
            counter = int(txn.get(STATS_COUNTER + experiment_id.encode(), db=self.meta) or b"0")
        return policy, arms, counter

    def _state(self, txn: Any, experiment_id: str) -> tuple[PolicyState, dict[str, ArmRow]]:
        prefix = key(experiment_id, "")
        raw = txn.get(experiment_id.encode(), db=self.policy)
        policy = PolicyState.decode(raw) if raw is not None else PolicyState()
        arms: dict[str, ArmRow] = {}
        cur = txn.cursor(db=self.arms)
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                arms[k[len(prefix) :].decode()] = ArmRow.decode(v)
        return policy, arms

    def experiment_state_since(
        self, experiment_id: str, seen: int
    ) -> tuple[PolicyState, dict[str, ArmRow], int, bool]:
        """Like `experiment_state`, but when the state at stats counter `seen` is known, only
        the rows the commits after it changed (False last) if the arm log still covers them;
        else every row (True last)."""
        exp = experiment_id.encode()
        with self.reading() as txn:
            counter = int(txn.get(STATS_COUNTER + exp, db=self.meta) or b"0")
            names = _arms_changed(txn.cursor(db=self.meta), exp, seen, counter) if seen >= 1 else None
            if names is None:
                policy, rows = self._state(txn, experiment_id)
                return policy, rows, counter, True
            raw = txn.get(exp, db=self.policy)
            policy = PolicyState.decode(raw) if raw is not None else PolicyState()
            wanted = sorted(key(experiment_id, n) for n in names)
            prefix = len(exp) + 1
            got = txn.cursor(db=self.arms).getmulti(wanted)
            rows = {bytes(k)[prefix:].decode(): ArmRow.decode(v) for k, v in got}
        return policy, rows, counter, False

    def decision(self, decision_id: str) -> DecisionRecord | None:
        return self.decisions_many([decision_id]).get(decision_id)

    def decisions_many(self, decision_ids: list[str]) -> dict[str, DecisionRecord]:
        """One cursor for many decisions (a get each would release the GIL each time); ids
        "B.i" are decision i of batch record B (each batch read once)."""
        keys = sorted({k for d in decision_ids if (k := d.partition(".")[0].encode())})
        with self.reading() as txn:
            cur = txn.cursor(db=self.decisions)
            found = {bytes(k).decode(): bytes(v) for k, v in cur.getmulti(keys)}
            refs = {d: t for d, raw in found.items() if raw[:3] == EXPOSURE_REF and (t := _ref_target(raw))}
            batches: dict[str, bytes] = {}
            if refs:  # exposures: their batches, in the same transaction
                wanted = sorted({b.encode() for b, _ in refs.values()})
                batches = {bytes(k).decode(): bytes(v) for k, v in cur.getmulti(wanted)}
        out: dict[str, DecisionRecord] = {}
        for d in decision_ids:
            raw = found.get(d.partition(".")[0])
            if raw is None:
                continue
            if d in refs:
                batch_id, i = refs[d]
                rec = exposure_item(d, batches.get(batch_id, b""), i)
                if rec is not None:
                    out[d] = rec
            elif DecisionBatch.is_batch(raw):
                rec = batch_item(d, raw) if "." in d else None
                if rec is not None:
                    out[d] = rec
            elif "." not in d:
                out[d] = DecisionRecord.decode(d, raw)
        return out

    def assignment(self, experiment_id: str, unit_id: str) -> tuple[str, ...] | None:
        with self.reading() as txn:
            raw = txn.get(key(experiment_id, unit_id), db=self.assignments)
        return None if raw is None else tuple(orjson.loads(raw))

    def iter_decisions(self, since_ms: int = 0) -> Iterator[DecisionRecord]:
        """Every decision from `since_ms` on, oldest first (one read transaction)."""
        with self.reading() as txn:
            cur = txn.cursor(db=self.decisions)
            found = cur.set_range(decision_time_prefix(since_ms)) if since_ms else cur.first()
            if not found:
                return
            for k, v in cur:
                yield from decode_records(k.decode(), bytes(v))

    def outcomes_of(self, experiment_id: str) -> dict[tuple[str, str], Outcome]:
        """(decision id, arm) -> aggregate, for the decisions of one experiment that have events."""
        prefix = key(experiment_id, "")
        keys: set[bytes] = set()
        with self.reading() as txn:
            cur = txn.cursor(db=self.events)
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    ev = EventRecord.decode(v)
                    keys.add(key(ev.decision_id, ev.arm_id))
            found = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.outcomes).getmulti(sorted(keys))}
        out = {}
        for k, v in found.items():
            d, a = k.split(SEP, 1)
            out[(d.decode(), a.decode())] = Outcome.decode(v)
        return out

    def model_definition(self, experiment_id: str) -> FeatureDefinition:
        with self.reading() as txn:
            raw = txn.get(experiment_id.encode(), db=self.models) if self.models is not None else None
        return FeatureDefinition.decode(bytes(raw)) if raw is not None else FeatureDefinition()

    def model_log(self, experiment_id: str, version: int, after_seq: int = 0) -> list[tuple[int, ModelItems]]:
        """The model log entries of one version after `after_seq`, in order."""
        if self.modellog is None:
            return []
        prefix = model_log_key(experiment_id, version)[: -16]
        out = []
        with self.reading() as txn:
            cur = txn.cursor(db=self.modellog)
            if cur.set_range(model_log_key(experiment_id, version, after_seq + 1)):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out.append((int(k[-16:], 16), ModelItems.decode(bytes(v))))
        return out

    def audit_log(self, experiment_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` audit entries (of one experiment, or all when empty), newest first."""
        out: list[dict[str, Any]] = []
        if self.audit is None:
            return out
        with self.reading() as txn:
            cur = txn.cursor(db=self.audit)
            ok = cur.last()
            while ok and len(out) < limit:
                entry = orjson.loads(cur.value())
                if not experiment_id or entry["experiment_id"] == experiment_id:
                    out.append(entry)
                ok = cur.prev()
        return out

    def allocation(self, experiment_id: str, version: int) -> dict[str, Any] | None:
        if self.allocations is None:
            return None
        with self.reading() as txn:
            raw = txn.get(key(experiment_id, f"{version:016x}"), db=self.allocations)
        return None if raw is None else orjson.loads(raw)

    def history(self, experiment_id: str, since_ms: int = 0, limit: int = 100_000) -> list[dict[str, Any]]:
        """Snapshots of the experiment from `since_ms` on, oldest first."""
        out: list[dict[str, Any]] = []
        if self.history_db is None:
            return out
        prefix = experiment_id.encode() + SEP
        with self.reading() as txn:
            cur = txn.cursor(db=self.history_db)
            if cur.set_range(prefix + f"{since_ms:016x}".encode()):
                for k, v in cur:
                    if not k.startswith(prefix) or len(out) >= limit:
                        break
                    out.append(orjson.loads(v))
        return out

    def recent_decisions(
        self, experiment_id: str, limit: int, scan: int, model_version: int | None = None
    ) -> list[DecisionRecord]:
        """Up to `limit` of the experiment's newest decisions (of one model version), newest
        first, looking at no more than `scan` records of all experiments."""
        out: list[DecisionRecord] = []
        marker = b'"e":' + orjson.dumps(experiment_id)
        with self.reading() as txn:
            cur = txn.cursor(db=self.decisions)
            if not cur.last():
                return out
            for _ in range(scan):
                raw = cur.value()
                if marker in raw:  # cheap filter before decoding
                    for rec in reversed(list(decode_records(cur.key().decode(), bytes(raw)))):
                        if rec.experiment_id == experiment_id and (
                            model_version is None or rec.model_version == model_version
                        ):
                            out.append(rec)
                    if len(out) >= limit:
                        del out[limit:]
                        break
                if not cur.prev():
                    break
        return out

    def outcomes_many(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Outcome]:
        keys = sorted({key(d, a) for d, a in pairs})
        with self.reading() as txn:
            found = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.outcomes).getmulti(keys)}
        out = {}
        for k, v in found.items():
            d, a = k.split(SEP, 1)
            out[(d.decode(), a.decode())] = Outcome.decode(v)
        return out

    def maturing_many(self, experiment_id: str, decision_ids: list[str]) -> set[str]:
        keys = sorted(key(experiment_id, d) for d in decision_ids)
        with self.reading() as txn:
            found = [bytes(k) for k, _ in txn.cursor(db=self.maturing).getmulti(keys)]
        prefix = len(key(experiment_id, ""))
        return {k[prefix:].decode() for k in found}

    def is_maturing(self, experiment_id: str, decision_id: str) -> bool:
        with self.reading() as txn:
            return txn.get(key(experiment_id, decision_id), db=self.maturing) is not None

    # API keys (read by servers from any thread; written by `banditd keys` in its own process).
    def api_keys(self) -> dict[str, ApiKeyRecord]:
        """Every stored key, revoked and expired ones included ({} when there is no keys
        database: a read-only store written before it existed)."""
        if self.keys is None:
            return {}
        with self.reading() as txn:
            return {k.decode(): ApiKeyRecord.decode(k.decode(), bytes(v)) for k, v in txn.cursor(db=self.keys)}

    def api_keys_version(self) -> int:
        """The keys counter: moves whenever a key is added or revoked."""
        return self.counter(KEYS_COUNTER)

    def add_api_key(self, rec: ApiKeyRecord) -> None:
        """Stores a new key in its own short transaction; ValueError if the id exists."""
        self._write_key(rec, overwrite=False)

    def revoke_api_key(self, key_id: str, now_ms: int) -> ApiKeyRecord | None:
        """Marks a key revoked (kept, so `list` can show it); None if there is no such key.
        Revoking a revoked key keeps its first revocation time."""
        with self.reading() as txn:
            raw = txn.get(key_id.encode(), db=self.keys) if self.keys is not None else None
        if raw is None:
            return None
        rec = ApiKeyRecord.decode(key_id, bytes(raw))
        if rec.revoked_ms is None:
            rec.revoked_ms = now_ms
            self._write_key(rec, overwrite=True)
        return rec

    def _write_key(self, rec: ApiKeyRecord, overwrite: bool) -> None:
        if self.readonly or self.keys is None:
            raise PermissionError(f"store at {self.location} is open read-only")
        txn = self.begin_write()
        try:
            if not txn.put(rec.key_id.encode(), rec.encode(), db=self.keys, overwrite=overwrite):
                raise ValueError(f"key id {rec.key_id!r} exists")
            raw = txn.get(KEYS_COUNTER, db=self.meta)
            txn.put(KEYS_COUNTER, str(int(raw or b"0") + 1).encode(), db=self.meta)
        except BaseException:
            self.abort_write(txn)
            raise
        txn.commit()

    def stat(self) -> dict[str, int]:
        info = self.env.info()
        st = self.env.stat()
        return {"map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * st["psize"]}


class WriteTxn:
    """One group-commit transaction: typed access to every record, with arm rows and policy
    states cached so that a batch reads and writes each at most once (`flush`)."""

    def __init__(self, store: Store, txn: lmdb.Transaction) -> None:
        self.store = store
        # Any: py-lmdb's stubs type values as bytes | memoryview, but without buffers=True it
        # returns bytes.
        self.txn: Any = txn
        self._arms: dict[str, dict[str, ArmRow]] = {}
        self._policy: dict[str, PolicyState] = {}
        self._definitions: dict[str, FeatureDefinition] = {}
        self._items: dict[str, ModelItems] = {}
        self._audit_seq = 0
        self.changes: dict[str, ExperimentChanges] = {}

    # Experiments.
    def experiment_json(self, experiment_id: str) -> dict[str, Any] | None:
        raw = self.txn.get(experiment_id.encode(), db=self.store.experiments)
        return None if raw is None else orjson.loads(raw)

    def put_experiment(self, experiment_id: str, spec_json: dict[str, Any]) -> None:
        self.txn.put(experiment_id.encode(), orjson.dumps(spec_json), db=self.store.experiments)
        self.bump(SPECS_COUNTER)

    # Statistics (cached for the batch, written by flush).
    def _change(self, experiment_id: str) -> ExperimentChanges:
        ch = self.changes.get(experiment_id)
        if ch is None:
            ch = self.changes[experiment_id] = ExperimentChanges(self.policy(experiment_id))
        return ch

    def policy(self, experiment_id: str) -> PolicyState:
        st = self._policy.get(experiment_id)
        if st is None:
            raw = self.txn.get(experiment_id.encode(), db=self.store.policy)
            st = PolicyState.decode(raw) if raw is not None else PolicyState()
            self._policy[experiment_id] = st
            self._change(experiment_id)
        return st

    def arm(self, experiment_id: str, arm_id: str) -> ArmRow:
        rows = self._arms.setdefault(experiment_id, {})
        row = rows.get(arm_id)
        if row is None:
            raw = self.txn.get(key(experiment_id, arm_id), db=self.store.arms)
            row = ArmRow.decode(raw) if raw is not None else ArmRow()
            rows[arm_id] = row
            self._change(experiment_id).arms[arm_id] = row
        return row

    def all_arms(self, experiment_id: str) -> dict[str, ArmRow]:
        """Every stored arm row of an experiment (for a rescale of all weights)."""
        prefix = key(experiment_id, "")
        cur = self.txn.cursor(db=self.store.arms)
        if cur.set_range(prefix):
            for k, _ in cur:
                if not k.startswith(prefix):
                    break
                self.arm(experiment_id, k[len(prefix) :].decode())
        return self._arms.get(experiment_id, {})

    # Contextual models.
    def model_definition(self, experiment_id: str) -> FeatureDefinition:
        fd = self._definitions.get(experiment_id)
        if fd is None:
            raw = self.txn.get(experiment_id.encode(), db=self.store.models)
            fd = FeatureDefinition.decode(bytes(raw)) if raw is not None else FeatureDefinition()
            self._definitions[experiment_id] = fd
        return fd

    def put_model_definition(self, experiment_id: str, fd: FeatureDefinition) -> None:
        """A new feature definition: the log of the versions before it is dropped (their
        models restart), and the other processes see the `models` counter move."""
        cur = self.txn.cursor(db=self.store.modellog)
        prefix = key(experiment_id, "")
        if cur.set_range(prefix):
            while cur.key().startswith(prefix) and cur.key() < model_log_key(experiment_id, fd.version):
                if not cur.delete():
                    break
        self._items.pop(experiment_id, None)
        # Each version's log counts from 1: a process knows it has every entry when the
        # entry it gets follows the last one it applied.
        self.txn.put(MODEL_SEQ + experiment_id.encode(), b"0", db=self.store.meta)
        self.txn.put(experiment_id.encode(), fd.encode(), db=self.store.models)
        self._definitions[experiment_id] = fd
        self.bump(MODELS_COUNTER)

    def model_item(self, experiment_id: str, arm: int, x: bytes, w: float, wy: float, wyy: float) -> None:
        self._items.setdefault(experiment_id, ModelItems()).add(arm, x, w, wy, wyy)

    def flush(self) -> None:
        for exp, items in self._items.items():
            if not items.arms:
                continue
            name = MODEL_SEQ + exp.encode()
            seq = int(self.txn.get(name, db=self.store.meta) or b"0") + 1
            self.txn.put(name, str(seq).encode(), db=self.store.meta)
            version = self.model_definition(exp).version
            self.txn.put(model_log_key(exp, version, seq), items.encode(), db=self.store.modellog)
            ch = self._change(exp)
            ch.model_version, ch.model_seq, ch.model_items = version, seq, items
        for exp, rows in self._arms.items():
            for arm_id, row in rows.items():
                self.txn.put(key(exp, arm_id), row.encode(), db=self.store.arms)
        for exp, st in self._policy.items():
            self.txn.put(exp.encode(), st.encode(), db=self.store.policy)
        for exp, ch in self.changes.items():
            name = STATS_COUNTER + exp.encode()
            ch.counter_before = int(self.txn.get(name, db=self.store.meta) or b"0")
            ch.counter_after = ch.counter_before + 1
            self.txn.put(name, str(ch.counter_after).encode(), db=self.store.meta)
            written = SEP.join(a.encode() for a in self._arms.get(exp, ()))
            self.txn.put(armlog_key(exp.encode(), ch.counter_after), written, db=self.store.meta)
            if ch.counter_after > ARMLOG_KEEP:
                self.txn.delete(armlog_key(exp.encode(), ch.counter_after - ARMLOG_KEEP), db=self.store.meta)

    def bump(self, counter: bytes) -> None:
        raw = self.txn.get(counter, db=self.store.meta)
        self.txn.put(counter, str(int(raw or b"0") + 1).encode(), db=self.store.meta)

    def delete_experiment_state(self, experiment_id: str) -> None:
        """Drops an experiment's statistics (a re-create after a failed create)."""
        self.txn.delete(experiment_id.encode(), db=self.store.policy)

    # Decisions and outcomes.
    def put_decision(self, rec: DecisionRecord) -> None:
        self.txn.put(rec.decision_id.encode(), rec.encode(), db=self.store.decisions)

    def put_decision_items(self, items: list[tuple[bytes, bytes]]) -> None:
        """Encoded records (decision id, `DecisionRecord.encode()` bytes), sorted by id."""
        self.txn.cursor(db=self.store.decisions).putmulti(items)

    def decision(self, decision_id: str) -> DecisionRecord | None:
        k = decision_id.partition(".")[0].encode()
        raw = self.txn.get(k, db=self.store.decisions) if k else None
        if raw is None:
            return None
        raw = bytes(raw)
        if DecisionBatch.is_batch(raw):
            return batch_item(decision_id, raw) if "." in decision_id else None
        ref = _ref_target(raw)
        if ref is not None:
            found = self.txn.get(ref[0].encode(), db=self.store.decisions)
            return None if found is None else exposure_item(decision_id, bytes(found), ref[1])
        return DecisionRecord.decode(decision_id, raw) if "." not in decision_id else None

    def put_decision_batch(self, batch: DecisionBatch) -> None:
        self.txn.put(batch.batch_id.encode(), batch.encode(), db=self.store.decisions)

    def known_decisions(self, decision_ids: list[str]) -> set[str]:
        """Those of these ids that are stored already (one cursor call: one query on
        PostgreSQL; py-lmdb's single gets would release the GIL once each)."""
        keys = sorted(d.encode() for d in decision_ids)
        found = self.txn.cursor(db=self.store.decisions).getmulti(keys)
        return {bytes(k).decode() for k, _ in found}

    def put_exposure_batch(self, batch: DecisionBatch) -> None:
        """Stores an exposure batch and a reference under each of its SDK ids (which must be
        new: see `known_decisions`)."""
        assert batch.ids is not None
        self.put_decision_batch(batch)
        head, tail, pack = EXPOSURE_REF, batch.batch_id.encode(), _U32.pack
        refs = sorted((d.encode(), head + pack(i) + tail) for i, d in enumerate(batch.ids))
        self.txn.cursor(db=self.store.decisions).putmulti(refs)

    def has_decision(self, decision_id: str) -> bool:
        return self.txn.get(decision_id.encode(), db=self.store.decisions) is not None

    def outcome(self, decision_id: str, arm_id: str) -> Outcome | None:
        raw = self.txn.get(key(decision_id, arm_id), db=self.store.outcomes)
        return None if raw is None else Outcome.decode(raw)

    def put_outcome(self, decision_id: str, arm_id: str, outcome: Outcome) -> None:
        self.txn.put(key(decision_id, arm_id), outcome.encode(), db=self.store.outcomes)

    def assignment(self, experiment_id: str, unit_id: str) -> tuple[str, ...] | None:
        raw = self.txn.get(key(experiment_id, unit_id), db=self.store.assignments)
        return None if raw is None else tuple(orjson.loads(raw))

    def put_assignment(self, experiment_id: str, unit_id: str, arms: tuple[str, ...]) -> None:
        self.txn.put(key(experiment_id, unit_id), orjson.dumps(arms), db=self.store.assignments)

    def prefetch_rewards(self, events: list[tuple[str, str]], outcomes: list[tuple[str, str]]) -> None:
        """Reads ahead the event keys (experiment, event key) and outcomes (decision, arm) a
        reward batch will touch: one query each on PostgreSQL instead of one per reward (on
        LMDB reads are memory reads and this does nothing)."""
        prefetch = getattr(self.txn, "prefetch", None)
        if prefetch is None:
            return
        prefetch([key(e, k) for e, k in events], db=self.store.events)
        prefetch([key(d, a) for d, a in outcomes], db=self.store.outcomes)

    def add_event(self, experiment_id: str, event_key: str, ev: EventRecord) -> bool:
        """Stores a reward event once; False when its key was already seen (a duplicate)."""
        return bool(self.txn.put(key(experiment_id, event_key), ev.encode(), db=self.store.events, overwrite=False))

    # Maturation.
    def add_maturing(self, experiment_id: str, decision_id: str) -> None:
        self.txn.put(key(experiment_id, decision_id), b"", db=self.store.maturing)

    def is_maturing(self, experiment_id: str, decision_id: str) -> bool:
        return self.txn.get(key(experiment_id, decision_id), db=self.store.maturing) is not None

    def take_matured(self, experiment_id: str, cutoff_ms: int, limit: int) -> list[str]:
        """Removes and returns up to `limit` waiting decisions made before `cutoff_ms`."""
        prefix = key(experiment_id, "")
        cutoff = prefix + decision_time_prefix(cutoff_ms)
        cur = self.txn.cursor(db=self.store.maturing)
        out: list[str] = []
        if not cur.set_range(prefix):
            return out
        while len(out) < limit:
            k = cur.key()
            if not k or not k.startswith(prefix) or k >= cutoff:
                break
            out.append(k[len(prefix) :].decode())
            cur.delete()
        return out

    # Allocation snapshots.
    def put_allocation(self, experiment_id: str, snapshot: dict[str, Any]) -> int:
        """Stores a snapshot under the experiment's next version; returns the version."""
        name = ALLOCATION_SEQ + experiment_id.encode()
        version = int(self.txn.get(name, db=self.store.meta) or b"0") + 1
        self.txn.put(name, str(version).encode(), db=self.store.meta)
        self.txn.put(key(experiment_id, f"{version:016x}"), orjson.dumps({**snapshot, "version": version}),
                     db=self.store.allocations)  # fmt: skip
        return version

    # Audit log and history.
    def add_audit(self, entry: dict[str, Any]) -> None:
        """Appends an audit entry ({ts_unix_ms, experiment_id, action, actor, details})."""
        self._audit_seq += 1
        k = f"{entry['ts_unix_ms']:016x}".encode() + SEP + entry["experiment_id"].encode() + SEP
        self.txn.put(k + f"{self._audit_seq:08x}".encode(), orjson.dumps(entry), db=self.store.audit)

    def put_snapshot(self, experiment_id: str, ts_ms: int, snapshot: dict[str, Any]) -> None:
        self.txn.put(
            experiment_id.encode() + SEP + f"{ts_ms:016x}".encode(), orjson.dumps(snapshot), db=self.store.history_db
        )

    def thin_history(self, now_ms: int, rules: tuple[tuple[int, int], ...], limit: int) -> int:
        """Keeps one snapshot per `step` ms for snapshots older than `age` ms, for each
        (age, step) rule (the coarsest rule that applies wins); returns how many were deleted."""
        removed = 0
        cur = self.txn.cursor(db=self.store.history_db)
        ok = cur.first()
        last: tuple[bytes, int, int] | None = None  # (experiment, step, bucket) of the kept one
        while ok and removed < limit:
            k = bytes(cur.key())
            exp, _, ts_hex = k.rpartition(SEP)
            ts = int(ts_hex, 16)
            age = now_ms - ts
            step = max((st for a, st in rules if age >= a), default=0)
            if step:
                bucket = ts // step
                if last is not None and last == (exp, step, bucket):
                    cur.delete()  # moves to the next record
                    removed += 1
                    ok = bool(cur.key())
                    continue
                last = (exp, step, bucket)
            else:
                last = None
            ok = cur.next()
        return removed

    # Retention.
    def expire(self, cutoff_ms: int, events_from: bytes, limit: int) -> tuple[int, int, bytes]:
        """Deletes up to `limit` decisions (with their outcomes) and events older than the
        cutoff; returns (decisions, events, where the next events scan continues)."""
        cutoff = decision_time_prefix(cutoff_ms)
        decisions = 0
        for db in (self.store.decisions, self.store.outcomes):
            cur = self.txn.cursor(db=db)
            cur.first()
            removed = 0
            # delete() moves to the next record; an empty key means the end of the database.
            while removed < limit and cur.key() and cur.key()[:DECISION_TIME_CHARS] < cutoff:
                cur.delete()
                removed += 1
            if db is self.store.decisions:
                decisions = removed
        events = 0
        cur = self.txn.cursor(db=self.store.events)
        if events_from:
            cur.set_range(events_from)
        else:
            cur.first()
        scanned = 0
        while cur.key() and scanned < limit:
            scanned += 1
            if EventRecord.decode(cur.value()).ts_ms < cutoff_ms:
                cur.delete()
                events += 1
            else:
                cur.next()
        next_from = bytes(cur.key()) if scanned == limit and cur.key() else b""
        return decisions, events, next_from


class _SharedExclusive:
    """A readers-writer lock: many readers, or one exclusive holder (map growth)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
