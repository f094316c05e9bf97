"""One desktop's layer stack on the node: its disk mounted (_disk.py), the current version
bound read-only at low_local, and the overlay merge_local = low_local : image with the
upper up_local, work dir work_local (both on the disk).

Here are the vm helper's actions ensure_stack, ensure_stack_unmounted, remove_local_layers,
purge_mfs_data and reset_upper. ensure_stack_unmounted and reset_upper refuse while the
desktop's container runs: its root is merge_local.
"""

import os
import posixpath
import re
import stat
from dataclasses import asdict, astuple, dataclass

from _container import refuse_running_container
from _contract import Failed, PreconditionFailed, Result, log
from _disk import (
    DiskPlan,
    apply_disk_plan,
    disk_figures,
    disk_mount,
    image_stat,
    mount_disk,
    plan_disk,
    refuse_symlinks,
    unmount_disk,
)
from _images import require as require_image
from _layout import UP_MFS, VERSION_DIR_PATTERN, VMS_DIR, VmPaths, mfs_user_dir, up_mfs_path, version_path
from _owner import claim_or_refuse
from _system import (
    MountEntry,
    make_dirs,
    mount_at,
    mount_option_value,
    mount_tool,
    mounts_below,
    overlay_lowerdirs,
    read_mountinfo,
    refuse_symlinked_path,
    require_mfs_answers,
    require_tool,
    run_command,
    run_mount,
    unmount,
)
from _tree import remove_tree

# Why these overlay options: the upper dir is not only read through this mount. The sync copies
# up_local to MooseFS as plain files and an offline merge applies it onto the next version, on
# whatever node; both understand whiteouts (0/0 character devices) and opaque dirs, nothing else.
#   redirect_dir=off  renaming a directory that came from a lower layer would otherwise leave a
#                     `trusted.overlay.redirect` xattr pointing into the lower; the merge would
#                     see an empty new directory and lose its content. Off: rename(2) answers
#                     EXDEV and mv copies, so the upper holds real files.
#   metacopy=off      chmod/chown of a lower file would otherwise copy up metadata only (an empty
#                     file with `trusted.overlay.metacopy`); the merge would publish it empty.
#   index=off         the index records lower file handles and stamps the upper with the lower's
#                     origin. Our lower changes with every version and the upper moves between
#                     nodes, so the next mount would refuse the stale index, or worse use it.
#   xino=off          nothing persistent depends on inode numbers; off keeps st_ino the real
#                     filesystem's, whatever the layers' filesystems are (MooseFS FUSE, ext4).
# Checked on kernel 6.x: all four are accepted; /proc/self/mountinfo lists only values that
# differ from the kernel's defaults, so a live stack is checked by "none of them is on".
OVERLAY_FIXED_OPTIONS = ("redirect_dir=off", "metacopy=off", "index=off", "xino=off")
OVERLAY_OFF_OPTIONS = tuple(option.partition("=")[0] for option in OVERLAY_FIXED_OPTIONS)


def bind_version(entry: MountEntry | None, user: str) -> int | None:
    """The version a low_local bind mount shows, from the path it binds (its mountinfo root)."""
    if entry is None:
        return None
    match = re.search(rf"/{VMS_DIR}/{re.escape(user)}/{VERSION_DIR_PATTERN}$", entry.root)
    return int(match.group(1)) if match else None


def overlay_differences(entry: MountEntry, paths: VmPaths, image_tree: str) -> list[str]:
    """How a mount at merge_local differs from the stack we would mount; empty when it is ours."""
    if entry.fstype != "overlay":
        return [f"it is a {entry.fstype} mount from {entry.source}, not an overlay"]
    differences = []
    lowers = [posixpath.normpath(lower) for lower in overlay_lowerdirs(entry.super_options)]
    if lowers != [paths.low_local, image_tree]:
        differences.append(f"lowerdir {':'.join(lowers)} (wanted {paths.low_local}:{image_tree})")
    for key in ("upperdir", "workdir"):
        wanted = getattr(paths, "up_local" if key == "upperdir" else "work_local")
        actual = mount_option_value(entry.super_options, key)
        if actual is None or posixpath.normpath(actual) != wanted:
            differences.append(f"{key} {actual} (wanted {wanted})")
    for key in OVERLAY_OFF_OPTIONS:
        value = mount_option_value(entry.super_options, key)
        if value not in (None, "off"):
            differences.append(f"{key}={value} (wanted off)")
    return differences


