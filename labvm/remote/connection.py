"""SSH to one node through Fabric, refusing any host key but the pinned one."""

from __future__ import annotations

import os
import select
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paramiko
from fabric import Connection

from ..config import Node
from ..errors import HostKeyMismatch, HostKeyUnknown, NodeError, NodeUnreachable
from .hostkeys import PinnedHostKeys, fingerprint

IDENTITY = "id_ed25519"
CONNECT_TIMEOUT = 10
UPLOAD_CHUNK = 1 << 20

# progress(bytes_done, bytes_total)
UploadProgress = Callable[[int, int], None]


@dataclass
class CommandResult:
    exited: int
    stdout: str
    stderr: str


def _drain(channel: paramiko.Channel, deadline: float | None) -> tuple[str | None, str]:
    """Read stdout and stderr until the command exits; (None, ...) if the deadline passed first."""
    out, err = bytearray(), bytearray()
    while True:
        while channel.recv_ready():
            out += channel.recv(1 << 16)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(1 << 16)
        if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
            if channel.eof_received or channel.closed:
                return out.decode(errors="replace"), err.decode(errors="replace")
        if deadline is not None and time.monotonic() > deadline:
            return None, err.decode(errors="replace")
        select.select([channel], [], [], 0.05)


class NodeConnection:
    """A lazy SSH connection to one node. Commands are argument lists, never shell strings."""

    def __init__(self, node: Node, home: Path, connect_timeout: float = CONNECT_TIMEOUT):
        self.node = node
        self.home = home
        self._pins = PinnedHostKeys(home)
        self._conn = self._make_connection(connect_timeout)

    def _make_connection(self, connect_timeout: float) -> Connection:
        identity = self.home / IDENTITY
        connect_kwargs = {
            "allow_agent": not identity.exists(),
            "look_for_keys": not identity.exists(),
            "banner_timeout": connect_timeout,
            "auth_timeout": connect_timeout,
        }
        if identity.exists():
            connect_kwargs["key_filename"] = str(identity)
        conn = Connection(
            host=self.node.host,
            port=self.node.port,
            user=self.node.user,
            connect_timeout=int(connect_timeout),
            connect_kwargs=connect_kwargs,
        )
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        host_keys = conn.client.get_host_keys()
        host_keys.clear()
        host_keys.update(self._pins.load())
        return conn

    @property
    def as_root(self) -> list[str]:
        """The prefix that runs a command as root on this node."""
        return [] if self.node.user == "root" else ["sudo", "-n", "--"]

    def open(self) -> None:
        if self._conn.is_connected:
            return
        if self._pins.lookup(self.node.host, self.node.port) is None:
            raise HostKeyUnknown(node=self.node.name, host=self.node.host, port=self.node.port)
        try:
            self._conn.open()
        except paramiko.BadHostKeyException as exc:
            raise HostKeyMismatch(node=self.node.name, fingerprint=fingerprint(exc.key)) from None
        except paramiko.AuthenticationException as exc:
            raise NodeUnreachable(node=self.node.name, msg=f"SSH login as {self.node.user} refused: {exc}") from None
        except (socket.timeout, TimeoutError):
            raise NodeUnreachable(node=self.node.name, msg=f"{self.node.host}:{self.node.port}: connection timed out") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise NodeUnreachable(node=self.node.name, msg=f"{self.node.host}:{self.node.port}: {detail}") from None

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> CommandResult:
        """Run argv on the node; `stdin` (where secrets travel) is sent whole, then closed.

        This drives a paramiko channel directly: invoke's runner feeds stdin one
        byte per 10 ms, far too slow for a helper bundle.
        """
        self.open()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            channel = self._conn.client.get_transport().open_session(timeout=CONNECT_TIMEOUT)
        except (paramiko.SSHException, OSError, EOFError, AttributeError) as exc:
            raise NodeUnreachable(node=self.node.name, msg=f"SSH session failed: {exc}") from None
        try:
            channel.exec_command(shlex.join(argv))
            channel.sendall(stdin.encode())
            channel.shutdown_write()
            stdout, stderr = _drain(channel, deadline)
            if stdout is None:
                raise NodeError(node=self.node.name, msg=f"command timed out after {timeout:g}s: {argv[0]}")
            return CommandResult(channel.recv_exit_status(), stdout, stderr)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise NodeUnreachable(node=self.node.name, msg=f"SSH session failed: {exc}") from None
        finally:
            channel.close()

    def put(
        self, local_path: str | os.PathLike, remote_path: str, progress: UploadProgress | None = None, mode: int = 0o600
    ) -> int:
        """Upload a file over SFTP as the login user; returns the bytes sent.

        The remote file is made `mode` before any data goes in, so a private file is never
        readable by others, even half-written.
        """
        self.open()
        with open(local_path, "rb") as source:
            total = os.fstat(source.fileno()).st_size
            try:
                landed = self._send(source, remote_path, total, progress, mode)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # paramiko reports SFTP status errors (permission denied, no such directory) as OSError.
                detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise NodeError(node=self.node.name, msg=f"upload to {remote_path} failed: {detail}") from None
        if landed != total:
            raise NodeError(node=self.node.name, msg=f"upload to {remote_path} is {landed} bytes, not {total}")
        return total

    def _send(self, source, remote_path: str, total: int, progress: UploadProgress | None, mode: int) -> int:
        sftp = self._conn.sftp()
        with sftp.open(remote_path, "wb") as target:
            target.chmod(mode)
            # Pipelined: writes do not wait for each acknowledgement, which is what makes SFTP
            # usable for hundreds of MB. A failed write still raises, at close at the latest.
            target.set_pipelined(True)
            done = 0
            while chunk := source.read(UPLOAD_CHUNK):
                target.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return sftp.stat(remote_path).st_size

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
