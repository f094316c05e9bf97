"""Commands on one desktop: create, resize, start, stop, restart, rm, passwd, exec, shell,
files; and the audit log."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from . import audit
from .admin import AdminHome
from .cli_kit import (
    _audit,
    _confirm,
    _confirm_purge,
    _emit_json,
    _read_password,
    _terminal_safe,
    _when,
    audited,
    complete_nodes,
    complete_users,
    complete_versions,
    dry_run_option,
    json_option,
    out,
    password_stdin_option,
    say,
    show_plan,
)
from .errors import Aborted, BadInput
from .text import cell, safe


# -- desktops ----------------------------------------------------------------
def limit_options(f):
    options = [
        click.option("--cpus", type=float, help="CPU count (default from <vm_defaults>)."),
        click.option("--cpuset", help="Pin to these CPUs instead, e.g. 0-3 or 0,2."),
        click.option("--memory", help="Memory limit, e.g. 16g; swap is set equal."),
        click.option("--shm", help="Size of /dev/shm, e.g. 4g."),
        click.option("--pids", type=int, help="Most processes."),
        click.option("--io-weight", type=int, help="Block IO weight, 10..1000."),
        click.option("--io-read-bps", help="Read cap on the data disk, e.g. 200m."),
        click.option("--io-write-bps", help="Write cap on the data disk, e.g. 100m."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _desktops(home: AdminHome, quiet: bool = False):
    from .desktops import Desktops

    return Desktops(home, say=(lambda _m: None) if quiet else say)


def _show_connect(home: AdminHome, desktop) -> None:
    cfg = home.config
    out.print(Text.assemble(safe(f"{desktop.user}'s desktop runs on {desktop.node}: in a browser at "),
                            (safe(desktop.https_url(cfg) or "-"), "bold")))
    gpus = ", ".join(f"{g['index']} ({g['uuid']})" for g in desktop.gpus) or "none"
    say(f"  GPUs: {gpus}")
    say(f"  log in as {desktop.user} with {desktop.user}'s labvm password; the browser must trust labvm's CA "
        "(`labvm ca export`, once)")
    if cfg.vnc.listen == "published":
        say(f"  or with a VNC client, e.g.: vncviewer {desktop.vnc_address(cfg)}  "
            "(VNC checks only the password's first 8 characters)")
    elif cfg.vnc.listen == "loopback":
        say(f"  or with a VNC client through SSH to the node: its 127.0.0.1:{desktop.vnc_port}")


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--node", default="auto", show_default=True, shell_complete=complete_nodes,
              help="Node to run on; auto picks one with the free GPUs and memory asked for.")
@click.option("--gpus", metavar="N|I,J", help="N free GPUs, or GPU indexes like 0,2 (1, for GPU 1 alone); 0 for none.")
@click.option("--adopt", is_flag=True,
              help="Continue from files an earlier member of the same name left on MooseFS (refused without it).")
@click.option("--disk", metavar="SIZE",
              help="Disk size, e.g. 100g: all the desktop may hold, wherever in its root (default from <vm_defaults>).")
@click.option("--image", "image_id", metavar="ID",
              help="The desktop image (id or its first 4+ hex digits; default: the newest, see `labvm image list`).")
@limit_options
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def create(home: AdminHome, user, node, gpus, adopt, dry_run, as_json, disk, image_id, **limits):
    """Create and start USER's desktop.

    A desktop continues from the newest version of USER's files on MooseFS,
    kept when an earlier desktop was removed. Files there that belong to an
    earlier member who had the same name are refused unless --adopt.

    \b
    labvm create alice                 defaults from the cluster file, node picked for you
    labvm create alice --gpus 2        two free GPUs
    labvm create alice --node n2 --gpus 0,3 --memory 32g --disk 200g
    labvm create alice --dry-run       where it would go, and what it would do

    The desktop runs over the newest image on this admin host (or --image),
    sent to its node first if the node lacks it. Any failure undoes what the create did: no half-made desktop stays.
    """
    from .desktops import LimitOverrides

    overrides = LimitOverrides(**limits, disk=disk)
    made = _desktops(home, quiet=as_json or dry_run).create(user, node=node, gpus=gpus, overrides=overrides, adopt=adopt,
                                                           dry_run=dry_run, image=image_id)
    if dry_run:
        show_plan(made, as_json)
        return
    desktop = made
    if as_json:
        _emit_json(desktop.as_dict(home.config))
    else:
        _show_connect(home, desktop)


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.argument("size")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@json_option
@click.pass_obj
@audited("user")
def resize(home: AdminHome, user, size, dry_run, as_json):
    """Grow USER's disk to SIZE (e.g. 200g).

    The disk holds everything the desktop writes anywhere in its root. A
    running desktop gets the room at once, with no restart; a stopped one
    at its next start. The member's quota on MooseFS grows with it. A disk
    never shrinks.

    \b
    labvm resize alice 200g
    labvm resize alice 200g --dry-run --json
    """
    from .view import human_size

    plan = _desktops(home, quiet=as_json).resize(user, size, dry_run=dry_run)
    if as_json:
        _emit_json({**plan, "dry_run": dry_run})
        return
    what = f"{user}'s disk: {human_size(plan['from'])} -> {human_size(plan['to'])}"
    if not plan["changes"]:
        say(f"{user}'s disk is already {human_size(plan['to'])}")
    elif dry_run:
        say(f"would grow {what}, and the MooseFS quota to {human_size(plan['quota'])} (dry run: nothing changed)")
    else:
        later = " (at its next start)" if plan.get("pending") else ""
        say(f"grew {what}{later}; MooseFS quota {human_size(plan['quota'])}")
        if plan.get("restart_needed"):
            say(f"  this node's kernel does not grow a mounted disk: the desktop gets the room at its next start "
                f"(`labvm restart {user}`)")


@click.command()
@click.argument("user", shell_complete=complete_users)
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def start(home: AdminHome, user, dry_run, as_json):
    """Start USER's desktop (mounts its layers, starts its container).

    If a step fails, what the start did is undone and the desktop stays
    stopped. --dry-run checks the node, its image and MooseFS, and prints the
    steps.
    """
    started = _desktops(home, quiet=as_json).start(user, dry_run=dry_run)
    if dry_run:
        show_plan(started, as_json)
    elif as_json:
        _emit_json(started.as_dict(home.config))
    else:
        _show_connect(home, started)


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--timeout", default=20, show_default=True, help="Seconds to wait for a clean shutdown.")
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def stop(home: AdminHome, user, timeout, dry_run, as_json):
    """Stop USER's desktop. Its files stay; `labvm start` brings it back.

    Once the container is stopped, a stop only goes forward: if a later step
    fails, `labvm ops resume ID` finishes it.
    """
    stopped = _desktops(home, quiet=as_json).stop(user, timeout=timeout, dry_run=dry_run)
    if dry_run:
        show_plan(stopped, as_json)
    elif as_json:
        _emit_json(stopped.as_dict(home.config))
    else:
        say(f"stopped {user}'s desktop")


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.pass_obj
@audited("user")
def restart(home: AdminHome, user):
    """Stop and start USER's desktop."""
    d = _desktops(home)
    d.stop(user)
    _show_connect(home, d.start(user))


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--purge", is_flag=True, help="Also delete every version of USER's files on MooseFS. Cannot be undone.")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation (with --purge, you must still type USER).")
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def rm(home: AdminHome, user, purge, yes, dry_run, as_json):
    """Remove USER's desktop: its container and local layers. The versions on MooseFS stay unless --purge.

    Without --purge, the desktop's last changes are kept as a new version, and
    a later `labvm create USER` continues from it.
    """
    if dry_run:
        show_plan(_desktops(home, quiet=True).remove(user, purge=purge, dry_run=True), as_json)
        return
    if purge:
        _confirm_purge(user)
    elif not _confirm(yes)(f"Remove {user}'s desktop (container and local layers)?"):
        raise Aborted()
    _desktops(home, quiet=as_json).remove(user, purge=purge)
    if as_json:
        _emit_json({"user": user, "removed": True, "purged": purge})
        return
    say(f"removed {user}'s desktop" + (" and all its versions" if purge else "; its versions on MooseFS are kept"))


