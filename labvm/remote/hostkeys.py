"""Pinned SSH host keys, kept in an OpenSSH known_hosts file (mode 0600) in the admin home."""

from __future__ import annotations

import base64
import hashlib
import socket
from pathlib import Path

import paramiko

from ..errors import NodeUnreachable
from ..fsutil import atomic_write, require_private

KNOWN_HOSTS = "known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    """The OpenSSH SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class PinnedHostKeys:
    def __init__(self, home: Path):
        self.path = home / KNOWN_HOSTS

    def load(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            require_private(self.path)
            keys.load(str(self.path))
        return keys

    def lookup(self, host: str, port: int) -> paramiko.PKey | None:
        entry = self.load().lookup(host_entry(host, port))
        if not entry:
            return None
        return next(iter(entry.values()))

    def pin(self, host: str, port: int, key: paramiko.PKey) -> None:
        """Pin `key` for host:port, replacing any key pinned there before."""
        keys = self.load()
        name = host_entry(host, port)
        if name in keys:
            del keys[name]
        keys.add(name, key.get_name(), key)
        self._save(keys)

    def unpin(self, host: str, port: int) -> None:
        keys = self.load()
        name = host_entry(host, port)
        if name in keys:
            del keys[name]
            self._save(keys)

    def _save(self, keys: paramiko.HostKeys) -> None:
        lines = []
        for entry in keys._entries:  # HostKeys has no public iterator over its lines
            line = entry.to_line()
            if line:
                lines.append(line)
        atomic_write(self.path, "".join(lines).encode(), mode=0o600)


def fetch_host_key(node_name: str, host: str, port: int, timeout: float = 10.0) -> paramiko.PKey:
    """Ask the SSH server for its host key without authenticating or trusting it."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise NodeUnreachable(node=node_name, msg=f"{host}:{port}: {exc.strerror or exc}") from None
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise NodeUnreachable(node=node_name, msg=f"{host}:{port}: SSH handshake failed: {exc}") from None
    finally:
        transport.close()
