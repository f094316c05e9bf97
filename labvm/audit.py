"""The audit log: one JSON line per mutating command, on the admin host.

Who ran what, on which desktop or node, and how it ended. Lines are appended
under an exclusive lock to a 0600 file beside the state database, so
concurrent labvm runs never interleave a line.
"""

from __future__ import annotations

import fcntl
import getpass
import json
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


def operator() -> str:
    """The person behind the command: sudo's caller when run through sudo."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def append(home: Path, command: str, target: str | None, result: str) -> None:
    path = home / AUDIT_LOG
    line = json.dumps({"time": round(time.time(), 3), "who": operator(), "command": command, "target": target, "result": result})
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
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = AuditEntry(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a line cut short by a crash is skipped, never fatal
            if target is None or entry.target == target:
                entries.append(entry)
    return entries[-last:] if last else entries
