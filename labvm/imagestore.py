"""The images of the whole cluster: which the admin host keeps, which each node holds, which
desktops run over which; and removing them (`labvm image list`, `image rm`, `image gc`).

An image is removed from a node only when no desktop recorded there uses it and no overlay
there has it as a lower layer (the node helper checks that again under its lock). Nothing is
removed implicitly: a push only adds, and `image gc` is the one command that clears nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ImageError, LabvmError, NodeError
from .images import SHORT, CatalogImage, catalog, catalog_entry, find_image, remove_from_catalog
from .remote.helpers import HelperBundle
from .remote.pool import run_on_nodes
from .remote.recipes import image_status, remove_image
from .remote.session import NodeSession


class ImageInUse(ImageError):
    """{msg}"""


@dataclass
class ClusterImage:
    id: str
    catalog: CatalogImage | None = None
    nodes: list[str] = field(default_factory=list)
    desktops: list[str] = field(default_factory=list)
    node_info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        info = self.catalog.as_dict() if self.catalog is not None else {
            "kind": self.node_info.get("desktop"), "built": self.node_info.get("built"), "packages": None,
            "size": None, "path": None}
        return {**info, "id": self.id, "on_admin_host": self.catalog is not None, "nodes": self.nodes,
                "desktops": self.desktops}


@dataclass
class Holdings:
    """What every node answered: its image trees (image status), or why it did not."""

    held: dict[str, list[dict]]
    unreachable: dict[str, str]


def holdings(home, nodes=None) -> Holdings:
    nodes = list(home.config.nodes if nodes is None else nodes)
    bundle = HelperBundle.from_package()

    def status(node):
        s = NodeSession(home, node, bundle)
        try:
            return s.run(image_status(home.config))["images"]
        finally:
            s.close()

    outcomes = run_on_nodes(nodes, status, timeout=120)
    return Holdings({o.node: o.value for o in outcomes if o.ok}, {o.node: str(o.error) for o in outcomes if not o.ok})


def cluster_images(home, db, found: Holdings) -> list[ClusterImage]:
    """Every image the admin host or a node has, or a desktop records: oldest build first."""
    images: dict[str, ClusterImage] = {}
    for entry in catalog(home.images_dir):
        images[entry.id] = ClusterImage(entry.id, entry)
    for node, trees in sorted(found.held.items()):
        for tree in trees:
            image = images.setdefault(tree["id"], ClusterImage(tree["id"], node_info=tree))
            if node not in image.nodes:
                image.nodes.append(node)
    for image_id, users in db.images_in_use().items():
        images.setdefault(image_id, ClusterImage(image_id)).desktops.extend(users)
    return list(images.values())


def desktops_on(db, image: str) -> list[str]:
    return db.images_in_use().get(image, [])


def remove(home, wanted: str, dry_run: bool = False, say=lambda _m: None) -> dict:
    """Remove image `wanted` (an id or its prefix) from every node that holds it, then from the
    admin host. Refused, with nothing removed, while a desktop records it or a node has it in use."""
    with home.state() as db:
        image_id = _resolve(home, db, wanted)
        users = desktops_on(db, image_id)
    if users:
        raise ImageInUse(f"image {image_id[:SHORT]} is in use by {_names(users)}; rebase them onto another image "
                         "first (`labvm rebase USER --image ID`, or `labvm image roll ID`)")
    found = holdings(home)
    if found.unreachable:
        raise NodeError(node=", ".join(sorted(found.unreachable)),
                        msg=f"does not answer, so image {image_id[:SHORT]} cannot be removed everywhere; nothing was removed")
    where = sorted(node for node, trees in found.held.items() if image_id in {t["id"] for t in trees})
    busy = {node: t["in_use_by"] for node, trees in found.held.items() for t in trees if t["id"] == image_id and t["in_use_by"]}
    if busy:
        shown = "; ".join(f"{node}: {', '.join(points[:3])}" for node, points in sorted(busy.items()))
        raise ImageInUse(f"image {image_id[:SHORT]} is mounted as a lower layer ({shown}), by desktops labvm has no "
                         "record of; nothing was removed")
    plan = {"id": image_id, "nodes": where, "admin_host": catalog_entry(home.images_dir, image_id) is not None, "dry_run": dry_run}
    if dry_run:
        return plan
    bundle = HelperBundle.from_package()
    for name in where:
        s = NodeSession(home, home.config.node(name), bundle)
        try:
            s.run(remove_image(home.config, image_id))
        except LabvmError as exc:
            raise ImageError(f"{name}: removing image {image_id[:SHORT]} failed: {exc}") from None
        finally:
            s.close()
        say(f"{name}: image {image_id[:SHORT]} removed")
    entry = catalog_entry(home.images_dir, image_id)
    if entry is not None:
        remove_from_catalog(entry)
        say(f"admin host: image {image_id[:SHORT]} removed ({entry.path.name})")
    return plan


def gc(home, nodes=None, dry_run: bool = False, say=lambda _m: None) -> dict:
    """On each node, remove the images no desktop recorded on that node uses and no overlay
    there has mounted. The admin host's images stay (`image rm` removes those)."""
    targets = [home.config.node(n) for n in nodes] if nodes else list(home.config.nodes)
    found = holdings(home, targets)
    with home.state() as db:
        kept_by_node = db.images_by_node()
    # A desktop not adopted yet runs over the legacy tree of its node.
    legacy_nodes = {node for node, kept in kept_by_node.items() if None in kept}
    removed: dict[str, list[str]] = {}
    kept: dict[str, list[str]] = {}
    for node, trees in sorted(found.held.items()):
        for tree in trees:
            in_use = (tree["id"] in kept_by_node.get(node, set()) or bool(tree["in_use_by"])
                      or (tree["legacy"] and node in legacy_nodes))
            (kept if in_use else removed).setdefault(node, []).append(tree["id"])
    if not dry_run:
        bundle = HelperBundle.from_package()
        for node, ids in removed.items():
            s = NodeSession(home, home.config.node(node), bundle)
            try:
                for image_id in dict.fromkeys(ids):
                    s.run(remove_image(home.config, image_id))
                    say(f"{node}: image {image_id[:SHORT]} removed")
            finally:
                s.close()
    return {"removed": removed, "kept": kept, "unreachable": found.unreachable, "dry_run": dry_run}


def _resolve(home, db, wanted: str) -> str:
    """A full id from a prefix: the admin host's images, then those desktops record."""
    try:
        return find_image(home.images_dir, wanted).id
    except LabvmError:
        matches = sorted(i for i in db.images_in_use() if i.startswith(wanted))
        if len(matches) == 1:
            return matches[0]
        raise


def _names(users: list[str]) -> str:
    shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
    return f"{'the desktop' if len(users) == 1 else 'the desktops'} of {shown}"
