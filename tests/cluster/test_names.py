"""A member name given again on the testbed: the new member does not inherit the earlier one's
desktop files unless the admin says --adopt, and `labvm user rm` asks what happens to them."""

from __future__ import annotations

import docker

from .conftest import make_admin, wipe_mfs_files

FIRST_PW = "bob-first-Pw-3381"
SECOND_PW = "bob-second-Pw-7702"


def containers_on(testbed, node: str) -> list[str]:
    client = docker.DockerClient(base_url=f"unix://{testbed}/nodes/{node}/run/docker.sock", version="1.41")
    try:
        return [c.name for c in client.containers.list(all=True)]
    finally:
        client.close()


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_name_given_again_gets_the_earlier_members_files_only_with_adopt(testbed, tmp_path):
    admin = make_admin(testbed, tmp_path / "admin")
    ok(admin.labvm("image", "build", "--desktop", "minimal", timeout=1800))
    ok(admin.labvm("image", "push", timeout=900))
    ok(admin.labvm("user", "add", "bob", "--password-stdin", stdin=FIRST_PW + "\n"))
    wipe_mfs_files(admin, "bob")
    try:
        ok(admin.labvm("create", "bob", "--node", "n1", "--gpus", "0", "--memory", "512m"))
        ok(admin.labvm("exec", "bob", "--", "sh", "-c", "echo first bob > /home/bob/note.txt"))
        ok(admin.labvm("rm", "bob", "--yes", timeout=600))  # keeps the files as a version

        undecided = admin.labvm("user", "rm", "bob", "--yes")
        assert undecided.returncode == 2 and "--purge" in undecided.stderr and "--keep-files" in undecided.stderr
        plan = ok(admin.labvm("user", "rm", "bob", "--keep-files", "--dry-run"))
        # v0 is the empty version the first desktop started from; v1 holds what it wrote.
        assert "would keep bob's files on MooseFS (v0, v1)" in plan, plan
        assert "bob" in [u["name"] for u in admin.labvm_json("user", "list")]
        ok(admin.labvm("user", "rm", "bob", "--keep-files", "--yes"))

        ok(admin.labvm("user", "add", "bob", "--password-stdin", stdin=SECOND_PW + "\n"))
        refused = admin.labvm("create", "bob", "--node", "n1", "--gpus", "0", "--memory", "512m")
        assert refused.returncode == 5, refused.stdout + refused.stderr
        assert "earlier member named bob" in refused.stderr and "--adopt" in refused.stderr
        assert admin.labvm_json("status", "--user", "bob")["desktops"] == []
        assert "labvm-bob" not in containers_on(testbed, "n1")

        adopted = admin.labvm_json("create", "bob", "--node", "n1", "--gpus", "0", "--memory", "512m", "--adopt")
        assert adopted["state"] == "running" and adopted["version"] == 1
        assert ok(admin.labvm("exec", "bob", "--", "cat", "/home/bob/note.txt")).strip() == "first bob"
    finally:
        admin.labvm("rm", "bob", "--yes", timeout=600)
        wipe_mfs_files(admin, "bob")
