#!/usr/bin/env python3
"""Switch downtime on the testbed: set by what changed just before, not by all the data.

A desktop writes 1 GB well before the switch and 10 MB just before it. Measured in one run:

  warm   `labvm switch`: the sync streamed the 1 GB long ago and the pre-copy flush sends the
         10 MB while the desktop still runs, so the downtime holds only the last seconds.
  cold   the same writes with the sync stopped and no pre-copy: all 1 GB + 10 MB travel after
         the desktop stopped (how a copy-at-switch design behaves).
  ref    the time to sync 10 MB (write, `labvm sync flush`) plus one container start.

Target: warm downtime <= 2 x ref, whatever the total data. Run as root, holding the testbed lock:

    flock /tmp/labvm-testbed.lock .venv/bin/python bench/switch.py [--gb 1] [--mb 10]
"""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "scripts" / "testbed"
LABVM = REPO / ".venv" / "bin" / "labvm"
TESTBED_DIR = Path(os.environ.get("LABVM_TESTBED_DIR", "/var/lib/labvm-testbed"))
ADMIN_FILES = ("bkConfxml.xml", "known_hosts", "id_ed25519", "id_ed25519.pub")
TARGET_RATIO = 2.0
USER = "bench"
PASSWORD = "bench-Pw-4471"


def run(argv, env=None, timeout=3600, stdin="") -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def labvm(env, *args, stdin="") -> str:
    return run([str(LABVM), *args], env=env, stdin=stdin).stdout


def write_inside(env, megabytes: int, name: str) -> None:
    labvm(env, "exec", USER, "--", "sh", "-c",
          f"mkdir -p /home/{USER}/data && dd if=/dev/urandom of=/home/{USER}/data/{name} bs=1M count={megabytes} 2>/dev/null && sync")


def where(env) -> str:
    data = json.loads(labvm(env, "status", "--user", USER, "--json"))
    desktops = data["desktops"] if isinstance(data, dict) else data
    return desktops[0]["node"]


def stop_sync(node: str) -> None:
    """Kill the desktop's sync on its node: nothing written from now on reaches MooseFS before the switch."""
    run([sys.executable, str(TESTBED), "exec", node, "--", "pkill", "-KILL", "-f", f"syncd.py.*/vms/{USER}/disk/up_local( |$)"])


def where_mfs_is() -> str:
    return "n1"  # every node mounts the same MooseFS; n1 mounted it last when the desktop left it


def downtime(output: str) -> float:
    match = re.search(r"downtime: ([0-9.]+) s", output)
    if not match:
        sys.exit(f"no downtime in the switch's output:\n{output}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="data written well before the switch (default 1)")
    parser.add_argument("--mb", type=int, default=10, help="data written just before the switch (default 10)")
    args = parser.parse_args()
    # From a clean slate, as the cluster tests start: desktops other admin homes left running
    # would hold ports and GPUs this fresh admin home knows nothing of.
    run([sys.executable, str(TESTBED), "down"], timeout=900)
    run([sys.executable, str(TESTBED), "up"], timeout=900)
    home = Path(tempfile.mkdtemp(prefix="labvm-bench-switch-"))
    try:
        admin = home / "admin"
        admin.mkdir(mode=0o700)
        for name in ADMIN_FILES:
            shutil.copy2(TESTBED_DIR / "admin" / name, admin / name)
        env = {**os.environ, "LABVM_CONFIG": str(admin / "bkConfxml.xml"), "COLUMNS": "200"}
        labvm(env, "init")
        labvm(env, "image", "build", "--desktop", "minimal")
        labvm(env, "image", "push")
        labvm(env, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        labvm(env, "create", USER, "--node", "n1", "--memory", "1g")
        big = int(args.gb * 1024)

        # ref: sync 10 MB, and one container start.
        write_inside(env, args.mb, "ref")
        t0 = time.monotonic()
        labvm(env, "sync", "flush", USER)
        t_sync = time.monotonic() - t0
        labvm(env, "stop", USER)
        t0 = time.monotonic()
        labvm(env, "start", USER)
        t_start = time.monotonic() - t0
        ref = t_sync + t_start

        # warm: 1 GB long before (the sync sends it), 10 MB just before.
        write_inside(env, big, "big-warm")
        labvm(env, "sync", "flush", USER)
        write_inside(env, args.mb, "small-warm")
        warm = downtime(labvm(env, "switch", USER, "n2"))

        # cold: the same, with the sync stopped and no pre-copy: everything travels in the downtime.
        stop_sync(where(env))
        write_inside(env, big, "big-cold")
        write_inside(env, args.mb, "small-cold")
        cold = downtime(labvm(env, "switch", USER, "n1", "--no-precopy"))

        print(f"ref  (sync {args.mb} MB {t_sync:.2f} s + container start {t_start:.2f} s): {ref:.2f} s")
        print(f"warm switch downtime ({args.gb:g} GB long before, {args.mb} MB just before): {warm:.2f} s")
        print(f"cold switch downtime (same data, sync stopped, no pre-copy): {cold:.2f} s")
        print(f"warm / ref = {warm / ref:.2f} (target <= {TARGET_RATIO:g});  cold / warm = {cold / warm:.1f}x")
        labvm(env, "rm", USER, "--yes")
        run([sys.executable, str(TESTBED), "exec", where_mfs_is(), "--", "rm", "-rf", f"/mnt/labvm-mfs/vms/{USER}"])
        return 0 if warm <= TARGET_RATIO * ref else 1
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
