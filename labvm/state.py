"""The state database: users, VMs, GPU assignments and the operations journal.

SQLite on the admin host, mode 0600, schema changed only by named migrations
recorded in `schema_migrations` (applied in order, each in one transaction).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AlreadyExists, NotFound, StateError
from .fsutil import ensure_private_dir, require_private
from .names import validate_password, validate_user_name
from .secrets import SecretBox, hash_password, verify_password

DB_NAME = "state.db"
KEY_NAME = "secret.key"
FIRST_UID = 2000

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
]


USER_COLUMNS = "name, uid, member_id, owns_unmarked_files, created_at, updated_at"


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
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
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

    def require_current_schema(self) -> None:
        pending = self.pending_migrations()
        if pending:
            raise StateError(f"{self.path}: schema is behind ({', '.join(pending)} pending); run `labvm init` to migrate")

    # -- users -------------------------------------------------------------
    def _next_uid(self) -> int:
        row = self.conn.execute("SELECT MAX(uid) AS m FROM users").fetchone()
        return max(FIRST_UID, (row["m"] or 0) + 1)

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
        if self.conn.execute("SELECT 1 FROM vms WHERE user = ?", (name,)).fetchone():
            raise StateError(f"user {name!r} still has a desktop; remove it first with `labvm rm {name}`")
        self.conn.execute("DELETE FROM users WHERE name = ?", (name,))
