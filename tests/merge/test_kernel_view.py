"""The merge against the kernel: whatever a member does to the desktop's files, publishing the
upper layer must show exactly what their overlay showed.

Each example builds layers, mounts them as the desktop's overlay (_stack.py's options), runs a
generated sequence of file operations through it, and records the kernel's view. Then it
merges a copy of the upper into a copy of the lower with labvm_merge and compares:

- over the image (what publish does): the lower is itself a layer over an image layer, with
  whiteouts and opaque dirs of its own. The merged layer mounted over the same image must show
  what the three layers showed: with --below the image, exactly; without, the same files, but
  a whiteout kept where the image had nothing to hide may show as a name that cannot be
  opened.
- --flatten: the merged tree itself must equal the view, and hold no overlay markers.
"""

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .trees import (
    assert_same_tree,
    copy_tree,
    make_whiteout,
    mark_opaque,
    mount_overlay,
    overlay_marks,
    run_engine,
    tree_state,
    unmount,
    view_of,
    without_ghosts,
)

# One name holds a newline, a backslash and a byte that is not UTF-8: names are bytes.
NAMES = (b"a", b"b", b"w\n\\\xff")
UIDS = (0, 1000, 4321)
FILE_MODES = (0o644, 0o600, 0o755, 0o4755)
DIR_MODES = (0o755, 0o700, 0o1777, 0o2755)
XATTR_NAMES = (b"user.one", b"user.two")
# A member may set overlay's own names on their files (root in the desktop); the kernel stores
# them escaped (trusted.overlay.overlay.X), so a published version holds that form.
MEMBER_XATTR_NAMES = XATTR_NAMES + (b"trusted.overlay.foo", b"trusted.overlay.opaque", b"trusted.overlay.whiteout")
LAYER_XATTR_NAMES = XATTR_NAMES + (b"trusted.overlay.overlay.foo", b"trusted.overlay.overlay.opaque")
# Never a path that exists on the host: an operation that follows a link must not reach it.
SYMLINK_TARGETS = (b"a", b"../b", b"/labvm-test-nowhere", b"w\n\\\xff")

SETTINGS = settings(
    max_examples=500,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple)
contents = st.binary(max_size=48)

LAYER_ENTRIES = st.one_of(
    st.tuples(st.just("file"), paths, contents, st.sampled_from(FILE_MODES)),
    st.tuples(st.just("dir"), paths, st.sampled_from(DIR_MODES)),
    st.tuples(st.just("symlink"), paths, st.sampled_from(SYMLINK_TARGETS)),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("fifo"), paths),
    st.tuples(st.just("xattr"), paths, st.sampled_from(LAYER_XATTR_NAMES), st.binary(max_size=8)),
    st.tuples(st.just("owner"), paths, st.sampled_from(UIDS), st.sampled_from(UIDS)),
)
# A published version is a layer: whiteouts and opaque dirs of its own, hiding the image.
LOWER_LAYER_ENTRIES = st.one_of(LAYER_ENTRIES, st.tuples(st.just("whiteout"), paths), st.tuples(st.just("opaque"), paths))

OPERATIONS = st.one_of(
    st.tuples(st.just("write"), paths, contents),
    st.tuples(st.just("append"), paths, contents),
    st.tuples(st.just("truncate"), paths, st.integers(0, 64)),
    st.tuples(st.just("sparse"), paths),
    st.tuples(st.just("mkdir"), paths, st.sampled_from(DIR_MODES)),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("rmtree"), paths),
    st.tuples(st.just("replace_dir"), paths, contents),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from(FILE_MODES + DIR_MODES)),
    st.tuples(st.just("chown"), paths, st.sampled_from(UIDS), st.sampled_from(UIDS)),
    st.tuples(st.just("setxattr"), paths, st.sampled_from(MEMBER_XATTR_NAMES), st.binary(max_size=8)),
    st.tuples(st.just("removexattr"), paths, st.sampled_from(MEMBER_XATTR_NAMES)),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("symlink"), paths, st.sampled_from(SYMLINK_TARGETS)),
    st.tuples(st.just("mkfifo"), paths),
    st.tuples(st.just("mknod"), paths),
)

layers = st.lists(LAYER_ENTRIES, max_size=12)
lower_layers = st.lists(LOWER_LAYER_ENTRIES, max_size=12)
operations = st.lists(OPERATIONS, max_size=14)


def join(root: Path, path: tuple) -> bytes:
    return os.path.join(os.fsencode(root), *path)


# --- building a layer -----------------------------------------------------------------------


def ensure_parents(root: Path, path: tuple) -> bool:
    """Create the missing parent dirs of path; False when a parent is not a directory."""
    for depth in range(1, len(path)):
        parent = join(root, path[:depth])
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(parent).st_mode):
                return False
    return True


