"""How `labvm status` and `labvm top` show the status document (labvm/monitor.py builds it).

Pure functions from the document's dicts to rich renderables and plain lines: no SSH, no
SQL, no click. Every text a node or a member controls goes through `safe` or `cell`.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .text import cell, safe, word

SORT_KEYS = ("cpu", "mem", "gpu", "user")


def sort_desktops(desktops: list[dict], key: str) -> list[dict]:
    """Busiest first for cpu, mem and gpu (unknown figures last); by name for user."""
    if key == "user":
        return sorted(desktops, key=lambda d: d["user"])
    figure = {
        "cpu": lambda d: d["cpu_percent"],
        "mem": lambda d: (d["memory"] or {}).get("used"),
        "gpu": lambda d: d["gpu_memory"],
    }[key]
    return sorted(desktops, key=lambda d: (figure(d) is None, -(figure(d) or 0), d["user"]))


BAR_FULL, BAR_EMPTY = "█", "░"
BAR_WIDTH = 10


def bar_cells(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """A bar of `width` cells for a fraction 0..1 (clamped); empty when unknown."""
    if fraction is None:
        return ""
    filled = round(min(1.0, max(0.0, fraction)) * width)
    return BAR_FULL * filled + BAR_EMPTY * (width - filled)


def level_style(fraction: float) -> str:
    if fraction >= 0.9:
        return "red"
    if fraction >= 0.7:
        return "yellow"
    return "green"


def bar(fraction: float | None, label: str, width: int = BAR_WIDTH, stacked: bool = False) -> Text:
    """The bar, then its label: beside it, or (stacked) on the next line, which keeps table
    columns narrow enough that a bar is never cut."""
    if fraction is None:
        return Text(label or "?", style="dim")
    text = Text(bar_cells(fraction, width), style=level_style(fraction))
    text.append(f"{chr(10) if stacked else ' '}{label}")
    return text


def human_size(n: int | float | None) -> str:
    """Powers of 1024, with a decimal only below 10 of a unit: 512B, 1.5K, 300M, 16G."""
    if n is None:
        return "?"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" or abs(n) >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T" if abs(n) < 10 else f"{n:.0f}T"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    for size, unit, smaller, smaller_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s")):
        if seconds >= size:
            rest = (seconds % size) // smaller
            return f"{seconds // size}{unit}{rest}{smaller_unit}" if rest else f"{seconds // size}{unit}"
    return f"{seconds}s"


def fraction(used, total) -> float | None:
    return used / total if used is not None and total else None


def used_of(figures: dict | None, total_key: str = "total", width: int = BAR_WIDTH) -> Text:
    figures = figures or {}
    used, total = figures.get("used"), figures.get(total_key)
    label = f"{human_size(used)}/{human_size(total)}" if total else human_size(used)
    return bar(fraction(used, total), label, width=width, stacked=True)


def node_problems_of(node: dict) -> list[str]:
    """What is wrong with a node that answered, as the node said it (outside text, not made safe)."""
    problems = []
    if node["docker_error"]:
        problems.append(f"docker: {node['docker_error']}")
    if node["gpu_error"]:
        problems.append(f"GPUs: {node['gpu_error']}")
    mfs = node["mfs"] or {}
    if not mfs.get("healthy"):
        problems.append(f"MooseFS: {mfs.get('error') or 'not healthy'}")
    return problems


def node_health(node: dict) -> Text:
    if not node["reachable"]:
        return cell(node["error"] or "unreachable", style="bold red")
    problems = node_problems_of(node)
    return Text("\n".join(map(safe, problems)), style="yellow") if problems else Text("ok", style="green")


def gpu_line(gpu: dict, who: str | None) -> Text:
    """Two lines: index, utilization bar and owner; then memory, temperature and power."""
    util = gpu.get("utilization")
    line = Text(safe(f"#{gpu['index']} "))
    line.append_text(bar(None if util is None else util / 100, f"{util}%" if util is not None else "?%", width=6))
    if who:
        line.append(safe(f" {who}"), style="bold")
    line.append(f"\n   {human_size(gpu.get('memory_used'))}/{human_size(gpu.get('memory_total'))}")
    if gpu.get("temperature") is not None:
        line.append(f" {gpu['temperature']}°C")
    if gpu.get("power") is not None:
        line.append(f" {gpu['power']:.0f}W")
    return line


def gpu_strangers(gpu: dict) -> list[str]:
    """Who holds a process on a GPU not assigned to them (a user, a container or a pid)."""
    users = {p["user"] or p["container"] or f"pid {p['pid']}" for p in gpu.get("processes") or []}
    return sorted(users - {gpu.get("assigned_to")})


def gpu_owners(gpu: dict) -> str:
    """The desktop a GPU is assigned to, then [anyone else] holding a process on it."""
    return " ".join(filter(None, [gpu.get("assigned_to") or "", *(f"[{u}]" for u in gpu_strangers(gpu))]))


def node_gpus(node: dict) -> Text:
    lines = [gpu_line(gpu, gpu_owners(gpu) or None) for gpu in node["gpus"] or []]
    return Text("\n").join(lines) if lines else Text("none", style="dim")


def nodes_table(document: dict) -> Table:
    table = Table("node", "status", "CPU", "load", "memory", "disk", "MooseFS", "GPUs", title="nodes", title_justify="left")
    for node in document["nodes"]:
        if not node["reachable"]:
            table.add_row(cell(node["name"], style="bold red"), node_health(node), *[""] * 6)
            continue
        cpu = node["cpu_percent"]
        memory = used_of(node["memory"])
        swap = node["swap"] or {}
        if swap.get("total"):
            memory.append("\nswap ").append_text(used_of(swap))
        mfs = node["mfs"] or {}
        table.add_row(
            cell(node["name"]),
            node_health(node),
            bar(fraction(cpu, 100), f"{cpu:.0f}% of {node['cpus']}" if cpu is not None else "?", stacked=True),
            " ".join(f"{x:.2f}" for x in node["load"] or []),
            memory,
            used_of(node["disk"]),
            Text(f"{human_size(mfs.get('free'))} free", style="green") if mfs.get("healthy") else Text("down", style="red"),
            node_gpus(node),
        )
    return table


def cpu_limit(desktop: dict) -> float | None:
    limits = desktop.get("limits") or {}
    if limits.get("cpus"):
        return float(limits["cpus"])
    cpuset = limits.get("cpuset")
    if cpuset:
        count = 0
        for part in cpuset.split(","):
            low, _, high = part.partition("-")
            count += int(high or low) - int(low) + 1
        return float(count)
    return None


def desktop_state(desktop: dict) -> Text:
    text = _recorded_state(desktop)
    elsewhere = [node for node in desktop.get("running_on") or [] if node != desktop["node"]]
    if elsewhere:
        text.append("\n").append(cell(f"runs on {', '.join(elsewhere)}", style="red"))
    op = desktop.get("operation")
    if op:
        text.append("\n").append(cell(f"{op['kind']} #{op['id']} {op['state']}", style="yellow"))
    return text


def _recorded_state(desktop: dict) -> Text:
    state, container = desktop["state"], desktop["container_state"]
    if container is None:
        return cell(f"{state} (node unreachable)" if state == "running" else state, style="red" if state == "running" else "")
    if (state == "running") != (container == "running"):
        return cell(f"{state} (container {container})", style="red")
    return cell(state, style="green" if state == "running" else "")


def desktop_gpus(desktop: dict) -> Text:
    lines = []
    for gpu in desktop["gpus"]:
        util = gpu.get("utilization")
        lines.append(cell(f"#{gpu['index']} {'?' if util is None else util}% {human_size(gpu.get('memory_used'))}"))
    if desktop["gpu_memory"]:
        lines.append(Text(f"{human_size(desktop['gpu_memory'])} in {desktop['gpu_processes']} proc", style="bold"))
    return Text("\n").join(lines) if lines else Text("none", style="dim")


def sync_cell(sync: dict | None) -> Text:
    if not sync:
        return Text("-", style="dim")
    lag = human_duration(sync["lag_s"]) if sync.get("lag_s") is not None else "?"
    if sync.get("last_error"):
        return cell(f"{lag} {sync['last_error']}", style="red")
    return Text(lag, style="" if sync.get("running") else "yellow")


def traffic(desktop: dict) -> Text:
    """Disk IO, then network, since the container started."""
    io, net = desktop["blkio"] or {}, desktop["net"] or {}
    return Text(f"r {human_size(io.get('read'))} w {human_size(io.get('write'))}\n"
                f"rx {human_size(net.get('rx'))} tx {human_size(net.get('tx'))}")


def times(desktop: dict) -> Text:
    text = Text(f"up {human_duration(desktop['uptime_s'])}")
    if desktop["idle_s"] is not None:
        text.append(f"\nidle {human_duration(desktop['idle_s'])}", style="yellow" if desktop["idle_s"] >= 3600 else "")
    return text


def storage_cell(desktop: dict) -> Text:
    text = Text(f"v{desktop['last_version']}" if desktop["last_version"] is not None else "v?")
    text.append(f" img {image_short(desktop.get('image'))}", style="dim")
    text.append("\nsync ").append_text(sync_cell(desktop["sync"]))
    disk = desktop.get("disk") or {}
    if disk.get("size"):
        used = human_size(disk["used"]) if disk.get("used") is not None else "-"
        style = level_style(disk["used"] / disk["size"]) if disk.get("used") is not None else ""
        text.append("\ndisk ").append(f"{used}/{human_size(disk['size'])}", style=style)
    return text


def image_short(image: str | None) -> str:
    """An image id as status shows it: its first 8 hex digits (`labvm image list` has more)."""
    return image[:8] if image else "?"


def desktops_table(document: dict, sort: str = "user") -> Table:
    table = Table(title="desktops", title_justify="left")
    for name in ("user", "node", "state"):
        table.add_column(name)
    for name in ("CPU", "memory"):
        table.add_column(name, no_wrap=True, min_width=8)
    for name in ("GPUs", "IO / net", "time", "version"):
        table.add_column(name)
    table.add_column("HTTPS / VNC", no_wrap=True)
    for d in sort_desktops(document["desktops"], sort):
        cpu, limit = d["cpu_percent"], cpu_limit(d)
        running = d["container_state"] == "running"
        cpu_label = f"{cpu:.0f}%" if cpu is not None else "-"
        table.add_row(
            cell(d["user"]),
            cell(d["node"]),
            desktop_state(d),
            bar(fraction(cpu, 100 * limit) if limit else None, cpu_label, width=8, stacked=True) if running else "",
            used_of(d["memory"], "limit", width=8) if running else "",
            desktop_gpus(d),
            traffic(d) if running else "",
            times(d) if running else "",
            storage_cell(d),
            lines_of(cell(https_page(d)), cell(d["vnc"])),
        )
    return table


# -- compact tables: a terminal narrower than the wide ones -------------------------------
def compact_table(*headers: str, leading: int = 0) -> Table:
    """No outer border and two spaces between columns; a rule under the header. A word too long
    for its column is folded onto the next line, never cut."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, leading=leading)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def https_page(d: dict) -> str | None:
    """The desktop's noVNC page without its query (autoconnect...), short enough for a table."""
    return d["https"].split("?", 1)[0] if d.get("https") else None


