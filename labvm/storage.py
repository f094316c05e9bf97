"""Versions of a desktop's files on MooseFS: sync flush, backup, retention, restore.

A desktop's files are three layers. Its upper (up_local, streamed to up_mfs by the sync) holds
what changed since its base version `low_mfs.vN`. A backup publishes `lower + upper` as a new
version with the node-side merge; the desktop keeps running on its base with its upper, so a
backup never stops it. A restore, or a switch, "solidifies": it publishes the upper into a new
version, makes that the base and empties the upper.

Why a running backup is consistent: the desktop is frozen (docker pause, the cgroup freezer)
only for the last sync flush and an `mfsmakesnapshot` of up_mfs, about a second. The snapshot is
the state of the desktop at one instant, as if its power had been cut, which is what file
systems and databases are built to recover from. The merge then works from the snapshot while
the desktop runs on.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .admin import AdminHome
from .desktops import Desktop, Desktops, NodeSession, Say
from .errors import BadInput, Busy, LabvmError, NotFound, StateError
from .fsutil import atomic_write
from .lifecycle import DesktopKind
from .plan import Step
from .remote.recipes import mount_mfs
from .retention import REASONS, Verdict, Version, check_version, plan

FLUSH_TIMEOUT_S = 900
BACKUP_LOCK = "backup.lock"


@dataclass
class BackupResult:
    user: str
    ok: bool
    line: str
    version: int | None = None
    pruned: tuple[int, ...] = ()
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"user": self.user, "ok": self.ok, "version": self.version, "pruned": list(self.pruned),
                "seconds": round(self.seconds, 3), "summary": self.line}


def versions_from_reply(data: dict) -> list[Version]:
    """The merge helper's versions. A reason it gives that is not one of REASONS is not known."""
    return [Version(v["version"], v.get("created"), v.get("files"), v.get("bytes"), v.get("base"),
                    v.get("reason") if v.get("reason") in REASONS else None) for v in data["versions"]]


