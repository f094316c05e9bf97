"""Fixtures for the helper-contract tests: run a node helper as labvm does, and check that
whatever happens it answers with exactly one well-formed JSON object and a contract exit code."""

import ctypes
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import pytest

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "scripts" / "node_helpers"
ENTRY = BUNDLE_DIR / "labvm_helper.py"
# In import order: a module comes after every sibling it imports at its top.
BUNDLE_MODULES = (
    "_contract", "_system", "_layout", "_tree", "_images", "_docker", "net", "oci_shim", "runtime", "probe", "mfs", "image",
    "_spec", "_owner", "_disk", "_runtime_dir", "_web", "_container", "_stack", "vm", "files", "merge", "metrics", "syncd", "sync",
)
EXIT_CODES = {0, 1, 2, 3, 75}
MNT_DETACH = 2


@dataclass(frozen=True)
class HelperRun:
    exit_code: int
    reply: dict
    stdout: str
    stderr: str

    @property
    def data(self) -> dict:
        assert self.reply["ok"], self.reply
        return self.reply["data"]

    @property
    def error(self) -> dict:
        assert not self.reply["ok"], self.reply
        return self.reply["error"]


def only_json_object(stdout: str) -> dict:
    """stdout must be one JSON object on one line and nothing else."""
    value, end = json.JSONDecoder().raw_decode(stdout)
    assert stdout[end:] == "\n", f"more than one object on stdout: {stdout!r}"
    assert isinstance(value, dict), f"stdout is not a JSON object: {stdout!r}"
    return value


def assert_reply_shape(reply: dict, exit_code: int) -> None:
    assert exit_code in EXIT_CODES, exit_code
    if exit_code == 0:
        assert set(reply) == {"ok", "changed", "data"}
        assert reply["ok"] is True
        assert isinstance(reply["changed"], bool)
        assert isinstance(reply["data"], dict)
        return
    assert set(reply) == {"ok", "error"}
    assert reply["ok"] is False
    error = reply["error"]
    assert set(error) == {"code", "msg", "retryable"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["msg"], str) and error["msg"]
    assert error["retryable"] is (exit_code == 75)


def run_entry(args: list[str], stdin: bytes, cwd: Path, env: dict, timeout: float) -> HelperRun:
    # -I: isolated mode leaves the script's own directory off sys.path, as a stricter node
    # python might; the entry point must find its siblings by itself.
    process = subprocess.run(
        [sys.executable, "-I", str(ENTRY), *args], input=stdin, capture_output=True, cwd=cwd, env=env, timeout=timeout
    )
    stdout = process.stdout.decode()
    reply = only_json_object(stdout)
    assert_reply_shape(reply, process.returncode)
    return HelperRun(process.returncode, reply, stdout, process.stderr.decode())


