"""What labvm asks a node to do for one desktop, as typed calls.

Each method names one helper action and builds its parameters from the cluster file, the node
and the member, so no operation spells out a helper's request by hand. A method returns a
HelperCall: run it alone (`NodeSession.run`) or with others in one round trip
(`NodeSession.call_many`). A fake session that answers these calls is all a unit test needs
to drive an operation's rollback.
"""

from __future__ import annotations

from ..config import ClusterConfig, Node, member_quota_for
from .helpers import HelperCall

UNPACK_TIMEOUT_S = 3600
MERGE_TIMEOUT_S = 3600
MOUNT_TIMEOUT_S = 90
STACK_TIMEOUT_S = 3600
CONTAINER_TIMEOUT_S = 90
FLUSH_MARGIN_S = 60


def mfs_params(cfg: ClusterConfig) -> dict:
    s = cfg.storage
    return {"master": s.mfs_master, "port": s.mfs_port, "mount": s.mfs_mount, "subdir": s.mfs_dir, "options": s.mount_options}


def isolation_params(cfg: ClusterConfig) -> dict:
    """What desktops may never reach: MooseFS (master; chunkservers by their ports and by
    <network><deny>), every node of the cluster, and whatever else the cluster file denies."""
    return {"deny": [cfg.storage.mfs_master, *(n.host for n in cfg.nodes), *cfg.network.deny]}


def node_facts(node: Node, mfs_mount: str | None = None) -> HelperCall:
    """The node's GPUs, memory, data disk and listening ports (and MooseFS's mount, if named)."""
    params = {"data_dir": node.data_dir}
    if mfs_mount is not None:
        params["mfs_mount"] = mfs_mount
    return HelperCall("probe", "facts", params)


def image_store(cfg: ClusterConfig) -> dict:
    """Where a node keeps its desktop images (the store), and the one image of older labvm
    versions (xfce_local)."""
    return {"images": cfg.images_local, "legacy": cfg.xfce_local}


def image_ref(cfg: ClusterConfig, image: str) -> dict:
    """Image `image` (its id), for the node to find in its store."""
    return {"id": image, **image_store(cfg)}


def require_image(cfg: ClusterConfig, image: str) -> HelperCall:
    """That the node holds image `image`; fails with code image_missing where it does not."""
    return HelperCall("image", "require", {"image": image_ref(cfg, image)})


def image_status(cfg: ClusterConfig) -> HelperCall:
    """Every desktop image the node holds: id, desktop kind, build date, which overlays use it."""
    return HelperCall("image", "status", {"store": image_store(cfg)})


def unpack_image(cfg: ClusterConfig, tarball: str, image: str) -> HelperCall:
    """The uploaded tarball `tarball` unpacked into the node's store as image `image` (its sha256)."""
    return HelperCall("image", "ensure_unpacked", {"store": image_store(cfg), "tarball": tarball, "sha256": image},
                      timeout=UNPACK_TIMEOUT_S)


def remove_image(cfg: ClusterConfig, image: str) -> HelperCall:
    """Image `image` deleted from the node; refused while an overlay there uses it."""
    return HelperCall("image", "remove", {"store": image_store(cfg), "id": image}, timeout=UNPACK_TIMEOUT_S)


def mount_mfs(cfg: ClusterConfig) -> HelperCall:
    """MooseFS mounted on the node (nosuid, nodev, default_permissions; a root-only vms tree)."""
    return HelperCall("mfs", "ensure_mounted", mfs_params(cfg), timeout=MOUNT_TIMEOUT_S)


