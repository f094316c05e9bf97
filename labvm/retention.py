"""Which versions of a desktop to keep: a pure function over the list of versions.

Every version says why it exists (its reason): a backup, or an operation that had to publish
the desktop's files (create made v0; a switch, restore, solidify, rebase or remove made the
others). Backups follow borg prune's rule: keep the newest `keep_last` backups, then the newest
backup of each of the last `keep_daily` days that have one, then of each of the last
`keep_weekly` ISO weeks. A backup kept by an earlier rule does not count toward a later one,
but it does use up its day or week. A version of unknown reason (published before versions
had one) is taken for a backup. The other versions neither count nor use up a day or week:
the newest `keep_last` of them are kept. Two versions are never pruned whatever the rule says:
the newest, and the one the desktop runs on (its overlay's lower layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import Retention
from .errors import BadInput

# Version numbers are what the node helpers take: 0 (made at create) up to a 32-bit signed int.
MAX_VERSION = 2**31 - 1

# Why a version exists. scripts/node_helpers/merge.py publishes with the same words (all but
# create: v0 is made empty by the vm helper, and the merge helper lists it as create).
BACKUP = "backup"
REASONS = ("create", BACKUP, "switch", "restore", "solidify", "rebase", "remove")


def check_version(number: int) -> int:
    """A version number given on the command line, refused (exit 2) before anything is asked of a node."""
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= MAX_VERSION:
        raise BadInput(f"version {number}: a version number is 0..{MAX_VERSION}; see `labvm versions USER`")
    return number


RULES = (
    ("keep_last", None),
    ("keep_daily", "%Y-%m-%d"),
    ("keep_weekly", "%G-W%V"),
)


@dataclass(frozen=True)
class Version:
    number: int
    created: float | None
    files: int | None = None
    bytes: int | None = None
    base: int | None = None
    reason: str | None = None  # one of REASONS; None: not known

    @property
    def counts_as_backup(self) -> bool:
        """A backup, or a version of unknown reason: kept and counted as one, to be safe."""
        return self.reason == BACKUP or self.reason not in REASONS

    def as_dict(self) -> dict:
        return {"version": self.number, "created": self.created, "files": self.files, "bytes": self.bytes,
                "base": self.base, "reason": self.reason}


@dataclass(frozen=True)
class Verdict:
    version: Version
    kept_by: str | None  # e.g. "keep_daily #3", "recent switch #2", "in use", "newest"; None: prune it

    @property
    def keep(self) -> bool:
        return self.kept_by is not None


def _period(created: float | None, pattern: str | None, number: int) -> str:
    if pattern is None or created is None:
        return str(number)  # keep_last, or a version of unknown time: every version is its own period
    return time.strftime(pattern, time.localtime(created))


def plan(versions: list[Version], rule: Retention, in_use: set[int] = frozenset()) -> list[Verdict]:
    """Every version, newest first, with the rule that keeps it (or None)."""
    # A version whose time is not known (None) sorts as the oldest.
    ordered = sorted(versions, key=lambda v: (v.created is not None, v.created or 0, v.number), reverse=True)
    backups = [v for v in ordered if v.counts_as_backup]
    kept_by: dict[int, str] = {}
    for name, pattern in RULES:
        wanted = getattr(rule, name)
        if wanted <= 0:
            continue
        last_period, count = None, 0
        for v in backups:
            period = _period(v.created, pattern, v.number)
            if period == last_period:
                continue
            last_period = period
            if v.number in kept_by:
                continue
            count += 1
            kept_by[v.number] = f"{name} #{count}"
            if count == wanted:
                break
    others = [v for v in ordered if not v.counts_as_backup]
    for count, v in enumerate(others[: max(rule.keep_last, 0)], 1):
        kept_by[v.number] = f"recent {v.reason} #{count}"
    if ordered:
        kept_by.setdefault(ordered[0].number, "newest")
    for number in in_use:
        kept_by.setdefault(number, "in use")
    return [Verdict(v, kept_by.get(v.number)) for v in ordered]
