"""syncd: keeps one desktop's overlay upper (up_local) copied to MooseFS (up_mfs) as it changes.

    python3 syncd.py --up-local DIR --up-mfs DIR --control-dir DIR [--sync-time S]
                     [--batch-max-files N] [--full-pass-hours H] [--rsync PATH] [--ready-fd FD]

The sync helper (sync.py) starts one per running desktop. It detaches (double fork, setsid,
stdio on /dev/null) and logs to its own file, so it outlives the SSH session that started it.

How it stays exact without rescanning:
- One inotify descriptor watches every directory of up_local, plus the control dir. Each change
  names a path; the paths wait in an ordered queue for up to --sync-time seconds and are then
  copied as one `rsync --files-from` batch. rsync copies what the path holds at that moment, so a
  path queued twice is copied once, and a path that no longer exists is deleted on up_mfs
  (--delete-missing-args). A path is only ever a hint: copying one that did not change costs a
  stat, missing one loses data, so any doubt queues more.
- A directory that appears (mkdir, a rename, overlay's copy-up, an opaque dir) gets a watch and is
  then listed at once, so entries made before the watch existed are not missed. It is queued as
  "dir/.": rsync then copies its entries and deletes what up_mfs has there and up_local has not.
- A full pass (rsync of the whole tree with --delete) runs at start, after the kernel dropped
  events (IN_Q_OVERFLOW) and every --full-pass-hours. A daemon killed with -9 loses its queue
  but nothing else: the next start's full pass catches up.

How it stays confined and never wedges (the tree is a member's, who is root in the desktop):
- rsync's sending side is an rsync daemon reached over a pipe (`-e "syncd.py --rsh ..."`),
  chrooted at up_local (rsyncd.conf in the control dir): a directory swapped for a symlink
  mid-run resolves inside the member's tree, never in the node's. The process group of each
  run is killed when it ends. --timeout ends a run whose sender is blocked (a FIFO swapped in).
- A batch that fails on some paths (rc 23, a timeout, a name too long) is split in halves until
  each path that fails alone is found; that path is quarantined (status.json "quarantined"),
  out of the queue so flushes are acked, and tried again when it changes, at each flush and at
  stop. A full destination (ENOSPC, EDQUOT) keeps the whole batch queued instead. A full pass
  that ends rc 23 counts as done with errors; one that times out 3 times in a row too.
- The inotify instance is created under a uid of the daemon's own (the kernel charges
  instances and watches to it), so a member using up uid 0's instances stops nothing. Without
  inotify at all the daemon runs degraded: full passes every DEGRADED_FULL_PASS_S and on
  every flush, flush requests found by listing the control dir.

Flush barrier: a client takes the next sequence number under flush.lock and creates flush-<N> in
the control dir. One inotify descriptor delivers events in the order they happened, so when the
daemon reads that event, every change written to up_local before it is already queued. The
daemon remembers the queue position, syncs up to there (now, not after --sync-time) and writes N
to flush.ack. The client returns once the ack reaches its number.

Control dir (0700 root; never inside up_local, nor in the runtime dir the container sees):
    syncd.pid, syncd.lock (held while a daemon or a one-shot full pass runs), syncd.log,
    status.json (written atomically), flush.lock, flush.seq, flush-<N>, flush.ack,
    rsyncd.conf (the daemon sender's, 0600)

Standard library and the bundle's _layout, _system and _tree only: this runs with the node's
system python3. The sync helper imports the shared parts (file names, the flush protocol, rsync's
arguments) from here.
"""

import argparse
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import random
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# Run as a script with -I, as the sync helper starts it, the bundle's siblings are not on the path.
BUNDLE_DIR = os.path.dirname(os.path.abspath(__file__))
if BUNDLE_DIR not in sys.path:
    sys.path.insert(0, BUNDLE_DIR)

from _layout import HEARTBEAT_FILE, OWNER_FILE, SYNC_STATUS_FILE  # noqa: E402 - needs the path set up above
from _system import write_atomically  # noqa: E402
from _tree import open_dir, walk_tree  # noqa: E402

# --- files in the control dir ---------------------------------------------------------------

PID_FILE = "syncd.pid"
DAEMON_LOCK = "syncd.lock"
LOG_FILE = "syncd.log"
STATUS_FILE = SYNC_STATUS_FILE
FLUSH_LOCK = "flush.lock"
FLUSH_SEQ = "flush.seq"
FLUSH_ACK = "flush.ack"
FLUSH_PREFIX = "flush-"
FLUSH_REQUEST = re.compile(rb"flush-([0-9]{1,18})")

DEFAULT_SYNC_TIME_S = 5.0
DEFAULT_BATCH_MAX_FILES = 2000
DEFAULT_FULL_PASS_HOURS = 24.0

LOG_ROTATE_BYTES = 8 * 1024 * 1024
STATUS_INTERVAL_S = 1.0
# The main loop also wakes this often to see a SIGTERM: a signal handler must not take locks.
WAKE_INTERVAL_S = 0.2
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# On SIGTERM, how long failing syncs are retried before the daemon gives up and exits non-zero.
STOP_RETRY_S = 60.0
# Without a watch on every directory (fs.inotify.max_user_watches reached) events are missed;
# full passes at this interval are all that keeps up_mfs close.
DEGRADED_FULL_PASS_S = 600.0
# A walk of up_local to find the other names of a newly linked file runs at most this often,
# unless a flush or a stop waits for it.
LINK_WALK_INTERVAL_S = 60.0

# Paths kept in quarantine (more are only counted), and how many status.json lists.
QUARANTINE_KEEP = 10_000
QUARANTINE_LISTED = 100
QUARANTINE_SHOW_CHARS = 300
# A full pass that timed out this many times in a row counts as done, with errors: a member who
# keeps a FIFO race going must not hold every flush back.
FULL_PASS_TIMEOUTS_MAX = 3

# --- rsync ------------------------------------------------------------------------------------

# Everything an overlay upper holds: whiteouts (char devices 0/0, often hard links of one
# another), trusted.overlay.* xattrs (opaque dirs; root copies the trusted namespace), other
# xattrs, ACLs, hard links, symlinks, modes, numeric owners, times.
# -S keeps a sparse file sparse on up_mfs (a 1 TiB hole is not 1 TiB of chunks). --timeout
# ends a run whose sender sits blocked, e.g. in open() of a FIFO a member swapped in for a file.
RSYNC_TIMEOUT_S = 20
RSYNC_COMMON = ("-aHAX", "--numeric-ids", "-S", f"--timeout={RSYNC_TIMEOUT_S}")
# With --files-from rsync does not recurse (-d only). A name ending in "/." sends that
# directory's entries, and --delete then removes what the destination has there and the
# source has not; a plain name sends only the entry itself. --force replaces a non-empty
# directory by a file.
RSYNC_BATCH = RSYNC_COMMON + ("--from0", "--files-from=-", "--delete-missing-args", "--delete", "--force", "-i", "--stats")
RSYNC_FULL = RSYNC_COMMON + ("--delete", "--force", "-i", "--stats")
# 24: some source files vanished meanwhile. Their deletion is already queued as a change.
RSYNC_OK_CODES = (0, 24)
# 23: some paths could not be copied; 30, 35: the I/O deadline passed. Both may be down to a
# few paths of the batch (a symlink race, a FIFO, a name too long), unless the destination is.
RSYNC_PARTIAL = 23
RSYNC_TIMEOUT_CODES = (30, 35)
# rsync gives up the whole run on one name longer than it can hold (exit 4), or on a path a
# symlink swap made the sender answer for oddly (exit 2).
PATH_ABORTS = {4: re.compile(r"overflows max-path len|rejecting unrequested file-list name"), 2: re.compile(r"ABORTING due to invalid path from sender")}
DESTINATION_FULL = re.compile(r"No space left on device|Disk quota exceeded")
DESTINATION_DOWN = re.compile(r"Read-only file system|Transport endpoint is not connected|Input/output error")
FULL_DESTINATION_ERROR = "MooseFS quota or space exhausted"
# rsync cannot name a longer path (PATH_MAX, its terminating NUL included).
PATH_MAX_BYTES = 4096

