"""labvm's OCI runtime: the shim run as containerd runs runc, against a real overlay mount and a
fake runtime that records how it was called; and the runtime helper against a fake dockerd that
re-reads its daemon.json on SIGHUP, as dockerd does."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import BUNDLE_DIR, detach_everything_under

SHIM_SOURCE = BUNDLE_DIR / "oci_shim.py"
SENTINEL = "/.labvm-rootfs"

FAKE_RUNTIME = """#!{python}
import json, os, sys
args = sys.argv[1:]
bundle = None
for index, arg in enumerate(args):
    if arg in ("--bundle", "-b"):
        bundle = args[index + 1]
    elif arg.startswith("--bundle="):
        bundle = arg.split("=", 1)[1]
record = {{"argv0": sys.argv[0], "args": args}}
if bundle:
    with open(os.path.join(bundle, "config.json")) as stream:
        record["config"] = json.load(stream)
with open(os.environ["FAKE_RUNTIME_RECORD"], "w") as stream:
    json.dump(record, stream)
"""


# --- the shim -------------------------------------------------------------------------------


class Shim:
    """A copy of oci_shim.py at <dir>/labvm-runc with its settings beside it, a fake runtime,
    and a desktop tree <dir>/<data>/vms/alice/{merge_local,disk/up_local,disk/work_local,lower}."""

    def __init__(self, root: Path, data_name: str = "data"):
        self.root = root
        self.path = root / "labvm-runc"
        shutil.copyfile(SHIM_SOURCE, self.path)
        self.runtime = root / "fake-runc"
        self.runtime.write_text(FAKE_RUNTIME.format(python=sys.executable))
        self.runtime.chmod(0o755)
        self.record = root / "record.json"
        self.log = root / "log.json"
        self.data = root / data_name
        self.settings({"runtime": str(self.runtime), "data_dirs": [str(self.data)]})
        self.bundle = root / "bundle"
        self.bundle.mkdir()

    def settings(self, document) -> None:
        Path(f"{self.path}.json").write_text(json.dumps(document))

    def desktop(self, user: str = "alice") -> Path:
        vm = self.data / "vms" / user
        for name in ("merge_local", "disk/up_local", "disk/work_local", "lower"):
            (vm / name).mkdir(parents=True, exist_ok=True)
        (vm / "lower" / "from-the-lower-layer").write_text("x")
        return vm

    def mount_overlay(self, vm: Path, upper: Path | None = None) -> Path:
        upper = upper or vm / "disk" / "up_local"
        work = upper.parent / "work_local"
        options = f"lowerdir={vm / 'lower'},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(vm / "merge_local")], check=True)
        return vm / "merge_local"

    def write_spec(self, mounts: list) -> dict:
        spec = {
            "ociVersion": "1.0.2-dev",
            "process": {"args": ["/sbin/init"], "cwd": "/"},
            "root": {"path": str(self.bundle / "rootfs"), "readonly": True},
            "hostname": "alice",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                *mounts,
                {"destination": "/etc/hosts", "type": "bind", "source": "/tmp/hosts", "options": ["rbind", "rprivate"]},
            ],
        }
        path = self.bundle / "config.json"
        path.write_text(json.dumps(spec))
        path.chmod(0o640)
        return spec

    def create_args(self, *, log_format: str = "json") -> list[str]:
        return [
            "--root", "/var/run/docker/runtime-labvm/moby", "--log", str(self.log), "--log-format", log_format,
            "--systemd-cgroup", "create", "--bundle", str(self.bundle), "--pid-file", str(self.root / "init.pid"),
            "--console-socket", str(self.root / "console.sock"), "0123456789abcdef",
        ]  # fmt: skip

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        env = dict(os.environ, FAKE_RUNTIME_RECORD=str(self.record))
        return subprocess.run([sys.executable, str(self.path), *args], capture_output=True, text=True, env=env, timeout=30)

    def recorded(self) -> dict | None:
        return json.loads(self.record.read_text()) if self.record.exists() else None

    def config_text(self) -> str:
        return (self.bundle / "config.json").read_text()


def sentinel(source) -> dict:
    return {"destination": SENTINEL, "type": "bind", "source": str(source), "options": ["rbind", "rprivate"]}


@pytest.fixture
def shim(tmp_path):
    root = tmp_path.resolve() / "node"
    root.mkdir()
    yield Shim(root)
    detach_everything_under(root)


def assert_refused(shim: Shim, process, *expected: str) -> str:
    """Exit 1, the runtime never ran, and the reason is runc's last error line and on stderr."""
    assert process.returncode == 1, process
    assert shim.recorded() is None
    line = json.loads(shim.log.read_text().splitlines()[-1])
    assert line["level"] == "error"
    assert line["time"]
    message = line["msg"]
    assert message.startswith("labvm runtime: ")
    for text in expected:
        assert text in message
    assert message in process.stderr
    return message


