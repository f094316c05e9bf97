"""A stateful fake of a labvm cluster, for unit tests of operations and of their undo.

Each node is a FakeNode: a session (`call`, and `run`, `call_many`, `alive`, `close`) whose
helper actions act on a model of what the real helpers (scripts/node_helpers) leave on that
node and on MooseFS, which all nodes share. A test drives an operation through the fakes and
then compares the model with where it started (`FakeCluster.picture`, `FakeCluster.view`).

The model. On each node: MooseFS mounted or not, the desktop image pushed or not, the docker
images, and per desktop a `Desk`: its local layers (its disk with up_local), the files in its
upper, the version its stack has mounted, whether its sync daemon runs, and its container
(spec, running, paused). On MooseFS, per member, a `Files`: the published versions (each the
files it holds, its base and reason), up_mfs (the sync's copy of the upper), snapshots of it,
the owner record and the quota.

A file is a name. The desktop writes one into its upper (`FakeCluster.write`); the sync copies
the upper to up_mfs on a flush and when its daemon stops (a daemon exits unsynced once the
owner record names another node); a publish makes a version of the base version's files and an
upper's. What a desktop shows is its version's files with its upper's (`FakeCluster.view`); an
operation that moves or undoes must leave that as it was.

Changing actions are ensures, as on a node: a second run changes nothing, and with check they
change nothing and say whether they would. Each refuses what its helper refuses (a stack over
another version, a node the owner record fences off, an upper reset under a mounted stack, a
sync over an empty upper while up_mfs holds files, ...) with HelperFailed and the helper's
code. A call the model does not know, or one that would act on the wrong node's files, raises
AssertionError, so a test notices an operation's new or wrong call.

Failures: `FakeNode.fail(helper, action, ...)` makes the next such calls fail, before or after
they did their work (the node acted, its reply was lost); `FakeNode.cut()` makes the node
unreachable (every call and `alive` raise NodeUnreachable) until `FakeNode.mend()`.

Use: `cluster = FakeCluster(home.config)`, `cluster.install(monkeypatch)` (every session labvm
opens is then one of these nodes), `cluster.seed(home, user)` for each desktop the state
database holds; run the operation (its Runner, or `main([...])`); compare `cluster.picture(user)`
and `cluster.view(node, user)` with what they were.
"""

from __future__ import annotations

import itertools
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from labvm.config import ClusterConfig, Node
from labvm.errors import HelperFailed, NodeUnreachable
from labvm.remote.helpers import HelperCall

from .fake_node import TypedCalls

SNAPSHOT_PREFIX = ".upper-"
# The desktop images of the tests: A, which every node holds and the seeded desktops run over,
# and B, a newer one that only the admin host has.
IMAGE = "a" * 64
IMAGE_B = "b" * 64
IMAGE_FILES = {
    IMAGE: {"etc/os-release": b"A\n", "etc/motd": b"A motd\n", "var/lib/dpkg/status": b"Package: a\n"},
    IMAGE_B: {"etc/os-release": b"B\n", "etc/motd": b"B motd\n", "usr/bin/only-in-b": b"b\n",
              "var/lib/dpkg/status": b"Package: b\n"},
}


def plant_image(home, image: str, desktop: str = "minimal", files: dict[str, bytes] | None = None, built: str = "") -> Path:
    """A small real image tarball in the admin home's images/ as `labvm image build` leaves it,
    with `image` as its recorded id."""
    import io
    import json
    import os
    import tarfile

    from labvm.images import checksum_path, image_file_name

    home.images_dir.mkdir(parents=True, exist_ok=True)
    built = built or ("2025-01-01T00:00:00Z" if image == IMAGE else "2025-02-01T00:00:00Z")
    path = home.images_dir / image_file_name(desktop, built, image)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in sorted((files if files is not None else IMAGE_FILES.get(image, {})).items()):
            info = tarfile.TarInfo("./" + name)
            info.size, info.mtime = len(data), 1000
            tar.addfile(info, io.BytesIO(data))
    checksum_path(path).write_text(f"{image}  {path.name}\n")
    path.with_name(path.name + ".json").write_text(json.dumps({"desktop": desktop, "built": built, "package_count": 1}))
    stamp = 1_000_000 if image == IMAGE else 2_000_000
    os.utime(path, (stamp, stamp))
    return path


@dataclass
class Container:
    spec: dict
    running: bool = False
    paused: bool = False


@dataclass
class Desk:
    """One desktop's things on one node."""

    layers: bool = False  # <data_dir>/vms/<user>: its disk with up_local, and the sync's control dir
    upper: set[str] = field(default_factory=set)  # the files in up_local
    stack: int | None = None  # the version bound under the mounted overlay
    sync: bool = False  # its sync daemon runs
    synced: bool = False  # a daemon ran here (its config names up_mfs): a flush without one is a full pass
    container: Container | None = None
    disk: int | None = None
    image: str | None = None  # the image under the mounted overlay

    @property
    def empty(self) -> bool:
        return not self.layers and self.stack is None and not self.sync and self.container is None

    def picture(self) -> dict | None:
        if self.empty:
            return None
        c = self.container
        return {"layers": self.layers, "upper": frozenset(self.upper), "stack": self.stack, "image": self.image, "sync": self.sync,
                "container": None if c is None else {"running": c.running, "paused": c.paused, "spec": c.spec}}


@dataclass
class Version:
    base: int | None
    reason: str | None
    files: frozenset[str]
    created: float = 0.0
    image: str | None = None  # the image it was published over


