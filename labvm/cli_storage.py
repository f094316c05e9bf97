"""Commands for a desktop's files on MooseFS: sync, versions, backup, restore, cron."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from .admin import AdminHome
from .cli_kit import (
    _emit_json,
    _when,
    audited,
    complete_users,
    complete_versions,
    dry_run_option,
    json_option,
    out,
    say,
    show_plan,
)
from .errors import BadInput, PartlyDone
from .storage import (
    CRON_FILE,
    DEFAULT_IDLE_SCHEDULE,
    DEFAULT_SCHEDULE,
    STATUS_PAGE_SCHEDULE,
    Storage,
    _size,
    cron_text,
    install_cron,
)
from .text import cell, safe


def _storage(home: AdminHome, quiet: bool = False) -> Storage:
    return Storage(home, say=(lambda _m: None) if quiet else say)


def _seconds(value) -> str:
    """A duration a node reported; whatever else it sent is shown as it came."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f} s"
    return "?" if value is None else str(value)


def _known(value, show) -> str:
    """A value a node reported, shown; one it did not report, as "-"."""
    return "-" if value is None else show(value)


@click.group()
def sync():
    """The sync that streams each running desktop's writes to MooseFS."""


@sync.command("flush")
@click.argument("user", shell_complete=complete_users)
@json_option
@click.pass_obj
def sync_flush(home: AdminHome, user, as_json):
    """Return once everything USER's desktop wrote before now is on MooseFS."""
    if as_json or not out.is_terminal:
        data = _storage(home, quiet=as_json).flush(user)
    else:
        with out.status(Text(f"flushing {user}'s writes to MooseFS")):
            data = _storage(home).flush(user)
    if as_json:
        _emit_json(data)
    elif data.get("mode") == "stopped":
        say(f"{user}'s desktop is stopped: its writes went to MooseFS when it stopped")
    else:
        say(f"{user}: flushed in {_seconds(data.get('seconds'))}")


@sync.command("status")
@click.argument("user", shell_complete=complete_users)
@json_option
@click.pass_obj
def sync_status(home: AdminHome, user, as_json):
    """Whether USER's sync runs, its lag, last success and last error."""
    data = _storage(home, quiet=True).sync_status(user)
    if as_json:
        _emit_json(data)
        return
    if not data.get("running"):
        say(f"{user}: no sync running (the desktop is stopped, or its sync died: `labvm start {user}` restarts it)")
    else:
        say(f"{user}: sync running (pid {data.get('pid')}), {data.get('pending', 0)} paths pending, lag {_seconds(data.get('lag_s'))}")
    if data.get("last_success"):
        say(f"  last success {_when(data['last_success'])}")
    if data.get("last_error"):
        out.print(Text("  last error: " + safe(data["last_error"]), style="red"))
    if data.get("degraded"):
        reason = data.get("degraded_reason") or "some changes are not watched"
        out.print(Text(f"  degraded: {safe(reason)}; full passes keep MooseFS close", style="yellow"))
    _print_quarantine(data)


def _print_quarantine(data: dict) -> None:
    """Paths the sync could not copy (a member's race, a name too long): what a switch would lose."""
    listed = data.get("quarantined") or []
    count = data.get("quarantined_count") or len(listed)
    if not count:
        return
    out.print(Text(f"  {count} paths could not be copied (retried when they change and at each flush):", style="yellow"))
    for entry in listed:
        if isinstance(entry, dict):
            out.print(Text(f"    {safe(entry.get('path'))}: {safe(entry.get('reason'))}"))
    if count > len(listed):
        say(f"    ... and {count - len(listed)} more")


