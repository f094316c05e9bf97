"""The retention rule: which versions a backup keeps, and why."""

import time

from labvm.config import Retention
from labvm.retention import Version, plan

DAY = 86400


def day_start(days_ago: int) -> float:
    """Noon local time, days_ago days before a fixed date: stays inside one calendar day."""
    base = time.mktime((2026, 11, 28, 12, 0, 0, 0, 0, -1))
    return base - days_ago * DAY


def kept(verdicts) -> dict[int, str]:
    return {v.version.number: v.kept_by for v in verdicts if v.keep}


def test_keep_last_keeps_the_newest_n():
    versions = [Version(n, day_start(0) + n) for n in range(1, 11)]
    verdicts = plan(versions, Retention(keep_last=3, keep_daily=0, keep_weekly=0))
    assert kept(verdicts) == {10: "keep_last #1", 9: "keep_last #2", 8: "keep_last #3"}
    assert [v.version.number for v in verdicts] == list(range(10, 0, -1))  # newest first


def test_daily_keeps_the_newest_of_each_day_not_counting_what_keep_last_kept():
    # Three versions a day for five days: v1..v15, oldest first.
    versions = [Version(day * 3 + i + 1, day_start(4 - day) + i * 60) for day in range(5) for i in range(3)]
    verdicts = plan(versions, Retention(keep_last=2, keep_daily=2, keep_weekly=0))
    # keep_last takes v15, v14 (today). Today's period is used up by v15, so daily starts
    # with yesterday's newest (v12), then the day before (v9).
    assert kept(verdicts) == {15: "keep_last #1", 14: "keep_last #2", 12: "keep_daily #1", 9: "keep_daily #2"}


def test_weekly_reaches_back_across_weeks():
    versions = [Version(n, day_start(7 * (6 - n))) for n in range(1, 7)]  # one a week
    verdicts = plan(versions, Retention(keep_last=1, keep_daily=0, keep_weekly=3))
    assert set(kept(verdicts)) == {6, 5, 4, 3}


def test_newest_and_in_use_are_never_pruned():
    versions = [Version(n, day_start(10 - n)) for n in range(1, 6)]
    verdicts = plan(versions, Retention(keep_last=0, keep_daily=0, keep_weekly=0), in_use={2})
    assert kept(verdicts) == {5: "newest", 2: "in use"}


def test_versions_in_the_same_second_order_by_number():
    versions = [Version(n, day_start(0)) for n in (3, 1, 2)]
    verdicts = plan(versions, Retention(keep_last=1, keep_daily=0, keep_weekly=0))
    assert kept(verdicts) == {3: "keep_last #1"}


def test_no_versions():
    assert plan([], Retention()) == []


def test_a_version_of_unknown_time_sorts_oldest_and_is_its_own_period():
    versions = [Version(0, None), Version(1, day_start(1)), Version(2, day_start(0))]
    verdicts = plan(versions, Retention(keep_last=1, keep_daily=3, keep_weekly=0))
    assert [v.version.number for v in verdicts] == [2, 1, 0]
    assert kept(verdicts) == {2: "keep_last #1", 1: "keep_daily #1", 0: "keep_daily #2"}
