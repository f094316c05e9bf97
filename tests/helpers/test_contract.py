"""The helper contract as labvm sees it: one JSON object on stdout and a contract exit code,
whatever the request, and no secret from the request anywhere in the output."""

import json
import subprocess
import sys

import pytest

from .conftest import BUNDLE_DIR, only_json_object

FACTS = {"action": "facts", "params": {}}


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "empty request"),
        (b"   \n", "empty request"),
        (b"{not json", "not valid JSON"),
        (b'{"action": "facts"', "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[]", "got a JSON array"),
        (b'["facts"]', "got a JSON array"),
        (b'"facts"', "got a JSON string"),
        (b"null", "got a JSON null"),
        (b"42", "got a JSON number"),
    ],
)
def test_malformed_request_is_a_bad_request(run_helper, raw, message):
    run = run_helper("probe", raw=raw)
    assert run.exit_code == 2
    assert run.error["code"] == "malformed_request"
    assert message in run.error["msg"]


@pytest.mark.parametrize(
    "request_document, message",
    [
        ({"params": {}}, "'action' must be a non-empty string"),
        ({"action": ""}, "'action' must be a non-empty string"),
        ({"action": 7}, "'action' must be a non-empty string"),
        ({"action": "facts", "params": []}, "'params' must be a JSON object"),
        ({"action": "facts", "params": "data_dir=/x"}, "'params' must be a JSON object"),
        ({"action": "facts", "check": "yes"}, "'check' must be true or false"),
        ({"action": "facts", "check": 1}, "'check' must be true or false"),
        ({"action": "facts", "dry_run": True}, "unknown request key(s) 'dry_run'"),
    ],
)
def test_badly_shaped_request_is_a_bad_request(run_helper, request_document, message):
    run = run_helper("probe", request_document)
    assert run.exit_code == 2
    assert message in run.error["msg"]


def test_unknown_helper_is_a_bad_request(run_helper):
    run = run_helper("../../bin/sh", FACTS)
    assert run.exit_code == 2
    assert run.error["code"] == "unknown_helper"
    assert "known: files, image, merge, metrics, mfs, net, probe, runtime, sync, vm" in run.error["msg"]


@pytest.mark.parametrize("args", [[], ["probe", "extra"]])
def test_helper_name_must_be_the_only_argument(run_helper, args):
    run = run_helper(None, FACTS, args=args)
    assert run.exit_code == 2
    assert "usage:" in run.error["msg"]


def test_unknown_action_is_a_bad_request(run_helper):
    run = run_helper("probe", {"action": "reboot", "params": {}})
    assert run.exit_code == 2
    assert run.error["code"] == "unknown_action"
    assert "known: facts" in run.error["msg"]


def test_unknown_param_is_refused_by_name(run_helper):
    run = run_helper("probe", {"action": "facts", "params": {"data_dri": "/srv/labvm"}})
    assert run.exit_code == 2
    assert run.error["code"] == "unknown_param"
    assert "'data_dri'" in run.error["msg"]
    assert "accepted: data_dir, docker_socket, mfs_mount" in run.error["msg"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("srv/labvm", "must be an absolute path"),
        ("", "must be an absolute path"),
        ("/srv/lab\nvm", "must not contain NUL or line breaks"),
        ("/srv/lab\rvm", "must not contain NUL or line breaks"),
        ("/srv/lab\0vm", "must not contain NUL or line breaks"),
        (5, "must be a string path"),
        (["/srv"], "must be a string path"),
    ],
)
def test_bad_path_param_is_a_bad_request(run_helper, value, message):
    run = run_helper("probe", {"action": "facts", "params": {"data_dir": value}})
    assert run.exit_code == 2
    assert run.error["code"] == "bad_param"
    assert message in run.error["msg"]


def test_helper_leaves_its_bundle_directory_untouched(run_helper):
    # The bundle lives in a directory named after its content hash.
    before = sorted(path.name for path in BUNDLE_DIR.iterdir())
    assert run_helper("probe", FACTS).exit_code == 0
    assert run_helper("mfs", {"action": "status", "params": {"mount": "/"}}).exit_code == 0
    assert sorted(path.name for path in BUNDLE_DIR.iterdir()) == before


# --- secrets ------------------------------------------------------------------------------


def assert_nowhere(canary: str, run) -> None:
    assert canary not in run.stdout
    assert canary not in run.stderr


def test_secret_param_value_never_appears_in_output(run_helper):
    run = run_helper("probe", {"action": "facts", "params": {"password": "canary-XYZ"}})
    assert run.exit_code == 2
    assert "'password'" in run.error["msg"]
    assert_nowhere("canary-XYZ", run)


def test_secrets_object_never_appears_in_output(run_helper):
    params = {
        "master": "10.213.0.2",
        "mount": "relative/mount",
        "secrets": {"mfs": {"password": "canary-ABC"}, "vnc": ["canary-DEF"]},
    }
    run = run_helper("mfs", {"action": "ensure_mounted", "params": params})
    assert run.exit_code == 2
    for canary in ("canary-ABC", "canary-DEF"):
        assert_nowhere(canary, run)


