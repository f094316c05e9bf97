#!/usr/bin/env python3
"""How `labvm status` scales with the number of nodes: 4 testbed nodes against 1.

Every node is sampled at once, so status over four nodes should take about as long as over
one (target: ratio <= 1.5). Brings the testbed up with 4 nodes, makes two admin homes over it
(one listing n1 only, one listing n1-n4), times `labvm status --json` several runs each, prints
the medians and the ratio, and brings the testbed back to its default size. Run as root, holding
the testbed lock that other users of the testbed take too:

    flock /tmp/labvm-testbed.lock .venv/bin/python bench/status.py [--runs 7]

Exits 1 when the ratio misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labvm.admin import AdminHome  # noqa: E402 - needs the path above
from labvm.config import parse_config, remove_node_from_file  # noqa: E402
from labvm.remote.connection import NodeConnection  # noqa: E402
from labvm.remote.pool import run_on_nodes  # noqa: E402

TESTBED = REPO / "scripts" / "testbed"
LABVM = REPO / ".venv" / "bin" / "labvm"
TESTBED_DIR = Path(os.environ.get("LABVM_TESTBED_DIR", "/var/lib/labvm-testbed"))
ADMIN_FILES = ("bkConfxml.xml", "known_hosts", "id_ed25519", "id_ed25519.pub")
TARGET_RATIO = 1.5


def testbed(*args: str) -> None:
    result = subprocess.run([sys.executable, str(TESTBED), *args], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        sys.exit(f"scripts/testbed {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def admin_home(target: Path, keep_nodes: int) -> dict:
    """An admin home over the testbed listing its first keep_nodes nodes; returns its environment."""
    target.mkdir(mode=0o700, parents=True)
    for name in ADMIN_FILES:
        shutil.copy2(TESTBED_DIR / "admin" / name, target / name)
    config = target / "bkConfxml.xml"
    for name in parse_config(config).node_names()[keep_nodes:]:
        remove_node_from_file(config, name)
    env = {**os.environ, "LABVM_CONFIG": str(config)}
    subprocess.run([str(LABVM), "init"], env=env, check=True, capture_output=True, timeout=60)
    return env


def timed_status(env: dict) -> tuple[float, dict]:
    started = time.monotonic()
    result = subprocess.run([str(LABVM), "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"labvm status failed ({result.returncode}): {result.stderr}")
    return elapsed, json.loads(result.stdout)


def measure(envs: dict[str, dict], runs: int) -> dict[str, list[float]]:
    times = {label: [] for label in envs}
    for label, env in envs.items():
        _, document = timed_status(env)  # the first call installs the helper bundle on each node
        print(f"{label}: nodes {', '.join(n['name'] for n in document['nodes'])}")
    for _ in range(runs):
        for label, env in envs.items():  # interleaved, so a busy moment of the machine hits both
            elapsed, document = timed_status(env)
            slowest = max(n["seconds"] for n in document["nodes"])
            times[label].append(elapsed)
            print(f"  {label}: {elapsed:.2f} s (slowest node {slowest:.2f} s)")
    return times


def ssh_baseline(env: dict, runs: int) -> float:
    """Median time to connect to every node at once and run `true` there: what the nodes' SSH
    costs without labvm's helper, to read the ratio against."""
    home = AdminHome(Path(env["LABVM_CONFIG"]))

    def connect_and_run(node):
        with NodeConnection(node, home.home) as conn:
            conn.run(["true"])

    times = []
    for _ in range(runs):
        started = time.monotonic()
        outcomes = run_on_nodes(home.config.nodes, connect_and_run, timeout=60)
        if not all(o.ok for o in outcomes):
            sys.exit(f"SSH baseline failed: {[o.error for o in outcomes if not o.ok]}")
        times.append(time.monotonic() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per admin home (default 7)")
    parser.add_argument("--keep-nodes", action="store_true", help="leave the testbed at 4 nodes afterwards")
    args = parser.parse_args()
    testbed("up", "--nodes", "4")
    try:
        with tempfile.TemporaryDirectory(prefix="labvm-bench-status-") as tmp:
            envs = {"1 node": admin_home(Path(tmp) / "one", 1), "4 nodes": admin_home(Path(tmp) / "four", 4)}
            times = measure(envs, args.runs)
            baseline = {label: ssh_baseline(env, args.runs) for label, env in envs.items()}
    finally:
        if not args.keep_nodes:
            testbed("up")
    one, four = statistics.median(times["1 node"]), statistics.median(times["4 nodes"])
    ratio = four / one
    print(f"SSH alone (connect and run `true`, every node at once): 1 node {baseline['1 node']:.2f} s, "
          f"4 nodes {baseline['4 nodes']:.2f} s, ratio {baseline['4 nodes'] / baseline['1 node']:.2f}")
    print(f"median over {args.runs} runs: 1 node {one:.2f} s, 4 nodes {four:.2f} s, ratio {ratio:.2f} (target <= {TARGET_RATIO})")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
