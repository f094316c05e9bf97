"""The merge helper run as labvm runs it: from the installed bundle (with its labvm_merge), as a
subprocess, JSON on stdin, as root, against a tmpfs standing in for MooseFS (the copies fall
back to cp -a there). A desktop session on a real overlay makes the upper layer, and a crash
at any point of a publish must leave the base version and up_mfs as they were."""

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from labvm.remote.helpers import ENTRY, HelperBundle

from ..merge.trees import (
    assert_same_tree,
    copy_tree,
    detach,
    mount_overlay,
    tree_state,
    unmount,
    view_of,
)
from .conftest import assert_reply_shape, only_json_object

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs and overlays: needs root")

USER = "alice"
IMAGE_ID = hashlib.sha256(b"the test desktop image").hexdigest()
IMAGE_MARKER = ".labvm-image.json"
HELPER_STEPS = ("copied_lower", "copied_upper", "merged", "described", "published")


# --- the bundle as a node has it ------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_bundle(tmp_path_factory):
    """The bundle unpacked from its tarball, as the node installer does."""
    bundle = HelperBundle.from_package()
    directory = tmp_path_factory.mktemp("bundle") / bundle.sha256
    directory.mkdir()
    with tarfile.open(fileobj=io.BytesIO(bundle.tarball), mode="r:gz") as tar:
        tar.extractall(directory)
    return directory


def call(bundle_dir: Path, action: str, params: dict, check: bool = False, env: dict | None = None):
    request = json.dumps({"action": action, "params": params, "check": check}).encode()
    process = subprocess.run(
        [sys.executable, "-I", str(bundle_dir / ENTRY), "merge"],
        input=request, capture_output=True, env=env, timeout=300,
    )
    reply = only_json_object(process.stdout.decode())
    assert_reply_shape(reply, process.returncode)
    return process.returncode, reply, process.stderr.decode()


def test_the_bundle_carries_an_executable_merge_engine(installed_bundle):
    engine = installed_bundle / "labvm_merge"
    assert engine.stat().st_mode & 0o777 == 0o755
    result = subprocess.run([str(engine), "--help"], capture_output=True)
    assert result.returncode == 0 and b"usage: labvm_merge apply" in result.stdout


# --- a user's files on a MooseFS stand-in ---------------------------------------------------


