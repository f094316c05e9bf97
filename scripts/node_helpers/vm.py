"""vm: one desktop's layer stack and container on this node.

Actions:
  ensure_stack            mount the desktop's disk (made, grown or filled from an older layout
                          first if need be), bind the current version read-only at low_local
                          and mount the overlay merge_local = low_local : image, upper up_local
  ensure_stack_unmounted  unmount merge_local, low_local, then the disk; busy is refused, never lazy
  ensure_container        create and start the desktop container from a spec built by labvm; its
                          root filesystem is merge_local (through the labvm OCI runtime, runtime.py)
  set_password            apply a new login + VNC password inside the running container
  renew_https             a running desktop's stunnel with a new HTTPS key and certificate
  stop_container          docker stop
  remove_container        docker stop (if running) and docker rm; the layers are never touched
  remove_local_layers     delete <data_dir>/vms/<user> once nothing there is mounted
  status                  what the mount table and dockerd say (changes nothing)
  freeze / thaw           docker pause / unpause: a consistent instant for a backup of a running VM
  reset_upper             empty up_local, work_local and up_mfs once a published version holds them
  set_owner / owner       the owner record on MooseFS: the one node allowed to run the desktop,
                          and the member id of the member whose files these are
  release_owner           no node owns it (labvm rm); the member id stays in the record
  resize_disk             grow the desktop's disk image and its filesystem, online

This module is the helper's contract: the params of each action and the action table. Status
is here too, as it reports on disk, stack and container at once. Each concern has its module:
    _spec.py         validating the container spec, the password and the image's sessions
    _disk.py         the desktop's disk image: plan, make, grow, mount, unmount; resize_disk
    _stack.py        the layer stack: ensure_stack, ensure_stack_unmounted, remove_local_layers,
                     purge_mfs_data, reset_upper
    _owner.py        the owner record on MooseFS, the fencing: set_owner, owner, release_owner
    _container.py    the container: ensure_container, set_password, stop_container,
                     remove_container, freeze, thaw
    _runtime_dir.py  the runtime dir bound at /run/labvm: tini, the desktop's init, the secret

Fencing: <mfs_mount>/vms/<user>/owner.json names the node that may run the desktop, and
ensure_stack / ensure_container given their node's name refuse to act for a desktop that
another node owns (see _owner.py).

Node layout, per VM (the names come from _layout.py):

    <data_dir>/vms/<user>/           0700 root
        disk.ext4                    0600 root: the desktop's disk, a sparse ext4 image of its size
        disk/                        where that image is mounted (loop) while the stack is up:
            up_local/  work_local/   overlay upper and work dirs. A member who fills them gets
                                     ENOSPC in their own desktop; the node's data disk loses no
                                     more than the image's size.
        low_local/                   read-only bind of <mfs_mount>/vms/<user>/low_mfs.v<N>
                                     (mfs_mount shows labvm's own subtree: mfsmount -S <mfs_dir>)
        merge_local/                 the overlay; the container's root comes from here
        runtime/                     0700 root, bound read-only at /run/labvm in the container:
                                     tini, init, apply-password, and for a moment `secret`
"""

from _container import (
    VNC_WAIT_DEFAULT_S,
    container_status,
    ensure_container,
    freeze,
    remove_container,
    renew_https,
    set_password,
    stop_container,
    thaw,
)
from _contract import (
    Action,
    Param,
    Result,
    absolute_path,
    integer_between,
    layer_path,
    node_name,
    string_matching,
    user_name,
)
from _disk import MIN_DISK_BYTES, disk_figures, resize_disk
from _docker import DEFAULT_DOCKER_SOCKET
from _images import image_ref
from _layout import VmPaths
from _owner import MEMBER_ID_PATTERN, get_owner, release_owner, set_owner
from _spec import container_spec, image_sessions, ip_address_param, password_secrets, tls_secrets
from _stack import (
    ensure_stack,
    ensure_stack_unmounted,
    purge_mfs_data,
    remove_local_layers,
    reset_upper,
    stack_state,
)

