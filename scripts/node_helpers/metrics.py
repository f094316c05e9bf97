"""metrics: one sample of this node and its desktops, for labvm status, top and idle.

Action `sample` changes nothing. It reads the node's counters twice, interval_s apart, so CPU
figures are rates; everything else is read once in between. A part that cannot be read (dockerd
down, nvidia-smi missing, MooseFS hung) comes back as null with an error string beside it, so one
broken subsystem never hides the rest, and nothing here can block for longer than its timeout.

All sizes are bytes. A node's cpu_percent is of all its CPUs (0-100); a desktop's is of one CPU
(200 = two CPUs busy), as `docker stats` shows it.

Container figures come from the container's cgroup files (v1 and v2) and from
/proc/<init pid>/net/dev, never from dockerd's stats endpoint, which takes a second or two per
container. A GPU process is tied to its container through /proc/<pid>/cgroup, which names the
container id: a process can hide its command line, not its cgroup.
"""

import json
import os
import posixpath
import re
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from _contract import USER_PATTERN, Action, BadRequest, Failed, Param, PreconditionFailed, Result, TemporaryFailure, absolute_path
from _disk import disk_figures
from _docker import DEFAULT_DOCKER_SOCKET, api_url, docker_json_call, docker_message
from _images import held, image_store
from _layout import SYNC_STATUS_FILE, VERSION_DIR_PATTERN, VmPaths
from _system import CommandTimedOut, MountEntry, find_tool, mount_at, parse_mountinfo, run_command

DEFAULT_PROC_ROOT = "/proc"
DEFAULT_INTERVAL_S = 0.5
MAX_INTERVAL_S = 10.0
# Each must leave room inside labvm's per-node timeout (5 s by default): they run side by side.
NVIDIA_SMI_TIMEOUT_S = 3.0
MFS_TIMEOUT_S = 2.0
DOCKER_TIMEOUT_S = 3.0

LABEL_USER = "labvm.user"
USER_NAME = re.compile(USER_PATTERN)
MIB = 1024 * 1024
# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit number.
UNLIMITED_FLOOR = 1 << 62

GPU_QUERY = ("index", "uuid", "name", "utilization.gpu", "memory.used", "memory.total", "temperature.gpu", "power.draw")
APP_QUERY = ("pid", "gpu_uuid", "used_memory")
# nvidia-smi prints these instead of a value a GPU cannot report.
MISSING_VALUES = frozenset({"", "N/A", "[N/A]", "Not Supported", "[Not Supported]", "[Unknown Error]", "Unknown Error"})
NUMBER_WITH_UNIT = re.compile(r"(-?[0-9]+(?:\.[0-9]+)?)\s*(%|MiB|W|C)?")
NO_PROCESSES = "No running processes found"
VERSION_DIR = re.compile(VERSION_DIR_PATTERN)


# --- parameters ---------------------------------------------------------------------------


def seconds_between(low: float, high: float) -> Callable[[str, Any], float]:
    def validate(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise BadRequest(f"param {name!r} must be a number of seconds from {low:g} to {high:g}", "bad_param")
        return float(value)

    return validate


def user_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and USER_NAME.fullmatch(item) for item in value):
        raise BadRequest(f"param {name!r} must be a list of user names", "bad_param")
    return sorted(set(value))


SAMPLE_PARAMS = {
    "data_dir": Param(absolute_path, required=True),
    "mfs_mount": Param(absolute_path, required=True),
    "docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET),
    "interval_s": Param(seconds_between(0.0, MAX_INTERVAL_S), default=DEFAULT_INTERVAL_S),
    # Desktops labvm places here: reported even while they have no container (stopped).
    "users": Param(user_list, default=[]),
    # Where /proc is: tests point it at a tree of sample files.
    "proc_root": Param(absolute_path, default=DEFAULT_PROC_ROOT),
    # Where the node keeps its desktop images: their ids are reported.
    "image_store": Param(image_store),
}


# --- pure parsers -------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


def parse_proc_stat(text: str) -> tuple[CpuTimes, int]:
    """The aggregate "cpu" line of /proc/stat as busy and total jiffies, and the CPU count.

    guest and guest_nice are already inside user and nice; idle and iowait are the idle time."""
    times, cpus = None, 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu":
            values = [int(value) for value in fields[1:9]]
            total = sum(values)
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            times = CpuTimes(busy=total - idle, total=total)
        elif re.fullmatch(r"cpu[0-9]+", fields[0]):
            cpus += 1
    if times is None:
        raise ValueError("no aggregate cpu line in /proc/stat")
    return times, cpus


