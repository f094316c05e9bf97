"""The desktop images a node holds, side by side, each named by its content.

    <images>/<id>/          one unpacked image, id = the sha256 of its tarball: the lowest,
                            read-only layer of the overlay of every desktop on that image
    <images>/.incoming-*    an unpack in progress (a crashed one's is removed by the next)
    <images>/.old-*         an image on its way out (renamed away first, then deleted)
    <legacy>                xfce_local: the one image of a labvm that had a single image per
                            node. Desktops created then were adopted with the id it holds; it
                            is never replaced, and goes only when `labvm image gc` finds it unused.

An image is never changed in place: a push adds a tree beside the others, and a tree some
overlay uses as a lower layer is never removed (overlayfs forbids changing a lower under a live
mount). A helper that needs a desktop's image gets its reference (`image` param: id, store and
legacy path) and finds the tree here.
"""

import json
import os
import re

from _contract import BadRequest, PreconditionFailed, absolute_path, log
from _system import overlay_lowerdirs, read_mountinfo

MARKER = ".labvm-image.json"
ID_PATTERN = re.compile(r"[0-9a-f]{64}")
INCOMING_PREFIX = ".incoming-"
OLD_PREFIX = ".old-"
# Unpacking into a shallow path would put a system directory at risk; real ones are deeper.
MIN_DEPTH = 2
# overlay's option string splits at these.
LAYER_FORBIDDEN = (",", ":", "\\")


def store_path(name: str, value) -> str:
    path = absolute_path(name, value)
    if len([part for part in path.split("/") if part]) < MIN_DEPTH:
        raise BadRequest(f"param {name!r} must be at least {MIN_DEPTH} directories deep, got {path!r}", "bad_param")
    if any(char in path for char in LAYER_FORBIDDEN):
        raise BadRequest(f"param {name!r} must not contain ',', ':' or '\\': overlay options would split it", "bad_param")
    return path


def image_id(name: str, value) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadRequest(f"param {name!r} must be an image id (a sha256 in lowercase hex)", "bad_param")
    return value


def image_store(name: str, value) -> dict:
    """{"images": the store, "legacy": xfce_local}."""
    if not isinstance(value, dict) or set(value) != {"images", "legacy"}:
        raise BadRequest(f"param {name!r} must be an object with 'images' and 'legacy'", "bad_param")
    return {key: store_path(f"{name}.{key}", value[key]) for key in ("images", "legacy")}


def image_ref(name: str, value) -> dict:
    """{"id": the image's id, "images": the store, "legacy": xfce_local}: one image, found here."""
    if not isinstance(value, dict) or set(value) != {"id", "images", "legacy"}:
        raise BadRequest(f"param {name!r} must be an object with 'id', 'images' and 'legacy'", "bad_param")
    store = image_store(name, {"images": value["images"], "legacy": value["legacy"]})
    return {"id": image_id(f"{name}.id", value["id"]), **store}


def read_marker(tree: str) -> dict | None:
    """What the unpack recorded in the tree; None where there is no readable marker. The
    marker is a regular file written by the unpack: a symlink there is not followed."""
    try:
        fd = os.open(os.path.join(tree, MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as stream:
            marker = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log(f"ignoring unreadable marker in {tree}: {error}")
        return None
    return marker if isinstance(marker, dict) else None


def tree_id(tree: str) -> str | None:
    if os.path.islink(tree) or not os.path.isdir(tree):
        return None
    sha = (read_marker(tree) or {}).get("sha256")
    return sha if isinstance(sha, str) and ID_PATTERN.fullmatch(sha) else None


def resolve(ref: dict) -> str | None:
    """The tree of the image `ref` names on this node, or None where the node lacks it."""
    tree = os.path.join(ref["images"], ref["id"])
    if tree_id(tree) == ref["id"]:
        return tree
    if tree_id(ref["legacy"]) == ref["id"]:
        return ref["legacy"]
    return None


def require(ref: dict) -> str:
    tree = resolve(ref)
    if tree is None:
        raise PreconditionFailed(
            f"desktop image {ref['id'][:12]} is not on this node; `labvm image push {ref['id'][:12]}` sends it",
            "image_missing",
        )
    return tree


def is_same_or_under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def overlays_using(tree: str, entries=None) -> list[str]:
    """Mount points of overlays that have `tree`, or a directory in it, as a lower layer."""
    trees = {tree, os.path.realpath(tree)}
    users = []
    for entry in read_mountinfo() if entries is None else entries:
        if entry.fstype != "overlay":
            continue
        lowers = [os.path.normpath(lower) for lower in overlay_lowerdirs(entry.super_options)]
        if any(is_same_or_under(lower, each) for lower in lowers for each in trees):
            users.append(entry.mount_point)
    return users


def describe(tree: str, legacy: bool, entries) -> dict:
    marker = read_marker(tree) or {}
    return {
        "id": marker.get("sha256"),
        "path": tree,
        "legacy": legacy,
        "desktop": marker.get("desktop"),
        "built": marker.get("built"),
        "packages": marker.get("packages"),
        "unpacked_at": marker.get("unpacked_at"),
        "in_use_by": overlays_using(tree, entries),
    }


def held(store: dict) -> list[dict]:
    """Every image tree the node holds: the store's (by id), then the legacy tree, which may
    hold an image the store holds too."""
    entries = read_mountinfo()
    images = []
    try:
        names = sorted(os.listdir(store["images"]))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        tree = os.path.join(store["images"], name)
        if ID_PATTERN.fullmatch(name) and tree_id(tree) == name:
            images.append(describe(tree, False, entries))
    if tree_id(store["legacy"]) is not None:
        images.append(describe(store["legacy"], True, entries))
    return images


def trees_of(store: dict, wanted: str) -> list[str]:
    """The trees holding image `wanted` here: in the store, and the legacy tree if it is that image."""
    trees = [os.path.join(store["images"], wanted)]
    return [tree for tree in (*trees, store["legacy"]) if tree_id(tree) == wanted]
