"""A switch that fails, or is interrupted and aborted, before its commit point leaves the desktop
as it was: running (or stopped) on its source over the same files, the target with nothing of
it, the state database's desktops and GPUs as before, the lock free. Past the commit point
nothing is undone and the switch can only be finished.

The nodes are a stateful fake cluster (fake_cluster.py): each helper action changes a model of
the nodes and MooseFS, and the tests compare that model with where it started.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from labvm.admin import AdminHome
from labvm.cli import main
from labvm.errors import HelperFailed, NodeError, NodeUnreachable, RolledBack
from labvm.ops import show_op
from labvm.switch import COMMIT, STEP_NAMES, Switcher, SwitchKind

from .fake_cluster import IMAGE, Container, Desk, FakeCluster
from .plan_faults import (
    PW,
    Interrupted,
    admin_template,
    as_if_killed,
    copied_home,
    fail_step,
    never_undo,
    seeded_cluster,
    state_rows,
)

BEFORE_COMMIT = STEP_NAMES[:STEP_NAMES.index(COMMIT)]
SKIPPED_WHEN_STOPPED = ("precopy", "stop_source", "start_target", "verify")
UNDOABLE = ("preflight", "stop_source", "merge", "fence", "build_stack", "start_target")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    # alice holds two GPUs on n1; bob holds n2's GPU 0.
    return admin_template(tmp_path_factory, ("alice", "bob"), (("alice", "n1", 3), ("bob", "n2", 1)),
                          (("GPU-n1-0", "n1", 0, "alice"), ("GPU-n1-1", "n1", 1, "alice"), ("GPU-n2-0", "n2", 0, "bob")))


@pytest.fixture
def home(template, tmp_path, monkeypatch) -> AdminHome:
    return copied_home(template, tmp_path, monkeypatch)


@pytest.fixture
def cluster(home, monkeypatch) -> FakeCluster:
    """n1 and n2, with bob's desktop running on n2; alice's is made by `begin`."""
    return seeded_cluster(home, monkeypatch)


@dataclass
class Start:
    rows: dict
    version: int
    running: bool
    view: frozenset
    alice: dict
    bob: dict
    spec: dict | None


def begin(home: AdminHome, cluster: FakeCluster, running: bool = True, empty_upper: bool = False) -> Start:
    """alice's desktop on n1, running or stopped, with a synced and an unsynced file in its upper
    (or nothing written since its version)."""
    if not running:
        with home.state() as db:
            db.set_desktop_state("alice", "stopped")
    cluster.seed(home, "alice", **({"synced": (), "unsynced": ()} if empty_upper else {}))
    desk = cluster["n1"].desks["alice"]
    return Start(state_rows(home), 3, running, cluster.view("n1", "alice", 3), cluster.picture("alice"),
                 cluster.picture("bob"), desk.container.spec if running else None)


def last_op(home: AdminHome) -> dict:
    with home.state() as db:
        row = db.conn.execute("SELECT * FROM operations WHERE user = 'alice' ORDER BY id DESC LIMIT 1").fetchone()
        return {**dict(row), "steps": [s["name"] for s in db.operation_steps(row["id"])]}


def lock_free(home: AdminHome) -> bool:
    with home.state() as db:
        return db.lock_row("alice") is None


def assert_back_at_start(home: AdminHome, cluster: FakeCluster, start: Start) -> None:
    """The desktop is as it was on n1, n2 has nothing of it, the state database is as it was.
    The merge may have published one version more: then it holds what the desktop showed,
    and the desktop runs over it with an empty upper."""
    files = cluster.files["alice"]
    kept = set(start.alice["versions"])
    extra = set(files.versions) - kept
    assert kept <= set(files.versions) and len(extra) <= 1, sorted(files.versions)
    for number in extra:
        assert (files.versions[number].base, files.versions[number].files) == (start.version, start.view)
    rows = state_rows(home)
    recorded = next(r for r in rows["vms"] if r["user"] == "alice")["version"]
    assert recorded in {start.version, *extra}
    for row in rows["vms"]:
        if row["user"] == "alice":
            row["version"] = start.version
    assert rows == start.rows
    assert lock_free(home)

    source = cluster["n1"].desks["alice"]
    assert source.layers
    if start.running:
        assert (source.stack, source.sync) == (recorded, True)
        assert source.container == Container(start.spec, running=True)
    else:
        assert (source.stack, source.sync, source.container) == (None, False, None)
    if recorded != start.version:
        assert source.upper == set()
    assert cluster.view("n1", "alice", recorded) == start.view
    assert cluster["n2"].desks.get("alice", Desk()).empty, cluster["n2"].desks["alice"]
    assert {k: files.owner[k] for k in ("node", "member")} == start.alice["owner"]
    assert files.snapshots == {}
    assert cluster.picture("bob") == start.bob


def assert_switched(home: AdminHome, cluster: FakeCluster, start: Start) -> None:
    """The desktop lives on n2 over a version that holds what it showed; n1 has nothing of it."""
    with home.state() as db:
        row = db.desktop_row("alice")
        assert (row["node"], row["state"]) == ("n2", "running" if start.running else "stopped")
        assert sorted(g["uuid"] for g in db.gpu_assignments("alice", "n2")) == ["GPU-n2-1", "GPU-n2-2"]
        assert db.gpu_assignments("alice", "n1") == []
    target = cluster["n2"].desks["alice"]
    assert target.layers
    if start.running:
        assert (target.stack, target.sync, target.container.running) == (row["version"], True, True)
        assert target.container.spec["gpus"] == ["GPU-n2-1", "GPU-n2-2"]
    assert cluster.view("n2", "alice", row["version"]) == start.view
    assert cluster["n1"].desks.get("alice", Desk()).empty
    assert cluster.files["alice"].owner["node"] == "n2"
    assert cluster.picture("bob") == start.bob
    assert lock_free(home)


def undo_steps(steps: list[str]) -> list[str]:
    return [s for s in steps if s.startswith("undo_")]


def expected_undo(failed: str, running: bool) -> list[str]:
    ran = STEP_NAMES[:STEP_NAMES.index(failed) + 1]
    ran = [s for s in ran if running or s not in SKIPPED_WHEN_STOPPED]
    return [f"undo_{s}" for s in reversed(ran) if s in UNDOABLE]


# -- making a step fail ----------------------------------------------------------------------------
def injected(step: str) -> NodeError:
    return NodeError(node="n2", msg=f"a failure injected in {step}")


def switch(home: AdminHome, notes: list[str] | None = None):
    say = (notes.append if notes is not None else (lambda _m: None))
    return Switcher(home, say=say, progress=lambda _m: None).switch("alice", "n2")


CASES = [pytest.param(step, when, running, id=f"{step}-{when}-{'running' if running else 'stopped'}")
         for running in (True, False) for step in BEFORE_COMMIT if running or step not in SKIPPED_WHEN_STOPPED
         for when in ("before", "after")]


# -- the model itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_switch_moves_the_desktop_with_what_it_shows(home, cluster, running):
    start = begin(home, cluster, running)
    result = switch(home)
    assert (result.source, result.target, result.version) == ("n1", "n2", 4)
    assert_switched(home, cluster, start)
    assert cluster.files["alice"].versions[4].files == start.view
    assert last_op(home)["state"] == "done"


def test_the_fake_cluster_refuses_what_the_helpers_refuse(home, cluster):
    begin(home, cluster)
    n1 = cluster["n1"]
    with pytest.raises(HelperFailed, match="container_running"):
        n1.call("vm", "ensure_stack_unmounted", {"user": "alice", "data_dir": n1.node.data_dir})
    with pytest.raises(HelperFailed, match="fenced"):
        cluster["n2"].call("vm", "ensure_stack", {"user": "alice", "data_dir": "/d", "mfs_mount": cluster.mfs_mount, "version": 3,
                                                  "image": {"id": IMAGE, "images": "/x/images", "legacy": "/x/xfce"}, "disk": 1 << 30, "node": "n2"})
    with pytest.raises(AssertionError, match="does not model vm.explode"):
        n1.call("vm", "explode", {})
    with pytest.raises(AssertionError, match="for n1 was sent to n2"):
        cluster["n2"].call("sync", "ensure_running", {"user": "alice", "data_dir": "/d", "node": "n1"})
    n1.fail("vm", "status", times=2)
    for _ in range(2):
        with pytest.raises(HelperFailed, match="injected"):
            n1.call("vm", "status", {"user": "alice", "data_dir": "/d"})
    assert n1.call("vm", "status", {"user": "alice", "data_dir": "/d"})["data"]["container"]["running"]
    n1.cut()
    with pytest.raises(NodeUnreachable):
        n1.alive(5)
    with pytest.raises(NodeUnreachable):
        n1.call("vm", "status", {"user": "alice", "data_dir": "/d"})


def test_the_fake_cluster_runs_the_other_operations_through_the_cli(home, cluster):
    """create, stop, start, backup, solidify, restore and rm run on the fake cluster as on
    nodes, and what the desktop shows follows them."""
    bob = cluster.picture("bob")
    with home.state() as db:
        db.add_user("carol", PW)

    def run(*args: str):
        assert main(list(args)) == 0, args
        with home.state() as db:
            row = db.desktop_row("carol")
        return None if row is None else (row["node"], row["state"], cluster.view(row["node"], "carol", row["version"]))

    assert run("create", "carol", "--node", "n1") == ("n1", "running", set())
    cluster.write("n1", "carol", "a")
    assert run("stop", "carol") == ("n1", "stopped", {"a"})
    assert cluster.files["carol"].up_mfs == {"a"}
    assert run("start", "carol") == ("n1", "running", {"a"})
    cluster.write("n1", "carol", "b")
    assert run("backup", "carol") == ("n1", "running", {"a", "b"})
    cluster.write("n1", "carol", "c")
    assert run("solidify", "carol") == ("n1", "running", {"a", "b", "c"})
    assert cluster["n1"].desks["carol"].upper == set()
    cluster.write("n1", "carol", "d")
    # Back to the backup, v1; what the desktop showed is kept first, as v3.
    assert run("restore", "carol", "1", "--yes") == ("n1", "running", {"a", "b"})
    assert cluster.files["carol"].versions[3].files == {"a", "b", "c", "d"}
    assert run("rm", "carol", "--yes") is None
    assert all(fake.desks.get("carol", Desk()).empty for fake in cluster.nodes.values())
    assert cluster.files["carol"].owner["node"] is None
    assert run("create", "carol", "--node", "n2") == ("n2", "running", {"a", "b"})
    assert cluster.picture("bob") == bob


# -- a step fails before the commit point: everything is undone --------------------------------------
@pytest.mark.parametrize("step, when, running", CASES)
def test_a_step_failing_before_the_commit_point_is_rolled_back(home, cluster, monkeypatch, step, when, running):
    start = begin(home, cluster, running)
    fail_step(monkeypatch, cluster, SwitchKind, step, when, injected(step))
    if step == "preflight" and when == "before":
        # A check that fails: the check's own error, and nothing was reserved or changed.
        with pytest.raises(NodeError, match="injected") as raised:
            switch(home)
        assert not isinstance(raised.value, RolledBack)
        assert last_op(home)["state"] == "refused"
        assert cluster.picture("alice") == start.alice
    else:
        with pytest.raises(RolledBack, match=f"failed at {step} and was rolled back") as raised:
            switch(home)
        assert raised.value.exit_code == (7 if step == "preflight" else 6)
        op = last_op(home)
        assert op["state"] == "rolled_back"
        assert undo_steps(op["steps"]) == expected_undo(step, running)
        # Undone is undone: neither resumed nor aborted.
        assert main(["ops", "resume", str(op["id"])]) == 6
        assert main(["ops", "abort", str(op["id"])]) == 6
    assert_back_at_start(home, cluster, start)
    # And the switch runs from there as if it had never been tried.
    switch(home)
    assert_switched(home, cluster, start)


# -- a helper call fails before the commit point ---------------------------------------------------
# Each call a switch of a running desktop makes before its commit: (step, node, helper, action,
# earlier calls of that action on that node). test_the_call_list_is_the_switchs keeps it current.
CALLS = [
    ("preflight", "n2", "mfs", "ensure_mounted", 0),
    ("preflight", "n2", "probe", "facts", 0),
    ("preflight", "n2", "image", "status", 0),
    ("preflight", "n1", "vm", "status", 0),
    ("preflight", "n2", "merge", "versions", 0),
    ("push_image", "n2", "image", "status", 1),
    ("precopy", "n1", "sync", "status", 0),
    ("precopy", "n1", "sync", "flush", 0),
    ("stop_source", "n1", "vm", "stop_container", 0),
    ("final_flush", "n1", "sync", "ensure_stopped", 0),
    ("final_flush", "n1", "vm", "remove_container", 0),
    ("final_flush", "n1", "vm", "ensure_stack_unmounted", 0),
    ("merge", "n2", "merge", "versions", 1),
    ("merge", "n2", "merge", "publish", 0),
    ("fence", "n2", "vm", "set_owner", 0),
    ("build_stack", "n2", "vm", "remove_container", 0),
    ("build_stack", "n2", "vm", "ensure_stack_unmounted", 0),
    ("build_stack", "n2", "vm", "reset_upper", 0),
    ("build_stack", "n2", "vm", "ensure_stack", 0),
    ("start_target", "n2", "image", "ensure_docker_base", 0),
    ("start_target", "n2", "sync", "ensure_running", 0),
    ("start_target", "n2", "net", "ensure_isolation", 0),
    ("start_target", "n2", "runtime", "ensure_runtime", 0),
    ("start_target", "n2", "vm", "ensure_container", 0),
]
READ_ONLY = {("probe", "facts"), ("image", "status"), ("vm", "status"), ("merge", "versions"), ("sync", "status")}
CALL_CASES = [pytest.param(*call, after, id=f"{call[0]}-{call[1]}-{call[2]}.{call[3]}{'#2' if call[4] else ''}-"
                                           f"{'after' if after else 'before'}")
              for call in CALLS for after in (False, True) if not (after and call[2:4] in READ_ONLY)]


def tagging(cluster: FakeCluster):
    """A progress callback that tags the cluster's calls with the step that runs."""
    cluster.tag = "preflight"

    def progress(message: str) -> None:
        shown = re.fullmatch(r"\[\d+/\d+\] (\w+)", message)
        if shown:
            cluster.tag = shown.group(1)

    return progress


