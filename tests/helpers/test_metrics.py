"""metrics.sample: the parsers on sample text (real nvidia-smi formats included), then the helper
run as a subprocess against the real /proc, and against a fake /proc and cgroup tree with a fake
dockerd and the testbed's fake nvidia-smi."""

import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from .conftest import FakeDockerServer

REPO = Path(__file__).resolve().parents[2]
FAKE_SMI = REPO / "scripts" / "testbed_fakes" / "nvidia-smi"
NO_DOCKER = "/nonexistent/labvm-test/docker.sock"
MIB = 1 << 20
ALICE_ID = "a" * 63 + "1"
BOB_ID = "b" * 63 + "2"
STRAY_ID = "c" * 63 + "3"
NODE_KEYS = {"cpu_percent", "cpus", "load", "memory", "swap", "disk", "mfs", "gpus", "gpu_error", "docker_error", "images"}
DESKTOP_KEYS = {"user", "container", "state", "started_at", "uptime_s", "gpus", "cpu_percent", "memory", "blkio", "net", "gpu_memory",
                "gpu_processes", "sync", "last_version", "disk"}

# --- parsers ------------------------------------------------------------------------------

PROC_STAT = """\
cpu  100 20 30 800 50 5 5 0 40 0
cpu0 50 10 15 400 25 2 3 0 20 0
cpu1 50 10 15 400 25 3 2 0 20 0
intr 12345
ctxt 999
"""


def test_proc_stat_busy_total_and_cpu_count(bundle):
    times, cpus = bundle.metrics.parse_proc_stat(PROC_STAT)
    # guest (40) is already inside user; idle and iowait are idle.
    assert (times.busy, times.total, cpus) == (160, 1010, 2)


def test_node_cpu_percent_is_a_rate_between_two_samples(bundle):
    m = bundle.metrics
    before, after = m.CpuTimes(busy=100, total=1000), m.CpuTimes(busy=175, total=1100)
    assert m.cpu_percent(before, after) == 75.0
    assert m.cpu_percent(before, before) is None


def test_container_cpu_percent_is_of_one_cpu(bundle):
    assert bundle.metrics.usage_percent(1_000_000_000, 2_000_000_000, 500_000_000) == 200.0
    assert bundle.metrics.usage_percent(None, 5, 1e9) is None


def test_meminfo_and_swap_in_bytes(bundle):
    text = "MemTotal:       16000 kB\nMemFree:  1000 kB\nMemAvailable:   4000 kB\nSwapTotal: 2000 kB\nSwapFree: 500 kB\nHugePages_Total: 0\n"
    memory, swap = bundle.metrics.memory_figures(bundle.metrics.parse_meminfo(text))
    assert memory == {"total": 16000 * 1024, "used": 12000 * 1024, "available": 4000 * 1024}
    assert swap == {"total": 2000 * 1024, "used": 1500 * 1024}


def test_loadavg(bundle):
    assert bundle.metrics.parse_loadavg("0.52 1.10 2.00 3/456 7890\n") == [0.52, 1.1, 2.0]


# With units, without, and the markers nvidia-smi prints for values a GPU cannot report.
SMI_WITH_UNITS = (
    "0, GPU-0c6a1f2e-1111-2222-3333-444444444444, NVIDIA H200, 87 %, 20480 MiB, 143771 MiB, 41, 312.45 W\n"
    "1, GPU-0c6a1f2e-5555-6666-7777-888888888888, Tesla T4, [Not Supported], [N/A], 15360 MiB, [N/A], [N/A]\n"
)
SMI_NOUNITS = "0, GPU-0c6a1f2e-1111-2222-3333-444444444444, NVIDIA H200, 87, 20480, 143771, 41, 312.45\n"
# Verbatim from nvidia-smi on an H200 node, a CUDA process holding memory.
REAL_H200 = {
    "gpu": "0, GPU-ce4d2b63-5c6e-0c3e-7b7e-8f9296a633f6, NVIDIA H200, 0 %, 0 MiB, 143771 MiB, 37, 117.04 W\n",
    "gpu_nounits": "0, GPU-ce4d2b63-5c6e-0c3e-7b7e-8f9296a633f6, NVIDIA H200, 0, 0, 143771, 37, 116.15\n",
    "apps": "448, GPU-ce4d2b63-5c6e-0c3e-7b7e-8f9296a633f6, 1634 MiB\n",
    "apps_nounits": "448, GPU-ce4d2b63-5c6e-0c3e-7b7e-8f9296a633f6, 1634\n",
}


