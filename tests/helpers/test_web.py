"""The desktop's HTTPS (noVNC through websockify), as the vm helper sets it up: the spec's
https port and vnc_listen, the TLS secrets, the runtime files and websockify's auth plugin.
Pure functions and files in a temporary directory: no dockerd, no mounts."""

from __future__ import annotations

import base64
import os
import stat
import sys
import types

import pytest

from .test_vm import USER, minimal_spec

KEY = "-----BEGIN PRIVATE KEY-----\nMIG...\n-----END PRIVATE KEY-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"


def body(bundle, **overrides):
    spec = bundle.spec.container_spec("spec", minimal_spec(**overrides))
    return spec, bundle.container.container_create_body(USER, spec, "/m", "/rt")


def test_the_https_port_is_published_beside_vnc(bundle):
    spec, made = body(bundle, ports={"vnc": 20000, "ssh": 20001, "https": 20040})
    assert spec["vnc_listen"] == "published"
    assert made["HostConfig"]["PortBindings"] == {
        "5901/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20000"}],
        "22/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20001"}],
        "6901/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20040"}],
    }
    env = dict(item.split("=", 1) for item in made["Env"])
    assert env["LABVM_HTTPS"] == "1" and env["LABVM_VNC_LISTEN"] == "published"


def test_vnc_on_the_nodes_loopback_or_not_at_all(bundle):
    _, loopback = body(bundle, ports={"vnc": 20000, "https": 20040}, bind_address="10.213.0.11", vnc_listen="loopback")
    bindings = loopback["HostConfig"]["PortBindings"]
    assert bindings["5901/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": "20000"}]
    assert bindings["6901/tcp"] == [{"HostIp": "10.213.0.11", "HostPort": "20040"}]
    spec, off = body(bundle, ports={"vnc": 20000, "https": 20040}, bind_address="10.213.0.11", vnc_listen="off")
    assert set(off["HostConfig"]["PortBindings"]) == {"6901/tcp"} and set(off["ExposedPorts"]) == {"6901/tcp"}
    assert bundle.container.vnc_endpoint(spec) == {"address": None, "port": None}


def test_a_spec_without_https_has_none_and_the_ports_differ(bundle):
    spec, made = body(bundle)
    assert spec["ports"] == {"vnc": 20000, "ssh": None, "https": None}
    assert "6901/tcp" not in made["HostConfig"]["PortBindings"]
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


def test_tls_files_and_the_auth_plugin_are_root_only(bundle, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert bundle.runtime_dir.write_tls(str(runtime), KEY, CERT) is True
    assert bundle.runtime_dir.write_tls(str(runtime), KEY, CERT) is False
    for name in ("tls.key", "tls.crt"):
        assert stat.S_IMODE(os.stat(runtime / name).st_mode) == 0o600
    assert (runtime / "tls.key").read_text() == KEY


def test_the_init_starts_websockify_tls_only_behind_the_plugin(bundle):
    init = bundle.runtime_dir.INIT_SCRIPT
    assert "--ssl-only" in init and "--web-auth" in init and "--auth-plugin labvm_web_auth.BasicAuth" in init
    assert '"127.0.0.1:$VNC_PORT"' in init
    # The password reaches the hasher on stdin, never in argv.
    assert 'labvm_web_auth.py" hash "$USER_NAME" <"$SECRET"' in init


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


def test_a_missing_hash_file_refuses_everyone(plugin, tmp_path):
    module, refused, _ = plugin
    with pytest.raises(refused) as error:
        module.BasicAuth(str(tmp_path / "none")).authenticate(basic("dora", "dora-Pw-5521-long"), "h", 1)
    assert error.value.code == 503
