"""Desktop images on the admin side: the docker base tar, the mirror, the build cache, packing
(checked by unpacking with the real node helper), and pushing to nodes with fake transport."""

import hashlib
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from labvm import images
from labvm.config import ClusterConfig, Node, Storage
from labvm.errors import BadInput, ImageBuildFailed, NodeError, NotFound, ToolMissing
from labvm.images import (
    FALLBACK_MIRROR,
    ImageInfo,
    base_image_tag,
    base_image_tar,
    build_image,
    check_mirror,
    detect_mirror,
    image_cache_key,
    image_sha256,
    mirror_from_deb822,
    mirror_from_sources_list,
    pack_rootfs,
    push_image,
)
from labvm.remote.connection import CommandResult

HELPER = Path(__file__).resolve().parents[2] / "scripts" / "node_helpers" / "labvm_helper.py"

# --- the docker base image ----------------------------------------------------------------


def base_members():
    with tarfile.open(fileobj=io.BytesIO(base_image_tar())) as tar:
        return {member.name: member for member in tar.getmembers()}


def test_base_tar_is_the_same_bytes_every_time():
    assert base_image_tar() == base_image_tar()
    # ... and in another interpreter, where nothing of this process's state can leak in.
    code = "import sys; from labvm.images import base_image_tar; sys.stdout.buffer.write(base_image_tar())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout == base_image_tar()


def test_base_tar_has_usr_merge_links_and_mount_points():
    members = base_members()
    links = {name: m.linkname for name, m in members.items() if m.issym()}
    assert links == {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
    dirs = {name for name, m in members.items() if m.isdir()}
    for name in ("usr", "etc", "var", "home", "root", "opt", "srv", "tmp", "proc", "sys", "dev", "run", "mnt", "media"):
        assert name in dirs
    # Every link points at a directory the tar holds, so the image is whole on its own.
    assert set(links.values()) <= dirs
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert stat.S_IMODE(members["root"].mode) == 0o700
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members.values())
    assert not [m for m in members.values() if m.isfile()]


def test_base_tag_names_the_tar_content():
    tag = base_image_tag()
    assert re.fullmatch(r"labvm/base:[0-9a-f]{12}", tag)
    assert tag == f"labvm/base:{hashlib.sha256(base_image_tar()).hexdigest()[:12]}"
    assert base_image_tag(b"other") != tag


# --- the mirror ---------------------------------------------------------------------------

DEBIAN_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.mark.parametrize(
    "text, mirror",
    [
        (DEBIAN_SOURCES, "http://deb.debian.org/debian"),
        # The security archive listed first is not the mirror: the one serving the suite is.
        ("Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n" + DEBIAN_SOURCES,
         "http://deb.debian.org/debian"),
        ("Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
         "Types: deb\nURIs: https://mirror.example/debian/\nSuites: bookworm\n", "https://mirror.example/debian"),
        ("Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
         "Types: deb deb-src\nURIs: cdrom:/media file:/srv/debian http://on.example/debian\nSuites: bookworm\n",
         "http://on.example/debian"),
        ("types: deb\nuris:\n http://folded.example/debian\nsuites: bookworm\n", "http://folded.example/debian"),
        ("Types: deb\nURIs: http://other.example/debian\nSuites: trixie\n", "http://other.example/debian"),
        ("# nothing here\n", None),
        ("Types: deb\nURIs: file:/srv/mirror\nSuites: bookworm\n", None),
    ],
)  # fmt: skip
def test_mirror_from_deb822_sources(text, mirror):
    assert mirror_from_deb822(text) == mirror


@pytest.mark.parametrize(
    "text, mirror",
    [
        ("deb http://deb.debian.org/debian bookworm main\n", "http://deb.debian.org/debian"),
        ("# deb http://old.example/debian bookworm main\ndeb-src http://src.example/debian bookworm main\n"
         "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://m.example/debian/ bookworm main # note\n",
         "http://m.example/debian"),
        ("deb http://security.debian.org/debian-security bookworm-security main\n"
         "deb http://ftp.example/debian bookworm main\n", "http://ftp.example/debian"),
        ("deb cdrom:[Debian 12]/ bookworm main\n", None),
        ("", None),
    ],
)  # fmt: skip
def test_mirror_from_sources_list(text, mirror):
    assert mirror_from_sources_list(text) == mirror


