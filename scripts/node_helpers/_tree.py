"""Walking and deleting a lab member's trees, at any depth, without following their symlinks.

A member can make a directory chain far deeper than PATH_MAX (4096 bytes): every path-based
call below it then fails with ENAMETOOLONG, and a recursive walk (os.walk, os.fwalk,
shutil.rmtree in Python 3.11) dies of RecursionError long before. So a walk here:

- keeps its own stack of names, never the Python call stack;
- opens each directory relative to its parent's descriptor with O_NOFOLLOW|O_DIRECTORY, so a
  symlink swapped in for a directory cannot lead it anywhere (the open fails with ELOOP or
  ENOTDIR and the entry is treated as a file);
- holds two descriptors, the root's and the current directory's, whatever the depth: going up
  opens ".." and checks it is the very directory it came down from (device and inode). If it
  is not (the member moved a directory meanwhile), it goes down again from the root, name by
  name with the same checks, as far as the tree still matches;
- never enters another filesystem (a mount inside the tree), as `find -xdev`.

A removal treats whatever vanished meanwhile as removed: on MooseFS, mfsrmsnapshot deletes in
the master while the mount may still list what it deleted.
"""

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A directory that keeps refilling while it is removed is someone's live tree: give up on it.
REMOVE_RETRIES = 5


def open_dir(name, dir_fd: int | None = None) -> int:
    """A descriptor on a real directory (never through a final symlink)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


@dataclass
class Frame:
    name: str | None  # in the parent; None for the root
    ident: tuple[int, int]
    subdirs: list[str] | None = None  # still to visit; None until the directory is listed
    retries: int = 0


@dataclass
class TreeCursor:
    """Where a walk is: the stack of directories from the root down, and a descriptor on the
    deepest. Call close() when done."""

    root_fd: int
    fd: int = -1
    frames: list[Frame] = field(default_factory=list)

    @classmethod
    def at(cls, root_fd: int) -> "TreeCursor":
        root = os.dup(root_fd)
        cursor = cls(root_fd=root, fd=os.dup(root))
        cursor.frames.append(Frame(None, identity(root)))
        return cursor

    @property
    def top(self) -> Frame:
        return self.frames[-1]

    def close(self) -> None:
        for fd in (self.fd, self.root_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.root_fd = -1

    def rel(self, name: str | None = None) -> bytes:
        """The path below the root of the current directory (or of its entry NAME)."""
        parts = [os.fsencode(frame.name) for frame in self.frames[1:]]
        if name is not None:
            parts.append(os.fsencode(name))
        return b"/".join(parts)

    def descend(self, name: str) -> bool:
        """Enter the subdirectory NAME; False if it is gone or not a real directory now."""
        try:
            child = open_dir(name, self.fd)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            raise
        ident = identity(child)
        if ident[0] != self.frames[0].ident[0]:
            os.close(child)
            return False
        self.replace_fd(child)
        self.frames.append(Frame(name, ident))
        return True

    def ascend(self) -> Frame:
        """Leave the current directory for its parent; returns the frame left."""
        left = self.frames.pop()
        try:
            parent = open_dir("..", self.fd)
        except OSError:
            parent = -1
        if parent >= 0 and identity(parent) == self.top.ident:
            self.replace_fd(parent)
        else:
            if parent >= 0:
                os.close(parent)
            self.redescend()
        return left

    def redescend(self) -> None:
        """From the root down the names on the stack, as far as each is still the directory
        walked before; the frames below that point are dropped."""
        fd = os.dup(self.root_fd)
        reached = 1
        for frame in self.frames[1:]:
            try:
                child = open_dir(frame.name, fd)
            except OSError:
                break
            if identity(child) != frame.ident:
                os.close(child)
                break
            os.close(fd)
            fd = child
            reached += 1
        del self.frames[reached:]
        self.replace_fd(fd)

    def replace_fd(self, fd: int) -> None:
        os.close(self.fd)
        self.fd = fd


def list_entries(fd: int) -> list[os.DirEntry]:
    """The entries of the directory FD, read whole: the walk then goes on changing it."""
    try:
        with os.scandir(fd) as entries:
            return list(entries)
    except FileNotFoundError:
        return []  # removed while we were in it


def walk_tree(root_fd: int) -> Iterator[tuple[TreeCursor, os.DirEntry]]:
    """Every entry below root_fd that is not a directory, depth first, with the cursor whose
    fd is the entry's directory (for dir_fd calls) and whose rel() names it."""
    cursor = TreeCursor.at(root_fd)
    try:
        while cursor.frames:
            frame = cursor.top
            if frame.subdirs is None:
                frame.subdirs = []
                for entry in list_entries(cursor.fd):
                    if entry.is_dir(follow_symlinks=False):
                        frame.subdirs.append(entry.name)
                    else:
                        yield cursor, entry
            if frame.subdirs:
                cursor.descend(frame.subdirs.pop())
            elif len(cursor.frames) == 1:
                return
            else:
                cursor.ascend()
    finally:
        cursor.close()