# The sending side runs as an rsync daemon over a pipe (-e), chrooted at up_local: the tree is
# the member's, and a directory they swap for a symlink mid-run can then only lead back into
# their own tree, never to the node's files.
SENDER_CONFIG = "rsyncd.conf"
SENDER_MODULE = "up"
# What rsyncd.conf and rsync's -e word splitting take as they are: no quotes, spaces, '%',
# '#', backslashes or newlines.
PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+@,=:/-]*")
PROBE_TIME_NS = 1_000_000_000 * 1_000_000_000 + 123_456_789
ITEMIZED_LINE = re.compile(r"^(\*deleting|[<>ch.][fdLDS])")
STATS_FILES = re.compile(r"^Number of files: ([0-9][0-9,.]*)", re.MULTILINE)

# --- inotify (linux/inotify.h) ----------------------------------------------------------------

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = 0o2000000

# Writes through overlayfs do not always end in a close-write event; IN_MODIFY counts too.
TREE_MASK = (
    IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_ATTRIB
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
CONTROL_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR
EVENT_HEADER = struct.Struct("iIII")
READ_BUFFER_BYTES = 256 * 1024

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ROOT_CONTENTS = b"."


# --- small shared pieces (also used by sync.py) -----------------------------------------------


def write_json_atomically(path: str, value) -> None:
    """Readers see the old document or the new one, never a torn one; a new file is 0600."""
    write_text_atomically(path, json.dumps(value, sort_keys=True) + "\n")


def write_text_atomically(path: str, text: str) -> None:
    write_atomically(path, text.encode(), 0o600)


def read_json(path: str):
    """The document at path, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def read_ack(control_dir: str) -> dict:
    ack = read_json(os.path.join(control_dir, FLUSH_ACK))
    return ack if isinstance(ack, dict) and isinstance(ack.get("seq"), int) else {"seq": 0, "files": 0}


def request_flush(control_dir: str) -> int:
    """Create the next flush request; its number. The lock makes numbers follow the order in
    which the request files appear, so an ack of N answers every request up to N."""
    with open(os.path.join(control_dir, FLUSH_LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seq_path = os.path.join(control_dir, FLUSH_SEQ)
        try:
            with open(seq_path, encoding="ascii") as stream:
                last = int(stream.read().strip() or 0)
        except (OSError, ValueError):
            last = 0
        number = max(last, read_ack(control_dir)["seq"]) + 1
        write_json_atomically(seq_path, number)
        fd = os.open(os.path.join(control_dir, f"{FLUSH_PREFIX}{number}"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return number


def flush_number(name: bytes) -> int | None:
    match = FLUSH_REQUEST.fullmatch(name)
    return int(match.group(1)) if match else None


def daemon_args(
    up_local: str, up_mfs: str, control_dir: str, sync_time_s: float, batch_max_files: int, full_pass_hours: float, rsync: str,
    node: str | None = None,
) -> list[str]:
    """The daemon's arguments, spelled one way only: the sync helper compares a running
    daemon's command line with them to tell whether it runs with the wanted settings."""
    fence = ["--node", node] if node else []
    return fence + [
        "--up-local", up_local,
        "--up-mfs", up_mfs,
        "--control-dir", control_dir,
        "--sync-time", repr(float(sync_time_s)),
        "--batch-max-files", str(int(batch_max_files)),
        "--full-pass-hours", repr(float(full_pass_hours)),
        "--rsync", rsync,
    ]  # fmt: skip


def rsync_env() -> dict:
    # A daemon started over SSH inherits SSH_CLIENT/SSH_CONNECTION; the daemon sender takes its
    # peer's address from them and would look the name up (10 s per run where DNS is silent).
    env = {key: value for key, value in os.environ.items() if not key.startswith("SSH_")}
    env["LC_ALL"] = "C"  # the stats we parse must not be localised
    return env


class RsyncRun:
    """One finished rsync: whether it counts as done, what it changed and looked at."""

    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float):
        self.returncode = returncode
        self.seconds = seconds
        self.changed = sum(1 for line in stdout.splitlines() if ITEMIZED_LINE.match(line))
        match = STATS_FILES.search(stdout)
        self.examined = int(re.sub(r"[,.]", "", match.group(1))) if match else 0
        self.stderr_tail = tail(stderr)
        self.destination_full = returncode not in RSYNC_OK_CODES and DESTINATION_FULL.search(stderr) is not None
        self.destination_down = DESTINATION_DOWN.search(stderr) is not None
        self.path_abort = returncode in PATH_ABORTS and PATH_ABORTS[returncode].search(stderr) is not None
        if returncode in RSYNC_OK_CODES:
            self.error = None
        elif self.destination_full:
            self.error = f"{FULL_DESTINATION_ERROR}: rsync exit {returncode}: {self.stderr_tail}"
        else:
            self.error = f"rsync exit {returncode}: {self.stderr_tail}"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def partial(self) -> bool:
        """Failed on some paths only, as far as rsync tells: worth splitting the batch."""
        return self.path_specific and not self.timed_out

    @property
    def timed_out(self) -> bool:
        return self.path_specific and self.returncode in RSYNC_TIMEOUT_CODES

    @property
    def path_specific(self) -> bool:
        wanted = self.returncode == RSYNC_PARTIAL or self.returncode in RSYNC_TIMEOUT_CODES or self.path_abort
        return wanted and not self.destination_full and not self.destination_down


def tail(text: str, limit: int = 400) -> str:
    text = " | ".join(line for line in text.strip().splitlines() if line)
    return text if len(text) <= limit else "..." + text[-limit:]


