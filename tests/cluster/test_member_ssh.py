"""Members help themselves over a real OpenSSH server and client, against a real desktop.

The test starts its own sshd on 127.0.0.1 (a free high port, its own host key and config in
a temp dir), for a temporary account `labvm-test-lab` that `labvm member setup` creates with
its sudoers rule; the account, the rule and the sshd are removed at the end. It shares the
testbed with other users: it never takes the testbed down, and brings it up only if it is not.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from labvm.state import StateDB

from .conftest import make_admin, wipe_mfs_files
from .test_secrets import ProcWatcher

ACCOUNT = "labvm-test-lab"
SUDOERS = Path("/etc/sudoers.d/labvm-test-members")
ANN, BO = "sshm-ann", "sshm-bo"
ANN_PW, BO_PW, NEW_PW = "ann-Pw-55170", "bo-Pw-88123", "ann-New-Pw-30291"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remove_account() -> None:
    try:
        pwd.getpwnam(ACCOUNT)
    except KeyError:
        return
    subprocess.run(["pkill", "-KILL", "-u", ACCOUNT], capture_output=True)
    subprocess.run(["userdel", "--remove", ACCOUNT], capture_output=True)


class Lab:
    def __init__(self, admin, tmp: Path, port: int):
        self.admin, self.tmp, self.port = admin, tmp, port

    def ssh_argv(self, key: str, *extra: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.tmp / key), "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.tmp / 'known_hosts'}", "-o", "ConnectTimeout=10", *extra,
                f"{ACCOUNT}@127.0.0.1"]

    def ssh(self, command: str | None, key: str = "ann", stdin: bytes = b"", extra: tuple = (), timeout: float = 300):
        argv = self.ssh_argv(key, *extra) + ([] if command is None else [command])
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab(testbed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("member-ssh")
    admin = make_admin(testbed, tmp / "admin")
    assert admin.labvm("image", "build", "--desktop", "minimal", timeout=1800).returncode == 0
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    for name, pw in ((ANN, ANN_PW), (BO, BO_PW)):
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=pw + "\n").returncode == 0
    wipe_mfs_files(admin, ANN, BO)
    for key in ("ann", "bo"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{key}@laptop", "-f", str(tmp / key)], check=True)
    for name, key in ((ANN, "ann"), (BO, "bo")):
        added = admin.labvm("user", "key", "add", name, str(tmp / f"{key}.pub"))
        assert added.returncode == 0, added.stderr

    _remove_account()
    port = free_port()
    made_run_sshd = not os.path.isdir("/run/sshd")
    sshd = None
    try:
        setup = admin.labvm("member", "setup", "--account", ACCOUNT, "--ssh-host", "127.0.0.1", "--ssh-port", str(port),
                            "--sudoers", str(SUDOERS))
        assert setup.returncode == 0, setup.stdout + setup.stderr
        home = Path(pwd.getpwnam(ACCOUNT).pw_dir)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "hostkey")], check=True)
        (tmp / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'hostkey'}\nPidFile {tmp / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {home}/.ssh/authorized_keys\nStrictModes yes\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"AllowUsers {ACCOUNT}\nPermitRootLogin no\nX11Forwarding no\nAllowTcpForwarding yes\nLogLevel VERBOSE\n"
        )
        host_pub = (tmp / "hostkey.pub").read_text().split()
        (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
                                stdout=open(tmp / "sshd.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert sshd.poll() is None and time.monotonic() < deadline, (tmp / "sshd.log").read_text()
                time.sleep(0.2)
        created = admin.labvm_json("create", ANN, "--node", "n1", "--gpus", "1", "--memory", "512m", "--cpus", "1")
        assert created["state"] == "running"
        yield Lab(admin, tmp, port)
    finally:
        if sshd is not None:
            os.killpg(sshd.pid, signal.SIGTERM)
            sshd.wait(timeout=20)
        admin.labvm("rm", ANN, "--yes")
        wipe_mfs_files(admin, ANN, BO)
        _remove_account()
        SUDOERS.unlink(missing_ok=True)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def text(result) -> str:
    return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


def desktop(lab) -> dict:
    return next(d for d in lab.admin.labvm_json("status", ok_codes=(0, 7))["desktops"] if d["user"] == ANN)


def authorized_keys(lab) -> str:
    return (Path(pwd.getpwnam(ACCOUNT).pw_dir) / ".ssh" / "authorized_keys").read_text()


def test_the_account_is_set_up_for_forced_commands(lab):
    entry = pwd.getpwnam(ACCOUNT)
    assert entry.pw_shell == "/bin/sh"
    path = Path(entry.pw_dir) / ".ssh" / "authorized_keys"
    found = path.stat()
    assert found.st_mode & 0o777 == 0o600 and found.st_uid == entry.pw_uid
    lines = [line for line in authorized_keys(lab).splitlines() if not line.startswith("#")]
    assert len(lines) == 2 and all(",restrict" in line and line.startswith('command="sudo -n ') for line in lines)
    assert SUDOERS.stat().st_mode & 0o777 == 0o440
    assert subprocess.run(["visudo", "-c", "-q", "-f", str(SUDOERS)]).returncode == 0


def test_status_help_and_tunnel(lab):
    status = lab.ssh("status")
    assert status.returncode == 0, text(status)
    assert f"{ANN}'s desktop: running on n1" in text(status) and "free GPUs:" in text(status)
    assert lab.ssh("help").returncode == 0 and b"passwd" in lab.ssh("help").stdout
    assert desktop(lab)["https"] in text(status)
    tunnel = lab.ssh("tunnel")
    port = desktop(lab)["vnc"].rsplit(":", 1)[1]
    https = https_address(lab).rsplit(":", 1)[1]
    assert (f"ssh -N -L 5901:10.213.0.11:{port} -L 6901:10.213.0.11:{https} -p {lab.port} {ACCOUNT}@127.0.0.1"
            in text(tunnel)), text(tunnel)


def https_address(lab) -> str:
    """NODE:PORT of ann's desktop's HTTPS."""
    parts = urllib.parse.urlsplit(desktop(lab)["https"])
    return f"{parts.hostname}:{parts.port}"


def _read_rfb(conn: socket.socket) -> bytes:
    try:
        return conn.recv(64)
    except (TimeoutError, ConnectionResetError):
        return b""


def _https_page(lab, password: str = ANN_PW):
    """What the desktop's HTTPS port answers, through the tunnel, to a browser at localhost: its
    certificate checked against labvm's CA for the name localhost, and ann's whole password."""
    context = ssl.create_default_context(cafile=str(lab.admin.home / "ca.pem"))
    auth = base64.b64encode(f"{ANN}:{password}".encode()).decode()

    def talk(conn: socket.socket) -> bytes:
        try:
            with context.wrap_socket(conn, server_hostname="localhost") as tls:
                tls.sendall(f"GET /vnc.html HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {auth}\r\n"
                            "Connection: close\r\n\r\n".encode())
                return tls.recv(64)
        except (OSError, ssl.SSLError) as exc:
            return repr(exc).encode()

    return talk


def _forward(lab, target: str, talk=_read_rfb) -> tuple[bytes, str]:
    """Open `ssh -N -L` to target and let talk() speak through it: (what it read, ssh's stderr)."""
    local = free_port()
    tunnel = subprocess.Popen(lab.ssh_argv("ann", "-N", "-L", f"{local}:{target}"), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", local), timeout=2)
                break
            except OSError:
                assert tunnel.poll() is None and time.monotonic() < deadline, "the tunnel never listened"
                time.sleep(0.2)
        conn.settimeout(10)
        with conn:
            data = talk(conn)
    finally:
        tunnel.terminate()
        _out, err = tunnel.communicate(timeout=20)
    return data, err.decode(errors="replace")


def test_the_tunnel_reaches_the_own_vnc_port_and_nothing_else(lab):
    address = desktop(lab)["vnc"]
    data, err = _forward(lab, address)
    assert data.startswith(b"RFB "), (data, err)
    refused, err = _forward(lab, "10.213.0.11:22")  # the node's own sshd: not the member's
    assert refused == b"" and "prohibited" in err, (refused, err)


def test_the_tunnel_reaches_the_own_https_page_as_localhost(lab):
    answer, err = _forward(lab, https_address(lab), _https_page(lab))
    assert answer.startswith(b"HTTP/1.1 200"), (answer, err)
    # The next slot's HTTPS port (another desktop's) is not ann's to forward.
    host, port = https_address(lab).rsplit(":", 1)
    refused, err = _forward(lab, f"{host}:{int(port) + 1}", _https_page(lab))
    assert not refused.startswith(b"HTTP/") and "prohibited" in err, (refused, err)


def test_stop_start_versions_get_and_put(lab):
    stopped = lab.ssh("stop")
    assert stopped.returncode == 0, text(stopped)
    assert desktop(lab)["state"] == "stopped"
    started = lab.ssh("start")
    assert started.returncode == 0, text(started)
    assert desktop(lab)["state"] == "running"
    versions = lab.ssh("versions")
    assert versions.returncode == 0 and b"v0" in versions.stdout, text(versions)
    content = bytes(range(256)) * 4
    put = lab.ssh("put /root/member-note.bin", stdin=content)
    assert put.returncode == 0, text(put)
    got = lab.ssh("get /root/member-note.bin")
    assert got.returncode == 0 and got.stdout == content, text(got)
    missing = lab.ssh("get /root/no-such-file")
    assert missing.returncode != 0


def test_passwd_reads_stdin_and_never_shows_it(lab):
    with ProcWatcher(NEW_PW) as watcher:
        changed = lab.ssh("passwd", stdin=(NEW_PW + "\n").encode())
    assert changed.returncode == 0, text(changed)
    assert watcher.leaks == []
    assert NEW_PW not in text(changed)
    with StateDB.open(lab.admin.home) as db:
        assert db.check_password(ANN, NEW_PW)
    log = (lab.admin.home / "audit.log").read_text()
    assert NEW_PW not in log
    entries = lab.admin.labvm_json("log", "--target", ANN)
    assert {"who": f"member:{ANN}", "command": "member passwd", "result": "ok"}.items() <= entries[-1].items()
    short = lab.ssh("passwd", stdin=b"x\n")
    assert short.returncode == 2 and b"too short" in short.stderr


@pytest.mark.parametrize("command", [
    "node check", f"status {BO}", f"get /home/{BO}/x {BO}", "start; sh", "start && sh", "start | sh", "`id`",
    "$(id)", "status\nid", "help extra", 'status" ; id #', "switch n2", "x" * 1100, "sh -c id",
])
def test_refused_commands(lab, command):
    result = lab.ssh(command)
    assert result.returncode != 0 and result.stdout == b"", text(result)
    assert b"labvm: error:" in result.stderr, text(result)


def test_no_login_shell_and_no_pty(lab):
    login = lab.ssh(None, timeout=60)
    assert login.returncode == 2 and b"no command given" in login.stderr and login.stdout == b"", text(login)
    # A forced terminal is refused by `restrict`; the client gives up, and no shell ever ran.
    forced = lab.ssh(None, extra=("-tt",), timeout=60)
    assert forced.returncode != 0 and b"PTY allocation request failed" in forced.stderr, text(forced)
    assert b"$ " not in forced.stdout and b"# " not in forced.stdout
    with_command = lab.ssh("status", extra=("-tt",), timeout=60)
    assert b"PTY allocation request failed" in with_command.stderr


def test_another_member_sees_only_their_own(lab):
    result = lab.ssh("status", key="bo")
    assert result.returncode == 4 and f"{BO} has no desktop".encode() in result.stderr, text(result)
    assert ANN.encode() not in result.stdout + result.stderr


def test_refusals_are_audited_as_the_member(lab):
    lab.ssh("node check")
    entries = lab.admin.labvm_json("log", "--target", ANN)
    assert entries[-1]["who"] == f"member:{ANN}" and entries[-1]["result"].startswith("refused:")


def test_the_tunnel_follows_a_switch(lab):
    before, before_https = desktop(lab)["vnc"], https_address(lab)
    assert f'permitopen="{before}"' in authorized_keys(lab) and f'permitopen="{before_https}"' in authorized_keys(lab)
    moved = lab.admin.labvm("switch", ANN, "n2", "--yes", timeout=900)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    after = desktop(lab)["vnc"]
    assert after.startswith("10.213.0.12:")
    keys = authorized_keys(lab)
    assert f'permitopen="{after}"' in keys and f'permitopen="{before}"' not in keys
    after_https = https_address(lab)
    assert f'permitopen="{after_https}"' in keys and f'permitopen="{before_https}"' not in keys
    assert f"-L 5901:{after}" in text(lab.ssh("tunnel")) and f"-L 6901:{after_https}" in text(lab.ssh("tunnel"))
    data, err = _forward(lab, after)
    assert data.startswith(b"RFB "), (data, err)
    # The page takes ann's password as it is now (test_passwd_... changed it over SSH), and
    # not the other one.
    with StateDB.open(lab.admin.home) as db:
        current, other = (NEW_PW, ANN_PW) if db.check_password(ANN, NEW_PW) else (ANN_PW, NEW_PW)
    page, err = _forward(lab, after_https, _https_page(lab, current))
    assert page.startswith(b"HTTP/1.1 200"), (page, err)
    page, err = _forward(lab, after_https, _https_page(lab, other))
    assert page.startswith(b"HTTP/1.1 401"), (page, err)
