"""vm: one desktop's layer stack and container on this node.

Actions:
  ensure_stack            mount the desktop's disk (made, grown or filled from an older layout
                          first if need be), bind the current version read-only at low_local
                          and mount the overlay merge_local = low_local : xfce_local, upper up_local
  ensure_stack_unmounted  unmount merge_local, low_local, then the disk; busy is refused, never lazy
  ensure_container        create and start the desktop container from a spec built by labvm; its
                          root filesystem is merge_local (through the labvm OCI runtime, runtime.py)
  set_password            apply a new login + VNC password inside the running container
  stop_container          docker stop
  remove_container        docker stop (if running) and docker rm; the layers are never touched
  remove_local_layers     delete <data_dir>/vms/<user> once nothing there is mounted
  status                  what the mount table and dockerd say (changes nothing)
  freeze / thaw           docker pause / unpause: a consistent instant for a backup of a running VM
  reset_upper             empty up_local, work_local and up_mfs once a published version holds them
  set_owner / owner       the owner record on MooseFS: the one node allowed to run the desktop,
                          and the member id of the member whose files these are
  release_owner           no node owns it (labvm rm); the member id stays in the record
  resize_disk             grow the desktop's disk image and its filesystem, online

Fencing: <mfs_mount>/vms/<user>/owner.json names the node that may run the desktop. A switch
moves it to the target before the target mounts anything, and ensure_stack / ensure_container
given their node's name refuse to act for a desktop that another node owns. So a node that was
cut off or presumed dead cannot bring up a second copy when it returns.

Node layout, per VM (the names come from _layout.py):

    <data_dir>/vms/<user>/           0700 root
        disk.ext4                    0600 root: the desktop's disk, a sparse ext4 image of its size
        disk/                        where that image is mounted (loop) while the stack is up:
            up_local/  work_local/   overlay upper and work dirs. A member who fills them gets
                                     ENOSPC in their own desktop; the node's data disk loses no
                                     more than the image's size.
        low_local/                   read-only bind of <mfs_mount>/vms/<user>/low_mfs.v<N>
                                     (mfs_mount shows labvm's own subtree: mfsmount -S <mfs_dir>)
        merge_local/                 the overlay; the container's root comes from here
        runtime/                     0700 root, bound read-only at /run/labvm in the container:
                                     tini, init, apply-password, and for a moment `secret`

The password reaches the container only as runtime/secret (0600 root). The helper writes it
just before the container starts (or before `apply-password` runs), and deletes it as soon as
it is used: for a start, once the VNC port answers with an RFB greeting, because init applies
the password before it starts the VNC server; for set_password, once the exec has returned.
The container cannot delete it itself: /run/labvm is read-only in there.
"""

import hashlib
import ipaddress
import json
import os
import posixpath
import re
import socket
import stat
import time
from dataclasses import asdict, astuple, dataclass
from typing import Any

from _contract import (
    USER_PATTERN,
    Action,
    BadRequest,
    Failed,
    Param,
    PreconditionFailed,
    Result,
    TemporaryFailure,
    absolute_path,
    integer_between,
    layer_path,
    log,
    node_name,
    shorten,
    string_matching,
    user_name,
)
from _docker import (
    DEFAULT_DOCKER_SOCKET,
    api_url,
    container_logs_tail,
    docker_call,
    docker_json_call,
    docker_message,
    exec_in_container,
    inspect_container,
    quoted,
    unexpected,
)
from _layout import (
    UP_MFS,
    VERSION_DIR_PATTERN,
    VMS_DIR,
    VmPaths,
    mfs_user_dir,
    owner_path,
    up_mfs_path,
    version_path,
)
from _system import (
    CommandTimedOut,
    MountEntry,
    find_tool,
    mount_at,
    mount_option_value,
    mounts_below,
    overlay_lowerdirs,
    read_mountinfo,
    refuse_symlinked_path,
    require_mfs_answers,
    require_tool,
    run_command,
    unmount,
    write_atomically,
)
from _tree import remove_tree
from net import NETWORK_NAME as DESKTOP_NETWORK
from runtime import RUNTIME_NAME
from runtime import SENTINEL as ROOTFS_SENTINEL

IMAGE_MARKER = ".labvm-image.json"
UTIL_LINUX_HINT = "install the util-linux package"
MOUNT_TIMEOUT_S = 60.0
MIN_DISK_BYTES = 32 * 1024 * 1024

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

# --- container ----------------------------------------------------------------------------

CONTAINER_PREFIX = "labvm-"
RUNTIME_IN_CONTAINER = "/run/labvm"
INIT_PATH = f"{RUNTIME_IN_CONTAINER}/init"
TINI_PATH = f"{RUNTIME_IN_CONTAINER}/tini"
# docker's own Init (HostConfig.Init) mounts tini at /sbin/docker-init, into the root docker
# prepared, which is not the one the desktop runs on. So the node's static tini travels in the
# runtime dir and is the entrypoint instead; it is the same binary docker would use.
TINI_CANDIDATES = ("docker-init", "tini-static", "tini")
APPLY_PASSWORD_PATH = f"{RUNTIME_IN_CONTAINER}/apply-password"
SECRET_NAME = "secret"
VNC_CONTAINER_PORT = "5901/tcp"
SSH_CONTAINER_PORT = "22/tcp"
LABEL_USER = "labvm.user"
LABEL_SPEC_HASH = "labvm.spec-hash"
# 2: the root is the overlay, through the labvm runtime (1 bound merge_local's top-level dirs).
CONTAINER_FORM = 2
LOG_MAX_SIZE, LOG_MAX_FILES = "10m", "3"
VNC_WAIT_DEFAULT_S = 30
VNC_PROBE_TIMEOUT_S = 2.0
# A refused connection costs nothing; a start waits at most this long past the greeting.
VNC_POLL_S = 0.02
RFB_GREETING = b"RFB "
EXEC_TIMEOUT_S = 60.0
MAX_PASSWORD_CHARS = 256
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # dockerd refuses less

# --- parameters ---------------------------------------------------------------------------


def password_secrets(name: str, value: Any) -> dict:
    """{"password": str}. Messages never show the value."""
    if not isinstance(value, dict):
        raise BadRequest(f"param {name!r} must be an object holding 'password'", "bad_param")
    unknown = sorted(set(value) - {"password"})
    if unknown:
        raise BadRequest(
            f"param {name!r}: unknown key(s) {', '.join(repr(key)[:40] for key in unknown)}; accepted: password", "bad_param"
        )
    password = value.get("password")
    if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD_CHARS:
        raise BadRequest(f"param {name!r}: 'password' must be a string of 1 to {MAX_PASSWORD_CHARS} characters", "bad_param")
    # chpasswd reads `user:password` lines: a line break would start another user's line.
    if any(ord(char) < 32 or ord(char) == 127 for char in password):
        raise BadRequest(f"param {name!r}: 'password' must not contain control characters or line breaks", "bad_param")
    return {"password": password}