def test_gpu_query_with_and_without_units_and_missing_values(bundle):
    parse = bundle.metrics.parse_gpu_query
    h200 = {
        "index": 0,
        "uuid": "GPU-0c6a1f2e-1111-2222-3333-444444444444",
        "name": "NVIDIA H200",
        "utilization": 87,
        "memory_used": 20480 * MIB,
        "memory_total": 143771 * MIB,
        "temperature": 41,
        "power": 312.45,
    }
    t4 = {
        "index": 1,
        "uuid": "GPU-0c6a1f2e-5555-6666-7777-888888888888",
        "name": "Tesla T4",
        "utilization": None,
        "memory_used": None,
        "memory_total": 15360 * MIB,
        "temperature": None,
        "power": None,
    }
    assert parse(SMI_WITH_UNITS) == [h200, t4]
    assert parse(SMI_NOUNITS) == [h200]
    assert parse("") == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("0, GPU-a, H200, 87, 1, 2, 3\n", "expected 8 columns"),
        ("0, GPU-a, H200, lots, 1, 2, 3, 4\n", "utilization.gpu is not a number"),
        ("[N/A], GPU-a, H200, 1, 1, 2, 3, 4\n", "without index"),
    ],
)
def test_gpu_query_refuses_what_it_cannot_read(bundle, text, message):
    with pytest.raises(ValueError, match=message):
        bundle.metrics.parse_gpu_query(text)


def test_real_h200_output_reads_the_same_with_and_without_units(bundle):
    m = bundle.metrics
    with_units, nounits = m.parse_gpu_query(REAL_H200["gpu"]), m.parse_gpu_query(REAL_H200["gpu_nounits"])
    assert [gpu.pop("power") for gpu in (with_units[0], nounits[0])] == [117.04, 116.15]
    assert with_units == nounits == [
        {"index": 0, "uuid": "GPU-ce4d2b63-5c6e-0c3e-7b7e-8f9296a633f6", "name": "NVIDIA H200", "utilization": 0,
         "memory_used": 0, "memory_total": 143771 * MIB, "temperature": 37}
    ]
    expected_app = [{"pid": 448, "gpu_uuid": "GPU-ce4d2b63-5c6e-0c3e-7b7e-8f9296a633f6", "used_memory": 1634 * MIB}]
    assert m.parse_app_query(REAL_H200["apps"]) == m.parse_app_query(REAL_H200["apps_nounits"]) == expected_app


def test_compute_apps_with_units_nounits_and_none(bundle):
    parse = bundle.metrics.parse_app_query
    assert parse("4242, GPU-a, 1234 MiB\n17, GPU-b, [N/A]\n") == [
        {"pid": 4242, "gpu_uuid": "GPU-a", "used_memory": 1234 * MIB},
        {"pid": 17, "gpu_uuid": "GPU-b", "used_memory": None},
    ]
    assert parse("4242, GPU-a, 1234\n") == [{"pid": 4242, "gpu_uuid": "GPU-a", "used_memory": 1234 * MIB}]
    assert parse("No running processes found\n") == []
    assert parse("") == []


@pytest.mark.parametrize(
    "text, ids",
    [
        # cgroup v1, docker's default parent
        (f"12:memory:/docker/{ALICE_ID}\n11:cpu,cpuacct:/docker/{ALICE_ID}\n0::/\n", [ALICE_ID]),
        # cgroup v1 with --cgroup-parent (the testbed's dockerd)
        (f"4:memory:/labvm-testbed-n1/{ALICE_ID}\n0::/\n", [ALICE_ID]),
        # cgroup v2 with the systemd driver
        (f"0::/system.slice/docker-{ALICE_ID}.scope\n", [ALICE_ID]),
        # a container running its own cgroups below docker's
        (f"0::/system.slice/docker-{ALICE_ID}.scope/init.scope\n", [ALICE_ID]),
        # docker in docker: the outer container first
        (f"4:memory:/docker/{ALICE_ID}/docker/{BOB_ID}\n", [ALICE_ID, BOB_ID]),
        # not in a container; a 32-hex cgroup name is not a container id
        ("4:memory:/process_api/39a0bdab4a9492e36adee5106ed70ec5\n0::/user.slice\n", []),
    ],
)
def test_container_ids_come_from_the_cgroup_path(bundle, text, ids):
    assert bundle.metrics.container_ids_in_cgroup(text) == ids


