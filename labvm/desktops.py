"""Desktops: create, start, stop, remove and re-password a lab member's desktop.

Each command is a short list of idempotent steps run through the node helpers.
A create that fails before its desktop runs rolls back what it made, so a
failed create leaves nothing half-made behind.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from .admin import AdminHome
from .ca import DESKTOP_CERTS_DIR, ensure_leaf, leaf_due
from .config import ClusterConfig, Node, member_quota_for, parse_size
from .errors import AlreadyExists, BadInput, FilesOfAnotherMember, LabvmError, NotFound, StateError
from .images import base_image_tag, base_image_tar
from .journal import journaled
from .placement import GpuRequest, NodeCapacity, choose_node
from .plan import Runner, run_steps
from .remote.helpers import HelperBundle, HelperCall
from .remote.pool import run_on_nodes
from .remote.recipes import DesktopCalls, image_status, mount_mfs, node_facts
from .remote.session import NodeSession
from .state import StateDB, User

Say = Callable[[str], None]

DESKTOP_SESSIONS = {
    "minimal": "twm & exec xterm -geometry 100x30+20+20",
    "xfce": "exec dbus-launch --exit-with-session startxfce4",
}


@dataclass
class LimitOverrides:
    cpus: float | None = None
    cpuset: str | None = None
    memory: str | None = None
    shm: str | None = None
    pids: int | None = None
    io_weight: int | None = None
    io_read_bps: str | None = None
    io_write_bps: str | None = None
    disk: str | None = None


MIN_DISK = 256 << 20


def parse_disk(text: str, option: str = "--disk") -> int:
    size = parse_size(text)
    if size < MIN_DISK:
        raise BadInput(f"{option} {text}: a desktop needs a disk of at least 256m")
    if size > 1 << 50:
        raise BadInput(f"{option} {text}: at most 1024t")
    return size


def _size_text(size: int) -> str:
    for unit, shift in (("t", 40), ("g", 30), ("m", 20), ("k", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"


@dataclass
class Limits:
    cpus: float | None
    cpuset: str | None
    memory: int
    shm: int
    pids: int
    io_weight: int | None
    io_read_bps: int | None
    io_write_bps: int | None
    io_device: str | None = None
    # Bytes; None in the records of desktops made before disks existed: the default applies.
    disk: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# The largest byte count a node takes for a limit (memory, shm, IO rates).
MAX_LIMIT_BYTES = 1 << 62
NO_ZERO_RATE = "give a rate of at least 1 byte a second, or leave the option out for no cap"


def _limit_size(option: str, text: str, least: int, too_small: str) -> int:
    """A size option, held to what the node's helper takes, so a wrong one fails here (exit 2)
    before anything is placed, not on the node."""
    size = parse_size(text)
    if size < least:
        raise BadInput(f"{option} {text}: {too_small}")
    if size > MAX_LIMIT_BYTES:
        raise BadInput(f"{option} {text}: too large (at most {MAX_LIMIT_BYTES >> 40}t)")
    return size


def _check_cpuset(cpuset: str) -> str:
    if not re.fullmatch(r"[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?)*", cpuset):
        raise BadInput(f"--cpuset {cpuset!r}: give CPUs like 0-3 or 0,2,4")
    for part in cpuset.split(","):
        first, _, last = part.partition("-")
        if last and int(first) > int(last):
            raise BadInput(f"--cpuset {cpuset!r}: the range {part} is descending; give ranges as N-M with N <= M, like 0-3")
    return cpuset


def resolve_limits(cfg: ClusterConfig, o: LimitOverrides) -> Limits:
    d = cfg.vm_defaults
    if o.cpuset is not None:
        _check_cpuset(o.cpuset)
    if o.cpus is not None and not 0 < o.cpus <= 1024:
        raise BadInput(f"--cpus {o.cpus}: give a count between 0 and 1024, such as 2 or 1.5")
    if o.pids is not None and not 16 <= o.pids <= 2**31 - 1:
        raise BadInput(f"--pids {o.pids}: a desktop needs at least 16 processes, and takes at most {2**31 - 1}")
    if o.io_weight is not None and not 10 <= o.io_weight <= 1000:
        raise BadInput(f"--io-weight {o.io_weight}: give 10..1000")
    memory = _limit_size("--memory", o.memory, 64 << 20, "a desktop needs at least 64m") if o.memory is not None else d.memory
    if memory < 64 << 20:
        raise BadInput("--memory: a desktop needs at least 64m")
    return Limits(
        cpus=None if o.cpuset is not None and o.cpus is None else (o.cpus if o.cpus is not None else d.cpus),
        cpuset=o.cpuset,
        memory=memory,
        shm=_limit_size("--shm", o.shm, 1 << 20, "/dev/shm must be at least 1m") if o.shm is not None else d.shm,
        pids=o.pids if o.pids is not None else d.pids,
        io_weight=o.io_weight if o.io_weight is not None else d.io_weight,
        io_read_bps=_limit_size("--io-read-bps", o.io_read_bps, 1, NO_ZERO_RATE) if o.io_read_bps is not None else d.io_read_bps,
        io_write_bps=_limit_size("--io-write-bps", o.io_write_bps, 1, NO_ZERO_RATE) if o.io_write_bps is not None else d.io_write_bps,
        disk=parse_disk(o.disk) if o.disk is not None else d.disk,
    )


@dataclass
class Desktop:
    user: str
    node: str
    state: str
    vnc_port: int | None
    ssh_port: int | None
    limits: dict
    version: int
    gpus: list[dict] = field(default_factory=list)
    # The id of the desktop image it runs over; None for a desktop made before images had ids,
    # until it is adopted (adopt_image).
    image: str | None = None

    def vnc_address(self, cfg: ClusterConfig) -> str:
        return f"{cfg.node(self.node).host}:{self.vnc_port}"

    def https_url(self, cfg: ClusterConfig) -> str | None:
        """The page that opens the desktop in a browser (noVNC over HTTPS, connecting at once)."""
        if not self.vnc_port:
            return None
        return https_url(cfg.node(self.node), self.vnc_port)

    def as_dict(self, cfg: ClusterConfig) -> dict:
        return {
            "user": self.user,
            "node": self.node,
            "state": self.state,
            "vnc": self.vnc_address(cfg) if self.vnc_port and cfg.vnc.listen != "off" else None,
            "https": self.https_url(cfg),
            "ssh_port": self.ssh_port,
            "gpus": self.gpus,
            "limits": self.limits,
            "version": self.version,
            "image": self.image,
        }


@dataclass(frozen=True)
class PreviousFiles:
    """What a new desktop starts from: the newest version MooseFS holds under the member's name
    (0: none), and whether it was an earlier member's, taken over with --adopt."""

    latest: int
    adopted: bool = False


