"""Failure paths: failed commits, map growth under readers (in one process and across
processes), deadlines, unknown decisions in a pool, and decisions racing arm additions."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import lmdb
import pytest

from banditd.engine import Engine, RewardInput
from banditd.errors import BanditdError, DeadlineExceeded, DecisionNotFound, ResourceExhausted
from banditd.experiment import ArmSpec, ExperimentSpec
from banditd.store import SPECS_COUNTER, DecisionRecord, Store
from banditd.writer import Batch, WriteOp, Writer
from banditd_client import Client
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc
from conftest import ServerProcess

TINY_MAP = 64 << 10


class Put(WriteOp):
    """Stores one value in the meta database; records whether its batch failed."""

    def __init__(self, name: str, size: int = 1, deferrable: bool = False) -> None:
        self.name = name
        self.size = size
        self.deferrable = deferrable
        self.failures: list[BaseException] = []

    def write(self, batch: Batch) -> str:
        batch.txn.put(self.name.encode(), b"v" * self.size, db=batch.store.meta)
        return self.name

    def failed(self, exc: BaseException) -> None:
        self.failures.append(exc)


class PutDecisions(WriteOp):
    """Stores decision records padded to `size` bytes each (data that forces map growth)."""

    def __init__(self, ids: list[str], size: int) -> None:
        self.ids = ids
        self.size = size

    def write(self, batch: Batch) -> None:
        for d in self.ids:
            batch.put_decision(padded_decision(d, self.size))


def padded_decision(decision_id: str, size: int) -> DecisionRecord:
    return DecisionRecord(decision_id, "e", ("a",), (1.0,), "u", 1, 1, {"pad": decision_id[-1] * size})


def stored(store: Store, name: str) -> bytes | None:
    with store.reading() as txn:
        raw = txn.get(name.encode(), db=store.meta)
    return None if raw is None else bytes(raw)


class _Txn:
    """A write transaction whose commit fails like a failing disk."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def commit(self) -> None:
        raise lmdb.DiskError("mdb_txn_commit: Input/output error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


class _Env:
    """The store's environment with write transactions that cannot begin or cannot commit."""

    def __init__(self, env: lmdb.Environment, mode: str) -> None:
        self._env = env
        self._mode = mode

    def begin(self, *args: Any, write: bool = False, **kwargs: Any) -> Any:
        if write and self._mode == "begin":
            raise lmdb.ReadersFullError("mdb_txn_begin: MDB_READERS_FULL: Environment maxreaders limit reached")
        txn = self._env.begin(*args, write=write, **kwargs)
        return _Txn(txn) if write and self._mode == "commit" else txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def _break_growth(store: Store) -> Callable[[], None]:
    def grow() -> None:
        raise lmdb.Error("mdb_env_set_mapsize: Cannot allocate memory")

    store.grow = grow  # type: ignore[method-assign]
    return lambda: delattr(store, "grow")


def _break_env(mode: str) -> Callable[[Store], Callable[[], None]]:
    def breaker(store: Store) -> Callable[[], None]:
        real = store.env
        store.env = _Env(real, mode)  # type: ignore[assignment]
        return lambda: setattr(store, "env", real)

    return breaker


# 1. Every submitted op is answered whatever fails, and the writer keeps going.
@pytest.mark.parametrize(
    "breaker", [_break_env("begin"), _break_env("commit"), _break_growth], ids=["begin", "commit", "growth"]
)
def test_a_failed_batch_resolves_every_op_and_the_writer_goes_on(
    tmp_path: Path, breaker: Callable[[Store], Callable[[], None]]
) -> None:
    store = Store(tmp_path / "store", map_size=TINY_MAP)
    writer = Writer(store)
    restore = breaker(store)
    # Queued before the thread starts: one batch. The big value needs a map growth.
    ops = [Put("a"), Put("big", size=200_000), Put("c")]
    for op in ops:
        op.future = Future()
        writer.submit(op)
    note = Put("note", deferrable=True)  # a decision record: nobody waits for it
    writer.submit(note)
    writer.start()
    try:
        for op in ops:
            assert isinstance(op.future.exception(timeout=10), ResourceExhausted)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while not note.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [type(e) for e in note.failures] == [ResourceExhausted]
        assert writer.failed_commits == 1
        assert all(stored(store, n) is None for n in ("a", "big", "c", "note"))
        # The writer thread survived and commits the next batch, growth included.
        restore()
        assert writer.submit_and_wait(Put("big", size=200_000), timeout=10) == "big"
        writer.submit(Put("note", deferrable=True))
        writer.sync(timeout=10)
        assert writer._thread.is_alive()
        assert stored(store, "big") == b"v" * 200_000 and stored(store, "note") == b"v"
    finally:
        writer.close()
        store.close()


def test_a_decision_whose_record_fails_to_commit_is_not_pending_forever(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store)
    writer.start()
    engine = Engine(store, writer)
    try:
        engine.create_experiment(ExperimentSpec(id="e", arms=[ArmSpec("a"), ArmSpec("b")]), timeout=10)
        restore = _break_env("begin")(store)
        lost = engine.decide("e", "u1", 1).record.decision_id
        with pytest.raises(ResourceExhausted):
            writer.sync(timeout=10)  # fails in the same broken state, after the decision's batch
        assert writer.failed_commits >= 1
        assert lost not in engine._pending
        # While the store cannot write, decisions are refused (they could not be stored).
        with pytest.raises(ResourceExhausted, match="cannot write"):
            engine.decide("e", "u-refused", 1)
        restore()
        with pytest.raises(DecisionNotFound):
            engine.reward(RewardInput(lost, 1.0), timeout=10)
        writer.sync(timeout=10)  # a commit succeeds again (the server's background thread probes)
        kept = engine.decide("e", "u2", 1).record.decision_id
        writer.sync(timeout=10)
        assert not engine._pending
        assert store.decision(kept) is not None and store.decision(lost) is None
        assert engine.reward(RewardInput(kept, 1.0), timeout=10)
    finally:
        writer.close()
        store.close()


# 2. Map growth while reads are in flight.
def test_map_growth_waits_for_readers_in_the_same_process(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", map_size=TINY_MAP)
    writer = Writer(store)
    writer.start()
    committed: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                store.counter(SPECS_COUNTER)
                store.experiment_specs()
                ids = list(committed)
                found = store.decisions_many(ids)
                assert sorted(found) == sorted(ids)
                for d, rec in found.items():
                    assert rec.context == {"pad": d[-1] * 3000}
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        for batch in range(60):
            ids = [f"{batch:04d}-{i}" for i in range(6)]
            writer.submit_and_wait(PutDecisions(ids, 3000), timeout=10)
            committed.extend(ids)
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    try:
        assert not errors, errors[:3]
        assert store.env.info()["map_size"] >= 16 * TINY_MAP  # grew several times
        assert len(store.decisions_many(committed)) == len(committed) == 360
    finally:
        writer.close()
        store.close()


def _other_process(path: str, ready: Any, grown: Any, results: Any, parent_ids: list[str]) -> None:
    """A second process on the same store: reads while the first grows the map, then reads
    what it wrote and writes (and grows) itself."""
    try:
        store = Store(path, map_size=TINY_MAP)
        writer = Writer(store)
        writer.start()
        ready.set()
        reads = 0
        while not grown.is_set():
            store.counter(SPECS_COUNTER)
            store.decisions_many(parent_ids[:5])
            reads += 1
        found = store.decisions_many(parent_ids)
        assert len(found) == len(parent_ids), (len(found), len(parent_ids))
        for batch in range(20):
            writer.submit_and_wait(PutDecisions([f"c{batch:03d}-{i}" for i in range(20)], 3000), timeout=20)
        writer.close()
        results.put(("ok", reads, store.env.info()["map_size"]))
        store.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(exc), 0))


