"""A desktop's life as plans (plan.py): create, start, stop and rm, and the step lists that
bring a desktop up and down, which restore, solidify and switch use too.

    up:    image  mount_mfs  mount_stack  member_quota  start_sync  start_container  record_running
    down:  stop_container  flush_sync  remove_container  unmount_stack  record_stopped

The node steps of each list go to the node in one round trip. Undo: a start that fails takes
down what it brought up, so the desktop is stopped as it was; a create also removes its local
layers, its owner record and its row. A stop, or an rm, goes only forward once the container is
stopped: resuming it finishes the job.
"""

from __future__ import annotations

from .desktops import Desktop, Desktops, Limits, PreviousFiles, build_spec, container_name, previous_files
from .errors import HelperFailed, ImageError, LabvmError, StateError
from .images import ensure_image_on, image_on_node_detail, images_held
from .journal import check_lock
from .plan import Context, Findings, Kind, Step
from .remote.recipes import DesktopCalls, require_image


class DesktopKind(Kind):
    """What the kinds on one desktop share: its row, its node (journaled as params['node'])
    and the step lists."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.desktops = Desktops(ctx.home, ctx.say)

    def desktop(self) -> Desktop:
        desktop = self.desktops.get(self.ctx.db, self.user)
        if desktop.image is None:  # made before images had ids: its node's image is its own
            if getattr(self, "_adopted", None) is None:
                self._adopted = self.desktops.adopt_image(self.session(), self.ctx.db, desktop, record=not self.ctx.dry_run)
            desktop.image = self._adopted
        return desktop

    @property
    def node_name(self) -> str:
        if "node" not in self.p:  # an operation journaled before plans recorded its node
            self.ctx.remember(node=self.desktop().node)
        return self.p["node"]

    @property
    def calls(self) -> DesktopCalls:
        """The desktop's helper calls, over the image its record names now."""
        image = self.desktop().image if self.ctx.db.has_desktop(self.user) else None
        return self.desktops.calls(self.cfg.node(self.node_name), self.user, image)

    def session(self):
        return self.ctx.session(self.node_name)

    def publish_target(self, s) -> int:
        """The version the next publish makes, journaled before the work: a resumed publish
        makes the same one, not a newer one."""
        if "target" not in self.p:
            self.ctx.remember(target=self.desktops.next_version(s, self.user, self.desktop().version))
        return self.p["target"]

    def mfs_to_read(self):
        """The node's session, with MooseFS mounted to read versions from: mounted for it in a
        real run; in a dry run, None unless it is mounted already."""
        s = self.session()
        mounted = s.run(self.calls.mount_mfs(), check=self.ctx.dry_run).get("mounted")
        return s if mounted or not self.ctx.dry_run else None

    def node_status(self) -> dict | None:
        """The desktop's container, stack and disk on its node; None where the node does not answer."""
        try:
            return self.session().run(self.calls.status())
        except LabvmError:
            return None

    def container_stopped(self) -> bool:
        """Whether the desktop's container is stopped or gone on its node (False where the node,
        or its docker, does not say)."""
        status = self.node_status()
        return status is not None and status["container"].get("error") is None and not status["container"].get("running")

    # -- checks shared by the kinds ---------------------------------------------------------
    def check_desktop(self, f: Findings, states: tuple[str, ...]) -> Desktop:
        with f.check("desktop") as c:
            desktop = self.desktop()
            if desktop.state not in states:
                raise StateError(f"{self.user}'s desktop is {desktop.state}; it must be {' or '.join(states)}")
            c.detail = f"{desktop.state} on {desktop.node}, version {desktop.version}"
        if self.ctx.dry_run:
            with f.check("lock") as c:
                c.detail = check_lock(self.ctx.db, self.user)
        return desktop

    def check_node(self, f: Findings, image_needed: bool = True) -> None:
        """The node answers, has the desktop's image (or this admin host has it to send), and
        can mount MooseFS (in check mode)."""
        with f.check("node") as c:
            s = self.session()
            s.alive(15)
            c.detail = f"{self.node_name} answers over SSH"
        with f.check("image") as c:
            try:
                c.detail = self.image_detail(s, self.desktop().image)
            except ImageError as exc:
                if image_needed:
                    raise
                c.detail = f"{exc}; not needed to remove the desktop"
        with f.check("MooseFS") as c:
            mounted = s.run(self.calls.mount_mfs(), check=True).get("mounted")
            c.detail = (f"mounted on {self.node_name}" if mounted else f"not mounted on {self.node_name} yet; the first step mounts it")

    def image_detail(self, s, image: str) -> str:
        """Whether the node holds image `image`; where it does not, the admin host must (the
        image step sends it)."""
        if image is None:
            return "the desktop has no image recorded (one from before images had ids)"
        return image_on_node_detail(self.ctx.home, s, image, "image")[1]

    def image_step(self, image=None) -> Step:
        """The desktop's image (or `image`, a callable giving an id) on its node, sent there if
        the node lacks it. Asking the node is the first call of the round trip the steps after
        it share: where the image is missing, nothing else has run, so it is sent and the round
        trip made again."""
        def wanted() -> str:
            return image() if image is not None else self.desktop().image

        def send(exc: BaseException) -> bool:
            if not (isinstance(exc, HelperFailed) and exc.code == "image_missing"):
                return False
            return ensure_image_on(self.ctx.home, self.session(), wanted(), self.ctx.progress)

        return Step("image", f"the desktop's image on {self.node_name} (sent there if it lacks it)",
                    calls=lambda: [require_image(self.cfg, wanted())], node=self.node_name, recover=send)

    # -- the step lists ---------------------------------------------------------------------
    def up_steps(self, undo: bool, remove_layers: bool = False, version: str | None = None) -> list[Step]:
        """Mount MooseFS and the desktop's layers, run its container, record it running. With
        undo, each step's undo takes it down again (remove_layers: and deletes its local layers)."""
        node, calls, db, user = self.node_name, self.calls, self.ctx.db, self.user

        def container():
            desktop = self.desktop()
            spec = build_spec(user, db.get_user(user).uid, self.cfg.node(node), "minimal", _limits(desktop),
                              [g["uuid"] for g in desktop.gpus], (desktop.vnc_port, desktop.ssh_port),
                              self.cfg.vnc.listen)
            return self.desktops.container_calls(self.session(), db, user, spec, desktop.image)

        disk = lambda: self.desktops.disk_of(self.desktop().limits)  # noqa: E731
        if version is None:
            version = f"version {self.desktop().version}" if self.ctx.db.has_desktop(user) else "its first version"
        steps = [
            self.image_step(),
            Step("mount_mfs", f"mount MooseFS on {node}", calls=lambda: [calls.mount_mfs()], node=node),
            Step("mount_stack", f"mount the desktop's disk, {version} and its overlay on {node}",
                 calls=lambda: [self.calls.stack(self.desktop().version, disk())], node=node,
                 undo=self._undo_stack(remove_layers) if undo else None),
            Step("member_quota", "set the member's quota on MooseFS to the disk's size, with room for versions",
                 calls=lambda: [calls.quota(disk())], node=node),
            Step("start_sync", f"start the sync of the upper layer to MooseFS on {node}",
                 calls=lambda: [calls.start_sync()], node=node,
                 undo=(lambda: self.session().run(calls.stop_sync(flush=True))) if undo else None),
            Step("start_container", f"run the container {container_name(user)} on {node}", calls=container, node=node,
                 undo=(lambda: self.session().call_many([calls.stop_container(20), calls.remove_container()])) if undo else None),
            Step("record_running", "record the desktop as running",
                 apply=lambda: db.set_desktop_state(user, "running"),
                 undo=(lambda: db.set_desktop_state(user, "stopped")) if undo else None),
        ]
        return steps

    def _undo_stack(self, remove_layers: bool):
        def undo():
            extra = [self.calls.remove_local_layers()] if remove_layers else []
            self.session().call_many([self.calls.unmount_stack(), *extra])
        return undo

    def down_steps(self, timeout: int, undo_up: bool) -> list[Step]:
        """Stop the container, send the last of its writes to MooseFS, unmount its layers, record
        it stopped. With undo_up, a later failure brings the desktop up again (the undo of its
        stop); without, stopping is the commit point of the kind."""
        node, calls, db, user = self.node_name, self.calls, self.ctx.db, self.user

        def up_again() -> str:
            self.desktops.bring_up(self.session(), self.ctx.op, db, self.desktop(), db.get_user(user).uid)
            return f"{user}'s desktop runs again"

        return [
            Step("stop_container", f"stop the container on {node}", calls=lambda: [calls.stop_container(timeout)], node=node,
                 undo=up_again if undo_up else None),
            # The container is stopped, so nothing writes any more: this flush is the last word.
            Step("flush_sync", "send the last writes to MooseFS and stop the sync",
                 calls=lambda: [calls.stop_sync(flush=True)], node=node),
            Step("remove_container", "remove the container (its files live in the layers)",
                 calls=lambda: [calls.remove_container()], node=node),
            Step("unmount_stack", f"unmount the desktop's layers on {node}", calls=lambda: [calls.unmount_stack()], node=node),
            Step("record_stopped", "record the desktop as stopped", apply=lambda: db.set_desktop_state(user, "stopped")),
        ]

    def title(self) -> str:
        return f"{self.name} of {self.user}"


