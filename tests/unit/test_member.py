"""Members help themselves over SSH: the forced command's parser and dispatcher, the key
checks, the authorized_keys and sudoers files, and the cluster file's <members>."""

from __future__ import annotations

import base64
import io
import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from labvm import member_account
from labvm.admin import AdminHome
from labvm.audit import read as read_audit
from labvm.cli import main
from labvm.config import Node, add_node_to_file, parse_config
from labvm.errors import AlreadyExists, BadInput, NotFound
from labvm.member_account import Account, authorized_key_line, authorized_keys_text, sudoers_text, write_owned
from labvm.member_command import MAX_COMMAND_BYTES, Command, Refused, dispatch, help_text, parse
from labvm.member_keys import parse_public_key

PW = "a good password"
USER = "alice"
MEMBERS = {"alice", "bob", "carol"}
NODES = ("n1", "n2")


def ok(raw: str, may_switch: bool = False) -> Command:
    return parse(raw, user=USER, members=MEMBERS, nodes=NODES, may_switch=may_switch)


# -- the parser ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, verb, args", [
    ("status", "status", ()),
    ("  start ", "start", ()),
    ("stop", "stop", ()),
    ("restart", "restart", ()),
    ("passwd", "passwd", ()),
    ("versions", "versions", ()),
    ("restore 4", "restore", ("4",)),
    ("get /home/alice/notes.txt", "get", ("/home/alice/notes.txt",)),
    ("put '/home/alice/my notes.txt'", "put", ("/home/alice/my notes.txt",)),
    ("get /home/alice/./x", "get", ("/home/alice/x",)),
    ("tunnel", "tunnel", ()),
    ("help", "help", ()),
])
def test_each_allowed_command_parses(raw, verb, args):
    assert ok(raw) == Command(verb, args)


def test_switch_only_where_the_cluster_file_allows_it():
    with pytest.raises(Refused, match="not allowed in this lab"):
        ok("switch n2")
    assert ok("switch n2", may_switch=True) == Command("switch", ("n2",))
    with pytest.raises(Refused, match="no node"):
        ok("switch n9", may_switch=True)
    assert "switch" not in help_text(False) and "switch NODE" in help_text(True)


@pytest.mark.parametrize("raw, why", [
    (None, "no command given"),
    ("", "no command given"),
    ("   ", "no command given"),
    ("node check", "not a member command"),
    ("labvm node check", "not a member command"),
    ("user rm bob --purge", "another member"),
    ("create alice", "not a member command"),
    ("exec -- id", "not a member command"),
    ("shell", "not a member command"),
    ("status bob", "another member"),
    ("get /home/x bob", "another member"),
    ("bob", "another member"),
    ("start; sh", "no shell runs here"),
    ("start ;sh", "no shell runs here"),
    ("start && sh", "no shell runs here"),
    ("start || sh", "no shell runs here"),
    ("start | sh", "no shell runs here"),
    ("start > /etc/passwd", "no shell runs here"),
    ("get < /etc/shadow", "no shell runs here"),
    ("`id`", "no shell runs here"),
    ("status `id`", "no shell runs here"),
    ("$(id)", "no shell runs here"),
    ("get '$(id)'", "no shell runs here"),
    ("status $HOME", "no shell runs here"),
    ("start\nsh", "control characters"),
    ("start\rsh", "control characters"),
    ("status\x00", "control characters"),
    ("status\tx", "control characters"),
    ("status\x1b[2J", "control characters"),
    ("status\u0085", "control characters"),
    ("x" * (MAX_COMMAND_BYTES + 1), "longer than"),
    ("get /" + "é" * 600, "longer than"),
    ("status extra", "takes no argument"),
    ("start now", "takes no argument"),
    ("help me", "takes no argument"),
    ("restore", "takes 1 argument"),
    ("restore 4 5", "takes 1 argument"),
    ("restore four", "version number"),
    ("restore -1", "version number"),
    ("get", "takes 1 argument"),
    ("get relative/path", "absolute"),
    ("get /home/../etc/shadow", "'..'"),
    ("put /", "not the desktop's root"),
    ("status 'unclosed", "cannot be read"),
    ('status" ; id #', "no shell runs here"),
    ("sh -c id", "not a member command"),
    ("bash", "not a member command"),
    ("scp -t /tmp", "not a member command"),
    ("rsync --server .", "not a member command"),
    ("internal-sftp", "not a member command"),
])
def test_everything_else_is_refused(raw, why):
    with pytest.raises(BadInput, match=why):
        ok(raw)