@dataclass
class Files:
    """One member's tree on MooseFS."""

    versions: dict[int, Version] = field(default_factory=dict)
    up_mfs: set[str] | None = None
    owner: dict | None = None
    snapshots: dict[str, frozenset[str]] = field(default_factory=dict)
    quota: int | None = None
    last_success: float | None = None
    synced_by: str | None = None


@dataclass
class Failure:
    helper: str
    action: str
    times: int
    exc: Exception | None
    after: bool
    skip: int
    cut: bool
    check: bool | None


@dataclass(frozen=True)
class Call:
    helper: str
    action: str
    params: dict
    check: bool
    tag: str | None = None  # the cluster's tag when the call was made


# (helper, action) -> the FakeNode method that models it.
ACTIONS: dict[tuple[str, str], str] = {}


def action(helper: str, name: str):
    def register(method):
        ACTIONS[(helper, name)] = method.__name__
        return method

    return register


class FakeCluster:
    """The nodes of a cluster file as FakeNodes, and MooseFS's files, per member."""

    def __init__(self, cfg: ClusterConfig, gpus: int = 4, memory_mib: int = 16384):
        self.cfg = cfg
        self.mfs_mount = cfg.storage.mfs_mount
        self.files: dict[str, Files] = {}
        self.nodes = {n.name: FakeNode(self, n, gpus, memory_mib) for n in cfg.nodes}
        self.clock = itertools.count(1)
        # A label the calls made from now on carry (a test sets it to the step that runs).
        self.tag: str | None = None

    def __getitem__(self, name: str) -> "FakeNode":
        return self.nodes[name]

    def session(self, name: str) -> "FakeNode":
        if name not in self.nodes:
            raise NodeUnreachable(node=name, msg="not a node of the fake cluster")
        return self.nodes[name]

    def install(self, monkeypatch) -> None:
        """Every node session labvm opens (a plan's, Desktops') is this cluster's node, with no
        helper bundle; a VNC probe (switch's verify) answers where a container of the port runs."""
        from labvm import desktops, imagestore, plan, switch
        from labvm.remote.helpers import HelperBundle

        monkeypatch.setattr(plan.Context, "_open_session", lambda _ctx, name: self.session(name))
        monkeypatch.setattr(desktops, "NodeSession", lambda _home, node, _bundle: self.session(node.name))
        monkeypatch.setattr(imagestore, "NodeSession", lambda _home, node, _bundle: self.session(node.name))
        monkeypatch.setattr(HelperBundle, "from_package", classmethod(lambda cls: None))
        monkeypatch.setattr(switch, "socket", SimpleNamespace(create_connection=self.connect))
        monkeypatch.setattr(switch, "VERIFY_TIMEOUT_S", 0.2)

    def connect(self, address, timeout=None) -> "_VncSocket":
        """socket.create_connection for VNC: RFB from a running container published on the port."""
        host, port = address
        for fake in self.nodes.values():
            if fake.node.host == host and fake.reachable and port in fake.vnc_ports():
                return _VncSocket()
        raise ConnectionRefusedError(f"{host}:{port}: connection refused")

    # -- what a test sets up and looks at ---------------------------------------------------------
    def seed(self, home, user: str, versions: int | None = None, synced=("synced",), unsynced=("unsynced",)) -> None:
        """A desktop as the state database records it: its member's files on MooseFS (versions 1
        up to its recorded one, each with a file of its own, owned by its node) and, on that node,
        its layers, brought up with labvm's own calls; files written into its upper, `synced` ones
        flushed to up_mfs. A desktop recorded as stopped is then stopped as labvm stops one (its
        files all flushed)."""
        from labvm.desktops import DESKTOP_SESSIONS, Desktops, Limits, build_spec
        from labvm.images import base_image_tag

        with home.state() as db:
            desktop = Desktops(home).get(db, user)
            account = db.get_user(user)
            password = db.vnc_secret(user)
        top = desktop.version if versions is None else versions
        files = self.files.setdefault(user, Files(up_mfs=set()))
        for number in range(1, top + 1):
            held = frozenset(f"{user}.v{k}" for k in range(1, number + 1))
            files.versions[number] = Version(number - 1 if number > 1 else None, "backup" if number > 1 else None, held,
                                             next(self.clock))
        files.owner = {"node": desktop.node, "op": None, "member": account.member_id, "since": 0.0}
        fake = self[desktop.node]
        fake.docker_images.add(base_image_tag())
        calls = Desktops(home).calls(fake.node, user, desktop.image)
        disk = desktop.limits.get("disk") or home.config.vm_defaults.disk
        spec = build_spec(user, account.uid, fake.node, "minimal", Limits(**desktop.limits), [g["uuid"] for g in desktop.gpus],
                          (desktop.vnc_port, desktop.ssh_port))
        for call in (calls.mount_mfs(), calls.stack(desktop.version, disk), calls.quota(disk), calls.start_sync(),
                     *calls.start_container(spec, password, DESKTOP_SESSIONS)):
            fake.run(call)
        self.write(desktop.node, user, *synced)
        fake.run(calls.flush(60))
        self.write(desktop.node, user, *unsynced)
        if desktop.state != "running":
            for call in (calls.stop_container(10), calls.stop_sync(flush=True), calls.remove_container(), calls.unmount_stack()):
                fake.run(call)
        fake.calls.clear()

    def write(self, node: str, user: str, *names: str) -> None:
        """The desktop writes files: into its upper, which its running, unfrozen container shows."""
        desk = self[node].desks.get(user)
        assert desk is not None and desk.container is not None and desk.container.running and not desk.container.paused, (
            f"{user}'s desktop does not run on {node}: nothing writes there")
        desk.upper.update(names)

    def view(self, node: str, user: str, version: int | None = None) -> frozenset[str]:
        """What the desktop on node shows: the files of its mounted version (or of version, for
        a stopped one) with its upper's."""
        desk = self[node].desks[user]
        version = desk.stack if version is None else version
        return self.files[user].versions[version].files | frozenset(desk.upper)

    def picture(self, user: str) -> dict:
        """Everything the model holds of a desktop, comparable with ==."""
        for fake in self.nodes.values():
            fake.reap()
        files = self.files.get(user)
        owner = None if files is None or files.owner is None else {k: files.owner.get(k) for k in ("node", "member")}
        return {
            "versions": None if files is None else {n: (v.base, v.reason, v.files) for n, v in files.versions.items()},
            "up_mfs": None if files is None or files.up_mfs is None else frozenset(files.up_mfs),
            "snapshots": None if files is None else dict(files.snapshots),
            "owner": owner,
            "quota": None if files is None else files.quota,
            "nodes": {name: fake.desks.get(user, Desk()).picture() for name, fake in self.nodes.items()},
        }

    def changes(self) -> list[tuple[str, str, str]]:
        """(node, helper, action) of every call made without check that is not a read, in order per node."""
        return [(name, c.helper, c.action) for name, fake in self.nodes.items() for c in fake.calls
                if not c.check and (c.helper, c.action) not in READS]


