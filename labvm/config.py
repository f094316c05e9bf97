"""The cluster file, bkConfxml.xml: parsed with lxml, validated by the shipped XSD.

Errors name the file, the line and the element, and say what was expected.
The admin state (database, key, pinned host keys, SSH identity) lives in the
directory that holds the cluster file, so one path says everything.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lxml import etree

from .errors import BadInput, ConfigError, NotFound
from .fsutil import atomic_write

DEFAULT_CONFIG = Path("/etc/labvm/bkConfxml.xml")
CONFIG_ENV = "LABVM_CONFIG"

_SIZE_RE = re.compile(r"^([0-9]+)([kKmMgGtT]?)$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


_DURATION_RE = re.compile(r"^(?:[0-9]+[smhd])+$")
_DURATION_PART_RE = re.compile(r"([0-9]+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'168h', '30m', '45s', '1d12h' -> seconds."""
    compact = text.strip()
    if not _DURATION_RE.match(compact):
        raise BadInput(f"not a duration: {text!r} (expected a number with s, m, h or d, such as 168h or 30m)")
    return sum(int(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART_RE.findall(compact))


def parse_size(text: str) -> int:
    """'4g' -> bytes. Suffixes are powers of 1024, as docker reads them."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise BadInput(f"not a size: {text!r} (expected a number with an optional k, m, g or t suffix)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class Storage:
    mfs_master: str
    mfs_mount: str
    mfs_dir: str
    mfs_port: int = 9421
    mount_options: str = ""
    # Hard MooseFS quota on each member's tree, versions included. None: from the desktop's
    # disk size and the retention rule (member_quota_for).
    member_quota: int | None = None


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int = 22
    user: str = "root"
    data_dir: str = "/var/lib/labvm/data"
    docker_port_base: int = 20000
    docker_user_port_num: int = 2
    docker_port_slots: int = 50

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def https_port(self, vnc_port: int) -> int:
        """The HTTPS (noVNC) port of the desktop whose slot starts at vnc_port: one per slot,
        just past the slots' ranges, so it needs no reservation of its own."""
        slot = (vnc_port - self.docker_port_base) // self.docker_user_port_num
        return self.docker_port_base + self.docker_user_port_num * self.docker_port_slots + slot


@dataclass(frozen=True)
class VmDefaults:
    cpus: float = 2.0
    memory: int = 8 << 30
    shm: int = 1 << 30
    pids: int = 4096
    io_weight: int = 500
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    gpus: int = 0
    disk: int = 100 << 30


@dataclass(frozen=True)
class Retention:
    keep_last: int = 7
    keep_daily: int = 14
    keep_weekly: int = 8


def member_quota_for(cfg: "ClusterConfig", disk: int) -> int:
    """A member's hard quota on MooseFS: `<storage><member_quota>` where the cluster file sets
    one, else room for every version the retention rule keeps (MooseFS counts each in full:
    the backups its three rules keep and up to keep_last others) plus the synced upper and one
    version being made, each at most the desktop's disk."""
    if cfg.storage.member_quota is not None:
        return cfg.storage.member_quota
    kept = 2 * cfg.retention.keep_last + cfg.retention.keep_daily + cfg.retention.keep_weekly
    return disk * (kept + 2)


@dataclass(frozen=True)
class SyncSettings:
    syncTime: int = 5
    batch_max_files: int = 2000
    full_pass_hours: int = 24


@dataclass(frozen=True)
class Monitoring:
    # The old tool stopped a desktop after a week without use.
    idle_after: int = 168 * 3600
    # Of one CPU: a desktop below this, with idle GPUs, counts as unused.
    idle_cpu_percent: float = 5.0
    # Seconds `labvm status` waits for each node.
    status_timeout: float = 5.0


@dataclass(frozen=True)
class Network:
    # Host names, addresses or CIDR ranges desktops may not reach, besides the MooseFS master
    # and the nodes, which are always denied.
    deny: tuple[str, ...] = ()


VNC_LISTEN = ("published", "loopback", "off")


@dataclass(frozen=True)
class VncSettings:
    # Where a desktop's raw VNC port is published: the node's address (published), its
    # 127.0.0.1 only (loopback) or nowhere (off). noVNC over HTTPS is served in every case.
    listen: str = "published"


@dataclass(frozen=True)
class MemberSettings:
    # Whether a member may move their own desktop (`ssh lab@ADMIN switch NODE`).
    may_switch: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    storage: Storage
    xfce_local: str
    nodes: tuple[Node, ...] = ()
    vm_defaults: VmDefaults = field(default_factory=VmDefaults)
    retention: Retention = field(default_factory=Retention)
    sync: SyncSettings = field(default_factory=SyncSettings)
    monitoring: Monitoring = field(default_factory=Monitoring)
    network: Network = field(default_factory=Network)
    members: MemberSettings = field(default_factory=MemberSettings)
    vnc: VncSettings = field(default_factory=VncSettings)

    @property
    def home(self) -> Path:
        """The admin state directory: the one holding the cluster file."""
        return self.path.parent

    @property
    def images_local(self) -> str:
        """Where each node keeps its desktop images side by side, one tree per image id:
        `images` beside xfce_local (which held the one image of older labvm versions)."""
        return posixpath.join(posixpath.dirname(self.xfce_local.rstrip("/")) or "/", "images")

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes) or "none configured"
        raise NotFound(f"unknown node {name!r} (known: {known})")

    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]


