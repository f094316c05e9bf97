"""runtime: labvm's OCI runtime on a node, so desktops boot from their overlay.

A desktop is a container of the node's dockerd, but its root filesystem must be the desktop's
overlay <data_dir>/vms/<user>/merge_local, not docker's image layer. oci_shim.py (in this
bundle; its opening comment explains the design) is a runc wrapper that swaps the root of a
container whose spec carries the sentinel mount /.labvm-rootfs, and passes everything else on
untouched. This helper installs it and registers it with dockerd as the runtime `labvm`:

    <install_dir>/labvm-runc        0755 root, a copy of oci_shim.py run by the helper's python3
    <install_dir>/labvm-runc.json   0644, {"runtime": <real runtime>, "data_dirs": [...]}
    <daemon_json>                   "runtimes": {"labvm": {"path": "<install_dir>/labvm-runc"}}

The real runtime is what dockerd would use otherwise: the path of daemon.json's default-runtime
(nvidia-container-runtime on a GPU node set up that way), else runc. dockerd re-reads daemon.json
on SIGHUP, so registering restarts no container.

Actions:
    ensure_runtime  install the shim and its settings, register it with dockerd (check mode:
                    what would change)
    runtime_status  what is missing, for `labvm node check`; changes nothing
"""

import json
import os
import signal
import socket
import stat
import struct
import sys
import time

from _contract import (
    Action,
    Param,
    PreconditionFailed,
    Result,
    TemporaryFailure,
    absolute_path,
    integer_between,
    layer_path,
)
from _docker import DEFAULT_DOCKER_SOCKET, api_url, docker_json_call, unexpected
from _system import find_tool, process_name, require_tool, write_atomically

# Exported with RUNTIME_NAME for whoever builds a desktop's container spec: it names runtime
# labvm and carries a bind mount of merge_local at SENTINEL.
from oci_shim import SENTINEL  # noqa: F401

RUNTIME_NAME = "labvm"
SHIM_NAME = "labvm-runc"
DEFAULT_INSTALL_DIR = "/var/lib/labvm/runtime"
DEFAULT_DAEMON_JSON = "/etc/docker/daemon.json"
SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oci_shim.py")
# Used when the helper's own interpreter cannot go into a #! line.
FALLBACK_PYTHON = "/usr/bin/python3"
# -I: no PYTHON* environment, no user site; -S: no site import (faster start, stdlib only).
PYTHON_FLAGS = "-IS"
DOCKERD_PIDFILE = "/var/run/docker.pid"
RELOAD_TIMEOUT_S = 20
RELOAD_POLL_S = 0.2

PARAMS = {
    "data_dir": Param(layer_path, required=True),
    "docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET),
    "install_dir": Param(layer_path, default=DEFAULT_INSTALL_DIR),
    "daemon_json": Param(absolute_path, default=DEFAULT_DAEMON_JSON),
    "reload_timeout_s": Param(integer_between(1, 300), default=RELOAD_TIMEOUT_S),
}


# --- files --------------------------------------------------------------------------------


def shim_path(install_dir: str) -> str:
    return os.path.join(install_dir, SHIM_NAME)


def settings_path(install_dir: str) -> str:
    return shim_path(install_dir) + ".json"


def interpreter() -> str:
    python = sys.executable
    if python and python.startswith("/") and not any(c.isspace() for c in python) and len(python) < 200:
        return python
    return FALLBACK_PYTHON


def shim_content() -> bytes:
    """oci_shim.py with a #! line naming the python3 this helper runs with."""
    try:
        with open(SHIM_SOURCE, "rb") as stream:
            source = stream.read()
    except OSError as error:
        raise PreconditionFailed(f"the helper bundle lacks {SHIM_SOURCE}: {error.strerror}", "shim_source_missing") from None
    if source.startswith(b"#!"):
        source = source.partition(b"\n")[2]
    return f"#!{interpreter()} {PYTHON_FLAGS}\n".encode() + source


