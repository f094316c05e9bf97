"""A desktop's HTTPS: its port and spec, its address in status, and the certificate labvm's
CA issues it at each start (renewed only when ca.needs_renewal says so)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from labvm import ca
from labvm.admin import AdminHome
from labvm.config import Node
from labvm.desktops import Desktops, Limits, build_spec, certificate_names, https_url

from .fake_cluster import FakeCluster
from .plan_faults import admin_template, copied_home, seeded_cluster

LIMITS = Limits(cpus=1.0, cpuset=None, memory=1 << 30, shm=1 << 26, pids=512, io_weight=None, io_read_bps=None,
                io_write_bps=None)


def test_the_spec_carries_the_https_port_of_the_slot_and_vnc_listen():
    node = Node(name="n1", host="10.0.0.1", docker_port_slots=20)
    spec = build_spec("dora", 2000, node, "minimal", LIMITS, [], (20002, 20003))
    assert spec["ports"] == {"vnc": 20002, "ssh": 20003, "https": 20041} and spec["vnc_listen"] == "published"
    assert build_spec("dora", 2000, node, "minimal", LIMITS, [], (20002, 20003), "off")["vnc_listen"] == "off"


def test_the_address_names_the_nodes_host_and_the_page_that_connects():
    assert https_url(Node(name="n1", host="10.0.0.1"), 20000) == "https://10.0.0.1:20100/vnc.html?autoconnect=1&resize=remote"
    assert https_url(Node(name="n1", host="gpu1.lab"), 20002).startswith("https://gpu1.lab:20101/")
    assert https_url(Node(name="n1", host="fd00::1"), 20000).startswith("https://[fd00::1]:20100/")
    # The node's host, and localhost for a member's SSH tunnel.
    assert certificate_names(Node(name="n1", host="10.0.0.1")) == (["localhost"], ["10.0.0.1", "127.0.0.1"])
    assert certificate_names(Node(name="n1", host="gpu1.lab")) == (["gpu1.lab", "localhost"], ["127.0.0.1"])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return admin_template(tmp_path_factory, ("alice", "bob"), (("alice", "n1", 1), ("bob", "n2", 1)), ())


@pytest.fixture
def home(template, tmp_path, monkeypatch) -> AdminHome:
    return copied_home(template, tmp_path, monkeypatch)


@pytest.fixture
def cluster(home, monkeypatch) -> FakeCluster:
    fake = seeded_cluster(home, monkeypatch)
    fake.seed(home, "alice")
    return fake


def sans(pem: str) -> set:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))}


def restart(home: AdminHome, user: str = "alice") -> None:
    desktops = Desktops(home)
    desktops.stop(user)
    desktops.start(user)


def test_a_start_issues_the_certificate_for_the_node_and_sends_it_with_the_password(home, cluster):
    restart(home)
    sent = cluster["n1"].secrets["alice"]
    assert set(sent) == {"password", "tls_key", "tls_cert"}
    assert sans(sent["tls_cert"]) == {"10.0.0.1", "localhost", "127.0.0.1"}
    authority = ca.load(home.home)
    x509.load_pem_x509_certificate(sent["tls_cert"].encode()).verify_directly_issued_by(authority.cert)
    kept = home.home / ca.DESKTOP_CERTS_DIR
    assert (kept / "alice.pem").read_text() == sent["tls_cert"] and (kept / "alice.key").read_text() == sent["tls_key"]


def test_the_next_start_reuses_it_and_one_near_expiry_is_renewed(home, cluster):
    restart(home)
    first = cluster["n1"].secrets["alice"]["tls_cert"]
    restart(home)
    assert cluster["n1"].secrets["alice"]["tls_cert"] == first
    authority = ca.load(home.home)
    key, cert = ca.issue(authority, [], ["10.0.0.1"], days=5)
    (home.home / ca.DESKTOP_CERTS_DIR / "alice.key").write_bytes(key)
    (home.home / ca.DESKTOP_CERTS_DIR / "alice.pem").write_bytes(cert)
    messages = []
    desktops = Desktops(home, say=messages.append)
    desktops.stop("alice")
    desktops.start("alice")
    renewed = cluster["n1"].secrets["alice"]["tls_cert"]
    assert renewed != cert.decode() and sans(renewed) == {"10.0.0.1", "localhost", "127.0.0.1"}
    assert any("issued alice's HTTPS certificate" in m and "within 30 days" in m for m in messages)
    left = x509.load_pem_x509_certificate(renewed.encode()).not_valid_after_utc
    assert left > ca._now() + ca.dt.timedelta(days=ca.LEAF_DAYS - 1)


def test_status_carries_the_https_address(home, cluster):
    with home.state() as db:
        desktop = Desktops(home).get(db, "alice")
    shown = desktop.as_dict(home.config)
    assert shown["https"] == https_url(home.config.node("n1"), desktop.vnc_port)
    assert shown["vnc"] == f"10.0.0.1:{desktop.vnc_port}"


def near_expiry(home: AdminHome, user: str = "alice", days: int = 5) -> bytes:
    """USER's kept certificate replaced by one that ends in `days`: due for renewal."""
    key, cert = ca.issue(ca.load(home.home), [], ["10.0.0.1"], days=days)
    (home.home / ca.DESKTOP_CERTS_DIR / f"{user}.key").write_bytes(key)
    (home.home / ca.DESKTOP_CERTS_DIR / f"{user}.pem").write_bytes(cert)
    return cert


