"""image: the shared desktop rootfs (xfce_local) and the docker base image on a node.

Actions:
  status              which image xfce_local holds, from its marker file (changes nothing)
  ensure_unpacked     unpack a desktop image tarball into xfce_local unless it already holds it
  ensure_docker_base  `docker import` the tiny base image unless dockerd already has its tag

xfce_local is the lowest layer of every desktop's overlay. It is never changed in place: a new
image is unpacked beside it and swapped in with one rename, and a tree some overlay still uses
as a lower layer is never replaced (overlayfs forbids changing a lower under a live mount).
"""

import base64
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import secrets
import tarfile
import time
import urllib.parse

from _contract import (
    Action,
    BadRequest,
    Failed,
    Param,
    PreconditionFailed,
    Result,
    TemporaryFailure,
    absolute_path,
    log,
    string_matching,
)
from _docker import docker_call, docker_message
from _system import (
    CommandTimedOut,
    fsync_directory,
    overlay_lowerdirs,
    read_mountinfo,
    require_tool,
    run_command,
    write_atomically,
)
from _tree import remove_tree

MARKER = ".labvm-image.json"
# Written into the image by `labvm image build`: what desktop it is and when it was built.
IMAGE_METADATA = "etc/labvm-image"
IMAGE_METADATA_MAX_BYTES = 64 * 1024
IMAGE_METADATA_KEYS = ("desktop", "built", "suite", "packages")
INCOMING_INFIX = ".incoming-"
OLD_INFIX = ".old-"
LOCK_SUFFIX = ".lock"
UNPACK_TIMEOUT_S = 3600.0
HASH_CHUNK = 1 << 20
# Unpacking into a shallow path would swap a system directory away; real ones are deeper.
MIN_ROOTFS_DEPTH = 2

DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
MAX_BASE_TAR_BYTES = 512 * 1024

# Reference grammar of docker image names, kept strict: lowercase path components, one tag.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_TAG_PATTERN = rf"(?=.{{1,255}}$){_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"


# --- parameters ---------------------------------------------------------------------------


def rootfs_path(name: str, value) -> str:
    path = absolute_path(name, value)
    if len([part for part in path.split("/") if part]) < MIN_ROOTFS_DEPTH:
        raise BadRequest(f"param {name!r} must be at least {MIN_ROOTFS_DEPTH} directories deep, got {path!r}", "bad_param")
    return path


sha256_hex = string_matching(r"[0-9a-f]{64}", "a sha256 in lowercase hex (64 characters)")
image_tag = string_matching(IMAGE_TAG_PATTERN, "a docker image name with a tag, such as labvm/base:0123456789ab")


def base_tar(name: str, value) -> bytes:
    """The base image as base64; it must decode to a plain tar of at most MAX_BASE_TAR_BYTES."""
    if not isinstance(value, str):
        raise BadRequest(f"param {name!r} must be a base64 string", "bad_param")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise BadRequest(f"param {name!r} is not valid base64", "bad_param") from None
    if not data or len(data) > MAX_BASE_TAR_BYTES:
        raise BadRequest(f"param {name!r} must decode to 1 to {MAX_BASE_TAR_BYTES} bytes, got {len(data)}", "bad_param")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.getmembers()
    except tarfile.TarError as error:
        raise BadRequest(f"param {name!r} is not an uncompressed tar: {error}", "bad_param") from None
    return data


XFCE_LOCAL_PARAM = {"xfce_local": Param(rootfs_path, required=True)}
ENSURE_UNPACKED_PARAMS = {
    **XFCE_LOCAL_PARAM,
    "tarball": Param(absolute_path, required=True),
    "sha256": Param(sha256_hex, required=True),
}
ENSURE_DOCKER_BASE_PARAMS = {
    "tag": Param(image_tag, required=True),
    "tar_b64": Param(base_tar, required=True),
    "docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET),
}


# --- status -------------------------------------------------------------------------------


def read_marker(xfce_local: str) -> dict | None:
    try:
        with open(os.path.join(xfce_local, MARKER), encoding="utf-8") as stream:
            marker = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log(f"ignoring unreadable marker in {xfce_local}: {error}")
        return None
    return marker if isinstance(marker, dict) else None


def image_status(xfce_local: str) -> dict:
    marker = read_marker(xfce_local) or {}
    return {
        "xfce_local": xfce_local,
        "exists": os.path.isdir(xfce_local),
        "present": bool(marker.get("sha256")),
        "sha256": marker.get("sha256"),
        "desktop": marker.get("desktop"),
        "built": marker.get("built"),
        "unpacked_at": marker.get("unpacked_at"),
        "in_use_by": overlays_using(xfce_local),
    }


