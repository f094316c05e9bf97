"""_system's shared pieces that touch files: the one atomic write."""

import errno
import os
import stat

import pytest


def test_atomic_write_creates_with_mode_and_leaves_no_temporary(bundle, tmp_path):
    target = tmp_path / "f"
    bundle.system.write_atomically(str(target), b"one\n", 0o640)
    assert target.read_bytes() == b"one\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_keeps_an_existing_files_mode_and_owner_when_asked(bundle, tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    if os.geteuid() == 0:
        os.chown(target, 1234, 5678)
    before = target.stat()
    bundle.system.write_atomically(str(target), b"new", 0o644, keep_existing=True)
    after = target.stat()
    assert target.read_bytes() == b"new" and after.st_ino != before.st_ino
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o600, before.st_uid, before.st_gid)


def test_atomic_write_by_name_in_a_directory_replaces_a_symlink_without_following_it(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "f").symlink_to(outside)
    dir_fd = os.open(inside, os.O_PATH | os.O_DIRECTORY)
    try:
        bundle.system.write_atomically("f", b"data", 0o600, dir_fd=dir_fd, temporary=".t")
    finally:
        os.close(dir_fd)
    assert outside.read_bytes() == b"untouched"
    assert not (inside / "f").is_symlink() and (inside / "f").read_bytes() == b"data"
    assert sorted(os.listdir(inside)) == ["f"]


def test_atomic_write_replaces_a_leftover_named_temporary(bundle, tmp_path):
    (tmp_path / ".f.tmp").write_bytes(b"left by a crash")
    bundle.system.write_atomically(str(tmp_path / "f"), b"x", temporary=".f.tmp")
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_require_tool_finds_a_tool_or_refuses_with_the_hint(bundle, monkeypatch):
    assert bundle.system.require_tool("sh", "install a shell", "sh_missing").endswith("/sh")
    monkeypatch.setattr(bundle.system, "find_tool", lambda name: None)
    with pytest.raises(bundle.contract.PreconditionFailed) as refused:
        bundle.system.require_tool("rsync", "install the rsync package", "rsync_missing")
    assert refused.value.code == "rsync_missing"
    assert str(refused.value) == "rsync not found on this node: install the rsync package"


def test_require_mfs_answers_sorts_out_why_not(bundle, tmp_path, monkeypatch):
    system, contract = bundle.system, bundle.contract
    assert system.require_mfs_answers(str(tmp_path))["frsize"] > 0
    missing = contract.PreconditionFailed("gone", "up_mfs_missing")
    with pytest.raises(contract.PreconditionFailed) as refused:
        system.require_mfs_answers(str(tmp_path / "nothing"), missing)
    assert refused.value is missing
    with pytest.raises(contract.Failed) as failed:
        system.require_mfs_answers(str(tmp_path / "nothing"))
    assert failed.value.code == "mfs_error"

    def hung(operation, path, timeout_s):
        assert timeout_s == system.MFS_ANSWER_TIMEOUT_S == 5.0
        raise TimeoutError

    monkeypatch.setattr(system, "fuse_call", hung)
    with pytest.raises(contract.TemporaryFailure) as temporary:
        system.require_mfs_answers(str(tmp_path))
    assert temporary.value.code == "mfs_mount_hung"

    def stale(operation, path, timeout_s):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", path)

    monkeypatch.setattr(system, "fuse_call", stale)
    with pytest.raises(contract.PreconditionFailed) as refused:
        system.require_mfs_answers(str(tmp_path))
    assert refused.value.code == "mfs_mount_stale"
