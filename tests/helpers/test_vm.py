"""The vm helper run as a subprocess, as root, against a temp node: a tmpfs standing in for
the MooseFS mount, a tiny desktop rootfs, real bind and overlay mounts; and a fake dockerd on a
unix socket for the container actions. Real docker and VNC are the cluster tests' part."""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import FakeDockerHandler, FakeDockerServer, detach_everything_under, mount_points_under

USER = "alice"
DISK = 64 << 20
PASSWORD = "Pa55:word with spaces"
GPU_A = "GPU-0c6a1f2e-1111-2222-3333-444444444444"
GPU_B = "GPU-0c6a1f2e-5555-6666-7777-888888888888"
IMAGE_ID = hashlib.sha256(b"the test desktop image").hexdigest()
MARKER = ".labvm-image.json"
# A well-formed image reference, for the requests refused before anything is looked at.
SOME_REF = {"id": "a" * 64, "images": "/var/lib/labvm/images", "legacy": "/var/lib/labvm/xfce_local"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlays: needs root")
# Starting a container copies the node's static tini into the runtime dir.
needs_tini = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("docker-init", "tini-static")), reason="needs a static tini (docker.io or tini)"
)


def vm(run_helper, action, params, check=False, **kwargs):
    return run_helper("vm", {"action": action, "params": params, "check": check}, **kwargs)


def mounted(path) -> bool:
    return str(path) in mount_points_under(Path(path).parent)


# --- a temp node --------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path):
    """A node with a tmpfs at mfs_mount (so it is a mount point), a desktop image in the
    image store (images/<id>, with its marker), and a data dir. Every mount under tmp_path and every process registered in
    node.processes is cleaned up, whatever the test did."""
    mfs = tmp_path / "mfs"
    mfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "labvm-test-mfs", str(mfs)], check=True)
    images = tmp_path / "images"
    tree = images / IMAGE_ID
    marker = json.dumps({"sha256": IMAGE_ID, "desktop": "minimal"})
    for path, text in {"etc/os-release": "desktop\n", "usr/bin/xterm": "#!/bin/sh\n", MARKER: marker}.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    (tree / "bin").symlink_to("usr/bin")
    for name in ("proc", "sys", "dev", "run", "home", "tmp"):
        (tree / name).mkdir()
    image_ref = {"id": IMAGE_ID, "images": str(images), "legacy": str(tmp_path / "xfce_local")}
    data = tmp_path / "data"
    data.mkdir()
    state = SimpleNamespace(
        root=tmp_path,
        mfs=mfs,
        image_tree=tree,
        image_ref=image_ref,
        data=data,
        vm_dir=data / "vms" / USER,
        user_mfs=mfs / "vms" / USER,
        processes=[],
    )
    state.merge = state.vm_dir / "merge_local"
    state.low = state.vm_dir / "low_local"
    state.disk = state.vm_dir / "disk"
    state.image = state.vm_dir / "disk.ext4"
    state.up = state.disk / "up_local"
    state.work = state.disk / "work_local"
    state.runtime = state.vm_dir / "runtime"
    state.params = lambda version=0, **extra: {
        "user": USER,
        "data_dir": str(data),
        "mfs_mount": str(mfs),
        "version": version,
        "image": image_ref,
        "disk": DISK,
        **extra,
    }
    state.vm_params = lambda **extra: {"user": USER, "data_dir": str(data), **extra}
    try:
        yield state
    finally:
        for process in state.processes:
            process.kill()
            process.wait()
        detach_everything_under(tmp_path)


def make_version(node, version, files):
    directory = node.user_mfs / f"low_mfs.v{version}"
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(text)
    return directory


def stack_up(run_helper, node, version=0):
    run = vm(run_helper, "ensure_stack", node.params(version))
    assert run.exit_code == 0, run.reply
    return run


# --- ensure_stack -------------------------------------------------------------------------


