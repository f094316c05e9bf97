"""What a member may ask for over SSH: `ssh lab@ADMIN status`, and no more.

sshd runs the forced command `labvm member USER` (labvm/member_account.py) with what the
member typed in SSH_ORIGINAL_COMMAND. That text is parsed here, strictly, and never given to a
shell: it is split with shlex, and one of a fixed table of commands on the member's own
desktop is run through the same operations (and so the same plans, per-desktop locks and
journal) as the admin's commands. Anything else is refused with one line and exit 2.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from typing import BinaryIO, Callable, Protocol

from .errors import BadInput
from .files import MAX_PUT_BYTES, desktop_file_path
from .names import validate_password

MAX_COMMAND_BYTES = 1024
# Shell syntax is refused wherever it stands, quoted or not: no shell ever runs the command,
# and a member who typed it expected one.
SHELL_SYNTAX = set(";&|<>`$")
_VERSION = re.compile(r"[0-9]{1,9}")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class Refused(BadInput):
    """{msg}"""


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """For the audit log: the command as parsed (no password ever is part of it)."""
        return " ".join([self.verb, *self.args])


# verb: (argument names, what it does)
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "status": ((), "your desktop (state, node, VNC address, image, GPUs) and the free GPUs of each node"),
    "start": ((), "start your desktop"),
    "stop": ((), "stop your desktop (its files stay)"),
    "restart": ((), "stop and start your desktop"),
    "passwd": ((), "change your password: the new one on standard input (`ssh lab@ADMIN passwd < file`)"),
    "versions": ((), "the versions of your files"),
    "restore": (("N",), "roll your desktop back to version N (what it holds now is kept as a new version)"),
    "get": (("PATH",), "a file of your desktop, to standard output"),
    "put": (("PATH",), "standard input into a file of your desktop"),
    "switch": (("NODE",), "move your desktop to NODE (where the admin allows it)"),
    "tunnel": ((), "the `ssh -L` line that reaches your desktop's VNC"),
    "help": ((), "this list"),
}


def help_text(may_switch: bool) -> str:
    lines = ["commands (ssh lab@ADMIN COMMAND):"]
    for verb, (args, what) in COMMANDS.items():
        if verb == "switch" and not may_switch:
            continue
        lines.append(f"  {' '.join([verb, *args]):15} {what}")
    return "\n".join(lines) + "\n"


def _allowed(may_switch: bool) -> str:
    return ", ".join(v for v in COMMANDS if may_switch or v != "switch")


def parse(raw: str | None, *, user: str, members: set[str] | frozenset[str] = frozenset(), nodes: tuple[str, ...] = (),
          may_switch: bool = False) -> Command:
    """SSH_ORIGINAL_COMMAND as one allowed command, or Refused saying why."""
    if raw is None or not raw.strip():
        raise Refused(f"no command given: there is no login here. Try `ssh ... help` (commands: {_allowed(may_switch)})")
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_COMMAND_BYTES:
        raise Refused(f"the command is longer than {MAX_COMMAND_BYTES} bytes")
    if any(not ch.isprintable() for ch in raw):
        raise Refused("the command holds control characters (NUL, line breaks, escapes ...)")
    if SHELL_SYNTAX & set(raw):
        raise Refused("no shell runs here: ; & | < > ` and $ are not allowed; give one command")
    try:
        words = shlex.split(raw, comments=False, posix=True)
    except ValueError as exc:
        raise Refused(f"the command cannot be read: {exc}") from None
    if not words:
        raise Refused(f"no command given (commands: {_allowed(may_switch)})")
    others = [w for w in words if w in members and w != user]
    if others:
        raise Refused(f"you act on your own desktop only: {others[0]!r} is another member")
    verb, args = words[0], tuple(words[1:])
    if verb not in COMMANDS or (verb == "switch" and not may_switch):
        if verb == "switch":
            raise Refused("switch is not allowed in this lab: ask the admin to move your desktop")
        shown = verb if len(verb) <= 40 else verb[:40] + "..."
        raise Refused(f"{shown!r} is not a member command (commands: {_allowed(may_switch)})")
    wanted = COMMANDS[verb][0]
    if len(args) != len(wanted):
        usage = " ".join([verb, *wanted])
        raise Refused(f"{verb} takes {len(wanted) or 'no'} argument{'s' if len(wanted) != 1 else ''}: {usage}")
    if verb == "restore" and not _VERSION.fullmatch(args[0]):
        raise Refused("restore takes a version number, e.g. restore 4 (see `versions`)")
    if verb in ("get", "put"):
        args = (desktop_file_path(args[0]),)
    if verb == "switch" and (not _NODE.fullmatch(args[0]) or args[0] not in nodes):
        raise Refused(f"no node {args[0][:40]!r}; nodes: {', '.join(nodes) or 'none'}")
    return Command(verb, args)


class MemberOps(Protocol):
    """The operations behind the member commands, on one member's desktop."""

    def status(self, user: str) -> str: ...
    def start(self, user: str) -> str: ...
    def stop(self, user: str) -> str: ...
    def restart(self, user: str) -> str: ...
    def passwd(self, user: str, password: str) -> str: ...
    def versions(self, user: str) -> str: ...
    def restore(self, user: str, version: int) -> str: ...
    def get(self, user: str, path: str) -> bytes: ...
    def put(self, user: str, path: str, content: bytes) -> str: ...
    def switch(self, user: str, node: str) -> str: ...
    def tunnel(self, user: str) -> str: ...


def read_new_password(stdin, prompt: Callable[[], str] | None = None) -> str:
    """The new password: the first line of standard input, or asked twice at a terminal. Never
    shown, never in a message."""
    try:
        if stdin.isatty() and prompt is not None:
            password = prompt()
        else:
            line = stdin.readline()
            if not line:
                raise Refused("passwd reads the new password from standard input, which is empty: "
                              "`ssh lab@ADMIN passwd < file` or `echo ... | ssh lab@ADMIN passwd`")
            password = line.rstrip("\n")
        password.encode("utf-8")
    except UnicodeError:
        raise BadInput("the password is not valid UTF-8 text; choose another") from None
    return validate_password(password)


def read_content(stream: BinaryIO) -> bytes:
    content = stream.read(MAX_PUT_BYTES + 1)
    if len(content) > MAX_PUT_BYTES:
        raise BadInput(f"put takes at most {MAX_PUT_BYTES} bytes")
    return content


def dispatch(command: Command, user: str, ops: MemberOps, *, may_switch: bool, stdin=None, stdout=None,
             prompt: Callable[[], str] | None = None) -> None:
    """Run one parsed command on `user`'s desktop through `ops`; text goes to stdout."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    verb = command.verb
    if verb == "help":
        stdout.write(help_text(may_switch))
        return
    if verb == "get":
        content = ops.get(user, command.args[0])
        stdout.flush()
        getattr(stdout, "buffer", stdout).write(content)
        return
    if verb == "put":
        text = ops.put(user, command.args[0], read_content(getattr(stdin, "buffer", stdin)))
    elif verb == "passwd":
        text = ops.passwd(user, read_new_password(stdin, prompt))
    elif verb == "restore":
        text = ops.restore(user, int(command.args[0]))
    elif verb == "switch":
        text = ops.switch(user, command.args[0])
    else:
        text = getattr(ops, verb)(user)
    stdout.write(text if text.endswith("\n") else text + "\n")