# --- ensure_stack -------------------------------------------------------------------------


@dataclass(frozen=True)
class StackPlan:
    disk: DiskPlan
    create_version_dir: bool
    create_up_mfs: bool
    create_local_dirs: tuple[str, ...]
    unbind_low: bool
    bind_low: bool
    mount_overlay: bool

    @property
    def changes(self) -> bool:
        return self.disk.changes or any(astuple(self)[1:])


def ensure_stack(params: dict, check: bool) -> Result:
    user, version = params["user"], params["version"]
    paths = VmPaths.of(params["data_dir"], user)
    refuse_symlinks(paths)
    entries = read_mountinfo()
    mfs_entry = mount_at(entries, params["mfs_mount"])
    if mfs_entry is None:
        raise PreconditionFailed(
            f"MooseFS is not mounted at {params['mfs_mount']}; run the mfs helper's ensure_mounted first", "mfs_not_mounted"
        )
    image_tree = require_image(params["image"])
    user_dir = mfs_user_dir(params["mfs_mount"], user)
    version_dir = version_path(user_dir, version)
    wanted_low_root = posixpath.normpath(posixpath.join(mfs_entry.root, posixpath.relpath(version_dir, params["mfs_mount"])))
    low_entry, merge_entry = mount_at(entries, paths.low_local), mount_at(entries, paths.merge_local)
    low_is_wanted = low_entry is not None and is_bind_of(low_entry, mfs_entry, wanted_low_root)

    if merge_entry is not None:
        refuse_live_stack_mismatch(merge_entry, low_entry, low_is_wanted, paths, image_tree, user, version)
    require_mfs_answers(params["mfs_mount"])
    if params["node"] is not None:
        claim_or_refuse(params["mfs_mount"], user, params["node"], check)
    plan = StackPlan(
        disk=plan_disk(paths, params["disk"]),
        create_version_dir=needs_version_dir(version_dir, version),
        create_up_mfs=not os.path.isdir(posixpath.join(user_dir, UP_MFS)),
        create_local_dirs=tuple(path for path in (paths.vm_dir, *local_dirs(paths)) if not os.path.isdir(path)),
        unbind_low=low_entry is not None and not low_is_wanted,
        bind_low=not low_is_wanted,
        mount_overlay=merge_entry is None,
    )
    data = stack_data(paths, version, version_dir, mounted=merge_entry is not None)
    if check or not plan.changes:
        return Result(changed=plan.changes, data={**data, "disk": {**disk_figures(paths), "plan": asdict(plan.disk)}})
    apply_stack_plan(plan, paths, user_dir, version_dir, image_tree, params["disk"])
    verify_stack_mounted(paths, image_tree, mfs_entry, wanted_low_root)
    return Result(changed=True, data={**data, "mounted": True, "disk": disk_figures(paths)})


def is_bind_of(entry: MountEntry, mfs_entry: MountEntry, wanted_root: str) -> bool:
    return entry.fstype == mfs_entry.fstype and entry.source == mfs_entry.source and entry.root == wanted_root


def refuse_live_stack_mismatch(merge_entry, low_entry, low_is_wanted, paths, image_tree, user, version) -> None:
    differences = overlay_differences(merge_entry, paths, image_tree)
    if not low_is_wanted:
        shown = "not mounted" if low_entry is None else f"version {bind_version(low_entry, user)} ({low_entry.root})"
        differences.append(f"low_local is {shown} (wanted version {version})")
    if differences:
        raise PreconditionFailed(
            f"{paths.merge_local} is already mounted with other layers: {'; '.join(differences)}; "
            "stop the desktop and run ensure_stack_unmounted first",
            "stack_mismatch",
        )


