"""Monitoring without a cluster: idle rules, bars, the status document and its schema, the
tables, and the status/top/idle commands over fake node samples."""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from labvm import monitor, view
from labvm.admin import AdminHome
from labvm.cli import cli, main
from labvm.cli_monitor import COMMANDS
from labvm.config import Node, add_node_to_file
from labvm.errors import NodeUnreachable
from tests.status_schema import SchemaError, validate

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30
RULE = monitor.IdleRule(idle_after=3600, cpu_percent=5)
SCHEMA = monitor.status_schema()


# -- bars and numbers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fraction, cells",
    [(0.0, "░░░░░░░░░░"), (0.5, "█████░░░░░"), (0.04, "░░░░░░░░░░"), (0.96, "██████████"), (1.7, "██████████"), (-1, "░░░░░░░░░░")],
)
def test_bar_cells(fraction, cells):
    assert view.bar_cells(fraction) == cells


def test_bar_of_unknown_is_only_its_label():
    assert view.bar_cells(None) == ""
    assert view.bar(None, "?").plain == "?"
    assert view.bar(0.25, "1.0G/4.0G", width=4).plain == "█░░░ 1.0G/4.0G"


def test_bar_colour_follows_the_level():
    assert [view.level_style(f) for f in (0.1, 0.69, 0.7, 0.89, 0.9, 1.0)] == ["green", "green", "yellow", "yellow", "red", "red"]


@pytest.mark.parametrize("n, text", [(None, "?"), (0, "0B"), (1023, "1023B"), (1536, "1.5K"), (512 * MIB, "512M"), (3 * GIB, "3.0G"),
                                     (16 * GIB, "16G"), (5 << 40, "5.0T"), (5 << 50, "5120T")])
def test_human_size(n, text):
    assert view.human_size(n) == text


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0, "0s"), (59.9, "59s"), (60, "1m"), (3725, "1h2m"), (7200, "2h"), (90000, "1d1h"),
                                           (168 * 3600, "7d")])
def test_human_duration(seconds, text):
    assert view.human_duration(seconds) == text


# -- idle rules ------------------------------------------------------------------------------
def quiet(**extra) -> dict:
    return {"cpu_percent": 1.0, "gpu_processes": 0, **extra}


def test_what_counts_as_busy():
    gpus = {"GPU-a": {"utilization": 0}, "GPU-b": {"utilization": 40}, "GPU-c": {"utilization": None}}
    assert not monitor.is_busy(quiet(), gpus, ["GPU-a"], RULE)
    assert monitor.is_busy(quiet(cpu_percent=5.0), gpus, [], RULE)
    assert monitor.is_busy(quiet(cpu_percent=None), gpus, [], RULE), "what cannot be seen is never idle"
    assert monitor.is_busy(quiet(gpu_processes=1), gpus, [], RULE)
    assert monitor.is_busy(quiet(), gpus, ["GPU-a", "GPU-b"], RULE)
    assert not monitor.is_busy(quiet(), gpus, ["GPU-a"], RULE), "another desktop's busy GPU is not ours"
    assert not monitor.is_busy(quiet(), gpus, ["GPU-c"], RULE), "a GPU without utilization figures proves nothing"


def test_first_sight_counts_as_active_and_quiet_samples_age_it():
    first = monitor.observe(None, "t0", busy=False, now=1000, rule=RULE)
    assert first == monitor.Activity("t0", 1000, 1000, 1000)
    later = monitor.observe(first, "t0", busy=False, now=1000 + 3000, rule=RULE)
    assert later.last_active == 1000 and later.last_seen == 4000
    assert not monitor.is_idle(later, 4000, RULE)
    last = monitor.observe(later, "t0", busy=False, now=1000 + 3601, rule=RULE)
    assert monitor.is_idle(last, 4601, RULE) and last.idle_seconds(4601) == 3601
    assert not monitor.is_idle(last, 4600, RULE), "exactly idle_after is not yet longer than it"


