"""The mfs helper's ensure_mounted / ensure_unmounted against the testbed's real MooseFS master.

The helper runs here as a subprocess (the helper contract), mounting into a temp dir.
"""

import os
import stat
import subprocess

import pytest

from labvm.config import parse_config


def mounted(path) -> bool:
    with open("/proc/self/mountinfo") as stream:
        return any(line.split()[4] == str(path) for line in stream)


@pytest.fixture
def mount(tmp_path):
    path = tmp_path / "mfs"
    yield path
    if mounted(path):
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def params(testbed, mount):
    storage = parse_config(testbed / "admin" / "bkConfxml.xml").storage
    return {
        "master": storage.mfs_master,
        "port": storage.mfs_port,
        "mount": str(mount),
        "subdir": storage.mfs_dir,
        "options": storage.mount_options,
    }


def call(run_helper, action, params, check=False):
    return run_helper("mfs", {"action": action, "params": params, "check": check})


def test_mount_is_an_idempotent_ensure_that_keeps_whiteouts(run_helper, params, mount):
    first = call(run_helper, "ensure_mounted", params)
    assert first.exit_code == 0 and first.reply["changed"] is True, first.reply
    assert first.data["is_moosefs"] is True
    # Members' setuid programs and device nodes live here: on the node they mean nothing, and
    # the versions' tree is root's alone. Whiteouts (0/0 devices) are still made and seen.
    assert "nodev" in first.data["mount_options"]
    assert "nosuid" in first.data["mount_options"]
    vms = os.lstat(mount / "vms")
    assert stat.S_IMODE(vms.st_mode) == 0o700 and vms.st_uid == 0
    again = call(run_helper, "ensure_mounted", params)
    assert again.exit_code == 0 and again.reply["changed"] is False

    whiteout = mount / f"whiteout-{os.getpid()}"
    os.mknod(whiteout, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    try:
        info = os.lstat(whiteout)
        assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
    finally:
        whiteout.unlink()


def test_an_older_suid_dev_mount_is_closed_in_place(run_helper, params, mount):
    assert call(run_helper, "ensure_mounted", params).exit_code == 0
    subprocess.run(["mount", "-o", "remount,bind,suid,dev", "--", str(mount)], check=True)
    os.chmod(mount / "vms", 0o755)
    run = call(run_helper, "ensure_mounted", params)
    assert run.exit_code == 0 and run.reply["changed"] is True, run.reply
    assert {"nosuid", "nodev"} <= set(run.data["mount_options"])
    assert stat.S_IMODE(os.lstat(mount / "vms").st_mode) == 0o700


def test_existing_mount_of_another_subdir_is_not_taken_for_done(run_helper, params, mount):
    assert call(run_helper, "ensure_mounted", params).exit_code == 0
    run = call(run_helper, "ensure_mounted", {**params, "subdir": "/not-this-one"})
    assert run.exit_code == 3 and run.error["code"] == "mfs_mount_mismatch"


def test_busy_mount_is_refused_then_unmounted_once_free(run_helper, params, mount):
    assert call(run_helper, "ensure_mounted", params).exit_code == 0
    user = subprocess.Popen(["sleep", "60"], cwd=mount)
    try:
        busy = call(run_helper, "ensure_unmounted", {"mount": str(mount)})
        assert busy.exit_code == 3 and busy.error["code"] == "mount_busy"
        assert busy.error["msg"].startswith(f"mount busy: {mount}")
        assert f"{user.pid} (sleep)" in busy.error["msg"]
        assert mounted(mount)
    finally:
        user.kill()
        user.wait()
    done = call(run_helper, "ensure_unmounted", {"mount": str(mount)})
    assert done.exit_code == 0 and done.reply["changed"] is True
    assert not mounted(mount)
    again = call(run_helper, "ensure_unmounted", {"mount": str(mount)})
    assert again.exit_code == 0 and again.reply["changed"] is False


def test_missing_subdir_is_a_precondition(run_helper, params):
    run = call(run_helper, "ensure_mounted", {**params, "subdir": "/labvm-test-no-such-dir"})
    assert run.exit_code == 3 and run.error["code"] == "mfs_subdir_missing"
