"""probe: read-only facts about a node, gathered in one round trip.

Action `facts` never changes anything. A fact that cannot be read is reported as null or with
an error string next to it, so one broken subsystem (say, nvidia-smi) never hides the rest.
"""

import http.client
import json
import os
import socket
import sys

from _contract import Action, Param, Result, absolute_path
from _system import (
    MFS_ANSWER_TIMEOUT_S,
    CommandTimedOut,
    find_tool,
    fuse_call,
    get_over_unix_socket,
    mount_at,
    read_mountinfo,
    run_command,
    space_mib,
)

DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
DOCKER_TIMEOUT_S = 3.0
NVIDIA_SMI_TIMEOUT_S = 10.0

FILESYSTEMS_PATH = "/proc/filesystems"
MEMINFO_PATH = "/proc/meminfo"
FUSE_DEVICE = "/dev/fuse"
BLKIO_CGROUP = "/sys/fs/cgroup/blkio"

TOOLS = ("mfsmount", "mfsmakesnapshot", "rsync", "inotifywait", "mkfs.ext4", "resize2fs", "losetup", "stunnel4")

# (query field, output key, required): the order is the order of nvidia-smi's CSV columns.
GPU_COLUMNS = (
    ("index", "index", True),
    ("uuid", "uuid", True),
    ("name", "name", True),
    ("memory.total", "memory_total_mib", False),
    ("memory.used", "memory_used_mib", False),
    ("utilization.gpu", "utilization_gpu", False),
)
GPU_TEXT_KEYS = ("uuid", "name")
# nvidia-smi prints these instead of a value when a GPU cannot report it.
GPU_MISSING_VALUES = ("", "N/A", "[N/A]", "[Not Supported]", "Not Supported", "[Unknown Error]")


def gather_facts(params: dict, check: bool) -> Result:
    data = {
        **host_facts(),
        "overlayfs": filesystem_available("overlay"),
        "fuse": os.path.exists(FUSE_DEVICE) and filesystem_available("fuse"),
        # docker applies BlkioWeight only where the cgroup has a weight file (CFQ/BFQ); else it drops it.
        "blkio_weight": any(os.path.exists(os.path.join(BLKIO_CGROUP, f)) for f in ("blkio.weight", "blkio.bfq.weight")),
        "docker": docker_facts(params["docker_socket"]),
        "tools": tool_facts(),
        **gpu_facts(),
        "cpus": cpu_facts(),
        "loadavg": [round(value, 2) for value in os.getloadavg()],
        "memory": memory_facts(),
        "disk": disk_facts(params["data_dir"]) if params["data_dir"] else None,
        "mfs": mfs_mount_facts(params["mfs_mount"]) if params["mfs_mount"] else None,
        "listening_ports": listening_ports(),
    }
    return Result(changed=False, data=data)


TCP_LISTEN = "0A"


def parse_listening_ports(text: str) -> set[int]:
    """Local ports in state LISTEN from /proc/net/tcp or tcp6 (hex address:port, hex state)."""
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == TCP_LISTEN:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_ports() -> list[int]:
    """What already listens here: a port labvm hands a desktop must be free on the node itself,
    whatever the state database knows (a container of an earlier life, another service)."""
    found: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as stream:
                found |= parse_listening_ports(stream.read())
        except OSError:
            continue
    return sorted(found)


def host_facts() -> dict:
    uname = os.uname()
    return {
        "hostname": socket.gethostname(),
        "kernel": {"release": uname.release, "version": uname.version},
        "arch": uname.machine,
    }


# --- kernel filesystems -------------------------------------------------------------------


def parse_filesystems(text: str) -> set[str]:
    """Names from /proc/filesystems, whose lines are "nodev\\tNAME" or "\\tNAME"."""
    return {line.split()[-1] for line in text.splitlines() if line.strip()}


def filesystem_available(name: str) -> bool:
    """Registered now, or loadable as a module on first mount."""
    try:
        with open(FILESYSTEMS_PATH, encoding="utf-8") as stream:
            if name in parse_filesystems(stream.read()):
                return True
    except OSError:
        pass
    return module_available(name)


def module_available(name: str) -> bool:
    if os.path.isdir(f"/sys/module/{name}"):
        return True
    modprobe = find_tool("modprobe")
    if modprobe is None:
        return False
    try:
        return run_command([modprobe, "--dry-run", "--quiet", name], timeout_s=10).returncode == 0
    except (CommandTimedOut, OSError):
        return False


# --- docker -------------------------------------------------------------------------------


def docker_facts(socket_path: str) -> dict:
    facts = {"ok": False, "socket": socket_path, "version": None, "api_version": None, "error": None}
    try:
        status, body = get_over_unix_socket(socket_path, "/version", DOCKER_TIMEOUT_S)
    except FileNotFoundError:
        return {**facts, "error": f"docker socket {socket_path} does not exist"}
    except TimeoutError:
        return {**facts, "error": f"docker socket {socket_path}: no answer within {DOCKER_TIMEOUT_S:g} s"}
    except (OSError, http.client.HTTPException) as error:
        return {**facts, "error": f"docker socket {socket_path}: {describe_error(error)}"}
    if status != 200:
        return {**facts, "error": f"GET /version answered HTTP {status}"}
    try:
        info = json.loads(body)
        version, api_version = str(info["Version"]), str(info["ApiVersion"])
    except (ValueError, KeyError, TypeError):
        return {**facts, "error": "GET /version answered without Version and ApiVersion"}
    return {**facts, "ok": True, "version": version, "api_version": api_version}


