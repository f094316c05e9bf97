"""files: read and repair files inside one desktop's root, merge_local, from the node.

Actions:
  locate  what a path in the desktop is: type, size, mode, owner; a symlink's target text
  read    a regular file's content, base64, up to max_bytes; with version and mfs_mount, from
          that published version on MooseFS (<mfs_mount>/vms/<user>/low_mfs.v<N>) instead
  write   create or replace a regular file: a temp file in the same directory, fchown, fchmod,
          fsync, rename; keeps the existing mode and owner unless told otherwise

The tree is the lab member's, and they can plant a symlink anywhere in it: to /etc/shadow, or to
/. Opened by name on the node, such a path would reach the node's own files. So a path is walked
one component at a time, each opened with O_NOFOLLOW relative to the descriptor of the one
before, starting from a descriptor on the mounted overlay itself. A symlink anywhere on the path
is refused by name; nothing outside the desktop is ever opened.
"""

import base64
import binascii
import errno
import os
import stat
from contextlib import contextmanager
from typing import Any

from _contract import (
    Action,
    BadRequest,
    Failed,
    Param,
    PreconditionFailed,
    Result,
    absolute_path,
    integer_between,
    layer_path,
    shorten,
    shown_value,
    user_name,
)
from _layout import VmPaths, mfs_user_dir, version_path
from _system import mount_at, read_mountinfo, write_atomically

MIB = 1024 * 1024
DEFAULT_MAX_READ_BYTES = 64 * MIB
DEFAULT_NEW_FILE_MODE = 0o644
TEMP_PREFIX = ".labvm-files-"

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the type check must not hang the helper on open.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

FILE_TYPES = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"))
NOTHING_THERE = {"type": "missing", "size": None, "mode": None, "uid": None, "gid": None, "mtime": None, "target": None}


class PathMissing(PreconditionFailed):
    default_code = "not_found"


# --- parameters ---------------------------------------------------------------------------


def desktop_path(name: str, value: Any) -> str:
    """An absolute path inside the desktop, spelled plainly. '..' is refused rather than
    resolved, and so are '.' and empty components: one file has one spelling."""
    path = absolute_path(name, value)
    if path != value or path.startswith("//"):
        raise BadRequest(
            f"param {name!r} must be a plain absolute path: no '..', '.' or empty components, got {shown_value(name, value)}",
            "bad_param",
        )
    return path


def base64_content(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"param {name!r} must be a base64 string", "bad_param")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"param {name!r} is not valid base64", "bad_param") from None


STACK_PARAMS = {"user": Param(user_name, required=True), "data_dir": Param(layer_path, required=True)}
LOCATE_PARAMS = {**STACK_PARAMS, "path": Param(desktop_path, default="/")}
READ_PARAMS = {
    **STACK_PARAMS,
    "path": Param(desktop_path, required=True),
    "max_bytes": Param(integer_between(0, 256 * MIB), default=DEFAULT_MAX_READ_BYTES),
    "version": Param(integer_between(0, 2**31 - 1)),
    "mfs_mount": Param(layer_path),
}
OWNER_ID = integer_between(0, 2**32 - 2)  # 2**32 - 1 is chown's "leave unchanged"
WRITE_PARAMS = {
    **STACK_PARAMS,
    "path": Param(desktop_path, required=True),
    "content_b64": Param(base64_content, required=True),
    "mode": Param(integer_between(0, 0o7777)),
    "uid": Param(OWNER_ID),
    "gid": Param(OWNER_ID),
}


# --- walking the desktop without following symlinks ---------------------------------------


def split_path(path: str) -> tuple[list[str], str | None]:
    """(directories, final name); the name is None for the desktop's root itself."""
    parts = path.split("/")[1:] if path != "/" else []
    return parts[:-1], (parts[-1] if parts else None)


def host_path(merge_local: str, path: str) -> str:
    return merge_local if path == "/" else merge_local + path


@contextmanager
def descriptor(fd: int):
    try:
        yield fd
    finally:
        os.close(fd)


def descriptor_mount_id(fd: int) -> int | None:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as stream:
        for line in stream:
            key, _, value = line.partition(":")
            if key == "mnt_id":
                return int(value)
    return None


def open_stack_root(merge_local: str) -> int | None:
    """An O_PATH descriptor on the root of the overlay mounted at merge_local, or None when
    none is. Checked by mount id, not only by path: unmounted meanwhile, merge_local is a bare
    directory on the node's disk, and a file written there would vanish under the next mount."""
    entry = mount_at(read_mountinfo(), merge_local)
    if entry is None or entry.fstype != "overlay":
        return None
    try:
        fd = os.open(merge_local, DIR_FLAGS)
    except OSError:
        return None
    if descriptor_mount_id(fd) != entry.mount_id:
        os.close(fd)
        return None
    return fd


