"""Plans on the testbed, killed (as kill -9) at each of their steps: a solidify resumed from any
step keeps every file, and a restore killed before its commit point is aborted back to the
desktop as it was. Meanwhile the desktop stays locked, and its status names the operation."""

from __future__ import annotations

import pytest

from .conftest import TESTBED, invoke_testbed, make_admin, wipe_mfs_files
from .test_storage import inside, ok, set_config
from .test_switch import labvm_with, running_on, snapshot, where

HANK_PW = "hank-Pw-6610"
DOWN = ("stop_container", "flush_sync", "remove_container", "unmount_stack", "record_stopped")
UP = ("image", "mount_mfs", "mount_stack", "member_quota", "start_sync", "start_container", "record_running")
SOLIDIFY = ("check", *DOWN, "publish", "solidify", *UP)
BEFORE_COMMIT = ("check", "stop_container", "unmount_stack", "record_stopped", "publish")


@pytest.fixture(scope="module")
def plans(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("plans") / "admin")
    set_config(admin, sync__syncTime=1)
    assert admin.labvm("image", "build", "--desktop", "minimal", timeout=1800).returncode == 0
    pushed = admin.labvm("image", "push", "n1", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert admin.labvm("user", "add", "hank", "--password-stdin", stdin=HANK_PW + "\n").returncode == 0
    wipe_mfs_files(admin, "hank")
    ok(admin.labvm("create", "hank", "--node", "n1", "--gpus", "0", "--memory", "512m"))
    inside(admin, "hank", "mkdir -p /usr/local/share/hank /home/hank/deep/a && "
                          "dd if=/dev/urandom of=/usr/local/share/hank/blob bs=64k count=8 2>/dev/null && "
                          "echo one > /home/hank/deep/a/.dot && chmod 0600 /home/hank/deep/a/.dot && rm /etc/issue")
    yield admin
    admin.labvm("rm", "hank", "--yes")
    wipe_mfs_files(admin, "hank")


def interrupted(admin, kind: str) -> dict:
    op = next(o for o in admin.labvm_json("ops", "list", "--unfinished") if o["kind"] == kind and o["user"] == "hank")
    assert op["state"] == "interrupted", op
    return op


def held(admin, op: dict) -> None:
    """The desktop is locked by the interrupted operation, and its status row says so."""
    refused = admin.labvm("stop", "hank")
    assert refused.returncode == 75 and f"ops resume {op['id']}" in refused.stderr, refused.stderr
    pending = where(admin, "hank").get("operation") or {}
    assert (pending.get("id"), pending.get("state")) == (op["id"], "interrupted"), pending


@pytest.mark.parametrize("step", SOLIDIFY)
def test_a_solidify_killed_at_any_step_resumes_with_no_file_lost(plans, testbed, step):
    before, version = snapshot("n1", "hank"), where(plans, "hank")["version"]
    killed = labvm_with(plans, {"LABVM_CRASH_AT": f"solidify:{step}"}, "solidify", "hank")
    assert killed.returncode == 137, killed.stdout + killed.stderr
    op = interrupted(plans, "solidify")
    held(plans, op)
    ok(plans.labvm("ops", "resume", str(op["id"])))
    desktop = where(plans, "hank")
    assert desktop["state"] == "running" and running_on(testbed, "hank") == ["n1"]
    assert desktop["version"] > version
    assert snapshot("n1", "hank") == before
    assert plans.labvm_json("ops", "show", str(op["id"]))["state"] == "done"


@pytest.mark.parametrize("step", BEFORE_COMMIT)
def test_a_restore_killed_before_its_commit_is_aborted_back_to_the_desktop_as_it_was(plans, testbed, step):
    before, version = snapshot("n1", "hank"), where(plans, "hank")["version"]
    killed = labvm_with(plans, {"LABVM_CRASH_AT": f"restore:{step}"}, "restore", "hank", "0", "--yes")
    assert killed.returncode == 137, killed.stdout + killed.stderr
    op = interrupted(plans, "restore")
    held(plans, op)
    ok(plans.labvm("ops", "abort", str(op["id"])))
    desktop = where(plans, "hank")
    assert (desktop["state"], desktop["version"]) == ("running", version)
    assert running_on(testbed, "hank") == ["n1"]
    assert snapshot("n1", "hank") == before
    shown = plans.labvm_json("ops", "show", str(op["id"]))
    assert shown["state"] == "aborted"
    again = plans.labvm("ops", "resume", str(op["id"]))
    assert again.returncode == 6 and "nothing to resume" in again.stderr


def test_a_start_whose_dockerd_dies_is_rolled_back_and_the_desktop_stays_stopped(plans, testbed, tmp_path, node_started):
    before = snapshot("n1", "hank")
    ok(plans.labvm("stop", "hank"))
    # dockerd stops as the start reaches its container: the layers and the sync are up by then.
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\n[ \"$1:$2\" = 'start:start_container' ] || exit 0\nexec '{TESTBED}' node-stop n1 dockerd\n")
    hook.chmod(0o755)
    failed = labvm_with(plans, {"LABVM_STEP_HOOK": str(hook)}, "start", "hank")
    assert failed.returncode != 0 and "rolled back" in failed.stderr, failed.stdout + failed.stderr
    assert where(plans, "hank")["state"] == "stopped"
    shown = plans.labvm_json("ops", "show", str(plans.labvm_json("ops", "list", "--user", "hank")[0]["id"]))
    assert shown["state"] == "rolled_back"
    assert "undo_start_sync" in [s["name"] for s in shown["steps"]]
    invoke_testbed("node-start", "n1")
    ok(plans.labvm("start", "hank"))
    assert where(plans, "hank")["state"] == "running" and running_on(testbed, "hank") == ["n1"]
    assert snapshot("n1", "hank") == before