def test_the_call_list_is_the_switchs(home, cluster):
    begin(home, cluster)
    Switcher(home, progress=tagging(cluster)).switch("alice", "n2")
    made, seen = [], {}
    for node in ("n1", "n2"):
        for c in cluster[node].calls:
            key = (node, c.helper, c.action)
            made.append((c.tag, node, c.helper, c.action, seen.get(key, 0)))
            seen[key] = seen.get(key, 0) + 1
    before_commit = [m for m in made if m[0] in BEFORE_COMMIT]
    order = {name: index for index, name in enumerate(STEP_NAMES)}
    # Per step and node, in the order they were made.
    assert sorted(before_commit, key=lambda m: (order[m[0]], m[1])) == sorted(CALLS, key=lambda m: (order[m[0]], m[1]))


@pytest.mark.parametrize("step, node, helper, action, skip, after", CALL_CASES)
def test_a_helper_call_failing_before_the_commit_point_is_rolled_back(home, cluster, step, node, helper, action, skip, after):
    start = begin(home, cluster)
    cluster[node].fail(helper, action, skip=skip, after=after)
    if step == "preflight":
        with pytest.raises(HelperFailed, match="injected"):
            switch(home)
        assert last_op(home)["state"] == "refused"
        assert cluster.picture("alice") == start.alice
    else:
        with pytest.raises(RolledBack, match=f"failed at {step}"):
            switch(home)
        assert last_op(home)["state"] == "rolled_back"
    assert_back_at_start(home, cluster, start)
    switch(home)
    assert_switched(home, cluster, start)


