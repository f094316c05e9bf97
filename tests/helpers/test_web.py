"""The desktop's HTTPS (noVNC through websockify, TLS from the node's stunnel), as the vm helper
sets it up: the spec's https port and vnc_listen, the TLS secrets, the runtime files,
websockify's auth plugin, and a real stunnel in front of a local HTTP server. No dockerd, no
mounts."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from .test_vm import USER, minimal_spec, needs_tini

KEY = "-----BEGIN PRIVATE KEY-----\nMIG...\n-----END PRIVATE KEY-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"


def body(bundle, **overrides):
    spec = bundle.spec.container_spec("spec", minimal_spec(**overrides))
    return spec, bundle.container.container_create_body(USER, spec, "/m", "/rt")


def test_the_https_port_is_not_dockers_to_publish(bundle):
    spec, made = body(bundle, ports={"vnc": 20000, "ssh": 20001, "https": 20040})
    assert spec["vnc_listen"] == "published"
    # stunnel on the node serves it: docker publishes VNC and ssh only.
    assert made["HostConfig"]["PortBindings"] == {
        "5901/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20000"}],
        "22/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20001"}],
    }
    assert set(made["ExposedPorts"]) == {"5901/tcp", "22/tcp"}
    env = dict(item.split("=", 1) for item in made["Env"])
    assert env["LABVM_HTTPS"] == "1" and env["LABVM_VNC_LISTEN"] == "published"


def test_vnc_on_the_nodes_loopback_or_not_at_all(bundle):
    _, loopback = body(bundle, ports={"vnc": 20000, "https": 20040}, bind_address="10.213.0.11", vnc_listen="loopback")
    assert loopback["HostConfig"]["PortBindings"] == {"5901/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20000"}]}
    spec, off = body(bundle, ports={"vnc": 20000, "https": 20040}, bind_address="10.213.0.11", vnc_listen="off")
    assert off["HostConfig"]["PortBindings"] == {} and off["ExposedPorts"] == {}
    assert bundle.container.vnc_endpoint(spec) == {"address": None, "port": None}


def test_a_spec_without_https_has_none_and_the_ports_differ(bundle):
    spec, made = body(bundle)
    assert spec["ports"] == {"vnc": 20000, "ssh": None, "https": None}
    assert dict(item.split("=", 1) for item in made["Env"])["LABVM_HTTPS"] == "0"
    with pytest.raises(bundle.contract.BadRequest, match="different ports"):
        bundle.spec.container_spec("spec", minimal_spec(ports={"vnc": 20000, "https": 20000}))
    with pytest.raises(bundle.contract.BadRequest, match="https port"):
        bundle.spec.container_spec("spec", minimal_spec(vnc_listen="off"))
    with pytest.raises(bundle.contract.BadRequest, match="vnc_listen"):
        bundle.spec.container_spec("spec", minimal_spec(vnc_listen="public"))


def test_the_tls_key_and_certificate_travel_as_secrets(bundle):
    check = bundle.spec.password_secrets
    assert check("secrets", {"password": "pw"}) == {"password": "pw", "tls_key": None, "tls_cert": None}
    assert check("secrets", {"password": "pw", "tls_key": KEY, "tls_cert": CERT})["tls_key"] == KEY
    with pytest.raises(bundle.contract.BadRequest, match="go together"):
        check("secrets", {"password": "pw", "tls_key": KEY})
    with pytest.raises(bundle.contract.BadRequest, match="PEM") as refused:
        check("secrets", {"password": "pw", "tls_key": "not a key", "tls_cert": CERT})
    assert "not a key" not in str(refused.value)


@needs_tini
def test_the_runtime_dir_the_container_sees_holds_no_tls_key(bundle, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for name in ("tls.key", "tls.crt"):  # where an older helper put them
        (runtime / name).write_text(KEY)
    assert bundle.runtime_dir.ensure_runtime_files(str(runtime)) is True
    assert sorted(os.listdir(runtime)) == ["apply-password", "init", "labvm_web_auth.py", "tini"]
    assert stat.S_IMODE(os.stat(runtime / "labvm_web_auth.py").st_mode) == 0o600


def test_the_init_starts_websockify_plain_behind_the_plugin(bundle):
    init = bundle.runtime_dir.INIT_SCRIPT
    assert "--web-auth" in init and "--auth-plugin labvm_web_auth.BasicAuth" in init
    assert '"$WEB_PORT" "127.0.0.1:$VNC_PORT"' in init and "WEB_PORT=6901" in init
    # No TLS in the container: no key to read there.
    assert "--ssl-only" not in init and "--key" not in init and "tls." not in init
    # The password reaches the hasher on stdin, never in argv.
    assert 'labvm_web_auth.py" hash "$USER_NAME" <"$SECRET"' in init


def test_stunnels_config_names_the_desktops_port_and_container(bundle):
    web = bundle.web
    conf = web.stunnel_config("/d/vms/dora/web", "dora", "10.213.0.11", 20040, "172.30.0.5")
    lines = conf.splitlines()
    for line in ("foreground = yes", "setuid = nobody", "setgid = nogroup", "accept = 10.213.0.11:20040",
                 "connect = 172.30.0.5:6901", "cert = /d/vms/dora/web/tls.crt", "key = /d/vms/dora/web/tls.key",
                 "sslVersionMin = TLSv1.2"):
        assert line in lines, line
    assert "accept = [fd00::1]:20040" in web.stunnel_config("/w", "dora", "fd00::1", 20040, "172.30.0.5").splitlines()
    assert web.web_dir("/d/vms/dora") == "/d/vms/dora/web"


@pytest.fixture
def plugin(bundle, tmp_path, monkeypatch):
    """labvm_web_auth as websockify imports it, with websockify's AuthenticationError."""

    class AuthenticationError(Exception):
        def __init__(self, log_msg=None, response_code=403, response_headers={}, response_msg=None):  # noqa: B006
            self.code, self.headers = response_code, response_headers
            super().__init__(response_code)

    fake = types.ModuleType("websockify.auth_plugins")
    fake.AuthenticationError = AuthenticationError
    monkeypatch.setitem(sys.modules, "websockify", types.ModuleType("websockify"))
    monkeypatch.setitem(sys.modules, "websockify.auth_plugins", fake)
    module = types.ModuleType("labvm_web_auth")
    exec(compile(bundle.runtime_dir.WEB_AUTH_MODULE, "labvm_web_auth.py", "exec"), module.__dict__)
    source = tmp_path / "passwd"
    source.write_text(module.make_line("dora", "dora-Pw-5521-long".encode()))
    return module, AuthenticationError, module.BasicAuth(str(source))


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_plugin_takes_the_whole_password_only(plugin):
    module, refused, auth = plugin
    auth.authenticate(basic("dora", "dora-Pw-5521-long"), "127.0.0.1", 5901)
    for headers in ({}, basic("dora", "dora-Pw-"), basic("dora", "dora-Pw-XXXXXXXXX"), basic("dora", "wrong"),
                    basic("mallory", "dora-Pw-5521-long"), {"Authorization": "Bearer x"}, {"Authorization": "Basic !!"}):
        with pytest.raises(refused) as error:
            auth.authenticate(headers, "127.0.0.1", 5901)
        assert error.value.code == 401 and error.value.headers["WWW-Authenticate"].startswith("Basic ")