def test_detect_mirror_prefers_debian_sources_then_sources_list_then_deb_debian_org(tmp_path):
    assert detect_mirror(tmp_path) == FALLBACK_MIRROR
    (tmp_path / "sources.list").write_text("deb http://list.example/debian bookworm main\n")
    assert detect_mirror(tmp_path) == "http://list.example/debian"
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://d822.example/debian\nSuites: bookworm\n"
    )
    assert detect_mirror(tmp_path) == "http://d822.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text("# emptied\n")
    assert detect_mirror(tmp_path) == "http://list.example/debian"


@pytest.mark.parametrize(
    "mirror", ["ftp://x.example/debian", "http://x y/debian", "http://x.example/debian;rm", "deb.debian.org", ""]
)
def test_a_mirror_that_is_not_an_http_url_is_refused(mirror):
    with pytest.raises(BadInput, match="not a Debian mirror URL"):
        check_mirror(mirror)


def test_a_good_mirror_loses_its_trailing_slash():
    assert check_mirror(" http://deb.debian.org:8080/debian/ ") == "http://deb.debian.org:8080/debian"


# --- the build cache ----------------------------------------------------------------------

MIRROR = "http://deb.debian.org/debian"


def test_cache_key_depends_on_what_goes_into_the_image_and_nothing_else(monkeypatch):
    key = image_cache_key("minimal", ["xterm", "twm"], MIRROR)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert image_cache_key("minimal", ["twm", "xterm", "twm"], MIRROR + "/") == key
    assert image_cache_key("xfce", ["xterm", "twm"], MIRROR) != key
    assert image_cache_key("minimal", ["xterm"], MIRROR) != key
    assert image_cache_key("minimal", ["xterm", "twm"], "http://other.example/debian") != key
    assert image_cache_key("minimal", ["xterm", "twm"], MIRROR, suite="trixie") != key
    assert image_cache_key("minimal", ["xterm", "twm"], MIRROR, arch="aarch64") != image_cache_key(
        "minimal", ["xterm", "twm"], MIRROR, arch="x86_64"
    )
    monkeypatch.setattr(images, "RECIPE_VERSION", images.RECIPE_VERSION + 1)
    assert image_cache_key("minimal", ["xterm", "twm"], MIRROR) != key


def plant_cached_image(cache_dir: Path, desktop: str, content: bytes = b"fake image") -> Path:
    key = image_cache_key(desktop, images.desktop_packages(desktop), MIRROR)
    path = cache_dir / images.BUILT_CACHE / f"labvm-{desktop}-{key[:16]}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    info = ImageInfo(path, hashlib.sha256(content).hexdigest(), len(content), desktop, images.desktop_packages(desktop),
                     61.5, MIRROR, "2025-05-20T10:11:12Z")  # fmt: skip
    images._metadata_path(path).write_text(json.dumps(info.to_dict()))
    return path


class BuildAttempted(Exception):
    pass


@pytest.fixture
def no_real_build(monkeypatch):
    def refuse():
        raise BuildAttempted()

    monkeypatch.setattr(images, "_require_build_tools", refuse)


def test_a_cached_image_is_returned_without_building(tmp_path, no_real_build):
    cached = plant_cached_image(tmp_path / "cache", "minimal")
    info = build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)
    assert info.cached is True
    assert info.path == tmp_path / "out" / f"labvm-minimal-20250520-{info.sha256[:12]}.tar.gz"
    assert os.path.samefile(info.path, cached)  # a hard link, not a copy of hundreds of MB
    assert info.sha256 == hashlib.sha256(b"fake image").hexdigest() and info.size == len(b"fake image")
    assert info.packages == images.DESKTOP_PACKAGES["minimal"] and info.built == "2025-05-20T10:11:12Z"
    assert info.path.with_name(info.path.name + ".sha256").read_text() == f"{info.sha256}  {info.path.name}\n"
    assert image_sha256(info.path) == info.sha256
    # Asking again, or into the cache dir itself, is fine too.
    assert build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR).path == info.path
    assert build_image("minimal", tmp_path / "cache", cache_dir=tmp_path / "cache", mirror=MIRROR).cached


