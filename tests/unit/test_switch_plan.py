"""`labvm switch --dry-run`: the preflight's checks run against the nodes, and the plan names the
GPUs, ports and version the switch would take, while the state database and the nodes stay as
they were. The nodes are fakes that answer helper calls from a table and record each call."""

import json
import os
import socket

import pytest

from labvm import desktops as desktops_mod
from labvm import plan as plan_mod
from labvm.admin import AdminHome
from labvm.cli import main
from labvm.config import Node, add_node_to_file
from labvm.errors import NoCapacity, NodeUnreachable
from labvm.journal import Operation
from labvm.switch import SwitchKind

from .fake_cluster import IMAGE, plant_image
from .fake_node import TypedCalls

PW = "a good password"
MIB = 1 << 20
READS = {("probe", "facts"), ("image", "status"), ("vm", "status"), ("merge", "versions")}


def gpus(node: str, count: int = 4) -> list[dict]:
    return [{"index": i, "uuid": f"GPU-{node}-{i}"} for i in range(count)]


class FakeNode(TypedCalls):
    """A node's helpers, answering from a table; every call is recorded with its check flag."""

    def __init__(self, name: str, answers: dict):
        self.node = Node(name=name, host=f"10.0.0.{name[-1]}")
        self.answers = answers
        self.calls: list[tuple[str, str, bool]] = []

    def call(self, helper, action, params, timeout=180, check=False):
        self.calls.append((helper, action, check))
        return {"ok": True, "changed": False, "data": self.answers.get((helper, action), {})}

    def changes(self) -> list[tuple[str, str]]:
        """Calls that could have changed the node: any not a read, made without check."""
        return [(h, a) for h, a, check in self.calls if (h, a) not in READS and not check]

    def close(self):
        pass


def answers(node: str, gpu_count: int = 4, versions=(3, 5), ports=()) -> dict:
    return {
        ("mfs", "ensure_mounted"): {"mounted": True},
        ("probe", "facts"): {"gpus": gpus(node, gpu_count), "memory": {"total_mib": 16384}, "disk": {},
                             "listening_ports": list(ports)},
        ("image", "status"): {"images": [{"id": IMAGE, "legacy": False, "desktop": "minimal", "in_use_by": []}]},
        ("vm", "status"): {"container": {"running": True}},
        ("merge", "versions"): {"versions": [{"version": v} for v in versions]},
    }


@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    add_node_to_file(config, Node(name="n1", host="10.0.0.1"))
    add_node_to_file(config, Node(name="n2", host="10.0.0.2"))
    home = AdminHome(config)
    with home.state() as db:
        for user in ("alice", "bob"):
            db.add_user(user, PW)
        rows = (("alice", "n1", 20000, 20001, 3), ("bob", "n2", 20000, 20001, 1))
        for user, node, vnc, ssh, version in rows:
            db.conn.execute(
                "INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, image, created_at, updated_at) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?, ?, 0, 0)",
                (user, node, vnc, ssh, json.dumps({"memory": 512 * MIB}), version, IMAGE))
        # alice holds two GPUs on n1; bob holds n2's GPU 0.
        for uuid, node, index, user in (("GPU-n1-0", "n1", 0, "alice"), ("GPU-n1-1", "n1", 1, "alice"), ("GPU-n2-0", "n2", 0, "bob")):
            db.conn.execute("INSERT INTO gpu_assignments VALUES (?, ?, ?, ?, 0)", (uuid, node, index, user))
    return home


@pytest.fixture
def nodes(monkeypatch) -> dict[str, FakeNode]:
    fakes = {"n1": FakeNode("n1", answers("n1")), "n2": FakeNode("n2", answers("n2", ports=[20002]))}

    def session(self, name):
        if name not in fakes:
            raise NodeUnreachable(node=name, msg="no route to host")
        return fakes[name]

    monkeypatch.setattr(plan_mod.Context, "_open_session", session)
    monkeypatch.setattr(desktops_mod.HelperBundle, "from_package", classmethod(lambda cls: None))
    return fakes


