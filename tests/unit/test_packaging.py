"""An installed labvm (a wheel, not this checkout) carries its node helpers, schema and starter file."""

import subprocess
import sys
import zipfile
from pathlib import Path

from labvm.remote.helpers import HelperBundle

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_helpers_schema_and_starter(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = tmp_path.glob("labvm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"labvm/schema/bkConfxml.xsd", "labvm/schema/bkConfxml.xml", "labvm/cli.py"} <= names
    bundle = HelperBundle.from_package()
    with zipfile.ZipFile(wheel) as zf:
        for name, data in bundle.files:
            assert zf.read(f"labvm/node_helpers/{name}") == data
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "labvm = labvm.cli:main" in entry_points