def test_a_target_that_goes_away_mid_switch_leaves_the_desktop_on_its_source(home, cluster):
    start = begin(home, cluster)
    cluster["n2"].fail("vm", "ensure_container", cut=True)
    notes: list[str] = []
    with pytest.raises(RolledBack, match="failed at start_target"):
        switch(home, notes)
    assert any("n2 is unreachable" in note and "leftovers of alice stay" in note for note in notes), notes
    # Everything but n2, which keeps what it had of alice until it is back.
    source = cluster["n1"].desks["alice"]
    assert source.container == Container(start.spec, running=True) and source.sync
    assert cluster.view("n1", "alice") == start.view
    assert cluster.files["alice"].owner["node"] == "n1"
    assert lock_free(home) and last_op(home)["state"] == "rolled_back"
    with home.state() as db:
        assert db.desktop_row("alice")["node"] == "n1" and db.gpu_assignments("alice", "n2") == []


# -- at and after the commit point: only forward -----------------------------------------------------
@pytest.mark.parametrize("step, when", [("commit", "after"), ("cleanup_source", "before"), ("cleanup_source", "after")])
def test_a_failure_at_or_after_the_commit_point_is_not_undone_and_is_finished_by_resume(home, cluster, monkeypatch, step, when):
    start = begin(home, cluster)
    fail_step(monkeypatch, cluster, SwitchKind, step, when, injected(step))
    with pytest.raises(NodeError, match="injected") as raised:
        switch(home)
    assert not isinstance(raised.value, RolledBack)
    op = last_op(home)
    assert op["state"] == "failed" and undo_steps(op["steps"]) == []
    assert lock_free(home)
    with home.state() as db:
        assert db.desktop_row("alice")["node"] == "n2"
    target = cluster["n2"].desks["alice"]
    assert target.container.running and cluster.files["alice"].owner["node"] == "n2"
    assert main(["ops", "abort", str(op["id"])]) == 6
    assert main(["ops", "resume", str(op["id"])]) == 0
    assert last_op(home)["state"] == "done"
    assert_switched(home, cluster, start)