def test_ca_renew_issues_a_running_desktops_due_certificate_in_place(home, cluster, capsys):
    import json

    from labvm.cli import main

    restart(home)
    good = cluster["n1"].secrets["alice"]["tls_cert"]
    assert main(["ca", "renew"]) == 0
    assert "no running desktop's certificate is due" in capsys.readouterr().out
    assert cluster["n1"].secrets["alice"]["tls_cert"] == good
    old = near_expiry(home)
    # --dry-run names it and why, and changes nothing.
    assert main(["ca", "renew", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["dry_run"] is True and [(d["user"], d["node"], d["renewed"]) for d in planned["due"]] == [("alice", "n1", False)]
    assert "within 30 days" in planned["due"][0]["reason"]
    assert (home.home / ca.DESKTOP_CERTS_DIR / "alice.pem").read_bytes() == old
    # The real run: the running desktop gets a new certificate, without a stop.
    before = cluster.picture("alice")
    assert main(["ca", "renew", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert [(d["user"], d["renewed"], d["error"]) for d in done["due"]] == [("alice", True, None)]
    renewed = cluster["n1"].secrets["alice"]["tls_cert"]
    assert renewed not in (good, old.decode()) and sans(renewed) == {"10.0.0.1", "localhost", "127.0.0.1"}
    assert cluster.picture("alice")["nodes"]["n1"]["container"] == before["nodes"]["n1"]["container"]
    with home.state() as db:
        assert Desktops(home).certificates_due(db) == []


def test_ca_renew_leaves_stopped_desktops_to_their_next_start(home, cluster, capsys):
    from labvm.cli import main

    restart(home)
    Desktops(home).stop("alice")
    old = near_expiry(home)
    assert main(["ca", "renew"]) == 0
    assert "no running desktop's certificate is due" in capsys.readouterr().out
    assert (home.home / ca.DESKTOP_CERTS_DIR / "alice.pem").read_bytes() == old


def test_ca_renew_reports_a_desktop_it_could_not_renew_and_exits_1(home, cluster, capsys, monkeypatch):
    from labvm.cli import main
    from labvm.errors import NodeUnreachable

    restart(home)
    near_expiry(home)

    def down(self, user):
        raise NodeUnreachable("n1 does not answer")

    monkeypatch.setattr(Desktops, "renew_certificate", down)
    code = main(["ca", "renew"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "alice on n1: not renewed: n1 does not answer" in out
