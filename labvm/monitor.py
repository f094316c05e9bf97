"""Monitoring: every node's and desktop's figures at once, for `labvm status`, `top` and `idle`.

Each node is sampled by its `metrics` helper, all nodes in parallel, each within a timeout: a
slow or dead node becomes a row saying so, never a wait. The samples are joined with the state
database (which desktop runs where, with which GPUs and ports) into one document, the one
`labvm status --json` prints; schema/status.schema.json describes it. The tables and lines of
labvm/view.py are drawn from that same document, so what a person reads and what a script
parses cannot disagree.

Idle tracking: every sample of a running desktop is recorded in `desktop_activity`. A desktop
is idle once nothing was seen busy (CPU over the threshold, a GPU busy or holding a process of
it) for longer than <monitoring><idle_after>. A desktop seen for the first time, or again after
a restart or a gap in observation longer than idle_after, counts as busy at that moment: labvm
never stops what it has not watched.

Usage samples: each `labvm status` also records every node's CPU and memory and each GPU's
use and memory in `usage_samples`, kept 48 hours, for the graphs of `labvm status --html`.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from .admin import AdminHome
from .config import ClusterConfig, Monitoring, Node
from .errors import HelperCrashed, HelperFailed, NodeError, StateError
from .remote.connection import NodeConnection
from .remote.helpers import ENTRY, HelperBundle, HelperRunner, parse_reply
from .remote.pool import NodeOutcome, run_on_nodes
from .remote.recipes import image_store
from .state import StateDB

SCHEMA_ID = "labvm.status/1"
SAMPLE_INTERVAL_S = 0.5

Say = Callable[[str], None]

NODE_FIGURES = ("cpu_percent", "cpus", "load", "memory", "swap", "disk", "mfs", "gpus", "gpu_error", "docker_error")
# What status shows of a node beyond its figures: the ids of the images it holds.
DESKTOP_FIGURES = ("container", "started_at", "uptime_s", "cpu_percent", "memory", "blkio", "net", "gpu_memory",
                   "gpu_processes", "sync", "last_version")
UNKNOWN_FIGURES = {
    "container": None, "started_at": None, "uptime_s": None, "cpu_percent": None,
    "memory": {"used": None, "limit": None}, "blkio": {"read": None, "write": None}, "net": {"rx": None, "tx": None},
    "gpu_memory": None, "gpu_processes": None, "sync": None, "last_version": None,
}


def disk_entry(cfg: ClusterConfig, desktop, measured: dict | None) -> dict:
    """Size from the record (the default for desktops made before disks had sizes), or the
    image's where it is larger; use as the node measured it."""
    size = desktop.limits.get("disk") or cfg.vm_defaults.disk
    measured = measured or {}
    if isinstance(measured.get("size"), int):
        size = max(size, measured["size"])
    return {"size": size, "used": measured.get("used"), "allocated": measured.get("allocated")}


def status_schema() -> dict:
    """The JSON schema of the status document, shipped beside the cluster file's XSD."""
    return json.loads(resources.files("labvm").joinpath("schema/status.schema.json").read_text())


# -- sampling the nodes ----------------------------------------------------------------------
# Runs the helper only if this bundle is installed, else exits NOT_INSTALLED without output.
# Asking first would cost one more SSH exec per node and status call, a good part of the time
# status takes; the bundle directory and helper name arrive as arguments, never in the script.
RUN_IF_INSTALLED = 'test -f "$1/.complete" || exit 97; exec python3 "$1/$2" "$3"'
NOT_INSTALLED = 97


class MetricsSession:
    """One node's SSH connection, and the metrics helper run over it."""

    def __init__(self, home: AdminHome, node: Node, bundle: HelperBundle, timeout: float):
        self.node = node
        self.bundle = bundle
        self.conn = NodeConnection(node, home.home, connect_timeout=max(1.0, timeout))
        self.runner = HelperRunner(self.conn, bundle)

    def sample(self, params: dict, timeout: float) -> dict:
        request = json.dumps({"action": "sample", "params": params, "check": False})
        argv = self.conn.as_root + ["sh", "-c", RUN_IF_INSTALLED, "sh", self.bundle.remote_dir, ENTRY, "metrics"]
        result = self.conn.run(argv, stdin=request, timeout=timeout)
        if result.exited == NOT_INSTALLED and not result.stdout:
            self.runner.ensure_installed()
            result = self.conn.run(argv, stdin=request, timeout=timeout)
        return parse_reply(self.node.name, "metrics", "sample", result.exited, result.stdout, result.stderr)["data"]


