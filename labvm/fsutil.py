"""Files saved atomically, and private files that stay private."""

from __future__ import annotations

import os
import pwd
import shlex
import stat
import tempfile
from pathlib import Path

from .errors import InsecureFile


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def require_private(path: Path) -> None:
    """Refuse a secret-bearing file that group or others can read or write, or that another
    user owns."""
    require_safe(path, os.stat(path), secret=True)


def require_safe(path: Path, found: os.stat_result, secret: bool = False) -> None:
    """Refuse what labvm trusts (its state, keys, cluster file, their directory) if another user
    owns it or could change it; a secret must also be unreadable by group and others. The
    message ends with the command that fixes it."""
    me = os.geteuid()
    if found.st_uid != me:
        raise InsecureFile(path=path, problem=f"is owned by uid {found.st_uid}, not by {_user_name(me)} who runs labvm",
                           fix=f"chown {_user_name(me)} {shlex.quote(str(path))}")
    mode = stat.S_IMODE(found.st_mode)
    if secret and mode & 0o077:
        raise InsecureFile(path=path, problem=f"is readable or writable by others (mode {mode:04o})",
                           fix=f"chmod 600 {shlex.quote(str(path))}")
    if mode & 0o022:
        raise InsecureFile(path=path, problem=f"is writable by group or others (mode {mode:04o})",
                           fix=f"chmod go-w {shlex.quote(str(path))}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def create_private(path: Path, data: bytes) -> None:
    """Create a 0600 file that must not exist yet (FileExistsError: never clobber a key).

    The data goes to a temp file made 0600 by os.open itself (O_EXCL), so no one else can
    read it even for a moment, and is linked into place whole: a crash leaves either no file
    or the complete one under its name, never half a key."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # unlike a rename, refuses a path that exists
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
