"""One shape for every multi-step operation: a plan of named steps, checked before it acts.

An operation's kind (switch, start, restore, ...) says three things:

- its checks: read-only probes of the state database and the nodes (helper actions that would
  change something run in check mode), each recorded with what it found. The first that fails
  stops the operation before its first change;
- its steps, built from the operation's journaled params and what the checks found: each with a
  line saying what it will change, an apply, and, where it can be taken back, an undo. Steps
  whose work is helper calls on one node go to that node together, in one round trip;
- its commit point: the step after which it can only go forward.

One runner (`Runner`) runs any kind. `--dry-run` runs the checks and prints the steps (as JSON
with `--json`). A real run journals each step; when a step fails before the commit point, the
runner undoes that step and every finished one, newest first, each journaled as `undo_NAME`,
and the desktop is as it was. `labvm ops resume ID` builds the kind's steps again from the
journal and runs those not finished; `labvm ops abort ID` undoes an interrupted one: every step
the journal shows begun, skipping undos that finished. A plan whose undo began is only ever
aborted, never resumed. Kinds are found by name in KINDS, so the journal never needs code of
its own for an operation.
"""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import LabvmError, RolledBack, StateError
from .journal import Operation, journaled
from .remote.helpers import HelperBundle, HelperCall
from .remote.session import NodeSession

Say = Callable[[str], None]

# Every kind of operation, by its journal name: module and class. Loaded on first use, so the
# journal (ops resume/abort) knows every kind without importing every command.
KINDS = {
    "create": "labvm.lifecycle:CreateKind",
    "start": "labvm.lifecycle:StartKind",
    "stop": "labvm.lifecycle:StopKind",
    "rm": "labvm.lifecycle:RemoveKind",
    "resize": "labvm.lifecycle:ResizeKind",
    "backup": "labvm.storage:BackupKind",
    "restore": "labvm.storage:RestoreKind",
    "solidify": "labvm.storage:SolidifyKind",
    "switch": "labvm.switch:SwitchKind",
    "rebase": "labvm.rebase:RebaseKind",
}


# Kinds after which a desktop may have another node or port, or none (member_account).
MOVES_DESKTOPS = frozenset({"create", "switch", "rm"})


def kind_named(name: str) -> "type[Kind]":
    where = KINDS.get(name)
    if where is None:
        raise StateError(f"a {name} is not a plan labvm knows how to resume")
    module, _, cls = where.partition(":")
    return getattr(importlib.import_module(module), cls)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Findings:
    """What a plan's checks found: each check in the order it ran (a failed one last)."""

    checks: list[Check] = field(default_factory=list)

    @contextmanager
    def check(self, name: str):
        """Record the check the block runs; the block sets its detail, and a LabvmError out of
        it is the check failing with that message (and raised on)."""
        found = Check(name, False, "")
        try:
            yield found
        except LabvmError as exc:
            found.detail = str(exc)
            self.checks.append(found)
            raise
        found.ok = True
        self.checks.append(found)


@dataclass
class Step:
    """One named step. Its work is either `apply` or `calls` (helper calls on `node`, built when
    the step runs; consecutive steps with calls on the same node share one round trip). `undo`
    takes back what the step did, also when the step stopped half-way, and is safe to run
    twice. `skip` says why the step does not run this time. `recover`, given the error the
    step's own work failed with, puts right what it can (True) or not (False); put right, the
    step and those after it run once more. The step must have changed nothing when it fails
    so (a check made first in its round trip)."""

    name: str
    detail: str
    apply: Callable[[], Any] | None = None
    calls: Callable[[], list[HelperCall]] | None = None
    node: str | None = None
    undo: Callable[[], Any] | None = None
    skip: str | None = None
    recover: Callable[[BaseException], bool] | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "skipped": self.skip is not None, "detail": self.skip or self.detail,
                "undo": self.undo is not None}