def resolve_config_path(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return DEFAULT_CONFIG


XS = "{http://www.w3.org/2001/XMLSchema}"


def _schema_doc():
    return etree.fromstring(resources.files("labvm").joinpath("schema/bkConfxml.xsd").read_bytes())


def _schema() -> etree.XMLSchema:
    return etree.XMLSchema(_schema_doc())


def _pattern_meanings() -> dict[str, str]:
    """Pattern -> the words its type's documentation gives, so errors say what is expected."""
    meanings = {}
    for simple in _schema_doc().iter(f"{XS}simpleType"):
        doc = simple.find(f"{XS}annotation/{XS}documentation")
        pattern = simple.find(f"{XS}restriction/{XS}pattern")
        if doc is not None and pattern is not None:
            meanings[pattern.get("value")] = doc.text.strip()
    return meanings


def _element_path(tree, line: int) -> str:
    """The path of the element that starts at `line`, for messages."""
    for element in tree.iter():
        if isinstance(element.tag, str) and element.sourceline == line:
            return tree.getroottree().getpath(element)
    return ""


def _tidy_schema_message(message: str) -> str:
    # libxml2 quotes the XSD facet machinery; users need the element and the rule in words.
    # A namespaced name reads '{http://...}name': only that namespace goes, never the braces of
    # a pattern's quantifier ({0,31}) or of an enumeration's set ({'1'}).
    message = re.sub(r"'\{[A-Za-z][A-Za-z0-9+.-]*:[^}']*\}", "'", message)
    message = re.sub(r"\[facet '[a-zA-Z]+'\] ", "", message)
    meanings = _pattern_meanings()

    def explain(match: re.Match) -> str:
        pattern = match.group(1)
        return f"is not valid; expected {meanings[pattern]}" if pattern in meanings else match.group(0)

    message = re.sub(r"is not accepted by the pattern '(.*)'", explain, message)
    return message.rstrip(".")


def load_tree(path: Path):
    if not path.exists():
        raise NotFound(f"{path}: no cluster file here; run `labvm init` or pass --config / set {CONFIG_ENV}")
    parser = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True)
    try:
        tree = etree.parse(str(path), parser)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or (exc.position[0] if exc.position else "?")
        raise ConfigError(f"{path}:{line}: not well-formed XML: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if tree.docinfo.doctype:
        # Entities could pull other files into the configuration; nothing here needs them.
        raise ConfigError(f"{path}:1: a DOCTYPE declaration is not allowed in the cluster file")
    return tree


def validate_tree(path: Path, tree) -> None:
    schema = _schema()
    if schema.validate(tree):
        return
    err = schema.error_log[0]
    where = _element_path(tree.getroot(), err.line)
    element = f" element {where}" if where else ""
    raise ConfigError(f"{path}:{err.line}:{element}: {_tidy_schema_message(err.message)}")


def _text(parent, tag: str, default=None):
    element = parent.find(tag)
    if element is None or element.text is None:
        return default
    return element.text.strip()


def _typed(parent, tag, default, convert):
    value = _text(parent, tag)
    return default if value is None else convert(value)


def _parse_storage(root) -> Storage:
    el = root.find("storage")
    return Storage(
        mfs_master=_text(el, "mfs_master"),
        mfs_port=_typed(el, "mfs_port", 9421, int),
        mfs_mount=_text(el, "mfs_mount"),
        mfs_dir=_text(el, "mfs_dir"),
        mount_options=_text(el, "mount_options", ""),
        member_quota=_typed(el, "member_quota", None, parse_size),
    )


def _parse_node(el) -> Node:
    base = Node(name=el.get("name"), host=_text(el, "host"))
    return Node(
        name=base.name,
        host=base.host,
        port=_typed(el, "port", base.port, int),
        user=_text(el, "user", base.user),
        data_dir=_text(el, "data_dir", base.data_dir),
        docker_port_base=_typed(el, "docker_port_base", base.docker_port_base, int),
        docker_user_port_num=_typed(el, "docker_user_port_num", base.docker_user_port_num, int),
        docker_port_slots=_typed(el, "docker_port_slots", base.docker_port_slots, int),
    )


def _parse_defaults(root) -> VmDefaults:
    d = VmDefaults()
    el = root.find("vm_defaults")
    if el is None:
        return d
    return VmDefaults(
        cpus=_typed(el, "cpus", d.cpus, float),
        memory=_typed(el, "memory", d.memory, parse_size),
        shm=_typed(el, "shm", d.shm, parse_size),
        pids=_typed(el, "pids", d.pids, int),
        io_weight=_typed(el, "io_weight", d.io_weight, int),
        io_read_bps=_typed(el, "io_read_bps", d.io_read_bps, parse_size),
        io_write_bps=_typed(el, "io_write_bps", d.io_write_bps, parse_size),
        gpus=_typed(el, "gpus", d.gpus, int),
        disk=_typed(el, "disk", d.disk, parse_size),
    )


def _parse_retention(root) -> Retention:
    d = Retention()
    el = root.find("retention")
    if el is None:
        return d
    return Retention(
        keep_last=_typed(el, "keep_last", d.keep_last, int),
        keep_daily=_typed(el, "keep_daily", d.keep_daily, int),
        keep_weekly=_typed(el, "keep_weekly", d.keep_weekly, int),
    )


def _parse_sync(root) -> SyncSettings:
    d = SyncSettings()
    el = root.find("sync")
    if el is None:
        return d
    return SyncSettings(
        syncTime=_typed(el, "syncTime", d.syncTime, int),
        batch_max_files=_typed(el, "batch_max_files", d.batch_max_files, int),
        full_pass_hours=_typed(el, "full_pass_hours", d.full_pass_hours, int),
    )


def _parse_network(root) -> Network:
    el = root.find("network")
    if el is None:
        return Network()
    return Network(deny=tuple((d.text or "").strip() for d in el.findall("deny")))


def _parse_members(root) -> MemberSettings:
    el = root.find("members")
    if el is None:
        return MemberSettings()
    # xs:boolean: true, false, 1 or 0 (the schema has checked it).
    return MemberSettings(may_switch=_typed(el, "may_switch", False, lambda text: text.strip() in ("true", "1")))


def _parse_monitoring(root) -> Monitoring:
    d = Monitoring()
    el = root.find("monitoring")
    if el is None:
        return d
    return Monitoring(
        idle_after=_typed(el, "idle_after", d.idle_after, parse_duration),
        idle_cpu_percent=_typed(el, "idle_cpu_percent", d.idle_cpu_percent, float),
        status_timeout=_typed(el, "status_timeout", d.status_timeout, float),
    )


def _node_line(tree, node: Node) -> int:
    return next(e.sourceline for e in tree.iter("node") if e.get("name") == node.name)


def _check_unique_addresses(path: Path, nodes: tuple[Node, ...], tree) -> None:
    """Two nodes at one SSH address would be one machine counted twice: its GPUs, ports and
    desktops handed out twice (`labvm node add` refuses it too)."""
    seen: dict[tuple[str, int], Node] = {}
    for node in nodes:
        address = (node.host.lower(), node.port)
        if address in seen:
            raise ConfigError(
                f"{path}:{_node_line(tree, node)}: element /labvm/nodes/node[@name='{node.name}']: "
                f"{node.host}:{node.port} is already node {seen[address].name!r}; each node needs its own host"
            )
        seen[address] = node


def _parse_vnc(root) -> VncSettings:
    el = root.find("vnc")
    listen = el.find("listen") if el is not None else None
    return VncSettings() if listen is None else VncSettings(listen=(listen.text or "").strip())


def _check_port_ranges(path: Path, nodes: tuple[Node, ...], tree) -> None:
    for node in nodes:
        # The slots, then one HTTPS port per slot (Node.https_port).
        last = node.docker_port_base + (node.docker_user_port_num + 1) * node.docker_port_slots - 1
        if last > 65535:
            line = _node_line(tree, node)
            raise ConfigError(
                f"{path}:{line}: element /labvm/nodes/node[@name='{node.name}']: port range "
                f"{node.docker_port_base}-{last} goes past 65535; lower docker_port_base or docker_port_slots"
            )


def parse_config(path: Path, tree=None) -> ClusterConfig:
    tree = tree if tree is not None else load_tree(path)
    validate_tree(path, tree)
    root = tree.getroot()
    nodes = tuple(_parse_node(el) for el in root.find("nodes").findall("node"))
    _check_unique_addresses(path, nodes, tree)
    _check_port_ranges(path, nodes, tree)
    return ClusterConfig(
        path=path,
        storage=_parse_storage(root),
        xfce_local=_text(root, "xfce_local"),
        nodes=nodes,
        vm_defaults=_parse_defaults(root),
        retention=_parse_retention(root),
        sync=_parse_sync(root),
        monitoring=_parse_monitoring(root),
        network=_parse_network(root),
        members=_parse_members(root),
        vnc=_parse_vnc(root),
    )


def load_config(explicit: str | os.PathLike | None = None) -> ClusterConfig:
    return parse_config(resolve_config_path(explicit))


# -- editing the cluster file (labvm node add / rm) -------------------------
_NODE_FIELDS = ("host", "port", "user", "data_dir", "docker_port_base", "docker_user_port_num", "docker_port_slots")


def _node_element(node: Node, indent: str):
    el = etree.Element("node", name=node.name)
    el.text = "\n" + indent + "  "
    for i, name in enumerate(_NODE_FIELDS):
        child = etree.SubElement(el, name)
        child.text = str(getattr(node, name))
        child.tail = "\n" + indent + ("  " if i < len(_NODE_FIELDS) - 1 else "")
    return el


def _save_tree(path: Path, tree) -> None:
    validate_tree(path, tree)
    mode = path.stat().st_mode & 0o777
    data = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
    atomic_write(path, data + b"\n", mode=mode)


def _append_node(tree, node: Node) -> None:
    nodes_el = tree.getroot().find("nodes")
    children = list(nodes_el)
    indent = "    "
    new = _node_element(node, indent)
    if children:
        last = children[-1]
        new.tail = last.tail
        last.tail = "\n" + indent
    else:
        nodes_el.text = "\n" + indent
        new.tail = "\n  "
    nodes_el.append(new)


def check_new_node(path: Path, node: Node) -> None:
    """Hold a node given on the command line to the schema, before any network traffic."""
    tree = load_tree(path)
    if any(el.get("name") == node.name for el in tree.getroot().iter("node")):
        raise BadInput(f"node {node.name!r} already exists in {path}; see `labvm node list`")
    _append_node(tree, node)
    schema = _schema()
    if not schema.validate(tree):
        raise BadInput(f"node {node.name!r}: {_tidy_schema_message(schema.error_log[0].message)}")


def add_node_to_file(path: Path, node: Node) -> None:
    """Append a <node> to the cluster file, keeping its comments and layout."""
    check_new_node(path, node)
    tree = load_tree(path)
    _append_node(tree, node)
    _save_tree(path, tree)


def remove_node_from_file(path: Path, name: str) -> None:
    tree = load_tree(path)
    nodes_el = tree.getroot().find("nodes")
    for el in nodes_el.findall("node"):
        if el.get("name") == name:
            previous = el.getprevious()
            if previous is not None:
                previous.tail = el.tail if el.getnext() is None else previous.tail
            else:
                nodes_el.text = el.tail if el.getnext() is None else nodes_el.text
            nodes_el.remove(el)
            _save_tree(path, tree)
            return
    raise NotFound(f"unknown node {name!r} in {path}")
