"""Per-desktop locks and the operations journal in the state database, whose rows the store (StateDB) reads and writes.

A lock names its owner (host and pid) and is only taken over when that
process is provably gone from this host. Every operation records its named
steps as they start and finish, so `labvm ops` can show where one stopped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager

from .errors import Busy
from .state import StateDB
from .text import storable


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Fault injection for the crash tests: LABVM_CRASH_AT=KIND:STEP kills this process (as kill -9
# would) when that step of that kind of operation begins, after the journal recorded it.
# LABVM_STEP_HOOK=PROGRAM runs `PROGRAM KIND STEP` before each step: a test stops a node's
# daemons or cuts its network at a chosen point of a switch with it.
CRASH_VARIABLE = "LABVM_CRASH_AT"
HOOK_VARIABLE = "LABVM_STEP_HOOK"


class Operation:
    def __init__(self, db: StateDB, op_id: int, kind: str = "", params: dict | None = None):
        self.db = db
        self.id = op_id
        self.kind = kind
        self.params = dict(params or {})
        self._seq = db.last_step_seq(op_id)

    @classmethod
    def load(cls, db: StateDB, op_id: int) -> "Operation":
        row = db.operation(op_id)
        if row is None:
            from .errors import NotFound

            raise NotFound(f"no operation {op_id}; see `labvm ops list`")
        return cls(db, op_id, row["kind"], json.loads(row["params"]))

    def remember(self, **values) -> None:
        """Keep values a resumed run needs (a target's GPUs, a published version) in the journal."""
        self.params.update(values)
        self.db.set_operation_params(self.id, self.params)

    def done(self, name: str) -> bool:
        return self.db.step_done(self.id, name)

    def retry(self, name: str) -> None:
        """Step `name` failed and what failed it was put right: its failed row goes, as it
        runs again."""
        row = next((r for r in reversed(self.db.operation_steps(self.id)) if r["name"] == name), None)
        if row is not None and row["state"] == "failed":
            self.db.drop_step(self.id, row["seq"])

    def set_state(self, state: str) -> None:
        self.db.set_operation_state(self.id, state)

    @classmethod
    def begin(cls, db: StateDB, kind: str, user: str | None, params: dict) -> "Operation":
        return cls(db, db.begin_operation(kind, user, params), kind, params)

    def _begin_step(self, name: str) -> int:
        self._seq += 1
        self.db.add_step(self.id, self._seq, name)
        if os.environ.get(CRASH_VARIABLE) == f"{self.kind}:{name}":
            os._exit(137)
        if os.environ.get(HOOK_VARIABLE):
            subprocess.run([os.environ[HOOK_VARIABLE], self.kind, name], check=False, timeout=120)
        return self._seq

    @contextmanager
    def step(self, name: str):
        seq = self._begin_step(name)
        try:
            yield
        except BaseException as exc:
            self._finish_step(seq, "failed", str(exc) or type(exc).__name__)
            raise
        self._finish_step(seq, "done", None)

    @contextmanager
    def steps(self, names: list[str]):
        """Steps that go to a node together, in one round trip: all are journaled as running
        when it leaves. The block calls the yielded `done(name)` as the reply shows each one
        finished; on a failure the first step not done is the failed one, and those after it,
        which never ran, leave the journal."""
        seqs = {name: self._begin_step(name) for name in names}
        finished: list[str] = []

        def done(name: str) -> None:
            self._finish_step(seqs[name], "done", None)
            finished.append(name)

        try:
            yield done
        except BaseException as exc:
            left = [name for name in names if name not in finished]
            if left:
                self._finish_step(seqs[left[0]], "failed", str(exc) or type(exc).__name__)
                for name in left[1:]:
                    self.db.drop_step(self.id, seqs[name])
            raise
        for name in names:
            if name not in finished:
                done(name)

    def _finish_step(self, seq: int, state: str, detail: str | None) -> None:
        self.db.finish_step(self.id, seq, state, None if detail is None else storable(detail))

    def finish(self, state: str, error: str | None = None) -> None:
        self.db.finish_operation(self.id, state, None if error is None else storable(error))


def _refuse_interrupted(db: StateDB, user: str, held_by: int) -> None:
    """A lock whose owner died mid-operation stays: the desktop is half-way through that
    operation, and only `ops resume` or `ops abort` of it may take the lock over."""
    op = db.operation(held_by)
    if op is None or op["state"] != "running":
        return  # the operation ended (resumed, aborted): its lock is a leftover
    step = db.last_step_name(held_by)
    at = f" at step {step}" if step else ""
    raise Busy(
        f"{user}'s desktop is held by operation {held_by} ({op['kind']}), interrupted{at}; "
        f"finish it with `labvm ops resume {held_by}` or give it up with `labvm ops abort {held_by}`"
    )


@contextmanager
def vm_lock(db: StateDB, user: str, op_id: int | None = None):
    """Hold the desktop's lock for the block; refuse at once if a live operation holds it."""
    host, pid = socket.gethostname(), os.getpid()
    _acquire(db, user, op_id, host, pid)
    try:
        yield
    finally:
        db.release_lock(user, host, pid)


def _refuse_held(db: StateDB, user: str, row, op_id: int | None, host: str) -> None:
    """Raise Busy if the lock row keeps operation op_id from taking the desktop's lock; return
    if the row is a leftover of a process gone from this host, to be taken over."""
    stale = row["owner_host"] == host and not _pid_alive(row["owner_pid"])
    if stale and row["op_id"] is not None and row["op_id"] != op_id:
        _refuse_interrupted(db, user, row["op_id"])
    if not stale:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["acquired_at"]))
        raise Busy(
            f"{user}'s desktop is locked by operation {row['op_id']} (pid {row['owner_pid']} on "
            f"{row['owner_host']}) since {since}; wait for it, or see `labvm ops list`"
        )


def check_lock(db: StateDB, user: str) -> str:
    """What taking the desktop's lock for a new operation would find, without taking it: raises
    Busy as vm_lock would, else says whether the lock is free or a leftover to take over."""
    row = db.lock_row(user)
    if row is None:
        return "free"
    _refuse_held(db, user, row, None, socket.gethostname())
    return f"free (a leftover of pid {row['owner_pid']}, which is gone)"


def _acquire(db: StateDB, user: str, op_id: int | None, host: str, pid: int) -> None:
    with db.transaction():
        row = db.lock_row(user)
        if row is not None:
            _refuse_held(db, user, row, op_id, host)
            db.drop_lock(user)
        db.add_lock(user, op_id, host, pid)


@contextmanager
def journaled(db: StateDB, kind: str, user: str, params: dict, failed_state: str = "failed", existing: Operation | None = None):
    """Journal an operation on a desktop and hold the desktop's lock for it.

    A lock held elsewhere ends the operation as `refused` (a resumed one keeps its state); a
    failure as `failed_state`. With `existing`, an interrupted operation is taken up again.
    """
    op = existing or Operation.begin(db, kind, user, params)
    try:
        with vm_lock(db, user, op.id):
            if existing is not None:
                op.set_state("running")
            yield op
    except Busy as exc:
        if existing is None:
            op.finish("refused", str(exc))
        raise
    except BaseException as exc:
        op.finish(getattr(exc, "op_state", failed_state), str(exc) or type(exc).__name__)
        raise
    op.finish("done")
