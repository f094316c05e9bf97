"""Moving desktops onto another image: `labvm rebase` (one desktop) and `labvm image roll`.

A rebase is a solidify (storage.py) that ends on another image:

    check  image  [flush  stop_container  flush_sync  remove_container  unmount_stack  record_stopped]
    publish  solidify  set_image  [up: image mount_mfs ... record_running]

The new image is sent to the desktop's node first (the desktop still runs meanwhile). The
member's files are published as a version over the old image, which keeps their whiteouts
and opaque directories exactly where the old image had something to hide; that version is
then mounted over the new image. Overlay semantics decide the result:

- files the member added or changed stay, also where the new image changed them;
- files the member deleted from the old image stay deleted;
- files new in the new image appear, and files the member never touched are the new image's.

Nothing is lost: the version published over the old image stays on MooseFS with that image's
id in its record, and the old image stays on the node until `labvm image gc`, so `labvm rebase
USER --image OLD` or `labvm restore USER N` goes back. A rebase has no commit point: any
failure, up to the start on the new image, undoes it, and the desktop runs again over its old
image with the same files (`image roll` counts on that).

Before anything changes, its checks name the conflicts: paths the member changed that the new
image changes too. Those keep the member's copy, and where that is the package database,
dpkg and apt go on believing the member's view of what is installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import BadInput, LabvmError, StateError
from .images import SHORT, find_image, image_in_catalog, image_manifest
from .lifecycle import plan_on_desktop
from .plan import Findings, Step
from .storage import SolidifyKind, _set

DPKG_STATUS = "var/lib/dpkg/status"
CONFLICTS_SHOWN = 12


def conflicts(member_paths: list[str], old: dict, new: dict) -> list[str]:
    """The member's paths that the new image has otherwise than the old one (added, removed or
    changed): there the member's copy hides the new image's."""
    return [path for path in member_paths if old.get(path) != new.get(path)]


def conflict_text(found: list[str], truncated: bool) -> str:
    if not found:
        return "none: nothing the member changed is changed by the new image" + (" (of the first paths listed)" if truncated else "")
    shown = ", ".join("/" + path for path in found[:CONFLICTS_SHOWN]) + (" ..." if len(found) > CONFLICTS_SHOWN else "")
    text = f"{len(found)} path(s) the member changed that the new image changes too; the member's copy stays: {shown}"
    if DPKG_STATUS in found:
        text += (f". /{DPKG_STATUS} is among them: the member installed or removed packages, so their package "
                 "database hides the new image's. apt and dpkg will list the member's packages at the old image's "
                 "versions although the new image's files are underneath; `apt install --reinstall` of those "
                 "packages, or a rebase back, sets it right")
    return text


class RebaseKind(SolidifyKind):
    """Move a desktop onto image params['image']. See the module's comment."""

    name = "rebase"
    reason = "rebase"
    commit = None

    def desktop(self):
        """A desktop with no image recorded and none its node could be adopted with is rebased
        from an unknown image: its version keeps every whiteout."""
        try:
            return super().desktop()
        except StateError:
            return self.desktops.get(self.ctx.db, self.user)

    def checks(self, f: Findings) -> None:
        desktop = self.check_desktop(f, ("running", "stopped"))
        new = self.p["image"]
        if "old_image" not in self.p:
            self.ctx.remember(old_image=desktop.image)
        with f.check("new image") as c:
            if desktop.image == new:
                raise BadInput(f"{self.user}'s desktop runs over image {new[:SHORT]} already")
            found = image_in_catalog(self.ctx.home.images_dir, new)
            old = f"{desktop.image[:SHORT]} ({self._kind_of(desktop.image)})" if desktop.image else "an unknown image"
            c.detail = f"{old} to {found.short} ({found.desktop})"
        self.check_node(f)
        with f.check("node's image") as c:
            c.detail = self.image_detail(self.session(), new)
        from .storage import _next_version_check

        _next_version_check(self, f, self.name)
        with f.check("conflicts") as c:
            c.detail = self._conflicts(desktop)

    def _kind_of(self, image: str) -> str:
        try:
            return image_in_catalog(self.ctx.home.images_dir, image).desktop
        except LabvmError:
            return "not on this admin host"

    def _conflicts(self, desktop) -> str:
        """Read on the node (the member's paths) and here (what each image holds)."""
        if desktop.image is None:
            return "not known: the desktop's image is not known to compare with"
        try:
            old = image_in_catalog(self.ctx.home.images_dir, desktop.image)
        except LabvmError:
            return f"not known: image {desktop.image[:SHORT]} is not on this admin host to compare with"
        new = image_in_catalog(self.ctx.home.images_dir, self.p["image"])
        s = self.mfs_to_read()
        if s is None:
            return f"not known yet: MooseFS is not mounted on {self.node_name}"
        listed = s.run(self.calls.changed_paths(desktop.version))
        found = conflicts(listed["paths"], image_manifest(old), image_manifest(new))
        self.conflicts = found
        return conflict_text(found, listed["truncated"])

    def steps(self) -> list[Step]:
        running = self.p.get("was_running", False)
        new = self.p["image"]
        steps = [Step("check", "check the desktop, its node and MooseFS again, under the lock"),
                 self.image_step(image=lambda: new)]
        steps[1].detail = f"image {new[:SHORT]} on {self.node_name} (sent there if it lacks it)"
        if running:
            calls = self.calls
            steps.append(Step("flush", "send what the desktop wrote to MooseFS while it still runs",
                              calls=lambda: [calls.flush(900)], node=self.node_name))
            steps += self.down_steps(20, undo_up=True)
        old = self.p.get("old_image")
        steps += [
            _publish_step_over_old(self),
            Step("solidify", "make the new version the desktop's base and empty its upper layer", apply=self._solidify),
            Step("set_image", f"record image {new[:SHORT]} as the desktop's image",
                 apply=lambda: _set(self.ctx.db, self.user, image=new),
                 undo=lambda: _set(self.ctx.db, self.user, image=old)),
        ]
        if running:
            steps += self.up_steps(undo=True, version=f"the new version over image {new[:SHORT]}")
        return steps

    def committed(self) -> bool:
        return False

    def result(self) -> dict:
        return {"user": self.user, "running": bool(self.p.get("was_running")), "version": self.p.get("target"),
                "image": self.p["image"], "previous_image": self.p.get("old_image"),
                "conflicts": getattr(self, "conflicts", None)}