def previous_files(account: User, record: dict | None, versions: list[dict], adopt: bool) -> PreviousFiles:
    """Files under a member's name belong to whoever the owner record's member id names. A record
    without an id (an older labvm's) is the member's only if they existed before ids did."""
    latest = max((v["version"] for v in versions), default=0)
    if record is None and not latest:
        return PreviousFiles(0)
    member = (record or {}).get("member")
    if account.owns(member if isinstance(member, str) else None):
        return PreviousFiles(latest)
    if adopt:
        return PreviousFiles(latest, adopted=True)
    user = account.name
    held = f"up to v{latest}" if latest else "no version yet"
    raise FilesOfAnotherMember(
        f"MooseFS holds files of an earlier member named {user} ({held}), not of this {user}. "
        f"`labvm create {user} --adopt` continues from them; `labvm user rm {user} --purge` deletes them "
        f"(then add {user} again)"
    )


def container_name(user: str) -> str:
    return f"labvm-{user}"


NOVNC_PAGE = "vnc.html?autoconnect=1&resize=remote"


def https_url(node: Node, vnc_port: int) -> str:
    """https://HOST:PORT/ of the desktop whose port slot starts at vnc_port, with noVNC's page."""
    try:
        host = f"[{node.host}]" if ipaddress.ip_address(node.host).version == 6 else node.host
    except ValueError:
        host = node.host
    return f"https://{host}:{node.https_port(vnc_port)}/{NOVNC_PAGE}"


# A member's SSH tunnel (`ssh lab@ADMIN tunnel`) brings the desktop's HTTPS port to their own
# machine, where the browser opens https://localhost:PORT/.
TUNNEL_NAMES, TUNNEL_IPS = ["localhost"], ["127.0.0.1"]


def certificate_names(node: Node) -> tuple[list[str], list[str]]:
    """What a desktop's HTTPS certificate names: the node's host (an address or a DNS name), and
    localhost for the member's SSH tunnel."""
    try:
        ipaddress.ip_address(node.host)
    except ValueError:
        return [node.host, *TUNNEL_NAMES], list(TUNNEL_IPS)
    return list(TUNNEL_NAMES), [node.host, *TUNNEL_IPS]