def run_rsync(argv: list[str], stdin: bytes | None = None, while_waiting=None) -> RsyncRun:
    """Run rsync in its own session (a signal to our group must not cut a batch in half),
    calling while_waiting() about every second so a long transfer still reports status. The
    whole group goes once it ends: a sender stuck in a member's FIFO must not linger."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as err, input_file(stdin) as source:
        process = subprocess.Popen(
            argv,
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=err,
            env=rsync_env(),
            start_new_session=True,
        )
        stuck = []
        try:
            stdout = communicate(process, while_waiting, lambda: stuck.append(True) or kill_group(process.pid))
        finally:
            kill_group(process.pid)
            process.wait()
        err.seek(0)
        stderr = err.read().decode("utf-8", errors="replace")
    returncode = process.returncode
    if stuck:
        # As if its I/O deadline had passed: the batch is split and the path quarantined.
        returncode = RSYNC_TIMEOUT_CODES[0]
        stderr += "\nstopped: the sender was opening a FIFO (a file swapped for one as it was read)"
    return RsyncRun(returncode, stdout.decode("utf-8", errors="replace"), stderr, time.monotonic() - started)


def opening_a_fifo(pid: int) -> bool:
    """Whether rsync or one of its children waits in open() for the other end of a FIFO: the
    sender never opens one on purpose, so a member swapped it in, and no I/O deadline ends it
    (the client's processes keep each other alive with keep-alives)."""
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/wchan", encoding="ascii", errors="replace") as stream:
                if stream.read().strip() == "wait_for_partner":
                    return True
            with open(f"/proc/{current}/task/{current}/children", encoding="ascii") as stream:
                todo.extend(int(child) for child in stream.read().split())
        except (OSError, ValueError):
            continue
    return False


@contextlib.contextmanager
def input_file(data: bytes | None):
    """rsync's stdin as a file, not a pipe: a file list of a deep tree (megabytes) is read at
    rsync's pace, and nothing of ours has to keep feeding it while we wait."""
    if data is None:
        yield subprocess.DEVNULL
        return
    with tempfile.TemporaryFile() as stream:
        stream.write(data)
        stream.seek(0)
        yield stream


def communicate(process: subprocess.Popen, while_waiting, on_fifo=None) -> bytes:
    while True:
        try:
            out, _ = process.communicate(timeout=STATUS_INTERVAL_S)
            return out or b""
        except subprocess.TimeoutExpired:
            if on_fifo is not None and opening_a_fifo(process.pid):
                on_fifo()
            if while_waiting is not None:
                while_waiting()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def full_pass_argv(rsync: str, up_local: str, up_mfs: str, control_dir: str, exact_times: bool) -> list[str]:
    return [rsync, *RSYNC_FULL, *time_args(exact_times), *sender_args(rsync, up_local, control_dir), up_mfs.rstrip("/") + "/"]


def batch_argv(rsync: str, up_local: str, up_mfs: str, control_dir: str, exact_times: bool) -> list[str]:
    return [rsync, *RSYNC_BATCH, *time_args(exact_times), *sender_args(rsync, up_local, control_dir), up_mfs.rstrip("/") + "/"]


def sender_args(rsync: str, up_local: str, control_dir: str) -> list[str]:
    """rsync's source: the chrooted daemon module, reached through `syncd.py --rsh`."""
    config = write_sender_config(control_dir, up_local)
    python, script = sys.executable, os.path.abspath(__file__)
    for path in (python, script, rsync, config):
        require_plain_path(path, "a path in rsync's -e command")
    words = [python, "-I", script, "--rsh", "--rsync", rsync, "--config", config]
    return ["-e", " ".join(words), f"x::{SENDER_MODULE}/"]


def require_plain_path(path: str, what: str) -> None:
    if not PLAIN_PATH.fullmatch(path):
        raise ValueError(f"{what} ({path!r}) holds characters the sync cannot pass to rsync safely; "
                         "use letters, digits and ._+@,=:/- only")  # fmt: skip


def sender_config(up_local: str) -> str:
    require_plain_path(up_local, "up_local")
    # uid/gid 0: a daemon started as root would otherwise read the tree as nobody.
    return (
        "use chroot = yes\nnumeric ids = yes\nuid = 0\ngid = 0\nread only = yes\nlog file = /dev/null\n"
        "reverse lookup = no\n"
        f"[{SENDER_MODULE}]\npath = {up_local.rstrip('/') or '/'}\n"
    )


def write_sender_config(control_dir: str, up_local: str) -> str:
    """The daemon sender's rsyncd.conf in the control dir (0600), rewritten only when it differs."""
    path = os.path.join(control_dir, SENDER_CONFIG)
    text = sender_config(up_local)
    try:
        with open(path, encoding="utf-8") as stream:
            if stream.read() == text:
                return path
    except (OSError, ValueError):
        pass
    write_text_atomically(path, text)
    return path


def rsh_main(argv: list[str]) -> int:
    """`syncd.py --rsh --rsync R --config C [-l USER] HOST rsync --server --daemon .`: what rsync
    runs as its remote shell. Starts the daemon sender on the other end of rsync's pipe."""
    if len(argv) < 4 or argv[0] != "--rsync" or argv[2] != "--config":
        print("syncd.py --rsh: expected --rsync PATH --config PATH before rsync's words", file=sys.stderr)
        return 2
    rsync, config, remote = argv[1], argv[3], argv[4:]
    try:
        start = remote.index("--server")
    except ValueError:
        start = -1
    if start < 0 or remote[start:] != ["--server", "--daemon", "."]:
        print(f"syncd.py --rsh: not a daemon connection: {remote!r}", file=sys.stderr)
        return 2
    os.execv(rsync, [rsync, f"--config={config}", "--server", "--daemon", "."])
    return 127


def time_args(exact_times: bool) -> tuple[str, ...]:
    # rsync compares times in whole seconds unless told otherwise, so a directory whose mtime
    # moved within the second would keep a wrong one. Only where the destination keeps
    # nanoseconds: on one that keeps seconds (MooseFS) every file would look changed.
    return ("--modify-window=-1",) if exact_times else ()


def keeps_nanoseconds(up_mfs: str) -> bool:
    """Whether up_mfs's filesystem stores sub-second times, tried on a file beside up_mfs (never
    inside it: up_mfs must hold exactly what up_local does)."""
    probe = os.path.join(os.path.dirname(up_mfs.rstrip("/")), f".syncd-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.utime(fd, ns=(PROBE_TIME_NS, PROBE_TIME_NS))
        return os.fstat(fd).st_mtime_ns == PROBE_TIME_NS
    except OSError:
        return False
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def files_from(entries: list[bytes]) -> bytes:
    """rsync's --files-from input. A local list line starting with '#' or ';' is a comment to
    rsync, so every entry goes as "./path", which names the same path."""
    return b"".join(b"./" + entry + b"\0" for entry in entries)


def contents_entry(rel: bytes) -> bytes:
    return rel + b"/." if rel else ROOT_CONTENTS


def join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


# --- the queue shared by the watcher and the syncer ---------------------------------------------


class SyncState:
    """Queued paths in the order they were first seen, flush requests and the hard-link index.
    One lock guards it all; the watcher adds, the syncer takes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        # path (bytes, relative; "x/." for a directory's entries) -> (queue position, first seen)
        self.pending: dict[bytes, tuple[int, float]] = {}
        self.position = 0
        # flush number -> queue position when its request was read
        self.flushes: dict[int, int] = {}
        self.full_pass_needed = True
        self.retry_now = False
        self.degraded = False
        self.degraded_reason: str | None = None
        self.fatal: str | None = None
        # (st_dev, st_ino) -> paths seen with that inode and more than one link, oldest first.
        # All of overlay's whiteouts share one inode, so a group can be large: dicts, not lists.
        self.hardlinks: dict[tuple[int, int], dict[bytes, None]] = {}

    def add(self, path: bytes) -> None:
        with self.lock:
            if path not in self.pending:
                self.position += 1
                self.pending[path] = (self.position, time.monotonic())
            self.changed.notify()

    def add_flush(self, number: int) -> None:
        with self.lock:
            self.flushes[number] = self.position
            self.retry_now = True
            if self.degraded:
                self.full_pass_needed = True
            self.changed.notify()

    def degrade(self, log, reason: str) -> None:
        """Events may be missed from now on: full passes take over."""
        with self.lock:
            first_time = not self.degraded
            self.degraded = True
            self.degraded_reason = reason
            self.full_pass_needed = True
            self.changed.notify()
        if first_time:
            log(f"{reason}; falling back to full passes every {DEGRADED_FULL_PASS_S:g} s and on every flush")

    def need_full_pass(self) -> None:
        with self.lock:
            self.full_pass_needed = True
            self.changed.notify()

    def set_fatal(self, reason: str) -> None:
        with self.lock:
            self.fatal = reason
            self.changed.notify()

    def note_hardlink(self, key: tuple[int, int], rel: bytes) -> None:
        with self.lock:
            self.hardlinks.setdefault(key, {})[rel] = None

    def hardlink_candidates(self, key: tuple[int, int]) -> list[bytes]:
        with self.lock:
            return list(self.hardlinks.get(key, ()))

    def forget_hardlink(self, key: tuple[int, int], rel: bytes) -> None:
        with self.lock:
            paths = self.hardlinks.get(key)
            if paths is not None:
                paths.pop(rel, None)
                if not paths:
                    del self.hardlinks[key]

    def take(self, limit: int) -> list[tuple[bytes, tuple[int, float]]]:
        with self.lock:
            taken = []
            for path in self.pending:
                if len(taken) >= limit:
                    break
                taken.append((path, self.pending[path]))
            for path, _ in taken:
                del self.pending[path]
            return taken

    def take_all(self) -> list[tuple[bytes, tuple[int, float]]]:
        with self.lock:
            taken = list(self.pending.items())
            self.pending = {}
            return taken

    def give_back(self, taken: list[tuple[bytes, tuple[int, float]]]) -> None:
        """Put paths of a failed sync back in front, keeping their place and age; a path queued
        again meanwhile keeps the older entry."""
        with self.lock:
            merged = dict(taken)
            for path, entry in self.pending.items():
                if path not in merged:
                    merged[path] = entry
            self.pending = merged

    def oldest(self) -> tuple[int, float] | None:
        with self.lock:
            for entry in self.pending.values():
                return entry
            return None

    def satisfied_flushes(self) -> list[int]:
        """Flushes whose every earlier change has been synced."""
        with self.lock:
            if self.full_pass_needed:
                return []
            first = next(iter(self.pending.values()), (self.position + 1, 0.0))[0]
            return [number for number, position in self.flushes.items() if position < first]

    def forget_flushes(self, numbers: list[int]) -> None:
        with self.lock:
            for number in numbers:
                self.flushes.pop(number, None)


# --- the watcher --------------------------------------------------------------------------------


# The kernel charges an inotify instance and its watches to the euid that created it. Container
# root is uid 0 on the node, so a member could use up uid 0's instances
# (fs.inotify.max_user_instances) and keep every sync daemon from starting: each daemon creates
# its instance as a uid of its own, from a range nothing else uses.
INOTIFY_UIDS = (2_000_000_000, 2_100_000_000)
# Tests only: make inotify_init1 fail, to exercise the mode without inotify.
FAIL_INOTIFY_ENV = "LABVM_SYNCD_TEST_FAIL_INOTIFY"


class Inotify:
    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.inotify_init1.argtypes = [ctypes.c_int]
        self.libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        if os.environ.get(FAIL_INOTIFY_ENV):
            raise OSError(errno.EMFILE, f"inotify_init1: {os.strerror(errno.EMFILE)} ({FAIL_INOTIFY_ENV} is set)")
        fd = self.init_as_own_uid()
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify_init1: {os.strerror(error)}")
        self.fd = fd

    def init_as_own_uid(self) -> int:
        """inotify_init1 with the euid switched to a uid of this daemon's. Call it before any
        other thread starts: the switch holds for the whole process while it lasts."""
        if os.geteuid() != 0:
            return self.libc.inotify_init1(IN_CLOEXEC)
        try:
            os.seteuid(random.randrange(*INOTIFY_UIDS))
        except OSError:  # a uid this user namespace does not map: charge root, as before
            return self.libc.inotify_init1(IN_CLOEXEC)
        try:
            fd = self.libc.inotify_init1(IN_CLOEXEC)
            error = ctypes.get_errno()
        finally:
            os.seteuid(0)
        ctypes.set_errno(error)
        return fd

    def add_watch(self, path: bytes, mask: int) -> int:
        wd = self.libc.inotify_add_watch(self.fd, path, mask)
        if wd < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        return wd

    def read_events(self):
        """(wd, mask, name) of every event one read returns."""
        buffer = os.read(self.fd, READ_BUFFER_BYTES)
        position = 0
        while position + EVENT_HEADER.size <= len(buffer):
            wd, mask, _cookie, length = EVENT_HEADER.unpack_from(buffer, position)
            start = position + EVENT_HEADER.size
            yield wd, mask, buffer[start : start + length].rstrip(b"\0")
            position = start + length


class TreeWatcher:
    """Turns inotify events under up_local into queued paths, and flush-<N> files in the
    control dir into flush requests.

    Directories are opened one component at a time with O_NOFOLLOW from a descriptor on
    up_local, and watched through /proc/self/fd: the tree is the lab member's, and a symlink
    planted where a directory was must never lead a root daemon into the node's own files."""

    watching = True

    def __init__(self, up_local: str, control_dir: str, state: SyncState, log, inotify: Inotify):
        self.root = up_local
        self.control_dir = control_dir
        self.state = state
        self.log = log
        self.inotify = inotify
        self.paths: dict[int, bytes] = {}
        self.root_fd = os.open(up_local, DIR_FLAGS)
        self.root_wd = None
        self.control_wd = self.inotify.add_watch(os.fsencode(control_dir), CONTROL_MASK)
        self.stop = threading.Event()

    def watch_count(self) -> int:
        return len(self.paths)

    # -- directories

    def open_dir(self, rel: bytes) -> int | None:
        """A descriptor on up_local/rel if every component is a real directory now."""
        fd = os.dup(self.root_fd)
        for part in rel.split(b"/") if rel else ():
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = child
        return fd

    def watch_subtree(self, rel: bytes, queue: bool) -> None:
        """Watch rel and every directory below it, then list them, so nothing made before a
        watch existed is missed. With queue, each directory is queued as "dir/." (its entries)."""
        todo = [rel]
        while todo:
            current = todo.pop()
            fd = self.open_dir(current)
            if fd is None:
                continue  # gone or replaced meanwhile; its own event says so
            try:
                if not self.add_watch(fd, current):
                    continue
                if queue:
                    self.state.add(contents_entry(current))
                todo.extend(self.list_dir(fd, current, queue))
            finally:
                os.close(fd)

    def add_watch(self, fd: int, rel: bytes) -> bool:
        try:
            wd = self.inotify.add_watch(f"/proc/self/fd/{fd}".encode(), TREE_MASK)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                self.enter_degraded_mode()
            elif error.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.log(f"cannot watch {show(rel)}: {error.strerror}")
            return False
        # A directory moved inside the tree keeps its watch: adding it again returns the
        # same descriptor, which now names the new path.
        self.paths[wd] = rel
        if not rel:
            self.root_wd = wd
        return True

    def list_dir(self, fd: int, rel: bytes, queue: bool) -> list[bytes]:
        subdirs = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    child = join(rel, os.fsencode(entry.name))
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(child)
                        continue
                    self.note_links(entry, child, queue)
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.log(f"cannot list {show(rel)}: {error.strerror}")
        return subdirs

    def note_links(self, entry, rel: bytes, queue: bool) -> None:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            return
        if info.st_nlink > 1:
            self.state.note_hardlink((info.st_dev, info.st_ino), rel)
            if queue:
                # Queued by name too, so the batch adds a link already on up_mfs and rsync
                # links this one to it instead of copying it apart.
                self.state.add(rel)

    def enter_degraded_mode(self) -> None:
        reason = "inotify watch limit reached (fs.inotify.max_user_watches): some directories are not watched"
        self.state.degrade(self.log, reason)

    # -- events

    def run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.inotify.fd, select.POLLIN)
            while not self.stop.is_set():
                if not poller.poll(WAKE_INTERVAL_S * 1000):
                    continue
                for wd, mask, name in self.inotify.read_events():
                    self.handle(wd, mask, name)
        except Exception:  # noqa: BLE001 - a watcher that died silently would lose changes
            self.log("watcher failed:\n" + traceback.format_exc())
            self.state.set_fatal("the inotify watcher failed; see the log")

    def handle(self, wd: int, mask: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            self.recover_from_overflow()
            return
        if wd == self.control_wd:
            if mask & IN_IGNORED:
                self.state.set_fatal(f"the control dir {self.control_dir} was removed")
            number = flush_number(name)
            if number is not None and mask & (IN_CREATE | IN_MOVED_TO):
                self.state.add_flush(number)
            return
        if mask & IN_IGNORED:
            self.paths.pop(wd, None)
            if wd == self.root_wd:
                self.state.set_fatal(f"{self.root} was removed")
            return
        base = self.paths.get(wd)
        if base is None:
            return
        if not name:
            if mask & IN_ATTRIB:
                self.state.add(base or ROOT_CONTENTS)
            return
        rel = join(base, name)
        self.state.add(rel)
        # Exchanging renames (overlay's whiteouts and opaque dirs) may flag the wrong side as
        # the directory, so anything renamed in is checked; a plain create says it truly.
        if mask & IN_MOVED_TO or (mask & IN_CREATE and mask & IN_ISDIR):
            self.watch_subtree(rel, queue=True)

    def recover_from_overflow(self) -> None:
        """Events were dropped: watch whatever directory may lack a watch, take note of flush
        requests whose event may be lost, then let a full pass catch up."""
        self.log("inotify queue overflowed: rewatching the tree; a full pass follows")
        self.state.need_full_pass()
        self.watch_subtree(b"", queue=False)
        self.register_waiting_flushes()

    def register_waiting_flushes(self) -> None:
        for name in os.listdir(os.fsencode(self.control_dir)):
            number = flush_number(name)
            if number is not None:
                self.state.add_flush(number)


class PollingWatcher:
    """Stands in for TreeWatcher when inotify cannot be had: flush requests are found by listing
    the control dir, and changes wait for the next full pass (every DEGRADED_FULL_PASS_S and
    on every flush)."""

    watching = False
    root_wd = None

    def __init__(self, control_dir: str, state: SyncState, log):
        self.control_dir = control_dir
        self.state = state
        self.log = log
        self.stop = threading.Event()
        self.seen: set[int] = set()

    def watch_count(self) -> int:
        return 0

    def watch_subtree(self, rel: bytes, queue: bool) -> None:
        pass

    def register_waiting_flushes(self) -> None:
        try:
            names = os.listdir(os.fsencode(self.control_dir))
        except FileNotFoundError:
            self.state.set_fatal(f"the control dir {self.control_dir} was removed")
            return
        numbers = {number for number in map(flush_number, names) if number is not None}
        for number in sorted(numbers - self.seen):
            self.state.add_flush(number)
        self.seen = numbers

    def run(self) -> None:
        try:
            while not self.stop.wait(WAKE_INTERVAL_S):
                self.register_waiting_flushes()
        except Exception:  # noqa: BLE001 - a poller that died silently would never ack a flush
            self.log("flush poller failed:\n" + traceback.format_exc())
            self.state.set_fatal("the flush poller failed; see the log")


def make_watcher(settings: argparse.Namespace, state: SyncState, log):
    """The inotify watcher, or the poller when no inotify instance can be had."""
    try:
        inotify = Inotify()
    except OSError as error:
        state.degrade(log, f"no inotify instance ({error.strerror or error}): changes are not watched")
        return PollingWatcher(settings.control_dir, state, log)
    return TreeWatcher(settings.up_local, settings.control_dir, state, log, inotify)


def show(rel: bytes) -> str:
    return repr(os.fsdecode(rel or b"."))


# --- the syncer ---------------------------------------------------------------------------------


class DestinationUnavailable(Exception):
    pass


class Fenced(Exception):
    """The desktop's owner record on MooseFS names another node: a switch moved the desktop
    away (perhaps while this node was cut off). Syncing on would write this node's stale upper
    over the new owner's, so the daemon stops for good."""


PENDING_BYTES_SAMPLE = 2000
HEARTBEAT_EVERY_S = 5.0
IDLE_HEARTBEAT_EVERY_S = 30.0


class Syncer:
    """The main loop: decides when a batch or a full pass is due, runs rsync, acks flushes and
    writes status.json."""

    def __init__(self, settings: argparse.Namespace, state: SyncState, watcher: TreeWatcher, log):
        self.settings = settings
        self.state = state
        self.watcher = watcher
        self.log = log
        self.stopping = False
        self.started = time.time()
        self.state_name = "full_pass"
        self.counters = {"batches": 0, "files_synced": 0, "files_examined": 0, "full_passes": 0, "errors": 0}
        self.last_success = None
        self.last_error = None
        self.last_batch_s = None
        self.last_full_pass_s = None
        self.files_since_ack = 0
        self.failures = 0
        self.retry_at = 0.0
        self.next_full_pass = None
        self.last_status_write = 0.0
        self.destination = destination_identity(settings.up_mfs)
        self.exact_times = keeps_nanoseconds(settings.up_mfs)
        self.unresolved_links: set[bytes] = set()
        self.last_link_walk = float("-inf")
        self.last_heartbeat = float("-inf")
        # queued path -> {"reason", "since"}: paths that failed alone, out of the queue.
        self.quarantined: dict[bytes, dict] = {}
        self.quarantine_dropped = 0
        self.quarantine_retried_up_to = 0
        self.just_rejected: dict[bytes, str] = {}
        self.full_pass_timeouts = 0
        self.full_pass_problem: str | None = None
        argv = batch_argv(settings.rsync, settings.up_local, settings.up_mfs, settings.control_dir, self.exact_times)
        log(f"batches run: {' '.join(argv)} (queued paths on stdin)")

    # -- the loop

    def run(self) -> int:
        while True:
            self.check_fatal()
            if self.stopping:
                return self.shutdown()
            try:
                worked = self.step()
            except Fenced as fenced:
                self.log(f"fenced: {fenced}; exiting without syncing")
                self.state_name = "fenced"
                self.last_error = str(fenced)
                self.write_status(force=True)
                return 3
            if not worked:
                self.wait()
                self.idle_heartbeat()
            self.ack_flushes()
            self.write_status(force=worked)

    def step(self) -> bool:
        """Do one due piece of work; False when nothing was due."""
        now = time.monotonic()
        # A new flush request retries at once instead of waiting out the backoff.
        retry_now = self.take_retry_now()
        if now < self.retry_at and not retry_now:
            return False
        if self.full_pass_due(now):
            self.full_pass()
            return True
        if self.quarantine_retry_due():
            self.retry_quarantined()
            return True
        if self.batch_due(now):
            self.batch()
            return True
        return self.requeue_unresolved_links()

    def wait(self) -> None:
        with self.state.lock:
            if self.state.fatal is None and not self.state.retry_now:
                self.state.changed.wait(WAKE_INTERVAL_S)

    def check_fatal(self) -> None:
        if self.state.fatal is not None:
            self.fail(self.state.fatal)
            self.write_status(force=True)
            raise SystemExit(1)

    def take_retry_now(self) -> bool:
        with self.state.lock:
            retry, self.state.retry_now = self.state.retry_now, False
        return retry

    def full_pass_due(self, now: float) -> bool:
        with self.state.lock:
            needed = self.state.full_pass_needed
        if needed:
            return True
        if self.next_full_pass is not None and now >= self.next_full_pass:
            self.state.need_full_pass()
            return True
        return False

    def batch_due(self, now: float) -> bool:
        oldest = self.state.oldest()
        if oldest is None:
            return False
        position, first_seen = oldest
        if now - first_seen >= self.settings.sync_time or self.stopping:
            return True
        with self.state.lock:
            flush_waits = any(barrier >= position for barrier in self.state.flushes.values())
            return flush_waits or len(self.state.pending) >= self.settings.batch_max_files

    # -- full pass

    def full_pass(self) -> None:
        with self.state.lock:
            self.state.full_pass_needed = False
        # Everything queued so far is covered by a pass that starts after it was queued.
        covered = self.state.take_all()
        self.state_name = "full_pass"
        self.write_status(force=True)
        try:
            self.check_destination()
            argv = full_pass_argv(
                self.settings.rsync, self.settings.up_local, self.settings.up_mfs, self.settings.control_dir, self.exact_times
            )
            self.log(f"full pass: {' '.join(argv)}")
            run = run_rsync(argv, while_waiting=self.write_status)
        except (DestinationUnavailable, OSError) as error:
            self.full_pass_failed(covered, str(error))
            return
        if run.timed_out:
            self.full_pass_timeouts += 1
        if run.ok:
            self.full_pass_done(run, None)
        elif run.partial or (run.timed_out and self.full_pass_timeouts >= FULL_PASS_TIMEOUTS_MAX):
            # Some paths cannot be copied (or a member keeps the sender blocked): what could be
            # copied is, and waiting would not make the rest copyable.
            self.full_pass_done(run, f"full pass: some files could not be copied: {run.stderr_tail or run.error}")
        else:
            self.full_pass_failed(covered, run.error)

    def full_pass_done(self, run: RsyncRun, problem: str | None) -> None:
        self.counters["full_passes"] += 1
        self.last_full_pass_s = round(run.seconds, 3)
        self.succeeded(run)
        self.full_pass_problem = problem
        if problem is None:
            # Every path was copied: nothing is left in quarantine.
            self.quarantined.clear()
            self.quarantine_dropped = 0
            self.log(f"full pass done in {run.seconds:.2f} s: {run.changed} items changed, {run.examined} examined")
        else:
            self.last_error = problem
            self.log(f"full pass done in {run.seconds:.2f} s, with errors: {problem}")
        # After timeouts, the next try comes sooner than the usual schedule.
        self.schedule_next_full_pass(soon=self.full_pass_timeouts > 0)
        self.full_pass_timeouts = 0

    def full_pass_failed(self, covered, reason: str) -> None:
        self.state.give_back(covered)
        self.state.need_full_pass()
        self.fail(f"full pass failed: {reason}")

    def schedule_next_full_pass(self, soon: bool = False) -> None:
        interval = self.settings.full_pass_hours * 3600.0
        with self.state.lock:
            degraded = self.state.degraded
        if degraded or soon:
            interval = min(interval, DEGRADED_FULL_PASS_S) if interval > 0 else DEGRADED_FULL_PASS_S
        self.next_full_pass = time.monotonic() + interval if interval > 0 else None

    # -- batches

    def batch(self) -> None:
        taken = self.state.take(self.settings.batch_max_files)
        if taken:
            self.state_name = "syncing"
            self.settle(taken)

    def settle(self, taken: list[tuple[bytes, tuple[int, float]]]) -> None:
        """Sync the taken paths. A batch that fails on some of its paths only (a symlink race, a
        FIFO swapped in, a name rsync cannot take) is split in halves, again and again, until
        each path that fails alone is found and quarantined; the rest counts as synced."""
        todo = [taken]
        while todo:
            part = todo.pop()
            try:
                run = self.run_batch([path for path, _ in part])
            except (DestinationUnavailable, OSError, ValueError) as error:
                self.batch_failed(part + [item for chunk in todo for item in chunk], str(error))
                return
            if run is None or run.ok:
                self.batch_done(part, run)
            elif not run.path_specific:
                self.batch_failed(part + [item for chunk in todo for item in chunk], run.error)
                return
            elif len(part) == 1:
                self.quarantine(part[0][0], run.stderr_tail or run.error)
            else:
                half = len(part) // 2
                todo += [part[half:], part[:half]]

    def run_batch(self, queued: list[bytes]) -> "RsyncRun | None":
        """One rsync of these queued paths; None when none of them can be sent."""
        self.check_destination()
        file_list = self.file_list(queued)
        if not file_list:
            return None
        run = run_rsync(
            batch_argv(self.settings.rsync, self.settings.up_local, self.settings.up_mfs, self.settings.control_dir,
                       self.exact_times),
            stdin=files_from(file_list),
            while_waiting=self.write_status,
        )  # fmt: skip
        self.log(f"batch of {len(queued)} queued paths ({len(file_list)} listed): "
                 + (f"{run.changed} changed, {run.examined} examined, {run.seconds:.3f} s" if run.ok else run.error))  # fmt: skip
        return run

    def batch_done(self, part, run: "RsyncRun | None") -> None:
        for path, _ in part:
            if path in self.quarantined and path not in self.just_rejected:
                del self.quarantined[path]
                self.log(f"{show(path)} synced: out of quarantine")
        if run is None:
            return
        self.counters["batches"] += 1
        self.last_batch_s = round(run.seconds, 3)
        self.succeeded(run)

    def quarantine(self, path: bytes, reason: str) -> None:
        """Leave a path that cannot be copied out of the queue, so it blocks no flush. It is
        tried again when it changes, at each flush request and at stop."""
        if path not in self.quarantined and len(self.quarantined) >= QUARANTINE_KEEP:
            self.quarantine_dropped += 1
        else:
            self.quarantined[path] = {"reason": reason, "since": time.time()}
        self.log(f"quarantined {show(path)[:QUARANTINE_SHOW_CHARS]}: {reason}")

    def quarantine_retry_due(self) -> bool:
        if not self.quarantined:
            return False
        with self.state.lock:
            newest = max(self.state.flushes, default=0)
        return newest > self.quarantine_retried_up_to

    def retry_quarantined(self) -> None:
        with self.state.lock:
            self.quarantine_retried_up_to = max(self.state.flushes, default=0)
        paths = list(self.quarantined)
        self.log(f"a flush was requested: trying the {len(paths)} quarantined paths again")
        self.state_name = "syncing"
        self.settle([(path, (0, time.monotonic())) for path in paths])

    def file_list(self, queued: list[bytes]) -> list[bytes]:
        builder = BatchBuilder(self.settings.up_local, self.state)
        file_list = builder.build(queued)
        self.just_rejected = builder.rejected
        for path, reason in builder.rejected.items():
            self.quarantine(path, reason)
        if not builder.unresolved:
            return file_list
        if not self.link_walk_allowed():
            self.unresolved_links.update(builder.unresolved)
            return file_list
        self.walk_for_links()
        return builder.add_peers(file_list)

    def link_walk_allowed(self) -> bool:
        if self.stopping or self.flush_waiting():
            return True
        return time.monotonic() - self.last_link_walk >= LINK_WALK_INTERVAL_S

    def flush_waiting(self) -> bool:
        with self.state.lock:
            return bool(self.state.flushes)

    def walk_for_links(self) -> None:
        """A new link to a file synced long ago names only itself in its event; the other
        names are found by walking up_local (local disk, never up_mfs)."""
        started = time.monotonic()
        count = index_hardlinks(self.settings.up_local, self.state)
        self.last_link_walk = time.monotonic()
        self.log(f"looked for the other names of hard-linked files: {count} found in {self.last_link_walk - started:.2f} s")

    def requeue_unresolved_links(self) -> bool:
        """Links copied apart while walks were rate-limited: queue them again once a walk has
        found their peers. True if it walked."""
        if not self.unresolved_links or not self.link_walk_allowed():
            return False
        self.walk_for_links()
        for rel in self.unresolved_links:
            self.state.add(rel)
        self.unresolved_links.clear()
        return True

    def batch_failed(self, taken, reason: str) -> None:
        self.state.give_back(sorted(taken, key=lambda item: item[1][0]))
        self.fail(f"sync of {len(taken)} paths failed: {reason}")

    # -- outcomes

    def succeeded(self, run: RsyncRun) -> None:
        if time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY_S:
            self.heartbeat(time.time() - run.seconds)
        self.counters["files_synced"] += run.changed
        self.counters["files_examined"] += run.examined
        self.files_since_ack += run.changed
        self.last_success = time.time()
        self.last_error = None
        self.failures = 0
        self.retry_at = 0.0
        self.state_name = "idle"

    def fail(self, reason: str) -> None:
        self.failures += 1
        self.counters["errors"] += 1
        backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        self.retry_at = time.monotonic() + backoff
        self.last_error = reason
        self.state_name = "error"
        self.log(f"error (retry in {backoff:g} s, nothing dropped): {reason}")

    def user_dir(self) -> str:
        return os.path.dirname(self.settings.up_mfs.rstrip("/"))

    def check_owner(self) -> None:
        if not self.settings.node:
            return
        try:
            with open(os.path.join(self.user_dir(), OWNER_FILE), encoding="utf-8") as stream:
                owner = json.load(stream).get("node")
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError):
            return  # unreadable now: the destination check or the next batch will tell
        if owner != self.settings.node:
            raise Fenced(f"the desktop now belongs to node {owner!r}, not {self.settings.node!r}")

    def heartbeat(self, synced_until: float) -> None:
        """What a node that dies leaves behind: until when its desktop's writes reached MooseFS.
        `labvm switch --from-lost` reads it to say how much may be lost."""
        if not self.settings.node:
            return
        self.last_heartbeat = time.monotonic()
        try:
            write_json_atomically(os.path.join(self.user_dir(), HEARTBEAT_FILE),
                                  {"node": self.settings.node, "synced_until": synced_until})
        except OSError as error:
            self.log(f"cannot write the heartbeat: {error}")

    def idle_heartbeat(self) -> None:
        if time.monotonic() - self.last_heartbeat < IDLE_HEARTBEAT_EVERY_S or self.state.oldest() is not None:
            return
        with self.state.lock:
            if self.state.full_pass_needed or self.state_name == "error":
                return
        self.check_owner_quietly()
        self.heartbeat(time.time())

    def check_owner_quietly(self) -> None:
        try:
            self.check_owner()
        except Fenced:
            self.state.set_fatal("fenced: another node owns this desktop now")

    def check_destination(self) -> None:
        """up_mfs must be the directory we started with. If MooseFS is not mounted, rsync would
        otherwise fill the bare mount point on the local disk."""
        self.check_owner()
        try:
            identity = destination_identity(self.settings.up_mfs)
        except OSError as error:
            raise DestinationUnavailable(f"destination {self.settings.up_mfs} is not available: {error.strerror}") from None
        if identity[0] != self.destination[0]:
            raise DestinationUnavailable(
                f"destination {self.settings.up_mfs} is on another filesystem than at start (MooseFS not mounted?)"
            )
        if identity != self.destination:
            # Someone replaced up_mfs: only a full pass can tell what it lacks.
            self.log(f"{self.settings.up_mfs} was replaced by another directory; a full pass follows")
            self.destination = identity
            self.state.need_full_pass()

    # -- flushes

    def ack_flushes(self) -> None:
        done = self.state.satisfied_flushes()
        if self.quarantined:
            done = [number for number in done if number <= self.quarantine_retried_up_to]
        if not done:
            return
        number = max(done)
        if number > read_ack(self.settings.control_dir)["seq"]:
            ack = {"seq": number, "files": self.files_since_ack, "time": time.time()}
            write_json_atomically(os.path.join(self.settings.control_dir, FLUSH_ACK), ack)
            self.files_since_ack = 0
        self.state.forget_flushes(done)
        self.remove_flush_requests(number)

    def remove_flush_requests(self, up_to: int) -> None:
        for name in os.listdir(os.fsencode(self.settings.control_dir)):
            number = flush_number(name)
            if number is not None and number <= up_to:
                try:
                    os.unlink(os.path.join(os.fsencode(self.settings.control_dir), name))
                except FileNotFoundError:
                    pass

    # -- stopping

    def shutdown(self) -> int:
        """SIGTERM: the current batch is done; sync everything changed before the signal, through
        the same barrier a client uses, then exit."""
        self.log("SIGTERM: syncing what is queued, then exiting")
        number = request_flush(self.settings.control_dir)
        deadline = time.monotonic() + STOP_RETRY_S
        while time.monotonic() < deadline:
            self.check_fatal()
            if number in self.state.satisfied_flushes():
                self.ack_flushes()
                self.write_status(force=True, final=True)
                self.log("stopped")
                return 0
            if not self.step():
                self.wait()
            self.write_status()
        self.log(f"gave up after {STOP_RETRY_S:g} s: {self.state_summary()}; the next start's full pass copies it")
        self.write_status(force=True, final=True)
        return 1

    def state_summary(self) -> str:
        with self.state.lock:
            return f"{len(self.state.pending)} paths queued, full pass needed: {self.state.full_pass_needed}"

    # -- status

    def pending_bytes(self, sample: list[bytes], total: int) -> int:
        """About how many bytes the queued paths hold (what a switch still has to send): their
        sizes on local disk, scaled up from a sample when the queue is long."""
        size = 0
        root = os.fsencode(self.settings.up_local)
        for rel in sample:
            try:
                size += os.lstat(os.path.join(root, rel)).st_size
            except OSError:
                continue
        return size if len(sample) >= total or not sample else size * total // len(sample)

    def write_status(self, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_status_write < STATUS_INTERVAL_S:
            return
        self.last_status_write = now
        oldest = self.state.oldest()
        with self.state.lock:
            pending = len(self.state.pending)
            sample = list(itertools.islice(self.state.pending, PENDING_BYTES_SAMPLE))
            full_pass_needed = self.state.full_pass_needed
            degraded = self.state.degraded
            degraded_reason = self.state.degraded_reason
        status = {
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "state": "stopped" if final else self.state_name,
            "pending": pending,
            "pending_bytes": self.pending_bytes(sample, pending),
            "oldest_pending_age_s": round(now - oldest[1], 3) if oldest else 0.0,
            "full_pass_needed": full_pass_needed,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_batch_s": self.last_batch_s,
            "last_full_pass_s": self.last_full_pass_s,
            "flush_acked": read_ack(self.settings.control_dir)["seq"],
            "watches": self.watcher.watch_count(),
            "degraded": degraded,
            "degraded_reason": degraded_reason,
            "watching": self.watcher.watching,
            "quarantined": self.quarantine_list(),
            "quarantined_count": len(self.quarantined) + self.quarantine_dropped,
            "full_pass_problem": self.full_pass_problem,
            "up_local": self.settings.up_local,
            "up_mfs": self.settings.up_mfs,
            "sync_time_s": self.settings.sync_time,
            "batch_max_files": self.settings.batch_max_files,
            "full_pass_hours": self.settings.full_pass_hours,
            **self.counters,
        }
        try:
            write_json_atomically(os.path.join(self.settings.control_dir, STATUS_FILE), status)
        except OSError as error:
            self.log(f"cannot write status: {error}")


    def quarantine_list(self) -> list[dict]:
        listed = itertools.islice(self.quarantined.items(), QUARANTINE_LISTED)
        return [{"path": show(path)[:QUARANTINE_SHOW_CHARS], **record} for path, record in listed]


def destination_identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, "not a directory")
    return info.st_dev, info.st_ino


class BatchBuilder:
    """Turns queued paths into rsync's file list.

    - A path under something that is no longer a real directory (deleted, replaced by a file or
      a symlink) becomes that ancestor: rsync then deletes or replaces it whole, and never reads
      through a symlink the lab member planted.
    - A queued "dir/." whose dir is gone becomes "dir".
    - A file with more links gets one other link that rsync may link it to.
    - A path rsync cannot name (PATH_MAX) is left out, in `rejected`.
    - A top-level path brings the root (".") along: rsync's temporary files change the root's
      mtime on up_mfs, and only an explicit "." sets it back. Deeper directories come along
      as rsync's implied directories, times included.
    """

    def __init__(self, up_local: str, state: SyncState):
        self.root = os.fsencode(up_local.rstrip("/"))
        self.state = state
        self.is_dir_cache: dict[bytes, bool] = {}
        # Files with more links than the index knows names for.
        self.unresolved: set[bytes] = set()
        # Queued paths no rsync can copy, and why.
        self.rejected: dict[bytes, str] = {}

    def build(self, queued: list[bytes]) -> list[bytes]:
        listed: dict[bytes, None] = {}
        for path in queued:
            if len(path) >= PATH_MAX_BYTES:
                self.rejected[path] = f"path longer than {PATH_MAX_BYTES - 1} bytes: rsync cannot copy it"
                continue
            for entry in self.entries_for(path, listed):
                listed[entry] = None
        return sorted(listed)

    def add_peers(self, file_list: list[bytes]) -> list[bytes]:
        """After the index was refreshed: a peer for each file that had none."""
        listed = dict.fromkeys(file_list)
        for rel in sorted(self.unresolved):
            info = self.lstat(rel)
            if info is not None and info.st_nlink > 1:
                listed.update(dict.fromkeys(self.linked_peer(rel, info, listed)))
        self.unresolved.clear()
        return sorted(listed)

    def entries_for(self, path: bytes, listed) -> list[bytes]:
        if path == ROOT_CONTENTS:
            return [ROOT_CONTENTS]
        contents = path.endswith(b"/.")
        rel = path[:-2] if contents else path
        blocker = self.first_non_directory_ancestor(rel)
        if blocker is not None:
            return self.with_root(blocker, [blocker])
        info = self.lstat(rel)
        if contents and (info is None or not stat.S_ISDIR(info.st_mode)):
            return self.with_root(rel, [rel])
        entries = [path]
        if info is not None and not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
            entries += self.linked_peer(rel, info, listed)
        return self.with_root(rel, entries)

    def with_root(self, rel: bytes, entries: list[bytes]) -> list[bytes]:
        return entries + [ROOT_CONTENTS] if b"/" not in rel else entries

    def first_non_directory_ancestor(self, rel: bytes) -> bytes | None:
        parts = rel.split(b"/")
        for depth in range(1, len(parts)):
            ancestor = b"/".join(parts[:depth])
            if not self.is_real_dir(ancestor):
                return ancestor
        return None

    def is_real_dir(self, rel: bytes) -> bool:
        known = self.is_dir_cache.get(rel)
        if known is None:
            info = self.lstat(rel)
            known = info is not None and stat.S_ISDIR(info.st_mode)
            self.is_dir_cache[rel] = known
        return known

    def lstat(self, rel: bytes):
        try:
            return os.lstat(self.root + b"/" + rel)
        except OSError:
            return None

    def linked_peer(self, rel: bytes, info, listed) -> list[bytes]:
        key = (info.st_dev, info.st_ino)
        self.state.note_hardlink(key, rel)
        for candidate in self.state.hardlink_candidates(key):
            if candidate == rel or candidate in listed:
                continue
            peer = self.lstat(candidate) if self.first_non_directory_ancestor(candidate) is None else None
            if peer is not None and (peer.st_dev, peer.st_ino) == key:
                return [candidate]
            self.state.forget_hardlink(key, candidate)
        # Overlay's whiteouts are links of one in the work dir: that name is never ours to find.
        if not is_whiteout(info):
            self.unresolved.add(rel)
        return []


def is_whiteout(info) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def index_hardlinks(up_local: str, state: SyncState) -> int:
    """Record every name of every multi-link file under up_local, at any depth, never
    following a symlink the member planted (walk_tree)."""
    found = 0
    root_fd = open_dir(up_local)
    try:
        for cursor, entry in walk_tree(root_fd):
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_nlink > 1:
                state.note_hardlink((info.st_dev, info.st_ino), cursor.rel(entry.name))
                found += 1
    finally:
        os.close(root_fd)
    return found


# --- the process --------------------------------------------------------------------------------


class Log:
    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} syncd[{os.getpid()}]: {message}\n"
        with self.lock:
            try:
                if os.path.getsize(self.path) > LOG_ROTATE_BYTES:
                    os.replace(self.path, self.path + ".1")
            except OSError:
                pass
            with open(self.path, "a", encoding="utf-8", errors="replace") as stream:
                stream.write(line)