def test_map_growth_in_one_process_is_adopted_by_another(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = Store(path, map_size=TINY_MAP)
    writer = Writer(store)
    writer.start()
    ctx = mp.get_context("spawn")
    ready, grown, results = ctx.Event(), ctx.Event(), ctx.Queue()
    parent_ids = [f"p{b:03d}-{i}" for b in range(30) for i in range(10)]
    child = ctx.Process(target=_other_process, args=(str(path), ready, grown, results, parent_ids))
    child.start()
    try:
        assert ready.wait(30), "the other process did not start"
        for b in range(30):
            writer.submit_and_wait(PutDecisions(parent_ids[b * 10 : (b + 1) * 10], 3000), timeout=10)
        assert store.env.info()["map_size"] >= 16 * TINY_MAP
        grown.set()
        status, detail, child_map = results.get(timeout=40)
        assert status == "ok", detail
        assert child_map > store.env.info()["map_size"]  # it grew the map further itself
        # This process reads (and then writes) past the size it knew.
        child_ids = [f"c{b:03d}-{i}" for b in range(20) for i in range(20)]
        assert len(store.decisions_many(child_ids)) == 400
        writer.submit_and_wait(Put("after"), timeout=10)
        assert stored(store, "after") == b"v"
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
        writer.close()
        store.close()


# 3. A passed deadline is DEADLINE_EXCEEDED, never an internal error.
def test_a_write_past_its_deadline_raises_deadline_exceeded(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store)
    writer.start()
    Engine(store, writer).create_experiment(ExperimentSpec(id="e", arms=[ArmSpec("a")]), timeout=10)
    writer.close()
    stalled = Writer(store)  # never started: nothing commits
    engine = Engine(store, stalled)
    engine.load()
    try:
        decision = engine.decide("e", "u", 1).record.decision_id  # pending, not committed
        with pytest.raises(DeadlineExceeded):
            engine.reward(RewardInput(decision, 1.0), timeout=0.05)
        with pytest.raises(DeadlineExceeded):
            engine.create_experiment(ExperimentSpec(id="f", arms=[ArmSpec("a")]), timeout=0.05)
    finally:
        store.close()


def test_rewards_with_a_tiny_deadline_never_answer_internal(server: ServerProcess, client: Client) -> None:
    client.create_experiment("dl", arms=["a", "b"])
    decision = client.decide("dl").decision_id
    codes: set[grpc.StatusCode] = set()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.BanditdStub(channel)
        for i in range(50):
            req = pb.RewardRequest(decision_id=decision, value=1.0, event_id=f"ev-{i}")
            try:
                stub.Reward(req, timeout=0.001)
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.add(err.code())
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        assert stub.Reward(pb.RewardRequest(decision_id=decision, value=1.0, event_id="no-deadline")).accepted


# 4. A pool waits once per reward batch for decisions it does not know.
def test_unknown_decisions_in_a_pool_cost_one_wait_per_batch(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data", ("--workers", "2", "--refresh-ms", "20"))
    srv.start()
    clients = [Client(srv.target, timeout=10.0) for _ in range(4)]
    try:
        clients[0].create_experiment("pool", arms=["a", "b"])
        good = [clients[i % len(clients)].decide("pool").decision_id for i in range(8)]
        unknown = [f"{i:011x}{'0' * 11}unknown" for i in range(200)]
        items = [(d, 1.0) for d in unknown[:100]] + [(d, 1.0) for d in good] + [(d, 1.0) for d in unknown[100:]]
        started = time.monotonic()
        counts = clients[1].reward_many(items, timeout=60)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, elapsed  # one wait per batch is 0.25 s; one per unknown id is 50 s
        assert (counts.accepted, counts.duplicate, counts.rejected) == (len(good), 0, 200)
        assert counts.rejections and all(r.code == "NOT_FOUND" for r in counts.rejections)
        assert {r.decision_id for r in counts.rejections} <= set(unknown)
    finally:
        for c in clients:
            c.close()
        srv.kill()


# 5. Decisions racing arm additions only ever name known arms.
def test_decisions_racing_arm_additions_name_known_arms(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=0.005)
    writer.start()
    engine = Engine(store, writer, seed=7)
    engine.create_experiment(ExperimentSpec(id="e", arms=[ArmSpec(x) for x in "abc"]), timeout=10)
    stop = threading.Event()
    errors: list[BaseException] = []
    chosen: set[str] = set()
    decisions = [0]

    def decide(k: int) -> None:
        while not stop.is_set():
            try:
                arms = engine.decide("e", "", k).record.arms
                assert len(arms) == k
                chosen.update(arms)
                decisions[0] += 1
            except BanditdError:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            # A pause lets the GIL go: the writer, which adds the arms, gets it back as soon as
            # the core has them, and the deciders run in that very window.
            time.sleep(0.001)

    threads = [threading.Thread(target=decide, args=(k,)) for k in (1, 3, 1, 3)]
    for t in threads:
        t.start()
    try:
        for n in range(200):
            engine.update_experiment("e", [ArmSpec(f"new{n}")], [], None, timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    try:
        assert not errors, errors[:3]
        known = {a.id for a in engine.get_experiment("e").arms}
        assert len(known) == 203
        assert chosen <= known, chosen - known
        assert decisions[0] > 500
        writer.sync(timeout=10)
        assert not engine._pending
    finally:
        writer.close()
        store.close()