# One validator per spec key: (required, default, check(value) -> cleaned or raise ValueError(reason)).
def _integer(low: int, high: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return check


def _matching(pattern: str, description: str):
    compiled = re.compile(pattern)

    def check(value):
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise ValueError(description)
        return value

    return check


def _cpus(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.01 <= value <= 4096:
        raise ValueError("a number of CPUs from 0.01 to 4096")
    return value


def _string_map(key_pattern: str, reserved, what: str):
    compiled = re.compile(key_pattern)

    def check(value):
        if not isinstance(value, dict):
            raise ValueError(f"an object of {what}")
        for key, item in value.items():
            if not compiled.fullmatch(key):
                raise ValueError(f"an object of {what}; {key[:40]!r} is not a valid name")
            if reserved(key):
                raise ValueError(f"an object of {what}; {key[:40]!r} is set by the helper")
            if not isinstance(item, str) or "\0" in item:
                raise ValueError(f"an object of {what} with string values (no NUL)")
        return dict(value)

    return check


def _gpus(value):
    if not isinstance(value, list):
        raise ValueError("a list of GPU UUIDs")
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}", item):
            raise ValueError("a list of GPU UUIDs (such as GPU-0c6a1f2e-...)")
    if len(set(value)) != len(value):
        raise ValueError("a list of distinct GPU UUIDs")
    return list(value)


_port = _integer(1, 65535)


def _ports(value):
    if not isinstance(value, dict) or set(value) - {"vnc", "ssh"} or "vnc" not in value:
        raise ValueError('an object {"vnc": PORT, "ssh": PORT or null}')
    ports = {"vnc": _port(value["vnc"]), "ssh": None if value.get("ssh") is None else _port(value["ssh"])}
    if ports["vnc"] == ports["ssh"]:
        raise ValueError("two different ports for vnc and ssh")
    return ports


def _ip_address(value):
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ValueError("an IP address") from None


def _device_path(value):
    if not isinstance(value, str) or not re.fullmatch(r"/dev/[A-Za-z0-9/_.-]{1,200}", value) or ".." in value:
        raise ValueError("a block device path under /dev")
    return value


def _command(value):
    if not isinstance(value, str) or not value.strip() or "\0" in value or len(value) > 4096:
        raise ValueError("a non-empty shell command of at most 4096 characters")
    return value


def image_sessions(name: str, value: Any) -> dict:
    """{"xfce_local": the desktop image's tree, "by_desktop": {kind: session command}}: the
    session the image's own marker asks for replaces the spec's desktop_cmd, so a start needs
    no round trip to learn which desktop the node's image is."""
    if not isinstance(value, dict) or set(value) != {"xfce_local", "by_desktop"}:
        raise BadRequest(f"param {name!r} must be an object with 'xfce_local' and 'by_desktop'", "bad_param")
    by_desktop = value["by_desktop"]
    if not isinstance(by_desktop, dict) or not 1 <= len(by_desktop) <= 16:
        raise BadRequest(f"param {name!r}: 'by_desktop' must map 1 to 16 desktop kinds to commands", "bad_param")
    sessions = {}
    for kind, command in by_desktop.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", kind):
            raise BadRequest(f"param {name!r}: desktop kind {shorten(repr(kind), 40)} is not a-z, 0-9 and -", "bad_param")
        try:
            sessions[kind] = _command(command)
        except ValueError as reason:
            raise BadRequest(f"param {name!r}: the command for {kind!r} must be {reason}", "bad_param") from None
    return {"xfce_local": absolute_path(f"{name}.xfce_local", value["xfce_local"]), "by_desktop": sessions}


def image_desktop(xfce_local: str) -> str | None:
    """The desktop kind the image's marker names, or None (no image, or an unreadable marker)."""
    from image import read_marker  # only a start asks, and image.py is large

    kind = (read_marker(xfce_local) or {}).get("desktop")
    return kind if isinstance(kind, str) else None


_IMAGE_REFERENCE = r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_HOSTNAME = r"(?=.{1,63}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"

SPEC_FIELDS = {
    "name": (True, None, _matching(CONTAINER_PREFIX + USER_PATTERN, f"'{CONTAINER_PREFIX}' followed by the user name")),
    "image": (True, None, _matching(_IMAGE_REFERENCE, "a docker image name with a tag, such as labvm/base:0123abcd")),
    "hostname": (True, None, _matching(_HOSTNAME, "a host name of at most 63 characters")),
    "uid": (True, None, _integer(1000, 2**31 - 2)),
    "env": (
        False,
        {},
        _string_map(
            r"[A-Za-z_][A-Za-z0-9_]{0,127}",
            lambda key: key.startswith("LABVM_") or key == "NVIDIA_VISIBLE_DEVICES",
            "environment variables",
        ),
    ),
    "labels": (
        False,
        {},
        _string_map(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", lambda key: key == LABEL_SPEC_HASH, "labels"),
    ),
    "cpus": (False, None, _cpus),
    "cpuset": (False, None, _matching(r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*", "a cpuset such as 0-3,8")),
    "memory": (True, None, _integer(MIN_MEMORY_BYTES, 2**62)),
    "shm": (False, None, _integer(1024 * 1024, 2**62)),
    "pids": (False, None, _integer(16, 2**31 - 1)),
    "io_weight": (False, None, _integer(10, 1000)),
    "io_read_bps": (False, None, _integer(1, 2**62)),
    "io_write_bps": (False, None, _integer(1, 2**62)),
    "io_device": (False, None, _device_path),
    "gpus": (False, [], _gpus),
    "ports": (True, None, _ports),
    "bind_address": (True, None, _ip_address),
    "vnc_geometry": (False, "1280x800", _matching(r"[1-9][0-9]{1,4}x[1-9][0-9]{1,4}", "WIDTHxHEIGHT, such as 1280x800")),
    "desktop_cmd": (True, None, _command),
}


def container_spec(name: str, value: Any) -> dict:
    """The spec with every key present (null or empty where not given): its hash must not
    depend on whether the admin side spelled out a default."""
    if not isinstance(value, dict):
        raise BadRequest(f"param {name!r} must be an object", "bad_param")
    unknown = sorted(set(value) - set(SPEC_FIELDS))
    if unknown:
        shown = ", ".join(repr(key)[:40] for key in unknown)
        raise BadRequest(f"param {name!r}: unknown key(s) {shown}; accepted: {', '.join(SPEC_FIELDS)}", "bad_param")
    spec = {}
    for key, (required, default, check) in SPEC_FIELDS.items():
        item = value.get(key)
        if item is None:
            if required:
                raise BadRequest(f"param {name!r}: {key!r} is required", "bad_param")
            spec[key] = json.loads(json.dumps(default))
            continue
        try:
            spec[key] = check(item)
        except ValueError as reason:
            raise BadRequest(f"param {name!r}: {key!r} must be {reason}", "bad_param") from None
    if (spec["io_read_bps"] or spec["io_write_bps"]) and not spec["io_device"]:
        raise BadRequest(f"param {name!r}: 'io_device' is required with io_read_bps or io_write_bps", "bad_param")
    return spec


USER_PARAM = {"user": Param(user_name, required=True)}
DATA_DIR_PARAM = {"data_dir": Param(layer_path, required=True)}
DOCKER_SOCKET_PARAM = {"docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET)}
SECRETS_PARAM = {"secrets": Param(password_secrets, required=True)}

NODE_PARAM = {"node": Param(node_name)}
ENSURE_STACK_PARAMS = {
    **USER_PARAM,
    **DATA_DIR_PARAM,
    "mfs_mount": Param(layer_path, required=True),
    "version": Param(integer_between(0, 2**31 - 1), required=True),
    "xfce_local": Param(layer_path, required=True),
    "disk": Param(integer_between(MIN_DISK_BYTES, 2**50), required=True),
    **NODE_PARAM,
}
OWNER_PARAMS = {**USER_PARAM, "mfs_mount": Param(layer_path, required=True)}
# A member's id (labvm's users table): whose files these are, whatever the member's name.
MEMBER_ID_PATTERN = r"[0-9a-f]{32}"
SET_OWNER_PARAMS = {
    **OWNER_PARAMS,
    "node": Param(node_name, required=True),
    "op": Param(integer_between(0, 2**62)),
    "member": Param(string_matching(MEMBER_ID_PATTERN, "a member id: 32 lowercase hex digits")),
}
STACK_UNMOUNTED_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, **DOCKER_SOCKET_PARAM}
# Optional where the stack must be mounted anyway: then it is found in the mount table.
FOUND_DATA_DIR_PARAM = {"data_dir": Param(layer_path)}
ENSURE_CONTAINER_PARAMS = {
    **USER_PARAM,
    **FOUND_DATA_DIR_PARAM,
    "spec": Param(container_spec, required=True),
    **SECRETS_PARAM,
    **DOCKER_SOCKET_PARAM,
    "vnc_wait_s": Param(integer_between(0, 600), default=VNC_WAIT_DEFAULT_S),
    **NODE_PARAM,
    "mfs_mount": Param(layer_path),
    "image_sessions": Param(image_sessions),
}
SET_PASSWORD_PARAMS = {**USER_PARAM, **FOUND_DATA_DIR_PARAM, **SECRETS_PARAM, **DOCKER_SOCKET_PARAM}
STOP_CONTAINER_PARAMS = {**USER_PARAM, "timeout": Param(integer_between(0, 3600), default=30), **DOCKER_SOCKET_PARAM}
REMOVE_CONTAINER_PARAMS = STOP_CONTAINER_PARAMS
REMOVE_LAYERS_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM}
STATUS_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, **DOCKER_SOCKET_PARAM}
PURGE_PARAMS = {**USER_PARAM, "mfs_mount": Param(layer_path, required=True)}
FREEZE_PARAMS = {**USER_PARAM, **DOCKER_SOCKET_PARAM}
RESIZE_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, "size": Param(integer_between(MIN_DISK_BYTES, 2**50), required=True)}
RESET_UPPER_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, "mfs_mount": Param(layer_path, required=True), **DOCKER_SOCKET_PARAM}


