"""Every plan kind but the switch (test_plan_rollback.py has it), failed and interrupted at each
of its steps on the stateful fake cluster (fake_cluster.py).

Before a kind's commit point (every step, for a kind without one) a failure takes back what
the operation did: the state database is as it was, the lock is free, and the model of the
nodes and MooseFS is back where it started (a publish may leave one version more, a backup's
snapshot one copy of the upper). A step with nothing to take back fails with its own error.
At and after the commit point nothing is undone: `ops abort` refuses, and `ops resume`
finishes the operation. A run killed at a step (kill -9) is aborted back to the start before
the commit point, and resumed to the end at or after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pytest

from labvm.admin import AdminHome
from labvm.cli import main
from labvm.config import member_quota_for
from labvm.desktops import Desktops
from labvm.errors import NodeError, RolledBack
from labvm.lifecycle import CreateKind, RemoveKind, ResizeKind, StartKind, StopKind, plan_on_desktop
from labvm.ops import show_op
from labvm.plan import Kind
from labvm.storage import BackupKind, RestoreKind, SolidifyKind, Storage

from .fake_cluster import Desk, FakeCluster, Files, Version
from .plan_faults import (
    Interrupted,
    admin_template,
    as_if_killed,
    copied_home,
    fail_step,
    never_undo,
    seeded_cluster,
    state_rows,
)

UP = ("image", "mount_mfs", "mount_stack", "member_quota", "start_sync", "start_container", "record_running")
DOWN = ("stop_container", "flush_sync", "remove_container", "unmount_stack", "record_stopped")
START_VERSION = 3  # alice's version; restore goes back to RESTORED
RESTORED = 1


# -- the cluster ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """alice's desktop on n1 (version 3), bob's on n2, and carol and dave without one (dave's
    earlier desktop left its files on MooseFS)."""
    return admin_template(tmp_path_factory, ("alice", "bob", "carol", "dave"),
                          (("alice", "n1", START_VERSION), ("bob", "n2", 1)),
                          (("GPU-n1-0", "n1", 0, "alice"), ("GPU-n2-0", "n2", 0, "bob")))


@pytest.fixture
def home(template, tmp_path, monkeypatch) -> AdminHome:
    return copied_home(template, tmp_path, monkeypatch)


@pytest.fixture
def cluster(home, monkeypatch) -> FakeCluster:
    return seeded_cluster(home, monkeypatch)


# -- the kinds, as variants ------------------------------------------------------------------------
def grown(home: AdminHome) -> int:
    """The size a resize grows alice's disk to: twice the default."""
    return 2 * home.config.vm_defaults.disk


@dataclass(frozen=True)
class Variant:
    """One kind on one desktop: its steps in order, those with an undo, and how it is run
    (dry or for real)."""

    name: str
    kind: type
    steps: tuple[str, ...]
    undoable: frozenset[str]
    run: Callable[[AdminHome, bool], Any]
    user: str = "alice"
    running: bool = True

    @property
    def failed_state(self) -> str:
        return "rolled_back" if self.kind is CreateKind else "failed"


def _create(user: str):
    return lambda home, dry: Desktops(home).create(user, node="n1", dry_run=dry)


RM = ("check", *DOWN[:-1], "keep_files", "remove_local_layers", "release_owner", "record")
RM_PURGE = ("check", "stop_container", "stop_sync", "remove_container", "unmount_stack", "remove_local_layers",
            "purge_mfs_data", "record")
