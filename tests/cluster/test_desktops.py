"""Desktops on the testbed: create, connect with a real VNC client, GPUs, limits, persistence.

Desktops are built from the minimal image (TigerVNC, twm, xterm), cached between runs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import docker
import pytest
from PIL import Image

from .conftest import REPO, invoke_testbed, make_admin
from .test_secrets import ProcWatcher

ALICE_PW = "alice-Pw-4417"
BOB_PW = "bobby-Pw-9921"


@pytest.fixture(scope="module")
def desk(testbed, tmp_path_factory):
    """One admin for the module, with the minimal image pushed to every node."""
    admin = make_admin(testbed, tmp_path_factory.mktemp("desk") / "admin")
    built = admin.labvm("image", "build", "--desktop", "minimal", timeout=1800)
    assert built.returncode == 0, built.stderr
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    for name, pw in (("alice", ALICE_PW), ("bobby", BOB_PW)):
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=pw + "\n").returncode == 0
    yield admin
    for name in ("alice", "bobby"):
        admin.labvm("rm", name, "--yes")


def node_docker(testbed: Path, node: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{testbed}/nodes/{node}/run/docker.sock", version="1.41")


def container_env(testbed, node, user) -> dict:
    """The environment of the container's PID 1, where the GPU driver hook's variables land."""
    c = node_docker(testbed, node).containers.get(f"labvm-{user}")
    code, raw = c.exec_run(["cat", "/proc/1/environ"])
    assert code == 0, raw
    return dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)


def vnc_capture(address: str, password: str, out: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    host, port = address.rsplit(":", 1)
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "vncdo"), "-s", f"{host}::{port}", "-p", password, "-t", str(int(timeout)), "capture", str(out)],
        capture_output=True, text=True, timeout=timeout + 30,
    )


def wait_vnc(address: str, password: str, out: Path, deadline_s: float = 90) -> subprocess.CompletedProcess:
    end = time.monotonic() + deadline_s
    while True:
        result = vnc_capture(address, password, out, timeout=20)
        if result.returncode == 0 or time.monotonic() > end:
            return result
        time.sleep(2)


def test_create_gives_a_desktop_a_vnc_client_can_see(desk, testbed, tmp_path):
    with ProcWatcher(ALICE_PW) as watcher:
        created = desk.labvm_json("create", "alice", "--gpus", "1", "--node", "n1", "--memory", "512m", "--cpus", "1", "--pids", "512")
    assert watcher.saw(b"create\x00alice"), "the watcher never saw labvm create"
    assert watcher.leaks == [], "the password was in some process's argv or environment"
    assert created["node"] == "n1" and created["state"] == "running" and len(created["gpus"]) == 1
    shot = tmp_path / "alice.png"
    result = wait_vnc(created["vnc"], ALICE_PW, shot)
    assert result.returncode == 0, result.stdout + result.stderr
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 1, "the screenshot is blank"
    wrong = vnc_capture(created["vnc"], "not-her-password", tmp_path / "wrong.png", timeout=15)
    assert wrong.returncode != 0 and not (tmp_path / "wrong.png").exists()


def test_gpus_are_exclusive_and_reach_the_container(desk, testbed):
    alice = desk.labvm_json("status", "--user", "alice")[0]
    assert container_env(testbed, "n1", "alice")["NVIDIA_VISIBLE_DEVICES"] == alice["gpus"][0]["uuid"]
    bob = desk.labvm_json("create", "bobby", "--node", "n1", "--gpus", "2", "--memory", "512m")
    bob_uuids = {g["uuid"] for g in bob["gpus"]}
    assert len(bob_uuids) == 2 and alice["gpus"][0]["uuid"] not in bob_uuids
    assert set(container_env(testbed, "n1", "bobby")["NVIDIA_VISIBLE_DEVICES"].split(",")) == bob_uuids
    hook_log = (testbed / "nodes" / "n1" / "fakebin" / "hook.log").read_text()
    assert alice["gpus"][0]["uuid"] in hook_log


def test_more_gpus_than_free_is_refused_and_nothing_is_made(desk, testbed):
    desk.labvm("user", "add", "carol", "--password-stdin", stdin="carol-Pw-1234\n")
    result = desk.labvm("create", "carol", "--node", "n1", "--gpus", "2")
    assert result.returncode == 10 and "n1 has 1 free GPU" in result.stderr
    assert desk.labvm_json("status", "--user", "carol") == []
    names = [c.name for c in node_docker(testbed, "n1").containers.list(all=True)]
    assert "labvm-carol" not in names


def test_create_twice_is_refused(desk):
    result = desk.labvm("create", "alice")
    assert result.returncode == 5 and "alice already has a desktop on n1" in result.stderr


def test_container_cgroup_has_the_limits(desk, testbed):
    c = node_docker(testbed, "n1").containers.get("labvm-alice")
    host = c.attrs["HostConfig"]
    assert host["Memory"] == 512 << 20 and host["MemorySwap"] == 512 << 20
    assert host["NanoCpus"] == 1_000_000_000 and host["PidsLimit"] == 512
    cid = c.id
    memory = next(Path("/sys/fs/cgroup/memory").rglob(f"{cid}/memory.limit_in_bytes"))
    assert int(memory.read_text()) == 512 << 20
    pids = next(Path("/sys/fs/cgroup/pids").rglob(f"{cid}/pids.max"))
    assert pids.read_text().strip() == "512"


def exec_in(testbed, node, user, *cmd) -> str:
    c = node_docker(testbed, node).containers.get(f"labvm-{user}")
    code, output = c.exec_run(list(cmd))
    assert code == 0, output
    return output.decode()


def test_files_survive_stop_and_start_and_are_visible_from_the_host(desk, testbed):
    exec_in(testbed, "n1", "alice", "sh", "-c", "echo hello > /home/alice/note.txt && mkdir -p /usr/local/lib/pkg && echo v1 > /usr/local/lib/pkg/VERSION")
    merged = invoke_testbed("exec", "n1", "--", "cat", "/var/lib/labvm/data/vms/alice/merge_local/home/alice/note.txt")
    assert merged.stdout.strip() == "hello"
    assert desk.labvm("stop", "alice").returncode == 0
    assert desk.labvm_json("status", "--user", "alice")[0]["state"] == "stopped"
    started = desk.labvm("start", "alice")
    assert started.returncode == 0, started.stderr
    assert exec_in(testbed, "n1", "alice", "cat", "/home/alice/note.txt").strip() == "hello"
    assert exec_in(testbed, "n1", "alice", "cat", "/usr/local/lib/pkg/VERSION").strip() == "v1"


def test_tini_is_pid_1(desk, testbed):
    comm = exec_in(testbed, "n1", "alice", "cat", "/proc/1/comm").strip()
    assert comm in ("tini", "docker-init", "tini-static")
