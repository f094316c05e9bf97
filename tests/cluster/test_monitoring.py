"""labvm status, top and idle on the testbed: three desktops on two nodes, fake GPUs whose
processes are real processes inside the desktops' containers."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import sqlite3
import struct
import subprocess
import termios
import time

import pexpect
import pytest

from labvm.monitor import status_schema
from tests.status_schema import validate

from .conftest import REPO, invoke_testbed, make_admin, wipe_mfs_files
from .test_desktops import container_env, node_docker

MIB = 1 << 20
IDLE_AFTER_S = 10
# A desktop under half a CPU counts as unused; the minimal desktop idles near 0 %.
MONITORING = f"""  <monitoring>
    <idle_after>{IDLE_AFTER_S}s</idle_after>
    <idle_cpu_percent>50</idle_cpu_percent>
    <status_timeout>5</status_timeout>
  </monitoring>
</labvm>"""
DESKTOPS = (("alice", "n1", "1"), ("bobby", "n1", "2"), ("carol", "n2", "1"))


@pytest.fixture(scope="module")
def mon(testbed, tmp_path_factory):
    """An admin with three running desktops: alice (1 GPU) and bobby (2) on n1, carol (1) on n2."""
    admin = make_admin(testbed, tmp_path_factory.mktemp("mon") / "admin")
    admin.config.write_text(admin.config.read_text().replace("</labvm>", MONITORING))
    assert admin.labvm("image", "build", "--desktop", "minimal", timeout=1800).returncode == 0
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    wipe_mfs_files(admin, *(user for user, _node, _gpus in DESKTOPS))
    for user, node, gpus in DESKTOPS:
        assert admin.labvm("user", "add", user, "--password-stdin", stdin=f"{user}-Pw-4417\n").returncode == 0
        created = admin.labvm("create", user, "--node", node, "--gpus", gpus, "--memory", "512m", "--cpus", "1")
        assert created.returncode == 0, created.stderr
    yield admin
    apps_json(testbed, "n1").unlink(missing_ok=True)
    for user, _node, _gpus in DESKTOPS:
        admin.labvm("rm", user, "--yes")


def apps_json(testbed, node: str):
    return testbed / "nodes" / node / "fakebin" / "apps.json"


def container_pid(testbed, node: str, user: str) -> int:
    return node_docker(testbed, node).containers.get(f"labvm-{user}").attrs["State"]["Pid"]


def gpu_process_in(testbed, user: str, gpu_uuid: str, mib: int) -> dict:
    """A compute process as nvidia-smi reports it: the host PID of a process in the desktop."""
    return {"pid": container_pid(testbed, "n1", user), "gpu_uuid": gpu_uuid, "used_memory_mib": mib, "process_name": "python"}


def status(admin, *args, ok_codes=(0,)) -> dict:
    doc = admin.labvm_json("status", *args, ok_codes=ok_codes)
    validate(doc, status_schema())
    return doc


def by_name(rows: list[dict], key: str) -> dict:
    return {row[key]: row for row in rows}


def desktop_line(piped: str, user: str) -> dict:
    """A desktop's line of `labvm status` piped, by the header line's column names."""
    lines = piped.splitlines()
    header = next(line.split() for line in lines if line.startswith("DESKTOP "))
    return dict(zip(header, next(line.split() for line in lines if line.startswith(f"{user} ")), strict=False))


def test_status_shows_gpu_assignments_and_whose_process_holds_gpu_memory(mon, testbed):
    before = by_name(status(mon)["desktops"], "user")
    bob_gpu, alice_gpu = before["bobby"]["gpus"][0]["uuid"], before["alice"]["gpus"][0]["uuid"]
    host_process = {"pid": os.getpid(), "gpu_uuid": alice_gpu, "used_memory_mib": 77, "process_name": "python"}
    apps_json(testbed, "n1").write_text(json.dumps([gpu_process_in(testbed, "bobby", bob_gpu, 1234), host_process]))

    doc = status(mon)
    desktops = by_name(doc["desktops"], "user")
    nodes = by_name(doc["nodes"], "name")
    for user, node, count in DESKTOPS:
        desktop = desktops[user]
        uuids = [g["uuid"] for g in desktop["gpus"]]
        assert len(uuids) == int(count) and desktop["node"] == node
        # What status says a desktop has is what its container was given.
        assert container_env(testbed, node, user)["NVIDIA_VISIBLE_DEVICES"].split(",") == uuids
        assert [g["assigned_to"] for g in nodes[node]["gpus"] if g["uuid"] in uuids] == [user] * int(count)
        assert desktop["container_state"] == "running" and desktop["memory"]["limit"] == 512 * MIB
        assert desktop["memory"]["used"] > 0 and desktop["cpu_percent"] is not None and desktop["uptime_s"] > 0
        assert desktop["last_version"] == 0
    assert sum(g["assigned_to"] is None for n in doc["nodes"] for g in n["gpus"]) == 8 - 4

    gpus = by_name(nodes["n1"]["gpus"], "uuid")
    assert gpus[bob_gpu]["processes"] == [
        {"pid": container_pid(testbed, "n1", "bobby"), "used_memory": 1234 * MIB, "user": "bobby", "container": "labvm-bobby"}
    ]
    assert gpus[alice_gpu]["processes"] == [{"pid": os.getpid(), "used_memory": 77 * MIB, "user": None, "container": None}]
    assert (desktops["bobby"]["gpu_memory"], desktops["bobby"]["gpu_processes"]) == (1234 * MIB, 1)
    assert (desktops["alice"]["gpu_memory"], desktops["carol"]["gpu_memory"]) == (0, 0)
    assert all(n["reachable"] and n["mfs"]["healthy"] and n["docker_error"] is None for n in doc["nodes"])

    piped = mon.labvm("status")
    assert piped.returncode == 0, piped.stderr
    bobby = desktop_line(piped.stdout, "bobby")
    assert (bobby["GPU_MEM"], bobby["GPU_PROCS"]) == ("1.2G", "1") and bobby["GPUS"].startswith("#")


def test_status_filters(mon):
    by_user = status(mon, "--user", "carol")
    assert [d["user"] for d in by_user["desktops"]] == ["carol"] and [n["name"] for n in by_user["nodes"]] == ["n2"]
    by_node = status(mon, "--node", "n1")
    assert [d["user"] for d in by_node["desktops"]] == ["alice", "bobby"] and [n["name"] for n in by_node["nodes"]] == ["n1"]


def test_a_node_without_sshd_is_a_red_row_within_seconds(mon, node_started):
    invoke_testbed("node-stop", "n2", "sshd")
    started = time.monotonic()
    result = mon.labvm("status", "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 7, result.stderr
    assert elapsed < 10, f"status took {elapsed:.1f} s with n2 down"
    doc = json.loads(result.stdout)
    validate(doc, status_schema())
    nodes = by_name(doc["nodes"], "name")
    assert nodes["n1"]["reachable"] and nodes["n1"]["gpus"]
    assert not nodes["n2"]["reachable"] and "unreachable" in nodes["n2"]["error"]
    carol = by_name(doc["desktops"], "user")["carol"]
    assert carol["state"] == "running" and carol["container_state"] is None
    piped = mon.labvm("status")
    assert piped.returncode == 7
    assert re.search(r"^n2 +\S+ +unreachable .* unreachable: ", piped.stdout, re.MULTILINE), piped.stdout
    assert "labvm: error: n2: did not answer" in piped.stderr


def ssh_connections(pid: int) -> set[str]:
    """Local addresses of the established TCP connections to port 22 that pid holds."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", "( dport = :22 )"], capture_output=True, text=True, check=True).stdout
    return {line.split()[2] for line in out.splitlines() if f"pid={pid}," in line}


