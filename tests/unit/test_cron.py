"""`labvm cron install`: the cron file it writes."""

import os
import stat
from pathlib import Path

import pytest

from labvm.errors import BadInput
from labvm.storage import check_schedule, cron_text, install_cron


def test_cron_text_runs_backup_all_as_root_with_the_cluster_file(tmp_path):
    text = cron_text(Path("/etc/lab vm/bkConfxml.xml"), "17 3 * * *", None, Path("/var/log/labvm-backup.log"),
                     command="/usr/bin/labvm")
    line = text.splitlines()[-1]
    assert line == ("17 3 * * * root /usr/bin/labvm --config '/etc/lab vm/bkConfxml.xml' backup --all "
                    ">> /var/log/labvm-backup.log 2>&1")
    assert "idle" not in text


def test_cron_text_with_idle_stop():
    text = cron_text(Path("/etc/labvm/bkConfxml.xml"), "@daily", "47 * * * *", Path("/tmp/l"), command="labvm")
    assert text.splitlines()[-1].startswith("47 * * * * root labvm --config /etc/labvm/bkConfxml.xml idle --stop")


@pytest.mark.parametrize("bad", ["17 3 * *", "17 3 * * * rm -rf /", "1 2 3 4 5\n* * * * * root x", "@reboot", "1;2 * * * *"])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(BadInput):
        check_schedule(bad)


def test_install_writes_0644_and_reports_no_change_the_second_time(tmp_path):
    path = tmp_path / "labvm"
    text = cron_text(Path("/etc/labvm/bkConfxml.xml"), "17 3 * * *", None, Path("/tmp/l"), command="labvm")
    assert install_cron(text, path) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert path.read_text() == text
    assert install_cron(text, path) is False


def test_install_without_cron_dir_says_so(tmp_path):
    with pytest.raises(Exception, match="is cron installed"):
        install_cron("x\n", tmp_path / "missing" / "labvm")