class NodeSessions:
    """One SSH connection per node, kept across samples (labvm top) and closed at the end.

    A node that failed or timed out loses its connection: closing it also ends a call still
    stuck on it, and the next sample connects afresh.
    """

    def __init__(self, home: AdminHome, timeout: float):
        self.home = home
        self.timeout = timeout
        self.bundle = HelperBundle.from_package()
        self._sessions: dict[str, MetricsSession] = {}
        self._lock = threading.Lock()

    def sample(self, node: Node, users: list[str]) -> dict:
        session = self._session(node)
        params = {
            "data_dir": node.data_dir,
            "mfs_mount": self.home.config.storage.mfs_mount,
            "interval_s": SAMPLE_INTERVAL_S,
            "users": users,
            "image_store": image_store(self.home.config),
        }
        try:
            return session.sample(params, self.timeout)
        except (HelperFailed, HelperCrashed):
            raise  # the helper answered: the connection itself is fine
        except BaseException:
            self.drop(node.name, session)
            raise

    def _session(self, node: Node) -> MetricsSession:
        with self._lock:
            session = self._sessions.get(node.name)
            if session is None:
                session = self._sessions[node.name] = MetricsSession(self.home, node, self.bundle, self.timeout)
            return session

    def drop(self, name: str, session: MetricsSession | None = None) -> None:
        with self._lock:
            current = self._sessions.get(name)
            if current is None or (session is not None and current is not session):
                return
            del self._sessions[name]
        current.conn.close()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gather(sessions: NodeSessions, nodes: list[Node], users_by_node: dict[str, list[str]]) -> list[NodeOutcome[dict]]:
    """Sample every node in parallel; a node past the timeout is an outcome with an error."""
    outcomes = run_on_nodes(nodes, lambda n: sessions.sample(n, users_by_node.get(n.name, [])), timeout=sessions.timeout)
    for outcome in outcomes:
        if outcome.error_kind == "timeout":
            sessions.drop(outcome.node)
    return outcomes


# -- idle tracking ---------------------------------------------------------------------------
@dataclass(frozen=True)
class IdleRule:
    idle_after: float
    cpu_percent: float

    @classmethod
    def from_config(cls, monitoring: Monitoring) -> "IdleRule":
        return cls(float(monitoring.idle_after), float(monitoring.idle_cpu_percent))


@dataclass(frozen=True)
class Activity:
    started_at: str | None
    first_seen: float
    last_seen: float
    last_active: float

    def idle_seconds(self, now: float) -> float:
        return max(0.0, now - self.last_active)


def is_busy(sample: dict, gpus_by_uuid: dict[str, dict], gpu_uuids: list[str], rule: IdleRule) -> bool:
    """Whether one sample shows the desktop in use. A figure that could not be read counts as
    busy, except a GPU's utilization, which some GPUs never report; their processes still count."""
    cpu = sample.get("cpu_percent")
    if cpu is None or cpu >= rule.cpu_percent:
        return True
    if sample.get("gpu_processes"):
        return True
    return any((gpus_by_uuid.get(uuid) or {}).get("utilization") or 0 for uuid in gpu_uuids)


def observe(previous: Activity | None, started_at: str | None, busy: bool, now: float, rule: IdleRule) -> Activity:
    """The desktop's activity record after one more sample."""
    unwatched = previous is None or previous.started_at != started_at or now - previous.last_seen > rule.idle_after
    if unwatched:
        return Activity(started_at, now, now, now)
    return Activity(previous.started_at, previous.first_seen, now, now if busy else previous.last_active)


def is_idle(activity: Activity | None, now: float, rule: IdleRule) -> bool:
    return activity is not None and activity.idle_seconds(now) > rule.idle_after


def load_activity(db: StateDB) -> dict[str, Activity]:
    rows = db.activity_rows()
    return {r["user"]: Activity(r["started_at"], r["first_seen"], r["last_seen"], r["last_active"]) for r in rows}


def save_activity(db: StateDB, user: str, activity: Activity) -> None:
    db.save_activity(user, activity.started_at, activity.first_seen, activity.last_seen, activity.last_active)


def forget_activity(db: StateDB, user: str) -> None:
    db.forget_activity(user)


def record_activity(db: StateDB, desktops: list, samples: dict[str, dict], now: float, rule: IdleRule) -> dict[str, Activity]:
    """Fold this round's samples into the activity table; desktops on nodes that did not
    answer keep their record untouched. Returns every desktop's record after the update."""
    known = load_activity(db)
    with db.transaction():
        for desktop in desktops:
            node_sample = samples.get(desktop.node)
            if node_sample is None:
                continue
            mine = next((d for d in node_sample["desktops"] if d["user"] == desktop.user), None)
            if mine is None or mine["state"] != "running" or desktop.state != "running":
                forget_activity(db, desktop.user)
                known.pop(desktop.user, None)
                continue
            gpus = {g["uuid"]: g for g in node_sample["node"].get("gpus") or []}
            uuids = sorted({g["uuid"] for g in desktop.gpus} | set(mine.get("gpus") or []))
            activity = observe(known.get(desktop.user), mine.get("started_at"), is_busy(mine, gpus, uuids, rule), now, rule)
            save_activity(db, desktop.user, activity)
            known[desktop.user] = activity
    return known