CREATE = ("check", "base_image", "adopt_files", *UP)
CREATE_UNDO = frozenset({"check", "adopt_files", "mount_stack", "start_sync", "start_container", "record_running"})
VARIANTS = [
    Variant("start-stopped", StartKind, ("check", *UP), frozenset({"mount_stack", "start_sync", "start_container", "record_running"}),
            lambda home, dry: Desktops(home).start("alice", dry_run=dry), running=False),
    Variant("start-running", StartKind, ("check", *UP), frozenset(), lambda home, dry: Desktops(home).start("alice", dry_run=dry)),
    Variant("create", CreateKind, CREATE, CREATE_UNDO, _create("carol"), user="carol", running=False),
    Variant("create-continuing", CreateKind, CREATE, CREATE_UNDO, _create("dave"), user="dave", running=False),
    Variant("stop", StopKind, ("check", *DOWN), frozenset(), lambda home, dry: Desktops(home).stop("alice", dry_run=dry)),
    Variant("rm", RemoveKind, RM, frozenset(), lambda home, dry: Desktops(home).remove("alice", dry_run=dry)),
    Variant("rm-purge", RemoveKind, RM_PURGE, frozenset(), lambda home, dry: Desktops(home).remove("alice", purge=True, dry_run=dry)),
    Variant("resize", ResizeKind, ("check", "grow_disk", "member_quota", "record"), frozenset(),
            lambda home, dry: plan_on_desktop(home, lambda _m: None, ResizeKind, "alice", dry, size=grown(home))),
    Variant("backup", BackupKind, ("check", "mount_mfs", "snapshot_upper", "publish", "prune"), frozenset({"snapshot_upper"}),
            lambda home, dry: Storage(home).backup("alice", dry_run=dry)),
    Variant("solidify-running", SolidifyKind, ("check", *DOWN, "publish", "solidify", *UP), frozenset({"stop_container"}),
            lambda home, dry: Storage(home).solidify("alice", dry_run=dry)),
    Variant("solidify-stopped", SolidifyKind, ("check", "publish", "solidify"), frozenset(),
            lambda home, dry: Storage(home).solidify("alice", dry_run=dry), running=False),
    Variant("restore-running", RestoreKind, ("check", *DOWN, "publish", "solidify", "rebase", *UP), frozenset({"stop_container"}),
            lambda home, dry: Storage(home).restore("alice", RESTORED, dry_run=dry)),
    Variant("restore-stopped", RestoreKind, ("check", "publish", "solidify", "rebase"), frozenset(),
            lambda home, dry: Storage(home).restore("alice", RESTORED, dry_run=dry), running=False),
]


def phase(variant: Variant, step: str, when: str) -> str:
    """check: the checks fail; claim: what the check step takes, after them; before: a failure
    the plan takes back; after: one at or past the commit point (the commit step's work done)."""
    kind = variant.kind
    if step == kind.check_step:
        return "check" if when == "before" else "claim"
    if kind.commit is None:
        return "before"
    index, commit = variant.steps.index(step), variant.steps.index(kind.commit)
    return "before" if index < commit or (index == commit and when == "before") else "after"


def cases(skip=()) -> list:
    """Every variant's every step, failing before and after its work. A check step fails after
    its checks only where the kind claims something there (a create's reservation)."""
    return [pytest.param(v, step, when, id=f"{v.name}-{step}-{when}")
            for v in VARIANTS if v.name not in skip for step in v.steps for when in ("before", "after")
            if not (step == v.kind.check_step and when == "after" and v.kind.claim is Kind.claim)]


# -- where a test starts ---------------------------------------------------------------------------
@dataclass
class Start:
    rows: dict
    picture: dict
    bob: dict
    view: frozenset | None  # what the desktop showed
    upper: frozenset | None
    spec: dict | None


def seed_earlier_files(home: AdminHome, cluster: FakeCluster, user: str) -> None:
    """What `labvm rm` of an earlier desktop of the member left on MooseFS: two versions, an
    empty upper, an owner record naming the member and no node."""
    with home.state() as db:
        member = db.get_user(user).member_id
    files = Files(up_mfs=set(), owner={"node": None, "op": None, "member": member, "since": 0.0})
    files.versions[1] = Version(None, None, frozenset({f"{user}.v1"}), float(next(cluster.clock)))
    files.versions[2] = Version(1, "remove", frozenset({f"{user}.v1", f"{user}.v2"}), float(next(cluster.clock)))
    cluster.files[user] = files


def begin(home: AdminHome, cluster: FakeCluster, v: Variant) -> Start:
    if v.user == "alice":
        if not v.running:
            with home.state() as db:
                db.set_desktop_state("alice", "stopped")
        cluster.seed(home, "alice")
        desk = cluster["n1"].desks["alice"]
        view, upper = cluster.view("n1", "alice", START_VERSION), frozenset(desk.upper)
        spec = desk.container.spec if v.running else None
    else:
        if v.user == "dave":
            seed_earlier_files(home, cluster, "dave")
        view = upper = spec = None
    return Start(state_rows(home), cluster.picture(v.user), cluster.picture("bob"), view, upper, spec)