def build_layer(root: Path, entries: list) -> None:
    root.mkdir()
    for kind, path, *args in entries:
        if not ensure_parents(root, path):
            continue
        try:
            add_layer_entry(root, kind, join(root, path), args)
        except OSError:
            pass  # the name is taken, or its type does not allow it: the layer simply lacks it


def add_layer_entry(root: Path, kind: str, target: bytes, args: list) -> None:
    if kind == "file":
        content, mode = args
        with open(target, "xb") as stream:
            stream.write(content)
        os.chmod(target, mode)
    elif kind == "dir":
        os.mkdir(target)
        os.chmod(target, args[0])
    elif kind == "symlink":
        os.symlink(args[0], target)
    elif kind == "link":
        os.link(join(root, args[0]), target, follow_symlinks=False)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "xattr":
        os.setxattr(target, args[0], args[1], follow_symlinks=False)
    elif kind == "owner":
        os.lchown(target, args[0], args[1])
    elif kind == "whiteout":
        make_whiteout(target)
    elif kind == "opaque":
        if stat.S_ISDIR(os.lstat(target).st_mode):
            mark_opaque(target)


# --- what the member does -------------------------------------------------------------------


# O_NONBLOCK: opening a FIFO the member made for writing must fail, not wait for a reader.
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW


def apply_operation(merged: Path, operation: tuple) -> None:
    kind, path, *args = operation
    target = join(merged, path)
    creates = kind in ("write", "append", "sparse", "mkdir", "replace_dir", "symlink", "mkfifo", "mknod")
    if creates and not ensure_parents(merged, path):
        return
    if kind in ("write", "append"):
        flags = OPEN_FLAGS | (os.O_APPEND if kind == "append" else os.O_TRUNC)
        fd = os.open(target, flags, 0o644)
        try:
            os.write(fd, args[0])
        finally:
            os.close(fd)
    elif kind == "truncate":
        fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, args[0])
        finally:
            os.close(fd)
    elif kind == "sparse":
        fd = os.open(target, OPEN_FLAGS | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, b"end", 1 << 20)
        finally:
            os.close(fd)
    elif kind == "mkdir":
        os.mkdir(target, args[0])
    elif kind == "unlink":
        os.unlink(target)
    elif kind == "rmdir":
        os.rmdir(target)
    elif kind == "rmtree":
        remove_any(target)
    elif kind == "replace_dir":
        remove_any(target)
        os.mkdir(target)
        fd = os.open(os.path.join(target, b"inside"), OPEN_FLAGS, 0o644)
        try:
            os.write(fd, args[0])
        finally:
            os.close(fd)
    elif kind == "rename":
        rename_like_mv(target, join(merged, args[0]))
    elif kind == "chmod":
        if not os.path.islink(target):
            os.chmod(target, args[0])
    elif kind == "chown":
        os.lchown(target, args[0], args[1])
    elif kind == "setxattr":
        os.setxattr(target, args[0], args[1], follow_symlinks=False)
    elif kind == "removexattr":
        os.removexattr(target, args[0], follow_symlinks=False)
    elif kind == "link":
        os.link(target, join(merged, args[0]), follow_symlinks=False)
    elif kind == "symlink":
        os.symlink(args[0], target)
    elif kind == "mkfifo":
        os.mkfifo(target)
    elif kind == "mknod":
        os.mknod(target, stat.S_IFCHR | 0o644, os.makedev(1, 3))