# -- the status document ---------------------------------------------------------------------
def utc_iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def document_time(document: dict) -> float:
    """When the document was generated, as a Unix time."""
    return dt.datetime.fromisoformat(document["generated"]).timestamp()


def node_entry(node: Node, outcome: NodeOutcome[dict], assigned: dict[str, str]) -> dict:
    entry = {
        "name": node.name,
        "host": node.host,
        "reachable": outcome.ok,
        "error": outcome.error,
        "seconds": round(outcome.seconds, 3),
    }
    if not outcome.ok:
        return {**entry, **{key: None for key in NODE_FIGURES}, "image": None}
    figures = outcome.value["node"]
    gpus = [{**gpu, "assigned_to": assigned.get(gpu["uuid"])} for gpu in figures.get("gpus") or []]
    return {**entry, **{key: figures.get(key) for key in NODE_FIGURES}, "gpus": gpus, "image": figures.get("images")}


def desktop_entry(cfg: ClusterConfig, desktop, node_sample: dict | None, activity: Activity | None, now: float) -> dict:
    base = desktop.as_dict(cfg)
    gpu_figures = {g["uuid"]: g for g in ((node_sample or {}).get("node") or {}).get("gpus") or []}
    base["gpus"] = [
        {
            "index": g["index"],
            "uuid": g["uuid"],
            "utilization": gpu_figures.get(g["uuid"], {}).get("utilization"),
            "memory_used": gpu_figures.get(g["uuid"], {}).get("memory_used"),
            "memory_total": gpu_figures.get(g["uuid"], {}).get("memory_total"),
        }
        for g in desktop.gpus
    ]
    mine = next((d for d in (node_sample or {}).get("desktops", []) if d["user"] == desktop.user), None)
    if node_sample is None or mine is None:
        figures = dict(UNKNOWN_FIGURES)
        container_state = None
    else:
        figures = {key: mine.get(key) for key in DESKTOP_FIGURES}
        container_state = mine["state"]
    watched = activity is not None and container_state == "running"
    figures["disk"] = disk_entry(cfg, desktop, (mine or {}).get("disk"))
    return {
        **base,
        "container_state": container_state,
        **figures,
        "last_active": activity.last_active if watched else None,
        "idle_s": round(activity.idle_seconds(now), 1) if watched else None,
    }


def running_on(samples: dict[str, dict]) -> dict[str, list[str]]:
    """Where each desktop's container runs, as the nodes themselves say: the truth while an
    operation is half-way (a switch killed after its target started, say)."""
    found: dict[str, list[str]] = {}
    for node, sample in sorted(samples.items()):
        for d in sample.get("desktops") or []:
            if d.get("state") == "running":
                found.setdefault(d["user"], []).append(node)
    return found


def build_document(cfg: ClusterConfig, desktops: list, nodes: list[Node], outcomes: list[NodeOutcome[dict]],
                   activity: dict[str, Activity], now: float, pending: dict[str, dict] | None = None) -> dict:
    assigned = {g["uuid"]: d.user for d in desktops for g in d.gpus}
    samples = {o.node: o.value for o in outcomes if o.ok}
    where = running_on(samples)
    entries = []
    for d in desktops:
        entry = desktop_entry(cfg, d, samples.get(d.node), activity.get(d.user), now)
        entry["running_on"] = where.get(d.user, [])
        entry["operation"] = (pending or {}).get(d.user)
        entries.append(entry)
    return {
        "schema": SCHEMA_ID,
        "generated": utc_iso(now),
        "nodes": [node_entry(node, outcome, assigned) for node, outcome in zip(nodes, outcomes, strict=True)],
        "desktops": entries,
    }


def pending_operations(home: AdminHome) -> dict[str, dict]:
    """The operation each desktop is in the middle of: running now, or interrupted (its
    process died) and holding the desktop until `ops resume` or `ops abort`."""
    from .ops import list_ops

    pending = {}
    for view in list_ops(home, unfinished=True, limit=1000):
        if view.user and view.state in ("running", "interrupted") and view.user not in pending:
            pending[view.user] = {"id": view.id, "kind": view.kind, "state": view.state, "step": view.last_step}
    return pending


