"""Nodes: adding one (pinning its host key), checking them all at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ClusterConfig, Node, add_node_to_file, check_new_node, remove_node_from_file
from .errors import Aborted, BadInput, HelperFailed, NodeError
from .remote.connection import NodeConnection
from .remote.helpers import HelperBundle, HelperRunner
from .remote.hostkeys import PinnedHostKeys, fetch_host_key, fingerprint
from .remote.pool import NodeOutcome, run_on_nodes
from .remote.recipes import image_status, isolation_params, mfs_params

# confirm(question) -> bool; the CLI asks the admin, tests answer for them.
Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class PinDecision:
    fingerprint: str
    key_type: str


def _accept_key(node_name: str, host: str, port: int, key, expected: str | None, confirm: Confirm) -> PinDecision:
    decision = PinDecision(fingerprint(key), key.get_name())
    if expected is not None:
        if expected != decision.fingerprint:
            raise BadInput(
                f"{node_name}: host key of {host}:{port} is {decision.fingerprint}, not the expected {expected}; nothing changed"
            )
        return decision
    if not confirm(f"{node_name} ({host}:{port}) host key is {decision.key_type} {decision.fingerprint}. Pin it?"):
        raise Aborted()
    return decision


def add_node(cfg: ClusterConfig, node: Node, *, expected_fingerprint: str | None, confirm: Confirm) -> PinDecision:
    """Pin the node's host key, prove we can log in and run helpers, then write it into the cluster file."""
    check_new_node(cfg.path, node)
    for other in cfg.nodes:
        if (other.host, other.port) == (node.host, node.port):
            raise BadInput(f"{node.host}:{node.port} is already node {other.name!r}")
    pins = PinnedHostKeys(cfg.home)
    key = fetch_host_key(node.name, node.host, node.port)
    pinned = pins.lookup(node.host, node.port)
    if pinned is not None and pinned != key:
        raise BadInput(
            f"{node.host}:{node.port} already has a different pinned host key ({fingerprint(pinned)}); "
            f"it now presents {fingerprint(key)}. Remove the stale pin from {pins.path} if the host was reinstalled"
        )
    decision = _accept_key(node.name, node.host, node.port, key, expected_fingerprint, confirm)
    pins.pin(node.host, node.port, key)
    try:
        with NodeConnection(node, cfg.home) as conn:
            HelperRunner(conn, HelperBundle.from_package()).call("probe", "facts", {})
        add_node_to_file(cfg.path, node)
    except BaseException:
        if pinned is None:
            pins.unpin(node.host, node.port)
        raise
    return decision


def remove_node(cfg: ClusterConfig, name: str, vms_on_node: list[str]) -> None:
    node = cfg.node(name)
    if vms_on_node:
        raise NodeError(node=name, msg=f"still holds desktops ({', '.join(vms_on_node)}); move them first with `labvm node drain {name}`")
    remove_node_from_file(cfg.path, name)
    PinnedHostKeys(cfg.home).unpin(node.host, node.port)


def rekey_node(cfg: ClusterConfig, name: str, *, expected_fingerprint: str | None, confirm: Confirm) -> PinDecision:
    """Replace a node's pinned host key after a reinstall, with the admin's explicit consent."""
    node = cfg.node(name)
    pins = PinnedHostKeys(cfg.home)
    key = fetch_host_key(node.name, node.host, node.port)
    old = pins.lookup(node.host, node.port)
    if old == key:
        return PinDecision(fingerprint(key), key.get_name())
    decision = _accept_key(node.name, node.host, node.port, key, expected_fingerprint, confirm)
    pins.pin(node.host, node.port, key)
    return decision


def node_rows(cfg: ClusterConfig) -> list[dict]:
    pins = PinnedHostKeys(cfg.home)
    rows = []
    for node in cfg.nodes:
        key = pins.lookup(node.host, node.port)
        last_port = node.docker_port_base + node.docker_user_port_num * node.docker_port_slots - 1
        rows.append(
            {
                "name": node.name,
                "host": node.host,
                "port": node.port,
                "user": node.user,
                "data_dir": node.data_dir,
                "ports": f"{node.docker_port_base}-{last_port}",
                "host_key": fingerprint(key) if key else None,
            }
        )
    return rows