@click.command()
@click.argument("user", shell_complete=complete_users)
@json_option
@click.pass_obj
def versions(home: AdminHome, user, as_json):
    """List the versions of USER's files, why each exists, and what keeps it.

    A version is what `labvm backup` published, or what a create, switch,
    restore, solidify or rm made (its reason; "-": made before versions had
    one, and counted as a backup). The desktop runs on the one marked
    "in use" plus the changes made since. Versions without a rule are pruned
    by the next backup.
    """
    desktop, verdicts = _storage(home, quiet=True).versions(user)
    if as_json:
        _emit_json({"user": user, "in_use": desktop.version,
                    "versions": [{**v.version.as_dict(), "kept_by": v.kept_by} for v in verdicts]})
        return
    table = Table(title=f"versions of {user}'s files")
    # Only "kept by" wraps in a narrow terminal: a date or a number split over two lines misreads.
    for name in ("version", "created", "reason", "files", "size"):
        table.add_column(name, no_wrap=True)
    table.add_column("kept by")
    for v in verdicts:
        # v0, made empty at create, has no record of its files: what is not known shows as "-".
        mark = " (in use)" if v.version.number == desktop.version else ""
        table.add_row(cell(f"v{v.version.number}{mark}"), cell(_known(v.version.created, _when)),
                      cell(_known(v.version.reason, str)), cell(_known(v.version.files, str)),
                      cell(_known(v.version.bytes, _size)),
                      cell(v.kept_by) if v.kept_by else Text("pruned by the next backup", style="yellow"))
    out.print(table)


@click.command()
@click.argument("users", nargs=-1, shell_complete=complete_users)
@click.option("--all", "all_desktops", is_flag=True, help="Every running or stopped desktop.")
@dry_run_option
@json_option
@click.pass_obj
@audited()
def backup(home: AdminHome, users, all_desktops, dry_run, as_json):
    """Publish a new version of each desktop's files, then prune old versions.

    \b
    labvm backup alice bob        two desktops
    labvm backup --all            every desktop (what cron runs)

    A running desktop keeps running: it is frozen for about a second while its
    last writes are flushed and its upper layer is snapshotted on MooseFS, so
    the version is one instant of its files. Prints one line per desktop, and
    exits 11 if any failed; a name without a desktop is refused (exit 4) before
    any backup. Safe under cron: a second run while one is going
    exits 75 without doing anything.
    """
    storage = _storage(home, quiet=True)
    if all_desktops == bool(users):
        raise BadInput("name the desktops to back up, or pass --all")
    if all_desktops:
        chosen = storage.all_users()
    else:
        chosen = list(dict.fromkeys(users))
        storage.require_desktops(chosen)  # an unknown name is refused (exit 4) before any backup
    if dry_run:
        _dry_backups(storage, chosen, as_json)
        return
    if as_json or not out.is_terminal:
        results = storage.backup_many(chosen, report=(lambda _r: None) if as_json else lambda r: say(r.line))
    else:
        with out.status(f"backing up {len(chosen)} desktop(s)") as status:
            def report(r):
                say(r.line)
                status.update(f"backed up {len(done) + 1} of {len(chosen)}")
                done.append(r)

            done: list = []
            results = storage.backup_many(chosen, report=report)
    if as_json:
        _emit_json([r.as_dict() for r in results])
    if not chosen and not as_json:
        say("no desktops to back up")
    failed = [r.user for r in results if not r.ok]
    if failed:
        raise PartlyDone(f"{len(failed)} of {len(results)} backups failed: {', '.join(failed)}")


