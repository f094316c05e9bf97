"""The one plan runner (labvm/plan.py), driven with a toy kind whose steps write to a list: the
order steps run in, one round trip for a node's consecutive helper steps, undo newest first
from the failed step, the commit point, resume and abort from the journal, and dry runs."""

import socket

import pytest

from labvm import plan as plan_mod
from labvm.admin import AdminHome
from labvm.cli import main
from labvm.errors import Busy, NoCapacity, NodeError, RolledBack, StateError
from labvm.journal import check_lock
from labvm.plan import Kind, Runner, Step
from labvm.remote.helpers import HelperCall

from .fake_node import TypedCalls

LOG: list[str] = []
FAIL: dict[str, str] = {}  # step name -> "before" or "after" its work


class FakeSession(TypedCalls):
    def __init__(self):
        self.round_trips = 0

    def call(self, helper, action, params, timeout=180, check=False):
        LOG.append(f"{'check ' if check else ''}{helper}.{action}")
        if FAIL.get(action) == "before":
            raise NodeError(node="n1", msg=f"{action} refused")
        return {"ok": True, "changed": not check, "data": {}}

    def call_many(self, calls, done=lambda _i: None, check=False):
        self.round_trips += 1
        return super().call_many(calls, done, check)


def work(name: str):
    def apply():
        if FAIL.get(name) == "before":
            raise NodeError(node="n1", msg=f"{name} failed")
        LOG.append(name)
        if FAIL.get(name) == "after":
            raise NodeError(node="n1", msg=f"{name} failed")
    return apply


def undo(name: str):
    return lambda: LOG.append(f"undo {name}")


class ToyKind(Kind):
    name = "start"  # a journal kind the store accepts; KINDS is pointed at this class below
    commit = None

    def checks(self, f):
        with f.check("room") as c:
            if self.ctx.params.get("no_room"):
                raise NoCapacity("no room on n1")
            c.detail = "room on n1"

    def steps(self):
        calls = lambda action: (lambda: [HelperCall("vm", action, {})])  # noqa: E731
        return [
            Step("check", "check again"),
            Step("a", "do a", apply=work("a"), undo=undo("a")),
            Step("b", "do b on n1", calls=calls("b"), node="n1", undo=undo("b")),
            Step("c", "do c on n1", calls=calls("c"), node="n1"),
            Step("skipped", "never", apply=work("skipped"), skip="not this time"),
            Step("d", "do d", apply=work("d"), undo=undo("d")),
            Step("e", "do e", apply=work("e"), undo=undo("e")),
        ]


class CommittingKind(ToyKind):
    commit = "d"


@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    home = AdminHome(config)
    with home.state() as db:
        db.add_user("alice", "a good password")
    LOG.clear()
    FAIL.clear()
    return home


@pytest.fixture
def session(monkeypatch) -> FakeSession:
    fake = FakeSession()
    monkeypatch.setattr("labvm.remote.helpers.HelperBundle.from_package", classmethod(lambda cls: None))
    monkeypatch.setattr(plan_mod.Context, "_open_session", lambda self, name: fake)
    return fake


def steps_of(home, op_id):
    with home.state() as db:
        return [(r["name"], r["state"]) for r in db.operation_steps(op_id)]


def last_op(home):
    with home.state() as db:
        return db.operations(None, False, 1)[0]


def test_steps_run_in_order_and_a_nodes_helper_steps_share_one_round_trip(home, session):
    Runner(home).run(ToyKind, "alice", {})
    assert LOG == ["a", "vm.b", "vm.c", "d", "e"]
    assert session.round_trips == 1
    op = last_op(home)
    assert op["state"] == "done"
    assert steps_of(home, op["id"]) == [("check", "done"), ("a", "done"), ("b", "done"), ("c", "done"), ("d", "done"), ("e", "done")]


