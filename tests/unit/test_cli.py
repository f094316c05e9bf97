"""The CLI layer: one clear line per failure, exit codes, --json, passwords never from argv, completion."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.text import Text

from labvm.cli import main
from labvm.config import Node
from labvm.text import safe

from .fake_node import TypedCalls

PW = "a good password"


@pytest.fixture
def home(tmp_path, monkeypatch):
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    return config.parent


def run(argv, stdin="", monkeypatch=None):
    sys.stdin = io.StringIO(stdin)
    try:
        return main(argv)
    finally:
        sys.stdin = sys.__stdin__


def test_init_creates_private_state_and_is_idempotent(home, capsys):
    for name, mode in [("state.db", 0o600), ("secret.key", 0o600), ("id_ed25519", 0o600)]:
        assert os.stat(home / name).st_mode & 0o777 == mode
    assert (home / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    capsys.readouterr()
    assert main(["init"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_user_add_list_json(home, capsys):
    assert run(["user", "add", "alice", "--password-stdin"], PW + "\n") == 0
    capsys.readouterr()
    assert main(["user", "list", "--json"]) == 0
    users = json.loads(capsys.readouterr().out)
    assert [u["name"] for u in users] == ["alice"] and users[0]["uid"] == 2000


def test_duplicate_user_is_one_clear_line(home, capsys):
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    capsys.readouterr()
    assert run(["user", "add", "alice", "--password-stdin"], PW + "\n") == 5
    err = capsys.readouterr().err
    assert err.strip() == "labvm: error: user 'alice' already exists"


def test_bad_name_changes_nothing(home, capsys):
    assert run(["user", "add", "x;reboot", "--password-stdin"], PW + "\n") == 2
    assert "invalid user name" in capsys.readouterr().err
    main(["user", "list", "--json"])
    assert json.loads(capsys.readouterr().out) == []


def test_password_cannot_come_from_argv(home, capsys):
    assert main(["user", "add", "alice", "--password", PW]) == 2
    assert "No such option" in capsys.readouterr().err


def test_no_terminal_and_no_password_stdin_is_refused(home, capsys):
    assert run(["user", "add", "alice"], "") == 2
    assert "--password-stdin" in capsys.readouterr().err


def test_debug_shows_traceback_and_plain_run_does_not(home, capsys):
    (home / "bkConfxml.xml").write_text("<labvm version='1'><storage>")
    assert main(["node", "list"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not well-formed XML" in err and len(err.strip().splitlines()) == 1
    assert main(["--debug", "node", "list"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_insecure_database_is_refused(home, capsys):
    os.chmod(home / "state.db", 0o644)
    assert main(["user", "list"]) == 6
    assert "chmod 600" in capsys.readouterr().err


def test_node_list_json_empty_and_unknown_node(home, capsys):
    assert main(["node", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["node", "check", "nope"]) == 4
    assert "unknown node 'nope'" in capsys.readouterr().err


def test_text_that_reads_like_an_emoji_code_is_printed_as_it_is(home, capsys):
    """A fingerprint (`F1:AB:F3`) or a name like `:smile:` must not turn into a picture."""
    from labvm.cli_kit import say, warn

    say("F1:AB:F3 :smile:")
    warn(":ab:")
    assert main(["node", "check", ":ab:"]) == 4
    captured = capsys.readouterr()
    assert captured.out == "F1:AB:F3 :smile:\n"
    assert captured.err == "labvm: warning: :ab:\nlabvm: error: unknown node ':ab:' (known: none configured)\n"


def test_node_add_rejects_bad_input_before_connecting(home, capsys):
    before = (home / "bkConfxml.xml").read_bytes()
    assert main(["node", "add", "n1", "host;rm -rf /", "--yes"]) == 2
    assert "Element 'host'" in capsys.readouterr().err
    assert (home / "bkConfxml.xml").read_bytes() == before


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef labvm"), ("fish", "complete --no-files --command labvm")])
def test_completion_scripts(shell, marker, capsys):
    assert main(["completion", shell]) == 0
    assert marker in capsys.readouterr().out


def complete(words: str, cword: int, env) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "labvm"],
        env={**env, "_LABVM_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_dynamic_completion_of_users_and_nodes(home):
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    run(["user", "add", "albert", "--password-stdin"], PW + "\n")
    config = home / "bkConfxml.xml"
    config.write_text(config.read_text().replace("  </nodes>", '    <node name="gpu7"><host>10.9.9.9</host></node>\n  </nodes>'))
    env = dict(os.environ)
    assert complete("labvm user passwd al", 3, env) == ["albert", "alice"]
    assert complete("labvm node check ", 3, env) == ["gpu7"]
    assert complete("labvm node ", 2, env) == ["add", "check", "cordon", "drain", "list", "rekey", "rm", "uncordon"]
    # A broken setup completes nothing, and prints no traceback into the shell.
    env["LABVM_CONFIG"] = str(Path(home) / "missing.xml")
    assert complete("labvm node check ", 3, env) == []


def test_changing_commands_are_audited_and_reads_are_not(home, capsys):
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    run(["user", "add", "x;y", "--password-stdin"], PW + "\n")
    main(["user", "list"])
    capsys.readouterr()
    assert os.stat(home / "audit.log").st_mode & 0o777 == 0o600
    assert main(["log", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["command"], e["target"], e["result"]) for e in entries] == [
        ("labvm init", None, "ok"),
        ("labvm user add", "alice", "ok"),
        ("labvm user add", "alice", "failed: user 'alice' already exists"),
        ("labvm user add", "x;y", "failed: invalid user name 'x;y': use a lowercase letter followed by up to 30 lowercase letters, "
                                         "digits or '-', not ending in '-' (no '_' or '.')"),
    ]
    assert all(e["who"] for e in entries)
    assert PW not in (home / "audit.log").read_text()
    assert main(["log", "--json", "-t", "alice", "-n", "1"]) == 0
    assert [e["result"] for e in json.loads(capsys.readouterr().out)] == ["failed: user 'alice' already exists"]


def test_completion_of_operation_ids(home):
    from labvm.journal import Operation
    from labvm.state import StateDB

    with StateDB.open(Path(home)) as db:
        ids = [Operation.begin(db, "switch", "alice", {}).id for _ in range(3)]
    assert complete("labvm ops show ", 3, dict(os.environ)) == [str(i) for i in sorted(ids, reverse=True)]
    assert complete(f"labvm ops resume {ids[0]}", 3, dict(os.environ)) == [str(ids[0])]


@pytest.mark.parametrize("password", ["pa\udcffss", "\udce9t\udce9"])
def test_a_password_that_is_not_utf8_is_refused_without_showing_it(home, capsys, password):
    assert run(["user", "add", "alice", "--password-stdin"], password + "\n") == 2
    err = capsys.readouterr().err
    assert err == "labvm: error: the password is not valid UTF-8 text; choose another\n"
    assert main(["user", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []


def test_a_password_of_raw_bytes_on_stdin_is_refused_without_showing_it(home):
    """As a script would pipe it: bytes that are not UTF-8, read by the real command."""
    result = subprocess.run([sys.executable, "-m", "labvm", "user", "add", "alice", "--password-stdin"],
                            input=b"secret\xe9\xff7\n", capture_output=True, timeout=60, env={**os.environ, "PYTHONUTF8": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr == b"labvm: error: the password is not valid UTF-8 text; choose another\n"


@pytest.mark.parametrize(
    "name, mode, fix",
    [
        ("id_ed25519", 0o644, "chmod 600"),
        ("secret.key", 0o604, "chmod 600"),
        ("state.db", 0o640, "chmod 600"),
        ("known_hosts", 0o644, "chmod 600"),
        ("ca.key", 0o640, "chmod 600"),
        ("audit.log", 0o620, "chmod 600"),
        ("bkConfxml.xml", 0o666, "chmod go-w"),
        ("bkConfxml.xml", 0o620, "chmod go-w"),
        ("id_ed25519.pub", 0o646, "chmod go-w"),
        (".", 0o777, "chmod go-w"),
        (".", 0o770, "chmod go-w"),
    ],
)
def test_unsafe_admin_state_is_refused_naming_the_fix(home, capsys, name, mode, fix):
    path = (home / name) if name != "." else home
    path.touch()
    os.chmod(path, mode)
    for command in (["user", "list"], ["node", "list"], ["init"]):
        assert main(command) == 6, command
        assert capsys.readouterr().err == f"labvm: error: {path} {'is readable or writable by others' if fix == 'chmod 600' else 'is writable by group or others'} (mode {mode:04o}); run: {fix} {path}\n"


def test_safe_modes_that_are_not_the_defaults_are_accepted(home, capsys):
    for name, mode in (("bkConfxml.xml", 0o644), ("bkConfxml.xml", 0o600), ("id_ed25519.pub", 0o444), (".", 0o755)):
        os.chmod(home if name == "." else home / name, mode)
        assert main(["user", "list"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["secret.key", "bkConfxml.xml", "id_ed25519", "."])
def test_admin_state_owned_by_another_user_is_refused(home, capsys, monkeypatch, name):
    path = home if name == "." else home / name
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        owner, me = 65534, "root"
    else:  # the same check, seen from a user who is not the owner
        owner = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
        path, me = home, str(owner + 1)
    assert main(["user", "list"]) == 6
    assert capsys.readouterr().err == f"labvm: error: {path} is owned by uid {owner}, not by {me} who runs labvm; run: chown {me} {path}\n"


def test_a_fresh_init_passes_its_own_check_even_under_a_loose_umask(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABVM_CONFIG", str(tmp_path / "fresh" / "bkConfxml.xml"))
    old = os.umask(0)
    try:
        assert main(["init"]) == 0
        assert run(["user", "add", "alice", "--password-stdin"], PW + "\n") == 0
    finally:
        os.umask(old)
    assert main(["user", "list"]) == 0, capsys.readouterr().err
    assert main(["log", "--json"]) == 0


def test_an_operation_id_is_audited_as_text_and_the_log_shows_it(home, capsys):
    assert main(["ops", "resume", "999"]) == 2
    capsys.readouterr()
    last = json.loads((home / "audit.log").read_text().splitlines()[-1])
    assert last["command"] == "labvm ops resume" and last["target"] == "999"
    assert main(["log"]) == 0
    assert "999" in capsys.readouterr().out
    assert main(["log", "--json", "-t", "999"]) == 0
    assert [e["target"] for e in json.loads(capsys.readouterr().out)] == ["999"]


def test_the_log_shows_audit_fields_of_any_json_type(home, capsys):
    """Lines an older labvm wrote with an operation's id as a number, or any other JSON value
    where text belongs, are shown as that value's text, never a crash."""
    odd = [{"time": 1714557600.0, "who": "root", "command": "labvm ops resume", "target": 5, "result": "ok"},
           {"time": 1714557601, "who": ["x", 1], "command": {"a": None}, "target": True, "result": 2.5}]
    with open(home / "audit.log", "a") as log:
        log.writelines(json.dumps(entry) + "\n" for entry in odd)
    assert main(["log"]) == 0
    shown = capsys.readouterr().out
    assert "labvm ops resume" in shown and '["x", 1]' in shown and "2.5" in shown
    assert main(["log", "--json", "-t", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == [{**odd[0], "target": "5"}]
    assert main(["log", "--json", "-n", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"time": 1714557601, "who": '["x", 1]', "command": '{"a": null}', "target": "true", "result": "2.5"}]


def test_backup_of_an_unknown_user_or_one_without_a_desktop_exits_4(home, capsys, monkeypatch):
    from labvm.storage import Storage

    monkeypatch.setattr(Storage, "backup", lambda _self, user: pytest.fail(f"backed up {user}"))
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    capsys.readouterr()
    assert main(["backup", "nobody"]) == 4
    assert capsys.readouterr().err == "labvm: error: unknown user 'nobody'; see `labvm user list`\n"
    assert main(["backup", "alice"]) == 4
    assert capsys.readouterr().err == "labvm: error: alice has no desktop; create one with `labvm create alice`\n"


class FakeNode(TypedCalls):
    """A node session whose helpers answer from `answers` ("helper.action" -> data), recording each call."""

    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []
        self.node = Node(name="n1", host="10.0.0.1")

    def call(self, helper, action, params, timeout=None):
        self.calls.append(f"{helper}.{action}")
        return {"ok": True, "changed": False, "data": self.answers.get(f"{helper}.{action}", {})}


@pytest.fixture
def desktop(home, monkeypatch):
    """alice with a desktop on node n1 (state: desktop.state); desktop.node answers its helper calls."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from labvm.admin import AdminHome
    from labvm.config import Node, add_node_to_file
    from labvm.desktops import Desktops

    config = home / "bkConfxml.xml"
    add_node_to_file(config, Node(name="n1", host="10.0.0.1"))
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    with AdminHome(config).state() as db:
        db.conn.execute("INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, created_at, updated_at) "
                        "VALUES ('alice', 'n1', 'running', 20000, 20001, '{}', 1, 0, 0)")
    fake = SimpleNamespace(node=FakeNode({}))

    @contextmanager
    def session(_self, _node):
        yield fake.node

    monkeypatch.setattr(Desktops, "session", session)

    def set_state(state):
        with AdminHome(config).state() as db:
            db.conn.execute("UPDATE vms SET state = ? WHERE user = 'alice'", (state,))

    fake.set_state = set_state
    return fake


def test_versions_shows_v0_with_its_time_and_dashes_for_what_is_not_known(desktop, capsys, monkeypatch):
    import datetime as dt

    monkeypatch.setenv("COLUMNS", "200")
    day = dt.datetime(2026, 5, 1, 12, 0).timestamp()
    desktop.node.answers["merge.versions"] = {"versions": [
        {"version": 0, "created": day, "files": None, "bytes": None, "base": None, "reason": "create"},
        {"version": 1, "created": day + 86400, "files": 12, "bytes": 4096, "base": 0}]}
    capsys.readouterr()
    assert main(["versions", "alice"]) == 0
    rows = {line.split()[1]: [c.strip() for c in line.split("│")[1:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│ v")}
    assert rows["v0"][:5] == ["v0", "2026-05-01 12:00", "create", "-", "-"], rows
    # v1 was published before versions had a reason.
    assert rows["v1"][:5] == ["v1 (in use)", "2026-05-02 12:00", "-", "12", "4.0 KiB"], rows
    # A version the node gives no time for is shown, as the oldest, with "-".
    desktop.node.answers["merge.versions"]["versions"][0]["created"] = None
    assert main(["versions", "alice"]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│ v")]
    assert [c.strip() for c in shown[-1].split("│")[1:6]] == ["v0", "-", "create", "-", "-"], shown


def test_versions_shows_why_each_exists_in_80_columns_and_in_json(desktop, capsys, monkeypatch):
    import datetime as dt

    monkeypatch.setenv("COLUMNS", "80")
    night = dt.datetime(2026, 5, 1, 3, 17).timestamp()
    versions = [{"version": 0, "created": night - 30 * 86400, "files": None, "bytes": None, "base": None,
                 "reason": "create"},
                {"version": 1, "created": night, "files": 123456, "bytes": 5 << 30, "base": 0, "reason": "backup"}]
    for n, reason in enumerate(("switch", "switch", "switch", "switch", "solidify", "restore", "\x1b[2Jodd"), 2):
        versions.append({"version": n, "created": night + n * 3600, "files": 123456, "bytes": 5 << 30, "base": n - 1,
                         "reason": reason})
    desktop.node.answers["merge.versions"] = {"versions": versions}
    capsys.readouterr()
    assert main(["versions", "alice"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "\x1b" not in out
    rows = {line.split()[1]: [c.strip() for c in line.split("│")[1:-1]]
            for line in out.splitlines() if line.startswith("│ v")}
    # One line per version: neither its time nor its reason is split.
    assert rows["v1"][1:3] == ["2026-05-01 03:17", "backup"], rows
    assert [rows[f"v{n}"][2] for n in range(9)] == ["create", "backup", *["switch"] * 4, "solidify", "restore", "-"]

    assert main(["versions", "alice", "--json"]) == 0
    shown = {v["version"]: v for v in json.loads(capsys.readouterr().out)["versions"]}
    assert [shown[n]["reason"] for n in range(9)] == [
        "create", "backup", "switch", "switch", "switch", "switch", "solidify", "restore", None]
    # The default rule (keep_last 7) counts the backups, the odd reason among them.
    assert shown[8]["kept_by"] == "keep_last #1" and shown[1]["kept_by"] == "keep_last #2"
    assert shown[7]["kept_by"] == "recent restore #1" and shown[0]["kept_by"] == "recent create #7"


def failed_op(home: Path, error: str) -> int:
    from labvm.errors import NodeError
    from labvm.journal import journaled
    from labvm.state import StateDB

    with StateDB.open(Path(home)) as db:
        with pytest.raises(NodeError):
            with journaled(db, "switch", "alice", {}) as op:
                with op.step("stop"):
                    raise NodeError(node="n1", msg=error)
        return op.id


LONG_ERROR = "docker refused the container [/] because " + " ".join(f"reason{i}" for i in range(40)) + " \x1b[31m THE-END"


def test_ops_list_shows_the_whole_error_on_one_line_into_a_pipe(home, capsys):
    failed_op(home, LONG_ERROR)
    capsys.readouterr()
    assert main(["ops", "list"]) == 0
    shown = capsys.readouterr().out
    (row,) = [line for line in shown.splitlines() if "switch" in line]
    assert f"n1: {safe(LONG_ERROR)}" in row


def test_ops_list_wraps_the_whole_error_on_a_terminal(home, monkeypatch):
    from rich.console import Console

    from labvm import cli_ops

    failed_op(home, LONG_ERROR)
    screen = io.StringIO()
    monkeypatch.setattr(cli_ops, "out", Console(file=screen, force_terminal=True, width=100, highlight=False, soft_wrap=True))
    assert main(["ops", "list"]) == 0
    lines = screen.getvalue().splitlines()
    assert max(len(Text.from_ansi(line).plain) for line in lines) <= 100
    words = " ".join(Text.from_ansi(line).plain.split("│")[-2].strip() for line in lines if "│" in line)
    assert "reason39 \\x1b[31m THE-END" in words and "\x1b[31m THE" not in screen.getvalue()


def test_ops_show_lists_each_step_once_with_its_latest_state_after_a_resume(home, capsys):
    from labvm.journal import Operation
    from labvm.state import StateDB

    with StateDB.open(Path(home)) as db:
        op = Operation.begin(db, "restore", "alice", {})
        with op.step("mount_mfs"):
            pass
        with pytest.raises(RuntimeError):
            with op.step("publish"):
                raise RuntimeError("node gone")
        op._finish_step(op._seq, "running", None)  # as a process killed in the step leaves it
        op = Operation.load(db, op.id)  # resumed: the steps not done run again
        with op.step("publish"):
            pass
        with op.step("mount_mfs"):  # a restore mounts MooseFS a second time to start the desktop
            pass
        op.finish("done")
        aborted = Operation.begin(db, "backup", "alice", {})
        aborted._seq += 1
        db.conn.execute("INSERT INTO operation_steps (op_id, seq, name, state, started_at) VALUES (?, 1, 'publish', 'running', 1)",
                        (aborted.id,))
        aborted.finish("aborted", "aborted at some time; was: interrupted")
    capsys.readouterr()
    assert main(["ops", "show", str(op.id), "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [(s["seq"], s["name"], s["state"]) for s in steps] == [(1, "mount_mfs", "done"), (3, "publish", "done"), (4, "mount_mfs", "done")]
    assert main(["ops", "show", str(op.id)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "publish" in line]
    assert len(rows) == 1 and "done" in rows[0] and "running" not in rows[0]
    assert main(["ops", "show", str(aborted.id)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "publish" in line]
    assert "interrupted" in row and "running" not in row


def test_without_a_terminal_a_confirmation_names_the_option_the_command_has(home, capsys):
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    capsys.readouterr()
    assert run(["user", "rm", "alice", "--keep-files"]) == 2
    assert capsys.readouterr().err == ("labvm: error: Remove user alice, keeping their files on MooseFS with no member? "
                                       "-- no terminal to ask; pass --yes to confirm\n")
    assert run(["restore", "alice", "3"]) == 2
    assert capsys.readouterr().err == ("labvm: error: Roll alice's desktop back to v3? A running desktop restarts. "
                                       "-- no terminal to ask; pass --yes to confirm\n")
    assert run(["rm", "alice"]) == 2
    assert capsys.readouterr().err.endswith("-- no terminal to ask; pass --yes to confirm\n")


def test_node_add_without_a_terminal_names_yes_and_fingerprint(home, capsys, monkeypatch):
    from labvm import cli_nodes as cli

    def add_node(_config, _node, expected_fingerprint, confirm):
        confirm("Pin host key ssh-ed25519 SHA256:abc of n1?")

    monkeypatch.setattr(cli, "add_node", add_node)
    assert run(["node", "add", "n1", "10.0.0.1"]) == 2
    assert capsys.readouterr().err.endswith("-- no terminal to ask; pass --yes (or --fingerprint SHA256:...) to confirm\n")


@pytest.fixture
def no_node(monkeypatch):
    """Any attempt to reach a node fails the test: what is checked must be checked before."""
    from labvm import files
    from labvm.desktops import Desktops

    def refuse(*_args, **_kwargs):
        raise AssertionError("reached for a node")

    monkeypatch.setattr(Desktops, "session", refuse)
    monkeypatch.setattr(Desktops, "capacities", refuse)
    monkeypatch.setattr(files, "desktop_session", refuse)


@pytest.mark.parametrize("argv, message", [
    (["create", "alice", "--shm", "0"], "--shm 0: /dev/shm must be at least 1m"),
    (["create", "alice", "--shm", "1k"], "--shm 1k: /dev/shm must be at least 1m"),
    (["create", "alice", "--cpuset", "1-0"], "--cpuset '1-0': the range 1-0 is descending; give ranges as N-M with N <= M, like 0-3"),
    (["create", "alice", "--cpuset", "0,5-2"], "--cpuset '0,5-2': the range 5-2 is descending"),
    (["create", "alice", "--io-read-bps", "0"], "--io-read-bps 0: give a rate of at least 1 byte a second"),
    (["create", "alice", "--memory", "99999999t"], "--memory 99999999t: too large"),
    (["files", "alice", "/etc/x", "--version", "99999999999999999999", "--get", "x"],
     "version 99999999999999999999: a version number is 0..2147483647; see `labvm versions USER`"),
    (["files", "alice", "/etc/x", "--version", "2147483648", "--get", "x"], "version 2147483648: a version number is 0..2147483647"),
    (["files", "alice", "/etc/x", "--version=-1", "--get", "x"], "version -1: a version number is 0..2147483647"),
    (["restore", "alice", "99999999999999999999", "--yes"], "version 99999999999999999999: a version number is 0..2147483647"),
])
def test_limits_and_version_numbers_a_node_would_refuse_are_refused_first(home, capsys, no_node, argv, message):
    run(["user", "add", "alice", "--password-stdin"], PW + "\n")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"labvm: error: {message}") and err.count("\n") == 1, err
    assert main(["ops", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []


def test_ascending_cpusets_and_a_1m_shm_are_accepted():
    from labvm.config import ClusterConfig, Storage
    from labvm.desktops import LimitOverrides, resolve_limits

    cfg = ClusterConfig(path=Path("/x"), storage=Storage("m", "/mnt", "/labvm"), xfce_local="/x")
    limits = resolve_limits(cfg, LimitOverrides(cpuset="0-3,5,7-7,8-99", shm="1m"))
    assert (limits.cpuset, limits.shm, limits.cpus) == ("0-3,5,7-7,8-99", 1 << 20, None)


class FakeConnection:
    """NodeConnection to a node whose docker reports the container's `status` ("missing": none)."""

    runs: list = []
    status = "running"

    def __init__(self, node, _home):
        self.node, self.as_root = node, []

    def run(self, argv, stdin="", timeout=None):
        from labvm.remote.connection import CommandResult

        FakeConnection.runs.append(argv)
        if argv[:2] == ["docker", "inspect"]:
            if self.status == "missing":
                return CommandResult(1, "\n", "Error: No such object: labvm-alice\n")
            return CommandResult(0, self.status + "\n", "")
        return CommandResult(0, "ran\n", "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def node_docker(desktop, monkeypatch):
    from labvm.remote import connection

    FakeConnection.runs, FakeConnection.status = [], "running"
    monkeypatch.setattr(connection, "NodeConnection", FakeConnection)
    return FakeConnection


def test_exec_on_a_stopped_desktop_says_so_without_asking_the_node(desktop, node_docker, capsys):
    desktop.set_state("stopped")
    capsys.readouterr()
    assert main(["exec", "alice", "--", "true"]) == 6
    assert capsys.readouterr().err == "labvm: error: alice's desktop is stopped; start it with `labvm start alice`\n"
    assert node_docker.runs == []


@pytest.mark.parametrize("status, code, message", [
    ("exited", 6, "alice's desktop is stopped (its container on n1 is exited); start it with `labvm start alice`"),
    ("missing", 6, "alice's desktop is stopped (its container on n1 is missing); start it with `labvm start alice`"),
    ("paused", 75, "alice's desktop is paused for a backup, for about a second; try again"),
])
def test_exec_on_a_desktop_whose_container_is_not_running_says_so(desktop, node_docker, capsys, status, code, message):
    node_docker.status = status
    capsys.readouterr()
    assert main(["exec", "alice", "--", "true"]) == code
    assert capsys.readouterr().err == f"labvm: error: {message}\n"
    assert [argv[:2] for argv in node_docker.runs] == [["docker", "inspect"]]


def test_exec_on_a_running_desktop_runs_the_command(desktop, node_docker, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["exec", "alice", "--", "echo", "hi"])
    assert exited.value.code == 0 and capsys.readouterr().out == "ran\n"
    assert node_docker.runs[-1] == ["docker", "exec", "labvm-alice", "echo", "hi"]


def test_a_command_over_several_desktops_that_fails_for_some_exits_11(home, capsys, monkeypatch):
    """Partly done has its own exit code (README): backup --all and node drain."""
    from types import SimpleNamespace

    from labvm import storage, switch

    outcomes = [SimpleNamespace(user="alice", ok=True, line="alice: v3 published"),
                SimpleNamespace(user="bob", ok=False, line="bob: failed: n2 unreachable")]
    monkeypatch.setattr(storage.Storage, "all_users", lambda self: ["alice", "bob"])
    monkeypatch.setattr(storage.Storage, "backup_many", lambda self, users, report: [report(r) or r for r in outcomes])
    assert run(["backup", "--all"]) == 11
    captured = capsys.readouterr()
    assert "bob: failed" in captured.out and "1 of 2 backups failed: bob" in captured.err
    monkeypatch.setattr(switch, "drain", lambda home, name, to, parallel, say: outcomes)
    assert run(["node", "drain", "n1"]) == 11
    assert "1 of 2 moves failed: bob" in capsys.readouterr().err
