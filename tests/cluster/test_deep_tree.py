"""A member's directory chain 1,010 levels deep, on the testbed: past Python's recursion limit,
where `rm`, `restore`, solidify, switch and the sync daemon's hard-link walk all used to fail
with RecursionError. Every node-side walk and removal goes by descriptors, without recursion;
the tree survives a flush, a backup, a switch, a restore and rm --purge, and its deepest file
reads back.

The depth stays under what rsync itself copies (it stops at 1,024 levels): deeper paths are
not copied to MooseFS (they are listed as not synced, and nothing else stops; see
test_sync_attacks). The helper tests take the node-side walks to 10,000 levels.

The tree is built inside the desktop with `mkdir -p` of a chunk of levels at a time and
`cd -P` (a relative chdir)."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import REPO, invoke_testbed, make_admin, wipe_mfs_files
from .test_storage import DATA, MFS, inside, ok, on_node, set_config

USER = "hank"
HANK_PW = "hank-Pw-6620"
CHUNK = 505
CHUNKS = 2  # 1,010 levels
TREE = "/root/deep"
# Each step walks 1,010 nested directories on each side, some of them over MooseFS.
SLOW_S = 1800

# Sets $p to "d/d/.../d" (CHUNK levels) and defines descend: cd -P down the whole chain.
CHAIN = (
    f"p=d; i=1; while [ $i -lt {CHUNK} ]; do p=$p/d; i=$((i+1)); done; "
    f'descend() {{ n=0; while [ $n -lt {CHUNKS} ]; do cd -P "$p" || exit 1; n=$((n+1)); done; }}; '
)
BUILD = (
    f"set -e; mkdir {TREE}; cd {TREE}; {CHAIN}"
    f'n=0; while [ $n -lt {CHUNKS} ]; do mkdir -p "$p"; cd -P "$p"; '
    # A symlink to / at every chunk: nothing on the node may follow it.
    "ln -s / to-root; n=$((n+1)); done; "
    "echo first > bottom; ln bottom bottom-link"
)
READ = f"cd {TREE} && {CHAIN}descend && cat bottom && stat -c %h bottom"
REWRITE = f"cd {TREE} && {CHAIN}descend && echo second > bottom"


@pytest.fixture(scope="module")
def deep(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("deep") / "admin")
    set_config(admin, sync__syncTime=1)
    assert admin.labvm("image", "build", "--desktop", "minimal", timeout=SLOW_S).returncode == 0
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert admin.labvm("user", "add", USER, "--password-stdin", stdin=HANK_PW + "\n").returncode == 0
    wipe_mfs_files(admin, USER)
    created = admin.labvm("create", USER, "--node", "n1", "--memory", "512m")
    assert created.returncode == 0, created.stdout + created.stderr
    yield admin
    admin.labvm("rm", USER, "--yes", timeout=900)
    wipe_mfs_files(admin, USER)


def deepest(admin) -> tuple[str, str]:
    """(content, link count) of the bottom file, read inside the desktop."""
    content, links = inside(admin, USER, READ).split()
    return content, links


def node_of(admin) -> str:
    desktops = admin.labvm_json("status", "--user", USER)["desktops"]
    return next(d for d in desktops if d["user"] == USER)["node"]


def test_a_tree_past_the_recursion_limit_survives_flush_backup_switch_restore_and_purge(deep):
    import pexpect

    inside(deep, USER, BUILD)
    assert deepest(deep) == ("first", "2")

    flushed = json.loads(ok(deep.labvm("sync", "flush", USER, "--json", timeout=SLOW_S)))
    assert flushed.get("mode") == "daemon", flushed
    # The deepest level reached MooseFS; GNU find walks by descriptors, so it sees that far.
    found = on_node("n1", "find", f"{MFS}/vms/{USER}/up_mfs/root/deep", "-name", "bottom-link", "-printf", "%d %n\n")
    assert found.split() == [str(CHUNK * CHUNKS + 1), "2"], found

    backed = json.loads(ok(deep.labvm("backup", USER, "--json", timeout=SLOW_S)))
    assert backed[0]["ok"], backed
    first_version = backed[0]["version"]

    inside(deep, USER, REWRITE)
    ok(deep.labvm("sync", "flush", USER, timeout=SLOW_S))
    switched = ok(deep.labvm("switch", USER, "n2", timeout=SLOW_S))
    assert "downtime:" in switched, switched
    assert node_of(deep) == "n2"
    assert deepest(deep) == ("second", "2")
    # The source's local layers, deep tree and all, are gone once the switch committed.
    assert USER not in on_node("n1", "sh", "-c", f"ls {DATA}/vms 2>/dev/null || true").split()

    restored = ok(deep.labvm("restore", USER, str(first_version), "--yes", timeout=SLOW_S))
    assert f"now shows v{first_version}" in restored, restored
    assert deepest(deep) == ("first", "2")
    kept = int(re.search(r"kept as v(\d+)", restored).group(1))
    assert kept > first_version

    child = pexpect.spawn(
        str(REPO / ".venv" / "bin" / "labvm"), ["rm", USER, "--purge"], env=deep.env, encoding="utf-8", timeout=SLOW_S
    )
    child.expect(f"Type {USER} to confirm")
    child.sendline(USER)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    for node in ("n1", "n2"):
        assert USER not in invoke_testbed("exec", node, "--", "ls", f"{MFS}/vms").stdout.split()
        assert USER not in on_node(node, "sh", "-c", f"ls {DATA}/vms 2>/dev/null || true").split()
    assert deep.labvm_json("status", "--user", USER)["desktops"] == []