USER_PARAM = {"user": Param(user_name, required=True)}
DATA_DIR_PARAM = {"data_dir": Param(layer_path, required=True)}
DOCKER_SOCKET_PARAM = {"docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET)}
SECRETS_PARAM = {"secrets": Param(password_secrets, required=True)}

NODE_PARAM = {"node": Param(node_name)}
ENSURE_STACK_PARAMS = {
    **USER_PARAM,
    **DATA_DIR_PARAM,
    "mfs_mount": Param(layer_path, required=True),
    "version": Param(integer_between(0, 2**31 - 1), required=True),
    "image": Param(image_ref, required=True),
    "disk": Param(integer_between(MIN_DISK_BYTES, 2**50), required=True),
    **NODE_PARAM,
}
OWNER_PARAMS = {**USER_PARAM, "mfs_mount": Param(layer_path, required=True)}
SET_OWNER_PARAMS = {
    **OWNER_PARAMS,
    "node": Param(node_name, required=True),
    "op": Param(integer_between(0, 2**62)),
    "member": Param(string_matching(MEMBER_ID_PATTERN, "a member id: 32 lowercase hex digits")),
}
STACK_UNMOUNTED_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, **DOCKER_SOCKET_PARAM}
# Optional where the stack must be mounted anyway: then it is found in the mount table.
FOUND_DATA_DIR_PARAM = {"data_dir": Param(layer_path)}
ENSURE_CONTAINER_PARAMS = {
    **USER_PARAM,
    **FOUND_DATA_DIR_PARAM,
    "spec": Param(container_spec, required=True),
    **SECRETS_PARAM,
    **DOCKER_SOCKET_PARAM,
    "vnc_wait_s": Param(integer_between(0, 600), default=VNC_WAIT_DEFAULT_S),
    **NODE_PARAM,
    "mfs_mount": Param(layer_path),
    "image_sessions": Param(image_sessions),
}
SET_PASSWORD_PARAMS = {**USER_PARAM, **FOUND_DATA_DIR_PARAM, **SECRETS_PARAM, **DOCKER_SOCKET_PARAM}
RENEW_HTTPS_PARAMS = {
    **USER_PARAM, **FOUND_DATA_DIR_PARAM, **DOCKER_SOCKET_PARAM,
    "tls": Param(tls_secrets, required=True),
    "bind_address": Param(ip_address_param, required=True),
    "https_port": Param(integer_between(1, 65535), required=True),
}
# data_dir: where the desktop's stunnel keeps its files (_web.py), stopped with the container.
STOP_CONTAINER_PARAMS = {**USER_PARAM, "timeout": Param(integer_between(0, 3600), default=30), **DOCKER_SOCKET_PARAM,
                         **FOUND_DATA_DIR_PARAM}
REMOVE_CONTAINER_PARAMS = STOP_CONTAINER_PARAMS
REMOVE_LAYERS_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM}
STATUS_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, **DOCKER_SOCKET_PARAM}
PURGE_PARAMS = {**USER_PARAM, "mfs_mount": Param(layer_path, required=True)}
FREEZE_PARAMS = {**USER_PARAM, **DOCKER_SOCKET_PARAM}
RESIZE_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, "size": Param(integer_between(MIN_DISK_BYTES, 2**50), required=True)}
RESET_UPPER_PARAMS = {**USER_PARAM, **DATA_DIR_PARAM, "mfs_mount": Param(layer_path, required=True), **DOCKER_SOCKET_PARAM}


def vm_status(params: dict, check: bool) -> Result:
    """What the mount table and dockerd say of one desktop; a status never fails for dockerd's sake."""
    user = params["user"]
    paths = VmPaths.of(params["data_dir"], user)
    return Result(
        changed=False,
        data={"container": container_status(params["docker_socket"], user), "stack": stack_state(paths, user),
              "disk": disk_figures(paths)},
    )


ACTIONS = {
    "ensure_stack": Action(run=ensure_stack, params=ENSURE_STACK_PARAMS),
    "ensure_stack_unmounted": Action(run=ensure_stack_unmounted, params=STACK_UNMOUNTED_PARAMS),
    "ensure_container": Action(run=ensure_container, params=ENSURE_CONTAINER_PARAMS),
    "set_password": Action(run=set_password, params=SET_PASSWORD_PARAMS),
    "renew_https": Action(run=renew_https, params=RENEW_HTTPS_PARAMS),
    "stop_container": Action(run=stop_container, params=STOP_CONTAINER_PARAMS),
    "remove_container": Action(run=remove_container, params=REMOVE_CONTAINER_PARAMS),
    "remove_local_layers": Action(run=remove_local_layers, params=REMOVE_LAYERS_PARAMS),
    "status": Action(run=vm_status, params=STATUS_PARAMS),
    "purge_mfs_data": Action(run=purge_mfs_data, params=PURGE_PARAMS),
    "freeze": Action(run=freeze, params=FREEZE_PARAMS),
    "thaw": Action(run=thaw, params=FREEZE_PARAMS),
    "reset_upper": Action(run=reset_upper, params=RESET_UPPER_PARAMS),
    "set_owner": Action(run=set_owner, params=SET_OWNER_PARAMS),
    "owner": Action(run=get_owner, params=OWNER_PARAMS),
    "release_owner": Action(run=release_owner, params=OWNER_PARAMS),
    "resize_disk": Action(run=resize_disk, params=RESIZE_PARAMS),
}