def test_the_member_may_name_themselves():
    assert ok("get /home/alice/alice") == Command("get", ("/home/alice/alice",))


def test_a_refusal_is_one_line():
    for raw in ("node check", "start; sh", "x" * 2000, None):
        with pytest.raises(BadInput) as caught:
            ok(raw)
        assert "\n" not in str(caught.value)


# -- the dispatcher ------------------------------------------------------------------------------
class FakeOps:
    def __init__(self):
        self.calls: list[tuple] = []
        self.files: dict[str, bytes] = {"/home/alice/x": b"\x00\xffdata"}

    def __getattr__(self, name):
        def op(*args):
            self.calls.append((name, *args))
            return f"{name} done"

        return op

    def get(self, user, path):
        self.calls.append(("get", user, path))
        return self.files[path]

    def put(self, user, path, content):
        self.calls.append(("put", user, path, content))
        return "put done"


class Out(io.StringIO):
    def __init__(self):
        super().__init__()
        self.buffer = io.BytesIO()


def run(raw: str, stdin: str | bytes = "", may_switch: bool = False):
    ops, out = FakeOps(), Out()
    if isinstance(stdin, bytes):
        inp = io.TextIOWrapper(io.BytesIO(stdin))
    else:
        inp = io.StringIO(stdin)
    dispatch(ok(raw, may_switch), USER, ops, may_switch=may_switch, stdin=inp, stdout=out)
    return ops, out


@pytest.mark.parametrize("raw, call", [
    ("status", ("status", USER)),
    ("start", ("start", USER)),
    ("stop", ("stop", USER)),
    ("restart", ("restart", USER)),
    ("versions", ("versions", USER)),
    ("restore 7", ("restore", USER, 7)),
    ("tunnel", ("tunnel", USER)),
])
def test_each_command_runs_its_operation_on_the_members_own_desktop(raw, call):
    ops, out = run(raw)
    assert ops.calls == [call]
    assert out.getvalue() == f"{call[0]} done\n"


def test_switch_runs_the_switch_where_allowed():
    ops, _out = run("switch n2", may_switch=True)
    assert ops.calls == [("switch", USER, "n2")]


def test_passwd_reads_the_first_line_of_stdin():
    ops, out = run("passwd", stdin=PW + "\nignored\n")
    assert ops.calls == [("passwd", USER, PW)]
    assert PW not in out.getvalue()


@pytest.mark.parametrize("stdin, why", [("", "standard input, which is empty"), ("short\n", "too short"),
                                        ("a\x01bcdefghijkl\n", "control characters")])
def test_passwd_keeps_the_password_rules(stdin, why):
    with pytest.raises(BadInput, match=why) as caught:
        run("passwd", stdin=stdin)
    assert "bcdefghijkl" not in str(caught.value)


def test_passwd_asks_twice_at_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    ops, out = FakeOps(), Out()
    dispatch(ok("passwd"), USER, ops, may_switch=False, stdin=Tty(), stdout=out, prompt=lambda: PW)
    assert ops.calls == [("passwd", USER, PW)]


def test_get_writes_the_bytes_and_put_reads_them():
    ops, out = run("get /home/alice/x")
    assert out.buffer.getvalue() == b"\x00\xffdata" and out.getvalue() == ""
    ops, out = run("put /home/alice/y", stdin=b"\x00\x01binary")
    assert ops.calls == [("put", USER, "/home/alice/y", b"\x00\x01binary")]


def test_put_refuses_too_much():
    from labvm.files import MAX_PUT_BYTES

    with pytest.raises(BadInput, match="at most"):
        run("put /home/alice/y", stdin=b"x" * (MAX_PUT_BYTES + 1))


