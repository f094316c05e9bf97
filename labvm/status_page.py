"""`labvm status --html`: the status document as one self-contained web page, for members.

Pure functions from the document (labvm/monitor.py) and the usage history to HTML text: no
scripts, no external assets (inline CSS, inline SVG graphs), nothing secret (the document holds
no password or VNC secret, and the page takes only the fields it shows). Every text from a
member, a node or the cluster goes through `esc`: made visible as on the terminal (text.safe),
then HTML-escaped, quotes included.
"""

from __future__ import annotations

import datetime as dt
import html

from .monitor import History, document_time, percent
from .text import safe
from .view import desktop_state, gpu_strangers, human_duration, human_size, node_problems_of

DAY_S = 24 * 3600
SPARK_W, SPARK_H = 240, 36
GAP_S = 30 * 60  # no sample for this long breaks a graph's line

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.6em 0 .4em}p{margin:.3em 0}
.wrap{overflow-x:auto}table{border-collapse:collapse}
th,td{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:middle}td{white-space:nowrap}
th{background:#f0f0f0;font-weight:600}tr.gpu td{background:#fafafa}tr.gpu td:first-child{padding-left:1.8em}
.num{text-align:right;white-space:nowrap}.dim{color:#888}.ok{color:#227722}.warn{color:#9a6200}
.bad{color:#b00020;font-weight:600}.long{white-space:normal}.free{color:#227722;font-weight:600}
.bar{display:inline-block;width:56px;height:8px;background:#e4e4e4;margin-right:.4em}
.bar span{display:block;height:8px}.l0{background:#46a046}.l1{background:#d9a400}.l2{background:#d03030}
.spark{display:block}.spark .bg{fill:#eef2f8}.spark .mid{stroke:#d4dbe6;stroke-dasharray:2 3}
.spark polyline{fill:none;stroke-width:1.5;stroke-linejoin:round}.spark text{font-size:11px;fill:#888}
.cpu{stroke:#1f63c6;fill:#1f63c6}.mem{stroke:#e07000;fill:#e07000}.use{stroke:#8a2be2;fill:#8a2be2}
.key{display:inline-block;width:10px;height:3px;margin:0 .2em 0 .4em;vertical-align:middle}
.key.cpu{background:#1f63c6}.key.mem{background:#e07000}.key.use{background:#8a2be2}
"""


def esc(value) -> str:
    """Outside text for the page: controls made visible, then HTML-escaped (quotes too)."""
    return html.escape(safe("" if value is None else value), quote=True)


def row(*cells: str, cls: str = "") -> str:
    attributes = f' class="{cls}"' if cls else ""
    return f"<tr{attributes}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def table(headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table></div>"


def level(pct: float) -> str:
    return "l2" if pct >= 90 else "l1" if pct >= 70 else "l0"


def meter(pct: float | None, label: str) -> str:
    """A small bar for a percentage, then its label."""
    if pct is None:
        return f'<span class="dim">{esc(label or "?")}</span>'
    width = min(100.0, max(0.0, pct))
    return f'<span class="bar"><span class="{level(pct)}" style="width:{width:.0f}%"></span></span>{esc(label)}'


def key(cls: str, label: str) -> str:
    return f'<span class="key {cls}"></span>{label}'


# -- graphs ------------------------------------------------------------------------------------
def segments(points: list[tuple[float, float | None]], start: float, end: float) -> list[list[tuple[int, float]]]:
    """The graph's line as (x, y) in its box: one point per pixel column (the mean of the
    samples that fall in it), broken where no sample came for GAP_S."""
    columns: dict[int, list[float]] = {}
    for at, value in points:
        if value is not None and start <= at <= end:
            columns.setdefault(min(SPARK_W - 1, int((at - start) / (end - start) * SPARK_W)), []).append(value)
    gap = GAP_S / (end - start) * SPARK_W
    lines: list[list[tuple[int, float]]] = []
    previous = None
    for x in sorted(columns):
        value = min(100.0, max(0.0, sum(columns[x]) / len(columns[x])))
        if previous is None or x - previous > gap:
            lines.append([])
        lines[-1].append((x, 2 + (SPARK_H - 4) * (1 - value / 100)))
        previous = x
    return lines


def sparkline(kind: str, series: list[tuple[str, str, list]], start: float, end: float) -> str:
    """An inline SVG of the last 24 hours, 0-100 % high, one line per (class, name, points)."""
    parts = [f'<svg class="spark {kind}" width="{SPARK_W}" height="{SPARK_H}" viewBox="0 0 {SPARK_W} {SPARK_H}" role="img">',
             f'<rect class="bg" width="{SPARK_W}" height="{SPARK_H}"/>',
             f'<line class="mid" x1="0" y1="{SPARK_H / 2:g}" x2="{SPARK_W}" y2="{SPARK_H / 2:g}"/>']
    summary, drawn = [], False
    for cls, name, points in series:
        values = [v for at, v in points if v is not None and start <= at <= end]
        if values:
            summary.append(f"{name} mean {sum(values) / len(values):.0f}%, peak {max(values):.0f}%")
        for line in segments(points, start, end):
            drawn = True
            if len(line) == 1:
                parts.append(f'<circle class="{cls}" cx="{line[0][0]}" cy="{line[0][1]:.1f}" r="1.5"/>')
            else:
                parts.append(f'<polyline class="{cls}" points="{" ".join(f"{x},{y:.1f}" for x, y in line)}"/>')
    if not drawn:
        parts.append(f'<text x="6" y="{SPARK_H / 2 + 4:g}">no samples yet</text>')
    parts.insert(1, f"<title>last 24 h: {esc('; '.join(summary) or 'no samples')}</title>")
    return "".join(parts) + "</svg>"


def figures(history: History, node: str, gpu: str | None) -> tuple[list, list]:
    samples = history.get((node, gpu), [])
    return [(at, compute) for at, compute, _m in samples], [(at, memory) for at, _c, memory in samples]


# -- the nodes table: each node, then a row for each of its GPUs -----------------------------------
def free_gpus(node: dict) -> str:
    if not node["reachable"]:
        return '<span class="dim">?</span>'
    gpus = node["gpus"] or []
    if not gpus:
        return '<span class="dim">no GPUs</span>'
    free = [f"#{esc(g['index'])}" for g in gpus if not g.get("assigned_to")]
    return f'<span class="free">{" ".join(free)}</span>' if free else '<span class="dim">none</span>'


def node_rows(node: dict, history: History, start: float, end: float) -> list[str]:
    cpu, memory = figures(history, node["name"], None)
    graph = sparkline("node", [("cpu", "CPU", cpu), ("mem", "memory", memory)], start, end)
    name = f"<strong>{esc(node['name'])}</strong>"
    if not node["reachable"]:
        return [row(name, f'<span class="bad long">{esc(node["error"] or "unreachable")}</span>', "", "", "", free_gpus(node), graph)]
    problems = node_problems_of(node)
    status = "<br>".join(f'<span class="warn long">{esc(p)}</span>' for p in problems) or '<span class="ok">ok</span>'
    cpu_now, mem = node["cpu_percent"], node["memory"] or {}
    rows = [row(name, status,
                meter(cpu_now, f"{cpu_now:.0f}% of {node['cpus']}" if cpu_now is not None else "?"),
                meter(percent(mem.get("used"), mem.get("total")), f"{human_size(mem.get('used'))}/{human_size(mem.get('total'))}"),
                "", free_gpus(node), graph)]
    for gpu in node["gpus"] or []:
        use, gpu_memory = figures(history, node["name"], gpu["uuid"])
        util = gpu.get("utilization")
        owner = esc(gpu.get("assigned_to") or "") or '<span class="free">free</span>'
        strangers = " ".join(f"[{esc(u)}]" for u in gpu_strangers(gpu))
        rows.append(row(
            f"GPU #{esc(gpu['index'])} <span class=\"dim\">{esc(gpu.get('name') or '')}</span>",
            owner + (f' <span class="bad" title="holds a process on it">{strangers}</span>' if strangers else ""),
            meter(util, f"{util}%" if util is not None else "?%"),
            meter(percent(gpu.get("memory_used"), gpu.get("memory_total")),
                  f"{human_size(gpu.get('memory_used'))}/{human_size(gpu.get('memory_total'))}"),
            esc(f"{gpu['temperature']}°C") if gpu.get("temperature") is not None else "",
            "",
            sparkline("gpu", [("use", "use", use), ("mem", "memory", gpu_memory)], start, end),
            cls="gpu"))
    return rows


def nodes_section(document: dict, history: History, start: float, end: float) -> str:
    headers = ["node / GPU", "status / desktop", "CPU / use", "memory", "temp", "free GPUs",
               f"last 24 h<br>{key('cpu', 'CPU')}{key('use', 'GPU use')}{key('mem', 'memory')}"]
    rows = [r for node in document["nodes"] for r in node_rows(node, history, start, end)]
    return "<h2>Nodes</h2>\n" + table(headers, rows)


# -- the desktops table ----------------------------------------------------------------------------
def desktop_row(d: dict) -> str:
    gpus = ", ".join(esc(f"#{g['index']}" + (f" {g['utilization']}%" if g.get("utilization") is not None else ""))
                     for g in d["gpus"]) or '<span class="dim">none</span>'
    state = desktop_state(d).plain  # made safe already; anything beside the recorded state is a warning
    cls = "ok" if state == "running" else "" if state == d["state"] else "warn"
    sync = d.get("sync") or {}
    note = f'<span class="bad long">sync: {esc(sync["last_error"])}</span>' if sync.get("last_error") else ""
    idle = human_duration(d["idle_s"]) if d.get("idle_s") is not None else "-"
    state_lines = "<br>".join(html.escape(line, quote=True) for line in state.splitlines())
    return row(f"<strong>{esc(d['user'])}</strong>", esc(d["node"]), gpus,
               f'<span class="{cls}">{state_lines}</span>',
               f'<span class="num">{idle}</span>', note)


def desktops_section(document: dict) -> str:
    rows = [desktop_row(d) for d in sorted(document["desktops"], key=lambda d: d["user"])]
    if not rows:
        return '<h2>Desktops</h2>\n<p class="dim">no desktops</p>'
    return "<h2>Desktops</h2>\n" + table(["desktop", "node", "GPUs", "state", "idle", "note"], rows)


# -- the page --------------------------------------------------------------------------------------
def summary(document: dict) -> str:
    nodes = document["nodes"]
    down = sum(1 for n in nodes if not n["reachable"])
    gpus = [g for n in nodes for g in n["gpus"] or []]
    free = sum(1 for g in gpus if not g.get("assigned_to"))
    running = sum(1 for d in document["desktops"] if d["container_state"] == "running")
    parts = [f"{len(nodes)} nodes" + (f' (<span class="bad">{down} not answering</span>)' if down else ""),
             f'{len(gpus)} GPUs, <span class="free">{free} free</span>',
             f"{len(document['desktops'])} desktops, {running} running"]
    return "<p>" + " · ".join(parts) + "</p>"


def render_page(document: dict, history: History, refresh_s: int = 300) -> str:
    """The whole page. history: the usage samples (monitor.usage_history); the graphs show the
    24 hours before the document was generated."""
    end = document_time(document)
    start = end - DAY_S
    when = dt.datetime.fromtimestamp(end, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        "<title>labvm status</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>labvm status</h1>",
        f'<p class="dim">generated <time datetime="{esc(document["generated"])}">{when}</time></p>',
        summary(document),
        nodes_section(document, history, start, end),
        desktops_section(document),
        "</body></html>",
        "",
    ])
