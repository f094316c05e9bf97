"""probe.facts run as a subprocess, with a fake nvidia-smi on PATH and a fake dockerd on a
unix socket."""

import os
import shutil
import socketserver
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import FakeDockerHandler

THREE_GPUS = """\
0, GPU-0c6a1f2e-1111-2222-3333-444444444444, NVIDIA H200, 143771, 0, 0
1, GPU-0c6a1f2e-5555-6666-7777-888888888888, NVIDIA H200, 143771, 20480, 87
2, GPU-0c6a1f2e-9999-aaaa-bbbb-cccccccccccc, Tesla T4, 15360, [N/A], [Not Supported]
"""
EXPECTED_GPUS = [
    {
        "index": 0,
        "uuid": "GPU-0c6a1f2e-1111-2222-3333-444444444444",
        "name": "NVIDIA H200",
        "memory_total_mib": 143771,
        "memory_used_mib": 0,
        "utilization_gpu": 0,
    },
    {
        "index": 1,
        "uuid": "GPU-0c6a1f2e-5555-6666-7777-888888888888",
        "name": "NVIDIA H200",
        "memory_total_mib": 143771,
        "memory_used_mib": 20480,
        "utilization_gpu": 87,
    },
    {
        "index": 2,
        "uuid": "GPU-0c6a1f2e-9999-aaaa-bbbb-cccccccccccc",
        "name": "Tesla T4",
        "memory_total_mib": 15360,
        "memory_used_mib": None,
        "utilization_gpu": None,
    },
]
FACT_KEYS = {
    "hostname",
    "kernel",
    "arch",
    "overlayfs",
    "fuse",
    "blkio_weight",
    "docker",
    "tools",
    "nvidia_smi",
    "gpus",
    "gpu_error",
    "cpus",
    "loadavg",
    "listening_ports",
    "memory",
    "disk",
    "mfs",
}
# A socket path that cannot exist, so no real dockerd on the test machine is consulted.
NO_DOCKER = "/nonexistent/labvm-test/docker.sock"


def facts(run_helper, check=False, path_prepend=None, **params):
    params.setdefault("docker_socket", NO_DOCKER)
    run = run_helper("probe", {"action": "facts", "params": params, "check": check}, path_prepend=path_prepend)
    assert run.exit_code == 0, run.reply
    assert run.reply["changed"] is False
    return run.data


def test_facts_describe_the_host(run_helper):
    data = facts(run_helper)
    assert set(data) == FACT_KEYS
    assert data["hostname"] and data["arch"] == os.uname().machine
    assert data["kernel"] == {"release": os.uname().release, "version": os.uname().version}
    assert isinstance(data["overlayfs"], bool) and isinstance(data["fuse"], bool)
    assert data["cpus"]["count"] == os.cpu_count()
    assert 1 <= data["cpus"]["allowed"] <= data["cpus"]["count"]
    assert len(data["loadavg"]) == 3
    memory = data["memory"]
    assert set(memory) == {"total_mib", "available_mib", "swap_total_mib", "swap_free_mib"}
    assert 0 < memory["available_mib"] <= memory["total_mib"]
    assert data["tools"]["python3"] == sys.version.split()[0]
    assert set(data["tools"]) == {"mfsmount", "mfsmakesnapshot", "rsync", "python3", "inotifywait", "mkfs.ext4", "resize2fs", "losetup", "stunnel4"}
    assert data["disk"] is None and data["mfs"] is None


def test_facts_change_nothing_in_check_mode_either(run_helper):
    assert set(facts(run_helper, check=True)) == FACT_KEYS


def test_tools_are_found_on_path(run_helper, fake_bin):
    fake_bin.install("rsync", "exit 0\n")
    data = facts(run_helper, path_prepend=fake_bin.path)
    assert data["tools"]["rsync"] == str(fake_bin.path / "rsync")


def test_null_params_mean_not_given(run_helper):
    data = facts(run_helper, data_dir=None, mfs_mount=None, docker_socket=None)
    assert data["disk"] is None and data["mfs"] is None
    assert data["docker"]["socket"] == "/run/docker.sock"


def test_disk_of_a_data_dir_not_created_yet_is_measured_on_its_parent(run_helper, tmp_path):
    data_dir = tmp_path / "labvm" / "data"
    disk = facts(run_helper, data_dir=str(data_dir))["disk"]
    assert disk["path"] == str(data_dir)
    assert disk["exists"] is False
    assert disk["measured_path"] == str(tmp_path)
    assert 0 <= disk["free_mib"] <= disk["total_mib"] and disk["total_mib"] > 0
    # The disk to throttle is a whole block device, or none for tmpfs and the like.
    assert disk["device"] is None or (disk["device"].startswith("/dev/") and Path(disk["device"]).exists())
    assert not data_dir.parent.exists()


def test_disk_of_an_existing_data_dir(run_helper, tmp_path):
    disk = facts(run_helper, data_dir=str(tmp_path) + "/")["disk"]
    assert disk["path"] == str(tmp_path)
    assert disk["exists"] is True and disk["measured_path"] == str(tmp_path)