@click.command()
@click.argument("user", shell_complete=complete_users)
@password_stdin_option
@click.pass_obj
@audited("user")
def passwd(home: AdminHome, user, password_stdin):
    """Change USER's password: labvm's record, and the login and VNC passwords inside a running desktop."""
    with home.state() as db:
        db.get_user(user)
    _desktops(home).passwd(user, _read_password(password_stdin, "New password"))
    say(f"password of {user} changed")


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("user", shell_complete=complete_users)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@audited("user")
def exec_(home: AdminHome, user, command):
    """Run COMMAND as root inside USER's desktop and print its output (escaped on a terminal,
    as it is into a pipe or file).

    \b
    labvm exec alice -- nvidia-smi
    labvm exec alice -- df -h /
    """
    from .access import run_inside

    result = run_inside(home, user, list(command))
    click.echo(_terminal_safe(result.stdout, sys.stdout), nl=False)
    click.echo(_terminal_safe(result.stderr, sys.stderr), nl=False, err=True)
    sys.exit(result.exited)


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--as-user", is_flag=True, help="Log in as USER rather than root.")
@click.pass_obj
def shell(home: AdminHome, user, as_user):
    """Open an interactive shell inside USER's desktop (through ssh to its node)."""
    import os

    from .access import shell_argv

    argv = shell_argv(home, user, as_user)
    _audit(home, "labvm shell", user, "opened")
    os.execvp("ssh", argv)


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.argument("path", default="/")
@click.option("--get", "get_to", metavar="DEST", help="Copy the file at PATH out of the desktop to DEST: a new or regular file, or a directory to copy into.")
@click.option("--put", "put_from", metavar="SRC", help="Copy SRC into the desktop at PATH.")
@click.option("--mode", help="With --put: octal mode for the file, e.g. 0644.")
@click.option("--force", is_flag=True, help="With --get: overwrite DEST.")
@click.option("--version", "version", type=int, metavar="N", shell_complete=complete_versions,
              help="With --get: copy the file out of version N (see `labvm versions USER`) instead of the live desktop.")
