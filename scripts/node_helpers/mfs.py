"""mfs: the node's MooseFS mount.

Actions:
  ensure_quota      a hard MooseFS quota on one member's tree (vms/USER)
  ensure_mounted    mount MASTER:PORT SUBDIR at MOUNT unless that mount is already there
  ensure_unmounted  unmount it cleanly; a busy mount is refused, never detached lazily
  status            what the mount table says about MOUNT (reads /proc only)

The mount always carries `nosuid,nodev`, and the `vms` tree that holds every member's
versions is root's alone (0700). The members' files hold whatever a member with root in their
desktop made: setuid-root programs, device nodes. Through the overlay those keep their meaning
inside the desktop (the overlay mount's own flags decide, not the lower layer's, and a whiteout
is only ever stat'ed), but on the node itself no local account may run or open them. An older
mount with `suid,dev` is switched over in place (a bind remount changes only the flags).
"""

import errno
import os
import re
import stat

from _contract import (
    Action,
    BadRequest,
    Failed,
    Param,
    PreconditionFailed,
    Result,
    TemporaryFailure,
    absolute_path,
    integer_between,
    log,
    string_matching,
    user_name,
)
from _layout import VMS_DIR, mfs_user_dir
from _system import (
    CommandTimedOut,
    MountEntry,
    find_tool,
    mfs_call,
    mount_at,
    mounts_below,
    read_mountinfo,
    refuse_symlinked_path,
    require_tool,
    run_command,
    unmount,
)

DEFAULT_PORT = 9421
MFS_CLIENT_HINT = "install the moosefs-client package"
# mfsmount itself gives up after about 20 s when the master does not answer; this only
# guards against a client that never returns.
MFSMOUNT_TIMEOUT_S = 60.0

REQUIRED_OPTIONS = ("nosuid", "nodev")
# FUSE's own option: the kernel checks each access against the mode bits. Without it the
# client decides at lookup only, and a path root's sync daemon looked up a moment before is in
# the kernel's cache: any node account then walks through the 0700 vms tree unchecked. It can
# only be set when mounting, so a mount without it is mounted again as soon as nothing uses it.
KERNEL_CHECKS_OPTION = "default_permissions"
REFUSED_OPTIONS = {
    "suid": "members' setuid programs on MooseFS must not run on the node",
    "dev": "members' device nodes on MooseFS must not open on the node",
    "mfsmaster": "use the 'master' param",
    "mfsport": "use the 'port' param",
    "mfssubfolder": "use the 'subdir' param",
    "mfspassword": "a password in mount options is visible in the process list",
    "mfsmd5pass": "a password hash in mount options is visible in the process list",
    "mfspassfile": "passwords are not supported by this helper",
    "mfscfgfile": "all mount options must be visible in the request",
}
_OPTION_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_OPTION_VALUE = re.compile(r"[A-Za-z0-9_.:/+-]+")

# mfsmount's messages (MooseFS 3.0) that mean "the master could not be reached".
UNREACHABLE_MARKERS = (
    "can't connect to mfsmaster",
    "can't resolve master",
    "connection timed out",
    "connection refused",
    "no route to host",
)
REGISTER_ERROR_MARKER = "mfsmaster register error"
MISSING_SUBDIR_MARKER = "no such file or directory"

MFS_SOURCE = re.compile(r"mfs#(?P<master>[^:]+):(?P<port>\d+)")
VMS_MODE = 0o700
MOUNT_PARAMS_FILE = ".params"  # MooseFS serves it at the mount root from the client's memory


# --- parameters ---------------------------------------------------------------------------

