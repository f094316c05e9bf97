"""Node primitives shared by helpers: finding tools, running commands, reading the mount table.

The parsers here are pure functions over text so tests can feed them any input.
"""

import ctypes
import errno
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from _contract import Failed, HelperError, PreconditionFailed, TemporaryFailure, log

MOUNTINFO_PATH = "/proc/self/mountinfo"
KILL_WAIT_S = 1.0

# sudo's secure_path or a bare ssh session may leave out sbin; tools such as modprobe live there.
STANDARD_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


# --- tools and commands -------------------------------------------------------------------


def search_path() -> str:
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += [d for d in STANDARD_BIN_DIRS if d not in dirs]
    return os.pathsep.join(dirs)


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=search_path())


def require_tool(name: str, hint: str, code: str) -> str:
    """The path of the tool called name, or PreconditionFailed(code) saying it is missing and,
    in hint, what to do about it ("install the rsync package")."""
    tool = find_tool(name)
    if tool is None:
        raise PreconditionFailed(f"{name} not found on this node" + (f": {hint}" if hint else ""), code)
    return tool


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    def output_tail(self, limit: int = 400) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).replace("\n", " | ")
        return text if len(text) <= limit else "..." + text[-limit:]


class CommandTimedOut(Exception):
    def __init__(self, argv: list[str], timeout_s: float):
        super().__init__(f"{os.path.basename(argv[0])} did not finish within {timeout_s:g} s")
        self.timeout_s = timeout_s


def command_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = search_path()
    env["LC_ALL"] = "C"  # messages we match on and numbers we parse must not be localised
    return env


def run_command(argv: list[str], timeout_s: float, stdin_text: str | None = None) -> CommandResult:
    """Run argv without a shell. Secrets may only travel in stdin_text.

    Output goes to temporary files rather than pipes: a command that daemonizes (mfsmount)
    can leave a child holding a pipe open, and reading the pipe to its end would then hang.
    The command gets its own session so a timeout kills everything it started.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
            stdout=out,
            stderr=err,
            env=command_env(),
            start_new_session=True,
        )
        try:
            process.communicate(None if stdin_text is None else stdin_text.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_session(process)
            raise CommandTimedOut(argv, timeout_s) from None
        return CommandResult(process.returncode, read_back(out), read_back(err))


def kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        # Stuck in the kernel (a hung FUSE mount or GPU driver): it dies when the kernel
        # lets go. Waiting here would hang the helper with it.
        pass


def read_back(stream) -> str:
    stream.seek(0)
    return stream.read().decode("utf-8", errors="replace")


# One filesystem call, run by fuse_call in a child process. It prints one JSON object:
# {"value": ...} or {"errno": N, "strerror": "..."}.
FUSE_CALL_SCRIPT = """
import json, os, sys
operation, path = sys.argv[1], sys.argv[2]
try:
    if operation == "statvfs":
        stat = os.statvfs(path)
        value = {"blocks": stat.f_blocks, "bavail": stat.f_bavail, "frsize": stat.f_frsize}
    else:
        with open(path, encoding="utf-8", errors="replace") as stream:
            value = stream.read()
    print(json.dumps({"value": value}))
except OSError as error:
    print(json.dumps({"errno": error.errno, "strerror": error.strerror}))
