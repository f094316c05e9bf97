"""Publishing a new version on the testbed's MooseFS: the merge helper's publish against a copy of
the lower plus rsync of the upper, at two lower sizes, measured in the same run.

    flock /tmp/labvm-testbed.lock .venv/bin/python bench/merge.py \\
        [--lower-files 20000,200000] [--upper-files 2000] [--skip-copy-at-200k]

Targets: at the first lower size (20k files) the merge is at least 5x faster than the copy; at
the second (200k) the merge takes about as long as at 20k, the copy about ten times as long.

MooseFS is mounted here, in the root namespace (mfsmount -H 10.213.0.2, with the options labvm's
nodes use on the testbed), and everything goes into a subdirectory of its own, mounted again with
-S as the mfs_mount the helper is given; trash time 0 there, so what is deleted frees its space at
once. Per lower size, a user dir laid out as labvm's: <mfs_mount>/vms/<user>/low_mfs.v0 holds N
files of 1 KiB (1000 written once with rsync, the rest made from them with mfsmakesnapshot, which
copies no data) and up_mfs an upper written directly on MooseFS: new files, files that replace
lower ones, whiteouts (0/0 character devices) and a few opaque directories.

The merge is timed as labvm runs it: `python3 labvm_helper.py merge` with a publish request on
stdin, from a bundle dir holding the node helpers and labvm_merge compiled as labvm ships it, so
the figure includes both mfsmakesnapshot copies, the C engine, mfsdirinfo and the rename. The copy
is `cp -a low_mfs.v0 copy.v1` then `rsync -aHAX --numeric-ids up_mfs/ copy.v1/`, on MooseFS too.
At 200k files the cp -a takes about 15 minutes: --skip-copy-at-200k copies a 10% sample of the
lower instead and prints the copy's time estimated from it, marked as an estimate.

Needs root and the testbed (brought up when it is down). Everything made is deleted and both
mounts unmounted at the end, also on failure. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labvm.remote.helpers import ENTRY, NATIVE_TOOLS, native_tool  # noqa: E402 - needs the path above

TESTBED = REPO / "scripts" / "testbed"
HELPERS = REPO / "scripts" / "node_helpers"
MFS_MASTER = "10.213.0.2"
MFS_PORT = 9421
# As the testbed's labvm config mounts it on nodes (mount_options), plus what the mfs helper adds.
MFS_OPTIONS = "mfscachemode=DIRECT,suid,dev"
FILE_BYTES = 1024
SEED_DIRS = 10  # the 1000 files written once: s0..s9, 100 files each
SEED_FILES_PER_DIR = 100
FILES_PER_COPY = SEED_DIRS * SEED_FILES_PER_DIR
OPAQUE_DIR = f"s{SEED_DIRS - 1}"  # the subdir an opaque dir of the upper replaces
OPAQUE_DIRS = 4
NEW_DIRS = 10
MERGE_TARGET = 5.0
SAMPLE_FRACTION = 0.1
LONG_S = 4 * 3600


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lower-files", default="20000,200000",
                        help="files in the lower, one run per size, multiples of 1000 (default 20000,200000)")  # fmt: skip
    parser.add_argument("--upper-files", type=int, default=2000, help="entries in the upper (default 2000)")
    parser.add_argument("--skip-copy-at-200k", action="store_true",
                        help="at every lower size but the first, estimate the copy from a 10%% sample of the lower "
                             "instead of copying all of it")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(value) for value in args.lower_files.split(",")]
    except ValueError:
        parser.error("--lower-files: comma-separated numbers of files")
    if not args.sizes or any(size < FILES_PER_COPY or size % FILES_PER_COPY for size in args.sizes):
        parser.error(f"--lower-files: each size a multiple of {FILES_PER_COPY}")
    capacity = min(args.sizes) // FILES_PER_COPY * (SEED_DIRS - 1) * SEED_FILES_PER_DIR
    if args.upper_files < 20 or upper_plan(args.upper_files)["replaced"] > capacity:
        parser.error(f"--upper-files: at least 20, and at most {capacity} of them may replace or delete lower files")
    return args


# --- small tools --------------------------------------------------------------------------


def timed(what: str, action):
    started = time.monotonic()
    result = action()
    seconds = time.monotonic() - started
    print(f"  {what}: {seconds:.2f} s", flush=True)
    return seconds, result


def command(argv: list[str], timeout: float = 600) -> None:
    result = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{(result.stderr or result.stdout)[-2000:]}")


def mount_of(path: Path) -> tuple[str, str, str] | None:
    """(mount point, fstype, source) of the mount at exactly path, or None."""
    resolved = str(path.resolve())
    found = None
    with open("/proc/self/mountinfo") as stream:
        for line in stream:
            fields = line.split()
            separator = fields.index("-")
            if unescape(fields[4]) == resolved:
                found = (resolved, fields[separator + 1], unescape(fields[separator + 2]))
    return found


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline, backslash and '#' as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def is_moosefs_mount(path: Path) -> bool:
    entry = mount_of(path)
    return entry is not None and entry[1].startswith("fuse") and entry[2].startswith("mfs#")


# --- the testbed and MooseFS --------------------------------------------------------------


def ensure_testbed() -> None:
    status = subprocess.run([sys.executable, str(TESTBED), "status"], capture_output=True, text=True, timeout=120)
    if status.returncode == 0:
        print("testbed: up")
        return
    print("testbed: down, bringing it up", flush=True)
    command([sys.executable, TESTBED, "up"], timeout=1800)


def mfsmount(mountpoint: Path, subdir: str) -> None:
    argv = ["mfsmount", mountpoint, "-H", MFS_MASTER, "-P", str(MFS_PORT), "-S", subdir, "-o", MFS_OPTIONS]
    command(argv, timeout=90)
    if not is_moosefs_mount(mountpoint):
        raise SystemExit(f"mfsmount reported success but no MooseFS is mounted at {mountpoint}")


def unmount(mountpoint: Path) -> None:
    if mount_of(mountpoint) is None:
        return
    if subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=120).returncode != 0:
        print(f"  umount {mountpoint} failed; detaching it lazily", file=sys.stderr)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=120)


def remove_tree(path: Path) -> None:
    """mfsrmsnapshot -f deletes a tree in the master in one call; what it leaves (entries renamed
    into or out of a snapshot), shutil deletes."""
    if not os.path.lexists(path):
        return
    subprocess.run(["mfsrmsnapshot", "-f", str(path)], capture_output=True, timeout=LONG_S)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        print(f"  could not delete all of {path}", file=sys.stderr)


def snapshot(source: Path, destination: Path) -> None:
    command(["mfsmakesnapshot", source, destination])


# --- the trees ----------------------------------------------------------------------------


def write_file(path: Path, tag: str, block: bytes) -> None:
    label = tag.encode()[:FILE_BYTES]
    path.write_bytes(label + block[len(label) :])


def write_seed(seed: Path, block: bytes) -> None:
    for number in range(SEED_DIRS):
        directory = seed / f"s{number}"
        directory.mkdir(parents=True)
        for index in range(SEED_FILES_PER_DIR):
            write_file(directory / f"f{index:03d}", f"lower s{number}/f{index:03d}\n", block)


def populate_lower(seed: Path, lower: Path, files: int) -> None:
    """lower/p000 .. p<N/1000 - 1>, each a copy of the 1000-file seed: rsync once, then snapshots."""
    lower.mkdir()
    command(["rsync", "-aHAX", "--numeric-ids", f"{seed}/", f"{lower / 'p000'}/"], timeout=LONG_S)
    for number in range(1, files // FILES_PER_COPY):
        snapshot(lower / "p000", lower / f"p{number:03d}")


def upper_plan(entries: int) -> dict[str, int]:
    """How the upper's entries divide: 35% files replacing lower files, 10% whiteouts, 5% files
    in opaque dirs, the rest new files (half in lower dirs, half in new dirs)."""
    opaque_files = max(OPAQUE_DIRS, entries * 5 // 100)
    whiteouts = entries // 10
    modified = entries * 35 // 100
    new = entries - opaque_files - whiteouts - modified
    return {"modified": modified, "whiteouts": whiteouts, "opaque_files": opaque_files, "new": new,
            "replaced": modified + whiteouts}  # fmt: skip


def lower_file(index: int, dirs: int) -> str:
    """The index-th lower file an upper change hits: spread over every pNNN of the smallest lower
    (so every size gets the same upper), never in the subdir an opaque dir replaces."""
    per_round = dirs * (SEED_DIRS - 1)
    return f"p{index % dirs:03d}/s{(index // dirs) % (SEED_DIRS - 1)}/f{index // per_round:03d}"


def populate_upper(upper: Path, entries: int, dirs: int, block: bytes) -> None:
    plan = upper_plan(entries)
    upper.mkdir()

    def file_at(relative: str, tag: str) -> None:
        path = upper / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, tag, block)

    for index in range(plan["modified"]):
        relative = lower_file(index, dirs)
        file_at(relative, f"upper {relative}\n")
    for index in range(plan["modified"], plan["replaced"]):
        path = upper / lower_file(index, dirs)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    opaque_dirs = min(OPAQUE_DIRS, dirs)
    for number in range(opaque_dirs):
        directory = upper / f"p{number:03d}" / OPAQUE_DIR
        directory.mkdir(parents=True)
        os.setxattr(directory, "trusted.overlay.opaque", b"y")
    for index in range(plan["opaque_files"]):
        file_at(f"p{index % opaque_dirs:03d}/{OPAQUE_DIR}/o{index:04d}", f"opaque {index}\n")
    in_lower_dirs = plan["new"] // 2
    for index in range(in_lower_dirs):
        file_at(f"p{index % dirs:03d}/s{(index // dirs) % (SEED_DIRS - 1)}/n{index:04d}", f"new {index}\n")
    for index in range(plan["new"] - in_lower_dirs):
        file_at(f"p{index % dirs:03d}/new{index % NEW_DIRS}/g{index:04d}", f"new dir {index}\n")


def expected_files(lower_files: int, entries: int, dirs: int) -> int:
    """Regular files in the published version: whiteouts stay as character devices (no image to
    check them against), the opaque dirs drop the lower's files under them."""
    plan = upper_plan(entries)
    dropped = plan["whiteouts"] + min(OPAQUE_DIRS, dirs) * SEED_FILES_PER_DIR
    return lower_files + plan["new"] + plan["opaque_files"] - dropped