@pytest.mark.parametrize(
    "args",
    [
        ["--root", "/run/x", "--log", "/dev/null", "--log-format", "json", "delete", "--force", "abc"],
        ["--root=/run/x", "kill", "abc", "9"],
        ["state", "abc"],
        ["--version"],
    ],
)
def test_other_commands_pass_through_untouched(shim, args):
    process = shim.run(args)
    assert process.returncode == 0, process.stderr
    assert shim.recorded() == {"argv0": str(shim.runtime), "args": args}


def test_create_without_the_sentinel_passes_through_untouched(shim):
    shim.write_spec([{"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind"]}])
    before = shim.config_text()
    args = shim.create_args()
    process = shim.run(args)
    assert process.returncode == 0, process.stderr
    assert shim.config_text() == before
    assert shim.recorded()["args"] == args


@pytest.mark.parametrize("data_name", ["data", "data dir"])  # mountinfo writes the space as \040
def test_create_with_the_sentinel_boots_from_the_overlay(tmp_path, data_name):
    root = tmp_path.resolve() / "node"
    root.mkdir()
    shim = Shim(root, data_name)
    try:
        merge = shim.mount_overlay(shim.desktop())
        spec = shim.write_spec([sentinel(merge)])
        args = shim.create_args()
        process = shim.run(args)
        assert process.returncode == 0, process.stderr
        record = shim.recorded()
        assert record["args"] == args
        config = record["config"]
        assert config["root"] == {"path": str(merge), "readonly": False}
        assert config["mounts"] == [mount for mount in spec["mounts"] if mount["destination"] != SENTINEL]
        assert {key: value for key, value in config.items() if key not in ("root", "mounts")} == {
            key: value for key, value in spec.items() if key not in ("root", "mounts")
        }
        assert stat.S_IMODE((shim.bundle / "config.json").stat().st_mode) == 0o640
        assert [path.name for path in shim.bundle.iterdir()] == ["config.json"]
        assert (merge / "from-the-lower-layer").exists()
    finally:
        detach_everything_under(root)


@pytest.mark.parametrize("bundle_form", ["--bundle=", "-b"])
def test_run_with_the_sentinel_and_other_bundle_spellings(shim, bundle_form):
    merge = shim.mount_overlay(shim.desktop())
    shim.write_spec([sentinel(merge)])
    bundle = [f"--bundle={shim.bundle}"] if bundle_form == "--bundle=" else ["-b", str(shim.bundle)]
    args = ["--log", str(shim.log), "--log-format", "json", "run", "-d", *bundle, "ctr"]
    process = shim.run(args)
    assert process.returncode == 0, process.stderr
    assert shim.recorded()["config"]["root"]["path"] == str(merge)


def test_create_takes_the_bundle_from_the_working_directory_by_default(shim):
    merge = shim.mount_overlay(shim.desktop())
    shim.write_spec([sentinel(merge)])
    env = dict(os.environ, FAKE_RUNTIME_RECORD=str(shim.record))
    process = subprocess.run(
        [sys.executable, str(shim.path), "create", "ctr"], cwd=shim.bundle, capture_output=True, text=True, env=env, timeout=30
    )
    assert process.returncode == 0, process.stderr
    assert json.loads(shim.config_text())["root"]["path"] == str(merge)


def test_root_outside_the_data_dirs_is_refused(shim):
    shim.write_spec([sentinel("/etc")])
    before = shim.config_text()
    message = assert_refused(shim, shim.run(shim.create_args()), "refusing root /etc: not a desktop overlay under")
    assert f"{shim.data}/vms/<user>/merge_local" in message
    assert shim.config_text() == before


