"""Text a lab member controls reaches the admin's terminal only escaped, and never crashes labvm.

A file name, a node's error, a sync error or an audit line may hold rich markup (`[/]`),
terminal escape sequences, bidi overrides or bytes that are not UTF-8. The real click commands
run here over a temp admin home whose audit log, operations journal and (fake) node replies
hold such text: each must exit 0, print only printable characters, and --json must give the
same text back exactly."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from labvm import files
from labvm.admin import AdminHome
from labvm.audit import AUDIT_LOG
from labvm.cli import cli, main
from labvm.cli_monitor import COMMANDS as MONITOR_COMMANDS
from labvm.config import Node, add_node_to_file
from labvm.desktops import Desktops
from labvm.errors import HelperFailed, NodeError
from labvm.journal import journaled
from labvm.text import safe
from tests.unit.test_monitor import FakeSessions, n1_sample

from .fake_node import TypedCalls

NODE = Node(name="n1", host="10.0.0.1", data_dir="/srv/labvm")

# Arbitrary text, and arbitrary bytes as labvm holds what is not UTF-8 (surrogate escapes).
HOSTILE = st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")))
NASTY = [
    "[/]",
    "[bold red]x[/bold red] [link=file:///etc/shadow]y[/link]",
    "\x1b]8;;http://evil.example/\x1b\\click me\x1b]8;;\x1b\\",
    "\x1b[2J\x1b[1;1Hrm -rf /\x07\r\x08\x9b31m",
    "\u202eexe.txt\u2066\u2069",
    b"\xff\xfe\x80 not utf-8 \xc3".decode("utf-8", "surrogateescape"),
    "\\x1b looks escaped",
]
EXAMPLES = [example(text) for text in NASTY]
runs = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def with_examples(test):
    for decorate in EXAMPLES:
        test = decorate(test)
    return test


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "admin" / "bkConfxml.xml"
    AdminHome(path).init()
    add_node_to_file(path, NODE)
    add_node_to_file(path, Node(name="n2", host="10.0.0.2"))
    return path


def invoke(config, *args: str):
    result = CliRunner().invoke(cli, ["-c", str(config), *args], catch_exceptions=True)
    assert result.exit_code == 0, (result.output, result.exception)
    assert all(char == "\n" or char.isprintable() for char in result.output), repr(result.output)
    return result.output


def printable_json(output: str):
    assert output.isascii()  # json.dumps escapes everything else, controls included
    return json.loads(output)


# -- the audit log ------------------------------------------------------------------------------
@runs
@with_examples
@given(text=HOSTILE)
def test_log_shows_any_audit_line(config, text):
    entry = {"time": 1714557600.0, "who": text, "command": text, "target": text, "result": text}
    raw = json.dumps(entry).encode() + b"\n" + b'{"time": 1, "who": "' + text.encode("utf-8", "surrogateescape") + b'"}\n'
    odd = [{**entry, "time": "yesterday"}, {**entry, "time": 1e308}, {**entry, "who": 5}, ["not", "an", "entry"]]
    log = config.parent / AUDIT_LOG
    log.write_bytes(raw + b"".join(json.dumps(o).encode() + b"\n" for o in odd) + b"\xff\xfe{\n")
    os.chmod(log, 0o600)
    assert "labvm log" in invoke(config, "log")
    invoke(config, "log", f"--target={text}")
    # Only well-formed entries are shown; a time too far out is shown as the number it is, and
    # a field that is not text as its JSON text.
    assert printable_json(invoke(config, "log", "--json")) == [entry, {**entry, "time": 1e308}, {**entry, "who": "5"}]


# -- the operations journal ---------------------------------------------------------------------
@runs
@with_examples
@given(text=HOSTILE)
def test_ops_list_and_show_any_recorded_error(config, text):
    with AdminHome(config).state() as db:
        db.conn.execute("DELETE FROM operation_steps")
        db.conn.execute("DELETE FROM operations")
        with pytest.raises(NodeError):
            with journaled(db, "switch", "alice", {"note": text}) as op:
                with op.step("stop"):
                    raise NodeError(node="n1", msg=text)
        # Rows whose text is not UTF-8 at all, as another program could leave them.
        raw = text.encode("utf-8", "surrogateescape")
        cursor = db.conn.execute(
            "INSERT INTO operations (kind, user, state, params, error, created_at, updated_at) "
            "VALUES (CAST(? AS TEXT), CAST(? AS TEXT), 'failed', CAST(? AS TEXT), CAST(? AS TEXT), 0, 0)",
            (raw, raw, raw, raw + b"\xff"))
        db.conn.execute("INSERT INTO operation_steps (op_id, seq, name, state, detail) VALUES (?, 1, CAST(? AS TEXT), 'failed', CAST(? AS TEXT))",
                        (cursor.lastrowid, raw, raw))
        op_id = op.id
    invoke(config, "ops", "list")
    invoke(config, "ops", "show", str(op_id))
    invoke(config, "ops", "show", str(cursor.lastrowid))
    shown = printable_json(invoke(config, "ops", "show", str(op_id), "--json"))
    assert shown["params"] == {"note": text} and shown["steps"][0]["state"] == "failed"
    printable_json(invoke(config, "ops", "list", "--json"))


# -- fake node replies --------------------------------------------------------------------------
class FakeSession(TypedCalls):
    def __init__(self, data):
        self.data = data
        self.runner = self

    def call(self, helper, action, params, check=False, timeout=None):
        return {"ok": True, "changed": False, "data": self.data}


@pytest.fixture
def node_replies(monkeypatch):
    """node_replies(data): every helper call on every node answers `data`."""
    def install(data):
        @contextmanager
        def session(*_args):
            yield FakeSession(data)

        @contextmanager
        def desktop_session(_home, _user):
            yield NODE, FakeSession(data)

        monkeypatch.setattr(Desktops, "session", lambda _self, _node: session())
        monkeypatch.setattr(Desktops, "get", lambda _self, _db, user: SimpleNamespace(user=user, node="n1", state="running"))
        monkeypatch.setattr(files, "desktop_session", desktop_session)

    return install


@runs
@with_examples
@given(text=HOSTILE)
def test_sync_status_shows_any_reply(config, node_replies, text):
    for data in ({"running": True, "pid": text, "pending": text, "lag_s": text, "last_success": text, "last_error": text},
                 {"running": False, "last_success": 1714557600.0, "last_error": text}):
        node_replies(data)
        assert "alice" in invoke(config, "sync", "status", "alice")
        assert printable_json(invoke(config, "sync", "status", "alice", "--json")) == data


@runs
@with_examples
@given(text=HOSTILE)
def test_files_shows_any_path_and_link(config, node_replies, text):
    data = {"root": text, "host_path": text, "mounted": True, "type": text, "size": 12, "target": text, "mode": 0o644}
    node_replies(data)
    invoke(config, "files", "alice", "/home/alice")
    assert printable_json(invoke(config, "files", "alice", "/home/alice", "--json")) == {"node": "n1", **data}


def test_the_symlink_named_markup_that_crashed_files(config, node_replies):
    node_replies({"root": "/srv/labvm/vms/alice/merge_local", "host_path": "/srv/labvm/vms/alice/merge_local/[/]",
                  "mounted": True, "type": "symlink", "size": None, "target": "[/]\x1b[31m"})
    output = invoke(config, "files", "alice", "/[/]")
    assert "merge_local/[/]" in output and "-> [/]\\x1b[31m" in output


# -- errors and node tables, through main() as the labvm command runs them ----------------------
@pytest.mark.parametrize("text", NASTY)
def test_a_node_error_is_one_escaped_line(config, monkeypatch, capsys, text):
    @contextmanager
    def failing(_home, _user):
        raise HelperFailed("n1", "files", "locate", "io", text)
        yield

    monkeypatch.setattr(files, "desktop_session", failing)
    assert main(["-c", str(config), "files", "alice", "/home/alice"]) == 7
    err = capsys.readouterr().err
    assert err == f"labvm: error: n1: files.locate failed [io]: {safe(text)}\n"
    assert main(["-c", str(config), "log", "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert all(char == "\n" or char.isprintable() for char in shown)


@pytest.mark.parametrize("text", NASTY)
def test_status_tables_escape_what_nodes_report(config, monkeypatch, capsys, text):
    for command in MONITOR_COMMANDS:
        cli.add_command(command)
    n1 = n1_sample()
    n1["node"].update(docker_error=text, gpu_error=text)
    n1["node"]["mfs"].update(healthy=False, error=text)
    n1["node"]["gpus"][1]["processes"][0].update(user=None, container=text)
    n1["desktops"][0]["state"] = text
    n1["desktops"][1]["sync"]["last_error"] = text
    answers = {"n1": n1, "n2": NodeError(node="n2", msg=text)}
    monkeypatch.setattr("labvm.cli_monitor.NodeSessions", lambda _home, timeout: FakeSessions(answers, timeout))
    with AdminHome(config).state() as db:
        for port, user in enumerate(("alice", "bobby")):
            if not db.has_user(user):
                db.add_user(user, "a good password")
                db.conn.execute("INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, created_at, updated_at) "
                                "VALUES (?, 'n1', 'running', ?, ?, '{}', 0, 0, 0)", (user, 20000 + 2 * port, 20001 + 2 * port))
    assert main(["-c", str(config), "status"]) == 7
    captured = capsys.readouterr()
    assert all(char == "\n" or char.isprintable() for char in captured.out + captured.err)
