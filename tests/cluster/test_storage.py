"""A desktop's files on MooseFS, on the testbed: sync, flush, versions, backup, restore.

Files are written inside the desktop (through `labvm exec`, or through its overlay on the node
for xattrs, which the minimal image has no tool to set) and checked on MooseFS from inside the
node's namespace, where the node's own mfsmount shows them."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from lxml import etree

from .conftest import invoke_testbed, make_admin, wipe_mfs_files

CAROL_PW = "carol-Pw-5521"
DAVE_PW = "dave-Pw-7731"
MFS = "/mnt/labvm-mfs"
DATA = "/var/lib/labvm/data"


def set_config(admin, **values) -> None:
    """Rewrite elements of the admin's cluster file, e.g. sync/syncTime=1."""
    tree = etree.parse(str(admin.config))
    for path, value in values.items():
        parent_name, name = path.split("__")
        parent = tree.getroot().find(parent_name)
        if parent is None:
            parent = etree.SubElement(tree.getroot(), parent_name)
        el = parent.find(name)
        if el is None:
            el = etree.SubElement(parent, name)
        el.text = str(value)
    tree.write(str(admin.config), xml_declaration=True, encoding="UTF-8")


@pytest.fixture(scope="module")
def store(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("store") / "admin")
    set_config(admin, sync__syncTime=1, retention__keep_last=2, retention__keep_daily=0, retention__keep_weekly=0)
    assert admin.labvm("image", "build", "--desktop", "minimal", timeout=1800).returncode == 0
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    for name, pw in (("carol", CAROL_PW), ("dave", DAVE_PW)):
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=pw + "\n").returncode == 0
    wipe_mfs_files(admin, "carol", "dave")
    yield admin
    for name in ("carol", "dave"):
        admin.labvm("rm", name, "--yes")
    wipe_mfs_files(admin, "carol", "dave")


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def inside(admin, user: str, script: str) -> str:
    return ok(admin.labvm("exec", user, "--", "sh", "-c", script))


def on_node(node: str, *argv: str) -> str:
    return invoke_testbed("exec", node, "--", *argv).stdout


def tree_sums(node: str, root: str) -> dict[str, str]:
    """path -> 'type mode uid:gid content-hash-or-target' for every entry under root, from the node."""
    script = (
        "cd \"$1\" && find . -mindepth 1 \\( -type f -printf '%P\\tf %m %U:%G ' -exec sh -c 'sha256sum < \"$1\" | cut -c1-16' _ {} \\; \\)"
        " -o \\( -type l -printf '%P\\tl %m %U:%G %l\\n' \\) -o \\( -type d -printf '%P\\td %m %U:%G\\n' \\)"
        " -o -printf '%P\\t%y %m %U:%G\\n'"
    )
    out = on_node(node, "sh", "-c", script, "sh", root)
    return dict(line.split("\t", 1) for line in out.splitlines() if line)


def merged_home(user: str) -> str:
    return f"{DATA}/vms/{user}/merge_local/home/{user}"


def test_writes_reach_mfs_after_a_flush_dotfiles_modes_xattrs_and_whiteouts(store):
    created = store.labvm_json("create", "carol", "--node", "n1", "--memory", "512m")
    assert created["state"] == "running"
    inside(store, "carol", "mkdir -p /home/carol/.config/app /srv/data && echo secret > /home/carol/.config/app/rc"
                           " && echo hidden > /home/carol/.profile_extra && chmod 0640 /home/carol/.profile_extra"
                           " && chown 1234:2345 /srv/data && echo tool > /usr/local/bin/tool && chmod 0755 /usr/local/bin/tool"
                           " && ln -s /usr/local/bin/tool /srv/data/link && rm /etc/issue")
    # An xattr set through the overlay, as a program in the desktop would.
    on_node("n1", "setfattr", "-n", "user.labvm.test", "-v", "kept", f"{merged_home('carol')}/.profile_extra")
    flushed = store.labvm_json("sync", "flush", "carol")
    assert flushed.get("mode") == "daemon", flushed

    up_mfs = f"{MFS}/vms/carol/up_mfs"
    sums = tree_sums("n1", up_mfs)
    assert sums["home/carol/.config/app/rc"].startswith("f 644 0:0 ")
    assert sums["home/carol/.profile_extra"].startswith("f 640 0:0 ")
    assert sums["srv/data"] == "d 755 1234:2345"
    assert sums["srv/data/link"].endswith(" /usr/local/bin/tool")
    assert sums["usr/local/bin/tool"].startswith("f 755 ")
    # The deleted lower file is a whiteout: a character device 0/0.
    assert on_node("n1", "stat", "-c", "%F %t:%T", f"{up_mfs}/etc/issue").strip() == "character special file 0:0"
    xattr = on_node("n1", "getfattr", "--only-values", "-n", "user.labvm.test", f"{up_mfs}/home/carol/.profile_extra")
    assert xattr == "kept"


