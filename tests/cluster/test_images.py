"""Desktop images side by side: a push never touches an image in use, each desktop records its
image, rebase moves one desktop onto another image and back, switch sends the image a target
lacks, image rm refuses an image in use, and image roll stops at the first failure with that
desktop as it was.

A is the XFCE image, B the minimal one (it has twm and xterm, which A lacks).
"""

from __future__ import annotations

import json

import pytest

from .conftest import invoke_testbed, make_admin, wipe_mfs_files
from .test_hostile_member import inside

USERS = {"alice": "alice-Pw-7101", "bob": "bob-Pw-7102"}
IMAGES = "/var/lib/labvm/images"
B_ONLY = "/usr/bin/twm"


def built_id(admin, desktop: str) -> str:
    built = admin.labvm("image", "build", "--desktop", desktop, "--json", timeout=1800)
    assert built.returncode == 0, built.stderr
    return json.loads(built.stdout)["sha256"]


def node_sh(node: str, script: str, check: bool = True):
    return invoke_testbed("exec", node, "--", "sh", "-c", script, check=check)


def status_of(admin, user: str) -> dict:
    doc = admin.labvm_json("status", "--user", user, ok_codes=(0, 7))
    return next(d for d in doc["desktops"] if d["user"] == user)


def image_list(admin) -> dict[str, dict]:
    return {image["id"]: image for image in admin.labvm_json("image", "list")}


@pytest.fixture(scope="module")
def lab(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("images") / "admin")
    a = built_id(admin, "xfce")
    pushed = admin.labvm("image", "push", a, "n1", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    for name, password in USERS.items():
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=password + "\n").returncode == 0
    wipe_mfs_files(admin, *USERS)
    created = admin.labvm("create", "alice", "--node", "n1", "--memory", "1g", "--image", a[:12], timeout=600)
    assert created.returncode == 0, created.stdout + created.stderr
    member_changes = ("mkdir -p /usr/local/bin && echo marker > /usr/local/bin/marker && "
                      "echo mine > /home/alice/notes && rm /etc/motd")
    assert inside(admin, "alice", member_changes).returncode == 0
    admin.a = a
    yield admin
    for name in USERS:
        admin.labvm("rm", name, "--yes", timeout=600)


def alice_files(admin) -> str:
    shown = inside(admin, "alice", f"cat /usr/local/bin/marker /home/alice/notes; test -e /etc/motd && echo motd; "
                                   f"test -e {B_ONLY} && echo b-only; true")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return shown.stdout


