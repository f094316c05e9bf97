"""The desktop's root is its overlay, all of it, and every desktop has a size (testbed: real
dockerd with the labvm runtime registered, MooseFS, VNC).

frank (n1, one GPU) keeps files anywhere in his root; heidi (n1, a 300m disk) fills hers while
grace (n1) keeps writing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .conftest import invoke_testbed, make_admin, wipe_mfs_files
from .test_storage import set_config

PASSWORDS = {"frank": "frank-Pw-3391", "grace": "grace-Pw-6604", "heidi": "heidi-Pw-2278", "ivan": "ivan-Pw-9142"}
HEIDI_DISK = 300 << 20
DATA_DIR = "/var/lib/labvm/data"
FILES = {"/data/f": "precious", "/rootfile": "at the root", "/workspace/.hidden/x": "hidden"}


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def lab(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("root") / "admin")
    set_config(admin, sync__syncTime=1, retention__keep_last=3, retention__keep_daily=0, retention__keep_weekly=0)
    ok(admin.labvm("image", "build", "--desktop", "minimal", timeout=1800))
    ok(admin.labvm("image", "push", timeout=900))
    for name, password in PASSWORDS.items():
        ok(admin.labvm("user", "add", name, "--password-stdin", stdin=password + "\n"))
    wipe_mfs_files(admin, *PASSWORDS)
    for name in PASSWORDS:
        invoke_testbed("exec", "n1", "--", "rm", "-rf", f"{DATA_DIR}/vms/{name}", check=False)
    common = ("--memory", "512m", "--cpus", "1")
    ok(admin.labvm("create", "frank", "--node", "n1", "--gpus", "1", "--disk", "2g", *common, timeout=600))
    ok(admin.labvm("create", "grace", "--node", "n1", *common, timeout=600))
    ok(admin.labvm("create", "heidi", "--node", "n1", "--disk", "300m", *common, timeout=600))
    yield admin
    for name in PASSWORDS:
        admin.labvm("rm", name, "--yes", "--purge")


def inside(lab, user: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return lab.labvm("exec", user, "--", "sh", "-c", script, timeout=timeout)


def on_node(node: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return invoke_testbed("exec", node, "--", *argv, check=check)


def read_files(lab, user: str) -> dict[str, str]:
    result = inside(lab, user, "; ".join(f"echo {path}=$(cat {path} 2>&1)" for path in FILES))
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def desktop_status(lab, user: str) -> dict:
    return {d["user"]: d for d in lab.labvm_json("status")["desktops"]}[user]


def test_files_anywhere_in_the_root_survive_stop_start_switch_backup_and_restore(lab, tmp_path):
    script = "mkdir -p /data /workspace/.hidden && " + " && ".join(f"echo '{text}' > {path}" for path, text in FILES.items())
    ok(inside(lab, "frank", script))
    assert read_files(lab, "frank") == FILES
    ok(lab.labvm("stop", "frank"))
    ok(lab.labvm("start", "frank", timeout=600))
    assert read_files(lab, "frank") == FILES
    for path, text in FILES.items():
        got = tmp_path / path.strip("/").replace("/", "_")
        ok(lab.labvm("files", "frank", path, "--get", str(got)))
        assert got.read_text() == text + "\n"
    for node in ("n2", "n1"):
        ok(lab.labvm("switch", "frank", node, timeout=900))
        assert desktop_status(lab, "frank")["node"] == node
        assert read_files(lab, "frank") == FILES
    first = lab.labvm_json("backup", "frank")[0]["version"]
    ok(inside(lab, "frank", "echo changed > /data/f && rm /rootfile"))
    second = lab.labvm_json("backup", "frank")[0]["version"]
    # A version over the image shows them, read without touching the desktop.
    got = tmp_path / "from-version"
    ok(lab.labvm("files", "frank", "/workspace/.hidden/x", "--version", str(first), "--get", str(got)))
    assert got.read_text() == "hidden\n"
    ok(lab.labvm("restore", "frank", str(first), "--yes", timeout=900))
    assert read_files(lab, "frank") == FILES
    ok(lab.labvm("restore", "frank", str(second), "--yes", timeout=900))
    after = read_files(lab, "frank")
    assert after["/data/f"] == "changed" and "No such file" in after["/rootfile"]


def test_filling_a_desktops_disk_ends_in_enospc_there_and_nowhere_else(lab, testbed):
    image = testbed / "nodes" / "n1" / "labvm" / "data" / "vms" / "heidi" / "disk.ext4"
    before = image.stat().st_blocks * 512
    filled = inside(lab, "heidi", "dd if=/dev/urandom of=/fill bs=1M count=400 2>&1; echo rc=$?")
    assert "No space left on device" in filled.stdout, filled.stdout
    assert "rc=0" not in filled.stdout
    # The node's data disk gave heidi no more than her size.
    assert image.stat().st_size == HEIDI_DISK
    assert image.stat().st_blocks * 512 - before <= HEIDI_DISK
    # grace, on the same node, keeps writing.
    wrote = inside(lab, "grace", "dd if=/dev/urandom of=/scratch.bin bs=1M count=100 2>&1 && sync && echo wrote")
    assert wrote.returncode == 0 and "wrote" in wrote.stdout, wrote.stdout + wrote.stderr
    ok(inside(lab, "grace", "rm /scratch.bin"))
    # Room again once heidi deletes.
    ok(inside(lab, "heidi", "rm /fill"))
    ok(lab.labvm("sync", "flush", "heidi", timeout=600))  # the sync no longer reads the deleted file
    disk = desktop_status(lab, "heidi")["disk"]
    assert disk["size"] == HEIDI_DISK and disk["used"] is not None and disk["used"] < HEIDI_DISK // 4, disk
    shown = ok(lab.labvm("status")).splitlines()  # piped: one line a desktop, under a header line
    header = next(line.split() for line in shown if line.startswith("DESKTOP "))
    heidi = dict(zip(header, next(line.split() for line in shown if line.startswith("heidi ")), strict=False))
    assert heidi["DISK"].endswith("/300M"), heidi
    # A 1 TB sparse file counts only its blocks. (The sync is paused meanwhile: rsync reads a
    # file's holes as zeros, and 1 TB of them would keep it busy for many minutes.)
    on_node("n1", "pkill", "-STOP", "-f", "syncd.py.*/vms/heidi/disk/up_local( |$)")
    try:
        ok(inside(lab, "heidi", "truncate -s 1T /sparse && echo tail >> /sparse && ls -l /sparse"))
        disk = desktop_status(lab, "heidi")["disk"]
        assert disk["used"] < HEIDI_DISK // 4, disk
        ok(inside(lab, "heidi", "truncate -s 4k /sparse"))
    finally:
        on_node("n1", "pkill", "-CONT", "-f", "syncd.py.*/vms/heidi/disk/up_local( |$)")


def test_resize_grows_a_running_desktops_disk(lab):
    def root_size() -> int:
        out = ok(inside(lab, "heidi", "df -B1 --output=size / | tail -1"))
        return int(out.strip())

    before = root_size()
    plan = lab.labvm_json("resize", "heidi", "400m", "--dry-run")
    assert plan["changes"] is True and plan["from"] == HEIDI_DISK and plan["to"] == 400 << 20
    assert root_size() == before
    done = lab.labvm_json("resize", "heidi", "400m")
    if done["restart_needed"]:
        # This kernel refuses to grow a mounted ext4 (no CAP_SYS_RESOURCE for the node's root
        # here): the image is grown, and the filesystem follows at the next start.
        assert root_size() == before
        ok(lab.labvm("restart", "heidi", timeout=600))
    assert root_size() > before + (80 << 20)
    assert ok(inside(lab, "heidi", "wc -c < /sparse")).strip() == "4096"
    assert desktop_status(lab, "heidi")["disk"]["size"] == 400 << 20
    shrink = lab.labvm("resize", "heidi", "300m")
    assert shrink.returncode == 2 and "not shrink" in shrink.stderr


def test_nvidia_smi_in_a_desktop_lists_exactly_its_gpus(lab, testbed):
    frank = desktop_status(lab, "frank")
    listed = ok(inside(lab, "frank", "nvidia-smi -L")).splitlines()
    assert len(listed) == len(frank["gpus"]) == 1
    assert listed[0].startswith("GPU 0: ") and frank["gpus"][0]["uuid"] in listed[0]
    table = ok(lab.labvm("exec", "frank", "--", "nvidia-smi"))
    assert "NVIDIA-SMI" in table
    node = frank["node"]
    records = [json.loads(line) for line in (testbed / "nodes" / node / "fakebin" / "hook.log").read_text().splitlines()]
    mine = [r for r in records if r.get("nvidia_visible_devices") == frank["gpus"][0]["uuid"]]
    assert mine and mine[-1]["nvidia_smi"] == "injected", records[-1]
    assert mine[-1]["root"] == f"{DATA_DIR}/vms/frank/merge_local"  # the hook sees the overlay as the root
    # A desktop without GPUs gets no nvidia-smi, as with the real toolkit.
    assert inside(lab, "grace", "command -v nvidia-smi").returncode != 0


def test_docker_keeps_the_desktops_limits_and_caps_its_logs(lab):
    inspected = json.loads(on_node("n1", "docker", "inspect", "labvm-heidi").stdout)[0]
    host = inspected["HostConfig"]
    assert host["Runtime"] == "labvm"
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}
    assert host["Memory"] == 512 << 20
    # The container's root is the overlay: a file written through the node's merge_local is there.
    on_node("n1", "sh", "-c", f"echo from-the-node > {DATA_DIR}/vms/heidi/merge_local/seen-by-both")
    assert ok(inside(lab, "heidi", "cat /seen-by-both")).strip() == "from-the-node"
    mounts = ok(inside(lab, "heidi", "cat /proc/mounts"))
    root_line = next(line for line in mounts.splitlines() if line.split()[1] == "/")
    assert root_line.split()[2] == "overlay", root_line
    assert "/.labvm-rootfs" not in mounts


def plain_image_tar(path: Path) -> Path:
    """A tiny image: dash and the libraries it needs, from this machine."""
    dash = shutil.which("dash") or "/bin/dash"
    libs = [line.split()[-2] if "=>" in line else line.split()[0]
            for line in subprocess.run(["ldd", dash], capture_output=True, text=True, check=True).stdout.splitlines()
            if "/" in line]
    with tarfile.open(path, "w") as tar:
        for name in [dash, *libs]:
            real = os.path.realpath(name)
            tar.add(real, arcname=name.lstrip("/"))
            if real != name:
                tar.add(real, arcname=real.lstrip("/"))
    return path


def test_the_runtime_leaves_other_containers_alone_and_refuses_foreign_roots(lab, tmp_path):
    tar = plain_image_tar(tmp_path / "plain.tar")
    on_node("n1", "docker", "import", str(tar), "labvm-test/plain:1")
    dash = (shutil.which("dash") or "/bin/dash")
    try:
        plain = on_node("n1", "docker", "run", "--rm", "labvm-test/plain:1", dash, "-c", "echo plain")
        assert plain.stdout.strip() == "plain"
        # Through the labvm runtime, a container that names no desktop root is passed on untouched.
        passed = on_node("n1", "docker", "run", "--rm", "--runtime", "labvm", "labvm-test/plain:1", dash, "-c",
                         "echo passed; test -e /etc/os-release || echo own-root")
        assert passed.stdout.split() == ["passed", "own-root"]
        # /etc; a desktop's upper itself (a directory, not its overlay); its overlay reached
        # through a symlink (zed -> frank).
        on_node("n1", "ln", "-sfn", f"{DATA_DIR}/vms/frank", f"{DATA_DIR}/vms/zed")
        for root in ("/etc", f"{DATA_DIR}/vms/frank/disk/up_local", f"{DATA_DIR}/vms/zed/merge_local"):
            refused = on_node("n1", "docker", "run", "--rm", "--runtime", "labvm", "-v", f"{root}:/.labvm-rootfs:ro",
                              "labvm-test/plain:1", dash, "-c", "echo escaped", check=False)
            assert refused.returncode != 0 and "escaped" not in refused.stdout
            assert "labvm runtime" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    finally:
        on_node("n1", "rm", "-f", f"{DATA_DIR}/vms/zed", check=False)
        on_node("n1", "docker", "rmi", "-f", "labvm-test/plain:1", check=False)


def test_a_desktop_of_the_older_form_starts_in_the_new_one_with_every_file(lab):
    ok(lab.labvm("create", "ivan", "--node", "n1", "--memory", "512m", "--cpus", "1", timeout=600))
    ok(inside(lab, "ivan", "mkdir -p /home/ivan/work && echo kept > /home/ivan/work/a && echo etc > /etc/ivan.conf"))
    ok(lab.labvm("stop", "ivan"))
    # The layout of a desktop made before disks: up_local and work_local in the desktop's dir,
    # and a stopped container of the older form.
    vm_dir = f"{DATA_DIR}/vms/ivan"
    on_node("n1", "sh", "-c",
            f"set -e; mkdir -p /tmp/ivan-disk; mount -o loop,ro {vm_dir}/disk.ext4 /tmp/ivan-disk; "
            f"cp -a /tmp/ivan-disk/up_local {vm_dir}/up_local; mkdir {vm_dir}/work_local; "
            f"umount /tmp/ivan-disk; rmdir /tmp/ivan-disk; rm {vm_dir}/disk.ext4; rmdir {vm_dir}/disk")
    tag = json.loads(on_node("n1", "docker", "image", "ls", "--format", "{{json .}}", "labvm/base").stdout.splitlines()[0])
    on_node("n1", "docker", "create", "--name", "labvm-ivan", "--label", "labvm.user=ivan",
            "--label", "labvm.spec-hash=older-form", f"labvm/base:{tag['Tag']}", "/run/labvm/init")
    ok(lab.labvm("start", "ivan", timeout=600))
    assert ok(inside(lab, "ivan", "cat /home/ivan/work/a /etc/ivan.conf")).split() == ["kept", "etc"]
    listing = on_node("n1", "ls", vm_dir).stdout.split()
    assert "up_local" not in listing and "work_local" not in listing and "disk.ext4" in listing
    inspected = json.loads(on_node("n1", "docker", "inspect", "labvm-ivan").stdout)[0]
    assert inspected["HostConfig"]["Runtime"] == "labvm"