class Storage:
    def __init__(self, home: AdminHome, say: Say = lambda _msg: None):
        self.home = home
        self.cfg = home.config
        self.say = say
        self.desktops = Desktops(home, say)

    # -- helpers on one node ----------------------------------------------------------------
    def _mfs(self, s: NodeSession) -> None:
        s.run(mount_mfs(self.cfg))

    def _list(self, s: NodeSession, user: str) -> list[Version]:
        return versions_from_reply({"versions": self.desktops.versions_on_mfs(s, user)})

    def _desktop(self, user: str) -> Desktop:
        with self.home.state() as db:
            return self.desktops.get(db, user)

    # -- reading ----------------------------------------------------------------------------
    def versions(self, user: str) -> tuple[Desktop, list[Verdict]]:
        """Every version of the user's files, newest first, with the rule that keeps each."""
        desktop = self._desktop(user)
        with self.desktops.session(self.cfg.node(desktop.node)) as s:
            self._mfs(s)
            found = self._list(s, user)
        return desktop, plan(found, self.cfg.retention, in_use={desktop.version})

    def sync_status(self, user: str) -> dict:
        desktop = self._desktop(user)
        node = self.cfg.node(desktop.node)
        with self.desktops.session(node) as s:
            return s.run(self.desktops.calls(node, user).sync_status())

    # -- flush ------------------------------------------------------------------------------
    def flush(self, user: str) -> dict:
        """Return once everything the desktop wrote before this call is on MooseFS."""
        desktop = self._desktop(user)
        if desktop.state != "running":
            return {"mode": "stopped", "seconds": 0.0, "files": 0}
        node = self.cfg.node(desktop.node)
        with self.desktops.session(node) as s:
            return s.run(self.desktops.calls(node, user).flush(FLUSH_TIMEOUT_S))

    # -- backup -----------------------------------------------------------------------------
    def backup(self, user: str, dry_run: bool = False):
        """Publish the desktop's current files as a new version, then prune by the retention rule."""
        from .lifecycle import plan_on_desktop

        started = time.monotonic()
        done = plan_on_desktop(self.home, self.say, BackupKind, user, dry_run)
        if dry_run:
            return done
        version, published, pruned, base = done
        seconds = time.monotonic() - started
        size = f"{published.get('files', '?')} files, {_size(published.get('bytes'))}"
        line = f"{user}: v{version} published ({size}, over v{base}) in {seconds:.1f} s"
        if pruned:
            line += "; pruned " + ", ".join(f"v{n}" for n in pruned)
        return BackupResult(user, True, line, version, tuple(pruned), seconds)

    def _frozen_upper(self, s: NodeSession, desktop: Desktop, node, target: int) -> str:
        """An instant's copy of up_mfs to merge from. A running desktop is flushed, frozen,
        flushed again and snapshotted, then thawed; a stopped one was flushed when it stopped."""
        calls = self.desktops.calls(node, desktop.user)
        snapshot = calls.snapshot_upper(str(target))
        if desktop.state != "running":
            return s.run(snapshot)["path"]
        flush = calls.flush(FLUSH_TIMEOUT_S)
        # The first flush, while the desktop works, sends the bulk; the frozen one only the rest.
        s.run(flush)
        s.run(calls.freeze())
        try:
            s.run(flush)
            return s.run(snapshot)["path"]
        finally:
            s.run(calls.thaw())

    def _prune(self, s: NodeSession, user: str, in_use: int) -> list[int]:
        verdicts = plan(self._list(s, user), self.cfg.retention, in_use={in_use})
        pruned = []
        for verdict in verdicts:
            if not verdict.keep:
                s.run(self.desktops.calls(s.node, user).remove_version(verdict.version.number))
                pruned.append(verdict.version.number)
        return sorted(pruned)

    def backup_many(self, users: list[str], report=lambda _result: None) -> list[BackupResult]:
        """Back up each desktop in turn, under one lock against an overlapping run (cron). One
        failed desktop is reported and the others still run."""
        with backup_lock(self.home.home):
            results = []
            for user in users:
                try:
                    result = self.backup(user)
                except LabvmError as exc:
                    result = BackupResult(user, False, f"{user}: FAILED: {exc}")
                report(result)
                results.append(result)
            return results

    def require_desktops(self, users: list[str]) -> None:
        """Refuse (NotFound) a name that is no member, or a member without a desktop, before any backup runs."""
        with self.home.state() as db:
            for user in users:
                self.desktops.get(db, user)

    def all_users(self) -> list[str]:
        with self.home.state() as db:
            return [d.user for d in self.desktops.list(db) if d.state in ("running", "stopped")]

    # -- solidify and restore -----------------------------------------------------------------
    def solidify(self, user: str, dry_run: bool = False):
        """Publish the desktop's changes as a new version and run it over that version with an
        empty upper layer. A running desktop is stopped for it and started again."""
        from .lifecycle import plan_on_desktop

        return plan_on_desktop(self.home, self.say, SolidifyKind, user, dry_run)

    def restore(self, user: str, version: int, dry_run: bool = False):
        """Roll the desktop back to a version; its current files are published as a new version
        first. The version is checked before the desktop stops: a typo leaves it as it was."""
        from .lifecycle import plan_on_desktop

        check_version(version)
        return plan_on_desktop(self.home, self.say, RestoreKind, user, dry_run, version=version)

    def _require_version(self, s: NodeSession, user: str, version: int) -> None:
        numbers = sorted(v.number for v in self._list(s, user))
        if version not in numbers:
            shown = ", ".join(f"v{n}" for n in numbers) or "none"
            raise NotFound(f"{user} has no version {version} (versions: {shown}); see `labvm versions {user}`")


def _next_version_check(kind, f, reason: str) -> None:
    """The version the publish will make, read from MooseFS: mounted for it in a real run, and
    only looked at in a dry run (where MooseFS may not be mounted yet)."""
    with f.check("versions") as c:
        s = kind.mfs_to_read()
        if s is not None:
            target = kind.desktops.next_version(s, kind.user, kind.desktop().version)
            kind.found_version = target
            c.detail = f"the {reason} publishes version {target}"
        else:
            c.detail = f"MooseFS is not mounted on {kind.node_name} yet; the {reason} publishes the next version"


def _publish_step(kind, reason: str) -> Step:
    """Publish the desktop's base plus its upper as the next version (the number is journaled
    before the work, so a resumed publish makes the same one)."""
    def publish() -> None:
        s = kind.session()
        target = kind.publish_target(s)
        desktop = kind.desktop()
        kind.published = kind.desktops.publish(s, kind.user, desktop.version, target, reason, desktop.image,
                                               upper=kind.p.get("upper"))

    shown = kind.p.get("target", getattr(kind, "found_version", None))
    return Step("publish", f"publish the desktop's files as version {shown or 'N'} ({reason})", apply=publish)


