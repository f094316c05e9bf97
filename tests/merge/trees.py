"""Directory trees as data, overlay mounts, and the merge engine, for the merge tests.

`tree_state` reads everything a desktop's user could tell apart about a tree: names (any bytes),
types, modes, owners, times, content, symlink targets, device numbers, xattrs and which names
share an inode. Two trees are the same for the merge when their states are equal.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from labvm.remote.helpers import compiled_from_source

REPO = Path(__file__).resolve().parents[2]
ENGINE_SOURCE = REPO / "native" / "labvm_merge.c"
OVERLAY_PREFIX = b"trusted.overlay."
# Since Linux 6.7 a trusted.overlay.X that a user sets through an overlay is stored in the upper
# as trusted.overlay.overlay.X, and shown back as trusted.overlay.X from any layer.
ESCAPED_PREFIX = b"trusted.overlay.overlay."


def desktop_overlay_options() -> tuple[str, ...]:
    """_stack.py's OVERLAY_FIXED_OPTIONS, read from its source: importing the helper module here
    would pull the whole bundle into the test process."""
    tree = ast.parse((REPO / "scripts" / "node_helpers" / "_stack.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OVERLAY_FIXED_OPTIONS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("_stack.py defines no OVERLAY_FIXED_OPTIONS")


OVERLAY_FIXED_OPTIONS = desktop_overlay_options()


def engine_path() -> Path:
    """The engine as the helper bundle carries it in a source checkout."""
    return compiled_from_source(ENGINE_SOURCE)


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    size: int | None
    digest: str | None
    target: bytes | None
    rdev: int | None
    xattrs: tuple[tuple[bytes, bytes], ...]
    links: frozenset[bytes] = frozenset()  # the other names of this inode


# A name a directory lists but that cannot be looked up: a whiteout the kernel did not hide.
GHOST = Entry("ghost", 0, 0, 0, None, None, None, None, None, ())

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def content_digest(path: bytes) -> str:
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def shown_xattr(key: bytes) -> bytes | None:
    """KEY of a layer's file as an overlay over the layer shows it; None for overlay's own."""
    if key.startswith(ESCAPED_PREFIX):
        return OVERLAY_PREFIX + key[len(ESCAPED_PREFIX) :]
    return None if key.startswith(OVERLAY_PREFIX) else key


def xattrs_of(path: bytes, xattrs: str) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    found = []
    for name in names:
        key = os.fsencode(name)
        shown = shown_xattr(key) if xattrs == "layer" else key
        if shown is not None:
            found.append((shown, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(sorted(found))


def entry_of(path: bytes, st: os.stat_result, times: bool, xattrs: str, time_step_ns: int = 1) -> Entry:
    kind = KINDS[stat.S_IFMT(st.st_mode)]
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns // time_step_ns * time_step_ns if times else None,
        size=st.st_size if kind == "file" else None,
        digest=content_digest(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else None,
        xattrs=xattrs_of(path, xattrs),
    )


def tree_state(root, *, times: bool = True, xattrs: str = "layer", time_step_ns: int = 1) -> dict[bytes, Entry]:
    """relative path (b"" for the root) -> Entry. xattrs: "layer" reads ROOT as a layer, the
    xattrs as an overlay over it would show them (its own left out, escaped ones unescaped);
    "mounted" and "raw" take them as listed, for an overlay mount (the kernel has done that
    already) or for a layer's bookkeeping. time_step_ns: the resolution of times to compare
    (MooseFS keeps whole seconds)."""
    root = os.fsencode(root)
    entries: dict[bytes, Entry] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    pending = [b""]
    while pending:
        relative = pending.pop()
        path = os.path.join(root, relative) if relative else root
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            entries[relative] = GHOST
            continue
        entries[relative] = entry_of(path, st, times, xattrs, time_step_ns)
        if stat.S_ISDIR(st.st_mode):
            pending += [os.path.join(relative, name) if relative else name for name in os.listdir(path)]
        else:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(relative)
    for names in inodes.values():
        for name in names:
            others = frozenset(names) - {name}
            if others:
                entries[name] = _with_links(entries[name], others)
    return entries


def without_ghosts(state: dict[bytes, Entry]) -> dict[bytes, Entry]:
    return {name: entry for name, entry in state.items() if entry != GHOST}


def _with_links(entry: Entry, links: frozenset[bytes]) -> Entry:
    return Entry(**{**entry.__dict__, "links": links})


def differences(expected: dict[bytes, Entry], actual: dict[bytes, Entry], limit: int = 20) -> list[str]:
    lines = []
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want != got:
            lines.append(f"{name!r}:\n    expected {want}\n    got      {got}")
    return lines[:limit]


def assert_same_tree(expected: dict[bytes, Entry], actual: dict[bytes, Entry]) -> None:
    lines = differences(expected, actual)
    assert not lines, "trees differ:\n" + "\n".join(lines)


# --- overlay mounts -------------------------------------------------------------------------

MNT_DETACH = 2


def mount_overlay(merged, lowers, upper=None, work=None) -> None:
    """The desktop's overlay: lowerdir=lowers (top first), the fixed options of _stack.py. Without
    an upper it is read-only and needs two lowers at least."""
    options = ["lowerdir=" + ":".join(str(lower) for lower in lowers)]
    if upper is not None:
        options += [f"upperdir={upper}", f"workdir={work}"]
    options += list(OVERLAY_FIXED_OPTIONS)
    subprocess.run(["mount", "-t", "overlay", "labvm-merge-test", "-o", ",".join(options), str(merged)], check=True)


def unmount(path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(str(path)), 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(path))


def detach(path) -> None:
    ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(str(path)), MNT_DETACH)


def view_of(lowers, scratch: Path, times: bool = True, time_step_ns: int = 1) -> dict[bytes, Entry]:
    """What a read-only overlay of lowers shows."""
    merged = scratch / "view"
    merged.mkdir()
    mount_overlay(merged, lowers)
    try:
        return tree_state(merged, times=times, xattrs="mounted", time_step_ns=time_step_ns)
    finally:
        unmount(merged)
        merged.rmdir()


# --- the engine and copies ------------------------------------------------------------------


def copy_tree(source, destination) -> None:
    subprocess.run(["cp", "-a", "--", str(source), str(destination)], check=True)


def run_engine(upper, target, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(engine_path()), "apply", *args, str(upper), str(target)], capture_output=True, env=env, timeout=120
    )


# --- making layers --------------------------------------------------------------------------


def make_whiteout(path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def mark_opaque(path, value: bytes = b"y") -> None:
    os.setxattr(path, b"trusted.overlay.opaque", value, follow_symlinks=False)


def overlay_marks(root) -> dict[bytes, str]:
    """Where a tree holds overlay markers: path -> 'whiteout', 'opaque=<value>' or the name of
    any other of overlay's own xattrs (an escaped one is a user's, no marker)."""
    marks = {}
    for name, entry in tree_state(root, times=False, xattrs="raw").items():
        if entry.kind == "chardev" and entry.rdev == 0:
            marks[name] = "whiteout"
        for key, value in entry.xattrs:
            if key == b"trusted.overlay.opaque":
                marks[name] = "opaque=" + value.decode(errors="replace")
            elif shown_xattr(key) is None:
                marks[name] = key.decode()
    return marks
