"""A py-lmdb–compatible key-value store on PostgreSQL (the subset banditd's `Store` uses).

Several banditd nodes can share one database through it. The mapping:

* An `Environment` is a PostgreSQL database reached through a small connection pool; named
  sub-databases (`open_db`) are rows of `kv_databases`, records are rows of
  ``kv (db, k, v)`` with primary key ``(db, k)``. ``bytea`` compares bytewise, as LMDB's
  default key order does.
* A write transaction is a PostgreSQL transaction (READ COMMITTED) that first takes
  ``pg_advisory_xact_lock(WRITER_LOCK)``: write transactions of every node run one at a
  time, like LMDB's single writer, so read-modify-writes stay correct across nodes. Puts and
  deletes are buffered in the transaction (reads see them) and sent in one statement each at
  commit, or earlier when the server has to see them (`stat`, `drop`, a large buffer).
* A read transaction is ``REPEATABLE READ READ ONLY``: one consistent snapshot. It starts
  with its first operation (begin() itself costs nothing), so the snapshot is taken then and
  not at begin() as in LMDB.
* Cursors read the server in pages and merge the transaction's buffered writes; positioning
  follows LMDB including its states after a failed move (see `Cursor`).

Errors: a lost or refused connection raises `Unavailable`, any other server failure
`StorageError` (both subclass `lmdb.Error`, like `NotFoundError`, `BadValsizeError` and
`ReadonlyError` subclass their lmdb namesakes). The failed transaction is rolled back and its
connection returned; the next `begin()` connects anew, so a restarted server needs no restart
of the process. A failed commit whose connection broke may or may not have been applied.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
import zlib
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from typing import Any

import lmdb
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

log = logging.getLogger("banditd.pgkv")

MAX_KEY_SIZE = 511  # LMDB's default limit, enforced on writes as LMDB does
MAP_SIZE = 1 << 50  # reported by info(); the database grows as PostgreSQL's storage allows
LOCK_CLASS = 0x62616E64  # "band": first key of every advisory lock taken here
WRITER_LOCK = 1  # serializes write transactions of all nodes
MIGRATION_LOCK = 2  # serializes schema migrations of nodes starting at once
FLUSH_AT = 50_000  # buffered puts/deletes sent to the server before commit beyond this many
PAGE_MIN = 64  # rows a cursor fetches at first; doubles per fetch up to PAGE_MAX
PAGE_MAX = 1024
MAIN_DB = ""  # the unnamed database (db=None)

# Versioned schema migrations, applied in order at open under MIGRATION_LOCK. Append new
# versions; never edit an applied one. Every object is named so later versions can alter it.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "key-value tables",
        (
            """CREATE TABLE kv_databases (
                   name text NOT NULL,
                   created_at timestamptz NOT NULL DEFAULT now(),
                   CONSTRAINT kv_databases_pkey PRIMARY KEY (name)
               )""",
            """CREATE TABLE kv (
                   db text NOT NULL,
                   k bytea NOT NULL,
                   v bytea NOT NULL,
                   CONSTRAINT kv_pkey PRIMARY KEY (db, k)
               ) WITH (fillfactor = 90)""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
_LOCK_WRITER = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, {WRITER_LOCK})"
_GET = "SELECT v FROM kv WHERE db = %b AND k = %b"
# One primary-key probe per key, whatever the statistics say: as `k = ANY(...)` the planner
# scanned every row of the database when its row estimate was stale (a young table).
_GET_MANY = (
    "SELECT k, v FROM (SELECT q.k, (SELECT kv.v FROM kv WHERE kv.db = %b AND kv.k = q.k) AS v "
    "FROM unnest(%b::bytea[]) AS q(k)) AS found WHERE v IS NOT NULL"
)
_COUNT = "SELECT count(*) FROM kv WHERE db = %b"
_UPSERT = (
    "INSERT INTO kv (db, k, v) SELECT * FROM unnest(%b::text[], %b::bytea[], %b::bytea[]) "
    "ON CONFLICT (db, k) DO UPDATE SET v = EXCLUDED.v"
)
_DELETE = "DELETE FROM kv USING unnest(%b::text[], %b::bytea[]) AS d(db, k) WHERE kv.db = d.db AND kv.k = d.k"
# Server shutting down, crashed, starting, too many connections; read-only (a standby after failover).
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "25006"})


def _page_sql(forward: bool, n: int, bounded: bool) -> str:
    if forward:
        return f"SELECT k, v FROM kv WHERE db = %b AND k >= %b ORDER BY k LIMIT {n}"
    if bounded:
        return f"SELECT k, v FROM kv WHERE db = %b AND k < %b ORDER BY k DESC LIMIT {n}"
    return f"SELECT k, v FROM kv WHERE db = %b ORDER BY k DESC LIMIT {n}"


# Errors.
class Error(lmdb.Error):
    """Base class of pgkv's errors (an `lmdb.Error`, so LMDB-minded handlers catch it)."""


class Unavailable(Error):
    """PostgreSQL cannot be reached, refused the connection, or the connection broke."""


class StorageError(Error):
    """PostgreSQL failed the operation (disk full, out of memory, constraint, ...)."""


class SchemaError(Error):
    """The database's schema is newer than this code, or missing in read-only mode."""


class NotFoundError(Error, lmdb.NotFoundError):
    """open_db(create=False) of a database that does not exist."""


class BadValsizeError(Error, lmdb.BadValsizeError):
    """An empty key, or a key longer than 511 bytes written."""


class ReadonlyError(Error, lmdb.ReadonlyError):
    """A write in a read transaction or a read-only environment."""