def _limits(desktop: Desktop) -> Limits:
    return Limits(**desktop.limits)


class StartKind(DesktopKind):
    """Start a stopped desktop (or bring a running one's pieces back: each step is an ensure).
    A real start checks the state database only: its node work goes in one round trip, and a
    node that does not answer fails it before anything changes. A dry run checks the node too."""

    name = "start"

    def checks(self, f: Findings) -> None:
        self.check_desktop(f, ("running", "stopped"))
        if self.ctx.dry_run:
            self.check_node(f)

    def steps(self) -> list[Step]:
        check = Step("check", "check the desktop's state and its lock again, under the lock")
        # A running desktop's start only re-ensures it: a failure must not take it down.
        return [check, *self.up_steps(undo=not self.p.get("was_running", False))]


class StopKind(DesktopKind):
    name = "stop"
    commit = "stop_container"

    def checks(self, f: Findings) -> None:
        self.check_desktop(f, ("running", "stopped"))
        if self.ctx.dry_run:
            with f.check("node") as c:
                self.session().alive(15)
                c.detail = f"{self.node_name} answers over SSH"

    def steps(self) -> list[Step]:
        return [Step("check", "check the desktop's state and its lock again, under the lock"),
                *self.down_steps(int(self.p.get("timeout", 20)), undo_up=False)]

    def committed(self) -> bool:
        """The container is stopped: the stop took effect, whatever the journal says."""
        return self.container_stopped()