def needs_version_dir(version_dir: str, version: int) -> bool:
    if os.path.isdir(version_dir):
        return False
    if os.path.lexists(version_dir):
        raise PreconditionFailed(f"{version_dir} exists and is not a directory", "version_not_a_directory")
    if version != 0:
        raise PreconditionFailed(f"version {version} does not exist: {version_dir} is missing", "version_missing")
    return True


def local_dirs(paths: VmPaths) -> tuple[str, ...]:
    return (paths.up_local, paths.work_local, paths.low_local, paths.merge_local, paths.runtime)


def seed_upper(up_mfs: str, up_local: str) -> None:
    """A node that has no up_local for this desktop (a new node, a lost disk) takes it from
    up_mfs, which the sync kept equal to the last up_local. Starting with an empty one instead
    would hide those changes, and the sync's first full pass would then delete them on MooseFS."""
    if not os.path.isdir(up_mfs) or not os.listdir(up_mfs):
        return
    rsync = require_tool("rsync", "install the rsync package", "rsync_missing")
    log(f"seeding {up_local} from {up_mfs}")
    result = run_command([rsync, "-aHAX", "--numeric-ids", "-S", up_mfs + "/", up_local + "/"], timeout_s=3600)
    if result.returncode != 0:
        raise Failed(f"copying {up_mfs} to {up_local} failed: {result.output_tail()}", "seed_failed")


def apply_stack_plan(plan: StackPlan, paths: VmPaths, user_dir: str, version_dir: str, image_tree: str, disk: int) -> None:
    if plan.create_version_dir:
        make_dirs(version_dir, 0o755)
    if plan.create_up_mfs:
        make_dirs(posixpath.join(user_dir, UP_MFS), 0o755)
    make_dirs(paths.vm_dir, 0o700)
    apply_disk_plan(plan.disk, paths, disk)
    new_upper = not os.path.isdir(paths.up_local)
    for path in local_dirs(paths):
        # The VM dir and runtime are root's: the upper holds the user's files with their modes,
        # and runtime will hold the password for a moment.
        if not os.path.isdir(path):
            make_dirs(path, 0o700 if path == paths.runtime else 0o755)
    if new_upper:
        seed_upper(posixpath.join(user_dir, UP_MFS), paths.up_local)
    if plan.unbind_low:
        log(f"rebinding {paths.low_local}: it shows another version and no overlay uses it")
        unmount(paths.low_local)
    if plan.bind_low:
        bind_read_only(version_dir, paths.low_local)
    if plan.mount_overlay:
        mount_overlay(paths, image_tree)


def bind_read_only(source: str, target: str) -> None:
    mount = mount_tool()
    run_mount([mount, "--bind", "-o", "ro", source, target], f"binding {source} at {target}")
    entry = mount_at(read_mountinfo(), target)
    # util-linux before 2.27 ignores ro on a bind; remount it read-only then.
    if entry is not None and "ro" not in entry.mount_options:
        run_mount([mount, "-o", "remount,bind,ro", target], f"making {target} read-only")


def overlay_options(paths: VmPaths, image_tree: str) -> str:
    layers = [f"lowerdir={paths.low_local}:{image_tree}", f"upperdir={paths.up_local}", f"workdir={paths.work_local}"]
    return ",".join(layers + list(OVERLAY_FIXED_OPTIONS))


def mount_overlay(paths: VmPaths, image_tree: str) -> None:
    argv = [mount_tool(), "-t", "overlay", "overlay", "-o", overlay_options(paths, image_tree), paths.merge_local]
    run_mount(argv, f"mounting the overlay at {paths.merge_local}")