@contextmanager
def mounted_stack_root(merge_local: str):
    fd = open_stack_root(merge_local)
    if fd is None:
        raise PreconditionFailed(f"{merge_local} is not mounted; start the desktop first", "stack_not_mounted")
    with descriptor(fd):
        yield fd


def symlink_target(dir_fd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def symlink_refused(walked: str, target: str) -> PreconditionFailed:
    return PreconditionFailed(
        f"{walked} in the desktop is a symlink (-> {shorten(repr(target), 120)}); refusing to follow it", "symlink_in_path"
    )


def walk_error(error: OSError, dir_fd: int, name: str, walked: str) -> Exception:
    if error.errno in (errno.ENOTDIR, errno.ELOOP):
        target = symlink_target(dir_fd, name)
        if target is not None:
            return symlink_refused(walked, target)
        if error.errno == errno.ENOTDIR:
            return PreconditionFailed(f"{walked} in the desktop is not a directory", "not_a_directory")
    if error.errno == errno.ENOENT:
        return PathMissing(f"{walked} does not exist in the desktop")
    return Failed(f"cannot open {walked} in the desktop: {error.strerror}", "io_failed")


def open_directory(root_fd: int, parts: list[str]) -> int:
    """An O_PATH descriptor on /parts..., each component a real directory."""
    fd = os.dup(root_fd)
    walked = ""
    try:
        for part in parts:
            walked += "/" + part
            try:
                next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                raise walk_error(error, fd, part, walked) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def lstat_entry(dir_fd: int, name: str, path: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise walk_error(error, dir_fd, name, path) from None


def require_regular(dir_fd: int, name: str, path: str, entry: os.stat_result) -> None:
    if stat.S_ISLNK(entry.st_mode):
        raise symlink_refused(path, symlink_target(dir_fd, name) or "?")
    if not stat.S_ISREG(entry.st_mode):
        raise PreconditionFailed(f"{path} in the desktop is not a regular file (it is {kind_of(entry.st_mode)})", "not_a_file")


def open_regular(dir_fd: int, name: str, path: str) -> tuple[int, os.stat_result]:
    """The file opened for reading, and its fstat. The type is checked before the open, so a
    device is never opened, and again after it, on what was actually opened."""
    entry = lstat_entry(dir_fd, name, path)
    if entry is None:
        raise PathMissing(f"{path} does not exist in the desktop")
    require_regular(dir_fd, name, path, entry)
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        raise walk_error(error, dir_fd, name, path) from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        raise PreconditionFailed(f"{path} in the desktop changed while it was opened; try again", "not_a_file")
    return fd, opened


def read_up_to(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, MIB))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def file_type(mode: int) -> str:
    return next((name for is_type, name in FILE_TYPES if is_type(mode)), "other")


KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))


def kind_of(mode: int) -> str:
    """What a file is, in words for a message: 'a directory', 'a FIFO', ..."""
    return next((name for is_kind, name in KINDS if is_kind(mode)), "of an unknown kind")


def attributes(entry: os.stat_result) -> dict:
    return {
        "size": entry.st_size,
        "mode": stat.S_IMODE(entry.st_mode),
        "uid": entry.st_uid,
        "gid": entry.st_gid,
        "mtime": entry.st_mtime,
    }


# --- locate -------------------------------------------------------------------------------


def locate(params: dict, _check: bool) -> Result:
    merge_local, path = VmPaths.of(params["data_dir"], params["user"]).merge_local, params["path"]
    data = {"root": merge_local, "host_path": host_path(merge_local, path)}
    root_fd = open_stack_root(merge_local)
    if root_fd is None:
        # Not mounted: merge_local is an empty mount point, which says nothing about the desktop.
        return Result(changed=False, data={**data, "mounted": False, **NOTHING_THERE, "type": None})
    with descriptor(root_fd):
        return Result(changed=False, data={**data, "mounted": True, **describe(root_fd, path)})


def describe(root_fd: int, path: str) -> dict:
    directories, name = split_path(path)
    if name is None:
        return {**attributes(os.stat(root_fd)), "type": "dir", "target": None}
    try:
        parent_fd = open_directory(root_fd, directories)
    except PathMissing:
        return dict(NOTHING_THERE)
    with descriptor(parent_fd):
        entry = lstat_entry(parent_fd, name, path)
        if entry is None:
            return dict(NOTHING_THERE)
        is_link = stat.S_ISLNK(entry.st_mode)
        target = symlink_target(parent_fd, name) if is_link else None
    return {**attributes(entry), "type": file_type(entry.st_mode), "target": target}


# --- read ---------------------------------------------------------------------------------