def refuse_symlinked_dir(path: str, what: str) -> None:
    """No component of path may be a symlink, nor anything but a directory."""
    walked = ""
    for part in path.strip("/").split("/"):
        walked += "/" + part
        try:
            info = os.lstat(walked)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise PreconditionFailed(
                f"{what} {path} goes through the symlink {walked} -> {os.readlink(walked)}", "symlink_in_path"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise PreconditionFailed(f"{what} {path}: {walked} is not a directory", "not_a_directory")


def root_owned(info: os.stat_result) -> bool:
    return os.geteuid() != 0 or (info.st_uid, info.st_gid) == (0, 0)


def install_dir_state(path: str) -> str | None:
    """None when the directory is as wanted (0755 root), else what is wrong."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if stat.S_IMODE(info.st_mode) != 0o755 or not root_owned(info):
        return f"mode {stat.S_IMODE(info.st_mode):o} owner {info.st_uid}:{info.st_gid}"
    return None


def ensure_install_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    refuse_symlinked_dir(path, "install_dir")
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def regular_file(path: str) -> tuple[bytes, os.stat_result] | None:
    """(content, stat) of a regular file at path (not through a symlink), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as stream:
            return stream.read(), info
    finally:
        os.close(fd)


def file_matches(path: str, content: bytes, mode: int) -> bool:
    found = regular_file(path)
    return found is not None and found[0] == content and stat.S_IMODE(found[1].st_mode) == mode and root_owned(found[1])


def root_owner() -> tuple[int, int] | None:
    """What runtime files are owned by: root, when this runs as root (tests need not)."""
    return (0, 0) if os.geteuid() == 0 else None


def json_bytes(document) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


# --- settings beside the shim ---------------------------------------------------------------


def read_settings(path: str) -> dict | None:
    found = regular_file(path)
    if found is None:
        return None
    try:
        settings = json.loads(found[0])
    except ValueError:
        return None
    return settings if isinstance(settings, dict) else None


def configured_data_dirs(settings: dict | None) -> list[str]:
    dirs = (settings or {}).get("data_dirs")
    if not isinstance(dirs, list):
        return []
    kept = []
    for item in dirs:
        if isinstance(item, str) and item.startswith("/") and os.path.normpath(item) not in kept:
            kept.append(os.path.normpath(item))
    return kept


def wanted_settings(existing: dict | None, runtime: str, data_dir: str) -> dict:
    data_dirs = configured_data_dirs(existing)
    if data_dir not in data_dirs:
        data_dirs.append(data_dir)
    return {"runtime": runtime, "data_dirs": data_dirs}


# --- daemon.json ----------------------------------------------------------------------------


def read_daemon_json(path: str) -> tuple[dict, os.stat_result | None]:
    """(its object, its stat) or ({}, None) when there is none."""
    try:
        with open(path, "rb") as stream:
            info = os.fstat(stream.fileno())
            raw = stream.read()
    except FileNotFoundError:
        return {}, None
    except OSError as error:
        raise PreconditionFailed(f"cannot read {path}: {error.strerror}", "daemon_json_unreadable") from None
    if not raw.strip():
        return {}, info
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise PreconditionFailed(
            f"{path} is not valid JSON ({error}); dockerd cannot read it either: fix it by hand, labvm leaves it alone",
            "daemon_json_invalid",
        ) from None
    if not isinstance(document, dict):
        raise PreconditionFailed(f"{path} is not a JSON object; fix it by hand, labvm leaves it alone", "daemon_json_invalid")
    if not isinstance(document.get("runtimes", {}), dict):
        raise PreconditionFailed(f'{path}: "runtimes" is not a JSON object; fix it by hand', "daemon_json_invalid")
    return document, info


def registered_in(document: dict) -> str | None:
    entry = (document.get("runtimes") or {}).get(RUNTIME_NAME)
    return entry.get("path") if isinstance(entry, dict) else None


def with_runtime(document: dict, shim: str) -> dict:
    """daemon.json with runtimes.labvm pointing at the shim, every other key as it was."""
    updated = dict(document)
    runtimes = dict(updated.get("runtimes") or {})
    runtimes[RUNTIME_NAME] = {"path": shim}
    updated["runtimes"] = runtimes
    return updated


def real_runtime(document: dict, daemon_json: str, shim: str) -> str:
    """What dockerd runs containers with when they name no runtime: daemon.json's
    default-runtime when that is an entry of its runtimes with a path, else runc."""
    name = document.get("default-runtime")
    entry = (document.get("runtimes") or {}).get(name) if isinstance(name, str) and name != RUNTIME_NAME else None
    if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
        path = entry["path"]
        found = path if path.startswith("/") else find_tool(path)
        if not found or not os.access(found, os.X_OK):
            raise PreconditionFailed(
                f"{daemon_json} makes {name!r} docker's default runtime, but its path {path} is not an executable on this node",
                "runtime_missing",
            )
        found = os.path.abspath(found)
    else:
        found = os.path.abspath(require_tool("runc", "install the runc package", "runc_missing"))
    if os.path.realpath(found) == os.path.realpath(shim):
        raise PreconditionFailed(f"{daemon_json}: docker's default runtime is labvm's own shim {shim}", "runtime_loop")
    return found


# --- dockerd --------------------------------------------------------------------------------


def dockerd_runtime_path(socket_path: str) -> str | None:
    """The path dockerd lists for runtime labvm (GET /info), or None."""
    status, body = docker_json_call(socket_path, "GET", api_url("/info"))
    if status != 200 or not isinstance(body, dict):
        raise unexpected("dockerd's GET /info", status, body)
    entry = (body.get("Runtimes") or {}).get(RUNTIME_NAME)
    return entry.get("path") if isinstance(entry, dict) else None


def socket_owner_pid(socket_path: str) -> int:
    """The pid that listens on the socket, from SO_PEERCRED."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(socket_path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except FileNotFoundError:
        raise PreconditionFailed(
            f"docker socket {socket_path} does not exist: is dockerd running?", "docker_socket_missing"
        ) from None
    except OSError as error:
        raise TemporaryFailure(f"docker socket {socket_path}: {error}", "docker_unavailable") from None
    finally:
        sock.close()
    return struct.unpack("3i", creds)[0]


def pid_from_file(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as stream:
            return int(stream.read().strip())
    except (OSError, ValueError):
        return None


def dockerd_processes() -> list[int]:
    return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit() and process_name(int(entry)) == "dockerd")


def dockerd_pid(socket_path: str, document: dict) -> int:
    """dockerd's pid: the socket's owner; when that is not dockerd (systemd's docker.socket
    listens for it), dockerd's pidfile, or the one dockerd process there is."""
    owner = socket_owner_pid(socket_path)
    if owner > 1 and process_name(owner) == "dockerd":
        return owner
    pidfile = document.get("pidfile") if isinstance(document.get("pidfile"), str) else DOCKERD_PIDFILE
    from_file = pid_from_file(pidfile)
    if from_file and from_file > 1 and process_name(from_file) == "dockerd":
        return from_file
    running = dockerd_processes()
    if len(running) == 1 and running[0] > 1:
        return running[0]
    raise PreconditionFailed(
        f"cannot tell which process is dockerd: {socket_path} belongs to pid {owner} ({process_name(owner)}), "
        f"{pidfile} names none, and {len(running)} dockerd processes run; reload it by hand (systemctl reload docker)",
        "dockerd_not_found",
    )


def reload_dockerd(socket_path: str, document: dict, shim: str, daemon_json: str, timeout_s: float) -> int:
    """SIGHUP dockerd and wait until it lists the runtime; its pid."""
    pid = dockerd_pid(socket_path, document)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise TemporaryFailure(f"dockerd (pid {pid}) exited before it could be told to reload", "dockerd_gone") from None
    deadline = time.monotonic() + timeout_s
    listed = None
    while True:
        try:
            listed = dockerd_runtime_path(socket_path)
        except TemporaryFailure:
            listed = None
        if listed == shim:
            return pid
        if time.monotonic() >= deadline:
            break
        time.sleep(RELOAD_POLL_S)
    shown = "no runtime labvm" if listed is None else f"runtime labvm at {listed}"
    raise TemporaryFailure(
        f"dockerd (pid {pid}) still lists {shown} {timeout_s:g} s after SIGHUP, wanted {shim}; its log "
        f"(journalctl -u docker) says why it did not take {daemon_json}, or it reads another config file",
        "runtime_not_registered",
    )


# --- actions --------------------------------------------------------------------------------


def ensure_runtime(params: dict, check: bool) -> Result:
    install_dir, daemon_json, socket_path = params["install_dir"], params["daemon_json"], params["docker_socket"]
    shim, settings_file = shim_path(install_dir), settings_path(install_dir)
    refuse_symlinked_dir(install_dir, "install_dir")
    document, daemon_info = read_daemon_json(daemon_json)
    runtime = real_runtime(document, daemon_json, shim)
    content = shim_content()
    settings = wanted_settings(read_settings(settings_file), runtime, params["data_dir"])
    updated = with_runtime(document, shim)
    registered = dockerd_runtime_path(socket_path) == shim

    parts = []
    if install_dir_state(install_dir) is not None:
        parts.append("install_dir")
    if not file_matches(shim, content, 0o755):
        parts.append("shim")
    if not file_matches(settings_file, json_bytes(settings), 0o644):
        parts.append("shim_config")
    if daemon_info is None or updated != document:
        parts.append("daemon_json")
    if "daemon_json" in parts or not registered:
        parts.append("dockerd")
    data = {"shim": shim, "config": settings_file, "runtime": runtime, "registered": registered, "changed_parts": parts}
    if check or not parts:
        return Result(changed=bool(parts), data=data)

    # The runtime dockerd will be told about exists, with its settings, before it is told.
    if "install_dir" in parts:
        ensure_install_dir(install_dir)
    if "shim" in parts:
        write_atomically(shim, content, 0o755, root_owner())
    if "shim_config" in parts:
        write_atomically(settings_file, json_bytes(settings), 0o644, root_owner())
    if "daemon_json" in parts:
        write_daemon_json(daemon_json, updated, daemon_info)
    if "dockerd" in parts:
        reload_dockerd(socket_path, updated, shim, daemon_json, params["reload_timeout_s"])
    data["registered"] = True
    return Result(changed=True, data=data)


def write_daemon_json(path: str, document: dict, info: os.stat_result | None) -> None:
    """Keeps the file's mode and owner (0644 root when new); through a symlink, writes its target."""
    target = os.path.realpath(path)
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    write_atomically(target, json_bytes(document), 0o644, root_owner(), keep_existing=info is not None)


def runtime_status(params: dict, check: bool) -> Result:
    install_dir, daemon_json = params["install_dir"], params["daemon_json"]
    shim, settings_file = shim_path(install_dir), settings_path(install_dir)
    missing = []
    installed = file_matches(shim, shim_content(), 0o755)
    if not installed:
        missing.append(f"{shim} is missing or differs from this helper bundle's shim (or is not 0755 root)")
    settings = read_settings(settings_file)
    runtime = settings.get("runtime") if settings else None
    configured = params["data_dir"] in configured_data_dirs(settings)
    if settings is None:
        missing.append(f"{settings_file} is missing or not a JSON object")
    elif not configured:
        missing.append(f"{settings_file} does not list data dir {params['data_dir']}")
    if settings is not None and not (isinstance(runtime, str) and runtime.startswith("/") and os.access(runtime, os.X_OK)):
        missing.append(f"{settings_file} names runtime {runtime!r}, which is not an executable")
        configured = False
    try:
        document, _ = read_daemon_json(daemon_json)
        in_daemon_json = registered_in(document) == shim
        if not in_daemon_json:
            missing.append(f"{daemon_json} does not name {shim} as runtime {RUNTIME_NAME}")
    except PreconditionFailed as error:
        in_daemon_json = False
        missing.append(error.msg)
    listed = dockerd_runtime_path(params["docker_socket"])
    registered = listed == shim
    if not registered:
        missing.append(f"dockerd lists {'no runtime labvm' if listed is None else f'runtime labvm at {listed}'}, wanted {shim}")
    data = {
        "shim": shim,
        "config": settings_file,
        "runtime": runtime,
        "installed": installed,
        "configured": configured,
        "in_daemon_json": in_daemon_json,
        "registered": registered,
        "missing": missing,
    }
    return Result(changed=False, data=data)


ACTIONS = {
    "ensure_runtime": Action(run=ensure_runtime, params=PARAMS),
    "runtime_status": Action(run=runtime_status, params=PARAMS),
}
