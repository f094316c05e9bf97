"""The retention rule: which versions a backup keeps, and why."""

import time

from labvm.config import Retention
from labvm.retention import Version, plan
from labvm.storage import versions_from_reply

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


# --- why a version exists: backups are counted, the others kept apart ---------------------------


def night_and_morning() -> list[Version]:
    """v0 at create, a backup each of the last two nights (03:17), then five switches this morning."""
    night = day_start(0) - 9 * 3600 + 17 * 60
    return [
        Version(0, night - 30 * DAY, reason="create"),
        Version(1, night - DAY, reason="backup"),
        Version(2, night, reason="backup"),
        *(Version(3 + i, night + 5 * 3600 + i * 600, reason="switch") for i in range(5)),
    ]


def test_a_morning_of_switches_keeps_the_nights_backup():
    verdicts = plan(night_and_morning(), Retention(keep_last=3, keep_daily=0, keep_weekly=0), in_use={7})
    assert kept(verdicts) == {
        2: "keep_last #1", 1: "keep_last #2",
        7: "recent switch #1", 6: "recent switch #2", 5: "recent switch #3",
    }  # fmt: skip


def test_switches_neither_count_toward_a_rule_nor_use_up_its_day():
    versions = [
        Version(1, day_start(2), reason="backup"),
        Version(2, day_start(1), reason="backup"),
        Version(3, day_start(0), reason="backup"),
        Version(4, day_start(0) + 60, reason="switch"),
        Version(5, day_start(0) + 120, reason="restore"),
    ]
    verdicts = plan(versions, Retention(keep_last=1, keep_daily=2, keep_weekly=0), in_use={5})
    assert kept(verdicts) == {3: "keep_last #1", 2: "keep_daily #1", 1: "keep_daily #2", 5: "recent restore #1"}


def test_every_kind_of_operation_shares_the_recent_slots():
    versions = [Version(1, day_start(0), reason="backup")] + [
        Version(n, day_start(0) + n, reason=reason)
        for n, reason in ((2, "solidify"), (3, "switch"), (4, "restore"), (5, "rebase"), (6, "remove"))
    ]
    verdicts = plan(versions, Retention(keep_last=2, keep_daily=0, keep_weekly=0))
    assert kept(verdicts) == {1: "keep_last #1", 6: "recent remove #1", 5: "recent rebase #2"}


def test_versions_of_unknown_reason_are_counted_as_backups():
    versions = [
        Version(1, day_start(3)),
        Version(2, day_start(2)),
        Version(3, day_start(1), reason="not a reason this labvm knows"),
        Version(4, day_start(0), reason="switch"),
    ]
    verdicts = plan(versions, Retention(keep_last=2, keep_daily=0, keep_weekly=0), in_use={4})
    assert kept(verdicts) == {3: "keep_last #1", 2: "keep_last #2", 4: "recent switch #1"}
    assert [v.version.counts_as_backup for v in verdicts] == [False, True, True, True]


def test_the_create_version_is_kept_like_the_other_operations():
    versions = night_and_morning()[:1] + [Version(n, day_start(0) + n, reason="switch") for n in (1, 2)]
    assert kept(plan(versions, Retention(keep_last=3, keep_daily=0, keep_weekly=0))) == {
        2: "recent switch #1", 1: "recent switch #2", 0: "recent create #3"}
    assert kept(plan(versions, Retention(keep_last=2, keep_daily=0, keep_weekly=0))) == {
        2: "recent switch #1", 1: "recent switch #2"}


def test_the_create_version_alone_is_kept_as_the_newest():
    verdicts = plan([Version(0, day_start(0), reason="create")], Retention(keep_last=0, keep_daily=0, keep_weekly=0))
    assert kept(verdicts) == {0: "newest"}


def test_the_newest_and_the_version_in_use_are_kept_whatever_their_reason():
    versions = night_and_morning()
    verdicts = plan(versions, Retention(keep_last=0, keep_daily=0, keep_weekly=0), in_use={3})
    assert kept(verdicts) == {7: "newest", 3: "in use"}
    verdicts = plan(versions, Retention(keep_last=1, keep_daily=0, keep_weekly=0), in_use={1})
    assert kept(verdicts) == {2: "keep_last #1", 7: "recent switch #1", 1: "in use"}


def test_the_reason_a_node_gives_is_kept_only_when_labvm_knows_it():
    reply = {"versions": [
        {"version": 0, "created": 1.0, "reason": "create"},
        {"version": 1, "created": 2.0, "reason": "backup"},
        {"version": 2, "created": 3.0},
        {"version": 3, "created": 4.0, "reason": "\x1b[2Jholiday"},
        {"version": 4, "created": 5.0, "reason": ["switch"]},
    ]}  # fmt: skip
    versions = versions_from_reply(reply)
    assert [v.reason for v in versions] == ["create", "backup", None, None, None]
    assert versions[1].as_dict() == {"version": 1, "created": 2.0, "files": None, "bytes": None, "base": None,
                                     "reason": "backup"}