def test_a_busy_sample_resets_the_clock():
    record = monitor.Activity("t0", 0, 3000, 0)
    busy = monitor.observe(record, "t0", busy=True, now=3500, rule=RULE)
    assert busy.last_active == 3500 and busy.first_seen == 0


def test_a_restart_or_a_gap_starts_watching_again():
    record = monitor.Activity("t0", 0, 3000, 0)
    restarted = monitor.observe(record, "t1", busy=False, now=5000, rule=RULE)
    assert restarted == monitor.Activity("t1", 5000, 5000, 5000)
    unwatched = monitor.observe(record, "t0", busy=False, now=3000 + 3601, rule=RULE)
    assert unwatched.last_active == 6601, "nobody looked for longer than idle_after: no evidence of idleness"
    assert not monitor.is_idle(None, 10**9, RULE)


# -- fixtures: an admin home with desktops, and fake node samples -----------------------------
@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    for i in (1, 2):
        add_node_to_file(config, Node(name=f"n{i}", host=f"10.0.0.{i}"))
    home = AdminHome(config)
    with home.state() as db:
        desktops = (("alice", "n1", "running", [("GPU-a", 0)], 20000), ("bobby", "n1", "running", [("GPU-b", 1)], 20002),
                    ("carol", "n2", "running", [], 20000), ("dave", "n2", "stopped", [], 20002))
        for user, node, state, gpus, port in desktops:
            db.add_user(user, "a good password")
            limits = {"cpus": 2.0, "cpuset": None, "memory": GIB, "shm": 64 * MIB, "pids": 512}
            db.conn.execute(
                "INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0)",
                (user, node, state, port, port + 1, json.dumps(limits)),
            )
            for uuid, index in gpus:
                db.conn.execute("INSERT INTO gpu_assignments VALUES (?, ?, ?, ?, 0)", (uuid, node, index, user))
    return home


def helper_desktop(user, state="running", cpu=1.0, gpu_memory=0, processes=0, gpus=(), started_at="2024-05-01T10:00:00Z"):
    running = state == "running"
    return {
        "user": user,
        "container": f"labvm-{user}" if state != "absent" else None,
        "state": state,
        "started_at": started_at if running else None,
        "uptime_s": 3600.0 if running else None,
        "gpus": list(gpus),
        "cpu_percent": cpu if running else None,
        "memory": {"used": 300 * MIB, "limit": GIB} if running else {"used": None, "limit": None},
        "blkio": {"read": 4096, "write": 8192} if running else {"read": None, "write": None},
        "net": {"rx": 5000, "tx": 3000} if running else {"rx": None, "tx": None},
        "gpu_memory": gpu_memory,
        "gpu_processes": processes,
        "sync": {"lag_s": 0.0, "pending": 0, "state": "idle", "last_success": 1714557600.0, "last_error": None, "running": True},
        "last_version": 3,
        "disk": {"size": 100 * GIB, "used": 3 * GIB if running else None, "allocated": 3 * GIB},
    }


def helper_gpu(index, uuid, utilization=0, processes=()):
    return {"index": index, "uuid": uuid, "name": "NVIDIA H200", "utilization": utilization, "memory_used": 1234 * MIB,
            "memory_total": 143771 * MIB, "temperature": 40, "power": 120.5, "processes": list(processes)}


def helper_sample(desktops, gpus=()):
    return {
        "node": {
            "cpu_percent": 12.5, "cpus": 16, "load": [0.5, 0.4, 0.3],
            "memory": {"total": 64 * GIB, "used": 16 * GIB, "available": 48 * GIB}, "swap": {"total": 0, "used": 0},
            "disk": {"path": "/var/lib/labvm/data", "total": 500 * GIB, "used": 100 * GIB, "free": 400 * GIB},
            "mfs": {"mounted": True, "healthy": True, "total": 10 * GIB, "free": 5 * GIB, "error": None},
            "gpus": list(gpus), "gpu_error": None, "docker_error": None, "images": None,
        },
        "desktops": list(desktops),
    }