# --- the two ways to publish --------------------------------------------------------------


def make_bundle(bundle: Path) -> None:
    """The node helpers as labvm ships them: the .py files and the compiled native tools, flat."""
    bundle.mkdir()
    for source in sorted(HELPERS.glob("*.py")):
        if source.name != "__init__.py":
            shutil.copyfile(source, bundle / source.name)
    for name in NATIVE_TOOLS:
        (bundle / name).write_bytes(native_tool(name))
        (bundle / name).chmod(0o755)


def publish(bundle: Path, user: str, mfs_mount: Path) -> dict:
    params = {"user": user, "mfs_mount": str(mfs_mount), "base": 0, "target": 1, "reason": "backup"}
    request = json.dumps({"action": "publish", "params": params, "check": False}).encode()
    python3 = shutil.which("python3") or "/usr/bin/python3"
    process = subprocess.run([python3, str(bundle / ENTRY), "merge"], input=request, capture_output=True, timeout=LONG_S)
    try:
        reply = json.loads(process.stdout)
    except ValueError:
        raise SystemExit(
            f"merge publish printed no reply (exit {process.returncode}):\n{process.stderr.decode()[-2000:]}"
        ) from None
    if not reply.get("ok"):
        raise SystemExit(f"merge publish failed: {reply.get('error')}\n{process.stderr.decode()[-2000:]}")
    return reply["data"]


