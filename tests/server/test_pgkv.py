"""pgkv (py-lmdb's interface on PostgreSQL) against a private PostgreSQL cluster.

Behaviour is checked against py-lmdb itself: the same operations run on an LMDB environment
in a temporary directory and on pgkv, and every result must be identical.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import psycopg
import pytest

from banditd import pgkv

DBS = (b"small", b"big")


# The same calls on LMDB and pgkv.
def outcome(fn: Callable[[], Any]) -> Any:
    """A comparable result: the value, or the LMDB error class it raised."""
    try:
        res = fn()
    except lmdb.Error as exc:
        for cls in (lmdb.BadValsizeError, lmdb.NotFoundError, lmdb.ReadonlyError):
            if isinstance(exc, cls):
                return ("raises", cls.__name__)
        return ("raises", "Error")
    except TypeError:
        return ("raises", "TypeError")
    if isinstance(res, Iterator):
        return list(res)
    return res


class Twin:
    """An LMDB environment and a pgkv environment driven in lockstep."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.lenv = lmdb.open(str(tmp / "lmdb"), max_dbs=8, map_size=1 << 28)
        self.penv = pgkv.Environment(url)
        self.ldbs = {n: self.lenv.open_db(n) for n in DBS}
        self.pdbs = {n: self.penv.open_db(n) for n in DBS}
        self.log: list[str] = []

    def close(self) -> None:
        self.lenv.close()
        self.penv.close()

    def check(self, what: str, lf: Callable[[], Any], pf: Callable[[], Any]) -> Any:
        self.log.append(what)
        a, b = outcome(lf), outcome(pf)
        assert a == b, f"{what}: lmdb {a!r} != pgkv {b!r}\nlast operations:\n" + "\n".join(self.log[-25:])
        return a

    def begin(self, name: bytes, write: bool) -> tuple[Any, Any]:
        return self.lenv.begin(write=write, db=self.ldbs[name]), self.penv.begin(write=write, db=self.pdbs[name])

    def db(self, txn: Any, name: bytes) -> Any:
        return self.pdbs[name] if isinstance(txn, pgkv.Transaction) else self.ldbs[name]

    def both(self, what: str, fn: Callable[[Any, Any], Any], txns: tuple[Any, Any], curs: tuple[Any, Any]) -> Any:
        """fn(txn, cursor) on LMDB's and on pgkv's pair."""
        return self.check(what, lambda: fn(txns[0], curs[0]), lambda: fn(txns[1], curs[1]))

    def contents(self) -> None:
        for n in DBS:
            txns = self.begin(n, False)
            self.both(f"contents {n!r}", lambda t, c: list(t.cursor()), txns, (None, None))
            for t in txns:
                t.commit()


@pytest.fixture
def twin(tmp_path: Path, fresh_pg_url: Callable[[], str]) -> Iterator[Twin]:
    t = Twin(tmp_path, fresh_pg_url())
    yield t
    t.close()


def method(name: str, *args: Any) -> Callable[[Any, Any], Any]:
    """fn(txn, cursor) calling cursor.<name>(*args)."""
    return lambda t, c: getattr(c, name)(*args)


