"""The operations journal, read and acted on: `labvm ops list|show|resume|abort`.

An operation that was killed (its process gone) stays `running` in the journal with a lock whose
owner is dead; it is shown as `interrupted`. Every kind of operation is a plan (plan.py): resuming
one runs its first unfinished step and those after it with what it recorded; aborting one undoes
the steps it ran, unless it passed its commit point.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .admin import AdminHome
from .errors import BadInput, Busy, StateError
from .journal import Operation, _pid_alive, vm_lock
from .plan import KINDS, Runner


@dataclass
class OpView:
    id: int
    kind: str
    user: str | None
    state: str
    params: dict
    error: str | None
    created_at: float
    updated_at: float
    steps: list[dict]

    @property
    def last_step(self) -> str | None:
        return self.steps[-1]["name"] if self.steps else None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _lock_alive(db, op_id: int) -> bool:
    pid = db.lock_owner_pid(op_id)
    return pid is not None and _pid_alive(pid)


def _view(db, row) -> OpView:
    rows = db.operation_steps(row["id"])
    state = row["state"]
    if state == "running" and not _lock_alive(db, row["id"]):
        state = "interrupted"
    return OpView(row["id"], row["kind"], row["user"], state, _params(row["params"]), row["error"],
                  row["created_at"], row["updated_at"], _latest_steps(rows, running=state == "running"))


def _latest_steps(rows: list[dict], running: bool) -> list[dict]:
    """Each step once, as it ended last. A resumed operation runs again the steps its first run did not
    finish, so an earlier row of a step left running (its process died) or failed is superseded by a
    later row of that step; a step done twice (a restore mounts MooseFS twice) stays twice. A step
    still marked running in an operation that no longer runs was interrupted."""
    later: set[str] = set()
    steps = []
    for step in reversed(rows):
        if step["state"] != "done" and step["name"] in later:
            continue
        later.add(step["name"])
        if step["state"] == "running" and not running:
            step = {**step, "state": "interrupted"}
        steps.append(step)
    return steps[::-1]


def _params(recorded: str):
    try:
        return json.loads(recorded)
    except (TypeError, ValueError, RecursionError):
        return {"unreadable": recorded}


def list_ops(home: AdminHome, user: str | None = None, limit: int = 30, unfinished: bool = False) -> list[OpView]:
    with home.state() as db:
        return [_view(db, r) for r in db.operations(user, unfinished, limit)]


def show_op(home: AdminHome, op_id: int) -> OpView:
    with home.state() as db:
        row = db.operation(op_id)
        if row is None:
            raise BadInput(f"no operation {op_id}; see `labvm ops list`")
        return _view(db, row)


def _refuse_live(view: OpView) -> None:
    if view.state == "running":
        raise Busy(f"operation {view.id} is still running; wait for it to end")


def resume(home: AdminHome, op_id: int, say=lambda _m: None, progress=None):
    """Run an interrupted or failed operation's unfinished steps, as its kind builds them
    again from what the journal recorded."""
    view = show_op(home, op_id)
    _refuse_live(view)
    if view.state in ("done", "rolled_back", "aborted", "resumed", "refused"):
        raise StateError(f"operation {op_id} ({view.kind}) is {view.state}: nothing to resume")
    if view.kind not in KINDS:
        raise StateError(f"a {view.kind} cannot be resumed; run `labvm {view.kind} {view.user or ''}` again".rstrip())
    return Runner(home, say, progress).resume(op_id)


def abort(home: AdminHome, op_id: int, say=lambda _m: None) -> str:
    """Give up an interrupted or failed operation: its kind undoes what its steps did, unless
    it has passed its commit point (then it can only go forward)."""
    view = show_op(home, op_id)
    _refuse_live(view)
    if view.state not in ("interrupted", "failed"):
        raise StateError(f"operation {op_id} is {view.state}: nothing to abort")
    if view.kind in KINDS:
        for note in Runner(home, say).abort(op_id):
            say(note)
    elif view.user:
        with home.state() as db:
            with vm_lock(db, view.user, op_id):
                pass  # takes over a dead owner's lock, and releases it
    with home.state() as db:
        Operation.load(db, op_id).finish("aborted", f"aborted at {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                                                    f"was: {view.error or view.state}")
    return f"operation {op_id} ({view.kind} {view.user or ''}) aborted".replace("  ", " ")
