"""labvm node: the GPU servers."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from .admin import AdminHome
from .cli_kit import (
    FINGERPRINT_HINT,
    _confirm,
    _emit_json,
    _gib,
    audited,
    complete_nodes,
    json_option,
    out,
    say,
)
from .config import Node
from .errors import Aborted, NodeError
from .nodes import add_node, check_nodes, node_problems, node_rows, rekey_node, remove_node
from .text import cell, safe


# -- nodes -------------------------------------------------------------------
@click.group()
def node():
    """GPU servers: add, list and check them."""


@node.command("add")
@click.argument("name")
@click.argument("host")
@click.option("--port", default=22, show_default=True, type=click.IntRange(1, 65535), help="SSH port.")
@click.option("--user", "ssh_user", default="root", show_default=True, help="SSH login (not root: needs passwordless sudo).")
@click.option("--data-dir", default="/var/lib/labvm/data", show_default=True, help="Node-local directory for desktops' local layers.")
@click.option("--fingerprint", metavar="SHA256:...", help="Expected host key fingerprint; pins without asking if it matches.")
@click.option("--yes", "-y", is_flag=True, help="Pin the host key shown without asking (trust on first use).")
@click.pass_obj
@audited("name")
def node_add(home: AdminHome, name, host, port, ssh_user, data_dir, fingerprint, yes):
    """Add node NAME reachable at HOST over SSH.

    labvm fetches the node's SSH host key, shows its fingerprint and pins it
    (compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the
    node). It then logs in, installs its helpers, and only then writes the node
    into the cluster file. A changed host key is refused from then on.
    """
    new = Node(name=name, host=host, port=port, user=ssh_user, data_dir=data_dir)
    decision = add_node(home.config, new, expected_fingerprint=fingerprint, confirm=_confirm(yes, FINGERPRINT_HINT))
    say(f"added node {name} ({ssh_user}@{host}:{port}), host key {decision.key_type} {decision.fingerprint} pinned")


@node.command("list")
@json_option
@click.pass_obj
def node_list(home: AdminHome, as_json):
    """List the nodes in the cluster file, with their pinned host keys."""
    rows = node_rows(home.config)
    if as_json:
        _emit_json(rows)
        return
    table = Table("node", "address", "data dir", "ports", "host key")
    for r in rows:
        table.add_row(cell(r["name"]), cell(f"{r['user']}@{r['host']}:{r['port']}"), cell(r["data_dir"]), cell(r["ports"]),
                      cell(r["host_key"]) if r["host_key"] else Text("not pinned", style="red"))
    out.print(table)


@node.command("check")
@click.argument("names", nargs=-1, shell_complete=complete_nodes)
@click.option("--no-mount", is_flag=True,
              help="Change nothing: don't mount MooseFS or add the desktop network rules; only report.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for each node.")
@json_option
@click.pass_obj
def node_check(home: AdminHome, names, no_mount, timeout, as_json):
    """Probe NAMES (default: every node) in parallel.

    Reports kernel, overlayfs and FUSE support, the docker engine, the
    MooseFS client (and mounts MooseFS unless --no-mount), rsync, python3,
    GPUs from nvidia-smi, CPUs, memory and disk, and the packet filter that
    keeps desktops off MooseFS, the nodes and each other (added unless
    --no-mount; every desktop start adds it too). An unreachable node is
    reported on its own row. Exits 7 if any node has a problem.
    """
    from .desktops import Desktops

    cfg = home.config
    outcomes = check_nodes(cfg, list(names) or None, mount_mfs=not no_mount, timeout=timeout)
    with home.state() as db:
        recorded = Desktops(home).list(db)
    images = {o.node: {d.user: d.image for d in recorded if d.node == o.node} for o in outcomes}
    problems = {o.node: node_problems(o, images[o.node]) for o in outcomes}
    if as_json:
        _emit_json([
            {"node": o.node, "ok": not problems[o.node], "reachable": o.ok, "error": o.error,
             "problems": problems[o.node], "seconds": round(o.seconds, 3), "facts": o.value,
             "desktop_images": images[o.node]}
            for o in outcomes
        ])
    else:
        out.print(_check_table(outcomes, problems))
        for o in outcomes:
            if o.ok:
                say(_images_line(o.node, o.value.get("images") or [], images[o.node]))
        for o in outcomes:
            for problem in problems[o.node]:
                out.print(Text.assemble((safe(o.node), "red"), ": ", safe(problem)))
    failed = [node for node, found in problems.items() if found]
    if failed:
        raise NodeError(node=", ".join(failed), msg="node check found problems (listed above)")


def _images_line(node: str, held: list[dict], desktops: dict[str, str | None]) -> str:
    """NODE images: ID (users), ID (unused), ...: what the node holds and who runs over it."""
    shown = []
    for image_id in dict.fromkeys(image["id"] for image in held):
        users = sorted(user for user, image in desktops.items() if image == image_id)
        shown.append(f"{image_id[:12]} ({', '.join(users) or 'unused'})")
    return f"{node} images: {', '.join(shown) or 'none'}"


def _check_table(outcomes, problems: dict[str, list[str]]) -> Table:
    table = Table("node", "status", "kernel", "docker", "MooseFS", "GPUs", "CPUs", "memory", "disk", title="labvm node check")
    for o in outcomes:
        if not o.ok:
            status = Text("timeout" if o.error_kind == "timeout" else "unreachable", style="red")
            table.add_row(cell(o.node), status, *[""] * 7)
            continue
        f = o.value
        mfs = f.get("mfs") or {}
        mem = f.get("memory") or {}
        disk = f.get("disk") or {}
        gpus = f.get("gpus") or []
        table.add_row(
            cell(o.node),
            Text("problems", style="yellow") if problems[o.node] else Text("ok", style="green"),
            cell(f["kernel"]["release"]),
            cell(f["docker"]["version"]) if f["docker"].get("ok") else Text("down", style="red"),
            cell(f"{_gib(mfs.get('free_mib'))} free") if mfs.get("mounted") else Text("not mounted", style="red"),
            Text("\n").join(cell(f"{g['index']} {g['name']} {g['uuid']}") for g in gpus) if gpus else "none",
            cell(f["cpus"]["count"]),
            cell(f"{_gib(mem.get('available_mib'))}/{_gib(mem.get('total_mib'))}"),
            cell(f"{_gib(disk.get('free_mib'))} free") if disk else "?",
        )
    return table


@node.command("rm")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@click.pass_obj
@audited("name")
def node_rm(home: AdminHome, name, yes):
    """Remove node NAME from the cluster file and forget its host key."""
    cfg = home.config
    cfg.node(name)
    with home.state() as db:
        on_node = db.desktops_on(name)
    if not _confirm(yes)(f"Remove node {name} from {cfg.path}?"):
        raise Aborted()
    remove_node(cfg, name, on_node)
    say(f"removed node {name}")


@node.command("rekey")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--fingerprint", metavar="SHA256:...", help="Expected new fingerprint; pins without asking if it matches.")
@click.option("--yes", "-y", is_flag=True, help="Pin the new key shown without asking.")
@click.pass_obj
@audited("name")
def node_rekey(home: AdminHome, name, fingerprint, yes):
    """Pin NAME's new host key after the node was reinstalled."""
    decision = rekey_node(home.config, name, expected_fingerprint=fingerprint, confirm=_confirm(yes, FINGERPRINT_HINT))
    say(f"{name}: host key {decision.key_type} {decision.fingerprint} pinned")


COMMANDS = (node,)