def test_top_redraws_keeps_one_connection_per_node_and_quits_on_ctrl_c(mon):
    env = {**mon.env, "COLUMNS": "220", "LINES": "80", "TERM": "xterm-256color"}
    # The terminal echoes ^C wherever output stands, even inside a multi-byte character.
    child = pexpect.spawn(str(REPO / ".venv" / "bin" / "labvm"), ["top", "--interval", "1", "--sort", "gpu"], env=env,
                          encoding="utf-8", codec_errors="replace", timeout=30, dimensions=(80, 220))
    seen = []
    for redraw in range(1, 7):
        child.expect(r"labvm top +\d\d:\d\d:\d\d", timeout=120)
        if redraw >= 3:
            seen.append(ssh_connections(child.pid))
    assert seen and all(s == seen[0] for s in seen), f"connections changed between refreshes: {seen}"
    assert len(seen[0]) == 2, f"expected one connection per node, got {seen[0]}"
    child.sendintr()
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0, child.before


def read_terminal(command: list[str], env: dict, rows: int, columns: int, seconds: float) -> str:
    """What command writes to a pseudo-terminal of rows x columns in `seconds`, then Ctrl-C."""
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    child = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary, env=env, start_new_session=True)
    os.close(secondary)
    data = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    data += os.read(primary, 65536)
                except OSError:
                    break
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os.close(primary)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", data.decode("utf-8", "replace"))


