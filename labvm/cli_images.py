"""labvm image: the desktop image, built once and pushed to the nodes."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from . import images
from .admin import AdminHome
from .cli_kit import (
    _emit_json,
    audited,
    complete_nodes,
    complete_users,
    dry_run_option,
    json_option,
    out,
    say,
    show_plan,
)
from .errors import ImageError, LabvmError, NodeError, NotFound
from .text import cell, safe


# -- desktop images ------------------------------------------------------------
@click.group()
def image():
    """Desktop images: build, push, list, remove, and move desktops onto one.

    An image is a Debian rootfs (XFCE or minimal) that every desktop's overlay
    has as its lowest layer. Its id is its tarball's sha256; commands take the
    id or its first 4+ hex digits. Nodes keep several images side by side, and
    each desktop records the one it runs over, so a new image changes no desktop
    until you move it there:

    \b
      labvm image build                 # prints the new image's id
      labvm image push ID               # to every node; desktops keep running
      labvm rebase alice --image ID     # one desktop (--dry-run shows conflicts)
      labvm image roll ID               # every desktop, one by one
      labvm image list                  # which node holds what, who uses what
      labvm image gc                    # free nodes of images nobody uses
    """


def _image_dir(home: AdminHome):
    return home.images_dir


def _latest_image(home: AdminHome):
    return images.find_image(_image_dir(home), None).path


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
    directory beside the cluster file, named by its date and id, beside the
    images built before; the one built (or asked for) last is the default of
    `labvm image push` and `labvm create`.
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
@click.argument("args", nargs=-1, metavar="[ID] [NODES]...", shell_complete=complete_nodes)
@click.pass_obj
@audited()
def image_push(home: AdminHome, args):
    """Send image ID (default: the newest) to NODES (default: all), in parallel.

    Each node unpacks it beside the images it holds: no desktop's image is
    touched, so desktops keep running. A node that holds it already gets
    nothing. Each node also gets the tiny docker base image desktops start
    from. Desktops move onto the new image with `labvm rebase` or
    `labvm image roll`.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    names = {node.name for node in home.config.nodes}
    wanted = args[0] if args and args[0] not in names else None
    nodes = list(args[1:] if wanted is not None else args)
    chosen = images.find_image(_image_dir(home), wanted)
    say(f"pushing image {chosen.short} ({chosen.desktop}, {chosen.size / 2**20:.0f} MiB): {chosen.path.name}")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=out,
                  transient=True) as bars:
        tasks = {}

        def progress(node, done, total):
            if node not in tasks:
                tasks[node] = bars.add_task(node, total=total)
            bars.update(tasks[node], completed=done)

        try:
            outcomes = images.push_image(home.config, chosen.path, chosen.id, nodes or None, progress=progress)
        except NotFound as exc:
            raise ImageError(str(exc)) from None
    failed = []
    for o in outcomes:
        if o.ok:
            say(f"{o.node}: " + ("image sent and unpacked" if o.value.uploaded else "holds it already") + f" ({chosen.short})")
        else:
            failed.append(o.node)
            out.print(Text.assemble((safe(o.node), "red"), ": ", safe(o.error)))
    if failed:
        raise ImageError(f"image push of {chosen.short} failed on {', '.join(failed)}")