def test_rebuild_or_another_recipe_does_not_take_the_cache(tmp_path, no_real_build):
    plant_cached_image(tmp_path / "cache", "minimal")
    with pytest.raises(BuildAttempted):
        build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR, rebuild=True)
    with pytest.raises(BuildAttempted):
        build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror="http://other.example/debian")
    with pytest.raises(BuildAttempted):
        build_image("xfce", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)


def test_a_cached_image_whose_size_changed_is_not_trusted(tmp_path, no_real_build):
    cached = plant_cached_image(tmp_path / "cache", "minimal")
    cached.write_bytes(b"truncated")
    with pytest.raises(BuildAttempted):
        build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)


def test_unknown_desktop_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="unknown desktop 'kde'; choose one of: minimal, xfce"):
        build_image("kde", tmp_path, cache_dir=tmp_path, mirror=MIRROR)


@pytest.mark.skipif(os.geteuid() != 0, reason="the debootstrap check comes after the root check")
def test_missing_debootstrap_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "SBIN_PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ToolMissing) as error:
        build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)
    assert str(error.value) == "debootstrap is not installed on this host; install it with: apt-get install debootstrap"
    assert error.value.exit_code == 9


def test_a_failing_build_step_names_the_step_and_the_end_of_its_log(tmp_path):
    build = images._Build("minimal", tmp_path / "build.log", lambda message: None)
    script = "for i in 1 2 3 4 5 6 7 8; do echo line $i; done; echo 'E: Couldnt find these debs: nope' >&2; exit 3"
    with pytest.raises(ImageBuildFailed) as error:
        build.run("debootstrap", ["sh", "-c", script])
    message = str(error.value)
    assert message.startswith("building the minimal image failed at debootstrap: sh exited with 3: ")
    assert "line 8 | E: Couldnt find these debs: nope" in message and "line 2" not in message
    assert message.endswith(f"(full log: {tmp_path / 'build.log'})")


def test_image_sha256_reads_the_checksum_file_or_hashes(tmp_path):
    image = tmp_path / "labvm-minimal-20250101.tar.gz"
    image.write_bytes(b"abc")
    assert image_sha256(image) == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "labvm-minimal-20250101.tar.gz.sha256").write_text(f"{'e' * 64}  {image.name}\n")
    assert image_sha256(image) == "e" * 64
    with pytest.raises(NotFound):
        image_sha256(tmp_path / "missing.tar.gz")


# --- packing, checked by unpacking with the node helper -----------------------------------


def helper(name: str, request: dict) -> dict:
    process = subprocess.run([sys.executable, "-I", str(HELPER), name], input=json.dumps(request).encode(), capture_output=True)
    reply = json.loads(process.stdout)
    assert process.returncode == 0, (reply, process.stderr.decode())
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: numeric owners, setuid and trusted xattrs")
def test_pack_then_unpack_keeps_owners_modes_xattrs_and_hard_links(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "home/alice").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    tool = rootfs / "usr/bin/tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o4755)
    os.link(tool, rootfs / "usr/bin/tool-again")
    (rootfs / "bin").symlink_to("usr/bin")
    notes = rootfs / "home/alice/notes"
    notes.write_text("private\n")
    os.chown(notes, 1234, 1234)
    os.chown(rootfs / "home/alice", 1234, 1234)
    (rootfs / "home/alice").chmod(0o700)
    os.setxattr(notes, "user.x", b"kept")
    os.setxattr(rootfs / "etc", "trusted.overlay.opaque", b"y")

    tarball = tmp_path / "image.tar.gz"
    sha256, size = pack_rootfs(rootfs, tarball)
    assert size == tarball.stat().st_size and sha256 == hashlib.sha256(tarball.read_bytes()).hexdigest()

    store = {"images": str(tmp_path / "node" / "images"), "legacy": str(tmp_path / "node" / "xfce_local")}
    xfce_local = tmp_path / "node" / "images" / sha256
    reply = helper(
        "image",
        {"action": "ensure_unpacked", "params": {"store": store, "tarball": str(tarball), "sha256": sha256}},
    )
    assert reply["changed"] is True and reply["data"]["id"] == sha256
    unpacked_tool = os.lstat(xfce_local / "usr/bin/tool")
    assert stat.S_IMODE(unpacked_tool.st_mode) == 0o4755
    assert unpacked_tool.st_ino == os.lstat(xfce_local / "usr/bin/tool-again").st_ino
    assert os.readlink(xfce_local / "bin") == "usr/bin"
    unpacked_notes = os.lstat(xfce_local / "home/alice/notes")
    assert (unpacked_notes.st_uid, unpacked_notes.st_gid) == (1234, 1234)
    assert stat.S_IMODE(os.lstat(xfce_local / "home/alice").st_mode) == 0o700
    assert os.getxattr(xfce_local / "home/alice/notes", "user.x") == b"kept"
    assert os.getxattr(xfce_local / "etc", "trusted.overlay.opaque") == b"y"