class RemoveKind(DesktopKind):
    """Remove a desktop: stop it, keep its files on MooseFS as a last version (or, with purge,
    delete every version), delete its local layers and its record."""

    name = "rm"
    commit = "stop_container"

    def checks(self, f: Findings) -> None:
        desktop = self.check_desktop(f, ("running", "stopped", "creating", "error"))
        self.check_node(f, image_needed=False)
        if not self.p.get("purge"):
            with f.check("versions") as c:
                s = self.session()
                if s.run(self.calls.mount_mfs(), check=True).get("mounted"):
                    target = self.desktops.next_version(s, self.user, desktop.version)
                    c.detail = f"the files are kept as version {target}"
                else:
                    c.detail = "the files are kept as the next version"

    def steps(self) -> list[Step]:
        node, calls, db, user = self.node_name, self.calls, self.ctx.db, self.user
        purge = bool(self.p.get("purge"))
        down = self.down_steps(10, undo_up=False)[:-1]
        if purge:  # what is about to be deleted is not sent to MooseFS first
            down[1] = Step("stop_sync", "stop the sync without a last flush (every version is deleted)",
                           calls=lambda: [calls.stop_sync(flush=False)], node=node)
        steps = [Step("check", "check the desktop and its node again, under the lock"), *down]
        if not purge:
            steps.append(Step("keep_files", "publish the upper layer as a last version on MooseFS", apply=self._keep_files))
        steps.append(Step("remove_local_layers", f"delete the desktop's disk and layers on {node}",
                          calls=lambda: [calls.remove_local_layers()], node=node))
        if purge:
            steps.append(Step("purge_mfs_data", f"delete every version of {user}'s files on MooseFS",
                              apply=lambda: self.desktops.purge_files(self.session(), user)))
        else:
            steps.append(Step("release_owner", "release the owner record on MooseFS (the files stay)",
                              calls=lambda: [calls.mount_mfs(), calls.release_owner()], node=node))
        steps.append(Step("record", "delete the desktop's record, GPUs and ports", apply=lambda: db.remove_desktop(user)))
        return steps

    def _keep_files(self) -> None:
        """Fold the upper layer into a last version, so the files on MooseFS stand alone: a later
        `labvm create` continues from that version. Its number is journaled before the publish:
        a resumed keep_files publishes the same one (done: nothing changes), not a newer one
        without the upper it emptied."""
        s, base, calls = self.session(), self.desktop().version, self.calls
        s.run(calls.mount_mfs())
        target = self.publish_target(s)
        # Over its image where the node holds it; without, the version keeps every whiteout.
        image = self.desktop().image
        self.desktops.publish(s, self.user, base, target, "remove", image if image in images_held(self.cfg, s) else None)
        s.run(calls.reset_upper())
        self.ctx.say(f"{self.user}'s files are kept on MooseFS as v{target}")

    def committed(self) -> bool:
        """The container is stopped: the removal took effect, whatever the journal says."""
        return self.container_stopped()


