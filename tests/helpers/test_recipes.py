"""The admin side's typed calls (labvm/remote/recipes.py) against the node helpers' own
parameter checks: every call labvm builds for a desktop is one its helper accepts."""

import shutil
from pathlib import Path

import pytest

from labvm.config import Node, add_node_to_file, parse_config
from labvm.remote.recipes import (
    DesktopCalls,
    image_status,
    isolation_params,
    mount_mfs,
    remove_image,
    require_image,
    unpack_image,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = "0123456789abcdef" * 4


@pytest.fixture
def calls(tmp_path):
    path = tmp_path / "bkConfxml.xml"
    shutil.copy(REPO / "labvm" / "schema" / "bkConfxml.xml", path)
    add_node_to_file(path, Node(name="n1", host="10.0.0.11"))
    cfg = parse_config(path)
    return DesktopCalls(cfg, cfg.node("n1"), "alice", image=IMAGE)


def every_call(calls: DesktopCalls):
    spec = {"name": "labvm-alice", "image": "labvm/base:0123456789ab", "hostname": "alice", "uid": 2000,
            "memory": 2**30, "ports": {"vnc": 20000}, "bind_address": "10.0.0.11", "desktop_cmd": "xterm"}
    yield calls.mount_mfs()
    yield calls.stack(3, 100 << 30)
    yield calls.unmount_stack()
    yield calls.reset_upper()
    yield calls.remove_local_layers()
    yield calls.quota(100 << 30)
    yield calls.start_sync()
    yield calls.stop_sync(flush=True)
    yield calls.flush(300)
    yield calls.sync_status()
    yield calls.stop_container(20)
    yield calls.remove_container()
    yield from calls.start_container(spec, "Pw-of-alice", {"minimal": "xterm", "xfce": "startxfce4"})
    yield calls.set_owner(op=7, member="0" * 32)
    yield calls.release_owner()
    yield calls.versions()
    yield calls.changed_paths(3)
    yield calls.publish(3, 4, "switch", upper="/mnt/labvm-mfs/vms/alice/up_mfs.snap-4")
    yield image_status(calls.cfg)
    yield require_image(calls.cfg, IMAGE)
    yield unpack_image(calls.cfg, "/var/lib/labvm/incoming/labvm-xfce.tar.gz", IMAGE)
    yield remove_image(calls.cfg, IMAGE)


def test_every_typed_call_is_one_its_helper_accepts(bundle, calls):
    modules = {"mfs": bundle.mfs, "vm": bundle.vm, "sync": bundle.sync, "net": bundle.net, "runtime": bundle.runtime,
               "merge": bundle.merge, "image": bundle.image}
    seen = set()
    for call in every_call(calls):
        action = modules[call.helper].ACTIONS[call.action]
        bundle.contract.validate_params(action.params, call.params)  # raises BadRequest if not
        seen.add(f"{call.helper}.{call.action}")
        assert call.timeout > 0
    assert len(seen) == 24
    assert calls.publish(3, 4, "switch").params["image"] == {"id": IMAGE, **image_status(calls.cfg).params["store"]}


def test_teardown_removes_the_container_before_the_sync_stops_and_the_layers_go():
    cfg = type("Cfg", (), {"storage": type("S", (), {"mfs_mount": "/mnt/m"})()})()
    calls = DesktopCalls(cfg, Node(name="n1", host="10.0.0.11"), "alice")
    assert [(c.helper, c.action) for c in calls.teardown(flush=False)] == [
        ("vm", "remove_container"), ("sync", "ensure_stopped"), ("vm", "ensure_stack_unmounted")]
    assert calls.teardown(flush=True)[1].params["flush"] is True


def test_isolation_denies_moosefs_and_every_node(calls):
    deny = isolation_params(calls.cfg)["deny"]
    assert calls.cfg.storage.mfs_master in deny and "10.0.0.11" in deny
    assert mount_mfs(calls.cfg).params["mount"] == calls.cfg.storage.mfs_mount