class Context:
    """What a kind's checks and steps work with: the admin home and its cluster file, the state
    database, the operation's journal entry (None in a dry run), its params, and one session per
    node for the whole operation."""

    def __init__(self, home, db, user: str | None, params: dict, op: Operation | None, say: Say, progress: Say):
        self.home, self.cfg, self.db, self.user = home, home.config, db, user
        self.op, self.say, self.progress = op, say, progress
        self.params = op.params if op is not None else dict(params)
        self.dry_run = op is None
        self.found = Findings()
        self._bundle = HelperBundle.from_package()
        self._sessions: dict[str, Any] = {}

    def _open_session(self, name: str):
        return NodeSession(self.home, self.cfg.node(name), self._bundle)

    def session(self, name: str):
        """The node's session, opened once for the operation."""
        if name not in self._sessions:
            self._sessions[name] = self._open_session(name)
        return self._sessions[name]

    def forget(self, name: str) -> None:
        """Close a node's session (its connection broke): the next use opens a new one."""
        s = self._sessions.pop(name, None)
        if s is not None:
            s.close()

    def remember(self, **values) -> None:
        """Keep values a resumed run needs in the journal (in a dry run, in the params only)."""
        if self.op is not None:
            self.op.remember(**values)
        else:
            self.params.update(values)

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()


class Kind:
    """A kind of operation. Subclasses set `name`, `commit`, and write `checks` and `steps`."""

    name = ""
    # The step after which the operation only goes forward; None: every step can be undone.
    commit: str | None = None
    # The step that runs the checks again under the lock (its failure keeps the check's exit code).
    check_step = "check"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg, self.user, self.p = ctx.cfg, ctx.user, ctx.params

    def checks(self, f: Findings) -> None:
        """Run every check, recording each in f; raise at the first that fails."""

    def claim(self) -> None:
        """What the check step takes once the checks pass (a switch reserves the target's GPUs
        and ports), in one transaction; the check step's undo gives it back."""

    def steps(self) -> list[Step]:
        """Every step, the check step first, built from the params (and what a dry run found)."""
        raise NotImplementedError

    def committed(self) -> bool:
        """Whether the commit step's work took effect though the journal does not say the step
        finished (it failed, or the process died, right after the work): the plan is past its
        commit point all the same. A kind that can tell from its state (or its node's) says so;
        asked only once the commit step began, and False where it cannot tell."""
        return False

    def result(self) -> Any:
        return None

    def title(self) -> str:
        return f"{self.name} {self.ctx.user or ''}".strip()


@dataclass
class PlanReport:
    """What a dry run found and would do. error is the first failed check's."""

    kind: str
    user: str | None
    checks: list[Check]
    steps: list[Step]
    error: LabvmError | None = None
    extra: dict = field(default_factory=dict)
    headline: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else self.error.exit_code

    def as_dict(self) -> dict:
        return {"operation": self.kind, "user": self.user, **self.extra, "ok": self.ok,
                "checks": [dict(c.__dict__) for c in self.checks], "steps": [s.as_dict() for s in self.steps],
                "exit_code": self.exit_code, "dry_run": True}


def run_steps(s: NodeSession, op: Operation, steps: list[tuple[str, list[HelperCall]]]) -> list[dict]:
    """Journaled steps whose helper calls all go to the node in one round trip (the helpers'
    batch); each step is marked done as the reply shows its last call succeeded."""
    calls = [call for _, calls in steps for call in calls]
    owners = [name for name, calls in steps for _ in calls]
    with op.steps([name for name, _ in steps]) as done:
        def call_done(index: int) -> None:
            if index + 1 == len(owners) or owners[index + 1] != owners[index]:
                done(owners[index])

        return s.call_many(calls, done=call_done)