class BackupKind(DesktopKind):
    """A backup: flush and freeze a running desktop for an instant's snapshot of its upper,
    publish base + snapshot as a new version, prune by the retention rule. Before the publish,
    an undo thaws the desktop; after it, a backup only goes forward."""

    name = "backup"
    commit = "publish"

    def checks(self, f) -> None:
        self.check_desktop(f, ("running", "stopped"))
        self.check_node(f)
        _next_version_check(self, f, "backup")

    def steps(self) -> list[Step]:
        running = self.p.get("was_running", False)
        how = "flush the sync, freeze the desktop, flush again, snapshot its upper, thaw" if running else \
            "snapshot the stopped desktop's upper on MooseFS"
        return [
            Step("check", "check the desktop, its node and MooseFS again, under the lock"),
            Step("mount_mfs", f"mount MooseFS on {self.node_name}", calls=lambda: [self.calls.mount_mfs()], node=self.node_name),
            Step("snapshot_upper", how, apply=self._snapshot, undo=self._thaw if running else None),
            _publish_step(self, "backup"),
            Step("prune", "remove the versions the retention rule no longer keeps", apply=self._prune),
        ]

    def _snapshot(self) -> None:
        storage, s, desktop = Storage(self.ctx.home, self.ctx.say), self.session(), self.desktop()
        self.ctx.remember(upper=storage._frozen_upper(s, desktop, s.node, self.publish_target(s)))

    def committed(self) -> bool:
        """The version the publish makes is on MooseFS: the backup took effect."""
        if "target" not in self.p:
            return False
        try:
            s = self.session()
            s.run(self.calls.mount_mfs())
            return any(v["version"] == self.p["target"] for v in self.desktops.versions_on_mfs(s, self.user))
        except LabvmError:
            return False

    def _thaw(self) -> None:
        self.session().run(self.calls.thaw())

    def _prune(self) -> None:
        self.pruned = Storage(self.ctx.home, self.ctx.say)._prune(self.session(), self.user, self.desktop().version)

    def result(self):
        return self.p["target"], getattr(self, "published", {}), getattr(self, "pruned", []), self.desktop().version


class SolidifyKind(DesktopKind):
    """Solidify: publish the desktop's changes as a new version, make it the base and empty the
    upper. A running desktop is stopped for it and started again. Until the new version is the
    base (the commit), a failure starts the desktop again as it was."""

    name = "solidify"
    commit = "solidify"
    reason = "solidify"

    def checks(self, f) -> None:
        self.check_desktop(f, ("running", "stopped"))
        self.check_node(f)
        _next_version_check(self, f, self.name)

    def steps(self) -> list[Step]:
        running = self.p.get("was_running", False)
        steps = [Step("check", "check the desktop, its node and MooseFS again, under the lock")]
        if running:
            steps += self.down_steps(20, undo_up=True)
        steps += [_publish_step(self, self.reason),
                  Step("solidify", "make the new version the desktop's base and empty its upper layer", apply=self._solidify),
                  *self.after_solidify()]
        if running:
            steps += self.up_steps(undo=False, version=self.runs_over())
        return steps

    def after_solidify(self) -> list[Step]:
        return []

    def runs_over(self) -> str:
        """The version the desktop runs over when it starts again."""
        return "the new version"

    def committed(self) -> bool:
        """The desktop's recorded base is the new version: solidify's first write took effect."""
        return "target" in self.p and self.desktop().version == self.p["target"]

    def _solidify(self) -> None:
        """Each state between publish and here shows the same files: the new version holds the
        upper, and an upper applied over the version made from it changes nothing."""
        _set(self.ctx.db, self.user, version=self.p["target"])
        self.session().run(self.calls.reset_upper())

    def result(self) -> dict:
        return {"user": self.user, "running": bool(self.p.get("was_running")), "version": self.p["target"]}


class RestoreKind(SolidifyKind):
    name = "restore"
    reason = "restore"

    def checks(self, f) -> None:
        super().checks(f)
        version = self.p["version"]
        with f.check("version") as c:
            s = self.mfs_to_read()
            if s is not None:
                Storage(self.ctx.home, self.ctx.say)._require_version(s, self.user, version)
                c.detail = f"version {version} is on MooseFS"
                image = next((v.get("image") for v in self.desktops.versions_on_mfs(s, self.user) if v["version"] == version), None)
                if image and image != self.desktop().image and "version_image" not in self.p:
                    self.ctx.remember(version_image=image)
                if self.p.get("version_image"):
                    c.detail += f", over image {self.p['version_image'][:12]}: the desktop goes back to that image too"
                    with f.check("version's image") as c2:
                        c2.detail = self.image_detail(s, self.p["version_image"])
            else:
                c.detail = f"MooseFS is not mounted on {self.node_name}: version {version} is looked for under the lock"

    def runs_over(self) -> str:
        return f"version {self.p['version']}"

    def after_solidify(self) -> list[Step]:
        """The version's base, and the image it was published over where that is another."""
        version, image = self.p["version"], self.p.get("version_image")
        if image is None:
            return [Step("rebase", f"make version {version} the desktop's base",
                         apply=lambda: _set(self.ctx.db, self.user, version=version))]
        return [Step("rebase", f"make version {version} the desktop's base, over image {image[:12]}",
                     apply=lambda: _set(self.ctx.db, self.user, version=version, image=image))]

    def result(self) -> dict:
        return {"user": self.user, "running": bool(self.p.get("was_running")), "restored": self.p["version"],
                "kept_as": self.p["target"]}


