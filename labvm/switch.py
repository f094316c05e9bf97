"""Switch: move a desktop to another node as a journaled, resumable list of steps.

    preflight  precopy  stop_source  final_flush  merge  fence  build_stack  start_target
    verify  commit  cleanup_source

Each step records what a later run needs (the target's GPUs and ports, the published version)
in the operation's journal entry before it acts, and each node action is an idempotent ensure,
so `labvm ops resume` can run an interrupted switch again from its first unfinished step.

Before `commit`, a failure rolls back: the desktop runs on its source again. After it, only
forward: the state database already says the desktop lives on the target.

The downtime is what the changed data sets: the sync keeps up_mfs current while the desktop
runs and `precopy` flushes it, so after the stop only the last seconds of writes travel. The
merge is renames and deletes on MooseFS, and the target's upper starts empty over the new
version, so no file data is copied at all.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, replace
from typing import Callable

from .admin import AdminHome
from .config import Node
from .desktops import Desktop, Desktops, Limits, build_spec
from .errors import BadInput, LabvmError, NoCapacity, NodeError, NodeUnreachable, StateError
from .images import ensure_image_on, image_on_node_detail
from .journal import check_lock
from .placement import GpuRequest, NodeCapacity
from .plan import Context, Findings, Kind, PlanReport, Runner, Step
from .remote.connection import NodeConnection
from .remote.recipes import mount_mfs
from .text import safe

STEPS = (
    ("preflight", "check the target: reachable, image pushed, MooseFS mounted, free GPUs, memory and ports; reserve them"),
    ("push_image", "send the desktop's image to the target if it lacks it"),
    ("precopy", "flush the sync while the desktop still runs, so little is left for the stop"),
    ("stop_source", "stop the desktop's container on the source (downtime starts)"),
    ("final_flush", "send the last writes to MooseFS, stop the sync, unmount the layers on the source"),
    ("merge", "publish the base version plus the upper layer as a new version (renames on MooseFS)"),
    ("fence", "make the target the desktop's owner on MooseFS: the source may no longer mount it"),
    ("build_stack", "mount the new version on the target, with an empty upper layer"),
    ("start_target", "start the sync and the container on the target, same user, password, home and limits"),
    ("verify", "check that VNC answers on the new address (downtime ends)"),
    ("commit", "record the new node, GPUs and ports in the state database"),
    ("cleanup_source", "delete the source's local layers"),
)
STEP_NAMES = tuple(name for name, _ in STEPS)
COMMIT = "commit"
VERIFY_TIMEOUT_S = 60
LOST_PROBE_TIMEOUT_S = 5
ALIVE_TIMEOUT_S = 15

Say = Callable[[str], None]


@dataclass
class SwitchResult:
    user: str
    source: str
    target: str
    version: int
    downtime_s: float | None
    op_id: int
    vnc: str | None
    notes: list[str]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _gpus_text(gpus: list[dict] | None, uuids: bool = True) -> str:
    if gpus is None:
        return "the GPUs asked"
    if not gpus:
        return "no GPUs"
    indexes = ",".join(str(g["index"]) for g in gpus)
    shown = f"GPU {indexes}" if len(gpus) == 1 else f"GPUs {indexes}"
    return shown + (f" ({', '.join(g['uuid'] for g in gpus)})" if uuids else "")


def _ports_text(ports: tuple[int, int | None] | None) -> str:
    if ports is None:
        return "free ports"
    return f"VNC port {ports[0]}" + (f", SSH port {ports[1]}" if ports[1] else "")


def node_unreachable(node: Node, home: AdminHome) -> str | None:
    """Why node is unreachable (no TCP answer on its SSH port, or no SSH login), or None if it answers."""
    try:
        with socket.create_connection((node.host, node.port), timeout=LOST_PROBE_TIMEOUT_S) as sock:
            sock.settimeout(LOST_PROBE_TIMEOUT_S)
            if not sock.recv(64).startswith(b"SSH-"):
                return f"{node.host}:{node.port} answers, but not with SSH"
    except OSError as exc:
        return f"no answer from {node.host}:{node.port}: {exc.strerror or exc}"
    try:
        with NodeConnection(node, home.home) as conn:
            conn.run(["true"], timeout=LOST_PROBE_TIMEOUT_S)
    except LabvmError as exc:
        return f"SSH login fails: {exc}"
    return None


class SwitchKind(Kind):
    """A switch as a plan. Its params are journaled at the start (source, target, gpus, from_lost,
    was_running, base, precopy); the preflight adds the target's GPUs, ports and limits, the
    merge the new version, so a resumed run builds the same steps."""

    name = "switch"
    commit = COMMIT
    check_step = "preflight"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.desktops = Desktops(ctx.home, ctx.say)
        self.cap = self.request = self.limits = None
        self.gpus = self.ports = self.version = None
        self.image_there = False

    def title(self) -> str:
        return f"switch of {self.user} to {self.p['target']}"

    # -- sessions ------------------------------------------------------------------------------
    def session(self, name: str):
        """The node's session, checked to answer within seconds: a node whose network went away
        mid-switch must fail its step now, not after a long helper timeout."""
        s = self.ctx.session(name)
        try:
            s.alive(ALIVE_TIMEOUT_S)
        except LabvmError:
            self.ctx.forget(name)
            raise
        return s

    def _desktop(self) -> Desktop:
        return self.desktops.get(self.ctx.db, self.user)

    def _image(self, desktop: Desktop) -> str:
        """The desktop's image; one made before images had ids is adopted with its source's."""
        if desktop.image is None:
            if self.p["from_lost"]:
                raise StateError(f"{self.user}'s desktop has no image recorded and its node is lost; give it one "
                                 f"first with `labvm rebase {self.user} --image ID` once it answers")
            desktop.image = self.desktops.adopt_image(self.session(self.p["source"]), self.ctx.db, desktop,
                                                      record=not self.ctx.dry_run)
        return desktop.image

    def _image_detail(self, s, image: str) -> str:
        self.image_there, detail = image_on_node_detail(self.ctx.home, s, image, "push_image")
        return detail

    def _push_image(self) -> None:
        target = self.session(self.p["target"])
        ensure_image_on(self.ctx.home, target, self._image(self._desktop()), self.ctx.progress)

    def committed(self) -> bool:
        """The commit moves the desktop's row to the target in one transaction: a row on the
        target is a commit made, whatever the journal says of its step."""
        return self._desktop().node == self.p["target"]

    # -- checks --------------------------------------------------------------------------------
    def checks(self, f: Findings) -> None:
        db, p = self.ctx.db, self.p
        with f.check("desktop") as c:
            desktop = self._desktop()
            if self.ctx.dry_run or desktop.version == p["base"]:
                c.detail = _check_desktop(desktop)
            else:  # a resumed preflight after the merge ran: the desktop is mid-switch
                c.detail = f"{desktop.state} on {desktop.node}, version {desktop.version}"
        with f.check("target") as c:
            c.detail = _check_target(self.cfg, desktop, p["target"], db.cordons())
        if self.ctx.dry_run:
            with f.check("lock") as c:
                c.detail = check_lock(db, self.user)
            if p["from_lost"]:
                with f.check("source lost") as c:
                    c.detail = _check_lost(self.ctx.home, desktop)
        self._inspect(f, desktop)

    def _inspect(self, f: Findings, desktop: Desktop) -> None:
        """The checks on the nodes: the target answers, has MooseFS and the image, room for the
        GPUs, memory and ports; the source answers; the versions on MooseFS read. In a dry run
        MooseFS is not mounted where it is missing (the helper's check mode)."""
        db, p, user, check = self.ctx.db, self.p, self.user, self.ctx.dry_run
        op_id = None if self.ctx.op is None else self.ctx.op.id
        target = self.cfg.node(p["target"])
        with f.check("target reachable") as c:
            s = self.session(target.name)
            c.detail = f"{target.name} answers over SSH"
        with f.check("MooseFS") as c:
            mount = s.run(mount_mfs(self.cfg), check=check)
            mounted = bool(mount.get("mounted"))
            c.detail = (f"mounted at {self.cfg.storage.mfs_mount} on {target.name}" if mounted
                        else f"not mounted on {target.name} yet; the preflight mounts it")
        with f.check("image") as c:
            facts = self.desktops.probe(s)
            c.detail = self._image_detail(s, self._image(desktop))
        source = None
        if not p["from_lost"]:
            with f.check("source answering") as c:
                source = self.session(p["source"])
                status = source.run(self.desktops.calls(source.node, user).status())
                running = bool((status.get("container") or {}).get("running"))
                c.detail = f"{source.node.name} answers; the container there is {'running' if running else 'not running'}"
        self.cap = cap = self.desktops._capacity(target, self.desktops._usage(db, target), facts)
        # What the reservation will see as taken (its own pick of a resumed switch is free to it).
        taken, used = db.taken_on(target.name, user, op_id)
        with f.check("gpus") as c:
            self.request = GpuRequest.parse(p["gpus"], default=len(desktop.gpus))
            self.gpus = cap.pick_gpus(self.request, taken)
            c.detail = f"{_gpus_text(self.gpus)} free on {target.name} ({self.request.describe()} asked)"
        with f.check("memory") as c:
            need, free_memory = desktop.limits.get("memory", 0), cap.memory_total - cap.memory_promised
            if need > free_memory:
                raise NoCapacity(f"{target.name} has {free_memory >> 20} MiB of memory not promised to other desktops; "
                                 f"{user}'s desktop needs {need >> 20} MiB")
            c.detail = f"{need >> 20} MiB needed, {free_memory >> 20} MiB not promised on {target.name}"
        with f.check("limits") as c:
            self.limits = _target_limits(desktop, target, cap)
            c.detail = f"{user}'s limits apply on {target.name}"
        with f.check("ports") as c:
            self.ports = cap.pick_ports(used)
            c.detail = f"{_ports_text(self.ports)} free on {target.name}"
        with f.check("versions") as c:
            reader = s if mounted else None
            if reader is None and source is not None:
                seen = source.run(mount_mfs(self.cfg), check=True)
                reader = source if seen.get("mounted") else None
            if reader is None:
                c.detail = f"MooseFS is mounted on neither node yet; the merge publishes the next version after {desktop.version}"
            else:
                self.version = self.desktops.next_version(reader, user, desktop.version)
                c.detail = f"the merge would publish version {self.version}"

    def claim(self) -> None:
        """Reserve the target's GPUs and ports in one transaction, journaled with the switch."""
        ctx, target = self.ctx, self.cfg.node(self.p["target"])

        def remember(chosen: list[dict], ports: tuple[int, int | None]) -> None:
            ctx.remember(target_gpus=[{"uuid": g["uuid"], "index": g["index"]} for g in chosen], target_ports=list(ports),
                         target_limits=self.limits)

        chosen, ports = ctx.db.reserve(self.user, target.name, self.cap.choice(self.request), switch_op=ctx.op.id, then=remember)
        shown = ", ".join(f"#{g['index']}" for g in chosen) or "no GPUs"
        ctx.say(f"reserved on {target.name}: {shown}, VNC port {ports[0]}")

    # -- steps ---------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        p = self.p
        skipped = _skipped(p["was_running"], p["from_lost"])
        if not p.get("precopy", True):
            skipped.setdefault("precopy", "asked for with --no-precopy")
        details = self._details()
        work = {
            "preflight": (None, self._undo_preflight),
            "push_image": (self._push_image, None),
            "precopy": (self._precopy, None),
            "stop_source": (self._stop_source, self._undo_stop_source),
            "final_flush": (self._final_flush, None),
            "merge": (self._merge, self._undo_merge),
            "fence": (self._fence, self._undo_fence),
            "build_stack": (self._build_stack, self._undo_target),
            "start_target": (self._start_target, self._undo_target),
            "verify": (self._verify, None),
            "commit": (self._commit, None),
            "cleanup_source": (self._cleanup_source, None),
        }
        return [Step(name, details[name], apply=work[name][0], undo=work[name][1], skip=skipped.get(name))
                for name in STEP_NAMES]

    def _details(self) -> dict[str, str]:
        p = self.p
        source, target = p["source"], p["target"]
        host = self.cfg.node(target).host
        gpus = self.gpus if self.gpus is not None else p.get("target_gpus")
        ports = self.ports if self.ports is not None else (tuple(p["target_ports"]) if p.get("target_ports") else None)
        number = p.get("new_version", self.version)
        version = f"version {number}" if number is not None else "the next version"
        vnc = f"{host}:{ports[0]}" if ports else f"{host}'s VNC port"
        gpus_short = _gpus_text(gpus, uuids=False)
        image = (self._desktop().image or "of its source")[:12]
        return {
            "preflight": f"reserve on {target}: {_gpus_text(gpus)}, {_ports_text(ports)}",
            "push_image": (f"image {image} is on {target} already: nothing to send" if self.image_there
                           else f"send image {image} to {target} if it lacks it"),
            "precopy": f"flush the sync on {source} while the desktop still runs",
            "stop_source": f"stop the desktop's container on {source} (downtime starts)",
            "final_flush": f"send the last writes to MooseFS, stop the sync, unmount the layers on {source}",
            "merge": f"publish version {p['base']} plus the upper layer as {version}",
            "fence": f"make {target} the desktop's owner on MooseFS: {source} may no longer mount it",
            "build_stack": f"mount {version} on {target}, with an empty upper layer",
            "start_target": f"start the sync and the container on {target} with {gpus_short}, {_ports_text(ports)}",
            "verify": f"check that VNC answers at {vnc} (downtime ends)",
            "commit": f"record {target}, {gpus_short}, {_ports_text(ports)} and {version} in the state database",
            "cleanup_source": f"delete {source}'s local layers of the desktop",
        }

    def _precopy(self) -> None:
        source = self.session(self.p["source"])
        calls = self.desktops.calls(source.node, self.user)
        status = source.run(calls.sync_status())
        if status.get("running"):
            self.ctx.progress(f"  still to sync: {status.get('pending') or 0} paths, "
                              f"{(status.get('pending_bytes') or 0) / (1 << 20):.1f} MiB")
        data = source.run(calls.flush(900))
        self.ctx.progress(f"  pre-copy: {data.get('files', 0)} paths sent in {data.get('seconds', 0):.1f} s while the desktop ran")

    def _stop_source(self) -> None:
        source = self.session(self.p["source"])
        self.ctx.remember(stopped_at=time.time())
        source.run(self.desktops.calls(source.node, self.user).stop_container(20))

    def _final_flush(self) -> None:
        user, ctx = self.user, self.ctx
        source = self.session(self.p["source"])
        calls = self.desktops.calls(source.node, user)
        data = source.run(calls.stop_sync(flush=True))
        ctx.progress(f"  final flush: {data.get('files', 0)} paths")
        if data.get("quarantined_count") or data.get("full_pass_problem"):
            shown = ", ".join(safe(q.get("path", "?"))[:80] for q in data.get("quarantined", [])[:3])
            count = f"{data['quarantined_count']} path(s)" if data.get("quarantined_count") else "some paths"
            why = shown or safe(data.get("full_pass_problem") or "")[:200]
            note = (f"{count} of {user}'s could not be copied to MooseFS and do not move with the desktop "
                    f"(the sync says why in `labvm sync status`): {why}")
            ctx.say(note)
            ctx.remember(notes=[*self.p.get("notes", []), note])
        source.call_many([calls.remove_container(), calls.unmount_stack()])
        ctx.db.set_desktop_state(user, "stopped")

    def _merge(self) -> None:
        target = self.session(self.p["target"])
        if "new_version" not in self.p:
            self.ctx.remember(new_version=self.desktops.next_version(target, self.user, self.p["base"]))
        new = self.p["new_version"]
        self.desktops.publish(target, self.user, self.p["base"], new, "switch", self._image(self._desktop()))
        # The new version holds everything the upper held: it is the desktop's base from now on,
        # wherever it runs (an undone switch runs the source over it too, with an emptied upper).
        self.ctx.db.set_desktop_version(self.user, new)

    def _fence(self) -> None:
        target = self.session(self.p["target"])
        target.run(self.desktops.calls(target.node, self.user).set_owner(op=self.ctx.op.id))

    def _build_stack(self) -> None:
        target = self.session(self.p["target"])
        calls = self.desktops.calls(target.node, self.user, self._image(self._desktop()))
        disk = self.desktops.disk_of(self.p["target_limits"])
        # Whatever an earlier life of this desktop left on the target (a container, mounts) is
        # stale: the fence already says the desktop belongs here now, starting from the new version.
        target.call_many([calls.remove_container(), calls.unmount_stack(), calls.reset_upper(),
                          calls.stack(self.p["new_version"], disk)])

    def _start_target(self) -> None:
        p, db, user = self.p, self.ctx.db, self.user
        target = self.session(p["target"])
        node = target.node
        spec = build_spec(user, db.get_user(user).uid, node, "minimal", Limits(**p["target_limits"]),
                          [g["uuid"] for g in p["target_gpus"]], tuple(p["target_ports"]), self.cfg.vnc.listen)
        # One round trip: the downtime runs while this step does.
        target.call_many([self.desktops.base_image_call(), self.desktops.calls(node, user).start_sync(),
                          *self.desktops.container_calls(target, db, user, spec, self._image(self._desktop()))])

    def _verify(self) -> None:
        p = self.p
        target = self.cfg.node(p["target"])
        port = p["target_ports"][0]
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((target.host, port), timeout=5) as sock:
                    sock.settimeout(5)
                    if sock.recv(12).startswith(b"RFB "):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NodeError(f"VNC does not answer at {target.host}:{port} within {VERIFY_TIMEOUT_S} s")
            time.sleep(0.5)
        self.ctx.remember(verified_at=time.time())

    def _commit(self) -> None:
        p = self.p
        state = "running" if p["was_running"] else "stopped"
        self.ctx.db.commit_switch(self.user, p["source"], p["target"], p["target_ports"], p["target_limits"],
                                  p["new_version"], state)

    def _cleanup_source(self) -> None:
        source = self.session(self.p["source"])
        calls = self.desktops.calls(source.node, self.user)
        source.call_many([calls.remove_container(), calls.unmount_stack(), calls.remove_local_layers()])

    # -- undo: the target loses what it got, the source runs the desktop again ----------------
    def _undo_target(self) -> str | None:
        """Best effort: the target may be the part that failed. Each call on its own, so a dead
        dockerd does not keep the sync or the mounts from going."""
        target_node, user = self.cfg.node(self.p["target"]), self.user
        on_target = self.desktops.calls(target_node, user)
        notes = []
        for call in (*on_target.teardown(flush=False), on_target.remove_local_layers()):
            try:
                self.session(target_node.name).run(call)
            except NodeUnreachable as exc:
                return f"note: {target_node.name} is unreachable ({exc}); its leftovers of {user} stay until it is back"
            except LabvmError as exc:
                notes.append(f"note: {target_node.name}: {call.helper}.{call.action} failed ({exc}); "
                             "`labvm node check` shows what is left there")
        return "\n".join(notes) or None

    def _undo_fence(self) -> None:
        if self.p["from_lost"]:
            return
        source = self.session(self.p["source"])
        on_source = self.desktops.calls(source.node, self.user)
        source.call_many([on_source.mount_mfs(), on_source.set_owner(op=self.ctx.op.id)])

    def _undo_merge(self) -> None:
        if self.p["from_lost"] or self._desktop().version == self.p["base"]:
            return
        # The merge published the upper: the source runs over that version with an empty upper.
        # Its sync stopped in final_flush, so nothing is flushed: a full pass of the source's
        # upper would be refused when it is empty and up_mfs holds what the target's sync sent.
        source = self.session(self.p["source"])
        calls = self.desktops.calls(source.node, self.user)
        source.call_many([*calls.teardown(flush=False), calls.reset_upper()])

    def _undo_stop_source(self) -> str | None:
        p, db, user = self.p, self.ctx.db, self.user
        if not p["was_running"]:
            return None
        source = self.session(p["source"])
        # Journaled as steps of this switch, so `labvm ops show` tells what the undo did.
        self.desktops.bring_up(source, self.ctx.op, db, self._desktop(), db.get_user(user).uid)
        return f"{user}'s desktop runs on {p['source']} again"

    def _undo_preflight(self) -> str | None:
        self.ctx.db.release_gpus(self.user, self.p["target"])
        if self.p["from_lost"]:
            self.ctx.db.set_desktop_state(self.user, "stopped")
            return f"{self.user}'s desktop stays fenced off {self.p['source']}; run the switch again when a target is ready"
        return None

    def result(self) -> "SwitchResult":
        p = self.p
        downtime = (p["verified_at"] - p["stopped_at"]) if p.get("verified_at") and p.get("stopped_at") else None
        target = self.cfg.node(p["target"])
        vnc = f"{target.host}:{p['target_ports'][0]}" if p.get("target_ports") else None
        return SwitchResult(self.user, p["source"], p["target"], p["new_version"], downtime, self.ctx.op.id, vnc,
                            p.get("notes", []))


def _skipped(was_running: bool, from_lost: bool) -> dict[str, str]:
    skipped = {}
    if from_lost:
        for name in ("precopy", "stop_source", "final_flush"):
            skipped[name] = "the source is lost; what the sync sent last is used"
        skipped["cleanup_source"] = "the source is lost; its layers go when it returns (labvm node check)"
    if not was_running:
        skipped["precopy"] = "the desktop is stopped"
        skipped["stop_source"] = "the desktop is stopped"
        for name in ("start_target", "verify"):
            skipped[name] = "the desktop is stopped; `labvm start` starts it on the target"
    return skipped


def _check_desktop(desktop: Desktop) -> str:
    if desktop.state not in ("running", "stopped"):
        raise StateError(f"{desktop.user}'s desktop is {desktop.state}; only a running or stopped desktop can switch")
    return f"{desktop.state} on {desktop.node}, version {desktop.version}"


def _check_target(cfg, desktop: Desktop, target: str, cordons: dict) -> str:
    node = cfg.node(target)
    if node.name == desktop.node:
        raise BadInput(f"{desktop.user}'s desktop already runs on {target}")
    if target in cordons:
        raise BadInput(f"{target} is cordoned ({cordons[target] or 'no reason given'}); `labvm node uncordon {target}` first")
    return f"{target} ({node.host}) is not cordoned"


def _check_lost(home: AdminHome, desktop: Desktop) -> str:
    """Why the desktop's node is unreachable; BadInput if it answers."""
    why = node_unreachable(home.config.node(desktop.node), home)
    if why is None:
        raise BadInput(f"{desktop.node} answers over SSH, so it is not lost; switch without --from-lost")
    return why


def _target_limits(desktop: Desktop, target: Node, cap: NodeCapacity) -> dict:
    """The desktop's limits as they apply on the target's disk and cgroups."""
    limits = dict(desktop.limits)
    if limits.get("io_read_bps") or limits.get("io_write_bps"):
        if not cap.disk_device:
            raise BadInput(f"{target.name}: its data dir is on no block device, so {desktop.user}'s IO caps can't apply")
        limits["io_device"] = cap.disk_device
    if limits.get("io_weight") is not None and not cap.blkio_weight:
        limits["io_weight"] = None
    return limits


class Switcher:
    """`labvm switch`: checks run before journaling, then the SwitchKind plan through the runner."""

    def __init__(self, home: AdminHome, say: Say = lambda _m: None, progress: Say | None = None):
        self.home = home
        self.cfg = home.config
        self.say = say
        self.runner = Runner(home, say, progress or say)

    def params(self, desktop: Desktop, target: str, gpus: str | None, from_lost: bool, precopy: bool) -> dict:
        return {"source": desktop.node, "target": target, "gpus": gpus, "from_lost": from_lost,
                "was_running": desktop.state == "running", "base": desktop.version, "precopy": precopy}

    def plan(self, user: str, target: str, gpus: str | None = None, from_lost: bool = False,
             precopy: bool = True) -> PlanReport:
        """Every check a switch runs before its first change, reserving nothing and changing
        nothing, and each step with the GPUs, ports and version found (for --dry-run)."""
        with self.home.state() as db:
            desktop = Desktops(self.home).get(db, user)
        params = self.params(desktop, target, gpus, from_lost, precopy)
        report = self.runner.dry_run(SwitchKind, user, params, {"source": desktop.node, "target": target})
        report.headline = f"switch {user} from {desktop.node} to {target}"
        return report

    def switch(self, user: str, target: str, gpus: str | None = None, from_lost: bool = False,
               confirm: Callable[[str], bool] | None = None, precopy: bool = True) -> SwitchResult:
        with self.home.state() as db:
            desktop = Desktops(self.home).get(db, user)
            cordons = db.cordons()
        _check_target(self.cfg, desktop, target, cordons)
        _check_desktop(desktop)
        if from_lost:
            self._prove_lost(desktop, confirm)
        started = time.monotonic()
        result = self.runner.run(SwitchKind, user, self.params(desktop, target, gpus, from_lost, precopy))
        self.say(f"switched {user} from {result.source} to {result.target} in {time.monotonic() - started:.1f} s"
                 + (f"; downtime {result.downtime_s:.1f} s" if result.downtime_s is not None else ""))
        return result

    def _prove_lost(self, desktop: Desktop, confirm) -> None:
        why = _check_lost(self.home, desktop)
        lost_s = self._lost_window(desktop)
        window = f"about {lost_s:.0f} s of writes (the sync's last success)" if lost_s is not None else "an unknown span of writes"
        self.say(f"{desktop.node} is unreachable: {why}")
        question = (f"Start {desktop.user}'s desktop elsewhere from its state on MooseFS? Up to {window} made on "
                    f"{desktop.node} may be lost, and {desktop.node} will be fenced off from this desktop.")
        if confirm is None or not confirm(question):
            raise BadInput("not confirmed; nothing changed")

    def _lost_window(self, desktop: Desktop) -> float | None:
        """Seconds since the sync last reported success on MooseFS, read from any live node."""
        desktops = Desktops(self.home)
        for node in self.cfg.nodes:
            if node.name == desktop.node:
                continue
            try:
                with desktops.session(node) as s:
                    s.run(mount_mfs(self.cfg))
                    data = s.run(desktops.calls(node, desktop.user).last_success())
            except LabvmError:
                continue
            if data.get("last_success"):
                return max(0.0, time.time() - data["last_success"])
            return None
        return None


# -- cordon and drain -------------------------------------------------------------------------
def cordon(home: AdminHome, node: str, reason: str | None = None) -> bool:
    """Keep new desktops (create --node auto, switch, drain) off a node. True if it changed."""
    home.config.node(node)
    with home.state() as db:
        if node in db.cordons():
            return False
        db.cordon(node, reason)
        return True


def uncordon(home: AdminHome, node: str) -> bool:
    home.config.node(node)
    with home.state() as db:
        return db.uncordon(node)


@dataclass
class MoveResult:
    user: str
    target: str | None
    ok: bool
    line: str


def drain(home: AdminHome, node: str, to: str | None = None, parallel: int = 2, say: Say = lambda _m: None,
          dry_run: bool = False):
    """Cordon the node, then move every desktop off it: GPU-aware placement, a few moves at a
    time, and one failed move never stops the others (it rolls back to the node). With dry_run,
    nothing is cordoned or moved: each move's switch plan (PlanReport), or why it has none."""
    from concurrent.futures import ThreadPoolExecutor

    from .placement import choose_node

    cfg = home.config
    cfg.node(node)
    if to is not None and to == node:
        raise BadInput(f"--to {to}: that is the node being drained")
    if dry_run:
        pass
    elif cordon(home, node, "drain"):
        say(f"cordoned {node}: no new desktops go there")
    desktops = Desktops(home)
    with home.state() as db:
        moving = [d for d in desktops.list(db) if d.node == node and d.state in ("running", "stopped")]
        fenced = set(db.cordons())
        candidates = [cfg.node(to)] if to else [n for n in cfg.nodes if n.name != node and n.name not in fenced]
        if not moving:
            say(f"no desktops on {node}")
            return []
        if not candidates:
            raise BadInput(f"no node to move {node}'s desktops to: every other node is cordoned")
        caps = desktops.capacities(db, candidates)
    plan: list[tuple[Desktop, str | None, str]] = []
    # The desktops with the most GPUs are placed first, while the most GPUs are free.
    for d in sorted(moving, key=lambda d: (-len(d.gpus), d.user)):
        request = GpuRequest(count=len(d.gpus))
        try:
            chosen, reason = choose_node(caps, request, d.limits.get("memory", 0))
        except LabvmError as exc:
            plan.append((d, None, str(exc)))
            continue
        index = next(i for i, c in enumerate(caps) if c.node is chosen)
        cap = caps[index]
        free = [g["uuid"] for g in cap.gpus if g["uuid"] not in cap.taken_gpus][: len(d.gpus)]
        # What this move will take is counted before placing the next one.
        caps[index] = replace(cap, taken_gpus=set(cap.taken_gpus) | set(free),
                              memory_promised=cap.memory_promised + d.limits.get("memory", 0))
        plan.append((d, chosen.name, reason))

    if dry_run:
        return [MoveResult(d.user, None, False, f"{d.user}: not moved: {reason}") if target is None
                else Switcher(home).plan(d.user, target) for d, target, reason in plan]

    def move(item) -> MoveResult:
        d, target, reason = item
        if target is None:
            return MoveResult(d.user, None, False, f"{d.user}: not moved: {reason}")
        try:
            result = Switcher(home, say=lambda m: say(f"{d.user}: {m}"), progress=lambda _m: None).switch(d.user, target)
        except LabvmError as exc:
            return MoveResult(d.user, target, False, f"{d.user}: move to {target} FAILED: {exc}")
        downtime = f", downtime {result.downtime_s:.1f} s" if result.downtime_s is not None else ""
        return MoveResult(d.user, target, True, f"{d.user}: moved to {target}{downtime}")

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(move, plan))