def describe_error(error: BaseException) -> str:
    return str(error) or type(error).__name__


# --- tools and GPUs -----------------------------------------------------------------------


def tool_facts() -> dict:
    tools = {name: find_tool(name) for name in TOOLS}
    tools["python3"] = sys.version.split()[0]
    return tools


def gpu_facts() -> dict:
    nvidia_smi = find_tool("nvidia-smi")
    if nvidia_smi is None:
        return {"nvidia_smi": None, "gpus": [], "gpu_error": None}
    gpus, error = query_gpus(nvidia_smi)
    return {"nvidia_smi": nvidia_smi, "gpus": gpus, "gpu_error": error}


def query_gpus(nvidia_smi: str) -> tuple[list[dict], str | None]:
    fields = ",".join(column[0] for column in GPU_COLUMNS)
    argv = [nvidia_smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
    try:
        result = run_command(argv, timeout_s=NVIDIA_SMI_TIMEOUT_S)
    except CommandTimedOut as error:
        return [], str(error)
    except OSError as error:
        return [], f"cannot run {nvidia_smi}: {describe_error(error)}"
    if result.returncode != 0:
        return [], f"nvidia-smi exited with {result.returncode}: {result.output_tail()}"
    try:
        return parse_gpu_query(result.stdout), None
    except ValueError as error:
        return [], f"cannot parse nvidia-smi output: {error}"


def parse_gpu_query(text: str) -> list[dict]:
    """Parse `nvidia-smi --query-gpu=<GPU_COLUMNS> --format=csv,noheader,nounits` output.

    Raises ValueError naming the line when a line does not fit: a half-understood GPU list
    would make labvm assign GPUs that are not there.
    """
    gpus = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            gpus.append(parse_gpu_line(line, number))
    return gpus


def parse_gpu_line(line: str, number: int) -> dict:
    values = [value.strip() for value in line.split(",")]
    if len(values) != len(GPU_COLUMNS):
        raise ValueError(f"line {number}: expected {len(GPU_COLUMNS)} columns, got {len(values)}")
    gpu = {}
    for (field, key, required), value in zip(GPU_COLUMNS, values, strict=True):
        if value in GPU_MISSING_VALUES:
            if required:
                raise ValueError(f"line {number}: {field} has no value")
            gpu[key] = None
        elif key in GPU_TEXT_KEYS:
            gpu[key] = value
        else:
            gpu[key] = parse_count(value, field, number)
    return gpu


def parse_count(value: str, field: str, number: int) -> int:
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"line {number}: {field} is not an integer: {value[:40]!r}") from None
    if count < 0:
        raise ValueError(f"line {number}: {field} is negative")
    return count


# --- CPU, memory, disk --------------------------------------------------------------------


def cpu_facts() -> dict:
    # `allowed` is what this node's cgroup/cpuset lets processes use; it can be fewer than
    # the CPUs the kernel sees.
    return {"count": os.cpu_count(), "allowed": len(os.sched_getaffinity(0))}


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {key: kB}; lines look like "MemTotal:       16305412 kB"."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0])
    return values


def memory_facts() -> dict:
    with open(MEMINFO_PATH, encoding="utf-8") as stream:
        meminfo = parse_meminfo(stream.read())

    def mib(key: str) -> int | None:
        return meminfo[key] // 1024 if key in meminfo else None

    return {
        "total_mib": mib("MemTotal"),
        "available_mib": mib("MemAvailable"),
        "swap_total_mib": mib("SwapTotal"),
        "swap_free_mib": mib("SwapFree"),
    }


def nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def disk_facts(data_dir: str) -> dict:
    # The data dir may not exist yet on a fresh node; the disk it will live on is what counts.
    measured = nearest_existing(data_dir)
    stat = os.statvfs(measured)
    return {
        "path": data_dir,
        "exists": measured == data_dir,
        "measured_path": measured,
        "device": block_device_of(measured),
        **space_mib(stat.f_blocks, stat.f_bavail, stat.f_frsize),
    }


def block_device_of(path: str, sys_root: str = "/sys", dev_root: str = "/dev") -> str | None:
    """The whole disk under `path`, as /dev/NAME, for blkio throttling (which takes disks, not partitions).

    None when the filesystem has no block device (tmpfs, overlay, FUSE).
    """
    st_dev = os.stat(path).st_dev
    sys_dir = os.path.join(sys_root, "dev", "block", f"{os.major(st_dev)}:{os.minor(st_dev)}")
    if not os.path.isdir(sys_dir):
        return None
    real = os.path.realpath(sys_dir)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
    device = os.path.join(dev_root, os.path.basename(real))
    return device if os.path.exists(device) else None


def mfs_mount_facts(mount: str) -> dict:
    entry = mount_at(read_mountinfo(), mount)
    facts = {
        "path": mount,
        "mounted": entry is not None,
        "fstype": entry.fstype if entry else None,
        "source": entry.source if entry else None,
        "total_mib": None,
        "free_mib": None,
        "error": None,
    }
    if entry is None:
        return facts
    try:
        stat = fuse_call("statvfs", mount, MFS_ANSWER_TIMEOUT_S)
    except (OSError, TimeoutError) as error:
        return {**facts, "error": f"statvfs {mount}: {describe_error(error)}"}
    return {**facts, **space_mib(stat["blocks"], stat["bavail"], stat["frsize"])}


FACTS_PARAMS = {
    "data_dir": Param(absolute_path),
    "mfs_mount": Param(absolute_path),
    "docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET),
}

ACTIONS = {"facts": Action(run=gather_facts, params=FACTS_PARAMS)}
