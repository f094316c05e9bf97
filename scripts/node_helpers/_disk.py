"""The desktop's disk: <data_dir>/vms/<user>/disk.ext4, a sparse ext4 image loop-mounted at disk/.

Why an image and not a quota: it works on whatever filesystem holds data_dir (project quotas
need ext4 or XFS mounted with prjquota), it moves and is removed as one file, and what a
member can write is bounded by construction: ENOSPC comes from their own filesystem. The image
is sparse, so it takes on the node only what the desktop wrote (a 1 TB sparse file inside it
costs its allocated blocks, as anywhere else). Made with no reserved blocks (the member's root
is uid 0 and would get them anyway) and lazily initialised tables, so a new 100 GiB disk
costs a few MiB. Growing is online: the image is extended, the loop device told, resize2fs.

plan_disk says what a start needs (make, extend, grow, mount, move an older upper in) and
apply_disk_plan does it; resize_disk is the vm helper's action of that name.
"""

import os
import posixpath
import re
import stat
from dataclasses import astuple, dataclass

from _contract import Failed, PreconditionFailed, Result, log
from _layout import VmPaths
from _system import (
    MOUNT_TIMEOUT_S,
    UTIL_LINUX_HINT,
    MountEntry,
    find_tool,
    make_dirs,
    mount_at,
    mount_tool,
    read_mountinfo,
    refuse_symlinked_path,
    require_tool,
    run_command,
    run_mount,
    unmount,
)
from _tree import remove_tree

MIN_DISK_BYTES = 32 * 1024 * 1024


def refuse_symlinks(paths: VmPaths) -> None:
    """None of the desktop's node paths may go through a symlink (see refuse_symlinked_path)."""
    for path in (paths.runtime, *paths.mount_points(), paths.disk_image, paths.up_local, paths.work_local):
        refuse_symlinked_path(path)


def loop_backing_file(device: str) -> str | None:
    """The file behind a loop device, as the kernel tells it (/sys/block/loopN/loop/backing_file)."""
    name = posixpath.basename(device)
    if not re.fullmatch(r"loop[0-9]+", name):
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="surrogateescape") as stream:
            return stream.read().strip() or None
    except OSError:
        return None