def lines_of(*parts: Text | str | None) -> Text:
    return Text("\n").join(part if isinstance(part, Text) else Text(part) for part in parts if part)


def widest(texts) -> int:
    return max((cell_len(line) for text in texts for line in (text.plain if isinstance(text, Text) else text).split("\n")),
               default=0)


def styled(text: str, value: float | None) -> Text:
    return Text(text, style=level_style(value) if value is not None else "dim")


def ratio_text(figures: dict | None, total_key: str = "total") -> Text:
    figures = figures or {}
    used, total = figures.get("used"), figures.get(total_key)
    return styled(f"{human_size(used)}/{human_size(total)}" if total else human_size(used), fraction(used, total))


def gpu_summary(gpus: list[dict]) -> Text:
    """How many GPUs are assigned of how many, their mean utilization, and [anyone] holding a
    process on a GPU not assigned to them: 2/4 GPU 37%."""
    if not gpus:
        return Text("none", style="dim")
    assigned = sum(1 for g in gpus if g.get("assigned_to"))
    text = Text(f"{assigned}/{len(gpus)} GPU")
    utils = [g["utilization"] for g in gpus if g.get("utilization") is not None]
    if utils:
        mean = sum(utils) / len(utils)
        text.append(" ").append_text(styled(f"{mean:.0f}%", mean / 100))
    strangers = sorted({u for g in gpus for u in gpu_strangers(g)})
    if strangers:
        text.append(safe(" " + " ".join(f"[{u}]" for u in strangers)), style="bold red")
    return text


