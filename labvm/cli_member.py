"""labvm member: the members' SSH account (setup, refresh), and `labvm member USER`, the forced
command that account's keys run."""

from __future__ import annotations

import os
import sys

import click

from .admin import AdminHome
from .audit import member_actor
from .cli_kit import _audit_as, say
from .errors import BadInput, LabvmError

# Subcommands of `labvm member`; a member of one of these names cannot use the account.
RESERVED = ("setup", "refresh")


class MemberGroup(click.Group):
    """`labvm member setup|refresh`, and `labvm member USER` for any other word: what the
    forced command runs (not listed)."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        return _as_member(name)

    def format_usage(self, ctx, formatter):
        formatter.write_usage(ctx.command_path, "setup|refresh [OPTIONS] | USER")


@click.group(cls=MemberGroup)
def member():
    """Members help themselves over SSH: `ssh lab@ADMIN status`, with no daemon.

    \b
    labvm user key add alice alice.pub           register a member's key
    labvm member setup --account lab             the account their keys log into
    ssh lab@ADMIN help                           what a member may then run

    `labvm member USER` is what each key's forced command runs, as root through
    sudo: it reads what the member typed (SSH_ORIGINAL_COMMAND), allows only the
    commands `help` lists, on USER's own desktop, and logs each to the audit log
    as member:USER.
    """


@member.command("setup")
@click.option("--account", default="lab", show_default=True, help="The local account members log into.")
@click.option("--home", "home_dir", metavar="DIR", help="Its home, where it is created (default /home/ACCOUNT).")
@click.option("--ssh-host", metavar="HOST", help="This host's name as members reach it (default: its FQDN).")
@click.option("--ssh-port", type=click.IntRange(1, 65535), default=22, show_default=True, help="sshd's port, as members reach it.")
@click.option("--sudoers", metavar="FILE", help="The sudoers rule's file (default /etc/sudoers.d/labvm-members).")
@click.pass_obj
def member_setup(home: AdminHome, account, home_dir, ssh_host, ssh_port, sudoers):
    """Prepare ACCOUNT on this host for members' SSH keys.

    Creates it if missing (shell /bin/sh: sshd runs the forced command through
    it; no password), writes a sudoers rule letting it run exactly `labvm
    --config FILE member *` as root (checked with visudo -c, mode 0440), and
    writes its ~/.ssh/authorized_keys (0600, the account's): one line per key
    of `labvm user key add`, with its forced command, `restrict`, and
    port forwarding to the member's desktop's VNC port alone. labvm rewrites
    the file whenever keys change and desktops are created, moved or removed.
    Safe to run again.
    """
    from .member_account import setup

    _refuse_through_the_members_rule(home)
    try:
        _account, done = setup(home, account, home_dir, ssh_host, ssh_port, sudoers)
    except LabvmError as exc:
        _audit_as(home, "labvm member setup", account, f"failed: {exc}")
        raise
    _audit_as(home, "labvm member setup", account, "ok")
    for line in done:
        say(line)


@member.command("refresh")
@click.pass_obj
def member_refresh(home: AdminHome):
    """Rewrite the account's authorized_keys from the keys and desktops now."""
    from .member_account import refresh_authorized_keys

    _refuse_through_the_members_rule(home)
    written = refresh_authorized_keys(home)
    say(f"wrote {written}" if written else "no account set up: run `labvm member setup` first")


def _refuse_through_the_members_rule(home: AdminHome) -> None:
    """The sudoers rule lets the members' account run `labvm ... member *` as root: of that,
    only `member USER` is meant for it. Its forced commands never name setup or refresh; this
    holds even if something else ran as that account."""
    from .member_account import load_account

    account = load_account(home.home)
    caller = os.environ.get("SUDO_USER")
    if caller and account is not None and caller == account.account:
        raise BadInput(f"`labvm member setup` and `refresh` are the admin's: not for the members' account {caller}")


def _as_member(user: str) -> click.Command:
    @click.pass_obj
    def run(home: AdminHome):
        _run_member(home, user)

    return click.Command(user, callback=run, hidden=True, add_help_option=False,
                         help="Run the member command in SSH_ORIGINAL_COMMAND on USER's desktop (the forced command).")


def _run_member(home: AdminHome, user: str) -> None:
    from .member_command import Refused, dispatch, parse
    from .member_ops import LabOps
    from .names import validate_user_name

    raw = os.environ.get("SSH_ORIGINAL_COMMAND")
    who = member_actor(user)
    try:
        validate_user_name(user)
        if user in RESERVED:
            raise Refused(f"{user!r} names a labvm member command, not a member")
        cfg = home.config
        with home.state() as db:
            db.get_user(user)
            members = set(db.user_names())
        command = parse(raw, user=user, members=members, nodes=tuple(cfg.node_names()),
                        may_switch=cfg.members.may_switch)
    except LabvmError as exc:
        _audit_as(home, "member", user, f"refused: {exc}", who)
        raise
    name = f"member {command.text}"
    try:
        dispatch(command, user, LabOps(home), may_switch=cfg.members.may_switch, prompt=_prompt_password)
    except (LabvmError, KeyboardInterrupt) as exc:
        _audit_as(home, name, user, f"failed: {exc or type(exc).__name__}", who)
        raise
    sys.stdout.flush()
    _audit_as(home, name, user, "ok", who)


def _prompt_password() -> str:
    return click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True)


COMMANDS = (member,)
