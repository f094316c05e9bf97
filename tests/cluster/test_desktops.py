"""Desktops on the testbed: create, connect with a real VNC client, GPUs, limits, persistence.

Desktops are built from the minimal image (TigerVNC, twm, xterm), cached between runs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import docker
import pytest
from PIL import Image

from .conftest import REPO, invoke_testbed, make_admin, wipe_mfs_files
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
    wipe_mfs_files(admin, "alice", "bobby", "carol")
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
    alice = desk.labvm_json("status", "--user", "alice")["desktops"][0]
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
    assert desk.labvm_json("status", "--user", "carol")["desktops"] == []
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
    assert desk.labvm_json("status", "--user", "alice")["desktops"][0]["state"] == "stopped"
    started = desk.labvm("start", "alice")
    assert started.returncode == 0, started.stderr
    assert exec_in(testbed, "n1", "alice", "cat", "/home/alice/note.txt").strip() == "hello"
    assert exec_in(testbed, "n1", "alice", "cat", "/usr/local/lib/pkg/VERSION").strip() == "v1"


def test_tini_is_pid_1(desk, testbed):
    comm = exec_in(testbed, "n1", "alice", "cat", "/proc/1/comm").strip()
    assert comm in ("tini", "docker-init", "tini-static")


def test_io_limits_reach_the_cgroup(desk, testbed):
    bob = desk.labvm_json("status", "--user", "bobby")["desktops"][0]
    desk.labvm("rm", "bobby", "--yes")
    created = desk.labvm("create", "bobby", "--node", "n1", "--gpus", str(len(bob["gpus"])), "--memory", "512m",
                         "--io-weight", "300", "--io-read-bps", "50m")
    assert created.returncode == 0, created.stderr
    c = node_docker(testbed, "n1").containers.get("labvm-bobby")
    weight_supported = any(Path("/sys/fs/cgroup/blkio", f).exists() for f in ("blkio.weight", "blkio.bfq.weight"))
    if weight_supported:
        assert c.attrs["HostConfig"]["BlkioWeight"] == 300
    else:
        assert "the IO weight is not applied" in created.stdout
        assert desk.labvm_json("status", "--user", "bobby")["desktops"][0]["limits"]["io_weight"] is None
    assert c.attrs["HostConfig"]["BlkioDeviceReadBps"] == [{"Path": "/dev/vda", "Rate": 50 << 20}]
    throttle = next(Path("/sys/fs/cgroup/blkio").rglob(f"{c.id}/blkio.throttle.read_bps_device")).read_text()
    assert f"{50 << 20}" in throttle


def test_exec_runs_inside_the_desktop(desk):
    result = desk.labvm("exec", "alice", "--", "sh", "-c", "id -un alice; test -d /home/alice && echo home")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alice", "home"]
    failing = desk.labvm("exec", "alice", "--", "sh", "-c", "exit 3")
    assert failing.returncode == 3


def test_a_locked_desktop_refuses_other_commands(desk):
    import sqlite3

    db = sqlite3.connect(desk.home / "state.db")
    db.execute("INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', 99, 'adminhost2', 4242, 0)")
    db.commit()
    try:
        for argv in (["stop", "alice"], ["start", "alice"], ["rm", "alice", "--yes"]):
            result = desk.labvm(*argv)
            assert result.returncode == 75 and "locked by operation 99 (pid 4242 on adminhost2)" in result.stderr, argv
    finally:
        db.execute("DELETE FROM vm_locks")
        db.commit()
        db.close()
    assert desk.labvm_json("status", "--user", "alice")["desktops"][0]["state"] == "running"


def admin_with(testbed, tmp_path, old: str, new: str):
    admin = make_admin(testbed, tmp_path / "variant")
    admin.config.write_text(admin.config.read_text().replace(old, new))
    assert admin.labvm("user", "add", "carol", "--password-stdin", stdin="carol-Pw-1234\n").returncode == 0
    return admin


def test_no_image_on_the_admin_host_is_one_clear_line(testbed, tmp_path):
    """A create needs an image to send to its node: with none built here, it says so and
    changes nothing (a node that lacks the image gets it as a step of the create)."""
    admin = admin_with(testbed, tmp_path, "<xfce_local>/var/lib/labvm/xfce_local<", "<xfce_local>/var/lib/labvm/xfce_elsewhere<")
    for argv in (["create", "carol", "--node", "n2"], ["create", "carol"], ["create", "carol", "--image", "abcd"]):
        refused = admin.labvm(*argv)
        assert refused.returncode == 9, argv
        assert len(refused.stderr.strip().splitlines()) == 1 and "image" in refused.stderr, refused.stderr
    assert "labvm image build" in admin.labvm("create", "carol").stderr
    assert admin.labvm_json("status")["desktops"] == []


def test_mfs_unreachable_rolls_back_everything(testbed, tmp_path):
    admin = admin_with(testbed, tmp_path, "<mfs_master>10.213.0.2<", "<mfs_master>10.213.0.99<")
    built = admin.labvm("image", "build", "--desktop", "minimal", timeout=1800)  # cached: the module's build
    assert built.returncode == 0, built.stderr
    config = admin.config.read_text().replace("<mfs_mount>/mnt/labvm-mfs<", "<mfs_mount>/mnt/labvm-mfs-unreachable<")
    admin.config.write_text(config)
    result = admin.labvm("create", "carol", "--node", "n2", timeout=300)
    assert result.returncode == 7 and "not reachable" in result.stderr, result.stderr
    assert admin.labvm_json("status")["desktops"] == []
    assert "labvm-carol" not in [c.name for c in node_docker(testbed, "n2").containers.list(all=True)]
    leftover = invoke_testbed("exec", "n2", "--", "ls", "-A", "/var/lib/labvm/data/vms/", check=False)
    assert "carol" not in leftover.stdout


def test_files_locates_copies_out_and_in_and_never_follows_symlinks(desk, testbed, tmp_path):
    where = desk.labvm_json("files", "alice", "/home/alice")
    assert (where["node"], where["type"]) == ("n1", "dir")
    assert where["host_path"] == "/var/lib/labvm/data/vms/alice/merge_local/home/alice"
    dest = tmp_path / "note.txt"
    got = desk.labvm("files", "alice", "/home/alice/note.txt", "--get", str(dest))
    assert got.returncode == 0, got.stderr
    assert dest.read_text() == "hello\n"
    src = tmp_path / "in.txt"
    src.write_text("from the admin\n")
    put = desk.labvm("files", "alice", "/home/alice/in.txt", "--put", str(src), "--mode", "0600")
    assert put.returncode == 0, put.stderr
    assert exec_in(testbed, "n1", "alice", "stat", "-c", "%a %s", "/home/alice/in.txt").split() == ["600", "15"]
    exec_in(testbed, "n1", "alice", "ln", "-sf", "/etc/shadow", "/home/alice/shadow")
    exec_in(testbed, "n1", "alice", "ln", "-sfn", "/", "/home/alice/root")
    for path in ("/home/alice/shadow", "/home/alice/root/etc/shadow"):
        refused = desk.labvm("files", "alice", path, "--get", str(tmp_path / "stolen"))
        assert refused.returncode != 0 and "symlink" in refused.stderr, refused.stderr
        assert not (tmp_path / "stolen").exists()
    planted = desk.labvm("files", "alice", "/home/alice/root/tmp/planted", "--put", str(src))
    assert planted.returncode != 0 and "symlink" in planted.stderr
    assert not Path("/tmp/planted").exists()


def test_passwd_changes_the_vnc_password_of_a_running_desktop(desk, tmp_path):
    new = "alice-New-7788"
    with ProcWatcher(new) as watcher:
        changed = desk.labvm("passwd", "alice", "--password-stdin", stdin=new + "\n")
    assert changed.returncode == 0, changed.stderr
    assert watcher.leaks == []
    vnc = desk.labvm_json("status", "--user", "alice")["desktops"][0]["vnc"]
    assert wait_vnc(vnc, new, tmp_path / "new.png", deadline_s=30).returncode == 0
    assert vnc_capture(vnc, ALICE_PW, tmp_path / "old.png", timeout=15).returncode != 0


def test_unknown_user_is_one_clear_line(desk):
    result = desk.labvm("create", "nobody9")
    assert result.returncode == 4 and result.stderr.strip() == "labvm: error: unknown user 'nobody9'; see `labvm user list`"
    audited = [(e["command"], e["result"]) for e in desk.labvm_json("log", "-t", "nobody9")]
    assert audited == [("labvm create", "failed: unknown user 'nobody9'; see `labvm user list`")]
    assert ("labvm create", "ok") in [(e["command"], e["result"]) for e in desk.labvm_json("log", "-t", "alice")]


def test_rm_purge_needs_the_typed_name_then_deletes_every_version(desk, testbed):
    import pexpect

    no_tty = desk.labvm("rm", "bobby", "--purge", "--yes")
    assert no_tty.returncode == 2 and "from a terminal" in no_tty.stderr
    assert "bobby" in invoke_testbed("exec", "n1", "--", "ls", "/mnt/labvm-mfs/vms").stdout.split()
    child = pexpect.spawn(str(REPO / ".venv" / "bin" / "labvm"), ["rm", "bobby", "--purge"], env=desk.env, encoding="utf-8", timeout=180)
    child.expect("Type bobby to confirm")
    child.sendline("bobby")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "bobby" not in invoke_testbed("exec", "n1", "--", "ls", "/mnt/labvm-mfs/vms").stdout.split()
    assert desk.labvm_json("status", "--user", "bobby")["desktops"] == []


def test_shell_opens_an_interactive_shell_in_the_desktop(desk):
    import pexpect

    child = pexpect.spawn(str(REPO / ".venv" / "bin" / "labvm"), ["shell", "alice"], env=desk.env, encoding="utf-8", timeout=60)
    child.sendline("echo inside-$(hostname)")
    child.expect("inside-alice-desktop")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