def mfs_cell(node: dict) -> Text:
    mfs = node["mfs"] or {}
    return Text(f"{human_size(mfs.get('free'))} free", style="green") if mfs.get("healthy") else Text("down", style="red")


def load_text(node: dict) -> str:
    return " ".join(f"{x:.2f}" for x in node["load"] or [])


def node_cpu_text(node: dict) -> Text:
    cpu = node["cpu_percent"]
    return styled(f"{cpu:.0f}% of {node['cpus']}" if cpu is not None else "?", fraction(cpu, 100))


def node_status_word(node: dict) -> Text:
    if not node["reachable"]:
        return Text("unreachable", style="bold red")
    return Text("ok", style="green") if node_health(node).plain == "ok" else Text("problem", style="yellow")


def node_problems(nodes: list[dict], one_line: bool = False) -> list[Text]:
    """A line for each node that is not ok: its name, then what is wrong (cut to one line with
    an ellipsis when one_line, else wrapped)."""
    lines = []
    for node in nodes:
        health = node_health(node)
        if health.plain != "ok":
            line = cell(node["name"], style="bold").append(": ").append_text(Text("; ").join(health.split("\n")))
            if one_line:
                line.no_wrap, line.overflow = True, "ellipsis"
            lines.append(line)
    return lines


def compact_nodes_table(document: dict) -> Table:
    """A node in two lines: its name over ok, problem or unreachable (node_problems says what),
    CPU over load, memory over swap, disk over MooseFS, and its GPUs summed up (gpus_table has
    each)."""
    nodes = document["nodes"]
    table = compact_table("node", "CPU / load", "memory / swap", "disk / MooseFS", "GPUs", leading=1)
    table.columns[0].width = max(11, widest(n["name"] for n in nodes))
    for node in nodes:
        name = lines_of(cell(node["name"], style="bold" if node["reachable"] else "bold red"), node_status_word(node))
        if not node["reachable"]:
            table.add_row(name, "", "", "", "")
            continue
        swap = node["swap"] or {}
        table.add_row(
            name,
            lines_of(node_cpu_text(node), load_text(node)),
            lines_of(ratio_text(node["memory"]), Text("swap ").append_text(ratio_text(swap)) if swap.get("total") else None),
            lines_of(ratio_text(node["disk"]), mfs_cell(node)),
            gpu_summary(node["gpus"] or []),
        )
    return table