def test_plain_directory_is_refused(shim):
    merge = shim.desktop() / "merge_local"
    shim.write_spec([sentinel(merge)])
    assert_refused(shim, shim.run(shim.create_args()), f"refusing root {merge}", "nothing is mounted there")


def test_other_mount_than_an_overlay_is_refused(shim):
    merge = shim.desktop() / "merge_local"
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(merge)], check=True)
    shim.write_spec([sentinel(merge)])
    assert_refused(shim, shim.run(shim.create_args()), "it is a tmpfs mount, not the desktop's overlay")


def test_overlay_with_another_users_upper_is_refused(shim):
    alice, bob = shim.desktop("alice"), shim.desktop("bob")
    merge = shim.mount_overlay(alice, upper=bob / "disk" / "up_local")
    shim.write_spec([sentinel(merge)])
    assert_refused(shim, shim.run(shim.create_args()), f"upperdir is {bob / 'disk' / 'up_local'}, not {alice / 'disk' / 'up_local'}")


def test_symlinked_component_is_refused(shim):
    alice = shim.desktop("alice")
    shim.mount_overlay(alice)
    (shim.data / "vms" / "carol").symlink_to(alice)
    shim.write_spec([sentinel(shim.data / "vms" / "carol" / "merge_local")])
    assert_refused(shim, shim.run(shim.create_args()), f"{shim.data}/vms/carol is a symlink")


def test_dot_dot_in_the_path_is_refused(shim):
    merge = shim.mount_overlay(shim.desktop())
    shim.write_spec([sentinel(f"{shim.data}/vms/alice/../alice/merge_local")])
    assert merge.is_dir()
    assert_refused(shim, shim.run(shim.create_args()), "not a normalised path")


def test_two_sentinels_are_refused(shim):
    merge = shim.mount_overlay(shim.desktop())
    shim.write_spec([sentinel(merge), sentinel(merge)])
    assert_refused(shim, shim.run(shim.create_args()), "2 /.labvm-rootfs mounts")


@pytest.mark.parametrize("user", ["Alice", "al_ice", "alice-", "a" * 40])
def test_bad_user_name_is_refused(shim, user):
    shim.write_spec([sentinel(f"{shim.data}/vms/{user}/merge_local")])
    assert_refused(shim, shim.run(shim.create_args()), "is not a labvm member name")


def test_control_characters_are_escaped_and_long_paths_clipped(shim):
    shim.write_spec([sentinel("/etc/\x1b[31mred\n" + "x" * 500)])
    process = shim.run(shim.create_args())
    message = assert_refused(shim, process, "refusing root /etc/\\x1b[31mred", "holds control characters")
    assert "\x1b" not in process.stderr and "\n" not in message
    assert len(message) < 400


def test_text_log_format_is_written_as_runc_writes_it(shim):
    shim.write_spec([sentinel("/etc")])
    process = shim.run(shim.create_args(log_format="text"))
    assert process.returncode == 1 and shim.recorded() is None
    line = shim.log.read_text().splitlines()[-1]
    assert line.startswith('time="') and ' level=error msg="labvm runtime: refusing root /etc: ' in line


def test_missing_settings_refuse_a_desktop(shim):
    merge = shim.mount_overlay(shim.desktop())
    shim.write_spec([sentinel(merge)])
    Path(f"{shim.path}.json").unlink()
    assert_refused(shim, shim.run(shim.create_args()), "settings file", "is missing")


def test_settings_naming_the_shim_itself_are_refused(shim):
    shim.settings({"runtime": str(shim.path), "data_dirs": [str(shim.data)]})
    shim.write_spec([sentinel("/etc")])
    assert_refused(shim, shim.run(shim.create_args()), "names this runtime itself")


@pytest.mark.skipif(not os.access("/usr/sbin/runc", os.X_OK) and not os.access("/usr/bin/runc", os.X_OK), reason="no runc")
def test_missing_settings_still_pass_other_commands_to_runc(shim):
    Path(f"{shim.path}.json").unlink()
    process = shim.run(["--version"])
    assert process.returncode == 0, process.stderr
    assert "runc version" in process.stdout
    assert shim.recorded() is None


