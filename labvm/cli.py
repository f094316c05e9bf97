"""labvm: persistent GPU desktops for a deep-learning lab, run from one admin host over SSH.

This module only parses, confirms, renders and maps errors; the work is done
in modules a test can call without click.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
import traceback
from pathlib import Path

import click
from click.shell_completion import CompletionItem, get_completion_class
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, audit, images
from .admin import AdminHome
from .config import Node
from .errors import Aborted, AlreadyExists, BadInput, Busy, InsecureFile, LabvmError, NodeError, NotFound, StateError
from .nodes import add_node, check_nodes, node_problems, node_rows, rekey_node, remove_node
from .text import cell, safe

COMPLETE_VAR = "_LABVM_COMPLETE"

out = Console(highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """One line of output that may hold a desktop's, a node's or the audit log's text: shown
    escaped, never read as markup."""
    out.print(safe(message), markup=False)


def warn(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print("labvm: warning: " + safe(message), markup=False)


# -- completion ------------------------------------------------------------
def _home_from_ctx(ctx: click.Context) -> AdminHome:
    root = ctx.find_root()
    return AdminHome.locate(root.params.get("config"))


def complete_nodes(ctx, param, incomplete):
    try:
        names = _home_from_ctx(ctx).config.node_names()
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_users(ctx, param, incomplete):
    try:
        with _home_from_ctx(ctx).state() as db:
            names = db.user_names()
    except Exception:
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_versions(ctx, param, incomplete):
    """Versions of the USER already on the command line, read from MooseFS through its node."""
    user = ctx.params.get("user")
    if not user:
        return []
    try:
        from .storage import Storage

        _desktop, verdicts = Storage(_home_from_ctx(ctx)).versions(user)
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [CompletionItem(str(v.version.number), help="-" if v.version.created is None else _when(v.version.created)) for v in verdicts
            if str(v.version.number).startswith(incomplete)]


# -- shared helpers ----------------------------------------------------------
def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _read_password(password_stdin: bool, prompt: str = "Password") -> str:
    # A decoding error quotes the byte it stopped at and its position: never let it out.
    try:
        password = _password_text(password_stdin, prompt)
        password.encode("utf-8")
    except UnicodeError:
        raise BadInput("the password is not valid UTF-8 text; choose another") from None
    return password


def _password_text(password_stdin: bool, prompt: str) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise BadInput("--password-stdin given but standard input is empty")
        return line.rstrip("\n")
    if not sys.stdin.isatty():
        raise BadInput("no terminal to prompt for a password; pipe it in with --password-stdin")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


def _confirm(yes: bool, alternative: str | None = None):
    """Ask a yes/no question, or take --yes for the answer. Without a terminal, the refusal names
    --yes and the command's `alternative` way to confirm, if it has one."""
    def ask(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            options = f"--yes (or {alternative})" if alternative else "--yes"
            raise BadInput(f"{question} -- no terminal to ask; pass {options} to confirm")
        return click.confirm(safe(question), default=False)

    return ask


FINGERPRINT_HINT = "--fingerprint SHA256:..."

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")

def _audit(home: AdminHome | None, command: str, target: str | None, result: str) -> None:
    if home is None or not home.home.is_dir():
        return
    try:
        home.check_safe()
        audit.append(home.home, command, target, result)
    except InsecureFile:
        return  # nothing is written into an unsafe admin directory; the command has said why
    except (OSError, LabvmError) as exc:  # the command's own outcome matters more than its log line
        warn(f"audit log not written: {exc}")


def audited(target_param: str | None = None):
    """Append one audit line (who, what, which desktop or node, how it ended) when the command ends."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            ctx = click.get_current_context()
            home, target = ctx.find_object(AdminHome), kwargs.get(target_param) if target_param else None
            try:
                value = f(*args, **kwargs)
            except SystemExit as exc:
                _audit(home, ctx.command_path, target, "ok" if exc.code in (0, None) else f"exit {exc.code}")
                raise
            except (LabvmError, click.ClickException, click.exceptions.Abort, KeyboardInterrupt) as exc:
                _audit(home, ctx.command_path, target, f"failed: {exc or type(exc).__name__}")
                raise
            _audit(home, ctx.command_path, target, "ok")
            return value

        return wrapper

    return decorate

password_stdin_option = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of standard input (for scripts)."
)


# -- the command tree --------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c",
    "--config",
    metavar="FILE",
    envvar="LABVM_CONFIG",
    help="The cluster file (default: $LABVM_CONFIG, else /etc/labvm/bkConfxml.xml). "
    "The admin state lives in the same directory.",
)
@click.option("--debug", is_flag=True, help="Show a traceback when a command fails.")
@click.version_option(__version__, prog_name="labvm")
@click.pass_context
def cli(ctx, config, debug):
    """Persistent GPU desktops for a lab, run from this admin host over SSH.

    \b
    Getting started:
      labvm init                      write a starter cluster file, state database and keys
      labvm node add gpu1 gpu1.lab    pin a node's host key and add it
      labvm node check                probe every node in parallel
      labvm user add alice            add a lab member (password asked twice)
    """
    ctx.obj = AdminHome.locate(config)


@cli.command()
@click.pass_obj
@audited()
def init(home: AdminHome):
    """Create the cluster file, state database, secret key and SSH identity where missing.

    Safe to run again: existing files are kept (an existing cluster file is
    validated), and a state database from an older labvm is migrated.
    """
    created = home.init()
    for line in created:
        say(f"created {line}")
    if not created:
        say(f"nothing to do: {home.home} is set up")


# -- users -------------------------------------------------------------------
@cli.group()
def user():
    """Lab members: the accounts that own desktops."""


@user.command("add")
@click.argument("name")
@password_stdin_option
@click.pass_obj
@audited("name")
def user_add(home: AdminHome, name, password_stdin):
    """Add lab member NAME.

    NAME is a Linux login and part of the desktop's host name: a lowercase
    letter, then up to 30 lowercase letters, digits or '-', not ending in '-'
    (no '_' or '.'). Names of system accounts and groups (root, daemon,
    tcpdump, systemd-*, ...) and of the built desktop image's accounts are
    refused. The password is asked twice, or read from stdin with
    --password-stdin; it is never taken from the command line. It is the
    desktop's login password and its VNC password (VNC checks the first 8
    characters only).
    """
    home.check_member_name(name)
    with home.state() as db:
        if db.has_user(name):
            raise AlreadyExists(f"user {name!r} already exists")
        password = _read_password(password_stdin)
        created = db.add_user(name, password)
    say(f"added user {created.name} (uid {created.uid})")


@user.command("list")
@json_option
@click.pass_obj
def user_list(home: AdminHome, as_json):
    """List lab members."""
    with home.state() as db:
        users = db.list_users()
    if as_json:
        _emit_json([u.as_dict() for u in users])
        return
    table = Table("user", "uid", "created")
    for u in users:
        table.add_row(cell(u.name), str(u.uid), _when(u.created_at))
    out.print(table)


@user.command("passwd")
@click.argument("name", shell_complete=complete_users)
@password_stdin_option
@click.pass_obj
@audited("name")
def user_passwd(home: AdminHome, name, password_stdin):
    """Change NAME's password (login and VNC)."""
    with home.state() as db:
        db.get_user(name)
        db.set_password(name, _read_password(password_stdin, "New password"))
    say(f"password of {name} changed")


