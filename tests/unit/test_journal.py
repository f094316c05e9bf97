"""Per-desktop locks and the operations journal."""

import os
import socket

import pytest

from labvm.errors import Busy
from labvm.journal import Operation, journaled, vm_lock
from labvm.state import StateDB


@pytest.fixture
def db(tmp_path):
    StateDB.create(tmp_path)
    with StateDB.open(tmp_path) as db:
        yield db


def test_second_lock_is_refused_at_once_with_its_owner(db):
    op = Operation.begin(db, "create", "alice", {})
    with vm_lock(db, "alice", op.id):
        db.conn.execute("UPDATE vm_locks SET owner_pid = 1")  # pid 1 is alive: someone else's live operation
        with pytest.raises(Busy, match=rf"locked by operation {op.id} \(pid 1 on {socket.gethostname()}\)"):
            with vm_lock(db, "alice"):
                pass


def test_lock_of_a_dead_process_on_this_host_is_taken_over(db):
    db.conn.execute(
        "INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', NULL, ?, 999999999, 0)",
        (socket.gethostname(),),
    )
    with vm_lock(db, "alice"):
        row = db.conn.execute("SELECT owner_pid FROM vm_locks").fetchone()
        assert row["owner_pid"] == os.getpid()
    assert db.conn.execute("SELECT COUNT(*) FROM vm_locks").fetchone()[0] == 0


def test_lock_of_another_host_is_never_taken_over(db):
    db.conn.execute("INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', NULL, 'elsewhere', 999999999, 0)")
    with pytest.raises(Busy, match="on elsewhere"):
        with vm_lock(db, "alice"):
            pass


def test_steps_are_journaled_with_failures(db):
    op = Operation.begin(db, "create", "alice", {"gpus": 1})
    with op.step("place"):
        pass
    with pytest.raises(RuntimeError):
        with op.step("mount_stack"):
            raise RuntimeError("mount refused")
    op.finish("rolled_back", "mount refused")
    steps = [tuple(r) for r in db.conn.execute("SELECT name, state, detail FROM operation_steps WHERE op_id = ? ORDER BY seq", (op.id,))]
    assert steps == [("place", "done", None), ("mount_stack", "failed", "mount refused")]
    assert db.conn.execute("SELECT state, error FROM operations WHERE id = ?", (op.id,)).fetchone()[:] == ("rolled_back", "mount refused")


def test_journaled_ends_each_operation_with_what_happened(db):
    db.conn.execute("INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', NULL, 'elsewhere', 1, 0)")
    with pytest.raises(Busy):
        with journaled(db, "stop", "alice", {}):
            raise AssertionError("the body must not run without the lock")
    with journaled(db, "start", "bob", {}):
        assert db.conn.execute("SELECT user FROM vm_locks WHERE user = 'bob'").fetchone() is not None
    with pytest.raises(RuntimeError):
        with journaled(db, "create", "carol", {}, failed_state="rolled_back"):
            raise RuntimeError("node gone")
    states = [tuple(r) for r in db.conn.execute("SELECT kind, state FROM operations ORDER BY id")]
    assert states == [("stop", "refused"), ("start", "done"), ("create", "rolled_back")]
    assert [r[0] for r in db.conn.execute("SELECT user FROM vm_locks")] == ["alice"]
