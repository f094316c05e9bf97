"""sync: the continuous copy of a desktop's overlay upper (up_local) to MooseFS (up_mfs).

Actions:
  ensure_running  run the sync daemon (syncd.py) for up_local -> <mfs_mount>/vms/<user>/up_mfs,
                  unless one already runs with the same settings
  flush           return once everything written to up_local before the call is on up_mfs;
                  without a daemon, a one-shot full pass does it (a stopped desktop)
  ensure_stopped  flush, then SIGTERM the daemon and wait until it has exited
  full_pass       a one-shot full sync without a daemon; refused while one runs (flush then)
  status          whether a daemon runs, its status.json and its lag (changes nothing)

The daemon's files live in <data_dir>/vms/<user>/sync/ (0700 root): not in up_local, which is
what is being copied, and not in runtime/, which the container sees. syncd.py describes them.

A daemon is "running" only if the pid in syncd.pid is alive and its command line is syncd.py
with this control dir: a stale pid file, or a pid reused by another process, counts as none.
"""

import dataclasses
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import syncd
from _contract import (
    Action,
    BadRequest,
    Failed,
    Param,
    PreconditionFailed,
    Result,
    TemporaryFailure,
    integer_between,
    layer_path,
    log,
    node_name,
    user_name,
)
from _layout import VmPaths, heartbeat_path, up_mfs_path
from _system import command_env, refuse_symlinked_path, require_mfs_answers, require_tool

CONFIG_FILE = "config.json"
CONTROL_LOCK = "control.lock"
SYNCD_PATH = os.path.abspath(syncd.__file__)

# Setting up the watches walks the whole upper; a big one takes a while.
READY_TIMEOUT_S = 300.0
CONTROL_LOCK_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 300.0
ACK_POLL_S = 0.01
ALIVE_CHECK_S = 0.5
LOG_TAIL_LINES = 5


# --- parameters ---------------------------------------------------------------------------


def number_between(low: float, high: float):
    def validate(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"param {name!r} must be a number", "bad_param")
        if not low <= value <= high:
            raise BadRequest(f"param {name!r} must be between {low:g} and {high:g}, got {value!r}", "bad_param")
        return float(value)

    return validate


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"param {name!r} must be true or false", "bad_param")
    return value


VM_PARAMS = {"user": Param(user_name, required=True), "data_dir": Param(layer_path, required=True)}
TIMEOUT_PARAM = {"timeout_s": Param(number_between(1, 86400), default=300.0)}
ENSURE_RUNNING_PARAMS = {
    **VM_PARAMS,
    "mfs_mount": Param(layer_path, required=True),
    "sync_time_s": Param(number_between(0.01, 3600), default=syncd.DEFAULT_SYNC_TIME_S),
    "batch_max_files": Param(integer_between(1, 1_000_000), default=syncd.DEFAULT_BATCH_MAX_FILES),
    "full_pass_hours": Param(number_between(0, 8760), default=syncd.DEFAULT_FULL_PASS_HOURS),
    "node": Param(node_name),
}
# mfs_mount is only needed when no daemon runs and the VM's last settings are unknown.
FLUSH_PARAMS = {**VM_PARAMS, **TIMEOUT_PARAM, "mfs_mount": Param(layer_path)}
ENSURE_STOPPED_PARAMS = {**VM_PARAMS, **TIMEOUT_PARAM, "flush": Param(boolean, default=True)}
FULL_PASS_PARAMS = {**VM_PARAMS, "mfs_mount": Param(layer_path, required=True)}
STATUS_PARAMS = VM_PARAMS


# --- paths and the running daemon ----------------------------------------------------------


@dataclass(frozen=True)
class Daemon:
    pid: int
    cmdline: tuple[bytes, ...]

    @property
    def settings(self) -> list[str]:
        """Its arguments after syncd.py, without the start-up pipe."""
        args = [os.fsdecode(arg) for arg in self.cmdline[self.script_index() + 1 :]]
        if "--ready-fd" in args:
            at = args.index("--ready-fd")
            del args[at : at + 2]
        return args

    @property
    def script(self) -> str:
        return os.fsdecode(self.cmdline[self.script_index()])

    def script_index(self) -> int:
        return next(i for i, arg in enumerate(self.cmdline) if is_syncd_script(arg))

    def alive(self) -> bool:
        """Still this process: a zombie's command line is empty, a reused pid's differs."""
        return read_cmdline(self.pid) == self.cmdline