@user.command("rm")
@click.argument("name", shell_complete=complete_users)
@click.option("--purge", is_flag=True, help="Delete every version of NAME's files on MooseFS. Cannot be undone.")
@click.option("--keep-files", is_flag=True,
              help="Keep NAME's files on MooseFS with no member; a later NAME gets them only with `labvm create NAME --adopt`.")
@click.option("--dry-run", is_flag=True, help="Show what is on MooseFS and what would happen; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation (with --purge, you must still type NAME).")
@click.pass_obj
@audited("name")
def user_rm(home: AdminHome, name, purge, keep_files, dry_run, yes):
    """Remove lab member NAME (refused while NAME has a desktop: `labvm rm NAME` first).

    Say what happens to NAME's files on MooseFS, which outlive the desktop:
    --purge deletes them, --keep-files keeps them belonging to no member.

    \b
    labvm user rm alice --keep-files --dry-run    what is there, and what would happen
    labvm user rm alice --purge
    """
    from .members import Members

    members = Members(home, say=say)
    members.check(name, purge=purge, keep_files=keep_files)
    if not dry_run:
        if purge:
            _confirm_purge(name)
        elif not _confirm(yes)(f"Remove user {name}, keeping their files on MooseFS with no member?"):
            raise Aborted()
    plan = members.remove(name, purge=purge, keep_files=keep_files, dry_run=dry_run)
    for line in plan.lines:
        say(line)


