"""Group commit: decision records linger to share a commit; nothing else waits for them."""

from __future__ import annotations

import time
from pathlib import Path

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