def status(params: dict, check: bool) -> Result:
    return Result(changed=False, data=image_status(params["xfce_local"]))


# --- which overlays use a tree ------------------------------------------------------------


def is_same_or_under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def overlays_using(tree: str) -> list[str]:
    """Mount points of overlays that have `tree`, or a directory in it, as a lower layer."""
    trees = {tree, os.path.realpath(tree)}
    users = []
    for entry in read_mountinfo():
        if entry.fstype != "overlay":
            continue
        lowers = [os.path.normpath(lower) for lower in overlay_lowerdirs(entry.super_options)]
        if any(is_same_or_under(lower, each) for lower in lowers for each in trees):
            users.append(entry.mount_point)
    return users


# --- ensure_unpacked ----------------------------------------------------------------------


def ensure_unpacked(params: dict, check: bool) -> Result:
    xfce_local, tarball, wanted = params["xfce_local"], params["tarball"], params["sha256"]
    before = image_status(xfce_local)
    if before["sha256"] == wanted:
        return Result(changed=False, data=before)
    refuse_unsafe_target(xfce_local, before)
    if check:
        return Result(changed=True, data={**before, "wanted_sha256": wanted})
    if not os.path.isfile(tarball):
        raise PreconditionFailed(f"image tarball {tarball} does not exist on this node; upload it first", "tarball_missing")
    parent = os.path.dirname(xfce_local)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    with exclusive_lock(xfce_local + LOCK_SUFFIX):
        before = image_status(xfce_local)  # another unpack may have finished while we waited
        if before["sha256"] == wanted:
            return Result(changed=False, data=before)
        remove_leftovers(xfce_local)
        verify_sha256(tarball, wanted)
        incoming = unpack_beside(xfce_local, tarball)
        try:
            write_marker(incoming, wanted)
            # Checked again right before the swap: a desktop may have started while we unpacked.
            refuse_unsafe_target(xfce_local, image_status(xfce_local))
            old = swap_into_place(incoming, xfce_local)
        except BaseException:
            remove_quietly(incoming)
            raise
        if old is not None:
            remove_quietly(old)
    return Result(changed=True, data={**image_status(xfce_local), "previous_sha256": before["sha256"]})


def refuse_unsafe_target(xfce_local: str, current: dict) -> None:
    if current["in_use_by"]:
        shown = ", ".join(current["in_use_by"][:5]) + (" ..." if len(current["in_use_by"]) > 5 else "")
        raise PreconditionFailed(
            f"{xfce_local} is in use as an overlay lower layer by {shown}; stop those desktops before replacing the image",
            "image_in_use",
        )
    if os.path.islink(xfce_local):
        raise PreconditionFailed(f"{xfce_local} is a symlink; point xfce_local at the real directory", "xfce_local_is_symlink")
    if os.path.lexists(xfce_local) and not os.path.isdir(xfce_local):
        raise PreconditionFailed(f"{xfce_local} exists and is not a directory", "xfce_local_not_a_directory")
    # A tree without our marker is not ours to swap away, unless it is empty.
    if current["exists"] and not current["present"] and os.listdir(xfce_local):
        raise PreconditionFailed(
            f"{xfce_local} is not empty and holds no labvm image ({MARKER} missing); move it away or choose another xfce_local",
            "xfce_local_not_an_image",
        )


