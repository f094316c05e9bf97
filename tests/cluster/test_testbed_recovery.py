"""scripts/testbed up is idempotent, and repairs what a killed run left behind.

This module re-ups the shared testbed, so it runs after the other cluster tests."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from .conftest import NODES, TESTBED, invoke_testbed


def node_check_ok(admin) -> None:
    rows = admin.labvm_json("node", "check")
    assert [r["node"] for r in rows if r["ok"]] == list(NODES), rows


def test_up_twice_in_a_row_keeps_a_working_cluster(admin, testbed):
    node_check_ok(admin)
    invoke_testbed("up", "--nodes", str(len(NODES)))
    assert invoke_testbed("status").returncode == 0
    node_check_ok(admin)


@pytest.mark.parametrize("lines_before_kill", [1, 4, 8])
def test_up_after_kill_9_midway_gives_a_working_cluster(admin, testbed, lines_before_kill):
    invoke_testbed("down")
    proc = subprocess.Popen(
        [sys.executable, str(TESTBED), "up", "--nodes", str(len(NODES))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if len(seen) >= lines_before_kill:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"up finished before it could be killed: {seen}"
    invoke_testbed("up", "--nodes", str(len(NODES)))
    assert invoke_testbed("status").returncode == 0
    node_check_ok(admin)
