"""labvm_merge rule by rule, on small hand-made layers: each test names one promise of the
engine and checks it on the resulting tree (and, where it matters, through an overlay mount)."""

import contextlib
import json
import os
import resource
import stat
import subprocess
from pathlib import Path

import pytest

from .trees import (
    assert_same_tree,
    copy_tree,
    engine_path,
    make_whiteout,
    mark_opaque,
    overlay_marks,
    run_engine,
    tree_state,
    view_of,
)

WEIRD = b"line\nbreak \\ back\xff\xfe"


@pytest.fixture
def layers(scratch):
    """upper/, target/ (the lower's copy) and image/ (the layer below) in one tmpfs dir."""
    for name in ("upper", "target", "image"):
        (scratch / name).mkdir()
    return scratch


def apply(layers: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_engine(layers / "upper", layers / "target", *args)
    if check:
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def write(path: Path, text: str = "x", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- whiteouts ------------------------------------------------------------------------------


def test_a_whiteout_deletes_the_target_entry_and_a_whole_tree_with_it(layers):
    write(layers / "target/keep")
    write(layers / "target/gone/deep/file")
    write(layers / "target/gone.txt")
    make_whiteout(layers / "upper/gone")
    make_whiteout(layers / "upper/gone.txt")
    make_whiteout(layers / "upper/never-there")

    stats = json.loads(apply(layers, "--flatten", "--stats").stdout)

    assert names(layers / "target") == {"keep"}
    assert stats["whiteouts"] == 3 and stats["deleted"] == 2 and stats["errors"] == 0


def test_whiteouts_are_published_only_where_the_layer_below_has_the_name(layers):
    write(layers / "image/etc/motd")
    write(layers / "target/etc/own")
    (layers / "upper/etc").mkdir()
    make_whiteout(layers / "upper/etc/motd")
    make_whiteout(layers / "upper/etc/own")

    apply(layers, "--below", str(layers / "image"))

    assert overlay_marks(layers / "target") == {b"etc/motd": "whiteout"}
    (layers / "view").mkdir()
    assert set(view_of([layers / "target", layers / "image"], layers / "view")) == {b"", b"etc"}


def test_without_below_every_whiteout_is_kept(layers):
    write(layers / "target/own")
    make_whiteout(layers / "upper/own")
    make_whiteout(layers / "upper/image-file")

    apply(layers)

    assert overlay_marks(layers / "target") == {b"own": "whiteout", b"image-file": "whiteout"}


def test_an_xattr_whiteout_deletes_and_is_published_as_a_device_whiteout(layers):
    write(layers / "target/a")
    write(layers / "image/b")
    for name in ("a", "b"):
        write(layers / "upper" / name, "")
        os.setxattr(layers / "upper" / name, "trusted.overlay.whiteout", b"")

    apply(layers, "--below", str(layers / "image"))

    assert overlay_marks(layers / "target") == {b"b": "whiteout"}
    assert not (layers / "target/a").exists()


def test_a_file_with_content_is_no_whiteout_whatever_its_xattrs(layers):
    write(layers / "upper/data", "payload")
    os.setxattr(layers / "upper/data", "trusted.overlay.whiteout", b"")

    apply(layers, "--flatten")

    assert (layers / "target/data").read_text() == "payload"
    assert overlay_marks(layers / "target") == {}


# --- opaque dirs ----------------------------------------------------------------------------


def test_an_opaque_dir_replaces_the_target_dir_and_drops_whiteouts_inside(layers):
    write(layers / "target/d/old")
    write(layers / "target/d/sub/old2")
    write(layers / "upper/d/new")
    make_whiteout(layers / "upper/d/old")
    mark_opaque(layers / "upper/d", b"y")

    stats = json.loads(apply(layers, "--flatten", "--stats").stdout)

    assert names(layers / "target") == {"d", "d/new"}
    assert overlay_marks(layers / "target") == {}
    assert stats["opaque_dirs"] == 1


def test_opaque_x_only_marks_xattr_whiteouts_and_merges_like_any_dir(layers):
    write(layers / "target/d/kept")
    write(layers / "target/d/hidden")
    write(layers / "upper/d/new")
    write(layers / "upper/d/hidden", "")
    os.setxattr(layers / "upper/d/hidden", "trusted.overlay.whiteout", b"")
    mark_opaque(layers / "upper/d", b"x")

    apply(layers, "--flatten")

    assert names(layers / "target") == {"d", "d/kept", "d/new"}
    assert overlay_marks(layers / "target") == {}


def test_an_opaque_dir_stays_opaque_over_an_image_dir_it_hides(layers):
    write(layers / "image/opt/pkg/image-file")
    write(layers / "upper/opt/pkg/mine")
    mark_opaque(layers / "upper/opt/pkg")
    write(layers / "upper/home/u/new")
    mark_opaque(layers / "upper/home/u")

    apply(layers, "--below", str(layers / "image"))

    assert overlay_marks(layers / "target") == {b"opt/pkg": "opaque=y"}


def test_a_dir_over_a_lower_whiteout_becomes_opaque_to_hide_the_image_dir(layers):
    write(layers / "image/srv/image-file")
    make_whiteout(layers / "target/srv")
    write(layers / "upper/srv/mine")

    apply(layers, "--below", str(layers / "image"))

    assert overlay_marks(layers / "target") == {b"srv": "opaque=y"}
    (layers / "view").mkdir()
    assert set(view_of([layers / "target", layers / "image"], layers / "view")) == {b"", b"srv", b"srv/mine"}


# --- refused uppers -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["trusted.overlay.redirect", "trusted.overlay.metacopy"])
def test_redirect_and_metacopy_entries_are_refused_by_path(layers, key):
    write(layers / "upper/dir/ok")
    entry = write(layers / "upper/dir" / os.fsdecode(WEIRD), "")
    os.setxattr(entry, key, b"/elsewhere")

    result = apply(layers, check=False)

    assert result.returncode == 1
    message = result.stderr.decode()
    assert key in message and "redirect_dir or metacopy" in message
    assert "/dir/line\\x0abreak \\\\ back\\xff\\xfe: carries" in message
    assert message.count("\n") == 1


# --- what moves, and how --------------------------------------------------------------------


def test_entries_move_by_rename_keeping_their_inodes(layers):
    upper = layers / "upper"
    write(upper / "file", "content")
    (upper / "link").symlink_to("file")
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    write(upper / "newdir/inner")
    before = {name: os.lstat(upper / name).st_ino for name in ("file", "link", "fifo", "null", "newdir")}

    apply(layers, "--flatten")

    target = layers / "target"
    assert {name: os.lstat(target / name).st_ino for name in before} == before
    assert os.readlink(target / "link") == "file"
    assert stat.S_ISFIFO(os.lstat(target / "fifo").st_mode)
    assert os.lstat(target / "null").st_rdev == os.makedev(1, 3)


def test_hard_links_stay_one_inode_across_new_merged_and_top_dirs(layers):
    write(layers / "target/merged/old")
    first = write(layers / "upper/merged/first", "shared")
    for other in ("upper/second", "upper/newdir/third"):
        (layers / other).parent.mkdir(exist_ok=True)
        os.link(first, layers / other)

    apply(layers)

    target = layers / "target"
    inodes = {os.lstat(target / name).st_ino for name in ("merged/first", "second", "newdir/third")}
    assert len(inodes) == 1
    assert os.lstat(target / "second").st_nlink == 3


def test_a_sparse_file_stays_sparse(layers):
    sparse = layers / "upper/sparse"
    with open(sparse, "wb") as stream:
        stream.seek(64 << 20)
        stream.write(b"end")

    apply(layers, "--flatten")

    st = os.lstat(layers / "target/sparse")
    assert st.st_size == (64 << 20) + 3
    assert st.st_blocks * 512 < 1 << 20


def test_any_byte_but_slash_and_nul_works_in_names(layers):
    weird = os.fsdecode(WEIRD)
    write(layers / "target" / weird / "old")
    write(layers / "upper" / weird / f"new{weird}", "x")
    make_whiteout(layers / "upper" / weird / "old")

    apply(layers, "--flatten")

    assert names(layers / "target") == {weird, f"{weird}/new{weird}"}


# --- directory metadata ---------------------------------------------------------------------


def test_a_merged_dir_takes_the_upper_dirs_mode_owner_xattrs_and_times(layers):
    target_dir = layers / "target/d"
    write(target_dir / "old")
    target_dir.chmod(0o755)
    os.setxattr(target_dir, "user.only-in-lower", b"1")
    os.setxattr(target_dir, "user.both", b"lower")
    upper_dir = layers / "upper/d"
    write(upper_dir / "new")
    upper_dir.chmod(0o2770)
    os.chown(upper_dir, 1234, 5678)
    os.setxattr(upper_dir, "user.both", b"upper")
    os.setxattr(upper_dir, "trusted.overlay.origin", b"\x00handle")
    os.setxattr(upper_dir, "trusted.overlay.impure", b"y")
    os.utime(upper_dir, ns=(1_000_000_000_123, 2_000_000_000_456))

    apply(layers)

    st = os.lstat(target_dir)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2770, 1234, 5678)
    assert st.st_mtime_ns == 2_000_000_000_456 and st.st_atime_ns == 1_000_000_000_123
    assert {name: os.getxattr(target_dir, name) for name in os.listxattr(target_dir)} == {"user.both": b"upper"}
    assert sorted(os.listdir(target_dir)) == ["new", "old"]


def test_the_roots_metadata_comes_from_the_upper_root(layers):
    (layers / "upper").chmod(0o750)
    os.setxattr(layers / "upper", "trusted.overlay.uuid", b"0123")
    os.setxattr(layers / "target", "user.stale", b"1")
    write(layers / "upper/f")
    os.utime(layers / "upper", ns=(5_000_000_000, 6_000_000_000))

    apply(layers)

    st = os.lstat(layers / "target")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime_ns == 6_000_000_000
    assert os.listxattr(layers / "target") == []


def test_a_moved_dir_keeps_its_times_though_whiteouts_in_it_were_dropped(layers):
    moved = layers / "upper/newdir"
    write(moved / "file")
    make_whiteout(moved / "stale")
    os.utime(moved, ns=(7_000_000_000, 8_000_000_000))

    apply(layers, "--flatten")

    assert os.listdir(layers / "target/newdir") == ["file"]
    assert os.lstat(layers / "target/newdir").st_mtime_ns == 8_000_000_000


# --- parallel workers -----------------------------------------------------------------------


def build_wide_tree(root: Path, lower: bool) -> None:
    for d in range(40):
        deletes = not lower and d % 3 == 0
        for f in range(1 if deletes else 0, 6):
            write(root / f"d{d}" / f"sub{f % 2}" / f"f{f}", f"{'lower' if lower else 'upper'}{d}{f}")
        if deletes:
            make_whiteout(root / f"d{d}" / "sub0" / "f0")
        if not lower and d % 5 == 0:
            mark_opaque(root / f"d{d}" / "sub1")
    if lower:
        write(root / "only-lower/file")


def test_one_worker_and_eight_give_the_same_tree(scratch):
    results = []
    for jobs in ("1", "8"):
        upper, target = scratch / f"upper{jobs}", scratch / f"target{jobs}"
        build_wide_tree(upper, lower=False)
        build_wide_tree(target, lower=True)
        result = run_engine(upper, target, "--jobs", jobs, "--stats", "--flatten")
        assert result.returncode == 0, result.stderr.decode()
        assert json.loads(result.stdout)["jobs"] == int(jobs)
        results.append(tree_state(target, times=False))
    assert_same_tree(results[0], results[1])
    assert b"d3/sub0/f0" not in results[0] and b"only-lower/file" in results[0]
    assert (scratch / "target8/d0/sub1/f1").read_text() == "upper01"


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["merge", "a", "b"],
        ["apply", "only-one"],
        ["apply", "a", "b", "c"],
        ["apply", "--jobs", "0", "a", "b"],
        ["apply", "--jobs", "many", "a", "b"],
        ["apply", "--wat", "a", "b"],
        ["apply", "--flatten", "--below", "/", "a", "b"],
    ],
)
def test_usage_errors_exit_2(argv):
    result = subprocess.run([str(engine_path()), *argv], capture_output=True)
    assert result.returncode == 2
    assert b"labvm_merge" in result.stderr


