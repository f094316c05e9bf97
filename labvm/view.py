"""How `labvm status` and `labvm top` show the status document (labvm/monitor.py builds it).

Pure functions from the document's dicts to rich renderables and plain lines: no SSH, no
SQL, no click. Every text a node or a member controls goes through `safe` or `cell`.
"""

from __future__ import annotations

import datetime as dt

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .text import cell, safe

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


def node_health(node: dict) -> Text:
    if not node["reachable"]:
        return cell(node["error"] or "unreachable", style="bold red")
    problems = []
    if node["docker_error"]:
        problems.append(f"docker: {node['docker_error']}")
    if node["gpu_error"]:
        problems.append(f"GPUs: {node['gpu_error']}")
    mfs = node["mfs"] or {}
    if not mfs.get("healthy"):
        problems.append(f"MooseFS: {mfs.get('error') or 'not healthy'}")
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


def node_gpus(node: dict) -> Text:
    lines = []
    for gpu in node["gpus"] or []:
        users = sorted({p["user"] or p["container"] or f"pid {p['pid']}" for p in gpu.get("processes") or []})
        who = gpu.get("assigned_to") or ""
        strangers = [u for u in users if u != who]
        lines.append(gpu_line(gpu, " ".join(filter(None, [who, *(f"[{u}]" for u in strangers)])) or None))
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
    text.append("\nsync ").append_text(sync_cell(desktop["sync"]))
    disk = desktop.get("disk") or {}
    if disk.get("size"):
        used = human_size(disk["used"]) if disk.get("used") is not None else "-"
        style = level_style(disk["used"] / disk["size"]) if disk.get("used") is not None else ""
        text.append("\ndisk ").append(f"{used}/{human_size(disk['size'])}", style=style)
    return text


def desktops_table(document: dict, sort: str = "user") -> Table:
    table = Table(title="desktops", title_justify="left")
    for name in ("user", "node", "state"):
        table.add_column(name)
    for name in ("CPU", "memory"):
        table.add_column(name, no_wrap=True, min_width=8)
    for name in ("GPUs", "IO / net", "time", "version"):
        table.add_column(name)
    table.add_column("VNC", no_wrap=True)
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
            cell(d["vnc"]),
        )
    return table


def status_view(document: dict, sort: str = "user") -> Group:
    return Group(nodes_table(document), desktops_table(document, sort))


def top_view(document: dict, sort: str, interval: float) -> Group:
    when = dt.datetime.now().strftime("%H:%M:%S")
    header = Text(f"labvm top  {when}  every {interval:g}s  sorted by {sort}  (Ctrl-C quits)", style="bold")
    return Group(header, nodes_table(document), desktops_table(document, sort))