@pytest.mark.parametrize("failing", ["a", "d", "e"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failed_step_is_undone_with_every_finished_one_newest_first(home, session, failing, when):
    FAIL[failing] = when
    with pytest.raises(RolledBack, match=f"failed at {failing} and was rolled back"):
        Runner(home).run(ToyKind, "alice", {})
    ran = ["a", "b", "d", "e"][: ["a", "b", "d", "e"].index(failing) + 1]
    # The failed step's undo runs too: it may have stopped half-way.
    assert [line for line in LOG if line.startswith("undo")] == [f"undo {name}" for name in reversed(ran)]
    op = last_op(home)
    assert op["state"] == "rolled_back"
    assert (f"undo_{failing}", "done") in steps_of(home, op["id"])
    with home.state() as db:
        assert db.lock_row("alice") is None


def test_a_failure_inside_a_round_trip_names_the_step_that_failed(home, session):
    FAIL["c"] = "before"
    with pytest.raises(RolledBack, match="failed at c"):
        Runner(home).run(ToyKind, "alice", {})
    assert [line for line in LOG if line.startswith("undo")] == ["undo b", "undo a"]
    assert ("b", "done") in steps_of(home, last_op(home)["id"]) and ("c", "failed") in steps_of(home, last_op(home)["id"])


def test_a_failed_check_changes_nothing_and_keeps_its_exit_code(home, session):
    with pytest.raises(NoCapacity) as caught:
        Runner(home).run(ToyKind, "alice", {"no_room": True})
    assert caught.value.exit_code == 10 and LOG == []
    assert last_op(home)["state"] == "refused"


def test_after_the_commit_point_a_failure_is_not_undone_and_resume_finishes(home, session, monkeypatch):
    monkeypatch.setitem(plan_mod.KINDS, "start", f"{__name__}:CommittingKind")
    FAIL["e"] = "before"
    with pytest.raises(NodeError):
        Runner(home).run(CommittingKind, "alice", {})
    assert not [line for line in LOG if line.startswith("undo")]
    op = last_op(home)
    assert op["state"] == "failed"
    with pytest.raises(StateError, match="past its commit point"):
        Runner(home).abort(op["id"])
    FAIL.clear()
    LOG.clear()
    Runner(home).resume(op["id"])
    assert LOG == ["e"]  # only what had not finished
    assert last_op(home)["state"] == "done"


class Killed(BaseException):
    """As kill -9: nothing after it runs in the process."""


class KilledKind(ToyKind):
    def steps(self):
        def killed():
            LOG.append("d")
            raise Killed()

        steps = super().steps()
        steps[5] = Step("d", "do d", apply=killed, undo=undo("d"))
        return steps


def test_an_interrupted_plan_keeps_its_lock_and_abort_undoes_it(home, session, monkeypatch):
    monkeypatch.setitem(plan_mod.KINDS, "start", f"{__name__}:ToyKind")
    real_fail = Runner._fail

    def fail(self, kind, steps, failed, exc):
        if isinstance(exc, Killed):
            raise exc
        return real_fail(self, kind, steps, failed, exc)

    monkeypatch.setattr(Runner, "_fail", fail)
    with pytest.raises(Killed):
        Runner(home).run(KilledKind, "alice", {})
    op_id = last_op(home)["id"]
    with home.state() as db:
        # What a killed process leaves: its operation running, its lock held by a pid that is gone.
        db.set_operation_state(op_id, "running")
        db.add_lock("alice", op_id, socket.gethostname(), 2**22 + 12345)
        with pytest.raises(Busy, match=f"ops resume {op_id}"):
            check_lock(db, "alice")
    LOG.clear()
    Runner(home).abort(op_id)
    assert LOG == ["undo d", "undo b", "undo a"]
    with home.state() as db:
        assert db.lock_row("alice") is None


def test_a_dry_run_runs_the_checks_in_check_mode_and_lists_every_step(home, session):
    report = Runner(home).dry_run(ToyKind, "alice", {})
    assert report.ok and LOG == []
    data = report.as_dict()
    assert [s["name"] for s in data["steps"]] == ["check", "a", "b", "c", "skipped", "d", "e"]
    assert data["steps"][4] == {"name": "skipped", "skipped": True, "detail": "not this time", "undo": False}
    assert data["checks"] == [{"name": "room", "ok": True, "detail": "room on n1"}]
    with home.state() as db:
        assert db.operations(None, False, 5) == []
    refused = Runner(home).dry_run(ToyKind, "alice", {"no_room": True})
    assert not refused.ok and refused.exit_code == 10