@image.command("list")
@json_option
@click.pass_obj
def image_list(home: AdminHome, as_json):
    """Every image: id, kind, build date, package count, the nodes that hold
    it and the desktops that run over it.

    Images on the admin host come first, oldest build first; an image only a
    node or a desktop's record still has is listed too. A node that does not
    answer is named on stderr.
    """
    from .imagestore import cluster_images, holdings

    found = holdings(home)
    with home.state() as db:
        rows = cluster_images(home, db, found)
    for node, error in sorted(found.unreachable.items()):
        click.echo(f"labvm: {node} does not answer: {safe(error)}", err=True)
    if as_json:
        _emit_json([row.as_dict() for row in rows])
        return
    if not rows:
        say(f"no images; build one with `labvm image build` (they live in {_image_dir(home)})")
        return
    table = Table(box=None, pad_edge=False)
    for name in ("ID", "KIND", "BUILT", "PKGS", "NODES", "DESKTOPS"):
        table.add_column(name, no_wrap=name in ("ID", "BUILT"), overflow="fold")
    for row in rows:
        data = row.as_dict()
        table.add_row(cell(row.id[:images.SHORT] + ("" if row.catalog is not None else "*")), cell(data["kind"] or "?"),
                      cell((data["built"] or "?")[:10]), cell("?" if data["packages"] is None else data["packages"]),
                      cell(",".join(row.nodes) or "-"), cell(",".join(row.desktops) or "-"))
    out.print(table)
    if any(row.catalog is None for row in rows):
        say("* not on this admin host: it cannot be sent to another node")


