"""The sync helper and its daemon, run as labvm runs them (the helper as a subprocess, JSON on
stdin), against a real overlay mounted the way the vm helper mounts it: lower + upper + work on
temp dirs, redirect_dir/metacopy/index/xino off. Changes are written THROUGH merge_local, so the
upper holds what overlayfs really writes (copy-ups, whiteouts, opaque dirs). A plain directory
stands in for the MooseFS mount."""

import ctypes
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import ENTRY, detach_everything_under, only_json_object

USER = "alice"
IMAGE_ID = hashlib.sha256(b"the test desktop image").hexdigest()
WAIT_S = 20.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlays and keeps owners: needs root")


# --- comparing trees ------------------------------------------------------------------------


def entry_state(path: str) -> dict:
    info = os.lstat(path)
    state = {
        "type": stat.S_IFMT(info.st_mode),
        "mode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "mtime_ns": info.st_mtime_ns,
        "xattrs": {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)},
    }
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        state["rdev"] = (os.major(info.st_rdev), os.minor(info.st_rdev))
    if stat.S_ISLNK(info.st_mode):
        state["target"] = os.readlink(path)
    if stat.S_ISREG(info.st_mode):
        state["size"] = info.st_size
        with open(path, "rb") as stream:
            state["sha256"] = hashlib.sha256(stream.read()).hexdigest()
    return state


def tree(root) -> dict:
    """Every entry under root (root itself as b"."): type, mode, owner, mtime, rdev, content
    hash, symlink target, all xattrs (trusted.* and ACLs included), and the hard-link groups."""
    root = os.fsencode(str(root))
    entries = {b".": entry_state(root)}
    inodes = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            entries[rel] = entry_state(path)
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
                inodes.setdefault((info.st_dev, info.st_ino), []).append(rel)
    groups = sorted(tuple(sorted(paths)) for paths in inodes.values() if len(paths) > 1)
    return {"entries": entries, "hardlink_groups": groups}


def assert_same_tree(source, copy) -> None:
    want, got = tree(source), tree(copy)
    missing = sorted(set(want["entries"]) - set(got["entries"]))
    extra = sorted(set(got["entries"]) - set(want["entries"]))
    differing = {
        name: (want["entries"][name], got["entries"][name])
        for name in sorted(set(want["entries"]) & set(got["entries"]))
        if want["entries"][name] != got["entries"][name]
    }
    assert not missing and not extra and not differing, f"missing {missing}; extra {extra}; differing {differing}"
    assert want["hardlink_groups"] == got["hardlink_groups"]


# --- a node with one desktop's overlay ------------------------------------------------------


def sync(run_helper, action, params, check=False, **kwargs):
    return run_helper("sync", {"action": action, "params": params, "check": check}, **kwargs)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def node(tmp_path, bundle):
    """data/vms/alice/{disk/up_local,disk/work_local,low_local,merge_local} with low_local and a desktop
    image from the image store (images/<id>, with its marker) as lowers; mfs/vms/alice/up_mfs as the destination. Teardown kills every daemon
    this test started (by the pids it wrote) and unmounts the overlay."""
    vm_dir = tmp_path / "data" / "vms" / USER
    layers = {name: vm_dir / name for name in ("low_local", "merge_local")}
    layers.update({name: vm_dir / "disk" / name for name in ("up_local", "work_local")})  # on the desktop's disk
    for path in layers.values():
        path.mkdir(parents=True)
    vm_dir.chmod(0o700)
    image_tree = tmp_path / "images" / IMAGE_ID
    marker = json.dumps({"sha256": IMAGE_ID, "desktop": "minimal"})
    for rel, text in {"etc/os-release": "desktop\n", "usr/bin/xterm": "#!/bin/sh\n", ".labvm-image.json": marker}.items():
        write(image_tree / rel, text)
    for rel, text in {
        "home/alice/notes.txt": "from the version\n",
        "home/alice/.profile": "export A=1\n",
        "home/alice/.config/app/settings.ini": "[a]\n",
        "srv/old/one.txt": "1\n",
        "srv/old/sub/two.txt": "2\n",
        "etc/hostname": "desk\n",
    }.items():
        write(layers["low_local"] / rel, text)
    up_mfs = tmp_path / "mfs" / "vms" / USER / "up_mfs"
    up_mfs.mkdir(parents=True)
    options = ",".join(
        [
            f"lowerdir={layers['low_local']}:{image_tree}",
            f"upperdir={layers['up_local']}",
            f"workdir={layers['work_local']}",
            *bundle.stack.OVERLAY_FIXED_OPTIONS,
        ]
    )
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merge_local"])], check=True)
    state = SimpleNamespace(
        root=tmp_path,
        data=tmp_path / "data",
        mfs=tmp_path / "mfs",
        vm_dir=vm_dir,
        up=layers["up_local"],
        merge=layers["merge_local"],
        up_mfs=up_mfs,
        control=vm_dir / "sync",
        pids=set(),
    )
    state.params = lambda **extra: {"user": USER, "data_dir": str(state.data), **extra}
    state.run_params = lambda **extra: state.params(mfs_mount=str(state.mfs), **extra)
    try:
        yield state
    finally:
        pid_file = state.control / "syncd.pid"
        if pid_file.exists():
            state.pids.add(int(pid_file.read_text()))
        for pid in state.pids:
            if is_syncd(pid):
                os.kill(pid, signal.SIGKILL)
        detach_everything_under(tmp_path)


