"""The admin side of the helper contract: replies, crashes, and the content-hashed bundle."""

import base64
import hashlib
import json
import os
import subprocess
import sys

import pytest

from labvm.errors import HelperCrashed, HelperFailed
from labvm.remote import helpers as helpers_mod
from labvm.remote.helpers import HelperBundle, parse_reply


def test_success_reply():
    reply = parse_reply("n1", "probe", "facts", 0, '{"ok": true, "changed": false, "data": {"x": 1}}', "")
    assert reply == {"ok": True, "changed": False, "data": {"x": 1}}


def test_failure_reply_keeps_code_and_retryable():
    stdout = '{"ok": false, "error": {"code": "mfs_unreachable", "msg": "master down", "retryable": true}}'
    with pytest.raises(HelperFailed) as err:
        parse_reply("n1", "mfs", "ensure_mounted", 75, stdout, "log line")
    assert err.value.code == "mfs_unreachable"
    assert err.value.retryable is True
    assert str(err.value) == "n1: mfs.ensure_mounted failed [mfs_unreachable]: master down"


@pytest.mark.parametrize(
    "exited, stdout",
    [
        (0, "not json"),
        (0, ""),
        (0, "[1, 2]"),
        (0, '{"changed": true}'),
        (139, '{"ok": true}'),
        (127, ""),
    ],
)
def test_anything_else_is_a_crash_with_stderr_tail(exited, stdout):
    with pytest.raises(HelperCrashed) as err:
        parse_reply("n1", "probe", "facts", exited, stdout, "Traceback...\nValueError: boom")
    assert "ValueError: boom" in str(err.value)
    assert f"exit {exited}" in str(err.value)


def test_bundle_is_content_hashed_and_deterministic():
    a, b = HelperBundle.from_package(), HelperBundle.from_package()
    names = [name for name, _ in a.files]
    assert "labvm_helper.py" in names and "probe.py" in names and "mfs.py" in names
    assert a.sha256 == b.sha256 and a.tarball == b.tarball
    changed = HelperBundle(a.files[:-1] + ((a.files[-1][0], a.files[-1][1] + b"# edit\n"),))
    assert changed.sha256 != a.sha256
    assert a.remote_dir == f"/var/lib/labvm/helpers/{a.sha256}"


def run_installer(root, sha, payload):
    return subprocess.run(
        [sys.executable, "-c", helpers_mod._INSTALLER, str(root), sha],
        input=payload, capture_output=True, text=True, timeout=60,
    )


def test_installer_publishes_the_exact_bundle_once(tmp_path):
    bundle = HelperBundle.from_package()
    payload = base64.b64encode(bundle.tarball).decode()
    result = run_installer(tmp_path, bundle.sha256, payload)
    assert result.returncode == 0, result.stderr
    installed = tmp_path / bundle.sha256
    assert (installed / ".complete").exists()
    for name, data in bundle.files:
        assert (installed / name).read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle.sha256]
    # A second run finds it complete and reads no input at all.
    assert run_installer(tmp_path, bundle.sha256, "").returncode == 0


def test_installer_refuses_a_bundle_that_does_not_match_its_name(tmp_path):
    bundle = HelperBundle.from_package()
    wrong = hashlib.sha256(b"other").hexdigest()
    result = run_installer(tmp_path, wrong, base64.b64encode(bundle.tarball).decode())
    assert result.returncode != 0
    assert "hash mismatch" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_installer_replaces_an_incomplete_leftover(tmp_path):
    bundle = HelperBundle.from_package()
    leftover = tmp_path / bundle.sha256
    leftover.mkdir()
    (leftover / "probe.py").write_text("half written")
    result = run_installer(tmp_path, bundle.sha256, base64.b64encode(bundle.tarball).decode())
    assert result.returncode == 0, result.stderr
    assert (leftover / ".complete").exists()
    assert (leftover / "probe.py").read_bytes() == dict(bundle.files)["probe.py"]


