"""The files helper run as a subprocess, as root, against a real overlay mounted where a desktop's
merge_local sits. The tree is the lab member's: symlinks planted in it must never lead the helper
to a file of the node's own."""

import base64
import json
import os
import stat
import subprocess
from types import SimpleNamespace

import pytest

from .conftest import detach_everything_under, mount_points_under

USER = "alice"
MEMBER_UID = 2000
SECRET = "node-only secret 7f3a9c"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts an overlay: needs root")


def files(run_helper, action, params, check=False):
    return run_helper("files", {"action": action, "params": params, "check": check})


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def desktop(tmp_path):
    """merge_local = overlay of a small lower tree, at <tmp>/data/vms/alice/merge_local, and a
    node file outside it that no request may reach. Mounts are undone whatever the test did."""
    lower = tmp_path / "lower"
    home = lower / "home" / USER
    home.mkdir(parents=True)
    (lower / "etc").mkdir()
    (lower / "etc" / "os-release").write_text("desktop\n")
    (home / "notes.txt").write_text("from the lower layer\n")
    (home / "notes.txt").chmod(0o640)
    for path in (home, home / "notes.txt"):
        os.chown(path, MEMBER_UID, MEMBER_UID)
    outside = tmp_path / "node" / "shadow"
    outside.parent.mkdir()
    outside.write_text(SECRET + "\n")
    (home / "node").symlink_to(outside.parent)
    vm_dir = tmp_path / "data" / "vms" / USER
    up, work, merge = (vm_dir / name for name in ("up_local", "work_local", "merge_local"))
    for directory in (up, work, merge):
        directory.mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={up},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "-o", options, "labvm-test-files", str(merge)], check=True)
    state = SimpleNamespace(
        root=tmp_path, data=tmp_path / "data", merge=merge, up=up, outside=outside, outside_stat=outside.stat()
    )
    state.params = lambda path, **extra: {"user": USER, "data_dir": str(state.data), "path": path, **extra}
    try:
        yield state
    finally:
        detach_everything_under(tmp_path)


def assert_outside_untouched(desktop, *runs):
    assert desktop.outside.read_text() == SECRET + "\n"
    after = desktop.outside.stat()
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
        desktop.outside_stat.st_mode,
        desktop.outside_stat.st_uid,
        desktop.outside_stat.st_mtime_ns,
    )
    for run in runs:
        for text in (run.stdout, run.stderr):
            assert SECRET not in text and b64(SECRET)[:16] not in text


# --- locate and read ----------------------------------------------------------------------


def test_locate_reports_what_is_there_without_following_links(run_helper, desktop):
    (desktop.merge / "home/alice/x").symlink_to(desktop.outside)
    run = files(run_helper, "locate", desktop.params("/home/alice/notes.txt"))
    assert run.exit_code == 0 and run.reply["changed"] is False
    assert run.data["root"] == str(desktop.merge)
    assert run.data["host_path"] == str(desktop.merge / "home/alice/notes.txt")
    assert run.data["mounted"] is True
    assert (run.data["type"], run.data["size"], run.data["mode"], run.data["uid"]) == ("file", 21, 0o640, MEMBER_UID)

    link = files(run_helper, "locate", desktop.params("/home/alice/x")).data
    assert (link["type"], link["target"]) == ("symlink", str(desktop.outside))
    assert files(run_helper, "locate", desktop.params("/")).data["type"] == "dir"
    assert files(run_helper, "locate", desktop.params("/home/alice/nothing")).data["type"] == "missing"
    assert files(run_helper, "locate", desktop.params("/no/such/dir")).data["type"] == "missing"


def test_read_a_file_from_the_lower_layer(run_helper, desktop):
    run = files(run_helper, "read", desktop.params("/home/alice/notes.txt"))
    assert run.exit_code == 0 and run.reply["changed"] is False
    assert base64.b64decode(run.data["content_b64"]) == b"from the lower layer\n"
    assert (run.data["size"], run.data["mode"], run.data["uid"], run.data["gid"]) == (21, 0o640, MEMBER_UID, MEMBER_UID)


@pytest.mark.parametrize(
    "path, code",
    [
        ("/home/alice/nothing", "not_found"),
        ("/home/alice/no/deeper", "not_found"),
        ("/home/alice", "not_a_file"),
        ("/", "not_a_file"),
        ("/home/alice/notes.txt/deeper", "not_a_directory"),
    ],
)
def test_read_what_is_not_a_file_is_refused(run_helper, desktop, path, code):
    run = files(run_helper, "read", desktop.params(path))
    assert run.exit_code == 3 and run.error["code"] == code, run.reply


def test_a_fifo_is_refused_without_hanging(run_helper, desktop):
    os.mkfifo(desktop.merge / "home/alice/pipe")
    run = files(run_helper, "read", desktop.params("/home/alice/pipe"))
    assert run.exit_code == 3 and run.error["code"] == "not_a_file"


def test_a_file_over_max_bytes_is_refused(run_helper, desktop):
    run = files(run_helper, "read", desktop.params("/home/alice/notes.txt", max_bytes=20))
    assert run.exit_code == 3 and run.error["code"] == "too_large"
    assert "content_b64" not in run.stdout