def test_stop_solidify_start_shows_the_same_tree(store):
    before = tree_sums("n1", f"{DATA}/vms/carol/merge_local/home/carol")
    before_srv = tree_sums("n1", f"{DATA}/vms/carol/merge_local/srv")
    assert ".config/app/rc" in before
    ok(store.labvm("stop", "carol"))
    solid = ok(store.labvm("solidify", "carol"))
    assert re.search(r"now runs on v1\b", solid), solid
    # The upper layer starts empty again; the version holds it all. A version lies over the
    # shared image, so the deleted image file stays hidden by a whiteout kept in the version.
    assert on_node("n1", "find", f"{MFS}/vms/carol/up_mfs", "-mindepth", "1").strip() == ""
    whiteout = on_node("n1", "stat", "-c", "%F %t:%T", f"{MFS}/vms/carol/low_mfs.v1/etc/issue")
    assert whiteout.strip() == "character special file 0:0"
    ok(store.labvm("start", "carol"))
    assert tree_sums("n1", f"{DATA}/vms/carol/merge_local/home/carol") == before
    assert tree_sums("n1", f"{DATA}/vms/carol/merge_local/srv") == before_srv
    assert "issue" not in inside(store, "carol", "ls -A /etc").split()
    assert inside(store, "carol", "cat /home/carol/.config/app/rc").strip() == "secret"


def test_backup_all_versions_each_desktop_and_prunes(store):
    dave = store.labvm_json("create", "dave", "--node", "n2", "--memory", "512m")
    inside(store, "dave", "echo dave > /home/dave/notes.txt")
    ok(store.labvm("stop", "dave"))
    for _ in range(3):
        inside(store, "carol", "date +%s%N >> /home/carol/log.txt")
        result = store.labvm("backup", "--all")
        out = ok(result)
        assert re.search(r"^carol: v\d+ published", out, re.M) and re.search(r"^dave: v\d+ published", out, re.M), out
    assert dave["node"] == "n2"
    versions = store.labvm_json("versions", "carol")
    kept_by = {v["version"]: v["kept_by"] for v in versions["versions"]}
    # keep_last=2 keeps the newest two backups and prunes the third. Versions made for other
    # reasons do not count: the solidify carol runs on (v1) and v0 (create) are the two recent
    # ones of their kind.
    backups = sorted(v["version"] for v in versions["versions"] if v["reason"] == "backup")
    assert len(backups) == 2, versions
    assert kept_by == {versions["in_use"]: "recent solidify #1", 0: "recent create #2",
                       backups[1]: "keep_last #1", backups[0]: "keep_last #2"}, versions
    dave_versions = store.labvm_json("versions", "dave")
    assert len(dave_versions["versions"]) >= 2  # v0 and the backups kept by the rule


def test_backup_while_running_keeps_it_running_and_restore_brings_back_a_deleted_file(store, tmp_path):
    inside(store, "carol", "echo precious > /home/carol/precious.txt")
    backed = store.labvm_json("backup", "carol")
    assert backed[0]["ok"], backed
    version = backed[0]["version"]
    assert store.labvm_json("status", "--user", "carol")  # still there
    assert inside(store, "carol", "echo alive").strip() == "alive"  # thawed: it answers
    inside(store, "carol", "rm /home/carol/precious.txt")
    # One file out of a version, without touching the desktop.
    got = tmp_path / "precious.txt"
    ok(store.labvm("files", "carol", "/home/carol/precious.txt", "--version", str(version), "--get", str(got)))
    assert got.read_text() == "precious\n"
    restored = ok(store.labvm("restore", "carol", str(version), "--yes"))
    assert f"now shows v{version}" in restored
    assert inside(store, "carol", "cat /home/carol/precious.txt").strip() == "precious"
    # What the desktop had before the restore is a version of its own.
    kept = int(re.search(r"kept as v(\d+)", restored).group(1))
    out = store.labvm("files", "carol", "/home/carol/precious.txt", "--version", str(kept), "--get", str(tmp_path / "gone"))
    assert out.returncode == 4, out.stderr  # deleted in that state: not found


