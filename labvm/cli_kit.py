"""What every command module shares: the console, output and JSON, confirmation, password
input, the audit decorator, shell completion and small formatters. It never imports a
command module or labvm.cli."""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
import textwrap

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.text import Text

from . import audit
from .admin import AdminHome
from .errors import Aborted, BadInput, InsecureFile, LabvmError
from .text import safe

COMPLETE_VAR = "_LABVM_COMPLETE"

out = Console(highlight=False, soft_wrap=True, emoji=False)


def say(message: str) -> None:
    """One line of output that may hold a desktop's, a node's or the audit log's text: shown
    escaped, never read as markup."""
    out.print(safe(message), markup=False)


def warn(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True, emoji=False).print("labvm: warning: " + safe(message), markup=False)


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
    _audit_as(home, command, target, result)


def _audit_as(home: AdminHome | None, command: str, target: str | None, result: str, who: str | None = None) -> None:
    """One audit line; who: the operator unless given (a member's own command: member:NAME)."""
    if home is None or not home.home.is_dir():
        return
    try:
        home.check_safe()
        audit.append(home.home, command, target, result, who=who)
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


def _confirm_purge(user: str) -> None:
    if not sys.stdin.isatty():
        raise BadInput("--purge deletes every version of the user's files: run it from a terminal, where you type the user name to confirm")
    if click.prompt(f"This deletes all of {user}'s files and versions on MooseFS. Type {user} to confirm", default="") != user:
        raise Aborted()


# -- plans (--dry-run) -------------------------------------------------------
dry_run_option = click.option(
    "--dry-run", is_flag=True,
    help="Run the checks and print the plan: what each step would change; change nothing. With --json, as JSON.")


def show_plan(report, as_json: bool) -> None:
    """A dry run's plan (plan.PlanReport): as one JSON object, or as text that fits 80
    columns with outside text escaped. Then exit as the operation would have: a failed check
    raises its error (10 for no room, 75 for a held lock, ...)."""
    if as_json:
        _emit_json(report.as_dict())
    else:
        failed = next((c.name for c in report.checks if not c.ok), None)
        outcome = "the checks pass" if report.ok else f"the {failed or 'first'} check failed"
        wrapped("", f"{report.headline}: {outcome} (dry run: nothing changed)")
        if report.checks:
            say("checks:")
        for c in report.checks:
            wrapped(f"  {'ok' if c.ok else 'FAILED':7}{c.name:17} ", c.detail)
        if not report.ok:
            say("steps: none would run while a check fails")
        else:
            say("steps:")
            for index, step in enumerate(report.steps, 1):
                wrapped(f"  {index:2}. {step.name:15} ", ("skipped: " + step.skip) if step.skip else step.detail)
    if report.error is not None:
        raise report.error


def wrapped(head: str, text: str, width: int = 80) -> None:
    """head, then text wrapped to width under itself; both escaped."""
    head = safe(head)
    lines = textwrap.wrap(safe(text), width=max(20, width - len(head)), break_long_words=False,
                          break_on_hyphens=False) or [""]
    for index, line in enumerate(lines):
        out.print(Text((head if index == 0 else " " * len(head)) + line))