def test_help_exits_0():
    result = subprocess.run([str(engine_path()), "--help"], capture_output=True)
    assert result.returncode == 0 and b"usage: labvm_merge apply" in result.stdout


def test_upper_and_target_on_different_filesystems_are_refused(layers, tmp_path):
    write(layers / "upper/f")
    result = run_engine(layers / "upper", tmp_path)
    assert result.returncode == 1
    assert b"different filesystems" in result.stderr
    assert (layers / "upper/f").exists()


def test_an_upper_used_once_is_refused_the_second_time(layers):
    write(layers / "upper/f")
    apply(layers)
    again = apply(layers, check=False)
    assert again.returncode == 1 and b"an earlier apply used UPPER up partly" in again.stderr


def test_a_missing_upper_is_a_clear_failure(layers):
    result = run_engine(layers / "nope", layers / "target")
    assert result.returncode == 1 and b"cannot open UPPER" in result.stderr


# --- fault injection ------------------------------------------------------------------------


def test_crash_after_k_changes_kills_the_run_midway(layers):
    for index in range(5):
        write(layers / "upper" / f"f{index}")
    env = {**os.environ, "LABVM_MERGE_CRASH_AFTER": "3"}
    result = run_engine(layers / "upper", layers / "target", env=env)
    assert result.returncode == -9
    # The trash dir, then two renames: the third change never happened.
    assert len(os.listdir(layers / "target")) == 1