class CreateKind(DesktopKind):
    """Create a desktop: place it, check the member's files on MooseFS, reserve its GPUs and
    ports, then bring it up. Any failure undoes all of it."""

    name = "create"

    def title(self) -> str:
        return f"create of {self.user}'s desktop"

    @property
    def node_name(self) -> str:
        return self.p.get("placed") or self.p["node"]

    def checks(self, f: Findings) -> None:
        from .placement import GpuRequest

        db, user, p = self.ctx.db, self.user, self.p
        with f.check("desktop") as c:
            self.desktops._refuse_existing(db, user)
            c.detail = f"{user} has no desktop yet"
        if self.ctx.dry_run:
            with f.check("lock") as c:
                c.detail = check_lock(db, user)
        self.limits = Limits(**p["limits"])
        self.request = GpuRequest.parse(p["gpus_asked"], default=self.cfg.vm_defaults.gpus)
        with f.check("placement") as c:
            self.cap, reason = self.desktops._place(db, p["node"], self.request, self.limits.memory)
            self.ctx.remember(placed=self.cap.node.name)
            node = self.cap.node
            if self.limits.io_read_bps or self.limits.io_write_bps:
                if not self.cap.disk_device:
                    raise StateError(f"{node.name}: {node.data_dir} is on no block device, so IO caps can't apply; "
                                     "drop --io-read-bps/--io-write-bps")
                self.limits.io_device = self.cap.disk_device
            if self.limits.io_weight is not None and not self.cap.blkio_weight:
                if not self.ctx.dry_run:
                    self.ctx.say(f"note: {node.name}'s kernel has no block IO weight (no CFQ/BFQ blkio.weight); "
                                 "the IO weight is not applied")
                self.limits.io_weight = None
            c.detail = reason
        with f.check("room") as c:
            taken, used = db.taken_on(node.name, user, None)
            gpus, ports = self.cap.pick_gpus(self.request, taken), self.cap.pick_ports(used)
            shown = ", ".join(str(g["index"]) for g in gpus) or "none"
            c.detail = f"GPUs {shown} and VNC port {ports[0]} free on {node.name}"
        with f.check("image") as c:
            c.detail = self.image_detail(self.ctx.session(node.name), p["image"])
        with f.check("files") as c:
            account = db.get_user(user)
            record, versions = self.desktops.files_on_mfs(self.ctx.session(node.name), user, check=self.ctx.dry_run)
            files = previous_files(account, record, versions, bool(p.get("adopt")))
            self.ctx.remember(continue_from=files.latest, adopted=files.adopted)
            c.detail = (f"continues from v{files.latest}" + (" (adopted)" if files.adopted else "")) if files.latest \
                else f"no earlier files of {user} on MooseFS"

    def claim(self) -> None:
        self.desktops._reserve(self.ctx.db, self.user, self.cap.node, self.cap, self.request, self.limits, self.p.get("image"))

    def steps(self) -> list[Step]:
        db, user = self.ctx.db, self.user
        node = self.node_name
        return [
            Step("check", f"place the desktop ({node}), check the member's files; reserve its GPUs and ports",
                 undo=lambda: db.remove_desktop(user) if db.has_desktop(user) else None),
            Step("base_image", f"the small docker image desktop containers start from, on {node}",
                 calls=lambda: [self.desktops.base_image_call()], node=node),
            Step("adopt_files", f"make {node} the owner of {user}'s files on MooseFS",
                 apply=self._adopt, undo=self._release),
            *self.up_steps(undo=True, remove_layers=True),
        ]

    def _adopt(self) -> None:
        account = self.ctx.db.get_user(self.user)
        files = PreviousFiles(int(self.p.get("continue_from") or 0), bool(self.p.get("adopted")))
        self.desktops._adopt_files(self.session(), self.ctx.db, account, files)

    def _release(self) -> None:
        self.session().call_many([self.calls.mount_mfs(), self.calls.release_owner()])

    def result(self) -> Desktop:
        return self.desktop()