def test_check_mode_on_a_fresh_node_changes_nothing(run_helper, node):
    run = vm(run_helper, "ensure_stack", node.params(), check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["mounted"] is False
    assert not (node.data / "vms").exists()
    assert not (node.mfs / "labvm").exists()
    assert mount_points_under(node.data) == []


def test_stack_shows_both_lowers_and_writes_go_to_the_upper(run_helper, node):
    version_dir = make_version(node, 0, {"home/alice/notes.txt": "from v0\n", "etc/os-release": "v0 wins\n"})
    run = stack_up(run_helper, node)
    assert run.reply["changed"] is True
    disk = run.data.pop("disk")
    assert run.data == {
        "merge_local": str(node.merge),
        "low_local": str(node.low),
        "up_local": str(node.up),
        "work_local": str(node.work),
        "version": 0,
        "version_dir": str(version_dir),
        "mounted": True,
    }
    assert disk["size"] == DISK and disk["mounted"] is True and 0 < disk["used"] < DISK
    assert (node.merge / "home/alice/notes.txt").read_text() == "from v0\n"
    assert (node.merge / "usr/bin/xterm").exists()  # from the image, the lowest layer
    assert (node.merge / "etc/os-release").read_text() == "v0 wins\n"  # the version sits above the image

    (node.merge / "home/alice/new.txt").write_text("written\n")
    assert (node.up / "home/alice/new.txt").read_text() == "written\n"
    assert not (version_dir / "home/alice/new.txt").exists()
    with pytest.raises(OSError) as raised:
        (node.low / "direct.txt").write_text("x")
    assert raised.value.errno == errno.EROFS
    assert (node.user_mfs / "up_mfs").is_dir()
    assert stat.S_IMODE(node.vm_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(node.runtime.stat().st_mode) == 0o700


def test_version_zero_is_created_empty_on_first_use(run_helper, node):
    stack_up(run_helper, node)
    version_dir = node.user_mfs / "low_mfs.v0"
    assert version_dir.is_dir() and list(version_dir.iterdir()) == []
    assert stat.S_IMODE(version_dir.stat().st_mode) == 0o755


def test_a_mounted_stack_is_left_alone(run_helper, node):
    stack_up(run_helper, node)
    for check in (True, False):
        run = vm(run_helper, "ensure_stack", node.params(), check=check)
        assert run.exit_code == 0 and run.reply["changed"] is False and run.data["mounted"] is True
    assert sorted(mount_points_under(node.vm_dir)) == [str(node.disk), str(node.low), str(node.merge)]


def test_status_reports_the_stack(run_helper, node):
    make_version(node, 3, {})
    stack_up(run_helper, node, version=3)
    run = vm(run_helper, "status", node.vm_params(docker_socket=str(node.root / "no-docker.sock")))
    assert run.exit_code == 0 and run.reply["changed"] is False
    assert run.data["stack"] == {
        "merge_local": str(node.merge),
        "merge_local_mounted": True,
        "low_local": str(node.low),
        "low_local_mounted": True,
        "low_local_version": 3,
        "disk": str(node.disk),
        "disk_mounted": True,
    }
    assert run.data["disk"]["size"] == DISK and run.data["disk"]["mounted"] is True
    assert run.data["container"]["exists"] is None and "does not exist" in run.data["container"]["error"]


def test_a_missing_later_version_is_a_precondition(run_helper, node):
    run = vm(run_helper, "ensure_stack", node.params(version=2))
    assert run.exit_code == 3 and run.error["code"] == "version_missing"
    assert "low_mfs.v2" in run.error["msg"]
    assert mount_points_under(node.data) == []


def test_no_desktop_image_is_a_precondition(run_helper, node):
    (node.image_tree / MARKER).unlink()
    run = vm(run_helper, "ensure_stack", node.params())
    assert run.exit_code == 3 and run.error["code"] == "image_missing"
    assert "labvm image push" in run.error["msg"] and IMAGE_ID[:12] in run.error["msg"]
    assert mount_points_under(node.data) == []


def test_an_image_the_node_lacks_is_a_precondition(run_helper, node):
    other = hashlib.sha256(b"another image").hexdigest()
    run = vm(run_helper, "ensure_stack", node.params(image={**node.image_ref, "id": other}))
    assert run.exit_code == 3 and run.error["code"] == "image_missing" and other[:12] in run.error["msg"]
    # A tree under the store named like the id whose marker names another image is not that image.
    shutil.copytree(node.image_tree, node.image_tree.parent / other, symlinks=True)
    run = vm(run_helper, "ensure_stack", node.params(image={**node.image_ref, "id": other}))
    assert run.exit_code == 3 and run.error["code"] == "image_missing"
    assert mount_points_under(node.data) == []


def test_an_image_held_in_the_legacy_tree_is_the_lowest_layer(run_helper, node):
    legacy = Path(node.image_ref["legacy"])
    node.image_tree.rename(legacy)
    (legacy / "usr/bin/legacy-only").write_text("#!/bin/sh\n")
    stack_up(run_helper, node)
    assert (node.merge / "usr/bin/legacy-only").exists()
    overlay = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {node.merge} " in line]
    assert len(overlay) == 1 and f"lowerdir={node.low}:{legacy}," in overlay[0]


def test_mfs_must_be_mounted(run_helper, node, tmp_path):
    plain = tmp_path / "not-a-mount"
    plain.mkdir()
    run = vm(run_helper, "ensure_stack", node.params(mfs_mount=str(plain)))
    assert run.exit_code == 3 and run.error["code"] == "mfs_not_mounted"
    assert not (plain / "labvm").exists()


def test_another_version_under_a_live_overlay_is_a_mismatch(run_helper, node):
    make_version(node, 1, {})
    stack_up(run_helper, node, version=0)
    run = vm(run_helper, "ensure_stack", node.params(version=1))
    assert run.exit_code == 3 and run.error["code"] == "stack_mismatch"
    assert "version 0" in run.error["msg"] and "ensure_stack_unmounted" in run.error["msg"]
    status = vm(run_helper, "status", node.vm_params(docker_socket="/nonexistent.sock"))
    assert status.data["stack"]["low_local_version"] == 0


def test_a_stale_low_bind_without_overlay_is_rebound(run_helper, node):
    make_version(node, 1, {"marker": "v1\n"})
    stack_up(run_helper, node, version=0)
    subprocess.run(["umount", str(node.merge)], check=True)
    run = vm(run_helper, "ensure_stack", node.params(version=1))
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert (node.merge / "marker").read_text() == "v1\n"
    status = vm(run_helper, "status", node.vm_params(docker_socket="/nonexistent.sock"))
    assert status.data["stack"]["low_local_version"] == 1


def test_an_overlay_with_other_options_is_a_mismatch(run_helper, node):
    stack_up(run_helper, node)
    subprocess.run(["umount", str(node.merge)], check=True)
    options = f"lowerdir={node.low}:{node.image_tree},upperdir={node.up},workdir={node.work},redirect_dir=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(node.merge)], check=True)
    run = vm(run_helper, "ensure_stack", node.params())
    assert run.exit_code == 3 and run.error["code"] == "stack_mismatch"
    assert "redirect_dir=on" in run.error["msg"]


def test_something_else_mounted_at_merge_local_is_a_mismatch(run_helper, node):
    stack_up(run_helper, node)
    subprocess.run(["umount", str(node.merge)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(node.merge)], check=True)
    run = vm(run_helper, "ensure_stack", node.params())
    assert run.exit_code == 3 and run.error["code"] == "stack_mismatch"
    assert "not an overlay" in run.error["msg"]


def test_upper_holds_plain_files_after_renames_and_chmods(run_helper, node):
    """What the overlay options are for: the upper must make sense without the overlay."""
    make_version(node, 0, {"srv/project/data.txt": "payload\n", "srv/script.sh": "echo hi\n"})
    stack_up(run_helper, node)
    # redirect_dir=off: a directory from a lower layer cannot be renamed in place...
    with pytest.raises(OSError) as raised:
        os.rename(node.merge / "srv/project", node.merge / "srv/renamed")
    assert raised.value.errno == errno.EXDEV
    # ...so mv copies it, and the upper holds the files themselves.
    subprocess.run(["mv", str(node.merge / "srv/project"), str(node.merge / "srv/renamed")], check=True)
    os.chmod(node.merge / "srv/script.sh", 0o755)  # metacopy=off: a full copy-up
    assert (node.up / "srv/renamed/data.txt").read_text() == "payload\n"
    assert (node.up / "srv/script.sh").read_text() == "echo hi\n"
    for path in (node.up / "srv/renamed", node.up / "srv/script.sh"):
        names = os.listxattr(path, follow_symlinks=False)
        assert not [name for name in names if name in ("trusted.overlay.redirect", "trusted.overlay.metacopy")], names
    whiteout = os.lstat(node.up / "srv/project")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert sorted(os.listdir(node.work)) == ["work"]  # index=off: no index dir


# --- the desktop's disk -------------------------------------------------------------------


def allocated(path) -> int:
    return os.lstat(path).st_blocks * 512


def test_the_upper_lives_on_a_sparse_disk_image_of_the_desktops_size(run_helper, node):
    stack_up(run_helper, node)
    assert node.image.stat().st_size == DISK and stat.S_IMODE(node.image.stat().st_mode) == 0o600
    assert allocated(node.image) < DISK // 4  # sparse: made, not filled
    assert os.stat(node.up).st_dev == os.stat(node.disk).st_dev != os.stat(node.vm_dir).st_dev
    (node.merge / "rootfile").write_text("at /\n")
    assert (node.up / "rootfile").read_text() == "at /\n"


def test_filling_the_disk_ends_in_enospc_in_that_desktop_and_costs_the_node_its_size_at_most(run_helper, node):
    stack_up(run_helper, node)
    chunk = b"x" * (1 << 20)
    with pytest.raises(OSError) as raised:
        with open(node.merge / "fill", "wb") as stream:
            for _ in range(2 * DISK // len(chunk)):
                stream.write(chunk)
                stream.flush()
    assert raised.value.errno == errno.ENOSPC
    assert allocated(node.image) <= DISK
    (node.data / "beside").write_bytes(chunk)  # the node's own disk still takes writes
    os.unlink(node.merge / "fill")
    (node.merge / "after").write_text("room again\n")


def test_a_huge_sparse_file_costs_only_its_blocks(run_helper, node):
    stack_up(run_helper, node)
    with open(node.merge / "sparse", "wb") as stream:
        stream.truncate(1 << 40)
        stream.write(b"tail")
    run = vm(run_helper, "status", node.vm_params(docker_socket="/nonexistent.sock"))
    assert run.data["disk"]["used"] < DISK // 2


def test_an_upper_from_before_disks_moves_onto_the_disk_with_every_file(run_helper, node):
    legacy = node.vm_dir / "up_local"
    (legacy / "data/.hidden").mkdir(parents=True)
    (legacy / "data/.hidden/x").write_text("precious\n")
    os.link(legacy / "data/.hidden/x", legacy / "data/hardlink")
    (legacy / "link").symlink_to("data/.hidden/x")
    os.setxattr(legacy / "data/.hidden/x", "user.note", b"kept")
    os.mknod(legacy / "gone", stat.S_IFCHR | 0o000, 0)  # a whiteout
    (node.vm_dir / "work_local").mkdir()
    os.chmod(node.vm_dir, 0o700)
    make_version(node, 0, {"gone": "deleted by the member\n"})
    stack_up(run_helper, node)
    assert (node.merge / "data/.hidden/x").read_text() == "precious\n"
    assert os.stat(node.up / "data/hardlink").st_ino == os.stat(node.up / "data/.hidden/x").st_ino
    assert os.readlink(node.merge / "link") == "data/.hidden/x"
    assert os.getxattr(node.up / "data/.hidden/x", "user.note") == b"kept"
    assert not (node.merge / "gone").exists()
    assert not legacy.exists() and not (node.vm_dir / "work_local").exists()


def test_a_migration_cut_short_after_the_copy_finishes_without_the_old_upper(run_helper, node):
    stack_up(run_helper, node)
    (node.merge / "new").write_text("on the disk\n")
    vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket="/nonexistent.sock"))
    stale = node.vm_dir / "up_local"  # what a crash before its removal leaves
    stale.mkdir()
    (stale / "new").write_text("stale\n")
    stack_up(run_helper, node)
    assert (node.merge / "new").read_text() == "on the disk\n"
    assert not stale.exists()


def test_an_old_upper_too_big_for_the_disk_is_refused_before_anything_changes(run_helper, node):
    legacy = node.vm_dir / "up_local"
    legacy.mkdir(parents=True)
    (legacy / "big").write_bytes(os.urandom(1 << 20) * 70)
    run = vm(run_helper, "ensure_stack", node.params())
    assert run.exit_code == 3 and run.error["code"] == "disk_too_small"
    assert "labvm resize" in run.error["msg"]
    assert not node.image.exists() and mount_points_under(node.data) == []
    assert (legacy / "big").stat().st_size == 70 << 20


def disk_bytes(node) -> int:
    vfs = os.statvfs(node.disk)
    return vfs.f_blocks * vfs.f_frsize


def test_a_mounted_disk_grows_online_or_at_the_next_mount_and_never_shrinks(run_helper, node):
    stack_up(run_helper, node)
    before = disk_bytes(node)
    run = vm(run_helper, "resize_disk", node.vm_params(size=2 * DISK))
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert node.image.stat().st_size == 2 * DISK and mounted(node.merge)
    if run.data["restart_needed"]:
        # The kernel refused an online resize (no CAP_SYS_RESOURCE here): the next start grows it.
        assert disk_bytes(node) == before
        vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket="/nonexistent.sock"))
        stack_up(run_helper, node)
    assert disk_bytes(node) > before + DISK // 2
    again = vm(run_helper, "resize_disk", node.vm_params(size=2 * DISK))
    assert again.exit_code == 0 and again.reply["changed"] is False
    shrink = vm(run_helper, "resize_disk", node.vm_params(size=DISK))
    assert shrink.exit_code == 3 and shrink.error["code"] == "disk_shrink"


