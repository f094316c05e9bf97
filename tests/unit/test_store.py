"""The store (StateDB) owns the rows: create and switch reserve GPUs and ports through its one
reservation path, which refuses a GPU or port already taken inside its transaction, and no other
module of labvm runs SQL."""

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from labvm import desktops as desktops_mod
from labvm import plan as plan_mod
from labvm.admin import AdminHome
from labvm.cli import main
from labvm.config import Node, add_node_to_file
from labvm.desktops import Desktops
from labvm.errors import NoCapacity
from labvm.journal import Operation
from labvm.placement import GpuRequest, NodeCapacity
from labvm.state import StateDB
from labvm.switch import SwitchKind

PW = "a good password"
N1 = Node(name="n1", host="10.0.0.1")
N2 = Node(name="n2", host="10.0.0.2")
PACKAGE = Path(__file__).resolve().parents[2] / "labvm"
STORE_MODULES = {PACKAGE / "state.py"}


def gpus(node: str, count: int = 2) -> list[dict]:
    return [{"index": i, "uuid": f"GPU-{node}-{i}"} for i in range(count)]


def capacity(node: Node, count: int = 2, listening=()) -> NodeCapacity:
    return NodeCapacity(node, gpus(node.name, count), set(), 16 << 30, 0, ports_in_use=frozenset(listening))


@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    add_node_to_file(config, N1)
    add_node_to_file(config, N2)
    monkeypatch.setattr(desktops_mod.HelperBundle, "from_package", classmethod(lambda cls: None))
    home = AdminHome(config)
    with home.state() as db:
        for user in ("alice", "bob", "carol"):
            db.add_user(user, PW)
        # alice's desktop runs on n1 with its GPU 0 and ports 20000, 20001.
        db.reserve("alice", "n1", lambda taken, used: ([gpus("n1")[0]], (20000, 20001)), new_limits={"memory": 1})
    return home


def rows(db: StateDB) -> dict:
    return {
        "vms": sorted((u, db.desktop_row(u)["node"], db.desktop_row(u)["vnc_port"]) for u in db.desktop_users()),
        "gpus": {node: sorted(db.gpus_taken_on(node)) for node in ("n1", "n2")},
    }


@pytest.fixture
def reservations(monkeypatch) -> list[dict]:
    """Every call of StateDB.reserve, with its arguments, passed on to the real one."""
    calls: list[dict] = []
    real = StateDB.reserve

    def spy(self, user, node, choose, **kwargs):
        calls.append({"user": user, "node": node, **kwargs})
        return real(self, user, node, choose, **kwargs)

    monkeypatch.setattr(StateDB, "reserve", spy)
    return calls


def test_create_and_switch_reserve_through_the_one_store_method(home, reservations):
    with home.state() as db:
        Desktops(home)._reserve(db, "bob", N1, capacity(N1), GpuRequest(count=1), SimpleNamespace(as_dict=lambda: {"memory": 2}),
                                "a" * 64)
        op = Operation.begin(db, "switch", "alice", {"source": "n1", "target": "n2"})
        kind = SwitchKind(plan_mod.Context(home, db, "alice", op.params, op, say=lambda _m: None, progress=lambda _m: None))
        kind.cap, kind.request, kind.limits = capacity(N2), GpuRequest(count=2), {"memory": 1}
        kind.claim()
        assert [(c["user"], c["node"]) for c in reservations] == [("bob", "n1"), ("alice", "n2")]
        assert reservations[0]["new_limits"] == {"memory": 2} and reservations[0].get("switch_op") is None
        assert reservations[1]["switch_op"] == op.id and reservations[1].get("new_limits") is None
        # bob got n1's free GPU and the next free ports; alice holds n2's GPUs, in the journal too.
        bob = Desktops(home).get(db, "bob")
        assert (bob.node, bob.state, bob.gpus, bob.vnc_port) == ("n1", "creating", [gpus("n1")[1]], 20002)
        assert db.gpu_assignments("alice", "n2") == gpus("n2")
        assert Operation.load(db, op.id).params["target_gpus"] == gpus("n2")


def test_a_gpu_already_taken_is_refused_inside_the_transaction(home):
    with home.state() as db:
        before = rows(db)
        with pytest.raises(NoCapacity, match="GPU GPU-n1-0 already taken"):
            db.reserve("bob", "n1", lambda taken, used: ([gpus("n1")[0]], (20010, 20011)), new_limits={})
        assert rows(db) == before and not db.conn.in_transaction
        # The real choice finds no GPU left for two, and nothing is written either.
        with pytest.raises(NoCapacity):
            db.reserve("bob", "n1", capacity(N1).choice(GpuRequest(count=2)), new_limits={})
        assert rows(db) == before and not db.conn.in_transaction