def test_argument_parsing(bundle):
    shim = bundle.oci_shim
    options, command, after = shim.split_args(
        ["--root", "/r", "--log=/l", "-log-format", "json", "--debug", "create", "-b", "/b", "id"]
    )
    assert (options, command, after) == ({"root": "/r", "log": "/l", "log-format": "json"}, "create", 7)
    assert shim.bundle_of(["--pid-file", "--bundle", "--bundle", "/real", "id"]) == "/real"
    assert shim.bundle_of(["--console-socket=/s", "-bundle=/b2", "id"]) == "/b2"
    assert shim.split_args(["--systemd-cgroup"]) == ({}, None, 1)


def test_mountinfo_parsing_decodes_escapes_and_picks_the_top_mount(bundle):
    shim = bundle.oci_shim
    text = (
        "30 1 0:40 / /d\\040x/vms/a/merge_local rw - tmpfs tmpfs rw\n"
        "31 30 0:41 / /d\\040x/vms/a/merge_local rw shared:5 - overlay overlay "
        "rw,lowerdir=/l,upperdir=/d\\040x/vms/a/up\\134local,workdir=/w\n"
    )
    mounts = shim.mounts_at("/d x/vms/a/merge_local", text)
    assert len(mounts) == 2
    _, _, fstype, options = shim.visible_mount(mounts)
    assert fstype == "overlay" and options["upperdir"] == "/d x/vms/a/up\\local"


# --- the helper ----------------------------------------------------------------------------

FAKE_DOCKERD = r"""
import ctypes, json, signal, socketserver, sys
from http.server import BaseHTTPRequestHandler

socket_path, daemon_json, hup_log, mode = sys.argv[1:5]
ctypes.CDLL(None).prctl(15, b"dockerd", 0, 0, 0)  # PR_SET_NAME: the helper checks whom it signals
state = {}


def load():
    try:
        with open(daemon_json) as stream:
            document = json.load(stream)
    except (OSError, ValueError):
        document = {}
    document = document if isinstance(document, dict) else {}  # dockerd would refuse to start
    listed = document.get("runtimes") if isinstance(document.get("runtimes"), dict) else {}
    runtimes = {"runc": {"path": "runc"}}
    for name, entry in listed.items():
        runtimes[name] = {"path": entry.get("path")}
    state["info"] = {"Runtimes": runtimes, "DefaultRuntime": document.get("default-runtime", "runc")}


def on_hup(signum, frame):
    with open(hup_log, "a") as stream:
        stream.write("HUP\n")
    if mode != "ignore-hup":
        load()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/v1.41/info":
            status, body = 200, json.dumps(state["info"]).encode()
        else:
            status, body = 404, b'{"message": "page not found"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


load()
signal.signal(signal.SIGHUP, on_hup)
server = Server(socket_path, Handler)
print("ready", flush=True)
server.serve_forever(poll_interval=0.1)
"""


class FakeDockerd:
    def __init__(self, directory: Path, mode: str):
        self.socket = directory / "docker.sock"
        self.daemon_json = directory / "etc-docker" / "daemon.json"
        self.daemon_json.parent.mkdir()
        self.hup_log = directory / "hups"
        self.mode = mode
        self.process = None

    def start(self) -> None:
        argv = [sys.executable, "-c", FAKE_DOCKERD, str(self.socket), str(self.daemon_json), str(self.hup_log), self.mode]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline() == "ready\n"

    def hups(self) -> int:
        return len(self.hup_log.read_text().splitlines()) if self.hup_log.exists() else 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def dockerd_factory():
    directories, fakes = [], []

    def make(mode: str = "reload", daemon_json=None) -> FakeDockerd:
        # A short directory: unix socket paths are limited to 107 bytes.
        directory = Path(tempfile.mkdtemp(prefix="labvm-rt-")).resolve()
        directories.append(directory)
        fake = FakeDockerd(directory, mode)
        if daemon_json is not None:
            fake.daemon_json.write_text(daemon_json if isinstance(daemon_json, str) else json.dumps(daemon_json))
        fake.start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()
    for directory in directories:
        shutil.rmtree(directory)