master_address = string_matching(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", "a host name or IPv4 address")


def mount_options(name: str, value) -> tuple[str, ...]:
    """Comma-separated `key[=value]` items with a conservative character set. Errors name the
    key only: a value could be a password someone put there by mistake."""
    if not isinstance(value, str):
        raise BadRequest(f"param {name!r} must be a string of comma-separated options", "bad_param")
    options = tuple(item for item in value.split(",") if item)
    for option in options:
        check_mount_option(name, option)
    return options


def check_mount_option(name: str, option: str) -> None:
    key, has_value, value = option.partition("=")
    if not _OPTION_KEY.fullmatch(key):
        raise BadRequest(
            f"param {name!r}: an option name may only use letters, digits and _ and must start with a letter", "bad_param"
        )
    if key in REFUSED_OPTIONS:
        raise BadRequest(f"param {name!r}: option {key!r} is not allowed: {REFUSED_OPTIONS[key]}", "bad_param")
    if has_value and not _OPTION_VALUE.fullmatch(value):
        raise BadRequest(f"param {name!r}: the value of option {key!r} may only use letters, digits and _.:/+-", "bad_param")


def with_required_options(options: tuple[str, ...]) -> tuple[str, ...]:
    required = REQUIRED_OPTIONS + (KERNEL_CHECKS_OPTION,)
    return options + tuple(option for option in required if option not in options)


def kernel_checks(entry: MountEntry) -> bool:
    return KERNEL_CHECKS_OPTION in entry.super_options


MOUNT_PARAM = {"mount": Param(absolute_path, required=True)}
ENSURE_MOUNTED_PARAMS = {
    "master": Param(master_address, required=True),
    "port": Param(integer_between(1, 65535), default=DEFAULT_PORT),
    **MOUNT_PARAM,
    "subdir": Param(absolute_path, default="/"),
    "options": Param(mount_options, default=()),
}


# --- reading the mount --------------------------------------------------------------------


def is_moosefs(entry: MountEntry) -> bool:
    return entry.fstype.startswith("fuse") and (
        entry.source.startswith("mfs#") or entry.source == "MFS" or entry.fstype == "fuse.mfs"
    )


def parse_mfs_source(source: str) -> tuple[str, int] | None:
    """mfsmount names its mounts `mfs#MASTER:PORT`."""
    match = MFS_SOURCE.fullmatch(source)
    return (match.group("master"), int(match.group("port"))) if match else None


def parse_mount_params(text: str) -> dict[str, str]:
    """The `key: value` lines of a MooseFS mount's .params file."""
    values = {}
    for line in text.splitlines():
        key, separator, value = line.partition(": ")
        if separator:
            values[key.strip()] = value.strip()
    return values


def describe_mount(mount: str, entry: MountEntry | None, below: int) -> dict:
    source = parse_mfs_source(entry.source) if entry else None
    return {
        "mount": mount,
        "mounted": entry is not None,
        "is_moosefs": bool(entry and is_moosefs(entry)),
        "fstype": entry.fstype if entry else None,
        "source": entry.source if entry else None,
        "master": source[0] if source else None,
        "port": source[1] if source else None,
        "mount_options": list(entry.mount_options) if entry else [],
        "mounts_below": below,
    }


def current_mount(mount: str) -> tuple[MountEntry | None, dict]:
    entries = read_mountinfo()
    entry = mount_at(entries, mount)
    return entry, describe_mount(mount, entry, len(mounts_below(entries, mount)))


def mount_status(params: dict, check: bool) -> Result:
    return Result(changed=False, data=current_mount(params["mount"])[1])


# --- ensure_mounted -----------------------------------------------------------------------


def ensure_mounted(params: dict, check: bool) -> Result:
    mount = params["mount"]
    options = with_required_options(params["options"])
    entry, described = current_mount(mount)
    wanted = {"master": params["master"], "port": params["port"], "subdir": params["subdir"], "options": list(options)}
    if entry is not None:
        verify_existing_mount(entry, params)
        if not kernel_checks(entry) and not check and mount_again(mount):
            return Result(changed=True, data=fresh_mount(params, options, wanted))
        changed = open_flags(entry) != [] or tree_is_open(mount) or not kernel_checks(entry)
        if changed and not check:
            close_mount(mount, entry)
            entry, described = current_mount(mount)
        return Result(changed=changed, data={**described, "wanted": wanted, "kernel_checks": kernel_checks(entry)})
    refuse_symlinked_path(mount)
    if check:
        return Result(changed=True, data={**described, "wanted": wanted, "kernel_checks": True})
    return Result(changed=True, data=fresh_mount(params, options, wanted))


def fresh_mount(params: dict, options: tuple[str, ...], wanted: dict) -> dict:
    mount = params["mount"]
    run_mfsmount(params, options)
    entry, described = current_mount(mount)
    if entry is None or not is_moosefs(entry):
        raise Failed(f"mfsmount reported success but no MooseFS is mounted at {mount}", "mfs_mount_missing")
    close_mount(mount, entry)
    return {**described, "wanted": wanted, "kernel_checks": kernel_checks(entry)}


def mount_again(mount: str) -> bool:
    """Unmount a mount made without the kernel's access checks, so it can be made again with
    them; False (and it stays) while anything uses it: a running desktop, its sync."""
    try:
        unmount(mount)
    except PreconditionFailed:
        log(f"{mount} lacks {KERNEL_CHECKS_OPTION} and is in use: it is mounted again once nothing uses it")
        return False
    log(f"{mount} lacked {KERNEL_CHECKS_OPTION}: mounting it again with it")
    return True


def open_flags(entry: MountEntry) -> list[str]:
    """The per-mount flags the mount still lacks."""
    return [flag for flag in REQUIRED_OPTIONS if flag not in entry.mount_options]


def tree_is_open(mount: str) -> bool:
    # verify_existing_mount has just read the mount's .params, so it answers.
    try:
        info = os.lstat(os.path.join(mount, VMS_DIR))
    except FileNotFoundError:
        return True
    return not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or stat.S_IMODE(info.st_mode) != VMS_MODE


def close_mount(mount: str, entry: MountEntry) -> None:
    """nosuid,nodev on the mount and a root-only vms tree, whatever made them otherwise."""
    flags = open_flags(entry)
    if flags:
        log(f"remounting {mount} with {','.join(flags)}")
        result = run_command([find_tool("mount") or "mount", "-o", "remount,bind,nosuid,nodev", "--", mount], timeout_s=30.0)
        if result.returncode != 0:
            raise Failed(f"cannot remount {mount} nosuid,nodev: {result.output_tail()}", "mfs_remount_failed")
    vms = os.path.join(mount, VMS_DIR)
    try:
        os.mkdir(vms, VMS_MODE)
    except FileExistsError:
        pass
    info = os.lstat(vms)
    if not stat.S_ISDIR(info.st_mode):
        raise PreconditionFailed(f"{vms} is not a directory; move it away", "vms_not_a_directory")
    os.chown(vms, 0, 0, follow_symlinks=False)
    os.chmod(vms, VMS_MODE, follow_symlinks=False)


def verify_existing_mount(entry: MountEntry, params: dict) -> None:
    """An existing mount counts as done only if it is the MooseFS mount that was asked for."""
    mount = params["mount"]
    if not is_moosefs(entry):
        raise PreconditionFailed(
            f"{mount} already has a {entry.fstype} mount from {entry.source}, not MooseFS; "
            "unmount it or choose another mount point",
            "mount_point_in_use",
        )
    actual = mounted_from(entry, mount)
    expected = {"master": params["master"], "port": str(params["port"]), "subdir": params["subdir"]}
    differing = {key: value for key, value in actual.items() if expected[key] != value}
    if differing:
        shown = ", ".join(f"{key} {value} (wanted {expected[key]})" for key, value in differing.items())
        raise PreconditionFailed(
            f"MooseFS at {mount} is mounted from elsewhere: {shown}; run ensure_unmounted first", "mfs_mount_mismatch"
        )


def mounted_from(entry: MountEntry, mount: str) -> dict[str, str]:
    """Master, port and subdir of a live mount, from its .params file (the only place that
    names the subdir), else master and port from the mount source."""
    try:
        text = mfs_call("read", os.path.join(mount, MOUNT_PARAMS_FILE))
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise PreconditionFailed(
                f"MooseFS mount at {mount} is stale (its mfsmount is gone); run ensure_unmounted, then ensure_mounted",
                "mfs_mount_stale",
            ) from None
        log(f"cannot read {MOUNT_PARAMS_FILE} of {mount} ({error}); checking master only")
        source = parse_mfs_source(entry.source)
        return {"master": source[0], "port": str(source[1])} if source else {}
    values = parse_mount_params(text)
    keys = {"master": "mfsmaster", "port": "mfsport", "subdir": "mfssubfolder"}
    return {key: values[name] for key, name in keys.items() if name in values}


def mfsmount_argv(mfsmount: str, params: dict, options: tuple[str, ...]) -> list[str]:
    return [
        mfsmount,
        params["mount"],
        "-H",
        params["master"],
        "-P",
        str(params["port"]),
        "-S",
        params["subdir"],
        "-o",
        ",".join(options),
    ]


def run_mfsmount(params: dict, options: tuple[str, ...]) -> None:
    mfsmount = require_tool("mfsmount", MFS_CLIENT_HINT, "mfsmount_missing")
    os.makedirs(params["mount"], exist_ok=True)
    argv = mfsmount_argv(mfsmount, params, options)
    log(f"running {' '.join(argv)}")
    try:
        result = run_command(argv, timeout_s=MFSMOUNT_TIMEOUT_S)
    except CommandTimedOut as error:
        raise TemporaryFailure(
            f"MooseFS master {params['master']}:{params['port']} not reachable: {error}", "mfs_master_unreachable"
        ) from None
    if result.returncode != 0:
        raise mfsmount_failure(result.output_tail(), params)
    log(f"mfsmount: {result.output_tail()}")


def mfsmount_failure(output: str, params: dict):
    """Map mfsmount's complaint to an error the caller can act on."""
    master = f"{params['master']}:{params['port']}"
    lowered = output.lower()
    if any(marker in lowered for marker in UNREACHABLE_MARKERS):
        return TemporaryFailure(f"MooseFS master {master} not reachable: {output}", "mfs_master_unreachable")
    if REGISTER_ERROR_MARKER in lowered and MISSING_SUBDIR_MARKER in lowered:
        return PreconditionFailed(f"MooseFS subdir {params['subdir']} does not exist on {master}: {output}", "mfs_subdir_missing")
    if REGISTER_ERROR_MARKER in lowered:
        return PreconditionFailed(f"MooseFS master {master} refused the mount: {output}", "mfs_mount_refused")
    return Failed(f"mfsmount failed: {output or 'no output'}", "mfsmount_failed")


# --- ensure_unmounted ---------------------------------------------------------------------


def ensure_unmounted(params: dict, check: bool) -> Result:
    mount = params["mount"]
    entry, described = current_mount(mount)
    if entry is None:
        refuse_symlinked_path(mount)
        return Result(changed=False, data=described)
    if not is_moosefs(entry):
        raise PreconditionFailed(
            f"{mount} is a {entry.fstype} mount from {entry.source}, not MooseFS; refusing to unmount it", "not_moosefs"
        )
    if check:
        return Result(changed=True, data=described)
    unmount(mount)
    entry, described = current_mount(mount)
    if entry is not None:
        raise Failed(f"{mount} is still mounted ({entry.fstype} from {entry.source}) after unmounting", "still_mounted")
    return Result(changed=True, data=described)


# --- ensure_quota -------------------------------------------------------------------------

QUOTA_TIMEOUT_S = 30.0
# `mfsgetquota -n`: " size     |   current |   soft |   hard |"; "-" where none is set.
QUOTA_ROW = re.compile(r"^\s*size\s*\|\s*(\d+)\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|", re.MULTILINE)

ENSURE_QUOTA_PARAMS = {
    **MOUNT_PARAM,
    "user": Param(user_name, required=True),
    "size": Param(integer_between(1 << 20, 1 << 60), required=True),
}


def parse_quota(text: str) -> tuple[int, int | None]:
    """(bytes used, hard limit or None) of the `size` row: the sum of chunk sizes, so sparse
    files count what they hold, not their length."""
    match = QUOTA_ROW.search(text)
    if match is None:
        raise Failed(f"cannot read mfsgetquota's output: {text.strip()[-200:]!r}", "quota_unreadable")
    hard = match.group(3)
    return int(match.group(1)), (int(hard) if hard.isdigit() else None)


def mfs_tool(name: str) -> str:
    """One of MooseFS's client tools (mfsgetquota, mfsmakesnapshot ...), or PreconditionFailed."""
    return require_tool(name, MFS_CLIENT_HINT, "mfs_tools_missing")


def ensure_quota(params: dict, check: bool) -> Result:
    """A hard quota on the member's tree on MooseFS: what one member writes there can fill
    their own share, never MooseFS for everyone."""
    entry, _ = current_mount(params["mount"])
    if entry is None or not is_moosefs(entry):
        raise PreconditionFailed(f"MooseFS is not mounted at {params['mount']}; run ensure_mounted first", "mfs_not_mounted")
    tree = mfs_user_dir(params["mount"], params["user"])
    refuse_symlinked_path(tree)
    exists = os.path.isdir(tree)
    used, limit = (0, None)
    if exists:
        used, limit = parse_quota(quota_output(["mfsgetquota", "-n", tree]))
    changed = limit != params["size"]
    if changed and not check:
        if not exists:
            os.mkdir(tree, 0o755)
        quota_output(["mfssetquota", "-n", "-S", str(params["size"]), tree])
    return Result(changed=changed, data={"path": tree, "used": used, "limit": params["size"], "previous_limit": limit})


def quota_output(argv: list[str]) -> str:
    try:
        result = run_command([mfs_tool(argv[0]), *argv[1:]], timeout_s=QUOTA_TIMEOUT_S)
    except CommandTimedOut:
        raise TemporaryFailure(f"{argv[0]} did not answer within {QUOTA_TIMEOUT_S:g} s", "mfs_unavailable") from None
    if result.returncode != 0:
        raise Failed(f"{argv[0]} failed: {result.output_tail()}", "quota_failed")
    return result.stdout


ACTIONS = {
    "ensure_quota": Action(run=ensure_quota, params=ENSURE_QUOTA_PARAMS),
    "ensure_mounted": Action(run=ensure_mounted, params=ENSURE_MOUNTED_PARAMS),
    "ensure_unmounted": Action(run=ensure_unmounted, params=MOUNT_PARAM),
    "status": Action(run=mount_status, params=MOUNT_PARAM),
}