def select_nodes(cfg: ClusterConfig, desktops: list, node_filter: str | None, user_filter: str | None) -> list[Node]:
    if node_filter:
        return [cfg.node(node_filter)]
    if user_filter:
        wanted = {d.node for d in desktops}
        return [n for n in cfg.nodes if n.name in wanted]
    return list(cfg.nodes)


def collect_status(home: AdminHome, sessions: NodeSessions, node_filter: str | None = None,
                   user_filter: str | None = None) -> dict:
    """Sample the nodes, record the desktops' activity, and return the status document."""
    from .desktops import Desktops

    cfg = home.config
    rule = IdleRule.from_config(cfg.monitoring)
    if node_filter:
        cfg.node(node_filter)  # an unknown node is refused before any connection
    with home.state() as db:
        everything = Desktops(home).list(db)
    shown = [d for d in everything if (not node_filter or d.node == node_filter) and (not user_filter or d.user == user_filter)]
    pending = pending_operations(home)
    nodes = select_nodes(cfg, shown, node_filter, user_filter)
    if user_filter and any(d.user in pending for d in shown):
        # Half-way through an operation, the container may run on a node other than the
        # recorded one: ask every node, so running_on says where it really runs.
        nodes = list(cfg.nodes)
    users_by_node = {n.name: [d.user for d in everything if d.node == n.name] for n in nodes}
    outcomes = gather(sessions, nodes, users_by_node)
    now = time.time()
    samples = {o.node: o.value for o in outcomes if o.ok}
    with home.state() as db:
        activity = record_activity(db, [d for d in everything if d.node in samples], samples, now, rule)
    return build_document(cfg, shown, nodes, outcomes, activity, now, pending)


def unreachable_nodes(document: dict) -> list[str]:
    return [n["name"] for n in document["nodes"] if not n["reachable"]]


# -- idle desktops -----------------------------------------------------------------------------
@dataclass(frozen=True)
class IdleDesktop:
    user: str
    node: str
    idle_s: float
    last_active: float


def find_idle(document: dict, rule: IdleRule) -> list[IdleDesktop]:
    return [
        IdleDesktop(d["user"], d["node"], d["idle_s"], d["last_active"])
        for d in document["desktops"]
        if d["state"] == "running" and d["container_state"] == "running" and d["idle_s"] is not None and d["idle_s"] > rule.idle_after
    ]


def stop_idle(home: AdminHome, user: str, say: Say) -> None:
    """Stop an idle desktop the way `labvm stop` does: its sync is flushed to MooseFS before its
    layers go, so nothing it wrote is lost."""
    from .desktops import Desktops

    Desktops(home, say).stop(user)
    with home.state() as db:
        forget_activity(db, user)


def require_reachable(document: dict) -> None:
    down = unreachable_nodes(document)
    if down:
        raise NodeError(node=", ".join(down), msg="did not answer (its row says why)")


# -- usage samples: the graphs of `labvm status --html` ------------------------------------------
KEEP_USAGE_S = 48 * 3600
USAGE_WAIT_S = 2.0  # a status run waits no longer than this for another writer

# A node's or a GPU's samples: (at, compute %, memory %), oldest first, keyed (node, GPU UUID or None).
History = dict[tuple[str, str | None], list[tuple[float, float | None, float | None]]]


def percent(used, total) -> float | None:
    return round(100.0 * used / total, 1) if used is not None and total else None


def usage_rows(document: dict) -> list[tuple]:
    """One sample of every node that answered and one of each of its GPUs."""
    at = document_time(document)
    rows = []
    for node in document["nodes"]:
        if not node["reachable"]:
            continue
        memory = node["memory"] or {}
        rows.append((node["name"], None, at, node["cpu_percent"], percent(memory.get("used"), memory.get("total"))))
        for gpu in node["gpus"] or []:
            rows.append((node["name"], gpu["uuid"], at, gpu.get("utilization"),
                         percent(gpu.get("memory_used"), gpu.get("memory_total"))))
    return rows


def record_usage(home: AdminHome, document: dict) -> str | None:
    """Record the document's samples in one transaction and drop those older than 48 hours.
    A database that stays busy (or cannot be written) costs this sample, never the status run:
    returns why it was not recorded, None when it was (or no node answered)."""
    rows = usage_rows(document)
    if not rows:
        return None
    try:
        with home.state() as db:
            db.record_usage(rows, keep_after=rows[0][2] - KEEP_USAGE_S, wait_s=USAGE_WAIT_S)
    except (sqlite3.Error, OSError, StateError) as exc:
        return str(exc)
    return None


def usage_history(home: AdminHome, since: float) -> History:
    with home.state() as db:
        rows = db.usage_since(since)
    history: History = {}
    for r in rows:
        history.setdefault((r["node"], r["gpu"]), []).append((r["at"], r["compute"], r["memory"]))
    return history
