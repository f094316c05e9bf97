"""Moving a desktop between nodes on the testbed: round trip, a crash at every step, a target
that dies, a network cut, two switches at once, a lost node, and a drain."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import NODES, REPO, TESTBED, fake_gpu_uuid, invoke_testbed, make_admin, wipe_mfs_files
from .test_desktops import container_env, node_docker, wait_vnc
from .test_storage import DATA, inside, ok, on_node, set_config, tree_sums

ERIN_PW = "erin-Pw-3318"
FRANK_PW = "frank-Pw-2207"
GRACE_PW = "grace-Pw-8842"
LABVM = REPO / ".venv" / "bin" / "labvm"
STEPS = ("preflight", "push_image", "precopy", "stop_source", "final_flush", "merge", "fence", "build_stack", "start_target",
         "verify", "commit", "cleanup_source")


@pytest.fixture(scope="module")
def moves(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("moves") / "admin")
    set_config(admin, sync__syncTime=1)
    assert admin.labvm("image", "build", "--desktop", "minimal", timeout=1800).returncode == 0
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    for name, pw in (("erin", ERIN_PW), ("frank", FRANK_PW), ("grace", GRACE_PW)):
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=pw + "\n").returncode == 0
    wipe_mfs_files(admin, "erin", "frank", "grace")
    created = admin.labvm("create", "erin", "--node", "n1", "--gpus", "1", "--memory", "512m")
    assert created.returncode == 0, created.stdout + created.stderr
    inside(admin, "erin", "mkdir -p /usr/local/share/erin /home/erin/.cache/deep/er && "
                          "dd if=/dev/urandom of=/usr/local/share/erin/blob bs=64k count=16 2>/dev/null && "
                          "echo dot > /home/erin/.cache/deep/er/.dotfile && echo 'alias ll=ls' >> /home/erin/.bashrc && "
                          "chmod 0600 /home/erin/.cache/deep/er/.dotfile && rm /etc/issue")
    yield admin
    for name in ("erin", "frank", "grace"):
        admin.labvm("rm", name, "--yes")
    wipe_mfs_files(admin, "erin", "frank", "grace")


def where(admin, user: str) -> dict:
    data = admin.labvm_json("status", "--user", user)
    desktops = data["desktops"] if isinstance(data, dict) else data
    return next(d for d in desktops if d["user"] == user)


def labvm_with(admin, env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(LABVM), *args], capture_output=True, text=True, env={**admin.env, **env}, timeout=timeout)


def running_on(testbed: Path, user: str) -> list[str]:
    """The nodes whose dockerd runs the user's container (a stopped dockerd runs nothing)."""
    found = []
    for node in NODES:
        try:
            container = node_docker(testbed, node).containers.get(f"labvm-{user}")
        except Exception:  # no such container, or no dockerd answering
            continue
        if container.status == "running":
            found.append(node)
    return found


# Every start re-applies the password (a new salt in /etc/shadow), so /etc is compared without
# the account files the desktop's init rewrites.
INIT_REWRITES = {"shadow", "shadow-", "gshadow", "gshadow-", "passwd-", "group-", "subuid-", "subgid-", ".pwd.lock"}


def snapshot(node: str, user: str) -> dict:
    root = f"{DATA}/vms/{user}/merge_local"
    parts = {part: tree_sums(node, f"{root}/{part}") for part in ("home", "usr/local", "etc")}
    parts["etc"] = {path: value for path, value in parts["etc"].items() if path not in INIT_REWRITES}
    assert "issue" not in parts["etc"], "a file deleted in the desktop came back"
    return parts


def other(node: str) -> str:
    return "n2" if node == "n1" else "n1"