def n1_sample(alice_cpu=1.0, bobby_gpu_util=0):
    process = {"pid": 4242, "used_memory": 1234 * MIB, "user": "bobby", "container": "labvm-bobby"}
    return helper_sample(
        [helper_desktop("alice", cpu=alice_cpu, gpus=["GPU-a"]),
         helper_desktop("bobby", gpu_memory=1234 * MIB, processes=1, gpus=["GPU-b"])],
        [helper_gpu(0, "GPU-a"), helper_gpu(1, "GPU-b", utilization=bobby_gpu_util, processes=[process])],
    )


def n2_sample():
    return helper_sample([helper_desktop("carol"), helper_desktop("dave", state="absent")])


class FakeSessions:
    """Stands in for NodeSessions: answers, raises or hangs per node."""

    def __init__(self, answers: dict, timeout: float = 0.5):
        self.answers = answers
        self.timeout = timeout
        self.asked: dict[str, list[str]] = {}
        self.dropped: list[str] = []
        self.release = threading.Event()

    def sample(self, node, users):
        self.asked[node.name] = users
        answer = self.answers[node.name]
        if answer == "hang":
            self.release.wait(10)
            raise NodeUnreachable(node=node.name, msg="connection closed")
        if isinstance(answer, Exception):
            raise answer
        return copy.deepcopy(answer)

    def drop(self, name, session=None):
        self.dropped.append(name)

    def close(self):
        self.release.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the document --------------------------------------------------------------------------------
def test_status_document_joins_samples_with_the_state_database(home):
    sessions = FakeSessions({"n1": n1_sample(), "n2": n2_sample()})
    doc = monitor.collect_status(home, sessions)
    validate(doc, SCHEMA)
    assert doc["schema"] == "labvm.status/1"
    assert sessions.asked == {"n1": ["alice", "bobby"], "n2": ["carol", "dave"]}
    n1 = doc["nodes"][0]
    assert (n1["name"], n1["reachable"], n1["cpus"]) == ("n1", True, 16)
    assert [(g["uuid"], g["assigned_to"]) for g in n1["gpus"]] == [("GPU-a", "alice"), ("GPU-b", "bobby")]
    desktops = {d["user"]: d for d in doc["desktops"]}
    assert list(desktops) == ["alice", "bobby", "carol", "dave"]
    bobby = desktops["bobby"]
    assert bobby["gpus"] == [{"index": 1, "uuid": "GPU-b", "utilization": 0, "memory_used": 1234 * MIB, "memory_total": 143771 * MIB}]
    assert bobby["gpu_memory"] == 1234 * MIB and bobby["vnc"] == "10.0.0.1:20002" and bobby["container_state"] == "running"
    assert bobby["idle_s"] == 0.0, "first sight counts as active"
    assert desktops["dave"]["container_state"] == "absent" and desktops["dave"]["idle_s"] is None


def test_unreachable_node_is_a_row_with_its_error_and_its_desktops_unknown(home):
    sessions = FakeSessions({"n1": n1_sample(), "n2": NodeUnreachable(node="n2", msg="10.0.0.2:22: Connection refused")})
    doc = monitor.collect_status(home, sessions)
    validate(doc, SCHEMA)
    n2 = doc["nodes"][1]
    assert n2["reachable"] is False and n2["error"] == "unreachable: 10.0.0.2:22: Connection refused"
    assert all(n2[key] is None for key in monitor.NODE_FIGURES)
    carol = next(d for d in doc["desktops"] if d["user"] == "carol")
    assert carol["container_state"] is None and carol["cpu_percent"] is None and carol["state"] == "running"
    assert monitor.unreachable_nodes(doc) == ["n2"]


def test_a_hung_node_costs_its_timeout_and_loses_its_connection(home):
    sessions = FakeSessions({"n1": n1_sample(), "n2": "hang"}, timeout=0.3)
    try:
        doc = monitor.collect_status(home, sessions)
    finally:
        sessions.close()
    n2 = doc["nodes"][1]
    assert n2["reachable"] is False and "no answer within 0.3s" in n2["error"]
    assert sessions.dropped == ["n2"]
    assert doc["nodes"][0]["reachable"]