def test_a_commit_that_fails_before_it_records_anything_is_rolled_back(home, cluster, monkeypatch):
    start = begin(home, cluster)
    fail_step(monkeypatch, cluster, SwitchKind, "commit", "before", injected("commit"))
    with pytest.raises(RolledBack, match="failed at commit"):
        switch(home)
    assert_back_at_start(home, cluster, start)


# -- an interrupted switch, aborted ----------------------------------------------------------------
def killed_switch(home: AdminHome, cluster, monkeypatch, step: str, when: str) -> int:
    """A switch that dies at step (before or after its work) as kill -9 leaves it: its operation's id."""
    fail_step(monkeypatch, cluster, SwitchKind, step, when, Interrupted())
    never_undo(monkeypatch)
    with pytest.raises(Interrupted):
        switch(home)
    op_id = last_op(home)["id"]
    as_if_killed(home, "alice", op_id)
    return op_id


@pytest.mark.parametrize("step, when, running", CASES)
def test_aborting_a_switch_interrupted_before_the_commit_point_undoes_it(home, cluster, monkeypatch, step, when, running):
    start = begin(home, cluster, running)
    op_id = killed_switch(home, cluster, monkeypatch, step, when)
    assert show_op(home, op_id).state == "interrupted"
    assert main(["ops", "abort", str(op_id)]) == 0
    op = last_op(home)
    assert op["state"] == "aborted"
    assert undo_steps(op["steps"]) == expected_undo(step, running)
    assert_back_at_start(home, cluster, start)
    switch(home)
    assert_switched(home, cluster, start)