# -- making a step fail ----------------------------------------------------------------------------
def injected(step: str) -> NodeError:
    return NodeError(node="n1", msg=f"a failure injected in {step}")


# -- the journal -----------------------------------------------------------------------------------
def last_op(home: AdminHome, user: str) -> dict:
    with home.state() as db:
        row = db.conn.execute("SELECT * FROM operations WHERE user = ? ORDER BY id DESC LIMIT 1", (user,)).fetchone()
        return {**dict(row), "rows": db.operation_steps(row["id"])}


def undo_steps(op: dict) -> list[str]:
    return [r["name"] for r in op["rows"] if r["name"].startswith("undo_")]


def stopped_at(op: dict) -> list[str]:
    """The steps the journal shows failed, or left running by a killed run (undos aside)."""
    return [r["name"] for r in op["rows"] if r["state"] in ("failed", "running") and not r["name"].startswith("undo_")]


def expected_undo(v: Variant, step: str) -> list[str]:
    ran = v.steps[:v.steps.index(step) + 1]
    return [f"undo_{s}" for s in reversed(ran) if s in v.undoable]


def lock_free(home: AdminHome, user: str) -> bool:
    with home.state() as db:
        return db.lock_row(user) is None


# -- where a test ends -----------------------------------------------------------------------------
def assert_back_at_start(home: AdminHome, cluster: FakeCluster, v: Variant, start: Start) -> None:
    """The state database as it was, the lock free, bob untouched, and the model as it was. A
    publish that ran may leave one version more (holding what the desktop showed), a backup's
    snapshot one copy of the upper; a running desktop's sync may have caught up with its upper."""
    assert lock_free(home, v.user)
    assert state_rows(home) == start.rows
    assert cluster.picture("bob") == start.bob
    now = cluster.picture(v.user)
    if v.kind is CreateKind:
        assert all(node is None for node in now["nodes"].values()), now["nodes"]
        if start.picture["versions"] is None:
            # Nothing of the member's: at most the empty tree a first stack makes on MooseFS.
            assert all(not files for _base, _reason, files in (now["versions"] or {}).values()), now
            assert not now["up_mfs"] and not now["snapshots"]
            assert now["owner"] is None or now["owner"]["node"] is None
        else:
            for key in ("versions", "up_mfs", "snapshots", "owner"):
                assert now[key] == start.picture[key], key
        return
    kept, versions = start.picture["versions"], now["versions"]
    assert {n: versions.get(n) for n in kept} == kept
    extra = set(versions) - set(kept)
    assert len(extra) <= (1 if "publish" in v.steps else 0), sorted(versions)
    for number in extra:
        assert (versions[number][0], versions[number][2]) == (START_VERSION, start.view)
    assert len(now["snapshots"]) <= (1 if v.kind is BackupKind else 0)
    assert all(files == start.upper for files in now["snapshots"].values())
    assert now["nodes"] == start.picture["nodes"]
    assert (now["owner"], now["quota"]) == (start.picture["owner"], start.picture["quota"])
    caught_up = {start.picture["up_mfs"], start.upper} if v.running else {start.picture["up_mfs"]}
    assert now["up_mfs"] in caught_up


def desktop_row(home: AdminHome, user: str) -> dict | None:
    with home.state() as db:
        row = db.desktop_row(user)
        return None if row is None else {**dict(row), "gpus": db.gpu_assignments(user, row["node"])}


def new_versions(cluster: FakeCluster, user: str, start: Start, leftovers: int) -> list[tuple]:
    """The versions the operation published (number, base, reason, files), oldest first. Up to
    `leftovers` older ones, from a run rolled back after its publish, must hold what the desktop
    showed over its start version; the operation's own are the newest."""
    versions = cluster.files[user].versions
    made = sorted(set(versions) - set(start.picture["versions"]))
    left, own = made[:-1], made[-1:]
    assert len(left) <= leftovers, made
    for number in left:
        assert (versions[number].base, versions[number].files) == (START_VERSION, start.view)
    return [(n, versions[n].base, versions[n].reason, versions[n].files) for n in own]