def test_mfs_mount_that_is_a_plain_directory_is_not_mounted(run_helper, tmp_path):
    mfs = facts(run_helper, mfs_mount=str(tmp_path))["mfs"]
    assert mfs["mounted"] is False
    assert mfs["fstype"] is None and mfs["total_mib"] is None and mfs["free_mib"] is None


def test_mfs_mount_reports_what_is_mounted_there(run_helper):
    mfs = facts(run_helper, mfs_mount="/")["mfs"]
    assert mfs["mounted"] is True
    assert mfs["fstype"] and mfs["error"] is None
    assert mfs["total_mib"] > 0


# --- GPUs ---------------------------------------------------------------------------------


def install_nvidia_smi(fake_bin, body):
    # The fake records its arguments so the test can check the query labvm depends on.
    args_file = fake_bin.path / "nvidia-smi.args"
    fake_bin.install("nvidia-smi", f'printf "%s\\n" "$@" > "{args_file}"\n{body}')
    return args_file


def test_gpus_are_read_from_nvidia_smi(run_helper, fake_bin):
    args_file = install_nvidia_smi(fake_bin, f"cat <<'EOF'\n{THREE_GPUS}EOF\n")
    data = facts(run_helper, path_prepend=fake_bin.path)
    assert data["gpus"] == EXPECTED_GPUS
    assert data["gpu_error"] is None
    assert data["nvidia_smi"] == str(fake_bin.path / "nvidia-smi")
    assert args_file.read_text().splitlines() == [
        "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu",
        "--format=csv,noheader,nounits",
    ]


def test_unparsable_nvidia_smi_output_is_a_gpu_error_not_a_failure(run_helper, fake_bin):
    install_nvidia_smi(fake_bin, "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'\n")
    data = facts(run_helper, path_prepend=fake_bin.path)
    assert data["gpus"] == []
    assert "cannot parse nvidia-smi output" in data["gpu_error"]
    assert data["memory"]["total_mib"] > 0  # the rest of the facts are still there


def test_failing_nvidia_smi_is_a_gpu_error_with_its_message(run_helper, fake_bin):
    install_nvidia_smi(fake_bin, "echo 'No devices were found' >&2\nexit 9\n")
    data = facts(run_helper, path_prepend=fake_bin.path)
    assert data["gpus"] == []
    assert data["gpu_error"] == "nvidia-smi exited with 9: No devices were found"


def test_node_without_nvidia_smi_has_no_gpus_and_no_error(run_helper, fake_bin):
    if shutil.which("nvidia-smi", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"):
        pytest.skip("this machine has a real nvidia-smi in a standard directory")
    env_path = os.environ.get("PATH", "")
    if shutil.which("nvidia-smi", path=env_path):
        pytest.skip("nvidia-smi is on this test's PATH")
    data = facts(run_helper, path_prepend=fake_bin.path)
    assert data["nvidia_smi"] is None
    assert data["gpus"] == [] and data["gpu_error"] is None


# --- docker -------------------------------------------------------------------------------


def test_docker_version_is_read_from_its_socket(run_helper, fake_docker):
    docker = facts(run_helper, docker_socket=fake_docker.socket_path)["docker"]
    assert docker == {
        "ok": True,
        "socket": fake_docker.socket_path,
        "version": "20.10.24+dfsg1",
        "api_version": "1.41",
        "error": None,
    }
    assert fake_docker.requests == [("GET", "/version")]


def test_missing_docker_socket_is_reported_not_raised(run_helper, tmp_path):
    socket_path = str(tmp_path / "docker.sock")
    docker = facts(run_helper, docker_socket=socket_path)["docker"]
    assert docker["ok"] is False and docker["version"] is None and docker["api_version"] is None
    assert docker["error"] == f"docker socket {socket_path} does not exist"


def test_docker_socket_nobody_listens_on(run_helper, tmp_path):
    path = Path(tempfile.mkdtemp(prefix="labvm-docker-")) / "docker.sock"
    try:
        server = socketserver.UnixStreamServer(str(path), FakeDockerHandler)
        server.server_close()  # the socket file stays, nobody accepts on it
        docker = facts(run_helper, docker_socket=str(path))["docker"]
    finally:
        shutil.rmtree(path.parent)
    assert docker["ok"] is False
    assert "Connection refused" in docker["error"]


@pytest.mark.parametrize(
    "status, body, message",
    [
        (500, '{"message": "boom"}', "GET /version answered HTTP 500"),
        (200, "not json", "answered without Version and ApiVersion"),
        (200, '{"Version": "20.10.24"}', "answered without Version and ApiVersion"),
        (200, "[]", "answered without Version and ApiVersion"),
    ],
)
def test_docker_answering_nonsense_is_reported(run_helper, fake_docker, status, body, message):
    fake_docker.status, fake_docker.body = status, body
    docker = facts(run_helper, docker_socket=fake_docker.socket_path)["docker"]
    assert docker["ok"] is False
    assert message in docker["error"]


def test_docker_that_never_answers_does_not_hang_the_probe(run_helper, fake_docker):
    fake_docker.hang = True
    started = time.monotonic()
    docker = facts(run_helper, docker_socket=fake_docker.socket_path)["docker"]
    assert time.monotonic() - started < 10
    assert docker["ok"] is False
    assert "no answer within 3 s" in docker["error"]