def test_cgroup_dirs_for_v1_hierarchies_and_v2(bundle):
    m, system = bundle.metrics, bundle.system
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup/cpuacct rw,relatime shared:8 - cgroup cgroup rw,cpuacct\n"
        "31 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n"
    )
    mounts = system.parse_mountinfo(mountinfo)
    paths = m.parse_proc_cgroup(f"4:memory:/labvm-testbed-n1/{ALICE_ID}\n3:cpuacct:/labvm-testbed-n1/{ALICE_ID}\n0::/x\n")
    assert m.cgroup_dir(mounts, paths, "memory") == f"/sys/fs/cgroup/memory/labvm-testbed-n1/{ALICE_ID}"
    assert m.cgroup_dir(mounts, paths, "cpuacct") == f"/sys/fs/cgroup/cpuacct/labvm-testbed-n1/{ALICE_ID}"
    # No v1 blkio hierarchy: the v2 tree is the answer.
    assert m.cgroup_dir(mounts, paths, "blkio") == "/sys/fs/cgroup/unified/x"
    v2_only = system.parse_mountinfo("40 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
    paths = m.parse_proc_cgroup(f"0::/system.slice/docker-{ALICE_ID}.scope\n")
    assert m.cgroup_dir(v2_only, paths, "memory") == f"/sys/fs/cgroup/system.slice/docker-{ALICE_ID}.scope"


def test_io_and_network_counters(bundle):
    m = bundle.metrics
    v1 = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 1\n8:16 Read 100\n8:16 Total 100\nTotal 12388\n"
    assert m.parse_blkio_v1(v1) == {"read": 4196, "write": 8192}
    v2 = "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n8:16 rbytes=4 wbytes=0 rios=1 wios=0\n"
    assert m.parse_io_stat_v2(v2) == {"read": 4100, "write": 8192}
    net = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:  999999     10    0    0    0     0          0         0   999999      10    0    0    0     0       0          0\n"
        "  eth0:    1500      3    0    0    0     0          0         0      700       2    0    0    0     0       0          0\n"
        "  eth1:     500      1    0    0    0     0          0         0      300       1    0    0    0     0       0          0\n"
    )
    assert m.parse_net_dev(net) == {"rx": 2000, "tx": 1000}


def test_memory_limits_unlimited_is_none(bundle):
    m = bundle.metrics
    assert m.memory_limit("536870912\n") == 512 * MIB
    assert m.memory_limit("9223372036854771712\n") is None
    assert m.memory_limit("max\n") is None


@pytest.mark.parametrize(
    "text",
    ["2024-05-01T10:00:00.123456789Z", "2024-02-29T23:59:59Z", "1999-12-31T22:00:00.5+02:00", "2038-01-19T03:14:08Z"],
)
def test_docker_times_match_datetime(bundle, text):
    trimmed = text.replace(".123456789", ".123456").replace("Z", "+00:00")
    expected = dt.datetime.fromisoformat(trimmed).timestamp()
    assert bundle.metrics.parse_docker_time(text) == pytest.approx(expected, abs=1e-6)


def test_docker_zero_time_means_never(bundle):
    assert bundle.metrics.parse_docker_time("0001-01-01T00:00:00Z") is None
    assert bundle.metrics.parse_docker_time(None) is None


def test_highest_version_ignores_other_names(bundle):
    names = ["low_mfs.v3", "low_mfs.v12", "up_mfs", "low_mfs.v7.tmp", "low_mfs.vx", ".low_mfs.v99"]
    assert bundle.metrics.highest_version(names) == 12
    assert bundle.metrics.highest_version(["up_mfs"]) is None


def test_sync_lag_grows_while_the_daemon_is_silent(bundle):
    status = {"pid": 1, "state": "running", "pending": 4, "oldest_pending_age_s": 10, "last_success": 1000.0, "last_error": None}
    summary = bundle.metrics.sync_summary(status, now=2000.0, written_at=1995.0, pid_alive=True)
    assert summary == {"lag_s": 15.0, "pending": 4, "state": "running", "last_success": 1000.0, "last_error": None, "running": True}
    idle = bundle.metrics.sync_summary({**status, "pending": 0}, now=2000.0, written_at=1000.0, pid_alive=False)
    assert idle["lag_s"] == 0.0 and idle["running"] is False


