"""labvm user: the lab's members."""

from __future__ import annotations

import click
from rich.table import Table

from .admin import AdminHome
from .cli_kit import (
    _confirm,
    _confirm_purge,
    _emit_json,
    _read_password,
    _when,
    audited,
    complete_users,
    json_option,
    out,
    password_stdin_option,
    say,
)
from .errors import Aborted, AlreadyExists
from .text import cell


# -- users -------------------------------------------------------------------
@click.group()
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


COMMANDS = (user,)