# --- paths --------------------------------------------------------------------------------


def mounted_stack_paths(data_dir: str | None, user: str) -> VmPaths:
    """The VM's paths under data_dir; without it, under the one data dir where the user's
    merge_local is mounted as an overlay."""
    if data_dir is not None:
        return VmPaths.of(data_dir, user)
    pattern = re.compile(rf"(/.+)/{VMS_DIR}/{re.escape(user)}/merge_local")
    found = sorted(
        {
            match.group(1)
            for entry in read_mountinfo()
            if entry.fstype == "overlay" and (match := pattern.fullmatch(entry.mount_point))
        }
    )
    if not found:
        raise PreconditionFailed(f"no stack of {user} is mounted on this node; run ensure_stack first", "stack_not_mounted")
    if len(found) > 1:
        raise PreconditionFailed(f"stacks of {user} are mounted under {', '.join(found)}; pass data_dir", "stack_ambiguous")
    return VmPaths.of(found[0], user)


def bind_version(entry: MountEntry | None, user: str) -> int | None:
    """The version a low_local bind mount shows, from the path it binds (its mountinfo root)."""
    if entry is None:
        return None
    match = re.search(rf"/{VMS_DIR}/{re.escape(user)}/{VERSION_DIR_PATTERN}$", entry.root)
    return int(match.group(1)) if match else None


def overlay_differences(entry: MountEntry, paths: VmPaths, xfce_local: str) -> list[str]:
    """How a mount at merge_local differs from the stack we would mount; empty when it is ours."""
    if entry.fstype != "overlay":
        return [f"it is a {entry.fstype} mount from {entry.source}, not an overlay"]
    differences = []
    lowers = [posixpath.normpath(lower) for lower in overlay_lowerdirs(entry.super_options)]
    if lowers != [paths.low_local, xfce_local]:
        differences.append(f"lowerdir {':'.join(lowers)} (wanted {paths.low_local}:{xfce_local})")
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


def refuse_symlinks(paths: VmPaths) -> None:
    for path in (paths.runtime, *paths.mount_points(), paths.disk_image, paths.up_local, paths.work_local):
        refuse_symlinked_path(path)


# --- the desktop's disk -------------------------------------------------------------------
#
# Why an image and not a quota: it works on whatever filesystem holds data_dir (project quotas
# need ext4 or XFS mounted with prjquota), it moves and is removed as one file, and what a
# member can write is bounded by construction: ENOSPC comes from their own filesystem. The image
# is sparse, so it takes on the node only what the desktop wrote (a 1 TB sparse file inside it
# costs its allocated blocks, as anywhere else). Made with no reserved blocks (the member's root
# is uid 0 and would get them anyway) and lazily initialised tables, so a new 100 GiB disk
# costs a few MiB. Growing is online: the image is extended, the loop device told, resize2fs.


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
    user, version, xfce_local = params["user"], params["version"], params["xfce_local"]
    paths = VmPaths.of(params["data_dir"], user)
    refuse_symlinks(paths)
    entries = read_mountinfo()
    mfs_entry = mount_at(entries, params["mfs_mount"])
    if mfs_entry is None:
        raise PreconditionFailed(
            f"MooseFS is not mounted at {params['mfs_mount']}; run the mfs helper's ensure_mounted first", "mfs_not_mounted"
        )
    if not os.path.isfile(posixpath.join(xfce_local, IMAGE_MARKER)):
        raise PreconditionFailed(
            f"desktop image not on this node ({xfce_local} has no {IMAGE_MARKER}); run labvm image push", "image_missing"
        )
    user_dir = mfs_user_dir(params["mfs_mount"], user)
    version_dir = version_path(user_dir, version)
    wanted_low_root = posixpath.normpath(posixpath.join(mfs_entry.root, posixpath.relpath(version_dir, params["mfs_mount"])))
    low_entry, merge_entry = mount_at(entries, paths.low_local), mount_at(entries, paths.merge_local)
    low_is_wanted = low_entry is not None and is_bind_of(low_entry, mfs_entry, wanted_low_root)

    if merge_entry is not None:
        refuse_live_stack_mismatch(merge_entry, low_entry, low_is_wanted, paths, xfce_local, user, version)
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
    apply_stack_plan(plan, paths, user_dir, version_dir, xfce_local, params["disk"])
    verify_stack_mounted(paths, xfce_local, mfs_entry, wanted_low_root)
    return Result(changed=True, data={**data, "mounted": True, "disk": disk_figures(paths)})