def test_help_lists_the_commands():
    ops, out = run("help")
    assert ops.calls == [] and all(verb in out.getvalue() for verb in ("status", "passwd", "get PATH", "tunnel"))


# -- keys ------------------------------------------------------------------------------------------
def openssh(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def wire(*parts: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(p)) + p for p in parts)).decode()


def test_good_keys_are_kept_as_type_base64_and_a_clean_comment():
    for key in (ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1()),
                ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP521R1())):
        text = openssh(key)
        parsed = parse_public_key(text + " alice@laptop\n")
        assert parsed.line == text + " alice@laptop"
        assert parsed.fingerprint.startswith("SHA256:") and "=" not in parsed.fingerprint


def test_the_fingerprint_is_ssh_keygens(tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], capture_output=True, text=True).stdout
    assert parse_public_key((tmp_path / "k.pub").read_text()).fingerprint == shown.split()[1]


def test_rsa_needs_3072_bits():
    assert parse_public_key(openssh(rsa.generate_private_key(65537, 3072))).bits == 3072
    with pytest.raises(BadInput, match="2048 bits is too weak"):
        parse_public_key(openssh(rsa.generate_private_key(65537, 2048)))


def test_security_keys_are_taken():
    key = parse_public_key("sk-ssh-ed25519@openssh.com " + wire(b"sk-ssh-ed25519@openssh.com", b"k" * 32, b"ssh:") + " yk")
    assert key.type == "sk-ssh-ed25519@openssh.com"
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    sk = "sk-ecdsa-sha2-nistp256@openssh.com"
    assert parse_public_key(f"{sk} {wire(sk.encode(), b'nistp256', point, b'ssh:')}").type == sk


