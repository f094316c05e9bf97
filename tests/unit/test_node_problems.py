"""What `labvm node check` and status call a node's problems, from its facts."""

from labvm.nodes import node_problems
from labvm.remote.pool import NodeOutcome

TOOLS = {"mfsmount": "/usr/bin/mfsmount", "rsync": "/usr/bin/rsync", "mkfs.ext4": "/sbin/mkfs.ext4",
         "resize2fs": "/sbin/resize2fs", "losetup": "/sbin/losetup", "stunnel4": "/usr/bin/stunnel4"}
HEALTHY = {"overlayfs": True, "fuse": True, "docker": {"ok": True}, "tools": TOOLS, "mfs": {"mounted": True}}


def test_a_healthy_node_has_none():
    assert node_problems(NodeOutcome("n1", HEALTHY)) == []


def test_a_node_without_stunnel_cannot_serve_the_desktops_https():
    facts = {**HEALTHY, "tools": {**TOOLS, "stunnel4": None}}
    assert node_problems(NodeOutcome("n1", facts)) == ["stunnel4 missing (it serves the desktops' HTTPS)"]


def test_missing_tools_are_named():
    facts = {**HEALTHY, "tools": {**TOOLS, "rsync": None, "losetup": None}}
    assert node_problems(NodeOutcome("n1", facts)) == ["rsync missing", "losetup missing"]