@pytest.mark.parametrize("step, when", [("commit", "after"), ("cleanup_source", "before"), ("cleanup_source", "after")])
def test_a_switch_interrupted_at_or_after_the_commit_point_is_not_aborted_but_resumed(home, cluster, monkeypatch, step, when):
    start = begin(home, cluster)
    op_id = killed_switch(home, cluster, monkeypatch, step, when)
    assert main(["ops", "abort", str(op_id)]) == 6
    assert undo_steps(last_op(home)["steps"]) == []
    assert main(["ops", "resume", str(op_id)]) == 0
    assert last_op(home)["state"] == "done"
    assert_switched(home, cluster, start)


def test_aborting_a_rollback_that_was_interrupted_finishes_it(home, cluster, monkeypatch):
    """The rollback of a failed build_stack dies while it takes the target's stack down; the
    abort takes back everything again, the failed step included."""
    start = begin(home, cluster)
    fail_step(monkeypatch, cluster, SwitchKind, "build_stack", "after", injected("build_stack"))
    cluster["n2"].fail("sync", "ensure_stopped", exc=Interrupted())
    with pytest.raises(Interrupted):
        switch(home)
    op_id = last_op(home)["id"]
    as_if_killed(home, "alice", op_id)
    assert main(["ops", "abort", str(op_id)]) == 0
    assert last_op(home)["state"] == "aborted"
    assert_back_at_start(home, cluster, start)