def test_filters_choose_nodes_and_desktops(home):
    sessions = FakeSessions({"n1": n1_sample(), "n2": n2_sample()})
    by_node = monitor.collect_status(home, sessions, node_filter="n2")
    assert [n["name"] for n in by_node["nodes"]] == ["n2"] and [d["user"] for d in by_node["desktops"]] == ["carol", "dave"]
    sessions.asked.clear()
    by_user = monitor.collect_status(home, sessions, user_filter="bobby")
    assert [n["name"] for n in by_user["nodes"]] == ["n1"] and [d["user"] for d in by_user["desktops"]] == ["bobby"]
    sessions.asked.clear()
    nobody = monitor.collect_status(home, sessions, user_filter="zed")
    assert nobody["nodes"] == [] and nobody["desktops"] == [] and sessions.asked == {}
    with pytest.raises(Exception, match="unknown node 'n9'"):
        monitor.collect_status(home, sessions, node_filter="n9")


def test_the_real_helper_output_fits_the_schema(home, tmp_path):
    """The metrics helper, run here against the real /proc and the testbed's fake nvidia-smi."""
    smi = tmp_path / "smi"
    smi.mkdir()
    shutil.copy(REPO / "scripts" / "testbed_fakes" / "nvidia-smi", smi / "nvidia-smi")
    gpus = [{"index": 0, "uuid": "GPU-a", "name": "Test", "memory_total_mib": 1024, "memory_used_mib": 1, "utilization_gpu": 3,
             "temperature_gpu": 30, "power_draw_w": 20}]
    (smi / "gpus.json").write_text(json.dumps(gpus))
    (smi / "apps.json").write_text(json.dumps([{"pid": 1, "gpu_uuid": "GPU-a", "used_memory_mib": 5, "process_name": "init"}]))
    request = {"action": "sample", "params": {"data_dir": str(tmp_path), "mfs_mount": str(tmp_path / "mfs"), "interval_s": 0.1,
                                              "docker_socket": "/nonexistent/docker.sock", "users": ["alice", "bobby"]}}
    env = {"PATH": f"{smi}:/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "node_helpers" / "labvm_helper.py"), "metrics"],
                         input=json.dumps(request), capture_output=True, text=True, env=env, timeout=60)
    sample = json.loads(run.stdout)["data"]
    # The fake samples these tests use have the real helper's shape.
    assert set(sample["node"]) == set(helper_sample([])["node"])
    assert set(sample["node"]["gpus"][0]) == set(helper_gpu(0, "GPU-a"))
    assert [set(d) for d in sample["desktops"]] == [set(helper_desktop("alice"))] * 2
    sessions = FakeSessions({"n1": sample, "n2": n2_sample()})
    doc = monitor.collect_status(home, sessions)
    validate(doc, SCHEMA)
    assert doc["nodes"][0]["gpus"][0]["processes"] == [{"pid": 1, "used_memory": 5 * MIB, "user": None, "container": None}]


# -- the schema checker can fail ----------------------------------------------------------------
def test_the_schema_checker_catches_what_breaks_the_schema(home):
    doc = monitor.collect_status(home, FakeSessions({"n1": n1_sample(), "n2": n2_sample()}))
    validate(doc, SCHEMA)
    breakages = [
        (lambda d: d.pop("generated"), "missing 'generated'"),
        (lambda d: d.update(schema="labvm.status/2"), "is not 'labvm.status/1'"),
        (lambda d: d["nodes"][0].update(cpus="16"), "is not of type"),
        (lambda d: d["nodes"][0]["gpus"][1]["processes"][0].update(extra=1), "unexpected 'extra'"),
        (lambda d: d["desktops"][0]["memory"].update(used=-1), "below 0"),
        (lambda d: d["desktops"][0].update(sync={"lag_s": 0}), "missing 'running'"),
        (lambda d: d["nodes"][0].update(memory={"total": 1}), "matches 0 of the oneOf"),
        (lambda d: d.update(generated="yesterday"), "does not match"),
    ]
    for breakage, message in breakages:
        broken = copy.deepcopy(doc)
        breakage(broken)
        with pytest.raises(SchemaError, match=message):
            validate(broken, SCHEMA)