def test_a_hung_moosefs_costs_its_timeout_only(bundle, monkeypatch, tmp_path):
    m = bundle.metrics
    monkeypatch.setattr(m, "MFS_SCAN_SCRIPT", "import time; time.sleep(30)")
    monkeypatch.setattr(m, "MFS_TIMEOUT_S", 0.5)
    started = time.monotonic()
    facts = m.scan_mfs(str(tmp_path), ["alice"], [])
    assert time.monotonic() - started < 5
    assert facts["healthy"] is False and "does not answer within 0.5 s" in facts["error"]
    assert facts["versions"] == {}


# --- the helper against the real /proc ----------------------------------------------------


def sample(run_helper, path_prepend=None, **params):
    params.setdefault("docker_socket", NO_DOCKER)
    params.setdefault("interval_s", 0.2)
    run = run_helper("metrics", {"action": "sample", "params": params}, path_prepend=path_prepend)
    assert run.exit_code == 0, run.reply
    assert run.reply["changed"] is False
    return run.data


@pytest.fixture
def smi_dir(tmp_path):
    """The testbed's fake nvidia-smi, reading gpus.json/apps.json beside it."""
    directory = tmp_path / "smi"
    directory.mkdir()
    shutil.copy(FAKE_SMI, directory / "nvidia-smi")
    gpus = [
        {"index": i, "uuid": f"GPU-{i}000", "name": "NVIDIA Test GPU 24GB", "memory_total_mib": 24576, "memory_used_mib": 100 * i,
         "utilization_gpu": 10 * i, "temperature_gpu": 30 + i, "power_draw_w": 20.5}
        for i in range(2)
    ]
    (directory / "gpus.json").write_text(json.dumps(gpus))
    return directory


def meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_node_figures_from_the_real_proc(run_helper, tmp_path):
    mfs = tmp_path / "mfs"
    (mfs / "vms" / "alice" / "low_mfs.v3").mkdir(parents=True)
    (mfs / "vms" / "alice" / "low_mfs.v12").mkdir()
    data = sample(run_helper, data_dir=str(tmp_path / "data" / "not-yet"), mfs_mount=str(mfs), users=["alice", "bob"])
    node = data["node"]
    assert node["cpus"] == os.cpu_count()
    assert 0 <= node["cpu_percent"] <= 100
    assert len(node["load"]) == 3
    assert node["memory"]["total"] == meminfo_kib("MemTotal") * 1024
    assert node["memory"]["used"] + node["memory"]["available"] == node["memory"]["total"]
    stat = os.statvfs(tmp_path)
    assert node["disk"]["path"] == str(tmp_path / "data" / "not-yet")
    assert node["disk"]["total"] == stat.f_blocks * stat.f_frsize
    # A plain directory is no MooseFS mount: reported, not fatal.
    assert node["mfs"] == {"mounted": False, "healthy": False, "total": None, "free": None, "error": f"{mfs} is not mounted"}
    assert "does not exist" in node["docker_error"]
    desktops = {d["user"]: d for d in data["desktops"]}
    assert desktops["alice"]["state"] == "absent" and desktops["alice"]["last_version"] == 12
    assert desktops["bob"]["last_version"] is None and desktops["bob"]["cpu_percent"] is None


def test_gpus_from_the_fake_nvidia_smi(run_helper, tmp_path, smi_dir):
    data = sample(run_helper, path_prepend=str(smi_dir), data_dir=str(tmp_path), mfs_mount=str(tmp_path / "mfs"))
    gpus = data["node"]["gpus"]
    assert data["node"]["gpu_error"] is None
    assert [(g["index"], g["uuid"], g["utilization"], g["memory_used"], g["temperature"], g["power"]) for g in gpus] == [
        (0, "GPU-0000", 0, 0, 30, 20.5),
        (1, "GPU-1000", 10, 100 * MIB, 31, 20.5),
    ]
    assert all(g["memory_total"] == 24576 * MIB and g["processes"] == [] for g in gpus)


def test_a_broken_nvidia_smi_is_reported_beside_the_rest(run_helper, tmp_path, fake_bin):
    fake_bin.install("nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9\n")
    data = sample(run_helper, path_prepend=str(fake_bin.path), data_dir=str(tmp_path), mfs_mount=str(tmp_path))
    assert data["node"]["gpus"] == []
    assert "exited with 9" in data["node"]["gpu_error"] and "NVIDIA driver" in data["node"]["gpu_error"]
    assert data["node"]["memory"]["total"] > 0