def test_a_crash_point_past_the_last_change_lets_the_run_finish(layers):
    write(layers / "upper/f")
    env = {**os.environ, "LABVM_MERGE_CRASH_AFTER": "1000"}
    result = run_engine(layers / "upper", layers / "target", env=env)
    assert result.returncode == 0
    assert (layers / "target/f").exists()


def test_the_merged_tree_equals_a_copy_merged_again(layers, scratch):
    """A desktop's upper applied over the version made from it changes nothing (solidify relies on it)."""
    write(layers / "target/d/old")
    write(layers / "upper/d/new")
    make_whiteout(layers / "upper/d/old")
    write(layers / "image/d/old")
    copy_tree(layers / "upper", scratch / "upper-again")
    apply(layers, "--below", str(layers / "image"))
    once = tree_state(layers / "target", xattrs="raw")
    result = run_engine(scratch / "upper-again", layers / "target", "--below", str(layers / "image"))
    assert result.returncode == 0
    assert_same_tree(once, tree_state(layers / "target", xattrs="raw"))


# --- what belongs to the member ---------------------------------------------------------------


def test_the_trash_is_made_beside_upper_and_a_members_names_merge_like_any_other(layers):
    write(layers / "upper/.labvm-merge-trash", "mine")
    write(layers / "target/.labvm-merge-trash/old", "the previous version's dir")
    (layers / "upper/sub").mkdir()
    os.symlink("/etc", layers / "upper/sub/.labvm-merge-trash")
    write(layers / "upper/upper.trash", "also mine")
    write(layers / "target/gone", "deleted by the member")
    make_whiteout(layers / "upper/gone")

    apply(layers, "--below", str(layers / "image"))

    assert (layers / "target/.labvm-merge-trash").read_text() == "mine"
    assert os.readlink(layers / "target/sub/.labvm-merge-trash") == "/etc"
    assert (layers / "target/upper.trash").read_text() == "also mine"
    assert not os.path.lexists(layers / "target/gone")
    trashed = sorted(entry.name for entry in os.scandir(layers / "upper.trash"))
    assert len(trashed) == 2, trashed
    assert {(layers / "upper.trash" / name).is_dir() for name in trashed} == {True, False}