@pytest.fixture
def node(tmp_path, fake_bin):
    """A fake runc on PATH, and where the helper installs."""
    runc = fake_bin.install("runc", 'echo "$@" > "$FAKE_RUNTIME_RECORD"\n')
    root = tmp_path.resolve()
    return {"runc": str(runc), "install_dir": str(root / "var-lib-labvm" / "runtime"), "data_dir": str(root / "data")}


def call(run_helper, fake_bin, fake, node, action="ensure_runtime", check=False, **extra):
    params = {
        "data_dir": node["data_dir"],
        "docker_socket": str(fake.socket),
        "install_dir": node["install_dir"],
        "daemon_json": str(fake.daemon_json),
        "reload_timeout_s": 5,
        **extra,
    }
    return run_helper("runtime", {"action": action, "params": params, "check": check}, path_prepend=fake_bin.path)


ALL_PARTS = ["install_dir", "shim", "shim_config", "daemon_json", "dockerd"]


def test_ensure_installs_registers_and_is_idempotent(run_helper, fake_bin, dockerd_factory, node):
    original = {"log-driver": "journald", "runtimes": {"other": {"path": "/opt/other"}}, "features": {"buildkit": True}}
    fake = dockerd_factory(daemon_json=original)
    fake.daemon_json.chmod(0o640)
    shim = Path(node["install_dir"]) / "labvm-runc"

    checked = call(run_helper, fake_bin, fake, node, check=True)
    assert checked.exit_code == 0, checked.reply
    assert checked.reply["changed"] is True
    assert checked.data == {
        "shim": str(shim), "config": f"{shim}.json", "runtime": node["runc"], "registered": False, "changed_parts": ALL_PARTS,
    }  # fmt: skip
    assert not Path(node["install_dir"]).exists()
    assert json.loads(fake.daemon_json.read_text()) == original
    assert fake.hups() == 0

    first = call(run_helper, fake_bin, fake, node)
    assert first.exit_code == 0, first.reply
    assert first.reply["changed"] is True
    assert first.data["changed_parts"] == ALL_PARTS and first.data["registered"] is True
    assert fake.hups() == 1
    assert stat.S_IMODE(shim.stat().st_mode) == 0o755
    assert stat.S_IMODE(shim.parent.stat().st_mode) == 0o755
    content = shim.read_bytes()
    assert content.startswith(f"#!{sys.executable} -IS\n".encode())
    assert content.split(b"\n", 1)[1] == SHIM_SOURCE.read_bytes().split(b"\n", 1)[1]
    assert json.loads(Path(f"{shim}.json").read_text()) == {"runtime": node["runc"], "data_dirs": [node["data_dir"]]}
    assert stat.S_IMODE(Path(f"{shim}.json").stat().st_mode) == 0o644
    assert json.loads(fake.daemon_json.read_text()) == {
        **original,
        "runtimes": {"other": {"path": "/opt/other"}, "labvm": {"path": str(shim)}},
    }
    assert stat.S_IMODE(fake.daemon_json.stat().st_mode) == 0o640

    again = call(run_helper, fake_bin, fake, node)
    assert again.exit_code == 0, again.reply
    assert again.reply["changed"] is False
    assert again.data["changed_parts"] == [] and again.data["registered"] is True
    assert fake.hups() == 1

    status = call(run_helper, fake_bin, fake, node, action="runtime_status")
    assert status.exit_code == 0 and status.reply["changed"] is False
    assert status.data == {
        "shim": str(shim), "config": f"{shim}.json", "runtime": node["runc"], "installed": True, "configured": True,
        "in_daemon_json": True, "registered": True, "missing": [],
    }  # fmt: skip


def test_installed_shim_is_an_executable_that_passes_calls_to_the_real_runtime(
    run_helper, fake_bin, dockerd_factory, node, tmp_path
):
    fake = dockerd_factory()
    assert call(run_helper, fake_bin, fake, node).exit_code == 0
    record = tmp_path / "runc-args"
    shim = Path(node["install_dir"]) / "labvm-runc"
    process = subprocess.run(
        [str(shim), "--root", "/run/x", "state", "abc"], env=dict(os.environ, FAKE_RUNTIME_RECORD=str(record)), timeout=30
    )
    assert process.returncode == 0
    assert record.read_text() == "--root /run/x state abc\n"


