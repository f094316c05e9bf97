"""Getting into a running desktop: a command run as root in it (labvm exec), and the ssh
command line of an interactive shell (labvm shell). Both check first that the desktop runs,
and say so in labvm's words when it does not."""

from __future__ import annotations

import shlex

from .admin import AdminHome
from .config import Node
from .errors import Busy, NodeError, StateError
from .remote.connection import IDENTITY, CommandResult, NodeConnection
from .remote.hostkeys import KNOWN_HOSTS

EXEC_TIMEOUT_S = 3600


def running_node(home: AdminHome, user: str) -> Node:
    """The node of USER's running desktop. A desktop in another state is refused (exit 6) before
    any node is asked, with what to do about it."""
    from .desktops import Desktops

    with home.state() as db:
        desktop = Desktops(home).get(db, user)
    if desktop.state == "creating":
        raise StateError(f"{user}'s desktop is still being created; see `labvm ops list`")
    if desktop.state != "running":
        raise StateError(f"{user}'s desktop is {desktop.state}; start it with `labvm start {user}`")
    return home.config.node(desktop.node)


def require_container_running(conn: NodeConnection, user: str) -> None:
    """Docker's own words for a desktop recorded as running whose container is not (it exited,
    its node rebooted) are not shown: labvm says what it is and what to do."""
    found = conn.run(conn.as_root + ["docker", "inspect", "--format", "{{.State.Status}}", f"labvm-{user}"], timeout=60)
    if found.exited != 0 and "no such" not in found.stderr.lower():
        raise NodeError(node=conn.node.name, msg=f"docker inspect labvm-{user} failed: {found.stderr.strip() or found.exited}")
    status = found.stdout.strip() if found.exited == 0 else "missing"
    if status == "paused":
        raise Busy(f"{user}'s desktop is paused for a backup, for about a second; try again")
    if status != "running":
        raise StateError(f"{user}'s desktop is stopped (its container on {conn.node.name} is {status}); "
                         f"start it with `labvm start {user}`")


def run_inside(home: AdminHome, user: str, command: list[str]) -> CommandResult:
    """COMMAND as root in USER's running desktop; its exit status and output as they came."""
    node = running_node(home, user)
    with NodeConnection(node, home.home) as conn:
        require_container_running(conn, user)
        return conn.run(conn.as_root + ["docker", "exec", f"labvm-{user}", *command], timeout=EXEC_TIMEOUT_S)


def shell_argv(home: AdminHome, user: str, as_user: bool) -> list[str]:
    """The ssh command line of a login shell in USER's running desktop (root's, or USER's own),
    with the admin's pinned host keys and identity."""
    node = running_node(home, user)
    with NodeConnection(node, home.home) as conn:
        require_container_running(conn, user)
    inner = ["docker", "exec", "-it"] + (["-u", user] if as_user else []) + [f"labvm-{user}", "/bin/bash", "-l"]
    prefix = [] if node.user == "root" else ["sudo", "-n", "--"]
    return [
        "ssh", "-t", "-p", str(node.port),
        "-o", f"UserKnownHostsFile={home.home / KNOWN_HOSTS}", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes", "-i", str(home.home / IDENTITY),
        f"{node.user}@{node.host}", shlex.join(prefix + inner),
    ]
