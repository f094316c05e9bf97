"""A tmpfs for the merge tests: overlay upper, work dir, lower copies and the merge target on
one filesystem (the engine renames between them), with trusted and user xattrs, whiteouts and
hard links, and nothing left on disk after a crash of the test run."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .trees import detach

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlays and tmpfs: needs root")


@pytest.fixture(scope="module")
def scratch_fs():
    if os.geteuid() != 0:
        pytest.skip("mounts overlays and tmpfs: needs root")
    root = Path(tempfile.mkdtemp(prefix="labvm-merge-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "labvm-merge-test", str(root)], check=True)
    try:
        yield root
    finally:
        detach_all_below(root)
        detach(root)
        root.rmdir()


@pytest.fixture
def scratch(scratch_fs):
    directory = Path(tempfile.mkdtemp(dir=scratch_fs))
    try:
        yield directory
    finally:
        detach_all_below(directory)
        shutil.rmtree(directory)


def detach_all_below(root) -> None:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as stream:
        points = [line.split()[4] for line in stream]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        detach(point)