def test_the_schema_checker_refuses_keywords_it_does_not_check():
    with pytest.raises(SchemaError, match="not supported"):
        validate(1, {"type": "integer", "maximum": 0})


# -- activity in the state database -------------------------------------------------------------------
def activity_rows(home) -> dict:
    with home.state() as db:
        return {user: (a.last_active, a.started_at) for user, a in monitor.load_activity(db).items()}


def test_activity_is_recorded_per_running_desktop(home, monkeypatch):
    clock = iter([1000.0, 1000.0 + 1800, 1000.0 + 3700, 1000.0 + 3800])
    monkeypatch.setattr(monitor.time, "time", lambda: next(clock))
    monitor.collect_status(home, FakeSessions({"n1": n1_sample(), "n2": n2_sample()}))
    assert activity_rows(home) == {u: (1000.0, "2024-05-01T10:00:00Z") for u in ("alice", "bobby", "carol")}
    # alice works, bobby's GPU holds his process, carol does nothing; n2 is unreachable once.
    monitor.collect_status(home, FakeSessions({"n1": n1_sample(alice_cpu=80.0), "n2": NodeUnreachable(node="n2", msg="down")}))
    doc = monitor.collect_status(home, FakeSessions({"n1": n1_sample(), "n2": n2_sample()}))
    assert activity_rows(home) == {"alice": (2800.0, "2024-05-01T10:00:00Z"), "bobby": (4700.0, "2024-05-01T10:00:00Z"),
                                   "carol": (1000.0, "2024-05-01T10:00:00Z")}
    assert [d.user for d in monitor.find_idle(doc, RULE)] == ["carol"]
    assert next(d for d in doc["desktops"] if d["user"] == "carol")["idle_s"] == 3700.0
    # carol's container went away (stopped outside labvm): her record goes with it.
    gone = n2_sample()
    gone["desktops"][0] = helper_desktop("carol", state="exited")
    doc = monitor.collect_status(home, FakeSessions({"n1": n1_sample(), "n2": gone}))
    assert "carol" not in activity_rows(home) and monitor.find_idle(doc, RULE) == []


# -- tables -------------------------------------------------------------------------------------
def rendered(renderable, width=250) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


def test_tables_show_bars_gpu_owners_and_unreachable_nodes(home):
    sessions = FakeSessions({"n1": n1_sample(bobby_gpu_util=60), "n2": NodeUnreachable(node="n2", msg="Connection refused")})
    text = rendered(view.status_view(monitor.collect_status(home, sessions)))
    assert "unreachable: Connection refused" in text
    assert "█" in text and "░" in text
    assert "#1 " in text and "60%" in text and "bobby" in text
    assert "running (node unreachable)" in text
    assert "1.2G in 1 proc" in text
    assert "10.0.0.1:20002" in text


def test_a_gpu_used_by_a_desktop_it_is_not_assigned_to_is_flagged(home):
    sample = n1_sample()
    sample["node"]["gpus"][0]["processes"] = [{"pid": 7, "used_memory": MIB, "user": "bobby", "container": "labvm-bobby"}]
    text = rendered(view.nodes_table(monitor.collect_status(home, FakeSessions({"n1": sample, "n2": n2_sample()}))))
    assert "alice [bobby]" in text


def test_sorting_desktops():
    rows = [{"user": "b", "cpu_percent": 10.0, "memory": {"used": 5}, "gpu_memory": None},
            {"user": "a", "cpu_percent": None, "memory": {"used": 9}, "gpu_memory": 7},
            {"user": "c", "cpu_percent": 90.0, "memory": {"used": None}, "gpu_memory": 0}]
    assert [r["user"] for r in view.sort_desktops(rows, "cpu")] == ["c", "b", "a"]
    assert [r["user"] for r in view.sort_desktops(rows, "mem")] == ["a", "b", "c"]
    assert [r["user"] for r in view.sort_desktops(rows, "gpu")] == ["a", "c", "b"]
    assert [r["user"] for r in view.sort_desktops(rows, "user")] == ["a", "b", "c"]


