"""Commands that watch the cluster: status, top and idle."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console

from .admin import AdminHome
from .cli_kit import _audit, _emit_json, complete_nodes, complete_users, json_option, out, say, warn
from .errors import BadInput, LabvmError, PartlyDone
from .fsutil import atomic_write
from .monitor import (
    IdleRule,
    NodeSessions,
    collect_status,
    document_time,
    find_idle,
    record_usage,
    require_reachable,
    stop_idle,
    unreachable_nodes,
    usage_history,
)
from .status_page import DAY_S, render_page
from .view import SORT_KEYS, human_duration, status_lines, status_view, top_view

node_filter_option = click.option("--node", "node_filter", shell_complete=complete_nodes, help="Only this node and its desktops.")


def _timeout(home: AdminHome, given: float | None) -> float:
    return given if given is not None else home.config.monitoring.status_timeout


@click.command()
@node_filter_option
@click.option("--user", "user_filter", shell_complete=complete_users, help="Only this user's desktop (and its node).")
@click.option("--timeout", type=click.FloatRange(0.5, 600), metavar="SECONDS",
              help="How long to wait for each node (default: <monitoring><status_timeout>, 5).")
@json_option
@click.option("--html", "html_to", metavar="FILE",
              help="Write the web page for members to FILE instead (- for standard output); see below.")
@click.pass_obj
def status(home: AdminHome, node_filter, user_filter, timeout, as_json, html_to):
    """Every node's CPU, memory, disk, MooseFS and GPUs, then every desktop's.

    All nodes are asked at once; one that does not answer in time is a red
    row saying why, and the command exits 7 after printing everything else.
    A desktop row shows its state, CPU (of one CPU), memory of its limit,
    GPUs, IO, network, uptime, sync lag, latest version on MooseFS, how long
    it has been idle, and its VNC address. A terminal too narrow for the wide
    tables gets compact ones; piped, it prints one line per node, then one
    per desktop, each under a header line, columns separated by spaces.

    --json prints one document: {"schema": "labvm.status/1", "generated",
    "nodes": [...], "desktops": [...]}, described field by field in
    labvm/schema/status.schema.json.

    --html FILE writes one self-contained web page instead, for the lab's
    members: the nodes with each GPU's use and desktop, the free GPUs, the
    desktops, and graphs of the last 24 hours of each node's CPU and memory
    and each GPU's use. It needs nothing else (no script, no file or site it
    links to) and holds no password or VNC secret: it is written mode 0644,
    replacing the old page in one step, for a web server's directory. `labvm
    cron install --status-html FILE` refreshes it every 5 minutes. Nothing
    else is printed, but a node that does not answer still exits 7. --html
    and --json are refused together.

    Each run records a sample of every node and GPU that answered, kept 48
    hours, for those graphs. A state database too busy to take it costs that
    sample (with a warning), never the status.
    """
    if as_json and html_to:
        raise BadInput("--html and --json both choose what status writes; give one of them")
    with NodeSessions(home, _timeout(home, timeout)) as sessions:
        document = collect_status(home, sessions, node_filter, user_filter)
    problem = record_usage(home, document)
    if problem:
        warn(f"this run's usage sample was not recorded ({problem}); the status page's graphs will miss it")
    if html_to:
        history = usage_history(home, document_time(document) - DAY_S)
        _write_page(render_page(document, history), html_to)
    elif as_json:
        _emit_json(document)
    elif out.is_terminal:
        out.print(status_view(document, width=out.width))
    else:
        for line in status_lines(document):
            click.echo(line)
    require_reachable(document)


def _write_page(page: str, target: str) -> None:
    """The page to standard output (-), or to a temp file renamed over `target` (0644)."""
    if target == "-":
        click.echo(page, nl=False)
        return
    try:
        atomic_write(Path(target), page.encode(), 0o644)
    except OSError as exc:
        raise BadInput(f"cannot write the status page to {target}: {exc.strerror or exc}") from None


@click.command()
@click.option("--sort", type=click.Choice(SORT_KEYS), default="cpu", show_default=True,
              help="Order of the desktops: busiest CPU, memory or GPU memory first, or by user.")
@click.option("--interval", type=click.FloatRange(0.5, 3600), default=2.0, show_default=True, metavar="SECONDS",
              help="Time between refreshes.")
@node_filter_option
@click.pass_obj
def top(home: AdminHome, sort, interval, node_filter):
    """A live view of `labvm status`, refreshed until Ctrl-C.

    Each node keeps one SSH connection for the whole session; a node that
    stops answering is shown in red and reconnected on the next refresh.
    The layout follows the terminal's size: in 80x24, the nodes with their
    GPUs summed up (e.g. 2/4 GPU 37%) and one line per desktop, as many as fit.
    """
    from rich.live import Live

    console = Console(highlight=False)
    try:
        with NodeSessions(home, home.config.monitoring.status_timeout) as sessions, \
                Live(console=console, auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                document = collect_status(home, sessions, node_filter)
                width, height = console.size
                live.update(top_view(document, sort, interval, width, height), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass


@click.command()
@click.option("--stop", "stop_them", is_flag=True,
              help="Stop every idle desktop, without asking (for cron). Its files are flushed to MooseFS first.")
@json_option
@click.pass_obj
def idle(home: AdminHome, stop_them, as_json):
    """Desktops unused for longer than <monitoring><idle_after> (default 168h).

    Unused: CPU under <monitoring><idle_cpu_percent> of one CPU, and no GPU
    busy or holding a process of it, in every sample taken since. Each
    `labvm status`, `top` and `idle` takes a sample; a desktop labvm has not
    watched for that long is never idle. Prints one line per idle desktop;
    with --stop, one line per desktop stopped or not, and exits 11 if any stop
    failed. --json prints [{"user", "node", "idle_s", "last_active",
    "stopped", "error"}].
    """
    cfg = home.config
    with NodeSessions(home, cfg.monitoring.status_timeout) as sessions:
        document = collect_status(home, sessions)
    for name in unreachable_nodes(document):
        warn(f"{name} did not answer; its desktops were not checked")
    found = find_idle(document, IdleRule.from_config(cfg.monitoring))
    rows = [_handle_idle(home, desktop, stop_them) for desktop in found]
    if as_json:
        _emit_json([row for row, _line in rows])
    else:
        for _row, line in rows:
            say(line)
        if not rows and not stop_them:
            say(f"no desktop has been idle for more than {human_duration(cfg.monitoring.idle_after)}")
    failed = [row["user"] for row, _line in rows if row["stopped"] is False]
    if failed:
        raise PartlyDone(f"could not stop {len(failed)} idle desktop(s): {', '.join(failed)}")


def _handle_idle(home: AdminHome, desktop, stop_them: bool) -> tuple[dict, str]:
    row = {"user": desktop.user, "node": desktop.node, "idle_s": desktop.idle_s, "last_active": desktop.last_active,
           "stopped": None, "error": None}
    where = f"{desktop.user} on {desktop.node}, idle {human_duration(desktop.idle_s)}"
    if not stop_them:
        return row, where
    try:
        stop_idle(home, desktop.user, say=lambda _m: None)
    except LabvmError as exc:
        _audit(home, "labvm idle --stop", desktop.user, f"failed: {exc}")
        return {**row, "stopped": False, "error": str(exc)}, f"failed to stop {where}: {exc}"
    _audit(home, "labvm idle --stop", desktop.user, "ok")
    return {**row, "stopped": True}, f"stopped {where}"


COMMANDS = (status, top, idle)
