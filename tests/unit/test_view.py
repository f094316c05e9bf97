"""labvm/view.py over a synthetic status document: three nodes of four GPUs (one does not
answer), desktops with long names, one held by an interrupted switch whose container already
runs on its target, one stopped, one whose sync failed. At 80 columns every name stays whole
and no line is wider; piped, one line a node and a desktop; top in 80x24 shows both tables."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from labvm import view
from labvm.cli import main
from labvm.monitor import status_schema
from tests.status_schema import validate

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30

NODES = ("gpu-node-a1", "gpu-node-b2", "n3")
LONG = "maximilian-von-und-zu-schmidt"
DESKTOPS = (
    # user, node, recorded state, container state, GPUs (index, utilization), running_on
    (LONG, "gpu-node-a1", "running", "running", [(0, 97), (1, 88)], ["gpu-node-a1"]),
    ("alexandra-konstantinopoulou", "gpu-node-a1", "running", "running", [(2, 12)], ["gpu-node-a1"]),
    ("bo", "gpu-node-a1", "stopped", "absent", [], []),
    ("christopher-abernathy-smith", "gpu-node-b2", "running", "running", [(0, 40), (1, 41), (2, 42), (3, 43)], ["gpu-node-b2"]),
    ("dave", "gpu-node-b2", "stopped", "absent", [], ["gpu-node-a1"]),
    ("evangeline-montgomery", "gpu-node-b2", "running", "running", [], ["gpu-node-b2"]),
    ("zoe", "n3", "running", None, [(0, None)], []),
)


def node(name: str, index: int) -> dict:
    entry = {"name": name, "host": f"10.20.30.{index + 1}", "reachable": True, "error": None, "seconds": 0.2}
    if name == "n3":
        return {**entry, "reachable": False, "error": "unreachable: 10.20.30.3:22: Connection refused",
                **{key: None for key in ("cpu_percent", "cpus", "load", "memory", "swap", "disk", "mfs", "gpus", "gpu_error",
                                         "docker_error", "image")}}
    owners = {g: user for user, where, _s, _c, gpus, _r in DESKTOPS if where == name for g, _u in gpus}
    utils = {g: u for _user, where, _s, _c, gpus, _r in DESKTOPS if where == name for g, u in gpus}
    gpus = [{"index": i, "uuid": f"GPU-{name}-{i}", "name": "NVIDIA H200", "utilization": utils.get(i, 0),
             "memory_used": 20 * GIB if i in owners else 0, "memory_total": 143771 * MIB, "temperature": 41 + i, "power": 300.4,
             "processes": [{"pid": 100 + i, "used_memory": 20 * GIB, "user": owners[i], "container": f"labvm-{owners[i]}"}]
             if i in owners else [], "assigned_to": owners.get(i)} for i in range(4)]
    return {**entry, "cpu_percent": 71.5, "cpus": 64, "load": [40.5, 38.25, 30.0],
            "memory": {"total": 512 * GIB, "used": 300 * GIB, "available": 212 * GIB}, "swap": {"total": 8 * GIB, "used": GIB},
            "disk": {"path": "/var/lib/labvm/data", "total": 4096 * GIB, "used": 1000 * GIB, "free": 3096 * GIB},
            "mfs": {"mounted": True, "healthy": True, "total": 100 << 40, "free": 40 << 40, "error": None},
            "gpus": gpus, "gpu_error": None, "docker_error": None, "image": ["a" * 64]}


def desktop(user, where, state, container, gpus, running_on) -> dict:
    running = container == "running"
    node_index = NODES.index(where)
    entry = {
        "user": user, "node": where, "state": state, "vnc": f"10.20.30.{node_index + 1}:{20000 + 2 * len(user)}",
        "https": f"https://10.20.30.{node_index + 1}:{20100 + len(user)}/vnc.html?autoconnect=1&resize=remote",
        "ssh_port": 20001, "limits": {"cpus": 8.0, "cpuset": None, "memory": 64 * GIB, "shm": GIB, "pids": 4096},
        "version": 3, "image": "a" * 64,
        "gpus": [{"index": i, "uuid": f"GPU-{where}-{i}", "utilization": u, "memory_used": 20 * GIB if u is not None else None,
                  "memory_total": 143771 * MIB} for i, u in gpus],
        "container_state": container, "container": f"labvm-{user}" if container not in (None, "absent") else None,
        "started_at": "2024-05-01T10:00:00Z" if running else None, "uptime_s": 93600.0 if running else None,
        "cpu_percent": 250.0 if running else None,
        "memory": {"used": 30 * GIB, "limit": 64 * GIB} if running else {"used": None, "limit": None},
        "blkio": {"read": 5 * GIB, "write": 700 * MIB} if running else {"read": None, "write": None},
        "net": {"rx": 12 * GIB, "tx": 300 * MIB} if running else {"rx": None, "tx": None},
        "gpu_memory": 20 * GIB * len(gpus) if running else (None if container is None else 0),
        "gpu_processes": len(gpus) if running else (None if container is None else 0),
        "sync": {"lag_s": 2.0, "pending": 0, "state": "idle", "last_success": 1714557600.0, "last_error": None, "running": True}
        if container is not None else None,
        "last_version": 12 if container is not None else None,
        "disk": {"size": 200 * GIB, "used": 80 * GIB if running else None, "allocated": 81 * GIB},
        "last_active": 1714557600.0 if running else None, "idle_s": 7300.0 if running else None,
        "running_on": running_on, "operation": None,
    }
    if user == "dave":
        entry["operation"] = {"id": 41, "kind": "switch", "state": "interrupted", "step": "start_target"}
    if user == "evangeline-montgomery":
        entry["sync"] = {**entry["sync"], "last_error": "mfs write failed: No space left on device", "running": False}
    return entry


def document(extra_desktops: int = 0) -> dict:
    """The document; extra_desktops adds that many more running desktops on the first node."""
    rows = [*DESKTOPS, *((f"member-number-{i:03d}", NODES[0], "running", "running", [], [NODES[0]]) for i in range(extra_desktops))]
    return {"schema": "labvm.status/1", "generated": "2024-05-02T10:00:00.000000Z",
            "nodes": [node(name, i) for i, name in enumerate(NODES)],
            "desktops": [desktop(*row) for row in rows]}


USERS = [row[0] for row in DESKTOPS]
VNC = [desktop(*row)["vnc"] for row in DESKTOPS]


def shown(renderable, width: int = 80, height: int = 24, terminal: bool = False) -> list[str]:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=None, legacy_windows=False,
                      force_terminal=terminal)
    console.print(renderable)
    return console.file.getvalue().splitlines()


def whole(names, lines: list[str]) -> list[str]:
    """The names not found whole on one line, as a word of their own."""
    return [n for n in names if not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", line) for line in lines)]


def test_the_synthetic_document_has_the_status_schema():
    validate(document(), status_schema())
    validate(document(extra_desktops=3), status_schema())


# -- status in a terminal ------------------------------------------------------------------
def short_names(doc: dict, length: int) -> dict:
    """The document with every member name cut to `length` characters."""
    for d in doc["desktops"]:
        d["user"] = d["user"][:length]
    for n in doc["nodes"]:
        for gpu in n["gpus"] or []:
            gpu["assigned_to"] = gpu["assigned_to"] and gpu["assigned_to"][:length]
            for process in gpu["processes"]:
                process["user"] = process["user"][:length]
    return doc


def test_status_at_80_columns_is_compact_and_keeps_every_name_whole():
    lines = shown(view.status_view(document(), width=80))
    assert max(map(cell_len, lines)) <= 80
    assert whole([*USERS, *NODES, *VNC], lines) == []
    assert "│" not in "\n".join(lines), "the compact tables have no vertical rules"
    assert "sync 2s mfs" in "\n".join(lines), "a sync error shows, wrapped in its column"
    gpu_rows = [line for line in lines if re.search(r"#\d +\d+% +\S+/140G +4\d°C +300W", line)]
    assert len(gpu_rows) == 8 and sum(LONG in line for line in gpu_rows) == 2


def test_the_compact_tables_keep_what_the_wide_ones_show():
    """With names of 20 characters, each figure stays on one line of its column."""
    lines = shown(view.status_view(short_names(document(), 20), width=80))
    assert max(map(cell_len, lines)) <= 80
    text = "\n".join(lines)
    for figure in ("72% of 64", "40.50 38.25 30.00", "300G/512G", "swap 1.0G/8.0G", "1000G/4.0T", "40T free", "3/4 GPU 49%",
                   "250% of 8", "30G/64G", "#2 12% 20G", "up 1d2h", "idle 2h1m", "io 5.0G/700M", "net 12G/300M", "v12",
                   "80G/200G", "runs on gpu-node-a1", "switch #41", "running (node",
                   "n3: unreachable: 10.20.30.3:22: Connection refused"):
        assert figure in text, figure


def test_a_wide_terminal_keeps_the_wide_tables():
    lines = shown(view.status_view(document(), width=250), width=250)
    assert "│" in "\n".join(lines) and "█" in "\n".join(lines)
    assert whole([*USERS, *NODES], lines) == []
    assert shown(view.status_view(document()), width=250) == lines, "no width: the wide tables"


@pytest.mark.parametrize("width", [60, 80, 100, 120, 160])
def test_no_status_line_is_wider_than_the_terminal(width):
    lines = shown(view.status_view(document(), width=width), width=width)
    assert max(map(cell_len, lines)) <= width
    assert whole([*USERS, *NODES], lines) == []


# -- status piped ----------------------------------------------------------------------------
def test_piped_status_is_one_line_a_node_and_a_desktop():
    lines = view.status_lines(document())
    assert len(lines) == 1 + len(NODES) + 1 + len(DESKTOPS)
    node_lines, desktop_lines = lines[1:1 + len(NODES)], lines[2 + len(NODES):]
    assert lines[0].split()[0] == "NODE" and lines[1 + len(NODES)].split()[0] == "DESKTOP"
    assert [line.split()[0] for line in node_lines] == list(NODES)
    assert [line.split()[0] for line in desktop_lines] == sorted(USERS)
    assert not any(char in "".join(lines) for char in "│─█░…")
    header = lines[1 + len(NODES)].split()
    by_user = {}
    for line in desktop_lines:
        words = line.split(maxsplit=len(header) - 1)
        assert len(words) in (len(header) - 1, len(header)), line
        by_user[words[0]] = dict(zip(header, words, strict=False))
    assert by_user["dave"]["RUNS_ON"] == "gpu-node-a1" and by_user["dave"]["OPERATION"] == "switch#41:interrupted"
    assert by_user["zoe"]["CONTAINER"] == "?" and by_user["zoe"]["NODE"] == "n3"
    assert by_user[LONG]["GPUS"] == "#0:97%:20G,#1:88%:20G" and by_user[LONG]["VNC"] == VNC[0]
    assert by_user[LONG]["HTTPS"].startswith("https://10.20.30.") and by_user[LONG]["HTTPS"].endswith("/vnc.html")
    assert by_user[LONG]["DISK"] == "80G/200G" and by_user[LONG]["CPU"] == "250%" and by_user[LONG]["IDLE"] == "2h1m"
    assert by_user["evangeline-montgomery"]["SYNC"] == "2s(stopped)"
    assert by_user["evangeline-montgomery"]["NOTE"] == "sync: mfs write failed: No space left on device"
    assert node_lines[2].endswith("unreachable: 10.20.30.3:22: Connection refused")
    assert f"#0:97%:20G/140G:41C:300W:{LONG}" in node_lines[0]


def test_piped_status_columns_line_up_and_are_sorted_as_asked():
    lines = view.status_lines(document(), sort="cpu")
    desktops = lines[2 + len(NODES):]
    starts = {line.index(" " + line.split()[1] + " ") for line in desktops}
    assert len(starts) == 1, "the second column starts at the same place on every line"
    assert [line.split()[0] for line in desktops][-1] == "zoe", "unknown CPU last"


def test_piped_words_keep_their_columns_whatever_a_node_says():
    doc = document()
    doc["desktops"][0]["container_state"] = "exited \x1b[2J now"
    doc["nodes"][0]["docker_error"] = "down\nand \u202eout"
    lines = view.status_lines(doc)
    assert len(lines) == 1 + len(NODES) + 1 + len(DESKTOPS)
    assert all(line.isprintable() for line in lines)
    line = next(line for line in lines if line.startswith(LONG))
    assert line.split()[3] == "exited\\x20\\x1b[2J\\x20now"
    assert lines[1].split()[2] == "problem" and lines[1].endswith("docker: down\\x0aand \\u202eout")


def test_a_gpu_used_by_a_desktop_it_is_not_assigned_to_shows_in_every_layout():
    doc = document()
    doc["nodes"][0]["gpus"][3]["processes"] = [{"pid": 7, "used_memory": MIB, "user": "dave", "container": "labvm-dave"}]
    top = shown(view.top_view(doc, "cpu", 2, 80, 24))
    assert "3/4 GPU 49%" in "\n".join(top) and whole(["[dave]"], top) == [] and len(top) <= 24
    assert re.search(r"#3 +0% +0B/140G +44°C +300W +\[dave\]", "\n".join(shown(view.status_view(doc, width=80))))
    assert "#3:0%:0B/140G:44C:300W:[dave]" in view.status_lines(doc)[1]


# -- top -------------------------------------------------------------------------------------------
def test_top_at_80x24_shows_both_tables_with_the_gpus_summed_up():
    lines = shown(view.top_view(document(), "cpu", 2, 80, 24, when="12:00:00"))
    assert len(lines) <= 24 and max(map(cell_len, lines)) <= 80
    assert lines[0].startswith("labvm top  12:00:00")
    headers = [line.split()[0] for line in lines if line.split()[:1] in (["node"], ["desktop"])]
    assert headers == ["node", "desktop"]
    assert whole([*USERS, *NODES], lines) == []
    text = "\n".join(lines)
    assert "3/4 GPU 49%" in text and "4/4 GPU 42%" in text and "2 GPU 92% 40G" in text
    assert "n3: unreachable: 10.20.30.3:22: Connection refused" in text


def test_top_with_more_desktops_than_lines_says_how_many_it_leaves_out():
    doc = document(extra_desktops=40)
    lines = shown(view.top_view(doc, "user", 2, 80, 24, when="12:00:00"))
    assert len(lines) <= 24 and max(map(cell_len, lines)) <= 80
    desktop_rows = [line for line in lines if line.split()[:1] and line.split()[0] in {d["user"] for d in doc["desktops"]}]
    more = next(line for line in lines if "more desktops" in line)
    assert int(re.search(r"(\d+) more desktops", more).group(1)) == len(doc["desktops"]) - len(desktop_rows)
    assert whole(NODES, lines) == [], "every node still shown"


def test_a_big_terminal_gets_the_wide_tables_and_a_small_one_still_fits():
    big = shown(view.top_view(document(), "cpu", 2, 250, 80, when="12:00:00"), width=250, height=80)
    assert "│" in "\n".join(big)
    for width, height in ((80, 12), (100, 30), (60, 20)):
        lines = shown(view.top_view(document(extra_desktops=10), "cpu", 2, width, height), width=width, height=height)
        assert len(lines) <= height and max(map(cell_len, lines)) <= width, (width, height)


@pytest.mark.parametrize("nodes, desktops, rows", [(3, 7, 18), (3, 50, 18), (30, 5, 18), (30, 50, 18), (1, 1, 2), (10, 0, 8)])
def test_split_rows_stays_within_the_rows(nodes, desktops, rows):
    shown_nodes, shown_desktops = view.split_rows(nodes, desktops, rows)
    cut = (shown_nodes < nodes) + (shown_desktops < desktops)
    assert shown_nodes + shown_desktops + cut <= max(rows, 2)
    assert shown_nodes >= min(1, nodes) and shown_desktops >= min(1, desktops)


# -- the real commands in a pseudo-terminal of 80x24 ----------------------------------------------
FAKE_CLUSTER = """
import sys
from labvm.cli import main
from labvm import cli_monitor
from tests.unit.test_view import document