# -- nodes -------------------------------------------------------------------
@cli.group()
def node():
    """GPU servers: add, list and check them."""


@node.command("add")
@click.argument("name")
@click.argument("host")
@click.option("--port", default=22, show_default=True, type=click.IntRange(1, 65535), help="SSH port.")
@click.option("--user", "ssh_user", default="root", show_default=True, help="SSH login (not root: needs passwordless sudo).")
@click.option("--data-dir", default="/var/lib/labvm/data", show_default=True, help="Node-local directory for desktops' local layers.")
@click.option("--fingerprint", metavar="SHA256:...", help="Expected host key fingerprint; pins without asking if it matches.")
@click.option("--yes", "-y", is_flag=True, help="Pin the host key shown without asking (trust on first use).")
@click.pass_obj
@audited("name")
def node_add(home: AdminHome, name, host, port, ssh_user, data_dir, fingerprint, yes):
    """Add node NAME reachable at HOST over SSH.

    labvm fetches the node's SSH host key, shows its fingerprint and pins it
    (compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the
    node). It then logs in, installs its helpers, and only then writes the node
    into the cluster file. A changed host key is refused from then on.
    """
    new = Node(name=name, host=host, port=port, user=ssh_user, data_dir=data_dir)
    decision = add_node(home.config, new, expected_fingerprint=fingerprint, confirm=_confirm(yes, FINGERPRINT_HINT))
    say(f"added node {name} ({ssh_user}@{host}:{port}), host key {decision.key_type} {decision.fingerprint} pinned")


@node.command("list")
@json_option
@click.pass_obj
def node_list(home: AdminHome, as_json):
    """List the nodes in the cluster file, with their pinned host keys."""
    rows = node_rows(home.config)
    if as_json:
        _emit_json(rows)
        return
    table = Table("node", "address", "data dir", "ports", "host key")
    for r in rows:
        table.add_row(cell(r["name"]), cell(f"{r['user']}@{r['host']}:{r['port']}"), cell(r["data_dir"]), cell(r["ports"]),
                      cell(r["host_key"]) if r["host_key"] else Text("not pinned", style="red"))
    out.print(table)


@node.command("check")
@click.argument("names", nargs=-1, shell_complete=complete_nodes)
@click.option("--no-mount", is_flag=True,
              help="Change nothing: don't mount MooseFS or add the desktop network rules; only report.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for each node.")
