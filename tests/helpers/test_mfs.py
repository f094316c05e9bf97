"""The mfs helper run as a subprocess. Real mounting is covered by test_mfs_live.py and the
cluster tests; here: validation, paths that are not mounted, refusals, and an unreachable
master."""

import shutil
import time

import pytest

MASTER = "10.213.0.2"
GOOD = {"master": MASTER, "port": 9421, "mount": "/mnt/labvm-mfs", "subdir": "/labvm", "options": "mfscachemode=DIRECT"}


def mfs(run_helper, action, params, check=False, **kwargs):
    return run_helper("mfs", {"action": action, "params": params, "check": check}, **kwargs)


def mounted(path) -> bool:
    with open("/proc/self/mountinfo") as stream:
        return any(line.split()[4] == str(path) for line in stream)


def test_status_of_a_plain_directory(run_helper, tmp_path):
    run = mfs(run_helper, "status", {"mount": str(tmp_path)})
    assert run.exit_code == 0 and run.reply["changed"] is False
    assert run.data["mounted"] is False and run.data["is_moosefs"] is False
    assert run.data["mount"] == str(tmp_path)


def test_status_of_a_mount_that_is_not_moosefs(run_helper):
    run = mfs(run_helper, "status", {"mount": "/"})
    assert run.data["mounted"] is True and run.data["is_moosefs"] is False
    assert run.data["fstype"] and run.data["master"] is None


@pytest.mark.parametrize("check", [False, True])
def test_unmounting_what_is_not_mounted_changes_nothing(run_helper, tmp_path, check):
    run = mfs(run_helper, "ensure_unmounted", {"mount": str(tmp_path)}, check=check)
    assert run.exit_code == 0 and run.reply["changed"] is False
    assert run.data["mounted"] is False
    assert tmp_path.is_dir()


@pytest.mark.parametrize("check", [True, False])
def test_refuses_to_unmount_something_that_is_not_moosefs(run_helper, check):
    run = mfs(run_helper, "ensure_unmounted", {"mount": "/"}, check=check)
    assert run.exit_code == 3
    assert run.error["code"] == "not_moosefs"
    assert mounted("/")


def test_check_mode_reports_a_mount_it_would_make_and_touches_nothing(run_helper, tmp_path):
    mount = tmp_path / "mfs"
    run = mfs(run_helper, "ensure_mounted", {**GOOD, "mount": str(mount)}, check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["mounted"] is False
    assert run.data["wanted"] == {
        "master": MASTER,
        "port": 9421,
        "subdir": "/labvm",
        "options": ["mfscachemode=DIRECT", "nosuid", "nodev", "default_permissions"],
    }
    assert not mount.exists()


def test_defaults_and_required_options_are_added_once(run_helper, tmp_path):
    params = {"master": MASTER, "mount": str(tmp_path / "mfs"), "options": "nodev,nosuid"}
    run = mfs(run_helper, "ensure_mounted", params, check=True)
    assert run.data["wanted"] == {"master": MASTER, "port": 9421, "subdir": "/",
                                  "options": ["nodev", "nosuid", "default_permissions"]}
    params["options"] = "default_permissions,nodev,nosuid"
    run = mfs(run_helper, "ensure_mounted", params, check=True)
    assert run.data["wanted"]["options"] == ["default_permissions", "nodev", "nosuid"]


@pytest.mark.parametrize("check", [True, False])
def test_mount_point_taken_by_another_filesystem_is_a_precondition(run_helper, check):
    run = mfs(run_helper, "ensure_mounted", {**GOOD, "mount": "/"}, check=check)
    assert run.exit_code == 3
    assert run.error["code"] == "mount_point_in_use"
    assert "not MooseFS" in run.error["msg"]


@pytest.mark.skipif(shutil.which("mfsmount") is None, reason="needs mfsmount (moosefs-client)")
def test_unreachable_master_is_a_retryable_failure_not_a_hang(run_helper, tmp_path):
    mount = tmp_path / "mfs"
    params = {"master": "127.0.0.1", "port": 1, "mount": str(mount)}
    started = time.monotonic()
    run = mfs(run_helper, "ensure_mounted", params, timeout=90)
    assert time.monotonic() - started < 30
    assert run.exit_code == 75
    assert run.error["code"] == "mfs_master_unreachable"
    assert run.error["retryable"] is True
    assert run.error["msg"].startswith("MooseFS master 127.0.0.1:1 not reachable: ")
    assert not mounted(mount)


def test_unknown_action(run_helper):
    run = mfs(run_helper, "mount", GOOD)
    assert run.exit_code == 2 and run.error["code"] == "unknown_action"
    assert "known: ensure_mounted, ensure_quota, ensure_unmounted, status" in run.error["msg"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"master": None}, "missing required param 'master'"),
        ({"mount": None}, "missing required param 'mount'"),
        ({"master": "bad host!"}, "must be a host name or IPv4 address"),
        ({"master": "-oallow_other"}, "must be a host name or IPv4 address"),
        ({"master": "10.213.0.2:9421"}, "must be a host name or IPv4 address"),
        ({"master": ""}, "must be a host name or IPv4 address"),
        ({"master": 10}, "must be a host name or IPv4 address"),
        ({"port": 0}, "between 1 and 65535"),
        ({"port": 65536}, "between 1 and 65535"),
        ({"port": "9421"}, "must be an integer"),
        ({"port": True}, "must be an integer"),
        ({"port": 9421.0}, "must be an integer"),
        ({"mount": "mnt/labvm-mfs"}, "must be an absolute path"),
        ({"mount": "/mnt/labvm\n-mfs"}, "must not contain NUL or line breaks"),
        ({"subdir": "labvm"}, "must be an absolute path"),
        ({"options": "mfscachemode=DIRECT;reboot"}, "value of option 'mfscachemode'"),
        ({"options": "mfscachemode=DIRECT rw"}, "value of option 'mfscachemode'"),
        ({"options": "-f"}, "option name may only use"),
        ({"options": "1x"}, "option name may only use"),
        ({"options": "mfscachemode="}, "value of option 'mfscachemode'"),
        ({"options": "dev"}, "option 'dev' is not allowed"),
        ({"options": "nosuid,suid"}, "option 'suid' is not allowed"),
        ({"options": "mfsmaster=10.0.0.9"}, "use the 'master' param"),
        ({"options": "mfssubfolder=/"}, "use the 'subdir' param"),
        ({"options": "mfspassword=hunter2"}, "visible in the process list"),
        ({"options": ["mfscachemode=DIRECT"]}, "must be a string of comma-separated options"),
    ],
)
def test_bad_ensure_mounted_params_are_refused(run_helper, change, message):
    params = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    run = mfs(run_helper, "ensure_mounted", params)
    assert run.exit_code == 2
    assert message in run.error["msg"]


def test_status_and_unmount_take_only_the_mount(run_helper):
    for action in ("status", "ensure_unmounted"):
        run = mfs(run_helper, action, GOOD)
        assert run.exit_code == 2 and run.error["code"] == "unknown_param"
        assert "accepted: mount" in run.error["msg"]


@pytest.mark.parametrize("action, extra", [("ensure_mounted", {"master": MASTER}), ("ensure_unmounted", {})])
def test_mount_path_through_a_symlink_is_refused(run_helper, tmp_path, action, extra):
    # The mount table holds resolved paths, so a mount made through a symlink would be missed.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run = mfs(run_helper, action, {**extra, "mount": str(tmp_path / "link" / "mfs")}, check=True)
    assert run.exit_code == 3 and run.error["code"] == "mount_path_has_symlink"
    assert str(tmp_path / "link") in run.error["msg"]
