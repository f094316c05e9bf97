"""The node-helper bundle: content-hashed, uploaded once, run with JSON on stdin.

The bundle goes to /var/lib/labvm/helpers/<sha256>/ on a node. The node's
installer recomputes the hash before publishing the directory with a rename,
so a node runs exactly the helpers this admin host holds, or none.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from ..errors import HelperCrashed, HelperFailed, StateError
from .connection import NodeConnection

HELPERS_ROOT = "/var/lib/labvm/helpers"
ENTRY = "labvm_helper.py"
STDERR_TAIL = 800

# Runs on the node as root, from `python3 -c`; the tarball arrives base64 on stdin.
_INSTALLER = r"""
import base64, hashlib, io, os, shutil, sys, tarfile, tempfile
root, want = sys.argv[1], sys.argv[2]
final = os.path.join(root, want)
if os.path.isfile(os.path.join(final, ".complete")):
    sys.exit(0)
os.makedirs(root, mode=0o755, exist_ok=True)
data = base64.b64decode(sys.stdin.read())
tmp = tempfile.mkdtemp(prefix=".incoming-", dir=root)
try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                sys.exit("bundle holds an unexpected member: " + repr(member.name))
        tar.extractall(tmp)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(tmp):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, tmp)
            with open(path, "rb") as f:
                h.update(rel.encode() + b"\0" + f.read() + b"\0")
    if h.hexdigest() != want:
        sys.exit("bundle hash mismatch: got " + h.hexdigest())
    os.chmod(tmp, 0o755)
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
finally:
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
"""


def helper_source_dir():
    """The helpers as installed (package data), or in a source checkout (editable install)."""
    installed = resources.files("labvm").joinpath("node_helpers")
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2] / "scripts" / "node_helpers"
    if checkout.is_dir():
        return checkout
    raise StateError("node helpers are missing from this labvm installation; reinstall labvm")


@dataclass(frozen=True)
class HelperBundle:
    """The helper files shipped in this package, and their content hash."""

    files: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_package(cls) -> "HelperBundle":
        root = helper_source_dir()
        files = []
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(".py") and entry.name != "__init__.py":
                files.append((entry.name, entry.read_bytes()))
        return cls(tuple(files))

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(name.encode() + b"\0" + data + b"\0")
        return h.hexdigest()

    @cached_property
    def tarball(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in self.files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    @property
    def remote_dir(self) -> str:
        return f"{HELPERS_ROOT}/{self.sha256}"


class HelperRunner:
    """Runs helpers on one node, installing the bundle the first time it is needed."""

    def __init__(self, conn: NodeConnection, bundle: HelperBundle):
        self.conn = conn
        self.bundle = bundle
        self._installed = False

    def ensure_installed(self) -> bool:
        """Upload the bundle unless the node already has this exact version. Returns True if uploaded."""
        if self._installed:
            return False
        probe = self.conn.run(["test", "-f", f"{self.bundle.remote_dir}/.complete"])
        if probe.exited == 0:
            self._installed = True
            return False
        payload = base64.b64encode(self.bundle.tarball).decode()
        argv = self.conn.as_root + ["python3", "-c", _INSTALLER, HELPERS_ROOT, self.bundle.sha256]
        result = self.conn.run(argv, stdin=payload, timeout=120)
        if result.exited != 0:
            raise HelperCrashed(
                node=self.conn.node.name,
                helper="bundle",
                action="install",
                status=result.exited,
                tail=_tail(result.stderr),
            )
        self._installed = True
        return True

    def call(self, helper: str, action: str, params: dict | None = None, *, check: bool = False, timeout: float = 120) -> dict:
        """Run one helper action; returns the whole reply ({"ok", "changed", "data"})."""
        self.ensure_installed()
        request = json.dumps({"action": action, "params": params or {}, "check": check})
        argv = self.conn.as_root + ["python3", f"{self.bundle.remote_dir}/{ENTRY}", helper]
        result = self.conn.run(argv, stdin=request, timeout=timeout)
        return parse_reply(self.conn.node.name, helper, action, result.exited, result.stdout, result.stderr)


def _tail(text: str) -> str:
    text = text.strip()
    if not text:
        return "(no output)"
    return text[-STDERR_TAIL:].replace("\n", " | ")


KNOWN_EXITS = {0, 1, 2, 3, 75}


def parse_reply(node: str, helper: str, action: str, exited: int, stdout: str, stderr: str) -> dict:
    """Apply the helper contract: one JSON object on stdout and a known exit code, or it crashed."""
    try:
        reply = json.loads(stdout)
    except ValueError:
        reply = None
    if exited not in KNOWN_EXITS or not isinstance(reply, dict) or "ok" not in reply:
        raise HelperCrashed(node=node, helper=helper, action=action, status=exited, tail=_tail(stderr or stdout))
    if reply["ok"] and exited == 0:
        reply.setdefault("changed", False)
        reply.setdefault("data", {})
        return reply
    error = reply.get("error") or {}
    raise HelperFailed(
        node,
        helper,
        action,
        code=error.get("code", "failed"),
        msg=error.get("msg", "no message"),
        retryable=bool(error.get("retryable")),
        exit_status=exited,
    )
