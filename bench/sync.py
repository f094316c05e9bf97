"""100 changed files in a 100k-file upper made durable: the sync daemon's flush against a full
rsync rescan of the same tree, measured in the same run.

    .venv/bin/python bench/sync.py [--dest-root DIR] [--files 100000] [--changed 100]

The upper is a plain directory on local disk holding 100 identical subdirectories (one made
with files, the other 99 copied from it with `cp -a`, so sizes and mtimes match). up_mfs lives
under --dest-root (default: a temp dir on local disk); when that is MooseFS (mfsmount) the first
subdirectory is rsynced there and the others made with `mfsmakesnapshot`, which copies no data.

Then, through the sync helper as labvm calls it: start the daemon, wait for its first full pass,
write --changed files into the upper and time the flush. Stop the daemon, change the same files
again and time `rsync -aHAX --numeric-ids --delete up_local/ up_mfs/`. Needs root (the helper
runs as root on nodes). Not a test: pytest does not collect it.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "scripts" / "node_helpers" / "labvm_helper.py"
USER = "bench"
SUBDIRS = 100
FILE_BYTES = 1024


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest-root", type=Path, help="where <root>/vms/bench/up_mfs is made (default: a temp dir)")
    parser.add_argument("--files", type=int, default=100_000, help="files in the upper (default 100000)")
    parser.add_argument("--changed", type=int, default=100, help="files changed before the flush (default 100)")
    parser.add_argument("--keep", action="store_true", help="leave the trees in place afterwards")
    args = parser.parse_args(argv)
    if args.files < SUBDIRS or args.changed < 1 or args.changed > args.files:
        parser.error(f"--files must be at least {SUBDIRS}, --changed between 1 and --files")
    return args


def helper(action: str, params: dict) -> dict:
    request = json.dumps({"action": action, "params": params}).encode()
    process = subprocess.run([sys.executable, "-I", str(HELPER), "sync"], input=request, capture_output=True, timeout=7200)
    reply = json.loads(process.stdout)
    if not reply["ok"]:
        raise SystemExit(f"sync {action} failed: {reply['error']['msg']}\n{process.stderr.decode()[-2000:]}")
    return reply["data"]


def mount_of(path: Path) -> tuple[str, str]:
    """(fstype, source) of the mount holding path: the longest mount point above it."""
    best, found = "", ("", "")
    resolved = str(path.resolve())
    with open("/proc/self/mountinfo") as stream:
        for line in stream:
            fields = line.split()
            point = fields[4]
            separator = fields.index("-")
            if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, found = point, (fields[separator + 1], unescape(fields[separator + 2]))
    return found


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline, backslash and '#' as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def is_moosefs(path: Path) -> bool:
    # mfsmount shows up as "fuse" or "fuse.mfs", with the source "mfs#MASTER:PORT".
    fstype, source = mount_of(path)
    return fstype.startswith("fuse") and source.startswith("mfs#")


def timed(what: str, action):
    started = time.monotonic()
    result = action()
    seconds = time.monotonic() - started
    print(f"  {what}: {seconds:.2f} s", flush=True)
    return seconds, result


def populate_upper(up_local: Path, files: int) -> None:
    per_dir = files // SUBDIRS
    first = up_local / "d000"
    first.mkdir()
    block = os.urandom(FILE_BYTES)
    for index in range(per_dir):
        (first / f"f{index:05d}").write_bytes(block)
    for number in range(1, SUBDIRS):
        subprocess.run(["cp", "-a", str(first), str(up_local / f"d{number:03d}")], check=True)


def populate_destination(up_local: Path, up_mfs: Path, on_moosefs: bool) -> None:
    if not on_moosefs:
        subprocess.run(["cp", "-a", f"{up_local}/.", str(up_mfs)], check=True)
        return
    rsync(["-aHAX", "--numeric-ids", f"{up_local}/d000/", f"{up_mfs}/d000/"])
    snapshot = shutil.which("mfsmakesnapshot") or "/usr/bin/mfsmakesnapshot"
    for number in range(1, SUBDIRS):
        subprocess.run([snapshot, str(up_mfs / "d000"), str(up_mfs / f"d{number:03d}")], check=True, capture_output=True)
    # The directories' own attributes (mtimes) as the upper has them.
    rsync(["-aHAX", "--numeric-ids", "-d", f"{up_local}/", f"{up_mfs}/"])


def rsync(args: list[str]) -> None:
    subprocess.run(["rsync", *args], check=True)


def changed_paths(up_local: Path, files: int, changed: int) -> list[Path]:
    per_dir = files // SUBDIRS
    return [up_local / f"d{index % SUBDIRS:03d}" / f"f{(index // SUBDIRS) % per_dir:05d}" for index in range(changed)]


def change(paths: list[Path], tag: str) -> None:
    for path in paths:
        path.write_bytes(tag.encode() + os.urandom(FILE_BYTES - len(tag)))


def main(argv) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/sync.py: run as root (the sync helper runs as root on nodes)")
    work = Path(tempfile.mkdtemp(prefix="labvm-bench-sync-"))
    dest_root = args.dest_root or work / "dest"
    data_dir = work / "data"
    up_local = data_dir / "vms" / USER / "up_local"
    user_dir = dest_root / "vms" / USER
    up_mfs = user_dir / "up_mfs"
    if up_mfs.exists():
        raise SystemExit(f"{up_mfs} exists already; remove it or choose another --dest-root")
    on_moosefs = is_moosefs(dest_root)
    params = {"user": USER, "data_dir": str(data_dir)}
    print(f"upper: {up_local} (local disk), up_mfs: {up_mfs} ({'MooseFS' if on_moosefs else mount_of(dest_root)[0]})")
    print(f"{args.files} files of {FILE_BYTES} B in {SUBDIRS} dirs, {args.changed} changed", flush=True)
    try:
        up_mfs.mkdir(parents=True)
        up_local.mkdir(parents=True)
        up_local.parent.chmod(0o700)
        timed("populate the upper", lambda: populate_upper(up_local, args.files))
        timed("populate up_mfs" + (" (rsync one dir + mfsmakesnapshot)" if on_moosefs else " (cp -a)"),
              lambda: populate_destination(up_local, up_mfs, on_moosefs))  # fmt: skip
        helper("ensure_running", {**params, "mfs_mount": str(dest_root)})
        timed("daemon start + first full pass", lambda: helper("flush", {**params, "timeout_s": 7200}))

        paths = changed_paths(up_local, args.files, args.changed)
        write_s, _ = timed(f"write {args.changed} files", lambda: change(paths, "daemon"))
        flush_s, flushed = timed("flush (daemon)", lambda: helper("flush", {**params, "timeout_s": 3600}))
        status = helper("status", params)
        helper("ensure_stopped", params)

        change(paths, "rescan")
        argv = ["-aHAX", "--numeric-ids", "--delete", f"{up_local}/", f"{up_mfs}/"]
        rescan_s, _ = timed("rsync rescan of the whole tree", lambda: rsync(argv))
    finally:
        stop_quietly(params)
        if not args.keep:
            timed("clean up", lambda: (shutil.rmtree(user_dir, ignore_errors=True), shutil.rmtree(work, ignore_errors=True)))

    barrier_s = flushed["seconds"]
    print()
    print(f"flush, request to ack:     {barrier_s:8.3f} s  ({flushed['files']} items synced, {status['full_passes']} full pass)")
    print(f"flush, whole helper call:  {flush_s:8.3f} s  (adds the helper process's start, as labvm pays per call)")
    print(f"  + the writes:            {write_s + flush_s:8.3f} s")
    print(f"rsync rescan:              {rescan_s:8.3f} s")
    print(
        f"ratio: {rescan_s / barrier_s:.1f}x (rescan / flush), {rescan_s / (write_s + flush_s):.1f}x (rescan / writes + helper call)"
    )
    return 0


def stop_quietly(params: dict) -> None:
    request = json.dumps({"action": "ensure_stopped", "params": {**params, "flush": False}}).encode()
    subprocess.run([sys.executable, "-I", str(HELPER), "sync"], input=request, capture_output=True, timeout=600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
