#!/usr/bin/env python3
"""Desktop start on the testbed: `labvm start` against a plain `docker start` on the same node.

Measured in one run, each the median of --runs:

  labvm   `labvm start USER` of a stopped desktop, until the command returns (it returns once
          VNC answers with its RFB greeting): SSH, the disk and overlay mounts, the sync daemon,
          the network rules and the runtime check, the container with the desktop's overlay as
          its root through the labvm runtime, the account and password, the VNC server.
  plain   `docker start` on the same node of a container made from the same desktop image
          (imported into docker once, untimed) that runs only Xvnc, until its port answers
          with an RFB greeting: the floor of any design that starts a VNC desktop in docker.
  ssh     the same plain `docker start`, sent from this host over SSH (OpenSSH, the testbed's
          pinned admin key): what any tool that drives nodes over SSH pays at least (reported).
  create  `labvm create` of a new desktop until VNC answers (reported, no target).

Target: labvm / plain <= 2. Run as root, holding the testbed lock:

    flock /tmp/labvm-testbed.lock .venv/bin/python bench/start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
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
USERS = ("benchs", "benchc")
PASSWORD = "bench-Pw-5120"
NODE, NODE_IP = "n1", "10.213.0.11"
PLAIN_IMAGE, PLAIN_NAME, PLAIN_PORT = "labvm-bench/plain:1", "labvm-bench-plain", 29901
IMAGES = "/var/lib/labvm/images"  # one tree per image id on the node


def run(argv, env=None, timeout=3600, stdin="", check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def labvm(env, *args, stdin="") -> str:
    return run([str(LABVM), *args], env=env, stdin=stdin).stdout


def on_node(*argv, check=True) -> subprocess.CompletedProcess:
    return run([sys.executable, str(TESTBED), "exec", NODE, "--", *argv], check=check)


def rfb_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.settimeout(1)
            return sock.recv(12).startswith(b"RFB ")
    except OSError:
        return False


def timed(work) -> float:
    started = time.monotonic()
    work()
    return time.monotonic() - started


def plain_start(over_ssh: bool = False) -> float:
    """docker start of the plain container, until VNC answers."""
    on_node("docker", "stop", "-t", "2", PLAIN_NAME)
    started = time.monotonic()
    if over_ssh:
        run(["ssh", "-F", str(TESTBED_DIR / "admin" / "ssh_config"), "-o", "BatchMode=yes", NODE, "docker", "start", PLAIN_NAME])
    else:
        on_node("docker", "start", PLAIN_NAME)
    deadline = started + 60
    while not rfb_answers(NODE_IP, PLAIN_PORT):
        if time.monotonic() > deadline:
            sys.exit("the plain container's VNC did not answer within 60 s")
        time.sleep(0.02)
    return time.monotonic() - started


def make_plain_container(image: str) -> None:
    on_node("docker", "rm", "-f", PLAIN_NAME, check=False)
    on_node("sh", "-c", f"tar -C {IMAGES}/{image} -c . | docker import - {PLAIN_IMAGE}")
    on_node("docker", "create", "--name", PLAIN_NAME, "-p", f"{NODE_IP}:{PLAIN_PORT}:5901", "--memory", "1g",
            PLAIN_IMAGE, "Xtigervnc", ":1", "-rfbport", "5901", "-SecurityTypes", "None", "-geometry", "1280x800")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts of each kind (default 5); the median counts")
    args = parser.parse_args()
    run([sys.executable, str(TESTBED), "down"], timeout=900)
    run([sys.executable, str(TESTBED), "up"], timeout=900)
    home = Path(tempfile.mkdtemp(prefix="labvm-bench-start-"))
    try:
        admin = home / "admin"
        admin.mkdir(mode=0o700)
        for name in ADMIN_FILES:
            shutil.copy2(TESTBED_DIR / "admin" / name, admin / name)
        env = {**os.environ, "LABVM_CONFIG": str(admin / "bkConfxml.xml"), "COLUMNS": "200"}
        labvm(env, "init")
        image = json.loads(labvm(env, "image", "build", "--desktop", "minimal", "--json"))["sha256"]
        labvm(env, "image", "push", image)
        labvm(env, "node", "check", NODE)  # mounts MooseFS there, for the wipe below
        for user in USERS:
            labvm(env, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
            on_node("rm", "-rf", f"/mnt/labvm-mfs/vms/{user}", f"/var/lib/labvm/data/vms/{user}", check=False)
        user, fresh = USERS
        labvm(env, "create", user, "--node", NODE, "--memory", "1g")
        make_plain_container(image)

        create_s = timed(lambda: labvm(env, "create", fresh, "--node", NODE, "--memory", "1g"))
        labvm_s, plain_s, ssh_s = [], [], []
        for _ in range(args.runs):  # interleaved, so all see the same machine
            labvm(env, "stop", user)
            labvm_s.append(timed(lambda: labvm(env, "start", user)))
            plain_s.append(plain_start())
            ssh_s.append(plain_start(over_ssh=True))
        labvm_m, plain_m, ssh_m = statistics.median(labvm_s), statistics.median(plain_s), statistics.median(ssh_s)
        print(f"plain docker start + Xvnc answering: median {plain_m:.2f} s  ({', '.join(f'{t:.2f}' for t in plain_s)})")
        print(f"the same, sent over ssh:             median {ssh_m:.2f} s  ({', '.join(f'{t:.2f}' for t in ssh_s)})")
        print(f"labvm start until VNC answers:       median {labvm_m:.2f} s  ({', '.join(f'{t:.2f}' for t in labvm_s)})")
        print(f"labvm create until VNC answers:      {create_s:.2f} s")
        print(f"labvm / plain = {labvm_m / plain_m:.2f} (target <= {TARGET_RATIO:g}); labvm / ssh = {labvm_m / ssh_m:.2f}")
        for name in USERS:
            labvm(env, "rm", name, "--yes")
            on_node("rm", "-rf", f"/mnt/labvm-mfs/vms/{name}")
        return 0 if labvm_m <= TARGET_RATIO * plain_m else 1
    finally:
        on_node("docker", "rm", "-f", PLAIN_NAME, check=False)
        on_node("docker", "rmi", "-f", PLAIN_IMAGE, check=False)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
