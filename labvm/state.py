"""The state database: users, VMs, GPU assignments and the operations journal.

SQLite on the admin host, mode 0600, schema changed only by named migrations
recorded in `schema_migrations` (applied in order, each in one transaction).

StateDB is the store: it owns the rows, and every statement on the database is one of its
methods, named for what it means. Nothing else in labvm runs SQL (a unit test holds to that).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import AlreadyExists, NoCapacity, NotFound, StateError
from .fsutil import ensure_private_dir, require_private
from .names import validate_password, validate_user_name
from .secrets import SecretBox, hash_password, verify_password

DB_NAME = "state.db"
KEY_NAME = "secret.key"
FIRST_UID = 2000
BUSY_TIMEOUT_S = 30  # how long a statement waits for another writer before "database is locked"

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE users (
            name        TEXT PRIMARY KEY,
            uid         INTEGER NOT NULL UNIQUE,
            pw_hash     TEXT NOT NULL,
            vnc_secret  BLOB NOT NULL,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        );
        CREATE TABLE vms (
            user        TEXT PRIMARY KEY REFERENCES users(name) ON DELETE RESTRICT,
            node        TEXT NOT NULL,
            state       TEXT NOT NULL,
            vnc_port    INTEGER,
            ssh_port    INTEGER,
            limits      TEXT NOT NULL DEFAULT '{}',
            version     INTEGER NOT NULL DEFAULT 0,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            UNIQUE (node, vnc_port),
            UNIQUE (node, ssh_port)
        );
        CREATE TABLE gpu_assignments (
            gpu_uuid    TEXT PRIMARY KEY,
            node        TEXT NOT NULL,
            gpu_index   INTEGER NOT NULL,
            user        TEXT NOT NULL REFERENCES vms(user) ON DELETE CASCADE,
            assigned_at REAL NOT NULL
        );
        CREATE TABLE operations (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            kind        TEXT NOT NULL,
            user        TEXT,
            state       TEXT NOT NULL,
            params      TEXT NOT NULL DEFAULT '{}',
            error       TEXT,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        );
        CREATE TABLE operation_steps (
            op_id       INTEGER NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
            seq         INTEGER NOT NULL,
            name        TEXT NOT NULL,
            state       TEXT NOT NULL,
            detail      TEXT,
            started_at  REAL,
            finished_at REAL,
            PRIMARY KEY (op_id, seq)
        );
        CREATE TABLE vm_locks (
            user        TEXT PRIMARY KEY,
            op_id       INTEGER REFERENCES operations(id),
            owner_host  TEXT NOT NULL,
            owner_pid   INTEGER NOT NULL,
            acquired_at REAL NOT NULL
        );
        """,
    ),
    (
        "0002_node_cordons",
        """
        CREATE TABLE node_cordons (
            node        TEXT PRIMARY KEY,
            reason      TEXT,
            since       REAL NOT NULL
        );
        """,
    ),
    (
        # What `labvm idle` decides from: when each running desktop was last seen busy.
        "0003_desktop_activity",
        """
        CREATE TABLE desktop_activity (
            user        TEXT PRIMARY KEY REFERENCES vms(user) ON DELETE CASCADE,
            started_at  TEXT,
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL,
            last_active REAL NOT NULL
        );
        """,
    ),
    (
        # Whose files a version on MooseFS holds is the member's id, not their name, which a later
        # member may be given again. The owner record there carries the id. Members who exist
        # now may own records an older labvm wrote without one: they keep their claim on them.
        "0004_member_ids",
        """
        ALTER TABLE users ADD COLUMN member_id TEXT;
        UPDATE users SET member_id = lower(hex(randomblob(16)));
        CREATE UNIQUE INDEX users_member_id ON users(member_id);
        ALTER TABLE users ADD COLUMN owns_unmarked_files INTEGER NOT NULL DEFAULT 0;
        UPDATE users SET owns_unmarked_files = 1;
        """,
    ),
    (
        # The desktop image (its id, the sha256 of its tarball) each desktop runs over. NULL for
        # a desktop made before nodes held several images: it is adopted with the image its
        # node held then (Desktops.adopt_image).
        "0005_desktop_images",
        """
        ALTER TABLE vms ADD COLUMN image TEXT;
        """,
    ),
    (
        # What the graphs of `labvm status --html` are drawn from: each status run's figures for
        # every node that answered (gpu NULL) and each of its GPUs (gpu: its UUID). compute is the
        # node's CPU % or the GPU's utilization %, memory the % of its memory in use; NULL when
        # unknown. Kept 48 hours.
        "0006_usage_samples",
        """
        CREATE TABLE usage_samples (
            node        TEXT NOT NULL,
            gpu         TEXT,
            at          REAL NOT NULL,
            compute     REAL,
            memory      REAL
        );
        CREATE INDEX usage_samples_at ON usage_samples(at);
        """,
    ),
    (
        # Members' SSH public keys, for the self-service account (`labvm member setup`): each
        # key is checked (labvm/member_keys.py) and kept as type, base64 and a cleaned comment.
        # A fingerprint belongs to one member only: sshd takes the first line a key matches.
        "0007_member_keys",
        """
        CREATE TABLE member_keys (
            user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            fingerprint TEXT NOT NULL UNIQUE,
            key_type    TEXT NOT NULL,
            key_b64     TEXT NOT NULL,
            comment     TEXT NOT NULL,
            added_at    REAL NOT NULL,
            PRIMARY KEY (user, fingerprint)
        );
        """,
    ),
    (
        # The highest uid ever given, so a removed member's uid is never given again (the
        # files they left on MooseFS, kept by `user rm --keep-files`, still carry it).
        "0008_uid_high_water",
        """
        CREATE TABLE counters (
            name        TEXT PRIMARY KEY,
            value       INTEGER NOT NULL
        );
        INSERT INTO counters (name, value) SELECT 'uid', COALESCE(MAX(uid), 0) FROM users;
        """,
    ),
]