def test_cpu_limit_from_cpus_or_cpuset():
    assert view.cpu_limit({"limits": {"cpus": 1.5}}) == 1.5
    assert view.cpu_limit({"limits": {"cpus": None, "cpuset": "0-3,8"}}) == 5.0
    assert view.cpu_limit({"limits": {}}) is None


# -- the commands ----------------------------------------------------------------------------------
@pytest.fixture
def commands(home, monkeypatch):
    """status, top and idle on labvm's command group, over fake samples."""
    for command in COMMANDS:
        cli.add_command(command)
    answers = {"n1": n1_sample(), "n2": n2_sample()}
    monkeypatch.setattr("labvm.cli_monitor.NodeSessions", lambda _home, timeout: FakeSessions(answers, timeout))
    return answers


def test_status_json_and_table(commands, capsys):
    assert main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate(doc, SCHEMA)
    assert [d["user"] for d in doc["desktops"]] == ["alice", "bobby", "carol", "dave"]
    assert main(["status", "--user", "alice", "--json"]) == 0
    assert [d["user"] for d in json.loads(capsys.readouterr().out)["desktops"]] == ["alice"]
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["NODE", "n1", "n2", "DESKTOP", "alice", "bobby", "carol", "dave"]


def test_status_exits_7_after_printing_when_a_node_is_down(commands, capsys):
    commands["n2"] = NodeUnreachable(node="n2", msg="Connection refused")
    assert main(["status", "--json"]) == 7
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["nodes"][1]["reachable"] is False and doc["nodes"][0]["reachable"] is True
    assert "n2: did not answer" in captured.err


WEEK = 168 * 3600


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(monitor.time, "time", lambda: now[0])
    return now


def watch_for_a_week(clock, capsys) -> None:
    """Samples at the start, half way and just past idle_after (168h by default)."""
    for now in (1000.0, 1000.0 + WEEK / 2):
        clock[0] = now
        assert main(["idle"]) == 0
    clock[0] = 1000.0 + WEEK + 60
    capsys.readouterr()


