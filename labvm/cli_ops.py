"""Commands that move desktops between nodes, and the operations journal."""

from __future__ import annotations

from contextlib import contextmanager

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .admin import AdminHome
from .cli_kit import (
    _confirm,
    _emit_json,
    _home_from_ctx,
    _when,
    audited,
    complete_nodes,
    complete_users,
    dry_run_option,
    json_option,
    out,
    say,
    show_plan,
)
from .errors import LabvmError, PartlyDone
from .text import cell, safe


def complete_ops(ctx, param, incomplete):
    from .ops import list_ops

    try:
        views = list_ops(_home_from_ctx(ctx), limit=50)
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [CompletionItem(str(v.id), help=safe(f"{v.kind} {v.user or ''} ({v.state})")) for v in views if str(v.id).startswith(incomplete)]


_say = say


@contextmanager
def step_display(quiet: bool = False):
    """A live line with a spinner showing the step that runs now (on a terminal); finished steps
    are printed above it. Without a terminal, every step is one printed line."""
    if quiet:
        yield lambda _m: None
        return
    if not out.is_terminal:
        yield _say
        return
    with out.status("starting") as status:
        def show(message: str) -> None:
            if " done in " in message or message.startswith("  "):
                say(message)
            else:
                status.update(Text(safe(message)))

        yield show


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.argument("node", shell_complete=complete_nodes)
@click.option("--gpus", metavar="N|I,J", help="GPUs on the target: a count or indexes (default: as many as now).")
@dry_run_option
@click.option("--from-lost", is_flag=True, help="The desktop's node is dead: start it on NODE from its state on MooseFS.")
@click.option("--yes", "-y", is_flag=True, help="With --from-lost: don't ask for confirmation.")
@click.option("--no-precopy", is_flag=True, hidden=True, help="Skip the pre-copy (to measure what it saves).")
@json_option
@click.pass_obj
@audited("user")
def switch(home: AdminHome, user, node, gpus, dry_run, from_lost, yes, no_precopy, as_json):
    """Move USER's desktop to NODE.

    \b
    labvm switch alice n2              move it, GPU count as now
    labvm switch alice n2 --dry-run    check, and show the plan
    labvm switch alice n2 --from-lost  its node died: start it from MooseFS

    The desktop is synced while it runs, then stopped, flushed, merged into a
    new version and started on NODE with the same password, home and limits.
    The downtime is printed at the end. Until the new node answers, any failure
    brings the desktop back where it was; an interrupted switch is finished
    with `labvm ops resume ID`.

    --dry-run runs every check the switch runs before its first change (the
    node, the lock, free GPUs, memory and ports, the version to publish) and
    prints each step with the values it would use; with --json, as one JSON
    object. It exits as the switch would have: 10 if the target has no room.
    """
    from .switch import Switcher

    if dry_run:
        show_plan(Switcher(home).plan(user, node, gpus, from_lost, precopy=not no_precopy), as_json)
        return
    with step_display(quiet=as_json) as show:
        switcher = Switcher(home, say=_say if not as_json else (lambda _m: None), progress=show)
        result = switcher.switch(user, node, gpus, from_lost, confirm=_confirm(yes), precopy=not no_precopy)
    if as_json:
        _emit_json(result.as_dict())
        return
    if result.vnc:
        out.print(Text.assemble(safe(f"{user}'s desktop runs on {result.target}: VNC at "), (safe(result.vnc), "bold")))
    if result.downtime_s is not None:
        say(f"downtime: {result.downtime_s:.1f} s (desktop stopped to VNC answering)")


@click.group()
def ops():
    """The journal of multi-step operations: list, show, resume, abort.

    Every multi-step command (create, start, stop, rm, resize, backup, restore,
    solidify, switch) is journaled step by step. One whose process died stays
    `interrupted` and keeps its desktop locked until it is resumed or aborted.
    """


@ops.command("list")
@click.option("--user", shell_complete=complete_users, help="Only this user's operations.")
@click.option("--unfinished", is_flag=True, help="Only interrupted or failed ones.")
@click.option("-n", "limit", default=30, show_default=True, type=click.IntRange(1))
@json_option
@click.pass_obj
def ops_list(home: AdminHome, user, unfinished, limit, as_json):
    """Recent operations, newest first. `interrupted` means its process died: resume or abort it."""
    from .ops import list_ops

    views = list_ops(home, user=user, limit=limit, unfinished=unfinished)
    if as_json:
        _emit_json([v.as_dict() for v in views])
        return
    table = Table("id", "kind", "user", "state", "started", "last step", title="labvm ops")
    table.add_column("error", overflow="fold")
    colors = {"done": "green", "interrupted": "yellow", "failed": "red", "running": "cyan"}
    for v in views:
        color = colors.get(v.state)
        table.add_row(str(v.id), cell(v.kind), cell(v.user), cell(v.state, color or ""),
                      cell(_when(v.created_at)), cell(v.last_step), cell(v.error))
    _print_whole(table)