class DesktopCalls:
    """The helper calls for USER's desktop on NODE."""

    def __init__(self, cfg: ClusterConfig, node: Node, user: str, image: str | None = None):
        self.cfg, self.node, self.user, self.image = cfg, node, user, image

    @property
    def _image(self) -> dict:
        if self.image is None:
            raise ValueError(f"{self.user}'s desktop has no image recorded")
        return image_ref(self.cfg, self.image)

    @property
    def _local(self) -> dict:
        return {"user": self.user, "data_dir": self.node.data_dir}

    @property
    def _on_mfs(self) -> dict:
        return {"user": self.user, "mfs_mount": self.cfg.storage.mfs_mount}

    # -- layers
    def mount_mfs(self) -> HelperCall:
        return mount_mfs(self.cfg)

    def stack(self, version: int, disk: int) -> HelperCall:
        """The disk image, the version's bind and the overlay, mounted."""
        return HelperCall("vm", "ensure_stack", {
            **self._local, "mfs_mount": self.cfg.storage.mfs_mount, "version": version,
            "image": self._image, "disk": disk, "node": self.node.name,
        }, timeout=STACK_TIMEOUT_S)

    def unmount_stack(self) -> HelperCall:
        return HelperCall("vm", "ensure_stack_unmounted", self._local)

    def status(self) -> HelperCall:
        """The desktop's container, stack and disk on the node, as they are."""
        return HelperCall("vm", "status", self._local)

    def reset_upper(self) -> HelperCall:
        """An empty upper layer here and on MooseFS: the new version holds what it held."""
        return HelperCall("vm", "reset_upper", {**self._local, "mfs_mount": self.cfg.storage.mfs_mount})

    def remove_local_layers(self) -> HelperCall:
        return HelperCall("vm", "remove_local_layers", self._local)

    def quota(self, disk: int) -> HelperCall:
        """The member's hard quota on MooseFS, for a desktop of this disk size."""
        return HelperCall("mfs", "ensure_quota", {"mount": self.cfg.storage.mfs_mount, "user": self.user,
                                                  "size": member_quota_for(self.cfg, disk)})

    # -- the sync
    def sync_params(self) -> dict:
        sync = self.cfg.sync
        return {**self._local, "mfs_mount": self.cfg.storage.mfs_mount, "sync_time_s": sync.syncTime,
                "batch_max_files": sync.batch_max_files, "full_pass_hours": sync.full_pass_hours, "node": self.node.name}

    def start_sync(self) -> HelperCall:
        return HelperCall("sync", "ensure_running", self.sync_params())

    def stop_sync(self, flush: bool, timeout: float = 900) -> HelperCall:
        return HelperCall("sync", "ensure_stopped", {**self._local, "flush": flush}, timeout=timeout + FLUSH_MARGIN_S)

    def flush(self, timeout_s: float) -> HelperCall:
        return HelperCall("sync", "flush", {**self._local, "timeout_s": timeout_s}, timeout=timeout_s + FLUSH_MARGIN_S)

    def sync_status(self) -> HelperCall:
        return HelperCall("sync", "status", self._local)

    # -- the container
    def stop_container(self, timeout: int) -> HelperCall:
        return HelperCall("vm", "stop_container", {**self._local, "timeout": timeout}, timeout=timeout + FLUSH_MARGIN_S)

    def remove_container(self) -> HelperCall:
        return HelperCall("vm", "remove_container", self._local, timeout=CONTAINER_TIMEOUT_S)

    def start_container(self, spec: dict, password: str, sessions: dict[str, str],
                        tls: tuple[str, str] | None = None) -> list[HelperCall]:
        """What starts the desktop's container, in order: never before the node walls its
        network off from MooseFS, the nodes and the other desktops (re-applied each time: a
        dockerd restart or an admin's iptables flush must not leave a desktop open), and never
        before its dockerd knows the labvm runtime, which gives the container the desktop's
        overlay as its root. The desktop session is the one the node's image names. tls: the
        desktop's HTTPS key and certificate (PEM), which travel as secrets do."""
        secrets = {"password": password}
        if tls is not None:
            secrets.update(tls_key=tls[0], tls_cert=tls[1])
        return [
            HelperCall("net", "ensure_isolation", isolation_params(self.cfg)),
            HelperCall("runtime", "ensure_runtime", {"data_dir": self.node.data_dir}, timeout=60),
            HelperCall("vm", "ensure_container", {
                **self._local, "spec": spec, "secrets": secrets,
                "node": self.node.name, "mfs_mount": self.cfg.storage.mfs_mount,
                "image_sessions": {"image": self._image, "by_desktop": sessions},
            }, timeout=240),
        ]

    def teardown(self, flush: bool) -> list[HelperCall]:
        """Container gone, sync stopped (flushed or not), layers unmounted: the desktop no
        longer runs here, and its local layers stay."""
        return [self.remove_container(), self.stop_sync(flush), self.unmount_stack()]

    # -- ownership on MooseFS
    def set_owner(self, op: int | None = None, member: str | None = None) -> HelperCall:
        """The node that may mount the desktop's files from now on (the fence), for member."""
        params = {**self._on_mfs, "node": self.node.name}
        if op is not None:
            params["op"] = op
        if member is not None:
            params["member"] = member
        return HelperCall("vm", "set_owner", params)

    def release_owner(self) -> HelperCall:
        return HelperCall("vm", "release_owner", self._on_mfs)

    def owner(self) -> HelperCall:
        """The owner record on MooseFS: the node, operation and member it names (or none)."""
        return HelperCall("vm", "owner", self._on_mfs)

    def purge(self) -> HelperCall:
        """Every version and the upper of the member's files on MooseFS, deleted."""
        return HelperCall("vm", "purge_mfs_data", self._on_mfs, timeout=MERGE_TIMEOUT_S)

    # -- the running desktop
    def set_password(self, password: str) -> HelperCall:
        return HelperCall("vm", "set_password", {**self._local, "secrets": {"password": password}})

    def renew_https(self, key: str, cert: str, bind_address: str, https_port: int) -> HelperCall:
        """A running desktop's new HTTPS key and certificate, into its stunnel (`ca renew`)."""
        return HelperCall("vm", "renew_https", {**self._local, "tls": {"tls_key": key, "tls_cert": cert},
                                                "bind_address": bind_address, "https_port": https_port})

    def resize_disk(self, size: int) -> HelperCall:
        return HelperCall("vm", "resize_disk", {**self._local, "size": size}, timeout=900)

    def freeze(self) -> HelperCall:
        return HelperCall("vm", "freeze", {"user": self.user})

    def thaw(self) -> HelperCall:
        return HelperCall("vm", "thaw", {"user": self.user})

    def last_success(self) -> HelperCall:
        """When the desktop's sync last reported success on MooseFS (any node can read it)."""
        return HelperCall("sync", "last_success", self._on_mfs)

    # -- versions
    def versions(self) -> HelperCall:
        return HelperCall("merge", "versions", self._on_mfs)

    def changed_paths(self, version: int) -> HelperCall:
        """The paths the member changed over the image: version `version`, up_mfs and the
        desktop's up_local on this node (what its sync has not sent yet)."""
        return HelperCall("merge", "changed_paths", {**self._on_mfs, "version": version, "data_dir": self.node.data_dir},
                          timeout=600)

    def publish(self, base: int, target: int, reason: str, upper: str | None = None) -> HelperCall:
        """base + upper (default: up_mfs as it is) as low_mfs.v<target>, over the desktop image;
        reason (one of retention.REASONS) is recorded with the version."""
        params = {**self._on_mfs, "base": base, "target": target, "reason": reason}
        if self.image is not None:  # None: a desktop whose image is unknown keeps every whiteout
            params["image"] = self._image
        if upper is not None:
            params["upper"] = upper
        return HelperCall("merge", "publish", params, timeout=MERGE_TIMEOUT_S)

    def snapshot_upper(self, name: str) -> HelperCall:
        """A copy of up_mfs as it is now, named name (replacing an earlier try's)."""
        return HelperCall("merge", "snapshot_upper", {**self._on_mfs, "name": name}, timeout=600)

    def remove_version(self, version: int) -> HelperCall:
        return HelperCall("merge", "remove_version", {**self._on_mfs, "version": version}, timeout=600)