ED = openssh(ed25519.Ed25519PrivateKey.generate())


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    (f'command="/bin/sh" {ED}', "options"),
    (f"restrict,port-forwarding {ED}", "options"),
    (f'no-pty {ED}', "options"),
    (f"{ED}\n{ED}", "one line"),
    (f"{ED} a\rb", "one line"),
    (f"{ED} x\x00", "control"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unknown key type"),
    ("ssh-ed25519-cert-v01@openssh.com AAAA", "unknown key type"),
    ("ssh-ed25519", "base64"),
    ("ssh-ed25519 not*base64", "base64"),
    ("ssh-ed25519 AAAA=A", "base64"),
    ("ssh-ed25519 " + wire(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xff" * 400), "its data holds"),
    ("ssh-ed25519 " + wire(b"ssh-ed25519", b"k" * 31), "32 bytes"),
    ("ssh-ed25519 " + wire(b"ssh-ed25519", b"k" * 32, b"extra"), "bytes after the key"),
    ("ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\xffssh").decode(), "ends too early"),
    ("ecdsa-sha2-nistp256 " + wire(b"ecdsa-sha2-nistp256", b"nistp384", b"\x04" + b"\x01" * 96), "curve"),
    ("ecdsa-sha2-nistp256 " + wire(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" + b"\x01" * 64), "not a valid"),
    ("sk-ssh-ed25519@openssh.com " + wire(b"sk-ssh-ed25519@openssh.com", b"k" * 32, b"web:"), "application"),
    ("x" * 20000, "longer than"),
])
def test_bad_keys_are_refused(text, why):
    with pytest.raises(BadInput, match=why):
        parse_public_key(text)


def test_a_comment_cannot_add_options_or_keys():
    key = parse_public_key(f'{ED} x",command="sh",permitopen="*:*" {ED}')
    assert key.comment == "xcommandshpermitopen::ssh-ed25519"[:64] or '"' not in key.comment
    assert all(ch not in key.comment for ch in ' ",=*')


# -- the authorized_keys file -----------------------------------------------------------------------
ACCOUNT = Account(account="lab", home="/home/lab", labvm="/usr/local/bin/labvm", config="/etc/labvm/bkConfxml.xml",
                  ssh_host="admin.lab", ssh_port=22)


def test_each_key_gets_the_forced_command_restrict_and_its_ports():
    key = parse_public_key(ED + " alice@laptop")
    line = authorized_key_line(ACCOUNT, "alice", key, [("10.0.0.1", 20000), ("gpu2.lab", 20003)])
    assert line == ('command="sudo -n /usr/local/bin/labvm --config /etc/labvm/bkConfxml.xml member alice",restrict,'
                    'port-forwarding,permitopen="10.0.0.1:20000",permitopen="gpu2.lab:20003" ' + ED + " alice@laptop")
    bare = authorized_key_line(ACCOUNT, "bob", key, [])
    assert bare.startswith('command="sudo -n /usr/local/bin/labvm --config /etc/labvm/bkConfxml.xml member bob",restrict ')
    assert "port-forwarding" not in bare and "permitopen" not in bare
    assert 'permitopen="[fd00::1]:20000"' in authorized_key_line(ACCOUNT, "bob", key, [("fd00::1", 20000)])


def test_the_file_has_one_line_per_key_and_the_ports_follow_the_desktops():
    keys = [{"user": "alice", "key_type": "ssh-ed25519", "key_b64": ED.split()[1], "comment": "a"},
            {"user": "bob", "key_type": "ssh-ed25519", "key_b64": ED.split()[1], "comment": ""}]
    ports = {"alice": [("10.0.0.1", 20000)]}
    text = authorized_keys_text(ACCOUNT, keys, lambda u: ports.get(u, []))
    lines = text.splitlines()
    assert lines[0].startswith("#") and len(lines) == 3 and text.endswith("\n")
    assert 'member alice",restrict,port-forwarding,permitopen="10.0.0.1:20000" ' in lines[1]
    assert 'member bob",restrict ssh-ed25519' in lines[2]
    ports["alice"] = [("10.0.0.2", 20004)]
    moved = authorized_keys_text(ACCOUNT, keys, lambda u: ports.get(u, []))
    assert 'permitopen="10.0.0.2:20004"' in moved and "10.0.0.1" not in moved


def test_a_host_that_could_break_out_of_permitopen_is_refused():
    with pytest.raises(BadInput):
        authorized_key_line(ACCOUNT, "alice", parse_public_key(ED), [('h",command="sh', 1)])


def test_written_0600_as_the_account_and_atomically(tmp_path):
    me = os.getuid()
    (tmp_path / "authorized_keys").write_text("old\n")
    write_owned(tmp_path, "authorized_keys", b"new\n", me, os.getgid())
    found = (tmp_path / "authorized_keys").stat()
    assert stat.S_IMODE(found.st_mode) == 0o600 and found.st_uid == me
    assert (tmp_path / "authorized_keys").read_text() == "new\n"
    assert os.listdir(tmp_path) == ["authorized_keys"]  # no temp file left


def test_a_symlink_in_place_of_the_file_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "authorized_keys").symlink_to(victim)
    write_owned(ssh, "authorized_keys", b"new\n", os.getuid(), os.getgid())
    assert victim.read_text() == "keep\n" and not (ssh / "authorized_keys").is_symlink()


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "authorized_keys").write_text("old\n")

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(member_account.os, "fsync", broken)
    with pytest.raises(OSError):
        write_owned(tmp_path, "authorized_keys", b"new\n", os.getuid(), os.getgid())
    assert (tmp_path / "authorized_keys").read_text() == "old\n" and os.listdir(tmp_path) == ["authorized_keys"]


# -- sudoers ---------------------------------------------------------------------------------------------
def test_sudoers_allows_exactly_the_member_command_and_keeps_only_ssh_original_command():
    text = sudoers_text(ACCOUNT)
    assert "Cmnd_Alias LABVM_MEMBER_LAB = /usr/local/bin/labvm --config /etc/labvm/bkConfxml.xml member *\n" in text
    assert 'Defaults!LABVM_MEMBER_LAB env_keep += "SSH_ORIGINAL_COMMAND"\n' in text
    assert "Defaults!LABVM_MEMBER_LAB env_reset\n" in text
    assert text.endswith("lab ALL=(root) NOPASSWD: LABVM_MEMBER_LAB\n")
    assert "ALL=(ALL)" not in text and "SETENV" not in text


