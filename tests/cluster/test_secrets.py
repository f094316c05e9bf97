"""No secret in any process's argv or environment, on the admin host or on a node, while
`labvm user add` and helper calls run. The testbed's nodes share this machine's PID
namespace, so /proc here shows the node-side processes too."""

from __future__ import annotations

import os
import threading

import pytest

from labvm.config import parse_config
from labvm.errors import HelperFailed
from labvm.remote.connection import NodeConnection
from labvm.remote.helpers import HelperBundle, HelperRunner

CANARY = "Canary-7f3a-not-a-real-password"


class ProcWatcher(threading.Thread):
    """Reads every process's cmdline and environ over and over until stopped."""

    def __init__(self, needle: str):
        super().__init__(daemon=True)
        self.needle = needle.encode()
        self.stop = threading.Event()
        self.leaks: list[str] = []
        self.seen: set[bytes] = set()

    def run(self):
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                for part in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{part}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    if part == "cmdline":
                        self.seen.add(data)
                    if self.needle in data:
                        self.leaks.append(f"pid {pid} {part}: {data[:200]!r}")

    def saw(self, fragment: bytes) -> bool:
        return any(fragment in cmdline for cmdline in self.seen)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(10)


def test_user_add_keeps_the_password_out_of_argv_and_environment(admin):
    with ProcWatcher(CANARY) as watcher:
        for name in ("alice", "bobby", "carol"):
            result = admin.labvm("user", "add", name, "--password-stdin", stdin=CANARY + "\n")
            assert result.returncode == 0, result.stderr
            assert CANARY not in result.stdout + result.stderr
    assert watcher.saw(b"user\x00add\x00alice"), "the watcher never saw labvm run; it proves nothing"
    assert watcher.leaks == []


def test_helper_calls_carry_secrets_on_stdin_only(admin):
    cfg = parse_config(admin.config)
    bundle = HelperBundle.from_package()
    with NodeConnection(cfg.node("n1"), admin.home) as conn:
        runner = HelperRunner(conn, bundle)
        runner.ensure_installed()
        with ProcWatcher(CANARY) as watcher:
            for _ in range(15):
                with pytest.raises(HelperFailed) as err:
                    # probe takes no secrets, so it refuses the request; the secret still
                    # travelled over SSH and into the helper's stdin, which is what is checked.
                    runner.call("probe", "facts", {"password": CANARY})
                assert CANARY not in str(err.value)
                runner.call("probe", "facts", {})
    assert watcher.saw(b"labvm_helper.py\x00probe"), "the watcher never saw a helper run; it proves nothing"
    assert watcher.leaks == []