def disk_mount(paths: VmPaths, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount at disk/ if it is this desktop's image; a foreign mount there is refused."""
    entry = mount_at(read_mountinfo() if entries is None else entries, paths.disk)
    if entry is None:
        return None
    backing = loop_backing_file(entry.source)
    if entry.fstype != "ext4" or backing is None or posixpath.normpath(backing.removesuffix(" (deleted)")) != paths.disk_image:
        raise PreconditionFailed(
            f"{paths.disk} holds a {entry.fstype} mount of {entry.source} (backed by {backing}), not {paths.disk_image}; "
            "unmount it",
            "disk_mismatch",
        )
    return entry


def disk_figures(paths: VmPaths) -> dict:
    """Size and use of the desktop's disk: from the filesystem while mounted, else the image."""
    figures = {"size": None, "used": None, "free": None, "allocated": None, "mounted": False}
    try:
        st = os.lstat(paths.disk_image)
    except OSError:
        return figures
    if not stat.S_ISREG(st.st_mode):
        return figures
    figures.update(size=st.st_size, allocated=st.st_blocks * 512)
    try:
        entry = disk_mount(paths)
    except PreconditionFailed:
        entry = None
    if entry is not None:
        vfs = os.statvfs(paths.disk)
        figures.update(used=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize, free=vfs.f_bavail * vfs.f_frsize, mounted=True)
    return figures


@dataclass(frozen=True)
class DiskPlan:
    create: bool
    extend_to: int | None  # the image file grows to this size
    grow_offline: bool  # its filesystem grows into the image before it is mounted
    mount: bool
    grow_online: bool  # ... or, already mounted, while it is
    migrate: bool

    @property
    def changes(self) -> bool:
        return any(astuple(self))


def plan_disk(paths: VmPaths, size: int) -> DiskPlan:
    image = image_stat(paths)
    mounted = disk_mount(paths) is not None
    legacy_up = paths.legacy_layers[0]
    migrate = os.path.isdir(legacy_up) and not os.path.islink(legacy_up)
    if migrate:
        refuse_oversized_legacy(legacy_up, size)
    extend_to = size if image is not None and size > image.st_size else None
    # A filesystem smaller than its image: a resize that could not grow it online (the node's
    # kernel or capabilities refused) left that for the next start.
    behind = image is not None and (extend_to is not None or filesystem_bytes(paths.disk_image) < fills(image.st_size))
    return DiskPlan(
        create=image is None,
        extend_to=extend_to,
        grow_offline=behind and not mounted,
        mount=not mounted,
        grow_online=behind and mounted,
        migrate=migrate,
    )


def fills(size: int) -> int:
    """Below this, a filesystem has not grown into an image of size (resize2fs leaves out a last
    block group too small for its own metadata)."""
    return size - max(8 << 20, size // 256)


EXT4_MAGIC = 0xEF53
EXT4_FEATURE_INCOMPAT_64BIT = 0x80


def filesystem_bytes(image: str) -> int:
    """The size of the ext4 filesystem in an image, from its superblock (1024 bytes in)."""
    with open(image, "rb") as stream:
        stream.seek(1024)
        block = stream.read(1024)
    if len(block) < 1024 or int.from_bytes(block[0x38:0x3A], "little") != EXT4_MAGIC:
        raise Failed(f"{image} holds no ext4 filesystem", "disk_not_ext4")
    count = int.from_bytes(block[0x04:0x08], "little")
    if int.from_bytes(block[0x60:0x64], "little") & EXT4_FEATURE_INCOMPAT_64BIT:
        count |= int.from_bytes(block[0x150:0x154], "little") << 32
    return count * (1024 << int.from_bytes(block[0x18:0x1C], "little"))


def image_stat(paths: VmPaths) -> os.stat_result | None:
    try:
        st = os.lstat(paths.disk_image)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise PreconditionFailed(f"{paths.disk_image} is not a regular file", "disk_not_a_file")
    return st


def refuse_oversized_legacy(legacy_up: str, size: int) -> None:
    """Checked before anything changes: an upper from before desktops had disks must fit."""
    du = find_tool("du")
    if du is None:
        return  # the copy itself would still stop at ENOSPC, and the old upper stays
    result = run_command([du, "-s", "-x", "-B1", legacy_up], timeout_s=3600)
    fields = result.stdout.split()
    if result.returncode != 0 or not fields or not fields[0].isdigit():
        return
    needed = int(fields[0])
    # ext4 keeps a few percent for itself (inode tables, journal).
    if needed > size * 0.95:
        raise PreconditionFailed(
            f"the desktop's files ({human_bytes(needed)} in {legacy_up}) do not fit a disk of {human_bytes(size)}; "
            "give it a larger size (labvm resize)",
            "disk_too_small",
        )


def human_bytes(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value} B"


def e2fs_tool(name: str) -> str:
    return require_tool(name, "install the e2fsprogs package", "e2fsprogs_missing")


def create_disk_image(paths: VmPaths, size: int) -> None:
    """A new empty ext4 image, made under a temporary name and renamed into place: an image
    that exists is always a whole filesystem."""
    partial = paths.disk_image + ".new"
    if os.path.lexists(partial):
        os.unlink(partial)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    argv = [e2fs_tool("mkfs.ext4"), "-q", "-F", "-m", "0", "-L", "labvm-disk",
            "-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1", partial]
    result = run_command(argv, timeout_s=MOUNT_TIMEOUT_S)
    if result.returncode != 0:
        os.unlink(partial)
        raise Failed(f"making the desktop's disk failed: {result.output_tail()}", "mkfs_failed")
    os.rename(partial, paths.disk_image)


def mount_disk(paths: VmPaths) -> None:
    make_dirs(paths.disk, 0o700)
    argv = [mount_tool(), "-t", "ext4", "-o", "loop,noatime", paths.disk_image, paths.disk]
    run_mount(argv, f"mounting the desktop's disk {paths.disk_image} at {paths.disk}")
    if disk_mount(paths) is None:
        raise Failed(f"{paths.disk} does not show {paths.disk_image} after mounting", "disk_not_mounted")
    os.chmod(paths.disk, 0o700)


def extend_image(paths: VmPaths, size: int) -> None:
    if os.lstat(paths.disk_image).st_size < size:
        os.truncate(paths.disk_image, size)


def grow_offline(paths: VmPaths) -> None:
    """The filesystem of an unmounted image grows to the image's size (resize2fs wants a
    checked filesystem first)."""
    check = run_command([e2fs_tool("e2fsck"), "-f", "-p", paths.disk_image], timeout_s=3600)
    if check.returncode not in (0, 1):  # 1: errors corrected
        raise Failed(f"checking the desktop's disk before growing it failed: {check.output_tail()}", "disk_check_failed")
    result = run_command([e2fs_tool("resize2fs"), paths.disk_image], timeout_s=3600)
    if result.returncode != 0:
        raise Failed(f"growing the desktop's filesystem failed: {result.output_tail()}", "disk_grow_failed")


def grow_online(paths: VmPaths) -> bool:
    """Tell the loop device its image grew, then grow the mounted filesystem into it. False if
    the kernel refuses an online resize (it needs CAP_SYS_RESOURCE, which a node's root has but
    a confined one may not): the image is already larger, the next start grows it offline."""
    entry = disk_mount(paths)
    if entry is None:
        raise PreconditionFailed(f"{paths.disk} is not mounted", "disk_not_mounted")
    losetup = require_tool("losetup", UTIL_LINUX_HINT, "losetup_missing")
    told = run_command([losetup, "-c", entry.source], timeout_s=60)
    if told.returncode != 0:
        raise Failed(f"telling the loop device its new size failed: {told.output_tail()}", "disk_grow_failed")
    result = run_command([e2fs_tool("resize2fs"), entry.source], timeout_s=3600)
    if result.returncode == 0:
        return True
    if "Permission denied" in result.output_tail() or "Operation not permitted" in result.output_tail():
        log(f"the kernel refused to grow {paths.disk} online; it grows at the desktop's next start")
        return False
    raise Failed(f"growing the desktop's filesystem failed: {result.output_tail()}", "disk_grow_failed")


def migrate_legacy_layers(paths: VmPaths) -> None:
    """An upper from before desktops had disks moves into the disk, every file, once. It is
    copied to up_local.migrating and renamed into place only when whole; the old one is removed
    after that. Run again after a crash at any point, it finishes the job: a whole up_local on
    the disk means the old one is a leftover."""
    legacy_up, legacy_work = paths.legacy_layers
    if not os.path.isdir(paths.up_local):
        partial = paths.up_local + ".migrating"
        rsync = require_tool("rsync", "install the rsync package", "rsync_missing")
        make_dirs(partial, 0o755)
        log(f"moving {legacy_up} into the desktop's disk")
        argv = [rsync, "-aHAX", "--numeric-ids", "-S", "--delete", legacy_up + "/", partial + "/"]
        result = run_command(argv, timeout_s=6 * 3600)
        if result.returncode != 0:
            raise Failed(f"copying {legacy_up} into the desktop's disk failed: {result.output_tail()}", "migrate_failed")
        st = os.lstat(legacy_up)
        os.chown(partial, st.st_uid, st.st_gid)
        os.chmod(partial, stat.S_IMODE(st.st_mode))
        os.rename(partial, paths.up_local)
    for leftover in (legacy_up, legacy_work):
        if os.path.lexists(leftover):
            remove_tree(leftover)


def apply_disk_plan(plan: DiskPlan, paths: VmPaths, size: int) -> None:
    if plan.create:
        create_disk_image(paths, size)
    if plan.extend_to is not None:
        extend_image(paths, plan.extend_to)
    if plan.grow_offline:
        grow_offline(paths)
    if plan.mount:
        mount_disk(paths)
    if plan.grow_online:
        grow_online(paths)
    if plan.migrate:
        migrate_legacy_layers(paths)


def unmount_disk(paths: VmPaths) -> bool:
    """True if it was mounted. The sync daemon reads up_local: it must have stopped."""
    if disk_mount(paths) is None:
        return False
    from sync import running_daemon  # only unmounting and removing ask, and sync pulls in syncd

    daemon = running_daemon(paths)
    if daemon is not None:
        raise PreconditionFailed(
            f"the sync of {posixpath.basename(paths.vm_dir)} still runs (pid {daemon.pid}) on its disk; "
            "stop it first (sync ensure_stopped)",
            "sync_running",
        )
    unmount(paths.disk)
    return True


# --- resize_disk --------------------------------------------------------------------------


def resize_disk(params: dict, check: bool) -> Result:
    """Grow the desktop's disk to size, online: a running desktop sees the room at once. A
    desktop with no disk on this node yet gets it at its next ensure_stack. Never shrinks."""
    user, size = params["user"], params["size"]
    paths = VmPaths.of(params["data_dir"], user)
    refuse_symlinks(paths)
    image = image_stat(paths)
    if image is None:
        return Result(changed=False, data={"disk": disk_figures(paths), "pending": True})
    if size < image.st_size:
        raise PreconditionFailed(
            f"{user}'s disk is {human_bytes(image.st_size)}; it can grow, not shrink, and {human_bytes(size)} is smaller",
            "disk_shrink",
        )
    behind = filesystem_bytes(paths.disk_image) < fills(size)
    if not behind or check:
        return Result(changed=behind, data={"disk": disk_figures(paths), "pending": False})
    extend_image(paths, size)
    if disk_mount(paths) is None:
        grow_offline(paths)
        return Result(changed=True, data={"disk": disk_figures(paths), "pending": False})
    grown = grow_online(paths)
    # Not grown online: the image is, and the next start grows the filesystem into it.
    return Result(changed=True, data={"disk": disk_figures(paths), "pending": False, "restart_needed": not grown})
