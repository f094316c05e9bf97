"""`--dry-run [--json]` of every command that is a plan: create, start, stop, rm, backup,
restore, solidify. Each runs its checks against fake nodes (helpers that answer from a table and
record each call), prints its steps, and leaves the state database and the nodes as they were.
A failing check exits with that check's code, as the command itself would."""

import json

import pytest

from labvm.cli import main
from labvm.journal import Operation

from .test_switch_plan import answers, dump, home, nodes  # noqa: F401 - fixtures


def plan_of(capsys, *args: str) -> tuple[int, dict]:
    code = main([*args, "--dry-run", "--json"])
    captured = capsys.readouterr()
    assert captured.out, captured.err
    return code, json.loads(captured.out)


def names(items: list[dict]) -> list[str]:
    return [i["name"] for i in items]


UP = ["image", "mount_mfs", "mount_stack", "member_quota", "start_sync", "start_container", "record_running"]
DOWN = ["stop_container", "flush_sync", "remove_container", "unmount_stack", "record_stopped"]
CASES = {
    "start": (["start", "alice"], ["desktop", "lock", "node", "image", "MooseFS"], ["check", *UP]),
    "stop": (["stop", "alice"], ["desktop", "lock", "node"], ["check", *DOWN]),
    "rm": (["rm", "alice"], ["desktop", "lock", "node", "image", "MooseFS", "versions"],
           ["check", *DOWN[:-1], "keep_files", "remove_local_layers", "release_owner", "record"]),
    "rm --purge": (["rm", "alice", "--purge"], ["desktop", "lock", "node", "image", "MooseFS"],
                   ["check", "stop_container", "stop_sync", "remove_container", "unmount_stack", "remove_local_layers",
                    "purge_mfs_data", "record"]),
    "backup": (["backup", "alice"], ["desktop", "lock", "node", "image", "MooseFS", "versions"],
               ["check", "mount_mfs", "snapshot_upper", "publish", "prune"]),
    "restore": (["restore", "alice", "3"], ["desktop", "lock", "node", "image", "MooseFS", "versions", "version"],
                ["check", *DOWN, "publish", "solidify", "rebase", *UP]),
    "solidify": (["solidify", "alice"], ["desktop", "lock", "node", "image", "MooseFS", "versions"],
                 ["check", *DOWN, "publish", "solidify", *UP]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_dry_run_checks_lists_the_steps_and_changes_nothing(home, nodes, capsys, case):  # noqa: F811
    args, checks, steps = CASES[case]
    before = dump(home)
    code, plan = plan_of(capsys, *args)
    if case == "backup":
        [plan] = plan
    assert code == 0, plan
    assert plan["ok"] and plan["dry_run"] and plan["operation"] == args[0] and plan["user"] == "alice"
    assert names(plan["checks"]) == checks and all(c["ok"] for c in plan["checks"])
    assert names(plan["steps"]) == steps
    assert dump(home) == before
    assert nodes["n1"].changes() == [] and nodes["n2"].changes() == []


def test_the_publishing_plans_name_the_version_they_would_make(home, nodes, capsys):  # noqa: F811
    for args in (["backup", "alice"], ["solidify", "alice"], ["restore", "alice", "5"]):
        _code, plan = plan_of(capsys, *args)
        plan = plan[0] if isinstance(plan, list) else plan
        publish = next(s for s in plan["steps"] if s["name"] == "publish")
        assert "as version 6" in publish["detail"], publish  # versions 3 and 5 are on MooseFS


def test_a_restore_to_a_missing_version_fails_its_check_exits_4_and_changes_nothing(home, nodes, capsys):  # noqa: F811
    before = dump(home)
    code, plan = plan_of(capsys, "restore", "alice", "999")
    assert code == 4 and not plan["ok"] and plan["exit_code"] == 4
    assert plan["checks"][-1]["name"] == "version" and not plan["checks"][-1]["ok"]
    assert "no version 999 (versions: v3, v5)" in plan["checks"][-1]["detail"]
    assert dump(home) == before and nodes["n1"].changes() == []


def test_a_real_restore_to_a_missing_version_leaves_the_desktop_running(home, nodes, capsys):  # noqa: F811
    before = dump(home)["vms"]
    assert main(["restore", "alice", "999", "-y"]) == 4
    assert "no version 999" in capsys.readouterr().err
    assert dump(home)["vms"] == before
    # Nothing but reads and MooseFS's mount reached the node: no stop, no publish.
    assert [c for c in nodes["n1"].changes() if c != ("mfs", "ensure_mounted")] == []


def test_a_desktop_held_by_an_interrupted_operation_fails_every_plans_lock_check(home, nodes, capsys):  # noqa: F811
    with home.state() as db:
        op = Operation.begin(db, "switch", "alice", {})
        db.add_lock("alice", op.id, __import__("socket").gethostname(), 2**22 + 4321)
    for args in (["start", "alice"], ["stop", "alice"], ["rm", "alice"], ["solidify", "alice"], ["restore", "alice", "3"]):
        code, plan = plan_of(capsys, *args)
        assert code == 75, args
        lock = next(c for c in plan["checks"] if c["name"] == "lock")
        assert not lock["ok"] and f"ops resume {op.id}" in lock["detail"]


def test_create_plans_the_node_room_and_files(home, nodes, capsys, monkeypatch):  # noqa: F811
    from contextlib import contextmanager

    from .fake_cluster import IMAGE, plant_image

    plant_image(home, IMAGE)

    from labvm.desktops import Desktops

    @contextmanager
    def session(self, node):
        yield nodes[node.name]

    monkeypatch.setattr(Desktops, "session", session)
    nodes["n2"].answers[("vm", "owner")] = {"owner": None}
    nodes["n2"].answers[("merge", "versions")] = {"versions": []}  # carol has no files yet
    with home.state() as db:
        db.add_user("carol", "a good password")
    before = dump(home)
    code, plan = plan_of(capsys, "create", "carol", "--node", "n2", "--gpus", "1")
    assert code == 0, plan
    assert names(plan["checks"]) == ["desktop", "lock", "placement", "room", "image", "files"]
    assert names(plan["steps"]) == ["check", "base_image", "adopt_files", *UP]
    assert "GPUs 1 and VNC port 20004 free on n2" in plan["checks"][3]["detail"]
    assert dump(home) == before
    assert [c for c in nodes["n2"].changes() if c != ("vm", "owner")] == []


def test_the_text_plan_of_a_start_fits_80_columns(home, nodes, capsys):  # noqa: F811
    assert main(["start", "alice", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "start of alice: the checks pass (dry run: nothing changed)"
    assert all(len(line) <= 80 for line in out.splitlines()), out


def test_a_drain_dry_run_plans_each_move_and_cordons_nothing(home, nodes, capsys, monkeypatch):  # noqa: F811
    from contextlib import contextmanager

    from labvm.desktops import Desktops

    @contextmanager
    def session(self, node):
        yield nodes[node.name]

    monkeypatch.setattr(Desktops, "session", session)
    before = dump(home)
    code = main(["node", "drain", "n1", "--dry-run", "--json"])
    plans = json.loads(capsys.readouterr().out)
    assert code == 0, plans
    assert [(p["operation"], p["user"], p["target"], p["ok"]) for p in plans] == [("switch", "alice", "n2", True)]
    assert dump(home) == before  # not cordoned, nothing reserved
    assert nodes["n1"].changes() == [] and nodes["n2"].changes() == []
