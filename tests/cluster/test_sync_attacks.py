"""Attacks on the sync daemon from inside a desktop, as root there: symlink races, FIFOs,
paths rsync cannot copy, inotify exhaustion. Each test fails if the attack works.

mallory attacks from n1; victim's desktop runs on the same node. The cluster file here syncs
in tiny batches (batch_max_files 1): the symlink race runs until a thousand batches were
synced under attack, and at least a minute.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from .conftest import REPO, invoke_testbed, make_admin, wipe_mfs_files
from .test_hostile_member import inside
from .test_storage import set_config

USERS = {"mallory": "mallory-Pw-3310", "victim": "victim-Pw-8812"}
UP_LOCAL = "/var/lib/labvm/data/vms/{user}/disk/up_local"
UP_MFS = "/mnt/labvm-mfs/vms/{user}/up_mfs"
RACE_BATCHES = 1000
RACE_MIN_S = 60
RACE_MAX_S = 480


@pytest.fixture(scope="module")
def lab(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("syncattack") / "admin")
    set_config(admin, sync__batch_max_files=1, storage__member_quota=4 * 2**30)
    built = admin.labvm("image", "build", "--desktop", "minimal", timeout=1800)
    assert built.returncode == 0, built.stderr
    assert admin.labvm("image", "push", timeout=900).returncode == 0
    for name, password in USERS.items():
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=password + "\n").returncode == 0
    wipe_mfs_files(admin, *USERS)
    for name in USERS:
        created = admin.labvm("create", name, "--node", "n1", "--memory", "512m", "--cpus", "1", timeout=600)
        assert created.returncode == 0, created.stdout + created.stderr
    yield admin
    for name in USERS:
        admin.labvm("rm", name, "--yes")


def in_background(lab, user: str, script: str, seconds: int) -> subprocess.Popen:
    """A loop inside the desktop that ends by itself after `seconds`."""
    return subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "labvm"), "exec", user, "--", "timeout", str(seconds), "sh", "-c", script],
        env=lab.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def node_sh(script: str, check: bool = True) -> subprocess.CompletedProcess:
    return invoke_testbed("exec", "n1", "--", "sh", "-c", script, check=check)


def sync_counters(lab, user: str) -> dict:
    return lab.labvm_json("sync", "status", user)


def test_symlink_swap_race_copies_no_node_file(lab):
    """A RENAME_EXCHANGE-style loop between a directory and a symlink to /etc/ssh (and to the
    victim's upper), while a writer keeps queueing names under it: the daemon must never read
    through the link. The node's SSH host key and the victim's secret must not reach MooseFS."""
    secret = f"victim-secret-{time.time_ns()}"
    assert inside(lab, "victim", f"echo {secret} > /root/ssh_host_ed25519_key").returncode == 0
    assert lab.labvm("sync", "flush", "victim").returncode == 0
    victim_root = UP_LOCAL.format(user="victim") + "/root"
    node_key = node_sh("sed -n 2p /etc/ssh/ssh_host_ed25519_key").stdout.strip()
    assert len(node_key) > 20, "no node host key to look for: the test would prove nothing"
    setup = (
        "mkdir -p /root/race/d && ln -sfn /etc/ssh /root/race/etc && "
        f"ln -sfn {victim_root} /root/race/other"
    )
    assert inside(lab, "mallory", setup).returncode == 0
    before = sync_counters(lab, "mallory")
    # Both loops run until the stop file appears: at least RACE_MIN_S, and until the daemon has
    # synced RACE_BATCHES batches under attack (the loops take a CPU each, so the rate varies).
    swapper = in_background(lab, "mallory", (
        "cd /root/race; while [ ! -e /root/race.stop ]; do "
        "mv -T d t; mv -T etc d; mv -T d etc; mv -T other d; mv -T d other; mv -T t d; done"
    ), RACE_MAX_S + 60)
    writer = in_background(lab, "mallory", (
        "cd /root/race; i=0; while [ ! -e /root/race.stop ]; do i=$((i+1)); "
        "echo $i > d/ssh_host_ed25519_key 2>/dev/null; echo $i > d/n$((i % 50)) 2>/dev/null; done"
    ), RACE_MAX_S + 60)
    started = time.monotonic()
    try:
        while True:
            time.sleep(10)
            batches = sync_counters(lab, "mallory")["batches"] - before["batches"]
            elapsed = time.monotonic() - started
            if (elapsed >= RACE_MIN_S and batches >= RACE_BATCHES) or elapsed >= RACE_MAX_S:
                break
        assert inside(lab, "mallory", "touch /root/race.stop").returncode == 0
        swapper.wait(timeout=120)
        writer.wait(timeout=120)
    finally:
        swapper.kill()
        writer.kill()
    flushed = lab.labvm("sync", "flush", "mallory", timeout=600)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    after = sync_counters(lab, "mallory")
    batches = after["batches"] - before["batches"]
    if batches < RACE_BATCHES:
        log = node_sh("tail -n 40 /var/lib/labvm/data/vms/mallory/sync/syncd.log", check=False).stdout
        pytest.fail(f"only {batches} batches ran during {elapsed:.0f} s of attack: it proves too little.\n"
                    f"sync status before: {before}\nafter: {after}\nthe daemon's log:\n{log}")
    up_mfs = UP_MFS.format(user="mallory")
    leaked = node_sh(f"grep -rlF -e {node_key[:40]!r} -e {secret} {up_mfs} || true").stdout.strip()
    assert leaked == "", f"node or victim files reached mallory's up_mfs: {leaked}"
    # The real files did sync: what went through is mallory's own.
    assert node_sh(f"test -d {up_mfs}/root/race").returncode == 0


def test_fifo_swap_and_uncopyable_paths_never_wedge_the_sync(lab):
    """A file that keeps turning into a FIFO, a path longer than PATH_MAX and a file of mode 000:
    flush, stop, start and switch still finish, and what could not be copied is listed with its
    reason."""
    # cd -P: a shell's logical cd gives up once $PWD passes PATH_MAX.
    deep = "cd /root && for i in $(seq 20); do n=$(printf 'y%.0s' $(seq 250)); mkdir $n && cd -P $n; done && echo deep > leaf"
    assert inside(lab, "mallory", deep).returncode == 0
    assert inside(lab, "mallory", "echo plain > /root/plain && echo locked > /root/locked && chmod 000 /root/locked").returncode == 0
    swapper = in_background(lab, "mallory", (
        "cd /root; while :; do echo data > f.tmp; mv f.tmp flip; rm -f p.tmp; mkfifo p.tmp; mv p.tmp flip; done"
    ), 40)
    try:
        flushed = lab.labvm("sync", "flush", "mallory", timeout=900)
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    finally:
        swapper.wait(timeout=200)
    status = lab.labvm_json("sync", "status", "mallory")
    listed = " ".join(q["reason"] + " " + q["path"] for q in status.get("quarantined", []))
    assert "path longer than" in listed, status
    assert node_sh(f"cat {UP_MFS.format(user='mallory')}/root/plain").stdout.strip() == "plain"
    stopped = lab.labvm("stop", "mallory", timeout=900)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    started = lab.labvm("start", "mallory", timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    # A switch finishes too, and says which paths it could not take along.
    said = ""
    for node in ("n2", "n1"):
        moved = lab.labvm("switch", "mallory", node, timeout=900)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        said += moved.stdout + moved.stderr
    assert "could not be copied to MooseFS" in said, said
    files = inside(lab, "mallory", "cat /root/plain /root/locked; stat -c %a /root/locked")
    assert files.stdout.split() == ["plain", "locked", "0"], files.stdout + files.stderr


def test_exhausting_inotify_in_one_desktop_stops_no_other_sync(lab):
    """Container root is the node's uid 0: a member holding every inotify instance uid 0 may
    have must not keep another desktop's sync daemon from starting."""
    # The hog runs detached inside the desktop (labvm exec hands back output only at the end).
    started = inside(lab, "mallory", (
        "nohup timeout 300 perl -e 'my @fds; for (1..1024) { my $fd = syscall(294, 0); last if $fd < 0; "
        "push @fds, $fd } $| = 1; print scalar(@fds), qq(\\n); sleep 280' < /dev/null > /tmp/hog.out 2>&1 &"
    ))
    assert started.returncode == 0, started.stderr
    try:
        held = ""
        for _ in range(60):
            held = inside(lab, "mallory", "cat /tmp/hog.out").stdout.strip()
            if held:
                break
            time.sleep(1)
        assert held.isdigit() and int(held) > 0, f"the desktop got no inotify instance at all: {held!r}"
        # The attack bites: root on the node, the uid the daemons used to share, gets none.
        starved = node_sh("inotifywait -t 1 /tmp 2>&1; true").stdout
        assert "instances" in starved.lower() or "too many" in starved.lower(), starved
        # Restarting victim's desktop starts a new sync daemon on the same node.
        assert lab.labvm("stop", "victim", timeout=600).returncode == 0
        started = lab.labvm("start", "victim", timeout=600)
        assert started.returncode == 0, started.stdout + started.stderr
        assert inside(lab, "victim", "echo after-hog > /root/after").returncode == 0
        flushed = lab.labvm("sync", "flush", "victim", timeout=300)
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
        assert node_sh(f"cat {UP_MFS.format(user='victim')}/root/after").stdout.strip() == "after-hog"
        status = lab.labvm_json("sync", "status", "victim")
        assert status.get("running"), status
    finally:
        inside(lab, "mallory", "pkill -f syscall; true")