def verify_stack_mounted(paths: VmPaths, image_tree: str, mfs_entry: MountEntry, wanted_low_root: str) -> None:
    entries = read_mountinfo()
    low_entry, merge_entry = mount_at(entries, paths.low_local), mount_at(entries, paths.merge_local)
    if low_entry is None or not is_bind_of(low_entry, mfs_entry, wanted_low_root) or "ro" not in low_entry.mount_options:
        raise Failed(f"{paths.low_local} is not the read-only bind of {wanted_low_root} after mounting", "stack_not_mounted")
    if merge_entry is None or overlay_differences(merge_entry, paths, image_tree):
        raise Failed(f"{paths.merge_local} does not show the wanted overlay after mounting", "stack_not_mounted")


def stack_data(paths: VmPaths, version: int, version_dir: str, mounted: bool) -> dict:
    return {
        "merge_local": paths.merge_local,
        "low_local": paths.low_local,
        "up_local": paths.up_local,
        "work_local": paths.work_local,
        "version": version,
        "version_dir": version_dir,
        "mounted": mounted,
    }


# --- ensure_stack_unmounted ---------------------------------------------------------------


def stack_state(paths: VmPaths, user: str) -> dict:
    entries = read_mountinfo()
    low_entry, merge_entry = mount_at(entries, paths.low_local), mount_at(entries, paths.merge_local)
    return {
        "merge_local": paths.merge_local,
        "merge_local_mounted": merge_entry is not None,
        "low_local": paths.low_local,
        "low_local_mounted": low_entry is not None,
        "low_local_version": bind_version(low_entry, user),
        "disk": paths.disk,
        "disk_mounted": mount_at(entries, paths.disk) is not None,
    }


def ensure_stack_unmounted(params: dict, check: bool) -> Result:
    user = params["user"]
    paths = VmPaths.of(params["data_dir"], user)
    refuse_symlinks(paths)
    before = stack_state(paths, user)
    if not before["merge_local_mounted"] and not before["low_local_mounted"] and not before["disk_mounted"]:
        return Result(changed=False, data=before)
    # The container's root is merge_local, in its own mount namespace: unmounting here would
    # succeed and leave it running on a stack nobody on the host can see or sync.
    refuse_running_container(params["docker_socket"], user)
    if check:
        return Result(changed=True, data=before)
    for mount_point in paths.mount_points():
        unmount(mount_point)
    unmount_disk(paths)
    after = stack_state(paths, user)
    if after["merge_local_mounted"] or after["low_local_mounted"] or after["disk_mounted"]:
        raise Failed(f"the stack under {paths.vm_dir} is still mounted after unmounting", "still_mounted")
    return Result(changed=True, data=after)


# --- remove_local_layers ------------------------------------------------------------------


def remove_local_layers(params: dict, check: bool) -> Result:
    user = params["user"]
    paths = VmPaths.of(params["data_dir"], user)
    refuse_symlinks(paths)
    entries = read_mountinfo()
    mounted = [entry.mount_point for entry in mounts_below(entries, paths.vm_dir) if entry.mount_point != paths.disk]
    if mount_at(entries, paths.vm_dir) is not None:
        mounted.insert(0, paths.vm_dir)
    if mounted:
        raise PreconditionFailed(
            f"refusing to remove {paths.vm_dir}: still mounted there: {', '.join(mounted[:5])}; run ensure_stack_unmounted first",
            "stack_mounted",
        )
    from sync import running_daemon  # only unmounting and removing ask, and sync pulls in syncd

    daemon = running_daemon(VmPaths.of(params["data_dir"], user))
    if daemon is not None:
        raise PreconditionFailed(
            f"the sync of {user} still runs (pid {daemon.pid}); stop it first (sync ensure_stopped)", "sync_running"
        )
    exists = os.path.lexists(paths.vm_dir)
    data = {"vm_dir": paths.vm_dir, "removed": exists}
    if not exists or check:
        return Result(changed=exists, data=data)
    unmount_disk(paths)
    remove_tree(paths.vm_dir)
    return Result(changed=True, data=data)


# --- purge_mfs_data -----------------------------------------------------------------------