@json_option
@click.pass_obj
def node_check(home: AdminHome, names, no_mount, timeout, as_json):
    """Probe NAMES (default: every node) in parallel.

    Reports kernel, overlayfs and FUSE support, the docker engine, the
    MooseFS client (and mounts MooseFS unless --no-mount), rsync, python3,
    GPUs from nvidia-smi, CPUs, memory and disk, and the packet filter that
    keeps desktops off MooseFS, the nodes and each other (added unless
    --no-mount; every desktop start adds it too). An unreachable node is
    reported on its own row. Exits 7 if any node has a problem.
    """
    cfg = home.config
    outcomes = check_nodes(cfg, list(names) or None, mount_mfs=not no_mount, timeout=timeout)
    problems = {o.node: node_problems(o) for o in outcomes}
    if as_json:
        _emit_json([
            {"node": o.node, "ok": not problems[o.node], "reachable": o.ok, "error": o.error,
             "problems": problems[o.node], "seconds": round(o.seconds, 3), "facts": o.value}
            for o in outcomes
        ])
    else:
        out.print(_check_table(outcomes, problems))
        for o in outcomes:
            for problem in problems[o.node]:
                out.print(Text.assemble((safe(o.node), "red"), ": ", safe(problem)))
    failed = [node for node, found in problems.items() if found]
    if failed:
        raise NodeError(node=", ".join(failed), msg="node check found problems (listed above)")


def _check_table(outcomes, problems: dict[str, list[str]]) -> Table:
    table = Table("node", "status", "kernel", "docker", "MooseFS", "GPUs", "CPUs", "memory", "disk", title="labvm node check")
    for o in outcomes:
        if not o.ok:
            status = Text("timeout" if o.error_kind == "timeout" else "unreachable", style="red")
            table.add_row(cell(o.node), status, *[""] * 7)
            continue
        f = o.value
        mfs = f.get("mfs") or {}
        mem = f.get("memory") or {}
        disk = f.get("disk") or {}
        gpus = f.get("gpus") or []
        table.add_row(
            cell(o.node),
            Text("problems", style="yellow") if problems[o.node] else Text("ok", style="green"),
            cell(f["kernel"]["release"]),
            cell(f["docker"]["version"]) if f["docker"].get("ok") else Text("down", style="red"),
            cell(f"{_gib(mfs.get('free_mib'))} free") if mfs.get("mounted") else Text("not mounted", style="red"),
            Text("\n").join(cell(f"{g['index']} {g['name']} {g['uuid']}") for g in gpus) if gpus else "none",
            cell(f["cpus"]["count"]),
            cell(f"{_gib(mem.get('available_mib'))}/{_gib(mem.get('total_mib'))}"),
            cell(f"{_gib(disk.get('free_mib'))} free") if disk else "?",
        )
    return table


@node.command("rm")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@click.pass_obj
@audited("name")
def node_rm(home: AdminHome, name, yes):
    """Remove node NAME from the cluster file and forget its host key."""
    cfg = home.config
    cfg.node(name)
    with home.state() as db:
        on_node = [r["user"] for r in db.conn.execute("SELECT user FROM vms WHERE node = ?", (name,))]
    if not _confirm(yes)(f"Remove node {name} from {cfg.path}?"):
        raise Aborted()
    remove_node(cfg, name, on_node)
    say(f"removed node {name}")


@node.command("rekey")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--fingerprint", metavar="SHA256:...", help="Expected new fingerprint; pins without asking if it matches.")
@click.option("--yes", "-y", is_flag=True, help="Pin the new key shown without asking.")
@click.pass_obj
@audited("name")
def node_rekey(home: AdminHome, name, fingerprint, yes):
    """Pin NAME's new host key after the node was reinstalled."""
    decision = rekey_node(home.config, name, expected_fingerprint=fingerprint, confirm=_confirm(yes, FINGERPRINT_HINT))
    say(f"{name}: host key {decision.key_type} {decision.fingerprint} pinned")


# -- desktop images ------------------------------------------------------------
@cli.group()
def image():
    """The desktop rootfs (xfce_local): build it once, push it to every node."""


def _image_dir(home: AdminHome):
    return home.images_dir


