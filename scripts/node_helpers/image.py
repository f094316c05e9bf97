"""image: the desktop images a node holds (_images.py) and the docker base image.

Actions:
  status              every image the node holds: id, desktop kind, build date, packages and
                      which overlays use it (changes nothing)
  require             that the node holds one image; fails image_missing where it does not
                      (changes nothing: the first call of a start's round trip)
  ensure_unpacked     unpack a desktop image tarball into the store as <images>/<id> unless
                      the node holds that image already
  remove              delete an image from the node; refused while any overlay uses it
  ensure_docker_base  `docker import` the tiny base image unless dockerd already has its tag

An image is never changed in place: a new one is unpacked beside the others under a temporary
name and renamed to its id when complete, so a desktop never sees half an image, and a tree an
overlay uses as a lower layer is never touched.
"""

import base64
import fcntl
import hashlib
import io
import json
import os
import re
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
from _images import (
    INCOMING_PREFIX,
    MARKER,
    OLD_PREFIX,
    held,
    image_id,
    image_ref,
    image_store,
    overlays_using,
    require,
    resolve,
    trees_of,
)
from _system import CommandTimedOut, fsync_directory, require_tool, run_command, write_atomically
from _tree import remove_tree

# Written into the image by `labvm image build`: what desktop it is and when it was built.
IMAGE_METADATA = "etc/labvm-image"
IMAGE_METADATA_MAX_BYTES = 64 * 1024
IMAGE_METADATA_KEYS = ("desktop", "built", "suite", "packages", "package_count")
LOCK_NAME = ".lock"
UNPACK_TIMEOUT_S = 3600.0
HASH_CHUNK = 1 << 20

DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
MAX_BASE_TAR_BYTES = 512 * 1024

# Reference grammar of docker image names, kept strict: lowercase path components, one tag.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_TAG_PATTERN = rf"(?=.{{1,255}}$){_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"


# --- parameters ---------------------------------------------------------------------------


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


STORE_PARAM = {"store": Param(image_store, required=True)}
ENSURE_UNPACKED_PARAMS = {
    **STORE_PARAM,
    "tarball": Param(absolute_path, required=True),
    "sha256": Param(image_id, required=True),
}
REMOVE_PARAMS = {**STORE_PARAM, "id": Param(image_id, required=True)}
REQUIRE_PARAMS = {"image": Param(image_ref, required=True)}
ENSURE_DOCKER_BASE_PARAMS = {
    "tag": Param(image_tag, required=True),
    "tar_b64": Param(base_tar, required=True),
    "docker_socket": Param(absolute_path, default=DEFAULT_DOCKER_SOCKET),
}


# --- status -------------------------------------------------------------------------------


def status(params: dict, check: bool) -> Result:
    return Result(changed=False, data={"images": held(params["store"])})


def require_held(params: dict, check: bool) -> Result:
    tree = require(params["image"])
    return Result(changed=False, data={"id": params["image"]["id"], "tree": tree})


# --- ensure_unpacked ----------------------------------------------------------------------


def ensure_unpacked(params: dict, check: bool) -> Result:
    store, tarball, wanted = params["store"], params["tarball"], params["sha256"]
    ref = {"id": wanted, **store}
    if resolve(ref) is not None:
        return Result(changed=False, data={"id": wanted, "path": resolve(ref)})
    refuse_unsafe_store(store["images"])
    refuse_replacing_a_tree_in_use(os.path.join(store["images"], wanted))
    if check:
        return Result(changed=True, data={"id": wanted, "path": None})
    if not os.path.isfile(tarball):
        raise PreconditionFailed(f"image tarball {tarball} does not exist on this node; upload it first", "tarball_missing")
    os.makedirs(store["images"], mode=0o755, exist_ok=True)
    refuse_unsafe_store(store["images"])
    with exclusive_lock(os.path.join(store["images"], LOCK_NAME)):
        if resolve(ref) is not None:  # another unpack of it finished while we waited
            return Result(changed=False, data={"id": wanted, "path": resolve(ref)})
        remove_leftovers(store)
        target = os.path.join(store["images"], wanted)
        refuse_replacing_a_tree_in_use(target)
        verify_sha256(tarball, wanted)
        incoming = unpack_beside(store["images"], tarball)
        try:
            write_marker(incoming, wanted)
            if os.path.lexists(target):  # a tree of that name that is not that image
                remove_quietly(set_aside(target))
            os.rename(incoming, target)
            fsync_directory(store["images"])
        except BaseException:
            remove_quietly(incoming)
            raise
    return Result(changed=True, data={"id": wanted, "path": target})