def test_a_stopped_desktops_disk_grows_too_and_a_larger_size_at_start_grows_it(run_helper, node):
    stack_up(run_helper, node)
    vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket="/nonexistent.sock"))
    run = vm(run_helper, "resize_disk", node.vm_params(size=2 * DISK))
    assert run.exit_code == 0 and run.reply["changed"] is True and not mounted(node.disk)
    vm(run_helper, "ensure_stack", node.params(disk=3 * DISK))
    vfs = os.statvfs(node.disk)
    assert vfs.f_blocks * vfs.f_frsize > 2 * DISK


def test_reset_upper_empties_the_upper_on_an_unmounted_disk(run_helper, node):
    stack_up(run_helper, node)
    (node.merge / "published").write_text("x\n")
    vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket="/nonexistent.sock"))
    run = vm(run_helper, "reset_upper", node.vm_params(mfs_mount=str(node.mfs), docker_socket="/nonexistent.sock"))
    assert run.exit_code == 0 and str(node.up) in run.data["emptied"]
    assert not mounted(node.disk)
    stack_up(run_helper, node)
    assert not (node.merge / "published").exists()


# --- ensure_stack_unmounted ---------------------------------------------------------------


def test_unmount_check_mode_then_unmount_then_nothing(run_helper, node):
    stack_up(run_helper, node)
    params = node.vm_params(docker_socket=str(node.root / "no-docker.sock"))
    check = vm(run_helper, "ensure_stack_unmounted", params, check=True)
    assert check.exit_code == 0 and check.reply["changed"] is True
    assert mounted(node.merge) and mounted(node.low)
    run = vm(run_helper, "ensure_stack_unmounted", params)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["merge_local_mounted"] is False and run.data["low_local_mounted"] is False
    assert mount_points_under(node.vm_dir) == []
    again = vm(run_helper, "ensure_stack_unmounted", params)
    assert again.exit_code == 0 and again.reply["changed"] is False
    assert node.image.is_file() and not (node.up).exists()  # the upper is on the disk, unmounted


def test_busy_stack_is_refused_naming_the_process(run_helper, node):
    stack_up(run_helper, node)
    user = subprocess.Popen(["sleep", "60"], cwd=node.merge / "home")
    node.processes.append(user)
    params = node.vm_params(docker_socket=str(node.root / "no-docker.sock"))
    busy = vm(run_helper, "ensure_stack_unmounted", params)
    assert busy.exit_code == 3 and busy.error["code"] == "mount_busy"
    assert busy.error["msg"].startswith(f"mount busy: {node.merge}")
    assert f"{user.pid} (sleep)" in busy.error["msg"]
    assert mounted(node.merge) and mounted(node.low)
    user.kill()
    user.wait()
    run = vm(run_helper, "ensure_stack_unmounted", params)
    assert run.exit_code == 0 and run.reply["changed"] is True


def test_unmount_is_refused_while_the_container_runs(run_helper, node, engine):
    stack_up(run_helper, node)
    engine.add_container(f"labvm-{USER}", labels={"labvm.user": USER}, running=True)
    run = vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket=engine.socket_path))
    assert run.exit_code == 3 and run.error["code"] == "container_running"
    assert mounted(node.merge)


# --- remove_local_layers ------------------------------------------------------------------


def test_local_layers_are_removed_only_when_unmounted(run_helper, node):
    stack_up(run_helper, node)
    (node.merge / "home/file").write_text("x")
    refused = vm(run_helper, "remove_local_layers", node.vm_params())
    assert refused.exit_code == 3 and refused.error["code"] == "stack_mounted"
    assert (node.up / "home/file").exists()
    vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket="/nonexistent.sock"))
    check = vm(run_helper, "remove_local_layers", node.vm_params(), check=True)
    assert check.reply["changed"] is True and node.vm_dir.exists()
    run = vm(run_helper, "remove_local_layers", node.vm_params())
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert not node.vm_dir.exists()
    assert (node.user_mfs / "low_mfs.v0").is_dir()  # MooseFS is never touched
    again = vm(run_helper, "remove_local_layers", node.vm_params())
    assert again.exit_code == 0 and again.reply["changed"] is False


def test_purge_is_refused_while_mounted_then_deletes_only_that_user(run_helper, node):
    stack_up(run_helper, node)
    make_version(node, 1, {"home/alice/work.txt": "data"})
    other = node.mfs / "vms" / "bobby" / "low_mfs.v0"
    other.mkdir(parents=True)
    outside = node.root / "outside.txt"
    outside.write_text("keep")
    (node.user_mfs / "up_mfs" / "link").symlink_to(outside)
    params = {"user": USER, "mfs_mount": str(node.mfs)}
    refused = vm(run_helper, "purge_mfs_data", params)
    assert refused.exit_code == 3 and refused.error["code"] == "in_use" and str(node.low) in refused.error["msg"]
    vm(run_helper, "ensure_stack_unmounted", node.vm_params(docker_socket="/nonexistent.sock"))
    check = vm(run_helper, "purge_mfs_data", params, check=True)
    assert check.reply["changed"] is True and node.user_mfs.exists()
    run = vm(run_helper, "purge_mfs_data", params)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert not node.user_mfs.exists() and other.is_dir() and outside.read_text() == "keep"
    again = vm(run_helper, "purge_mfs_data", params)
    assert again.exit_code == 0 and again.reply["changed"] is False


# --- bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"user": "Alice"}, "'user' must be a user name"),
        ({"user": "1alice"}, "'user' must be a user name"),
        ({"user": "a" * 32}, "'user' must be a user name"),
        ({"user": "../etc"}, "'user' must be a user name"),
        ({"data_dir": "srv/labvm"}, "must be an absolute path"),
        ({"data_dir": "/srv/lab:vm"}, "must not contain ','"),
        ({"image": {**SOME_REF, "images": "/srv/a,b"}}, "must not contain ','"),
        ({"image": {**SOME_REF, "legacy": "/srv/a:b"}}, "must not contain ','"),
        ({"image": {**SOME_REF, "images": "srv/images"}}, "must be an absolute path"),
        ({"image": {**SOME_REF, "legacy": "/srv"}}, "at least 2 directories deep"),
        ({"image": {**SOME_REF, "id": "ab"}}, "'image.id' must be an image id"),
        ({"image": {**SOME_REF, "id": "A" * 64}}, "'image.id' must be an image id"),
        ({"image": "/var/lib/labvm/xfce_local"}, "must be an object with 'id', 'images' and 'legacy'"),
        ({"image": {"id": "a" * 64, "images": "/var/lib/labvm/images"}}, "must be an object with 'id', 'images' and 'legacy'"),
        ({"xfce_local": "/var/lib/labvm/xfce_local"}, "unknown param(s) 'xfce_local'"),
        ({"data_dir": "/"}, "must not be /"),
        ({"version": -1}, "between 0 and"),
        ({"version": True}, "must be an integer"),
        ({"version": "1"}, "must be an integer"),
        ({"colour": "blue"}, "unknown param(s) 'colour'"),
    ],
)
def test_bad_stack_params_are_refused(run_helper, node, override, fragment):
    run = vm(run_helper, "ensure_stack", {**node.params(), **override})
    assert run.exit_code == 2, run.reply
    assert fragment in run.error["msg"]
    assert mount_points_under(node.data) == []