def test_the_hash_file_holds_no_password(plugin, tmp_path):
    line = (tmp_path / "passwd").read_text()
    assert line.startswith("dora:scrypt$16384$8$1$") and "dora-Pw" not in line


def test_a_pair_that_passed_scrypt_passes_again_at_hmacs_cost_and_no_other(plugin, tmp_path, monkeypatch):
    module, refused, auth = plugin
    right = basic("dora", "dora-Pw-5521-long")
    auth.authenticate(right, "127.0.0.1", 5901)
    note = tmp_path / "passwd.ok"
    assert stat.S_IMODE(note.stat().st_mode) == 0o600 and "dora-Pw" not in note.read_text()
    real_scrypt, calls = module.scrypt, []
    monkeypatch.setattr(module, "scrypt", lambda *a, **k: calls.append(1) or real_scrypt(*a, **k))
    auth.authenticate(right, "127.0.0.1", 5901)
    assert calls == []  # the note let it in
    for headers in (basic("dora", "dora-Pw-5521-lonG"), basic("mallory", "dora-Pw-5521-long")):
        with pytest.raises(refused):
            auth.authenticate(headers, "127.0.0.1", 5901)
    assert len(calls) == 2  # wrong pairs always pay scrypt
    # A new password (a new hash line): the old pair's note admits nothing.
    (tmp_path / "passwd").write_text(module.make_line("dora", b"a-new-Password-77"))
    with pytest.raises(refused):
        auth.authenticate(right, "127.0.0.1", 5901)
    auth.authenticate(basic("dora", "a-new-Password-77"), "127.0.0.1", 5901)