def bind_address(node: Node) -> str:
    try:
        ipaddress.ip_address(node.host)
    except ValueError:
        return "0.0.0.0"
    return node.host


def build_spec(user: str, uid: int, node: Node, desktop: str, limits: Limits, gpu_uuids: list[str],
               ports: tuple[int, int | None], vnc_listen: str = "published") -> dict:
    """The container a desktop runs as; the helper creates exactly this, and its hash spots drift.
    Its HTTPS port follows from its port slot (Node.https_port); vnc_listen is the cluster
    file's <vnc><listen>."""
    return {
        "name": container_name(user),
        "image": base_image_tag(),
        "hostname": f"{user}-desktop",
        "uid": uid,
        "env": {"LANG": "C.UTF-8"},
        "labels": {"labvm.user": user, "labvm.desktop": desktop},
        "cpus": limits.cpus,
        "cpuset": limits.cpuset,
        "memory": limits.memory,
        "shm": limits.shm,
        "pids": limits.pids,
        "io_weight": limits.io_weight,
        "io_read_bps": limits.io_read_bps,
        "io_write_bps": limits.io_write_bps,
        "io_device": limits.io_device,
        "gpus": list(gpu_uuids),
        "ports": {"vnc": ports[0], "ssh": ports[1], "https": node.https_port(ports[0])},
        "bind_address": bind_address(node),
        "vnc_listen": vnc_listen,
        "vnc_geometry": "1280x800",
        "desktop_cmd": DESKTOP_SESSIONS.get(desktop, DESKTOP_SESSIONS["minimal"]),
    }


