"""Per-desktop locks and the operations journal in the state database.

A lock names its owner (host and pid) and is only taken over when that
process is provably gone from this host. Every operation records its named
steps as they start and finish, so `labvm ops` can show where one stopped.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager

from .errors import Busy
from .state import StateDB


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Operation:
    def __init__(self, db: StateDB, op_id: int):
        self.db = db
        self.id = op_id
        self._seq = 0

    @classmethod
    def begin(cls, db: StateDB, kind: str, user: str | None, params: dict) -> "Operation":
        now = time.time()
        cur = db.conn.execute(
            "INSERT INTO operations (kind, user, state, params, created_at, updated_at) VALUES (?, ?, 'running', ?, ?, ?)",
            (kind, user, json.dumps(params, sort_keys=True), now, now),
        )
        return cls(db, cur.lastrowid)

    @contextmanager
    def step(self, name: str):
        self._seq += 1
        seq = self._seq
        self.db.conn.execute(
            "INSERT INTO operation_steps (op_id, seq, name, state, started_at) VALUES (?, ?, ?, 'running', ?)",
            (self.id, seq, name, time.time()),
        )
        try:
            yield
        except BaseException as exc:
            self._finish_step(seq, "failed", str(exc) or type(exc).__name__)
            raise
        self._finish_step(seq, "done", None)

    def _finish_step(self, seq: int, state: str, detail: str | None) -> None:
        self.db.conn.execute(
            "UPDATE operation_steps SET state = ?, detail = ?, finished_at = ? WHERE op_id = ? AND seq = ?",
            (state, detail, time.time(), self.id, seq),
        )

    def finish(self, state: str, error: str | None = None) -> None:
        self.db.conn.execute(
            "UPDATE operations SET state = ?, error = ?, updated_at = ? WHERE id = ?", (state, error, time.time(), self.id)
        )


@contextmanager
def vm_lock(db: StateDB, user: str, op_id: int | None = None):
    """Hold the desktop's lock for the block; refuse at once if a live operation holds it."""
    host, pid = socket.gethostname(), os.getpid()
    _acquire(db, user, op_id, host, pid)
    try:
        yield
    finally:
        db.conn.execute("DELETE FROM vm_locks WHERE user = ? AND owner_host = ? AND owner_pid = ?", (user, host, pid))


def _acquire(db: StateDB, user: str, op_id: int | None, host: str, pid: int) -> None:
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        row = db.conn.execute("SELECT op_id, owner_host, owner_pid, acquired_at FROM vm_locks WHERE user = ?", (user,)).fetchone()
        if row is not None:
            stale = row["owner_host"] == host and not _pid_alive(row["owner_pid"])
            if not stale:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["acquired_at"]))
                raise Busy(
                    f"{user}'s desktop is locked by operation {row['op_id']} (pid {row['owner_pid']} on "
                    f"{row['owner_host']}) since {since}; wait for it, or see `labvm ops list`"
                )
            db.conn.execute("DELETE FROM vm_locks WHERE user = ?", (user,))
        db.conn.execute(
            "INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES (?, ?, ?, ?, ?)",
            (user, op_id, host, pid, time.time()),
        )
        db.conn.execute("COMMIT")
    except BaseException:
        try:
            db.conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass
        raise


@contextmanager
def journaled(db: StateDB, kind: str, user: str, params: dict, failed_state: str = "failed"):
    """Journal an operation on a desktop and hold the desktop's lock for it.

    A lock held elsewhere ends the operation as `refused`; a failure as `failed_state`.
    """
    op = Operation.begin(db, kind, user, params)
    try:
        with vm_lock(db, user, op.id):
            yield op
    except Busy as exc:
        op.finish("refused", str(exc))
        raise
    except BaseException as exc:
        op.finish(failed_state, str(exc) or type(exc).__name__)
        raise
    op.finish("done")