# --- write --------------------------------------------------------------------------------


def test_a_new_file_goes_to_the_upper_layer_owned_like_its_directory(run_helper, desktop):
    run = files(run_helper, "write", desktop.params("/home/alice/new.txt", content_b64=b64("hello\n")))
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["created"] is True
    written = desktop.up / "home/alice/new.txt"
    assert written.read_text() == "hello\n"
    info = written.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o644, MEMBER_UID, MEMBER_UID)
    assert not [name for name in os.listdir(desktop.up / "home/alice") if name.startswith(".labvm-files-")]


def test_overwrite_keeps_mode_and_owner_and_is_idempotent(run_helper, desktop):
    params = desktop.params("/home/alice/notes.txt", content_b64=b64("repaired\n"))
    run = files(run_helper, "write", params)
    assert run.exit_code == 0 and run.reply["changed"] is True and run.data["created"] is False
    info = (desktop.up / "home/alice/notes.txt").stat()
    assert (desktop.up / "home/alice/notes.txt").read_text() == "repaired\n"
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, MEMBER_UID, MEMBER_UID)
    assert (desktop.root / "lower/home/alice/notes.txt").read_text() == "from the lower layer\n"

    again = files(run_helper, "write", params)
    assert again.exit_code == 0 and again.reply["changed"] is False
    assert (desktop.up / "home/alice/notes.txt").stat().st_mtime_ns == info.st_mtime_ns


def test_mode_and_owner_can_be_set(run_helper, desktop):
    params = desktop.params("/home/alice/notes.txt", content_b64=b64("from the lower layer\n"), mode=0o600, uid=0, gid=0)
    run = files(run_helper, "write", params)
    assert run.exit_code == 0 and run.reply["changed"] is True
    info = (desktop.merge / "home/alice/notes.txt").stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)