def test_a_missing_hash_file_refuses_everyone(plugin, tmp_path):
    module, refused, _ = plugin
    with pytest.raises(refused) as error:
        module.BasicAuth(str(tmp_path / "none")).authenticate(basic("dora", "dora-Pw-5521-long"), "h", 1)
    assert error.value.code == 503


# -- a real stunnel (Debian's stunnel4) in front of a plain HTTP server ----------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="stunnel drops to nobody: needs root")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def upstream(bundle):
    """websockify's stand-in: HTTP on 127.0.0.2 at the container's web port."""
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"hello from the container"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", bundle.web.WEB_CONTAINER_PORT), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.0.0.2"
    server.shutdown()
    server.server_close()


@pytest.fixture
def authority(tmp_path):
    from labvm import ca

    authority, _ = ca.init(tmp_path / "admin")
    return authority, tmp_path / "admin" / "ca.pem"


def fetch(port: int, ca_file, name: str = "127.0.0.1") -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    return data


def process_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as stream:
        return int(next(line for line in stream if line.startswith("Uid:")).split()[1])


def stunnel_setup(tmp_path, authority) -> tuple[Path, int, str, str]:
    """A desktop's vm dir, a free port, and a key and certificate for 127.0.0.1 from the CA."""
    from labvm import ca

    vm_dir = tmp_path / "vms" / USER
    vm_dir.mkdir(parents=True)
    key, cert = (pem.decode() for pem in ca.issue(authority, [], ["127.0.0.1"]))
    return vm_dir, free_port(), key, cert


@needs_root
def test_stunnel_serves_tls_as_nobody_and_follows_the_certificate(bundle, tmp_path, upstream, authority):
    import pwd

    from labvm import ca

    web = bundle.web
    authority, ca_file = authority
    vm_dir, port, key, cert = stunnel_setup(tmp_path, authority)
    try:
        assert web.ensure_web(str(vm_dir), USER, "127.0.0.1", port, upstream, key, cert, "127.0.0.1") is True
        directory = vm_dir / "web"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for name in ("tls.key", "tls.crt", "stunnel.conf"):
            assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
        pid = web.running_pid(str(directory))
        assert pid is not None and process_uid(pid) == pwd.getpwnam("nobody").pw_uid
        assert fetch(port, ca_file).endswith(b"hello from the container")
        # The same again: nothing restarts.
        assert web.ensure_web(str(vm_dir), USER, "127.0.0.1", port, upstream, key, cert, "127.0.0.1") is False
        assert web.running_pid(str(directory)) == pid
        # A renewed certificate restarts it, and the new one is served.
        key2, cert2 = (pem.decode() for pem in ca.issue(authority, ["localhost"], ["127.0.0.1"]))
        assert web.ensure_web(str(vm_dir), USER, "127.0.0.1", port, upstream, key2, cert2, "127.0.0.1") is True
        assert web.running_pid(str(directory)) not in (None, pid)
        assert fetch(port, ca_file, name="localhost").endswith(b"hello from the container")
        # TLS only: plain HTTP gets no page.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            raw.settimeout(10)
            try:
                answer = raw.recv(4096)
            except OSError:
                answer = b""
        assert b"hello" not in answer
    finally:
        assert web.stop_web(str(vm_dir)) is True
    assert web.running_pid(str(vm_dir / "web")) is None and not (vm_dir / "web" / "stunnel.pid").exists()
    assert web.stop_web(str(vm_dir)) is False
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@needs_root
def test_a_pid_file_naming_another_process_stops_nothing(bundle, tmp_path):
    import subprocess

    web = bundle.web
    directory = tmp_path / "vms" / USER / "web"
    directory.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (directory / "stunnel.pid").write_text(f"{bystander.pid}\n")
        assert web.running_pid(str(directory)) is None
        assert web.stop_web(str(tmp_path / "vms" / USER)) is False
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@needs_root
def test_a_port_in_use_fails_with_stunnels_log(bundle, tmp_path, upstream, authority):
    from labvm import ca

    web = bundle.web
    authority, _ = authority
    vm_dir = tmp_path / "vms" / USER
    vm_dir.mkdir(parents=True)
    key, cert = (pem.decode() for pem in ca.issue(authority, [], ["127.0.0.1"]))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(bundle.contract.Failed, match="did not start") as failed:
            web.ensure_web(str(vm_dir), USER, "127.0.0.1", port, upstream, key, cert, "127.0.0.1")
    assert "BEGIN" not in str(failed.value)  # its log, never the key
    assert web.running_pid(str(vm_dir / "web")) is None