class LocalConnection:
    """Runs the node's commands on this machine: the bundle, its installer and its batches,
    for real, in a temporary helpers root."""

    as_root: list = []

    def __init__(self):
        self.node = type("Node", (), {"name": "n1"})()
        self.commands = []

    def run(self, argv, stdin="", timeout=None):
        self.commands.append(argv)
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        return type("Result", (), {"exited": done.returncode, "stdout": done.stdout, "stderr": done.stderr})()


@pytest.fixture
def local_runner(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers_mod, "HELPERS_ROOT", str(tmp_path / "helpers"))
    conn = LocalConnection()
    return helpers_mod.HelperRunner(conn, HelperBundle.from_package()), conn


def test_the_first_call_installs_the_bundle_without_asking_first(local_runner, tmp_path):
    runner, conn = local_runner
    facts = runner.call("probe", "facts", {})
    assert facts["ok"] and facts["data"]["hostname"]
    # python found no entry, the installer ran, the call was made again; later calls go straight.
    assert [argv[1] for argv in conn.commands] == [f"{runner.bundle.remote_dir}/labvm_helper.py", "-c",
                                                   f"{runner.bundle.remote_dir}/labvm_helper.py"]
    runner.call("probe", "facts", {})
    assert len(conn.commands) == 4
    bundle_dir = tmp_path / "helpers" / runner.bundle.sha256
    assert not (bundle_dir / "__pycache__").exists()  # the bundle keeps the bytes its name hashes
    cache = tmp_path / "helpers" / ".pycache"
    if os.geteuid() == 0:
        assert cache.is_dir() and (cache.stat().st_mode & 0o777) == 0o700
        assert list(cache.rglob("_contract*.pyc"))


def test_call_many_runs_in_one_round_trip_and_marks_each_done(local_runner):
    runner, conn = local_runner
    runner.ensure_installed()
    conn.commands.clear()
    done = []
    calls = [helpers_mod.HelperCall("probe", "facts", {}), helpers_mod.HelperCall("probe", "facts", {})]
    replies = runner.call_many(calls, done=done.append)
    assert len(conn.commands) == 1 and conn.commands[0][-1] == "batch"
    assert [reply["ok"] for reply in replies] == [True, True] and done == [0, 1]


def test_call_many_raises_the_failing_step_as_its_own_call_would(local_runner):
    runner, _conn = local_runner
    done = []
    calls = [helpers_mod.HelperCall("probe", "facts", {}), helpers_mod.HelperCall("probe", "facts", {"bogus": 1}),
             helpers_mod.HelperCall("probe", "facts", {})]
    with pytest.raises(HelperFailed) as err:
        runner.call_many(calls, done=done.append)
    assert done == [0]
    assert err.value.code == "unknown_param" and "probe.facts" in str(err.value)


def test_a_batch_reply_that_skips_steps_without_a_failure_is_a_crash():
    class Conn(LocalConnection):
        def run(self, argv, stdin="", timeout=None):
            body = {"ok": True, "changed": False, "data": {"replies": [{"exit_code": 0, "ok": True, "changed": False, "data": {}}]}}
            return type("Result", (), {"exited": 0, "stdout": json.dumps(body), "stderr": ""})()

    runner = helpers_mod.HelperRunner(Conn(), HelperBundle.from_package())
    calls = [helpers_mod.HelperCall("probe", "facts", {}), helpers_mod.HelperCall("vm", "status", {})]
    with pytest.raises(HelperCrashed, match="vm.status"):
        runner.call_many(calls)


def test_a_helper_bad_request_is_not_taken_for_a_missing_bundle():
    result = type("Result", (), {"exited": 2, "stdout": '{"ok": false}', "stderr": "can't open file labvm_helper.py"})()
    assert not helpers_mod._entry_missing(result)
    result.stdout = ""
    assert helpers_mod._entry_missing(result)
