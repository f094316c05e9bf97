"""The CLI layer: one clear line per failure, exit codes, --json, passwords never from argv, completion."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labvm.cli import main

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