class NoSessions:
    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


cli_monitor.NodeSessions = NoSessions
cli_monitor.collect_status = lambda *args, **kwargs: document()
sys.exit(main(sys.argv[1:]))
"""

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def in_a_terminal(args: list[str], env: dict, seconds: float, until=None) -> str:
    """What labvm ARGS (over the synthetic document) writes to an 80x24 pseudo-terminal within
    `seconds`, or until `until(what it wrote so far)`; it is interrupted (Ctrl-C) if still running."""
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    child = subprocess.Popen([sys.executable, "-c", FAKE_CLUSTER, *args], stdin=secondary, stdout=secondary, stderr=secondary,
                             env=env, cwd=REPO, start_new_session=True)
    os.close(secondary)
    data = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
                if until is not None and until(data.decode("utf-8", "replace")):
                    break
            elif child.poll() is not None:
                break
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            os.close(primary)
    return data.decode("utf-8", "replace")


@pytest.fixture
def terminal_env(tmp_path, monkeypatch) -> dict:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color", "PYTHONPATH": str(REPO)}


def test_status_in_an_80_column_terminal_is_compact(terminal_env):
    screen = ANSI.sub("", in_a_terminal(["status"], terminal_env, seconds=30))
    lines = screen.splitlines()
    assert "labvm: error: n3: did not answer" in screen
    assert max(map(cell_len, lines)) <= 80
    assert whole([*USERS, *NODES], lines) == []
    assert "3/4 GPU 49%" in screen and "NODE" not in screen


def test_top_in_an_80x24_terminal_shows_both_tables(terminal_env):
    def three_frames(written: str) -> bool:
        return len(re.findall(r"labvm top +\d\d:\d\d:\d\d", ANSI.sub("", written))) >= 3

    screen = ANSI.sub("", in_a_terminal(["top", "--interval", "0.5"], terminal_env, seconds=120, until=three_frames))
    frames = [frame for frame in re.split(r"(?=labvm top +\d\d:\d\d:\d\d)", screen) if frame.startswith("labvm top")]
    assert len(frames) >= 2, screen[-2000:]
    frame = frames[-2].splitlines()
    assert len(frame) <= 24 and max(map(cell_len, frame)) <= 80
    assert [line.split()[0] for line in frame if line.split()[:1] in (["node"], ["desktop"])] == ["node", "desktop"]
    assert whole([*USERS, *NODES], frame) == []
