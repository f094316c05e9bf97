"""The audit log: one JSON line per mutating command, on the admin host.

Who ran what, on which desktop or node, and how it ended. Lines are appended
under an exclusive lock to a 0600 file beside the state database, so
concurrent labvm runs never interleave a line.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .fsutil import require_private

AUDIT_LOG = "audit.log"


@dataclass(frozen=True)
class AuditEntry:
    time: float
    who: str
    command: str
    target: str | None
    result: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_line(cls, line: str) -> "AuditEntry | None":
        """The entry a log line holds; None for a line cut short by a crash, or not one of ours.
        A text field that holds another JSON value (an older labvm wrote an operation's id as a
        number) is taken as that value's JSON text."""
        try:
            fields = json.loads(line)
            entry = cls(**fields)
            texts = {name: _text(getattr(entry, name)) for name in ("who", "command", "result")}
            target = None if entry.target is None else _text(entry.target)
        except (ValueError, TypeError, RecursionError):
            return None
        if not (isinstance(entry.time, (int, float)) and not isinstance(entry.time, bool) and math.isfinite(entry.time)):
            return None
        return cls(entry.time, texts["who"], texts["command"], target, texts["result"])


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def operator() -> str:
    """The person behind the command: sudo's caller when run through sudo."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def member_actor(user: str) -> str:
    """Who a member's own command (over SSH, `labvm member USER`) is logged as: the member, not
    the account sshd and sudo ran it under. Old lines keep their operator's name."""
    return f"member:{user}"


def append(home: Path, command: str, target, result: str, who: str | None = None) -> None:
    """One line; a target that is not text (an operation's id) is written as text. who: the
    operator (sudo's caller) unless given, as member_actor gives it for a member's command."""
    path = home / AUDIT_LOG
    target = None if target is None else str(target)
    line = json.dumps({"time": round(time.time(), 3), "who": who or operator(), "command": command, "target": target,
                       "result": result})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        require_private(path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read(home: Path, *, target: str | None = None, last: int | None = None) -> list[AuditEntry]:
    path = home / AUDIT_LOG
    if not path.exists():
        return []
    require_private(path)
    entries = []
    # Bytes that are not UTF-8 are kept as surrogate escapes; what shows them escapes them.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            entry = AuditEntry.from_line(line)
            if entry is not None and (target is None or entry.target == target):
                entries.append(entry)
    return entries[-last:] if last else entries