def gpus_table(document: dict) -> Table | None:
    """Each GPU of each node on a line: utilization, memory, temperature, power, and the desktop
    it is assigned to, then [anyone else] holding a process on it. None without GPUs."""
    rows = [(node, gpu) for node in document["nodes"] for gpu in node["gpus"] or []]
    if not rows:
        return None
    table = compact_table("node", "GPU", "use", "memory", "temp", "power", "desktop")
    for column in table.columns[1:6]:
        column.justify = "right"
    table.columns[0].width = widest(node["name"] for node, _gpu in rows)
    table.columns[6].min_width = min(31, widest(gpu_owners(gpu) for _node, gpu in rows))
    previous = None
    for node, gpu in rows:
        util = gpu.get("utilization")
        table.add_row(
            cell(node["name"] if node["name"] != previous else "", style="bold"),
            safe(f"#{gpu['index']}"),
            styled(f"{util}%", util / 100) if util is not None else Text("?%", style="dim"),
            f"{human_size(gpu.get('memory_used'))}/{human_size(gpu.get('memory_total'))}",
            f"{gpu['temperature']}°C" if gpu.get("temperature") is not None else "",
            f"{gpu['power']:.0f}W" if gpu.get("power") is not None else "",
            cell(gpu_owners(gpu), style="bold"),
        )
        previous = node["name"]
    return table