@needs_root
def test_start_web_returns_before_stunnel_is_waited_for_and_wait_sees_it_answer(bundle, tmp_path, upstream, authority):
    """What a desktop's start does: start stunnel, wait for the desktop, then wait for stunnel."""
    web = bundle.web
    authority, ca_file = authority
    vm_dir, port, key, cert = stunnel_setup(tmp_path, authority)
    try:
        starting = web.start_web(str(vm_dir), USER, "127.0.0.1", port, upstream, key, cert, "127.0.0.1")
        assert starting is not None and web.running_pid(str(vm_dir / "web")) == starting.process.pid
        starting.wait()
        assert fetch(port, ca_file).endswith(b"hello from the container")
        # Running with the same files: nothing to start, nothing to wait for.
        assert web.start_web(str(vm_dir), USER, "127.0.0.1", port, upstream, key, cert, "127.0.0.1") is None
    finally:
        web.stop_web(str(vm_dir))
    # A stunnel that cannot listen fails the wait, which stops it.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        starting = web.start_web(str(vm_dir), USER, "127.0.0.1", busy, upstream, key, cert, "127.0.0.1")
        with pytest.raises(bundle.contract.Failed, match="did not start"):
            starting.wait()
    assert starting.process.poll() is not None and web.running_pid(str(vm_dir / "web")) is None


def test_a_renewal_carries_key_and_certificate_alone(bundle):
    check = bundle.spec.tls_secrets
    assert check("tls", {"tls_key": KEY, "tls_cert": CERT}) == {"tls_key": KEY, "tls_cert": CERT}
    for bad in ({"tls_key": KEY}, {"tls_key": KEY, "tls_cert": CERT, "password": "pw"}, "PEM", {"tls_key": "x", "tls_cert": CERT}):
        with pytest.raises(bundle.contract.BadRequest) as refused:
            check("tls", bad)
        assert "pw" not in str(refused.value) and "MIG" not in str(refused.value)
    assert bundle.spec.ip_address_param("bind_address", "10.213.0.11") == "10.213.0.11"
    with pytest.raises(bundle.contract.BadRequest, match="IP address"):
        bundle.spec.ip_address_param("bind_address", "node1; rm -rf /")
# -- websockify answers VncAuth for the browser -----------------------------------------------
class Script:
    """One side of a conversation: recv() hands out what the peer says, send() records."""

    def __init__(self, *said: bytes):
        self.incoming, self.sent = bytearray(b"".join(said)), []

    def recv(self, count: int) -> bytes:
        data = bytes(self.incoming[:count])
        del self.incoming[:count]
        return data

    def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def test_vncauth_is_des_with_the_bit_reversed_password(plugin):
    module = plugin[0]
    # FIPS 46 test vector: key 133457799BBCDFF1, 0123456789ABCDEF -> 85E813540F0AB405.
    key = bytes.fromhex("133457799BBCDFF1")
    password = bytes(module.reverse_bits(b) for b in key)
    challenge = bytes.fromhex("0123456789ABCDEF") * 2
    assert module.vnc_response(challenge, password + b"ignored") == bytes.fromhex("85E813540F0AB405") * 2
    assert module.reverse_bits(0b00000001) == 0b10000000 and module.reverse_bits(0xF0) == 0x0F


def test_websockify_logs_in_to_the_server_with_the_password(plugin):
    module = plugin[0]
    challenge = bytes(range(16))
    server = Script(b"RFB 003.008\n", b"\x01\x02", challenge, b"\0\0\0\0")
    module.log_in_to_server(server.recv, server.send, b"dora-Pw-5521-long")
    assert server.sent == [b"RFB 003.008\n", b"\x02", module.vnc_response(challenge, b"dora-Pw-")]
    refused = Script(b"RFB 003.008\n", b"\x01\x02", challenge, b"\0\0\0\x01")
    with pytest.raises(module.RfbError, match="refused the password"):
        module.log_in_to_server(refused.recv, refused.send, b"wrong")
    with pytest.raises(module.RfbError, match="no security type"):
        module.log_in_to_server(*(lambda s: (s.recv, s.send))(Script(b"RFB 003.008\n", b"\x01\x13")), b"x")
    with pytest.raises(module.RfbError, match="closed"):
        module.log_in_to_server(*(lambda s: (s.recv, s.send))(Script(b"RFB 003.008\n")), b"x")