@image.command("rm")
@click.argument("image_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@dry_run_option
@json_option
@click.pass_obj
@audited("image_id")
def image_rm(home: AdminHome, image_id, yes, dry_run, as_json):
    """Remove image ID from every node and from the admin host.

    Refused, with nothing removed, while any desktop runs over it or is
    recorded on it (the refusal names them: rebase them first), or while a
    node does not answer.
    """
    from .cli_kit import _confirm
    from .imagestore import remove

    plan = remove(home, image_id, dry_run=True)
    if dry_run:
        if as_json:
            _emit_json(plan)
        else:
            where = ", ".join(plan["nodes"]) or "no node"
            say(f"would remove image {plan['id'][:images.SHORT]} from {where}" + (" and the admin host" if plan["admin_host"] else ""))
        return
    if not _confirm(yes)(f"Remove image {plan['id'][:images.SHORT]} from {', '.join(plan['nodes']) or 'no node'}"
                         + (" and the admin host?" if plan["admin_host"] else "?")):
        raise click.exceptions.Exit(1)
    done = remove(home, image_id, say=(lambda _m: None) if as_json else say)
    if as_json:
        _emit_json({**done, "dry_run": False})


@image.command("gc")
@click.option("--node", "nodes", multiple=True, shell_complete=complete_nodes, help="Only this node (repeatable; default: all).")
@dry_run_option
@json_option
@click.pass_obj
@audited()
def image_gc(home: AdminHome, nodes, dry_run, as_json):
    """Remove from nodes the images no desktop there uses.

    An image stays on a node while a desktop recorded on that node runs over
    it or an overlay there has it mounted. The admin host keeps every image
    (`labvm image rm` removes one everywhere). Nothing else removes images
    from nodes: a push only adds.
    """
    from .imagestore import gc

    done = gc(home, list(nodes) or None, dry_run=dry_run, say=(lambda _m: None) if as_json or dry_run else say)
    if as_json:
        _emit_json(done)
    elif dry_run:
        for node, ids in sorted(done["removed"].items()):
            say(f"{node}: would remove " + ", ".join(i[:images.SHORT] for i in dict.fromkeys(ids)))
        if not done["removed"]:
            say("nothing to remove")
    elif not done["removed"]:
        say("nothing to remove: every image on the nodes is in use")
    for node, error in sorted(done["unreachable"].items()):
        click.echo(f"labvm: {node} does not answer: {safe(error)}", err=True)
    if done["unreachable"]:
        raise NodeError(node=", ".join(sorted(done["unreachable"])), msg="did not answer; its images were left alone")


@image.command("roll")
@click.argument("image_id", metavar="ID")
@click.option("--node", help="Only the desktops on this node.", shell_complete=complete_nodes)
@click.option("--parallel", "-k", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many desktops to rebase at once.")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@json_option
@click.pass_obj
@audited("image_id")
def image_roll(home: AdminHome, image_id, node, parallel, yes, as_json):
    """Rebase every desktop (on --node) onto image ID, one by one.

    Each desktop is rebased as by `labvm rebase USER --image ID` (a running one
    restarts on the new image) and reported. The roll stops at the first
    failure: that desktop is left as it was before its rebase (its rebase is
    undone), the desktops not begun stay on their image, and the command exits
    with the failing rebase's code. Desktops already on ID are skipped.
    """
    from .cli_kit import _confirm
    from .desktops import Desktops
    from .rebase import roll, roll_targets

    chosen = images.find_image(_image_dir(home), image_id)
    if node is not None:
        home.config.node(node)
    with home.state() as db:
        todo, _ = roll_targets(db, Desktops(home), chosen.id, node)
    if not todo:
        say(f"every desktop{' on ' + node if node else ''} runs over image {chosen.short} already")
        if as_json:
            _emit_json({"image": chosen.id, "done": [], "failed": None, "skipped": []})
        return
    if not _confirm(yes)(f"Rebase {len(todo)} desktop(s) onto image {chosen.short}: {', '.join(todo)}? Running ones restart."):
        raise click.exceptions.Exit(1)

    def report(outcome: dict) -> None:
        if as_json:
            return
        if outcome["ok"]:
            say(f"{outcome['user']}: on image {chosen.short} (v{outcome['version']}, {outcome['seconds']:.0f} s)")
        else:
            out.print(Text.assemble((safe(outcome["user"]), "red"), ": rebase failed and was undone: ", safe(outcome["error"])))

    result = roll(home, say, chosen.id, node, parallel, report)
    if as_json:
        _emit_json(result.as_dict())
    if result.failed is not None:
        left = len(todo) - len(result.done) - 1
        raise RollStopped(f"image roll stopped at {result.failed['user']}: {len(result.done)} rebased, "
                          f"{left} left on their image", result.failed.get("exit_code", 1))
    if not as_json:
        say(f"{len(result.done)} desktop(s) now run over image {chosen.short}")


class RollStopped(LabvmError):
    """{msg}"""

    def __init__(self, msg: str, code: int):
        super().__init__(msg=msg)
        self.exit_code = code


@click.command()
@click.argument("user", shell_complete=complete_users)
@click.option("--image", "image_id", metavar="ID", required=True, help="The image to move to (id or its first 4+ hex digits).")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@dry_run_option
@json_option
@click.pass_obj
@audited("user")
def rebase(home: AdminHome, user, image_id, yes, dry_run, as_json):
    """Move USER's desktop onto another image, keeping every file of theirs.

    \b
    The plan: send the image to the desktop's node; flush and stop the
    desktop if it runs; publish its files as a version over the old image;
    mount that version over the new image; start it again if it ran.

    \b
    Overlay semantics decide what the member sees:
      - files they added or changed stay (their copy wins);
      - files they deleted from the old image stay deleted;
      - files new in the new image appear; untouched files are the new image's.

    --dry-run names the conflicts before anything changes: paths the member
    changed that the new image changes too (with a word on the package
    database, /var/lib/dpkg/status, when they installed packages). The
    version over the old image and the old image are kept: `labvm rebase USER
    --image OLD` or `labvm restore USER N` goes back. A failure undoes the
    rebase: the desktop runs over its old image again.
    """
    from .cli_kit import _confirm
    from .rebase import rebase as run_rebase

    if dry_run:
        show_plan(run_rebase(home, lambda _m: None, user, image_id, dry_run=True), as_json)
        return
    if not yes and sys.stdin.isatty():
        show_plan(run_rebase(home, lambda _m: None, user, image_id, dry_run=True), False)
    if not _confirm(yes)(f"Rebase {user}'s desktop onto image {image_id}? A running desktop restarts."):
        raise click.exceptions.Exit(1)
    data = run_rebase(home, (lambda _m: None) if as_json else say, user, image_id)
    if as_json:
        _emit_json(data)
        return
    say(f"{user}'s desktop runs over image {data['image'][:images.SHORT]} now (version {data['version']}); "
        f"back with `labvm rebase {user} --image {(data['previous_image'] or '?')[:images.SHORT]}`")


COMMANDS = (image, rebase)