def test_round_trip_keeps_every_file_password_and_valid_gpus(moves, testbed, tmp_path):
    before = snapshot("n1", "erin")
    assert "erin/.cache/deep/er/.dotfile" in before["home"]
    for target in ("n2", "n1"):
        result = moves.labvm("switch", "erin", target)
        out = ok(result)
        assert "downtime:" in out, out
        desktop = where(moves, "erin")
        assert desktop["node"] == target and desktop["state"] == "running"
        assert running_on(testbed, "erin") == [target]
        assert snapshot(target, "erin") == before
        gpus = desktop["gpus"]
        assert len(gpus) == 1 and gpus[0]["uuid"] in {fake_gpu_uuid(target, i) for i in range(4)}
        assert container_env(testbed, target, "erin")["NVIDIA_VISIBLE_DEVICES"] == gpus[0]["uuid"]
        shot = wait_vnc(desktop["vnc"], ERIN_PW, tmp_path / f"{target}.png")
        assert shot.returncode == 0, shot.stdout + shot.stderr
    # The source's layers are gone once the switch committed.
    leftovers = on_node("n2", "sh", "-c", f"ls {DATA}/vms 2>/dev/null || true").split()
    assert "erin" not in leftovers


def test_dry_run_changes_nothing(moves, testbed):
    plan = ok(moves.labvm("switch", "erin", "n2", "--dry-run"))
    steps = plan.split("\nsteps:\n", 1)[1].splitlines()
    assert [line.split()[1] for line in steps if re.match(r" {1,3}[0-9]+\. ", line)] == list(STEPS)
    assert all(len(line) <= 80 for line in plan.splitlines()), plan
    assert running_on(testbed, "erin") == ["n1"]
    shown = moves.labvm_json("switch", "erin", "n2", "--dry-run")
    assert shown["ok"] is True and shown["exit_code"] == 0 and all(c["ok"] for c in shown["checks"])
    gpu = where(moves, "erin")["gpus"]
    preflight = next(s for s in shown["steps"] if s["name"] == "preflight")
    assert len(gpu) == 1 and "GPU " in preflight["detail"] and "VNC port" in preflight["detail"]
    assert running_on(testbed, "erin") == ["n1"]


# What `labvm status --json` says of a desktop that a dry run must leave as it was (its
# CPU, memory and sync figures move by themselves).
STILL = ("user", "node", "state", "vnc", "ssh_port", "gpus", "limits", "version", "container", "started_at", "operation")


