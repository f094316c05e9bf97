"""Where a desktop's files are: on the node, under data_dir, and on MooseFS, under mfs_mount.

Node, per desktop (VmPaths):

    <data_dir>/vms/<user>/           0700 root
        disk.ext4                    the desktop's disk, a sparse ext4 image
        disk/                        where that image is loop-mounted while the stack is up
            up_local/  work_local/   the overlay's upper and work dirs
        low_local/                   read-only bind of <mfs_mount>/vms/<user>/low_mfs.v<N>
        merge_local/                 the overlay; the container's root
        runtime/                     tini, init, apply-password (bound at /run/labvm)
        sync/                        syncd's control dir: pid, lock, log, status.json, flushes

MooseFS (mfs_mount shows labvm's own subtree), per desktop:

    <mfs_mount>/vms/<user>/
        low_mfs.v<N>/  low_mfs.v<N>.json   published versions and their metadata
        up_mfs/                            the synced copy of up_local
        owner.json                         the node that may run the desktop (fencing)
        sync-heartbeat.json                until when the owner's writes reached MooseFS

Names only: nothing here touches the filesystem. Standard library only; syncd imports it too.
"""

import posixpath
from dataclasses import dataclass

VMS_DIR = "vms"  # on the node and on MooseFS: one directory per member

# On the node
DISK_IMAGE = "disk.ext4"
DISK_DIR = "disk"
SYNC_DIR = "sync"
SYNC_STATUS_FILE = "status.json"

# On MooseFS
UP_MFS = "up_mfs"
VERSION_DIR_PATTERN = r"low_mfs\.v(\d+)"
OWNER_FILE = "owner.json"
HEARTBEAT_FILE = "sync-heartbeat.json"


@dataclass(frozen=True)
class VmPaths:
    """One desktop's directories on the node."""

    vm_dir: str
    up_local: str
    work_local: str
    low_local: str
    merge_local: str
    runtime: str
    disk: str
    disk_image: str

    @classmethod
    def of(cls, data_dir: str, user: str) -> "VmPaths":
        vm_dir = posixpath.join(data_dir, VMS_DIR, user)
        disk = posixpath.join(vm_dir, DISK_DIR)
        return cls(
            vm_dir,
            posixpath.join(disk, "up_local"),
            posixpath.join(disk, "work_local"),
            posixpath.join(vm_dir, "low_local"),
            posixpath.join(vm_dir, "merge_local"),
            posixpath.join(vm_dir, "runtime"),
            disk,
            posixpath.join(vm_dir, DISK_IMAGE),
        )

    def mount_points(self) -> tuple[str, str]:
        return self.merge_local, self.low_local

    @property
    def legacy_layers(self) -> tuple[str, str]:
        """Where the upper and work dirs were before desktops had a disk of their own."""
        return posixpath.join(self.vm_dir, "up_local"), posixpath.join(self.vm_dir, "work_local")

    @property
    def control_dir(self) -> str:
        """The sync daemon's files: never inside up_local, nor in the runtime dir the container sees."""
        return posixpath.join(self.vm_dir, SYNC_DIR)

    def control_file(self, name: str) -> str:
        return posixpath.join(self.control_dir, name)


def mfs_user_dir(mfs_mount: str, user: str) -> str:
    # The mfs helper mounts labvm's subtree (mfs_dir) itself at mfs_mount.
    return posixpath.normpath(posixpath.join(mfs_mount, VMS_DIR, user))


def up_mfs_path(mfs_mount: str, user: str) -> str:
    return posixpath.join(mfs_user_dir(mfs_mount, user), UP_MFS)


def version_dir_name(version: int) -> str:
    return f"low_mfs.v{version}"


def version_path(user_dir: str, version: int) -> str:
    return posixpath.join(user_dir, version_dir_name(version))


def metadata_path(user_dir: str, version: int) -> str:
    return version_path(user_dir, version) + ".json"


def owner_path(mfs_mount: str, user: str) -> str:
    return posixpath.join(mfs_user_dir(mfs_mount, user), OWNER_FILE)


def heartbeat_path(mfs_mount: str, user: str) -> str:
    return posixpath.join(mfs_user_dir(mfs_mount, user), HEARTBEAT_FILE)