def test_missing_params_and_unknown_actions(run_helper):
    run = vm(run_helper, "ensure_stack", {"user": USER})
    assert run.exit_code == 2 and run.error["code"] == "missing_param"
    run = vm(run_helper, "mount_everything", {})
    assert run.exit_code == 2 and run.error["code"] == "unknown_action"
    assert "ensure_container" in run.error["msg"] and "set_password" in run.error["msg"]
    run = run_helper("vm", raw=b'{"action": "status", "params": ')
    assert run.exit_code == 2 and run.error["code"] == "malformed_request"


# --- a fake dockerd that knows containers -------------------------------------------------

CONTAINER_PATH = re.compile(r"/v1\.\d+/containers/(?P<name>[^/]+)(?P<rest>/[a-z]+)?$")
EXEC_PATH = re.compile(r"/v1\.\d+/exec/(?P<id>[^/]+)/(?P<what>start|json)$")


def frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


class FakeEngineHandler(FakeDockerHandler):
    """Containers and execs, the way dockerd 20.10 answers them (API 1.41)."""

    def do_GET(self):
        engine = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        engine.requests.append(("GET", self.path))
        match = CONTAINER_PATH.fullmatch(url.path)
        if match and match.group("rest") in (None, "/json"):
            container = engine.containers.get(urllib.parse.unquote(match.group("name")))
            if container is None:
                self.answer(404, json.dumps({"message": "No such container"}))
            else:
                self.answer(200, json.dumps(engine.inspect(container)))
            return
        if match and match.group("rest") == "/logs":
            self.raw(200, frame(2, engine.logs.encode()))
            return
        match = EXEC_PATH.fullmatch(url.path)
        if match and match.group("what") == "json":
            self.answer(200, json.dumps({"Running": False, "ExitCode": engine.exec_exit_code}))
            return
        self.answer(404, json.dumps({"message": "page not found"}))

    def do_POST(self):
        engine = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        engine.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        query = dict(urllib.parse.parse_qsl(url.query))
        if re.fullmatch(r"/v1\.\d+/containers/create", url.path):
            name = query["name"]
            if name in engine.containers:
                self.answer(409, json.dumps({"message": "Conflict. The container name is already in use"}))
                return
            config = json.loads(body)
            engine.created.append(config)
            engine.add_container(name, labels=config["Labels"], running=False, body=config)
            self.answer(201, json.dumps({"Id": engine.containers[name]["Id"], "Warnings": []}))
            return
        match = CONTAINER_PATH.fullmatch(url.path)
        if match and match.group("rest") in ("/start", "/stop"):
            container = engine.containers.get(urllib.parse.unquote(match.group("name")))
            if container is None:
                self.answer(404, json.dumps({"message": "No such container"}))
                return
            starting = match.group("rest") == "/start"
            engine.actions.append((match.group("rest")[1:], query))
            if container["running"] == starting:
                self.raw(304, b"")
                return
            container["running"] = starting
            if starting:
                engine.on_start(container)
            self.raw(204, b"")
            return
        if match and match.group("rest") == "/exec":
            container = engine.containers.get(urllib.parse.unquote(match.group("name")))
            if container is None or not container["running"]:
                self.answer(409, json.dumps({"message": "Container is not running"}))
                return
            engine.execs.append(json.loads(body))
            self.answer(201, json.dumps({"Id": f"exec{len(engine.execs)}"}))
            return
        match = EXEC_PATH.fullmatch(url.path)
        if match and match.group("what") == "start":
            engine.on_exec(engine.execs[-1])
            self.raw(200, frame(1, engine.exec_output.encode()) + frame(2, b"done\n"))
            return
        self.answer(404, json.dumps({"message": "page not found"}))

    def do_DELETE(self):
        engine = self.server.fake
        engine.requests.append(("DELETE", self.path))
        match = CONTAINER_PATH.fullmatch(urllib.parse.urlsplit(self.path).path)
        name = urllib.parse.unquote(match.group("name")) if match else ""
        container = engine.containers.get(name)
        if container is None:
            self.answer(404, json.dumps({"message": "No such container"}))
        elif container["running"]:
            self.answer(409, json.dumps({"message": "You cannot remove a running container"}))
        else:
            del engine.containers[name]
            self.raw(204, b"")

    def raw(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.docker.raw-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeEngine:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.requests, self.created, self.actions, self.execs = [], [], [], []
        self.containers = {}
        self.logs = "labvm-init: something went wrong\n"
        self.exec_exit_code = 0
        self.exec_output = "labvm-init: password applied\n"
        self.on_start = lambda container: None
        self.on_exec = lambda config: None
        self.server = FakeDockerServer(socket_path, FakeEngineHandler)
        self.server.fake = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_container(self, name, labels, running, body=None):
        digest = hashlib.sha256(name.encode() + str(time.time()).encode()).hexdigest()
        self.containers[name] = {"Id": digest, "Name": name, "labels": labels, "running": running, "body": body}

    @staticmethod
    def inspect(container):
        running = container["running"]
        return {
            "Id": container["Id"],
            "Name": "/" + container["Name"],
            "Config": {"Labels": container["labels"]},
            "State": {
                "Status": "running" if running else "exited",
                "Running": running,
                "Restarting": False,
                "StartedAt": "2025-01-02T03:04:05.123456789Z" if running else "0001-01-01T00:00:00Z",
            },
        }

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def engine():
    directory = tempfile.mkdtemp(prefix="labvm-engine-")
    fake = FakeEngine(os.path.join(directory, "docker.sock"))
    yield fake
    fake.stop()
    shutil.rmtree(directory)


@pytest.fixture
def vnc():
    """A TCP listener on 127.0.0.1 that greets like a VNC server once `greet` is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    state = SimpleNamespace(port=listener.getsockname()[1], greet=threading.Event(), stopped=False)

    def serve():
        while not state.stopped:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                if state.greet.is_set():
                    connection.sendall(b"RFB 003.008\n")

    threading.Thread(target=serve, daemon=True).start()
    yield state
    state.stopped = True
    listener.close()


def full_spec(**overrides):
    spec = {
        "name": f"labvm-{USER}",
        "image": "labvm/base:0123456789ab",
        "hostname": "alice-desktop",
        "uid": 2000,
        "env": {"TZ": "Europe/Berlin"},
        "labels": {"labvm.node": "n1"},
        "cpus": 1.5,
        "cpuset": "0-3",
        "memory": 8 * 2**30,
        "shm": 2**30,
        "pids": 4096,
        "io_weight": 500,
        "io_read_bps": 100 * 2**20,
        "io_write_bps": 50 * 2**20,
        "io_device": "/dev/vda",
        "gpus": [GPU_A, GPU_B],
        "ports": {"vnc": 20000, "ssh": 20001},
        "bind_address": "10.213.0.11",
        "vnc_geometry": "1920x1080",
        "desktop_cmd": "twm & xterm",
    }
    return {**spec, **overrides}


def minimal_spec(**overrides):
    spec = {
        "name": f"labvm-{USER}",
        "image": "labvm/base:0123456789ab",
        "hostname": "alice",
        "uid": 2000,
        "memory": 2**30,
        "ports": {"vnc": 20000},
        "bind_address": "127.0.0.1",
        "desktop_cmd": "xterm",
    }
    return {**spec, **overrides}


# --- the create body, as a pure function --------------------------------------------------


def test_create_body_from_a_full_spec(bundle):
    spec = bundle.spec.container_spec("spec", full_spec())
    body = bundle.container.container_create_body(USER, spec, "/var/lib/labvm/vms/alice/merge_local", "/rt")
    host = body["HostConfig"]
    # The root is the overlay: the labvm runtime takes it from the sentinel mount.
    assert host["Runtime"] == "labvm"
    assert host["Binds"] == ["/var/lib/labvm/vms/alice/merge_local:/.labvm-rootfs:ro", "/rt:/run/labvm:ro"]
    assert host["Tmpfs"] == {"/run": "rw,nosuid,nodev,mode=755"}
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
    assert host["Init"] is False  # tini comes from /run/labvm: docker's would be in docker's own root
    assert host["Memory"] == host["MemorySwap"] == 8 * 2**30
    assert host["NanoCpus"] == 1_500_000_000 and host["CpusetCpus"] == "0-3"
    assert host["ShmSize"] == 2**30 and host["PidsLimit"] == 4096
    assert host["BlkioWeight"] == 500
    assert host["BlkioDeviceReadBps"] == [{"Path": "/dev/vda", "Rate": 100 * 2**20}]
    assert host["BlkioDeviceWriteBps"] == [{"Path": "/dev/vda", "Rate": 50 * 2**20}]
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "DeviceIDs": [GPU_A, GPU_B], "Capabilities": [["gpu"]]}]
    assert host["PortBindings"] == {
        "5901/tcp": [{"HostIp": "10.213.0.11", "HostPort": "20000"}],
        "22/tcp": [{"HostIp": "10.213.0.11", "HostPort": "20001"}],
    }
    assert host["RestartPolicy"] == {"Name": "no", "MaximumRetryCount": 0}
    assert body["ExposedPorts"] == {"5901/tcp": {}, "22/tcp": {}}
    assert body["Entrypoint"] == ["/run/labvm/tini", "--", "/run/labvm/init"] and body["User"] == "0:0"
    assert body["Image"] == "labvm/base:0123456789ab" and body["Hostname"] == "alice-desktop"
    assert body["Labels"] == {"labvm.node": "n1", "labvm.user": USER, "labvm.spec-hash": bundle.container.spec_hash(spec)}
    env = dict(item.split("=", 1) for item in body["Env"])
    assert env == {
        "TZ": "Europe/Berlin",
        "NVIDIA_DRIVER_CAPABILITIES": "all",
        "LABVM_USER": USER,
        "LABVM_UID": "2000",
        "LABVM_VNC_GEOMETRY": "1920x1080",
        "LABVM_DESKTOP_CMD": "twm & xterm",
        "LABVM_SSH": "1",
        "LABVM_HTTPS": "0",
        "LABVM_VNC_LISTEN": "published",
    }


def test_create_body_from_a_minimal_spec_sets_no_optional_limits(bundle):
    spec = bundle.spec.container_spec("spec", minimal_spec())
    host = bundle.container.container_create_body(USER, spec, "/m", "/rt")["HostConfig"]
    assert set(host) == {"Init", "Runtime", "Binds", "Tmpfs", "LogConfig", "Memory", "MemorySwap", "PortBindings",
                         "RestartPolicy", "NetworkMode", "CapDrop"}
    # Every desktop sits on the walled-off network and lacks the capabilities a member could
    # turn against the node or a neighbour, whatever else its spec says.
    assert host["NetworkMode"] == "labvm"
    assert set(host["CapDrop"]) >= {"NET_RAW", "MKNOD", "SETFCAP", "AUDIT_WRITE"}
    assert host["PortBindings"] == {"5901/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20000"}]}
    env = dict(item.split("=", 1) for item in bundle.container.container_create_body(USER, spec, "/m", "/rt")["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and env["LABVM_SSH"] == "0"
    assert env["LABVM_VNC_GEOMETRY"] == "1280x800"


def test_spec_hash_ignores_spelled_out_defaults_and_follows_changes(bundle):
    spec = bundle.spec.container_spec
    base = bundle.container.spec_hash(spec("spec", minimal_spec()))
    explicit = minimal_spec(env={}, labels={}, cpus=None, gpus=[], vnc_geometry="1280x800", ports={"vnc": 20000, "ssh": None})
    assert bundle.container.spec_hash(spec("spec", explicit)) == base
    assert bundle.container.spec_hash(spec("spec", minimal_spec(memory=2**31))) != base
    assert re.fullmatch(r"[0-9a-f]{64}", base)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"memory": 1024}, "'memory' must be an integer from"),
        ({"memory": None}, "'memory' is required"),
        ({"env": {"LABVM_USER": "root"}}, "is set by the helper"),
        ({"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "is set by the helper"),
        ({"labels": {"labvm.spec-hash": "x"}}, "is set by the helper"),
        ({"labels": {"labvm.user": 5}}, "string values"),
        ({"gpus": [GPU_A, GPU_A]}, "distinct"),
        ({"gpus": ["GPU-1; rm -rf /"]}, "GPU UUIDs"),
        ({"ports": {"vnc": 20000, "ssh": 20000}}, "different ports"),
        ({"ports": {"ssh": 22}}, '"vnc": PORT'),
        ({"bind_address": "node1"}, "an IP address"),
        ({"io_read_bps": 10, "io_device": None}, "'io_device' is required"),
        ({"io_device": "/etc/../dev/sda"}, "block device path"),
        ({"cpus": 0}, "number of CPUs"),
        ({"cpuset": "0-3;"}, "a cpuset"),
        ({"image": "Labvm/Base"}, "docker image name with a tag"),
        ({"vnc_geometry": "big"}, "WIDTHxHEIGHT"),
        ({"uid": 0}, "'uid' must be an integer from 1000"),
        ({"desktop_cmd": "  "}, "non-empty shell command"),
        ({"volumes": ["/:/host"]}, "unknown key(s) 'volumes'"),
    ],
)
def test_bad_specs_are_refused(bundle, override, fragment):
    with pytest.raises(bundle.contract.BadRequest) as raised:
        bundle.spec.container_spec("spec", {**full_spec(), **override})
    assert fragment in raised.value.msg



def test_static_elf_detection(bundle, tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert not bundle.runtime_dir.is_static_elf(str(script))
    assert not bundle.runtime_dir.is_static_elf(sys.executable)  # dynamically linked
    assert not bundle.runtime_dir.is_static_elf(str(tmp_path / "missing"))
    static = [path for path in ("/usr/bin/tini-static", "/usr/bin/docker-init") if os.path.exists(path)]
    for path in static:
        assert bundle.runtime_dir.is_static_elf(os.path.realpath(path))


def test_demultiplexing_docker_streams(bundle):
    data = frame(1, b"out1 ") + frame(2, b"err") + frame(1, b"out2")
    assert bundle.docker.demux_stream(data) == (b"out1 out2", b"err")
    assert bundle.docker.demux_stream(b"plain tty output") == (b"plain tty output", b"")
    assert bundle.docker.demux_stream(b"") == (b"", b"")


# --- ensure_container through the fake dockerd --------------------------------------------


def container_params(node, engine, spec=None, **extra):
    return node.vm_params(
        spec=spec or minimal_spec(),
        secrets={"password": PASSWORD},
        docker_socket=engine.socket_path,
        **extra,
    )


def assert_no_secret(run):
    for text in (run.stdout, run.stderr):
        assert PASSWORD not in text
        assert "<redacted>" not in text  # nothing even tried to show it


def test_container_needs_the_stack(run_helper, node, engine):
    run = vm(run_helper, "ensure_container", container_params(node, engine))
    assert run.exit_code == 3 and run.error["code"] == "stack_not_mounted"
    assert engine.created == []


@needs_tini
def test_container_is_created_started_and_the_secret_removed(run_helper, bundle, node, engine, vnc):
    stack_up(run_helper, node)
    seen = {}

    def on_start(container):
        secret = node.runtime / "secret"
        seen["secret"] = secret.read_text()
        seen["mode"] = stat.S_IMODE(secret.stat().st_mode)
        vnc.greet.set()

    engine.on_start = on_start
    spec = minimal_spec(ports={"vnc": vnc.port})
    run = vm(run_helper, "ensure_container", container_params(node, engine, spec))
    assert run.exit_code == 0, run.reply
    assert run.reply["changed"] is True
    assert run.data["created"] is True and run.data["started"] is True
    assert run.data["container"]["running"] is True and run.data["vnc"]["ready"] is True
    assert seen == {"secret": PASSWORD + "\n", "mode": 0o600}
    assert not (node.runtime / "secret").exists()
    assert_no_secret(run)

    (body,) = engine.created
    assert PASSWORD not in json.dumps(body)
    binds = body["HostConfig"]["Binds"]
    assert binds == [f"{node.merge}:/.labvm-rootfs:ro", f"{node.runtime}:/run/labvm:ro"]
    assert body["HostConfig"]["Runtime"] == "labvm"
    assert body["Labels"]["labvm.spec-hash"] == run.data["spec_hash"]
    assert sorted(os.listdir(node.runtime)) == ["apply-password", "init", "labvm_web_auth.py", "tini"]
    for name in ("init", "apply-password", "tini"):
        assert stat.S_IMODE((node.runtime / name).stat().st_mode) == 0o700
    assert stat.S_IMODE((node.runtime / "labvm_web_auth.py").stat().st_mode) == 0o600
    assert bundle.runtime_dir.is_static_elf(str(node.runtime / "tini"))
    assert stat.S_IMODE(node.runtime.stat().st_mode) == 0o700

    again = vm(run_helper, "ensure_container", container_params(node, engine, spec))
    assert again.exit_code == 0 and again.reply["changed"] is False
    assert len(engine.created) == 1 and [action for action, _ in engine.actions] == ["start"]


def test_check_mode_creates_nothing(run_helper, node, engine):
    stack_up(run_helper, node)
    run = vm(run_helper, "ensure_container", container_params(node, engine), check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["container"]["exists"] is False
    assert engine.created == [] and engine.actions == []
    assert sorted(os.listdir(node.runtime)) == []


@needs_tini
def test_a_container_from_another_spec_is_not_touched(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    vnc.greet.set()
    spec = minimal_spec(ports={"vnc": vnc.port})
    assert vm(run_helper, "ensure_container", container_params(node, engine, spec)).exit_code == 0
    run = vm(run_helper, "ensure_container", container_params(node, engine, {**spec, "memory": 2**31}))
    assert run.exit_code == 3 and run.error["code"] == "container_differs"
    assert "remove_container" in run.error["msg"]
    assert len(engine.created) == 1


@needs_tini
def test_a_stopped_container_of_another_spec_or_form_is_replaced(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    vnc.greet.set()
    engine.add_container(f"labvm-{USER}", labels={"labvm.user": USER, "labvm.spec-hash": "older-form"}, running=False)
    spec = minimal_spec(ports={"vnc": vnc.port})
    run = vm(run_helper, "ensure_container", container_params(node, engine, spec))
    assert run.exit_code == 0, run.reply
    assert run.data["created"] is True and run.data["started"] is True
    (body,) = engine.created
    assert body["HostConfig"]["Runtime"] == "labvm" and body["Labels"]["labvm.spec-hash"] == run.data["spec_hash"]


@needs_tini
def test_a_stopped_container_is_started_with_the_password_waiting(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    vnc.greet.set()
    spec = minimal_spec(ports={"vnc": vnc.port})
    vm(run_helper, "ensure_container", container_params(node, engine, spec))
    engine.containers[f"labvm-{USER}"]["running"] = False
    seen = []
    engine.on_start = lambda container: seen.append((node.runtime / "secret").exists())
    run = vm(run_helper, "ensure_container", container_params(node, engine, spec))
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["created"] is False and run.data["started"] is True
    assert seen == [True] and not (node.runtime / "secret").exists()
    assert len(engine.created) == 1


@needs_tini
def test_vnc_that_never_answers_fails_and_removes_the_secret(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    spec = minimal_spec(ports={"vnc": vnc.port})  # the listener accepts but never greets
    run = vm(run_helper, "ensure_container", container_params(node, engine, spec, vnc_wait_s=1))
    assert run.exit_code == 1 and run.error["code"] == "vnc_not_listening"
    assert "something went wrong" in run.error["msg"]  # the container's log is quoted
    assert not (node.runtime / "secret").exists()
    assert_no_secret(run)


@needs_tini
def test_a_container_that_exits_at_start_fails_at_once(run_helper, node, engine, vnc):
    stack_up(run_helper, node)

    def exits(container):
        container["running"] = False

    engine.on_start = exits
    started = time.monotonic()
    run = vm(run_helper, "ensure_container", container_params(node, engine, minimal_spec(ports={"vnc": vnc.port})))
    assert run.exit_code == 1 and run.error["code"] == "container_exited"
    assert time.monotonic() - started < 20
    assert not (node.runtime / "secret").exists()


def test_a_same_named_container_of_someone_else_is_refused(run_helper, node, engine):
    stack_up(run_helper, node)
    engine.add_container(f"labvm-{USER}", labels={}, running=True)
    run = vm(run_helper, "ensure_container", container_params(node, engine))
    assert run.exit_code == 3 and run.error["code"] == "container_not_ours"


def test_spec_name_must_match_the_user(run_helper, node, engine):
    run = vm(run_helper, "ensure_container", container_params(node, engine, minimal_spec(name="labvm-bob")))
    assert run.exit_code == 2 and "'labvm-alice'" in run.error["msg"]
    run = vm(run_helper, "ensure_container", container_params(node, engine, minimal_spec(labels={"labvm.user": "bob"})))
    assert run.exit_code == 2 and "label 'labvm.user' must be 'alice'" in run.error["msg"]


@needs_tini
def test_data_dir_is_found_from_the_mounted_stack(run_helper, node, engine, vnc):
    params = {"user": USER, "secrets": {"password": PASSWORD}, "docker_socket": engine.socket_path}
    spec = minimal_spec(ports={"vnc": vnc.port}, labels={"labvm.user": USER})
    missing = vm(run_helper, "ensure_container", {**params, "spec": spec})
    assert missing.exit_code == 3 and missing.error["code"] == "stack_not_mounted"
    stack_up(run_helper, node)
    vnc.greet.set()
    run = vm(run_helper, "ensure_container", {**params, "spec": spec})
    assert run.exit_code == 0, run.reply
    assert f"{node.runtime}:/run/labvm:ro" in engine.created[0]["HostConfig"]["Binds"]
    password = vm(run_helper, "set_password", params)
    assert password.exit_code == 0 and password.reply["changed"] is True


@pytest.mark.parametrize(
    "secrets, fragment",
    [
        ({}, "'password' must be a string"),
        ({"password": ""}, "'password' must be a string"),
        ({"password": "two\nlines"}, "control characters"),
        ({"password": "hunter2", "token": "hunter3"}, "unknown key(s) 'token'"),
        ("hunter2", "must be an object"),
    ],
)
def test_bad_secrets_are_refused_without_showing_them(run_helper, node, engine, secrets, fragment):
    params = {**container_params(node, engine), "secrets": secrets}
    run = vm(run_helper, "ensure_container", params)
    assert run.exit_code == 2 and fragment in run.error["msg"]
    assert "hunter2" not in run.stdout and "two\nlines" not in run.stdout


# --- set_password -------------------------------------------------------------------------


@needs_tini
def test_set_password_runs_apply_password_with_the_secret_in_place(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    vnc.greet.set()
    vm(run_helper, "ensure_container", container_params(node, engine, minimal_spec(ports={"vnc": vnc.port})))
    seen = []
    engine.on_exec = lambda config: seen.append((node.runtime / "secret").read_text())
    params = node.vm_params(secrets={"password": "new password"}, docker_socket=engine.socket_path)
    run = vm(run_helper, "set_password", params)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert seen == ["new password\n"]
    assert engine.execs[-1]["Cmd"] == ["/run/labvm/apply-password"] and engine.execs[-1]["User"] == "0:0"
    assert not (node.runtime / "secret").exists()
    assert "new password" not in run.stdout + run.stderr

    engine.exec_exit_code = 1
    engine.exec_output = "labvm-init: chpasswd failed\n"
    failed = vm(run_helper, "set_password", params)
    assert failed.exit_code == 1 and failed.error["code"] == "password_not_applied"
    assert "chpasswd failed" in failed.error["msg"]
    assert not (node.runtime / "secret").exists()


def test_set_password_needs_a_running_container(run_helper, node, engine):
    params = node.vm_params(secrets={"password": "pw"}, docker_socket=engine.socket_path)
    run = vm(run_helper, "set_password", params)
    assert run.exit_code == 3 and run.error["code"] == "container_not_running"
    assert engine.execs == []


# --- stop, remove, status -----------------------------------------------------------------


@needs_tini
def test_stop_remove_and_status(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    vnc.greet.set()
    vm(run_helper, "ensure_container", container_params(node, engine, minimal_spec(ports={"vnc": vnc.port})))
    socket_param = {"docker_socket": engine.socket_path}

    status = vm(run_helper, "status", node.vm_params(**socket_param))
    container = status.data["container"]
    assert container["exists"] is True and container["running"] is True and container["error"] is None
    assert container["spec_hash"] and container["started_at"].startswith("2025-01-02")
    assert status.data["stack"]["merge_local_mounted"] is True

    check = vm(run_helper, "stop_container", {"user": USER, "timeout": 7, **socket_param}, check=True)
    assert check.reply["changed"] is True and engine.containers[f"labvm-{USER}"]["running"] is True
    stop = vm(run_helper, "stop_container", {"user": USER, "timeout": 7, **socket_param})
    assert stop.exit_code == 0 and stop.reply["changed"] is True
    assert engine.actions[-1] == ("stop", {"t": "7"})
    assert stop.data["container"]["running"] is False
    again = vm(run_helper, "stop_container", {"user": USER, **socket_param})
    assert again.exit_code == 0 and again.reply["changed"] is False

    removed = vm(run_helper, "remove_container", {"user": USER, **socket_param})
    assert removed.exit_code == 0 and removed.reply["changed"] is True
    assert f"labvm-{USER}" not in engine.containers
    assert mounted(node.merge)  # the layers are not the container's to touch
    gone = vm(run_helper, "remove_container", {"user": USER, **socket_param})
    assert gone.exit_code == 0 and gone.reply["changed"] is False
    status = vm(run_helper, "status", node.vm_params(**socket_param))
    assert status.data["container"]["exists"] is False


@needs_tini
def test_removing_a_running_container_stops_it_first(run_helper, node, engine, vnc):
    stack_up(run_helper, node)
    vnc.greet.set()
    vm(run_helper, "ensure_container", container_params(node, engine, minimal_spec(ports={"vnc": vnc.port})))
    check = vm(run_helper, "remove_container", {"user": USER, "docker_socket": engine.socket_path}, check=True)
    assert check.reply["changed"] is True and f"labvm-{USER}" in engine.containers
    run = vm(run_helper, "remove_container", {"user": USER, "timeout": 5, "docker_socket": engine.socket_path})
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert engine.actions[-1] == ("stop", {"t": "5"})  # a docker stop, not a kill
    assert f"labvm-{USER}" not in engine.containers


def test_docker_not_answering_is_temporary(run_helper, node, tmp_path):
    dead = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead))
    listener.close()  # a socket file nobody listens on: connection refused
    run = vm(run_helper, "stop_container", {"user": USER, "docker_socket": str(dead)})
    assert run.exit_code == 75 and run.error["code"] == "docker_unavailable" and run.error["retryable"] is True


# --- the init script ----------------------------------------------------------------------


def test_init_scripts_are_valid_posix_sh(bundle, tmp_path):
    for name, text in (("init", bundle.runtime_dir.INIT_SCRIPT), ("apply-password", bundle.runtime_dir.APPLY_PASSWORD_SCRIPT)):
        path = tmp_path / name
        path.write_text(text)
        subprocess.run(["sh", "-n", str(path)], check=True)
        if shutil.which("dash"):
            subprocess.run(["dash", "-n", str(path)], check=True)


FAKE_TOOLS = {
    # getent passwd/group for the user and a sudo group; everything the script asks about exists.
    "getent": 'case "$1" in passwd) echo "alice:x:2000:2000::$FAKE_HOME:/bin/bash";;\n'
              'group) case "$2" in sudo) echo "sudo:x:27:alice";; *) echo "$2:x:2000:";; esac;; esac\n',
    "id": 'echo "alice sudo"\n',
    "chpasswd": 'cat > "$FAKE_LOG/chpasswd.stdin"\n',
    "tigervncpasswd": '[ "$1" = -f ] || exit 9\nprintf "obfuscated:"; cat\n',
    "chown": 'echo "$@" > "$FAKE_LOG/chown.args"\n',
    "groupadd": "exit 1\n",
    "useradd": "exit 1\n",
    "usermod": "exit 1\n",
}


def init_runtime(bundle, tmp_path, fake_bin) -> tuple[Path, Path, Path]:
    """runtime (init and apply-password in it), home and logs dirs, and FAKE_TOOLS installed."""
    runtime, home, logs = tmp_path / "runtime", tmp_path / "home", tmp_path / "logs"
    for directory in (runtime, home, logs):
        directory.mkdir()
    (runtime / "init").write_text(bundle.runtime_dir.INIT_SCRIPT)
    (runtime / "apply-password").write_text(bundle.runtime_dir.APPLY_PASSWORD_SCRIPT)
    for name in ("init", "apply-password"):
        (runtime / name).chmod(0o700)
    for name, body in FAKE_TOOLS.items():
        fake_bin.install(name, body)
    return runtime, home, logs


def test_apply_password_feeds_the_secret_only_through_stdin(bundle, tmp_path, fake_bin):
    runtime, home, logs = init_runtime(bundle, tmp_path, fake_bin)
    (runtime / "secret").write_text(PASSWORD + "\n")
    env = {
        "PATH": f"{fake_bin.path}:/usr/bin:/bin",
        "LABVM_RUNTIME": str(runtime),
        "LABVM_USER": USER,
        "LABVM_UID": "2000",
        "FAKE_HOME": str(home),
        "FAKE_LOG": str(logs),
    }
    traced = subprocess.run(["sh", "-x", str(runtime / "apply-password")], env=env, capture_output=True, text=True)
    assert traced.returncode == 0, traced.stderr
    assert (logs / "chpasswd.stdin").read_text() == f"{USER}:{PASSWORD}\n"
    assert (home / ".vnc/passwd").read_text() == f"obfuscated:{PASSWORD}\n"
    assert stat.S_IMODE((home / ".vnc/passwd").stat().st_mode) == 0o600
    assert (logs / "chown.args").read_text().split() == [f"{USER}:", str(home / ".vnc"), str(home / ".vnc/passwd")]
    # Even a shell trace of every command shows no password: it only ever travels in files.
    assert PASSWORD not in traced.stdout + traced.stderr

    (runtime / "secret").unlink()
    missing = subprocess.run([str(runtime / "apply-password")], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "no password waiting" in missing.stderr


# --- the owner record and the member id ---------------------------------------------------

MEMBER, OTHER_MEMBER = "0123456789abcdef" * 2, "f" * 32


def owner_file(mfs: Path) -> Path:
    return mfs / "vms" / USER / "owner.json"


def test_set_owner_records_the_member_and_a_switch_keeps_it(run_helper, tmp_path):
    mfs = tmp_path / "mfs"
    params = {"user": USER, "mfs_mount": str(mfs)}
    run = vm(run_helper, "set_owner", {**params, "node": "n1", "member": MEMBER})
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert json.loads(owner_file(mfs).read_text())["member"] == MEMBER
    assert vm(run_helper, "set_owner", {**params, "node": "n1", "member": MEMBER}).reply["changed"] is False
    # A switch names the new node and no member: whose files they are does not change.
    moved = vm(run_helper, "set_owner", {**params, "node": "n2", "op": 7})
    assert moved.reply["changed"] is True and moved.data["member"] == MEMBER
    assert vm(run_helper, "owner", params).data["owner"] | {"since": 0} == {"node": "n2", "op": 7, "member": MEMBER, "since": 0}
    # An adopting create gives the files a new member.
    assert vm(run_helper, "set_owner", {**params, "node": "n2", "op": 7, "member": OTHER_MEMBER}).reply["changed"] is True
    assert vm(run_helper, "owner", params).data["owner"]["member"] == OTHER_MEMBER


def test_release_keeps_whose_files_they_are_with_no_node(run_helper, tmp_path):
    mfs = tmp_path / "mfs"
    params = {"user": USER, "mfs_mount": str(mfs)}
    vm(run_helper, "set_owner", {**params, "node": "n1", "member": MEMBER})
    checked = vm(run_helper, "release_owner", params, check=True)
    assert checked.reply["changed"] is True and json.loads(owner_file(mfs).read_text())["node"] == "n1"
    released = vm(run_helper, "release_owner", params)
    assert released.reply["changed"] is True
    record = vm(run_helper, "owner", params).data["owner"]
    assert record["node"] is None and record["member"] == MEMBER
    assert vm(run_helper, "release_owner", params).reply["changed"] is False


def test_release_of_a_record_without_a_member_removes_it_as_before(run_helper, tmp_path):
    mfs = tmp_path / "mfs"
    owner_file(mfs).parent.mkdir(parents=True)
    owner_file(mfs).write_text(json.dumps({"node": "n1", "op": None, "since": 1.0}) + "\n")
    run = vm(run_helper, "release_owner", {"user": USER, "mfs_mount": str(mfs)})
    assert run.reply["changed"] is True and not owner_file(mfs).exists()


@pytest.mark.parametrize("member", ["F" * 32, "a" * 31, "a" * 33, "../" + "a" * 29, 12])
def test_a_malformed_member_id_is_a_bad_request(run_helper, tmp_path, member):
    run = vm(run_helper, "set_owner", {"user": USER, "mfs_mount": str(tmp_path / "mfs"), "node": "n1", "member": member})
    assert run.exit_code == 2 and run.error["code"] == "bad_param"
    assert not owner_file(tmp_path / "mfs").exists()


def test_a_released_record_is_claimed_by_the_next_node_keeping_its_member(bundle, tmp_path):
    mfs = str(tmp_path / "mfs")
    bundle.owner.write_owner(mfs, USER, None, None, MEMBER)
    bundle.owner.claim_or_refuse(mfs, USER, "n2", check=True)
    assert bundle.owner.read_owner(mfs, USER)["node"] is None  # check mode changes nothing
    bundle.owner.claim_or_refuse(mfs, USER, "n2", check=False)
    assert {k: bundle.owner.read_owner(mfs, USER)[k] for k in ("node", "member")} == {"node": "n2", "member": MEMBER}
    with pytest.raises(bundle.contract.PreconditionFailed, match="belongs to node 'n2'"):
        bundle.owner.claim_or_refuse(mfs, USER, "n1", check=False)


def test_init_never_takes_over_an_account_of_the_image(bundle, tmp_path, fake_bin):
    """A member named like a system account (an image built elsewhere, a name from an older
    rule) would otherwise get that account, its files, and sudo on top."""
    runtime, logs = tmp_path / "runtime", tmp_path / "logs"
    runtime.mkdir()
    logs.mkdir()
    (runtime / "init").write_text(bundle.runtime_dir.INIT_SCRIPT)
    (runtime / "init").chmod(0o700)
    tools = {
        "getent": 'case "$1" in passwd) echo "tcpdump:x:104:109::/nonexistent:/usr/sbin/nologin";; group) echo "tcpdump:x:109:";; esac\n',
        "useradd": 'echo useradd >> "$FAKE_LOG/called"\n',
        "usermod": 'echo usermod >> "$FAKE_LOG/called"\n',
        "groupadd": 'echo groupadd >> "$FAKE_LOG/called"\n',
        "chpasswd": 'echo chpasswd >> "$FAKE_LOG/called"\n',
    }
    for name, body in tools.items():
        fake_bin.install(name, body)
    env = {"PATH": f"{fake_bin.path}:/usr/bin:/bin", "LABVM_RUNTIME": str(runtime), "LABVM_USER": "tcpdump",
           "LABVM_UID": "2000", "FAKE_LOG": str(logs)}
    run = subprocess.run([str(runtime / "init")], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "already has a system account tcpdump (uid 104)" in run.stderr
    assert not (logs / "called").exists()


def test_init_never_puts_a_member_into_a_system_group_of_the_same_name(bundle, tmp_path, fake_bin):
    runtime, logs = tmp_path / "runtime", tmp_path / "logs"
    runtime.mkdir()
    logs.mkdir()
    (runtime / "init").write_text(bundle.runtime_dir.INIT_SCRIPT)
    (runtime / "init").chmod(0o700)
    fake_bin.install("getent", 'case "$1" in group) echo "staff:x:50:";; esac\n')
    for name in ("useradd", "usermod", "groupadd"):
        fake_bin.install(name, f'echo {name} >> "$FAKE_LOG/called"\n')
    env = {"PATH": f"{fake_bin.path}:/usr/bin:/bin", "LABVM_RUNTIME": str(runtime), "LABVM_USER": "staff",
           "LABVM_UID": "2000", "FAKE_LOG": str(logs)}
    run = subprocess.run([str(runtime / "init")], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "system group staff (gid 50)" in run.stderr
    assert not (logs / "called").exists()


def test_init_keeps_an_earlier_members_account_of_the_same_name(bundle, tmp_path, fake_bin):
    """Adopted files hold the account an earlier member of that name had, with its uid: it is
    used as it is (the files are owned by it), not refused as a system account."""
    runtime, logs = tmp_path / "runtime", tmp_path / "logs"
    runtime.mkdir()
    logs.mkdir()
    (runtime / "init").write_text(bundle.runtime_dir.INIT_SCRIPT)
    (runtime / "init").chmod(0o700)
    fake_bin.install("getent", 'case "$1" in passwd) echo "bob:x:2000:2000::/home/bob:/bin/bash";;\n'
                               'group) case "$2" in sudo) echo "sudo:x:27:bob";; *) echo "$2:x:2000:";; esac;; esac\n')
    fake_bin.install("id", 'echo "bob sudo"\n')
    for name in ("useradd", "usermod", "groupadd"):
        fake_bin.install(name, f'echo {name} >> "$FAKE_LOG/called"\n')
    env = {"PATH": f"{fake_bin.path}:/usr/bin:/bin", "LABVM_RUNTIME": str(runtime), "LABVM_USER": "bob",
           "LABVM_UID": "2001", "FAKE_LOG": str(logs)}
    run = subprocess.run([str(runtime / "init"), "--apply-password"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "no password waiting" in run.stderr, run.stderr
    assert "system account" not in run.stderr and not (logs / "called").exists()


@needs_tini
@pytest.mark.parametrize("marker, session", [({"sha256": IMAGE_ID, "desktop": "xfce"}, "startxfce4"),
                                             ({"sha256": IMAGE_ID, "desktop": "kde"}, "xterm"),
                                             ({"sha256": IMAGE_ID}, "xterm"),
                                             # a marker of another image: not the image asked for
                                             ({"sha256": "b" * 64, "desktop": "xfce"}, "xterm")])
def test_the_desktop_session_is_the_one_the_node_image_names(run_helper, node, engine, vnc, marker, session):
    stack_up(run_helper, node)
    vnc.greet.set()
    (node.image_tree / MARKER).write_text(json.dumps(marker))
    sessions = {"image": node.image_ref, "by_desktop": {"minimal": "exec xterm", "xfce": "exec startxfce4"}}
    spec = minimal_spec(ports={"vnc": vnc.port}, desktop_cmd="exec xterm")
    run = vm(run_helper, "ensure_container", container_params(node, engine, spec, image_sessions=sessions))
    assert run.exit_code == 0, run.reply
    (body,) = engine.created
    assert body["Env"].count(f"LABVM_DESKTOP_CMD=exec {session}") == 1


@pytest.mark.parametrize("value, fragment", [
    ({"image": SOME_REF}, "with 'image' and 'by_desktop'"),
    ({"by_desktop": {"xfce": "sh"}}, "with 'image' and 'by_desktop'"),
    ({"xfce_local": "/var/lib/labvm/xfce_local", "by_desktop": {"xfce": "sh"}}, "with 'image' and 'by_desktop'"),
    ({"image": SOME_REF, "by_desktop": {}}, "1 to 16 desktop kinds"),
    ({"image": SOME_REF, "by_desktop": {"X; rm": "sh"}}, "is not a-z"),
    ({"image": SOME_REF, "by_desktop": {"xfce": " "}}, "non-empty shell command"),
    ({"image": {**SOME_REF, "images": "x"}, "by_desktop": {"xfce": "sh"}}, "absolute path"),
    ({"image": {**SOME_REF, "legacy": "/srv/a,b"}, "by_desktop": {"xfce": "sh"}}, "must not contain ','"),
    ({"image": {**SOME_REF, "id": "ab"}, "by_desktop": {"xfce": "sh"}}, "must be an image id"),
    ({"image": "/var/lib/labvm/xfce_local", "by_desktop": {"xfce": "sh"}}, "with 'id', 'images' and 'legacy'"),
])
def test_bad_image_sessions_are_refused(bundle, value, fragment):
    with pytest.raises(bundle.contract.BadRequest) as raised:
        bundle.spec.image_sessions("image_sessions", value)
    assert fragment in raised.value.msg