class ReadySignal:
    """Tells the starter, over an inherited pipe, that the watches are in place (or why not)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def send(self, message: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (message.replace("\n", " ") + "\n").encode("utf-8", errors="replace"))
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="syncd.py", description="keep up_mfs an exact copy of up_local")
    parser.add_argument("--up-local", required=True)
    parser.add_argument("--up-mfs", required=True)
    parser.add_argument("--control-dir", required=True)
    parser.add_argument("--sync-time", type=float, default=DEFAULT_SYNC_TIME_S)
    parser.add_argument("--batch-max-files", type=int, default=DEFAULT_BATCH_MAX_FILES)
    parser.add_argument("--full-pass-hours", type=float, default=DEFAULT_FULL_PASS_HOURS)
    parser.add_argument("--rsync", default="/usr/bin/rsync")
    parser.add_argument("--node", default=None, help="this node's name: stop syncing once the owner record names another")
    parser.add_argument("--ready-fd", type=int, default=None, help="write 'ready PID' or 'error TEXT' here once set up")
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    return parser.parse_args(argv)


def detach() -> None:
    """Double fork: the daemon is no session leader, has no controlling terminal, and is
    nobody's child but init's once the starter exits."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o077)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def take_daemon_lock(control_dir: str):
    """The lock a daemon holds for life and a one-shot full pass for its run; None if taken."""
    lock = open(os.path.join(control_dir, DAEMON_LOCK), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def write_pid_file(control_dir: str) -> None:
    write_atomically(os.path.join(control_dir, PID_FILE), f"{os.getpid()}\n".encode(), 0o644)


def remove_pid_file(control_dir: str) -> None:
    path = os.path.join(control_dir, PID_FILE)
    try:
        with open(path, encoding="ascii") as stream:
            if stream.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def start(settings: argparse.Namespace, log: Log):
    for path, what in ((settings.up_local, "up_local"), (settings.up_mfs, "up_mfs")):
        if not os.path.isdir(path):
            raise SetupError(f"{what} {path} is not a directory")
    lock = take_daemon_lock(settings.control_dir)
    if lock is None:
        raise SetupError("another sync daemon or full pass holds the lock of this control dir")
    write_pid_file(settings.control_dir)
    try:
        write_sender_config(settings.control_dir, settings.up_local)
    except ValueError as error:
        raise SetupError(str(error)) from None
    state = SyncState()
    watcher = make_watcher(settings, state, log)
    # Watches first, full pass second: whatever changes meanwhile is queued by an event.
    watcher.watch_subtree(b"", queue=False)
    if watcher.watching and watcher.root_wd is None:
        raise SetupError(f"cannot watch {settings.up_local}")
    watcher.register_waiting_flushes()
    syncer = Syncer(settings, state, watcher, log)
    return lock, watcher, syncer


class SetupError(Exception):
    pass


def main(argv: list[str]) -> int:
    if argv[:1] == ["--rsh"]:
        return rsh_main(argv[1:])
    settings = parse_args(argv)
    if not os.path.isdir(settings.control_dir):
        os.makedirs(settings.control_dir, exist_ok=True)
        os.chmod(settings.control_dir, 0o700)
    if not settings.foreground:
        detach()
    ready = ReadySignal(settings.ready_fd)
    log = Log(os.path.join(settings.control_dir, LOG_FILE))
    log(f"starting: {settings.up_local} -> {settings.up_mfs}, sync time {settings.sync_time:g} s, "
        f"batches of {settings.batch_max_files}, full pass every {settings.full_pass_hours:g} h")  # fmt: skip
    try:
        lock, watcher, syncer = start(settings, log)
    except (SetupError, OSError) as error:
        log(f"cannot start: {error}")
        ready.send(f"error {error}")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: setattr(syncer, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(syncer, "stopping", True))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    thread = threading.Thread(target=watcher.run, name="watcher", daemon=True)
    thread.start()
    log(f"watching {watcher.watch_count()} directories")
    ready.send(f"ready {os.getpid()}")
    try:
        return syncer.run()
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    except Exception:  # noqa: BLE001 - logged; a restart's full pass recovers
        log("syncer failed:\n" + traceback.format_exc())
        return 1
    finally:
        watcher.stop.set()
        remove_pid_file(settings.control_dir)
        lock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
