"""Cluster tests run labvm against the testbed: a real MooseFS, and nodes with their
own network and mount namespaces, sshd and dockerd. Only the NVIDIA driver is faked.

The `testbed` fixture brings it up once per session from a clean slate (repairing
whatever a killed run left behind) and takes it down at the end;
LABVM_TESTBED_KEEP=1 leaves it up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.conftest import run_helper  # noqa: F401  (the helper-contract fixture, for test_mfs_helper)

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "scripts" / "testbed"
TESTBED_DIR = Path(os.environ.get("LABVM_TESTBED_DIR", "/var/lib/labvm-testbed"))
NODES = ("n1", "n2")
GPUS_PER_NODE = 4


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


def invoke_testbed(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(TESTBED), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"scripts/testbed {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def fake_gpu_uuid(node: str, index: int) -> str:
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"labvm-testbed/{node}/{index}"))


@dataclass
class Admin:
    """A labvm admin home over the testbed: its own state database, the testbed's keys and pins."""

    home: Path

    @property
    def config(self) -> Path:
        return self.home / "bkConfxml.xml"

    @property
    def env(self) -> dict:
        return {**os.environ, "LABVM_CONFIG": str(self.config), "COLUMNS": "200"}

    def labvm(self, *args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / ".venv" / "bin" / "labvm"), *args],
            input=stdin, capture_output=True, text=True, env=self.env, timeout=timeout,
        )

    def labvm_json(self, *args: str, ok_codes=(0,)):
        result = self.labvm(*args, "--json")
        assert result.returncode in ok_codes, result.stderr
        return json.loads(result.stdout)


def remove_desktop_containers(testbed: Path) -> None:
    """Desktop containers an earlier run left on the nodes (stopped by `down`, not removed):
    each test module's admin home knows nothing of them, and they would hold their names."""
    import docker

    for node in NODES:
        client = docker.DockerClient(base_url=f"unix://{testbed}/nodes/{node}/run/docker.sock", version="1.41")
        for container in client.containers.list(all=True, filters={"name": "labvm-"}):
            container.remove(force=True)
        client.close()


def wipe_mfs_files(admin: "Admin", *users: str) -> None:
    """Start the users from nothing: the files an earlier desktop of theirs left on MooseFS
    (`labvm rm` keeps them as a version) would be continued from."""
    result = admin.labvm("node", "check", "n1")  # mounts MooseFS there
    assert result.returncode == 0, result.stdout + result.stderr
    for user in users:
        invoke_testbed("exec", "n1", "--", "rm", "-rf", f"/mnt/labvm-mfs/vms/{user}")


@pytest.fixture(scope="session")
def testbed():
    # Start from a clean slate: `down` stops any desktop a demo or an earlier run left
    # running (their layers would pin the image), and `up` repairs whatever is stale.
    invoke_testbed("down")
    invoke_testbed("up", "--nodes", str(len(NODES)), "--gpus", str(GPUS_PER_NODE))
    remove_desktop_containers(TESTBED_DIR)
    yield TESTBED_DIR
    if os.environ.get("LABVM_TESTBED_KEEP") != "1":
        invoke_testbed("down", check=False)


def make_admin(testbed: Path, target: Path) -> Admin:
    source = testbed / "admin"
    target.mkdir(mode=0o700, parents=True)
    for name in ("bkConfxml.xml", "known_hosts", "id_ed25519", "id_ed25519.pub"):
        shutil.copy2(source / name, target / name)
    admin = Admin(target)
    result = admin.labvm("init")
    assert result.returncode == 0, result.stderr
    return admin


@pytest.fixture
def admin(testbed, tmp_path) -> Admin:
    """A fresh admin home for one test, managing the testbed cluster."""
    return make_admin(testbed, tmp_path / "admin")


@pytest.fixture
def node_started(testbed):
    """Restarts any node daemons a test stopped."""
    yield
    for node in NODES:
        invoke_testbed("node-start", node)