def _publish_step_over_old(kind: RebaseKind) -> Step:
    from .storage import _publish_step

    step = _publish_step(kind, kind.reason)
    old = kind.p.get("old_image")
    step.detail += f", over the old image {old[:SHORT]}" if old else ""
    return step


def rebase(home, say, user: str, image: str, dry_run: bool = False):
    """Move USER's desktop onto image `image` (an id or its prefix)."""
    found = find_image(home.images_dir, image)
    return plan_on_desktop(home, say, RebaseKind, user, dry_run, image=found.id)


@dataclass
class RollReport:
    image: str
    done: list[dict] = field(default_factory=list)
    failed: dict | None = None
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"image": self.image, "done": self.done, "failed": self.failed, "skipped": self.skipped}


def roll_targets(db, desktops, image: str, node: str | None) -> tuple[list[str], list[str]]:
    """The desktops to rebase onto `image` (on `node`, if given): those on another image; and
    those already on it."""
    todo, already = [], []
    for desktop in desktops.list(db):
        if node is not None and desktop.node != node:
            continue
        (already if desktop.image == image else todo).append(desktop.user)
    return todo, already


def roll(home, say, image: str, node: str | None = None, parallel: int = 1, report=lambda _line: None) -> RollReport:
    """Rebase every desktop (on `node`) that is not on `image` onto it, `parallel` at a time.
    Stops at the first failure: that desktop's rebase undid itself, the ones not begun are left
    as they are, and the ones running alongside finish."""
    from concurrent.futures import ThreadPoolExecutor

    from .desktops import Desktops

    found = find_image(home.images_dir, image)
    with home.state() as db:
        todo, already = roll_targets(db, Desktops(home), found.id, node)
    result = RollReport(found.id, skipped=already)
    pending = list(todo)

    def one(user: str) -> dict:
        started = time.monotonic()
        try:
            done = plan_on_desktop(home, lambda _m: None, RebaseKind, user, False, image=found.id)
        except LabvmError as exc:
            return {"user": user, "ok": False, "error": str(exc), "exit_code": exc.exit_code,
                    "seconds": round(time.monotonic() - started, 1)}
        return {"user": user, "ok": True, "version": done.get("version"), "seconds": round(time.monotonic() - started, 1)}

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        running = []
        while pending or running:
            while pending and len(running) < parallel and result.failed is None:
                user = pending.pop(0)
                running.append(pool.submit(one, user))
            if not running:
                break
            outcome = running.pop(0).result()
            report(outcome)
            if outcome["ok"]:
                result.done.append(outcome)
            elif result.failed is None:
                result.failed = outcome
    return result