# --- pushing ------------------------------------------------------------------------------


class FakeConnection:
    """Stands in for NodeConnection: records uploads and commands, per node."""

    log: dict = {}
    fail_upload: set = set()

    def __init__(self, node, home):
        self.node = node
        self.as_root = []
        self.calls = FakeConnection.log.setdefault(node.name, [])

    def run(self, argv, stdin="", timeout=None):
        self.calls.append(("run", argv))
        return CommandResult(0, "", "")

    def put(self, local, remote, progress=None, mode=0o600):
        self.calls.append(("put", remote, mode))
        if self.node.name in FakeConnection.fail_upload:
            raise NodeError(node=self.node.name, msg=f"upload to {remote} failed: No space left on device")
        size = os.path.getsize(local)
        progress(size // 2, size)
        progress(size, size)
        return size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeRunner:
    """Stands in for HelperRunner: answers from a per-node image state."""

    state: dict = {}

    def __init__(self, conn, bundle):
        self.conn = conn

    def call(self, helper, action, params=None, *, check=False, timeout=120):
        assert helper == "image"
        node = self.conn.node.name
        self.conn.calls.append(("call", action, {k: v for k, v in (params or {}).items() if k != "tar_b64"}))
        held = FakeRunner.state.setdefault(node, {"images": [], "base": False})
        if action == "status":
            return {"ok": True, "changed": False, "data": {"images": [{"id": i, "legacy": False, "in_use_by": []}
                                                                      for i in held["images"]]}}
        if action == "ensure_unpacked":
            held["images"].append(params["sha256"])
            return {"ok": True, "changed": True, "data": {"id": params["sha256"]}}
        created = not held["base"]
        held["base"] = True
        return {"ok": True, "changed": created, "data": {"tag": params["tag"], "id": "sha256:x"}}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    FakeConnection.log, FakeConnection.fail_upload, FakeRunner.state = {}, set(), {}
    monkeypatch.setattr(images, "NodeConnection", FakeConnection)
    monkeypatch.setattr(images, "HelperRunner", FakeRunner)
    nodes = tuple(Node(name=f"n{i}", host=f"10.0.0.{i}") for i in (1, 2, 3))
    cfg = ClusterConfig(path=tmp_path / "bkConfxml.xml", storage=Storage("m", "/mnt/mfs", "/labvm"),
                        xfce_local="/var/lib/labvm/xfce_local", nodes=nodes)  # fmt: skip
    image = tmp_path / "labvm-minimal-20250101.tar.gz"
    image.write_bytes(b"x" * 1000)
    return cfg, image, hashlib.sha256(image.read_bytes()).hexdigest()


def test_push_uploads_only_where_the_image_is_missing_and_cleans_up(cluster):
    cfg, image, sha256 = cluster
    FakeRunner.state["n2"] = {"images": [sha256], "base": True}
    seen, lock = [], threading.Lock()

    def progress(node, done, total):
        with lock:
            seen.append((node, done, total))

    outcomes = push_image(cfg, image, sha256, None, progress=progress)
    assert [o.node for o in outcomes] == ["n1", "n2", "n3"] and all(o.ok for o in outcomes)
    n1, n2 = outcomes[0].value, outcomes[1].value
    assert (n1.uploaded, n1.base_created) == (True, True)
    assert (n2.uploaded, n2.base_created) == (False, False)
    assert FakeRunner.state["n1"]["images"] == [sha256]
    assert n1.base_tag == base_image_tag()

    calls = FakeConnection.log["n1"]
    [put] = [c for c in calls if c[0] == "put"]
    remote = put[1]
    assert remote.startswith(f"{images.INCOMING_DIR}/{sha256[:16]}.") and put[2] == 0o600
    [unpack] = [c for c in calls if c[:2] == ("call", "ensure_unpacked")]
    assert unpack[2] == {"store": {"images": cfg.images_local, "legacy": cfg.xfce_local}, "tarball": remote, "sha256": sha256}
    assert cfg.images_local == "/var/lib/labvm/images"
    assert calls.index(unpack) < calls.index(("run", ["rm", "-f", "--", remote]))
    assert not [c for c in FakeConnection.log["n2"] if c[0] == "put"]
    assert ("n1", 1000, 1000) in seen and ("n2", 1000, 1000) in seen and ("n1", 500, 1000) in seen


def test_push_to_named_nodes_keeps_each_nodes_failure_to_itself(cluster):
    cfg, image, sha256 = cluster
    FakeConnection.fail_upload = {"n1"}
    # n3 holds another image that a desktop runs over: the push adds beside it, never replaces it.
    FakeRunner.state["n3"] = {"images": ["f" * 64], "base": True}
    outcomes = push_image(cfg, image, sha256, ["n1", "n2", "n3"])
    assert [o.ok for o in outcomes] == [False, True, True]
    assert outcomes[0].error == "upload to " + [c for c in FakeConnection.log["n1"] if c[0] == "put"][0][1] + (
        " failed: No space left on device"
    )
    # The partial upload is removed even so, and nothing is unpacked from it.
    assert any(c[0] == "run" and c[1][:2] == ["rm", "-f"] for c in FakeConnection.log["n1"])
    assert not [c for c in FakeConnection.log["n1"] if c[:2] == ("call", "ensure_unpacked")]
    assert FakeRunner.state["n3"]["images"] == ["f" * 64, sha256]


def test_push_refuses_bad_input_before_touching_a_node(cluster):
    cfg, image, sha256 = cluster
    with pytest.raises(NotFound):
        push_image(cfg, image.with_name("missing.tar.gz"), sha256)
    with pytest.raises(BadInput, match="not a sha256"):
        push_image(cfg, image, sha256.upper())
    with pytest.raises(BadInput, match="no nodes"):
        push_image(replace(cfg, nodes=()), image, sha256)
    assert FakeConnection.log == {}


def test_configure_leaves_nothing_machine_specific_and_never_writes_through_links(tmp_path):
    rootfs = tmp_path / "rootfs"
    for directory in ("etc/default", "etc/ssh", "var/cache/apt/archives", "var/lib/apt/lists/partial"):
        (rootfs / directory).mkdir(parents=True)
    (rootfs / "etc/hostname").write_text("admin-host\n")
    (rootfs / "etc/hostname").chmod(0o755)  # debootstrap copies this host's file, mode and all
    (rootfs / "etc/machine-id").write_text("0123456789abcdef\n")
    (rootfs / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (rootfs / "var/cache/apt/archives/xterm_379-1_amd64.deb").write_text("deb")
    (rootfs / "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease").write_text("list")
    host_file = tmp_path / "host-resolv.conf"
    host_file.write_text("nameserver 10.0.0.1\n")
    host_file.chmod(0o755)
    (rootfs / "etc/resolv.conf").symlink_to(host_file)
    host_locale = tmp_path / "host-locale.gen"
    host_locale.write_text("host\n")
    (rootfs / "etc/locale.gen").symlink_to(host_locale)
    build = images._Build("minimal", tmp_path / "build.log", lambda message: None)
    ran = []
    build.run = lambda step, argv, echo=False: ran.append(argv)

    build.configure(rootfs, {"desktop": "minimal", "built": "2025-01-01T00:00:00Z"})

    assert ran == [["chroot", str(rootfs), "locale-gen"]]
    assert (rootfs / "etc/locale.gen").read_text() == "en_US.UTF-8 UTF-8\n" and not (rootfs / "etc/locale.gen").is_symlink()
    assert host_locale.read_text() == "host\n"
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o755
    assert (rootfs / "etc/default/locale").read_text() == "LANG=en_US.UTF-8\n"
    assert (rootfs / "etc/hostname").read_text() == "localhost\n"
    assert stat.S_IMODE((rootfs / "etc/hostname").stat().st_mode) == 0o644
    assert "localhost" in (rootfs / "etc/hosts").read_text()
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert not list((rootfs / "etc/ssh").iterdir())
    assert not list((rootfs / "var/cache/apt/archives").iterdir())
    assert [p.name for p in (rootfs / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert json.loads((rootfs / "etc/labvm-image").read_text())["desktop"] == "minimal"


def test_the_accounts_of_a_built_image_are_recorded_beside_it(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "bin").mkdir()
    (rootfs / "bin/sh").write_text("#!\n")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\ntcpdump:x:104:109::/nonexistent:/usr/sbin/nologin\n")
    (rootfs / "etc/group").write_text("root:x:0:\nsudo:x:27:\nnvidia-persistenced:x:110:\n")
    out = tmp_path / "images"
    out.mkdir()
    image = out / "labvm-xfce-20250101.tar.gz"
    with tarfile.open(image, "w:gz") as tar:
        tar.add(rootfs, arcname=".")
    images.record_image_accounts(image)
    assert images.accounts_path(image).read_text().split() == ["nvidia-persistenced", "root", "sudo", "tcpdump"]
    (out / "broken.tar.gz").write_bytes(b"not a tarball")
    images.record_image_accounts(out / "broken.tar.gz")
    assert images.image_account_names(out) == {"nvidia-persistenced", "root", "sudo", "tcpdump"}


def _file_caps(permitted: int) -> bytes:
    # vfs_cap_data revision 2, effective flag set: magic, permitted/inheritable low, then high.
    return struct.pack("<IIIII", 0x02000001, permitted, 0, 0, 0)


def test_file_capabilities_desktops_cannot_hold_are_stripped_and_others_kept(tmp_path):
    ping = tmp_path / "usr/bin/ping"
    ping.parent.mkdir(parents=True)
    ping.write_bytes(b"\x7fELF")
    os.setxattr(ping, "security.capability", _file_caps(1 << 13))  # cap_net_raw
    server = tmp_path / "usr/bin/server"
    server.write_bytes(b"\x7fELF")
    os.setxattr(server, "security.capability", _file_caps(1 << 10))  # cap_net_bind_service
    (tmp_path / "usr/bin/plain").write_text("#!/bin/sh\n")
    assert images.strip_dropped_file_capabilities(tmp_path) == ["/usr/bin/ping"]
    with pytest.raises(OSError):
        os.getxattr(ping, "security.capability")
    assert os.getxattr(server, "security.capability") == _file_caps(1 << 10)


def test_the_image_asked_for_last_is_the_newest_even_from_the_cache(tmp_path, no_real_build, monkeypatch):
    """`labvm image push` takes the newest image: a cached build of minimal after a build of
    xfce must make minimal the newest, not leave xfce's later mtime in front."""
    from labvm.cli_images import _latest_image

    plant_cached_image(tmp_path / "cache", "minimal")
    plant_cached_image(tmp_path / "cache", "xfce", b"another fake image")
    home = type("Home", (), {"images_dir": tmp_path / "out"})()
    build_image("xfce", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)
    minimal = build_image("minimal", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)
    assert _latest_image(home) == minimal.path
    xfce = build_image("xfce", tmp_path / "out", cache_dir=tmp_path / "cache", mirror=MIRROR)
    assert _latest_image(home) == xfce.path