def cpu_figure(desktop: dict) -> Text:
    """CPU of one CPU, coloured by its share of the desktop's limit."""
    cpu, limit = desktop["cpu_percent"], cpu_limit(desktop)
    return styled(f"{cpu:.0f}%" if cpu is not None else "?", fraction(cpu, 100 * limit) if limit else None)


def cpu_text(desktop: dict) -> Text:
    """The CPU figure, then the limit: 250% of 8."""
    limit = cpu_limit(desktop)
    return cpu_figure(desktop).append(f" of {limit:g}") if limit else cpu_figure(desktop)


def compact_desktops_table(document: dict, sort: str = "user") -> Table:
    """The wide table's figures in five columns: the desktop's name, node, state and VNC
    address together, CPU over memory, times over IO and network, version over sync and disk."""
    desktops = sort_desktops(document["desktops"], sort)
    table = compact_table("desktop", "CPU / mem", "GPUs", "activity", "storage", leading=1)
    table.columns[0].width = max(12, widest(d[key] or "" for d in desktops for key in ("user", "node", "vnc")))
    for d in desktops:
        running = d["container_state"] == "running"
        io, net = d["blkio"] or {}, d["net"] or {}
        table.add_row(
            lines_of(cell(d["user"], style="bold"), cell(d["node"]), desktop_state(d), cell(d["vnc"])),
            lines_of(cpu_text(d), ratio_text(d["memory"], "limit")) if running else "",
            desktop_gpus(d),
            lines_of(times(d), f"io {human_size(io.get('read'))}/{human_size(io.get('write'))}",
                     f"net {human_size(net.get('rx'))}/{human_size(net.get('tx'))}") if running else "",
            storage_cell(d),
        )
    return table


# -- one line a row: what top shows when rows must be short --------------------------------------
@dataclass
class Column:
    """A column of a one-line table. drop: 0 is always shown, the highest goes first when the
    width is short; flex: shown in what width is left, cut with an ellipsis."""

    header: str
    cells: list[Text]
    drop: int = 0
    flex: bool = False
    justify: str = "left"

    @property
    def natural(self) -> int:
        return max([cell_len(self.header), *(c.cell_len for c in self.cells)])


FLEX_AT_LEAST = 16
GAP = 2


def line_table(columns: list[Column], width: int) -> Table:
    """One line a row in `width`: optional columns left out, highest `drop` first, until the
    rest fit at their natural width; a flex column takes what is left."""
    def needed(shown):
        return sum(min(c.natural, FLEX_AT_LEAST) if c.flex else c.natural for c in shown) + GAP * (len(shown) - 1)

    shown = list(columns)
    while needed(shown) > width and any(c.drop for c in shown):
        shown.remove(max(shown, key=lambda c: c.drop))
    fixed = sum(c.natural for c in shown if not c.flex) + GAP * (len(shown) - 1)
    table = compact_table()
    for c in shown:
        size = max(1, min(c.natural, width - fixed)) if c.flex else c.natural
        table.add_column(c.header, width=size, no_wrap=True, overflow="ellipsis", justify=c.justify)
    for row in zip(*(c.cells for c in shown), strict=True):
        table.add_row(*row)
    return table


def desktop_gpu_summary(desktop: dict) -> Text:
    """Its GPUs, their mean utilization and the GPU memory its processes hold: 2 GPU 37% 1.2G."""
    gpus = desktop["gpus"]
    if not gpus and not desktop["gpu_memory"]:
        return Text("none", style="dim")
    text = Text(f"{len(gpus)} GPU")
    utils = [g["utilization"] for g in gpus if g.get("utilization") is not None]
    if utils:
        mean = sum(utils) / len(utils)
        text.append(" ").append_text(styled(f"{mean:.0f}%", mean / 100))
    if desktop["gpu_memory"]:
        text.append(f" {human_size(desktop['gpu_memory'])}", style="bold")
    return text