def test_status_piped_and_top_in_80x24_show_every_desktop(mon):
    labvm = str(REPO / ".venv" / "bin" / "labvm")
    env = {key: value for key, value in mon.env.items() if key not in ("COLUMNS", "LINES")}
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{labvm}' status | cat"], capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["NODE", "n1", "n2", "DESKTOP", "alice", "bobby", "carol"], piped.stdout
    assert not re.search("[│─█…]", piped.stdout)
    assert [desktop_line(piped.stdout, user)["NODE"] for user, _node, _gpus in DESKTOPS] == [node for _user, node, _gpus in DESKTOPS]

    screen = read_terminal([labvm, "top", "--interval", "1"], {**env, "TERM": "xterm-256color"}, rows=24, columns=80, seconds=8)
    frames = [frame for frame in re.split(r"(?=labvm top +\d\d:\d\d:\d\d)", screen) if frame.startswith("labvm top")]
    assert len(frames) >= 2, screen[-3000:]
    frame = frames[-2].splitlines()
    assert len(frame) <= 24 and all(len(line) <= 80 for line in frame), frames[-2]
    headers = [line.split()[0] for line in frame if line.split()[:1] in (["node"], ["desktop"])]
    assert headers[:1] == ["node"] and headers[-1:] == ["desktop"], frames[-2]
    words = {word for line in frame for word in line.split()}
    assert {"alice", "bobby", "carol", "n1", "n2"} <= words, frames[-2]


def test_idle_stop_stops_only_the_idle_desktop_after_flushing_it(mon, testbed):
    busy = node_docker(testbed, "n1").containers.get("labvm-alice").exec_run(["sh", "-c", "while :; do :; done"], detach=True)
    assert busy is not None
    bob_gpu = by_name(status(mon)["desktops"], "user")["bobby"]["gpus"][0]["uuid"]
    apps_json(testbed, "n1").write_text(json.dumps([gpu_process_in(testbed, "bobby", bob_gpu, 512)]))

    # Samples every few seconds until carol has been quiet for longer than idle_after.
    first = time.monotonic()
    while time.monotonic() - first < IDLE_AFTER_S + 2:
        listed = mon.labvm("idle")
        assert listed.returncode == 0, listed.stderr
        time.sleep(2)
    assert re.fullmatch(r"carol on n2, idle \d+(s|m(\d+s)?|h(\d+m)?)\n", listed.stdout), listed.stdout

    stopped = mon.labvm("idle", "--stop")
    assert stopped.returncode == 0, stopped.stderr
    assert re.fullmatch(r"stopped carol on n2, idle \d+(s|m(\d+s)?|h(\d+m)?)\n", stopped.stdout), stopped.stdout
    states = {d["user"]: d["state"] for d in status(mon)["desktops"]}
    assert states == {"alice": "running", "bobby": "running", "carol": "stopped"}

    db = sqlite3.connect(mon.home / "state.db")
    try:
        (op_id,) = db.execute("SELECT id FROM operations WHERE kind = 'stop' AND user = 'carol' ORDER BY id DESC LIMIT 1").fetchone()
        steps = db.execute("SELECT name, state FROM operation_steps WHERE op_id = ? ORDER BY seq", (op_id,)).fetchall()
    finally:
        db.close()
    names = [name for name, _state in steps]
    flush = next((i for i, name in enumerate(names) if "flush" in name), None)
    assert flush is not None and steps[flush][1] == "done", steps
    assert flush < names.index("unmount_stack"), steps
    assert '"target": "carol", "result": "ok"' in (mon.home / "audit.log").read_text()

    again = mon.labvm("idle", "--stop")
    assert again.returncode == 0 and again.stdout == "", again.stdout
