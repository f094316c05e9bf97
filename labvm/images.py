"""Desktop images: building the shared desktop rootfs, and putting it on the nodes.

An image is a gzip tarball of a debootstrapped Debian rootfs, with a `.sha256` file beside it;
its id is that sha256. The admin host keeps every image it built in the admin home's images/
directory (the catalog below). Each node unpacks the images its desktops use side by side,
one tree per id (the node helper's _images.py): the lowest, read-only layer of the overlay of
every desktop on that image. Each desktop records its image's id, so a new image changes no
desktop until it is rebased onto it (`labvm rebase`, `labvm image roll`). A node also imports a
tiny docker base image (`docker import`; no registry is ever involved) that the desktop
containers are created from; the labvm runtime gives them their overlay as root.

Finished tarballs are cached under the cache dir, keyed by everything that goes into them, so
building the same image again is instant unless asked to rebuild.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from .config import ClusterConfig, Node
from .errors import BadInput, Busy, ImageBuildFailed, ImageError, NodeError, NotFound, ToolMissing
from .fsutil import atomic_write
from .remote.connection import NodeConnection
from .remote.helpers import HelperBundle, HelperRunner
from .remote.pool import NodeOutcome, run_on_nodes

SUITE = "bookworm"
VARIANT = "minbase"
DEFAULT_CACHE_DIR = Path("/var/cache/labvm/images")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
APT_DIR = Path("/etc/apt")
LOCALE = "en_US.UTF-8"
# Bump when the configure steps change, so tarballs cached by an older recipe are not reused.
RECIPE_VERSION = 6

# debootstrap resolves Depends of --include, never Recommends: what a desktop needs beyond
# the Depends is listed here. xfonts-base and x11-xserver-utils are Xvnc's own Recommends
# (the core fonts xterm draws with; xsetroot for vncserver's session script). twm exits at
# start in a UTF-8 locale unless xfonts-75dpi gives it its title font (checked in Xvnc).
_VNC = ("tigervnc-standalone-server", "tigervnc-tools", "xfonts-base", "x11-xserver-utils", "dbus-x11")
# noVNC served by websockify, inside each desktop (the init starts it); python3-cryptography
# for the DES of VncAuth, which websockify answers for the browser (_runtime_dir.py).
# python3-cryptography depends on a virtual package that python3-cffi-backend provides, and
# debootstrap does not resolve virtual packages: it is named here.
_WEB = ("novnc", "python3-websockify", "python3-cryptography", "python3-cffi-backend")
_BASE = ("sudo", "locales", "passwd", "procps", "iproute2", "iputils-ping")
DESKTOP_PACKAGES: dict[str, tuple[str, ...]] = {
    "minimal": _VNC + _WEB + ("twm", "xfonts-75dpi", "xterm") + _BASE,
    "xfce": ("xfce4", "xfce4-terminal", "tango-icon-theme") + _VNC + _WEB + ("openssh-server",) + _BASE,
}

IMAGE_METADATA = "etc/labvm-image"  # inside the image; the node helper reads it
TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")
BUILD_LOCK = ".build.lock"
BUILD_PREFIX = ".build-"
DEB_CACHE = "debs"
BUILT_CACHE = "built"
HASH_CHUNK = 1 << 20
LOG_TAIL_LINES = 6
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INCOMING_DIR = "/var/lib/labvm/incoming"
PUSH_TIMEOUT_S = 3600.0
UNPACK_TIMEOUT_S = 3600.0
DOCKER_BASE_TIMEOUT_S = 180.0
SHA256_RE = re.compile(r"[0-9a-f]{64}")

# progress(message) while building; progress(node, bytes_done, bytes_total) while pushing.
# Push progress is called from one thread per node.
BuildProgress = Callable[[str], None]
PushProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    sha256: str
    size: int
    desktop: str
    packages: tuple[str, ...]
    seconds: float
    mirror: str = ""
    built: str = ""
    cached: bool = False
    package_count: int | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "packages": list(self.packages)}


# --- what goes into an image --------------------------------------------------------------


def desktop_packages(desktop: str) -> tuple[str, ...]:
    try:
        return DESKTOP_PACKAGES[desktop]
    except KeyError:
        raise BadInput(f"unknown desktop {desktop!r}; choose one of: {', '.join(DESKTOP_PACKAGES)}") from None


def check_mirror(mirror: str) -> str:
    mirror = mirror.strip().rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~%+/-]*)?", mirror):
        raise BadInput(f"not a Debian mirror URL: {mirror!r} (expected http://HOST/PATH or https://HOST/PATH)")
    return mirror


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, current, key = [], {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _usable(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def mirror_from_deb822(text: str, suite: str = SUITE) -> str | None:
    """The first http(s) URI of an enabled `deb` stanza, preferring one that serves `suite`."""
    candidates = []
    for stanza in _deb822_stanzas(text):
        if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes").lower() == "no":
            continue
        uris = [uri for uri in stanza.get("uris", "").split() if _usable(uri)]
        if uris:
            candidates.append((suite in stanza.get("suites", "").split(), uris[0]))
    preferred = [uri for serves, uri in candidates if serves] or [uri for _, uri in candidates]
    return preferred[0].rstrip("/") if preferred else None


def mirror_from_sources_list(text: str, suite: str = SUITE) -> str | None:
    """The URI of the first `deb` line, preferring one for `suite` (one-line format)."""
    candidates = []
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0])  # drop [options] and comments
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "deb" and _usable(fields[1]):
            candidates.append((fields[2] == suite, fields[1]))
    preferred = [uri for serves, uri in candidates if serves] or [uri for _, uri in candidates]
    return preferred[0].rstrip("/") if preferred else None


def detect_mirror(apt_dir: Path = APT_DIR, suite: str = SUITE) -> str:
    """The Debian mirror this admin host itself uses; deb.debian.org when none is found."""
    sources = [
        (apt_dir / "sources.list.d" / "debian.sources", mirror_from_deb822),
        (apt_dir / "sources.list", mirror_from_sources_list),
    ]
    for path, parse in sources:
        try:
            mirror = parse(path.read_text(encoding="utf-8", errors="replace"), suite)
        except OSError:
            continue
        if mirror:
            return mirror
    return FALLBACK_MIRROR


def image_cache_key(desktop: str, packages: Iterable[str], mirror: str, suite: str = SUITE, arch: str | None = None) -> str:
    """Everything that decides an image's content; two builds with the same key are interchangeable."""
    recipe = {
        "recipe": RECIPE_VERSION,
        "suite": suite,
        "variant": VARIANT,
        "arch": arch or os.uname().machine,
        "desktop": desktop,
        "packages": sorted(set(packages)),
        "mirror": mirror.rstrip("/"),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def image_file_name(desktop: str, built: str, sha256: str) -> str:
    """labvm-<desktop>-<YYYYMMDD>-<id, 12 hex>.tar.gz: dated by the build, and as many side by
    side as there are builds."""
    return f"labvm-{desktop}-{built[:10].replace('-', '')}-{sha256[:12]}.tar.gz"


# --- checksums ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _metadata_path(image: Path) -> Path:
    return image.with_name(image.name + ".json")


def checksum_path(image: Path) -> Path:
    return image.with_name(image.name + ".sha256")


def write_checksum_file(image: Path, sha256: str) -> None:
    """`sha256sum -c` reads it."""
    atomic_write(checksum_path(image), f"{sha256}  {image.name}\n".encode(), 0o644)


def image_sha256(image: Path) -> str:
    """The checksum recorded beside an image by `build_image`, else computed from the file."""
    image = Path(image)
    if not image.is_file():
        raise NotFound(f"{image}: no such image file; build one with `labvm image build`")
    try:
        recorded = checksum_path(image).read_text().split()
    except OSError:
        recorded = []
    if recorded and SHA256_RE.fullmatch(recorded[0]):
        return recorded[0]
    return sha256_file(image)


# --- building -----------------------------------------------------------------------------


def build_image(
    desktop: str,
    output_dir: Path,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    mirror: str | None = None,
    rebuild: bool = False,
    progress: BuildProgress | None = None,
) -> ImageInfo:
    """Build (or take from the cache) the image for `desktop` and put it in output_dir."""
    started = time.monotonic()
    say = progress or (lambda message: None)
    packages = desktop_packages(desktop)
    mirror = check_mirror(mirror) if mirror else detect_mirror()
    output_dir, cache_dir = Path(output_dir).absolute(), Path(cache_dir).absolute()
    key = image_cache_key(desktop, packages, mirror)
    cached_image = cache_dir / BUILT_CACHE / f"labvm-{desktop}-{key[:16]}.tar.gz"
    if not rebuild:
        info = _cached(cached_image)
        if info is not None:
            say(f"using the cached {desktop} image {cached_image}")
            return _publish(info, output_dir, started, cached=True)
    debootstrap = _require_build_tools()
    cached_image.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_dir):
        _remove_stale_builds(cache_dir)
        built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        workdir = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=cache_dir))
        log = cache_dir / f"build-{desktop}.log"
        try:
            rootfs = workdir / "rootfs"
            build = _Build(desktop, log, say)
            build.debootstrap(debootstrap, packages, mirror, cache_dir / DEB_CACHE, rootfs)
            build.configure(
                rootfs,
                {
                    "desktop": desktop,
                    "packages": list(packages),
                    "suite": SUITE,
                    "mirror": mirror,
                    "built": built,
                    "recipe": RECIPE_VERSION,
                },
            )
            say("packing the rootfs")
            sha256, size = build.pack(rootfs, cached_image)
        finally:
            _remove_tree(workdir)
        info = ImageInfo(cached_image, sha256, size, desktop, packages, time.monotonic() - started, mirror, built,
                         package_count=build.package_count)
        atomic_write(_metadata_path(cached_image), json.dumps(info.to_dict(), indent=1).encode(), 0o644)
        write_checksum_file(cached_image, sha256)
        _prune_cache(cached_image.parent, desktop, keep=cached_image)
    return _publish(info, output_dir, started, cached=False)