USER_COLUMNS = "name, uid, member_id, owns_unmarked_files, created_at, updated_at"
# The columns of a desktop's row that update_desktop may set.
DESKTOP_FIELDS = ("node", "state", "vnc_port", "ssh_port", "limits", "version", "image")

# What a reservation takes from what is free: given the GPUs taken on the node and the ports used
# there, the GPUs ({"uuid", "index"}) and the (VNC, SSH) ports the desktop gets.
Choice = Callable[[set[str], set[int]], tuple[list[dict], tuple[int, int | None]]]


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    member_id: str
    # True for members that existed before labvm gave out member ids: an owner record on
    # MooseFS without an id, under their name, is taken as theirs.
    owns_unmarked_files: bool
    created_at: float
    updated_at: float

    def as_dict(self) -> dict:
        return {"name": self.name, "uid": self.uid, "member_id": self.member_id,
                "created_at": self.created_at, "updated_at": self.updated_at}

    def owns(self, member_id: str | None) -> bool:
        """Whether files whose owner record names `member_id` (None: no id) are this member's."""
        return member_id == self.member_id if member_id is not None else self.owns_unmarked_files


def _text_of(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class StateDB:
    """One open state database. Use `StateDB.open(home)`; `StateDB.create(home)` for `labvm init`."""

    def __init__(self, conn: sqlite3.Connection, box: SecretBox, path: Path):
        self.conn = conn
        self.box = box
        self.path = path

    # -- opening ---------------------------------------------------------
    @classmethod
    def create(cls, home: Path) -> bool:
        """Create the database and key if missing. Returns True if anything was created."""
        ensure_private_dir(home)
        created = False
        key = home / KEY_NAME
        if not key.exists():
            SecretBox.create_key(key)
            created = True
        db = home / DB_NAME
        if not db.exists():
            fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            created = True
        with cls.open(home) as state:
            if state.pending_migrations():
                state.migrate()
                created = True
        return created

    @classmethod
    def open(cls, home: Path) -> "StateDB":
        db = home / DB_NAME
        if not db.exists():
            raise StateError(f"{db}: no state database; run `labvm init`")
        require_private(db)
        box = SecretBox.from_file(home / KEY_NAME)
        conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        # A row holding bytes that are not UTF-8 must still read: its text keeps them as escapes.
        conn.text_factory = _text_of
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL and shm side files must be as private as the database itself.
        for side in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if side.exists():
                os.chmod(side, 0o600)
        return cls(conn, box, db)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- migrations ------------------------------------------------------
    def applied_migrations(self) -> list[str]:
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        return [r["name"] for r in self.conn.execute("SELECT name FROM schema_migrations ORDER BY name")]

    def pending_migrations(self) -> list[str]:
        done = set(self.applied_migrations())
        return [name for name, _ in MIGRATIONS if name not in done]

    def migrate(self) -> list[str]:
        pending = self.pending_migrations()
        for name, sql in MIGRATIONS:
            if name not in pending:
                continue
            # executescript would commit on its own; run statements in one explicit transaction.
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, sql.split(";")):
                    self.conn.execute(statement)
                self.conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return pending

    @contextmanager
    def transaction(self):
        """One write transaction (BEGIN IMMEDIATE) around the block: committed when it ends,
        rolled back when it raises."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:  # one SQLite already rolled back leaves nothing to roll back
                self.conn.execute("ROLLBACK")
            raise

    def require_current_schema(self) -> None:
        pending = self.pending_migrations()
        if pending:
            raise StateError(f"{self.path}: schema is behind ({', '.join(pending)} pending); run `labvm init` to migrate")

    # -- users -------------------------------------------------------------
    def _next_uid(self) -> int:
        """One above every uid given so far, removed members' too; recorded as given."""
        top = self.conn.execute("SELECT MAX(uid) AS m FROM users").fetchone()["m"] or 0
        if "0008_uid_high_water" not in self.applied_migrations():
            return max(FIRST_UID, top + 1)  # a database being migrated step by step
        given = self.conn.execute("SELECT value FROM counters WHERE name = 'uid'").fetchone()
        uid = max(FIRST_UID, top + 1, (given["value"] if given else 0) + 1)
        self.conn.execute("INSERT INTO counters (name, value) VALUES ('uid', ?) "
                          "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (uid,))
        return uid

    def add_user(self, name: str, password: str) -> User:
        validate_user_name(name)
        validate_password(password)
        pw_hash = hash_password(password)
        secret = self.box.encrypt(password)
        member_id = secrets.token_hex(16)
        now = time.time()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            uid = self._next_uid()
            self.conn.execute(
                "INSERT INTO users (name, uid, member_id, pw_hash, vnc_secret, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, uid, member_id, pw_hash, secret, now, now),
            )
            self.conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            self.conn.execute("ROLLBACK")
            raise AlreadyExists(f"user {name!r} already exists") from None
        return User(name, uid, member_id, False, now, now)

    @staticmethod
    def _user(row: sqlite3.Row) -> User:
        values = dict(row)
        return User(**{**values, "owns_unmarked_files": bool(values["owns_unmarked_files"])})

    def get_user(self, name: str) -> User:
        row = self.conn.execute(f"SELECT {USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown user {name!r}; see `labvm user list`")
        return self._user(row)

    def has_user(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None

    def list_users(self) -> list[User]:
        rows = self.conn.execute(f"SELECT {USER_COLUMNS} FROM users ORDER BY name")
        return [self._user(r) for r in rows]

    def cordons(self) -> dict[str, str | None]:
        """Cordoned nodes and why: no new desktop goes there."""
        return {r["node"]: r["reason"] for r in self.conn.execute("SELECT node, reason FROM node_cordons")}

    def desktops_on(self, node: str) -> list[str]:
        """The users whose desktops the state database places on `node`."""
        return [r["user"] for r in self.conn.execute("SELECT user FROM vms WHERE node = ? ORDER BY user", (node,))]

    def user_names(self) -> list[str]:
        return [r["name"] for r in self.conn.execute("SELECT name FROM users ORDER BY name")]

    def set_password(self, name: str, password: str) -> None:
        self.get_user(name)
        validate_password(password)
        self.conn.execute(
            "UPDATE users SET pw_hash = ?, vnc_secret = ?, updated_at = ? WHERE name = ?",
            (hash_password(password), self.box.encrypt(password), time.time(), name),
        )

    def check_password(self, name: str, password: str) -> bool:
        row = self.conn.execute("SELECT pw_hash FROM users WHERE name = ?", (name,)).fetchone()
        return row is not None and verify_password(password, row["pw_hash"])

    def vnc_secret(self, name: str) -> str:
        row = self.conn.execute("SELECT vnc_secret FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown user {name!r}; see `labvm user list`")
        return self.box.decrypt(row["vnc_secret"])

    def remove_user(self, name: str) -> None:
        self.get_user(name)
        if self.has_desktop(name):
            raise StateError(f"user {name!r} still has a desktop; remove it first with `labvm rm {name}`")
        # The keys go too (ON DELETE CASCADE says the same; this holds without foreign keys on).
        self.conn.execute("DELETE FROM member_keys WHERE user = ?", (name,))
        self.conn.execute("DELETE FROM users WHERE name = ?", (name,))

    # -- members' SSH keys -----------------------------------------------------
    def add_member_key(self, user: str, key_type: str, key_b64: str, comment: str, fingerprint: str) -> None:
        self.get_user(user)
        row = self.conn.execute("SELECT user FROM member_keys WHERE fingerprint = ?", (fingerprint,)).fetchone()
        if row is not None:
            owner = "this member" if row["user"] == user else "another member"
            raise AlreadyExists(f"key {fingerprint} is already registered for {owner}")
        self.conn.execute(
            "INSERT INTO member_keys (user, fingerprint, key_type, key_b64, comment, added_at) VALUES (?, ?, ?, ?, ?, ?)",
            (user, fingerprint, key_type, key_b64, comment, time.time()),
        )

    def member_keys(self, user: str | None = None) -> list[dict]:
        """Keys as dicts (user, fingerprint, key_type, key_b64, comment, added_at), by user then age."""
        if user is None:
            rows = self.conn.execute("SELECT * FROM member_keys ORDER BY user, added_at, fingerprint")
        else:
            rows = self.conn.execute("SELECT * FROM member_keys WHERE user = ? ORDER BY added_at, fingerprint", (user,))
        return [dict(r) for r in rows]

    def remove_member_key(self, user: str, fingerprint: str) -> bool:
        self.get_user(user)
        cur = self.conn.execute("DELETE FROM member_keys WHERE user = ? AND fingerprint = ?", (user, fingerprint))
        return cur.rowcount > 0

    # -- desktops (vms) ------------------------------------------------------
    def desktop_row(self, user: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM vms WHERE user = ?", (user,)).fetchone()

    def has_desktop(self, user: str) -> bool:
        return self.conn.execute("SELECT 1 FROM vms WHERE user = ?", (user,)).fetchone() is not None

    def desktop_users(self) -> list[str]:
        """The users who have a desktop, by name."""
        return [r["user"] for r in self.conn.execute("SELECT user FROM vms ORDER BY user")]

    def limits_on(self, node: str) -> list[dict]:
        """The limits of each desktop the database places on `node`."""
        return [json.loads(r["limits"]) for r in self.conn.execute("SELECT limits FROM vms WHERE node = ?", (node,))]

    def ports_taken_on(self, node: str) -> set[int]:
        """The VNC and SSH ports of the desktops on `node`."""
        used: set[int] = set()
        for r in self.conn.execute("SELECT vnc_port, ssh_port FROM vms WHERE node = ?", (node,)):
            used.update(port for port in (r["vnc_port"], r["ssh_port"]) if port)
        return used

    def taken_on(self, node: str, user: str, switch_op: int | None = None) -> tuple[set[str], set[int]]:
        """What a reservation for the user on `node` may not take: the GPUs other desktops hold
        there, and the ports of its desktops and of running switches to it (but switch_op's)."""
        return self.gpus_taken_on(node, but=user), self.ports_taken_on(node) | self.ports_held_for_switches(node, but_op=switch_op)

    def ports_held_for_switches(self, node: str, but_op: int | None = None) -> set[int]:
        """The ports running switches to `node` (other than operation but_op) hold there until they commit."""
        held: set[int] = set()
        for r in self.conn.execute("SELECT id, params FROM operations WHERE kind = 'switch' AND state = 'running' AND id != ?",
                                   (but_op or 0,)):
            other = json.loads(r["params"])
            if other.get("target") == node and not other.get("rolled_back"):
                held.update(port for port in other.get("target_ports") or () if port)
        return held

    def update_desktop(self, user: str, **fields) -> None:
        """Set columns of the desktop's row (see DESKTOP_FIELDS), and its updated_at."""
        unknown = set(fields) - set(DESKTOP_FIELDS)
        if unknown:
            raise ValueError(f"no desktop column {', '.join(sorted(unknown))}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(f"UPDATE vms SET {assignments}, updated_at = ? WHERE user = ?", (*fields.values(), time.time(), user))

    def set_desktop_state(self, user: str, state: str) -> None:
        self.update_desktop(user, state=state)

    def set_desktop_version(self, user: str, version: int) -> None:
        self.update_desktop(user, version=version)

    def set_desktop_limits(self, user: str, limits: dict) -> None:
        self.update_desktop(user, limits=json.dumps(limits))

    def set_first_version(self, user: str, version: int) -> None:
        """The version of the member's files a desktop being created continues from."""
        self.conn.execute("UPDATE vms SET version = ? WHERE user = ?", (version, user))

    def images_in_use(self) -> dict[str, list[str]]:
        """Each image id a desktop is recorded on, with those desktops' users."""
        used: dict[str, list[str]] = {}
        for row in self.conn.execute("SELECT user, image FROM vms WHERE image IS NOT NULL ORDER BY user"):
            used.setdefault(row["image"], []).append(row["user"])
        return used

    def images_by_node(self) -> dict[str, set[str | None]]:
        """The images the desktops on each node are recorded on (None: one not adopted yet)."""
        found: dict[str, set[str | None]] = {}
        for row in self.conn.execute("SELECT node, image FROM vms"):
            found.setdefault(row["node"], set()).add(row["image"])
        return found

    def remove_desktop(self, user: str) -> None:
        """Forget the desktop; its GPU assignments and activity record go with it."""
        self.conn.execute("DELETE FROM vms WHERE user = ?", (user,))

    # -- GPU assignments -----------------------------------------------------
    def gpu_assignments(self, user: str, node: str) -> list[dict]:
        """The GPUs the user's desktop holds on `node`, by index: {"uuid", "index"}."""
        rows = self.conn.execute("SELECT gpu_uuid, gpu_index FROM gpu_assignments WHERE user = ? AND node = ? ORDER BY gpu_index",
                                 (user, node))
        return [{"uuid": r["gpu_uuid"], "index": r["gpu_index"]} for r in rows]

    def gpus_taken_on(self, node: str, but: str | None = None) -> set[str]:
        """The UUIDs of the GPUs on `node` assigned to a desktop (other than user but's)."""
        if but is None:
            rows = self.conn.execute("SELECT gpu_uuid FROM gpu_assignments WHERE node = ?", (node,))
        else:
            rows = self.conn.execute("SELECT gpu_uuid FROM gpu_assignments WHERE node = ? AND user != ?", (node, but))
        return {r["gpu_uuid"] for r in rows}

    def release_gpus(self, user: str, node: str) -> None:
        self.conn.execute("DELETE FROM gpu_assignments WHERE user = ? AND node = ?", (user, node))

    def _assign_gpus(self, user: str, node: str, gpus: list[dict], now: float) -> None:
        for g in gpus:
            self.conn.execute("INSERT INTO gpu_assignments VALUES (?, ?, ?, ?, ?)", (g["uuid"], node, g["index"], user, now))

    # -- reservations: create and switch -------------------------------------
    def reserve(self, user: str, node: str, choose: Choice, *, new_limits: dict | None = None, image: str | None = None,
                switch_op: int | None = None, then: Callable[[list[dict], tuple[int, int | None]], None] | None = None,
                ) -> tuple[list[dict], tuple[int, int | None]]:
        """Reserve GPUs and ports on `node` for the user's desktop in one transaction, so no GPU
        or port is given twice: `choose` picks from what is free as the transaction sees it, and
        a pick of a GPU or port taken there is refused (NoCapacity) with nothing written.

        new_limits: a create; the desktop's row is made, `creating` on `node`, with these
        limits, the ports and `image`. Without it the desktop has its row (a switch's target): its GPUs
        already on `node` are free to it and replaced. switch_op: the reserving switch's
        operation, whose own earlier pick is free to it. The ports running switches to `node`
        hold until they commit count as used, for a create too. then(gpus, ports) runs inside the
        transaction (a switch records them in its journal entry)."""
        with self.transaction():
            taken, used = self.taken_on(node, user, switch_op)
            gpus, ports = choose(taken, used)
            clash = [f"GPU {g['uuid']}" for g in gpus if g["uuid"] in taken] + [f"port {p}" for p in ports if p and p in used]
            if clash:
                raise NoCapacity(f"{node}: {', '.join(clash)} already taken; not reserved for {user}")
            now = time.time()
            if new_limits is not None:
                self.conn.execute(
                    "INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, image, created_at, updated_at) "
                    "VALUES (?, ?, 'creating', ?, ?, ?, 0, ?, ?, ?)",
                    (user, node, ports[0], ports[1], json.dumps(new_limits), image, now, now),
                )
            else:
                self.release_gpus(user, node)
            self._assign_gpus(user, node, gpus, now)
            if then is not None:
                then(gpus, ports)
        return gpus, ports

    def commit_switch(self, user: str, source: str, target: str, ports: list, limits: dict, version: int, state: str) -> None:
        """The switch's commit, in one transaction: the desktop lives on the target, with its
        ports, limits and version there, and gives up its GPUs on the source."""
        with self.transaction():
            self.conn.execute(
                "UPDATE vms SET node = ?, vnc_port = ?, ssh_port = ?, limits = ?, version = ?, state = ?, updated_at = ? WHERE user = ?",
                (target, ports[0], ports[1], json.dumps(limits), version, state, time.time(), user),
            )
            self.release_gpus(user, source)

    # -- nodes -----------------------------------------------------------------
    def cordon(self, node: str, reason: str | None) -> None:
        self.conn.execute("INSERT INTO node_cordons (node, reason, since) VALUES (?, ?, ?)", (node, reason, time.time()))

    def uncordon(self, node: str) -> bool:
        """Lift the node's cordon; False if it had none."""
        return self.conn.execute("DELETE FROM node_cordons WHERE node = ?", (node,)).rowcount > 0

    # -- desktop activity (`labvm idle`) -------------------------------------
    def activity_rows(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT user, started_at, first_seen, last_seen, last_active FROM desktop_activity"))

    def save_activity(self, user: str, started_at: str | None, first_seen: float, last_seen: float, last_active: float) -> None:
        self.conn.execute(
            "INSERT INTO desktop_activity (user, started_at, first_seen, last_seen, last_active) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(user) DO UPDATE SET started_at = excluded.started_at, first_seen = excluded.first_seen, "
            "last_seen = excluded.last_seen, last_active = excluded.last_active",
            (user, started_at, first_seen, last_seen, last_active),
        )

    def forget_activity(self, user: str) -> None:
        self.conn.execute("DELETE FROM desktop_activity WHERE user = ?", (user,))

    # -- usage samples (`labvm status --html`) -----------------------------------
    def record_usage(self, rows: list[tuple], keep_after: float, wait_s: float) -> None:
        """Add samples (node, gpu UUID or None, at, compute %, memory %) and drop those older
        than keep_after, in one transaction. Waits at most wait_s for another writer, not the
        usual 30 s: then sqlite3.OperationalError (database is locked)."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
        try:
            with self.transaction():
                self.conn.executemany("INSERT INTO usage_samples (node, gpu, at, compute, memory) VALUES (?, ?, ?, ?, ?)", rows)
                self.conn.execute("DELETE FROM usage_samples WHERE at < ?", (keep_after,))
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")

    def usage_since(self, since: float) -> list[sqlite3.Row]:
        """Every sample taken at or after `since`, oldest first."""
        return list(self.conn.execute(
            "SELECT node, gpu, at, compute, memory FROM usage_samples WHERE at >= ? ORDER BY at", (since,)))

    # -- the operations journal ----------------------------------------------
    def begin_operation(self, kind: str, user: str | None, params: dict) -> int:
        """Journal a new operation, running; returns its id."""
        now = time.time()
        cur = self.conn.execute(
            "INSERT INTO operations (kind, user, state, params, created_at, updated_at) VALUES (?, ?, 'running', ?, ?, ?)",
            (kind, user, json.dumps(params, sort_keys=True), now, now),
        )
        return cur.lastrowid

    def operation(self, op_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM operations WHERE id = ?", (op_id,)).fetchone()

    def operations(self, user: str | None = None, unfinished: bool = False, limit: int = 30) -> list[sqlite3.Row]:
        """The newest operations first; with user, that user's; with unfinished, those running or failed."""
        where, args = [], []
        if user:
            where, args = ["user = ?"], [user]
        if unfinished:
            # `interrupted` is a `running` one whose process died; both are unfinished.
            where.append("state IN ('running', 'failed')")
        sql = "SELECT * FROM operations" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        return list(self.conn.execute(sql, (*args, limit)))

    def set_operation_params(self, op_id: int, params: dict) -> None:
        self.conn.execute(
            "UPDATE operations SET params = ?, updated_at = ? WHERE id = ?",
            (json.dumps(params, sort_keys=True), time.time(), op_id),
        )

    def set_operation_state(self, op_id: int, state: str) -> None:
        self.conn.execute("UPDATE operations SET state = ?, updated_at = ? WHERE id = ?", (state, time.time(), op_id))

    def finish_operation(self, op_id: int, state: str, error: str | None) -> None:
        self.conn.execute(
            "UPDATE operations SET state = ?, error = ?, updated_at = ? WHERE id = ?",
            (state, error, time.time(), op_id),
        )

    def last_step_seq(self, op_id: int) -> int:
        row = self.conn.execute("SELECT COALESCE(MAX(seq), 0) AS seq FROM operation_steps WHERE op_id = ?", (op_id,)).fetchone()
        return row["seq"] if row else 0

    def last_step_name(self, op_id: int) -> str | None:
        row = self.conn.execute(
            "SELECT name FROM operation_steps WHERE op_id = ? ORDER BY seq DESC LIMIT 1", (op_id,)
        ).fetchone()
        return row["name"] if row else None

    def step_done(self, op_id: int, name: str) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM operation_steps WHERE op_id = ? AND name = ? AND state = 'done'", (op_id, name)
        ).fetchone() is not None

    def operation_steps(self, op_id: int) -> list[dict]:
        """Every step row of the operation, in order."""
        return [dict(r) for r in self.conn.execute(
            "SELECT seq, name, state, detail, started_at, finished_at FROM operation_steps WHERE op_id = ? ORDER BY seq", (op_id,))]

    def add_step(self, op_id: int, seq: int, name: str) -> None:
        """Journal step `seq` of the operation as running."""
        self.conn.execute(
            "INSERT INTO operation_steps (op_id, seq, name, state, started_at) VALUES (?, ?, ?, 'running', ?)",
            (op_id, seq, name, time.time()),
        )

    def finish_step(self, op_id: int, seq: int, state: str, detail: str | None) -> None:
        self.conn.execute(
            "UPDATE operation_steps SET state = ?, detail = ?, finished_at = ? WHERE op_id = ? AND seq = ?",
            (state, detail, time.time(), op_id, seq),
        )

    def drop_step(self, op_id: int, seq: int) -> None:
        self.conn.execute("DELETE FROM operation_steps WHERE op_id = ? AND seq = ?", (op_id, seq))

    # -- desktop locks -------------------------------------------------------
    def lock_row(self, user: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT op_id, owner_host, owner_pid, acquired_at FROM vm_locks WHERE user = ?", (user,)).fetchone()

    def lock_owner_pid(self, op_id: int) -> int | None:
        """The pid holding a desktop's lock for the operation, if one does."""
        row = self.conn.execute("SELECT owner_pid FROM vm_locks WHERE op_id = ?", (op_id,)).fetchone()
        return None if row is None else row["owner_pid"]

    def add_lock(self, user: str, op_id: int | None, host: str, pid: int) -> None:
        self.conn.execute(
            "INSERT INTO vm_locks (user, op_id, owner_host, owner_pid, acquired_at) VALUES (?, ?, ?, ?, ?)",
            (user, op_id, host, pid, time.time()),
        )

    def drop_lock(self, user: str) -> None:
        self.conn.execute("DELETE FROM vm_locks WHERE user = ?", (user,))

    def release_lock(self, user: str, host: str, pid: int) -> None:
        """Drop the desktop's lock if this owner holds it."""
        self.conn.execute("DELETE FROM vm_locks WHERE user = ? AND owner_host = ? AND owner_pid = ?", (user, host, pid))