def is_syncd_script(arg: bytes) -> bool:
    return arg == b"syncd.py" or arg.endswith(b"/syncd.py")


def read_cmdline(pid: int) -> tuple[bytes, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            raw = stream.read()
    except OSError:
        return None
    return tuple(raw.rstrip(b"\0").split(b"\0")) if raw else None


def running_daemon(paths: VmPaths) -> Daemon | None:
    try:
        with open(paths.control_file(syncd.PID_FILE), encoding="ascii") as stream:
            pid = int(stream.read().strip())
    except (OSError, ValueError):
        return None
    cmdline = read_cmdline(pid)
    if cmdline is None or not any(is_syncd_script(arg) for arg in cmdline):
        return None
    control = os.fsencode(paths.control_dir)
    if not any(arg == b"--control-dir" and value == control for arg, value in zip(cmdline, cmdline[1:], strict=False)):
        return None
    return Daemon(pid, cmdline)


# --- checks --------------------------------------------------------------------------------


def require_up_local(paths: VmPaths) -> None:
    refuse_symlinked_path(paths.up_local)
    if not os.path.isdir(paths.up_local):
        raise PreconditionFailed(f"{paths.up_local} is missing; run the vm helper's ensure_stack first", "up_local_missing")


def require_up_mfs(up_mfs: str) -> None:
    missing = PreconditionFailed(f"{up_mfs} is missing: is MooseFS mounted, and did ensure_stack run?", "up_mfs_missing")
    require_mfs_answers(up_mfs, missing)
    if not os.path.isdir(up_mfs):
        raise PreconditionFailed(f"{up_mfs} is not a directory", "up_mfs_missing")


def refuse_empty_upper_over_full_copy(up_local: str, up_mfs: str) -> None:
    """A full pass makes up_mfs equal to up_local, deletions included. An empty upper over a
    non-empty up_mfs is what a desktop started on a new node without its merge looks like;
    syncing it would delete the only copy of the member's changes."""
    if not os.listdir(up_local) and os.listdir(up_mfs):
        raise PreconditionFailed(
            f"{up_local} is empty but {up_mfs} is not: a full pass would delete what up_mfs holds; "
            "merge it into a version (or empty it) first",
            "up_mfs_not_empty",
        )


def rsync_tool() -> str:
    return require_tool("rsync", "install the rsync package", "rsync_missing")


def ensure_control_dir(paths: VmPaths) -> None:
    refuse_symlinked_path(paths.control_dir)
    if not os.path.isdir(paths.control_dir):
        os.mkdir(paths.control_dir, 0o700)
    os.chmod(paths.control_dir, 0o700)


class ControlLock:
    """Serialises the helper's starts, stops and full passes of one VM."""

    def __init__(self, paths: VmPaths):
        self.path = paths.control_file(CONTROL_LOCK)
        self.stream = None

    def __enter__(self):
        self.stream = open(self.path, "a")
        deadline = time.monotonic() + CONTROL_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self.stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.stream.close()
                    raise TemporaryFailure(
                        f"another sync action on this VM holds {self.path} for over {CONTROL_LOCK_TIMEOUT_S:g} s", "sync_busy"
                    ) from None
                time.sleep(0.1)

    def __exit__(self, *exc):
        self.stream.close()


def log_tail(paths: VmPaths) -> str:
    try:
        with open(paths.control_file(syncd.LOG_FILE), encoding="utf-8", errors="replace") as stream:
            lines = stream.read().splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return "(no log)"
    return " | ".join(lines) or "(empty log)"


# --- ensure_running -------------------------------------------------------------------------


def ensure_running(params: dict, check: bool) -> Result:
    user = params["user"]
    paths = VmPaths.of(params["data_dir"], user)
    up_mfs = up_mfs_path(params["mfs_mount"], user)
    require_up_local(paths)
    require_up_mfs(up_mfs)
    wanted = syncd.daemon_args(
        paths.up_local,
        up_mfs,
        paths.control_dir,
        params["sync_time_s"],
        params["batch_max_files"],
        params["full_pass_hours"],
        rsync_tool(),
        params["node"],
    )
    running = running_daemon(paths)
    data = {"up_local": paths.up_local, "up_mfs": up_mfs, "control_dir": paths.control_dir, "log": paths.control_file(syncd.LOG_FILE)}
    if running is not None and running.settings == wanted:
        return Result(changed=False, data={**data, "pid": running.pid, "started": False, "restarted": False})
    if check:
        return Result(changed=True, data={**data, "pid": None, "started": True, "restarted": running is not None})
    ensure_control_dir(paths)
    with ControlLock(paths):
        if running is not None:
            stop_daemon(running, paths, STOP_TIMEOUT_S)
        refuse_empty_upper_over_full_copy(paths.up_local, up_mfs)
        syncd.write_json_atomically(paths.control_file(CONFIG_FILE), {"up_local": paths.up_local, "up_mfs": up_mfs, "args": wanted})
        pid = start_daemon(paths, wanted)
    return Result(changed=True, data={**data, "pid": pid, "started": True, "restarted": running is not None})


def start_daemon(paths: VmPaths, args: list[str]) -> int:
    """Start syncd and wait until its watches are in place; its pid. The first full pass runs
    after that, in the background."""
    ready_read, ready_write = os.pipe()
    try:
        argv = [sys.executable, "-I", SYNCD_PATH, *args, "--ready-fd", str(ready_write)]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(ready_write,),
            start_new_session=True,
            cwd="/",
            env=command_env(),
        )
        os.close(ready_write)
        ready_write = None
        process.wait()  # the first fork's parent: it exits at once
        message = read_ready_message(ready_read, READY_TIMEOUT_S)
    finally:
        os.close(ready_read)
        if ready_write is not None:
            os.close(ready_write)
    return ready_pid(message, paths)