def assert_done(home: AdminHome, cluster: FakeCluster, v: Variant, start: Start, leftovers: int = 0) -> None:
    """The operation's end: each kind's."""
    assert lock_free(home, v.user)
    assert cluster.picture("bob") == start.bob
    assert cluster["n2"].desks.get(v.user, Desk()).empty
    row = desktop_row(home, v.user)
    desk = cluster["n1"].desks.get(v.user, Desk())
    files = cluster.files.get(v.user)
    kind = v.kind
    if kind in (StartKind, BackupKind, ResizeKind):
        # Running (a start of a stopped desktop brought it up) over its version with its upper, thawed.
        assert (row["state"], row["version"]) == ("running", START_VERSION)
        assert (desk.stack, desk.sync, frozenset(desk.upper)) == (START_VERSION, True, start.upper)
        assert desk.container is not None and desk.container.running and not desk.container.paused
        assert cluster.view("n1", v.user) == start.view
        assert files.owner["node"] == "n1" and files.snapshots == {}
    if kind is StartKind:
        assert new_versions(cluster, v.user, start, 0) == []
    elif kind is BackupKind:
        [(_n, base, reason, shown)] = new_versions(cluster, v.user, start, leftovers)
        assert (base, reason, shown) == (START_VERSION, "backup", start.view)
    elif kind is ResizeKind:
        size = grown(home)
        assert json.loads(row["limits"])["disk"] == size and desk.disk == size
        assert files.quota == member_quota_for(home.config, size)
    elif kind is CreateKind:
        latest = 0 if start.picture["versions"] is None else max(start.picture["versions"])
        assert (row["node"], row["state"], row["version"], len(row["gpus"])) == ("n1", "running", latest, 1)
        assert desk.stack == latest and desk.sync and desk.container.running
        assert files.owner["node"] == "n1"
        assert cluster.view("n1", v.user) == files.versions[latest].files
    elif kind is StopKind:
        assert (row["state"], row["version"]) == ("stopped", START_VERSION)
        assert desk.layers and (desk.stack, desk.sync, desk.container) == (None, False, None)
        assert frozenset(desk.upper) == start.upper and files.up_mfs == start.upper
        assert cluster.view("n1", v.user, START_VERSION) == start.view
    elif kind is RemoveKind:
        assert row is None and desk.empty and not desk.layers
        with home.state() as db:
            assert db.conn.execute("SELECT COUNT(*) FROM gpu_assignments WHERE user = ?", (v.user,)).fetchone()[0] == 0
        if "purge_mfs_data" in v.steps:
            assert files is None
        else:
            # Kept as one last version, the newest, which a later create continues from.
            assert new_versions(cluster, v.user, start, 0) == [(START_VERSION + 1, START_VERSION, "remove", start.view)]
            assert files.up_mfs == set() and files.owner["node"] is None
            assert files.owner["member"] == start.picture["owner"]["member"]
    elif kind in (SolidifyKind, RestoreKind):
        [(target, base, reason, shown)] = new_versions(cluster, v.user, start, leftovers)
        assert (base, reason, shown) == (START_VERSION, kind.reason, start.view)
        base = RESTORED if kind is RestoreKind else target
        assert (row["state"], row["version"]) == ("running" if v.running else "stopped", base)
        assert desk.layers and desk.upper == set() and files.up_mfs == set()
        assert cluster.view("n1", v.user, base) == files.versions[base].files
        if v.running:
            assert (desk.stack, desk.sync) == (base, True)
            assert desk.container.running and not desk.container.paused and desk.container.spec == start.spec
        else:
            assert (desk.stack, desk.sync, desk.container) == (None, False, None)


# -- the step lists --------------------------------------------------------------------------------
@pytest.mark.parametrize("v", VARIANTS, ids=[v.name for v in VARIANTS])
def test_the_step_lists_are_the_kinds(home, cluster, v):
    """The variants' steps and undos, as each kind's dry run gives them."""
    begin(home, cluster, v)
    report = v.run(home, True)
    if isinstance(report, list):
        [report] = report
    assert report.ok, report.error
    assert [(s.name, s.undo is not None) for s in report.steps] == [(n, n in v.undoable) for n in v.steps]


@pytest.mark.parametrize("v", VARIANTS, ids=[v.name for v in VARIANTS])
def test_each_kind_runs_to_its_end_on_the_fake_cluster(home, cluster, v):
    start = begin(home, cluster, v)
    v.run(home, False)
    assert last_op(home, v.user)["state"] == "done"
    assert_done(home, cluster, v, start)