def _dry_backups(storage: Storage, users: list[str], as_json: bool) -> None:
    """Each backup's plan; exits as the first refused one would have."""
    reports = [storage.backup(user, dry_run=True) for user in users]
    if as_json:
        _emit_json([r.as_dict() for r in reports])
    else:
        for report in reports:
            try:
                show_plan(report, as_json=False)
            except Exception:  # noqa: BLE001 - shown; raised below once every plan is printed
                pass
    failed = next((r.error for r in reports if r.error is not None), None)
    if failed is not None:
        raise failed


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.argument("version", type=int, shell_complete=complete_versions)
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def restore(home: AdminHome, user, version, yes, dry_run, as_json):
    """Roll USER's desktop back to VERSION (see `labvm versions USER`).

    The desktop's current files are first published as a new version, so a
    restore loses nothing and can itself be undone. A running desktop is
    stopped for it and started again.
    """
    from .cli_kit import _confirm
    from .retention import check_version

    check_version(version)
    if dry_run:
        show_plan(_storage(home, quiet=True).restore(user, version, dry_run=True), as_json)
        return
    if not _confirm(yes)(f"Roll {user}'s desktop back to v{version}? A running desktop restarts."):
        raise click.exceptions.Exit(1)
    data = _storage(home, quiet=as_json).restore(user, version)
    if as_json:
        _emit_json(data)
        return
    say(f"{user}'s desktop now shows v{data['restored']}; what it had before is kept as v{data['kept_as']}")


@click.command()
@click.argument("user", shell_complete=complete_users)
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def solidify(home: AdminHome, user, dry_run, as_json):
    """Fold USER's changes into a new version and run the desktop over it.

    The changes made since the desktop's version (its upper layer) are merged
    into a new version, which becomes the one it runs on, and the upper layer
    starts empty again. A running desktop is stopped for it and started again.
    A switch to another node does the same.
    """
    if dry_run:
        show_plan(_storage(home, quiet=True).solidify(user, dry_run=True), as_json)
        return
    data = _storage(home, quiet=as_json).solidify(user)
    if as_json:
        _emit_json(data)
        return
    say(f"{user}'s desktop now runs on v{data['version']}" + (" (restarted)" if data["running"] else ""))


@click.group()
def cron():
    """The cron file: backups of every desktop, and idle stops and the status page if asked."""


@cron.command("install")
@click.option("--schedule", default=DEFAULT_SCHEDULE, show_default=True, help="When `labvm backup --all` runs (cron fields).")
@click.option("--idle-schedule", default=None, help=f"Also run `labvm idle --stop` then, e.g. '{DEFAULT_IDLE_SCHEDULE}'.")
@click.option("--status-html", "status_page", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help=f"Also write the `labvm status --html` page to FILE every 5 minutes ({STATUS_PAGE_SCHEDULE}), "
                   "e.g. /var/www/html/labvm.html.")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=CRON_FILE, show_default=True)
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("/var/log/labvm-backup.log"),
              show_default=True, help="Where the runs' one-line summaries and errors go.")
@click.pass_obj
@audited()
def cron_install(home: AdminHome, schedule, idle_schedule, status_page, path, log_path):
    """Write the cron file that runs `labvm backup --all` and `labvm ca renew` (as
    root, with this cluster file).

    \b
    labvm cron install                                   nightly backups
    labvm cron install --idle-schedule '47 * * * *'      and hourly idle stops
    labvm cron install --status-html /var/www/html/labvm.html
                                                         and the members' page

    Each install rewrites the whole file: give every option you want each time.
    The status page is the one `labvm status --html` writes: 0644, swapped in
    whole, so a web server never serves half of it; its directory must exist.
    """
    if status_page is not None:
        status_page = status_page.resolve()
        if not status_page.parent.is_dir():
            raise BadInput(f"--status-html {status_page}: {status_page.parent} is not a directory; create it first")
    text = cron_text(home.config.path.resolve(), schedule, idle_schedule, log_path, status_page=status_page)
    changed = install_cron(text, path)
    say(("wrote " if changed else "unchanged: ") + str(path))
    for line in text.splitlines():
        if " root " in line and not line.startswith("#"):
            say(line)


@cron.command("show")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=CRON_FILE, show_default=True)
def cron_show(path):
    """Print the installed cron file."""
    if not path.is_file():
        raise BadInput(f"{path} does not exist; write it with `labvm cron install`")
    click.echo(path.read_text(), nl=False)


COMMANDS = (sync, versions, backup, restore, solidify, cron)