@contextmanager
def version_root(mfs_mount: str, user: str, version: int):
    """A descriptor on a published version's root. A version holds only what the member changed
    over the shared desktop image, so a file missing here may still be in the desktop."""
    if mount_at(read_mountinfo(), mfs_mount) is None:
        raise PreconditionFailed(f"MooseFS is not mounted at {mfs_mount}", "mfs_not_mounted")
    root = version_path(mfs_user_dir(mfs_mount, user), version)
    try:
        fd = os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        raise PathMissing(f"{user} has no version {version}; see labvm versions {user}", "no_such_version") from None
    with descriptor(fd):
        yield fd


def read_root(params: dict):
    if params["version"] is None:
        return VmPaths.of(params["data_dir"], params["user"]).merge_local, mounted_stack_root
    if params["mfs_mount"] is None:
        raise BadRequest("param 'mfs_mount' is required with 'version'", "bad_param")
    root = version_path(mfs_user_dir(params["mfs_mount"], params["user"]), params["version"])
    return root, lambda _root: version_root(params["mfs_mount"], params["user"], params["version"])


def read_file(params: dict, _check: bool) -> Result:
    path, limit = params["path"], params["max_bytes"]
    merge_local, open_root = read_root(params)
    directories, name = split_path(path)
    if name is None:
        raise PreconditionFailed("/ is the desktop's root directory, not a file", "not_a_file")
    with open_root(merge_local) as root_fd, descriptor(open_directory(root_fd, directories)) as parent_fd:
        fd, entry = open_regular(parent_fd, name, path)
        with descriptor(fd):
            if entry.st_size > limit:
                raise too_large(path, entry.st_size, limit)
            content = read_up_to(fd, limit + 1)
    if len(content) > limit:
        raise too_large(path, len(content), limit)
    data = {"root": merge_local, "host_path": host_path(merge_local, path), **attributes(entry), "size": len(content)}
    return Result(changed=False, data={**data, "content_b64": base64.b64encode(content).decode("ascii")})


def too_large(path: str, size: int, limit: int) -> PreconditionFailed:
    return PreconditionFailed(f"{path} in the desktop is {size} bytes, more than the {limit} allowed", "too_large")


# --- write --------------------------------------------------------------------------------


def write_file(params: dict, check: bool) -> Result:
    merge_local, path, content = VmPaths.of(params["data_dir"], params["user"]).merge_local, params["path"], params["content_b64"]
    directories, name = split_path(path)
    if name is None:
        raise PreconditionFailed("/ is the desktop's root directory, not a file", "not_a_file")
    with mounted_stack_root(merge_local) as root_fd, descriptor(open_directory(root_fd, directories)) as parent_fd:
        existing = lstat_entry(parent_fd, name, path)
        if existing is not None:
            require_regular(parent_fd, name, path, existing)
        mode, uid, gid = wanted = wanted_attributes(params, existing, os.stat(parent_fd))
        data = {"root": merge_local, "host_path": host_path(merge_local, path), "size": len(content)}
        data.update(mode=mode, uid=uid, gid=gid, created=existing is None)
        if existing is not None and same_file(parent_fd, name, path, content, wanted):
            return Result(changed=False, data=data)
        if not check:
            try:
                replace_file(parent_fd, name, content, *wanted)
            except OSError as error:
                raise Failed(f"cannot write {path} in the desktop: {error.strerror}", "write_failed") from None
    return Result(changed=True, data=data)


def wanted_attributes(params: dict, existing: os.stat_result | None, parent: os.stat_result) -> tuple[int, int, int]:
    """(mode, uid, gid): as asked, else as the file has them. A new file gets 0644 and the
    owner of its directory: in a home, that is the lab member."""
    like = existing or parent
    default_mode = stat.S_IMODE(existing.st_mode) if existing else DEFAULT_NEW_FILE_MODE
    mode, uid, gid = params["mode"], params["uid"], params["gid"]
    return (
        default_mode if mode is None else mode,
        like.st_uid if uid is None else uid,
        like.st_gid if gid is None else gid,
    )


def same_file(dir_fd: int, name: str, path: str, content: bytes, wanted: tuple[int, int, int]) -> bool:
    fd, entry = open_regular(dir_fd, name, path)
    with descriptor(fd):
        if (stat.S_IMODE(entry.st_mode), entry.st_uid, entry.st_gid) != wanted or entry.st_size != len(content):
            return False
        return read_up_to(fd, len(content) + 1) == content


def replace_file(dir_fd: int, name: str, content: bytes, mode: int, uid: int, gid: int) -> None:
    """Atomically: a reader in the desktop sees the old file or the new one, never half of it.
    rename replaces whatever is at name by now, a symlink included, without following it."""
    write_atomically(name, content, mode, (uid, gid), dir_fd=dir_fd, temporary=TEMP_PREFIX + os.urandom(8).hex())


ACTIONS = {
    "locate": Action(run=locate, params=LOCATE_PARAMS),
    "read": Action(run=read_file, params=READ_PARAMS),
    "write": Action(run=write_file, params=WRITE_PARAMS),
}
