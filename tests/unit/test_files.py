"""`labvm files` on the admin side: path and mode validation, and what get/put do with a node's
answer. The node session is a fake; nothing here touches the network."""

import base64
import os
import signal
import stat
from contextlib import contextmanager

import pytest

from labvm import files
from labvm.admin import AdminHome
from labvm.config import Node
from labvm.errors import AlreadyExists, BadInput, NotFound

from .fake_node import TypedCalls

NODE = Node(name="n1", host="10.0.0.1", data_dir="/srv/labvm")


class FakeSession(TypedCalls):
    """Answers every helper call with `reply` and records what was asked."""

    def __init__(self, reply: dict):
        self.reply = reply
        self.calls = []
        self.runner = self

    def call(self, helper, action, params, check=False, timeout=None):
        self.calls.append((helper, action, params, check))
        return self.reply


@pytest.fixture
def node_answers(monkeypatch):
    """node_answers(data, changed=False) -> the FakeSession every desktop session will use."""

    def install(data: dict, changed: bool = False) -> FakeSession:
        session = FakeSession({"ok": True, "changed": changed, "data": data})

        @contextmanager
        def fake_session(home, user):
            yield NODE, session

        monkeypatch.setattr(files, "desktop_session", fake_session)
        return session

    return install


@pytest.fixture
def no_node(monkeypatch):
    @contextmanager
    def refuse(home, user):
        raise AssertionError("a refused request must not reach the node")
        yield

    monkeypatch.setattr(files, "desktop_session", refuse)


# --- paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, sent",
    [
        ("/", "/"),
        ("/home/alice/.bashrc", "/home/alice/.bashrc"),
        ("//home//alice/", "/home/alice"),
        ("/home/./alice/./notes.txt", "/home/alice/notes.txt"),
        ("/home/alice/..notes", "/home/alice/..notes"),
    ],
)
def test_plain_paths_are_sent_normalised(given, sent):
    assert files.desktop_path(given) == sent


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("home/alice/.bashrc", "must be absolute"),
        ("", "must be absolute"),
        (None, "must be absolute"),
        ("/home/alice/../../etc/shadow", "must not contain '..'"),
        ("/..", "must not contain '..'"),
        ("/home/alice/\0x", "NUL or line breaks"),
        ("/home/alice/a\nb", "NUL or line breaks"),
        ("/" + "a" * 5000, "longer than 4096"),
    ],
)
def test_bad_paths_are_refused_with_a_clear_message(path, fragment):
    with pytest.raises(BadInput) as raised:
        files.desktop_path(path)
    assert fragment in str(raised.value)


def test_refused_paths_never_reach_the_node(no_node, tmp_path):
    for call in (
        lambda: files.locate(None, "alice", "/home/../etc"),
        lambda: files.get_file(None, "alice", "/", tmp_path / "out"),
        lambda: files.put_file(None, "alice", tmp_path, "relative/path"),
        lambda: files.locate(None, "Alice", "/"),
    ):
        with pytest.raises(BadInput):
            call()


# --- locate -------------------------------------------------------------------------------


def test_locate_names_the_node(node_answers):
    session = node_answers({"root": "/srv/labvm/vms/alice/merge_local", "type": "dir"})
    assert files.locate(None, "alice") == {"node": "n1", "root": "/srv/labvm/vms/alice/merge_local", "type": "dir"}
    assert session.calls == [("files", "locate", {"user": "alice", "data_dir": "/srv/labvm", "path": "/"}, False)]


# --- get ----------------------------------------------------------------------------------


def read_reply(content: bytes) -> dict:
    return {"content_b64": base64.b64encode(content).decode(), "size": len(content), "mode": 0o644, "uid": 2000, "gid": 2000}


def test_get_writes_a_private_copy(node_answers, tmp_path):
    session = node_answers(read_reply(b"export PATH\n"))
    dest = tmp_path / "bashrc"
    assert files.get_file(None, "alice", "/home/alice/.bashrc", dest) == 12
    assert dest.read_bytes() == b"export PATH\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    helper, action, params, _ = session.calls[0]
    assert (helper, action, params["path"], params["max_bytes"]) == ("files", "read", "/home/alice/.bashrc", files.MAX_GET_BYTES)
    assert os.listdir(tmp_path) == ["bashrc"]


def test_get_into_a_directory_keeps_the_name(node_answers, tmp_path):
    node_answers(read_reply(b"x"))
    files.get_file(None, "alice", "/home/alice/notes.txt", tmp_path)
    assert (tmp_path / "notes.txt").read_bytes() == b"x"


def test_get_keeps_an_existing_file_unless_forced(no_node, node_answers, tmp_path):
    dest = tmp_path / "notes.txt"
    dest.write_text("mine\n")
    with pytest.raises(AlreadyExists):
        files.get_file(None, "alice", "/home/alice/notes.txt", dest)
    assert dest.read_text() == "mine\n"
    node_answers(read_reply(b"theirs\n"))
    files.get_file(None, "alice", "/home/alice/notes.txt", dest, force=True)
    assert dest.read_text() == "theirs\n"


@pytest.fixture
def specials(tmp_path):
    """A FIFO, a socket, and symlinks to /dev/null and to the FIFO, all in a temp dir."""
    import socket

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    (tmp_path / "to-null").symlink_to("/dev/null")
    (tmp_path / "to-fifo").symlink_to(fifo)
    (tmp_path / "to-file").symlink_to(tmp_path / "plain")
    (tmp_path / "plain").write_text("mine\n")
    yield tmp_path
    listener.close()