def is_syncd(pid: int) -> bool:
    try:
        return b"syncd.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start(run_helper, node, **settings):
    run = sync(run_helper, "ensure_running", node.run_params(**{"sync_time_s": 0.2, **settings}))
    assert run.exit_code == 0, run.reply
    node.pids.add(run.data["pid"])
    return run


def flush(run_helper, node, **extra):
    run = sync(run_helper, "flush", node.params(**extra), timeout=float(extra.get("timeout_s", 60)) + 30)
    assert run.exit_code == 0, run.reply
    return run.data


def status(run_helper, node) -> dict:
    run = sync(run_helper, "status", node.params())
    assert run.exit_code == 0 and run.reply["changed"] is False, run.reply
    return run.data


def gone(pid: int) -> bool:
    return not is_syncd(pid)


# --- what reaches up_mfs --------------------------------------------------------------------


def test_dot_files_and_dot_dirs_reach_up_mfs(run_helper, node):
    start(run_helper, node)
    home = node.merge / "home/alice"
    write(home / ".bashrc", "alias ll='ls -l'\n")
    write(home / ".profile", "export A=2\n")  # a lower dot-file, copied up
    write(home / ".config/app/settings.ini", "[b]\n")  # in a lower dot-dir
    write(home / ".cache/new/.deep", "x\n")
    write(node.merge / ".top-level", "y\n")

    data = flush(run_helper, node)

    assert data["mode"] == "daemon" and data["files"] > 0
    assert (node.up_mfs / "home/alice/.bashrc").read_text() == "alias ll='ls -l'\n"
    assert (node.up_mfs / "home/alice/.profile").read_text() == "export A=2\n"
    assert (node.up_mfs / "home/alice/.config/app/settings.ini").read_text() == "[b]\n"
    assert (node.up_mfs / "home/alice/.cache/new/.deep").read_text() == "x\n"
    assert (node.up_mfs / ".top-level").read_text() == "y\n"
    assert_same_tree(node.up, node.up_mfs)