def copy_version(lower: Path, upper: Path, copy: Path, sample_dirs: int | None) -> tuple[float, float]:
    """(cp seconds, rsync seconds). With sample_dirs, cp copies only the lower's first dirs."""
    if sample_dirs is None:
        cp_s, _ = timed("cp -a of the lower", lambda: command(["cp", "-a", lower, copy], timeout=LONG_S))
    else:
        copy.mkdir()
        sources = [lower / f"p{number:03d}" for number in range(sample_dirs)]
        what = f"cp -a of a {sample_dirs * FILES_PER_COPY}-file sample of the lower"
        cp_s, _ = timed(what, lambda: command(["cp", "-a", *sources, copy], timeout=LONG_S))
    argv = ["rsync", "-aHAX", "--numeric-ids", f"{upper}/", f"{copy}/"]
    rsync_s, _ = timed("rsync -aHAX of the upper into it", lambda: command(argv, timeout=LONG_S))
    return cp_s, rsync_s


def run_size(args, files: int, mfs_mount: Path, bundle: Path, seed: Path, block: bytes, estimate: bool) -> dict:
    user = f"bench-{files}"
    user_dir = mfs_mount / "vms" / user
    lower, upper, copy = user_dir / "low_mfs.v0", user_dir / "up_mfs", user_dir / "copy.v1"
    dirs = min(args.sizes) // FILES_PER_COPY
    print(f"\nlower of {files} files, upper of {args.upper_files} entries ({user_dir})", flush=True)
    user_dir.mkdir(parents=True)
    try:
        timed(f"populate the lower (rsync {FILES_PER_COPY} files + {files // FILES_PER_COPY - 1} mfsmakesnapshot)",
              lambda: populate_lower(seed, lower, files))  # fmt: skip
        timed("write the upper on MooseFS", lambda: populate_upper(upper, args.upper_files, dirs, block))
        merge_s, published = timed("merge: publish through the helper", lambda: publish(bundle, user, mfs_mount))
        print(f"    helper's own figure {published['seconds']:.2f} s, {published['files']} files in v1 "
              f"(expected {expected_files(files, args.upper_files, dirs)}), copied with {published['copied_with']}")  # fmt: skip
        print(f"    engine: {json.dumps(published['stats'], sort_keys=True)}")
        if published["files"] != expected_files(files, args.upper_files, dirs):
            print("    NOTE: v1 does not hold the expected number of files", flush=True)
        sample_dirs = max(1, math.ceil(files // FILES_PER_COPY * SAMPLE_FRACTION)) if estimate else None
        cp_s, rsync_s = copy_version(lower, upper, copy, sample_dirs)
        scale = 1.0 if sample_dirs is None else files / (sample_dirs * FILES_PER_COPY)
        copy_s = cp_s * scale + rsync_s
        if estimate:
            print(f"  copy, ESTIMATED: {cp_s:.2f} s x {scale:g} + {rsync_s:.2f} s = {copy_s:.2f} s", flush=True)
    finally:
        timed("clean up", lambda: remove_tree(user_dir))
    return {"merge": merge_s, "copy": copy_s, "estimated": estimate, "helper": published["seconds"]}


# --- the run ------------------------------------------------------------------------------


def terminate(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def main(argv) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/merge.py: run as root (mfsmount, and the merge helper runs as root on nodes)")
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, terminate)
    ensure_testbed()
    work = Path(tempfile.mkdtemp(prefix="labvm-bench-merge-"))
    root_mount, mfs_mount = work / "mfs-root", work / "mfs"
    subdir = f"/labvm-bench-merge-{os.getpid()}-{secrets.token_hex(3)}"
    results = {}
    made_subdir = False
    try:
        bundle = work / "bundle"
        timed("helper bundle (node helpers + labvm_merge compiled)", lambda: make_bundle(bundle))
        seed = work / "seed"
        block = os.urandom(FILE_BYTES)
        write_seed(seed, block)
        root_mount.mkdir()
        mfs_mount.mkdir()
        mfsmount(root_mount, "/")
        (root_mount / subdir.lstrip("/")).mkdir()
        made_subdir = True
        command(["mfssettrashtime", "-r", "0", root_mount / subdir.lstrip("/")])
        mfsmount(mfs_mount, subdir)
        print(f"MooseFS {MFS_MASTER}:{MFS_PORT}{subdir} mounted at {mfs_mount} (-o {MFS_OPTIONS}), trash time 0")
        plan = upper_plan(args.upper_files)
        print(f"upper: {plan['modified']} files replacing lower files, {plan['whiteouts']} whiteouts, "
              f"{plan['opaque_files']} files in {OPAQUE_DIRS} opaque dirs, {plan['new']} new files; "
              f"files of {FILE_BYTES} B", flush=True)  # fmt: skip
        for position, files in enumerate(args.sizes):
            estimate = args.skip_copy_at_200k and position > 0
            results[files] = run_size(args, files, mfs_mount, bundle, seed, block, estimate)
    finally:
        unmount(mfs_mount)
        if made_subdir and mount_of(root_mount) is not None:
            remove_tree(root_mount / subdir.lstrip("/"))
        unmount(root_mount)
        if mount_of(root_mount) is None and mount_of(mfs_mount) is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"left {work}: a mount is still there", file=sys.stderr)
    report(args, results)
    return 0


def report(args, results: dict) -> None:
    print()
    if args.skip_copy_at_200k and len(args.sizes) > 1:
        print("--skip-copy-at-200k: the copy was not run in full beyond the first size; "
              "its time there is ESTIMATED from a 10% sample (marked *)")  # fmt: skip
    for files, result in results.items():
        mark = " *estimate" if result["estimated"] else ""
        print(f"lower {files:>7} files:  merge {result['merge']:8.2f} s (helper {result['helper']:.2f} s)   "
              f"copy {result['copy']:8.2f} s{mark}")  # fmt: skip
    first = results[args.sizes[0]]
    ratio = first["copy"] / first["merge"]
    verdict = "met" if ratio >= MERGE_TARGET else "MISSED"
    print(f"ratio at {args.sizes[0]}: copy / merge = {ratio:.1f}x (target >= {MERGE_TARGET:g}x: {verdict})")
    for files in args.sizes[1:]:
        result = results[files]
        mark = " (copy estimated)" if result["estimated"] else ""
        print(f"{files} / {args.sizes[0]}: merge {result['merge'] / first['merge']:.2f}x, "
              f"copy {result['copy'] / first['copy']:.2f}x{mark}; copy / merge at {files} = "
              f"{result['copy'] / result['merge']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
