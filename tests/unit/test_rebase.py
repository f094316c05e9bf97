"""`labvm rebase` and `labvm image roll` on the stateful fake cluster (fake_cluster.py): the
plan, its conflicts, its end, a failure or a kill -9 at each of its steps (undone: the desktop
runs over its old image with the same files), and a roll that stops at its first failure.

alice runs on n1 over image A (version 3); B is a newer image only the admin host has.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labvm.admin import AdminHome
from labvm.cli import main
from labvm.errors import BadInput, LabvmError, NodeError, RolledBack
from labvm.ops import show_op
from labvm.rebase import RebaseKind, conflict_text, conflicts, rebase, roll

from .fake_cluster import IMAGE, IMAGE_B, FakeCluster
from .plan_faults import Interrupted, admin_template, as_if_killed, copied_home, fail_step, never_undo, seeded_cluster

START_VERSION = 3
UP = ("image", "mount_mfs", "mount_stack", "member_quota", "start_sync", "start_container", "record_running")
DOWN = ("stop_container", "flush_sync", "remove_container", "unmount_stack", "record_stopped")
RUNNING = ("check", "image", "flush", *DOWN, "publish", "solidify", "set_image", *UP)
STOPPED = ("check", "image", "publish", "solidify", "set_image")
UNDOABLE = {"stop_container", "set_image", "mount_stack", "start_sync", "start_container", "record_running"}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return admin_template(tmp_path_factory, ("alice", "bob", "carol"), (("alice", "n1", START_VERSION), ("bob", "n2", 1)),
                          (("GPU-n1-0", "n1", 0, "alice"), ("GPU-n2-0", "n2", 0, "bob")))


@pytest.fixture
def home(template, tmp_path, monkeypatch) -> AdminHome:
    return copied_home(template, tmp_path, monkeypatch)


@pytest.fixture
def cluster(home, monkeypatch) -> FakeCluster:
    fake = seeded_cluster(home, monkeypatch)
    fake.seed(home, "alice")
    return fake


def row(home: AdminHome, user: str = "alice") -> dict:
    with home.state() as db:
        return dict(db.desktop_row(user))


def last_op(home: AdminHome) -> dict:
    with home.state() as db:
        op = db.conn.execute("SELECT * FROM operations WHERE user = 'alice' ORDER BY id DESC LIMIT 1").fetchone()
        return {**dict(op), "steps": db.operation_steps(op["id"])}


def runs_over(cluster: FakeCluster, image: str, node: str = "n1", user: str = "alice") -> bool:
    desk = cluster[node].desks[user]
    return desk.image == image and desk.container is not None and desk.container.running


def stop_alice(home: AdminHome) -> None:
    from labvm.desktops import Desktops

    Desktops(home).stop("alice")


# -- the plan ------------------------------------------------------------------------------------
def test_the_dry_run_lists_the_steps_names_the_conflicts_and_changes_nothing(home, cluster, capsys):
    cluster.write("n1", "alice", "etc/motd", "var/lib/dpkg/status", "home/alice/notes")
    before = (row(home), cluster.picture("alice"))
    report = rebase(home, lambda _m: None, "alice", IMAGE_B[:8], dry_run=True)
    assert report.ok, report.error
    assert [(s.name, s.undo is not None) for s in report.steps] == [(n, n in UNDOABLE) for n in RUNNING]
    checks = {c.name: c.detail for c in report.checks}
    # /etc/motd and the package database differ between A and B; notes is alice's alone.
    assert "2 path(s)" in checks["conflicts"] and "/etc/motd" in checks["conflicts"]
    assert "/var/lib/dpkg/status is among them" in checks["conflicts"] and "home/alice/notes" not in checks["conflicts"]
    assert "image bbbbbbbbbbbb is not on n1: the image step sends it" in checks["node's image"]
    assert (row(home), cluster.picture("alice")) == before
    assert cluster.changes() == []
    assert main(["rebase", "alice", "--image", IMAGE_B[:8], "--dry-run"]) == 0
    assert "dpkg" in " ".join(capsys.readouterr().out.split())


def test_conflicts_are_the_members_paths_the_images_hold_otherwise():
    old = {"etc/motd": ["0", 5, 0o644, 1, ""], "etc/os-release": ["0", 2, 0o644, 1, ""], "bin/a": ["0", 1, 0o755, 1, ""]}
    new = {"etc/motd": ["0", 6, 0o644, 2, ""], "etc/os-release": ["0", 2, 0o644, 1, ""], "bin/b": ["0", 1, 0o755, 1, ""]}
    found = conflicts(["etc/motd", "etc/os-release", "bin/a", "bin/b", "home/x"], old, new)
    assert found == ["etc/motd", "bin/a", "bin/b"]
    assert conflict_text([], False).startswith("none")
    assert "apt" not in conflict_text(found, False) and "apt" in conflict_text(["var/lib/dpkg/status"], False)


def test_a_rebase_onto_the_image_it_has_or_an_unknown_one_is_refused(home, cluster):
    with pytest.raises(BadInput, match="already"):
        rebase(home, lambda _m: None, "alice", IMAGE[:12])
    with pytest.raises(LabvmError, match="no image cccc"):
        rebase(home, lambda _m: None, "alice", "cccc")
    with pytest.raises(BadInput, match="hex digits"):
        rebase(home, lambda _m: None, "alice", "not-an-id")
    assert row(home)["image"] == IMAGE and cluster.changes() == []


# -- to the end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_rebase_runs_the_desktop_over_the_new_image_with_every_file(home, cluster, running):
    if not running:
        stop_alice(home)
    shown = cluster.view("n1", "alice", START_VERSION) | frozenset(cluster["n1"].desks["alice"].upper)
    done = rebase(home, lambda _m: None, "alice", IMAGE_B[:12])
    assert (done["image"], done["previous_image"], done["running"]) == (IMAGE_B, IMAGE, running)
    alice = row(home)
    assert (alice["image"], alice["state"], alice["version"]) == (IMAGE_B, "running" if running else "stopped", done["version"])
    version = cluster.files["alice"].versions[done["version"]]
    # The new version holds what she had, and was published over the old image.
    assert (version.base, version.reason, version.files, version.image) == (START_VERSION, "rebase", shown, IMAGE)
    assert IMAGE_B in cluster["n1"].images
    if running:
        assert runs_over(cluster, IMAGE_B) and cluster.view("n1", "alice") == shown
    # And back: the same files over A again.
    back = rebase(home, lambda _m: None, "alice", IMAGE[:12])
    assert row(home)["image"] == IMAGE and back["previous_image"] == IMAGE_B
    if running:
        assert runs_over(cluster, IMAGE) and cluster.view("n1", "alice") == shown


def test_restore_of_a_version_from_before_a_rebase_takes_its_image_back(home, cluster):
    from labvm.storage import Storage

    done = rebase(home, lambda _m: None, "alice", IMAGE_B[:12])
    restored = Storage(home).restore("alice", done["version"])
    assert restored["restored"] == done["version"]
    # That version was published over A: the desktop goes back to A with it.
    assert row(home)["image"] == IMAGE and runs_over(cluster, IMAGE)


# -- failures ------------------------------------------------------------------------------------
def cases():
    return [pytest.param(step, when, id=f"{step}-{when}") for step in RUNNING for when in ("before", "after")
            if not (step == "check" and when == "after")]


def assert_as_before(home: AdminHome, cluster: FakeCluster, shown: frozenset) -> None:
    """alice runs over A again with the files she had; her lock is free."""
    alice = row(home)
    assert (alice["image"], alice["state"], alice["node"]) == (IMAGE, "running", "n1")
    assert runs_over(cluster, IMAGE) and cluster.view("n1", "alice") == shown
    with home.state() as db:
        assert db.lock_row("alice") is None


@pytest.mark.parametrize("step, when", cases())
def test_a_failing_step_is_undone_and_the_desktop_runs_over_its_old_image(home, cluster, monkeypatch, step, when):
    shown = cluster.view("n1", "alice")
    fail_step(monkeypatch, cluster, RebaseKind, step, when, NodeError(node="n1", msg=f"a failure injected in {step}"))
    with pytest.raises(LabvmError, match="injected"):
        rebase(home, lambda _m: None, "alice", IMAGE_B[:12])
    op = last_op(home)
    assert op["state"] in ("refused", "failed", "rolled_back")
    assert_as_before(home, cluster, shown)
    # And it runs from there as if it had never been tried.
    rebase(home, lambda _m: None, "alice", IMAGE_B[:12])
    assert row(home)["image"] == IMAGE_B and runs_over(cluster, IMAGE_B) and cluster.view("n1", "alice") == shown


@pytest.mark.parametrize("step, when", [c for c in cases() if c.values[0] != "check"])
def test_a_killed_rebase_is_aborted_back_or_resumed_to_its_end(home, cluster, step, when):
    shown = cluster.view("n1", "alice")
    for finish in ("abort", "resume"):
        with pytest.MonkeyPatch.context() as patch:
            fail_step(patch, cluster, RebaseKind, step, when, Interrupted())
            never_undo(patch)
            with pytest.raises(Interrupted):
                rebase(home, lambda _m: None, "alice", IMAGE_B[:12] if row(home)["image"] == IMAGE else IMAGE[:12])
        op_id = last_op(home)["id"]
        as_if_killed(home, "alice", op_id)
        assert show_op(home, op_id).state == "interrupted"
        assert main(["ops", finish, str(op_id)]) == 0
        if finish == "abort":
            assert_as_before(home, cluster, shown)
        else:
            assert row(home)["image"] == IMAGE_B and runs_over(cluster, IMAGE_B) and cluster.view("n1", "alice") == shown
            return


# -- image roll ----------------------------------------------------------------------------------
def test_a_roll_stops_at_the_first_failure_with_that_desktop_as_it_was(home, cluster):
    bob_shown = cluster.view("n2", "bob")
    alice_shown = cluster.view("n1", "alice")
    cluster["n2"].fail("vm", "ensure_container", exc=NodeError(node="n2", msg="the new image does not start"), check=False)
    report = roll(home, lambda _m: None, IMAGE_B[:12])
    assert [d["user"] for d in report.done] == ["alice"] and report.failed["user"] == "bob"
    assert "does not start" in report.failed["error"]
    assert row(home)["image"] == IMAGE_B and runs_over(cluster, IMAGE_B) and cluster.view("n1", "alice") == alice_shown
    bob = row(home, "bob")
    assert (bob["image"], bob["state"]) == (IMAGE, "running")
    assert runs_over(cluster, IMAGE, node="n2", user="bob") and cluster.view("n2", "bob") == bob_shown


def test_a_roll_skips_desktops_already_on_the_image_and_stops_before_the_next(home, cluster):
    rebase(home, lambda _m: None, "alice", IMAGE_B[:12])
    report = roll(home, lambda _m: None, IMAGE_B[:12])
    assert report.skipped == ["alice"] and [d["user"] for d in report.done] == ["bob"] and report.failed is None


def test_image_roll_exits_with_the_failing_rebases_code(home, cluster, capsys):
    cluster["n1"].fail("vm", "ensure_container", exc=NodeError(node="n1", msg="no start"), check=False)
    code = main(["image", "roll", IMAGE_B[:12], "--yes"])
    out = capsys.readouterr()
    assert code == RolledBack.exit_code, out
    assert "image roll stopped at alice: 0 rebased, 1 left on their image" in " ".join(out.err.split())
    assert row(home, "bob")["image"] == IMAGE


# -- image list, rm, gc ----------------------------------------------------------------------------
def test_image_list_shows_each_images_nodes_and_desktops(home, cluster, capsys):
    import json

    assert main(["image", "list", "--json"]) == 0
    listed = {image["id"]: image for image in json.loads(capsys.readouterr().out)}
    assert listed[IMAGE]["nodes"] == ["n1", "n2"] and listed[IMAGE]["desktops"] == ["alice", "bob"]
    assert listed[IMAGE_B]["nodes"] == [] and listed[IMAGE_B]["desktops"] == []
    assert (listed[IMAGE]["kind"], listed[IMAGE]["packages"], listed[IMAGE]["built"]) == ("minimal", 1, "2025-01-01T00:00:00Z")
    assert main(["image", "list"]) == 0
    out = capsys.readouterr().out
    assert IMAGE[:12] in out and IMAGE_B[:12] in out and "alice,bob" in out
    assert all(len(line) <= 80 for line in out.splitlines())


def test_image_rm_refuses_an_image_in_use_naming_the_desktops_and_removes_an_unused_one(home, cluster, capsys):
    from labvm.images import catalog

    assert main(["image", "rm", IMAGE[:12], "--yes"]) == 9
    err = capsys.readouterr().err
    assert "alice, bob" in err and IMAGE in cluster["n1"].images
    cluster["n2"].images.add(IMAGE_B)
    assert main(["image", "rm", IMAGE_B[:12], "--yes"]) == 0
    assert IMAGE_B not in cluster["n2"].images and IMAGE_B not in {i.id for i in catalog(home.images_dir)}


def test_image_gc_removes_only_what_no_desktop_on_that_node_uses(home, cluster, capsys):
    import json

    cluster["n1"].images.add(IMAGE_B)
    cluster["n2"].images.add(IMAGE_B)
    rebase(home, lambda _m: None, "alice", IMAGE_B[:12])  # alice (n1) on B; bob (n2) on A
    assert main(["image", "gc", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["removed"] == {"n1": [IMAGE], "n2": [IMAGE_B]} and planned["dry_run"]
    assert {IMAGE, IMAGE_B} <= cluster["n1"].images
    assert main(["image", "gc"]) == 0
    assert cluster["n1"].images == {IMAGE_B} and cluster["n2"].images == {IMAGE}
    assert runs_over(cluster, IMAGE_B) and runs_over(cluster, IMAGE, node="n2", user="bob")


# -- desktops from before images had ids -----------------------------------------------------------
@pytest.mark.parametrize("how", ["start", "switch"])
def test_a_desktop_without_an_image_is_adopted_with_its_nodes_legacy_image(home, cluster, how):
    """A desktop made when nodes held one image (in xfce_local) has no image recorded: its
    next start (or switch) records the one its node holds there, and runs over it."""
    from labvm.desktops import Desktops
    from labvm.switch import Switcher

    stop_alice(home)
    with home.state() as db:
        db.update_desktop("alice", image=None)
    cluster["n1"].images.discard(IMAGE)
    cluster["n1"].legacy = IMAGE
    if how == "start":
        Desktops(home).start("alice")
        assert row(home)["image"] == IMAGE and runs_over(cluster, IMAGE)
        assert cluster["n1"].images == set()  # nothing pushed: the legacy tree is that image
    else:
        Switcher(home).switch("alice", "n2")
        assert (row(home)["image"], row(home)["node"]) == (IMAGE, "n2")


def test_a_desktop_without_an_image_on_a_node_without_a_legacy_one_is_refused_with_the_way_out(home, cluster):
    from labvm.desktops import Desktops

    stop_alice(home)
    with home.state() as db:
        db.update_desktop("alice", image=None)
    with pytest.raises(LabvmError, match="rebase alice --image ID"):
        Desktops(home).start("alice")
    assert row(home)["image"] is None and row(home)["state"] == "stopped"
    # The way out the message names: a rebase from the unknown image.
    done = rebase(home, lambda _m: None, "alice", IMAGE_B[:12])
    assert (done["image"], done["previous_image"]) == (IMAGE_B, None)
    Desktops(home).start("alice")
    assert row(home)["image"] == IMAGE_B and runs_over(cluster, IMAGE_B)