def test_sudoers_passes_visudo(tmp_path):
    if shutil.which("visudo") is None:
        pytest.skip("no visudo")
    path = tmp_path / "rule"
    path.write_text(sudoers_text(ACCOUNT))
    assert subprocess.run(["visudo", "-c", "-q", "-f", str(path)]).returncode == 0


@pytest.mark.parametrize("path", ["relative/labvm", "/usr/bin/lab vm", '/x"y', "/a/../b", "/a\nb"])
def test_paths_that_need_quoting_are_refused(path):
    with pytest.raises(BadInput):
        member_account.safe_path(path, "labvm executable")


# -- the admin side: keys in the state database, refresh, the cluster file ----------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    add_node_to_file(config, Node(name="n1", host="10.0.0.1"))
    home = AdminHome(config)
    with home.state() as db:
        db.add_user("alice", PW)
        db.add_user("bob", PW)
    return home


def test_may_switch_is_off_unless_the_cluster_file_says_so(home):
    assert home.config.members.may_switch is False
    text = home.config_path.read_text()
    assert "<may_switch>false</may_switch>" in text
    home.config_path.write_text(text.replace("<may_switch>false</may_switch>", "<may_switch>true</may_switch>"))
    assert parse_config(home.config_path).members.may_switch is True
    start, end = text.index("  <members>"), text.index("</members>") + len("</members>\n")
    home.config_path.write_text(text[:start] + text[end:])
    assert parse_config(home.config_path).members.may_switch is False


def test_the_starter_files_are_the_same():
    root = Path(__file__).resolve().parents[2]
    assert (root / "bkConfxml.xml").read_bytes() == (root / "labvm" / "schema" / "bkConfxml.xml").read_bytes()


def key_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"k{len(list(tmp_path.iterdir()))}.pub"
    path.write_text(text)
    return str(path)


