"""The owner record of a desktop on MooseFS: <mfs_mount>/vms/<user>/owner.json.

It names the one node that may run the desktop, and the member id of the member whose files
these are. A switch moves it to the target before the target mounts anything, and
ensure_stack / ensure_container given their node's name refuse to act for a desktop that
another node owns (claim_or_refuse). So a node that was cut off or presumed dead cannot bring
up a second copy when it returns.
"""

import json
import os
import posixpath
import re
import time

from _contract import Failed, PreconditionFailed, Result
from _layout import owner_path
from _system import make_dirs, write_file_atomically

# A member's id (labvm's users table): whose files these are, whatever the member's name.
MEMBER_ID_PATTERN = r"[0-9a-f]{32}"


def read_owner(mfs_mount: str, user: str) -> dict | None:
    try:
        with open(owner_path(mfs_mount, user), encoding="utf-8") as stream:
            record = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise Failed(f"cannot read {owner_path(mfs_mount, user)}: {error}", "owner_unreadable") from None
    return record if isinstance(record, dict) else None


def write_owner(mfs_mount: str, user: str, node: str | None, op: int | None, member: str | None) -> None:
    path = owner_path(mfs_mount, user)
    make_dirs(posixpath.dirname(path), 0o755)
    record = {"node": node, "op": op, "since": time.time(), "member": member}
    write_file_atomically(path, json.dumps(record, sort_keys=True).encode() + b"\n", 0o644)


def record_member(record: dict | None) -> str | None:
    member = (record or {}).get("member")
    return member if isinstance(member, str) and re.fullmatch(MEMBER_ID_PATTERN, member) else None


def claim_or_refuse(mfs_mount: str, user: str, node: str, check: bool) -> None:
    record = read_owner(mfs_mount, user)
    if record is None or record.get("node") is None:
        if not check:
            write_owner(mfs_mount, user, node, None, record_member(record))
        return
    if record.get("node") != node:
        raise PreconditionFailed(
            f"{user}'s desktop belongs to node {record.get('node')!r} (its owner record on MooseFS); "
            f"this node ({node}) may not run it. Move it with labvm switch.",
            "fenced",
        )


def set_owner(params: dict, check: bool) -> Result:
    """Make a node the owner. The record keeps its member id unless a new one is given: a switch
    moves the desktop, it does not change whose files they are."""
    previous = read_owner(params["mfs_mount"], params["user"])
    member = params["member"] or record_member(previous)
    changed = previous is None or (previous.get("node"), previous.get("op"), record_member(previous)) != (
        params["node"], params["op"], member)
    if changed and not check:
        write_owner(params["mfs_mount"], params["user"], params["node"], params["op"], member)
    return Result(changed=changed, data={"previous": previous, "node": params["node"], "member": member})


def release_owner(params: dict, check: bool) -> Result:
    """The desktop is removed (its files stay as versions): no node owns it any more. A record
    with a member id stays, with no node, so a later `labvm create` knows whose files they are."""
    path = owner_path(params["mfs_mount"], params["user"])
    record = read_owner(params["mfs_mount"], params["user"]) if os.path.lexists(path) else None
    member = record_member(record)
    if member is None:
        exists = os.path.lexists(path)
        if exists and not check:
            os.unlink(path)
        return Result(changed=exists, data={})
    changed = record.get("node") is not None
    if changed and not check:
        write_owner(params["mfs_mount"], params["user"], None, None, member)
    return Result(changed=changed, data={"member": member})


def get_owner(params: dict, check: bool) -> Result:
    return Result(changed=False, data={"owner": read_owner(params["mfs_mount"], params["user"])})