class exclusive_lock:
    """flock on a file beside xfce_local: two unpacks of the same tree must not interleave."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TemporaryFailure(f"another image unpack holds {self.path}; try again when it is done", "image_busy") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def remove_leftovers(xfce_local: str) -> None:
    """Trees left by an unpack that crashed; only called with the lock held."""
    parent, base = os.path.split(xfce_local)
    for name in os.listdir(parent):
        if name.startswith(base + INCOMING_INFIX) or name.startswith(base + OLD_INFIX):
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                log(f"removing leftover {path}")
                remove_quietly(path)


def remove_quietly(path: str) -> None:
    """Cleanup after a failure: the failure is what to report, not a tree half deleted."""
    try:
        remove_tree(path)
    except OSError as error:
        log(f"could not remove {path}: {error}")


def verify_sha256(tarball: str, wanted: str) -> None:
    digest = hashlib.sha256()
    with open(tarball, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != wanted:
        raise Failed(
            f"image tarball {tarball} has sha256 {digest.hexdigest()}, not {wanted}: the upload is damaged; push it again",
            "sha256_mismatch",
        )


def unpack_beside(xfce_local: str, tarball: str) -> str:
    parent, base = os.path.split(xfce_local)
    incoming = os.path.join(parent, base + INCOMING_INFIX + secrets.token_hex(4))
    tar = require_tool("tar", "install the tar package", "tar_missing")
    os.mkdir(incoming, 0o700)
    argv = [tar, "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "-xzf", tarball, "-C", incoming]
    log(f"unpacking {tarball} into {incoming}")
    try:
        result = run_command(argv, timeout_s=UNPACK_TIMEOUT_S)
    except (CommandTimedOut, OSError) as error:
        remove_quietly(incoming)
        raise Failed(f"unpacking {tarball} failed: {error}", "unpack_failed") from None
    if result.returncode != 0:
        remove_quietly(incoming)
        raise Failed(f"unpacking {tarball} failed: {result.output_tail()}", "unpack_failed")
    os.chmod(incoming, 0o755)
    return incoming


def image_metadata(root: str) -> dict:
    """What `labvm image build` recorded in the image. Symlinks are not followed: whatever
    the tarball holds must not make us read a file of the node."""
    path = root
    for part in IMAGE_METADATA.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as stream:
            metadata = json.loads(stream.read(IMAGE_METADATA_MAX_BYTES))
    except (OSError, ValueError):
        return {}
    if not isinstance(metadata, dict):
        return {}
    return {key: metadata[key] for key in IMAGE_METADATA_KEYS if key in metadata}


def write_marker(root: str, sha256: str) -> None:
    marker = {
        **image_metadata(root),
        "sha256": sha256,
        "unpacked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    content = json.dumps(marker, sort_keys=True).encode() + b"\n"
    write_atomically(os.path.join(root, MARKER), content, 0o644, temporary=MARKER + ".tmp")


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def rename_exchange(first: str, second: str) -> None:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE): nobody sees xfce_local missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    if function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), second)


def swap_into_place(incoming: str, xfce_local: str) -> str | None:
    """Put `incoming` at xfce_local; returns the path the old tree now has, or None."""
    parent, base = os.path.split(xfce_local)
    if not os.path.lexists(xfce_local):
        os.rename(incoming, xfce_local)
        fsync_directory(parent)
        return None
    old = os.path.join(parent, base + OLD_INFIX + secrets.token_hex(4))
    try:
        rename_exchange(incoming, xfce_local)
        os.rename(incoming, old)  # incoming now holds the old tree; name it for what it is
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        # No RENAME_EXCHANGE here: two renames, with the old tree put back if the second fails.
        os.rename(xfce_local, old)
        try:
            os.rename(incoming, xfce_local)
        except BaseException:
            os.rename(old, xfce_local)
            raise
    fsync_directory(parent)
    return old


# --- ensure_docker_base -------------------------------------------------------------------


def ensure_docker_base(params: dict, check: bool) -> Result:
    tag, socket_path = params["tag"], params["docker_socket"]
    image_id = docker_image_id(socket_path, tag)
    if image_id is not None:
        return Result(changed=False, data={"tag": tag, "id": image_id})
    if check:
        return Result(changed=True, data={"tag": tag, "id": None})
    docker_import(socket_path, tag, params["tar_b64"])
    image_id = docker_image_id(socket_path, tag)
    if image_id is None:
        raise Failed(f"dockerd accepted the import of {tag} but does not list the image afterwards", "docker_import_missing")
    return Result(changed=True, data={"tag": tag, "id": image_id})


def docker_image_id(socket_path: str, tag: str) -> str | None:
    status_code, body = docker_call(socket_path, "GET", f"/images/{tag}/json")
    if status_code == 404:
        return None
    if status_code != 200:
        raise Failed(f"GET /images/{tag}/json answered HTTP {status_code}: {docker_message(body)}", "docker_error")
    try:
        return str(json.loads(body)["Id"])
    except (ValueError, KeyError, TypeError):
        raise Failed(f"GET /images/{tag}/json answered without an image Id", "docker_error") from None


def docker_import(socket_path: str, tag: str, tar: bytes) -> None:
    repo, _, version = tag.rpartition(":")
    query = urllib.parse.urlencode({"fromSrc": "-", "repo": repo, "tag": version})
    status_code, body = docker_call(socket_path, "POST", f"/images/create?{query}", body=tar, content_type="application/x-tar")
    if status_code != 200:
        raise Failed(f"importing {tag} answered HTTP {status_code}: {docker_message(body)}", "docker_import_failed")
    # The import answers 200 and then streams progress objects; an error comes as one of them.
    for line in body.decode("utf-8", errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("error"):
            raise Failed(f"importing {tag} failed: {message['error']}", "docker_import_failed")


ACTIONS = {
    "status": Action(run=status, params=XFCE_LOCAL_PARAM),
    "ensure_unpacked": Action(run=ensure_unpacked, params=ENSURE_UNPACKED_PARAMS),
    "ensure_docker_base": Action(run=ensure_docker_base, params=ENSURE_DOCKER_BASE_PARAMS),
}
