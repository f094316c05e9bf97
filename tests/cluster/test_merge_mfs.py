"""The merge helper on the testbed's real MooseFS: versions copied with mfsmakesnapshot, the merge
engine renaming over FUSE, sizes from mfsdirinfo, removal with mfsrmsnapshot. The member's work
happens on a local overlay; its upper is copied to up_mfs as the sync would, then published."""

import json
import os
import shutil
import subprocess
import uuid

import pytest

from labvm.config import parse_config

from ..helpers.test_merge import IMAGE_ID, build_base, build_image, call, installed_bundle  # noqa: F401  (fixture)
from ..merge.trees import assert_same_tree, detach, mount_overlay, tree_state, unmount, view_of

SECOND_NS = 1_000_000_000  # MooseFS keeps times in whole seconds


@pytest.fixture
def mfs_mount(testbed, tmp_path, run_helper):
    storage = parse_config(testbed / "admin" / "bkConfxml.xml").storage
    mount = tmp_path / "mfs"
    params = {
        "master": storage.mfs_master, "port": storage.mfs_port, "mount": str(mount),
        "subdir": storage.mfs_dir, "options": storage.mount_options,
    }
    run = run_helper("mfs", {"action": "ensure_mounted", "params": params})
    assert run.exit_code == 0, run.reply
    yield mount
    detach(mount)


@pytest.fixture
def local(tmp_path):
    """A tmpfs for the member's overlay session and the image."""
    root = tmp_path / "local"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "labvm-test-local", str(root)], check=True)
    yield root
    detach(root)


def member_session(local, base, image) -> tuple[dict, object]:
    upper, work, merged = local / "upper", local / "work", local / "merged"
    for directory in (upper, work, merged):
        directory.mkdir()
    mount_overlay(merged, [base, image], upper, work)
    try:
        home = merged / "home/alice"
        shutil.rmtree(home / "project0")
        shutil.rmtree(home / "project1")
        (home / "project1").mkdir()
        (home / "project1/fresh").write_text("opaque now")
        (home / "project2/file0.txt").write_text("changed")
        os.link(home / "project2/file0.txt", home / "project2/hard")
        (home / "new").mkdir()
        (home / "new/file").write_text("new")
        os.unlink(merged / "etc/motd")
        shutil.rmtree(merged / "opt/tool")
        (merged / "opt/tool").mkdir()
        return tree_state(merged, xattrs="mounted", time_step_ns=SECOND_NS), upper
    finally:
        unmount(merged)


def test_publish_on_moosefs_uses_snapshots_and_shows_what_the_desktop_showed(installed_bundle, mfs_mount, local):  # noqa: F811
    user = "mt" + uuid.uuid4().hex[:8]
    user_dir = mfs_mount / "vms" / user
    image = local / "images" / IMAGE_ID  # as the image helper leaves it in a node's store
    build_image(image)
    build_base(local / "v1")
    view, upper = member_session(local, local / "v1", image)
    user_dir.mkdir(parents=True)
    try:
        for source, name in ((local / "v1", "low_mfs.v1"), (upper, "up_mfs")):
            subprocess.run(["cp", "-a", str(source), str(user_dir / name)], check=True)
        params = {"user": user, "mfs_mount": str(mfs_mount)}

        code, reply, stderr = call(installed_bundle, "publish", {**params, "base": 1, "reason": "backup",
                                                        "image": {"id": IMAGE_ID, "images": str(image.parent),
                                                                  "legacy": str(local / "xfce_local")}})

        assert code == 0, stderr
        data = reply["data"]
        assert data["copied_with"] == "mfsmakesnapshot" and data["stats"]["errors"] == 0
        scratch = local / "scratch"
        scratch.mkdir()
        assert_same_tree(view, view_of([user_dir / "low_mfs.v2", image], scratch, time_step_ns=SECOND_NS))
        walked_files = sum(1 for p in (user_dir / "low_mfs.v2").rglob("*") if p.is_file() and not p.is_symlink())
        assert data["files"] == walked_files
        assert json.loads((user_dir / "low_mfs.v2.json").read_text())["files"] == walked_files
        assert sorted(n for n in os.listdir(user_dir) if n.startswith(".")) == []

        code, reply, _ = call(installed_bundle, "remove_version", {**params, "version": 1})
        assert code == 0 and reply["changed"] is True
        code, reply, _ = call(installed_bundle, "versions", params)
        assert [v["version"] for v in reply["data"]["versions"]] == [2]
        assert sorted(os.listdir(user_dir)) == ["low_mfs.v2", "low_mfs.v2.json", "up_mfs"]
    finally:
        shutil.rmtree(user_dir, ignore_errors=True)