def test_idle_lists_and_stop_stops_only_idle_desktops(commands, home, monkeypatch, capsys, clock):
    stopped = []
    monkeypatch.setattr("labvm.cli_monitor.stop_idle", lambda _home, user, say: stopped.append(user))
    assert main(["idle"]) == 0
    assert "no desktop has been idle for more than 7d" in capsys.readouterr().out
    watch_for_a_week(clock, capsys)
    commands["n1"] = n1_sample(alice_cpu=50.0)
    assert main(["idle"]) == 0
    assert capsys.readouterr().out.splitlines() == ["carol on n2, idle 7d"]
    assert main(["idle", "--stop"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["stopped carol on n2, idle 7d"]
    assert stopped == ["carol"]
    audit = (home.home / "audit.log").read_text()
    assert '"command": "labvm idle --stop", "target": "carol", "result": "ok"' in audit


def test_a_failed_stop_is_one_line_and_a_non_zero_exit(commands, home, monkeypatch, capsys, clock):
    def refuse(_home, user, say):
        raise NodeUnreachable(node="n2", msg="Connection refused")

    monkeypatch.setattr("labvm.cli_monitor.stop_idle", refuse)
    watch_for_a_week(clock, capsys)
    commands["n1"] = n1_sample(alice_cpu=50.0)
    assert main(["idle", "--stop", "--json"]) == 11  # partly done: README, exit codes
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert rows == [{"user": "carol", "node": "n2", "idle_s": WEEK + 60.0, "last_active": 1000.0, "stopped": False,
                     "error": "n2: unreachable: Connection refused"}]
    assert "could not stop 1 idle desktop(s): carol" in captured.err


# -- one SSH exec per sample -------------------------------------------------------------------------
def test_the_helper_runs_only_from_a_complete_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "labvm_helper.py").write_text("import sys; print(sys.argv[1], sys.stdin.read())")
    argv = ["sh", "-c", monitor.RUN_IF_INSTALLED, "sh", str(bundle), "labvm_helper.py", "metrics"]
    missing = subprocess.run(argv, input="{}", capture_output=True, text=True)
    assert (missing.returncode, missing.stdout) == (monitor.NOT_INSTALLED, "")
    (bundle / ".complete").touch()
    present = subprocess.run(argv, input="{}", capture_output=True, text=True)
    assert (present.returncode, present.stdout) == (0, "metrics {}\n")


class FakeConnection:
    as_root: list = []

    def __init__(self, results):
        self.results = list(results)
        self.argvs = []

    def run(self, argv, stdin="", timeout=None):
        self.argvs.append(argv)
        return self.results.pop(0)


def test_a_node_without_the_bundle_gets_it_then_answers():
    from labvm.remote.connection import CommandResult

    reply = json.dumps({"ok": True, "changed": False, "data": {"node": {}, "desktops": []}})
    session = monitor.MetricsSession.__new__(monitor.MetricsSession)
    session.node = Node(name="n1", host="10.0.0.1")
    session.bundle = type("Bundle", (), {"remote_dir": "/var/lib/labvm/helpers/abc"})()
    session.conn = FakeConnection([CommandResult(monitor.NOT_INSTALLED, "", ""), CommandResult(0, reply, "")])
    installs = []
    session.runner = type("Runner", (), {"ensure_installed": lambda self: installs.append(1)})()
    assert session.sample({}, timeout=5) == {"node": {}, "desktops": []}
    assert installs == [1] and len(session.conn.argvs) == 2
    assert session.conn.argvs[0][-3:] == ["/var/lib/labvm/helpers/abc", "labvm_helper.py", "metrics"]


def daves_killed_switch(home):
    """A switch of dave (recorded stopped on n2) killed after his container started on n1: the
    operation, and n1's sample, which shows his container."""
    from labvm.journal import Operation

    with home.state() as db:
        op = Operation.begin(db, "switch", "dave", {"source": "n2", "target": "n1"})
        with op.step("start_target"):
            pass
    n1 = n1_sample()
    n1["desktops"].append(helper_desktop("dave"))
    return op, n1


def test_status_tells_where_a_desktop_really_runs_and_what_operation_holds_it(home):
    op, n1 = daves_killed_switch(home)
    doc = monitor.collect_status(home, FakeSessions({"n1": n1, "n2": n2_sample()}))
    validate(doc, SCHEMA)
    dave = next(d for d in doc["desktops"] if d["user"] == "dave")
    assert dave["node"] == "n2" and dave["running_on"] == ["n1"]
    assert dave["operation"] == {"id": op.id, "kind": "switch", "state": "interrupted", "step": "start_target"}
    alice = next(d for d in doc["desktops"] if d["user"] == "alice")
    assert alice["running_on"] == ["n1"] and alice["operation"] is None
    console = Console(width=200, record=True)
    console.print(view.desktops_table(doc))
    text = console.export_text()
    assert "runs on n1" in text and f"switch #{op.id} interrupted" in text


def test_status_of_one_user_asks_every_node_while_an_operation_holds_the_desktop(home):
    """`status --user dave` during dave's killed switch must still find his container on n1,
    though he is recorded on n2; a user with nothing pending asks only the recorded node."""
    op, n1 = daves_killed_switch(home)
    sessions = FakeSessions({"n1": n1, "n2": n2_sample()})
    doc = monitor.collect_status(home, sessions, user_filter="dave")
    assert [d["user"] for d in doc["desktops"]] == ["dave"]
    assert doc["desktops"][0]["running_on"] == ["n1"] and doc["desktops"][0]["operation"]["id"] == op.id
    assert sorted(sessions.asked) == ["n1", "n2"]
    quiet = FakeSessions({"n1": n1_sample(), "n2": n2_sample()})
    alice = monitor.collect_status(home, quiet, user_filter="alice")["desktops"][0]
    assert sorted(quiet.asked) == ["n1"] and alice["running_on"] == ["n1"]
