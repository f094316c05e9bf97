"""A member with root in their desktop, as an attacker: each test performs one attack from
inside a desktop on the testbed and fails if it works.

alice and bobby have desktops on n1, carol on n2. alice is the attacker.
"""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from .conftest import invoke_testbed, make_admin, wipe_mfs_files
from .test_storage import set_config

ADMIN_IP = "10.213.0.1"
MFS_IP = "10.213.0.2"
NODE_IPS = {"n1": "10.213.0.11", "n2": "10.213.0.12"}
PASSWORDS = {"alice": "alice-Pw-5521", "bobby": "bobby-Pw-7730", "carol": "carol-Pw-1184"}
HOMES = {"alice": "n1", "bobby": "n1", "carol": "n2"}
MEMBER_QUOTA = 4 * 2**30


@pytest.fixture(scope="module")
def lab(testbed, tmp_path_factory):
    admin = make_admin(testbed, tmp_path_factory.mktemp("hostile") / "admin")
    # Small shares: an attack that got through (an 8 TiB sparse file copied in full) stops at
    # the quota instead of filling this machine's disk.
    set_config(admin, storage__member_quota=MEMBER_QUOTA)
    built = admin.labvm("image", "build", "--desktop", "minimal", timeout=1800)
    assert built.returncode == 0, built.stderr
    pushed = admin.labvm("image", "push", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    for name, password in PASSWORDS.items():
        assert admin.labvm("user", "add", name, "--password-stdin", stdin=password + "\n").returncode == 0
    wipe_mfs_files(admin, *PASSWORDS)
    for name, node in HOMES.items():
        created = admin.labvm("create", name, "--node", node, "--memory", "512m", "--cpus", "1", timeout=600)
        assert created.returncode == 0, created.stdout + created.stderr
    yield admin
    for name in PASSWORDS:
        admin.labvm("rm", name, "--yes")


def inside(lab, user: str, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell script as root inside the user's desktop."""
    return lab.labvm("exec", user, "--", "sh", "-c", script, timeout=timeout)


def as_member(lab, user: str, script: str) -> subprocess.CompletedProcess:
    """Run a shell script as the member's own account inside their desktop."""
    return inside(lab, user, f"su -s /bin/sh {user} -c {sh_quote(script)}")


def sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def container_address(testbed, node: str, user: str) -> str:
    result = invoke_testbed("exec", node, "--", "docker", "inspect", "-f",
                            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", f"labvm-{user}")
    address = result.stdout.strip()
    assert address, result.stderr
    return address


def published_vnc(lab, user: str) -> tuple[str, int]:
    desktops = {d["user"]: d for d in lab.labvm_json("status")["desktops"]}
    host, port = desktops[user]["vnc"].rsplit(":", 1)
    return host, int(port)


def reachable(lab, user: str, targets: list[tuple[str, int]]) -> dict[tuple[str, int], bool]:
    """Which TCP targets a connect() from inside the desktop reaches, as root there."""
    lines = "".join(
        f"if timeout 4 bash -c 'echo > /dev/tcp/{host}/{port}' 2>/dev/null; then echo open {host} {port}; "
        f"else echo shut {host} {port}; fi\n"
        for host, port in targets
    )
    result = inside(lab, user, lines)
    assert result.returncode == 0, result.stderr
    seen = {}
    for line in result.stdout.splitlines():
        state, host, port = line.split()
        seen[(host, int(port))] = state == "open"
    assert set(seen) == set(targets), result.stdout
    return seen


class Listener:
    """A TCP server on the admin host's testbed address: the 'outside world' a desktop may reach."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ADMIN_IP, 0))
        self.sock.listen(8)
        self.sock.settimeout(1.0)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.peers.append(peer[0])
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def attack_targets(lab, testbed, listener_port: int) -> tuple[list, list]:
    """(what must be shut, what must stay open) for alice on n1."""
    bobby_host, bobby_port = published_vnc(lab, "bobby")
    carol_host, carol_port = published_vnc(lab, "carol")
    shut = [
        (MFS_IP, 9421),  # MooseFS master: trusts clients by address
        (MFS_IP, 9422),  # chunkserver: no authentication at all
        (MFS_IP, 9420),
        (NODE_IPS["n2"], 22),  # another node's sshd
        (NODE_IPS["n1"], 22),  # her own node's sshd
        (container_address(testbed, "n1", "bobby"), 5901),  # a neighbour's container, directly
        (bobby_host, bobby_port),  # a neighbour's published VNC, through the node's address
        (carol_host, carol_port),  # another node's desktop
    ]
    must_work = [(ADMIN_IP, listener_port)]
    return shut, must_work


def assert_walled_off(lab, testbed):
    with Listener() as listener:
        shut, must_work = attack_targets(lab, testbed, listener.port)
        seen = reachable(lab, "alice", shut + must_work)
    opened = [target for target in shut if seen[target]]
    assert opened == [], f"alice's desktop reached {opened}"
    # The test can fail: the same probe does reach the outside world.
    assert all(seen[target] for target in must_work), seen
    assert NODE_IPS["n1"] in listener.peers  # leaving through the node's NAT


def test_network_reaches_the_world_but_not_moosefs_the_nodes_or_neighbours(lab, testbed):
    assert_walled_off(lab, testbed)


def test_members_still_reach_their_own_published_port_from_outside(lab):
    host, port = published_vnc(lab, "alice")
    with socket.create_connection((host, port), timeout=10) as conn:
        assert conn.recv(12).startswith(b"RFB ")


def test_lost_rules_are_reported_and_every_start_puts_them_back(lab, testbed, node_started):
    # An admin's `iptables -F` or a node reboot: the rules are gone.
    invoke_testbed("exec", "n1", "--", "iptables", "-w", "-D", "INPUT", "-i", "labvm0", "-j", "LABVM-INPUT")
    invoke_testbed("exec", "n1", "--", "iptables", "-w", "-F", "LABVM-FORWARD")
    seen = reachable(lab, "alice", [(MFS_IP, 9421)])
    assert seen[(MFS_IP, 9421)], "the rules were not really removed: this test would prove nothing"
    check = lab.labvm("node", "check", "n1", "--no-mount")
    assert check.returncode == 7 and "isolation missing" in check.stdout + check.stderr, check.stdout + check.stderr

    # dockerd restarts too (its containers stop with it); the next start restores everything.
    invoke_testbed("node-stop", "n1", "dockerd")
    invoke_testbed("node-start", "n1")
    for user in ("alice", "bobby"):
        started = lab.labvm("start", user, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
    assert lab.labvm("node", "check", "n1", "--no-mount").returncode == 0
    assert_walled_off(lab, testbed)


CAP_BITS = {"NET_RAW": 13, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31}


def test_dangerous_capabilities_are_gone(lab):
    status = inside(lab, "alice", "grep CapBnd /proc/1/status")
    bounding = int(status.stdout.split()[1], 16)
    kept = [name for name, bit in CAP_BITS.items() if bounding & (1 << bit)]
    assert kept == [], f"the desktop keeps {kept}"
    # The attacks themselves: a raw disk as a device node, a raw socket.
    mknod = inside(lab, "alice", "mknod /root/disk b 8 0 && echo MADE")
    assert "MADE" not in mknod.stdout and mknod.returncode != 0
    raw = inside(lab, "alice", "perl -e 'use Socket; socket(my $s, PF_INET, SOCK_RAW, 1) or die qq($!\\n); print qq(RAW\\n)'")
    assert "RAW" not in raw.stdout and "Operation not permitted" in raw.stderr, raw.stdout + raw.stderr


def test_sudo_ping_and_apt_still_work(lab):
    sudo = as_member(lab, "alice", f"echo {PASSWORDS['alice']} | sudo -S -k id -u")
    assert sudo.returncode == 0 and sudo.stdout.strip().splitlines()[-1] == "0", sudo.stdout + sudo.stderr
    ping = as_member(lab, "alice", f"ping -c1 -W5 {ADMIN_IP}")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    package = (
        "set -e; d=$(mktemp -d); mkdir -p $d/p/DEBIAN $d/p/usr/share/labvm-probe; "
        "printf 'Package: labvm-probe\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: lab <lab@example.org>\\n"
        "Description: probe\\n' > $d/p/DEBIAN/control; echo hello > $d/p/usr/share/labvm-probe/hello; "
        "dpkg-deb --build $d/p $d/probe.deb >/dev/null; apt-get install -y -q $d/probe.deb >/dev/null 2>&1 || "
        "apt-get install -y $d/probe.deb; cat /usr/share/labvm-probe/hello; dpkg -r labvm-probe >/dev/null"
    )
    apt = inside(lab, "alice", package, timeout=300)
    assert apt.returncode == 0 and "hello" in apt.stdout, apt.stdout + apt.stderr


def test_moosefs_is_closed_to_node_accounts(lab, testbed):
    # A member's setuid-root program, published to MooseFS as part of a version.
    made = inside(lab, "alice", "cp /usr/bin/id /usr/local/bin/rootid && chmod 4755 /usr/local/bin/rootid")
    assert made.returncode == 0, made.stderr
    assert lab.labvm("sync", "flush", "alice").returncode == 0
    mount = invoke_testbed("exec", "n1", "--", "findmnt", "-no", "OPTIONS", "/mnt/labvm-mfs").stdout
    assert "nosuid" in mount and "nodev" in mount, mount
    listing = invoke_testbed("exec", "n1", "--", "stat", "-c", "%a %u", "/mnt/labvm-mfs/vms").stdout.split()
    assert listing == ["700", "0"], listing
    # Any local account on the node, right after root walked the same path: FUSE's cache must
    # not let it skip the 0700 directory's check (the kernel checks every access). It can
    # neither run the member's setuid program, nor read a file the member left readable, nor
    # list the tree.
    assert "default_permissions" in invoke_testbed("exec", "n1", "--", "grep", " /mnt/labvm-mfs ", "/proc/self/mountinfo").stdout
    path = "/mnt/labvm-mfs/vms/alice/up_mfs/usr/local/bin/rootid"
    readable = inside(lab, "alice", "echo mine > /root/open-file && chmod 755 /root && chmod 644 /root/open-file")
    assert readable.returncode == 0 and lab.labvm("sync", "flush", "alice").returncode == 0
    as_nobody = "runuser -u nobody --"
    open_file = "/mnt/labvm-mfs/vms/alice/up_mfs/root/open-file"
    nobody = invoke_testbed("exec", "n1", "--", "sh", "-c",
                            f"stat {path} >/dev/null && cat {open_file} >/dev/null && {as_nobody} {path}; "
                            f"{as_nobody} cat {open_file}; {as_nobody} ls /mnt/labvm-mfs/vms/alice", check=False)
    assert "uid=0(" not in nobody.stdout and "euid=0" not in nobody.stdout, nobody.stdout
    assert "mine" not in nobody.stdout and "up_mfs" not in nobody.stdout, nobody.stdout
    assert nobody.stderr.count("Permission denied") == 3, nobody.stderr
    assert invoke_testbed("exec", "n1", "--", "cat", open_file).stdout.strip() == "mine"
    mode = invoke_testbed("exec", "n1", "--", "stat", "-c", "%a", path).stdout.strip()
    assert mode == "4755", "the setuid program did not reach MooseFS: the check above proves nothing"
    # Inside the desktop the member's own program still works as they meant it.
    inner = as_member(lab, "alice", "/usr/local/bin/rootid -u")
    assert inner.stdout.strip() == "0", inner.stdout + inner.stderr


MERGE_LOCAL = "/var/lib/labvm/data/vms/{user}/merge_local"


def test_reserved_names_and_overlay_xattrs_survive_a_published_version(lab):
    # The merge engine's own scratch name at the top of the member's tree: every publish
    # (backup, switch, drain) used to fail on it. It is made through the overlay mount on the
    # node: inside the desktop, a new top-level directory does not reach the overlay yet.
    merged = MERGE_LOCAL.format(user="alice")
    invoke_testbed("exec", "n1", "--", "sh", "-c", f"mkdir -p {merged}/.labvm-merge-trash && "
                   f"echo mine > {merged}/.labvm-merge-trash/f && ln -sfn /etc {merged}/.labvm-merge-trash/etc")
    made = inside(lab, "alice", "echo tagged > /root/tagged")
    assert made.returncode == 0, made.stderr
    # An xattr in overlay's own namespace, set on the member's file through the overlay mount,
    # the way the member's setfattr inside the desktop reaches it (the image has no setfattr).
    invoke_testbed("exec", "n1", "--", "setfattr", "-n", "trusted.overlay.label", "-v", "member", f"{merged}/root/tagged")
    backup = lab.labvm("backup", "alice", timeout=600)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert lab.labvm("stop", "alice", timeout=300).returncode == 0
    started = lab.labvm("start", "alice", timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    # Now both come from the published version, mounted over the image.
    back = invoke_testbed("exec", "n1", "--", "sh", "-c", f"cat {merged}/.labvm-merge-trash/f {merged}/root/tagged; "
                          f"readlink {merged}/.labvm-merge-trash/etc")
    assert back.stdout.split() == ["mine", "tagged", "/etc"], back.stdout + back.stderr
    label = invoke_testbed("exec", "n1", "--", "getfattr", "--only-values", "-n", "trusted.overlay.label",
                           f"{merged}/root/tagged", check=False)
    assert label.stdout == "member", label.stdout + label.stderr


def test_hostile_names_reach_the_admin_escaped(lab):
    # A link named "]" in a directory named "[" (so the path reads "[/]", rich markup) whose
    # target is an OSC 8 hyperlink and a terminal title change.
    target = "\x1b]8;;http://attacker.example/\x1b\\\\click\x1b]8;;\x1b\\\\\x1b]0;owned\x07"
    made = inside(lab, "alice", f"mkdir -p '/root/[' && ln -sfn \"$(printf '{target}')\" '/root/[/]'")
    assert made.returncode == 0, made.stderr
    listing = lab.labvm("files", "alice", "/root/[/]")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "\x1b" not in listing.stdout + listing.stderr and "\x07" not in listing.stdout + listing.stderr
    assert "\\x1b" in listing.stdout  # shown, escaped: the admin sees what is there
    log = lab.labvm("log")
    assert log.returncode == 0 and "\x1b" not in log.stdout, log.stdout + log.stderr


def mfs_quota(path: str, node: str = "n1") -> tuple[int, str]:
    text = invoke_testbed("exec", node, "--", "mfsgetquota", "-n", path).stdout
    row = next(line for line in text.splitlines() if line.strip().startswith("size "))
    cells = [c.strip() for c in row.split("|")]
    return int(cells[1]), cells[3]


def test_sparse_files_stay_sparse_on_moosefs_and_on_a_switch_target(lab):
    # Four times the member quota: copied in full, it could not even fit. (rsync still reads
    # the holes, at memory speed: 16 GiB keeps the test short where 8 TiB would take an hour.)
    made = inside(lab, "carol", "truncate -s 16G /root/huge && echo tail >> /root/huge")
    assert made.returncode == 0, made.stderr
    flushed = lab.labvm("sync", "flush", "carol", timeout=300)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    on_mfs = invoke_testbed("exec", "n2", "--", "stat", "-c", "%s", "/mnt/labvm-mfs/vms/carol/up_mfs/root/huge")
    assert int(on_mfs.stdout) == 16 * 2**30 + 5, on_mfs.stdout
    # MooseFS reports st_blocks from the length; its own accounting counts the chunks held.
    used, _ = mfs_quota("/mnt/labvm-mfs/vms/carol", node="n2")
    assert used < 2**30, f"carol's tree holds {used} bytes of chunks on MooseFS"
    moved = lab.labvm("switch", "carol", "n1", timeout=900)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    # On n1 the file comes from the version the switch published: still whole to the member,
    # still holes on MooseFS (the version is a snapshot plus a merge, which copy no data).
    seeded = inside(lab, "carol", "stat -c %s /root/huge; tail -c 5 /root/huge")
    assert seeded.stdout.split() == [str(16 * 2**30 + 5), "tail"], seeded.stdout + seeded.stderr
    used, _ = mfs_quota("/mnt/labvm-mfs/vms/carol")
    assert used < 2**30, f"after the switch carol's tree holds {used} bytes of chunks on MooseFS"


def test_a_member_at_their_quota_costs_no_one_else_a_sync(lab):
    tree = "/mnt/labvm-mfs/vms/alice"
    _, hard = mfs_quota(tree)
    assert int(hard) == MEMBER_QUOTA, "labvm did not put the cluster file's member quota on alice's tree"
    invoke_testbed("exec", "n1", "--", "mfssetquota", "-n", "-S", str(64 * 2**20), tree)
    try:
        inside(lab, "alice", "head -c 150M /dev/urandom > /root/filler", timeout=300)
        stuck = lab.labvm("sync", "flush", "alice", timeout=600)
        assert stuck.returncode != 0 and "quota" in (stuck.stdout + stuck.stderr).lower(), stuck.stdout + stuck.stderr
        status = lab.labvm_json("sync", "status", "alice")
        assert "quota" in (status.get("last_error") or "").lower(), status
        desktops = {d["user"]: d for d in lab.labvm_json("status")["desktops"]}
        assert "quota" in (desktops["alice"]["sync"].get("last_error") or "").lower(), desktops["alice"]["sync"]
        # bobby, on the same node and the same MooseFS, goes on as before.
        assert inside(lab, "bobby", "echo fine > /root/neighbour").returncode == 0
        fine = lab.labvm("sync", "flush", "bobby", timeout=300)
        assert fine.returncode == 0, fine.stdout + fine.stderr
    finally:
        invoke_testbed("exec", "n1", "--", "mfssetquota", "-n", "-S", str(MEMBER_QUOTA), tree)
    # Room again: alice's sync catches up by itself, nothing was dropped.
    caught_up = lab.labvm("sync", "flush", "alice", timeout=600)
    assert caught_up.returncode == 0, caught_up.stdout + caught_up.stderr
    assert invoke_testbed("exec", "n1", "--", "stat", "-c", "%s", f"{tree}/up_mfs/root/filler").stdout.strip() == str(150 * 2**20)