def remove_any(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def rename_like_mv(source: bytes, destination: bytes) -> None:
    """A directory that came from a lower layer cannot be renamed with redirect_dir=off
    (EXDEV): mv then copies it and deletes the original, and so does this."""
    try:
        os.rename(source, destination)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        if os.path.lexists(destination):
            remove_any(destination)
        shutil.copytree(source, destination, symlinks=True)
        shutil.rmtree(source)


def run_member(merged: Path, ops: list) -> None:
    for operation in ops:
        try:
            apply_operation(merged, operation)
        except (OSError, shutil.Error):
            pass  # refused by the kernel, as it would be for the member


# --- one example ----------------------------------------------------------------------------


@dataclass
class Example:
    root: Path

    def __getattr__(self, name):
        return self.root / name


def desktop_session(ex: Example, lowers: list, ops: list) -> dict:
    """Mount lowers + an empty upper as the desktop does, let the member work, and return what
    the kernel showed at the end."""
    for name in ("upper", "work", "merged"):
        getattr(ex, name).mkdir()
    mount_overlay(ex.merged, lowers, ex.upper, ex.work)
    try:
        run_member(ex.merged, ops)
        return tree_state(ex.merged, xattrs="mounted")
    finally:
        unmount(ex.merged)


def merged_layer(ex: Example, name: str, *engine_args: str) -> Path:
    """A copy of the upper merged into a copy of the lower: the engine uses up its upper."""
    upper, target = ex.root / f"{name}.upper", ex.root / name
    copy_tree(ex.upper, upper)
    copy_tree(ex.lower, target)
    result = run_engine(upper, target, *engine_args)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return target


def assert_only_layer_marks(target: Path) -> None:
    stray = {name: mark for name, mark in overlay_marks(target).items() if mark not in ("whiteout", "opaque=y")}
    assert not stray, f"overlay bookkeeping published: {stray}"


@pytest.fixture(scope="module")
def examples_root(scratch_fs):
    return scratch_fs


def fresh_example(root: Path) -> Example:
    return Example(Path(tempfile.mkdtemp(dir=root)))


@SETTINGS
@given(image=layers, lower=lower_layers, ops=operations)
@example(  # an opaque dir replacing an image dir: the image's files must stay hidden
    image=[("file", (b"a", b"b"), b"image", 0o644)], lower=[], ops=[("replace_dir", (b"a",), b"mine")]
)
@example(  # a member deletes an image file: the whiteout is published
    image=[("file", (b"a",), b"image", 0o644)], lower=[("dir", (b"b",), 0o755)], ops=[("unlink", (b"a",))]
)
@example(  # a dir over a whiteout of the lower layer hides the image's dir
    image=[("file", (b"a", b"a"), b"image", 0o644)], lower=[("whiteout", (b"a",))], ops=[("mkdir", (b"a",), 0o755)]
)
@example(  # a merged dir that was opaque in the lower layer stays opaque
    image=[("file", (b"a", b"b"), b"image", 0o644)],
    lower=[("dir", (b"a",), 0o755), ("opaque", (b"a",))],
    ops=[("write", (b"a", b"a"), b"new")],
)
@example(  # a member's trusted.overlay.* xattrs: marker names, but theirs, not overlay's markers
    image=[("file", (b"a", b"b"), b"image", 0o644)],
    lower=[("dir", (b"a",), 0o755), ("file", (b"b",), b"", 0o644)],
    ops=[
        ("setxattr", (b"a",), b"trusted.overlay.opaque", b"y"),
        ("setxattr", (b"b",), b"trusted.overlay.whiteout", b"y"),
        ("setxattr", (b"a", b"b"), b"trusted.overlay.foo", b"mine"),
        ("mkdir", (b"w\n\\\xff",), 0o755),
        ("setxattr", (b"w\n\\\xff",), b"trusted.overlay.opaque", b"y"),
    ],
)
@example(  # a published version's escaped xattr, removed by the member
    image=[],
    lower=[("file", (b"a",), b"x", 0o644), ("xattr", (b"a",), b"trusted.overlay.overlay.foo", b"old")],
    ops=[("removexattr", (b"a",), b"trusted.overlay.foo")],
)
def test_merged_layer_over_the_image_shows_what_the_desktop_showed(examples_root, image, lower, ops):
    ex = fresh_example(examples_root)
    try:
        build_layer(ex.image, image)
        build_layer(ex.lower, lower)
        expected = desktop_session(ex, [ex.lower, ex.image], ops)
        (ex.root / "scratch").mkdir()

        exact = merged_layer(ex, "exact", "--below", str(ex.image))
        assert_same_tree(expected, view_of([exact, ex.image], ex.root / "scratch"))
        assert_only_layer_marks(exact)

        unknown = merged_layer(ex, "unknown")
        shown = view_of([unknown, ex.image], ex.root / "scratch")
        assert_same_tree(without_ghosts(expected), without_ghosts(shown))
        assert_only_layer_marks(unknown)
    finally:
        shutil.rmtree(ex.root)


@SETTINGS
@given(lower=layers, ops=operations)
@example(lower=[("file", (b"a", b"b"), b"x", 0o644)], ops=[("rename", (b"a",), (b"b",))])
@example(lower=[("file", (b"a",), b"x", 0o644), ("link", (b"b",), (b"a",))], ops=[("append", (b"a",), b"y")])
@example(lower=[("dir", (b"a",), 0o755)], ops=[("setxattr", (b"a",), b"trusted.overlay.opaque", b"y")])
def test_flattened_merge_is_the_kernel_view(examples_root, lower, ops):
    ex = fresh_example(examples_root)
    try:
        build_layer(ex.lower, lower)
        expected = desktop_session(ex, [ex.lower], ops)
        target = merged_layer(ex, "flat", "--flatten")
        assert_same_tree(expected, tree_state(target))
        assert overlay_marks(target) == {}
    finally:
        shutil.rmtree(ex.root)
