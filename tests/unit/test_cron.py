"""`labvm cron install`: the cron file it writes."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from labvm.errors import BadInput
from labvm.storage import check_schedule, cron_text, install_cron


def test_cron_text_runs_backup_all_as_root_with_the_cluster_file(tmp_path):
    text = cron_text(Path("/etc/lab vm/bkConfxml.xml"), "17 3 * * *", None, Path("/var/log/labvm-backup.log"),
                     command=["/usr/bin/labvm"])
    line = text.splitlines()[-1]
    assert line == ("17 3 * * * root /usr/bin/labvm --config '/etc/lab vm/bkConfxml.xml' backup --all "
                    ">> /var/log/labvm-backup.log 2>&1")
    assert "idle" not in text
    # The desktops' certificates are renewed daily, before they are due to expire.
    assert ("41 4 * * * root /usr/bin/labvm --config '/etc/lab vm/bkConfxml.xml' ca renew "
            ">> /var/log/labvm-backup.log 2>&1") in text.splitlines()


def test_cron_text_with_idle_stop():
    text = cron_text(Path("/etc/labvm/bkConfxml.xml"), "@daily", "47 * * * *", Path("/tmp/l"), command=["labvm"])
    assert text.splitlines()[-1].startswith("47 * * * * root labvm --config /etc/labvm/bkConfxml.xml idle --stop")


@pytest.mark.parametrize("bad", ["17 3 * *", "17 3 * * * rm -rf /", "1 2 3 4 5\n* * * * * root x", "@reboot", "1;2 * * * *"])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(BadInput):
        check_schedule(bad)


def test_install_writes_0644_and_reports_no_change_the_second_time(tmp_path):
    path = tmp_path / "labvm"
    text = cron_text(Path("/etc/labvm/bkConfxml.xml"), "17 3 * * *", None, Path("/tmp/l"), command=["labvm"])
    assert install_cron(text, path) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert path.read_text() == text
    assert install_cron(text, path) is False


def test_install_without_cron_dir_says_so(tmp_path):
    with pytest.raises(Exception, match="is cron installed"):
        install_cron("x\n", tmp_path / "missing" / "labvm")


def as_cron_runs_it(line: str) -> tuple[str, str]:
    """The command cron hands to /bin/sh, and what it feeds on stdin: everything after the first
    unescaped '%', whose later '%'s become newlines; '\\%' stands for '%' (cron's do_command)."""
    command, escaped = [], False
    for index, char in enumerate(line):
        if escaped:
            if char == "%":
                command.pop()
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "%":
            return "".join(command), line[index + 1:].replace("%", "\n")
        command.append(char)
    return "".join(command), ""


HOSTILE_PATHS = [
    "/etc/x%0 * * * * root touch pwned%",
    "/etc/it's; touch pwned`id`$(id) %s %%",
    "/etc/labvm/*.xml ~root {a,b} #comment",
]


@pytest.mark.parametrize("hostile", HOSTILE_PATHS)
def test_a_hostile_path_stays_one_argument_of_one_command(tmp_path, hostile):
    """Run the cron line as cron would, with a stand-in for labvm that records its argv: the
    paths arrive intact, nothing else runs, and cron feeds nothing on stdin."""
    record = tmp_path / "argv.json"
    stand_in = tmp_path / "labvm"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    stand_in.chmod(0o755)
    log = tmp_path / ("log %" + hostile.replace("/", "_"))
    text = cron_text(Path(hostile), "17 3 * * *", None, log, command=[str(stand_in)])
    assert len(text.splitlines()) == 5
    line = text.splitlines()[-1]
    assert line.startswith("17 3 * * * root ")
    command, stdin = as_cron_runs_it(line.removeprefix("17 3 * * * root "))
    assert stdin == ""
    subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, check=True, timeout=60)
    assert json.loads(record.read_text()) == ["--config", hostile, "backup", "--all"]
    assert log.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["argv.json", "labvm", log.name])


@pytest.mark.parametrize("bad", ["/etc/a\nb", "/etc/a\rb", "/etc/a\x00b", "/etc/a\\%b", "/etc/\x1b[2Jx"])
def test_paths_cron_cannot_carry_are_refused(bad):
    for config, log in ((Path(bad), Path("/var/log/l")), (Path("/etc/labvm/c.xml"), Path(bad))):
        with pytest.raises(BadInput, match="cron cannot carry"):
            cron_text(config, "17 3 * * *", None, log, command=["labvm"])


def test_cron_install_refuses_a_hostile_log_path_with_exit_2(tmp_path, monkeypatch, capsys):
    from labvm.cli import main

    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    cron_file = tmp_path / "cron.d" / "labvm"
    cron_file.parent.mkdir()
    assert main(["cron", "install", "--file", str(cron_file), "--log", "/var/log/x\n* * * * * root id"]) == 2
    assert "cron cannot carry" in capsys.readouterr().err
    assert not cron_file.exists()