def _require_build_tools() -> str:
    if os.geteuid() != 0:
        raise ImageError("building an image needs root (debootstrap and chroot); run it as root")
    debootstrap = shutil.which("debootstrap", path=SBIN_PATH)
    if debootstrap is None:
        raise ToolMissing(tool="debootstrap", package="debootstrap")
    return debootstrap


class _build_lock:
    """One build per cache dir at a time: two would share debootstrap's package cache."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / BUILD_LOCK

    def __enter__(self):
        self.stream = open(self.path, "a+")
        try:
            fcntl.flock(self.stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.stream.close()
            raise Busy(f"another image build is running in {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        self.stream.close()


class _Build:
    """The steps of one build, logging every command's output to one file."""

    def __init__(self, desktop: str, log: Path, say: BuildProgress):
        self.desktop = desktop
        self.log = log
        self.say = say
        self.package_count: int | None = None
        log.write_text("")

    def run(self, step: str, argv: list[str], echo: bool = False) -> None:
        env = {**os.environ, "PATH": SBIN_PATH, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            try:
                for line in process.stdout:
                    log.write(line)
                    if echo and line.startswith("I: "):
                        self.say(f"{step}: {line[3:].strip()}")
                process.wait()
            except BaseException:
                # Its own session, so the whole tree goes: dpkg and the maintainer scripts too.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        if process.returncode != 0:
            raise self.failed(step, f"{os.path.basename(argv[0])} exited with {process.returncode}")

    def failed(self, step: str, what: str) -> ImageBuildFailed:
        tail = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()][-LOG_TAIL_LINES:]
        return ImageBuildFailed(desktop=self.desktop, step=step, detail=f"{what}: {' | '.join(tail)}", log=self.log)

    def debootstrap(self, debootstrap: str, packages, mirror: str, deb_cache: Path, rootfs: Path) -> None:
        deb_cache.mkdir(parents=True, exist_ok=True)
        self.say(f"debootstrap {SUITE} from {mirror}")
        argv = [
            debootstrap,
            f"--variant={VARIANT}",
            f"--include={','.join(packages)}",
            f"--cache-dir={deb_cache}",
            "--components=main",
            SUITE,
            str(rootfs),
            mirror,
        ]
        try:
            self.run("debootstrap", argv, echo=True)
        except ImageBuildFailed:
            # debootstrap's own log holds the real reason, and goes away with the rootfs.
            detail = rootfs / "debootstrap" / "debootstrap.log"
            if detail.is_file():
                with open(self.log, "a", encoding="utf-8") as log:
                    log.write(f"--- {detail} ---\n" + detail.read_text(errors="replace"))
            raise self.failed("debootstrap", f"debootstrap failed (mirror {mirror})") from None

    def configure(self, rootfs: Path, metadata: dict) -> None:
        self.say("configuring locale and image marker")
        _write_file(rootfs / "etc/locale.gen", f"{LOCALE} UTF-8\n")
        _write_file(rootfs / "etc/default/locale", f"LANG={LOCALE}\n")
        self.run("locale-gen", ["chroot", str(rootfs), "locale-gen"])
        # Every desktop starts from this tree: nothing in it may identify one machine, and the
        # files debootstrap copied from this host keep this host's modes unless reset.
        _write_file(rootfs / "etc/hostname", "localhost\n")
        _write_file(rootfs / "etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        resolv_conf = rootfs / "etc/resolv.conf"
        if resolv_conf.is_file() and not resolv_conf.is_symlink():
            resolv_conf.chmod(0o644)
        if (rootfs / "etc/machine-id").exists():
            _write_file(rootfs / "etc/machine-id", "")
        for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
            key.unlink()  # each desktop makes its own with `ssh-keygen -A`
        for leftover in [*(rootfs / "var/cache/apt/archives").glob("*.deb"), *(rootfs / "var/lib/apt/lists").glob("*_*")]:
            leftover.unlink()
        for program in strip_dropped_file_capabilities(rootfs):
            self.say(f"removed file capabilities desktops cannot have from {program}")
        metadata = {**metadata, "package_count": installed_package_count(rootfs)}
        _write_file(rootfs / IMAGE_METADATA, json.dumps(metadata, indent=1, sort_keys=True) + "\n")
        self.package_count = metadata["package_count"]

    def pack(self, rootfs: Path, target: Path) -> tuple[str, int]:
        mounted = _mounts_below(rootfs)
        if mounted:
            raise self.failed("pack", f"still mounted inside the rootfs: {', '.join(mounted)}")
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        argv = ["tar", *TAR_OPTIONS, "--one-file-system", "--sort=name", "-czf", str(tmp), "-C", str(rootfs), "."]
        try:
            self.run("pack", argv)
            tmp.chmod(0o644)
            sha256 = sha256_file(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return sha256, target.stat().st_size


def installed_package_count(rootfs: Path) -> int | None:
    """How many packages dpkg has installed in the rootfs (None: it has no package database)."""
    try:
        text = (rootfs / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return None
    return sum(1 for stanza in text.split("\n\n") if "\nStatus: install ok installed" in "\n" + stanza)


# Capabilities desktops run without (the node helper's vm.DROPPED_CAPABILITIES), by number:
# NET_RAW, MKNOD, AUDIT_WRITE, SETFCAP.
DROPPED_CAPABILITY_BITS = (13, 27, 29, 31)
_FILE_CAPS = "security.capability"


def strip_dropped_file_capabilities(rootfs: Path) -> list[str]:
    """Programs that carry a file capability outside a desktop's bounding set fail to start
    at all (EPERM at exec): ping holds cap_net_raw. Without it ping uses ICMP datagram
    sockets, which docker allows, so the capability goes. Returns the programs changed."""
    mask = sum(1 << bit for bit in DROPPED_CAPABILITY_BITS)
    changed = []
    for directory, _dirs, files in os.walk(rootfs):
        for name in files:
            path = os.path.join(directory, name)
            try:
                raw = os.getxattr(path, _FILE_CAPS, follow_symlinks=False)
            except OSError:
                continue
            # vfs_cap_data: magic, then permitted (low 32 bits) first.
            if len(raw) >= 8 and int.from_bytes(raw[4:8], "little") & mask:
                os.removexattr(path, _FILE_CAPS, follow_symlinks=False)
                changed.append("/" + os.path.relpath(path, rootfs))
    return changed


def _write_file(path: Path, text: str) -> None:
    if path.is_symlink():
        path.unlink()  # never write through a link in the rootfs to a file of this host
    path.write_text(text)
    path.chmod(0o644)


def pack_rootfs(rootfs: Path, target: Path, log: Path | None = None) -> tuple[str, int]:
    """Pack a rootfs the way images are packed: numeric owners, xattrs, ACLs, hard links."""
    log = log or target.with_name(target.name + ".log")
    return _Build("custom", log, lambda message: None).pack(Path(rootfs), Path(target))


def _cached(image: Path) -> ImageInfo | None:
    try:
        meta = json.loads(_metadata_path(image).read_text())
        if image.stat().st_size != meta["size"]:
            return None
        return ImageInfo(
            image,
            meta["sha256"],
            meta["size"],
            meta["desktop"],
            tuple(meta["packages"]),
            meta["seconds"],
            meta.get("mirror", ""),
            meta.get("built", ""),
            package_count=meta.get("package_count"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish(info: ImageInfo, output_dir: Path, started: float, cached: bool) -> ImageInfo:
    """Put the image into output_dir under its dated name: a hard link when possible."""
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / image_file_name(info.desktop, info.built, info.sha256)
    if not (target.exists() and os.path.samefile(target, info.path)):
        tmp = output_dir / f".{target.name}.{secrets.token_hex(4)}"
        try:
            try:
                os.link(info.path, tmp)
            except OSError:
                shutil.copyfile(info.path, tmp)
                tmp.chmod(0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    write_checksum_file(target, info.sha256)
    atomic_write(_metadata_path(target), json.dumps({key: value for key, value in info.to_dict().items()
                                                     if key not in ("path", "seconds", "cached")}, indent=1).encode(), 0o644)
    record_image_accounts(target)
    # The image asked for last is the newest in output_dir, cached or not: `labvm image push`
    # takes the newest.
    os.utime(target)
    seconds = time.monotonic() - started if cached else info.seconds
    return ImageInfo(target, info.sha256, info.size, info.desktop, info.packages, seconds, info.mirror, info.built, cached,
                     info.package_count)


# --- the image's own accounts: never a member's name ---------------------------------------

ACCOUNTS_SUFFIX = ".accounts"
ACCOUNT_FILES = ("etc/passwd", "etc/group")


def accounts_path(image: Path) -> Path:
    return image.with_name(image.name + ACCOUNTS_SUFFIX)


def read_image_accounts(image: Path) -> list[str]:
    """The user and group names in the image's /etc/passwd and /etc/group. The tarball is packed
    sorted by name, so etc/ comes early and the stream is read only that far."""
    wanted, names = set(ACCOUNT_FILES), set()
    with tarfile.open(image, "r|gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name not in wanted or not member.isfile() or member.size > 1 << 20:
                continue
            text = tar.extractfile(member).read().decode("utf-8", "replace")
            names.update(line.split(":", 1)[0] for line in text.splitlines() if ":" in line)
            wanted.discard(name)
            if not wanted:
                break
    return sorted(name for name in names if name and not name.startswith(("#", "+", "-")))


def record_image_accounts(image: Path) -> None:
    """Beside the image, the names `labvm user add` and `labvm create` refuse because of it."""
    try:
        names = read_image_accounts(image)
    except (OSError, EOFError, tarfile.TarError):
        return  # not a readable tarball: the static list in names.py still applies
    atomic_write(accounts_path(image), "".join(f"{name}\n" for name in names).encode(), 0o644)


def image_account_names(images_dir: Path) -> frozenset[str]:
    """The accounts of every image built into images_dir (the admin home's images/)."""
    names: set[str] = set()
    for path in Path(images_dir).glob(f"*{ACCOUNTS_SUFFIX}"):
        try:
            names.update(line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip())
        except OSError:
            continue
    return frozenset(names)


def _prune_cache(built_dir: Path, desktop: str, keep: Path) -> None:
    """Older cached builds of the same desktop: a new recipe or mirror made them obsolete."""
    for old in built_dir.glob(f"labvm-{desktop}-*.tar.gz"):
        if old != keep:
            for path in (old, _metadata_path(old), checksum_path(old)):
                path.unlink(missing_ok=True)


def _remove_stale_builds(cache_dir: Path) -> None:
    """Work dirs of builds that were killed; only called with the build lock held."""
    for stale in cache_dir.glob(f"{BUILD_PREFIX}*"):
        _remove_tree(stale)


def _mounts_below(path: Path) -> list[str]:
    prefix = os.path.realpath(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as stream:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4]) for line in stream]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rmtree, after unmounting whatever a killed debootstrap left mounted inside (/proc,
    /sys, a bind of /dev): removing through those would delete the host's own files."""
    if not path.exists():
        return
    for point in _mounts_below(path):
        subprocess.run(["umount", "--lazy", point], env={"PATH": SBIN_PATH}, capture_output=True)
    remaining = _mounts_below(path)
    if remaining:
        raise ImageError(f"cannot remove {path}: still mounted inside it: {', '.join(remaining)}; unmount them by hand")
    shutil.rmtree(path)


# --- the docker base image ----------------------------------------------------------------

# Mount points the container's root needs; labvm bind-mounts merge_local's tree over them.
BASE_DIRS = {
    "dev": 0o755, "etc": 0o755, "home": 0o755, "media": 0o755, "mnt": 0o755, "opt": 0o755,
    "proc": 0o555, "root": 0o700, "run": 0o755, "srv": 0o755, "sys": 0o555, "tmp": 0o1777,
    "usr": 0o755, "usr/bin": 0o755, "usr/lib": 0o755, "usr/lib64": 0o755, "usr/sbin": 0o755, "var": 0o755,
}  # fmt: skip
# usr-merge, as in bookworm itself.
BASE_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
BASE_REPOSITORY = "labvm/base"


def base_image_tar() -> bytes:
    """The docker base image as an uncompressed tar; the same bytes on every call."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted({*BASE_DIRS, *BASE_LINKS}):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            if name in BASE_LINKS:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, BASE_LINKS[name], 0o777
            else:
                info.type, info.mode = tarfile.DIRTYPE, BASE_DIRS[name]
            tar.addfile(info)
    return buffer.getvalue()


def base_image_tag(tar: bytes | None = None) -> str:
    """labvm/base:<first 12 hex of the tar's sha256>: a new layout gets a new tag."""
    tar = base_image_tar() if tar is None else tar
    return f"{BASE_REPOSITORY}:{hashlib.sha256(tar).hexdigest()[:12]}"


# --- the admin host's catalog -------------------------------------------------------------

ID_PREFIX_RE = re.compile(r"[0-9a-f]{4,64}")
SHORT = 12


@dataclass(frozen=True)
class CatalogImage:
    """An image on the admin host: its id (sha256), tarball and what its build recorded."""

    id: str
    path: Path
    desktop: str
    built: str
    package_count: int | None
    size: int

    @property
    def short(self) -> str:
        return self.id[:SHORT]

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.desktop, "built": self.built or None, "packages": self.package_count,
                "size": self.size, "path": str(self.path)}


def catalog(images_dir: Path) -> list[CatalogImage]:
    """Every image tarball in images_dir, oldest first (by when it was built or asked for last:
    `labvm image build` touches the one it gives)."""
    found = []
    for path in sorted(Path(images_dir).glob("labvm-*.tar.gz"), key=lambda p: p.stat().st_mtime):
        try:
            meta = json.loads(_metadata_path(path).read_text())
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        desktop = meta.get("desktop") or path.name.removeprefix("labvm-").split("-", 1)[0]
        found.append(CatalogImage(image_sha256(path), path, str(desktop), str(meta.get("built") or ""),
                                  meta.get("package_count"), path.stat().st_size))
    return found


def find_image(images_dir: Path, wanted: str | None) -> CatalogImage:
    """The image whose id starts with `wanted` (at least 4 hex), or the newest one for None."""
    images = catalog(images_dir)
    if wanted is None:
        if not images:
            raise ImageError(f"no desktop image on this admin host ({images_dir}); build one with `labvm image build`")
        return images[-1]
    if not ID_PREFIX_RE.fullmatch(wanted):
        raise BadInput(f"image {wanted!r}: give an image id, or its first 4 or more hex digits (see `labvm image list`)")
    matches = {image.id: image for image in images if image.id.startswith(wanted)}
    if not matches:
        raise ImageError(f"no image {wanted} on this admin host; `labvm image list` shows them")
    if len(matches) > 1:
        raise BadInput(f"image {wanted} is ambiguous: {', '.join(sorted(i[:SHORT] for i in matches))}; give more digits")
    return next(iter(matches.values()))


def catalog_entry(images_dir: Path, image: str) -> CatalogImage | None:
    """The admin host's tarball of image `image` (a full id), or None."""
    return next((found for found in catalog(images_dir) if found.id == image), None)


def image_in_catalog(images_dir: Path, image: str) -> CatalogImage:
    """The admin host's tarball of image `image` (a full id): what a push to a node sends."""
    found = catalog_entry(images_dir, image)
    if found is not None:
        return found
    raise ImageError(f"image {image[:SHORT]} is not on this admin host any more ({images_dir}); "
                     "a node that lacks it cannot get it: rebase the desktops on it onto another image")


def remove_from_catalog(image: CatalogImage) -> None:
    for path in (image.path, checksum_path(image.path), _metadata_path(image.path), accounts_path(image.path),
                 manifest_path(image.path)):
        path.unlink(missing_ok=True)


def manifest_path(image: Path) -> Path:
    return image.with_name(image.name + ".manifest-v2.gz")


def image_manifest(image: CatalogImage) -> dict[str, list]:
    """Every entry of the image: path (no leading /) -> [type, size, mode, mtime, link target,
    content hash of a regular file], read from its tarball once and kept beside it. Two images
    hold a path alike when these agree."""
    cache = manifest_path(image.path)
    try:
        return json.loads(gzip.decompress(cache.read_bytes()))
    except (OSError, ValueError, EOFError):
        pass
    entries: dict[str, list] = {}
    try:
        with tarfile.open(image.path, "r|gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./").strip("/")
                if name and name != ".":
                    digest = ""
                    if member.isreg():
                        content = hashlib.blake2b(digest_size=16)
                        stream = tar.extractfile(member)
                        while chunk := stream.read(HASH_CHUNK):
                            content.update(chunk)
                        digest = content.hexdigest()
                    entries[name] = [member.type.decode("ascii", "replace"), member.size, member.mode, int(member.mtime),
                                     member.linkname, digest]
    except (OSError, EOFError, tarfile.TarError) as error:
        raise ImageError(f"cannot read image {image.short} ({image.path}): {error}") from None
    atomic_write(cache, gzip.compress(json.dumps(entries).encode(), 6), 0o600)
    return entries


# --- pushing to nodes ---------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    sha256: str
    uploaded: bool
    base_tag: str
    base_created: bool


def push_image(
    cfg: ClusterConfig,
    image_path: Path,
    sha256: str,
    nodes: Iterable[Node | str] | None = None,
    *,
    progress: PushProgress | None = None,
    docker_socket: str | None = None,
    timeout: float = PUSH_TIMEOUT_S,
) -> list[NodeOutcome[PushResult]]:
    """Put the image into each node's store, beside the images it holds, and the docker base
    image, on every node in parallel. A node that holds this image gets no upload, and no image
    a desktop uses is touched. `nodes` are Node objects or names; None means every node."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise NotFound(f"{image_path}: no such image file; build one with `labvm image build`")
    if not SHA256_RE.fullmatch(sha256 or ""):
        raise BadInput(f"not a sha256: {sha256!r} (expected 64 lowercase hex characters)")
    targets = [cfg.node(n) if isinstance(n, str) else n for n in (cfg.nodes if nodes is None else nodes)]
    if not targets:
        raise BadInput(f"no nodes in {cfg.path}; add one with `labvm node add NAME HOST`")
    push = _NodePush(cfg, image_path, sha256, HelperBundle.from_package(), progress, docker_socket)
    return run_on_nodes(targets, push, timeout=timeout)


def _base_params(docker_socket: str | None = None) -> dict:
    base = base_image_tar()
    params = {"tag": base_image_tag(base), "tar_b64": base64.b64encode(base).decode()}
    if docker_socket:
        params["docker_socket"] = docker_socket
    return params


class _NodePush:
    def __init__(self, cfg, image_path: Path, sha256: str, bundle: HelperBundle, progress, docker_socket):
        self.cfg = cfg
        self.image_path = image_path
        self.sha256 = sha256
        self.bundle = bundle
        self.progress = progress or (lambda node, done, total: None)
        self.base = _base_params(docker_socket)

    def __call__(self, node: Node) -> PushResult:
        with NodeConnection(node, self.cfg.home) as conn:
            runner = HelperRunner(conn, self.bundle)
            uploaded = send_image(self.cfg, conn, runner, self.image_path, self.sha256,
                                  lambda done, total: self.progress(node.name, done, total))
            base = runner.call("image", "ensure_docker_base", self.base, timeout=DOCKER_BASE_TIMEOUT_S)
        return PushResult(self.sha256, uploaded, self.base["tag"], base["changed"])


def send_image(cfg: ClusterConfig, conn: NodeConnection, runner, image_path: Path, sha256: str,
               progress: Callable[[int, int], None]) -> bool:
    """Image `sha256` (the tarball image_path) unpacked into the node's store unless the node
    holds it. True if it was sent."""
    from .remote.recipes import image_status, unpack_image

    status = image_status(cfg)
    held = runner.call(status.helper, status.action, status.params)["data"]["images"]
    size = image_path.stat().st_size
    if sha256 in {image["id"] for image in held}:
        progress(size, size)
        return False
    remote = f"{INCOMING_DIR}/{sha256[:16]}.{secrets.token_hex(4)}.tar.gz"
    try:
        _upload(conn, image_path, remote, progress)
        unpack = unpack_image(cfg, remote, sha256)
        runner.call(unpack.helper, unpack.action, unpack.params, timeout=unpack.timeout)
    finally:
        _remove_remote(conn, remote)
    return True


def images_held(cfg: ClusterConfig, s) -> set[str]:
    """The ids of the images the node of session `s` holds."""
    from .remote.recipes import image_status

    return {held["id"] for held in s.run(image_status(cfg))["images"]}


def image_on_node_detail(home, s, image: str, step: str) -> tuple[bool, str]:
    """Whether the node of `s` holds image `image`, and a plan's line saying so; where it does
    not, the admin host must have it, for the step named `step` to send it."""
    if image in images_held(home.config, s):
        return True, f"image {image[:SHORT]} is on {s.node.name}"
    found = image_in_catalog(home.images_dir, image)
    return False, f"image {found.short} is not on {s.node.name}: the {step} step sends it ({found.size / 2**20:.0f} MiB)"


def ensure_image_on(home, s, image: str, progress: Callable[[str], None] = lambda _m: None) -> bool:
    """Image `image` on the node of session `s`, sent from the admin host if the node lacks it
    (with the docker base image). True if it was sent."""
    from .remote.helpers import HelperCall

    if image in images_held(home.config, s):
        return False

    found = image_in_catalog(home.images_dir, image)
    progress(f"  sending image {found.short} ({found.size / 2**20:.0f} MiB) to {s.node.name}")
    s.send_image(home.config, found.path, image)
    s.run(HelperCall("image", "ensure_docker_base", _base_params(), timeout=DOCKER_BASE_TIMEOUT_S))
    return True


def _upload(conn: NodeConnection, image_path: Path, remote: str, progress: Callable[[int, int], None]) -> None:
    node = conn.node
    # Owned by the login user, so SFTP can write there without root; 0700 keeps others out.
    made = conn.run(conn.as_root + ["install", "-d", "-m", "0700", "-o", node.user, INCOMING_DIR], timeout=30)
    if made.exited != 0:
        raise NodeError(node=node.name, msg=f"cannot create {INCOMING_DIR}: {made.stderr.strip() or made.exited}")
    conn.put(image_path, remote, progress, mode=0o600)


def _remove_remote(conn: NodeConnection, remote: str) -> None:
    try:
        conn.run(conn.as_root + ["rm", "-f", "--", remote], timeout=30)
    except NodeError:
        pass  # the node went away; what failed before this is what the admin needs to see