def keyspace(rng: random.Random, n: int) -> list[bytes]:
    """Keys of varied length sharing prefixes (so order is by bytes, not length)."""
    keys = {b"k%03d" % i for i in range(n)}
    keys |= {b"k%03d" % rng.randrange(n) + bytes([rng.randrange(256)]) * rng.randrange(1, 4) for _ in range(n // 3)}
    keys |= {bytes([0]), bytes([255]) * 3, b"k", b"k0"}
    return sorted(keys)


def populate(twin: Twin, name: bytes, keys: list[bytes], rng: random.Random, value_size: int) -> None:
    with twin.lenv.begin(write=True, db=twin.ldbs[name]) as lt, twin.penv.begin(write=True, db=twin.pdbs[name]) as pt:
        for k in keys:
            v = rng.randbytes(rng.randrange(value_size))
            lt.put(k, v)
            pt.put(k, v)


def random_session(twin: Twin, rng: random.Random, rounds: int, ops: int, keys: dict[bytes, list[bytes]]) -> None:
    """Random operations in write and read transactions, each compared. The small database stays
    within one LMDB page; on the big one (many pages) a cursor is moved after a set_key() miss,
    whose next record depends on LMDB's page boundaries (see pgkv.Cursor)."""
    probes = {n: ks + [k + b"\x00" for k in ks[::7]] + [b"", b"a", b"\xff" * 4, b"x" * 512] for n, ks in keys.items()}
    for rnd in range(rounds):
        write = rng.random() < 0.7
        name = rng.choice(DBS)
        lt = twin.lenv.begin(write=write, db=twin.ldbs[name])
        pt = twin.penv.begin(write=write, db=twin.pdbs[name])
        twin.log.append(f"--- round {rnd} write={write} db={name!r}")
        cursors: list[tuple[Any, Any, bytes]] = []
        for _ in range(ops):
            random_op(twin, rng, lt, pt, cursors, write, name, probes)
        if write and rng.random() < 0.3:
            twin.log.append("abort")
            lt.abort()
            pt.abort()
        else:
            twin.log.append("commit")
            lt.commit()
            pt.commit()
        twin.contents()


def random_op(
    twin: Twin, rng: random.Random, lt: Any, pt: Any, cursors: list[tuple[Any, Any, bytes]], write: bool,
    name: bytes, probes: dict[bytes, list[bytes]],
) -> None:
    if not cursors or rng.random() < 0.03:
        cdb = rng.choice(DBS)
        cursors.append((lt.cursor(db=twin.ldbs[cdb]), pt.cursor(db=twin.pdbs[cdb]), cdb))
        twin.log.append(f"cursor {len(cursors) - 1} on {cdb!r}")
    ci = rng.randrange(len(cursors))
    lc, pc, cdb = cursors[ci]
    op = rng.choice(WRITE_OPS + READ_OPS if write else READ_OPS)
    k = rng.choice(probes[cdb if op in CURSOR_OPS else name])
    v = rng.randbytes(rng.randrange(40 if name == b"small" else 300))
    result = one_op(twin, rng, op, lt, pt, lc, pc, ci, k, v, name, probes[cdb])
    if cdb == b"big" and op in ("set_key", "get_c", "cpop", "getmulti") and result in (False, None, []) or (
        cdb == b"big" and op == "getmulti"
    ):
        twin.check(f"c{ci}.set_range({k!r}) after a miss", lambda: lc.set_range(k), lambda: pc.set_range(k))


def one_op(
    twin: Twin, rng: random.Random, op: str, lt: Any, pt: Any, lc: Any, pc: Any, ci: int, k: bytes, v: bytes,
    name: bytes, cprobes: list[bytes],
) -> Any:
    if op == "put":
        ow, ap = rng.random() < 0.7, rng.random() < 0.1
        return twin.check(f"put {k!r} overwrite={ow} append={ap}", lambda: lt.put(k, v, overwrite=ow, append=ap),
                   lambda: pt.put(k, v, overwrite=ow, append=ap))  # fmt: skip
    elif op == "delete":
        return twin.check(f"delete {k!r}", lambda: lt.delete(k), lambda: pt.delete(k))
    elif op == "replace":
        return twin.check(f"replace {k!r}", lambda: lt.replace(k, v), lambda: pt.replace(k, v))
    elif op == "pop":
        return twin.check(f"pop {k!r}", lambda: lt.pop(k), lambda: pt.pop(k))
    elif op == "get":
        return twin.check(f"get {k!r}", lambda: lt.get(k), lambda: pt.get(k))
    elif op == "stat":
        return twin.both("stat", lambda t, c: t.stat(twin.db(t, name))["entries"], (lt, pt), (lc, pc))
    elif op in ("first", "last", "next", "prev", "key", "value", "item"):
        return twin.check(f"c{ci}.{op}()", getattr(lc, op), getattr(pc, op))
    elif op in ("set_key", "set_range", "get_c"):
        meth = "get" if op == "get_c" else op
        return twin.check(f"c{ci}.{meth}({k!r})", lambda: getattr(lc, meth)(k), lambda: getattr(pc, meth)(k))
    elif op == "cdelete":
        return twin.check(f"c{ci}.delete()", lc.delete, pc.delete)
    elif op == "cput":
        ow = rng.random() < 0.7
        return twin.check(f"c{ci}.put({k!r}, overwrite={ow})", lambda: lc.put(k, v, overwrite=ow),
                   lambda: pc.put(k, v, overwrite=ow))  # fmt: skip
    elif op == "creplace":
        return twin.check(f"c{ci}.replace({k!r})", lambda: lc.replace(k, v), lambda: pc.replace(k, v))
    elif op == "cpop":
        return twin.check(f"c{ci}.pop({k!r})", lambda: lc.pop(k), lambda: pc.pop(k))
    elif op == "getmulti":
        ks = [rng.choice(cprobes[:-4]) for _ in range(rng.randrange(1, 6))]
        return twin.check(f"c{ci}.getmulti({ks!r})", lambda: lc.getmulti(ks), lambda: pc.getmulti(ks))
    elif op == "putmulti":
        items = [(rng.choice(cprobes[:-4]), rng.randbytes(5)) for _ in range(rng.randrange(1, 6))]
        ow = rng.random() < 0.5
        return twin.check(f"c{ci}.putmulti({items!r}, overwrite={ow})", lambda: lc.putmulti(items, overwrite=ow),
                   lambda: pc.putmulti(items, overwrite=ow))  # fmt: skip
    elif op in ("iternext", "iterprev"):
        n = rng.randrange(1, 8)
        kw = rng.choice([{}, {"values": False}, {"keys": False}])
        return twin.check(f"c{ci}.{op}({kw}) x{n}", lambda: list(itertools.islice(getattr(lc, op)(**kw), n)),
                   lambda: list(itertools.islice(getattr(pc, op)(**kw), n)))  # fmt: skip
    elif op == "delete_run":  # the retention pattern: delete() moves to the next record
        n = rng.randrange(1, 6)

        def run(c: Any) -> list[bytes]:
            out: list[bytes] = []
            while len(out) < n and c.key():
                out.append(c.key())
                c.delete()
            return out

        return twin.check(f"c{ci} delete run x{n}", lambda: run(lc), lambda: run(pc))
    return None


READ_OPS = ["get", "first", "last", "next", "next", "prev", "key", "value", "item", "set_key", "set_range",
            "set_range", "get_c", "getmulti", "iternext", "iterprev", "stat", "next", "prev"]  # fmt: skip
CURSOR_OPS = {"set_key", "set_range", "get_c", "cput", "creplace", "cpop", "getmulti", "putmulti"}
WRITE_OPS = ["put", "put", "put", "delete", "delete", "replace", "pop", "cdelete", "cput", "creplace", "cpop",
             "putmulti", "delete_run"]  # fmt: skip


@pytest.mark.parametrize(
    ("page_min", "page_max", "flush_at"),
    [(64, 1024, 50_000), (2, 4, 7), (1, 2, 3)],
    ids=["default-pages", "tiny-pages-and-flushes", "one-row-pages"],
)
def test_random_operations_match_lmdb(
    twin: Twin, monkeypatch: pytest.MonkeyPatch, page_min: int, page_max: int, flush_at: int
) -> None:
    monkeypatch.setattr(pgkv, "PAGE_MIN", page_min)
    monkeypatch.setattr(pgkv, "PAGE_MAX", page_max)
    monkeypatch.setattr(pgkv, "FLUSH_AT", flush_at)
    rng = random.Random(page_min * 1000 + flush_at)
    small = keyspace(rng, 24)  # stays within one LMDB page
    big = keyspace(rng, 400)  # dozens of LMDB pages
    populate(twin, b"small", small[::2], rng, 30)
    populate(twin, b"big", big[::2], rng, 300)
    twin.contents()
    random_session(twin, rng, rounds=14, ops=150, keys={b"small": small, b"big": big})


def test_empty_database_and_unpositioned_cursor(twin: Twin) -> None:
    calls: list[tuple[str, Callable[[Any, Any], Any]]] = [
        *((op, method(op)) for op in ("key", "value", "item", "first", "last", "next", "prev", "key", "delete")),
        ("set_range", lambda t, c: c.set_range(b"a")),
        ("set_key", lambda t, c: c.set_key(b"a")),
        ("iter", lambda t, c: list(c)),
        ("iterprev", lambda t, c: list(c.iterprev())),
        ("getmulti", lambda t, c: c.getmulti([b"a"])),
        ("get", lambda t, c: t.get(b"a", b"dflt")),
        ("stat", lambda t, c: t.stat(twin.db(t, b"small"))["entries"]),
    ]  # fmt: skip
    for write in (False, True):
        txns = twin.begin(b"small", write)
        curs = (txns[0].cursor(), txns[1].cursor())
        for what, fn in calls:
            if what == "delete" and not write:
                continue
            twin.both(what, fn, txns, curs)
        for t in txns:
            t.abort()


def test_cursor_positions_after_failed_moves(twin: Twin) -> None:
    """LMDB's quirks: next() past the end stays on the last record (prev gives the one before),
    a failed set_key sits on the following record (next skips it), a failed set_range or the
    deletion of the last record sits past the end (prev gives the last)."""
    rng = random.Random(7)
    populate(twin, b"small", [b"a", b"b", b"c", b"d"], rng, 5)
    scripts: list[list[tuple[str, tuple[Any, ...]]]] = [
        [("last", ()), ("next", ()), ("next", ()), ("prev", ()), ("key", ())],
        [("set_key", (b"aa",)), ("next", ()), ("key", ())],
        [("set_key", (b"aa",)), ("prev", ()), ("key", ())],
        [("set_key", (b"0",)), ("prev", ()), ("next", ()), ("key", ())],
        [("set_key", (b"zz",)), ("next", ()), ("prev", ()), ("key", ())],
        [("set_range", (b"zz",)), ("prev", ()), ("key", ())],
        [("first", ()), ("prev", ()), ("prev", ()), ("next", ()), ("key", ())],
        [("last", ()), ("delete", ()), ("key", ()), ("next", ()), ("prev", ()), ("key", ())],
        [("set_key", (b"b",)), ("delete", ()), ("key", ()), ("prev", ()), ("key", ())],
        [("getmulti", ((b"a", b"zz"),)), ("next", ()), ("prev", ()), ("key", ())],
        [("pop", (b"bb",)), ("next", ()), ("key", ())],
        [("pop", (b"b",)), ("next", ()), ("key", ())],
        [("set_key", (b"aa",)), ("put", (b"c", b"X")), ("delete", ()), ("key", ()), ("next", ())],
        [("set_key", (b"b",)), ("put", (b"d", b"X")), ("delete", ()), ("key", ())],
        [("set_key", (b"aa",)), ("replace", (b"c", b"X")), ("iternext", ())],
        [("set_range", (b"",)), ("key", ())],
    ]
    for script in scripts:
        txns = twin.begin(b"small", True)
        curs = (txns[0].cursor(), txns[1].cursor())
        for op, args in script:
            twin.both(f"{op}{args}", method(op, *args), txns, curs)
        for t in txns:
            t.abort()


def test_writes_under_a_cursor(twin: Twin) -> None:
    """Records put or deleted through the transaction appear to (or vanish from) open cursors
    as in LMDB, including the cursor's own record."""
    populate(twin, b"small", [b"a", b"b", b"c", b"d"], random.Random(1), 5)
    with twin.lenv.begin(write=True, db=twin.ldbs[b"small"]) as lt, \
            twin.penv.begin(write=True, db=twin.pdbs[b"small"]) as pt:  # fmt: skip
        lc, pc = lt.cursor(), pt.cursor()
        steps: list[tuple[str, Callable[[Any, Any], Any]]] = [
            ("set_key b", lambda t, c: c.set_key(b"b")),
            ("put bb", lambda t, c: t.put(b"bb", b"BB")),
            ("next", lambda t, c: c.next()),
            ("item", lambda t, c: c.item()),
            ("put bb new value", lambda t, c: t.put(b"bb", b"NEW")),
            ("value", lambda t, c: c.value()),
            ("delete bb (under the cursor)", lambda t, c: t.delete(b"bb")),
            ("item", lambda t, c: c.item()),
            ("next", lambda t, c: c.next()),
            ("delete d", lambda t, c: t.delete(b"d")),
            ("item", lambda t, c: c.item()),
            ("set_key a", lambda t, c: c.set_key(b"a")),
            ("empty the database", lambda t, c: [t.delete(k) for k in (b"a", b"b", b"c")]),
            ("item", lambda t, c: c.item()),
            ("getmulti on the empty database", lambda t, c: c.getmulti([b"zz"])),
            ("set_range on the empty database", lambda t, c: c.set_range(b"a")),
            ("put x", lambda t, c: t.put(b"x", b"X")),
            ("next (from the first record again)", lambda t, c: (c.next(), c.item())),
        ]
        for what, step in steps:
            twin.both(what, step, (lt, pt), (lc, pc))
    twin.contents()


def test_key_and_value_validation(twin: Twin) -> None:
    with twin.lenv.begin(write=True, db=twin.ldbs[b"small"]) as lt, \
            twin.penv.begin(write=True, db=twin.pdbs[b"small"]) as pt:  # fmt: skip
        lc, pc = lt.cursor(), pt.cursor()
        calls: list[tuple[str, Callable[[Any, Any], Any]]] = [
            ("put empty key", lambda t, c: t.put(b"", b"v")),
            ("put 511", lambda t, c: t.put(b"x" * 511, b"v")),
            ("put 512", lambda t, c: t.put(b"x" * 512, b"v")),
            ("get empty", lambda t, c: t.get(b"")),
            ("get 512", lambda t, c: t.get(b"x" * 512)),
            ("delete empty", lambda t, c: t.delete(b"")),
            ("delete 512", lambda t, c: t.delete(b"y" * 512)),
            ("put str", lambda t, c: t.put("k", b"v")),
            ("put bytearray/memoryview", lambda t, c: t.put(bytearray(b"ba"), memoryview(b"mv"))),
            ("get bytearray", lambda t, c: t.get(bytearray(b"ba"))),
            ("empty value", lambda t, c: (t.put(b"ev", b""), t.get(b"ev"))),
            ("set_key empty", lambda t, c: c.set_key(b"")),
            ("set_key 512", lambda t, c: c.set_key(b"x" * 512)),
            ("getmulti empty key", lambda t, c: c.getmulti([b""])),
            ("putmulti stops at a bad key", lambda t, c: c.putmulti([(b"q", b"1"), (b"", b"2")])),
            ("after partial putmulti", lambda t, c: (t.get(b"q"), c.key())),
            ("replace 512", lambda t, c: t.replace(b"z" * 512, b"v")),
            ("pop 512", lambda t, c: t.pop(b"z" * 512)),
            ("put append out of order", lambda t, c: t.put(b"0", b"v", append=True)),
            ("put append in order", lambda t, c: (t.put(b"zz", b"v", append=True), t.put(b"zzz", b"v", append=True))),
        ]
        for what, call in calls:
            twin.both(what, call, (lt, pt), (lc, pc))
    twin.contents()


def test_transaction_lifecycle_and_read_only_writes(twin: Twin) -> None:
    populate(twin, b"small", [b"a", b"b"], random.Random(3), 5)
    calls: list[tuple[str, Callable[[Any, Any], Any]]] = [
        ("delete() unpositioned", lambda t, c: c.delete()),
        ("delete() positioned", lambda t, c: (c.first(), c.delete())),
        ("put", lambda t, c: t.put(b"c", b"C")),
        ("delete", lambda t, c: t.delete(b"a")),
        ("pop missing", lambda t, c: t.pop(b"zz")),
        ("pop", lambda t, c: t.pop(b"a")),
        ("replace", lambda t, c: t.replace(b"a", b"x")),
        ("cursor put", lambda t, c: c.put(b"c", b"C")),
        ("cursor pop missing", lambda t, c: c.pop(b"zz")),
        ("cursor pop", lambda t, c: c.pop(b"a")),
        ("commit", lambda t, c: t.commit()),
        ("commit again", lambda t, c: t.commit()),
        ("abort after commit", lambda t, c: t.abort()),
        ("get after commit", lambda t, c: t.get(b"a")),
        ("cursor after commit", lambda t, c: c.first()),
    ]
    txns = twin.begin(b"small", False)
    curs = (txns[0].cursor(), txns[1].cursor())
    for what, fn in calls:
        twin.both(what, fn, txns, curs)
    txns = twin.begin(b"small", True)
    for t in txns:
        t.abort()
    twin.both("commit after abort", lambda t, c: t.commit(), txns, (None, None))
    for env in (twin.lenv, twin.penv):
        with env.begin(write=True) as txn:
            txn.commit()  # __exit__ after an explicit commit is fine


def test_read_your_writes_and_abort(pg_url: str) -> None:
    env = pgkv.Environment(pg_url)
    db = env.open_db(b"ryw")
    try:
        with env.begin(write=True, db=db) as txn:
            txn.put(b"a", b"1")
            txn.put(b"b", b"2")
            assert txn.get(b"a") == b"1"
            assert txn.delete(b"b") and txn.get(b"b") is None
            assert list(txn.cursor()) == [(b"a", b"1")]
            assert txn.stat(db)["entries"] == 1  # flushed to the server, still uncommitted
        with env.begin(db=db) as txn:
            assert list(txn.cursor()) == [(b"a", b"1")]
        txn = env.begin(write=True, db=db)
        txn.put(b"a", b"changed")
        txn.put(b"c", b"3")
        assert txn.stat(db)["entries"] == 2
        txn.abort()
        with pytest.raises(ValueError), env.begin(write=True, db=db) as txn:
            txn.put(b"d", b"4")
            raise ValueError("the context manager aborts")
        with env.begin(db=db) as txn:
            assert list(txn.cursor()) == [(b"a", b"1")]
            with pytest.raises(pgkv.ReadonlyError):
                txn.put(b"x", b"y")
            assert issubclass(pgkv.ReadonlyError, lmdb.ReadonlyError)
        with pytest.raises(pgkv.Error, match="closed"):
            txn.get(b"a")
        assert issubclass(pgkv.NotFoundError, lmdb.NotFoundError) and issubclass(pgkv.Unavailable, lmdb.Error)
        with pytest.raises(lmdb.NotFoundError):
            env.open_db(b"no-such-db", create=False)
        assert env._pool.in_use == 0
    finally:
        env.close()


def test_prefetched_reads_answer_like_the_server(pg_url: str) -> None:
    """`prefetch` (one query for many keys: a reward batch's events and outcomes) changes no
    answer: present and absent keys, the transaction's own writes before and after it, a
    put(overwrite=False) that must see a prefetched key, and values after buffered writes
    were sent to the server (the read-ahead is dropped then)."""
    env = pgkv.Environment(pg_url)
    db = env.open_db(b"ahead")
    try:
        with env.begin(write=True, db=db) as txn:
            for i in range(0, 20, 2):
                txn.put(b"k%02d" % i, b"v%d" % i)
        with env.begin(write=True, db=db) as txn:
            txn.put(b"k04", b"mine")  # written before the prefetch: the overlay wins
            txn.prefetch([b"k%02d" % i for i in range(20)] + [b"k04"], db=db)
            txn.delete(b"k06")  # written after it: the overlay wins too
            assert txn.get(b"k00") == b"v0" and txn.get(b"k01") is None
            assert txn.get(b"k04") == b"mine" and txn.get(b"k06") is None
            assert txn.put(b"k02", b"x", overwrite=False) is False  # present: refused
            assert txn.put(b"k03", b"x", overwrite=False) is True  # absent: stored
            assert txn.get(b"k03") == b"x"
            assert txn.stat(db)["entries"] == 10  # sends the buffered writes
            assert txn.get(b"k03") == b"x" and txn.get(b"k06") is None and txn.get(b"k08") == b"v8"
            txn.prefetch([], db=db)
        with env.begin(db=db) as txn:
            assert txn.get(b"k03") == b"x" and txn.get(b"k04") == b"mine" and txn.get(b"k06") is None
    finally:
        env.close()


def test_read_transaction_keeps_its_snapshot(pg_url: str) -> None:
    env = pgkv.Environment(pg_url)
    db = env.open_db(b"snap")
    try:
        with env.begin(write=True, db=db) as txn:
            for i in range(300):
                txn.put(b"%04d" % i, b"old")
        reader = env.begin(db=db)
        cur = reader.cursor()
        assert cur.first() and cur.value() == b"old"  # the snapshot starts here
        with env.begin(write=True, db=db) as txn:
            for i in range(300):
                txn.put(b"%04d" % i, b"new")
            txn.put(b"9999", b"added")
        assert reader.get(b"0150") == b"old"
        assert [v for _, v in cur] == [b"old"] * 300  # pages fetched after the commit
        assert reader.get(b"9999") is None
        reader.commit()
        with env.begin(db=db) as txn:
            assert txn.get(b"0150") == b"new" and txn.get(b"9999") == b"added"
    finally:
        env.close()


def test_writers_of_two_nodes_serialize(pg_url: str) -> None:
    """Write transactions of two environments (two nodes) run one at a time, like LMDB's single
    writer: a second begin(write=True) waits, and a counter incremented with get + put 100
    times by each node loses no update."""
    envs = [pgkv.Environment(pg_url) for _ in range(2)]
    dbs = [e.open_db(b"counter") for e in envs]
    try:
        first = envs[0].begin(write=True, db=dbs[0])
        first.put(b"n", b"0")
        seen: list[bytes | None] = []

        def second_writer() -> None:
            with envs[1].begin(write=True, db=dbs[1]) as txn:
                seen.append(txn.get(b"n"))

        t = threading.Thread(target=second_writer)
        t.start()
        t.join(0.5)
        assert t.is_alive() and not seen  # waiting for the writer lock
        first.commit()
        t.join(10)
        assert seen == [b"0"]  # and then sees the first writer's commit

        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for n in range(100):
                    with envs[i].begin(write=True, db=dbs[i]) as txn:
                        value = int(txn.get(b"n") or b"0")
                        if n % 10 == 0:
                            time.sleep(0.002)  # widen the read-modify-write window
                        txn.put(b"n", b"%d" % (value + 1))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
        with envs[0].begin(db=dbs[0]) as txn:
            assert txn.get(b"n") == b"200"
    finally:
        for e in envs:
            e.close()


def test_large_cursor_scans_in_pages(pg_url: str) -> None:
    env = pgkv.Environment(pg_url)
    db = env.open_db(b"scan")
    n = 5000
    try:
        with env.begin(write=True, db=db) as txn:
            c = txn.cursor()
            assert c.putmulti((b"%06d" % i, b"v%d" % i) for i in range(n)) == (n, n)
        with env.begin(db=db) as txn:
            c = txn.cursor()
            assert [k for k, _ in c] == [b"%06d" % i for i in range(n)]
            assert list(c.iterprev(values=False)) == [b"%06d" % i for i in reversed(range(n))]
            assert c.set_range(b"002500x") and c.key() == b"002501"
            assert c.getmulti([b"000001", b"nope", b"004999"]) == [(b"000001", b"v1"), (b"004999", b"v4999")]
        with env.begin(write=True, db=db) as txn:  # the retention pattern over many pages
            c = txn.cursor()
            c.first()
            removed = 0
            while c.key() and c.key() < b"004000":
                c.delete()
                removed += 1
            assert removed == 4000 and c.key() == b"004000"
        with env.begin(db=db) as txn:
            assert txn.stat(db)["entries"] == 1000
    finally:
        env.close()


def test_migrations_are_idempotent_and_race_free(fresh_pg_url: Callable[[], str]) -> None:
    url = fresh_pg_url()
    with pytest.raises(pgkv.SchemaError):
        pgkv.Environment(url, readonly=True)  # nothing migrated yet
    envs: list[pgkv.Environment] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_env() -> None:
        try:
            start.wait()
            envs.append(pgkv.Environment(url))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_env) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    envs.append(pgkv.Environment(url))  # and once more, later
    envs.append(pgkv.Environment(url, readonly=True))
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [v for v, _, _ in pgkv.MIGRATIONS]
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'from the future')")
    with pytest.raises(pgkv.SchemaError, match="newer"):
        pgkv.Environment(url)
    with pytest.raises(pgkv.SchemaError):
        pgkv.Environment(url, readonly=True)
    ro = envs[-1]
    with pytest.raises(pgkv.ReadonlyError):
        ro.begin(write=True)
    for e in envs:
        e.close()