def _is_unavailable(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    if conn is not None and (conn.broken or conn.closed):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _UNAVAILABLE_STATES


def _translate(exc: BaseException, what: str, conn: psycopg.Connection[Any] | None = None) -> Error:
    if isinstance(exc, Error):
        return exc
    detail = str(exc).strip() or type(exc).__name__
    if _is_unavailable(exc, conn):
        return Unavailable(f"PostgreSQL is unavailable ({what}): {detail}")
    state = getattr(exc, "sqlstate", None)
    return StorageError(f"PostgreSQL error{' ' + state if state else ''} ({what}): {detail}")


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def _lookup_key(key: Any) -> bytes:
    k = _as_bytes(key, "key")
    if not k:
        raise BadValsizeError("MDB_BAD_VALSIZE: empty key")
    return k


def _write_key(key: Any) -> bytes:
    k = _lookup_key(key)
    if len(k) > MAX_KEY_SIZE:
        raise BadValsizeError(f"MDB_BAD_VALSIZE: key of {len(k)} bytes (at most {MAX_KEY_SIZE})")
    return k


def redact_url(url: str) -> str:
    """The URL as a postgresql:// URL without its password (also one given as a parameter),
    for logs and messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid conninfo>"
    if "password" in params:
        params["password"] = "***"
    host, port, dbname, user = (str(params.get(n) or "") for n in ("host", "port", "dbname", "user"))
    return f"postgresql://{user + '@' if user else ''}{host}{':' + port if port else ''}/{dbname}"


# Connections.
class _Pool:
    """At most `size` connections (autocommit; transactions are begun explicitly). A
    connection is made on demand when none is idle, so after a server restart the next
    request connects at once (no background reconnection with back-off)."""

    def __init__(self, conninfo: str, size: int, timeout: float, max_idle: float) -> None:
        self.conninfo = conninfo
        self.size = size
        self.timeout = timeout
        self.max_idle = max_idle
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._lock = threading.Lock()
        self._in_use = 0
        self.closed = False

    def get(self) -> psycopg.Connection[Any]:
        if self.closed:
            raise Error("the environment is closed")
        if not self._slots.acquire(timeout=self.timeout):
            raise Unavailable(f"no PostgreSQL connection free within {self.timeout:g} s (all {self.size} in use)")
        try:
            conn = self._take_idle()
            if conn is None:
                conn = psycopg.connect(self.conninfo, autocommit=True)
            with self._lock:
                self._in_use += 1
            return conn
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, psycopg.Error):
                raise _translate(exc, "connect") from exc
            raise

    def _take_idle(self) -> psycopg.Connection[Any] | None:
        now = time.monotonic()
        stale: list[psycopg.Connection[Any]] = []
        conn = None
        with self._lock:
            while self._idle:
                c, since = self._idle.pop()
                if now - since > self.max_idle or c.closed:
                    stale.append(c)
                else:
                    conn = c
                    break
        for c in stale:
            c.close()
        return conn

    def put(self, conn: psycopg.Connection[Any], discard: bool = False) -> None:
        """Returns a connection; one inside a transaction is rolled back (or closed)."""
        try:
            if not (discard or conn.closed or conn.broken or self.closed):
                status = conn.info.transaction_status
                if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    try:
                        conn.execute("ROLLBACK")
                        status = conn.info.transaction_status
                    except psycopg.Error:
                        discard = True
                if not discard and status == TransactionStatus.IDLE:
                    with self._lock:
                        self._idle.append((conn, time.monotonic()))
                    return
            conn.close()
        finally:
            with self._lock:
                self._in_use -= 1
            self._slots.release()

    def discard_idle(self) -> None:
        """Closes every idle connection (after one turned out broken: they are likely all
        from before a server restart)."""
        with self._lock:
            conns, self._idle = self._idle, []
        for conn, _ in conns:
            conn.close()

    @property
    def in_use(self) -> int:
        return self._in_use

    def close(self) -> None:
        self.closed = True
        self.discard_idle()

    def run(self, what: str, query: str, params: Sequence[Any] = (), binary: bool = True) -> list[tuple[Any, ...]]:
        """One autocommit statement; retried once on a connection that turns out broken."""
        for attempt in (0, 1):
            conn = self.get()
            try:
                rows = conn.execute(query, params, binary=binary).fetchall()
            except psycopg.Error as exc:
                broken = conn.broken or conn.closed
                self.put(conn, discard=broken)
                if broken and attempt == 0:
                    self.discard_idle()
                    continue
                raise _translate(exc, what, conn) from exc
            except BaseException:
                self.put(conn)
                raise
            self.put(conn)
            return rows
        raise AssertionError("unreachable")


# Environment.
class Database:
    """A named sub-database handle (like lmdb's _Database)."""

    __slots__ = ("name", "env")

    def __init__(self, env: Environment, name: str) -> None:
        self.env = env
        self.name = name

    def flags(self) -> dict[str, bool]:
        return dict.fromkeys(("reverse_key", "dupsort", "integerkey", "integerdup", "dupfixed"), False)

    def __repr__(self) -> str:
        return f"<pgkv.Database {self.name!r}>"


class Environment:
    """`lmdb.Environment` on a PostgreSQL database.

    `url` is a libpq URL or conninfo string. At most `pool_size` transactions run at once in
    this process; `begin()` waits up to `timeout` seconds for a free connection. A session
    idle inside a transaction for `idle_in_transaction_timeout` seconds is ended by the server
    (0: never), so a hung node cannot hold the write lock forever.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        timeout: float = 10.0,
        readonly: bool = False,
        connect_timeout: int = 5,
        idle_in_transaction_timeout: float = 60.0,
        max_idle: float = 300.0,
        application_name: str = "banditd",
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.url = url
        self.readonly = readonly
        params = conninfo_to_dict(url)
        params.setdefault("connect_timeout", str(max(2, int(connect_timeout))))
        params.setdefault("application_name", application_name)
        for name, value in (("keepalives", "1"), ("keepalives_idle", "30"), ("keepalives_interval", "10"),
                            ("keepalives_count", "3")):  # fmt: skip
            params.setdefault(name, value)
        if idle_in_transaction_timeout:
            opt = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout * 1000)}"
            params["options"] = f"{params['options']} {opt}" if params.get("options") else opt
        self._conninfo = make_conninfo("", **params)
        self._pool = _Pool(self._conninfo, pool_size, timeout, max_idle)
        self._dbs: dict[str, Database] = {MAIN_DB: Database(self, MAIN_DB)}
        self._dbs_lock = threading.Lock()
        self._listeners: dict[str, tuple[psycopg.Connection[Any], threading.Lock]] = {}
        self._listen_lock = threading.Lock()
        self._held: dict[str, psycopg.Connection[Any]] = {}  # session locks `hold` took
        self._held_lock = threading.Lock()
        if readonly:
            self._check_schema()
        else:
            self._migrate()

    # Schema.
    def _direct(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._conninfo)
        except psycopg.Error as exc:
            raise _translate(exc, f"connect to {redact_url(self.url)}") from exc

    def _migrate(self) -> None:
        conn = self._direct()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
                found = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
                if not (found and found[0]):
                    conn.execute(
                        "CREATE TABLE schema_migrations (version integer NOT NULL, name text NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT now(), "
                        "CONSTRAINT schema_migrations_pkey PRIMARY KEY (version))"
                    )
                applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
                newest = max(applied, default=0)
                if newest > SCHEMA_VERSION:
                    raise SchemaError(
                        f"database {redact_url(self.url)} has schema version {newest}; this banditd knows up to "
                        f"{SCHEMA_VERSION}: it was written by a newer banditd"
                    )
                for version, name, statements in MIGRATIONS:
                    if version in applied:
                        continue
                    for statement in statements:
                        conn.execute(statement)  # type: ignore[arg-type]  # constant SQL
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                    log.info("applied schema migration %d (%s) to %s", version, name, redact_url(self.url))
        except psycopg.Error as exc:
            raise _translate(exc, "schema migration", conn) from exc
        finally:
            conn.close()

    def _check_schema(self) -> None:
        exists = self._pool.run("schema check", "SELECT to_regclass('schema_migrations') IS NOT NULL", binary=False)
        version: int | None = None
        if exists[0][0]:
            rows = self._pool.run("schema check", "SELECT max(version) FROM schema_migrations", binary=False)
            version = rows[0][0]
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"database {redact_url(self.url)} has pgkv schema version {version}, this banditd needs "
                f"{SCHEMA_VERSION}: open it read-write once to migrate it"
                + (" (it was written by a newer banditd)" if (version or 0) > SCHEMA_VERSION else "")
            )

    # lmdb.Environment API.
    def open_db(
        self,
        key: bytes | None = None,
        txn: Transaction | None = None,
        reverse_key: bool = False,
        dupsort: bool = False,
        create: bool = True,
        integerkey: bool = False,
        integerdup: bool = False,
        dupfixed: bool = False,
    ) -> Database:
        if reverse_key or dupsort or integerkey or integerdup or dupfixed:
            raise NotImplementedError("pgkv supports plain databases only (no reverse_key/dupsort/integer keys)")
        if key is None:
            return self._dbs[MAIN_DB]
        name = _as_bytes(key, "database name").decode()
        if not name:
            raise BadValsizeError("MDB_BAD_VALSIZE: empty database name")
        with self._dbs_lock:
            if name in self._dbs:
                return self._dbs[name]
        if txn is not None:
            found = bool(txn._q("SELECT 1 FROM kv_databases WHERE name = %b", (name,)))
            if not found:
                if not create:
                    raise NotFoundError(f"MDB_NOTFOUND: no database {name!r}")
                if not txn.write:
                    raise ReadonlyError(f"cannot create database {name!r} in a read transaction")
                txn._q("INSERT INTO kv_databases (name) VALUES (%b) ON CONFLICT DO NOTHING RETURNING 1", (name,))
        elif create:
            if self.readonly:
                if not self._pool.run("open_db", "SELECT 1 FROM kv_databases WHERE name = %b", (name,)):
                    raise ReadonlyError(f"cannot create database {name!r} in a read-only environment")
            else:
                self._pool.run(
                    "open_db",
                    "INSERT INTO kv_databases (name) VALUES (%b) ON CONFLICT DO NOTHING RETURNING 1",
                    (name,),
                )
        elif not self._pool.run("open_db", "SELECT 1 FROM kv_databases WHERE name = %b", (name,)):
            raise NotFoundError(f"MDB_NOTFOUND: no database {name!r}")
        db = Database(self, name)
        if txn is None or txn.write:
            # A handle opened in a write transaction stays valid if it aborts: the row is
            # recreated by the next open_db(create=True); a miss after that is reported by
            # open_db(create=False) only, as in LMDB.
            with self._dbs_lock:
                db = self._dbs.setdefault(name, db)
        return db

    def begin(
        self, db: Database | None = None, parent: Any = None, write: bool = False, buffers: bool = False
    ) -> Transaction:
        if parent is not None:
            raise NotImplementedError("pgkv has no nested transactions")
        if write and self.readonly:
            raise ReadonlyError("the environment is open read-only")
        return Transaction(self, db, write)

    def dbs(self, txn: Transaction | None = None) -> list[bytes]:
        query = "SELECT name FROM kv_databases ORDER BY name"
        rows = txn._q(query, ()) if txn is not None else self._pool.run("dbs", query)
        return [name.encode() for (name,) in rows]

    def info(self) -> dict[str, int]:
        size, xmax, psize = self._pool.run(
            "info",
            "SELECT coalesce(pg_total_relation_size(to_regclass('kv')), 0), "
            "txid_snapshot_xmax(txid_current_snapshot()), current_setting('block_size')::integer",
            binary=False,
        )[0]
        return {
            "map_addr": 0,
            "map_size": MAP_SIZE,
            "last_pgno": max(0, -(-int(size) // int(psize)) - 1),
            "last_txnid": int(xmax) - 1,
            "max_readers": self._pool.size,
            "num_readers": self._pool.in_use,
        }

    def stat(self) -> dict[str, int]:
        """Like lmdb's stat of the main database: `entries` counts the named databases,
        `leaf_pages` the pages of the kv table and its indexes."""
        size, psize, entries = self._pool.run(
            "stat",
            "SELECT coalesce(pg_total_relation_size(to_regclass('kv')), 0), current_setting('block_size')::integer, "
            "(SELECT count(*) FROM kv_databases)",
            binary=False,
        )[0]
        return {
            "psize": int(psize),
            "depth": 0,
            "branch_pages": 0,
            "leaf_pages": -(-int(size) // int(psize)),
            "overflow_pages": 0,
            "entries": int(entries),
        }

    def path(self) -> str:
        """The database URL without its password."""
        return redact_url(self.url)

    def set_mapsize(self, map_size: int) -> None:
        """No-op: PostgreSQL has no map to grow."""

    def sync(self, force: bool = False) -> None:
        """No-op: a commit is durable when PostgreSQL acknowledges it."""

    def max_key_size(self) -> int:
        return MAX_KEY_SIZE

    def max_readers(self) -> int:
        return self._pool.size

    def close(self) -> None:
        """Closes idle connections; connections of open transactions close when they end."""
        self._pool.close()
        with self._listen_lock:
            listeners, self._listeners = self._listeners, {}
        for conn, _ in listeners.values():
            conn.close()
        with self._held_lock:
            held, self._held = self._held, {}
        for held_conn in held.values():
            held_conn.close()

    def hold(self, name: str) -> bool:
        """True while this process holds the session advisory lock `name`: one holder among
        all nodes (for jobs one node should run: history snapshots, retention sweeps). It is
        taken on a dedicated connection and kept; when the holder dies its session ends and
        another node's next call takes it. False when another node holds it or the server
        cannot be reached."""
        key = zlib.crc32(name.encode()) & 0x7FFFFFFF
        with self._held_lock:
            conn = self._held.get(name)
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    conn.close()
                    del self._held[name]
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True)
            except psycopg.Error:
                return False
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS + 1, key)).fetchone()
            except psycopg.Error:
                conn.close()
                return False
            if row is not None and row[0]:
                self._held[name] = conn
                return True
            conn.close()
            return False

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Change notification between nodes (PostgreSQL LISTEN/NOTIFY).
    def notify(self, channel: str, payload: str = "") -> None:
        """Wakes `wait_for_notify(channel)` in every node (Transaction.notify does it at commit)."""
        self._pool.run("notify", "SELECT pg_notify(%s, %s)", (channel, payload), binary=False)

    def wait_for_notify(self, channel: str, timeout: float) -> bool:
        """True when `channel` was notified since the previous call (the first call starts
        listening, so it misses earlier notifications), False after `timeout` seconds without.
        One dedicated connection per channel; raises Unavailable when it cannot listen."""
        with self._listen_lock:
            entry = self._listeners.get(channel)
            if entry is None:
                entry = self._listeners[channel] = (self._listen(channel), threading.Lock())
        conn, lock = entry
        with lock:
            if conn.closed or conn.broken:
                conn = self._listen(channel)
                with self._listen_lock:
                    self._listeners[channel] = (conn, lock)
            try:
                got = False
                for _ in conn.notifies(timeout=timeout, stop_after=1):
                    got = True
                if got:
                    for _ in conn.notifies(timeout=0):
                        pass  # drain the rest: one wake-up per call
                return got
            except psycopg.Error as exc:
                conn.close()  # reconnected by the next call
                raise _translate(exc, "wait for notification", conn) from exc

    def _listen(self, channel: str) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise _translate(exc, "listen") from exc
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            conn.close()
            raise _translate(exc, "listen", conn) from exc
        return conn


# Transactions.
class Transaction:
    """`lmdb.Transaction`: a context manager that commits on success and aborts on an
    exception. Not for concurrent use by several threads (nor is LMDB's)."""

    def __init__(self, env: Environment, db: Database | None, write: bool) -> None:
        self.env = env
        self.write = write
        self._db = db if db is not None else env._dbs[MAIN_DB]
        self._conn: psycopg.Connection[Any] | None = None
        self._done = False
        self._failed: Error | None = None
        # Buffered writes: db -> key -> value, None marking a delete.
        self._ov: dict[str, dict[bytes, bytes | None]] = {}
        self._ov_sorted: dict[str, list[bytes]] = {}  # sorted keys of _ov[db], once a cursor needs them
        # Server values read ahead by `prefetch` (None: absent), consulted after the overlay;
        # cleared when buffered writes are sent (the overlay no longer shadows them then).
        self._read_ahead: dict[str, dict[bytes, bytes | None]] = {}
        self._ov_count = 0
        self.mutations = 0  # bumped by every put/delete (cursors refresh their record on a change)
        self.generation = 0  # bumped whenever the server's rows change (cursors drop their pages)
        self._append_last: dict[str, tuple[int, bytes]] = {}
        self._cursors: dict[str, weakref.WeakSet[Cursor]] = {}  # open cursors, moved by writes as in LMDB
        if write:
            self._start(None, ())

    # Connection and statements.
    def _start(self, query: str | None, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Takes a connection and begins (write: plus the writer lock), pipelined with the
        first statement. A connection found broken (e.g. from before a server restart) is
        replaced once: nothing was done on it yet."""
        pool = self.env._pool
        for attempt in (0, 1):
            conn = pool.get()
            try:
                with conn.pipeline():
                    if self.write:
                        conn.execute(_BEGIN_WRITE)
                        conn.execute(_LOCK_WRITER)
                    else:
                        conn.execute(_BEGIN_READ)
                    cur = conn.execute(query, params, prepare=True, binary=True) if query else None
                rows = cur.fetchall() if cur is not None else []
            except psycopg.Error as exc:
                broken = conn.broken or conn.closed
                pool.put(conn, discard=broken)
                if broken and attempt == 0:
                    pool.discard_idle()
                    continue
                self._failed = _translate(exc, "begin", conn)
                raise self._failed from exc
            except BaseException as exc:
                pool.put(conn, discard=True)
                self._failed = Error(f"interrupted while beginning: {exc!r}")
                raise
            self._conn = conn
            return rows
        raise AssertionError("unreachable")

    def _live(self) -> None:
        if self._failed is not None:  # same class (Unavailable, StorageError, ...) as the failure
            raise type(self._failed)(f"the transaction failed and must be aborted: {self._failed}")
        if self._done:
            raise Error("Attempt to operate on closed/deleted/dropped object.")

    def _q(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self._live()
        conn = self._conn
        if conn is None:
            assert not self.write, "a live write transaction always holds its connection"
            return self._start(query, params)
        try:
            return conn.execute(query, params, prepare=True, binary=True).fetchall()
        except psycopg.Error as exc:
            raise self._fail(exc, "query") from exc
        except BaseException as exc:
            self._interrupted(exc)
            raise

    def _interrupted(self, exc: BaseException) -> None:
        """KeyboardInterrupt and the like mid-statement: the connection's state is unknown."""
        self._failed = Error(f"interrupted: {exc!r}")
        self._release(discard=True)

    def _fail(self, exc: BaseException, what: str) -> Error:
        err = _translate(exc, what, self._conn)
        self._failed = err
        self._release()
        return err

    def _release(self, discard: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.env._pool.put(conn, discard=discard)

    def _dbname(self, db: Database | None) -> str:
        if db is None:
            return self._db.name
        if not isinstance(db, Database):
            raise TypeError(f"db must be a pgkv.Database, not {type(db).__name__}")
        return db.name

    def _need_write(self) -> None:
        self._live()
        if not self.write:
            raise ReadonlyError("MDB_READONLY: write in a read-only transaction")

    def _write_attempt(self, key: Any, lookup: bool = False) -> bytes:
        """The key of a put/delete/replace, after the checks LMDB makes; a refused attempt still
        counts as a write for cursors (py-lmdb counts the call), a TypeError does not."""
        try:
            self._need_write()
            return _lookup_key(key) if lookup else _write_key(key)
        except (ReadonlyError, BadValsizeError):
            self.mutations += 1
            raise

    # Buffered writes.
    def _track(self, cursor: Cursor) -> None:
        cursors = self._cursors.get(cursor.db)
        if cursors is None:
            cursors = self._cursors[cursor.db] = weakref.WeakSet()
        cursors.add(cursor)

    def _untrack(self, cursor: Cursor) -> None:
        cursors = self._cursors.get(cursor.db)
        if cursors is not None:
            cursors.discard(cursor)

    def _set(self, db: str, key: bytes, value: bytes | None) -> None:
        cursors = list(self._cursors.get(db, ()))
        for c in cursors:
            c._before_write()
        d = self._ov.get(db)
        if d is None:
            d = self._ov[db] = {}
        if key not in d:
            self._ov_count += 1
            keys = self._ov_sorted.get(db)
            if keys is not None:
                if not keys or key > keys[-1]:
                    keys.append(key)
                else:
                    insort(keys, key)
        d[key] = value
        self.mutations += 1
        if value is None and cursors:
            # LMDB moves cursors off a deleted record, and resets them all when the database
            # becomes empty (its root page goes away).
            nxt = cursors[0]._gt(key)
            empty = nxt is None and cursors[0]._lt(key) is None
            for c in cursors:
                c._after_delete(key, nxt, empty)
        if self._ov_count >= FLUSH_AT:
            self._flush()

    def _sorted_keys(self, db: str) -> list[bytes]:
        keys = self._ov_sorted.get(db)
        if keys is None:
            keys = self._ov_sorted[db] = sorted(self._ov.get(db, ()))
        return keys

    def _flush_params(self) -> tuple[list[Any], list[Any]]:
        pdb: list[str] = []
        pk: list[bytes] = []
        pv: list[bytes] = []
        ddb: list[str] = []
        dk: list[bytes] = []
        for db, d in self._ov.items():
            for k, v in d.items():
                if v is None:
                    ddb.append(db)
                    dk.append(k)
                else:
                    pdb.append(db)
                    pk.append(k)
                    pv.append(v)
        return ([ddb, dk] if dk else []), ([pdb, pk, pv] if pk else [])

    def _flush(self, commit: bool = False) -> None:
        """Sends buffered writes (and COMMIT) in one round trip."""
        self._live()
        conn = self._conn
        assert conn is not None or not self._ov_count
        if conn is None:
            return
        deletes, puts = self._flush_params()
        try:
            with conn.pipeline():
                if deletes:
                    conn.execute(_DELETE, deletes, prepare=True)
                if puts:
                    conn.execute(_UPSERT, puts, prepare=True)
                if commit:
                    conn.execute("COMMIT")
        except psycopg.Error as exc:
            what = "commit (it may or may not have been applied)" if commit and (conn.broken or conn.closed) else (
                "commit" if commit else "write"
            )
            raise self._fail(exc, what) from exc
        except BaseException as exc:
            self._interrupted(exc)
            raise
        if deletes or puts:
            self._ov.clear()
            self._ov_sorted.clear()
            self._read_ahead.clear()
            self._ov_count = 0
            self.generation += 1

    # Reads shared with cursors.
    def _server_get(self, db: str, key: bytes) -> bytes | None:
        rows = self._q(_GET, (db, key))
        return rows[0][0] if rows else None

    def _lookup(self, db: str, key: bytes) -> bytes | None:
        d = self._ov.get(db)
        if d is not None and key in d:
            return d[key]
        ahead = self._read_ahead.get(db)
        if ahead is not None and key in ahead:
            return ahead[key]
        return self._server_get(db, key)

    def prefetch(self, keys: Iterable[Any], db: Database | None = None) -> None:
        """Reads these keys' values in one query, so that later `get`s and `put(overwrite=
        False)`s of them in this transaction need no round trip each (not in py-lmdb, whose
        reads are memory reads: callers check for it). The snapshot rules are unchanged: in
        a write transaction the writer lock is held, so nobody changes them meanwhile."""
        self._live()
        name = self._dbname(db)
        shadow = self._ov.get(name, {})
        ahead = self._read_ahead.setdefault(name, {})
        want = sorted({k for k in map(_lookup_key, keys) if k not in shadow and k not in ahead})
        if not want:
            return
        found = dict(self._q(_GET_MANY, (name, want)))
        for k in want:
            ahead[k] = bytes(found[k]) if k in found else None

    # lmdb.Transaction API.
    def id(self) -> int:
        if self.write:
            rows = self._q("SELECT txid_current()", ())
            return int(rows[0][0])
        return 0

    def get(self, key: Any, default: Any = None, db: Database | None = None) -> Any:
        self._live()
        k = _lookup_key(key)
        value = self._lookup(self._dbname(db), k)
        return default if value is None else value

    def put(
        self,
        key: Any,
        value: Any,
        dupdata: bool = True,
        overwrite: bool = True,
        append: bool = False,
        db: Database | None = None,
    ) -> bool:
        k = self._write_attempt(key)
        return self._put(self._dbname(db), k, _as_bytes(value, "value"), overwrite, append)

    def _put(self, name: str, k: bytes, v: bytes, overwrite: bool, append: bool) -> bool:
        if append:
            cached = self._append_last.get(name)
            if cached is not None and cached[0] == self.mutations:
                last: bytes | None = cached[1]
            else:
                found = Cursor(self, name, track=False)._lt(None)
                last = found[0] if found else None
            if last is not None and k <= last:
                self.mutations += 1  # py-lmdb counts refused puts as writes too
                return False
        elif not overwrite and self._lookup(name, k) is not None:
            self.mutations += 1
            return False
        self._set(name, k, v)
        if append:
            self._append_last[name] = (self.mutations, k)
        return True

    def replace(self, key: Any, value: Any, db: Database | None = None) -> bytes | None:
        k = self._write_attempt(key)
        old = self._lookup(self._dbname(db), k)
        self.put(k, value, db=db)
        return old

    def pop(self, key: Any, db: Database | None = None) -> bytes | None:
        self._live()
        k = _lookup_key(key)
        name = self._dbname(db)
        old = self._lookup(name, k)
        if old is not None:
            self._need_write()
            self._set(name, k, None)
        return old

    def delete(self, key: Any, value: Any = b"", db: Database | None = None) -> bool:
        k = self._write_attempt(key, lookup=True)
        name = self._dbname(db)
        if self._lookup(name, k) is None:
            self.mutations += 1  # as py-lmdb: cursors re-read their record after any delete
            return False
        self._set(name, k, None)
        return True

    def cursor(self, db: Database | None = None) -> Cursor:
        self._live()
        return Cursor(self, self._dbname(db))

    def stat(self, db: Database) -> dict[str, int]:
        self._live()
        name = self._dbname(db)
        if self._ov.get(name):
            self._flush()
        entries = int(self._q(_COUNT, (name,))[0][0])
        return {"psize": 8192, "depth": 0, "branch_pages": 0, "leaf_pages": 0, "overflow_pages": 0,
                "entries": entries}  # fmt: skip

    def drop(self, db: Database, delete: bool = True) -> None:
        self._need_write()
        name = self._dbname(db)
        self._flush()
        self._q("DELETE FROM kv WHERE db = %b RETURNING NULL", (name,))
        if delete and name != MAIN_DB:
            self._q("DELETE FROM kv_databases WHERE name = %b RETURNING NULL", (name,))
            with self.env._dbs_lock:
                self.env._dbs.pop(name, None)
        self.generation += 1
        self.mutations += 1
        for c in list(self._cursors.get(name, ())):
            c._after_drop()

    def notify(self, channel: str, payload: str = "") -> None:
        """Notifies `channel` when this write transaction commits (nothing if it aborts)."""
        self._need_write()
        self._q("SELECT pg_notify(%b, %b)", (channel, payload))

    def commit(self) -> None:
        self._live()
        try:
            if self.write:
                self._flush(commit=True)
            elif self._conn is not None:
                try:
                    self._conn.execute("COMMIT")
                except psycopg.Error as exc:
                    raise self._fail(exc, "commit") from exc
                except BaseException as exc:
                    self._interrupted(exc)
                    raise
        finally:
            self._done = True
            self._ov.clear()
            self._ov_sorted.clear()
            self._release()

    def abort(self) -> None:
        if self._done and self._conn is None:
            self._failed = None
            return
        self._done = True
        self._failed = None
        self._ov.clear()
        self._ov_sorted.clear()
        self._release()  # rolls back

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done and self._failed is None:
            return  # committed or aborted inside the block
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is not None:
            with suppress(Exception):
                self.abort()


# Cursors.
_UNINIT, _AT, _SUCC, _PAST = range(4)


class _Page:
    """Server rows of one database with lo <= k < hi (hi None: unbounded), all of them."""

    __slots__ = ("lo", "hi", "keys", "vals", "generation")

    def __init__(self, lo: bytes, hi: bytes | None, keys: list[bytes], vals: list[bytes], generation: int) -> None:
        self.lo, self.hi, self.keys, self.vals, self.generation = lo, hi, keys, vals, generation


class Cursor:
    """`lmdb.Cursor` over one database: server rows fetched in pages, merged with the
    transaction's buffered writes.

    It models both layers of py-lmdb: LMDB's cursor, which stays on a record while others are
    inserted or deleted around it (`_state`, `_ik`, and the EOF/DEL flags), and py-lmdb's
    `positioned` flag with the cached key and value, which only positioning calls update and
    which key()/value()/item() refresh after a write in the transaction. So failed moves leave
    it where LMDB does: next() past the end stays on the last record (prev() returns the one
    before), a failed set_key() sits on the following record (next() skips it), a failed
    set_range() or deleting the last record sits past the end (prev() returns the last), and a
    record deleted under the cursor leaves it on the next one, which next() returns.
    """

    def __init__(self, txn: Transaction, db: str, *, track: bool = True) -> None:
        self.txn = txn
        self.db = db
        # LMDB's cursor.
        self._state = _UNINIT
        self._ik = b""  # _AT: the record it is on; _SUCC: the key a set_key() missed
        self._eof = False  # next() ran past the end from _ik
        self._del = False  # _ik replaced a record deleted under the cursor: next() returns it
        self._prev: tuple[int, bytes, bool, bool] = (_UNINIT, b"", False, False)  # before a _SUCC
        # py-lmdb's view.
        self._pos = False
        self._k = b""
        self._v = b""
        self._seen = txn.mutations
        self._page: _Page | None = None
        self._n = PAGE_MIN
        if track:
            txn._track(self)

    # Server pages.
    def _fetch(self, forward: bool, x: bytes | None) -> _Page:
        n = self._n
        self._n = min(PAGE_MAX, n * 2)
        if forward:
            assert x is not None
            rows = self.txn._q(_page_sql(True, n, True), (self.db, x))
            keys = [r[0] for r in rows]
            hi = None if len(rows) < n else keys[-1] + b"\0"
            page = _Page(x, hi, keys, [r[1] for r in rows], self.txn.generation)
        else:
            rows = self.txn._q(_page_sql(False, n, x is not None), (self.db, x) if x is not None else (self.db,))
            rows.reverse()
            keys = [r[0] for r in rows]
            lo = b"" if len(rows) < n else keys[0]
            page = _Page(lo, x, keys, [r[1] for r in rows], self.txn.generation)
        self._page = page
        return page

    def _valid_page(self) -> _Page | None:
        page = self._page
        if page is not None and page.generation != self.txn.generation:
            page = self._page = None
        return page

    def _sge(self, x: bytes) -> tuple[bytes, bytes] | None:
        """The first server row with k >= x."""
        page = self._valid_page()
        if page is None or not (page.lo <= x and (page.hi is None or x < page.hi)):
            page = self._fetch(True, x)
        i = bisect_left(page.keys, x)
        if i < len(page.keys):
            return page.keys[i], page.vals[i]
        if page.hi is None:
            return None
        page = self._fetch(True, x)
        return (page.keys[0], page.vals[0]) if page.keys else None

    def _slt(self, x: bytes | None) -> tuple[bytes, bytes] | None:
        """The last server row with k < x (x None: the last row)."""
        page = self._valid_page()
        covered = page is not None and (
            page.hi is None if x is None else (page.lo < x and (page.hi is None or x <= page.hi))
        )
        if not covered:
            page = self._fetch(False, x)
        assert page is not None
        i = len(page.keys) if x is None else bisect_left(page.keys, x)
        if i > 0:
            return page.keys[i - 1], page.vals[i - 1]
        if page.lo == b"":
            return None
        page = self._fetch(False, x)
        return (page.keys[-1], page.vals[-1]) if page.keys else None

    def _server_lookup(self, key: bytes) -> bytes | None:
        page = self._valid_page()
        if page is not None and page.lo <= key and (page.hi is None or key < page.hi):
            i = bisect_left(page.keys, key)
            return page.vals[i] if i < len(page.keys) and page.keys[i] == key else None
        return self.txn._server_get(self.db, key)

    # The merged view (server rows + buffered writes).
    def _lookup(self, key: bytes) -> bytes | None:
        d = self.txn._ov.get(self.db)
        if d is not None and key in d:
            return d[key]
        return self._server_lookup(key)

    def _ge(self, x: bytes) -> tuple[bytes, bytes] | None:
        d = self.txn._ov.get(self.db)
        s = self._sge(x)
        if not d:
            return s
        okeys = self.txn._sorted_keys(self.db)
        i = bisect_left(okeys, x)
        while i < len(okeys):
            ok = okeys[i]
            if s is not None and s[0] < ok:
                return s
            ov = d[ok]
            if ov is not None:
                return ok, ov
            if s is not None and s[0] == ok:  # deleted in this transaction
                s = self._sge(ok + b"\0")
            i += 1
        return s

    def _gt(self, x: bytes) -> tuple[bytes, bytes] | None:
        return self._ge(x + b"\0")

    def _lt(self, x: bytes | None) -> tuple[bytes, bytes] | None:
        d = self.txn._ov.get(self.db)
        s = self._slt(x)
        if not d:
            return s
        okeys = self.txn._sorted_keys(self.db)
        j = (len(okeys) if x is None else bisect_left(okeys, x)) - 1
        while j >= 0:
            ok = okeys[j]
            if s is not None and s[0] > ok:
                return s
            ov = d[ok]
            if ov is not None:
                return ok, ov
            if s is not None and s[0] == ok:
                s = self._slt(ok)
            j -= 1
        return s

    # LMDB's cursor.
    def _on(self, key: bytes) -> None:
        self._state, self._ik, self._eof, self._del = _AT, key, False, False

    def _missed(self, key: bytes) -> None:
        """A set_key(key) that found nothing: LMDB's cursor stops on the record after `key`,
        past the end if there is none, or stays where it was if the database is empty. Found
        out lazily (_resolve), but before any write can change the answer."""
        self._resolve()
        self._prev = (self._state, self._ik, self._eof, self._del)
        self._state, self._ik, self._eof, self._del = _SUCC, key, False, False

    def _resolve(self) -> None:
        if self._state == _SUCC:
            nxt = self._gt(self._ik)
            if nxt is not None:
                self._on(nxt[0])
            elif self._lt(self._ik) is not None:
                self._state = _PAST
            else:
                self._state, self._ik, self._eof, self._del = self._prev

    def _before_write(self) -> None:
        self._resolve()

    def _after_delete(self, key: bytes, nxt: tuple[bytes, bytes] | None, empty: bool) -> None:
        """`key` was deleted (`nxt` follows it): a cursor on it moves to `nxt`, which next()
        returns; every cursor is reset when the database became empty."""
        if empty:
            self._state, self._eof, self._del = _UNINIT, False, False
        elif self._state == _AT and self._ik == key:
            if nxt is None:
                self._state, self._eof, self._del = _PAST, False, False
            else:
                self._on(nxt[0])
                self._del = True

    def _after_drop(self) -> None:
        self._state, self._eof, self._del = _UNINIT, False, False
        self._page = None

    # py-lmdb's view.
    def _sync(self, item: tuple[bytes, bytes] | None) -> bool:
        """The result of a positioning call: py-lmdb's positioned flag and cached record."""
        self._seen = self.txn.mutations
        if item is None:
            self._pos, self._k, self._v = False, b"", b""
            return False
        self._pos, (self._k, self._v) = True, item
        return True

    def _current(self) -> tuple[bytes, bytes] | None:
        """MDB_GET_CURRENT: the record LMDB's cursor is on (clears the DEL flag)."""
        self._resolve()
        if self._state != _AT:
            return None
        v = self._lookup(self._ik)
        if v is None:  # not expected: deletions move the cursor
            nxt = self._ge(self._ik)
            if nxt is None:
                self._state = _PAST
                return None
            self._on(nxt[0])
            return nxt
        self._del = False
        return self._ik, v

    def _fresh(self) -> None:
        self.txn._live()
        if self._seen != self.txn.mutations:
            self._sync(self._current())

    # lmdb.Cursor API.
    def key(self) -> bytes:
        self._fresh()
        return self._k

    def value(self) -> bytes:
        self._fresh()
        return self._v

    def item(self) -> tuple[bytes, bytes]:
        self._fresh()
        return self._k, self._v

    def first(self) -> bool:
        self.txn._live()
        item = self._ge(b"")
        if item is not None:
            self._on(item[0])
        return self._sync(item)

    def last(self) -> bool:
        self.txn._live()
        item = self._lt(None)
        if item is not None:
            self._on(item[0])
        return self._sync(item)

    def next(self) -> bool:
        self.txn._live()
        self._resolve()
        if self._state == _UNINIT:
            return self.first()
        if self._state == _PAST:
            return self._sync(None)
        if self._del:  # LMDB already stands on the record after the deleted one
            return self._sync(self._current())
        item = self._gt(self._ik)
        if item is None:
            self._eof = True
            return self._sync(None)
        self._on(item[0])
        return self._sync(item)

    def prev(self) -> bool:
        self.txn._live()
        self._resolve()
        if self._state in (_UNINIT, _PAST):
            return self.last()
        item = self._lt(self._ik)
        self._eof = self._del = False
        if item is None:
            return self._sync(None)
        self._on(item[0])
        return self._sync(item)

    def set_key(self, key: Any) -> bool:
        self.txn._live()
        k = _as_bytes(key, "key")
        if not k:
            self._sync(None)  # py-lmdb forgets its record before LMDB refuses the key
            raise BadValsizeError("MDB_BAD_VALSIZE: empty key")
        v = self._lookup(k)
        if v is None:
            self._missed(k)
            return self._sync(None)
        self._on(k)
        return self._sync((k, v))

    def set_range(self, key: Any) -> bool:
        self.txn._live()
        k = _as_bytes(key, "key")
        item = self._ge(k)
        if item is None:
            if self._lt(k) is not None:  # an empty database leaves LMDB's cursor alone
                self._state, self._eof, self._del = _PAST, False, False
            return self._sync(None)
        self._on(item[0])
        return self._sync(item)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._v if self.set_key(key) else default

    def getmulti(
        self, keys: Iterable[Any], dupdata: bool = False, dupfixed_bytes: int | None = None, keyfixed: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """(key, value) of each key found, in the order given (one query); the cursor ends
        where set_key() of the last key leaves it."""
        if dupdata or dupfixed_bytes or keyfixed:
            raise NotImplementedError("pgkv has no duplicate-key databases")
        self.txn._live()
        wanted = [_as_bytes(k, "key") for k in keys]
        if not wanted:
            return []
        if not all(wanted):  # LMDB stops at the empty key: replay its set_key() calls up to there
            for k in wanted:
                self.set_key(k)  # raises BadValsizeError at the empty key
            raise AssertionError("unreachable")
        d = self.txn._ov.get(self.db) or {}
        found: dict[bytes, bytes | None] = {k: d[k] for k in wanted if k in d}
        ask = [k for k in dict.fromkeys(wanted) if k not in found]
        if ask:
            found.update(dict(self.txn._q(_GET_MANY, (self.db, ask))))
        last = wanted[-1]
        v = found.get(last)
        if v is None:
            self._missed(last)
            self._sync(None)
        else:
            self._on(last)
            self._sync((last, v))
        return [(k, v) for k in wanted if (v := found.get(k)) is not None]

    def delete(self, dupdata: bool = False) -> bool:
        """Deletes the current record and moves to the next (past the end after the last)."""
        self.txn._live()
        if not self._pos:
            return False
        self.txn._need_write()
        self._resolve()
        if self._state != _AT:
            raise NotFoundError("mdb_cursor_del: MDB_NOTFOUND: the record under the cursor is gone")
        self.txn._set(self.db, self._ik, None)  # moves this cursor (and others on it) to the next
        self._sync(self._current())
        return True

    def pop(self, key: Any) -> bytes | None:
        if not self.set_key(key):
            return None
        self.txn._need_write()
        old = self._v
        self.txn._set(self.db, self._ik, None)
        return old

    def _written(self, k: bytes, ok: bool, append: bool) -> None:
        """Where LMDB's cursor stands after mdb_cursor_put (py-lmdb's flag is unchanged)."""
        if ok or not append:
            self._on(k)
        else:  # a refused append stops on the last record
            last = self._lt(None)
            if last is not None:
                self._on(last[0])

    def put(self, key: Any, value: Any, dupdata: bool = True, overwrite: bool = True, append: bool = False) -> bool:
        k = self.txn._write_attempt(key)
        ok = self.txn._put(self.db, k, _as_bytes(value, "value"), overwrite, append)
        self._written(k, ok, append)
        return ok

    def replace(self, key: Any, value: Any) -> bytes | None:
        k = self.txn._write_attempt(key)
        v = _as_bytes(value, "value")
        old = self._lookup(k)
        self.txn._set(self.db, k, v)
        self._on(k)
        return old

    def putmulti(
        self, items: Iterable[tuple[Any, Any]], dupdata: bool = True, overwrite: bool = True, append: bool = False
    ) -> tuple[int, int]:
        """Puts each (key, value) in turn; returns (items consumed, items written). With
        overwrite=False, which keys exist is asked in one query rather than one per key."""
        txn = self.txn
        txn._need_write()
        items = list(items)
        known: dict[bytes, bytes] | None = None
        generation = txn.generation
        if not overwrite and not append:
            d = txn._ov.get(self.db) or {}
            ask = sorted(
                {bytes(k) for k, _ in items if isinstance(k, bytes | bytearray | memoryview) and 0 < len(k)} - d.keys()
            )
            known = dict(txn._q(_GET_MANY, (self.db, ask))) if ask else {}
        consumed = added = 0
        for key, value in items:
            k = txn._write_attempt(key)
            v = _as_bytes(value, "value")
            consumed += 1
            if known is None or txn.generation != generation:
                ok = txn._put(self.db, k, v, overwrite, append)
            else:
                buffered = txn._ov.get(self.db)
                ok = not (buffered[k] is not None if buffered is not None and k in buffered else k in known)
                if ok:
                    txn._set(self.db, k, v)
                else:
                    txn.mutations += 1
            added += ok
            self._written(k, ok, append)
        return consumed, added

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        return self._iter(True, keys, values)

    def iterprev(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        return self._iter(False, keys, values)

    def _iter(self, forward: bool, keys: bool, values: bool) -> Iterator[Any]:
        # As py-lmdb: an unpositioned cursor moves to the first/last record right away.
        self.txn._live()
        if not self._pos:
            if forward:
                self.first()
            else:
                self.last()
        get: Callable[[], Any] = self.item if keys and values else self.key if keys else self.value
        return self._steps(self.next if forward else self.prev, get)

    def _steps(self, step: Callable[[], bool], get: Callable[[], Any]) -> Iterator[Any]:
        started = False
        while self._pos:
            if started and not step():
                return
            started = True
            yield get()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self._iter(True, True, True)

    def close(self) -> None:
        self._page = None
        self.txn._untrack(self)

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(url: str, **kwargs: Any) -> Environment:  # noqa: A001 - mirrors lmdb.open
    return Environment(url, **kwargs)


__all__ = [
    "BadValsizeError",
    "Cursor",
    "Database",
    "Environment",
    "Error",
    "NotFoundError",
    "ReadonlyError",
    "SchemaError",
    "StorageError",
    "Transaction",
    "Unavailable",
    "open",
]
