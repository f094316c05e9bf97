"""Per-desktop locks and the operations journal."""

import os
import socket
import subprocess
import sys

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


def test_remembered_values_and_done_steps_survive_a_reload(db):
    op = Operation.begin(db, "switch", "alice", {"target": "n2"})
    with op.step("preflight"):
        op.remember(target_ports=[20000, 20001])
    again = Operation.load(db, op.id)
    assert again.kind == "switch" and again.params == {"target": "n2", "target_ports": [20000, 20001]}
    assert again.done("preflight") and not again.done("merge")
    with again.step("merge"):
        pass
    seqs = [r["seq"] for r in db.conn.execute("SELECT seq FROM operation_steps WHERE op_id = ? ORDER BY seq", (op.id,))]
    assert seqs == [1, 2]  # a resumed operation numbers its steps on from the journal


def test_a_crash_point_kills_the_process_after_journaling_the_step(tmp_path):
    StateDB.create(tmp_path)
    code = (
        "from pathlib import Path; from labvm.state import StateDB; from labvm.journal import Operation\n"
        f"db = StateDB.open(Path({str(tmp_path)!r})); op = Operation.begin(db, 'switch', 'alice', {{}})\n"
        "with op.step('preflight'): pass\n"
        "with op.step('merge'): print('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "LABVM_CRASH_AT": "switch:merge"})
    assert result.returncode == 137 and "not reached" not in result.stdout
    with StateDB.open(tmp_path) as db:
        steps = {r["name"]: r["state"] for r in db.conn.execute("SELECT name, state FROM operation_steps")}
    assert steps == {"preflight": "done", "merge": "running"}


def test_resuming_an_operation_takes_over_its_dead_lock_and_finishes_it(db):
    op = Operation.begin(db, "switch", "alice", {})
    db.conn.execute(
        "INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', ?, ?, 999999999, 0)",
        (op.id, socket.gethostname()),
    )
    with journaled(db, "switch", "alice", {}, existing=Operation.load(db, op.id)) as resumed:
        assert resumed.id == op.id
    row = db.conn.execute("SELECT state FROM operations WHERE id = ?", (op.id,)).fetchone()
    assert row["state"] == "done"
    assert db.conn.execute("SELECT COUNT(*) FROM vm_locks").fetchone()[0] == 0


def test_an_interrupted_operation_keeps_its_desktop_locked_until_resumed_or_aborted(db):
    op = Operation.begin(db, "switch", "alice", {})
    with op.step("preflight"):
        pass
    db.conn.execute(  # its process was killed: the lock names a dead pid, the operation never ended
        "INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', ?, ?, 999999999, 0)",
        (op.id, socket.gethostname()),
    )
    other = Operation.begin(db, "stop", "alice", {})
    with pytest.raises(Busy, match=rf"operation {op.id} \(switch\), interrupted at step preflight; .*ops resume {op.id}.*ops abort {op.id}"):
        with vm_lock(db, "alice", other.id):
            pass
    assert db.conn.execute("SELECT op_id FROM vm_locks").fetchone()["op_id"] == op.id
    # Once it is given up (resumed as a new run, or aborted), its dead lock is a leftover.
    op.finish("aborted")
    with vm_lock(db, "alice", other.id):
        assert db.conn.execute("SELECT op_id FROM vm_locks").fetchone()["op_id"] == other.id


def test_a_rolled_back_failure_is_journaled_as_rolled_back(db):
    from labvm.errors import RolledBack

    with pytest.raises(RolledBack):
        with journaled(db, "switch", "alice", {}):
            raise RolledBack(msg="switch failed and was rolled back")
    assert db.conn.execute("SELECT state FROM operations").fetchone()["state"] == "rolled_back"


def _steps(db, op):
    return [tuple(r) for r in db.conn.execute("SELECT name, state, detail FROM operation_steps WHERE op_id = ? ORDER BY seq", (op.id,))]


def test_steps_sent_together_are_each_marked_as_the_reply_shows_them(db):
    op = Operation.begin(db, "start", "alice", {})
    with op.steps(["mount_mfs", "mount_stack", "start_container"]) as done:
        assert [state for _, state, _ in _steps(db, op)] == ["running"] * 3  # all left in one round trip
        done("mount_mfs")
    assert _steps(db, op) == [("mount_mfs", "done", None), ("mount_stack", "done", None), ("start_container", "done", None)]


def test_steps_sent_together_show_the_failed_one_and_drop_those_never_run(db):
    op = Operation.begin(db, "start", "alice", {})
    with pytest.raises(RuntimeError):
        with op.steps(["mount_mfs", "mount_stack", "start_sync", "start_container"]) as done:
            done("mount_mfs")
            raise RuntimeError("stack refused")
    assert _steps(db, op) == [("mount_mfs", "done", None), ("mount_stack", "failed", "stack refused")]
    with op.step("again"):
        pass
    assert _steps(db, op)[-1] == ("again", "done", None)