def test_server_errors_raise_storage_error_and_release_the_connection(fresh_pg_url: Callable[[], str]) -> None:
    url = fresh_pg_url()
    env = pgkv.Environment(url, pool_size=1)
    db = env.open_db(b"limited")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE kv ADD CONSTRAINT kv_small_values CHECK (length(v) < 10)")
        txn = env.begin(write=True, db=db)
        txn.put(b"k", b"x" * 20)
        with pytest.raises(pgkv.StorageError, match="23514"):
            txn.commit()
        txn.abort()
        assert env._pool.in_use == 0
        with env.begin(write=True, db=db) as txn:  # the single pooled connection is usable
            txn.put(b"k", b"short")
        with env.begin(db=db) as txn:
            assert txn.get(b"k") == b"short"
    finally:
        env.close()


def test_server_restart_raises_unavailable_then_recovers(private_pg_cluster: Any) -> None:
    cluster = private_pg_cluster
    env = pgkv.Environment(cluster.url, timeout=2, connect_timeout=2)
    db = env.open_db(b"r")
    with env.begin(write=True, db=db) as txn:
        txn.put(b"a", b"1")
    with env.begin(db=db) as txn:  # leaves idle pooled connections behind
        assert txn.get(b"a") == b"1"

    # A restart while idle: the stale pooled connection is replaced transparently.
    cluster.restart()
    with env.begin(db=db) as txn:
        assert txn.get(b"a") == b"1"

    # The server goes away under an open write transaction.
    txn = env.begin(write=True, db=db)
    txn.put(b"b", b"2")
    cluster.kill()
    with pytest.raises(pgkv.Unavailable) as info:
        txn.commit()
    assert "may or may not" in str(info.value) or "unavailable" in str(info.value)
    txn.abort()
    with pytest.raises(pgkv.Unavailable, match="refused|connect"):
        env.begin(write=True)
    with pytest.raises(pgkv.Unavailable, match="refused|connect"):
        pgkv.Environment(cluster.url, connect_timeout=2)  # migrations need the server
    with pytest.raises(pgkv.Unavailable):
        with env.begin(db=db) as rtxn:
            rtxn.get(b"a")
    assert env._pool.in_use == 0

    cluster.restart()
    with env.begin(write=True, db=db) as txn:  # same Environment, no restart of the process
        assert txn.get(b"b") is None  # the killed transaction was never committed
        txn.put(b"c", b"3")
    with env.begin(db=db) as txn:
        assert list(txn.cursor()) == [(b"a", b"1"), (b"c", b"3")]
    env.close()