@pytest.fixture(scope="module")
def mfs(tmp_path_factory):
    """A tmpfs mounted at mfs_mount: the helper refuses an mfs_mount with nothing mounted."""
    mount = Path(tempfile.mkdtemp(prefix="labvm-mfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "labvm-test-mfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        detach(mount)
        mount.rmdir()


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build_image(image: Path) -> None:
    """The desktop image as the image helper leaves it in the store: <images>/<id>, with its marker."""
    write(image / IMAGE_MARKER, json.dumps({"sha256": IMAGE_ID, "desktop": "minimal"}))
    for index in range(3):
        write(image / "usr/share/doc" / f"pkg{index}" / "README", f"image doc {index}")
    write(image / "etc/motd", "image motd")
    write(image / "opt/tool/bin/tool", "image tool", 0o755)


def build_base(base: Path) -> None:
    """low_mfs.v1: what the member had before, over the image."""
    for d in range(12):
        for f in range(4):
            write(base / "home/alice" / f"project{d}" / f"file{f}.txt", f"v1 {d} {f}")
    write(base / "home/alice/.bashrc", "alias ll='ls -l'\n")
    os.link(base / "home/alice/.bashrc", base / "home/alice/.bashrc.link")
    write(base / "etc/hostname", "desk\n")
    (base / "usr/share/doc").mkdir(parents=True)


def desktop_session(mfs_mount: Path, image: Path, user_dir: Path) -> dict:
    """The member works on the desktop's overlay (lower = v1 over the image, upper = up_mfs)
    and the view at the end is what every publish must reproduce."""
    merged, work = mfs_mount / "session", mfs_mount / "session-work"
    merged.mkdir()
    work.mkdir()
    mount_overlay(merged, [user_dir / "low_mfs.v1", image], user_dir / "up_mfs", work)
    try:
        home = merged / "home/alice"
        for d in (0, 3, 6, 10):
            shutil.rmtree(home / f"project{d}")
        for d in (1, 5, 9):
            (home / f"project{d}" / "file0.txt").write_text("changed")
            os.setxattr(home / f"project{d}", "user.tag", b"touched")
        shutil.rmtree(home / "project2")
        write(home / "project2/fresh", "recreated: opaque now")
        for index in range(3):
            write(home / "new" / f"n{index}" / f"file{index}", "brand new")
        os.link(home / "new/n0/file0", home / "new/n0/hard")
        (home / "link").symlink_to("new/n0/file0")
        os.mkfifo(home / "fifo")
        os.chmod(home / ".bashrc", 0o600)
        os.unlink(merged / "etc/motd")
        shutil.rmtree(merged / "usr/share/doc/pkg1")
        shutil.rmtree(merged / "opt/tool")
        write(merged / "opt/tool/mine", "replaced the image's tool")
        with open(home / "sparse", "wb") as stream:
            stream.seek(8 << 20)
            stream.write(b"end")
        os.chmod(home, 0o700)
        # Names the merge once kept for itself: a member's like any other.
        write(merged / ".labvm-merge-trash", "a member's file")
        write(home / ".labvm-merge-trash/inside", "a member's dir")
        os.setxattr(home / "new/n1/file1", "trusted.overlay.opaque", b"set by the member")
        return tree_state(merged, xattrs="mounted")
    finally:
        unmount(merged)
        shutil.rmtree(work)
        merged.rmdir()


@pytest.fixture(scope="module")
def pristine(mfs):
    """A user dir (v0 empty, v1, up_mfs after a session) to copy fresh for each test, the
    image (in an image store on the node), and the view the session ended with."""
    image = mfs / "images" / IMAGE_ID
    build_image(image)
    source = mfs / "pristine"
    (source / "low_mfs.v0").mkdir(parents=True)
    build_base(source / "low_mfs.v1")
    (source / "up_mfs").mkdir()
    view = desktop_session(mfs, image, source)
    return source, image, view


@pytest.fixture
def desk(mfs, pristine):
    source, image, view = pristine
    user_dir = mfs / "vms" / USER
    if user_dir.exists():
        shutil.rmtree(user_dir)
    user_dir.parent.mkdir(exist_ok=True)
    copy_tree(source, user_dir)
    params = {"user": USER, "mfs_mount": str(mfs)}
    return Desk(mfs, user_dir, image, view, params)


class Desk:
    def __init__(self, mfs_mount, user_dir, image, view, params):
        self.mfs_mount, self.user_dir, self.image, self.view, self.params = mfs_mount, user_dir, image, view, params
        # The image as a helper is told of it: its id, the node's store and legacy tree.
        self.image_ref = {"id": IMAGE_ID, "images": str(image.parent), "legacy": str(mfs_mount / "xfce_local")}

    def publish(self, bundle_dir, env=None, **extra):
        params = {**self.params, "base": 1, "reason": "backup", "image": self.image_ref, **extra}
        return call(bundle_dir, "publish", params, env=env)

    def publish_raw(self, bundle_dir, env):
        """A publish that may be killed: no reply is expected, only how it ended."""
        params = {**self.params, "base": 1, "reason": "backup", "image": self.image_ref}
        request = json.dumps({"action": "publish", "params": params})
        return subprocess.run(
            [sys.executable, "-I", str(bundle_dir / ENTRY), "merge"], input=request.encode(), capture_output=True,
            env=env, timeout=300,
        )

    def reset(self) -> None:
        """Back to before any publish: only v0, v1 and up_mfs, which no publish may change."""
        for name in os.listdir(self.user_dir):
            if name not in ("low_mfs.v0", "low_mfs.v1", "up_mfs"):
                path = self.user_dir / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def layers(self) -> dict:
        return {name: tree_state(self.user_dir / name, xattrs="raw") for name in ("low_mfs.v1", "up_mfs")}

    def leftovers(self) -> list[str]:
        return sorted(name for name in os.listdir(self.user_dir) if name.startswith("."))

    def shows_the_session(self, version: int) -> None:
        scratch = self.mfs_mount / "scratch"
        scratch.mkdir(exist_ok=True)
        try:
            assert_same_tree(self.view, view_of([self.user_dir / f"low_mfs.v{version}", self.image], scratch))
        finally:
            scratch.rmdir()


# --- publish --------------------------------------------------------------------------------


def test_publish_makes_the_next_version_show_what_the_desktop_showed(installed_bundle, desk):
    before = desk.layers()

    code, reply, stderr = desk.publish(installed_bundle)

    assert code == 0, stderr
    data = reply["data"]
    assert reply["changed"] is True
    assert (data["version"], data["base"], data["path"]) == (2, 1, str(desk.user_dir / "low_mfs.v2"))
    assert data["stats"]["errors"] == 0 and data["stats"]["below"] == "given" and data["seconds"] >= 0
    desk.shows_the_session(2)
    assert desk.layers() == before, "the base version or up_mfs changed"
    assert desk.leftovers() == []
    metadata = json.loads((desk.user_dir / "low_mfs.v2.json").read_text())
    expected_files = sum(1 for p in (desk.user_dir / "low_mfs.v2").rglob("*") if p.is_file() and not p.is_symlink())
    assert metadata == {key: data[key] for key in ("version", "base", "created", "files", "bytes", "reason", "image")}
    assert metadata["reason"] == "backup" and metadata["image"] == IMAGE_ID
    assert metadata["files"] == expected_files and metadata["bytes"] > 8 << 20


def test_publish_again_changes_nothing(installed_bundle, desk):
    first = desk.publish(installed_bundle)[1]["data"]
    code, reply, _ = desk.publish(installed_bundle)
    assert code == 0 and reply["changed"] is False
    assert {k: reply["data"][k] for k in ("version", "base", "created", "files")} == {
        k: first[k] for k in ("version", "base", "created", "files")
    }


def test_publish_in_check_mode_changes_nothing(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "publish", {**desk.params, "base": 1, "reason": "switch"}, check=True)
    assert code == 0 and reply["changed"] is True and reply["data"]["version"] == 2
    assert reply["data"]["reason"] == "switch"
    assert not (desk.user_dir / "low_mfs.v2").exists() and desk.leftovers() == []


def test_publish_refuses_a_target_it_did_not_make(installed_bundle, desk):
    (desk.user_dir / "low_mfs.v2").mkdir()
    code, reply, _ = desk.publish(installed_bundle)
    assert code == 3 and reply["error"]["code"] == "version_exists"


def test_publish_needs_the_base_version(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "publish", {**desk.params, "base": 7, "reason": "backup"})
    assert code == 3 and reply["error"]["code"] == "version_missing"


def test_publish_target_must_be_newer_than_base(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "publish", {**desk.params, "base": 1, "target": 1, "reason": "backup"})
    assert code == 2 and reply["error"]["code"] == "bad_param"


@pytest.mark.parametrize("reason", ["holiday", "create", "Backup", "backup ", 3])
def test_publish_refuses_a_reason_it_does_not_know(installed_bundle, desk, reason):
    code, reply, _ = desk.publish(installed_bundle, reason=reason)
    assert code == 2 and reply["error"]["code"] == "bad_param"
    assert not (desk.user_dir / "low_mfs.v2").exists()


def test_publish_needs_a_reason(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "publish", {**desk.params, "base": 1, "image": desk.image_ref})
    assert code == 2 and reply["error"]["code"] == "missing_param"


def test_publish_over_an_image_the_node_lacks_is_refused(installed_bundle, desk):
    before = desk.layers()
    other = hashlib.sha256(b"an image this node never had").hexdigest()
    for check in (True, False):
        code, reply, _ = call(installed_bundle, "publish", {**desk.params, "base": 1, "reason": "backup",
                                                            "image": {**desk.image_ref, "id": other}}, check=check)
        assert code == 3 and reply["error"]["code"] == "image_missing"
        assert other[:12] in reply["error"]["msg"]
    assert not (desk.user_dir / "low_mfs.v2").exists() and not (desk.user_dir / "low_mfs.v2.json").exists()
    assert desk.layers() == before and desk.leftovers() == []


@pytest.mark.parametrize("image, fragment", [
    ("/var/lib/labvm/xfce_local", "must be an object with 'id', 'images' and 'legacy'"),
    ({"id": IMAGE_ID, "images": "/var/lib/labvm/images"}, "must be an object with 'id', 'images' and 'legacy'"),
    ({"id": "abc", "images": "/var/lib/labvm/images", "legacy": "/var/lib/labvm/xfce_local"}, "must be an image id"),
    ({"id": IMAGE_ID, "images": "/var/lib/a,b", "legacy": "/var/lib/labvm/xfce_local"}, "must not contain ','"),
])
def test_publish_refuses_a_malformed_image_reference(installed_bundle, desk, image, fragment):
    code, reply, _ = desk.publish(installed_bundle, image=image)
    assert code == 2 and reply["error"]["code"] == "bad_param" and fragment in reply["error"]["msg"]
    assert not (desk.user_dir / "low_mfs.v2").exists()


def test_publish_over_an_image_held_in_the_legacy_tree_records_its_id(installed_bundle, desk):
    in_store, legacy = desk.image, Path(desk.image_ref["legacy"])
    in_store.rename(legacy)  # the store lacks it: only the tree of the labvm of one image per node has it
    try:
        code, reply, stderr = desk.publish(installed_bundle)
        assert code == 0, stderr
        assert reply["data"]["image"] == IMAGE_ID
        assert json.loads((desk.user_dir / "low_mfs.v2.json").read_text())["image"] == IMAGE_ID
        desk.image = legacy
        desk.shows_the_session(2)
    finally:
        legacy.rename(in_store)


def test_publish_without_an_image_records_none(installed_bundle, desk):
    code, reply, stderr = desk.publish(installed_bundle, image=None)
    assert code == 0, stderr
    assert "image" not in json.loads((desk.user_dir / "low_mfs.v2.json").read_text())
    code, reply, _ = call(installed_bundle, "versions", desk.params)
    assert code == 0 and [v["image"] for v in reply["data"]["versions"]] == [None, None, None]


def test_the_helper_publishes_with_the_reasons_retention_knows(bundle):
    from labvm.retention import REASONS

    assert set(bundle.merge.PUBLISH_REASONS) | {bundle.merge.CREATE_REASON} == set(REASONS)


def test_publish_refuses_an_mfs_mount_with_nothing_mounted(installed_bundle, tmp_path):
    params = {"user": USER, "mfs_mount": str(tmp_path), "base": 1, "reason": "backup"}
    code, reply, _ = call(installed_bundle, "publish", params)
    assert code == 3 and reply["error"]["code"] == "mfs_not_mounted"


def test_an_upper_snapshot_is_published_then_removed(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "snapshot_upper", {**desk.params, "name": "3"})
    assert code == 0
    snapshot = reply["data"]["path"]
    assert snapshot == str(desk.user_dir / ".upper-3")
    (desk.user_dir / "up_mfs/home/alice/after-the-snapshot").write_text("not in v3")

    code, reply, stderr = desk.publish(installed_bundle, upper=snapshot, target=3)

    assert code == 0, stderr
    desk.shows_the_session(3)
    assert not os.path.exists(snapshot)
    assert (desk.user_dir / "up_mfs/home/alice/after-the-snapshot").exists()


def test_a_merge_failure_is_reported_with_its_reason(installed_bundle, desk):
    os.setxattr(desk.user_dir / "up_mfs/home/alice", "trusted.overlay.redirect", b"/elsewhere")
    code, reply, _ = desk.publish(installed_bundle)
    assert code == 1 and reply["error"]["code"] == "merge_failed"
    assert "trusted.overlay.redirect" in reply["error"]["msg"]
    assert not (desk.user_dir / "low_mfs.v2").exists()


# Every fixed name the engine and the helper use, at the top of the member's tree.
RESERVED_NAMES = (
    ".labvm-merge-trash", "up_mfs", "low_mfs.v2", "low_mfs.v2.json", ".merge-2.low", ".merge-2.up",
    ".merge-2.up.trash", ".merge-2.json", ".merge-removing.v1", ".upper-2", ".trash",
)  # fmt: skip


def make_member_entry(path: Path, kind: str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "file":
        write(path, f"{path.name} is mine")
    elif kind == "dir":
        write(path / "inside", f"{path.name} is mine")
    else:
        path.symlink_to("/etc")


def member_entry_is_published(path: Path, kind: str) -> bool:
    if kind == "file":
        return path.is_file() and not path.is_symlink() and path.read_text() == f"{path.name} is mine"
    if kind == "dir":
        return (path / "inside").read_text() == f"{path.name} is mine"
    return path.is_symlink() and os.readlink(path) == "/etc"


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_names_the_merge_uses_are_merged_like_any_of_the_members(installed_bundle, desk, kind):
    write(desk.user_dir / "low_mfs.v1/.labvm-merge-trash/old", "the base had one as a dir")
    for name in RESERVED_NAMES:
        make_member_entry(desk.user_dir / "up_mfs" / name, kind)
    etc_before = os.stat("/etc").st_mtime_ns

    code, reply, stderr = desk.publish(installed_bundle)

    assert code == 0, stderr
    published = desk.user_dir / "low_mfs.v2"
    missing = [name for name in RESERVED_NAMES if not member_entry_is_published(published / name, kind)]
    assert not missing, f"not published as the member made them: {missing}"
    assert (published / ".labvm-merge-trash/old").exists() == (kind == "dir")
    assert desk.leftovers() == [] and os.stat("/etc").st_mtime_ns == etc_before


def test_a_members_trusted_overlay_xattr_survives_a_publish(installed_bundle, desk):
    code, _, stderr = desk.publish(installed_bundle)
    assert code == 0, stderr
    view = view_of([desk.user_dir / "low_mfs.v2", desk.image], desk.mfs_mount)
    assert (b"trusted.overlay.opaque", b"set by the member") in view[b"home/alice/new/n1/file1"].xattrs


# --- versions and remove_version ------------------------------------------------------------


def test_versions_lists_every_version_with_its_metadata(installed_bundle, desk):
    desk.publish(installed_bundle)
    code, reply, _ = call(installed_bundle, "versions", desk.params)
    assert code == 0 and reply["changed"] is False
    versions = reply["data"]["versions"]
    assert [v["version"] for v in versions] == [0, 1, 2]
    v0, v2 = versions[0], versions[2]
    assert v0["files"] is None and v0["base"] is None and v0["image"] is None
    assert versions[1]["image"] is None  # no metadata: published before versions named their image
    assert v2["image"] == IMAGE_ID
    assert v0["created"] == pytest.approx(os.lstat(desk.user_dir / "low_mfs.v0").st_mtime)
    assert v2["base"] == 1 and v2["files"] > 0


@pytest.mark.parametrize("reason", ["backup", "switch", "restore", "solidify", "rebase", "remove"])
def test_versions_say_why_each_was_published(installed_bundle, desk, reason):
    code, _, stderr = desk.publish(installed_bundle, reason=reason)
    assert code == 0, stderr
    code, reply, _ = call(installed_bundle, "versions", desk.params)
    assert code == 0
    assert {v["version"]: v["reason"] for v in reply["data"]["versions"]} == {0: "create", 1: None, 2: reason}


def test_a_version_published_before_versions_had_a_reason_has_none(installed_bundle, desk):
    desk.publish(installed_bundle)
    metadata_file = desk.user_dir / "low_mfs.v2.json"
    metadata = json.loads(metadata_file.read_text())
    del metadata["reason"]
    metadata_file.write_text(json.dumps(metadata))
    code, reply, _ = call(installed_bundle, "versions", desk.params)
    versions = {v["version"]: v for v in reply["data"]["versions"]}
    assert code == 0 and versions[2]["reason"] is None and versions[2]["files"] == metadata["files"]
    # Publishing it again is still the same publish: nothing changes, and no reason is made up.
    code, reply, _ = desk.publish(installed_bundle)
    assert code == 0 and reply["changed"] is False and "reason" not in json.loads(metadata_file.read_text())


def test_versions_of_a_user_without_files_is_empty(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "versions", {**desk.params, "user": "nobody"})
    assert code == 0 and reply["data"]["versions"] == []


def test_remove_version_deletes_one_and_is_idempotent(installed_bundle, desk):
    desk.publish(installed_bundle)
    params = {**desk.params, "version": 1}
    code, reply, _ = call(installed_bundle, "remove_version", params)
    assert code == 0 and reply["changed"] is True
    assert not (desk.user_dir / "low_mfs.v1").exists() and not (desk.user_dir / "low_mfs.v1.json").exists()
    assert desk.leftovers() == []
    code, reply, _ = call(installed_bundle, "remove_version", params)
    assert code == 0 and reply["changed"] is False


def test_remove_version_never_removes_the_newest(installed_bundle, desk):
    code, reply, _ = call(installed_bundle, "remove_version", {**desk.params, "version": 1})
    assert code == 3 and reply["error"]["code"] == "newest_version"
    assert (desk.user_dir / "low_mfs.v1").is_dir()


def test_remove_version_refuses_a_version_mounted_here(installed_bundle, desk, tmp_path):
    desk.publish(installed_bundle)
    subprocess.run(["mount", "--bind", "-o", "ro", str(desk.user_dir / "low_mfs.v1"), str(tmp_path)], check=True)
    try:
        code, reply, _ = call(installed_bundle, "remove_version", {**desk.params, "version": 1})
    finally:
        detach(tmp_path)
    assert code == 3 and reply["error"]["code"] == "version_in_use"


# --- changed_paths --------------------------------------------------------------------------


def changed_paths(bundle_dir, params, **extra):
    return call(bundle_dir, "changed_paths", {**params, "version": 1, **extra})


def non_directories(root: Path) -> set[str]:
    """Every entry below root that is not a directory, relative, by lstat: os.walk names a
    symlink to a directory among the directories and, not following links, never enters it."""
    found = set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                found.add(str(path.relative_to(root)))
    return found


def test_changed_paths_lists_files_and_whiteouts_of_the_version_and_up_mfs(installed_bundle, desk):
    before = desk.layers()
    code, reply, stderr = changed_paths(installed_bundle, desk.params)
    assert code == 0 and reply["changed"] is False, stderr
    paths, up_mfs = reply["data"]["paths"], desk.user_dir / "up_mfs"
    assert reply["data"]["truncated"] is False
    assert paths == sorted(set(paths))
    assert set(paths) == non_directories(desk.user_dir / "low_mfs.v1") | non_directories(up_mfs)
    # Deletions are changes: the whiteouts of the session, of the version's files and of the image's.
    for whiteout in ("home/alice/project0", "home/alice/project10", "etc/motd", "usr/share/doc/pkg1"):
        assert stat.S_ISCHR(os.lstat(up_mfs / whiteout).st_mode) and whiteout in paths
    for member in ("home/alice/project4/file3.txt", "home/alice/project1/file0.txt", "home/alice/.bashrc.link",
                   "home/alice/project2/fresh", "home/alice/new/n0/hard", "home/alice/link", "home/alice/fifo",
                   "opt/tool/mine", "home/alice/.labvm-merge-trash/inside"):
        assert member in paths
    # Directories are not changes, an opaque one neither: what it hides is in the image.
    for directory in ("home", "home/alice", "usr/share/doc", "home/alice/project2", "opt/tool", "home/alice/new/n0"):
        assert directory not in paths
    assert not any(path.startswith("/") or path.startswith("low_mfs") or path.startswith("up_mfs") for path in paths)
    assert desk.layers() == before and desk.leftovers() == []


def test_changed_paths_of_another_version_reads_that_version(installed_bundle, desk):
    code, reply, _ = changed_paths(installed_bundle, desk.params, version=0)
    assert code == 0 and set(reply["data"]["paths"]) == non_directories(desk.user_dir / "up_mfs")
    assert "home/alice/project4/file3.txt" not in reply["data"]["paths"]


def test_changed_paths_never_follow_a_symlink(installed_bundle, desk, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret", "a file of the node")
    (desk.user_dir / "up_mfs/home/alice/door").symlink_to(outside)
    (desk.user_dir / "low_mfs.v1/srv").symlink_to(outside)
    (desk.user_dir / "up_mfs/home/alice/dangling").symlink_to("/nowhere/at/all")
    code, reply, stderr = changed_paths(installed_bundle, desk.params)
    assert code == 0, stderr
    paths = reply["data"]["paths"]
    assert {"home/alice/door", "srv", "home/alice/dangling"} <= set(paths)
    assert not any(path.startswith(("home/alice/door/", "srv/")) or path.endswith("secret") for path in paths)
    # A version that is a symlink (to another version) is not read through either.
    (desk.user_dir / "low_mfs.v3").symlink_to("low_mfs.v1")
    code, reply, _ = changed_paths(installed_bundle, desk.params, version=3)
    assert code == 0 and set(reply["data"]["paths"]) == non_directories(desk.user_dir / "up_mfs")


def test_changed_paths_stop_at_the_limit(installed_bundle, desk):
    every = changed_paths(installed_bundle, desk.params)[1]["data"]["paths"]
    assert len(every) > 60
    for limit in (1, 5, len(every) - 1):
        code, reply, _ = changed_paths(installed_bundle, desk.params, limit=limit)
        assert code == 0 and reply["data"]["truncated"] is True
        assert len(reply["data"]["paths"]) == limit and set(reply["data"]["paths"]) <= set(every)
    code, reply, _ = changed_paths(installed_bundle, desk.params, limit=len(every))
    assert code == 0 and reply["data"] == {"paths": every, "truncated": False}


def test_a_path_changed_in_the_version_and_again_in_up_mfs_counts_once(installed_bundle, mfs):
    user_dir = mfs / "vms" / "bob"
    try:
        write(user_dir / "low_mfs.v1/notes.txt", "in the version")
        write(user_dir / "up_mfs/notes.txt", "changed again since")
        params = {"user": "bob", "mfs_mount": str(mfs)}
        for limit in (1, 2):
            code, reply, _ = changed_paths(installed_bundle, params, limit=limit)
            assert code == 0 and reply["data"] == {"paths": ["notes.txt"], "truncated": False}
    finally:
        shutil.rmtree(user_dir)


def test_changed_paths_of_a_user_without_files_is_empty(installed_bundle, desk):
    code, reply, _ = changed_paths(installed_bundle, {**desk.params, "user": "nobody"})
    assert code == 0 and reply["data"] == {"paths": [], "truncated": False}


@pytest.mark.parametrize("params, code_name", [
    ({"version": None}, "missing_param"),
    ({"limit": 0}, "bad_param"),
    ({"limit": True}, "bad_param"),
    ({"version": -1}, "bad_param"),
    ({"depth": 3}, "unknown_param"),
])
def test_bad_changed_paths_params_are_refused(installed_bundle, desk, params, code_name):
    request = {key: value for key, value in {**desk.params, "version": 1, **params}.items() if value is not None}
    code, reply, _ = call(installed_bundle, "changed_paths", request)
    assert code == 2 and reply["error"]["code"] == code_name


# --- crashes --------------------------------------------------------------------------------


def engine_changes(installed_bundle, desk) -> int:
    """How many changes the engine makes in this publish: the kill points spread over them."""
    code, reply, stderr = desk.publish(installed_bundle)
    assert code == 0, stderr
    return reply["data"]["stats"]["changes"]


def kill_points(changes: int, count: int = 20) -> list[int]:
    return sorted({1, 2, changes} | {1 + (changes - 1) * index // (count - 1) for index in range(count)})


def crash_then_recover(installed_bundle, desk, env: dict, reference: dict, crashed_by) -> None:
    before = desk.layers()
    crashed_by(desk.publish_raw(installed_bundle, env))
    assert desk.layers() == before, f"a crash ({env}) changed the base version or up_mfs"
    code, reply, stderr = desk.publish(installed_bundle)
    assert code == 0, stderr
    assert tree_state(desk.user_dir / "low_mfs.v2", xattrs="raw") == reference
    assert desk.leftovers() == []
    metadata = json.loads((desk.user_dir / "low_mfs.v2.json").read_text())
    assert (metadata["version"], metadata["base"]) == (2, 1)


def engine_killed(process) -> None:
    assert process.returncode == 1, process.stderr.decode()
    assert json.loads(process.stdout)["error"]["code"] == "merge_failed"


def helper_killed(process) -> None:
    assert process.returncode == -signal.SIGKILL and process.stdout == b""


def test_a_crash_at_any_point_leaves_base_and_upper_intact_and_the_next_publish_recovers(installed_bundle, desk, mfs):
    changes = engine_changes(installed_bundle, desk)
    reference = tree_state(desk.user_dir / "low_mfs.v2", xattrs="raw")
    desk.shows_the_session(2)
    points = kill_points(changes)
    assert len(points) >= 20 and changes > 40
    for point in points:
        desk.reset()
        env = {**os.environ, "LABVM_MERGE_CRASH_AFTER": str(point)}
        crash_then_recover(installed_bundle, desk, env, reference, engine_killed)
    for step in HELPER_STEPS:
        desk.reset()
        env = {**os.environ, "LABVM_MERGE_HELPER_CRASH_AT": step}
        crash_then_recover(installed_bundle, desk, env, reference, helper_killed)