def read_ready_message(fd: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    received = b""
    while b"\n" not in received:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "timeout"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        received += chunk
    return received.decode("utf-8", errors="replace").strip()


def ready_pid(message: str, paths: VmPaths) -> int:
    word, _, rest = message.partition(" ")
    if word == "ready" and rest.isdigit():
        return int(rest)
    if word == "timeout":
        raise TemporaryFailure(
            f"the sync daemon did not finish setting up its watches within {READY_TIMEOUT_S:g} s; log: {log_tail(paths)}",
            "sync_start_timeout",
        )
    if word == "error" and "holds the lock" in rest:
        raise TemporaryFailure(f"cannot start the sync daemon: {rest}", "sync_busy")
    if word == "error":
        raise Failed(f"the sync daemon did not start: {rest}", "sync_start_failed")
    raise Failed(f"the sync daemon exited while starting; log: {log_tail(paths)}", "sync_start_failed")


def stop_daemon(daemon: Daemon, paths: VmPaths, timeout_s: float) -> None:
    """SIGTERM makes the daemon sync what is queued and exit; wait for that."""
    try:
        os.kill(daemon.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while daemon.alive():
        if time.monotonic() >= deadline:
            raise TemporaryFailure(
                f"the sync daemon (pid {daemon.pid}) did not exit within {timeout_s:g} s of SIGTERM; log: {log_tail(paths)}",
                "sync_stop_timeout",
            )
        time.sleep(0.05)


# --- flush ----------------------------------------------------------------------------------


def flush(params: dict, check: bool) -> Result:
    paths = VmPaths.of(params["data_dir"], params["user"])
    daemon = running_daemon(paths)
    if daemon is None:
        return flush_by_full_pass(paths, params, check)
    if check:
        return Result(changed=False, data={"mode": "daemon", "pid": daemon.pid})
    return flush_through_daemon(daemon, paths, params["timeout_s"])


def flush_through_daemon(daemon: Daemon, paths: VmPaths, timeout_s: float) -> Result:
    started = time.monotonic()
    requested_at = time.time()
    number = syncd.request_flush(paths.control_dir)
    deadline = started + timeout_s
    next_alive_check = started + ALIVE_CHECK_S
    while True:
        ack = syncd.read_ack(paths.control_dir)
        if ack["seq"] >= number:
            files = int(ack.get("files") or 0)
            seconds = round(time.monotonic() - started, 3)
            return Result(changed=files > 0, data={"mode": "daemon", "pid": daemon.pid, "seconds": seconds, "files": files})
        now = time.monotonic()
        if now >= next_alive_check:
            next_alive_check = now + ALIVE_CHECK_S
            if not daemon.alive():
                raise PreconditionFailed(
                    f"the sync daemon (pid {daemon.pid}) died before confirming the flush; ensure_running restarts it "
                    f"(its first full pass catches up), or flush again for a one-shot full pass; log: {log_tail(paths)}",
                    "sync_daemon_died",
                )
            refuse_when_destination_full(paths, requested_at)
        if now >= deadline:
            raise TemporaryFailure(f"flush not confirmed within {timeout_s:g} s: {daemon_summary(paths)}", "flush_timeout")
        time.sleep(ACK_POLL_S)


def refuse_when_destination_full(paths: VmPaths, requested_at: float) -> None:
    """A flush cannot finish while the member's share of MooseFS is full: say so now, rather
    than at the deadline. The daemon keeps everything queued and catches up once there is room."""
    status = syncd.read_json(paths.control_file(syncd.STATUS_FILE)) or {}
    error = status.get("last_error") or ""
    if status.get("state") == "error" and syncd.FULL_DESTINATION_ERROR in error and (status.get("updated") or 0) > requested_at:
        raise PreconditionFailed(
            f"{error}; nothing is lost (it stays queued): free space in the desktop or raise <storage><member_quota>, "
            "then flush again",
            "destination_full",
        )


def daemon_summary(paths: VmPaths) -> str:
    status = syncd.read_json(paths.control_file(syncd.STATUS_FILE)) or {}
    return f"state {status.get('state')}, {status.get('pending')} paths queued, last error: {status.get('last_error') or 'none'}"


def flush_by_full_pass(paths: VmPaths, params: dict, check: bool) -> Result:
    """No daemon: the desktop is stopped (or its daemon died). A full pass is the flush."""
    up_mfs = known_up_mfs(paths, params)
    result = full_pass_now(paths, up_mfs, check)
    return Result(changed=result.changed, data={**result.data, "mode": "full_pass"})


def known_up_mfs(paths: VmPaths, params: dict) -> str:
    if params.get("mfs_mount"):
        return up_mfs_path(params["mfs_mount"], params["user"])
    config = syncd.read_json(paths.control_file(CONFIG_FILE))
    if isinstance(config, dict) and isinstance(config.get("up_mfs"), str):
        return config["up_mfs"]
    raise PreconditionFailed(
        f"no sync daemon runs for {params['user']} and none ever ran here; pass mfs_mount for a full pass",
        "sync_never_configured",
    )


# --- full_pass ------------------------------------------------------------------------------


def full_pass(params: dict, check: bool) -> Result:
    paths = VmPaths.of(params["data_dir"], params["user"])
    daemon = running_daemon(paths)
    if daemon is not None:
        raise PreconditionFailed(f"a sync daemon (pid {daemon.pid}) runs for this VM; use flush instead", "sync_daemon_running")
    result = full_pass_now(paths, up_mfs_path(params["mfs_mount"], params["user"]), check)
    return Result(changed=result.changed, data={**result.data, "mode": "full_pass"})


def full_pass_now(paths: VmPaths, up_mfs: str, check: bool) -> Result:
    require_up_local(paths)
    require_up_mfs(up_mfs)
    rsync = rsync_tool()
    data = {"up_local": paths.up_local, "up_mfs": up_mfs}
    if check:
        return Result(changed=True, data={**data, "seconds": None, "files": None})
    refuse_empty_upper_over_full_copy(paths.up_local, up_mfs)
    ensure_control_dir(paths)
    with ControlLock(paths):
        lock = syncd.take_daemon_lock(paths.control_dir)
        if lock is None:
            raise TemporaryFailure("a sync daemon or another full pass holds this VM's sync lock", "sync_busy")
        try:
            argv = syncd.full_pass_argv(rsync, paths.up_local, up_mfs, paths.control_dir, syncd.keeps_nanoseconds(up_mfs))
            run = syncd.run_rsync(argv)
        except ValueError as error:
            raise PreconditionFailed(str(error), "unsafe_path") from None
        except OSError as error:
            raise Failed(f"cannot run rsync: {error}", "rsync_failed") from None
        finally:
            lock.close()
    # rc 23: some paths cannot be copied (a name too long, a member's race); waiting would not
    # change that, so the pass counts as done and says what was left behind.
    if not run.ok and not run.partial:
        raise Failed(f"full pass {paths.up_local} -> {up_mfs} failed: {run.error}", "full_pass_failed")
    incomplete = None if run.ok else run.stderr_tail or run.error
    stats = {"seconds": round(run.seconds, 3), "files": run.changed, "examined": run.examined, "not_copied": incomplete}
    return Result(changed=run.changed > 0, data={**data, **stats})


# --- ensure_stopped -------------------------------------------------------------------------


def ensure_stopped(params: dict, check: bool) -> Result:
    paths = VmPaths.of(params["data_dir"], params["user"])
    daemon = running_daemon(paths)
    if daemon is None:
        # A daemon that died (killed, out of memory) left its queue unsent: whoever stops the
        # desktop relies on this flush, so a full pass sends what the queue held.
        flushed = flush_without_daemon(paths, params, check) if params["flush"] else None
        return Result(changed=bool(flushed and flushed.get("files")), data={"pid": None, "flushed": flushed})
    if check:
        return Result(changed=True, data={"pid": daemon.pid, "flushed": None})
    flushed = None
    if params["flush"]:
        try:
            flushed = flush_through_daemon(daemon, paths, params["timeout_s"]).data
        except PreconditionFailed as error:
            if error.code != "sync_daemon_died":
                raise
            flushed = flush_without_daemon(paths, params, check)
    with ControlLock(paths):
        stop_daemon(daemon, paths, params["timeout_s"])
    # The daemon's last word: paths it could not copy (a FIFO, a name too long), which MooseFS
    # therefore lacks.
    final = syncd.read_json(paths.control_file(syncd.STATUS_FILE)) or {}
    quarantined = {"quarantined": final.get("quarantined") or [], "quarantined_count": int(final.get("quarantined_count") or 0),
                   "full_pass_problem": final.get("full_pass_problem")}
    return Result(changed=True, data={"pid": daemon.pid, "flushed": flushed, **quarantined})


def flush_without_daemon(paths: VmPaths, params: dict, check: bool) -> dict | None:
    """A full pass when this node ever synced the desktop and still has its upper; None when
    there is nothing here to send (no upper: layers removed, or never synced from here)."""
    config = syncd.read_json(paths.control_file(CONFIG_FILE))
    legacy_up = VmPaths.of(params["data_dir"], params["user"]).legacy_layers[0]
    if isinstance(config, dict) and config.get("up_local") == legacy_up and os.path.isdir(legacy_up):
        # A daemon of the layout before desktops had disks synced the upper where it was then.
        paths = dataclasses.replace(paths, up_local=legacy_up)
    if not os.path.isdir(paths.up_local) or not isinstance(config, dict) or not isinstance(config.get("up_mfs"), str):
        return None
    log(f"no live sync daemon for {params['user']}: flushing with a full pass")
    return full_pass_now(paths, config["up_mfs"], check).data


# --- status ---------------------------------------------------------------------------------


def sync_status(params: dict, check: bool) -> Result:
    paths = VmPaths.of(params["data_dir"], params["user"])
    daemon = running_daemon(paths)
    status = syncd.read_json(paths.control_file(syncd.STATUS_FILE))
    status = status if isinstance(status, dict) else {}
    data = {**status, "running": daemon is not None, "pid": daemon.pid if daemon else None, "lag_s": lag(status, daemon)}
    data["control_dir"] = paths.control_dir
    data["log"] = paths.control_file(syncd.LOG_FILE)
    # ensure_running keeps a daemon whose settings match, whichever bundle started it; this says
    # whether it runs this bundle's code (restart it with ensure_stopped + ensure_running if not).
    data["code_current"] = daemon.script == SYNCD_PATH if daemon else None
    return Result(changed=False, data=data)


def lag(status: dict, daemon: Daemon | None) -> float | None:
    """How long the oldest unsynced change has waited, now; None when nobody is syncing."""
    if daemon is None or not status:
        return None
    if not status.get("pending"):
        return 0.0
    since_update = max(0.0, time.time() - float(status.get("updated") or time.time()))
    return round(float(status.get("oldest_pending_age_s") or 0.0) + since_update, 3)


def last_success(params: dict, check: bool) -> Result:
    """Until when the desktop's writes reached MooseFS, as its node's sync last recorded there.
    Readable from any node, which is the point: the desktop's own node may be dead."""
    path = heartbeat_path(params["mfs_mount"], params["user"])
    record = syncd.read_json(path)
    if not isinstance(record, dict):
        return Result(changed=False, data={"last_success": None, "node": None})
    return Result(changed=False, data={"last_success": record.get("synced_until"), "node": record.get("node")})


ACTIONS = {
    "last_success": Action(run=last_success, params={"user": Param(user_name, required=True),
                                                     "mfs_mount": Param(layer_path, required=True)}),
    "ensure_running": Action(run=ensure_running, params=ENSURE_RUNNING_PARAMS),
    "flush": Action(run=flush, params=FLUSH_PARAMS),
    "ensure_stopped": Action(run=ensure_stopped, params=ENSURE_STOPPED_PARAMS),
    "full_pass": Action(run=full_pass, params=FULL_PASS_PARAMS),
    "status": Action(run=sync_status, params=STATUS_PARAMS),
}