def test_modes_owners_times_xattrs_acls_links_and_fifos_are_kept(run_helper, node):
    start(run_helper, node)
    base = node.merge / "home/alice"
    write(base / "first.txt", "linked later\n")
    assert flush(run_helper, node)["mode"] == "daemon"

    write(base / "setuid-tool", "#!/bin/sh\n")
    os.chmod(base / "setuid-tool", 0o4750)
    write(base / "private", "p\n")
    os.chmod(base / "private", 0o600)
    os.chown(base / "private", 1234, 5678)
    os.chown(base / "notes.txt", 2000, 2000)  # a lower file: copy-up, then chown
    os.utime(base / "private", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    os.setxattr(base / "private", "user.labvm.note", b"kept\0binary")
    subprocess.run(["setfacl", "-m", "u:4321:rw,g:99:r", str(base / "private")], check=True)
    (base / "acl-dir").mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:4321:rwx", str(base / "acl-dir")], check=True)
    write(base / "pair-a", "same inode\n")
    os.link(base / "pair-a", base / "pair-b")
    os.link(base / "first.txt", base / "first-link.txt")  # to a file up_mfs already has
    os.symlink("/etc/shadow", base / "absolute-link")
    os.symlink("missing/target", base / "dangling-link")
    os.lchown(base / "dangling-link", 1234, 5678)
    os.mkfifo(base / "pipe", 0o640)
    os.mknod(base / "null-device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.utime(base, ns=(1_100_000_000_000_000_000, 1_100_000_000_000_000_000))

    flush(run_helper, node)

    copy = node.up_mfs / "home/alice"
    assert stat.S_IMODE(os.lstat(copy / "setuid-tool").st_mode) == 0o4750
    assert (os.lstat(copy / "private").st_uid, os.lstat(copy / "private").st_gid) == (1234, 5678)
    assert os.lstat(copy / "private").st_mtime_ns == 1_000_000_000_123_456_789
    assert os.getxattr(copy / "private", "user.labvm.note") == b"kept\0binary"
    assert "user:4321:rw-" in subprocess.run(["getfacl", "-c", str(copy / "private")], capture_output=True, text=True).stdout
    assert os.lstat(copy / "pair-a").st_ino == os.lstat(copy / "pair-b").st_ino
    assert os.lstat(copy / "first.txt").st_ino == os.lstat(copy / "first-link.txt").st_ino
    assert os.readlink(copy / "absolute-link") == "/etc/shadow"
    assert os.lstat(copy / "dangling-link").st_uid == 1234
    assert stat.S_ISFIFO(os.lstat(copy / "pipe").st_mode)
    assert os.lstat(copy / "null-device").st_rdev == os.makedev(1, 3)
    assert os.lstat(copy).st_mtime_ns == 1_100_000_000_000_000_000
    assert_same_tree(node.up, node.up_mfs)


def test_deletions_become_whiteouts_and_opaque_dirs(run_helper, node):
    start(run_helper, node)
    write(node.merge / "home/alice/scratch.txt", "upper only\n")
    flush(run_helper, node)
    assert (node.up_mfs / "home/alice/scratch.txt").exists()

    (node.merge / "etc/hostname").unlink()  # a lower file
    subprocess.run(["rm", "-rf", str(node.merge / "srv/old")], check=True)  # a lower dir
    (node.merge / "srv/old").mkdir()
    write(node.merge / "srv/old/fresh.txt", "new\n")
    (node.merge / "home/alice/scratch.txt").unlink()  # an upper-only file
    flush(run_helper, node)

    whiteout = os.lstat(node.up_mfs / "etc/hostname")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert os.getxattr(node.up_mfs / "srv/old", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(node.up_mfs / "srv/old")) == ["fresh.txt"]
    assert not os.path.lexists(node.up_mfs / "home/alice/scratch.txt")
    assert_same_tree(node.up, node.up_mfs)


def test_directories_replaced_renamed_and_exchanged(run_helper, node):
    start(run_helper, node)
    work = node.merge / "work"
    for rel in ("a/one", "a/sub/two", "b/three", "c/four", "d/five", "d/deep/six"):
        write(work / rel, rel)
    flush(run_helper, node)

    subprocess.run(["rm", "-rf", str(work / "a")], check=True)
    write(work / "a", "now a file\n")  # a dir replaced by a file
    (work / "b/three").unlink()
    (work / "b").rmdir()
    write(work / "b/three/inside", "file became dir\n")  # b/three: was a file, is a dir
    os.rename(work / "c", work / "c-renamed")
    exchange(work / "d", work / "c-renamed")  # two non-empty dirs swap places
    flush(run_helper, node)
    assert (node.up_mfs / "work/a").read_text() == "now a file\n"
    assert sorted(os.listdir(node.up_mfs / "work/d")) == ["four"]
    assert sorted(os.listdir(node.up_mfs / "work/c-renamed")) == ["deep", "five"]
    assert_same_tree(node.up, node.up_mfs)

    (work / "a").unlink()
    write(work / "a/back", "a dir again\n")
    flush(run_helper, node)
    assert_same_tree(node.up, node.up_mfs)


def exchange(first: Path, second: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, bytes(first), at_fdcwd, bytes(second), rename_exchange) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def test_a_directory_swapped_for_a_symlink_is_never_read_through(run_helper, node):
    host_dir = node.root / "host-secrets"
    write(host_dir / "key", "HOST SECRET\n")
    start(run_helper, node, sync_time_s=3600)
    write(node.merge / "home/alice/box/key", "the member's own\n")
    flush(run_helper, node)
    # Queued: box/key. Before the batch runs, box becomes a link to a directory of the node's.
    (node.merge / "home/alice/box/key").write_text("changed\n")
    subprocess.run(["rm", "-rf", str(node.merge / "home/alice/box")], check=True)
    os.symlink(host_dir, node.merge / "home/alice/box")
    flush(run_helper, node)

    assert os.readlink(node.up_mfs / "home/alice/box") == str(host_dir)
    leaked = [
        os.path.join(directory, name)
        for directory, _dirs, files in os.walk(node.up_mfs)
        for name in files
        if os.path.isfile(os.path.join(directory, name))
        and not os.path.islink(os.path.join(directory, name))
        and b"HOST SECRET" in Path(directory, name).read_bytes()
    ]
    assert leaked == []
    assert (host_dir / "key").read_text() == "HOST SECRET\n" and os.listdir(host_dir) == ["key"]
    assert_same_tree(node.up, node.up_mfs)


def test_names_with_any_bytes(run_helper, node):
    start(run_helper, node)
    base = os.fsencode(str(node.merge / "home/alice"))
    for name in (b"new\nline", b"-starts-with-dash", b"latin1-\xe9", b"back\\slash", b" space ", b"tab\there"):
        with open(os.path.join(base, name), "wb") as stream:
            stream.write(name)
    # rsync reads a list line starting with '#' or ';' as a comment: these must still arrive.
    for name in (b"#hash", b";semi"):
        with open(os.path.join(os.fsencode(str(node.merge)), name), "wb") as stream:
            stream.write(name)
    write(node.merge / "#dir/inside", "first\n")
    os.mkdir(os.path.join(base, b"dir\n\xff"))
    with open(os.path.join(base, b"dir\n\xff", b"in\x01side"), "wb") as stream:
        stream.write(b"x")
    flush(run_helper, node)
    assert_same_tree(node.up, node.up_mfs)
    os.unlink(os.path.join(base, b"new\nline"))
    write(node.merge / "#dir/inside", "changed\n")  # not new: only its own path is queued
    flush(run_helper, node)
    assert_same_tree(node.up, node.up_mfs)


# --- the barrier, crashes and lost events ---------------------------------------------------


def test_flush_returns_only_once_changes_are_on_up_mfs(run_helper, node):
    # An hour's sync time: only the flush can make these changes reach up_mfs in time.
    start(run_helper, node, sync_time_s=3600)
    flush(run_helper, node)  # the first full pass
    for round_number in range(3):
        for index in range(40):
            write(node.merge / f"data/r{round_number}/f{index}", f"{round_number}-{index}\n" * (index + 1))
        if round_number:
            subprocess.run(["rm", "-rf", str(node.merge / f"data/r{round_number - 1}")], check=True)
        (node.merge / "home/alice/notes.txt").write_text(f"round {round_number}\n")
        data = flush(run_helper, node)
        assert data["mode"] == "daemon" and data["files"] >= 40
        assert_same_tree(node.up, node.up_mfs)


def test_a_burst_larger_than_a_batch_is_flushed_whole(run_helper, node):
    start(run_helper, node, sync_time_s=3600, batch_max_files=50)
    flush(run_helper, node)
    synced = status(run_helper, node)["files_synced"]
    for index in range(500):
        write(node.merge / f"burst/d{index % 7}/f{index}", f"{index}\n")
    flush(run_helper, node)
    # Batches of 50 may leave before the flush asks (its own count is what was left): the
    # daemon's total counts them all.
    after = status(run_helper, node)
    assert after["files_synced"] - synced >= 500
    assert after["batches"] >= 10
    assert_same_tree(node.up, node.up_mfs)


def test_kill_9_with_changes_queued_loses_nothing(run_helper, node):
    first = start(run_helper, node, sync_time_s=3600).data["pid"]
    flush(run_helper, node)
    for index in range(20):
        write(node.merge / f"home/alice/queued/f{index}", f"{index}\n")
    (node.merge / "home/alice/notes.txt").unlink()
    wait_for(lambda: status(run_helper, node)["pending"] > 0, "the changes to be queued")
    assert not (node.up_mfs / "home/alice/queued").exists()
    # What a switch shows as still to send: the queued files' sizes (each "N\n").
    wait_for(lambda: status(run_helper, node)["pending_bytes"] >= 20, "the queued bytes to be counted")

    os.kill(first, signal.SIGKILL)
    wait_for(lambda: gone(first), "the daemon to die")
    assert status(run_helper, node)["running"] is False

    restarted = start(run_helper, node, sync_time_s=3600)
    assert restarted.reply["changed"] is True and restarted.data["pid"] != first
    assert flush(run_helper, node)["mode"] == "daemon"
    assert_same_tree(node.up, node.up_mfs)


def test_lost_events_are_caught_up_by_a_full_pass(run_helper, node):
    pid = start(run_helper, node, sync_time_s=3600).data["pid"]
    write(node.merge / "home/alice/a", "copied up and watched before the flood\n")
    flush(run_helper, node)
    assert status(run_helper, node)["full_passes"] == 1
    # Stopped, the daemon reads no events; more than the kernel queues (16384) are dropped.
    os.kill(pid, signal.SIGSTOP)
    try:
        paths = [node.merge / "home/alice/a", node.merge / "home/alice/b"]
        for index in range(20000):
            paths[index % 2].write_text(str(index))
        write(node.merge / "home/alice/after-overflow/file", "z\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    flush(run_helper, node)
    assert status(run_helper, node)["full_passes"] == 2
    assert_same_tree(node.up, node.up_mfs)


def test_steady_state_copies_only_what_changed(run_helper, node):
    for index in range(400):
        write(node.up / f"bulk/d{index % 8}/f{index}", "bulk\n")
    start(run_helper, node)
    flush(run_helper, node)
    before = status(run_helper, node)
    assert before["full_passes"] == 1 and before["files_examined"] >= 400

    for index in range(3):
        (node.merge / f"bulk/d{index}/f{index}").write_text("changed\n")
    flush(run_helper, node)
    after = status(run_helper, node)

    assert after["full_passes"] == 1
    assert 3 <= after["files_synced"] - before["files_synced"] <= 6  # the files and their dirs' times
    # rsync looked at the changed files, their directories and the root's entries, not the tree.
    assert after["files_examined"] - before["files_examined"] <= 20
    log = (node.control / "syncd.log").read_text()
    assert "--files-from=-" in log and log.count("full pass done") == 1
    assert_same_tree(node.up, node.up_mfs)


# --- the daemon's life ----------------------------------------------------------------------


def test_daemon_outlives_the_session_that_started_it(run_helper, node):
    request = {"action": "ensure_running", "params": node.run_params(sync_time_s=0.2)}
    # The helper runs as session leader of a session of its own, as over SSH; it exits, and
    # that whole session is killed.
    starter = subprocess.Popen(
        [sys.executable, "-I", str(ENTRY), "sync"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out, err = starter.communicate(json.dumps(request).encode(), timeout=60)
    reply = only_json_object(out.decode())
    assert starter.returncode == 0, (reply, err)
    pid = reply["data"]["pid"]
    node.pids.add(pid)
    try:
        os.killpg(starter.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left in that session: the daemon is not in it

    assert is_syncd(pid)
    assert os.getsid(pid) not in (starter.pid, os.getsid(0))
    assert all(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null" for fd in (0, 1, 2))
    write(node.merge / "home/alice/after.txt", "still syncing\n")
    flush(run_helper, node)
    assert (node.up_mfs / "home/alice/after.txt").read_text() == "still syncing\n"


def test_ensure_running_is_an_idempotent_ensure(run_helper, node):
    check = sync(run_helper, "ensure_running", node.run_params(), check=True)
    assert check.exit_code == 0 and check.reply["changed"] is True
    assert not node.control.exists()

    first = start(run_helper, node)
    assert first.reply["changed"] is True and first.data["started"] is True
    again = start(run_helper, node)
    assert again.reply["changed"] is False and again.data["pid"] == first.data["pid"]

    changed = start(run_helper, node, sync_time_s=1.5)
    assert changed.reply["changed"] is True and changed.data["restarted"] is True
    assert changed.data["pid"] != first.data["pid"] and gone(first.data["pid"])
    assert status(run_helper, node)["sync_time_s"] == 1.5
    assert stat.S_IMODE(node.control.stat().st_mode) == 0o700


def test_sigterm_and_ensure_stopped_sync_what_is_queued(run_helper, node):
    pid = start(run_helper, node, sync_time_s=3600).data["pid"]
    flush(run_helper, node)
    write(node.merge / "home/alice/before-sigterm", "1\n")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), "the daemon to exit")
    assert (node.up_mfs / "home/alice/before-sigterm").read_text() == "1\n"
    assert status(run_helper, node)["state"] == "stopped"

    pid = start(run_helper, node, sync_time_s=3600).data["pid"]
    write(node.merge / "home/alice/before-stop", "2\n")
    stopped = sync(run_helper, "ensure_stopped", node.params())
    assert stopped.exit_code == 0 and stopped.reply["changed"] is True, stopped.reply
    assert stopped.data["flushed"]["mode"] == "daemon"
    assert gone(pid)
    assert_same_tree(node.up, node.up_mfs)
    again = sync(run_helper, "ensure_stopped", node.params())
    assert again.exit_code == 0 and again.reply["changed"] is False


def test_flush_and_full_pass_without_a_daemon(run_helper, node):
    write(node.merge / "home/alice/stopped-vm.txt", "written while no daemon ran\n")
    never = sync(run_helper, "flush", node.params())
    assert never.exit_code == 3 and never.error["code"] == "sync_never_configured"

    data = flush(run_helper, node, mfs_mount=str(node.mfs))
    assert data["mode"] == "full_pass" and data["files"] > 0
    assert_same_tree(node.up, node.up_mfs)

    start(run_helper, node)
    refused = sync(run_helper, "full_pass", node.run_params())
    assert refused.exit_code == 3 and refused.error["code"] == "sync_daemon_running"
    sync(run_helper, "ensure_stopped", node.params())

    write(node.merge / "home/alice/later.txt", "after the daemon stopped\n")
    assert flush(run_helper, node)["mode"] == "full_pass"  # up_mfs known from the last start
    (node.merge / "home/alice/later.txt").unlink()
    full = sync(run_helper, "full_pass", node.run_params())
    assert full.exit_code == 0 and full.reply["changed"] is True and full.data["files"] >= 1
    assert_same_tree(node.up, node.up_mfs)
    unchanged = sync(run_helper, "full_pass", node.run_params())
    assert unchanged.exit_code == 0 and unchanged.reply["changed"] is False


def test_status_reports_lag_and_last_success(run_helper, node):
    assert status(run_helper, node)["running"] is False
    start(run_helper, node, sync_time_s=3600)
    flush(run_helper, node)
    write(node.merge / "home/alice/waiting.txt", "w\n")
    queued = wait_for(lambda: (s := status(run_helper, node))["pending"] > 0 and s, "the change to be queued")
    time.sleep(0.3)
    assert queued["running"] is True and queued["lag_s"] > 0 and queued["code_current"] is True
    assert status(run_helper, node)["lag_s"] >= 0.3

    before = time.time()
    flush(run_helper, node)
    done = wait_for(lambda: (s := status(run_helper, node))["pending"] == 0 and s, "the queue to empty")
    assert done["lag_s"] == 0.0 and done["last_error"] is None
    assert done["last_success"] >= before and done["state"] == "idle"


def test_unavailable_destination_is_reported_and_recovered_without_loss(run_helper, node):
    start(run_helper, node)
    flush(run_helper, node)
    away = node.up_mfs.with_name("up_mfs.away")
    os.rename(node.up_mfs, away)
    for index in range(10):
        write(node.merge / f"home/alice/during-outage/f{index}", f"{index}\n")
    failing = wait_for(lambda: (s := status(run_helper, node))["state"] == "error" and s, "the error to show")
    assert "up_mfs" in failing["last_error"] and failing["pending"] > 0
    timed_out = sync(run_helper, "flush", node.params(timeout_s=1))
    assert timed_out.exit_code == 75 and timed_out.error["code"] == "flush_timeout"
    assert not os.path.lexists(node.up_mfs)  # nothing was written to a stand-in

    os.rename(away, node.up_mfs)
    flush(run_helper, node)
    assert_same_tree(node.up, node.up_mfs)
    assert status(run_helper, node)["last_error"] is None


def test_flush_fails_clearly_when_the_daemon_dies_meanwhile(run_helper, node, fake_bin):
    # An rsync that hangs on batches keeps the flush waiting until the daemon is killed.
    fake_bin.install("rsync", 'case "$*" in *files-from*) sleep 30;; esac\nexec /usr/bin/rsync "$@"\n')
    pid = sync(run_helper, "ensure_running", node.run_params(sync_time_s=3600), path_prepend=str(fake_bin.path)).data["pid"]
    node.pids.add(pid)
    write(node.merge / "home/alice/stuck.txt", "s\n")
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    try:
        died = sync(run_helper, "flush", node.params(timeout_s=30))
    finally:
        killer.join()
        kill_stray_rsyncs(node)
    assert died.exit_code == 3 and died.error["code"] == "sync_daemon_died"


def kill_stray_rsyncs(node) -> None:
    """The hanging rsync the killed daemon left behind, found by the sender config it was given."""
    marker = os.fsencode(str(node.control))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and b"syncd.py" not in cmdline:
                os.kill(int(entry), signal.SIGKILL)


def test_missing_layers_are_refused(run_helper, node):
    missing_mfs = sync(run_helper, "ensure_running", {**node.run_params(), "mfs_mount": str(node.root / "elsewhere")})
    assert missing_mfs.exit_code == 3 and missing_mfs.error["code"] == "up_mfs_missing"
    other_user = sync(run_helper, "ensure_running", {**node.run_params(), "user": "bob"})
    assert other_user.exit_code == 3 and other_user.error["code"] == "up_local_missing"
    assert not node.control.exists()


def test_an_empty_upper_never_wipes_a_full_up_mfs(run_helper, node):
    write(node.up_mfs / "home/alice/unmerged.txt", "only copy\n")
    refused = sync(run_helper, "ensure_running", node.run_params())
    assert refused.exit_code == 3 and refused.error["code"] == "up_mfs_not_empty"
    assert (node.up_mfs / "home/alice/unmerged.txt").read_text() == "only copy\n"


@pytest.mark.parametrize(
    "action, params, message",
    [
        ("ensure_running", {"sync_time_s": 0}, "between"),
        ("ensure_running", {"sync_time_s": "5"}, "must be a number"),
        ("ensure_running", {"batch_max_files": 0}, "between"),
        ("ensure_stopped", {"flush": "yes"}, "true or false"),
        ("flush", {"timeout_s": True}, "must be a number"),
    ],
)
def test_bad_params_are_refused(run_helper, node, action, params, message):
    base = node.run_params() if action == "ensure_running" else node.params()
    run = sync(run_helper, action, {**base, **params})
    assert run.exit_code == 2 and message in run.error["msg"]


# --- the shared pieces, called directly -----------------------------------------------------


def test_flush_numbers_follow_each_other_and_pass_the_last_ack(bundle, tmp_path):
    syncd = bundle.syncd
    assert [syncd.request_flush(str(tmp_path)) for _ in range(3)] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["flush-1", "flush-2", "flush-3", "flush.lock", "flush.seq"]
    syncd.write_json_atomically(str(tmp_path / "flush.ack"), {"seq": 10, "files": 0})
    assert syncd.request_flush(str(tmp_path)) == 11
    assert syncd.flush_number(b"flush-11") == 11 and syncd.flush_number(b"flush-1.tmp") is None


def test_rsync_output_is_counted(bundle):
    stdout = """*deleting   old/file
>f+++++++++ new file
cd+++++++++ dir/
hf+++++++++ b => a
.d..t...... ./

Number of files: 1,234 (reg: 1,000, dir: 234)
Number of created files: 3
sent 1,000 bytes  received 20 bytes
"""
    run = bundle.syncd.RsyncRun(24, stdout, "file has vanished: x", 0.5)
    assert (run.ok, run.changed, run.examined) == (True, 5, 1234)
    failed = bundle.syncd.RsyncRun(23, "", "rsync: [receiver] mkstemp failed: Read-only file system (30)", 0.1)
    assert not failed.ok and "Read-only file system" in failed.error


def test_stopping_after_the_daemon_died_still_sends_its_queue(run_helper, node):
    """kill -9 of the daemon with changes queued, then the desktop is stopped: the stop's flush
    must not skip them because no daemon is left to ask."""
    pid = start(run_helper, node, sync_time_s=3600).data["pid"]
    flush(run_helper, node)
    write(node.merge / "home/alice/late.txt", "queued, never sent\n")
    wait_for(lambda: status(run_helper, node)["pending"] > 0, "the change to be queued")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), "the daemon to die")
    stopped = sync(run_helper, "ensure_stopped", node.params(flush=True))
    assert stopped.exit_code == 0, stopped.reply
    assert stopped.data["pid"] is None and stopped.data["flushed"] is not None
    assert (node.up_mfs / "home/alice/late.txt").read_text() == "queued, never sent\n"
    assert_same_tree(node.up, node.up_mfs)


def test_a_dead_daemon_of_the_layout_before_disks_still_has_its_upper_sent(run_helper, node):
    """A desktop running since before desktops had disks: its daemon synced <vm_dir>/up_local.
    If it died, the stop's flush sends that upper, not the (absent) one on the disk."""
    legacy = node.vm_dir / "up_local"
    write(legacy / "home/alice/unsent.txt", "written before the upgrade\n")
    node.control.mkdir(mode=0o700, exist_ok=True)
    config = {"up_local": str(legacy), "up_mfs": str(node.up_mfs), "args": []}
    (node.control / "config.json").write_text(json.dumps(config))
    shutil.rmtree(node.up)
    stopped = sync(run_helper, "ensure_stopped", node.params(flush=True))
    assert stopped.exit_code == 0, stopped.reply
    assert stopped.data["flushed"] is not None
    assert (node.up_mfs / "home/alice/unsent.txt").read_text() == "written before the upgrade\n"


# --- a hostile member: races, FIFOs, sparse and unnameable files, no inotify -----------------


def leaked(up_mfs: Path, secret: bytes) -> list[str]:
    """Every regular file under up_mfs that holds the secret (symlinks are not followed)."""
    found = []
    for directory, _dirs, files in os.walk(up_mfs):
        for name in files:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode) and secret in Path(path).read_bytes():
                found.append(path)
    return found


def test_a_symlink_exchanged_in_a_loop_never_leaks_node_files(run_helper, node):
    """RENAME_EXCHANGE flips box between a real directory and a symlink to a directory of the
    node's while batches run: whatever rsync resolves, it must stay inside up_local."""
    secret = b"NODE-SECRET-" + os.urandom(8).hex().encode()
    sentinel = node.root / "node-etc"
    sentinel.mkdir()
    (sentinel / "passwd").write_bytes(secret + b"\n")
    start(run_helper, node, sync_time_s=0.05)
    box = node.up / "box"
    box.mkdir()
    (box / "passwd").write_text("the member's own\n")
    os.symlink(sentinel, node.up / "box-link")
    stop = threading.Event()
    exchanges = [0]

    def attack():
        while not stop.is_set():
            exchange(box, node.up / "box-link")
            exchanges[0] += 1
            time.sleep(0.0005)  # events the kernel can queue, not an overflow and a full pass each time

    def keep_changing():
        """Writes box/passwd through whichever name is the real directory now (never through
        the symlink: that would overwrite the sentinel), so batches keep naming box/passwd."""
        n = 0
        while not stop.is_set():
            for name in ("box", "box-link"):
                try:
                    directory = os.open(node.up / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    fd = os.open("passwd", os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, dir_fd=directory)
                    os.write(fd, f"the member's own {n}\n".encode())
                    os.close(fd)
                finally:
                    os.close(directory)
            n += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=attack), threading.Thread(target=keep_changing)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(20)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert exchanges[0] > 1000, "the attack did not run"
    synced = status(run_helper, node)
    assert synced["batches"] + synced["full_passes"] > 20, "batches did not keep coming"
    flush(run_helper, node, timeout_s=120)
    assert leaked(node.up_mfs, secret) == []
    now = status(run_helper, node)
    assert now["running"] and now["state"] in ("idle", "syncing"), now
    assert (sentinel / "passwd").read_bytes() == secret + b"\n"


def test_a_sparse_file_stays_sparse(run_helper, node):
    start(run_helper, node)
    sparse = node.merge / "home/alice/disk.img"
    sparse.parent.mkdir(parents=True, exist_ok=True)
    with open(sparse, "wb") as stream:
        stream.truncate(2 * 1024**3)
        stream.seek(1024**3)
        stream.write(b"middle")
    flush(run_helper, node, timeout_s=120)
    copy = node.up_mfs / "home/alice/disk.img"
    assert copy.stat().st_size == 2 * 1024**3
    assert copy.stat().st_blocks * 512 <= 1024 * 1024, f"{copy.stat().st_blocks} blocks"
    with open(copy, "rb") as stream:
        stream.seek(1024**3)
        assert stream.read(6) == b"middle"


def test_a_file_swapped_for_a_fifo_does_not_wedge_the_flush(run_helper, node):
    start(run_helper, node, sync_time_s=0.05)
    target = node.up / "pipe-or-file"
    other = node.up / "swap-fifo"
    os.mkfifo(other)
    target.write_bytes(b"x" * 100_000)
    stop = threading.Event()
    swaps = [0]

    def swap():
        n = 0
        while not stop.is_set():
            exchange(target, other)
            swaps[0] += 1
            if swaps[0] % 50 == 0:
                # A change to the plain file, wherever it is now, queues both names again.
                # O_NONBLOCK: opening the FIFO instead fails at once rather than blocking.
                for path in (target, other):
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK | os.O_NOFOLLOW)
                    except OSError:
                        continue
                    try:
                        os.write(fd, b"y" * (1000 + n))
                    except OSError:
                        pass
                    os.close(fd)
                n += 1
            time.sleep(0.001)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        time.sleep(3)
        started = time.monotonic()
        flush(run_helper, node, timeout_s=300)
        took = time.monotonic() - started
    finally:
        stop.set()
        swapper.join()
    assert swaps[0] > 100
    # An I/O deadline of 20 s per stuck run, and a few runs to isolate the culprit.
    assert took < 200, took
    write(node.up / "after.txt", "still syncing\n")
    flush(run_helper, node, timeout_s=120)
    assert (node.up_mfs / "after.txt").read_text() == "still syncing\n"


def deep_path(root: Path, min_bytes: int) -> bytes:
    """mkdir one level at a time through descriptors: the path grows past PATH_MAX, which no
    single call could name. Returns it relative to root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    part = b"d" * 200
    try:
        while len(rel) < min_bytes:
            os.mkdir(part, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            rel = rel + b"/" + part if rel else part
        with open(os.open(b"leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as stream:
            stream.write(b"too deep\n")
    finally:
        os.close(fd)
    return rel + b"/leaf.txt"


def test_a_path_too_long_for_rsync_is_quarantined_and_the_rest_syncs(run_helper, node):
    start(run_helper, node, sync_time_s=3600)
    rel = deep_path(node.up, 4200)
    write(node.up / "beside.txt", "same batch\n")
    flushed = flush(run_helper, node, timeout_s=120)
    assert flushed["mode"] == "daemon"
    assert (node.up_mfs / "beside.txt").read_text() == "same batch\n"
    now = status(run_helper, node)
    assert now["quarantined_count"] >= 1
    reasons = [entry["reason"] for entry in now["quarantined"]]
    assert any("longer than 4095 bytes" in reason for reason in reasons), now["quarantined"]
    assert all(len(entry["path"]) <= 300 for entry in now["quarantined"])
    assert len(rel) > 4096
    # Another flush still returns: the quarantined path is tried once and stays quarantined.
    flush(run_helper, node, timeout_s=120)
    assert status(run_helper, node)["quarantined_count"] >= 1
    # Stopping says what MooseFS lacks, for a switch to tell.
    stopped = sync(run_helper, "ensure_stopped", node.params(flush=True))
    assert stopped.exit_code == 0, stopped.reply
    assert stopped.data["quarantined_count"] >= 1
    assert any("longer than 4095 bytes" in entry["reason"] for entry in stopped.data["quarantined"])


def test_without_inotify_full_passes_keep_syncing(run_helper, node, monkeypatch):
    monkeypatch.setenv("LABVM_SYNCD_TEST_FAIL_INOTIFY", "1")
    start(run_helper, node, sync_time_s=3600)
    now = status(run_helper, node)
    assert now["degraded"] is True and now["watching"] is False
    assert "no inotify instance" in now["degraded_reason"]
    write(node.merge / "home/alice/unwatched.txt", "found by a full pass\n")
    flush(run_helper, node, timeout_s=60)
    assert (node.up_mfs / "home/alice/unwatched.txt").read_text() == "found by a full pass\n"
    assert status(run_helper, node)["full_passes"] >= 2
    assert_same_tree(node.up, node.up_mfs)


def test_the_sender_config_and_rsh_words(bundle, tmp_path):
    syncd = bundle.syncd
    control = tmp_path / "ctl"
    control.mkdir()
    argv = syncd.batch_argv("/usr/bin/rsync", "/srv/up_local", "/mfs/up_mfs", str(control), False)
    assert argv[-2:] == ["x::up/", "/mfs/up_mfs/"] and "-S" in argv and "--timeout=20" in argv
    config = control / "rsyncd.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "use chroot = yes" in config.read_text() and "path = /srv/up_local\n" in config.read_text()
    for bad in ("/srv/up%local", "/srv/up local", "/srv/up\nlocal", "/srv/'up'", "relative"):
        with pytest.raises(ValueError):
            syncd.batch_argv("/usr/bin/rsync", bad, "/mfs/up_mfs", str(control), False)
    wrong = subprocess.run(
        [sys.executable, str(Path(syncd.__file__)), "--rsh", "--rsync", "/bin/echo", "--config", "c", "x", "sh", "-c", "id"],
        capture_output=True,
    )
    assert wrong.returncode == 2 and b"not a daemon connection" in wrong.stderr
    ran = subprocess.run(
        [sys.executable, str(Path(syncd.__file__)), "--rsh", "--rsync", "/bin/echo", "--config", "/c", "x", "rsync",
         "--server", "--daemon", "."],
        capture_output=True,
    )  # fmt: skip
    assert ran.stdout == b"--config=/c --server --daemon .\n"


def test_a_file_list_longer_than_one_wait_still_reaches_rsync_whole(bundle):
    """The list of a deep tree takes rsync more than one status interval to read: every byte
    of it must still arrive, and the run end (it used to wait for the rest forever)."""
    listing = b"".join(b"./" + b"d/" * 1000 + b"%d\0" % i for i in range(1500))  # about 3 MB
    # Reads slowly, then says how much it got the way rsync's --stats does.
    reader = "import sys, time; time.sleep(1.5); data = sys.stdin.buffer.read(); print('Number of files:', len(data))"
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("the list never got out")))
    signal.alarm(30)
    try:
        run = bundle.syncd.run_rsync([sys.executable, "-c", reader], stdin=listing)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert run.returncode == 0 and run.examined == len(listing)


def test_the_daemon_sender_never_looks_up_a_peer_name(bundle, tmp_path, monkeypatch):
    """Started over SSH, the sync daemon inherits SSH_CLIENT; rsync's daemon sender would take
    its peer from it and wait on DNS for every run."""
    monkeypatch.setenv("SSH_CLIENT", "192.0.2.1 50000 22")
    monkeypatch.setenv("SSH_CONNECTION", "192.0.2.1 50000 192.0.2.2 22")
    assert not [key for key in bundle.syncd.rsync_env() if key.startswith("SSH_")]
    assert "reverse lookup = no\n" in bundle.syncd.sender_config(str(tmp_path / "up_local"))


def test_a_child_stuck_opening_a_fifo_is_seen(bundle, tmp_path):
    """The daemon sender blocks in open() on a FIFO a member swapped in, and rsync's I/O
    deadline never fires for it: the syncer has to see it itself."""
    fifo = tmp_path / "flip"
    os.mkfifo(fifo)
    shell = subprocess.Popen(["sh", "-c", f"cat {fifo} > /dev/null; true"])
    try:
        seen = False
        for _ in range(50):
            seen = bundle.syncd.opening_a_fifo(shell.pid)
            if seen:
                break
            time.sleep(0.1)
        assert seen
    finally:
        shell.kill()
        subprocess.run(["pkill", "-f", f"cat {fifo}"], check=False)
        shell.wait()
    idle = subprocess.Popen(["sh", "-c", "sleep 5; true"])
    try:
        time.sleep(0.3)
        assert not bundle.syncd.opening_a_fifo(idle.pid)
    finally:
        idle.kill()
        idle.wait()