def test_restoring_a_version_that_is_not_there_leaves_the_desktop_running(store):
    refused = store.labvm("restore", "carol", "999", "--yes")
    assert refused.returncode == 4 and "no version 999" in refused.stderr, refused.stderr
    desktop = store.labvm_json("status", "--user", "carol")["desktops"][0]
    assert desktop["state"] == "running" and desktop["container_state"] == "running"
    assert inside(store, "carol", "echo alive").strip() == "alive"


def test_backup_is_locked_against_overlap(store):
    lock = store.home / "backup.lock"
    holder = subprocess.Popen(["flock", "-o", str(lock), "sleep", "30"])  # -o: sleep does not inherit the lock
    try:
        time.sleep(0.5)
        result = store.labvm("backup", "--all")
        assert result.returncode == 75, result.stdout + result.stderr
        assert "another labvm backup is running" in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_versions_json_is_readable(store):
    data = json.loads(ok(store.labvm("versions", "carol", "--json")))
    assert {"user", "in_use", "versions"} <= set(data)


def test_cron_install_writes_the_entry(store, tmp_path):
    path = tmp_path / "labvm.cron"
    ok(store.labvm("cron", "install", "--file", str(path), "--schedule", "5 4 * * *"))
    line = path.read_text().splitlines()[-1]
    assert line.startswith("5 4 * * * root ") and f"--config {store.config}" in line and line.split(">>")[0].rstrip().endswith("backup --all")


def test_start_thaws_a_desktop_a_killed_backup_left_frozen(store, testbed):
    from .test_desktops import node_docker

    container = node_docker(testbed, "n1").containers.get("labvm-carol")
    container.pause()  # what a backup killed between its freeze and thaw leaves behind
    container.reload()
    assert container.status == "paused"
    ok(store.labvm("start", "carol"))
    container.reload()
    assert container.status == "running"
    assert inside(store, "carol", "echo thawed").strip() == "thawed"


def test_a_switch_keeps_the_nights_backup_under_keep_last_3(store):
    """Every switch publishes a version. Retention counts backups only, so a morning of
    switches after the night's backup leaves that backup kept; the switches' own versions
    are kept apart, the newest keep_last of them."""
    set_config(store, retention__keep_last=3)
    try:
        night = store.labvm_json("backup", "dave")[0]
        assert night["ok"], night
        node = store.labvm_json("status", "--user", "dave")["desktops"][0]["node"]
        switched = []
        for _ in range(5):
            node = "n1" if node == "n2" else "n2"
            moved = store.labvm("switch", "dave", node, "--json", timeout=900)
            switched.append(json.loads(ok(moved))["version"])

        versions = store.labvm_json("versions", "dave")
        shown = {v["version"]: v for v in versions["versions"]}
        assert versions["in_use"] == switched[-1], versions
        assert (shown[night["version"]]["reason"], shown[night["version"]]["kept_by"]) == ("backup", "keep_last #1")
        assert [shown[n]["reason"] for n in switched] == ["switch"] * 5
        assert [shown[n]["kept_by"] for n in reversed(switched)] == [
            "recent switch #1", "recent switch #2", "recent switch #3", None, None]
        table = ok(store.labvm("versions", "dave"))
        assert re.search(rf"^│ v{night['version']} +│ [^│]+│ backup +│", table, re.M), table

        # The next backup prunes the two oldest switches' versions, never the night's backup.
        morning = store.labvm_json("backup", "dave")[0]
        assert morning["ok"], morning
        assert set(switched[:2]) <= set(morning["pruned"]) and night["version"] not in morning["pruned"], morning
        after = {v["version"]: v["kept_by"] for v in store.labvm_json("versions", "dave")["versions"]}
        assert after[night["version"]] == "keep_last #2" and after[morning["version"]] == "keep_last #1", after
        assert all(n in after for n in switched[2:]), after
    finally:
        set_config(store, retention__keep_last=2)