def test_bad_params_are_refused(run_helper, tmp_path):
    for params, message in [
        ({"data_dir": "relative", "mfs_mount": "/m"}, "absolute path"),
        ({"data_dir": "/d", "mfs_mount": "/m", "interval_s": 60}, "from 0 to 10"),
        ({"data_dir": "/d", "mfs_mount": "/m", "users": ["../etc"]}, "list of user names"),
    ]:
        run = run_helper("metrics", {"action": "sample", "params": params})
        assert run.exit_code == 2 and message in run.error["msg"], run.reply


# --- the helper against a fake /proc, cgroup tree and dockerd ------------------------------


class FakeDockerdHandler(BaseHTTPRequestHandler):
    """GET /containers/json and /containers/ID/json from the server's `containers` list."""

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        containers = self.server.containers
        if url.path.endswith("/containers/json"):
            self.answer(200, [
                {"Id": c["Id"], "Names": ["/" + c["Name"]], "State": c["State"]["Status"], "Labels": c["Config"]["Labels"]}
                for c in containers
            ])
            return
        wanted = urllib.parse.unquote(url.path.split("/containers/", 1)[-1].removesuffix("/json"))
        found = [c for c in containers if wanted in (c["Id"], c["Name"])]
        self.answer(200, found[0]) if found else self.answer(404, {"message": f"No such container: {wanted}"})

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def inspect_body(cid, name, user, pid, gpus=()):
    return {
        "Id": cid,
        "Name": name,
        "State": {"Status": "running", "Running": True, "Restarting": False, "Pid": pid, "StartedAt": "2024-05-01T10:00:00.5Z"},
        "Config": {"Labels": {"labvm.user": user} if user else {}},
        "HostConfig": {"DeviceRequests": [{"Driver": "nvidia", "DeviceIDs": list(gpus)}] if gpus else None},
    }


@pytest.fixture
def fake_dockerd():
    directory = tempfile.mkdtemp(prefix="labvm-dockerd-")
    server = FakeDockerServer(os.path.join(directory, "docker.sock"), FakeDockerdHandler)
    server.containers = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
    shutil.rmtree(directory)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader never sees half a file


NET_DEV = (
    "Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n"
    "  eth0: 5000 1 0 0 0 0 0 0 3000 1 0 0 0 0 0 0\n"
)


class FakeNode:
    """A /proc tree and cgroup hierarchies (v1 or v2) under a temp dir."""

    def __init__(self, root: Path, v2: bool):
        self.root, self.v2 = root, v2
        self.proc = root / "proc"
        self.cgroup = root / "cgroup"
        write(self.proc / "stat", PROC_STAT)
        write(self.proc / "meminfo", "MemTotal: 1000 kB\nMemAvailable: 250 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n")
        write(self.proc / "loadavg", "1.00 0.50 0.25 1/100 42\n")
        if v2:
            mountinfo = f"40 1 0:30 / {self.cgroup} rw - cgroup2 cgroup2 rw\n"
        else:
            mountinfo = "".join(
                f"{30 + i} 1 0:{30 + i} / {self.cgroup / name} rw - cgroup cgroup rw,{name}\n"
                for i, name in enumerate(("cpuacct", "memory", "blkio"))
            )
        write(self.proc / "self" / "mountinfo", mountinfo)

    def cgroup_path(self, cid: str) -> str:
        return f"/system.slice/docker-{cid}.scope" if self.v2 else f"/docker/{cid}"

    def add_process(self, pid: int, cid: str | None) -> None:
        path = self.cgroup_path(cid) if cid else "/user.slice"
        text = f"0::{path}\n" if self.v2 else f"4:memory:{path}\n3:cpuacct:{path}\n2:blkio:{path}\n0::/\n"
        write(self.proc / str(pid) / "cgroup", text)
        write(self.proc / str(pid) / "net" / "dev", NET_DEV)

    def dir(self, cid: str, controller: str) -> Path:
        relative = self.cgroup_path(cid).lstrip("/")
        return self.cgroup / relative if self.v2 else self.cgroup / controller / relative

    def set_container(self, cid: str, memory_used: int, limit: int | None, cache: int, read: int, written: int) -> None:
        if self.v2:
            d = self.dir(cid, "")
            write(d / "memory.current", f"{memory_used + cache}\n")
            write(d / "memory.max", "max\n" if limit is None else f"{limit}\n")
            write(d / "memory.stat", f"anon {memory_used}\ninactive_file {cache}\n")
            write(d / "io.stat", f"8:0 rbytes={read} wbytes={written} rios=1 wios=1\n")
        else:
            write(self.dir(cid, "memory") / "memory.usage_in_bytes", f"{memory_used + cache}\n")
            write(self.dir(cid, "memory") / "memory.limit_in_bytes", f"{limit or 9223372036854771712}\n")
            write(self.dir(cid, "memory") / "memory.stat", f"cache {cache}\ntotal_inactive_file {cache}\n")
            write(self.dir(cid, "blkio") / "blkio.throttle.io_service_bytes", f"8:0 Read {read}\n8:0 Write {written}\nTotal {read + written}\n")
        self.set_cpu_usage(cid, 0)

    def set_cpu_usage(self, cid: str, ns: int) -> None:
        if self.v2:
            write(self.dir(cid, "") / "cpu.stat", f"usage_usec {ns // 1000}\nuser_usec 0\nsystem_usec 0\n")
        else:
            write(self.dir(cid, "cpuacct") / "cpuacct.usage", f"{ns}\n")