def test_notify_wakes_another_node(pg_url: str) -> None:
    a, b = pgkv.Environment(pg_url), pgkv.Environment(pg_url)
    db = a.open_db(b"meta")
    try:
        assert not b.wait_for_notify("banditd_changes", 0.05)  # starts listening
        with a.begin(write=True, db=db) as txn:
            txn.put(b"generation", b"1")
            txn.notify("banditd_changes")
        assert b.wait_for_notify("banditd_changes", 5)
        assert not b.wait_for_notify("banditd_changes", 0.05)  # one wake-up per notification batch
        a.notify("banditd_changes")
        assert b.wait_for_notify("banditd_changes", 5)
    finally:
        a.close()
        b.close()


def test_environment_info_and_stat(pg_url: str) -> None:
    env = pgkv.Environment(pg_url)
    try:
        db = env.open_db(b"info")
        info = env.info()
        assert info["map_size"] >= 1 << 40 and info["last_txnid"] > 0 and info["last_pgno"] >= 0
        st = env.stat()
        assert st["psize"] == 8192 and st["entries"] >= 1
        assert set(st) == {"psize", "depth", "branch_pages", "leaf_pages", "overflow_pages", "entries"}
        env.set_mapsize(1 << 50)
        env.sync(True)
        assert "banditd@127.0.0.1" in env.path()
        assert b"info" in env.dbs()
        with env.begin(write=True) as txn:
            assert env.open_db(b"info", txn=txn) is db
            assert set(txn.stat(db)) == set(st)
    finally:
        env.close()