def test_dry_run_json_to_a_node_with_no_room_shows_the_failing_check_and_changes_nothing(moves, testbed):
    source = where(moves, "erin")["node"]
    before = {key: where(moves, "erin").get(key) for key in STILL}
    ops_before = moves.labvm_json("ops", "list", "--user", "erin")
    refused = moves.labvm("switch", "erin", other(source), "--gpus", "9", "--dry-run", "--json")
    assert refused.returncode == 10, refused.stdout + refused.stderr
    plan = json.loads(refused.stdout)
    assert plan["operation"] == "switch" and plan["ok"] is False and plan["exit_code"] == 10
    assert (plan["user"], plan["source"], plan["target"]) == ("erin", source, other(source))
    failed = [c for c in plan["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["gpus"] and "GPU" in failed[0]["detail"], plan
    assert {key: where(moves, "erin").get(key) for key in STILL} == before
    assert moves.labvm_json("ops", "list", "--user", "erin") == ops_before
    assert running_on(testbed, "erin") == [source]


@pytest.mark.parametrize("step", STEPS)
def test_a_switch_killed_at_any_step_resumes_with_no_file_lost(moves, testbed, step):
    source = where(moves, "erin")["node"]
    before = snapshot(source, "erin")
    killed = labvm_with(moves, {"LABVM_CRASH_AT": f"switch:{step}"}, "switch", "erin", other(source))
    assert killed.returncode == 137, killed.stdout + killed.stderr
    assert len(running_on(testbed, "erin")) <= 1
    unfinished = moves.labvm_json("ops", "list", "--unfinished")
    op = next(o for o in unfinished if o["kind"] == "switch" and o["user"] == "erin")
    assert op["state"] == "interrupted"
    # Meanwhile status tells the truth: the pending operation on the desktop's row, and the
    # node whose dockerd really runs its container (the recorded node may be the other one).
    really = running_on(testbed, "erin")
    shown = where(moves, "erin")
    pending = shown["operation"] or {}
    assert (pending.get("kind"), pending.get("id"), pending.get("state")) == ("switch", op["id"], "interrupted"), shown
    assert shown["running_on"] == really, (shown["running_on"], really)
    assert (shown["container_state"] == "running") == (shown["node"] in really), shown
    piped = ok(moves.labvm("status", "--user", "erin")).splitlines()
    row = next(line for line in piped if line.split()[:1] == ["erin"])
    # DESKTOP NODE STATE CONTAINER RUNS_ON OPERATION ...
    assert row.split()[4:6] == [",".join(really) or "-", f"switch#{op['id']}:interrupted"], piped
    # Until it is resumed or aborted, nothing else may act on the desktop.
    refused = moves.labvm("stop", "erin")
    assert refused.returncode == 75 and f"ops resume {op['id']}" in refused.stderr, refused.stderr
    resumed = moves.labvm("ops", "resume", str(op["id"]))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    target = other(source)
    assert where(moves, "erin")["node"] == target
    assert running_on(testbed, "erin") == [target]
    assert snapshot(target, "erin") == before


def test_a_switch_with_no_room_on_the_target_exits_10_and_leaves_the_desktop_running(moves, testbed):
    source = where(moves, "erin")["node"]
    refused = moves.labvm("switch", "erin", other(source), "--gpus", "9")
    assert refused.returncode == 10, refused.stdout + refused.stderr
    assert "free GPU" in refused.stderr
    desktop = where(moves, "erin")
    assert desktop["node"] == source and desktop["state"] == "running"
    assert running_on(testbed, "erin") == [source]


def test_an_interrupted_switch_can_be_aborted_back_to_its_source(moves, testbed):
    source = where(moves, "erin")["node"]
    before = snapshot(source, "erin")
    killed = labvm_with(moves, {"LABVM_CRASH_AT": "switch:build_stack"}, "switch", "erin", other(source))
    assert killed.returncode == 137, killed.stdout + killed.stderr
    op = next(o for o in moves.labvm_json("ops", "list", "--unfinished") if o["kind"] == "switch")
    aborted = moves.labvm("ops", "abort", str(op["id"]))
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert moves.labvm_json("ops", "show", str(op["id"]))["state"] == "aborted"
    assert where(moves, "erin")["node"] == source and running_on(testbed, "erin") == [source]
    assert snapshot(source, "erin") == before
    again = moves.labvm("ops", "resume", str(op["id"]))
    assert again.returncode == 6 and "nothing to resume" in again.stderr


def hook_script(tmp_path: Path, step: str, *command: str) -> Path:
    """A LABVM_STEP_HOOK program that runs command when the switch reaches step."""
    script = tmp_path / "hook"
    quoted = " ".join(f"'{c}'" for c in command)
    script.write_text(f"#!/bin/sh\n[ \"$1:$2\" = 'switch:{step}' ] || exit 0\nexec {quoted}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_target_dockerd_dies_mid_switch_and_the_desktop_runs_on_the_source_again(moves, testbed, tmp_path, node_started):
    source = where(moves, "erin")["node"]
    target = other(source)
    before = snapshot(source, "erin")
    hook = hook_script(tmp_path, "start_target", str(TESTBED), "node-stop", target, "dockerd")
    result = labvm_with(moves, {"LABVM_STEP_HOOK": str(hook)}, "switch", "erin", target)
    assert result.returncode == 6, result.stdout + result.stderr
    assert "rolled back" in result.stderr
    desktop = where(moves, "erin")
    assert desktop["node"] == source and desktop["state"] == "running"
    assert running_on(testbed, "erin") == [source]
    assert snapshot(source, "erin") == before
    assert inside(moves, "erin", "cat /home/erin/.cache/deep/er/.dotfile").strip() == "dot"


def netns_links_down(node: str, up: bool) -> None:
    links = json.loads(on_node(node, "ip", "-j", "link", "show"))
    for link in links:
        if link["ifname"] != "lo":
            on_node(node, "ip", "link", "set", link["ifname"], "up" if up else "down")


def test_network_cut_during_precopy_leaves_the_desktop_on_the_source(moves, testbed, tmp_path, node_started):
    source = where(moves, "erin")["node"]
    target = other(source)
    before = snapshot(source, "erin")
    testbed_cmd = str(TESTBED)
    hook = tmp_path / "cut"
    hook.write_text(f"#!/bin/sh\n[ \"$1:$2\" = 'switch:precopy' ] || exit 0\n"
                    f"for l in $('{testbed_cmd}' exec {target} -- ip -o link show | awk -F': ' '{{print $2}}' | cut -d@ -f1); do\n"
                    f"  [ \"$l\" = lo ] || '{testbed_cmd}' exec {target} -- ip link set \"$l\" down\ndone\n")
    hook.chmod(0o755)
    try:
        result = labvm_with(moves, {"LABVM_STEP_HOOK": str(hook)}, "switch", "erin", target)
    finally:
        netns_links_down(target, up=True)
    assert result.returncode != 0, result.stdout + result.stderr
    desktop = where(moves, "erin")
    assert desktop["node"] == source and desktop["state"] == "running"
    assert running_on(testbed, "erin") == [source]
    assert snapshot(source, "erin") == before


def test_two_switches_at_once_one_is_refused(moves, testbed):
    source = where(moves, "erin")["node"]
    results = []

    def run():
        results.append(moves.labvm("switch", "erin", other(source), timeout=900))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 75], [(r.returncode, r.stderr) for r in results]
    refused = next(r for r in results if r.returncode == 75)
    assert "locked by operation" in refused.stderr
    assert running_on(testbed, "erin") == [other(source)]


def test_drain_moves_two_desktops_off_a_node(moves, testbed):
    erin_node = where(moves, "erin")["node"]
    if erin_node != "n1":
        ok(moves.labvm("switch", "erin", "n1"))
    ok(moves.labvm("create", "frank", "--node", "n1", "--memory", "512m"))
    inside(moves, "frank", "echo frank > /home/frank/f.txt")
    drained = ok(moves.labvm("node", "drain", "n1", timeout=1200))
    assert "erin: moved to n2" in drained and "frank: moved to n2" in drained, drained
    assert running_on(testbed, "erin") == ["n2"] and running_on(testbed, "frank") == ["n2"]
    assert inside(moves, "frank", "cat /home/frank/f.txt").strip() == "frank"
    # Cordoned: a new desktop does not go there.
    refused = moves.labvm("create", "grace", "--node", "n1")
    assert refused.returncode == 2 and "cordoned" in refused.stderr
    ok(moves.labvm("node", "uncordon", "n1"))
    ok(moves.labvm("rm", "frank", "--yes"))


def test_from_lost_recovers_on_another_node_and_the_old_node_stays_fenced(moves, testbed, node_started):
    if where(moves, "erin")["node"] != "n1":
        ok(moves.labvm("switch", "erin", "n1"))
    inside(moves, "erin", "echo synced > /home/erin/last-words.txt")
    ok(moves.labvm("sync", "flush", "erin"))
    refused = moves.labvm("switch", "erin", "n2", "--from-lost", "--yes")
    assert refused.returncode == 2 and "not lost" in refused.stderr
    invoke_testbed("node-kill", "n1")
    recovered = moves.labvm("switch", "erin", "n2", "--from-lost", "--yes", timeout=900)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "may be lost" in recovered.stdout or "unreachable" in recovered.stdout
    assert where(moves, "erin")["node"] == "n2"
    assert inside(moves, "erin", "cat /home/erin/last-words.txt").strip() == "synced"
    invoke_testbed("node-start", "n1")
    assert running_on(testbed, "erin") == ["n2"]
    owner = on_node("n2", "cat", "/mnt/labvm-mfs/vms/erin/owner.json")
    assert json.loads(owner)["node"] == "n2"


def test_switch_to_an_unknown_node_or_same_node_is_refused(moves):
    node = where(moves, "erin")["node"]
    same = moves.labvm("switch", "erin", node)
    assert same.returncode == 2 and "already runs" in same.stderr
    unknown = moves.labvm("switch", "erin", "nowhere")
    assert unknown.returncode == 4 and "unknown node" in unknown.stderr