def test_the_browser_is_offered_none_and_nothing_else(plugin):
    module = plugin[0]
    browser = Script(b"RFB 003.008\n", b"\x01")
    module.greet_browser(browser.recv, browser.send)
    assert browser.sent == [b"RFB 003.008\n", b"\x01\x01", b"\0\0\0\0"]
    old = Script(b"RFB 003.003\n")
    module.greet_browser(old.recv, old.send)
    assert old.sent == [b"RFB 003.008\n", b"\0\0\0\x01"]
    sly = Script(b"RFB 003.008\n", b"\x02")
    with pytest.raises(module.RfbError, match="not offered"):
        module.greet_browser(sly.recv, sly.send)


# --- the HTTPS password's hash, made on the node once for each password ---------------------


def test_the_hash_line_is_made_once_for_each_password_and_kept_out_of_the_container(bundle, tmp_path, monkeypatch):
    rd = bundle.runtime_dir
    auth = rd.web_auth()
    cache = tmp_path / "vms" / USER / "web"
    cache.mkdir(parents=True, mode=0o700)
    line = rd.web_password_line(str(cache), USER, "first Pw-1")
    assert auth["matches"](line, USER.encode(), b"first Pw-1") and not auth["matches"](line, USER.encode(), b"first Pw-2")
    assert "first Pw-1" not in line and line.startswith(f"{USER}:scrypt$")
    for name in ("passwd.line", "passwd.note"):
        assert stat.S_IMODE((cache / name).stat().st_mode) == 0o600
    made = []
    real_make_line = auth["make_line"]
    monkeypatch.setitem(auth, "make_line", lambda user, password: made.append(password) or real_make_line(user, password))
    # The same password again: the kept line, no scrypt.
    assert rd.web_password_line(str(cache), USER, "first Pw-1") == line and made == []
    # Another password: a new line, for it alone.
    second = rd.web_password_line(str(cache), USER, "second Pw-2")
    assert made == [b"second Pw-2"] and second != line
    assert auth["matches"](second, USER.encode(), b"second Pw-2") and not auth["matches"](second, USER.encode(), b"first Pw-1")
    # A note that does not match the line (tampered, or half-written) is not trusted.
    (cache / "passwd.note").write_text("0" * 64 + "\n")
    assert rd.web_password_line(str(cache), USER, "second Pw-2") != second and len(made) == 2


def test_the_init_copies_the_nodes_hash_line_and_runs_no_hasher(bundle, tmp_path, fake_bin):
    from .test_vm import PASSWORD, init_runtime

    runtime, home, logs = init_runtime(bundle, tmp_path, fake_bin)
    web = tmp_path / "web"
    line = bundle.runtime_dir.web_auth()["make_line"](USER, PASSWORD.encode())
    bundle.runtime_dir.write_secret(str(runtime), PASSWORD, line)
    assert (runtime / "web-passwd").read_text() == line
    fake_bin.install("python3", 'echo "python3 ran: $*" >> "$FAKE_LOG/python3"; exit 1\n')
    web.mkdir(mode=0o700)
    (web / "passwd.ok").write_text("an earlier password's note\n")
    env = {"PATH": f"{fake_bin.path}:/usr/bin:/bin", "LABVM_RUNTIME": str(runtime), "LABVM_USER": USER, "LABVM_UID": "2000",
           "FAKE_HOME": str(home), "FAKE_LOG": str(logs), "LABVM_HTTPS": "1", "LABVM_WEB_DIR": str(web)}
    applied = subprocess.run([str(runtime / "apply-password")], env=env, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    assert (web / "passwd").read_text() == line and stat.S_IMODE((web / "passwd").stat().st_mode) == 0o600
    assert not (web / "passwd.ok").exists() and not (logs / "python3").exists()
    bundle.runtime_dir.remove_secret(str(runtime))
    assert not (runtime / "secret").exists() and not (runtime / "web-passwd").exists()