def test_secret_in_a_request_with_a_bad_check_flag_never_appears(run_helper):
    request = {"action": "facts", "params": {"vnc_password": "canary-GHI"}, "check": "canary-GHI"}
    run = run_helper("probe", request)
    assert run.exit_code == 2
    assert_nowhere("canary-GHI", run)


@pytest.mark.parametrize("options", ["mfspassword=canary-JKL", "mfscachemode=canary-JKL;x", "mfsmd5pass=canary-JKL"])
def test_password_smuggled_into_mount_options_is_not_echoed(run_helper, options):
    params = {"master": "10.213.0.2", "mount": "/mnt/labvm-mfs", "options": options}
    run = run_helper("mfs", {"action": "ensure_mounted", "params": params, "check": True})
    assert run.exit_code == 2
    assert_nowhere("canary-JKL", run)


# A helper whose action breaks, run through the real main(): it must still answer in JSON,
# log the traceback to stderr, keep a stray print off stdout, and redact the secret that the
# exception message carries.
BROKEN_HELPER = f"""
import sys
sys.path.insert(0, {str(BUNDLE_DIR)!r})
sys.dont_write_bytecode = True
import _contract

def explode(params, check):
    print("a stray print that must not reach stdout, nor show", params["password"])
    raise RuntimeError("cannot log in with " + params["password"])

actions = {{"explode": _contract.Action(
    run=explode, params={{"password": _contract.Param(lambda name, value: value)}})}}
sys.exit(_contract.main(sys.argv[1:], lambda helper: actions))
"""


def test_unexpected_exception_is_an_internal_error_without_the_secret():
    request = {"action": "explode", "params": {"password": "canary-MNO"}}
    process = subprocess.run(
        [sys.executable, "-I", "-c", BROKEN_HELPER, "broken"], input=json.dumps(request).encode(), capture_output=True, timeout=30
    )
    stdout, stderr = process.stdout.decode(), process.stderr.decode()
    reply = only_json_object(stdout)
    assert process.returncode == 1
    assert reply["error"]["code"] == "internal"
    assert reply["error"]["retryable"] is False
    assert "RuntimeError" in reply["error"]["msg"]
    assert "Traceback" in stderr and "a stray print" in stderr
    assert "canary-MNO" not in stdout and "canary-MNO" not in stderr


# --- batches ------------------------------------------------------------------------------


def batch(*steps):
    return {"steps": [{"helper": helper, **request} for helper, request in steps]}


def test_a_batch_runs_its_steps_in_order_and_answers_for_each(run_helper, tmp_path):
    run = run_helper("batch", batch(("probe", FACTS), ("probe", {"action": "facts", "params": {}, "check": True})), args=["batch"])
    assert run.exit_code == 0
    replies = run.data["replies"]
    assert [reply["exit_code"] for reply in replies] == [0, 0]
    assert all(reply["ok"] for reply in replies)
    assert replies[0]["data"]["hostname"] == replies[1]["data"]["hostname"]
    assert run.reply["changed"] is False


def test_a_batch_stops_at_the_first_step_that_fails_and_shows_its_error(run_helper):
    steps = batch(("probe", FACTS), ("probe", {"action": "no_such_action"}), ("vm", {"action": "status", "params": {}}))
    run = run_helper("batch", steps, args=["batch"])
    assert run.exit_code == 0
    replies = run.data["replies"]
    assert len(replies) == 2  # the third step never ran
    assert replies[1]["exit_code"] == 2 and replies[1]["ok"] is False
    assert replies[1]["error"]["code"] == "unknown_action"


def test_each_step_of_a_batch_is_checked_like_a_request(run_helper):
    run = run_helper("batch", batch(("../../bin/sh", FACTS)), args=["batch"])
    assert run.data["replies"][0]["error"]["code"] == "unknown_helper"
    run = run_helper("batch", batch(("probe", {"action": "facts", "params": {"nope": 1}})), args=["batch"])
    assert run.data["replies"][0]["error"]["code"] == "unknown_param"


@pytest.mark.parametrize(
    "document, message",
    [
        ({"action": "facts"}, 'must be {"steps": [...]}'),
        ({"steps": []}, "1 to 32 steps"),
        ({"steps": [FACTS] * 33}, "1 to 32 steps"),
        ({"steps": [FACTS]}, "step 1 must be an object naming its 'helper'"),
        ({"steps": [{"helper": "batch", **FACTS}]}, "step 1 must be an object naming its 'helper'"),
        ({"steps": [{"helper": "probe", "dry": 1, **FACTS}]}, "unknown key(s) 'dry' in batch step 1"),
    ],
)
def test_a_malformed_batch_is_a_bad_request_and_runs_nothing(run_helper, document, message):
    run = run_helper("batch", document, args=["batch"])
    assert run.exit_code == 2
    assert message in run.error["msg"]


def test_no_secret_of_any_step_leaves_a_batch(run_helper):
    secret = "batch-Secret-4711"
    steps = batch(("probe", FACTS), ("vm", {"action": "set_password", "params": {"user": "alice", "secrets": {"password": secret}}}))
    run = run_helper("batch", steps, args=["batch"])
    assert secret not in run.stdout and secret not in run.stderr
