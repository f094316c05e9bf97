"""Node primitives shared by helpers: finding tools, running commands, reading the mount table.

The parsers here are pure functions over text so tests can feed them any input.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

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


MIB = 1024 * 1024


def space_mib(blocks: int, bavail: int, frsize: int) -> dict:
    # f_bavail, not f_bfree: what a non-reserved writer can still use is what matters.
    return {"total_mib": blocks * frsize // MIB, "free_mib": bavail * frsize // MIB}


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