def is_bind_of(entry: MountEntry, mfs_entry: MountEntry, wanted_root: str) -> bool:
    return entry.fstype == mfs_entry.fstype and entry.source == mfs_entry.source and entry.root == wanted_root


def refuse_live_stack_mismatch(merge_entry, low_entry, low_is_wanted, paths, xfce_local, user, version) -> None:
    differences = overlay_differences(merge_entry, paths, xfce_local)
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


# --- the owner record ---------------------------------------------------------------------

def read_owner(mfs_mount: str, user: str) -> dict | None:
    try:
        with open(owner_path(mfs_mount, user), encoding="utf-8") as stream:
            record = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise Failed(f"cannot read {owner_path(mfs_mount, user)}: {error}", "owner_unreadable") from None
    return record if isinstance(record, dict) else None


def write_owner(mfs_mount: str, user: str, node: str | None, op: int | None, member: str | None) -> None:
    path = owner_path(mfs_mount, user)
    make_dirs(posixpath.dirname(path), 0o755)
    record = {"node": node, "op": op, "since": time.time(), "member": member}
    write_file_atomically(path, json.dumps(record, sort_keys=True).encode() + b"\n", 0o644)


def record_member(record: dict | None) -> str | None:
    member = (record or {}).get("member")
    return member if isinstance(member, str) and re.fullmatch(MEMBER_ID_PATTERN, member) else None


def claim_or_refuse(mfs_mount: str, user: str, node: str, check: bool) -> None:
    record = read_owner(mfs_mount, user)
    if record is None or record.get("node") is None:
        if not check:
            write_owner(mfs_mount, user, node, None, record_member(record))
        return
    if record.get("node") != node:
        raise PreconditionFailed(
            f"{user}'s desktop belongs to node {record.get('node')!r} (its owner record on MooseFS); "
            f"this node ({node}) may not run it. Move it with labvm switch.",
            "fenced",
        )


def set_owner(params: dict, check: bool) -> Result:
    """Make a node the owner. The record keeps its member id unless a new one is given: a switch
    moves the desktop, it does not change whose files they are."""
    previous = read_owner(params["mfs_mount"], params["user"])
    member = params["member"] or record_member(previous)
    changed = previous is None or (previous.get("node"), previous.get("op"), record_member(previous)) != (
        params["node"], params["op"], member)
    if changed and not check:
        write_owner(params["mfs_mount"], params["user"], params["node"], params["op"], member)
    return Result(changed=changed, data={"previous": previous, "node": params["node"], "member": member})


def release_owner(params: dict, check: bool) -> Result:
    """The desktop is removed (its files stay as versions): no node owns it any more. A record
    with a member id stays, with no node, so a later `labvm create` knows whose files they are."""
    path = owner_path(params["mfs_mount"], params["user"])
    record = read_owner(params["mfs_mount"], params["user"]) if os.path.lexists(path) else None
    member = record_member(record)
    if member is None:
        exists = os.path.lexists(path)
        if exists and not check:
            os.unlink(path)
        return Result(changed=exists, data={})
    changed = record.get("node") is not None
    if changed and not check:
        write_owner(params["mfs_mount"], params["user"], None, None, member)
    return Result(changed=changed, data={"member": member})


def get_owner(params: dict, check: bool) -> Result:
    return Result(changed=False, data={"owner": read_owner(params["mfs_mount"], params["user"])})


def apply_stack_plan(plan: StackPlan, paths: VmPaths, user_dir: str, version_dir: str, xfce_local: str, disk: int) -> None:
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
        mount_overlay(paths, xfce_local)


def make_dirs(path: str, mode: int) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, mode)  # makedirs' mode is filtered by the umask


def run_mount(argv: list[str], what: str) -> None:
    log(f"running {' '.join(argv)}")
    try:
        result = run_command(argv, timeout_s=MOUNT_TIMEOUT_S)
    except CommandTimedOut as error:
        raise TemporaryFailure(f"{what}: {error}", "mount_timeout") from None
    if result.returncode != 0:
        raise Failed(f"{what} failed: {result.output_tail() or 'no output'} (the kernel log may say more)", "mount_failed")


def mount_tool() -> str:
    return require_tool("mount", UTIL_LINUX_HINT, "mount_missing")

def bind_read_only(source: str, target: str) -> None:
    mount = mount_tool()
    run_mount([mount, "--bind", "-o", "ro", source, target], f"binding {source} at {target}")
    entry = mount_at(read_mountinfo(), target)
    # util-linux before 2.27 ignores ro on a bind; remount it read-only then.
    if entry is not None and "ro" not in entry.mount_options:
        run_mount([mount, "-o", "remount,bind,ro", target], f"making {target} read-only")


def overlay_options(paths: VmPaths, xfce_local: str) -> str:
    layers = [f"lowerdir={paths.low_local}:{xfce_local}", f"upperdir={paths.up_local}", f"workdir={paths.work_local}"]
    return ",".join(layers + list(OVERLAY_FIXED_OPTIONS))


def mount_overlay(paths: VmPaths, xfce_local: str) -> None:
    argv = [mount_tool(), "-t", "overlay", "overlay", "-o", overlay_options(paths, xfce_local), paths.merge_local]
    run_mount(argv, f"mounting the overlay at {paths.merge_local}")


def verify_stack_mounted(paths: VmPaths, xfce_local: str, mfs_entry: MountEntry, wanted_low_root: str) -> None:
    entries = read_mountinfo()
    low_entry, merge_entry = mount_at(entries, paths.low_local), mount_at(entries, paths.merge_local)
    if low_entry is None or not is_bind_of(low_entry, mfs_entry, wanted_low_root) or "ro" not in low_entry.mount_options:
        raise Failed(f"{paths.low_local} is not the read-only bind of {wanted_low_root} after mounting", "stack_not_mounted")
    if merge_entry is None or overlay_differences(merge_entry, paths, xfce_local):
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


def refuse_running_container(socket_path: str, user: str) -> None:
    if not os.path.exists(socket_path):
        return  # no dockerd here, so no container either
    container = inspect_container(socket_path, container_name(user))
    if container is not None and container_state(container)["running"]:
        raise PreconditionFailed(
            f"container {container_name(user)} is running on this stack; stop it first (stop_container)", "container_running"
        )


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


# --- the container ------------------------------------------------------------------------


def container_name(user: str) -> str:
    return CONTAINER_PREFIX + user


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def spec_hash(spec: dict) -> str:
    """sha256 of the container's form and the validated spec (all keys present) as canonical
    JSON: sorted keys, no spaces, ASCII. A container made in an older form (its root from
    docker's layer, top-level directories bound in) never matches."""
    return hashlib.sha256(canonical_json({"form": CONTAINER_FORM, "spec": spec})).hexdigest()


# Of docker's default set, what a member's root needs least and could abuse most: raw packets
# (ARP spoofing a neighbour's session on the bridge), device nodes (raw disks through MooseFS
# on another node), file capabilities that outlive the desktop on MooseFS, and writing into
# the node's audit log. ping still works through ICMP datagram sockets, which docker allows.
DROPPED_CAPABILITIES = ("NET_RAW", "MKNOD", "SETFCAP", "AUDIT_WRITE")