def dump(home: AdminHome) -> dict[str, list[tuple]]:
    """Every row of every table of the state database."""
    with home.state() as db:
        tables = [r["name"] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(tuple(r) for r in db.conn.execute(f"SELECT * FROM {t}")) for t in tables}


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["switch", *args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run_json(capsys, *args: str) -> tuple[int, dict]:
    code, out, _err = dry_run(capsys, *args, "--json")
    return code, json.loads(out)


def check(plan: dict, name: str) -> dict:
    return next(c for c in plan["checks"] if c["name"] == name)


def test_a_fitting_plan_names_the_gpus_ports_and_version_and_changes_nothing(home, nodes, capsys):
    before = dump(home)
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 0
    assert set(plan) == {"operation", "user", "source", "target", "ok", "checks", "steps", "exit_code", "dry_run"}
    assert (plan["operation"], plan["user"], plan["source"], plan["target"]) == ("switch", "alice", "n1", "n2")
    assert plan["ok"] is True and plan["exit_code"] == 0
    assert all(c["ok"] for c in plan["checks"])
    assert [c["name"] for c in plan["checks"]] == [
        "desktop", "target", "lock", "target reachable", "MooseFS", "image", "source answering", "gpus", "memory",
        "limits", "ports", "versions"]
    # n2's GPU 0 is bob's; 20000/20001 are bob's ports and 20002 listens on n2.
    assert "GPUs 1,2 (GPU-n2-1, GPU-n2-2)" in check(plan, "gpus")["detail"]
    assert "VNC port 20004, SSH port 20005" in check(plan, "ports")["detail"]
    assert "version 6" in check(plan, "versions")["detail"]
    steps = {s["name"]: s for s in plan["steps"]}
    assert list(steps) == ["preflight", "push_image", "precopy", "stop_source", "final_flush", "merge", "fence", "build_stack",
                           "start_target", "verify", "commit", "cleanup_source"]
    assert not any(s["skipped"] for s in plan["steps"])
    assert steps["preflight"]["detail"] == "reserve on n2: GPUs 1,2 (GPU-n2-1, GPU-n2-2), VNC port 20004, SSH port 20005"
    assert steps["merge"]["detail"] == "publish version 3 plus the upper layer as version 6"
    assert "n2 with GPUs 1,2, VNC port 20004" in steps["start_target"]["detail"]
    assert "10.0.0.2:20004" in steps["verify"]["detail"]
    assert dump(home) == before
    assert nodes["n1"].changes() == [] and nodes["n2"].changes() == []
    assert ("mfs", "ensure_mounted", True) in nodes["n2"].calls


def test_the_text_plan_fits_80_columns(home, nodes, capsys):
    code, out, _err = dry_run(capsys, "alice", "n2")
    assert code == 0
    assert out.splitlines()[0].startswith("switch alice from n1 to n2: the checks pass")
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "GPU-n2-1" in out and "20004" in out and "version 6" in out


def test_a_target_without_free_gpus_fails_the_gpu_check_exits_10_and_changes_nothing(home, nodes, capsys):
    before = dump(home)
    code, out, err = dry_run(capsys, "alice", "n2", "--gpus", "9", "--json")
    plan = json.loads(out)
    assert code == 10
    assert plan["ok"] is False and plan["exit_code"] == 10
    failed = [c for c in plan["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["gpus"]
    assert "3 free GPU(s) of 4; 9 GPUs asked" in failed[0]["detail"]
    assert plan["checks"][-1]["name"] == "gpus"
    assert dump(home) == before
    assert nodes["n2"].changes() == []
    assert "9 GPUs asked" in err


def test_the_text_plan_shows_the_failed_check(home, nodes, capsys):
    code, out, _err = dry_run(capsys, "alice", "n2", "--gpus", "9")
    assert code == 10
    assert "the gpus check failed" in out.splitlines()[0]
    assert any(line.startswith("  FAILED gpus") for line in out.splitlines()), out


def test_a_desktop_held_by_an_interrupted_operation_fails_the_lock_check(home, nodes, capsys):
    with home.state() as db:
        op = Operation.begin(db, "switch", "alice", {"source": "n1", "target": "n2"})
        with op.step("preflight"):
            pass
        db.conn.execute(  # its process was killed: the lock names a dead pid
            "INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', ?, ?, 999999999, 0)",
            (op.id, socket.gethostname()))
    before = dump(home)
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 75 and plan["exit_code"] == 75 and plan["ok"] is False
    lock = check(plan, "lock")
    assert lock["ok"] is False
    assert f"held by operation {op.id} (switch), interrupted at step preflight" in lock["detail"]
    assert f"labvm ops resume {op.id}" in lock["detail"]
    assert dump(home) == before
    assert nodes["n2"].calls == []


def test_a_live_lock_fails_the_lock_check(home, nodes, capsys):
    with home.state() as db:
        db.conn.execute("INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES ('alice', NULL, ?, ?, 0)",
                        (socket.gethostname(), os.getpid()))
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 75 and not check(plan, "lock")["ok"]
    assert "locked by operation" in check(plan, "lock")["detail"]


def test_a_cordoned_target_fails_the_target_check(home, nodes, capsys):
    assert main(["node", "cordon", "n2", "--reason", "new disks"]) == 0
    capsys.readouterr()
    before = dump(home)
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 2 and plan["ok"] is False
    target = check(plan, "target")
    assert target["ok"] is False and "n2 is cordoned (new disks)" in target["detail"]
    assert dump(home) == before
    assert nodes["n2"].calls == []


def test_an_unreachable_target_fails_its_check(home, nodes, capsys):
    del nodes["n2"]
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 7
    assert not check(plan, "target reachable")["ok"] and "no route to host" in check(plan, "target reachable")["detail"]


def test_too_little_memory_fails_the_memory_check(home, nodes, capsys):
    nodes["n2"].answers[("probe", "facts")]["memory"]["total_mib"] = 1024
    with home.state() as db:
        db.conn.execute("UPDATE vms SET limits = ? WHERE user = 'alice'", (json.dumps({"memory": 1024 * MIB}),))
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 10
    assert not check(plan, "memory")["ok"] and "needs 1024 MiB" in check(plan, "memory")["detail"]


def test_a_target_without_moosefs_is_checked_not_mounted(home, nodes, capsys):
    nodes["n2"].answers[("mfs", "ensure_mounted")] = {"mounted": False}
    code, plan = dry_run_json(capsys, "alice", "n2")
    assert code == 0
    assert "the preflight mounts it" in check(plan, "MooseFS")["detail"]
    # The versions are read where MooseFS is mounted: on the source.
    assert "version 6" in check(plan, "versions")["detail"]
    assert ("merge", "versions", False) not in nodes["n2"].calls
    assert nodes["n2"].changes() == [] and nodes["n1"].changes() == []


def test_a_stopped_desktop_skips_the_steps_that_need_it_running(home, nodes, capsys):
    with home.state() as db:
        db.conn.execute("UPDATE vms SET state = 'stopped' WHERE user = 'alice'")
    code, plan = dry_run_json(capsys, "alice", "n2", "--gpus", "0")
    assert code == 0
    skipped = [s["name"] for s in plan["steps"] if s["skipped"]]
    assert skipped == ["precopy", "stop_source", "start_target", "verify"]
    assert "no GPUs" in check(plan, "gpus")["detail"]


def test_a_target_without_the_image_gets_it_as_a_step(home, nodes, capsys):
    nodes["n2"].answers[("image", "status")] = {"images": []}
    plant_image(home, IMAGE)
    code, out, _err = dry_run(capsys, "alice", "n2")
    assert code == 0, out
    text = " ".join(out.split())
    assert "image aaaaaaaaaaaa is not on n2: the push_image step sends it" in text
    assert "send image aaaaaaaaaaaa to n2 if it lacks it" in text


def test_an_image_neither_the_target_nor_the_admin_host_has_fails_the_check(home, nodes, capsys):
    nodes["n2"].answers[("image", "status")] = {"images": []}
    code, out, _err = dry_run(capsys, "alice", "n2")
    assert code == 9 and "FAILED image" in out and "not on this admin host" in out


def test_node_text_in_the_plan_is_escaped(home, nodes, capsys):
    nodes["n2"].answers[("probe", "facts")]["gpu_error"] = "\x1b[2Jgone"
    code, out, _err = dry_run(capsys, "alice", "n2")
    assert code == 1
    assert "\x1b" not in out and "\\x1b[2Jgone" in out


# -- the preflight of a real switch runs the same checks, and reserves what the plan showed ------
def preflight(home: AdminHome, gpus: str | None = None) -> Operation:
    params = {"source": "n1", "target": "n2", "gpus": gpus, "from_lost": False, "was_running": True, "base": 3,
              "precopy": True}
    with home.state() as db:
        op = Operation.begin(db, "switch", "alice", params)
        ctx = plan_mod.Context(home, db, "alice", params, op, say=lambda _m: None, progress=lambda _m: None)
        kind = SwitchKind(ctx)
        kind.checks(ctx.found)
        kind.claim()
        return op


def test_the_preflight_reserves_what_the_plan_showed(home, nodes, capsys):
    _code, plan = dry_run_json(capsys, "alice", "n2")
    op = preflight(home)
    assert op.params["target_gpus"] == [{"uuid": "GPU-n2-1", "index": 1}, {"uuid": "GPU-n2-2", "index": 2}]
    assert op.params["target_ports"] == [20004, 20005]
    assert "GPUs 1,2 (GPU-n2-1, GPU-n2-2)" in check(plan, "gpus")["detail"]
    with home.state() as db:
        held = [r["gpu_uuid"] for r in db.conn.execute("SELECT gpu_uuid FROM gpu_assignments WHERE user = 'alice' AND node = 'n2'")]
    assert sorted(held) == ["GPU-n2-1", "GPU-n2-2"]
    # It mounted MooseFS on the target for real, not in check mode.
    assert ("mfs", "ensure_mounted", False) in nodes["n2"].calls


def test_the_preflight_refuses_no_room_with_the_plans_error(home, nodes):
    before = dump(home)["gpu_assignments"]
    with pytest.raises(NoCapacity, match="3 free GPU"):
        preflight(home, gpus="9")
    assert dump(home)["gpu_assignments"] == before


def test_from_lost_checks_that_the_source_is_lost(home, nodes, capsys, monkeypatch):
    from labvm import switch as switch_mod

    monkeypatch.setattr(switch_mod, "node_unreachable", lambda node, home: None)
    code, plan = dry_run_json(capsys, "alice", "n2", "--from-lost")
    assert code == 2 and not check(plan, "source lost")["ok"]
    assert "n1 answers over SSH, so it is not lost" in check(plan, "source lost")["detail"]
    monkeypatch.setattr(switch_mod, "node_unreachable", lambda node, home: "no answer from 10.0.0.1:22")
    code, plan = dry_run_json(capsys, "alice", "n2", "--from-lost")
    assert code == 0 and check(plan, "source lost")["detail"] == "no answer from 10.0.0.1:22"
    assert "source answering" not in [c["name"] for c in plan["checks"]]
    assert [s["name"] for s in plan["steps"] if s["skipped"]] == ["precopy", "stop_source", "final_flush", "cleanup_source"]
    assert nodes["n1"].calls == []
