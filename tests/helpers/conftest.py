"""Fixtures for the helper-contract tests: run a node helper as labvm does, and check that
whatever happens it answers with exactly one well-formed JSON object and a contract exit code."""

import importlib.util
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "scripts" / "node_helpers"
ENTRY = BUNDLE_DIR / "labvm_helper.py"
BUNDLE_MODULES = ("_contract", "_system", "probe", "mfs")
EXIT_CODES = {0, 1, 2, 3, 75}


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
    """The bundle's modules: bundle.contract, bundle.system, bundle.probe, bundle.mfs."""
    return SimpleNamespace(**{name.lstrip("_"): module for name, module in load_bundle_modules().items()})