def purge_mfs_data(params: dict, check: bool) -> Result:
    """Delete every version of a user's files on MooseFS (labvm rm --purge).

    Refused while this node has any mount of them, such as a desktop's low_local bind.
    remove_tree never follows symlinks, so a link inside the tree cannot reach outside it, and
    goes as deep as the member's directories do.
    """
    user = params["user"]
    entries = read_mountinfo()
    mfs_entry = mount_at(entries, params["mfs_mount"])
    if mfs_entry is None:
        raise PreconditionFailed(f"MooseFS is not mounted at {params['mfs_mount']}", "mfs_not_mounted")
    user_dir = mfs_user_dir(params["mfs_mount"], user)
    refuse_symlinked_path(user_dir)
    user_root = posixpath.normpath(posixpath.join(mfs_entry.root, posixpath.relpath(user_dir, params["mfs_mount"])))
    in_use = [e.mount_point for e in entries if e.source == mfs_entry.source and e is not mfs_entry
              and (e.root == user_root or e.root.startswith(user_root + "/"))]
    if in_use:
        raise PreconditionFailed(f"{user}'s files on MooseFS are mounted at {', '.join(in_use[:5])}; stop the desktop first", "in_use")
    exists = os.path.lexists(user_dir)
    data = {"path": user_dir, "removed": exists}
    if exists and not check:
        remove_tree(user_dir)
    return Result(changed=exists, data=data)


# --- reset_upper --------------------------------------------------------------------------


def reset_upper(params: dict, check: bool) -> Result:
    """Empty the desktop's upper layer, locally and on MooseFS, after a published version took
    in everything it held (a solidify). Safe to run again: an upper applied twice over the
    version made from it changes nothing, so a crash between publishing and this step loses
    no file. Refused while the stack is mounted or the container runs."""
    user = params["user"]
    paths = VmPaths.of(params["data_dir"], user)
    refuse_symlinks(paths)
    refuse_running_container(params["docker_socket"], user)
    entries = read_mountinfo()
    if any(mount_at(entries, point) is not None for point in paths.mount_points()):
        raise PreconditionFailed(f"{user}'s stack is mounted; unmount it first (ensure_stack_unmounted)", "stack_mounted")
    if mount_at(entries, params["mfs_mount"]) is None:
        raise PreconditionFailed(f"MooseFS is not mounted at {params['mfs_mount']}", "mfs_not_mounted")
    up_mfs = up_mfs_path(params["mfs_mount"], user)
    refuse_symlinked_path(up_mfs)
    # The upper is on the desktop's disk: mounted for this, so an unmounted disk is never
    # mistaken for an empty upper.
    mounted_here = image_stat(paths) is not None and disk_mount(paths, entries) is None
    if mounted_here and not check:
        mount_disk(paths)
    try:
        directories = (paths.up_local, paths.work_local, *paths.legacy_layers, up_mfs)
        targets = [d for d in directories if os.path.lexists(emptying_name(d)) or (os.path.isdir(d) and os.listdir(d))]
        if check and mounted_here:
            targets = [paths.up_local, paths.work_local, *targets]
        if check or not targets:
            return Result(changed=bool(targets), data={"emptied": targets})
        for directory in targets:
            empty_directory(directory)
        return Result(changed=True, data={"emptied": targets})
    finally:
        if mounted_here and not check:
            unmount_disk(paths)


def emptying_name(directory: str) -> str:
    parent, name = posixpath.split(directory.rstrip("/"))
    return posixpath.join(parent, f".{name}.emptying")


def empty_directory(directory: str) -> None:
    """Move the content aside with one rename, then delete it: a crash midway leaves the
    directory either whole or empty, never a half-deleted upper that a mount would show."""
    trash = emptying_name(directory)
    if os.path.lexists(trash):
        if not os.path.lexists(directory):
            # The earlier run stopped between its rename and mkdir: its trash holds the old upper.
            os.mkdir(directory, 0o755)
        remove_tree(trash)
    st = os.lstat(directory)
    os.rename(directory, trash)
    os.mkdir(directory, 0o700)
    os.chown(directory, st.st_uid, st.st_gid)
    os.chmod(directory, stat.S_IMODE(st.st_mode))
    remove_tree(trash)
