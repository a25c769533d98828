"""Group commit: decision records linger to share a commit; nothing else waits for them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from banditd.engine import Engine, RewardInput
from banditd.errors import ResourceExhausted, Unavailable
from banditd.experiment import ArmSpec, ExperimentSpec
from banditd.store import Store
from banditd.writer import Batch, WriteOp, Writer


class Note(WriteOp):
    """Stands for a decision record: nobody waits for it."""

    deferrable = True

    def __init__(self, n: int) -> None:
        self.n = n

    def write(self, batch: Batch) -> None:
        batch.txn.put(f"note-{self.n}".encode(), b"1", db=batch.store.meta)


def test_decision_records_submitted_close_together_share_one_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=30.0)
    writer.start()
    for n in range(5):
        writer.submit(Note(n))
        time.sleep(0.01)
    # A barrier is not deferrable: it ends the linger at once (else this waits 30 s and fails).
    writer.sync(timeout=10.0)
    assert writer.commits == 1
    assert writer.ops_committed == 6
    with store.env.begin(db=store.meta) as txn:
        assert all(txn.get(f"note-{n}".encode()) == b"1" for n in range(5))
    writer.close()
    store.close()


def test_a_lone_decision_record_is_committed_after_the_linger(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=0.02)
    writer.start()
    writer.submit(Note(0))
    deadline = time.monotonic() + 10
    while writer.commits == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.commits == 1
    writer.close()
    store.close()


def test_closing_commits_lingering_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=30.0)
    writer.start()
    writer.submit(Note(7))
    writer.close(timeout=10.0)
    assert writer.commits == 1
    with store.env.begin(db=store.meta) as txn:
        assert txn.get(b"note-7") == b"1"
    store.close()


def _plain_engine(tmp_path: Path, **writer_args: Any) -> tuple[Store, Writer, Engine]:
    store = Store(tmp_path / "store")
    writer = Writer(store, **writer_args)
    writer.start()
    engine = Engine(store, writer, seed=1)
    engine.create_experiment(ExperimentSpec(id="e", arms=[ArmSpec("a"), ArmSpec("b")]), timeout=10)
    return store, writer, engine


def test_plain_decisions_reach_the_writer_as_one_op_per_commit_and_all_count(tmp_path: Path) -> None:
    store, writer, engine = _plain_engine(tmp_path, linger_s=30.0)
    before = writer.ops_committed
    ids = [engine.decide_one("e", f"u{i}").record.decision_id for i in range(200)]
    assert writer.pending == 1  # one op holds them all
    # Rewardable before their commit: the reward's op is queued behind the records' op.
    assert engine.reward_batch([RewardInput(ids[7], 1.0)], timeout=10)[0].error is None
    assert writer.ops_committed - before == 2
    assert set(store.decisions_many(ids)) == set(ids)
    stats = {s.arm_id: s for s in engine.arm_stats("e")}
    assert sum(s.pulls for s in stats.values()) == 200
    assert sum(s.rewards for s in stats.values()) == 1
    assert engine.status()["pending_decisions"] == 0
    writer.close()
    store.close()


def test_a_plain_decision_refused_for_a_full_queue_or_a_stopping_writer_leaves_no_trace(tmp_path: Path) -> None:
    store, writer, engine = _plain_engine(tmp_path, linger_s=30.0, queue_limit=5)
    ids = [engine.decide_one("e", f"u{i}").record.decision_id for i in range(5)]
    with pytest.raises(ResourceExhausted, match="queue is full"):
        engine.decide_one("e", "one-too-many")
    assert engine.status()["pending_decisions"] == 5
    writer.sync(timeout=10)
    assert set(store.decisions_many(ids)) == set(ids)
    assert sum(s.pulls for s in engine.arm_stats("e")) == 5
    writer.close()
    with pytest.raises(Unavailable, match="shutting down"):
        engine.decide_one("e", "late")
    assert engine.status()["pending_decisions"] == 0
    store.close()


def test_plain_path_and_the_general_one_store_the_same_record(tmp_path: Path) -> None:
    store, writer, engine = _plain_engine(tmp_path)
    one = engine.decide_one("e", "unit-1").record
    general = engine.decide("e", "unit-1", 1).record
    writer.sync(timeout=10)
    got = store.decisions_many([one.decision_id, general.decision_id])
    a, b = got[one.decision_id], got[general.decision_id]
    assert (a.experiment_id, a.unit_id, a.context, a.source, len(a.arms)) == (
        b.experiment_id, b.unit_id, b.context, b.source, len(b.arms)
    )
    assert 0 < a.propensities[0] <= 1 and a.model_version >= 0
    writer.close()
    store.close()
