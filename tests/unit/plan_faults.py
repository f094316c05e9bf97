"""What the rollback tests of the plans share: an admin home made once and copied per test, the
fake cluster around it, a step made to fail (before or after its work), a run that dies like
kill -9, and the state database's rows to compare."""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from labvm import plan as plan_mod
from labvm.admin import AdminHome
from labvm.cli import main
from labvm.config import Node, add_node_to_file
from labvm.desktops import LimitOverrides, resolve_limits

from .fake_cluster import IMAGE, IMAGE_B, FakeCluster, plant_image

PW = "a good password"
MIB = 1 << 20
DEAD_PID = 999999999
JOURNAL = ("operations", "operation_steps", "vm_locks", "sqlite_sequence")


class Interrupted(BaseException):
    """The process dies here (kill -9): nothing after it runs, not even the undo."""


def admin_template(tmp_path_factory, users: tuple[str, ...], desktops: tuple[tuple[str, str, int], ...],
                   gpus: tuple[tuple[str, str, int, str], ...]) -> Path:
    """An admin home with nodes n1 and n2, the members, their desktops' rows (user, node,
    version; running) and GPU assignments (uuid, node, index, user), made once (labvm init
    makes an SSH key) to be copied for each test."""
    config = tmp_path_factory.mktemp("template") / "admin" / "bkConfxml.xml"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABVM_CONFIG", str(config))
        assert main(["init"]) == 0
    add_node_to_file(config, Node(name="n1", host="10.0.0.1"))
    add_node_to_file(config, Node(name="n2", host="10.0.0.2"))
    home = AdminHome(config)
    limits = {**resolve_limits(home.config, LimitOverrides()).as_dict(), "memory": 512 * MIB}
    with home.state() as db:
        for user in users:
            db.add_user(user, PW)
        for user, node, version in desktops:
            db.conn.execute(
                "INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, image, created_at, updated_at) "
                "VALUES (?, ?, 'running', 20000, 20001, ?, ?, ?, 0, 0)", (user, node, json.dumps(limits), version, IMAGE))
        for row in gpus:
            db.conn.execute("INSERT INTO gpu_assignments VALUES (?, ?, ?, ?, 0)", row)
    plant_image(home, IMAGE)
    plant_image(home, IMAGE_B)
    return config.parent


def copied_home(template: Path, tmp_path: Path, monkeypatch) -> AdminHome:
    admin = tmp_path / "admin"
    shutil.copytree(template, admin)
    monkeypatch.setenv("LABVM_CONFIG", str(admin / "bkConfxml.xml"))
    return AdminHome(admin / "bkConfxml.xml")


def seeded_cluster(home: AdminHome, monkeypatch) -> FakeCluster:
    """n1 and n2, with bob's desktop running on n2."""
    fake = FakeCluster(home.config)
    fake.install(monkeypatch)
    fake.seed(home, "bob")
    return fake


def state_rows(home: AdminHome) -> dict[str, list[dict]]:
    """Every row of the state database but the journal's (with its id sequence) and the locks',
    without vms.updated_at."""
    with home.state() as db:
        tables = [r["name"] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {}
        for table in tables:
            if table in JOURNAL:
                continue
            rows = [dict(r) for r in db.conn.execute(f"SELECT * FROM {table}")]
            if table == "vms":
                for row in rows:
                    row.pop("updated_at")
            out[table] = sorted(rows, key=repr)
        return out


def fail_step(monkeypatch, cluster: FakeCluster, kind, name: str, when: str, exc: BaseException) -> None:
    """The named step of the kind's next plan fails once with exc, before its work or after it.
    The check step's work is its claim: before it, its checks fail. A step whose work is helper
    calls fails on its node: its first call before acting, or its last call after acting (the
    node did the work, its reply was lost), so the steps before it in the same round trip are done."""
    left = [exc]

    def failing(work):
        def run(*args, **kwargs):
            if not left:
                return work(*args, **kwargs)
            raised = left.pop()
            if when == "before":
                raise raised
            work(*args, **kwargs)
            raise raised

        return run

    def failing_calls(step):
        def calls():
            made = step.calls()
            if left:
                call = made[0] if when == "before" else made[-1]
                cluster[step.node].fail(call.helper, call.action, exc=left.pop(), after=when == "after", check=False)
            return made

        return calls

    if name == kind.check_step:
        method = "checks" if when == "before" else "claim"
        monkeypatch.setattr(kind, method, failing(getattr(kind, method)))
        return
    built = kind.steps

    def steps(self):
        out = []
        for s in built(self):
            if s.name == name:
                s = replace(s, calls=failing_calls(s)) if s.calls is not None else replace(s, apply=failing(s.apply))
            out.append(s)
        return out

    monkeypatch.setattr(kind, "steps", steps)


def never_undo(monkeypatch) -> None:
    """The runner dies with the step: _fail raises on without undoing anything."""
    def fail(self, kind, steps, failed, exc):
        raise exc

    monkeypatch.setattr(plan_mod.Runner, "_fail", fail)


def as_if_killed(home: AdminHome, user: str, op_id: int) -> None:
    """What kill -9 leaves: the operation running, its step running, its lock held by a dead pid."""
    with home.state() as db:
        db.conn.execute("UPDATE operations SET state = 'running', error = NULL WHERE id = ?", (op_id,))
        db.conn.execute("UPDATE operation_steps SET state = 'running', detail = NULL, finished_at = NULL "
                        "WHERE op_id = ? AND state = 'failed'", (op_id,))
        db.conn.execute("INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES (?, ?, ?, ?, 0)",
                        (user, op_id, socket.gethostname(), DEAD_PID))