def state_line(desktop: dict) -> Text:
    return Text(", ").join(desktop_state(desktop).split("\n"))


def line_nodes_table(document: dict, width: int) -> Table:
    nodes = document["nodes"]

    def column(header, figure, drop=0, justify="left"):
        return Column(header, [figure(n) if n["reachable"] else Text("") for n in nodes], drop, justify=justify)

    return line_table([
        Column("node", [cell(n["name"], style="bold" if n["reachable"] else "bold red") for n in nodes]),
        column("CPU", node_cpu_text, justify="right"),
        column("load", lambda n: Text(load_text(n)), drop=3),
        column("memory", lambda n: ratio_text(n["memory"]), justify="right"),
        column("disk", lambda n: ratio_text(n["disk"]), drop=2, justify="right"),
        column("MooseFS", mfs_cell, drop=1),
        column("GPUs", lambda n: gpu_summary(n["gpus"] or [])),
        Column("status", [node_status_word(n) for n in nodes]),
    ], width)


def line_desktops_table(desktops: list[dict], width: int) -> Table:
    def column(header, figure, drop=0, justify="left", running_only=True):
        return Column(header, [figure(d) if d["container_state"] == "running" or not running_only else Text("")
                               for d in desktops], drop, justify=justify)

    return line_table([
        Column("desktop", [cell(d["user"], style="bold") for d in desktops]),
        Column("node", [cell(d["node"]) for d in desktops]),
        column("CPU", cpu_figure, justify="right"),
        column("memory", lambda d: ratio_text(d["memory"], "limit"), justify="right"),
        column("GPUs", desktop_gpu_summary, running_only=False),
        column("idle", lambda d: Text(human_duration(d["idle_s"]) if d["idle_s"] is not None else "-"), drop=1,
               justify="right"),
        column("up", lambda d: Text(human_duration(d["uptime_s"])), drop=3, justify="right"),
        column("HTTPS", lambda d: cell(https_page(d)), drop=2, running_only=False),
        column("VNC", lambda d: cell(d["vnc"]), drop=2, running_only=False),
        column("sync", lambda d: sync_cell(d["sync"]), drop=4, running_only=False),
        column("disk", lambda d: ratio_text(d.get("disk")), drop=5, running_only=False, justify="right"),
        column("version", lambda d: Text(f"v{d['last_version']}" if d["last_version"] is not None else "v?"), drop=6,
               running_only=False),
        column("IO r/w", lambda d: Text(f"{human_size((d['blkio'] or {}).get('read'))}/"
                                        f"{human_size((d['blkio'] or {}).get('write'))}"), drop=7),
        column("net rx/tx", lambda d: Text(f"{human_size((d['net'] or {}).get('rx'))}/{human_size((d['net'] or {}).get('tx'))}"),
               drop=8),
        Column("state", [state_line(d) for d in desktops], flex=True),
    ], width)


def more_line(count: int, what: str) -> Text:
    return Text(f"… {count} more {what}; `labvm status` lists them all", style="dim")