def test_status_before_install_reports_everything_missing_and_changes_nothing(run_helper, fake_bin, dockerd_factory, node):
    fake = dockerd_factory()
    status = call(run_helper, fake_bin, fake, node, action="runtime_status")
    assert status.exit_code == 0, status.reply
    data = status.data
    assert (data["installed"], data["configured"], data["in_daemon_json"], data["registered"]) == (False, False, False, False)
    assert len(data["missing"]) == 4
    assert "dockerd lists no runtime labvm" in data["missing"][-1]
    assert not Path(node["install_dir"]).exists() and not fake.daemon_json.exists()


def test_new_daemon_json_is_made_and_a_second_data_dir_only_updates_the_settings(run_helper, fake_bin, dockerd_factory, node):
    fake = dockerd_factory()
    assert call(run_helper, fake_bin, fake, node).exit_code == 0
    assert stat.S_IMODE(fake.daemon_json.stat().st_mode) == 0o644
    shim = Path(node["install_dir"]) / "labvm-runc"
    assert json.loads(fake.daemon_json.read_text()) == {"runtimes": {"labvm": {"path": str(shim)}}}
    second = call(run_helper, fake_bin, fake, {**node, "data_dir": "/srv/labvm-data"})
    assert second.exit_code == 0, second.reply
    assert second.data["changed_parts"] == ["shim_config"]
    assert json.loads(Path(f"{shim}.json").read_text())["data_dirs"] == [node["data_dir"], "/srv/labvm-data"]
    assert fake.hups() == 1


def test_default_runtime_of_daemon_json_is_the_real_runtime(run_helper, fake_bin, dockerd_factory, node):
    nvidia = fake_bin.install("nvidia-container-runtime", "exit 0\n")
    document = {"default-runtime": "nvidia", "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "runtimeArgs": []}}}
    fake = dockerd_factory(daemon_json=document)
    run = call(run_helper, fake_bin, fake, node)
    assert run.exit_code == 0, run.reply
    assert run.data["runtime"] == str(nvidia)
    shim = Path(node["install_dir"]) / "labvm-runc"
    assert json.loads(Path(f"{shim}.json").read_text())["runtime"] == str(nvidia)
    assert json.loads(fake.daemon_json.read_text())["runtimes"]["nvidia"] == document["runtimes"]["nvidia"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"runtimes": []}'])
def test_invalid_daemon_json_is_refused_and_left_as_it_is(run_helper, fake_bin, dockerd_factory, node, text):
    fake = dockerd_factory(daemon_json=text)
    run = call(run_helper, fake_bin, fake, node)
    assert run.exit_code == 3
    assert run.error["code"] == "daemon_json_invalid"
    assert str(fake.daemon_json) in run.error["msg"]
    assert fake.daemon_json.read_text() == text
    assert not Path(node["install_dir"]).exists()
    assert fake.hups() == 0


def test_symlinked_install_dir_is_refused(run_helper, fake_bin, dockerd_factory, node, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "var-lib-labvm").symlink_to(real)
    fake = dockerd_factory()
    run = call(run_helper, fake_bin, fake, node)
    assert run.exit_code == 3
    assert run.error["code"] == "symlink_in_path"
    assert list(real.iterdir()) == [] and not fake.daemon_json.exists()


def test_dockerd_that_does_not_take_the_runtime_is_a_temporary_failure(run_helper, fake_bin, dockerd_factory, node):
    fake = dockerd_factory(mode="ignore-hup")
    run = call(run_helper, fake_bin, fake, node, reload_timeout_s=1)
    assert run.exit_code == 75
    assert run.error["code"] == "runtime_not_registered"
    assert f"dockerd (pid {fake.process.pid}) still lists no runtime labvm" in run.error["msg"]
    assert "journalctl -u docker" in run.error["msg"]
    assert fake.hups() == 1


def test_shim_user_rule_is_the_contracts(bundle):
    # The shim imports nothing from the bundle, so it spells the member name rule itself.
    assert bundle.oci_shim.USER_PATTERN.pattern == bundle.contract.USER_PATTERN
    assert bundle.runtime.SENTINEL == bundle.oci_shim.SENTINEL == SENTINEL