def refuse_replacing_a_tree_in_use(target: str) -> None:
    """A tree at the image's name that is not that image (its marker lost or damaged) is
    replaced, unless an overlay still has it as a lower layer: a desktop runs on it."""
    users = overlays_using(target) if os.path.lexists(target) else []
    if users:
        shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
        raise PreconditionFailed(
            f"{target} is not a complete image (no valid {MARKER}) but is in use as an overlay lower layer by {shown}; "
            "stop those desktops, then push the image again",
            "image_in_use",
        )


def refuse_unsafe_store(images: str) -> None:
    if os.path.islink(images):
        raise PreconditionFailed(f"{images} is a symlink; the image store must be a real directory", "store_is_symlink")
    if os.path.lexists(images) and not os.path.isdir(images):
        raise PreconditionFailed(f"{images} exists and is not a directory", "store_not_a_directory")


class exclusive_lock:
    """flock on a file in the store: two unpacks or removals there must not interleave."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TemporaryFailure(f"another image unpack or removal holds {self.path}; try again when it is done", "image_busy") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def remove_leftovers(store: dict) -> None:
    """Trees left by an unpack or a removal that crashed: in the store, and beside the legacy
    tree (a removal sets it aside there); only called with the lock held."""
    images = store["images"]
    for name in os.listdir(images):
        if name.startswith(INCOMING_PREFIX) or name.startswith(OLD_PREFIX):
            remove_leftover(os.path.join(images, name))
    parent, base = os.path.split(store["legacy"])
    legacy_aside = re.compile(re.escape(f"{OLD_PREFIX}{base}-") + "[0-9a-f]{8}")
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        if legacy_aside.fullmatch(name):
            remove_leftover(os.path.join(parent, name))


def remove_leftover(path: str) -> None:
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


def unpack_beside(images: str, tarball: str) -> str:
    incoming = os.path.join(images, INCOMING_PREFIX + secrets.token_hex(4))
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


def set_aside(tree: str) -> str:
    """Rename a tree out of the way (in its own directory), to be deleted: nothing can start
    on it any more from this moment."""
    parent, base = os.path.split(tree)
    aside = os.path.join(parent, f"{OLD_PREFIX}{base}-{secrets.token_hex(4)}")
    os.rename(tree, aside)
    fsync_directory(parent)
    return aside


# --- remove -------------------------------------------------------------------------------


def remove(params: dict, check: bool) -> Result:
    """Delete image `id` from this node (its store tree, and the legacy tree if it holds it).
    Refused while an overlay uses it: a desktop runs on it."""
    store, wanted = params["store"], params["id"]
    trees = trees_of(store, wanted)
    users = [user for tree in trees for user in overlays_using(tree)]
    if users:
        shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
        raise PreconditionFailed(f"image {wanted[:12]} is in use as an overlay lower layer by {shown}", "image_in_use")
    if check or not trees:
        return Result(changed=bool(trees), data={"id": wanted, "removed": trees})
    os.makedirs(store["images"], mode=0o755, exist_ok=True)
    with exclusive_lock(os.path.join(store["images"], LOCK_NAME)):
        trees = trees_of(store, wanted)
        users = [user for tree in trees for user in overlays_using(tree)]
        if users:
            raise PreconditionFailed(f"image {wanted[:12]} came into use while it was being removed", "image_in_use")
        remove_leftovers(store)
        for tree in trees:
            remove_tree(set_aside(tree))
    return Result(changed=True, data={"id": wanted, "removed": trees})


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
    "status": Action(run=status, params=STORE_PARAM),
    "require": Action(run=require_held, params=REQUIRE_PARAMS),
    "ensure_unpacked": Action(run=ensure_unpacked, params=ENSURE_UNPACKED_PARAMS),
    "remove": Action(run=remove, params=REMOVE_PARAMS),
    "ensure_docker_base": Action(run=ensure_docker_base, params=ENSURE_DOCKER_BASE_PARAMS),
}