class BusyContainer:
    """Makes a fake container's CPU counter advance like two busy CPUs."""

    def __init__(self, node: FakeNode, cid: str, cpus: float):
        self.node, self.cid, self.cpus = node, cid, cpus
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        started = time.monotonic_ns()
        while not self.stop.is_set():
            self.node.set_cpu_usage(self.cid, int((time.monotonic_ns() - started) * self.cpus))
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("v2", [False, True], ids=["cgroup-v1", "cgroup-v2"])
def test_desktops_from_cgroups_with_gpu_processes_mapped_by_cgroup(run_helper, tmp_path, fake_dockerd, smi_dir, v2):
    node = FakeNode(tmp_path / "node", v2)
    fake_dockerd.containers = [
        inspect_body(ALICE_ID, "labvm-alice", "alice", 1001, gpus=["GPU-0000"]),
        inspect_body(BOB_ID, "labvm-bob", "bob", 2001, gpus=["GPU-1000"]),
        inspect_body(STRAY_ID, "someone-elses", None, 3001),
    ]
    for pid, cid in ((1001, ALICE_ID), (2001, BOB_ID), (3001, STRAY_ID)):
        node.add_process(pid, cid)
        node.set_container(cid, memory_used=300 * MIB, limit=512 * MIB, cache=100 * MIB, read=4096, written=8192)
    node.set_container(BOB_ID, memory_used=50 * MIB, limit=None, cache=0, read=0, written=0)
    # GPU processes: one deep inside alice's desktop, one in bob's, one in a container that is not
    # a desktop, one on the host. Their command lines say nothing: only the cgroup tells.
    node.add_process(1500, ALICE_ID)
    node.add_process(2500, BOB_ID)
    node.add_process(3500, STRAY_ID)
    node.add_process(4500, None)
    apps = [
        {"pid": 1500, "gpu_uuid": "GPU-0000", "used_memory_mib": 1234, "process_name": "python"},
        {"pid": 2500, "gpu_uuid": "GPU-1000", "used_memory_mib": 10, "process_name": "python"},
        {"pid": 3500, "gpu_uuid": "GPU-1000", "used_memory_mib": 20, "process_name": "python"},
        {"pid": 4500, "gpu_uuid": "GPU-1000", "used_memory_mib": 30, "process_name": "Xorg"},
        {"pid": 9999, "gpu_uuid": "GPU-1000", "used_memory_mib": 40, "process_name": "gone"},
    ]
    (smi_dir / "apps.json").write_text(json.dumps(apps))
    data_dir = tmp_path / "data"
    write(data_dir / "vms" / "alice" / "sync" / "status.json",
          json.dumps({"pid": 1001, "state": "running", "pending": 0, "oldest_pending_age_s": 0, "last_success": 1714557600.0, "last_error": None}))
    mfs = tmp_path / "mfs"
    (mfs / "vms" / "bob" / "low_mfs.v4").mkdir(parents=True)

    with BusyContainer(node, ALICE_ID, cpus=2.0):
        data = sample(run_helper, path_prepend=str(smi_dir), data_dir=str(data_dir), mfs_mount=str(mfs),
                      docker_socket=fake_dockerd.server_address, proc_root=str(node.proc), interval_s=0.5, users=["carol"])

    assert data["node"]["cpus"] == 2 and data["node"]["load"] == [1.0, 0.5, 0.25]
    assert data["node"]["memory"] == {"total": 1000 * 1024, "used": 750 * 1024, "available": 250 * 1024}
    assert data["node"]["docker_error"] is None
    desktops = {d["user"]: d for d in data["desktops"]}
    assert sorted(desktops) == ["alice", "bob", "carol"]
    assert all(set(d) == DESKTOP_KEYS for d in data["desktops"])
    assert set(data["node"]) == NODE_KEYS
    assert data["node"]["images"] is None  # not asked: no image store given
    alice, bob, carol = desktops["alice"], desktops["bob"], desktops["carol"]
    assert 150 <= alice["cpu_percent"] <= 250, alice["cpu_percent"]
    assert bob["cpu_percent"] == 0.0
    assert alice["container"] == "labvm-alice" and alice["state"] == "running" and alice["gpus"] == ["GPU-0000"]
    assert alice["started_at"] == "2024-05-01T10:00:00.5Z"
    assert alice["uptime_s"] == pytest.approx(time.time() - 1714557600.5, abs=60)
    # Page cache the kernel can drop is not counted as used.
    assert alice["memory"] == {"used": 300 * MIB, "limit": 512 * MIB}
    assert bob["memory"] == {"used": 50 * MIB, "limit": None}
    assert alice["blkio"] == {"read": 4096, "write": 8192}
    assert alice["net"] == {"rx": 5000, "tx": 3000}
    assert (alice["gpu_memory"], alice["gpu_processes"]) == (1234 * MIB, 1)
    assert (bob["gpu_memory"], bob["gpu_processes"]) == (10 * MIB, 1)
    assert alice["sync"]["lag_s"] == 0.0 and alice["sync"]["last_success"] == 1714557600.0
    assert alice["sync"]["running"] is True  # pid 1001 exists in this /proc
    assert bob["sync"] is None and bob["last_version"] == 4
    assert carol["state"] == "absent" and carol["container"] is None and carol["cpu_percent"] is None

    gpus = {g["uuid"]: g for g in data["node"]["gpus"]}
    assert gpus["GPU-0000"]["processes"] == [{"pid": 1500, "used_memory": 1234 * MIB, "user": "alice", "container": "labvm-alice"}]
    assert gpus["GPU-1000"]["processes"] == [
        {"pid": 2500, "used_memory": 10 * MIB, "user": "bob", "container": "labvm-bob"},
        {"pid": 3500, "used_memory": 20 * MIB, "user": None, "container": "someone-elses"},
        {"pid": 4500, "used_memory": 30 * MIB, "user": None, "container": None},
        {"pid": 9999, "used_memory": 40 * MIB, "user": None, "container": None},
    ]


