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
    warn,
)
from .errors import Aborted, AlreadyExists, BadInput, NotFound
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
    if not dry_run:
        _refresh_keys(home)


# -- members' SSH keys ---------------------------------------------------------
def _refresh_keys(home: AdminHome) -> None:
    from .member_account import refresh_quietly

    refresh_quietly(home, warn)


@user.group("key")
def user_key():
    """Members' SSH public keys: what logs into the members' account (`labvm member setup`)."""


@user_key.command("add")
@click.argument("name", shell_complete=complete_users)
@click.argument("key_file", metavar="FILE", type=click.File("r", encoding="utf-8", errors="strict", lazy=False))
@click.pass_obj
@audited("name")
def user_key_add(home: AdminHome, name, key_file):
    """Register NAME's SSH public key from FILE (their .pub file; - reads standard input).

    One key, on one line: ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa of
    3072 bits or more, or a security key (sk-...). Options before the key are
    refused, and only the key and a cleaned-up comment are kept: NAME gets
    exactly the forced command and forwarding labvm writes for them.
    """
    from .cli_member import RESERVED
    from .member_keys import MAX_KEY_TEXT, parse_public_key

    if name in RESERVED:
        raise BadInput(f"{name!r} is a `labvm member` subcommand: a member of that name cannot use the members' account")
    try:
        key = parse_public_key(key_file.read(MAX_KEY_TEXT + 1))
    except UnicodeError:
        raise BadInput("the key file is not UTF-8 text: give the .pub file") from None
    with home.state() as db:
        db.add_member_key(name, key.type, key.blob_b64, key.comment, key.fingerprint)
    _refresh_keys(home)
    say(f"added {key.type} key {key.fingerprint} for {name}" + (f" ({key.comment})" if key.comment else ""))


@user_key.command("list")
@click.argument("name", shell_complete=complete_users)
@json_option
@click.pass_obj
def user_key_list(home: AdminHome, name, as_json):
    """List NAME's SSH keys."""
    with home.state() as db:
        db.get_user(name)
        keys = db.member_keys(name)
    if as_json:
        _emit_json([{k: key[k] for k in ("user", "fingerprint", "key_type", "comment", "added_at")} for key in keys])
        return
    table = Table("fingerprint", "type", "comment", "added")
    for key in keys:
        table.add_row(cell(key["fingerprint"]), cell(key["key_type"]), cell(key["comment"]), _when(key["added_at"]))
    out.print(table)


@user_key.command("rm")
@click.argument("name", shell_complete=complete_users)
@click.argument("fingerprint")
@click.pass_obj
@audited("name")
def user_key_rm(home: AdminHome, name, fingerprint):
    """Remove NAME's key with this FINGERPRINT (SHA256:..., as `labvm user key list` shows it)."""
    with home.state() as db:
        if not db.remove_member_key(name, fingerprint):
            raise NotFound(f"{name} has no key {fingerprint}; see `labvm user key list {name}`")
    _refresh_keys(home)
    say(f"removed key {fingerprint} of {name}")


COMMANDS = (user,)
