"""A member's directory chain 10,000 levels deep: its path (about 20,000 bytes) is far past
PATH_MAX, so every walk and removal on the node must go by descriptors, and without recursion.

Each tree has symlinks to / and to a sentinel directory outside it at some levels, and a
hard-linked pair at the bottom. The trees live on tmpfs mounts (fast to fill and empty) and are
removed in teardown by the bundle's own remover, with `rm -rf` (GNU rm walks by descriptors) as
a fallback: pytest's own cleanup (shutil.rmtree) would die of RecursionError on them."""

import base64
import gc
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import detach_everything_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs: needs root")

USER = "alice"
DEPTH = 10_000
SYMLINK_EVERY = 2_500
BOTTOM = b"the deepest file\n"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DEEPEST = "/" + "/".join(["d"] * DEPTH) + "/bottom"


def build_deep_tree(path: Path, sentinel: Path, depth: int = DEPTH) -> None:
    """path/d/d/.../d/{bottom,bottom-link}, each level made relative to the one above: a
    builder by path would stop at PATH_MAX."""
    path.mkdir()
    fd = os.open(path, DIR_FLAGS)
    try:
        for level in range(depth):
            if level % SYMLINK_EVERY == SYMLINK_EVERY // 2:
                os.symlink("/", "to-root", dir_fd=fd)
                os.symlink(str(sentinel), "to-sentinel", dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        bottom = os.open("bottom", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(bottom, BOTTOM)
        os.close(bottom)
        os.link("bottom", "bottom-link", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def read_deepest(path: Path, depth: int = DEPTH) -> bytes:
    fd = os.open(path, DIR_FLAGS)
    try:
        for _ in range(depth):
            child = os.open("d", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        bottom = os.open("bottom", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(bottom, "rb") as stream:
            return stream.read()
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def deep(tmp_path, bundle):
    """Two tmpfs mounts, data (the node's data dir) and mfs (MooseFS), a sentinel directory
    outside both holding a file and a hard-linked pair, and deep.build(path) to make a deep tree."""
    data, mfs, sentinel = tmp_path / "data", tmp_path / "mfs", tmp_path / "sentinel"
    for mount in (data, mfs):
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,nr_inodes=200k", "labvm-test-deep", str(mount)], check=True)
    sentinel.mkdir()
    (sentinel / "keep").write_text("must survive")
    os.link(sentinel / "keep", sentinel / "keep-link")
    built = []

    def build(path: Path, depth: int = DEPTH) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        built.append(path)
        build_deep_tree(path, sentinel, depth)
        return path

    state = SimpleNamespace(data=data, mfs=mfs, sentinel=sentinel, build=build, vm_dir=data / "vms" / USER)
    state.user_mfs = mfs / "vms" / USER
    try:
        yield state
    finally:
        for path in reversed(built):
            if os.path.lexists(path):
                bundle.tree.remove_tree(str(path))
            if os.path.lexists(path):
                subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)
        detach_everything_under(tmp_path)


def sentinel_intact(deep) -> bool:
    return sorted(os.listdir(deep.sentinel)) == ["keep", "keep-link"] and (deep.sentinel / "keep").read_text() == "must survive"


def vm(run_helper, action, params):
    run = run_helper("vm", {"action": action, "params": params, "check": False}, timeout=300)
    assert run.exit_code == 0, run.reply
    return run


# --- the shared walker and remover --------------------------------------------------------


def test_the_builder_really_goes_past_path_max(deep):
    tree = deep.build(deep.data / "tree")
    assert read_deepest(tree) == BOTTOM
    with pytest.raises(OSError) as raised:
        os.lstat(str(tree) + DEEPEST)
    assert raised.value.errno == 36  # ENAMETOOLONG: what a path-based walk would meet


def test_a_walk_reaches_the_bottom_with_a_few_descriptors_and_never_follows_a_symlink(deep, bundle):
    tree = deep.build(deep.data / "tree")
    gc.collect()  # a file an earlier test dropped is closed now, not during the walk
    before = open_fds()
    seen, most_fds = [], 0
    root_fd = os.open(tree, DIR_FLAGS)
    try:
        for cursor, entry in bundle.tree.walk_tree(root_fd):
            seen.append((cursor.rel(entry.name), entry.is_symlink()))
            most_fds = max(most_fds, open_fds())
    finally:
        os.close(root_fd)
    assert (DEEPEST[1:].encode(), False) in seen
    assert not any(rel.endswith((b"/keep", b"/keep-link")) for rel, _ in seen)
    assert sum(1 for _, is_link in seen if is_link) == 2 * (DEPTH // SYMLINK_EVERY)
    assert most_fds <= before + 4 and open_fds() == before


def test_removing_a_deep_tree_leaves_what_its_symlinks_point_at(deep, bundle):
    tree = deep.build(deep.data / "tree")
    assert bundle.tree.remove_tree(str(tree)) is True
    assert not os.path.lexists(tree) and sentinel_intact(deep)
    assert bundle.tree.remove_tree(str(tree)) is False


def test_a_directory_swapped_for_a_symlink_during_a_walk_is_not_entered(deep, bundle):
    tree = deep.data / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "mine").write_text("x")
    (tree / "first").write_text("x")
    root_fd = os.open(tree, DIR_FLAGS)
    seen = []
    try:
        for cursor, entry in bundle.tree.walk_tree(root_fd):
            if entry.name == "first":
                # Listed as a directory already; a symlink to outside takes its place.
                (tree / "sub" / "mine").unlink()
                (tree / "sub").rmdir()
                (tree / "sub").symlink_to(deep.sentinel)
            seen.append(cursor.rel(entry.name))
    finally:
        os.close(root_fd)
    assert seen == [b"first"]
    bundle.tree.remove_tree(str(tree))
    assert not tree.exists() and sentinel_intact(deep)


# --- where the node walks and removes -------------------------------------------------------


def test_the_sync_daemons_link_index_finds_a_pair_at_the_bottom(deep, bundle):
    up_local = deep.build(deep.vm_dir / "disk" / "up_local")
    state = bundle.syncd.SyncState()
    assert bundle.syncd.index_hardlinks(str(up_local), state) == 2
    key = (os.stat(up_local).st_dev, deepest_inode(up_local))
    rel = DEEPEST[1:].encode()
    assert sorted(state.hardlink_candidates(key)) == [rel, rel + b"-link"]
    # The sentinel's pair is reachable only through the member's symlinks.
    assert list(state.hardlinks) == [key] and sentinel_intact(deep)


def deepest_inode(tree: Path) -> int:
    fd = os.open(tree, DIR_FLAGS)
    for _ in range(DEPTH):
        child = os.open("d", DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = child
    inode = os.stat("bottom", dir_fd=fd, follow_symlinks=False).st_ino
    os.close(fd)
    return inode


def test_reset_upper_empties_deep_uppers_locally_and_on_moosefs(deep, run_helper):
    for layer in ("up_local", "work_local"):
        deep.build(deep.vm_dir / "disk" / layer)
    deep.build(deep.user_mfs / "up_mfs")
    params = {"user": USER, "data_dir": str(deep.data), "mfs_mount": str(deep.mfs), "docker_socket": "/nonexistent.sock"}
    run = vm(run_helper, "reset_upper", params)
    assert run.reply["changed"] is True and len(run.data["emptied"]) == 3
    for directory in (deep.vm_dir / "disk" / "up_local", deep.vm_dir / "disk" / "work_local", deep.user_mfs / "up_mfs"):
        assert directory.is_dir() and os.listdir(directory) == []
        assert not os.path.lexists(directory.parent / f".{directory.name}.emptying")
    assert sentinel_intact(deep)


def test_remove_local_layers_removes_a_deep_upper(deep, run_helper):
    deep.build(deep.vm_dir / "disk" / "up_local")
    (deep.vm_dir / "merge_local").mkdir()
    run = vm(run_helper, "remove_local_layers", {"user": USER, "data_dir": str(deep.data)})
    assert run.reply["changed"] is True and not deep.vm_dir.exists() and sentinel_intact(deep)


def test_purge_removes_deep_versions_on_moosefs(deep, run_helper):
    deep.build(deep.user_mfs / "low_mfs.v1")
    deep.build(deep.user_mfs / "up_mfs")
    run = vm(run_helper, "purge_mfs_data", {"user": USER, "mfs_mount": str(deep.mfs)})
    assert run.reply["changed"] is True and not deep.user_mfs.exists() and sentinel_intact(deep)


def test_a_version_is_sized_and_removed_at_any_depth(deep, bundle):
    version = deep.build(deep.user_mfs / "low_mfs.v1")
    files, total = bundle.merge.walked_size(str(version))
    # Two names of the bottom file, and each symlink's own size: the length of its target.
    assert files == 2 and total == 2 * len(BOTTOM) + (DEPTH // SYMLINK_EVERY) * (len("/") + len(str(deep.sentinel)))
    bundle.merge.remove_tree(str(version), moosefs=False)
    assert not version.exists() and sentinel_intact(deep)


def test_a_file_whose_host_path_passes_path_max_reads_back_from_a_version(deep, run_helper):
    # Paths in requests stop at 4096 characters; below the version's root on the node that is
    # still too long to open by name.
    depth = 2044
    deep.build(deep.user_mfs / "low_mfs.v1", depth=depth)
    path = "/d" * depth + "/bottom"
    assert len(path) <= 4096 < len(str(deep.user_mfs / "low_mfs.v1") + path)
    request = {"action": "read", "params": {"user": USER, "data_dir": str(deep.data), "mfs_mount": str(deep.mfs),
                                            "version": 1, "path": path}}  # fmt: skip
    run = run_helper("files", request)
    assert run.exit_code == 0, run.reply
    assert base64.b64decode(run.data["content_b64"]) == BOTTOM