def test_an_upper_not_named_by_its_own_name_is_refused(layers):
    write(layers / "upper/f")
    result = run_engine(f"{layers / 'upper'}/.", layers / "target")
    assert result.returncode == 1 and b"ends in the directory's name" in result.stderr
    assert (layers / "upper/f").exists()


ESCAPED = b"trusted.overlay.overlay."


def test_escaped_overlay_xattrs_are_the_members_and_are_published_verbatim(layers):
    """What a member sets as trusted.overlay.X is stored as trusted.overlay.overlay.X: kept
    as it is (every layer unescapes it), never read as one of overlay's markers."""
    upper, target = layers / "upper", layers / "target"
    os.setxattr(write(upper / "file", "mine"), ESCAPED + b"foo", b"bar")
    os.setxattr(write(upper / "empty", ""), ESCAPED + b"whiteout", b"y")
    write(target / "merged/old", "old")
    write(upper / "merged/new", "new")
    os.setxattr(upper / "merged", ESCAPED + b"opaque", b"y")
    os.setxattr(target / "merged", ESCAPED + b"dropped", b"the member removed it")
    os.setxattr(write(upper / "moved/inner"), ESCAPED + b"overlay.twice", b"2")
    os.symlink("file", upper / "link")
    os.setxattr(upper / "link", ESCAPED + b"foo", b"on a link", follow_symlinks=False)
    write(layers / "image/merged/below", "image")

    apply(layers, "--below", str(layers / "image"))

    def escaped(path: Path) -> dict:
        return {
            os.fsencode(key): os.getxattr(path, key, follow_symlinks=False) for key in os.listxattr(path, follow_symlinks=False)
        }

    assert escaped(target / "file") == {ESCAPED + b"foo": b"bar"}
    assert escaped(target / "empty") == {ESCAPED + b"whiteout": b"y"}
    assert escaped(target / "merged") == {ESCAPED + b"opaque": b"y"}
    assert escaped(target / "moved/inner") == {ESCAPED + b"overlay.twice": b"2"}
    assert escaped(target / "link") == {ESCAPED + b"foo": b"on a link"}
    assert overlay_marks(target) == {}
    view = view_of([target, layers / "image"], layers)
    assert view[b"file"].xattrs == ((b"trusted.overlay.foo", b"bar"),)
    assert view[b"empty"].kind == "file" and view[b"empty"].xattrs == ((b"trusted.overlay.whiteout", b"y"),)
    assert {b"merged/old", b"merged/new", b"merged/below"} <= set(view)
    assert view[b"merged"].xattrs == ((b"trusted.overlay.opaque", b"y"),)
    assert view[b"moved/inner"].xattrs == ((b"trusted.overlay.overlay.twice", b"2"),)