def test_push_beside_a_running_desktop_then_rebase_there_and_back(lab):
    a = lab.a
    assert status_of(lab, "alice")["image"] == a
    started = inside(lab, "alice", "cat /proc/1/stat | cut -d' ' -f22").stdout
    b = built_id(lab, "minimal")
    assert b != a
    pushed = lab.labvm("image", "push", b, "n1", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert f"pushing image {b[:12]}" in pushed.stdout
    # alice did not notice: same container, same files, still on A; n1 holds both.
    assert inside(lab, "alice", "cat /proc/1/stat | cut -d' ' -f22").stdout == started
    assert alice_files(lab) == "marker\nmine\n"
    assert status_of(lab, "alice")["image"] == a
    images = image_list(lab)
    assert images[a]["desktops"] == ["alice"] and "n1" in images[a]["nodes"] and images[a]["kind"] == "xfce"
    assert images[b]["desktops"] == [] and "n1" in images[b]["nodes"] and images[b]["kind"] == "minimal"
    node = next(n for n in lab.labvm_json("status", ok_codes=(0, 7))["nodes"] if n["name"] == "n1")
    assert {a, b} <= set(node["image"])

    plan = lab.labvm("rebase", "alice", "--image", b[:12], "--dry-run", "--json")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    checks = {c["name"]: c for c in json.loads(plan.stdout)["checks"]}
    assert checks["conflicts"]["ok"]
    assert status_of(lab, "alice")["image"] == a  # the dry run changed nothing

    moved = lab.labvm("rebase", "alice", "--image", b[:12], "--yes", timeout=900)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert status_of(lab, "alice")["image"] == b and status_of(lab, "alice")["state"] == "running"
    # Her files stay, her deletion holds, and what only B has appears.
    assert alice_files(lab) == "marker\nmine\nb-only\n"

    back = lab.labvm("rebase", "alice", "--image", a[:12], "--yes", timeout=900)
    assert back.returncode == 0, back.stdout + back.stderr
    assert status_of(lab, "alice")["image"] == a
    assert alice_files(lab) == "marker\nmine\n"


def test_a_cached_rebuild_is_what_push_sends(lab):
    again = built_id(lab, "xfce")  # cached: the build of the first test
    assert again == lab.a
    pushed = lab.labvm("image", "push", timeout=900)  # the newest: the one asked for last
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert f"pushing image {lab.a[:12]}" in pushed.stdout


def test_switch_sends_the_image_the_target_lacks(lab):
    b = next(i for i, image in image_list(lab).items() if image["kind"] == "minimal" and image["on_admin_host"])
    # B is unused now (alice is back on A): gc takes it off the nodes, and A stays.
    collected = lab.labvm("image", "gc", "--json")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert b in json.loads(collected.stdout)["removed"]["n1"] and lab.a in json.loads(collected.stdout)["kept"]["n1"]
    assert image_list(lab)[b]["nodes"] == []
    # alice onto B again (sent to n1 by the rebase), then to n2, which lacks it.
    assert lab.labvm("rebase", "alice", "--image", b[:12], "--yes", timeout=900).returncode == 0
    assert image_list(lab)[b]["nodes"] == ["n1"]
    plan = lab.labvm("switch", "alice", "n2", "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"send image {b[:12]} to n2" in " ".join(plan.stdout.split())
    switched = lab.labvm("switch", "alice", "n2", timeout=900)
    assert switched.returncode == 0, switched.stdout + switched.stderr
    alice = status_of(lab, "alice")
    assert alice["node"] == "n2" and alice["image"] == b and alice["state"] == "running"
    assert node_sh("n2", f"test -f {IMAGES}/{b}/.labvm-image.json").returncode == 0
    assert alice_files(lab) == "marker\nmine\nb-only\n"


def test_image_rm_refuses_an_image_in_use_and_names_the_desktops(lab):
    b = status_of(lab, "alice")["image"]
    refused = lab.labvm("image", "rm", b[:12], "--yes")
    assert refused.returncode == 9, refused.stdout + refused.stderr
    assert "alice" in refused.stderr
    assert b in image_list(lab)


def test_image_roll_stops_at_the_first_failure_and_leaves_that_desktop_as_it_was(lab):
    a, b = lab.a, status_of(lab, "alice")["image"]
    # alice (on n2) and bob (on n1) both run over A; B is pushed everywhere, then broken on n1
    # (its shell gone): bob's start over B fails there.
    assert lab.labvm("rebase", "alice", "--image", a[:12], "--yes", timeout=900).returncode == 0
    created = lab.labvm("create", "bob", "--node", "n1", "--memory", "512m", "--image", a[:12], timeout=600)
    assert created.returncode == 0, created.stdout + created.stderr
    assert inside(lab, "bob", "echo bobs > /root/bobs").returncode == 0
    assert lab.labvm("image", "push", b[:12], timeout=900).returncode == 0
    node_sh("n1", f"rm -f {IMAGES}/{b}/usr/bin/dash {IMAGES}/{b}/usr/bin/sh {IMAGES}/{b}/usr/bin/bash")
    try:
        rolled = lab.labvm("image", "roll", b[:12], "--yes", "--json", timeout=1800)
        assert rolled.returncode != 0, rolled.stdout + rolled.stderr
        report = json.loads(rolled.stdout)
        assert [d["user"] for d in report["done"]] == ["alice"] and report["failed"]["user"] == "bob"
        assert status_of(lab, "alice")["image"] == b
        bob = status_of(lab, "bob")
        assert bob["image"] == a and bob["state"] == "running" and bob["container_state"] == "running"
        assert inside(lab, "bob", "cat /root/bobs").stdout == "bobs\n"
        assert inside(lab, "bob", f"test -e {B_ONLY} || echo on-a").stdout == "on-a\n"
    finally:
        node_sh("n1", f"rm -rf {IMAGES}/{b}", check=False)


def test_a_desktop_from_before_images_had_ids_is_adopted_at_its_next_start(lab):
    """The layout of a labvm with one image per node: the image in xfce_local, the desktop's
    record without an image. Its next start records that image and runs over it."""
    import sqlite3

    alice = status_of(lab, "alice")
    image, node = alice["image"], alice["node"]
    assert lab.labvm("stop", "alice", timeout=600).returncode == 0
    node_sh(node, f"rm -rf /var/lib/labvm/xfce_local && mv {IMAGES}/{image} /var/lib/labvm/xfce_local")
    with sqlite3.connect(lab.home / "state.db") as db:
        db.execute("UPDATE vms SET image = NULL WHERE user = 'alice'")
    assert status_of(lab, "alice")["image"] is None
    started = lab.labvm("start", "alice", timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"runs over image {image[:12]}" in " ".join(started.stdout.split())
    alice = status_of(lab, "alice")
    assert (alice["image"], alice["state"]) == (image, "running")
    assert image_list(lab)[image]["desktops"] == ["alice"]
    assert alice_files(lab).startswith("marker\nmine\n")
    assert node_sh(node, f"test -e {IMAGES}/{image}", check=False).returncode != 0  # nothing pushed: xfce_local is it
