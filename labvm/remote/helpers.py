"""The node-helper bundle: content-hashed, uploaded once, run with JSON on stdin.

The bundle goes to /var/lib/labvm/helpers/<sha256>/ on a node. The node's
installer recomputes the hash before publishing the directory with a rename,
so a node runs exactly the helpers this admin host holds, or none.

Besides the Python helpers the bundle carries the native tools (native/*.c), compiled, as flat
executable members: the merge helper runs labvm_merge from its own directory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from ..errors import HelperCrashed, HelperFailed, StateError
from .connection import NodeConnection

HELPERS_ROOT = "/var/lib/labvm/helpers"
ENTRY = "labvm_helper.py"
BATCH = "batch"
STDERR_TAIL = 800

# Compiled from native/<name>.c; each travels in the bundle as a flat member, mode 0755.
NATIVE_TOOLS = ("labvm_merge",)
# The same as setup.py's (tests/unit/test_packaging.py checks): -static so the tool runs on
# whatever glibc a node has.
NATIVE_CC_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-static")
NATIVE_LIBS = ("-lpthread",)
CC_TIMEOUT_S = 300

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


def checkout_root() -> Path:
    return Path(__file__).resolve().parents[2]


def native_tool(name: str) -> bytes:
    """The compiled tool: as setup.py built it into the installed package, or, in a source
    checkout (an editable install), compiled here from native/<name>.c."""
    installed = resources.files("labvm").joinpath("native", name)
    if installed.is_file():
        return installed.read_bytes()
    source = checkout_root() / "native" / f"{name}.c"
    if source.is_file():
        return compiled_from_source(source).read_bytes()
    raise StateError(
        f"the native tool {name} is missing from this labvm installation (no labvm/native/{name}, "
        f"no native/{name}.c to build it from); reinstall labvm"
    )


def native_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labvm" / "native"


def compiled_from_source(source: Path) -> Path:
    """Compile once per source (and flags), into ~/.cache/labvm/native/<sha256>/<name>. The
    compiler writes a temporary name that is renamed into place, so a half-written binary is
    never used, and two labvm processes compiling at once both end up with a whole one."""
    code = source.read_bytes()
    key = hashlib.sha256(code + b"\0" + " ".join(NATIVE_CC_FLAGS + NATIVE_LIBS).encode()).hexdigest()
    output = native_cache_dir() / key / source.stem
    if output.is_file():
        return output
    cc = shutil.which("cc")
    if cc is None:
        raise StateError(
            f"cannot build {source.stem}: no C compiler (cc) on this host; install gcc and libc6-dev, "
            "or install labvm from a wheel, which carries the tool built"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{source.stem}-", dir=output.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *NATIVE_CC_FLAGS, "-o", partial, str(source), *NATIVE_LIBS],
            capture_output=True, text=True, timeout=CC_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise StateError(f"cannot build {source.stem} from {source}: {_tail(result.stderr or result.stdout)}")
        os.chmod(partial, 0o755)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return output


@dataclass(frozen=True)
class HelperBundle:
    """The helper files shipped in this package, and their content hash. Members named in
    `executables` are installed with mode 0755, the rest 0644."""

    files: tuple[tuple[str, bytes], ...]
    executables: frozenset[str] = frozenset()

    @classmethod
    def from_package(cls) -> "HelperBundle":
        root = helper_source_dir()
        files = []
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(".py") and entry.name != "__init__.py":
                files.append((entry.name, entry.read_bytes()))
        files += [(name, native_tool(name)) for name in NATIVE_TOOLS]
        return cls(tuple(sorted(files)), frozenset(NATIVE_TOOLS))

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(name.encode() + b"\0" + data + b"\0")
        return h.hexdigest()

    @cached_property
    def tarball(self) -> bytes:
        buf = io.BytesIO()
        # gzip's header holds a time: pinned, so the same files always make the same bytes.
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
            for name, data in self.files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o755 if name in self.executables else 0o644
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
        self._install()
        return True

    def _install(self) -> None:
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

    def call(self, helper: str, action: str, params: dict | None = None, *, check: bool = False, timeout: float = 120) -> dict:
        """Run one helper action; returns the whole reply ({"ok", "changed", "data"})."""
        request = json.dumps({"action": action, "params": params or {}, "check": check})
        result = self._run_entry(helper, request, timeout)
        return parse_reply(self.conn.node.name, helper, action, result.exited, result.stdout, result.stderr)

    def call_many(self, calls: "list[HelperCall]", *, check: bool = False, done=lambda _index: None) -> list[dict]:
        """Run several helper actions in order, in one round trip (the helpers' batch). Returns
        their replies; the first that fails is raised as `call` would raise it, after `done(i)`
        was called for each call before it."""
        request = json.dumps({"steps": [
            {"helper": c.helper, "action": c.action, "params": c.params, "check": check} for c in calls
        ]})
        node = self.conn.node.name
        result = self._run_entry(BATCH, request, sum(c.timeout for c in calls))
        replies = parse_reply(node, BATCH, "run", result.exited, result.stdout, result.stderr)["data"].get("replies")
        if not isinstance(replies, list) or not 1 <= len(replies) <= len(calls):
            raise HelperCrashed(node=node, helper=BATCH, action="run", status=result.exited, tail=_tail(result.stderr))
        answered = []
        for index, (call, body) in enumerate(zip(calls, replies, strict=False)):
            exited = body.pop("exit_code", None) if isinstance(body, dict) else None
            answered.append(parse_reply(node, call.helper, call.action, exited, json.dumps(body), result.stderr))
            done(index)
        if len(answered) < len(calls):  # the node stopped early without a failure to show for it
            raise HelperCrashed(node=node, helper=calls[len(answered)].helper, action=calls[len(answered)].action,
                                status=result.exited, tail=_tail(result.stderr))
        return answered

    def _run_entry(self, helper: str, request: str, timeout: float):
        """Run the bundle's entry point for `helper`. A node without this bundle gets it first:
        found out from the run itself (python cannot open the entry), which saves every command
        a round trip to ask."""
        argv = self.conn.as_root + ["python3", f"{self.bundle.remote_dir}/{ENTRY}", helper]
        if not self._installed:
            result = self.conn.run(argv, stdin=request, timeout=timeout)
            if not _entry_missing(result):
                self._installed = True
                return result
            self._install()
        return self.conn.run(argv, stdin=request, timeout=timeout)


@dataclass(frozen=True)
class HelperCall:
    """One helper action, for `HelperRunner.call_many`; `timeout` is its share of the round trip's."""

    helper: str
    action: str
    params: dict
    timeout: float = 120


def _entry_missing(result) -> bool:
    """python3 exits 2 with "can't open file" when the bundle is not on the node; a helper's
    own exit 2 (a bad request) always comes with its JSON reply."""
    return result.exited == 2 and not result.stdout.strip() and ENTRY in result.stderr and "can't open file" in result.stderr


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