def _latest_image(home: AdminHome):
    images = sorted(_image_dir(home).glob("labvm-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not images:
        raise NotFound(f"no desktop image in {_image_dir(home)}; build one with `labvm image build`")
    return images[-1]


@image.command("build")
@click.option("--desktop", type=click.Choice(["xfce", "minimal"]), default="xfce", show_default=True,
              help="xfce: XFCE4, TigerVNC, sudo, a locale and an SSH server. minimal: TigerVNC, twm and xterm (for tests).")
@click.option("--mirror", metavar="URL", help="Debian mirror (default: the one this host's apt uses).")
@click.option("--rebuild", is_flag=True, help="Build again even if a cached build matches.")
@click.option("--cache-dir", default=str(images.DEFAULT_CACHE_DIR), show_default=True, help="Where builds and downloaded packages are cached.")
@json_option
@click.pass_obj
@audited("desktop")
def image_build(home: AdminHome, desktop, mirror, rebuild, cache_dir, as_json):
    """Build the desktop rootfs with debootstrap (Debian bookworm) into a tarball with a checksum.

    The tarball keeps numeric owners, xattrs and ACLs. It lands in the images/
    directory beside the cluster file, where `labvm image push` finds it.
    """
    out_dir = _image_dir(home)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    progress = (lambda _m: None) if as_json else say
    info = images.build_image(desktop, out_dir, cache_dir=Path(cache_dir), mirror=mirror, rebuild=rebuild, progress=progress)
    if as_json:
        _emit_json(info.to_dict())
        return
    say(f"image {info.path} ({info.size / 2**20:.0f} MiB, sha256 {info.sha256[:16]}...) in {info.seconds:.0f}s")


@image.command("push")
@click.argument("nodes", nargs=-1, shell_complete=complete_nodes)
@click.option("--image", "image_path", metavar="FILE", help="Image tarball (default: the newest `labvm image build`).")
@click.pass_obj
@audited()
def image_push(home: AdminHome, nodes, image_path):
    """Unpack the desktop image into xfce_local on NODES (default: all), in parallel.

    A node that already holds this image (same checksum) gets nothing. Each node
    also gets the tiny docker base image desktops are created from.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    path = Path(image_path) if image_path else _latest_image(home)
    sha = images.image_sha256(path)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=out, transient=True) as bars:
        tasks = {}

        def progress(node, done, total):
            if node not in tasks:
                tasks[node] = bars.add_task(node, total=total)
            bars.update(tasks[node], completed=done)

        outcomes = images.push_image(home.config, path, sha, list(nodes) or None, progress=progress)
    failed = []
    for o in outcomes:
        if o.ok:
            r = o.value
            say(f"{o.node}: " + ("pushed" if r.unpacked else "already has it") + f" ({sha[:12]})")
        else:
            failed.append(o.node)
            out.print(Text.assemble((safe(o.node), "red"), ": ", safe(o.error)))
    if failed:
        raise NodeError(node=", ".join(failed), msg="image push failed")


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
    out.print(Text.assemble(safe(f"{desktop.user}'s desktop runs on {desktop.node}: VNC at "), (safe(desktop.vnc_address(cfg)), "bold")))
    gpus = ", ".join(f"{g['index']} ({g['uuid']})" for g in desktop.gpus) or "none"
    say(f"  GPUs: {gpus}")
    say(f"  connect with a VNC client, e.g.: vncviewer {desktop.vnc_address(cfg)}  (password: {desktop.user}'s labvm password)")


@cli.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--node", default="auto", show_default=True, shell_complete=complete_nodes,
              help="Node to run on; auto picks one with the free GPUs and memory asked for.")
@click.option("--gpus", metavar="N|I,J", help="N free GPUs, or GPU indexes like 0,2 (1, for GPU 1 alone); 0 for none.")
@click.option("--adopt", is_flag=True,
              help="Continue from files an earlier member of the same name left on MooseFS (refused without it).")
@click.option("--disk", metavar="SIZE",
              help="Disk size, e.g. 100g: all the desktop may hold, wherever in its root (default from <vm_defaults>).")
@limit_options
@json_option
@click.pass_obj
@audited("user")
def create(home: AdminHome, user, node, gpus, adopt, as_json, disk, **limits):
    """Create and start USER's desktop.

    A desktop continues from the newest version of USER's files on MooseFS,
    kept when an earlier desktop was removed. Files there that belong to an
    earlier member who had the same name are refused unless --adopt.

    \b
    labvm create alice                 defaults from the cluster file, node picked for you
    labvm create alice --gpus 2        two free GPUs
    labvm create alice --node n2 --gpus 0,3 --memory 32g --disk 200g
    """
    from .desktops import LimitOverrides

    overrides = LimitOverrides(**limits, disk=disk)
    desktop = _desktops(home, quiet=as_json).create(user, node=node, gpus=gpus, overrides=overrides, adopt=adopt)
    if as_json:
        _emit_json(desktop.as_dict(home.config))
    else:
        _show_connect(home, desktop)


@cli.command()
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


@cli.command()
@click.argument("user", shell_complete=complete_users)
@click.pass_obj
@audited("user")
def start(home: AdminHome, user):
    """Start USER's desktop (mounts its layers, starts its container)."""
    _show_connect(home, _desktops(home).start(user))


@cli.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--timeout", default=20, show_default=True, help="Seconds to wait for a clean shutdown.")
@click.pass_obj
@audited("user")
def stop(home: AdminHome, user, timeout):
    """Stop USER's desktop. Its files stay; `labvm start` brings it back."""
    _desktops(home).stop(user, timeout=timeout)
    say(f"stopped {user}'s desktop")


@cli.command()
@click.argument("user", shell_complete=complete_users)
@click.pass_obj
@audited("user")
def restart(home: AdminHome, user):
    """Stop and start USER's desktop."""
    d = _desktops(home)
    d.stop(user)
    _show_connect(home, d.start(user))


@cli.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--purge", is_flag=True, help="Also delete every version of USER's files on MooseFS. Cannot be undone.")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation (with --purge, you must still type USER).")
@click.pass_obj
@audited("user")
def rm(home: AdminHome, user, purge, yes):
    """Remove USER's desktop: its container and local layers. The versions on MooseFS stay unless --purge."""
    if purge:
        _confirm_purge(user)
    elif not _confirm(yes)(f"Remove {user}'s desktop (container and local layers)?"):
        raise Aborted()
    _desktops(home).remove(user, purge=purge)
    say(f"removed {user}'s desktop" + (" and all its versions" if purge else "; its versions on MooseFS are kept"))


@cli.command()
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


def _confirm_purge(user: str) -> None:
    if not sys.stdin.isatty():
        raise BadInput("--purge deletes every version of the user's files: run it from a terminal, where you type the user name to confirm")
    if click.prompt(f"This deletes all of {user}'s files and versions on MooseFS. Type {user} to confirm", default="") != user:
        raise Aborted()


def _desktop_node(home: AdminHome, user: str):
    """The node of USER's running desktop. A desktop in another state is refused (exit 6) before
    any node is asked, with what to do about it."""
    with home.state() as db:
        desktop = _desktops(home, quiet=True).get(db, user)
    if desktop.state == "creating":
        raise StateError(f"{user}'s desktop is still being created; see `labvm ops list`")
    if desktop.state != "running":
        raise StateError(f"{user}'s desktop is {desktop.state}; start it with `labvm start {user}`")
    return home.config.node(desktop.node)


def _require_container_running(conn, user: str) -> None:
    """Docker's own words for a desktop recorded as running whose container is not (it exited,
    its node rebooted) are not shown: labvm says what it is and what to do."""
    found = conn.run(conn.as_root + ["docker", "inspect", "--format", "{{.State.Status}}", f"labvm-{user}"], timeout=60)
    if found.exited != 0 and "no such" not in found.stderr.lower():
        raise NodeError(node=conn.node.name, msg=f"docker inspect labvm-{user} failed: {found.stderr.strip() or found.exited}")
    status = found.stdout.strip() if found.exited == 0 else "missing"
    if status == "paused":
        raise Busy(f"{user}'s desktop is paused for a backup, for about a second; try again")
    if status != "running":
        raise StateError(f"{user}'s desktop is stopped (its container on {conn.node.name} is {status}); "
                         f"start it with `labvm start {user}`")


@cli.command("exec", context_settings={"ignore_unknown_options": True})
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
    from .remote.connection import NodeConnection

    node = _desktop_node(home, user)
    with NodeConnection(node, home.home) as conn:
        _require_container_running(conn, user)
        result = conn.run(conn.as_root + ["docker", "exec", f"labvm-{user}", *command], timeout=3600)
    click.echo(_terminal_safe(result.stdout, sys.stdout), nl=False)
    click.echo(_terminal_safe(result.stderr, sys.stderr), nl=False, err=True)
    sys.exit(result.exited)


@cli.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--as-user", is_flag=True, help="Log in as USER rather than root.")
@click.pass_obj
def shell(home: AdminHome, user, as_user):
    """Open an interactive shell inside USER's desktop (through ssh to its node)."""
    import os
    import shlex

    from .remote.connection import IDENTITY, NodeConnection
    from .remote.hostkeys import KNOWN_HOSTS

    node = _desktop_node(home, user)
    with NodeConnection(node, home.home) as conn:
        _require_container_running(conn, user)
    inner = ["docker", "exec", "-it"] + (["-u", user] if as_user else []) + [f"labvm-{user}", "/bin/bash", "-l"]
    prefix = [] if node.user == "root" else ["sudo", "-n", "--"]
    argv = [
        "ssh", "-t", "-p", str(node.port),
        "-o", f"UserKnownHostsFile={home.home / KNOWN_HOSTS}", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes", "-i", str(home.home / IDENTITY),
        f"{node.user}@{node.host}", shlex.join(prefix + inner),
    ]
    _audit(home, "labvm shell", user, "opened")
    os.execvp("ssh", argv)


@cli.command()
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


@cli.command("log")
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


# -- shell completion --------------------------------------------------------
@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for SHELL.

    \b
    bash:  labvm completion bash > /etc/bash_completion.d/labvm
    zsh:   labvm completion zsh > "${fpath[1]}/_labvm"
    fish:  labvm completion fish > ~/.config/fish/completions/labvm.fish

    Node and user names are completed from the cluster file and state database.
    """
    cls = get_completion_class(shell)
    click.echo(cls(cli, {}, "labvm", COMPLETE_VAR).source())


def _register_commands() -> None:
    from .cli_monitor import COMMANDS as monitor_commands
    from .cli_ops import COMMANDS as ops_commands
    from .cli_ops import NODE_COMMANDS
    from .cli_storage import COMMANDS as storage_commands

    for command in (*monitor_commands, *storage_commands, *ops_commands):
        cli.add_command(command)
    for command in NODE_COMMANDS:
        node.add_command(command)


# -- formatting --------------------------------------------------------------
def _terminal_safe(output: str, stream) -> str:
    """A command's output as it is into a pipe or file (it may be data); escaped on a terminal."""
    return safe(output, keep_lines=True) if stream.isatty() else output


def _gib(mib) -> str:
    if mib is None:
        return "?"
    return f"{mib / 1024:.1f}G"


def _when(ts) -> str:
    """A time stamp as local date and minute; one that is not a time stamp, as it came."""
    try:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ts)


_register_commands()


# -- entry point: errors are mapped to exit codes here, and only here ---------
def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        cli.main(args=args, prog_name="labvm", complete_var=COMPLETE_VAR, standalone_mode=False)
    except click.exceptions.Abort:
        err.print("labvm: aborted", markup=False)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except LabvmError as exc:
        if debug:
            err.print(safe(traceback.format_exc(), keep_lines=True), markup=False)
        err.print(f"labvm: error: {safe(exc)}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("labvm: interrupted", markup=False)
        return 130
    except Exception as exc:
        if debug:
            err.print(safe(traceback.format_exc(), keep_lines=True), markup=False)
        err.print(f"labvm: internal error: {type(exc).__name__}: {safe(exc)} (run with --debug for details)", markup=False)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
