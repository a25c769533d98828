"""The on-disk schema: version checked at open, schema 1 upgraded in place, never misread."""

from __future__ import annotations

from pathlib import Path

import lmdb
import orjson
import pytest

from banditd.engine import Engine, RewardInput
from banditd.experiment import ArmSpec, ExperimentSpec
from banditd.store import ARMLOG_KEEP, SCHEMA_VERSION, SchemaError, Store
from banditd.writer import Writer


def _write_v1(path: Path) -> None:
    """A data dir as banditd wrote it before the outcome model (schema 1)."""
    env = lmdb.open(str(path), max_dbs=16)
    dbs = {n: env.open_db(n.encode()) for n in ("meta", "experiments", "arms", "decisions", "events", "assignments")}
    spec = {
        "id": "old", "arms": [{"id": "a", "group": "", "prior": None, "active": True},
                              {"id": "b", "group": "", "prior": None, "active": True}],
        "policy": "thompson", "params": {}, "reward_type": "binary", "sticky": False,
        "window_seconds": 604800, "prior": None, "state": "running", "created_ms": 1, "version": 1,
    }  # fmt: skip
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", b"1", db=dbs["meta"])
        txn.put(b"old", orjson.dumps(spec), db=dbs["experiments"])
        txn.put(b"old\0a", orjson.dumps([10, 4, 3.0, 3.0]), db=dbs["arms"])
        txn.put(b"old\0b", orjson.dumps([5, 2, 0.0, 0.0]), db=dbs["arms"])
        txn.put(b"old\0d1/a", orjson.dumps(["d1", "a", 1.0, 5]), db=dbs["events"])
    env.close()


def test_schema_1_is_upgraded_in_place_and_keeps_what_it_learnt(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _write_v1(path)
    store = Store(path)
    writer = Writer(store)
    engine = Engine(store, writer)
    engine.load()
    rt = engine.runtime("old")
    assert rt is not None and rt.spec.rule.mode == "explicit"  # what it was learning under
    stats = {s.arm_id: s for s in engine.arm_stats("old")}
    assert (stats["a"].pulls, stats["a"].rewards, stats["a"].observations) == (10, 4, 4)
    assert stats["a"].mean == pytest.approx((1 + 3) / (2 + 4))  # Beta(1 + 3, 1 + 1)
    assert stats["b"].mean == pytest.approx(1 / (2 + 2))
    assert store.counter(b"schema_version") == SCHEMA_VERSION
    store.close()
    # Opened again: already version 2, nothing upgraded twice.
    again = Store(path)
    _, rows, _ = again.experiment_state("old")
    assert rows["a"].observations == 4
    again.close()


def test_a_store_of_an_unknown_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "store"
    Store(path).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(SchemaError, match="schema version 99.*newer banditd"):
        Store(path)
    with pytest.raises(SchemaError, match="schema version 99"):
        Store.open_readonly(path)


def test_read_only_open_refuses_a_store_that_needs_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _write_v1(path)
    with pytest.raises(SchemaError, match="upgrade"):
        Store.open_readonly(path)


def test_a_pool_member_reads_only_the_arms_that_changed_and_gets_the_full_state(tmp_path: Path) -> None:
    """What `refresh_from_store` reads when another process committed: the rows the arm log
    names since the state it has, which with the rows it kept is the full state; a gap the
    log no longer covers falls back to every row."""
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=0.0)
    writer.start()
    engine = Engine(store, writer, seed=3)
    try:
        engine.create_experiment(ExperimentSpec(id="e", arms=[ArmSpec(f"a{i}") for i in range(200)]), timeout=10)
        for i in range(30):
            rec = engine.decide("e", f"u{i}", 1).record
            assert engine.reward_batch([RewardInput(rec.decision_id, 1.0)], timeout=10)[0].error is None
        _, before, seen = store.experiment_state("e")
        chosen = set()
        for i in range(5):
            rec = engine.decide("e", f"v{i}", 1).record
            chosen.add(rec.arms[0])
            assert engine.reward_batch([RewardInput(rec.decision_id, float(i % 2))], timeout=10)[0].error is None
        policy, rows, counter, full = store.experiment_state_since("e", seen)
        want_policy, want_rows, want_counter = store.experiment_state("e")
        assert not full and counter == want_counter > seen
        assert set(rows) == chosen  # a handful of rows, not 200
        assert {**before, **rows} == want_rows and policy == want_policy
        assert store.experiment_state_since("e", counter)[1:] == ({}, counter, False)
        # More commits than the log keeps: every row again.
        for i in range(ARMLOG_KEEP + 1):
            engine.decide("e", f"w{i}", 1)
            writer.sync(10)
        policy, rows, counter, full = store.experiment_state_since("e", seen)
        # (An arm no decision chose has no row: which ones depends on the kernel's draws.)
        assert full and rows == store.experiment_state("e")[1] and len(rows) >= 150
    finally:
        writer.close()
        store.close()
