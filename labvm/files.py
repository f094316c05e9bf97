"""Files inside a lab member's desktop, read and repaired from the admin host.

The node's `files` helper does the work on the mounted overlay (merge_local), walking each path
without following the symlinks a member may have planted. This side validates paths, finds the
desktop's node, and moves the content in base64 within the helper's JSON request and reply.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .admin import AdminHome
from .config import Node
from .desktops import Desktops, NodeSession
from .errors import AlreadyExists, BadInput, HelperFailed, NotFound
from .fsutil import atomic_write
from .names import validate_user_name
from .remote.recipes import mount_mfs
from .retention import check_version

MIB = 1024 * 1024
MAX_GET_BYTES = 64 * MIB
# A helper request is at most 1 MiB of JSON and content travels in it as base64 (4/3 larger).
MAX_PUT_BYTES = 512 * 1024
MAX_PATH_CHARS = 4096
# What arrives from a desktop is the member's data: private on the admin host.
DEST_MODE = 0o600


def desktop_path(path: str) -> str:
    """An absolute path inside the desktop, spelled as the helper wants it: '.' and empty
    components dropped; '..' refused, never resolved."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadInput(f"path {path!r} must be absolute inside the desktop, e.g. /home/alice/.bashrc")
    if any(char in path for char in "\0\n\r"):
        raise BadInput("path must not contain NUL or line breaks")
    if len(path) > MAX_PATH_CHARS:
        raise BadInput(f"path is longer than {MAX_PATH_CHARS} characters")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BadInput(f"path {path!r} must not contain '..': give the path as seen inside the desktop")
    return "/" + "/".join(parts)


def desktop_file_path(path: str) -> str:
    path = desktop_path(path)
    if path == "/":
        raise BadInput("path must name a file, not the desktop's root directory")
    return path


def file_mode(mode: int | None) -> int | None:
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise BadInput(f"mode {mode!r} must be a permission mode between 0000 and 7777 (octal)")
    return mode


@contextmanager
def desktop_session(home: AdminHome, user: str) -> Iterator[tuple[Node, NodeSession]]:
    """The node that holds the user's desktop, and a helper session on it."""
    desktops = Desktops(home)
    with home.state() as db:
        node = home.config.node(desktops.get(db, user).node)
    with desktops.session(node) as session:
        yield node, session


def stack_params(node: Node, user: str, path: str) -> dict:
    return {"user": user, "data_dir": node.data_dir, "path": path}


def locate(home: AdminHome, user: str, path: str = "/") -> dict:
    """What is at path in the desktop: {node, root, host_path, mounted, type, size, mode, uid,
    gid, mtime, target}; type is file, dir, symlink, other or missing (None if not mounted)."""
    user, path = validate_user_name(user), desktop_path(path)
    with desktop_session(home, user) as (node, session):
        data = session.call("files", "locate", stack_params(node, user, path))["data"]
    return {"node": node.name, **data}


def get_file(home: AdminHome, user: str, path: str, dest: Path, *, force: bool = False, max_bytes: int = MAX_GET_BYTES,
             version: int | None = None) -> int:
    """Copy a regular file out of the desktop (or out of one of its published versions) to dest
    (into it, if dest is a directory), written atomically and 0600. An existing dest is kept
    unless force. Returns the bytes written."""
    user, path = validate_user_name(user), desktop_file_path(path)
    if version is not None:
        check_version(version)
    dest = local_destination(Path(dest), PurePosixPath(path).name, force)
    content = read_file(home, user, path, max_bytes=max_bytes, version=version)
    atomic_write(dest, content, DEST_MODE)
    return len(content)


def read_file(home: AdminHome, user: str, path: str, *, max_bytes: int = MAX_GET_BYTES, version: int | None = None) -> bytes:
    """The content of a regular file in the desktop (or in one of its versions); a symlink, FIFO
    or device there is refused by the node's helper, which never follows a member's link."""
    user, path = validate_user_name(user), desktop_file_path(path)
    if version is not None:
        check_version(version)
    with desktop_session(home, user) as (node, session):
        params = {**stack_params(node, user, path), "max_bytes": max_bytes}
        if version is not None:
            session.run(mount_mfs(home.config))
            params.update(version=version, mfs_mount=home.config.storage.mfs_mount)
        try:
            data = session.call("files", "read", params)["data"]
        except HelperFailed as exc:
            if exc.code in ("not_found", "no_such_version"):
                raise NotFound(exc.fields["msg"] + (f" (version {version})" if version is not None else "")) from None
            raise
    return base64.b64decode(data["content_b64"])


def local_destination(dest: Path, name: str, force: bool) -> Path:
    """Where a copied-out file goes: dest, or dest/name if dest is a directory. Only a regular
    file is ever replaced (with force): the copy lands by rename, which would put a file in the
    place of a device, FIFO, socket or symlink."""
    if dest.is_dir():
        dest = dest / name
    try:
        found = dest.lstat()
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise BadInput(f"{dest.parent}: no such directory to copy into") from None
        return dest
    if not stat.S_ISREG(found.st_mode):
        raise BadInput(f"{dest} is not a regular file (it is {_kind(found.st_mode)}); give a file or directory to copy to")
    if not force:
        raise AlreadyExists(f"{dest} exists; pass --force to overwrite it")
    return dest


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "of an unknown kind")


def put_file(home: AdminHome, user: str, src: Path, path: str, mode: int | None = None, *, check: bool = False) -> bool:
    """Create or replace a regular file in the desktop with src's content. Mode and owner stay
    as they are (a new file: 0644, owned like its directory) unless mode is given. Returns
    whether anything changed (with check: would change)."""
    user, path, mode = validate_user_name(user), desktop_file_path(path), file_mode(mode)
    return write_content(home, user, read_source(Path(src)), path, mode, check=check)


def write_content(home: AdminHome, user: str, content: bytes, path: str, mode: int | None = None, *,
                  check: bool = False) -> bool:
    """put_file with the content itself (at most MAX_PUT_BYTES)."""
    user, path, mode = validate_user_name(user), desktop_file_path(path), file_mode(mode)
    if len(content) > MAX_PUT_BYTES:
        raise BadInput(f"the content is larger than {MAX_PUT_BYTES} bytes, the most a put takes")
    with desktop_session(home, user) as (node, session):
        params = {**stack_params(node, user, path), "content_b64": base64.b64encode(content).decode("ascii"), "mode": mode}
        reply = session.runner.call("files", "write", params, check=check)
    return bool(reply["changed"])


def read_source(src: Path) -> bytes:
    """src's content; anything but a regular file is refused before it is opened (a FIFO
    would block, a device could be read forever), and checked again once it is open."""
    try:
        found = os.stat(src)
        if not stat.S_ISREG(found.st_mode):
            raise BadInput(f"{src} is not a regular file (it is {_kind(found.st_mode)}); --put copies a regular file")
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadInput(f"{src} changed while it was opened; --put copies a regular file")
            content = stream.read(MAX_PUT_BYTES + 1)
    except OSError as error:
        raise BadInput(f"cannot read {src}: {error.strerror}") from None
    if len(content) > MAX_PUT_BYTES:
        raise BadInput(f"{src} is larger than {MAX_PUT_BYTES} bytes, the most labvm files --put takes")
    return content
