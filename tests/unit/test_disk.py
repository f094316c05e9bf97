"""A desktop's disk size on the admin side: parsed, checked and grown, never shrunk."""

from pathlib import Path

import pytest

from labvm.config import ClusterConfig, Storage, VmDefaults
from labvm.desktops import Desktop, Desktops, LimitOverrides, parse_disk, resolve_limits
from labvm.errors import BadInput


def config(**defaults) -> ClusterConfig:
    return ClusterConfig(path=Path("/etc/labvm/bkConfxml.xml"), storage=Storage("m", "/mnt/labvm-mfs", "/labvm"), xfce_local="/x",
                         vm_defaults=VmDefaults(**defaults))


@pytest.mark.parametrize("text, size", [("256m", 256 << 20), ("100g", 100 << 30), ("2t", 2 << 40)])
def test_disk_sizes(text, size):
    assert parse_disk(text) == size


@pytest.mark.parametrize("text, fragment", [("100m", "at least 256m"), ("0", "at least 256m"), ("lots", "not a size"),
                                            ("2048t", "at most")])
def test_bad_disk_sizes_are_refused_before_anything_happens(text, fragment):
    with pytest.raises(BadInput, match=fragment):
        parse_disk(text)


def test_create_takes_the_default_disk_unless_told(tmp_path):
    assert resolve_limits(config(disk=50 << 30), LimitOverrides()).disk == 50 << 30
    assert resolve_limits(config(), LimitOverrides(disk="300g")).disk == 300 << 30


def plan(limits: dict, size: int, **defaults) -> dict:
    desktops = Desktops.__new__(Desktops)
    desktops.cfg = config(**defaults)
    return desktops._resize_plan(Desktop("alice", "n1", "running", 20000, None, limits, 0), size)


def test_resize_plans_growth_and_refuses_to_shrink():
    grown = plan({"disk": 10 << 30}, 20 << 30)
    assert grown["changes"] is True and (grown["from"], grown["to"]) == (10 << 30, 20 << 30)
    assert plan({"disk": 10 << 30}, 10 << 30)["changes"] is False
    with pytest.raises(BadInput, match="grow, not shrink"):
        plan({"disk": 10 << 30}, 5 << 30)


def test_a_desktop_recorded_before_disks_had_sizes_has_the_default():
    assert plan({}, 200 << 30, disk=100 << 30)["from"] == 100 << 30