def cpu_percent(before: CpuTimes, after: CpuTimes) -> float | None:
    total = after.total - before.total
    if total <= 0:
        return None
    return round(100.0 * max(0, after.busy - before.busy) / total, 1)


def usage_percent(before_ns: int | None, after_ns: int | None, elapsed_ns: float) -> float | None:
    """CPU time used over wall time, as a percentage of one CPU."""
    if before_ns is None or after_ns is None or elapsed_ns <= 0:
        return None
    return round(100.0 * max(0, after_ns - before_ns) / elapsed_ns, 1)


def parse_loadavg(text: str) -> list[float]:
    return [float(value) for value in text.split()[:3]]


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes; its lines read "MemTotal:  16305412 kB"."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            unit = 1024 if parts[1:] == ["kB"] else 1
            values[key.strip()] = int(parts[0]) * unit
    return values


def memory_figures(meminfo: dict[str, int]) -> tuple[dict, dict]:
    total = meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    swap_total = meminfo.get("SwapTotal", 0)
    memory = {"total": total, "used": max(0, total - available), "available": available}
    swap = {"total": swap_total, "used": max(0, swap_total - meminfo.get("SwapFree", swap_total))}
    return memory, swap


def smi_number(text: str, what: str) -> float | None:
    """One nvidia-smi value, with or without its unit ("45 %", "45", "[N/A]")."""
    value = text.strip()
    if value in MISSING_VALUES:
        return None
    match = NUMBER_WITH_UNIT.fullmatch(value)
    if match is None:
        raise ValueError(f"{what} is not a number: {value[:40]!r}")
    return float(match.group(1))


def smi_int(text: str, what: str) -> int | None:
    number = smi_number(text, what)
    return None if number is None else int(number)


def smi_mib(text: str, what: str) -> int | None:
    number = smi_number(text, what)
    return None if number is None else int(number * MIB)


def csv_rows(text: str, columns: int) -> list[list[str]]:
    """nvidia-smi's CSV rows (with noheader). A GPU or process name never holds a comma."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.strip() == NO_PROCESSES:
            continue
        values = [value.strip() for value in line.split(",")]
        if len(values) != columns:
            raise ValueError(f"line {number}: expected {columns} columns, got {len(values)}")
        rows.append(values)
    return rows


def parse_gpu_query(text: str) -> list[dict]:
    """`nvidia-smi --query-gpu=<GPU_QUERY> --format=csv,noheader[,nounits]`."""
    gpus = []
    for index, uuid, name, utilization, used, total, temperature, power in csv_rows(text, len(GPU_QUERY)):
        if index in MISSING_VALUES or uuid in MISSING_VALUES:
            raise ValueError(f"a GPU without index or uuid: {index!r}, {uuid!r}")
        gpus.append(
            {
                "index": int(smi_number(index, "index")),
                "uuid": uuid,
                "name": name,
                "utilization": smi_int(utilization, "utilization.gpu"),
                "memory_used": smi_mib(used, "memory.used"),
                "memory_total": smi_mib(total, "memory.total"),
                "temperature": smi_int(temperature, "temperature.gpu"),
                "power": smi_number(power, "power.draw"),
            }
        )
    return gpus


def parse_app_query(text: str) -> list[dict]:
    """`nvidia-smi --query-compute-apps=<APP_QUERY> --format=csv,noheader[,nounits]`."""
    apps = []
    for pid, gpu_uuid, used in csv_rows(text, len(APP_QUERY)):
        apps.append({"pid": int(smi_number(pid, "pid")), "gpu_uuid": gpu_uuid, "used_memory": smi_mib(used, "used_memory")})
    return apps


_CONTAINER_ID = re.compile(r"(?:docker-)?([0-9a-f]{64})(?:\.scope)?")


def container_ids_in_cgroup(text: str) -> list[str]:
    """Container ids named in /proc/<pid>/cgroup, outermost first, without repeats.

    cgroup v1 lines end in ".../docker/<id>" (or "<cgroup-parent>/<id>"), v2 in
    ".../docker-<id>.scope"; a container may nest cgroups of its own below that.
    """
    found = []
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for part in path.split("/"):
            match = _CONTAINER_ID.fullmatch(part)
            if match and match.group(1) not in found:
                found.append(match.group(1))
    return found


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: path}; the v2 unified entry is under ""."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def cgroup_dir(mounts: list[MountEntry], paths: dict[str, str], controller: str) -> str | None:
    """Where a process's cgroup for `controller` lies in this mount namespace: its v1
    hierarchy if one is mounted, else the v2 tree (controller "" asks for v2 only)."""
    if controller and controller in paths:
        for entry in mounts:
            if entry.fstype == "cgroup" and controller in entry.super_options:
                return join_cgroup(entry, paths[controller])
    if "" in paths:
        for entry in mounts:
            if entry.fstype == "cgroup2":
                return join_cgroup(entry, paths[""])
    return None


def join_cgroup(entry: MountEntry, path: str) -> str:
    relative = path
    if entry.root != "/" and (path == entry.root or path.startswith(entry.root + "/")):
        relative = path[len(entry.root) :]
    return posixpath.join(entry.mount_point, relative.lstrip("/"))


def parse_flat_keyed(text: str) -> dict[str, int]:
    """memory.stat / cpu.stat: "key value" lines."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"-?[0-9]+", parts[1]):
            values[parts[0]] = int(parts[1])
    return values