class _VncSocket:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def settimeout(self, _seconds):
        pass

    def recv(self, _size: int) -> bytes:
        return b"RFB 003.008\n"


READS = {("probe", "facts"), ("image", "status"), ("image", "require"), ("vm", "status"), ("vm", "owner"), ("merge", "versions"), ("merge", "changed_paths"),
         ("sync", "status"), ("sync", "last_success"), ("mfs", "status"), ("net", "isolation_status"),
         ("runtime", "runtime_status")}


class FakeNode(TypedCalls):
    """One node's helpers over the cluster's model; every call is recorded (`calls`)."""

    def __init__(self, cluster: FakeCluster, node: Node, gpus: int, memory_mib: int):
        self.cluster, self.node, self.name = cluster, node, node.name
        self.reachable = True
        self.mfs_mounted = False
        self.images = {IMAGE}  # the ids of the desktop images pushed here
        self.legacy: str | None = None  # the id of the image in xfce_local, from before images had ids
        self.docker_images: set[str] = set()
        self.isolated = self.runtime = False
        self.facts = {"gpus": [{"index": i, "uuid": f"GPU-{node.name}-{i}", "name": "Fake GPU"} for i in range(gpus)],
                      "memory": {"total_mib": memory_mib}, "disk": {}, "blkio_weight": False, "listening_ports": []}
        self.desks: dict[str, Desk] = {}
        self.passwords: dict[str, str] = {}
        self.secrets: dict[str, dict] = {}  # the last ensure_container's secrets, by user
        self.calls: list[Call] = []
        self.failures: list[Failure] = []
        self._acting = ("", "")

    # -- what a test does to the node ------------------------------------------------------------
    def fail(self, helper: str, action: str, times: int = 1, exc: Exception | None = None, *, after: bool = False,
             skip: int = 0, cut: bool = False, check: bool | None = None) -> None:
        """The next `times` calls of helper.action (after `skip` that succeed; with check given,
        only calls in that mode) fail: with exc, or as the helper fails (HelperFailed, code
        "injected"). after: the call does its work first. cut: the node is unreachable from
        that call on (exc defaults to NodeUnreachable)."""
        self.failures.append(Failure(helper, action, times, exc, after, skip, cut, check))

    def cut(self) -> None:
        self.reachable = False

    def mend(self) -> None:
        self.reachable = True

    def desk(self, user: str) -> Desk:
        return self.desks.setdefault(user, Desk())

    def vnc_ports(self) -> set[int]:
        return {d.container.spec["ports"]["vnc"] for d in self.desks.values()
                if d.container is not None and d.container.running}

    def calls_of(self, helper: str, action: str) -> list[Call]:
        return [c for c in self.calls if (c.helper, c.action) == (helper, action)]

    # -- the session ----------------------------------------------------------------------------
    def alive(self, timeout):
        if not self.reachable:
            raise self._unreachable()

    def close(self):
        pass

    def call(self, helper, action, params, timeout=180, check=False):
        self.calls.append(Call(helper, action, params, check, self.cluster.tag))
        method = ACTIONS.get((helper, action))
        if method is None:
            raise AssertionError(f"{self.name}: the fake cluster does not model {helper}.{action}; "
                                 "add it to tests/unit/fake_cluster.py")
        if not self.reachable:
            raise self._unreachable()
        self.reap()
        failure = self._failure(helper, action, check)
        if failure is not None and not failure.after:
            raise self._failed(failure)
        self._acting = (helper, action)
        try:
            changed, data = getattr(self, method)(params, check)
        except BaseException:
            if failure is not None:
                failure.times += 1  # the work failed by itself: the failure after it is still to come
            raise
        if failure is not None:
            raise self._failed(failure)
        return {"ok": True, "changed": changed, "data": data}

    def _failure(self, helper: str, action: str, check: bool) -> Failure | None:
        for f in self.failures:
            if (f.helper, f.action) != (helper, action) or f.times <= 0 or f.check not in (None, check):
                continue
            if f.skip > 0:
                f.skip -= 1
                return None
            f.times -= 1
            return f
        return None

    def _failed(self, f: Failure) -> Exception:
        if f.cut:
            self.reachable = False
        if f.exc is not None:
            return f.exc
        if f.cut:
            return self._unreachable()
        return HelperFailed(self.name, f.helper, f.action, "injected", "a failure the test injected")

    def _unreachable(self) -> NodeUnreachable:
        return NodeUnreachable(node=self.name, msg="no route to host")

    def _refuse(self, code: str, msg: str):
        helper, action = self._acting
        raise HelperFailed(self.name, helper, action, code, msg, exit_status=3)

    def reap(self) -> None:
        """A sync daemon exits, without syncing, once the owner record names another node (or
        none): syncd's fence."""
        for user, desk in self.desks.items():
            owner = (self._files(user) or Files()).owner
            if desk.sync and owner is not None and owner.get("node") != self.name:
                desk.sync = False

    # -- the model's pieces -------------------------------------------------------------------
    def _mine(self, params: dict) -> None:
        """A call that names its node acts on that node's files: it must be sent there."""
        named = params.get("node")
        assert named in (None, self.name), f"{self._acting[0]}.{self._acting[1]} for {named} was sent to {self.name}"

    def _require_mfs(self) -> None:
        if not self.mfs_mounted:
            self._refuse("mfs_not_mounted", f"MooseFS is not mounted at {self.cluster.mfs_mount}")

    def _assert_mfs(self) -> None:
        """For actions whose helper does not check the mount: unmounted, they would read or write
        the node's own disk under the mount point, never MooseFS."""
        assert self.mfs_mounted, f"{self._acting[0]}.{self._acting[1]} on {self.name} with MooseFS not mounted"

    def _files(self, user: str) -> Files | None:
        return self.cluster.files.get(user)

    def _user_files(self, user: str) -> Files:
        self._require_mfs()
        files = self._files(user)
        if files is None:
            self._refuse("user_dir_missing", f"{user} has no files on MooseFS")
        return files

    def _running(self, user: str) -> bool:
        desk = self.desks.get(user)
        return desk is not None and desk.container is not None and desk.container.running

    def _user_dir(self, user: str) -> str:
        return posixpath.join(self.cluster.mfs_mount, "vms", user)

    def _copy_upper(self, desk: Desk, files: Files) -> int:
        """The sync makes up_mfs equal to up_local; the number of files that changed."""
        changed = len(desk.upper ^ files.up_mfs)
        files.up_mfs = set(desk.upper)
        files.last_success, files.synced_by = float(next(self.cluster.clock)), self.name
        return changed

    def _full_pass(self, user: str, desk: Desk, check: bool) -> dict:
        files = self._files(user)
        if not desk.layers:
            self._refuse("up_local_missing", f"{user}'s up_local is missing; run the vm helper's ensure_stack first")
        if not self.mfs_mounted or files is None or files.up_mfs is None:
            self._refuse("up_mfs_missing", f"{user}'s up_mfs is missing")
        if check:
            return {"files": None, "seconds": None}
        if not desk.upper and files.up_mfs:
            self._refuse("up_mfs_not_empty", f"{user}'s up_local is empty but up_mfs is not")
        desk.synced = True
        return {"files": self._copy_upper(desk, files), "seconds": 0.0, "examined": len(desk.upper), "not_copied": None}

    @staticmethod
    def _container_state(desk: Desk | None) -> dict:
        c = None if desk is None else desk.container
        if c is None:
            return {"exists": False, "running": False, "paused": False, "status": None, "spec_hash": None}
        status = "paused" if c.paused else "running" if c.running else "exited"
        return {"exists": True, "running": c.running, "paused": c.paused, "status": status, "spec_hash": str(sorted(c.spec))}

    # -- mfs ---------------------------------------------------------------------------------
    @action("mfs", "ensure_mounted")
    def _mfs_ensure_mounted(self, p: dict, check: bool):
        was = self.mfs_mounted
        if not check:
            self.mfs_mounted = True
        return not was, {"mount": p["mount"], "mounted": self.mfs_mounted, "is_moosefs": self.mfs_mounted, "kernel_checks": True}

    @action("mfs", "ensure_unmounted")
    def _mfs_ensure_unmounted(self, p: dict, check: bool):
        if self.mfs_mounted and any(d.stack is not None or d.sync for d in self.desks.values()):
            self._refuse("in_use", f"{p['mount']} is in use by a desktop's stack or sync")
        was = self.mfs_mounted
        if not check:
            self.mfs_mounted = False
        return was, {"mount": p["mount"], "mounted": self.mfs_mounted}

    @action("mfs", "status")
    def _mfs_status(self, p: dict, check: bool):
        return False, {"mount": p["mount"], "mounted": self.mfs_mounted, "is_moosefs": self.mfs_mounted}

    @action("mfs", "ensure_quota")
    def _mfs_ensure_quota(self, p: dict, check: bool):
        self._require_mfs()
        files = self._files(p["user"])
        previous = None if files is None else files.quota
        changed = previous != p["size"]
        if changed and not check:
            self.cluster.files.setdefault(p["user"], Files()).quota = p["size"]
        return changed, {"path": self._user_dir(p["user"]), "used": 0, "limit": p["size"], "previous_limit": previous}

    # -- probe, image, net, runtime -----------------------------------------------------------------
    @action("probe", "facts")
    def _probe_facts(self, p: dict, check: bool):
        ports = set(self.facts["listening_ports"])
        for desk in self.desks.values():
            if desk.container is not None and desk.container.running:
                ports.update(port for port in desk.container.spec["ports"].values() if port)
        return False, {**self.facts, "listening_ports": sorted(ports)}

    @action("image", "status")
    def _image_status(self, p: dict, check: bool):
        def users(image):
            return [f"{self.node.data_dir}/vms/{user}/merge_local" for user, d in self.desks.items()
                    if d.stack is not None and d.image == image]
        held = [{"id": image, "legacy": False, "desktop": "minimal", "in_use_by": users(image)} for image in sorted(self.images)]
        if self.legacy is not None:
            held.append({"id": self.legacy, "legacy": True, "desktop": "minimal", "in_use_by": users(self.legacy)})
        return False, {"images": held}

    @action("image", "require")
    def _image_require(self, p: dict, check: bool):
        if p["image"]["id"] not in self.images | {self.legacy}:
            self._refuse("image_missing", f"desktop image {p['image']['id'][:12]} is not on this node")
        return False, {"id": p["image"]["id"], "tree": f"/var/lib/labvm/images/{p['image']['id']}"}

    @action("image", "ensure_unpacked")
    def _image_ensure_unpacked(self, p: dict, check: bool):
        changed = p["sha256"] not in self.images | {self.legacy}
        if changed and not check:
            self.images.add(p["sha256"])
        return changed, {"id": p["sha256"]}

    @action("image", "remove")
    def _image_remove(self, p: dict, check: bool):
        used = [user for user, d in self.desks.items() if d.stack is not None and d.image == p["id"]]
        if used:
            self._refuse("image_in_use", f"image {p['id'][:12]} is in use as an overlay lower layer by {used}")
        changed = p["id"] in self.images
        if changed and not check:
            self.images.discard(p["id"])
        return changed, {"id": p["id"], "removed": [p["id"]] if changed else []}

    def send_image(self, cfg, path, image: str, progress=lambda _done, _total: None) -> bool:
        """NodeSession.send_image: the upload and the unpack, as one call."""
        return bool(self.run(HelperCall("image", "ensure_unpacked", {"store": {}, "tarball": str(path), "sha256": image})))

    @action("image", "ensure_docker_base")
    def _image_ensure_docker_base(self, p: dict, check: bool):
        changed = p["tag"] not in self.docker_images
        if changed and not check:
            self.docker_images.add(p["tag"])
        return changed, {"tag": p["tag"], "id": None if changed and check else f"sha256:{p['tag']}"}

    @action("net", "ensure_isolation")
    def _net_ensure_isolation(self, p: dict, check: bool):
        changed = not self.isolated
        if not check:
            self.isolated = True
        return changed, {"missing": [] if self.isolated else ["isolation"]}

    @action("net", "isolation_status")
    def _net_isolation_status(self, p: dict, check: bool):
        return False, {"missing": [] if self.isolated else ["isolation"]}

    @action("runtime", "ensure_runtime")
    def _runtime_ensure_runtime(self, p: dict, check: bool):
        changed = not self.runtime
        if not check:
            self.runtime = True
        return changed, {"runtime": "labvm" if self.runtime else None}

    @action("runtime", "runtime_status")
    def _runtime_runtime_status(self, p: dict, check: bool):
        return False, {"runtime": "labvm" if self.runtime else None}

    # -- vm: the stack and the layers ----------------------------------------------------------------
    @action("vm", "status")
    def _vm_status(self, p: dict, check: bool):
        desk = self.desks.get(p["user"])
        mounted = desk is not None and desk.stack is not None
        stack = {"merge_local_mounted": mounted, "low_local_mounted": mounted, "disk_mounted": mounted,
                 "low_local_version": desk.stack if desk is not None else None}
        disk = {"size": desk.disk} if desk is not None and desk.layers else {}
        return False, {"container": {**self._container_state(desk), "error": None}, "stack": stack, "disk": disk}

    @action("vm", "ensure_stack")
    def _vm_ensure_stack(self, p: dict, check: bool):
        user, version = p["user"], p["version"]
        self._mine(p)
        self._require_mfs()
        if p["image"]["id"] not in self.images | {self.legacy}:
            self._refuse("image_missing", f"desktop image {p['image']['id'][:12]} is not on this node")
        desk = self.desks.get(user) or Desk()
        if desk.stack is not None and desk.stack != version:
            self._refuse("stack_mismatch", f"{user}'s stack is mounted over version {desk.stack} (wanted version {version}); "
                                           "stop the desktop and run ensure_stack_unmounted first")
        files = self._files(user)
        owner = None if files is None else files.owner
        if owner is not None and owner.get("node") not in (None, self.name):
            self._refuse("fenced", f"{user}'s desktop belongs to node {owner.get('node')!r}; this node ({self.name}) may not run it")
        if version not in (files.versions if files else {}) and version != 0:
            self._refuse("version_missing", f"version {version} of {user} does not exist")
        grows = desk.disk is None or p["disk"] > desk.disk
        changed = (files is None or files.up_mfs is None or owner is None or owner.get("node") is None
                   or not desk.layers or desk.stack is None or grows)
        data = {"version": version, "mounted": desk.stack is not None}
        if check or not changed:
            return changed, data
        files = self.cluster.files.setdefault(user, Files())
        if version not in files.versions:
            files.versions[version] = Version(None, "create", frozenset(), float(next(self.cluster.clock)))
        if files.up_mfs is None:
            files.up_mfs = set()
        if files.owner is None or files.owner.get("node") is None:
            files.owner = {"node": self.name, "op": None, "member": (files.owner or {}).get("member"), "since": 0.0}
        desk = self.desk(user)
        if not desk.layers:
            # A new up_local starts as the sync left up_mfs.
            desk.layers, desk.upper = True, set(files.up_mfs)
        desk.disk = max(desk.disk or 0, p["disk"])
        desk.stack, desk.image = version, p["image"]["id"]
        return True, {**data, "mounted": True}

    @action("vm", "ensure_stack_unmounted")
    def _vm_ensure_stack_unmounted(self, p: dict, check: bool):
        desk = self.desks.get(p["user"])
        if desk is None or desk.stack is None:
            return False, {"merge_local_mounted": False}
        if self._running(p["user"]):
            self._refuse("container_running", f"container labvm-{p['user']} is running on this stack; stop it first")
        if not check:
            desk.stack = desk.image = None
        return True, {"merge_local_mounted": check}

    @action("vm", "reset_upper")
    def _vm_reset_upper(self, p: dict, check: bool):
        user = p["user"]
        desk = self.desks.get(user) or Desk()
        if self._running(user):
            self._refuse("container_running", f"container labvm-{user} is running; stop it first")
        if desk.stack is not None:
            self._refuse("stack_mounted", f"{user}'s stack is mounted; unmount it first (ensure_stack_unmounted)")
        self._require_mfs()
        files = self._files(user)
        emptied = (["up_local"] if desk.upper else []) + (["up_mfs"] if files is not None and files.up_mfs else [])
        if emptied and not check:
            desk.upper.clear()
            if files is not None and files.up_mfs is not None:
                files.up_mfs.clear()
        return bool(emptied), {"emptied": emptied}

    @action("vm", "remove_local_layers")
    def _vm_remove_local_layers(self, p: dict, check: bool):
        user = p["user"]
        desk = self.desks.get(user) or Desk()
        if desk.stack is not None:
            self._refuse("stack_mounted", f"refusing to remove {user}'s layers: its stack is mounted")
        if desk.sync:
            self._refuse("sync_running", f"the sync of {user} still runs; stop it first (sync ensure_stopped)")
        exists = desk.layers
        if exists and not check:
            desk.layers, desk.synced, desk.disk = False, False, None
            desk.upper.clear()
        return exists, {"vm_dir": f"{self.node.data_dir}/vms/{user}", "removed": exists}

    @action("vm", "resize_disk")
    def _vm_resize_disk(self, p: dict, check: bool):
        desk = self.desks.get(p["user"])
        if desk is None or not desk.layers:
            return False, {"disk": {}, "pending": True}
        if p["size"] < (desk.disk or 0):
            self._refuse("disk_shrink", f"{p['user']}'s disk can grow, not shrink")
        changed = p["size"] != desk.disk
        if changed and not check:
            desk.disk = p["size"]
        return changed, {"disk": {"size": desk.disk}, "pending": False}

    @action("vm", "purge_mfs_data")
    def _vm_purge_mfs_data(self, p: dict, check: bool):
        user = p["user"]
        self._require_mfs()
        desk = self.desks.get(user)
        if desk is not None and desk.stack is not None:
            self._refuse("in_use", f"{user}'s files on MooseFS are mounted on this node; stop the desktop first")
        exists = user in self.cluster.files
        if exists and not check:
            del self.cluster.files[user]
        return exists, {"path": self._user_dir(user), "removed": exists}

    # -- vm: the container -------------------------------------------------------------------
    @action("vm", "ensure_container")
    def _vm_ensure_container(self, p: dict, check: bool):
        user, spec = p["user"], p["spec"]
        self._mine(p)
        desk = self.desks.get(user)
        if desk is None or desk.stack is None:
            self._refuse("stack_not_mounted", f"{user}'s merge_local is not mounted; run ensure_stack first")
        owner = (self._files(user) or Files()).owner
        if owner is not None and owner.get("node") not in (None, self.name):
            self._refuse("fenced", f"{user}'s desktop belongs to node {owner.get('node')!r}")
        c = desk.container
        if not check:
            self.secrets[user] = dict(p["secrets"])
        data = {"name": spec["name"], "created": c is None, "started": False}
        if c is not None and c.spec != spec and not c.running:
            if check:
                return True, {**data, "created": True, "replaces": True}
            desk.container = c = None  # a stopped container of another spec is replaced
        if c is not None and c.spec != spec:
            self._refuse("container_differs", f"container labvm-{user} was created from another spec; remove it first")
        if c is not None and c.running:
            thawed = c.paused and not check
            if thawed:
                c.paused = False
            return thawed, {**data, "vnc": {"port": spec["ports"]["vnc"], "ready": True}}
        if check:
            return True, data
        if spec["image"] not in self.docker_images:
            self._refuse("image_missing", f"image {spec['image']} is not on this node")
        desk.container = c or Container(spec)
        desk.container.running = True
        self.passwords[user] = p["secrets"]["password"]
        return True, {**data, "started": True, "vnc": {"port": spec["ports"]["vnc"], "ready": True}}

    @action("vm", "stop_container")
    def _vm_stop_container(self, p: dict, check: bool):
        desk = self.desks.get(p["user"])
        if not self._running(p["user"]):
            return False, {"container": self._container_state(desk)}
        if not check:
            desk.container.running = desk.container.paused = False
        return True, {"container": self._container_state(desk)}

    @action("vm", "remove_container")
    def _vm_remove_container(self, p: dict, check: bool):
        desk = self.desks.get(p["user"])
        if desk is None or desk.container is None:
            return False, {"container": self._container_state(None)}
        if not check:
            desk.container = None
        return True, {"container": self._container_state(None)}

    def _pause(self, user: str, pause: bool, check: bool):
        desk = self.desks.get(user)
        if desk is None or desk.container is None:
            self._refuse("no_container", f"container labvm-{user} does not exist")
        if not desk.container.running:
            self._refuse("container_not_running", f"container labvm-{user} is not running")
        changed = desk.container.paused != pause
        if changed and not check:
            desk.container.paused = pause
        return changed, {"paused": desk.container.paused}

    @action("vm", "freeze")
    def _vm_freeze(self, p: dict, check: bool):
        return self._pause(p["user"], True, check)

    @action("vm", "thaw")
    def _vm_thaw(self, p: dict, check: bool):
        return self._pause(p["user"], False, check)

    @action("vm", "set_password")
    def _vm_set_password(self, p: dict, check: bool):
        if not self._running(p["user"]):
            self._refuse("container_not_running", f"container labvm-{p['user']} is not running; start the desktop first")
        if not check:
            self.passwords[p["user"]] = p["secrets"]["password"]
        return True, {"name": f"labvm-{p['user']}"}

    @action("vm", "renew_https")
    def _vm_renew_https(self, p: dict, check: bool):
        """The running desktop's stunnel takes the new key and certificate; its container and
        spec are not looked at."""
        if not self._running(p["user"]):
            self._refuse("container_not_running", f"container labvm-{p['user']} is not running")
        if not check:
            self.secrets.setdefault(p["user"], {}).update(p["tls"])
        return True, {"https": {"address": p["bind_address"], "port": p["https_port"], "ready": True}}

    # -- vm: the owner record on MooseFS ------------------------------------------------------------
    @action("vm", "set_owner")
    def _vm_set_owner(self, p: dict, check: bool):
        self._assert_mfs()
        files = self._files(p["user"])
        previous = None if files is None else files.owner
        member = p.get("member") or (previous or {}).get("member")
        wanted = (p["node"], p.get("op"), member)
        changed = previous is None or (previous.get("node"), previous.get("op"), previous.get("member")) != wanted
        if changed and not check:
            record = {"node": p["node"], "op": p.get("op"), "member": member, "since": float(next(self.cluster.clock))}
            self.cluster.files.setdefault(p["user"], Files()).owner = record
        return changed, {"previous": previous, "node": p["node"], "member": member}

    @action("vm", "release_owner")
    def _vm_release_owner(self, p: dict, check: bool):
        self._assert_mfs()
        files = self._files(p["user"])
        record = None if files is None else files.owner
        member = (record or {}).get("member")
        if member is None:
            if record is not None and not check:
                files.owner = None
            return record is not None, {}
        changed = record.get("node") is not None
        if changed and not check:
            files.owner = {"node": None, "op": None, "member": member, "since": float(next(self.cluster.clock))}
        return changed, {"member": member}

    @action("vm", "owner")
    def _vm_owner(self, p: dict, check: bool):
        self._assert_mfs()
        files = self._files(p["user"])
        return False, {"owner": None if files is None or files.owner is None else dict(files.owner)}

    # -- sync ----------------------------------------------------------------------------------
    @action("sync", "ensure_running")
    def _sync_ensure_running(self, p: dict, check: bool):
        user = p["user"]
        self._mine(p)
        desk = self.desks.get(user) or Desk()
        files = self._files(user)
        if not desk.layers:
            self._refuse("up_local_missing", f"{user}'s up_local is missing; run the vm helper's ensure_stack first")
        if not self.mfs_mounted or files is None or files.up_mfs is None:
            self._refuse("up_mfs_missing", f"{user}'s up_mfs is missing: is MooseFS mounted, and did ensure_stack run?")
        if desk.sync:
            return False, {"started": False, "restarted": False}
        if check:
            return True, {"started": True, "restarted": False}
        if not desk.upper and files.up_mfs:
            self._refuse("up_mfs_not_empty", f"{user}'s up_local is empty but up_mfs is not: a full pass would delete it")
        desk.sync = desk.synced = True
        return True, {"started": True, "restarted": False}

    @action("sync", "flush")
    def _sync_flush(self, p: dict, check: bool):
        user = p["user"]
        desk = self.desks.get(user) or Desk()
        if desk.sync:
            if check:
                return False, {"mode": "daemon"}
            count = self._copy_upper(desk, self._files(user))
            return count > 0, {"mode": "daemon", "files": count, "seconds": 0.0}
        if not desk.synced and not p.get("mfs_mount"):
            self._refuse("sync_never_configured", f"no sync daemon runs for {user} and none ever ran here")
        data = self._full_pass(user, desk, check)
        return check or bool(data["files"]), {**data, "mode": "full_pass"}

    @action("sync", "full_pass")
    def _sync_full_pass(self, p: dict, check: bool):
        desk = self.desks.get(p["user"]) or Desk()
        if desk.sync:
            self._refuse("sync_daemon_running", f"a sync daemon runs for {p['user']}; use flush instead")
        data = self._full_pass(p["user"], desk, check)
        return check or bool(data["files"]), {**data, "mode": "full_pass"}

    @action("sync", "ensure_stopped")
    def _sync_ensure_stopped(self, p: dict, check: bool):
        user = p["user"]
        desk = self.desks.get(user) or Desk()
        quiet = {"quarantined": [], "quarantined_count": 0, "full_pass_problem": None}
        if not desk.sync:
            flushed = self._full_pass(user, desk, check) if p.get("flush", True) and desk.layers and desk.synced else None
            return bool(flushed and flushed.get("files")), {"pid": None, "flushed": flushed}
        if check:
            return True, {"pid": 1, "flushed": None}
        # The daemon sends what it has queued before it exits, asked to flush or not.
        count = self._copy_upper(desk, self._files(user))
        desk.sync = False
        flushed = {"mode": "daemon", "files": count, "seconds": 0.0} if p.get("flush", True) else None
        return True, {"pid": 1, "flushed": flushed, **quiet}

    @action("sync", "status")
    def _sync_status(self, p: dict, check: bool):
        desk = self.desks.get(p["user"]) or Desk()
        files = self._files(p["user"])
        pending = len(desk.upper ^ (files.up_mfs or set())) if files is not None and desk.layers else 0
        return False, {"running": desk.sync, "pid": 1 if desk.sync else None, "pending": pending, "pending_bytes": 0,
                       "lag_s": 0.0 if desk.sync else None, "state": "idle" if desk.sync else None}

    @action("sync", "last_success")
    def _sync_last_success(self, p: dict, check: bool):
        self._assert_mfs()
        files = self._files(p["user"])
        return False, {"last_success": None if files is None else files.last_success,
                       "node": None if files is None else files.synced_by}

    # -- merge ---------------------------------------------------------------------------------
    def _listed(self, files: Files) -> list[dict]:
        return [{"version": n, "base": v.base, "reason": v.reason, "created": v.created, "files": len(v.files), "bytes": 0,
                 "image": v.image} for n, v in sorted(files.versions.items())]

    @action("merge", "changed_paths")
    def _merge_changed_paths(self, p: dict, check: bool):
        """What the member changed: the files of the version and of up_mfs (their names are paths)."""
        self._require_mfs()
        files = self._user_files(p["user"])
        names = set(files.versions[p["version"]].files) | set(files.up_mfs or ())
        desk = self.desks.get(p["user"])
        if p.get("data_dir") is not None and desk is not None and desk.layers:
            names |= desk.upper
        return False, {"paths": sorted(names), "truncated": False}

    @action("merge", "versions")
    def _merge_versions(self, p: dict, check: bool):
        self._require_mfs()
        files = self._files(p["user"])
        return False, {"versions": [] if files is None else self._listed(files)}

    @action("merge", "publish")
    def _merge_publish(self, p: dict, check: bool):
        user, base = p["user"], p["base"]
        files = self._user_files(user)
        target = p.get("target") if p.get("target") is not None else base + 1
        if target <= base:
            self._refuse("bad_param", f"param 'target' ({target}) must be newer than 'base' ({base})")
        snapshot = self._snapshot_named(user, p.get("upper"))
        existing = files.versions.get(target)
        done = {"version": target, "base": base, "path": f"{self._user_dir(user)}/low_mfs.v{target}"}
        if existing is not None:
            if existing.base != base:
                self._refuse("version_exists", f"low_mfs.v{target} already exists (published from v{existing.base})")
            if snapshot is not None and not check:
                files.snapshots.pop(snapshot, None)
            return False, {**done, "reason": existing.reason, "stats": None, "seconds": 0.0}
        if base not in files.versions:
            self._refuse("version_missing", f"base version {base} does not exist")
        upper = files.up_mfs if snapshot is None else files.snapshots.get(snapshot)
        if upper is None:
            self._refuse("upper_missing", f"upper layer {p.get('upper') or 'up_mfs'} does not exist")
        if check:
            return True, {**done, "reason": p["reason"]}
        created = float(next(self.cluster.clock))
        files.versions[target] = Version(base, p["reason"], files.versions[base].files | frozenset(upper), created,
                                         (p.get("image") or {}).get("id"))
        if snapshot is not None:
            files.snapshots.pop(snapshot, None)
        return True, {**done, "reason": p["reason"], "created": created, "files": len(files.versions[target].files),
                      "bytes": 0, "stats": {}, "seconds": 0.0}

    def _snapshot_named(self, user: str, upper: str | None) -> str | None:
        if upper is None:
            return None
        directory, name = posixpath.split(upper)
        assert directory == self._user_dir(user) and name.startswith(SNAPSHOT_PREFIX), (
            f"publish of {user} from {upper}: the fake cluster knows up_mfs and snapshot_upper's copies")
        return name[len(SNAPSHOT_PREFIX):]

    @action("merge", "snapshot_upper")
    def _merge_snapshot_upper(self, p: dict, check: bool):
        files = self._user_files(p["user"])
        if files.up_mfs is None:
            self._refuse("upper_missing", f"{p['user']}'s up_mfs does not exist")
        path = f"{self._user_dir(p['user'])}/{SNAPSHOT_PREFIX}{p['name']}"
        if not check:
            files.snapshots[p["name"]] = frozenset(files.up_mfs)
        return True, {"path": path}

    @action("merge", "remove_version")
    def _merge_remove_version(self, p: dict, check: bool):
        user, version = p["user"], p["version"]
        self._require_mfs()
        files = self._files(user)
        data = {"version": version, "removed": files is not None and version in files.versions}
        if not data["removed"]:
            return False, data
        if version == max(files.versions):
            self._refuse("newest_version", f"v{version} is {user}'s newest version; it is never removed")
        desk = self.desks.get(user)
        if desk is not None and desk.stack == version:
            self._refuse("version_in_use", f"v{version} of {user} is mounted on this node; stop the desktop first")
        if not check:
            del files.versions[version]
        return True, data