class ResizeKind(DesktopKind):
    """Grow a desktop's disk: the image on its node (online where the kernel can), the member's
    quota on MooseFS, the record. A disk never shrinks, so there is nothing to undo: a resize
    only goes forward once the image grew."""

    name = "resize"
    commit = "grow_disk"

    def checks(self, f: Findings) -> None:
        desktop = self.check_desktop(f, ("running", "stopped"))
        with f.check("size") as c:
            c.detail = str(self.desktops._resize_plan(desktop, self.p["size"])["to"]) + " bytes, not smaller than now"

    def steps(self) -> list[Step]:
        node, calls, size = self.node_name, self.calls, self.p["size"]
        return [
            Step("check", "check the desktop and the size again, under the lock"),
            Step("grow_disk", f"grow the desktop's disk image on {node}", apply=self._grow),
            Step("member_quota", "grow the member's quota on MooseFS", calls=lambda: [calls.mount_mfs(), calls.quota(size)], node=node),
            Step("record", "record the new size", apply=self._record),
        ]

    def committed(self) -> bool:
        """The disk image on the node has the new size: the resize took effect."""
        status = self.node_status()
        return status is not None and (status["disk"].get("size") or 0) >= self.p["size"]

    def _grow(self) -> None:
        self.grown = self.session().run(self.calls.resize_disk(self.p["size"]))

    def _record(self) -> None:
        self.ctx.db.set_desktop_limits(self.user, {**self.desktop().limits, "disk": self.p["size"]})

    def result(self) -> dict:
        return getattr(self, "grown", {})


def plan_on_desktop(home, say, kind_cls, user: str, dry_run: bool, **params):
    """Run (or, dry, plan) a kind on USER's desktop. An unknown user or desktop is refused
    before anything is journaled; the desktop's node and whether it runs are journaled."""
    from .plan import Runner

    with home.state() as db:
        desktop = Desktops(home).get(db, user)
    params = {"node": desktop.node, "was_running": desktop.state == "running", **params}
    runner = Runner(home, say)
    return runner.dry_run(kind_cls, user, params) if dry_run else runner.run(kind_cls, user, params)
