"""Removing a lab member, and what happens to the files MooseFS holds under their name.

A member's files outlive their desktop (`labvm rm` keeps them as versions). When the member
goes too, the admin says what becomes of them: --purge deletes them, --keep-files keeps them
with no member. Kept files are marked with the removed member's id (the owner record on
MooseFS), so a later member given the same name never gets them unless `labvm create --adopt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .admin import AdminHome
from .config import Node
from .desktops import Desktops, NodeSession
from .errors import BadInput, NodeError, NodeUnreachable, StateError
from .journal import journaled
from .names import is_valid_user_name

CHOICE_MISSING = (
    "say what happens to {name}'s files on MooseFS: --purge deletes every version of them, "
    "--keep-files keeps them with no member (a later member named {name} gets them only with "
    "`labvm create {name} --adopt`); --dry-run shows what is there"
)


@dataclass
class MemberRemoval:
    """What `labvm user rm` did, or with dry_run would do: one line per change."""

    name: str
    purge: bool
    dry_run: bool
    versions: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def _on_any_node(nodes: list[Node], desktops: Desktops, work: Callable[[NodeSession], object]):
    """MooseFS is the same from every node: run `work` over the first node that answers."""
    if not nodes:
        raise BadInput("no nodes in the cluster file, and labvm reaches MooseFS through a node; "
                       "add one, or use --keep-files")
    unreachable: list[str] = []
    for node in nodes:
        try:
            with desktops.session(node) as s:
                return work(s)
        except NodeUnreachable as exc:
            unreachable.append(str(exc))
    raise NodeError(node=", ".join(n.name for n in nodes), msg=f"no node reachable for MooseFS: {'; '.join(unreachable)}")


class Members:
    def __init__(self, home: AdminHome, say: Callable[[str], None] = lambda _msg: None):
        self.home = home
        self.say = say
        self.desktops = Desktops(home, say)

    def _nodes(self) -> list[Node]:
        return list(self.home.config.nodes)

    def _versions(self, name: str) -> list[int]:
        def look(s: NodeSession) -> list[int]:
            _record, versions = self.desktops.files_on_mfs(s, name)
            return sorted(v["version"] for v in versions)

        return _on_any_node(self._nodes(), self.desktops, look)

    def check(self, name: str, *, purge: bool, keep_files: bool) -> None:
        """Everything that refuses a removal, before the admin is asked to confirm it."""
        with self.home.state() as db:
            self._check(db, name, purge, keep_files)

    @staticmethod
    def _check(db, name: str, purge: bool, keep_files: bool) -> None:
        if purge == keep_files:
            raise BadInput(CHOICE_MISSING.format(name=name) if not purge else "give --purge or --keep-files, not both")
        db.get_user(name)
        if db.has_desktop(name):
            raise StateError(f"user {name!r} still has a desktop; remove it first with `labvm rm {name}`")

    def remove(self, name: str, *, purge: bool, keep_files: bool, dry_run: bool = False) -> MemberRemoval:
        with self.home.state() as db:
            self._check(db, name, purge, keep_files)
            result = MemberRemoval(name, purge, dry_run)
            # A name an older labvm accepted but the helpers refuse: no desktop could run under it.
            reachable = is_valid_user_name(name)
            if dry_run:
                result.versions = self._versions(name) if reachable else []
                result.lines = self._plan(result, reachable)
                return result
            with journaled(db, "user_rm", name, {"purge": purge}) as op:
                if purge and reachable:
                    with op.step("purge_mfs_data"):
                        _on_any_node(self._nodes(), self.desktops, lambda s: self.desktops.purge_files(s, name))
                with op.step("remove_user"):
                    db.remove_user(name)
            result.lines = self._plan(result, reachable)
            return result

    @staticmethod
    def _plan(r: MemberRemoval, reachable: bool) -> list[str]:
        delete, keep, remove = ("would delete", "would keep", "would remove") if r.dry_run else ("deleted", "kept", "removed")
        shown = f" ({', '.join(f'v{n}' for n in r.versions) or 'no versions'})" if r.dry_run else ""
        if not reachable:
            files = f"{r.name!r} is not a valid member name any more, so no node helper reaches files under it; MooseFS is not touched"
        elif r.purge:
            files = f"{delete} {r.name}'s files on MooseFS{shown}"
        else:
            files = (f"{keep} {r.name}'s files on MooseFS{shown}, with no member: "
                     f"a later member named {r.name} gets them only with `labvm create {r.name} --adopt`")
        return [files, f"{remove} user {r.name}"]