"""
FUSE_OPERATIONS = ("statvfs", "read")


def fuse_call(operation: str, path: str, timeout_s: float) -> Any:
    """statvfs or read a file on a FUSE mount, giving up after timeout_s (TimeoutError).

    When the FUSE server is stuck, a call blocks, and once the server has taken the request
    even SIGKILL waits for its answer. In a thread that would keep this helper from exiting,
    and the SSH call from returning; a child process can be abandoned instead.
    """
    if operation not in FUSE_OPERATIONS:
        raise ValueError(f"unknown FUSE operation {operation!r}")
    argv = [sys.executable, "-I", "-c", FUSE_CALL_SCRIPT, operation, path]
    try:
        result = run_command(argv, timeout_s)
    except CommandTimedOut:
        raise TimeoutError(f"no answer within {timeout_s:g} s") from None
    try:
        reply = json.loads(result.stdout)
    except ValueError:
        raise OSError(f"{operation} failed: {result.output_tail()}") from None
    if "errno" in reply:
        raise OSError(reply["errno"], reply["strerror"], path)
    return reply["value"]


# --- does MooseFS answer ------------------------------------------------------------------

# How long a call on the MooseFS mount may take before the mount counts as hung.
MFS_ANSWER_TIMEOUT_S = 5.0


def mfs_call(operation: str, path: str) -> Any:
    """fuse_call on the MooseFS mount; no answer within MFS_ANSWER_TIMEOUT_S is a
    TemporaryFailure "mfs_mount_hung". OSError goes to the caller."""
    try:
        return fuse_call(operation, path, MFS_ANSWER_TIMEOUT_S)
    except TimeoutError:
        raise TemporaryFailure(
            f"MooseFS does not answer at {path} within {MFS_ANSWER_TIMEOUT_S:g} s", "mfs_mount_hung"
        ) from None


def require_mfs_answers(path: str, missing: HelperError | None = None) -> dict:
    """statvfs path on MooseFS in a child process (a hung mount must not hang the helper); its
    figures when MooseFS answers. Else: TemporaryFailure "mfs_mount_hung" (no answer),
    PreconditionFailed "mfs_mount_stale" (its mfsmount is gone), `missing` when given and path
    is not there, Failed "mfs_error" otherwise."""
    try:
        return mfs_call("statvfs", path)
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise PreconditionFailed(
                f"MooseFS mount at {path} is stale (its mfsmount is gone); remount it with the mfs helper", "mfs_mount_stale"
            ) from None
        if missing is not None and error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise missing from None
        raise Failed(f"cannot reach MooseFS at {path}: {error}", "mfs_error") from None


MIB = 1024 * 1024


def space_mib(blocks: int, bavail: int, frsize: int) -> dict:
    # f_bavail, not f_bfree: what a non-reserved writer can still use is what matters.
    return {"total_mib": blocks * frsize // MIB, "free_mib": bavail * frsize // MIB}


# --- writing files ------------------------------------------------------------------------

TEMP_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def write_atomically(
    path: str,
    content: bytes,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    *,
    keep_existing: bool = False,
    dir_fd: int | None = None,
    temporary: str | None = None,
) -> None:
    """Replace the file at path with content: a temporary file in the same directory, fsynced,
    renamed over path, then the directory fsynced. Readers see the old file or the new one, never
    half of it, and after a crash one of them is there.

    mode and owner ((uid, gid); None: the writer's) are the new file's; keep_existing keeps those
    of the regular file already at path instead. With dir_fd, path is a name in that directory
    and nothing on the way is followed; rename replaces whatever is at the name, a symlink
    included, without following it. temporary names the temporary file (a name in the same
    directory; a leftover there is replaced) when leftovers must be recognisable; by default it
    is .<name>.<random>.
    """
    directory, name = os.path.split(path)
    if dir_fd is None:
        with open_directory(directory or ".") as own_fd:
            write_atomically(name, content, mode, owner, keep_existing=keep_existing, dir_fd=own_fd, temporary=temporary)
        return
    if keep_existing:
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISREG(existing.st_mode):
            mode, owner = stat.S_IMODE(existing.st_mode), (existing.st_uid, existing.st_gid)
    temp = temporary or f".{name}.{os.urandom(8).hex()}"
    if temporary:
        try:
            os.unlink(temp, dir_fd=dir_fd)  # the caller's own name: what is there is a leftover
        except FileNotFoundError:
            pass
    fd = os.open(temp, TEMP_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        try:
            if owner is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != tuple(owner):
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after fchown, which clears the set-id bits
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    fsync_directory(dir_fd)


def fsync_directory(directory: str | int) -> None:
    """Make a rename (or a new entry) in directory, a path or a descriptor, survive a crash."""
    if isinstance(directory, int):
        with open_directory(".", directory) as fd:
            os.fsync(fd)
    else:
        with open_directory(directory) as fd:
            os.fsync(fd)


@contextmanager
def open_directory(path: str, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, DIRECTORY_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)



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


def make_dirs(path: str, mode: int) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, mode)  # makedirs' mode is filtered by the umask


# --- HTTP over a unix socket (dockerd) -------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket, enough to ask dockerd a question without the SDK."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request_over_unix_socket(
    socket_path: str, method: str, url: str, timeout_s: float, body: bytes | None = None, content_type: str | None = None
) -> tuple[int, bytes]:
    """One HTTP request; (status, whole body). Raises OSError, TimeoutError or HTTPException."""
    connection = UnixHTTPConnection(socket_path, timeout_s)
    headers = {"Host": "docker"}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        connection.request(method, url, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def get_over_unix_socket(socket_path: str, url: str, timeout_s: float) -> tuple[int, bytes]:
    return request_over_unix_socket(socket_path, "GET", url, timeout_s)


# --- mount table --------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mount_field(text: str) -> str:
    """The kernel writes space, tab, newline, backslash (and '#' in sources) as \\ooo."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse /proc/PID/mountinfo (proc(5)); lines that do not fit the format are skipped."""
    entries = []
    for line in text.splitlines():
        entry = parse_mountinfo_line(line)
        if entry is not None:
            entries.append(entry)
    return entries


def parse_mountinfo_line(line: str) -> MountEntry | None:
    fields = line.split(" ")
    # Optional fields (shared:N, master:N ...) end at a lone "-"; three fields follow it.
    try:
        separator = fields.index("-", 6)
    except ValueError:
        return None
    if len(fields) < separator + 3:
        return None
    try:
        mount_id, parent_id = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return MountEntry(
        mount_id=mount_id,
        parent_id=parent_id,
        root=unescape_mount_field(fields[3]),
        mount_point=unescape_mount_field(fields[4]),
        mount_options=tuple(fields[5].split(",")),
        fstype=fields[separator + 1],
        source=unescape_mount_field(fields[separator + 2]),
        super_options=tuple(fields[separator + 3].split(",")) if len(fields) > separator + 3 else (),
    )


def read_mountinfo() -> list[MountEntry]:
    with open(MOUNTINFO_PATH, encoding="utf-8", errors="surrogateescape") as stream:
        return parse_mountinfo(stream.read())


def mount_at(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount visible at path: with stacked mounts, the one no other mount there sits on."""
    here = [entry for entry in entries if entry.mount_point == path]
    covered = {entry.parent_id for entry in here}
    on_top = [entry for entry in here if entry.mount_id not in covered]
    return (on_top or here or [None])[-1]


def mounts_below(entries: list[MountEntry], path: str) -> list[MountEntry]:
    prefix = path.rstrip("/") + "/"
    return [entry for entry in entries if entry.mount_point.startswith(prefix)]


def refuse_symlinked_path(path: str) -> None:
    """The mount table holds resolved paths. Through a symlink, a mount would not be found
    there: an ensure would stack a second mount, an unmount would miss it."""
    walked = "/"
    for part in path.strip("/").split("/"):
        walked = os.path.join(walked, part)
        if os.path.islink(walked):
            raise PreconditionFailed(
                f"{path} goes through the symlink {walked} -> {os.readlink(walked)}; use the resolved path",
                "mount_path_has_symlink",
            )


# --- overlay mounts -----------------------------------------------------------------------

_LAYER_SEPARATOR = re.compile(r"(?<!\\):")
_BACKSLASH_ESCAPE = re.compile(r"\\(.)")


def overlay_lowerdirs(super_options: tuple[str, ...]) -> list[str]:
    """The lower layers named in an overlay mount's super options: `lowerdir=a:b`, and the
    `lowerdir+=` / `datadir+=` forms of newer kernels. The kernel writes ',' and spaces in
    options as octal escapes; a ':' inside one layer's path is escaped with a backslash."""
    lowers = []
    for option in super_options:
        key, _, value = option.partition("=")
        if key in ("lowerdir", "lowerdir+", "datadir+"):
            layers = _LAYER_SEPARATOR.split(unescape_mount_field(value))
            lowers += [_BACKSLASH_ESCAPE.sub(r"\1", layer) for layer in layers if layer]
    return lowers


def mount_option_value(options: tuple[str, ...], key: str) -> str | None:
    """The value of `key=value` among mount options (unescaped), or None when absent."""
    for option in options:
        name, separator, value = option.partition("=")
        if separator and name == key:
            return unescape_mount_field(value)
    return None


# --- mounting -----------------------------------------------------------------------------

UTIL_LINUX_HINT = "install the util-linux package"
MOUNT_TIMEOUT_S = 60.0


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


# --- unmounting ---------------------------------------------------------------------------


def unmount(mount: str) -> None:
    """umount2 without MNT_DETACH: a lazy unmount would leave writers on a detached tree.
    A busy mount is a PreconditionFailed "mount_busy" naming what holds it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mount), 0) == 0:
        return
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOENT):
        return  # no longer a mount point: someone else unmounted it meanwhile
    if error == errno.EBUSY:
        raise PreconditionFailed(f"mount busy: {mount} is in use{busy_detail(mount)}", "mount_busy")
    raise Failed(f"cannot unmount {mount}: {os.strerror(error)}", "unmount_failed")


def busy_detail(mount: str) -> str:
    below = [entry.mount_point for entry in mounts_below(read_mountinfo(), mount)]
    users = processes_using(mount)
    parts = []
    if below:
        parts.append(f"mounts below it: {', '.join(below[:5])}" + (" ..." if len(below) > 5 else ""))
    if users:
        parts.append(f"used by {', '.join(users[:5])}" + (" ..." if len(users) > 5 else ""))
    return f" ({'; '.join(parts)})" if parts else " (open files or working directories)"


def processes_using(mount: str) -> list[str]:
    """'PID (command)' of processes whose cwd, root or open files lie under mount. Only
    /proc links are read, which never wait on a FUSE server."""
    prefix = mount.rstrip("/") + "/"
    users = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if any(target == mount or target.startswith(prefix) for target in proc_links(pid)):
            users.append(f"{pid} ({process_name(pid)})")
    return users


def proc_links(pid: str) -> list[str]:
    paths = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
    try:
        paths += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        pass
    targets = []
    for path in paths:
        try:
            targets.append(os.readlink(path))
        except OSError:
            continue  # the process or descriptor went away, or is not ours to see
    return targets


def process_name(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as stream:
            return stream.read().strip()
    except OSError:
        return "?"