class Desktops:
    def __init__(self, home: AdminHome, say: Say = lambda _msg: None):
        self.home = home
        self.cfg = home.config
        self.say = say
        self.bundle = HelperBundle.from_package()

    # -- reading ---------------------------------------------------------------
    def get(self, db: StateDB, user: str) -> Desktop:
        row = db.desktop_row(user)
        if row is None:
            db.get_user(user)
            raise NotFound(f"{user} has no desktop; create one with `labvm create {user}`")
        gpus = db.gpu_assignments(user, row["node"])
        return Desktop(row["user"], row["node"], row["state"], row["vnc_port"], row["ssh_port"], json.loads(row["limits"]),
                       row["version"], gpus, row["image"])

    def list(self, db: StateDB) -> list[Desktop]:
        return [self.get(db, user) for user in db.desktop_users()]

    @contextmanager
    def session(self, node: Node):
        s = NodeSession(self.home, node, self.bundle)
        try:
            yield s
        finally:
            s.close()

    # -- placement -----------------------------------------------------------
    @staticmethod
    def _usage(db: StateDB, node: Node) -> tuple[set[str], int]:
        taken = db.gpus_taken_on(node.name)
        promised = sum(limits.get("memory", 0) for limits in db.limits_on(node.name))
        return taken, promised

    def _probe(self, node: Node) -> dict:
        with self.session(node) as s:
            return self.probe(s)

    def probe(self, s: NodeSession) -> dict:
        """The node's facts, over an open session."""
        facts = s.run(node_facts(s.node))
        if facts.get("gpu_error"):
            raise LabvmError(f"{s.node.name}: GPUs: {facts['gpu_error']}")
        return facts

    def capacities(self, db: StateDB, nodes: list[Node]) -> list[NodeCapacity]:
        """What each node can still give, all probed at once; a node that fails is one with an error."""
        usage = {n.name: self._usage(db, n) for n in nodes}
        outcomes = run_on_nodes(nodes, self._probe, timeout=60)
        return [
            self._capacity(n, usage[n.name], o.value) if o.ok else NodeCapacity(n, [], set(), 0, 0, error=o.error)
            for n, o in zip(nodes, outcomes, strict=True)
        ]

    @staticmethod
    def _capacity(node: Node, usage: tuple[set[str], int], facts: dict) -> NodeCapacity:
        taken, promised = usage
        return NodeCapacity(
            node=node,
            gpus=facts["gpus"],
            taken_gpus=taken,
            memory_total=facts["memory"]["total_mib"] << 20,
            memory_promised=promised,
            disk_device=(facts.get("disk") or {}).get("device"),
            blkio_weight=bool(facts.get("blkio_weight")),
            ports_in_use=frozenset(facts.get("listening_ports") or ()),
        )

    def _place(self, db: StateDB, node_name: str, request: GpuRequest, memory: int) -> tuple[NodeCapacity, str]:
        cordoned = db.cordons()
        if node_name != "auto":
            node = self.cfg.node(node_name)
            if node.name in cordoned:
                raise BadInput(f"{node.name} is cordoned ({cordoned[node.name] or 'no reason given'}); "
                               f"`labvm node uncordon {node.name}` first, or pick another node")
            cap = self._capacity(node, self._usage(db, node), self._probe(node))
            return cap, f"on {node.name}, as asked"
        nodes = [n for n in self.cfg.nodes if n.name not in cordoned]
        if not nodes:
            if self.cfg.nodes:
                raise BadInput("every node is cordoned; `labvm node uncordon NODE` one of them")
            raise BadInput(f"no nodes in {self.cfg.path}; add one with `labvm node add`")
        caps = self.capacities(db, nodes)
        chosen, reason = choose_node(caps, request, memory)
        return next(c for c in caps if c.node is chosen), reason

    # -- create, start, stop, rm: plans (lifecycle.py) run by the plan runner -------------------
    def _runner(self) -> Runner:
        return Runner(self.home, self.say)

    def create(self, user: str, *, node: str = "auto", gpus: str | None = None, overrides: LimitOverrides | None = None,
               adopt: bool = False, dry_run: bool = False, image: str | None = None):
        """With adopt, files an earlier member of the same name left on MooseFS become this
        member's. image: the id (or a prefix) of the image the desktop runs over; default, the
        newest on the admin host. With dry_run, the plan (plan.PlanReport): every check, nothing changed."""
        from .images import find_image
        from .lifecycle import CreateKind

        limits = resolve_limits(self.cfg, overrides or LimitOverrides())
        request = GpuRequest.parse(gpus, default=self.cfg.vm_defaults.gpus)
        self.home.check_member_name(user)  # a member added under an older, looser rule
        with self.home.state() as db:
            db.get_user(user)
            self._refuse_existing(db, user)
        chosen = find_image(self.home.images_dir, image)
        params = {"node": node, "gpus_asked": gpus, "gpus": request.describe(), "limits": limits.as_dict(), "adopt": adopt,
                  "image": chosen.id}
        if dry_run:
            return self._runner().dry_run(CreateKind, user, params)
        return self._runner().run(CreateKind, user, params, failed_state="rolled_back")

    def _refuse_existing(self, db: StateDB, user: str) -> None:
        if db.has_desktop(user):
            existing = self.get(db, user)
            raise AlreadyExists(f"{user} already has a desktop on {existing.node} ({existing.state}); see `labvm status`")

    def bring_up(self, s: NodeSession, op, db: StateDB, desktop: Desktop, uid: int) -> None:
        """Mount MooseFS and the desktop's layers, then run its container: each step an ensure,
        all of them sent to the node in one round trip and journaled step by step."""
        user, node = desktop.user, s.node
        disk = self.disk_of(desktop.limits)
        spec = build_spec(user, uid, node, "minimal", Limits(**desktop.limits),
                          [g["uuid"] for g in desktop.gpus], (desktop.vnc_port, desktop.ssh_port), self.cfg.vnc.listen)
        calls = self.calls(node, user, desktop.image)
        run_steps(s, op, [
            ("mount_mfs", [calls.mount_mfs()]),
            ("mount_stack", [calls.stack(desktop.version, disk)]),
            ("member_quota", [calls.quota(disk)]),
            ("start_sync", [calls.start_sync()]),
            ("start_container", self.container_calls(s, db, user, spec, desktop.image)),
        ])
        db.set_desktop_state(user, "running")

    def disk_of(self, limits: dict) -> int:
        return limits.get("disk") or self.cfg.vm_defaults.disk

    def calls(self, node: Node, user: str, image: str | None = None) -> DesktopCalls:
        """The typed helper calls for USER's desktop on NODE, over image `image` (its id)."""
        return DesktopCalls(self.cfg, node, user, image)

    def container_calls(self, s: NodeSession, db: StateDB, user: str, spec: dict, image: str) -> list[HelperCall]:
        """What starts the desktop's container (DesktopCalls.start_container), with its password
        and its HTTPS key and certificate."""
        tls = self.certificate(s.node, user)
        return self.calls(s.node, user, image).start_container(spec, db.vnc_secret(user), DESKTOP_SESSIONS, tls)

    def certificates_due(self, db: StateDB) -> list[tuple[str, str, str]]:
        """(user, node, why) of each running desktop whose HTTPS certificate is due (ca.leaf_due):
        what `labvm ca renew` issues again. Stopped desktops get theirs at their next start, and
        so does one that has none yet (it has not started since labvm served HTTPS)."""
        due = []
        for desktop in self.list(db):
            if desktop.state != "running" or not (self.home.home / DESKTOP_CERTS_DIR / f"{desktop.user}.pem").exists():
                continue
            reason = self.certificate_due(self.cfg.node(desktop.node), desktop.user)
            if reason is not None:
                due.append((desktop.user, desktop.node, reason))
        return due

    def certificate_due(self, node: Node, user: str) -> str | None:
        """Why USER's kept certificate must be issued again for NODE (ca.leaf_due), or None."""
        names, ips = certificate_names(node)
        return leaf_due(self.home.ca(), self.home.home / DESKTOP_CERTS_DIR, user, names, ips)

    def certificate(self, node: Node, user: str) -> tuple[str, str]:
        """The key and certificate of USER's desktop on NODE (PEM), issued by labvm's CA (made
        if there is none yet) and issued again, at a start, when ca.needs_renewal says so: it
        expires soon, another CA signed it, or it names another host (the desktop moved)."""
        authority, _created = self.home.init_ca()
        names, ips = certificate_names(node)
        leaf = ensure_leaf(authority, self.home.home / DESKTOP_CERTS_DIR, user, names, ips)
        if leaf.reason:
            self.say(f"issued {user}'s HTTPS certificate for {', '.join(names + ips)} ({leaf.reason})")
        return leaf.key_pem.decode(), leaf.cert_pem.decode()

    # -- versions on MooseFS (the merge helper) ---------------------------------
    def versions_on_mfs(self, s: NodeSession, user: str) -> list[dict]:
        return s.run(self.calls(s.node, user).versions())["versions"]

    def next_version(self, s: NodeSession, user: str, base: int) -> int:
        """The number the next published version of the user's files gets."""
        return max([v["version"] for v in self.versions_on_mfs(s, user)] + [base]) + 1

    def publish(self, s: NodeSession, user: str, base: int, target: int, reason: str, image: str | None,
                upper: str | None = None) -> dict:
        """Publish base + upper (default: up_mfs as it is) as low_mfs.v<target>, over desktop image
        `image`. reason, one of retention.REASONS, is recorded with the version."""
        return s.run(self.calls(s.node, user, image).publish(base, target, reason, upper))

    @staticmethod
    def base_image_call() -> HelperCall:
        """The tiny docker image every desktop container starts from (its root comes from the layers)."""
        return HelperCall("image", "ensure_docker_base", {"tag": base_image_tag(), "tar_b64": base64.b64encode(base_image_tar()).decode()})

    def files_on_mfs(self, s: NodeSession, user: str, check: bool = False) -> tuple[dict | None, list[dict]]:
        """The owner record and the versions MooseFS holds under a member name. With check, MooseFS
        is not mounted for it: where it is not mounted yet, nothing is read (no record, no versions)."""
        if not s.run(mount_mfs(self.cfg), check=check).get("mounted") and check:
            return None, []
        return s.run(self.calls(s.node, user).owner())["owner"], self.versions_on_mfs(s, user)

    def _adopt_files(self, s: NodeSession, db: StateDB, account: User, files: PreviousFiles) -> None:
        """A new desktop continues from the newest version of the member's files, if an earlier
        desktop left any (`labvm rm` keeps them), and this node becomes its owner on MooseFS,
        with the member's id in the owner record."""
        user = account.name
        if files.latest:
            whose = "an earlier member's files (--adopt)" if files.adopted else f"{user}'s files"
            self.say(f"continuing from v{files.latest} of {whose}, kept when the last desktop was removed "
                     f"(`labvm rm {user} --purge` deletes them)")
            db.set_first_version(user, files.latest)
        calls = self.calls(s.node, user)
        s.run(calls.set_owner(member=account.member_id))
        # A container of that name on this node is a leftover of an earlier desktop of the user.
        s.run(calls.remove_container())

    def purge_files(self, s: NodeSession, user: str) -> dict:
        """Delete every version of the files MooseFS holds under a member name."""
        s.run(mount_mfs(self.cfg))
        return s.run(self.calls(s.node, user).purge())

    def _reserve(self, db, user, node, cap, request, limits, image: str) -> None:
        """Record the desktop with its GPUs, ports and image in one transaction: no GPU or port is given twice."""
        db.reserve(user, node.name, cap.choice(request), new_limits=limits.as_dict(), image=image)

    def adopt_image(self, s: NodeSession, db: StateDB, desktop: Desktop, record: bool = True) -> str:
        """The image of a desktop made before images had ids: the one its node held then, which
        that labvm kept in xfce_local (it is never replaced now). Recorded unless record is False."""
        held = s.run(image_status(self.cfg))["images"]
        legacy = [image["id"] for image in held if image["legacy"]]
        if not legacy:
            raise StateError(f"{desktop.user}'s desktop has no image recorded, and {desktop.node} holds no image "
                             f"from before images had ids ({self.cfg.xfce_local}); give it one with "
                             f"`labvm rebase {desktop.user} --image ID`")
        if record:
            db.update_desktop(desktop.user, image=legacy[0])
            self.say(f"{desktop.user}'s desktop runs over image {legacy[0][:12]}, the one {desktop.node} held "
                     "before images had ids: recorded")
        return legacy[0]

    # -- lifecycle -----------------------------------------------------------
    def _with_desktop(self, user: str, kind: str, work):
        with self.home.state() as db:
            self.get(db, user)  # an unknown user or desktop is refused before anything is journaled
            with journaled(db, kind, user, {}) as op:
                desktop = self.get(db, user)  # as it is now that the lock is held
                return work(db, op, desktop, self.cfg.node(desktop.node))

    def _plan(self, kind_cls, user: str, dry_run: bool, **params):
        from .lifecycle import plan_on_desktop

        return plan_on_desktop(self.home, self.say, kind_cls, user, dry_run, **params)

    def start(self, user: str, dry_run: bool = False):
        from .lifecycle import StartKind

        report = self._plan(StartKind, user, dry_run)
        if dry_run:
            return report
        with self.home.state() as db:
            return self.get(db, user)

    def stop(self, user: str, timeout: int = 20, dry_run: bool = False):
        from .lifecycle import StopKind

        report = self._plan(StopKind, user, dry_run, timeout=timeout)
        if dry_run:
            return report
        with self.home.state() as db:
            return self.get(db, user)

    def remove(self, user: str, purge: bool = False, dry_run: bool = False):
        from .lifecycle import RemoveKind

        return self._plan(RemoveKind, user, dry_run, purge=purge)

    def resize(self, user: str, size_text: str, dry_run: bool = False) -> dict:
        """Grow USER's disk: the record, the image on its node (online, a running desktop sees
        the room at once) and the member's quota on MooseFS. Never shrinks."""
        size = parse_disk(size_text, "SIZE")
        with self.home.state() as db:
            desktop = self.get(db, user)
            plan = self._resize_plan(desktop, size)
            if dry_run or not plan["changes"]:
                return plan
        from .lifecycle import ResizeKind

        grown = self._plan(ResizeKind, user, False, size=size)
        return {**plan, "pending": grown.get("pending", False), "restart_needed": grown.get("restart_needed", False)}

    def _resize_plan(self, desktop: Desktop, size: int) -> dict:
        current = self.disk_of(desktop.limits)
        if size < current:
            raise BadInput(f"{desktop.user}'s disk is {_size_text(current)}; a disk can grow, not shrink "
                           f"(SIZE {_size_text(size)} is smaller)")
        return {"user": desktop.user, "node": desktop.node, "state": desktop.state, "from": current, "to": size,
                "changes": size != current, "quota": member_quota_for(self.cfg, size)}

    def renew_certificate(self, user: str) -> bool:
        """USER's running desktop gets its HTTPS certificate issued again if it is due
        (ca.leaf_due), sent to its node, where its stunnel restarts with it; the container is
        not touched. Under the desktop's lock. True if it was renewed."""

        def work(db, op, desktop, node):
            if desktop.state != "running":
                return False  # stopped meanwhile: its next start issues it
            if self.certificate_due(node, user) is None:
                return False  # renewed meanwhile
            key, cert = self.certificate(node, user)
            with self.session(node) as s, op.step("renew_https"):
                s.run(self.calls(node, user).renew_https(key, cert, bind_address(node), node.https_port(desktop.vnc_port)))
            return True

        return self._with_desktop(user, "ca renew", work)

    def passwd(self, user: str, password: str) -> None:
        with self.home.state() as db:
            db.set_password(user, password)
        try:
            with self.home.state() as db:
                desktop = self.get(db, user)
        except NotFound:
            return
        if desktop.state != "running":
            return

        def work(db, op, desktop, node):
            with self.session(node) as s, op.step("set_password"):
                s.run(self.calls(node, user).set_password(db.vnc_secret(user)))

        self._with_desktop(user, "passwd", work)

