"""labvm image: the desktop image, built once and pushed to the nodes."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from . import images
from .admin import AdminHome
from .cli_kit import (
    _emit_json,
    audited,
    complete_nodes,
    json_option,
    out,
    say,
)
from .errors import NodeError, NotFound
from .text import safe


# -- desktop images ------------------------------------------------------------
@click.group()
def image():
    """The desktop rootfs (xfce_local): build it once, push it to every node."""


def _image_dir(home: AdminHome):
    return home.images_dir


def _latest_image(home: AdminHome):
    images = sorted(_image_dir(home).glob("labvm-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not images:
        raise NotFound(f"no desktop image in {_image_dir(home)}; build one with `labvm image build`")
    return images[-1]


@image.command("build")
@click.option("--desktop", type=click.Choice(["xfce", "minimal"]), default="xfce", show_default=True,
              help="xfce: XFCE4, TigerVNC, sudo, a locale and an SSH server. minimal: TigerVNC, twm and xterm (for tests).")
@click.option("--mirror", metavar="URL", help="Debian mirror (default: the one this host's apt uses).")
@click.option("--rebuild", is_flag=True, help="Build again even if a cached build matches.")
@click.option("--cache-dir", default=str(images.DEFAULT_CACHE_DIR), show_default=True, help="Where builds and downloaded packages are cached.")
@json_option
@click.pass_obj
@audited("desktop")
def image_build(home: AdminHome, desktop, mirror, rebuild, cache_dir, as_json):
    """Build the desktop rootfs with debootstrap (Debian bookworm) into a tarball with a checksum.

    The tarball keeps numeric owners, xattrs and ACLs. It lands in the images/
    directory beside the cluster file, where `labvm image push` finds it.
    """
    out_dir = _image_dir(home)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    progress = (lambda _m: None) if as_json else say
    info = images.build_image(desktop, out_dir, cache_dir=Path(cache_dir), mirror=mirror, rebuild=rebuild, progress=progress)
    if as_json:
        _emit_json(info.to_dict())
        return
    how = "cached build" if info.cached else f"built in {info.seconds:.0f}s"
    say(f"image {info.sha256[:12]} ({info.desktop}): {info.path} ({info.size / 2**20:.0f} MiB, {how})")


@image.command("push")
@click.argument("nodes", nargs=-1, shell_complete=complete_nodes)
@click.option("--image", "image_path", metavar="FILE", help="Image tarball (default: the newest `labvm image build`).")
@click.pass_obj
@audited()
def image_push(home: AdminHome, nodes, image_path):
    """Unpack the desktop image into xfce_local on NODES (default: all), in parallel.

    A node that already holds this image (same checksum) gets nothing. Each node
    also gets the tiny docker base image desktops are created from.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    path = Path(image_path) if image_path else _latest_image(home)
    sha = images.image_sha256(path)
    say(f"pushing image {sha[:12]}: {path.name}")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=out, transient=True) as bars:
        tasks = {}

        def progress(node, done, total):
            if node not in tasks:
                tasks[node] = bars.add_task(node, total=total)
            bars.update(tasks[node], completed=done)

        outcomes = images.push_image(home.config, path, sha, list(nodes) or None, progress=progress)
    failed = []
    for o in outcomes:
        if o.ok:
            r = o.value
            say(f"{o.node}: " + ("pushed" if r.unpacked else "already has it") + f" ({sha[:12]})")
        else:
            failed.append(o.node)
            out.print(Text.assemble((safe(o.node), "red"), ": ", safe(o.error)))
    if failed:
        raise NodeError(node=", ".join(failed), msg="image push failed")


COMMANDS = (image,)