def container_create_body(user: str, spec: dict, merge_local: str, runtime_dir: str) -> dict:
    """The body of POST /containers/create for this spec; pure, so tests can check it whole."""
    ports = spec["ports"]
    port_bindings = {VNC_CONTAINER_PORT: [{"HostIp": spec["bind_address"], "HostPort": str(ports["vnc"])}]}
    if ports["ssh"] is not None:
        port_bindings[SSH_CONTAINER_PORT] = [{"HostIp": spec["bind_address"], "HostPort": str(ports["ssh"])}]
    host_config = {
        # tini as PID 1 comes from the entrypoint (see TINI_PATH); false also overrides a
        # dockerd configured with `"init": true`, whose /sbin/docker-init would be hidden.
        "Init": False,
        # The container's root is the desktop's overlay: the labvm runtime (runtime.py) takes
        # it from this mount and drops the mount itself. docker's own layer is not used.
        "Runtime": RUNTIME_NAME,
        "Binds": [f"{merge_local}:{ROOTFS_SENTINEL}:ro", f"{runtime_dir}:{RUNTIME_IN_CONTAINER}:ro"],
        # /run holds this start's sockets and pid files, as on any Linux system: never persisted.
        "Tmpfs": {"/run": "rw,nosuid,nodev,mode=755"},
        # dockerd keeps what the desktop prints; capped, so a chatty desktop cannot fill the node.
        "LogConfig": {"Type": "json-file", "Config": {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}},
        "Memory": spec["memory"],
        "MemorySwap": spec["memory"],  # the limit counts memory + swap: equal means no swap
        "PortBindings": port_bindings,
        # No restart by dockerd: after a node reboot the stack is not mounted yet, and a
        # restarted container would bind empty directories over its root. `labvm start`
        # mounts the layers first.
        "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
        # The desktops' own network, which net.ensure_isolation walls off from MooseFS, the
        # nodes and each other.
        "NetworkMode": DESKTOP_NETWORK,
        "CapDrop": list(DROPPED_CAPABILITIES),
    }
    optional = {
        "NanoCpus": None if spec["cpus"] is None else round(spec["cpus"] * 1e9),
        "CpusetCpus": spec["cpuset"],
        "ShmSize": spec["shm"],
        "PidsLimit": spec["pids"],
        "BlkioWeight": spec["io_weight"],
        "BlkioDeviceReadBps": device_rate(spec, "io_read_bps"),
        "BlkioDeviceWriteBps": device_rate(spec, "io_write_bps"),
        "DeviceRequests": [{"Driver": "nvidia", "DeviceIDs": spec["gpus"], "Capabilities": [["gpu"]]}] if spec["gpus"] else None,
    }
    host_config.update({key: value for key, value in optional.items() if value is not None})
    return {
        "Image": spec["image"],
        "Hostname": spec["hostname"],
        "User": "0:0",
        # tini reaps the desktop's orphans and forwards docker stop's SIGTERM to init.
        "Entrypoint": [TINI_PATH, "--", INIT_PATH],
        "WorkingDir": "/",
        "Env": [f"{key}={value}" for key, value in sorted(container_env(user, spec).items())],
        "Labels": {**spec["labels"], LABEL_USER: user, LABEL_SPEC_HASH: spec_hash(spec)},
        "ExposedPorts": {port: {} for port in port_bindings},
        "StopSignal": "SIGTERM",
        "HostConfig": host_config,
    }


def device_rate(spec: dict, key: str) -> list[dict] | None:
    return None if spec[key] is None else [{"Path": spec["io_device"], "Rate": spec[key]}]


def container_env(user: str, spec: dict) -> dict:
    env = {"NVIDIA_DRIVER_CAPABILITIES": "all", **spec["env"]}
    if not spec["gpus"]:
        # Should nvidia be the default runtime, an unset variable could mean "all GPUs".
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    env.update(
        {
            "LABVM_USER": user,
            "LABVM_UID": str(spec["uid"]),
            "LABVM_VNC_GEOMETRY": spec["vnc_geometry"],
            "LABVM_DESKTOP_CMD": spec["desktop_cmd"],
            "LABVM_SSH": "1" if spec["ports"]["ssh"] is not None else "0",
        }
    )
    return env


def container_state(container: dict) -> dict:
    state = container.get("State") or {}
    labels = (container.get("Config") or {}).get("Labels") or {}
    running = bool(state.get("Running")) and not state.get("Restarting")
    return {
        "exists": True,
        "id": container.get("Id"),
        "running": running,
        "status": state.get("Status"),
        "started_at": state.get("StartedAt") if running else None,
        "spec_hash": labels.get(LABEL_SPEC_HASH),
        "user_label": labels.get(LABEL_USER),
    }


NO_CONTAINER = {"exists": False, "id": None, "running": False, "status": None, "started_at": None, "spec_hash": None}


def inspect_ours(socket_path: str, user: str) -> dict | None:
    container = inspect_container(socket_path, container_name(user))
    if container is None:
        return None
    state = container_state(container)
    if state["user_label"] != user:
        raise PreconditionFailed(
            f"a container named {container_name(user)} exists but is not labvm's desktop of {user} "
            f"(label {LABEL_USER}={state['user_label']!r}); rename or remove it",
            "container_not_ours",
        )
    return state


def public_state(state: dict) -> dict:
    return {key: state[key] for key in NO_CONTAINER}


# --- runtime files ------------------------------------------------------------------------


def write_file_atomically(path: str, content: bytes, mode: int) -> bool:
    """Write content at path with mode, unless it is already there; True if written."""
    try:
        with open(path, "rb") as stream:
            if stream.read() == content and (os.stat(path).st_mode & 0o7777) == mode:
                return False
    except FileNotFoundError:
        pass
    write_atomically(path, content, mode)
    return True


def ensure_runtime_files(runtime_dir: str) -> bool:
    """tini, init and apply-password in the runtime dir; True if any was (re)written."""
    if os.path.islink(runtime_dir):
        raise PreconditionFailed(f"{runtime_dir} is a symlink; it must be a directory of root's", "runtime_is_symlink")
    tini = find_static_tini()
    created = not os.path.isdir(runtime_dir)
    make_dirs(runtime_dir, 0o700)
    with open(tini, "rb") as stream:
        tini_content = stream.read()
    changed = [
        write_file_atomically(posixpath.join(runtime_dir, "tini"), tini_content, 0o700),
        write_file_atomically(posixpath.join(runtime_dir, "init"), INIT_SCRIPT.encode(), 0o700),
        write_file_atomically(posixpath.join(runtime_dir, "apply-password"), APPLY_PASSWORD_SCRIPT.encode(), 0o700),
    ]
    return created or any(changed)


def find_static_tini() -> str:
    """The node's tini, statically linked: it runs inside whatever rootfs the desktop has."""
    for name in TINI_CANDIDATES:
        path = find_tool(name)
        if path is not None and is_static_elf(os.path.realpath(path)):
            return os.path.realpath(path)
    raise PreconditionFailed(
        f"no statically linked tini on this node (looked for {', '.join(TINI_CANDIDATES)}); install docker.io or tini",
        "tini_missing",
    )


PT_INTERP = 3