@json_option
@click.pass_obj
@audited("user")
def files(home: AdminHome, user, path, get_to, put_from, mode, force, version, as_json):
    """Show where USER's desktop root lives on its node, or copy a file out (--get) or in (--put).

    \b
    labvm files alice                          the node and host path of alice's /
    labvm files alice /home/alice/run.log --get ./run.log
    labvm files alice /etc/pip.conf --put ./pip.conf --mode 0644
    labvm files alice /home/alice/notes.txt --version 3 --get ./notes.v3.txt

    Symlinks inside the desktop are never followed, so a link a user planted
    cannot reach the node's own files.
    """
    from . import files as desktop_files

    if get_to and put_from:
        raise BadInput("give --get or --put, not both")
    if version is not None and not get_to:
        raise BadInput("--version goes with --get: labvm files USER PATH --version N --get DEST")
    if get_to:
        size = desktop_files.get_file(home, user, path, Path(get_to), force=force, version=version)
        where = f"version {version} of {user}'s files" if version is not None else f"{user}'s desktop"
        say(f"copied {path} from {where} to {get_to} ({size} bytes)")
        return
    if put_from:
        file_mode = None
        if mode is not None:
            try:
                file_mode = int(mode, 8)
            except ValueError:
                raise BadInput(f"--mode {mode!r}: give an octal mode such as 0644") from None
        changed = desktop_files.put_file(home, user, Path(put_from), path, mode=file_mode)
        say(f"copied {put_from} into {user}'s desktop at {path}" if changed else f"{path} already has that content")
        return
    info = desktop_files.locate(home, user, path)
    if as_json:
        _emit_json(info)
        return
    say(f"{user}'s {path} is {info['node']}:{info['host_path']}" + ("" if info["mounted"] else " (desktop not mounted: start it first)"))
    if info.get("type"):
        say(f"  {info['type']}" + (f", {info['size']} bytes" if info.get("size") is not None else "") + (f" -> {info['target']}" if info.get("target") else ""))


@click.command("log")
@click.option("--target", "-t", shell_complete=complete_users, help="Only lines about this user, node or desktop.")
@click.option("-n", "last", type=click.IntRange(1), help="Only the last N lines.")
@json_option
@click.pass_obj
def log_(home: AdminHome, target, last, as_json):
    """Show the audit log: who ran which changing command, on what, and how it ended."""
    entries = audit.read(home.home, target=target, last=last)
    if as_json:
        _emit_json([e.as_dict() for e in entries])
        return
    table = Table("time", "who", "command", "target", "result", title="labvm log")
    for e in entries:
        table.add_row(cell(_when(e.time)), cell(e.who), cell(e.command), cell(e.target), cell(e.result, "" if e.result == "ok" else "red"))
    out.print(table)


COMMANDS = (create, resize, start, stop, restart, rm, passwd, exec_, shell, files, log_,)