def check_node(cfg: ClusterConfig, node: Node, *, mount_mfs: bool, bundle: HelperBundle) -> dict:
    """Probe one node. MooseFS problems are reported in the facts; only SSH or helper crashes fail the node."""
    with NodeConnection(node, cfg.home) as conn:
        runner = HelperRunner(conn, bundle)
        mfs_error = None
        if mount_mfs:
            try:
                mounted = runner.call("mfs", "ensure_mounted", mfs_params(cfg), timeout=60)["data"]
            except HelperFailed as exc:
                mfs_error = exc.fields.get("msg")
            else:
                if mounted.get("kernel_checks") is False:
                    mfs_error = (f"{cfg.storage.mfs_mount} is mounted without default_permissions, so node accounts "
                                 "can read members' files; it is mounted again by the first `labvm node check` "
                                 f"after the node's desktops stop (`labvm node drain {node.name}`)")
        facts = runner.call("probe", "facts", {"data_dir": node.data_dir, "mfs_mount": cfg.storage.mfs_mount})["data"]
        status = image_status(cfg)
        facts["images"] = runner.call(status.helper, status.action, status.params)["data"]["images"]
        try:
            # Like the mount above, what check may set right it sets right: the rules that keep
            # desktops off MooseFS and the nodes. Without mount_mfs it only reports.
            action = "ensure_isolation" if mount_mfs else "isolation_status"
            facts["isolation"] = runner.call("net", action, isolation_params(cfg))["data"]
            if action == "ensure_isolation":
                facts["isolation"]["missing"] = []
        except HelperFailed as exc:
            facts["isolation"] = {"error": exc.fields.get("msg")}
        try:
            # The same for the labvm runtime, which gives each desktop its overlay as its root.
            action = "ensure_runtime" if mount_mfs else "runtime_status"
            facts["runtime"] = runner.call("runtime", action, {"data_dir": node.data_dir}, timeout=60)["data"]
            facts["runtime"].setdefault("missing", [])
        except HelperFailed as exc:
            facts["runtime"] = {"error": exc.fields.get("msg")}
    mfs = facts.get("mfs") or {}
    if mfs_error:
        mfs["error"] = mfs_error
    mfs.setdefault("error", None)
    facts["mfs"] = mfs
    return facts


def check_nodes(cfg: ClusterConfig, names: list[str] | None = None, *, mount_mfs: bool = True, timeout: float = 60.0) -> list[NodeOutcome[dict]]:
    nodes = [cfg.node(n) for n in names] if names else list(cfg.nodes)
    if not nodes:
        raise BadInput(f"no nodes in {cfg.path}; add one with `labvm node add NAME HOST`")
    bundle = HelperBundle.from_package()
    return run_on_nodes(nodes, lambda n: check_node(cfg, n, mount_mfs=mount_mfs, bundle=bundle), timeout=timeout)


def node_problems(outcome: NodeOutcome[dict], desktop_images: dict[str, str | None] | None = None) -> list[str]:
    """What a person should fix on this node, in words; empty when the node is ready.
    desktop_images: the image each desktop recorded on the node runs over."""
    if not outcome.ok:
        return [outcome.error or "failed"]
    facts = outcome.value or {}
    problems = []
    held = {image["id"] for image in facts.get("images") or []}
    for user, image in sorted((desktop_images or {}).items()):
        if image is not None and image not in held:
            problems.append(f"{user}'s image {image[:12]} is not here (its next start sends it from the admin host)")
    if not facts.get("overlayfs"):
        problems.append("no overlayfs")
    if not facts.get("fuse"):
        problems.append("no FUSE")
    docker = facts.get("docker") or {}
    if not docker.get("ok"):
        problems.append(f"docker: {docker.get('error') or 'not answering'}")
    tools = facts.get("tools") or {}
    for tool in ("mfsmount", "rsync", "mkfs.ext4", "resize2fs", "losetup"):
        if not tools.get(tool):
            problems.append(f"{tool} missing")
    if "stunnel4" in tools and not tools["stunnel4"]:
        problems.append("stunnel4 missing (it serves the desktops' HTTPS)")
    mfs = facts.get("mfs") or {}
    if mfs.get("error"):
        problems.append(f"MooseFS: {mfs['error']}")
    elif not mfs.get("mounted"):
        problems.append("MooseFS not mounted")
    isolation = facts.get("isolation") or {}
    if isolation.get("error"):
        problems.append(f"desktop network isolation: {isolation['error']}")
    elif isolation.get("missing"):
        problems.append("desktop network isolation missing (the next desktop start adds it): "
                        + ", ".join(isolation["missing"]))
    runtime = facts.get("runtime") or {}
    if runtime.get("error"):
        problems.append(f"labvm runtime: {runtime['error']}")
    elif runtime.get("missing"):
        problems.append("labvm runtime not ready (`labvm node check` without --no-mount, or the next desktop start, "
                        "installs it): " + ", ".join(runtime["missing"]))
    if facts.get("gpu_error"):
        problems.append(f"GPUs: {facts['gpu_error']}")
    return problems