def is_static_elf(path: str) -> bool:
    """An ELF executable without a program interpreter (no PT_INTERP program header)."""
    try:
        with open(path, "rb") as stream:
            header = stream.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] not in (1, 2):
                return False
            wide, order = header[4] == 2, "little" if header[5] == 1 else "big"
            if wide:
                table, entry_size, count = header[0x20:0x28], header[0x36:0x38], header[0x38:0x3A]
            else:
                table, entry_size, count = header[0x1C:0x20], header[0x2A:0x2C], header[0x2C:0x2E]
            table, entry_size, count = (int.from_bytes(field, order) for field in (table, entry_size, count))
            for index in range(count):
                stream.seek(table + index * entry_size)
                if int.from_bytes(stream.read(4), order) == PT_INTERP:
                    return False
            return count > 0
    except OSError:
        return False


def write_secret(runtime_dir: str, password: str) -> str:
    path = posixpath.join(runtime_dir, SECRET_NAME)
    # One line: chpasswd gets "user:" + this line, `vncpasswd -f` reads one password per line.
    write_file_atomically(path, (password + "\n").encode(), 0o600)
    return path


def remove_secret(runtime_dir: str) -> None:
    try:
        os.unlink(posixpath.join(runtime_dir, SECRET_NAME))
    except FileNotFoundError:
        pass


# --- ensure_container ---------------------------------------------------------------------


def ensure_container(params: dict, check: bool) -> Result:
    user, spec, socket_path = params["user"], params["spec"], params["docker_socket"]
    if params["image_sessions"] is not None:
        chosen = params["image_sessions"]["by_desktop"].get(image_desktop(params["image_sessions"]["xfce_local"]) or "")
        spec = {**spec, "desktop_cmd": chosen or spec["desktop_cmd"]}
    if spec["name"] != container_name(user):
        raise BadRequest(f"param 'spec': 'name' must be {container_name(user)!r} for user {user!r}", "bad_param")
    if spec["labels"].get(LABEL_USER, user) != user:
        raise BadRequest(f"param 'spec': label {LABEL_USER!r} must be {user!r} if given", "bad_param")
    paths = mounted_stack_paths(params["data_dir"], user)
    refuse_symlinks(paths)
    require_stack_mounted(paths)
    if params["node"] is not None and params["mfs_mount"] is not None:
        claim_or_refuse(params["mfs_mount"], user, params["node"], check=True)
    wanted_hash = spec_hash(spec)
    state = inspect_ours(socket_path, user)
    if state is not None and state["spec_hash"] != wanted_hash and not state["running"] and state["status"] != "paused":
        # A stopped container holds nothing of the desktop's (its root is the overlay): one made
        # from another spec, or in an older form, is replaced.
        if check:
            return Result(changed=True, data={"name": spec["name"], "spec_hash": wanted_hash, "created": True,
                                              "started": False, "container": public_state(state), "replaces": state["spec_hash"]})
        log(f"replacing the stopped container {spec['name']}: it was made from another spec or in an older form")
        remove_container({"user": user, "docker_socket": socket_path, "timeout": 10}, False)
        state = None
    if state is not None and state["spec_hash"] != wanted_hash:
        raise PreconditionFailed(
            f"container {spec['name']} was created from another spec (hash {str(state['spec_hash'])[:12]}, "
            f"wanted {wanted_hash[:12]}); remove it (remove_container) to recreate it",
            "container_differs",
        )
    data = {"name": spec["name"], "spec_hash": wanted_hash, "created": state is None, "started": False}
    if state is not None and state["running"] and state["status"] == "paused" and not check:
        # A backup froze it and was killed before it could thaw it: starting it thaws it.
        pause_or_unpause({"user": user, "docker_socket": socket_path}, False, pause=False)
        state = inspect_ours(socket_path, user)
    if state is not None and state["running"]:
        vnc = {"address": spec["bind_address"], "port": spec["ports"]["vnc"], "ready": vnc_answers(spec)}
        if check:
            return Result(changed=False, data={**data, "container": public_state(state), "vnc": vnc})
        scripts_changed = ensure_runtime_files(paths.runtime)
        return Result(changed=scripts_changed, data={**data, "container": public_state(state), "vnc": vnc})
    if check:
        return Result(changed=True, data={**data, "container": public_state(state) if state else dict(NO_CONTAINER)})
    ensure_runtime_files(paths.runtime)
    write_secret(paths.runtime, params["secrets"]["password"])
    try:
        if state is None:
            create_container(
                socket_path,
                container_create_body(user, spec, paths.merge_local, paths.runtime),
            )
        start_container(socket_path, spec["name"])
        wait_for_vnc(socket_path, spec, params["vnc_wait_s"])
    finally:
        remove_secret(paths.runtime)
    state = inspect_ours(socket_path, user) or dict(NO_CONTAINER)
    vnc = {"address": spec["bind_address"], "port": spec["ports"]["vnc"], "ready": True}
    return Result(changed=True, data={**data, "started": True, "container": public_state(state), "vnc": vnc})


def require_stack_mounted(paths: VmPaths) -> None:
    entry = mount_at(read_mountinfo(), paths.merge_local)
    if entry is None or entry.fstype != "overlay":
        raise PreconditionFailed(f"{paths.merge_local} is not mounted; run ensure_stack first", "stack_not_mounted")


def create_container(socket_path: str, body: dict) -> str:
    name = body["Labels"][LABEL_USER]
    status, answer = docker_json_call(socket_path, "POST", api_url("/containers/create", {"name": container_name(name)}), body)
    if status == 404:
        raise PreconditionFailed(
            f"image {body['Image']} is not on this node: {docker_message(answer)}; run labvm image push", "image_missing"
        )
    if status == 409:
        raise TemporaryFailure(
            f"container {container_name(name)} appeared meanwhile: {docker_message(answer)}", "container_conflict"
        )
    if status != 201 or not isinstance(answer, dict):
        raise unexpected(f"creating container {container_name(name)}", status, answer, "container_create_failed")
    for warning in answer.get("Warnings") or []:
        log(f"dockerd: {warning}")
    return str(answer.get("Id"))


def start_container(socket_path: str, name: str) -> bool:
    """True if it was started, False if it was already running."""
    status, answer = docker_json_call(socket_path, "POST", api_url(f"/containers/{quoted(name)}/start"))
    if status == 304:
        return False
    if status != 204:
        raise unexpected(f"starting container {name}", status, answer, "container_start_failed")
    return True


