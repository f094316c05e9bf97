"""The admin host's view of labvm: the cluster file and the state beside it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .audit import AUDIT_LOG
from .ca import CA, CA_KEY
from .ca import init as create_or_load_ca
from .ca import load as load_ca
from .config import ClusterConfig, parse_config, resolve_config_path
from .fsutil import atomic_write, create_private, ensure_private_dir, require_safe
from .names import validate_user_name
from .remote.connection import IDENTITY
from .remote.hostkeys import KNOWN_HOSTS
from .state import DB_NAME, KEY_NAME, StateDB

# Readable by root alone; everything else in the admin directory, and the directory itself,
# must not be writable by group or others. All of it must belong to whoever runs labvm.
SECRET_FILES = frozenset({DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", KEY_NAME, IDENTITY, KNOWN_HOSTS, AUDIT_LOG,
                          CA_KEY})


@dataclass
class AdminHome:
    """Where labvm keeps its files; created by `labvm init`."""

    config_path: Path

    @classmethod
    def locate(cls, explicit: str | None = None) -> "AdminHome":
        return cls(resolve_config_path(explicit))

    @property
    def home(self) -> Path:
        return self.config_path.parent

    @property
    def images_dir(self) -> Path:
        """Where `labvm image build` puts images, and beside each the names of its accounts."""
        return self.home / "images"

    def check_member_name(self, name: str) -> str:
        """The member name rule, with the accounts of the images built here refused too."""
        from .images import image_account_names

        return validate_user_name(name, image_account_names(self.images_dir))

    @cached_property
    def config(self) -> ClusterConfig:
        self.check_safe()
        return parse_config(self.config_path)

    def state(self) -> StateDB:
        self.check_safe()
        db = StateDB.open(self.home)
        db.require_current_schema()
        return db

    def ca(self) -> CA:
        """labvm's certificate authority, which signs the nodes' HTTPS certificates (`labvm ca init`)."""
        self.check_safe()
        return load_ca(self.home)

    def init_ca(self) -> tuple[CA, bool]:
        """The certificate authority, created if missing; True if this call created it."""
        self.check_safe()
        return create_or_load_ca(self.home)

    def init(self) -> list[str]:
        """Create whatever is missing: the starter cluster file, state database, key, SSH identity."""
        created = []
        if self.home.exists():
            self.check_safe()
        ensure_private_dir(self.home)
        if not self.config_path.exists():
            starter = resources.files("labvm").joinpath("schema/bkConfxml.xml").read_bytes()
            self.config_path.write_bytes(starter)
            self.config_path.chmod(0o644)
            created.append(f"cluster file {self.config_path} (edit <storage>; add nodes with `labvm node add`)")
        else:
            parse_config(self.config_path)
        if StateDB.create(self.home):
            created.append(f"state database {self.home / 'state.db'} and key {self.home / 'secret.key'}")
        identity = self.home / IDENTITY
        if not identity.exists():
            write_ssh_identity(identity)
            created.append(f"SSH identity {identity} (add {identity}.pub to each node's authorized_keys)")
        return created

    def check_safe(self) -> None:
        """Refuse an admin directory that another user owns or could write to, or whose
        secrets others could read (InsecureFile, naming the fix). A missing one is `labvm
        init`'s to create, and the commands that need it say so."""
        try:
            require_safe(self.home, os.stat(self.home))
            for entry in os.scandir(self.home):
                found = _stat_or_none(entry.path)
                if found is not None:
                    require_safe(Path(entry.path), found, secret=entry.name in SECRET_FILES)
        except FileNotFoundError:
            return


def _stat_or_none(path: str) -> os.stat_result | None:
    """What a path in the admin directory points to; None for a dangling link or one gone since."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def write_ssh_identity(path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    create_private(path, private)
    atomic_write(path.with_name(path.name + ".pub"), public + b" labvm-admin\n", 0o644)