def _set(db, user: str, **fields) -> None:
    db.update_desktop(user, **fields)


def _size(value: int | None) -> str:
    if value is None:
        return "? bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value} bytes"


class backup_lock:
    """One backup run at a time on this admin host: cron must not start a second over a slow first."""

    def __init__(self, home: Path):
        self.path = Path(home) / BACKUP_LOCK
        self.fd: int | None = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise Busy(f"another labvm backup is running (pid {holder}); this one does nothing") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the flock


# -- cron ---------------------------------------------------------------------------------------
CRON_FILE = Path("/etc/cron.d/labvm")
CRON_FIELD = re.compile(r"[0-9A-Za-z*/,-]+")
DEFAULT_SCHEDULE = "17 3 * * *"
DEFAULT_IDLE_SCHEDULE = "47 * * * *"
STATUS_PAGE_SCHEDULE = "*/5 * * * *"


def check_schedule(schedule: str) -> str:
    fields = schedule.split()
    if schedule.startswith("@") and len(fields) == 1 and fields[0] in ("@hourly", "@daily", "@weekly", "@monthly"):
        return schedule
    if len(fields) != 5 or not all(CRON_FIELD.fullmatch(f) for f in fields):
        raise BadInput(f"schedule {schedule!r}: give five cron fields like '17 3 * * *', or @daily")
    return " ".join(fields)


def labvm_command() -> list[str]:
    found = shutil.which("labvm")
    if found:
        return [os.path.realpath(found)]
    return [os.path.realpath(sys.executable), "-m", "labvm"]


def cron_word(word: str) -> str:
    """One word of a cron command: quoted for /bin/sh, then with cron's '%' (a newline, and the
    start of the command's stdin) escaped. A backslash would eat that escape, and a line break
    or other control character would end the line: such a word is refused."""
    if "\\" in word or not word.isprintable():
        raise BadInput(f"{word}: cron cannot carry a backslash, line break or control character in a path; use another path")
    return shlex.quote(word).replace("%", "\\%")


CA_RENEW_SCHEDULE = "41 4 * * *"


def cron_text(config: Path, schedule: str, idle_schedule: str | None, log: Path, command: list[str] | None = None,
              status_page: Path | None = None) -> str:
    """The cron file: `backup --all` on `schedule`, `ca renew` daily; `idle --stop` on
    idle_schedule if given; `status --html status_page` every 5 minutes if given. Every run
    appends to `log`."""
    words = [*(command or labvm_command()), "--config", str(config)]
    base = " ".join(cron_word(word) for word in words)
    redirect = f">> {cron_word(str(log))} 2>&1"
    lines = [
        "# labvm: periodic backups of every desktop. Written by `labvm cron install`; edit with it too.",
        "SHELL=/bin/sh",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        # The desktops' HTTPS certificates, before they expire (ca renew --help).
        f"{CA_RENEW_SCHEDULE} root {base} ca renew {redirect}",
        f"{check_schedule(schedule)} root {base} backup --all {redirect}",
    ]
    if idle_schedule:
        lines.append(f"{check_schedule(idle_schedule)} root {base} idle --stop {redirect}")
    if status_page:
        lines.append(f"{STATUS_PAGE_SCHEDULE} root {base} status --html {cron_word(str(status_page))} {redirect}")
    return "\n".join(lines) + "\n"


def install_cron(text: str, path: Path = CRON_FILE) -> bool:
    """Write the cron file (0644: cron ignores files others may write). True if it changed."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    if not path.parent.is_dir():
        raise StateError(f"{path.parent} does not exist: is cron installed? (apt-get install cron)")
    atomic_write(path, text.encode(), 0o644)
    return True