def test_throughput(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a benchmark gate: prints get and commit rates against the private cluster."""
    env = pgkv.Environment(pg_url)
    db = env.open_db(b"perf")
    try:
        t0 = time.perf_counter()
        with env.begin(write=True, db=db) as txn:
            for i in range(1000):
                txn.put(b"%08d" % i, b"x" * 100)
        commit_1000 = time.perf_counter() - t0
        with env.begin(db=db) as txn:
            t0 = time.perf_counter()
            for i in range(2000):
                assert txn.get(b"%08d" % (i % 1000)) is not None
            gets_in_txn = 2000 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(1000):
            with env.begin(db=db) as txn:
                txn.get(b"%08d" % i)
        txn_per_get = 1000 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(200):
            with env.begin(write=True, db=db) as txn:
                txn.put(b"counter", b"%d" % i)
        small_commits = 200 / (time.perf_counter() - t0)
        with env.begin(db=db) as txn:
            t0 = time.perf_counter()
            rows = sum(1 for _ in txn.cursor())
            scan = rows / (time.perf_counter() - t0)
        with capsys.disabled():
            print(
                f"\npgkv: 1,000-put commit {commit_1000 * 1000:.1f} ms; get {gets_in_txn:,.0f}/s in one read txn, "
                f"{txn_per_get:,.0f}/s with a read txn each; {small_commits:,.0f} one-put commits/s; "
                f"cursor scan {scan:,.0f} rows/s"
            )
        assert commit_1000 < 5.0
    finally:
        env.close()