# -- a step fails ----------------------------------------------------------------------------------
@pytest.mark.parametrize("v, step, when", cases())
def test_a_failing_step_is_rolled_back_before_the_commit_point_and_resumed_after_it(home, cluster, monkeypatch, v, step, when):
    start = begin(home, cluster, v)
    fail_step(monkeypatch, cluster, v.kind, step, when, injected(step))
    where = phase(v, step, when)
    ran = v.steps[:v.steps.index(step) + 1]
    if where == "check":
        # A check that fails: its own error, and nothing changed.
        with pytest.raises(NodeError, match="injected") as raised:
            v.run(home, False)
        assert not isinstance(raised.value, RolledBack)
        op = last_op(home, v.user)
        assert op["state"] == "refused" and stopped_at(op) == ["check"]
    elif where in ("claim", "before") and any(s in v.undoable for s in ran):
        with pytest.raises(RolledBack, match=f"failed at {step} and was rolled back") as raised:
            v.run(home, False)
        assert raised.value.exit_code == (7 if where == "claim" else 6)
        op = last_op(home, v.user)
        assert op["state"] == "rolled_back" and stopped_at(op) == [step]
        assert undo_steps(op) == expected_undo(v, step)
        # Undone is undone: neither resumed nor aborted.
        assert main(["ops", "resume", str(op["id"])]) == 6
        assert main(["ops", "abort", str(op["id"])]) == 6
    elif where == "before":
        # Nothing ran that has an undo: the step's own error, and aborting takes back nothing.
        with pytest.raises(NodeError, match="injected") as raised:
            v.run(home, False)
        assert not isinstance(raised.value, RolledBack)
        op = last_op(home, v.user)
        assert op["state"] == v.failed_state and stopped_at(op) == [step] and undo_steps(op) == []
        assert_back_at_start(home, cluster, v, start)
        assert main(["ops", "abort", str(op["id"])]) == 0
        assert last_op(home, v.user)["state"] == "aborted" and undo_steps(last_op(home, v.user)) == []
    else:
        # At or past the commit point: not undone, only finished.
        with pytest.raises(NodeError, match="injected") as raised:
            v.run(home, False)
        assert not isinstance(raised.value, RolledBack)
        op = last_op(home, v.user)
        assert op["state"] == "failed" and stopped_at(op) == [step] and undo_steps(op) == []
        assert lock_free(home, v.user)
        assert main(["ops", "abort", str(op["id"])]) == 6
        assert main(["ops", "resume", str(op["id"])]) == 0
        op = last_op(home, v.user)
        assert op["state"] == "done" and undo_steps(op) == []
        assert_done(home, cluster, v, start)
        return
    assert_back_at_start(home, cluster, v, start)
    # And the operation runs from there as if it had never been tried.
    v.run(home, False)
    assert_done(home, cluster, v, start, leftovers=1)


# -- a run is killed -------------------------------------------------------------------------------
@pytest.mark.parametrize("v, step, when", cases())
def test_a_killed_run_is_aborted_before_the_commit_point_and_resumed_after_it(home, cluster, v, step, when):
    start = begin(home, cluster, v)
    with pytest.MonkeyPatch.context() as patch:
        fail_step(patch, cluster, v.kind, step, when, Interrupted())
        never_undo(patch)
        with pytest.raises(Interrupted):
            v.run(home, False)
    op_id = last_op(home, v.user)["id"]
    as_if_killed(home, v.user, op_id)
    assert show_op(home, op_id).state == "interrupted"
    assert stopped_at(last_op(home, v.user)) == [step]
    if phase(v, step, when) == "after":
        assert main(["ops", "abort", str(op_id)]) == 6
        assert main(["ops", "resume", str(op_id)]) == 0
        op = last_op(home, v.user)
        assert op["state"] == "done" and undo_steps(op) == []
        assert_done(home, cluster, v, start)
        return
    assert main(["ops", "abort", str(op_id)]) == 0
    op = last_op(home, v.user)
    assert op["state"] == "aborted"
    # Every step begun is undone: a create's check step too (its undo removes a reserved row, if any).
    assert undo_steps(op) == expected_undo(v, step)
    assert_back_at_start(home, cluster, v, start)


# -- a backup's freeze -----------------------------------------------------------------------------
BACKUP = next(v for v in VARIANTS if v.name == "backup")
# The calls snapshot_upper makes, in order: (helper, action, earlier calls of it in the step).
FROZEN = [("sync", "flush", 0), ("vm", "freeze", 0), ("sync", "flush", 1), ("merge", "snapshot_upper", 0), ("vm", "thaw", 0)]