# --- depth ------------------------------------------------------------------------------------

DEPTH = 10_000
# Below what two descriptors per level would need: a deep tree must not cost one per layer.
DESCRIPTOR_LIMIT = 15_000


def make_chain(root: Path, depth: int, leaf: str) -> None:
    """root/d/d/.../d/leaf, DEPTH dirs deep, made with *at() calls: the path is far longer
    than PATH_MAX."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            with contextlib.suppress(FileExistsError):
                os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def chain_leaves(root: Path, depth: int) -> list[str]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT))


def remove_deep(*paths: Path) -> None:
    """shutil.rmtree recurses once per level (Python < 3.13); rm walks with a stack."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", *map(str, paths)], check=True)


def test_a_tree_ten_thousand_levels_deep_merges_with_a_descriptor_per_level(layers):
    try:
        for name in ("upper", "target", "image"):
            make_chain(layers / name, DEPTH, name)
        result = subprocess.run(
            [str(engine_path()), "apply", "--below", str(layers / "image"), str(layers / "upper"), str(layers / "target")],
            capture_output=True,
            timeout=300,
            preexec_fn=limit_descriptors,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-500:]
        assert chain_leaves(layers / "target", DEPTH) == ["target", "upper"]
    finally:
        remove_deep(*(layers / name for name in ("upper", "target", "image", "upper.trash")))