def test_user_key_add_list_rm(home, tmp_path, capsys):
    assert main(["user", "key", "add", "alice", key_file(tmp_path, ED + " alice@laptop\n")]) == 0
    assert main(["user", "key", "add", "alice", key_file(tmp_path, ED)]) == AlreadyExists.exit_code
    assert main(["user", "key", "add", "bob", key_file(tmp_path, ED)]) == AlreadyExists.exit_code
    assert main(["user", "key", "add", "nobody", key_file(tmp_path, ED)]) == NotFound.exit_code
    assert main(["user", "key", "add", "alice", key_file(tmp_path, f'command="sh" {ED}')]) == 2
    capsys.readouterr()
    assert main(["user", "key", "list", "alice", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    fingerprint = parse_public_key(ED).fingerprint
    assert [(k["fingerprint"], k["comment"]) for k in listed] == [(fingerprint, "alice@laptop")]
    assert main(["user", "key", "rm", "alice", "SHA256:nope"]) == NotFound.exit_code
    assert main(["user", "key", "rm", "alice", fingerprint]) == 0
    with home.state() as db:
        assert db.member_keys() == []


def test_user_rm_removes_the_keys(home, tmp_path, monkeypatch):
    assert main(["user", "key", "add", "bob", key_file(tmp_path, ED)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["user", "rm", "bob", "--keep-files", "--yes"]) == 0
    with home.state() as db:
        assert db.member_keys() == []
        db.add_user("bob", PW)
        db.add_member_key("bob", "ssh-ed25519", ED.split()[1], "", parse_public_key(ED).fingerprint)


def test_refresh_is_a_noop_without_an_account(home):
    assert member_account.refresh_authorized_keys(home) is None


def test_refresh_writes_the_accounts_file_when_keys_change(home, tmp_path, monkeypatch):
    me = pwd.getpwuid(os.getuid())
    account_home = tmp_path / "lab"
    account_home.mkdir()
    account = Account(account=me.pw_name, home=str(account_home), labvm="/usr/local/bin/labvm",
                      config=str(home.config_path), ssh_host="admin.lab")
    member_account.save_account(home.home, account)
    monkeypatch.setattr(member_account, "desktop_ports", lambda _home: lambda user: [("10.0.0.1", 20000)] if user == "alice" else [])
    assert main(["user", "key", "add", "alice", key_file(tmp_path, ED + " a")]) == 0
    path = account_home / ".ssh" / "authorized_keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert f'member alice",restrict,port-forwarding,permitopen="10.0.0.1:20000" {ED} a' in path.read_text()
    fingerprint = parse_public_key(ED).fingerprint
    assert main(["user", "key", "rm", "alice", fingerprint]) == 0
    assert "member alice" not in path.read_text()


def test_the_plans_that_move_desktops_refresh_the_file(monkeypatch):
    from labvm import plan

    assert plan.MOVES_DESKTOPS == {"create", "switch", "rm"}
    seen = []
    monkeypatch.setattr(member_account, "refresh_quietly", lambda home: seen.append(home))
    plan.Runner("HOME")._follow_desktops("switch")
    plan.Runner("HOME")._follow_desktops("backup")
    assert seen == ["HOME"]


def test_the_member_command_refuses_and_audits_as_the_member(home, monkeypatch, capsys):
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "start; sh")
    assert main(["member", "alice"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no shell runs here" in err
    entry = read_audit(home.home)[-1]
    assert entry.who == "member:alice" and entry.command == "member" and entry.result.startswith("refused:")
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND")
    assert main(["member", "alice"]) == 2
    assert "no command given" in capsys.readouterr().err
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "status")
    assert main(["member", "zed"]) == NotFound.exit_code
    assert main(["member", "setup", "--help"]) == 0


def test_the_member_command_runs_help_and_logs_it(home, monkeypatch, capsys):
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "help")
    assert main(["member", "alice"]) == 0
    assert "passwd" in capsys.readouterr().out
    entry = read_audit(home.home)[-1]
    assert (entry.who, entry.command, entry.target, entry.result) == ("member:alice", "member help", "alice", "ok")


def test_old_audit_lines_still_read(home):
    (home.home / "audit.log").write_text('{"time": 1.0, "who": "root", "command": "labvm stop", "target": "alice", "result": "ok"}\n')
    assert read_audit(home.home)[0].who == "root"


# -- members' commands share the admin's locks, and the ports follow the state database ----------
@pytest.fixture
def with_desktop(home, monkeypatch):
    from labvm import desktops as desktops_mod

    monkeypatch.setattr(desktops_mod.HelperBundle, "from_package", classmethod(lambda cls: None))
    with home.state() as db:
        db.conn.execute(
            "INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, image, created_at, updated_at) "
            "VALUES ('alice', 'n1', 'running', 20004, 20005, '{}', 1, NULL, 0, 0)")
    return home


def test_a_members_command_waits_for_no_one_while_the_desktop_is_locked(with_desktop, monkeypatch):
    import socket

    from labvm import plan
    from labvm.errors import Busy
    from labvm.member_ops import LabOps

    def no_node(*_a, **_k):
        raise AssertionError("a locked desktop's node was asked")

    monkeypatch.setattr(plan.Context, "_open_session", no_node)
    with with_desktop.state() as db:
        db.add_lock("alice", None, socket.gethostname(), os.getppid())  # another labvm, alive, holds it
    for action in (lambda ops: ops.stop("alice"), lambda ops: ops.start("alice"), lambda ops: ops.restore("alice", 1)):
        with pytest.raises(Busy):
            action(LabOps(with_desktop))


def with_vnc_listen(home, listen: str):
    text = home.config_path.read_text()
    if "<listen>published</listen>" in text:
        text = text.replace("<listen>published</listen>", f"<listen>{listen}</listen>")
    else:
        text = text.replace("</labvm>", f"<vnc><listen>{listen}</listen></vnc></labvm>")
    home.config_path.write_text(text)
    home.__dict__.pop("config", None)  # read the file again
    assert home.config.vnc.listen == listen
    return home


def test_the_ports_are_the_desktops_vnc_and_https_ports_on_its_nodes_host(with_desktop):
    https = with_desktop.config.node("n1").https_port(20004)
    ports_of = member_account.desktop_ports(with_desktop)
    assert ports_of("alice") == [("10.0.0.1", 20004), ("10.0.0.1", https)] and ports_of("bob") == []


@pytest.mark.parametrize("listen", ["loopback", "off"])
def test_raw_vnc_not_on_the_nodes_address_is_no_forward(with_desktop, listen):
    home = with_vnc_listen(with_desktop, listen)
    https = home.config.node("n1").https_port(20004)
    assert member_account.desktop_ports(home)("alice") == [("10.0.0.1", https)]
    from labvm.member_ops import LabOps

    lines = LabOps(home).tunnel("alice").splitlines()
    assert lines[0] == f"ssh -N -L 6901:10.0.0.1:{https} lab@ADMIN"
    assert "the browser is the way in" in lines[2] and not any("VNC client" in line for line in lines)


def test_tunnel_prints_the_ssh_line_the_permitopen_allows(with_desktop):
    from labvm.member_ops import LabOps

    member_account.save_account(with_desktop.home, Account(account="lab", home="/home/lab", labvm="/usr/local/bin/labvm",
                                                           config=str(with_desktop.config_path), ssh_host="admin.lab",
                                                           ssh_port=2222))
    https = with_desktop.config.node("n1").https_port(20004)
    lines = LabOps(with_desktop).tunnel("alice").splitlines()
    assert lines[0] == f"ssh -N -L 5901:10.0.0.1:20004 -L 6901:10.0.0.1:{https} -p 2222 lab@admin.lab"
    assert lines[1] == "then open https://localhost:6901/vnc.html?autoconnect=1&resize=remote in a browser that trusts labvm's CA"
    assert lines[2] == "or point a VNC client at localhost:5901"
    # What the line forwards is exactly what the key's permitopen allows.
    allowed = member_account.desktop_ports(with_desktop)("alice")
    assert [f"{h}:{p}" for h, p in allowed] == [f.split(":", 1)[1] for f in lines[0].split() if f.count(":") == 2]


def test_install_sudoers_checks_with_visudo_and_writes_0440(tmp_path, monkeypatch):
    if shutil.which("visudo") is None:
        pytest.skip("no visudo")
    account = Account(**{**ACCOUNT.__dict__, "sudoers": str(tmp_path / "labvm-members")})
    path = member_account.install_sudoers(account)
    assert stat.S_IMODE(path.stat().st_mode) == 0o440 and path.read_text() == sudoers_text(account)
    monkeypatch.setattr(member_account, "sudoers_text", lambda _a: "lab ALL=(root) NOPASSWD: this is not sudoers\n")
    with pytest.raises(member_account.StateError, match="visudo refused"):
        member_account.install_sudoers(account)
    assert sorted(os.listdir(tmp_path)) == ["labvm-members"] and path.read_text() == sudoers_text(account)


def test_an_account_with_nologin_gets_a_real_shell(monkeypatch):
    entry = pwd.struct_passwd(("lab", "x", 1500, 1500, "", "/home/lab", "/usr/sbin/nologin"))
    monkeypatch.setattr(member_account.pwd, "getpwnam", lambda _n: entry)
    ran = []
    member_account.ensure_account("lab", None, run=lambda argv, **_k: ran.append(argv))
    assert ran == [["usermod", "--shell", "/bin/sh", "lab"]]


def test_the_members_account_cannot_run_setup_through_its_sudo_rule(home, monkeypatch):
    member_account.save_account(home.home, Account(**{**ACCOUNT.__dict__, "config": str(home.config_path)}))
    monkeypatch.setenv("SUDO_USER", "lab")
    assert main(["member", "setup", "--account", "lab", "--sudoers", "/tmp/nothing-here"]) == 2
    assert main(["member", "refresh"]) == 2
    assert not Path("/tmp/nothing-here").exists()