class Runner:
    """Runs a kind's plan: dry, for real, resumed from the journal, or undone."""

    def __init__(self, home, say: Say = lambda _m: None, progress: Say | None = None):
        self.home = home
        self.say = say
        self.progress = progress or (lambda _m: None)

    def _context(self, db, user, params, op) -> Context:
        return Context(self.home, db, user, params, op, self.say, self.progress)

    # -- planning ----------------------------------------------------------------------------
    def dry_run(self, kind_cls: "type[Kind]", user: str | None, params: dict, extra: dict | None = None) -> PlanReport:
        """Every check the operation runs before its first change, changing nothing, and the
        steps it would take with what they found."""
        with self.home.state() as db:
            ctx = self._context(db, user, params, None)
            kind = kind_cls(ctx)
            error = None
            try:
                kind.checks(ctx.found)
            except LabvmError as exc:
                error = exc
            try:
                steps = kind.steps()
            except LabvmError:
                steps = []
            finally:
                ctx.close()
        return PlanReport(kind.name, user, ctx.found.checks, steps, error, extra or {}, kind.title())

    # -- running -----------------------------------------------------------------------------
    def run(self, kind_cls: "type[Kind]", user: str | None, params: dict, failed_state: str = "failed") -> Any:
        try:
            with self.home.state() as db:
                with journaled(db, kind_cls.name, user, params, failed_state=failed_state) as op:
                    return self._run(db, kind_cls, user, op)
        finally:
            self._follow_desktops(kind_cls.name)

    def resume(self, op_id: int) -> Any:
        kind_name = None
        try:
            with self.home.state() as db:
                op = Operation.load(db, op_id)
                user = db.operation(op_id)["user"]
                kind_cls = kind_named(op.kind)
                kind_name = op.kind
                with journaled(db, op.kind, user, op.params, existing=op) as op:
                    return self._run(db, kind_cls, user, op)
        finally:
            self._follow_desktops(kind_name)

    def _follow_desktops(self, kind_name: str | None) -> None:
        """After a plan that creates, moves or removes a desktop (done, undone or not), the
        members' authorized_keys names each desktop's node and port as they are now (a no-op
        where no members' account is set up)."""
        if kind_name in MOVES_DESKTOPS:
            from .member_account import refresh_quietly

            refresh_quietly(self.home)

    def _run(self, db, kind_cls, user, op: Operation) -> Any:
        ctx = self._context(db, user, op.params, op)
        kind = kind_cls(ctx)
        try:
            self._refuse_undone(kind)
            steps = self._steps_after_checks(kind, op)
            self._apply(kind, steps)
            return kind.result()
        finally:
            ctx.close()

    @staticmethod
    def _refuse_undone(kind: Kind) -> None:
        """A plan whose undo began goes no further forward: its undos may have brought back
        what its steps took away (a desktop running on its source again)."""
        op = kind.ctx.op
        if op.params.get("rolled_back"):
            raise StateError(f"operation {op.id} ({kind.title()}) was rolled back; nothing to resume")
        if any(row["name"].startswith("undo_") for row in op.db.operation_steps(op.id)):
            raise StateError(f"operation {op.id} ({kind.title()}) stopped while it was being rolled back; "
                             f"finish the rollback with `labvm ops abort {op.id}`")

    def _steps_after_checks(self, kind: Kind, op: Operation) -> list[Step]:
        """The checks run as the plan's first step (again under the lock, as what they saw
        may have changed since a dry run); a resumed plan has them done."""
        if kind.check_step and not op.done(kind.check_step):
            ctx = kind.ctx
            claiming = False
            try:
                with op.step(kind.check_step):
                    kind.checks(ctx.found)
                    claiming = True
                    kind.claim()
            except BaseException as exc:
                if claiming:
                    # The claim may have taken something: the check step's undo gives it back.
                    steps = kind.steps()
                    self._fail(kind, steps, next(s for s in steps if s.name == kind.check_step), exc)
                if isinstance(exc, LabvmError):
                    # Nothing has changed yet: the check's own error and exit code.
                    exc.op_state = "refused"
                raise
        return kind.steps()

    def _apply(self, kind: Kind, steps: list[Step]) -> None:
        ctx, op = kind.ctx, kind.ctx.op
        todo = [s for s in steps if s.skip is None and not op.done(s.name) and s.name != kind.check_step]
        number = {s.name: index for index, s in enumerate(steps, 1)}
        index, recovered = 0, set()
        while index < len(todo):
            group = self._group(todo, index)
            shown = f"[{number[group[0].name]}/{len(steps)}] {', '.join(s.name for s in group)}"
            self.progress(shown)
            started = time.monotonic()
            try:
                self._apply_group(ctx, op, group)
                self.progress(f"{shown} done in {time.monotonic() - started:.1f} s")
            except BaseException as exc:
                failed = next((s for s in group if not op.done(s.name)), group[0])
                if failed.recover is not None and failed.name not in recovered and isinstance(exc, LabvmError):
                    recovered.add(failed.name)
                    try:
                        put_right = failed.recover(exc)
                    except BaseException as again:
                        self._fail(kind, steps, failed, again)
                        raise
                    if put_right:
                        op.retry(failed.name)
                        index = todo.index(failed)  # the steps before it in the group are done
                        continue
                self._fail(kind, steps, failed, exc)
                raise  # _fail raises; kept for readers
            index += len(group)

    @staticmethod
    def _group(todo: list[Step], index: int) -> list[Step]:
        """The step at index and those after it that go to the same node as helper calls."""
        first = todo[index]
        if first.calls is None:
            return [first]
        group = [first]
        for s in todo[index + 1:]:
            if s.calls is None or s.node != first.node:
                break
            group.append(s)
        return group

    def _apply_group(self, ctx: Context, op: Operation, group: list[Step]) -> None:
        if group[0].calls is None:
            with op.step(group[0].name):
                group[0].apply()
            return
        run_steps(ctx.session(group[0].node), op, [(step.name, step.calls()) for step in group])

    def _fail(self, kind: Kind, steps: list[Step], failed: Step, exc: BaseException) -> None:
        ctx, op = kind.ctx, kind.ctx.op
        if self._past_commit(kind):
            self.say(f"{failed.name} failed past the commit point ({kind.commit}): {exc}. "
                     f"Finish with `labvm ops resume {op.id}`")
            raise exc
        if not any(op.done(s.name) for s in steps if s.undo is not None) and failed.undo is None:
            raise exc  # nothing changed that needs taking back
        self.say(f"{failed.name} failed: {exc}; rolling back what the {kind.name} did")
        for note in self.undo(kind, steps, upto=failed):
            self.say(note)
        ctx.remember(rolled_back=True)
        rolled = RolledBack(msg=f"{kind.title()} failed at {failed.name} and was rolled back: {exc}")
        if isinstance(exc, LabvmError) and failed.name == kind.check_step:
            rolled.exit_code = exc.exit_code
        raise rolled from exc

    @staticmethod
    def _past_commit(kind: Kind) -> bool:
        op = kind.ctx.op
        if kind.commit is None:
            return False
        if op.done(kind.commit):
            return True
        began = any(row["name"] == kind.commit for row in op.db.operation_steps(op.id))
        return began and kind.committed()

    def undo(self, kind: Kind, steps: list[Step], upto: Step | None = None, begun: frozenset[str] = frozenset()) -> list[str]:
        """Take back the steps that ran (and upto, which stopped half-way, and those named in
        begun, which may have), newest first, each journaled as undo_NAME. An undo that fails
        is noted and the others still run."""
        op, notes = kind.ctx.op, []
        ran = [s for s in steps if s.skip is None and (op.done(s.name) or s is upto or s.name in begun)]
        for step in reversed(ran):
            # An undo that finished is not run again: what the operation's undos brought back
            # since (a desktop running again, and what it wrote) stays.
            if step.undo is None or op.done(f"undo_{step.name}"):
                continue
            try:
                with op.step(f"undo_{step.name}"):
                    note = step.undo()
            except LabvmError as exc:
                notes.append(f"note: undoing {step.name} failed: {exc}; `labvm node check` shows what is left")
                continue
            if note:
                notes.append(note)
        return notes

    def abort(self, op_id: int) -> list[str]:
        """Undo an interrupted or failed plan that has not passed its commit point."""
        try:
            return self._abort(op_id)
        finally:
            self._follow_desktops("rm")  # an undone create or switch leaves its desktop elsewhere or nowhere

    def _abort(self, op_id: int) -> list[str]:
        with self.home.state() as db:
            op = Operation.load(db, op_id)
            user = db.operation(op_id)["user"]
            kind_cls = kind_named(op.kind)
            ctx = self._context(db, user, op.params, op)
            kind = kind_cls(ctx)
            if self._past_commit(kind):
                raise StateError(f"{kind.title()} ({op_id}) is past its commit point ({kind.commit}); it can only "
                                 f"go forward: `labvm ops resume {op_id}`")
            from .journal import vm_lock

            try:
                with vm_lock(db, user, op_id) if user else nullcontext():
                    if op.params.get("rolled_back"):
                        return []
                    steps = kind.steps()
                    # Every step the journal shows begun, not only the last row: a run killed in
                    # a group of steps, or in its own undo, may have stopped in any of them.
                    begun = frozenset(row["name"] for row in db.operation_steps(op_id))
                    notes = self.undo(kind, steps, begun=begun)
                    ctx.remember(rolled_back=True)
                    return notes
            finally:
                ctx.close()
