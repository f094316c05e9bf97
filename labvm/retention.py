"""Which versions of a desktop to keep: a pure function over the list of versions.

The rule is borg prune's: keep the newest `keep_last` versions, then the newest version of each
of the last `keep_daily` days that have one, then of each of the last `keep_weekly` ISO weeks.
A version kept by an earlier rule does not count toward a later one, but it does use up its day
or week. Two versions are never pruned whatever the rule says: the newest, and the one the
desktop runs on (its overlay's lower layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import Retention
from .errors import BadInput

# Version numbers are what the node helpers take: 0 (made at create) up to a 32-bit signed int.
MAX_VERSION = 2**31 - 1


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

    def as_dict(self) -> dict:
        return {"version": self.number, "created": self.created, "files": self.files, "bytes": self.bytes, "base": self.base}


@dataclass(frozen=True)
class Verdict:
    version: Version
    kept_by: str | None  # e.g. "keep_daily #3", "in use", "newest"; None: prune it

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
    kept_by: dict[int, str] = {}
    for name, pattern in RULES:
        wanted = getattr(rule, name)
        if wanted <= 0:
            continue
        last_period, count = None, 0
        for v in ordered:
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
    if ordered:
        kept_by.setdefault(ordered[0].number, "newest")
    for number in in_use:
        kept_by.setdefault(number, "in use")
    return [Verdict(v, kept_by.get(v.number)) for v in ordered]