def test_check_mode_reports_and_writes_nothing(run_helper, desktop):
    run = files(run_helper, "write", desktop.params("/home/alice/notes.txt", content_b64=b64("new\n")), check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    run = files(run_helper, "write", desktop.params("/home/alice/new.txt", content_b64=b64("new\n")), check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True and run.data["created"] is True
    same = desktop.params("/home/alice/notes.txt", content_b64=b64("from the lower layer\n"))
    assert files(run_helper, "write", same, check=True).reply["changed"] is False
    assert not (desktop.up / "home").exists()


@pytest.mark.parametrize(
    "path, code",
    [("/home/alice/no/such.txt", "not_found"), ("/home/alice", "not_a_file"), ("/", "not_a_file")],
)
def test_write_needs_an_existing_directory_and_a_file(run_helper, desktop, path, code):
    run = files(run_helper, "write", desktop.params(path, content_b64=b64("x")))
    assert run.exit_code == 3 and run.error["code"] == code, run.reply
    assert not (desktop.up / "home").exists()


# --- planted symlinks ---------------------------------------------------------------------


def test_a_symlinked_file_is_never_followed(run_helper, desktop):
    (desktop.merge / "home/alice/x").symlink_to(desktop.outside)
    read = files(run_helper, "read", desktop.params("/home/alice/x"))
    write = files(run_helper, "write", desktop.params("/home/alice/x", content_b64=b64("owned\n")))
    for run in (read, write):
        assert run.exit_code == 3 and run.error["code"] == "symlink_in_path", run.reply
        assert "/home/alice/x" in run.error["msg"]
    assert (desktop.merge / "home/alice/x").is_symlink()
    assert_outside_untouched(desktop, read, write)


def test_a_symlinked_directory_is_never_followed(run_helper, desktop):
    (desktop.merge / "home/alice/up").symlink_to("/")
    through = "/home/alice/up" + str(desktop.outside)
    runs = [
        files(run_helper, "read", desktop.params(through)),
        files(run_helper, "write", desktop.params(through, content_b64=b64("owned\n"))),
        files(run_helper, "write", desktop.params(through, content_b64=b64("owned\n")), check=True),
        files(run_helper, "locate", desktop.params(through)),
    ]
    for run in runs:
        assert run.exit_code == 3 and run.error["code"] == "symlink_in_path", run.reply
        assert "/home/alice/up " in run.error["msg"]
    assert_outside_untouched(desktop, *runs)


def test_a_symlink_from_the_lower_layer_is_refused_too(run_helper, desktop):
    runs = [
        files(run_helper, "read", desktop.params("/home/alice/node/shadow")),
        files(run_helper, "write", desktop.params("/home/alice/node/shadow", content_b64=b64("owned\n"))),
    ]
    for run in runs:
        assert run.exit_code == 3 and run.error["code"] == "symlink_in_path", run.reply
    assert_outside_untouched(desktop, *runs)


# --- refusals -----------------------------------------------------------------------------


def test_nothing_is_done_when_the_stack_is_not_mounted(run_helper, desktop):
    detach_everything_under(desktop.root)
    (desktop.merge / "stray.txt").write_text("on the node's disk\n")
    located = files(run_helper, "locate", desktop.params("/stray.txt"))
    assert located.exit_code == 0 and located.data["mounted"] is False and located.data["type"] is None
    for action, extra in (("read", {}), ("write", {"content_b64": b64("x")})):
        run = files(run_helper, action, desktop.params("/stray.txt", **extra))
        assert run.exit_code == 3 and run.error["code"] == "stack_not_mounted"
        assert "start the desktop first" in run.error["msg"]
    assert (desktop.merge / "stray.txt").read_text() == "on the node's disk\n"
    assert mount_points_under(desktop.root) == []


@pytest.mark.parametrize(
    "path",
    [
        "/home/alice/../../node/shadow",
        "/..",
        "/home/./alice/notes.txt",
        "/home//alice",
        "/home/alice/",
        "//etc",
        "home/alice",
        "/a\0b",
        "",
    ],
)
def test_paths_that_are_not_plain_are_refused(run_helper, desktop, path):
    for action, extra in (("locate", {}), ("read", {}), ("write", {"content_b64": b64("x")})):
        run = files(run_helper, action, desktop.params(path, **extra))
        assert run.exit_code == 2 and run.error["code"] == "bad_param", run.reply
    assert not (desktop.up / "home").exists()


@pytest.mark.parametrize(
    "action, override, fragment",
    [
        ("read", {"user": "Alice"}, "'user' must be a user name"),
        ("read", {"user": "../alice"}, "'user' must be a user name"),
        ("read", {"data_dir": "data"}, "must be an absolute path"),
        ("read", {"data_dir": "/"}, "must not be /"),
        ("read", {"max_bytes": -1}, "between 0 and"),
        ("read", {"content_b64": b64("x")}, "unknown param(s) 'content_b64'"),
        ("write", {"content_b64": "not base64!"}, "not valid base64"),
        ("write", {"content_b64": b64("x"), "mode": 0o10000}, "between 0 and"),
        ("write", {"content_b64": b64("x"), "uid": -1}, "between 0 and"),
        ("write", {"content_b64": b64("x"), "gid": True}, "must be an integer"),
    ],
)
def test_bad_params_are_refused(run_helper, desktop, action, override, fragment):
    run = files(run_helper, action, {**desktop.params("/home/alice/notes.txt"), **override})
    assert run.exit_code == 2, run.reply
    assert fragment in run.error["msg"]


def test_missing_params_unknown_actions_and_malformed_requests(run_helper, desktop):
    run = files(run_helper, "write", desktop.params("/home/alice/notes.txt"))
    assert run.exit_code == 2 and run.error["code"] == "missing_param"
    run = files(run_helper, "delete", desktop.params("/home/alice/notes.txt"))
    assert run.exit_code == 2 and run.error["code"] == "unknown_action"
    assert "locate" in run.error["msg"] and "write" in run.error["msg"]
    run = run_helper("files", raw=b'{"action": "read", "params": ')
    assert run.exit_code == 2 and run.error["code"] == "malformed_request"


# --- what the helper reports reaches the admin's terminal escaped --------------------------


def test_a_planted_name_and_link_target_are_shown_escaped_by_labvm_files(run_helper, desktop, tmp_path, monkeypatch, capsys):
    """The helper's real reply about a symlink at `[/]` (a link `]` in a directory `[`) whose
    target holds markup, escape sequences, a bidi override and bytes that are not UTF-8, shown
    by the real `labvm files` command."""
    from contextlib import contextmanager

    from labvm import files as admin_files
    from labvm.admin import AdminHome
    from labvm.cli import main
    from labvm.config import Node
    from labvm.errors import HelperFailed
    from labvm.text import safe

    target = b"\x1b]8;;http://evil.example/\x1b\\[red]x[/]\xff\xe2\x80\xae\x07\r"
    (desktop.merge / "home/alice/[").mkdir()
    os.symlink(target, desktop.merge / "home/alice/[/]")

    class HelperSession:
        runner = None

        def call(self, helper, action, params, check=False, timeout=None):
            run = files(run_helper, action, params, check)
            if not run.reply["ok"]:
                error = run.reply["error"]
                raise HelperFailed("n1", helper, action, error["code"], error["msg"])
            return run.reply

    @contextmanager
    def desktop_session(_home, _user):
        yield Node(name="n1", host="10.0.0.1", data_dir=str(desktop.data)), HelperSession()

    monkeypatch.setattr(admin_files, "desktop_session", desktop_session)
    config = tmp_path / "admin" / "bkConfxml.xml"
    AdminHome(config).init()
    shown_target = safe(os.fsdecode(target))

    assert main(["-c", str(config), "files", "alice", "/home/alice/[/]"]) == 0
    out = capsys.readouterr().out
    assert "merge_local/home/alice/[/]" in out and out.endswith(f" -> {shown_target}\n")
    assert all(char == "\n" or char.isprintable() for char in out)

    assert main(["-c", str(config), "files", "alice", "/home/alice/[/]", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == os.fsdecode(target)

    assert main(["-c", str(config), "files", "alice", "/home/alice/[/]", "--get", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and all(char == "\n" or char.isprintable() for char in err)
    assert not (tmp_path / "out").exists()