def parse_blkio_v1(text: str) -> dict:
    """blkio.throttle.io_service_bytes: "MAJ:MIN Read N" lines (and a "Total N" line)."""
    totals = {"read": 0, "write": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("Read", "Write") and parts[2].isdigit():
            totals[parts[1].lower()] += int(parts[2])
    return totals


def parse_io_stat_v2(text: str) -> dict:
    """io.stat: "MAJ:MIN rbytes=N wbytes=N rios=N ..." lines."""
    totals = {"read": 0, "write": 0}
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key in ("rbytes", "wbytes") and value.isdigit():
                totals["read" if key == "rbytes" else "write"] += int(value)
    return totals


def parse_net_dev(text: str) -> dict:
    """/proc/<pid>/net/dev summed over every interface but loopback."""
    totals = {"rx": 0, "tx": 0}
    for line in text.splitlines()[2:]:
        name, separator, counters = line.partition(":")
        fields = counters.split()
        if not separator or name.strip() == "lo" or len(fields) < 9:
            continue
        totals["rx"] += int(fields[0])
        totals["tx"] += int(fields[8])
    return totals


def memory_limit(value: str) -> int | None:
    value = value.strip()
    if value == "max" or not value.isdigit() or int(value) >= UNLIMITED_FLOOR:
        return None
    return int(value)


def parse_docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 times with nanoseconds ("2024-05-01T10:00:00.123456789Z") as epoch
    seconds; its zero time ("0001-01-01T00:00:00Z") means never."""
    if not text or text.startswith("0001-"):
        return None
    match = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction = float("0." + match.group(7)) if match.group(7) else 0.0
    zone = match.group(8)
    offset = 0 if zone == "Z" else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return days_since_epoch(year, month, day) * 86400 + hour * 3600 + minute * 60 + second + fraction - offset


def days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's days_from_civil)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def highest_version(names: list[str]) -> int | None:
    versions = [int(match.group(1)) for name in names if (match := VERSION_DIR.fullmatch(name))]
    return max(versions) if versions else None


def sync_summary(status: dict, now: float, written_at: float, pid_alive: bool) -> dict:
    """The sync daemon's status file, as status shows it. Its oldest_pending_age_s was true when
    the file was written; a daemon that stopped writing does not make the lag stop growing."""
    pending = status.get("pending")
    oldest = status.get("oldest_pending_age_s")
    if isinstance(pending, (int, float)) and pending > 0 and isinstance(oldest, (int, float)):
        lag = round(oldest + max(0.0, now - written_at), 1)
    elif pending == 0:
        lag = 0.0
    else:
        lag = None
    return {
        "lag_s": lag,
        "pending": pending if isinstance(pending, int) else None,
        "state": status.get("state") if isinstance(status.get("state"), str) else None,
        "last_success": status.get("last_success"),
        "last_error": status.get("last_error"),
        "running": pid_alive and status.get("state") not in ("stopped", "failed"),
    }


# --- reading the node ---------------------------------------------------------------------


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as stream:
        return stream.read()


def read_optional(path: str) -> str | None:
    try:
        return read_text(path)
    except OSError:
        return None


class Proc:
    """Paths under /proc, or under a test's copy of it."""

    def __init__(self, root: str):
        self.root = root

    def path(self, *parts: Any) -> str:
        return posixpath.join(self.root, *(str(part) for part in parts))

    def read(self, *parts: Any) -> str:
        return read_text(self.path(*parts))

    def mounts(self) -> list[MountEntry]:
        return parse_mountinfo(self.read("self", "mountinfo"))

    def alive(self, pid: Any) -> bool:
        return isinstance(pid, int) and pid > 0 and os.path.isdir(self.path(pid))


def node_cpu(proc: Proc) -> tuple[CpuTimes, int]:
    return parse_proc_stat(proc.read("stat"))


def disk_usage(path: str) -> dict:
    # The data dir may not exist yet on a fresh node; the disk it will live on is what counts.
    measured = path
    while not os.path.exists(measured):
        measured = posixpath.dirname(measured)
    stat = os.statvfs(measured)
    return {
        "path": path,
        "total": stat.f_blocks * stat.f_frsize,
        "used": (stat.f_blocks - stat.f_bfree) * stat.f_frsize,
        "free": stat.f_bavail * stat.f_frsize,
    }


# One child process for everything that touches MooseFS: a hung FUSE server blocks any call into
# it, and only a child process can be abandoned (see _system.fuse_call).
MFS_SCAN_SCRIPT = """
import json, os, sys
mount, users = sys.argv[1], sys.argv[2:]
reply = {"space": None, "error": None, "versions": {}}
try:
    stat = os.statvfs(mount)
    reply["space"] = {"total": stat.f_blocks * stat.f_frsize, "free": stat.f_bavail * stat.f_frsize}
except OSError as error:
    reply["error"] = "statvfs %s: %s" % (mount, error.strerror or error)
for user in users:
    try:
        reply["versions"][user] = os.listdir(os.path.join(mount, "vms", user))
    except OSError:
        reply["versions"][user] = []
print(json.dumps(reply))
"""


def scan_mfs(mount: str, users: list[str], mounts: list[MountEntry]) -> dict:
    """MooseFS health and free space, and each user's version directories."""
    entry = mount_at(mounts, mount)
    facts = {"mounted": entry is not None, "healthy": False, "total": None, "free": None, "error": None}
    argv = [sys.executable, "-I", "-c", MFS_SCAN_SCRIPT, mount, *users]
    try:
        result = run_command(argv, MFS_TIMEOUT_S)
        reply = json.loads(result.stdout)
    except CommandTimedOut:
        return {**facts, "error": f"{mount} does not answer within {MFS_TIMEOUT_S:g} s", "versions": {}}
    except (OSError, ValueError) as error:
        return {**facts, "error": f"cannot scan {mount}: {error}", "versions": {}}
    versions = {user: highest_version(names) for user, names in reply["versions"].items()}
    if entry is None:
        return {**facts, "error": f"{mount} is not mounted", "versions": versions}
    space = reply["space"] or {}
    healthy = reply["error"] is None
    return {**facts, "healthy": healthy, **space, "error": reply["error"], "versions": versions}


def nvidia_smi_query(nvidia_smi: str, kind: str, fields: tuple[str, ...]) -> str:
    argv = [nvidia_smi, f"--query-{kind}={','.join(fields)}", "--format=csv,noheader,nounits"]
    try:
        result = run_command(argv, NVIDIA_SMI_TIMEOUT_S)
    except CommandTimedOut as error:
        raise RuntimeError(str(error)) from None
    except OSError as error:
        raise RuntimeError(f"cannot run {nvidia_smi}: {error}") from None
    if result.returncode != 0:
        raise RuntimeError(f"nvidia-smi --query-{kind} exited with {result.returncode}: {result.output_tail()}")
    return result.stdout


def query_gpus() -> dict:
    """{"gpus": [...], "apps": [...], "error": str or None}; a node without nvidia-smi has no GPUs.
    The two queries run side by side: nvidia-smi can take a second on a big node."""
    nvidia_smi = find_tool("nvidia-smi")
    if nvidia_smi is None:
        return {"gpus": [], "apps": [], "error": None}
    apps_query = Background(lambda: nvidia_smi_query(nvidia_smi, "compute-apps", APP_QUERY))
    try:
        gpus = parse_gpu_query(nvidia_smi_query(nvidia_smi, "gpu", GPU_QUERY))
    except (RuntimeError, ValueError) as error:
        return {"gpus": [], "apps": [], "error": str(error)}
    try:
        apps = parse_app_query(apps_query.result())
    except (RuntimeError, ValueError) as error:
        return {"gpus": gpus, "apps": [], "error": f"GPU processes: {error}"}
    return {"gpus": gpus, "apps": apps, "error": None}


class Background:
    """Run a function in a thread while the CPU sample interval passes."""

    def __init__(self, work: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._result = work()
        except BaseException as error:  # noqa: BLE001 - handed to the caller in result()
            self._error = error

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


# --- containers ---------------------------------------------------------------------------


@dataclass
class Container:
    id: str
    name: str
    user: str | None
    state: str
    pid: int | None
    started_at: str | None
    gpus: list[str]


def list_containers(socket_path: str) -> list[Container]:
    """Every container dockerd knows (GPU processes may sit in any of them); labvm's desktops
    are the ones with a labvm.user label."""
    status, body = docker_json_call(socket_path, "GET", api_url("/containers/json", {"all": "1"}), timeout_s=DOCKER_TIMEOUT_S)
    if status != 200 or not isinstance(body, list):
        raise Failed(f"listing containers answered HTTP {status}: {docker_message(body)}", "docker_error")
    containers = []
    for summary in body:
        labels = summary.get("Labels") or {}
        names = summary.get("Names") or []
        name = (names[0] if names else summary.get("Id", "")[:12]).lstrip("/")
        user = labels.get(LABEL_USER)
        container = Container(summary.get("Id", ""), name, user, summary.get("State") or "unknown", None, None, [])
        if user is not None:
            fill_from_inspect(socket_path, container)
        containers.append(container)
    return containers


def fill_from_inspect(socket_path: str, container: Container) -> None:
    url = api_url(f"/containers/{urllib.parse.quote(container.id, safe='')}/json")
    status, body = docker_json_call(socket_path, "GET", url, timeout_s=DOCKER_TIMEOUT_S)
    if status != 200 or not isinstance(body, dict):
        return  # removed meanwhile: the listing's state stands
    state = body.get("State") or {}
    container.state = state.get("Status") or container.state
    container.pid = state.get("Pid") or None
    container.started_at = state.get("StartedAt") if state.get("Running") else None
    requests = (body.get("HostConfig") or {}).get("DeviceRequests") or []
    container.gpus = [uuid for request in requests for uuid in (request.get("DeviceIDs") or [])]


def containers_or_error(socket_path: str) -> tuple[list[Container], str | None]:
    try:
        return list_containers(socket_path), None
    except (Failed, PreconditionFailed, TemporaryFailure) as error:
        return [], error.msg


# (usage, limit, the memory.stat key of page cache not in use)
V1_MEMORY_FILES = ("memory.usage_in_bytes", "memory.limit_in_bytes", "total_inactive_file")
V2_MEMORY_FILES = ("memory.current", "memory.max", "inactive_file")
# The recursive file counts IO of cgroups nested in the container too; older kernels lack it.
V1_IO_FILES = ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes")


@dataclass
class CgroupFiles:
    """The files one container's figures come from, found once per sample."""

    cpu_usage: str | None  # v1 cpuacct.usage (ns) or v2 cpu.stat (usage_usec)
    memory: str | None  # the memory controller's directory
    memory_v2: bool
    io: str | None  # v1 blkio.throttle.io_service_bytes or v2 io.stat
    net_dev: str | None


def desktop_containers(containers: list[Container]) -> dict[str, Container]:
    """user -> their desktop's container; a stray container with the same label never shadows
    the one named labvm-<user>."""
    desktops: dict[str, Container] = {}
    for container in containers:
        user = container.user
        if user is None or not USER_NAME.fullmatch(user):
            continue
        if user not in desktops or container.name == f"labvm-{user}":
            desktops[user] = container
    return desktops


def cgroup_files(proc: Proc, mounts: list[MountEntry], pid: int | None) -> CgroupFiles | None:
    if pid is None:
        return None
    text = read_optional(proc.path(pid, "cgroup"))
    if text is None:
        return None
    paths = parse_proc_cgroup(text)
    cpu_dir, memory_dir, io_dir = (cgroup_dir(mounts, paths, name) for name in ("cpuacct", "memory", "blkio"))
    v2_dir = cgroup_dir(mounts, paths, "")
    files = CgroupFiles(None, memory_dir, False, None, proc.path(pid, "net", "dev"))
    if cpu_dir is not None and os.path.exists(posixpath.join(cpu_dir, "cpuacct.usage")):
        files.cpu_usage = posixpath.join(cpu_dir, "cpuacct.usage")
    elif v2_dir is not None:
        files.cpu_usage = posixpath.join(v2_dir, "cpu.stat")
    if memory_dir is None or not os.path.exists(posixpath.join(memory_dir, "memory.usage_in_bytes")):
        files.memory, files.memory_v2 = v2_dir, v2_dir is not None
    v1_io = [posixpath.join(io_dir, name) for name in V1_IO_FILES] if io_dir else []
    files.io = next((path for path in v1_io if os.path.exists(path)), posixpath.join(v2_dir, "io.stat") if v2_dir else None)
    return files


def cpu_usage_ns(files: CgroupFiles | None) -> int | None:
    if files is None or files.cpu_usage is None:
        return None
    text = read_optional(files.cpu_usage)
    if text is None:
        return None
    if files.cpu_usage.endswith("cpu.stat"):
        usec = parse_flat_keyed(text).get("usage_usec")
        return None if usec is None else usec * 1000
    return int(text.strip()) if text.strip().isdigit() else None


def container_memory(files: CgroupFiles) -> dict:
    """Used as `docker stats` counts it: without the page cache the kernel can drop at once."""
    if files.memory is None:
        return {"used": None, "limit": None}
    names = V2_MEMORY_FILES if files.memory_v2 else V1_MEMORY_FILES
    usage_text = read_optional(posixpath.join(files.memory, names[0]))
    limit_text = read_optional(posixpath.join(files.memory, names[1]))
    stat = parse_flat_keyed(read_optional(posixpath.join(files.memory, "memory.stat")) or "")
    used = None
    if usage_text is not None and usage_text.strip().isdigit():
        usage = int(usage_text.strip())
        inactive = stat.get(names[2], 0)
        used = usage - inactive if inactive < usage else usage
    return {"used": used, "limit": memory_limit(limit_text) if limit_text is not None else None}


def container_io(files: CgroupFiles) -> dict:
    text = read_optional(files.io) if files.io else None
    if text is None:
        return {"read": None, "write": None}
    return parse_io_stat_v2(text) if files.io.endswith("io.stat") else parse_blkio_v1(text)


def container_net(files: CgroupFiles) -> dict:
    text = read_optional(files.net_dev) if files.net_dev else None
    return parse_net_dev(text) if text is not None else {"rx": None, "tx": None}


# --- the sample ---------------------------------------------------------------------------


def attribute_processes(apps: list[dict], proc: Proc, containers: list[Container]) -> list[dict]:
    """Each GPU process with the container (and so the desktop) it runs in."""
    by_id = {container.id: container for container in containers}
    attributed = []
    for app in apps:
        ids = container_ids_in_cgroup(read_optional(proc.path(app["pid"], "cgroup")) or "")
        known = [by_id[cid] for cid in ids if cid in by_id]
        container = known[0] if known else None
        name = container.name if container else (ids[-1][:12] if ids else None)
        attributed.append({**app, "user": container.user if container else None, "container": name})
    return attributed


def gpus_with_processes(gpus: list[dict], processes: list[dict]) -> list[dict]:
    result = []
    for gpu in gpus:
        mine = [
            {key: process[key] for key in ("pid", "used_memory", "user", "container")}
            for process in processes
            if process["gpu_uuid"] == gpu["uuid"]
        ]
        result.append({**gpu, "processes": mine})
    return result


def desktop_entry(user: str, container: Container | None, now: float) -> dict:
    started = parse_docker_time(container.started_at) if container else None
    return {
        "user": user,
        "container": container.name if container else None,
        "state": container.state if container else "absent",
        "started_at": container.started_at if started is not None else None,
        "uptime_s": round(max(0.0, now - started), 1) if started is not None else None,
        "gpus": container.gpus if container else [],
        "cpu_percent": None,
        "memory": {"used": None, "limit": None},
        "blkio": {"read": None, "write": None},
        "net": {"rx": None, "tx": None},
        "gpu_memory": 0,
        "gpu_processes": 0,
        "sync": None,
        "last_version": None,
        "disk": None,
    }


def read_disk(data_dir: str, user: str) -> dict | None:
    """The desktop's disk: its image's size and what it takes on the node, and while it is
    mounted, what the member has used of it."""
    figures = disk_figures(VmPaths.of(data_dir, user))
    if figures["size"] is None:
        return None
    return {key: figures[key] for key in ("size", "used", "allocated")}


def read_sync_status(proc: Proc, data_dir: str, user: str, now: float) -> dict | None:
    """The sync daemon's status.json (syncd.py writes it atomically, with the time it did)."""
    path = VmPaths.of(data_dir, user).control_file(SYNC_STATUS_FILE)
    try:
        with open(path, encoding="utf-8") as stream:
            status = json.load(stream)
        written_at = os.stat(path).st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    updated = status.get("updated")
    if isinstance(updated, (int, float)) and not isinstance(updated, bool):
        written_at = updated
    return sync_summary(status, now, written_at, proc.alive(status.get("pid")))


def sample(params: dict, check: bool) -> Result:
    proc = Proc(params["proc_root"])
    mounts = proc.mounts()
    containers, docker_error = containers_or_error(params["docker_socket"])
    desktops = desktop_containers(containers)
    users = sorted(set(desktops) | set(params["users"]))
    running = {user: cgroup_files(proc, mounts, c.pid) for user, c in desktops.items() if c.state == "running"}

    gpu_work = Background(query_gpus)
    mfs_work = Background(lambda: scan_mfs(params["mfs_mount"], users, mounts))
    started = time.monotonic()
    cpu_before, cpus = node_cpu(proc)
    usage_before = {user: cpu_usage_ns(files) for user, files in running.items()}

    memory, swap = memory_figures(parse_meminfo(proc.read("meminfo")))
    node = {
        "cpu_percent": None,
        "cpus": cpus,
        "load": parse_loadavg(proc.read("loadavg")),
        "memory": memory,
        "swap": swap,
        "disk": disk_usage(params["data_dir"]),
        "docker_error": docker_error,
        "images": sorted({image["id"] for image in held(params["image_store"])}) if params["image_store"] else None,
    }
    now = time.time()
    entries = {user: desktop_entry(user, desktops.get(user), now) for user in users}
    for user, files in running.items():
        if files is not None:
            entries[user].update(memory=container_memory(files), blkio=container_io(files), net=container_net(files))
    for user in users:
        entries[user]["sync"] = read_sync_status(proc, params["data_dir"], user, now)
        entries[user]["disk"] = read_disk(params["data_dir"], user)

    time.sleep(max(0.0, params["interval_s"] - (time.monotonic() - started)))
    cpu_after, _ = node_cpu(proc)
    elapsed_ns = (time.monotonic() - started) * 1e9
    node["cpu_percent"] = cpu_percent(cpu_before, cpu_after)
    for user, files in running.items():
        entries[user]["cpu_percent"] = usage_percent(usage_before[user], cpu_usage_ns(files), elapsed_ns)

    gpu = gpu_work.result()
    processes = attribute_processes(gpu["apps"], proc, containers)
    node["gpus"], node["gpu_error"] = gpus_with_processes(gpu["gpus"], processes), gpu["error"]
    for process in processes:
        if process["user"] in entries:
            entries[process["user"]]["gpu_memory"] += process["used_memory"] or 0
            entries[process["user"]]["gpu_processes"] += 1

    mfs = mfs_work.result()
    node["mfs"] = {key: mfs[key] for key in ("mounted", "healthy", "total", "free", "error")}
    for user, version in mfs["versions"].items():
        entries[user]["last_version"] = version
    return Result(changed=False, data={"node": node, "desktops": [entries[user] for user in users]})


ACTIONS = {"sample": Action(run=sample, params=SAMPLE_PARAMS)}