# -- plain lines: status piped, for grep, awk, less and cron mail -----------------------------------
def aligned(rows: list[list[str]]) -> list[str]:
    """Rows of words as lines, each column as wide as its widest word but the last."""
    widths = [max(cell_len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(w + " " * (size - cell_len(w)) for w, size in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip() for row in rows]


NODE_HEADER = ["NODE", "HOST", "STATUS", "CPU", "CPUS", "LOAD", "MEM", "SWAP", "DISK", "MFS_FREE", "GPUS", "PROBLEMS"]
DESKTOP_HEADER = ["DESKTOP", "NODE", "STATE", "CONTAINER", "RUNS_ON", "OPERATION", "CPU", "MEM", "GPUS", "GPU_MEM",
                  "GPU_PROCS", "IO_R/W", "NET_RX/TX", "UP", "IDLE", "VERSION", "IMAGE", "SYNC", "DISK", "VNC", "HTTPS", "NOTE"]


def size_pair(figures: dict | None, first: str, second: str) -> str:
    figures = figures or {}
    return f"{human_size(figures.get(first))}/{human_size(figures.get(second))}"


def gpu_word(gpu: dict) -> str:
    util = gpu.get("utilization")
    parts = [f"#{gpu['index']}", "?%" if util is None else f"{util}%", size_pair(gpu, "memory_used", "memory_total")]
    if gpu.get("temperature") is not None:
        parts.append(f"{gpu['temperature']}C")
    if gpu.get("power") is not None:
        parts.append(f"{gpu['power']:.0f}W")
    owners = gpu_owners(gpu)
    if owners:
        parts.append(owners)
    return word(":".join(parts))


def node_words(node: dict) -> list[str]:
    name, host = word(node["name"]), word(node["host"])
    if not node["reachable"]:
        return [name, host, "unreachable", *["-"] * 8, safe(node["error"] or "")]
    health = node_health(node).plain
    problems = "" if health == "ok" else health
    swap = node["swap"] or {}
    mfs = node["mfs"] or {}
    return [
        name, host, "problem" if problems else "ok",
        f"{node['cpu_percent']:.0f}%" if node["cpu_percent"] is not None else "?",
        str(node["cpus"]) if node["cpus"] is not None else "?",
        ",".join(f"{x:.2f}" for x in node["load"] or []) or "?",
        size_pair(node["memory"], "used", "total"),
        size_pair(swap, "used", "total") if swap.get("total") else "-",
        size_pair(node["disk"], "used", "total"),
        human_size(mfs.get("free")) if mfs.get("healthy") else "down",
        ",".join(gpu_word(g) for g in node["gpus"] or []) or "-",
        "; ".join(problems.split("\n")),
    ]


def desktop_words(d: dict) -> list[str]:
    running = d["container_state"] == "running"

    def figure(text: str) -> str:
        return text if running else "-"

    op = d.get("operation")
    sync = d["sync"] or {}
    disk = d.get("disk") or {}
    gpus = [f"#{g['index']}:{'?' if g.get('utilization') is None else g['utilization']}%:{human_size(g.get('memory_used'))}"
            for g in d["gpus"]]
    lag = (human_duration(sync["lag_s"]) if sync.get("lag_s") is not None else "?") if sync else "-"
    return [
        word(d["user"]), word(d["node"]), word(d["state"]), word(d["container_state"] or "?"),
        word(",".join(d.get("running_on") or [])) or "-",
        word(f"{op['kind']}#{op['id']}:{op['state']}") if op else "-",
        figure(f"{d['cpu_percent']:.0f}%" if d["cpu_percent"] is not None else "?"),
        figure(size_pair(d["memory"], "used", "limit")),
        word(",".join(gpus)) or "-",
        human_size(d["gpu_memory"]) if d["gpu_memory"] is not None else "?",
        str(d["gpu_processes"]) if d["gpu_processes"] is not None else "?",
        figure(size_pair(d["blkio"], "read", "write")),
        figure(size_pair(d["net"], "rx", "tx")),
        figure(human_duration(d["uptime_s"])),
        human_duration(d["idle_s"]) if d["idle_s"] is not None else "-",
        f"v{d['last_version']}" if d["last_version"] is not None else "v?",
        word(d["image"][:12]) if d.get("image") else "-",
        lag + ("" if not sync or sync.get("running") else "(stopped)"),
        f"{human_size(disk['used']) if disk.get('used') is not None else '-'}/{human_size(disk.get('size'))}" if disk else "-",
        word(d["vnc"]) if d["vnc"] else "-",
        word(https_page(d)) if d.get("https") else "-",
        safe(f"sync: {sync['last_error']}") if sync.get("last_error") else "",
    ]


def status_lines(document: dict, sort: str = "user") -> list[str]:
    """One line a node, then one a desktop, each table under a header line: whitespace-separated
    words, nothing cut or wrapped. Only the last column (problems, a sync error) has spaces."""
    return [*aligned([NODE_HEADER, *map(node_words, document["nodes"])]),
            *aligned([DESKTOP_HEADER, *map(desktop_words, sort_desktops(document["desktops"], sort))])]


# -- choosing a layout -------------------------------------------------------------------------------
def _console(width: int) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False, force_terminal=False)


def natural_width(renderable, width: int) -> int:
    """The width a renderable takes unwrapped (at most what a console `width` wide allows)."""
    console = _console(width)
    return Measurement.get(console, console.options, renderable).maximum


def height_of(renderable, width: int) -> int:
    console = _console(width)
    return len(console.render_lines(renderable, console.options, pad=False))


def wide_fits(tables: list[Table], width: int) -> bool:
    return all(natural_width(t, 10_000) <= width for t in tables)


def compact_parts(document: dict, sort: str) -> list:
    gpus = gpus_table(document)
    return [compact_nodes_table(document), *node_problems(document["nodes"]), *([Text(""), gpus] if gpus else []), Text(""),
            compact_desktops_table(document, sort)]


def status_view(document: dict, sort: str = "user", width: int | None = None) -> Group:
    """The wide tables where they fit in `width` unwrapped (or width is None), else the compact."""
    wide = [nodes_table(document), desktops_table(document, sort)]
    if width is None or wide_fits(wide, width):
        return Group(*wide)
    return Group(*compact_parts(document, sort))


def split_rows(nodes: int, desktops: int, rows: int) -> tuple[int, int]:
    """How many node and desktop rows to show in `rows` lines; a table cut short takes one of
    them for its `… N more` line. Desktops get at least a third."""
    if nodes + desktops <= rows:
        return nodes, desktops
    shown_nodes = min(nodes, max(rows - desktops, rows - max(1, rows // 3)))
    if shown_nodes < nodes:
        shown_nodes = max(1, shown_nodes - 1)
    left = rows - shown_nodes - (shown_nodes < nodes)
    shown_desktops = desktops if desktops <= left else max(1, left - 1)
    return shown_nodes, shown_desktops


def top_view(document: dict, sort: str, interval: float, width: int | None = None, height: int | None = None,
             when: str | None = None) -> Group:
    """The richest layout that fits `width` x `height`: the wide tables, the compact ones, the
    compact nodes (GPUs summed up) over one line a desktop, then one line a node and a desktop
    for as many as there is room for, each table saying how many it leaves out."""
    when = when or dt.datetime.now().strftime("%H:%M:%S")
    header = Text(f"labvm top  {when}  every {interval:g}s  sorted by {sort}  (Ctrl-C quits)", style="bold")
    if width is None or height is None:
        return Group(header, nodes_table(document), desktops_table(document, sort))
    desktops = sort_desktops(document["desktops"], sort)
    wide = [nodes_table(document), desktops_table(document, sort)]
    layouts = []
    if wide_fits(wide, width):
        layouts.append(Group(header, *wide))
    layouts += [
        Group(header, *compact_parts(document, sort)),
        Group(header, compact_nodes_table(document), *node_problems(document["nodes"], one_line=True), Text(""),
              line_desktops_table(desktops, width)),
    ]
    for layout in layouts:
        if height_of(layout, width) <= height:
            return layout
    problems = node_problems(document["nodes"], one_line=True)
    fixed = 1 + 2 + len(problems) + 1 + 2  # the header, each table's header and rule, the problems, a blank line
    shown_nodes, shown_desktops = split_rows(len(document["nodes"]), len(desktops), height - fixed)
    parts: list = [header, line_nodes_table({**document, "nodes": document["nodes"][:shown_nodes]}, width)]
    if shown_nodes < len(document["nodes"]):
        parts.append(more_line(len(document["nodes"]) - shown_nodes, "nodes"))
    parts += [*problems, Text(""), line_desktops_table(desktops[:shown_desktops], width)]
    if shown_desktops < len(desktops):
        parts.append(more_line(len(desktops) - shown_desktops, "desktops"))
    return Group(*parts)