def test_a_port_already_taken_is_refused_inside_the_transaction(home):
    with home.state() as db:
        before = rows(db)
        with pytest.raises(NoCapacity, match="port 20001 already taken"):
            db.reserve("bob", "n1", lambda taken, used: ([], (20002, 20001)), new_limits={})
        assert rows(db) == before and not db.conn.in_transaction


def test_a_switch_counts_the_ports_other_switches_hold_and_its_own_as_free(home):
    with home.state() as db:
        db.reserve("carol", "n2", lambda taken, used: ([], (20000, 20001)), new_limits={})  # carol's desktop, on n2
        db.begin_operation("switch", "bob", {"target": "n1", "target_ports": [20002, 20003]})
        mine = Operation.begin(db, "switch", "carol", {"target": "n1"})
        with pytest.raises(NoCapacity, match="port 20002, port 20003 already taken"):
            db.reserve("carol", "n1", lambda taken, used: ([], (20002, 20003)), switch_op=mine.id)
        # The real choice steps over them and over what the node listens on.
        choice = capacity(N1, listening=[20004]).choice(GpuRequest(count=1))
        chosen, ports = db.reserve("carol", "n1", choice, switch_op=mine.id)
        assert (chosen, ports) == ([gpus("n1")[1]], (20006, 20007))
        mine.remember(target_ports=list(ports))
        # Run again (a resumed preflight): its own ports and GPUs there are free to it, and replaced.
        assert db.reserve("carol", "n1", choice, switch_op=mine.id) == ([gpus("n1")[1]], (20006, 20007))
        assert db.gpu_assignments("carol", "n1") == [gpus("n1")[1]]


def test_a_create_never_takes_the_ports_a_running_switch_to_the_node_holds(home):
    with home.state() as db:
        db.begin_operation("switch", "bob", {"target": "n1", "target_ports": [20002, 20003]})
        with pytest.raises(NoCapacity, match="port 20002, port 20003 already taken"):
            db.reserve("carol", "n1", lambda taken, used: ([], (20002, 20003)), new_limits={})
        chosen, ports = db.reserve("carol", "n1", capacity(N1).choice(GpuRequest(count=0)), new_limits={})
        assert not {20002, 20003} & set(ports)


def test_what_the_reservation_runs_in_it_is_rolled_back_with_it(home):
    seen = []

    def then(chosen, ports):
        seen.append(db.conn.in_transaction)
        raise RuntimeError("journal write failed")

    with home.state() as db:
        db.reserve("carol", "n2", lambda taken, used: ([], (20000, 20001)), new_limits={})
        before = rows(db)
        with pytest.raises(RuntimeError):
            db.reserve("carol", "n1", capacity(N1).choice(GpuRequest(count=1)), switch_op=1, then=then)
        assert seen == [True] and rows(db) == before and db.gpu_assignments("carol", "n1") == []


SQL_START = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|BEGIN|COMMIT|ROLLBACK|PRAGMA)(\s|;|$)")


def test_no_module_but_the_store_runs_sql():
    """Every statement on the state database is a method of the store: no other module calls
    execute, executemany or executescript, or holds a string that starts as an SQL statement."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "desktops.py" in modules and STORE_MODULES <= set(modules)
    found = []
    for module in modules:
        if module in STORE_MODULES:
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            where = f"{module.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("execute", "executemany", "executescript"):
                found.append(f"{where} calls .{node.func.attr}(")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_START.match(node.value):
                found.append(f"{where} holds SQL: {node.value[:40]!r}")
    assert found == [], "SQL outside the store:\n" + "\n".join(found)



# Modules that drive a helper of their own, outside a desktop's life: the node and image
# commands, and `labvm files` (the files helper, whose requests are its paths).
NODE_WIDE = {PACKAGE / "nodes.py", PACKAGE / "images.py", PACKAGE / "files.py"}


def test_the_operations_ask_nodes_through_typed_calls_only():
    """An operation never spells out a helper request by hand (`s.call("vm", "...", {...})`):
    it builds it with labvm/remote/recipes.py, so a fake node sees every request the same way."""
    found = []
    for module in sorted(PACKAGE.glob("*.py")):
        if module in NODE_WIDE:
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call" \
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append(f"{module.relative_to(PACKAGE.parent)}:{node.lineno} calls {node.args[0].value!r} by hand")
    assert found == [], "\n".join(found)
