"""labvm node add/list/check over the testbed's real SSH, dockerd and MooseFS."""

from __future__ import annotations

import json
import re

import paramiko

from labvm.config import parse_config
from labvm.remote.connection import NodeConnection
from labvm.remote.helpers import HelperBundle, HelperRunner
from labvm.remote.hostkeys import fingerprint

from .conftest import GPUS_PER_NODE, NODES, fake_gpu_uuid, invoke_testbed


def test_node_check_reports_every_node_ready(admin):
    rows = admin.labvm_json("node", "check")
    assert [r["node"] for r in rows] == list(NODES)
    for row in rows:
        assert row["ok"], row["problems"]
        facts = row["facts"]
        assert facts["docker"]["ok"] and facts["docker"]["version"].startswith("20.10")
        assert facts["overlayfs"] and facts["fuse"]
        assert facts["tools"]["mfsmount"] and facts["tools"]["rsync"] and facts["tools"]["python3"].startswith("3.")
        assert facts["mfs"]["mounted"] and facts["mfs"]["error"] is None
        assert [g["uuid"] for g in facts["gpus"]] == [fake_gpu_uuid(row["node"], i) for i in range(GPUS_PER_NODE)]
        assert all(g["memory_total_mib"] > 0 for g in facts["gpus"])
        assert facts["memory"]["total_mib"] > 0 and facts["disk"]["total_mib"] > 0


def test_node_check_table_shows_gpus_and_docker(admin):
    result = admin.labvm("node", "check")
    assert result.returncode == 0, result.stderr
    for node in NODES:
        assert re.search(rf"│ {node} +│ ok", result.stdout), result.stdout
        assert fake_gpu_uuid(node, 0) in result.stdout
    assert "20.10" in result.stdout


def test_mfs_is_mounted_in_each_node_namespace_only(admin):
    admin.labvm_json("node", "check")
    cfg = parse_config(admin.config)
    with open("/proc/self/mountinfo") as f:
        assert cfg.storage.mfs_mount not in f.read(), "MooseFS leaked into the admin's mount namespace"


def test_stopped_sshd_is_one_red_row(admin, node_started):
    invoke_testbed("node-stop", "n2", "sshd")
    result = admin.labvm("node", "check", "--json")
    assert result.returncode == 7
    rows = {r["node"]: r for r in json.loads(result.stdout)}
    assert rows["n1"]["ok"] and rows["n1"]["facts"]["gpus"]
    assert not rows["n2"]["reachable"] and "unreachable" in rows["n2"]["error"]
    table = admin.labvm("node", "check")
    assert table.returncode == 7
    assert re.search(r"│ n2 +│ unreachable", table.stdout)
    assert re.search(r"│ n1 +│ ok", table.stdout)
    assert "labvm: error: n2: node check found problems" in table.stderr


def test_helper_bundle_is_uploaded_once_per_version(admin):
    cfg = parse_config(admin.config)
    bundle = HelperBundle.from_package()
    with NodeConnection(cfg.node("n1"), admin.home) as conn:
        runner = HelperRunner(conn, bundle)
        runner.ensure_installed()
        assert HelperRunner(conn, bundle).ensure_installed() is False
        listing = conn.run(["ls", "-A", "/var/lib/labvm/helpers"]).stdout.split()
        assert bundle.sha256 in listing and not [n for n in listing if n.startswith(".incoming")]
        # A different bundle version is uploaded beside it, not over it.
        edited = HelperBundle(bundle.files[:-1] + ((bundle.files[-1][0], bundle.files[-1][1] + b"\n# v2\n"),))
        assert HelperRunner(conn, edited).ensure_installed() is True
        assert HelperRunner(conn, edited).call("probe", "facts", {})["ok"]
        conn.run(["rm", "-rf", edited.remote_dir])


def test_node_add_pins_the_host_key_and_refuses_a_changed_one(testbed, tmp_path):
    from .conftest import make_admin

    admin = make_admin(testbed, tmp_path / "fresh")
    config = admin.config
    text = config.read_text()
    # Start from a cluster file without nodes and no pins.
    config.write_text(re.sub(r"\s*<node name=.*?</node>", "", text, flags=re.S))
    (admin.home / "known_hosts").write_text("")
    host = "10.213.0.11"
    host_key = paramiko.Ed25519Key.from_private_key_file(str(testbed / "nodes" / "n1" / "ssh_host_ed25519_key"))

    before = config.read_bytes()
    wrong = admin.labvm("node", "add", "n1", host, "--fingerprint", "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert wrong.returncode == 2 and "not the expected" in wrong.stderr
    assert config.read_bytes() == before and (admin.home / "known_hosts").read_text() == ""

    no_tty = admin.labvm("node", "add", "n1", host)
    assert no_tty.returncode == 2 and fingerprint(host_key) in no_tty.stderr

    added = admin.labvm("node", "add", "n1", host, "--fingerprint", fingerprint(host_key))
    assert added.returncode == 0, added.stderr
    assert fingerprint(host_key) in added.stdout
    assert parse_config(config).node("n1").host == host
    listing = admin.labvm_json("node", "list")
    assert listing == [{**listing[0], "name": "n1", "host": host, "host_key": fingerprint(host_key)}]
    assert admin.labvm("node", "check", "n1").returncode == 0

    # Pretend n1 was reinstalled: the pin no longer matches what it presents.
    other = paramiko.Ed25519Key.from_private_key_file(str(testbed / "nodes" / "n2" / "ssh_host_ed25519_key"))
    (admin.home / "known_hosts").write_text(f"{host} {other.get_name()} {other.get_base64()}\n")
    changed = admin.labvm("node", "check", "n1")
    assert changed.returncode == 7
    assert "n1: host key changed" in changed.stdout and "labvm node rekey n1" in changed.stdout
    rekey = admin.labvm("node", "rekey", "n1", "--fingerprint", fingerprint(host_key))
    assert rekey.returncode == 0, rekey.stderr
    assert admin.labvm("node", "check", "n1").returncode == 0