def test_a_verify_failing_after_the_target_desktop_wrote_files_rolls_back_a_desktop_with_an_empty_upper(home, cluster, monkeypatch):
    """A desktop whose upper is empty (nothing written since its version) starts on the target,
    writes there (its session starts), and VNC never answers: the target's files do not come
    back, and the source runs as it was."""
    start = begin(home, cluster, empty_upper=True)
    built = SwitchKind.steps

    def steps(self):
        def verify():
            cluster.write("n2", "alice", ".xsession-errors")
            cluster["n2"].run(self.desktops.calls(cluster["n2"].node, "alice").flush(60))
            raise NodeError(node="n2", msg="VNC does not answer")

        return [replace(s, apply=verify) if s.name == "verify" else s for s in built(self)]

    monkeypatch.setattr(SwitchKind, "steps", steps)
    notes: list[str] = []
    with pytest.raises(RolledBack, match="failed at verify"):
        switch(home, notes)
    assert not [n for n in notes if n.startswith("note:")], notes
    assert_back_at_start(home, cluster, start)


def test_a_rollback_interrupted_after_the_desktop_runs_again_is_neither_resumed_nor_undone_twice(home, cluster, monkeypatch):
    """The rollback brought the desktop back on n1 and died in its last undo; the member works
    on. The operation is not resumed (that would start the desktop on n2 as well), and aborting
    it finishes the rollback without undoing again what it undid: the member's new files stay."""
    start = begin(home, cluster)
    fail_step(monkeypatch, cluster, SwitchKind, "start_target", "after", injected("start_target"))
    undo_preflight = SwitchKind._undo_preflight
    left = [Interrupted()]

    def dies_once(self):
        if left:
            raise left.pop()
        return undo_preflight(self)

    monkeypatch.setattr(SwitchKind, "_undo_preflight", dies_once)
    with pytest.raises(Interrupted):
        switch(home)
    op_id = last_op(home)["id"]
    as_if_killed(home, "alice", op_id)
    assert cluster["n1"].desks["alice"].container.running
    cluster.write("n1", "alice", "written after the rollback")
    assert main(["ops", "resume", str(op_id)]) == 6
    assert cluster["n2"].desks.get("alice", Desk()).empty
    assert main(["ops", "abort", str(op_id)]) == 0
    assert undo_steps(last_op(home)["steps"]).count("undo_merge") == 1
    assert cluster.view("n1", "alice") == start.view | {"written after the rollback"}
    cluster["n1"].desks["alice"].upper.discard("written after the rollback")
    assert_back_at_start(home, cluster, start)