def snapshot(directory):
    return {p.name: (p.lstat().st_mode, p.lstat().st_ino, p.lstat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize("name, kind", [("fifo", "a FIFO"), ("sock", "a socket"), ("to-null", "a symbolic link"),
                                        ("to-fifo", "a symbolic link"), ("to-file", "a symbolic link")])
def test_get_refuses_a_destination_that_is_not_a_regular_file(no_node, specials, name, kind):
    before = snapshot(specials)
    for force in (False, True):
        with pytest.raises(BadInput, match=rf"is not a regular file \(it is {kind}\)"):
            files.get_file(None, "alice", "/home/alice/x", specials / name, force=force)
    assert snapshot(specials) == before


def test_get_into_a_directory_refuses_a_fifo_of_that_name(no_node, specials):
    with pytest.raises(BadInput, match="a FIFO"):
        files.get_file(None, "alice", "/home/alice/fifo", specials, force=True)


def test_get_into_a_missing_directory_names_it(no_node, tmp_path):
    with pytest.raises(BadInput, match=f"{tmp_path / 'missing'}: no such directory"):
        files.get_file(None, "alice", "/home/alice/x", tmp_path / "missing" / "x")
    assert os.listdir(tmp_path) == []


@contextmanager
def must_not_block(seconds: int = 10):
    def stuck(*_):
        raise AssertionError("blocked opening the source")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name, kind", [("fifo", "a FIFO"), ("to-fifo", "a FIFO"), ("sock", "a socket")])
def test_put_refuses_a_source_that_is_not_a_regular_file_without_opening_it(no_node, specials, name, kind):
    with must_not_block(), pytest.raises(BadInput, match=rf"is not a regular file \(it is {kind}\)"):
        files.put_file(None, "alice", specials / name, "/home/alice/x")
    with must_not_block(), pytest.raises(BadInput, match="a character device"):
        files.read_source(specials / "to-null")


def test_cli_get_to_a_device_exits_2_and_changes_nothing(specials, capsys, monkeypatch):
    from labvm.cli import main

    monkeypatch.setenv("LABVM_CONFIG", str(specials / "admin" / "bkConfxml.xml"))
    assert main(["init"]) == 0
    capsys.readouterr()
    assert main(["files", "alice", "/root/x", "--get", str(specials / "to-null"), "--force"]) == 2
    assert capsys.readouterr().err == f"labvm: error: {specials / 'to-null'} is not a regular file (it is a symbolic link); give a file or directory to copy to\n"
    assert os.readlink(specials / "to-null") == "/dev/null"


# --- put ----------------------------------------------------------------------------------


def test_put_sends_the_content_and_says_whether_it_changed(node_answers, tmp_path):
    src = tmp_path / "fixed"
    src.write_bytes(b"fixed\n")
    session = node_answers({}, changed=True)
    assert files.put_file(None, "alice", src, "/home/alice/.bashrc", mode=0o600, check=True) is True
    helper, action, params, check = session.calls[0]
    assert (helper, action, check) == ("files", "write", True)
    assert params == {
        "user": "alice",
        "data_dir": "/srv/labvm",
        "path": "/home/alice/.bashrc",
        "content_b64": base64.b64encode(b"fixed\n").decode(),
        "mode": 0o600,
    }


@pytest.mark.parametrize("mode", [-1, 0o10000, True, "644"])
def test_put_refuses_a_bad_mode(no_node, tmp_path, mode):
    src = tmp_path / "fixed"
    src.write_text("x")
    with pytest.raises(BadInput, match="permission mode"):
        files.put_file(None, "alice", src, "/home/alice/x", mode=mode)


def test_put_refuses_what_it_cannot_send(no_node, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * (files.MAX_PUT_BYTES + 1))
    with pytest.raises(BadInput, match="larger than"):
        files.put_file(None, "alice", big, "/home/alice/big")
    with pytest.raises(BadInput, match="cannot read"):
        files.put_file(None, "alice", tmp_path / "missing", "/home/alice/x")


# --- finding the desktop ------------------------------------------------------------------


def test_a_user_without_a_desktop_is_not_found(tmp_path):
    home = AdminHome(tmp_path / "admin" / "bkConfxml.xml")
    home.init()
    with home.state() as db:
        db.add_user("alice", "a good password")
    with pytest.raises(NotFound, match="alice has no desktop"):
        files.locate(home, "alice")
    with pytest.raises(NotFound, match="unknown user 'bob'"):
        files.locate(home, "bob")


# --- the node helper's refusal, in words ---------------------------------------------------


@pytest.fixture
def files_helper(monkeypatch):
    """scripts/node_helpers/files.py as a node imports it (its siblings on the path), loaded here."""
    import importlib
    import sys
    from pathlib import Path

    helpers = Path(__file__).resolve().parents[2] / "scripts" / "node_helpers"
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(helpers))
    for name in ("_contract", "_system", "_layout", "_tree", "files"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("files")
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.parametrize("make, kind", [(os.mkdir, "a directory"), (os.mkfifo, "a FIFO")])
def test_the_helper_says_what_a_path_that_is_not_a_regular_file_is(files_helper, tmp_path, make, kind):
    make(tmp_path / "x")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entry = os.stat("x", dir_fd=dir_fd, follow_symlinks=False)
        with pytest.raises(files_helper.PreconditionFailed) as refused:
            files_helper.require_regular(dir_fd, "x", "/home/alice/x", entry)
    finally:
        os.close(dir_fd)
    assert str(refused.value) == f"/home/alice/x in the desktop is not a regular file (it is {kind})"
    assert files_helper.kind_of(stat.S_IFSOCK) == "a socket" and files_helper.kind_of(0) == "of an unknown kind"