def test_the_images_the_node_holds_are_reported_by_id(run_helper, tmp_path):
    store = {"images": str(tmp_path / "images"), "legacy": str(tmp_path / "xfce_local")}
    first, second = "1" * 64, "2" * 64
    for tree, image_id in ((tmp_path / "images" / first, first), (tmp_path / "images" / second, second),
                           (tmp_path / "xfce_local", first)):
        write(tree / ".labvm-image.json", json.dumps({"sha256": image_id, "desktop": "xfce"}))
    (tmp_path / "images" / ("3" * 64) / "etc").mkdir(parents=True)  # no marker: not an image
    data = sample(run_helper, data_dir=str(tmp_path), mfs_mount=str(tmp_path), image_store=store)
    assert data["node"]["images"] == [first, second]
    data = sample(run_helper, data_dir=str(tmp_path), mfs_mount=str(tmp_path), image_store={**store, "images": str(tmp_path / "none")})
    assert data["node"]["images"] == [first]


def test_a_silent_dockerd_leaves_the_node_figures(run_helper, tmp_path, fake_docker):
    fake_docker.hang = True
    started = time.monotonic()
    data = sample(run_helper, data_dir=str(tmp_path), mfs_mount=str(tmp_path), docker_socket=fake_docker.socket_path)
    assert time.monotonic() - started < 10
    assert "no answer within" in data["node"]["docker_error"]
    assert data["desktops"] == [] and data["node"]["memory"]["total"] > 0