@pytest.mark.parametrize("helper, action, skip", FROZEN, ids=[f"{h}.{a}#{s}" for h, a, s in FROZEN])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_backup_failing_around_its_freeze_leaves_the_desktop_running_and_thawed(home, cluster, helper, action, skip, after):
    start = begin(home, cluster, BACKUP)
    cluster["n1"].fail(helper, action, skip=skip, after=after, check=False)
    with pytest.raises(RolledBack, match="failed at snapshot_upper"):
        BACKUP.run(home, False)
    assert undo_steps(last_op(home, "alice")) == ["undo_snapshot_upper"]
    assert not cluster["n1"].desks["alice"].container.paused
    assert_back_at_start(home, cluster, BACKUP, start)
    BACKUP.run(home, False)
    assert_done(home, cluster, BACKUP, start)


# (helper, action, earlier calls, after, whether the call is made frozen: then the dead process never thaws)
KILLED_FROZEN = [("vm", "freeze", 0, True, False), ("sync", "flush", 1, False, True), ("sync", "flush", 1, True, True),
                 ("merge", "snapshot_upper", 0, False, True), ("merge", "snapshot_upper", 0, True, True)]


@pytest.mark.parametrize("helper, action, skip, after, frozen", KILLED_FROZEN,
                         ids=[f"{h}.{a}#{s}-{'after' if af else 'before'}" for h, a, s, af, _ in KILLED_FROZEN])
def test_a_backup_killed_while_the_desktop_is_frozen_is_thawed_by_abort(home, cluster, helper, action, skip, after, frozen):
    start = begin(home, cluster, BACKUP)
    cluster["n1"].fail(helper, action, skip=skip, after=after, exc=Interrupted(), check=False)
    if frozen:
        cluster["n1"].fail("vm", "thaw", exc=Interrupted())
    with pytest.MonkeyPatch.context() as patch:
        never_undo(patch)
        with pytest.raises(Interrupted):
            BACKUP.run(home, False)
    assert cluster["n1"].desks["alice"].container.paused
    op_id = last_op(home, "alice")["id"]
    as_if_killed(home, "alice", op_id)
    assert main(["ops", "abort", str(op_id)]) == 0
    assert undo_steps(last_op(home, "alice")) == ["undo_snapshot_upper"]
    assert_back_at_start(home, cluster, BACKUP, start)


# -- telling whether the commit took effect -----------------------------------------------------------
@pytest.mark.parametrize("name", ["stop", "rm"])
def test_a_stop_whose_node_is_gone_at_its_commit_step_can_be_aborted(home, cluster, name):
    """Whether the container stopped cannot be told from a node that does not answer: the
    operation is not taken as past its commit point, and aborting it changes nothing."""
    v = next(v for v in VARIANTS if v.name == name)
    start = begin(home, cluster, v)
    cluster["n1"].fail("vm", "stop_container", cut=True)
    with pytest.raises(NodeError, match="unreachable"):
        v.run(home, False)
    op = last_op(home, "alice")
    assert op["state"] == "failed" and stopped_at(op) == ["stop_container"]
    assert main(["ops", "abort", str(op["id"])]) == 0
    cluster["n1"].mend()
    assert_back_at_start(home, cluster, v, start)


@pytest.mark.parametrize("name", ["stop", "rm"])
def test_a_stop_of_a_stopped_desktop_killed_in_its_checks_can_be_aborted(home, cluster, monkeypatch, name):
    """A stopped desktop's container does not run, but the commit step never began: the
    operation is not past its commit point, and aborting it changes nothing."""
    v = replace(next(v for v in VARIANTS if v.name == name), running=False)
    start = begin(home, cluster, v)
    with pytest.MonkeyPatch.context() as patch:
        fail_step(patch, cluster, v.kind, "check", "before", Interrupted())
        never_undo(patch)
        with pytest.raises(Interrupted):
            v.run(home, False)
    op_id = last_op(home, "alice")["id"]
    as_if_killed(home, "alice", op_id)
    assert main(["ops", "abort", str(op_id)]) == 0
    assert last_op(home, "alice")["state"] == "aborted"
    assert_back_at_start(home, cluster, v, start)