def remove_tree(path: str) -> bool:
    """Delete path and everything below it, never following a symlink in it. False if there
    was nothing to delete. The path itself must not go through a member's symlink: callers
    check their own layout paths (refuse_symlinks, refuse_symlinked_path) first."""
    parent, name = os.path.split(os.path.abspath(path))
    parent_fd = open_dir(parent)
    try:
        return remove_entry(parent_fd, name)
    finally:
        os.close(parent_fd)


def remove_entry(parent_fd: int, name: str) -> bool:
    """Delete the entry NAME of the directory parent_fd, a tree or not."""
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        unlink_quietly(parent_fd, name)
        return True
    try:
        fd = open_dir(name, parent_fd)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return False
        if error.errno in (errno.ENOTDIR, errno.ELOOP):  # replaced meanwhile
            unlink_quietly(parent_fd, name)
            return True
        raise
    try:
        empty_tree(fd)
    finally:
        os.close(fd)
    rmdir_quietly(parent_fd, name)
    return True


def empty_tree(root_fd: int) -> None:
    """Delete everything below root_fd, keeping root_fd's directory itself."""
    cursor = TreeCursor.at(root_fd)
    try:
        while True:
            frame = cursor.top
            if frame.subdirs is None:
                frame.subdirs = clear_files(cursor.fd)
            if frame.subdirs:
                name = frame.subdirs.pop()
                if not cursor.descend(name):
                    unlink_quietly(cursor.fd, name)  # a symlink or file swapped in, or another mount
                continue
            if len(cursor.frames) == 1:
                return
            depth = len(cursor.frames)
            left = cursor.ascend()
            # A redescent that fell short stands in an ancestor, where that name means
            # something else; the moved directory is found again when an rmdir fails.
            if len(cursor.frames) == depth - 1:
                remove_empty_dir(cursor, left.name)
    finally:
        cursor.close()


def remove_empty_dir(cursor: TreeCursor, name: str) -> None:
    """rmdir; if something was added meanwhile, list this directory again."""
    try:
        os.rmdir(name, dir_fd=cursor.fd)
    except FileNotFoundError:
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        frame = cursor.top
        frame.retries += 1
        if frame.retries > REMOVE_RETRIES:
            raise
        frame.subdirs = None


def clear_files(fd: int) -> list[str]:
    """Unlink every entry of FD that is not a directory; the names of those that are."""
    subdirs = []
    for entry in list_entries(fd):
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.name)
            continue
        try:
            os.unlink(entry.name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            subdirs.append(entry.name)  # a directory swapped in after the listing
    return subdirs


def unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        # Another filesystem mounted on it: deleting across it would reach that one's files.
        raise OSError(errno.EXDEV, "a mount point inside the tree; unmount it first", name) from None


def rmdir_quietly(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