def vnc_answers(spec: dict, timeout_s: float = VNC_PROBE_TIMEOUT_S) -> bool:
    """A connection that gets an RFB greeting. A bare TCP connect is not enough: docker-proxy
    accepts connections on the published port before anything listens in the container."""
    try:
        with socket.create_connection((spec["bind_address"], spec["ports"]["vnc"]), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            greeting = b""
            while len(greeting) < len(RFB_GREETING):
                chunk = connection.recv(12)
                if not chunk:
                    break
                greeting += chunk
            return greeting.startswith(RFB_GREETING)
    except OSError:
        return False


def wait_for_vnc(socket_path: str, spec: dict, wait_s: int) -> None:
    """Init applies the password before it starts the VNC server, so a greeting means the
    secret has been read. A container that stops meanwhile fails at once, with its log."""
    deadline = time.monotonic() + wait_s
    while True:
        if vnc_answers(spec):
            return
        container = inspect_container(socket_path, spec["name"])
        if container is None or not container_state(container)["running"]:
            logs = container_logs_tail(socket_path, spec["name"])
            raise Failed(
                f"container {spec['name']} stopped while starting its desktop; its log: {logs or '(empty)'}", "container_exited"
            )
        if time.monotonic() >= deadline:
            logs = container_logs_tail(socket_path, spec["name"])
            raise Failed(
                f"VNC on {spec['bind_address']}:{spec['ports']['vnc']} did not answer within {wait_s} s; "
                f"container log: {logs or '(empty)'}",
                "vnc_not_listening",
            )
        time.sleep(VNC_POLL_S)


# --- set_password -------------------------------------------------------------------------


def set_password(params: dict, check: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None or not state["running"]:
        raise PreconditionFailed(
            f"container {container_name(user)} is not running; start the desktop first", "container_not_running"
        )
    paths = mounted_stack_paths(params["data_dir"], user)
    refuse_symlinks(paths)
    data = {"name": container_name(user)}
    if check:
        return Result(changed=True, data=data)  # a password cannot be compared without applying it
    ensure_runtime_files(paths.runtime)
    write_secret(paths.runtime, params["secrets"]["password"])
    try:
        exit_code, output = exec_in_container(socket_path, container_name(user), [APPLY_PASSWORD_PATH], EXEC_TIMEOUT_S)
    finally:
        remove_secret(paths.runtime)
    if exit_code != 0:
        raise Failed(
            f"applying the password in {container_name(user)} failed (exit {exit_code}): {output[-400:] or 'no output'}",
            "password_not_applied",
        )
    return Result(changed=True, data=data)


# --- stop, remove, status -----------------------------------------------------------------


def stop_container(params: dict, check: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None or not state["running"]:
        return Result(changed=False, data={"container": public_state(state) if state else dict(NO_CONTAINER)})
    if check:
        return Result(changed=True, data={"container": public_state(state)})
    stopped = stop(socket_path, container_name(user), params["timeout"])
    after = inspect_ours(socket_path, user)
    return Result(changed=stopped, data={"container": public_state(after) if after else dict(NO_CONTAINER)})


def stop(socket_path: str, name: str, timeout: int) -> bool:
    """docker stop: SIGTERM, then SIGKILL after timeout seconds. True if it was running."""
    status, body = docker_call(
        socket_path, "POST", api_url(f"/containers/{quoted(name)}/stop", {"t": timeout}), timeout_s=timeout + 60.0
    )
    if status not in (204, 304, 404):
        raise unexpected(f"stopping container {name}", status, body, "container_stop_failed")
    return status == 204


def remove_container(params: dict, check: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None:
        return Result(changed=False, data={"container": dict(NO_CONTAINER)})
    if check:
        return Result(changed=True, data={"container": dict(NO_CONTAINER)})
    name = container_name(user)
    if state["running"] or state["status"] == "restarting":
        # Stopped the way stop_container does, so the desktop gets its SIGTERM; never killed outright.
        stop(socket_path, name, params["timeout"])
    status, body = docker_call(socket_path, "DELETE", api_url(f"/containers/{quoted(name)}"))
    if status == 409:
        raise PreconditionFailed(f"dockerd refuses to remove {name}: {docker_message(body)}", "container_running")
    if status not in (204, 404):
        raise unexpected(f"removing container {name}", status, body, "container_remove_failed")
    return Result(changed=status == 204, data={"container": dict(NO_CONTAINER)})


def vm_status(params: dict, check: bool) -> Result:
    user = params["user"]
    paths = VmPaths.of(params["data_dir"], user)
    return Result(
        changed=False,
        data={"container": container_status(params["docker_socket"], user), "stack": stack_state(paths, user),
              "disk": disk_figures(paths)},
    )


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


def container_status(socket_path: str, user: str) -> dict:
    """Like inspect_ours, but a status never fails for dockerd's sake: the error is reported."""
    try:
        state = inspect_ours(socket_path, user)
    except (Failed, PreconditionFailed, TemporaryFailure) as error:
        return {**NO_CONTAINER, "exists": None, "error": error.msg}
    return {**(public_state(state) if state else NO_CONTAINER), "error": None}


# --- freeze, thaw, reset_upper ------------------------------------------------------------


def freeze(params: dict, check: bool) -> Result:
    """docker pause: the cgroup freezer stops every process of the desktop, so nothing writes
    while a backup flushes the sync and snapshots up_mfs. Pages already written are in the
    page cache, which the sync reads; the desktop sees only a pause of a second or two."""
    return pause_or_unpause(params, check, pause=True)


def thaw(params: dict, check: bool) -> Result:
    return pause_or_unpause(params, check, pause=False)


def pause_or_unpause(params: dict, check: bool, pause: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    name = container_name(user)
    container = inspect_container(socket_path, name)
    if container is None:
        raise PreconditionFailed(f"container {name} does not exist", "no_container")
    state = container.get("State") or {}
    paused = bool(state.get("Paused"))
    if not state.get("Running"):
        raise PreconditionFailed(f"container {name} is not running", "container_not_running")
    if paused == pause or check:
        return Result(changed=paused != pause, data={"paused": paused if check else pause})
    verb = "pause" if pause else "unpause"
    status, body = docker_call(socket_path, "POST", api_url(f"/containers/{quoted(name)}/{verb}"))
    if status not in (204, 304):
        raise unexpected(f"{verb} of container {name}", status, body, f"container_{verb}_failed")
    return Result(changed=True, data={"paused": pause})


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


# --- what runs in the container -----------------------------------------------------------

# POSIX sh, run as root by tini (docker's --init) as PID 2. The password never appears in argv,
# the environment or the log: chpasswd and vncpasswd read it from the secret file on stdin.
INIT_SCRIPT = r"""#!/bin/sh
# labvm desktop init. Written by the labvm vm helper into /run/labvm (read-only in here).
#   init                   create the user, apply a waiting password, start sshd, VNC, the desktop
#   init --apply-password  only apply /run/labvm/secret (labvm passwd, through docker exec)
set -u
RUNTIME=${LABVM_RUNTIME:-/run/labvm}
SECRET="$RUNTIME/secret"
USER_NAME=$LABVM_USER
USER_ID=$LABVM_UID
DISPLAY_NUMBER=1
VNC_PORT=5901
PIDS=""
VNC_PID=""

log() { echo "labvm-init: $*" >&2; }
die() { log "$*"; exit 1; }

as_user() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$USER_NAME" -- "$@"
    else
        su -s /bin/sh -c 'exec "$0" "$@"' -- "$USER_NAME" "$@"
    fi
}

home_of_user() { getent passwd "$USER_NAME" | cut -d: -f6; }

# labvm refuses the image's account names, but an image built elsewhere may hold others: never
# take over (and give sudo to) a system account or group. An account in the member's range with
# another uid is an earlier desktop's under this name (adopted files): its files are owned by it.
refuse_system_account() {
    uid=$(getent passwd "$USER_NAME" | cut -d: -f3)
    if [ -n "$uid" ] && { [ "$uid" -lt 1000 ] || [ "$uid" -ge 60000 ]; } 2>/dev/null; then
        die "the image already has a system account $USER_NAME (uid $uid); pick another member name"
    fi
    gid=$(getent group "$USER_NAME" | cut -d: -f3)
    if [ -n "$gid" ] && { [ "$gid" -lt 1000 ] || [ "$gid" -ge 60000 ]; } 2>/dev/null; then
        die "the image already has a system group $USER_NAME (gid $gid); pick another member name"
    fi
}

ensure_user() {
    refuse_system_account
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd -g "$USER_ID" "$USER_NAME" || groupadd "$USER_NAME" || die "cannot create group $USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        shell=/bin/sh
        [ -x /bin/bash ] && shell=/bin/bash
        useradd -m -u "$USER_ID" -g "$USER_NAME" -s "$shell" "$USER_NAME" || die "cannot create user $USER_NAME"
        log "created user $USER_NAME ($USER_ID)"
    fi
    if getent group sudo >/dev/null && ! id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx sudo; then
        usermod -aG sudo "$USER_NAME" || log "cannot add $USER_NAME to group sudo"
    fi
}

# Returns 2 when no password is waiting.
apply_password() {
    [ -s "$SECRET" ] || return 2
    { printf '%s:' "$USER_NAME"; cat "$SECRET"; } | chpasswd || { log "chpasswd failed"; return 1; }
    home=$(home_of_user)
    [ -n "$home" ] && [ -d "$home" ] || { log "user $USER_NAME has no home directory"; return 1; }
    vncpasswd=$(command -v tigervncpasswd || command -v vncpasswd) || { log "vncpasswd not found (tigervnc-tools)"; return 1; }
    mkdir -p "$home/.vnc" || return 1
    (umask 077 && "$vncpasswd" -f <"$SECRET" >"$home/.vnc/passwd.new") || { log "vncpasswd failed"; return 1; }
    mv -f "$home/.vnc/passwd.new" "$home/.vnc/passwd" || return 1
    chown "$USER_NAME:" "$home/.vnc" "$home/.vnc/passwd" && chmod 700 "$home/.vnc" && chmod 600 "$home/.vnc/passwd" || return 1
    log "password applied for $USER_NAME"
}

start_sshd() {
    [ "${LABVM_SSH:-0}" = 1 ] || return 0
    [ -x /usr/sbin/sshd ] || { log "sshd is not installed; the ssh port stays closed"; return 0; }
    mkdir -p /run/sshd && chmod 755 /run/sshd
    ssh-keygen -A >/dev/null 2>&1 || log "ssh-keygen -A failed"
    /usr/sbin/sshd -D -e &
    PIDS="$PIDS $!"
}

start_vnc() {
    home=$(home_of_user)
    [ -s "$home/.vnc/passwd" ] || die "no VNC password for $USER_NAME yet: set one with labvm passwd"
    server=$(command -v Xtigervnc || command -v Xvnc) || die "Xtigervnc not found (tigervnc-standalone-server)"
    # /tmp persists with the upper layer: a lock from an earlier start names a PID that may be
    # alive again now, and the X server would refuse the display.
    rm -f "/tmp/.X$DISPLAY_NUMBER-lock" "/tmp/.X11-unix/X$DISPLAY_NUMBER"
    mkdir -p /tmp/.X11-unix && chmod 1777 /tmp/.X11-unix
    as_user "$server" ":$DISPLAY_NUMBER" -rfbport "$VNC_PORT" -rfbauth "$home/.vnc/passwd" -SecurityTypes VncAuth \
        -geometry "${LABVM_VNC_GEOMETRY:-1280x800}" -desktop "$USER_NAME" -nolisten tcp &
    VNC_PID=$!
    PIDS="$PIDS $VNC_PID"
    tries=0
    while [ ! -S "/tmp/.X11-unix/X$DISPLAY_NUMBER" ]; do
        kill -0 "$VNC_PID" 2>/dev/null || die "the VNC server exited at start"
        tries=$((tries + 1))
        [ "$tries" -le 300 ] || die "the VNC server did not open display :$DISPLAY_NUMBER within 30 s"
        sleep 0.1
    done
}

start_desktop() {
    [ -n "${LABVM_DESKTOP_CMD:-}" ] || return 0
    (
        export DISPLAY=":$DISPLAY_NUMBER"
        cd "$home" 2>/dev/null || cd /
        as_user /bin/sh -c "$LABVM_DESKTOP_CMD"
    ) &
    PIDS="$PIDS $!"
}

stop() {
    trap - TERM INT
    log "stopping"
    for pid in $PIDS; do kill -TERM "$pid" 2>/dev/null; done
    wait
    exit "${1:-0}"
}

case "${1:-}" in
--apply-password)
    ensure_user
    apply_password
    status=$?
    [ "$status" -ne 2 ] || die "no password waiting in $SECRET"
    exit "$status"
    ;;
"") ;;
*) die "unknown argument: $1" ;;
esac

trap stop TERM INT
ensure_user
if [ -s "$SECRET" ]; then
    apply_password || die "could not apply the password"
fi
start_sshd
start_vnc
start_desktop
log "desktop of $USER_NAME on display :$DISPLAY_NUMBER, VNC port $VNC_PORT"
wait "$VNC_PID"
status=$?
log "the VNC server exited (status $status)"
stop 1
"""

APPLY_PASSWORD_SCRIPT = r"""#!/bin/sh
# Applies /run/labvm/secret as the login and VNC password; run by the labvm vm helper through
# docker exec, which deletes the secret again afterwards.
exec "${LABVM_RUNTIME:-/run/labvm}/init" --apply-password
"""


ACTIONS = {
    "ensure_stack": Action(run=ensure_stack, params=ENSURE_STACK_PARAMS),
    "ensure_stack_unmounted": Action(run=ensure_stack_unmounted, params=STACK_UNMOUNTED_PARAMS),
    "ensure_container": Action(run=ensure_container, params=ENSURE_CONTAINER_PARAMS),
    "set_password": Action(run=set_password, params=SET_PASSWORD_PARAMS),
    "stop_container": Action(run=stop_container, params=STOP_CONTAINER_PARAMS),
    "remove_container": Action(run=remove_container, params=REMOVE_CONTAINER_PARAMS),
    "remove_local_layers": Action(run=remove_local_layers, params=REMOVE_LAYERS_PARAMS),
    "status": Action(run=vm_status, params=STATUS_PARAMS),
    "purge_mfs_data": Action(run=purge_mfs_data, params=PURGE_PARAMS),
    "freeze": Action(run=freeze, params=FREEZE_PARAMS),
    "thaw": Action(run=thaw, params=FREEZE_PARAMS),
    "reset_upper": Action(run=reset_upper, params=RESET_UPPER_PARAMS),
    "set_owner": Action(run=set_owner, params=SET_OWNER_PARAMS),
    "owner": Action(run=get_owner, params=OWNER_PARAMS),
    "release_owner": Action(run=release_owner, params=OWNER_PARAMS),
    "resize_disk": Action(run=resize_disk, params=RESIZE_PARAMS),
}