@pytest.fixture
def run_helper(tmp_path):
    """run_helper(helper, request, raw=None, path_prepend=None, args=None, timeout=60)."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    def run(helper, request=None, *, raw=None, path_prepend=None, args=None, timeout=60):
        stdin = raw if raw is not None else json.dumps(request).encode()
        env = dict(os.environ)
        if path_prepend is not None:
            env["PATH"] = f"{path_prepend}{os.pathsep}{env.get('PATH', '')}"
        argv = args if args is not None else [helper]
        return run_entry(argv, stdin, workdir, env, timeout)

    return run


@pytest.fixture
def fake_bin(tmp_path):
    """A directory for fake tools; install(name, shell_body) writes an executable script."""
    directory = tmp_path / "fake-bin"
    directory.mkdir()

    def install(name: str, body: str) -> Path:
        path = directory / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    return SimpleNamespace(path=directory, install=install)


def load_bundle_modules() -> dict:
    """Import the bundle's modules from their files, the way labvm_helper.py sees them
    (siblings import each other by plain name), without leaving those plain names in
    sys.modules or bytecode in the bundle."""
    saved_modules = {name: sys.modules.get(name) for name in BUNDLE_MODULES}
    saved_flag = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    loaded = {}
    try:
        for name in BUNDLE_MODULES:
            spec = importlib.util.spec_from_file_location(name, BUNDLE_DIR / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        sys.dont_write_bytecode = saved_flag
        for name, previous in saved_modules.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return loaded


@pytest.fixture(scope="session")
def bundle():
    """The bundle's modules, each by its name without a leading underscore: bundle.contract, bundle.system,
    bundle.docker, bundle.probe, bundle.mfs, bundle.image, bundle.vm and its parts (bundle.spec, bundle.owner,
    bundle.disk, bundle.runtime_dir, bundle.container, bundle.stack), bundle.files, bundle.merge, bundle.metrics,
    bundle.syncd, bundle.sync, bundle.oci_shim, bundle.runtime."""
    return SimpleNamespace(**{name.lstrip("_"): module for name, module in load_bundle_modules().items()})


# --- mounts made by a test -----------------------------------------------------------------


def mount_points_under(root) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as stream:
        # The kernel writes a space in a mount point as \040 (tab, newline, backslash alike).
        points = [re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), line.split()[4]) for line in stream]
    return [point for point in points if point.startswith(prefix)]


def detach_everything_under(root) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(20):
        points = sorted(set(mount_points_under(root)), key=len, reverse=True)
        if not points:
            return
        for point in points:
            libc.umount2(os.fsencode(point), MNT_DETACH)


# --- a fake dockerd on a unix socket ------------------------------------------------------


class FakeDockerHandler(BaseHTTPRequestHandler):
    """The few endpoints the helpers use: GET /version, GET /images/NAME/json and
    POST /images/create?fromSrc=- (docker import)."""

    def do_GET(self):
        fake = self.server.fake
        fake.requests.append(("GET", self.path))
        if fake.hang:
            fake.released.wait(15)
            return
        if self.path.startswith("/images/") and self.path.endswith("/json"):
            name = urllib.parse.unquote(self.path[len("/images/") : -len("/json")])
            if fake.inspect_error:
                self.answer(*fake.inspect_error)
                return
            image = fake.images.get(name)
            if image is None:
                self.answer(404, json.dumps({"message": f"No such image: {name}"}))
            else:
                self.answer(200, json.dumps({"Id": image["Id"], "RepoTags": [name]}))
            return
        self.answer(fake.status, fake.body)

    def do_POST(self):
        fake = self.server.fake
        fake.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path != "/images/create" or query.get("fromSrc") != "-":
            self.answer(404, json.dumps({"message": "page not found"}))
            return
        if fake.import_error:
            self.answer(200, json.dumps({"errorDetail": {"message": fake.import_error}, "error": fake.import_error}) + "\r\n")
            return
        image_id = "sha256:" + hashlib.sha256(body).hexdigest()
        fake.imported.append(
            {"repo": query.get("repo"), "tag": query.get("tag"), "body": body, "content_type": self.headers.get("Content-Type")}
        )
        if not fake.import_forgets:
            fake.images[f"{query['repo']}:{query['tag']}"] = {"Id": image_id}
        self.answer(200, json.dumps({"status": image_id}) + "\r\n")

    def answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self):
        return "unix"  # a unix socket peer has no address

    def log_message(self, *args):
        pass


class FakeDockerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeDocker:
    """Answers like dockerd 20.10 unless told otherwise: `status`/`body` for GET /version,
    `images` (name:tag -> {"Id"}) and `inspect_error` (status, body) for GET /images/NAME/json,
    `import_error` and `import_forgets` for docker import."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.status = 200
        self.body = json.dumps({"Version": "20.10.24+dfsg1", "ApiVersion": "1.41", "MinAPIVersion": "1.12", "Os": "linux"})
        self.hang = False
        self.released = threading.Event()
        self.requests = []
        self.images = {}
        self.imported = []
        self.import_error = None
        self.inspect_error = None
        self.import_forgets = False
        self.server = FakeDockerServer(socket_path, FakeDockerHandler)
        self.server.fake = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_docker():
    # A short directory: unix socket paths are limited to 107 bytes.
    directory = tempfile.mkdtemp(prefix="labvm-docker-")
    fake = FakeDocker(os.path.join(directory, "docker.sock"))
    yield fake
    fake.stop()
    shutil.rmtree(directory)