def _print_whole(table: Table) -> None:
    """A table with text in full: wrapped to a terminal's width, each row on one line into a
    pipe or file (as wide as its longest row), so a script or grep sees every word."""
    if out.is_terminal:
        out.print(table)
        return
    widest = Measurement.get(out, out.options.update_width(1 << 20), table).maximum
    Console(file=out.file, highlight=False, soft_wrap=True, width=max(out.width, widest)).print(table)


@ops.command("show")
@click.argument("op_id", type=int, shell_complete=complete_ops)
@json_option
@click.pass_obj
def ops_show(home: AdminHome, op_id, as_json):
    """One operation: its parameters and each step with its times."""
    from .ops import show_op

    v = show_op(home, op_id)
    if as_json:
        _emit_json(v.as_dict())
        return
    say(f"operation {v.id}: {v.kind} {v.user or ''} -- {v.state}")
    if v.error:
        say(f"  error: {v.error}")
    table = Table("#", "step", "state", "took")
    table.add_column("detail", overflow="fold")
    for s in v.steps:
        took = f"{s['finished_at'] - s['started_at']:.1f} s" if s["finished_at"] and s["started_at"] else ""
        table.add_row(str(s["seq"]), cell(s["name"]), cell(s["state"]), took, cell(s["detail"]))
    _print_whole(table)


@ops.command("resume")
@click.argument("op_id", type=int, shell_complete=complete_ops)
@click.pass_obj
@audited("op_id")
def ops_resume(home: AdminHome, op_id):
    """Finish an interrupted or failed operation from where it stopped.

    Its steps are built again from what the journal recorded, and those that
    did not finish run. One that was rolled back, or whose rollback began,
    is not resumed: `labvm ops abort ID` finishes the rollback.
    """
    from .ops import resume

    resume(home, op_id, say=_say)
    say(f"operation {op_id} resumed and finished")


@ops.command("abort")
@click.argument("op_id", type=int, shell_complete=complete_ops)
@click.pass_obj
@audited("op_id")
def ops_abort(home: AdminHome, op_id):
    """Give up an interrupted or failed operation, undoing what it did.

    Every step it began is undone, newest first, and the desktop is as it was
    before the operation. One past its commit point (a stop's stopped
    container, a backup's published version, a switch's commit) can only go
    forward: `labvm ops resume ID`.
    """
    from .ops import abort

    say(abort(home, op_id, say=_say))


@click.command("cordon")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--reason", help="Shown to whoever tries to place a desktop there.")
@click.pass_obj
@audited("name")
def node_cordon(home: AdminHome, name, reason):
    """Keep new desktops off node NAME (its running desktops stay)."""
    from .switch import cordon

    say(f"cordoned {name}" if cordon(home, name, reason) else f"{name} was already cordoned")


@click.command("uncordon")
@click.argument("name", shell_complete=complete_nodes)
@click.pass_obj
@audited("name")
def node_uncordon(home: AdminHome, name):
    """Let new desktops onto node NAME again."""
    from .switch import uncordon

    say(f"uncordoned {name}" if uncordon(home, name) else f"{name} was not cordoned")


@click.command("drain")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--to", "to", shell_complete=complete_nodes, help="Move every desktop to this node (default: placed by free GPUs and memory).")
@click.option("--parallel", default=2, show_default=True, type=click.IntRange(1, 16), help="Moves at a time.")
@dry_run_option
@json_option
@click.pass_obj
@audited("name")
def node_drain(home: AdminHome, name, to, parallel, dry_run, as_json):
    """Move every desktop off node NAME for maintenance, and cordon it.

    One line per desktop; exits 11 if any move failed (that desktop stays on NAME).
    --dry-run cordons nothing and moves nothing: it prints each move's switch
    plan (with --json, a list of them), and exits 11 if any would fail.
    """
    from .switch import MoveResult, drain

    if dry_run:
        plans = drain(home, name, to, parallel, say=(lambda _m: None) if as_json else _say, dry_run=True)
        if as_json:
            _emit_json([{"operation": "switch", "user": p.user, "ok": False, "detail": p.line} if isinstance(p, MoveResult)
                        else p.as_dict() for p in plans])
        else:
            for p in plans:
                if isinstance(p, MoveResult):
                    say(p.line)
                    continue
                try:
                    show_plan(p, as_json=False)
                except LabvmError:
                    pass  # shown in the plan; counted below
        failed = [p.user for p in plans if not p.ok]
        if failed:
            raise PartlyDone(f"{len(failed)} of {len(plans)} moves would fail: {', '.join(failed)}")
        return
    results = drain(home, name, to, parallel, say=_say)
    for r in results:
        say(r.line)
    failed = [r.user for r in results if not r.ok]
    if failed:
        raise PartlyDone(f"{len(failed)} of {len(results)} moves failed: {', '.join(failed)}")


COMMANDS = (switch, ops)
NODE_COMMANDS = (node_cordon, node_uncordon, node_drain)
