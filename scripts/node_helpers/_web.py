"""The desktop's HTTPS ends on the node, out of the member's reach: one stunnel per running
desktop in front of the websockify inside the container.

A member is root in their desktop. A TLS key inside it could be copied out, and its
certificate, valid for the node's name, would let its holder pose as any desktop of that node
to every browser that trusts labvm's CA. So the key never enters the container:

- stunnel (Debian's stunnel4) listens on the desktop's HTTPS port on the node's address, TLS
  only, and passes plain HTTP to websockify on the container's address on the desktops'
  network, which other desktops cannot reach (net.py: inter-container traffic off).
- It reads key and certificate as root, then runs as nobody. Key, certificate, its config, pid
  file and log live in <vm_dir>/web (0700 root), never in the runtime dir the container sees.
- The helper starts it after the container (ensure_container) and stops it with the container
  (stop_container, remove_container). A new certificate or a new container address restarts it.
"""

import os
import posixpath
import signal
import socket
import ssl
import subprocess
import time

from _contract import Failed, PreconditionFailed, log
from _system import find_tool, refuse_symlinked_path, write_file_atomically

WEB_DIR_NAME = "web"
CONF_NAME, PID_NAME, LOG_NAME = "stunnel.conf", "stunnel.pid", "stunnel.log"
KEY_NAME, CERT_NAME = "tls.key", "tls.crt"
STUNNEL_CANDIDATES = ("stunnel4", "stunnel")
# websockify inside the container, plain HTTP (the init's WEB_PORT).
WEB_CONTAINER_PORT = 6901
RUN_AS, RUN_AS_GROUP = "nobody", "nogroup"
START_WAIT_S = 10.0
STOP_WAIT_S = 5.0
PROBE_TIMEOUT_S = 2.0
LOG_TAIL_BYTES = 2000


def web_dir(vm_dir: str) -> str:
    return posixpath.join(vm_dir, WEB_DIR_NAME)


def ensure_web_dir(vm_dir: str) -> str:
    """The desktop's web dir, made if needed: a directory of root's, 0700, never a symlink."""
    directory = web_dir(vm_dir)
    refuse_symlinked_path(directory)
    if not os.path.isdir(directory):
        os.mkdir(directory, 0o700)
    os.chmod(directory, 0o700)
    return directory


def find_stunnel() -> str:
    for name in STUNNEL_CANDIDATES:
        path = find_tool(name)
        if path is not None:
            return path
    raise PreconditionFailed("stunnel is not installed on this node (Debian: apt install stunnel4); "
                             "it serves the desktops' HTTPS", "stunnel_missing")


def accept_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def stunnel_config(directory: str, user: str, host: str, port: int, target_ip: str) -> str:
    """stunnel's whole config for USER's desktop: pure, so tests can check it."""
    return "\n".join([
        f"; labvm: the HTTPS of {user}'s desktop (written by the vm helper; edits are overwritten)",
        "foreground = yes",
        "syslog = no",
        "debug = warning",
        "pid =",
        f"setuid = {RUN_AS}",
        f"setgid = {RUN_AS_GROUP}",
        "[desktop]",
        f"accept = {accept_address(host, port)}",
        f"connect = {accept_address(target_ip, WEB_CONTAINER_PORT)}",
        f"cert = {posixpath.join(directory, CERT_NAME)}",
        f"key = {posixpath.join(directory, KEY_NAME)}",
        "sslVersionMin = TLSv1.2",
        "",
    ])


def _cmdline(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read().split(b"\0")[:-1]
        # (a process gone meanwhile reads as empty)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            state = stream.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def running_pid(directory: str) -> int | None:
    """The pid of this desktop's stunnel, if it runs: the pid file's process, alive, whose
    command line names this desktop's config (a pid reused since is not it)."""
    try:
        with open(posixpath.join(directory, PID_NAME)) as stream:
            pid = int(stream.read().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    conf = os.fsencode(posixpath.join(directory, CONF_NAME))
    if not argv or argv[-1] != conf or not _alive(pid):
        return None
    return pid


def _log_tail(directory: str) -> str:
    try:
        with open(posixpath.join(directory, LOG_NAME), "rb") as stream:
            stream.seek(max(0, os.fstat(stream.fileno()).st_size - LOG_TAIL_BYTES))
            return stream.read().decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(no log)"


def tls_answers(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """A TLS handshake on the port (the certificate is not checked: the CA is the admin host's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            with context.wrap_socket(connection):
                return True
    except (OSError, ValueError):
        return False


def ensure_web(vm_dir: str, user: str, host: str, port: int, target_ip: str, key_pem: str, cert_pem: str,
               probe_host: str) -> bool:
    """stunnel runs for this desktop with this key, certificate and container address, and
    answers TLS; True if it was (re)started."""
    starting = start_web(vm_dir, user, host, port, target_ip, key_pem, cert_pem, probe_host)
    if starting is None:
        return False
    starting.wait()
    return True


class WebStarting:
    """A stunnel just started; wait() returns once it answers TLS. A start waits for it last,
    so stunnel comes up while the desktop does."""

    def __init__(self, process: subprocess.Popen, directory: str, user: str, host: str, port: int, probe_host: str):
        self.process, self.directory, self.user = process, directory, user
        self.host, self.port, self.probe_host = host, port, probe_host
        self.deadline = time.monotonic() + START_WAIT_S

    def wait(self) -> None:
        while not tls_answers(self.probe_host, self.port):
            if self.process.poll() is not None or time.monotonic() > self.deadline:
                self.stop()
                raise Failed(f"the HTTPS of {self.user}'s desktop (stunnel on {accept_address(self.host, self.port)}) "
                             f"did not start; its log: {_log_tail(self.directory)}", "https_not_listening")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            _stop(self.process.pid)


def start_web(vm_dir: str, user: str, host: str, port: int, target_ip: str, key_pem: str, cert_pem: str,
              probe_host: str) -> WebStarting | None:
    """Start stunnel for this desktop unless it runs with this key, certificate and container
    address already (None): its files written, the process started, not yet waited for."""
    stunnel = find_stunnel()
    directory = ensure_web_dir(vm_dir)
    conf = posixpath.join(directory, CONF_NAME)
    changed = [
        write_file_atomically(posixpath.join(directory, KEY_NAME), key_pem.encode(), 0o600),
        write_file_atomically(posixpath.join(directory, CERT_NAME), cert_pem.encode(), 0o600),
        write_file_atomically(conf, stunnel_config(directory, user, host, port, target_ip).encode(), 0o600),
    ]
    pid = running_pid(directory)
    if pid is not None and not any(changed):
        return None
    if pid is not None:
        log(f"restarting the HTTPS of {user}'s desktop: its certificate or address changed")
        _stop(pid)
    log_fd = os.open(posixpath.join(directory, LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        process = subprocess.Popen([stunnel, conf], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                   start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)
    write_file_atomically(posixpath.join(directory, PID_NAME), f"{process.pid}\n".encode(), 0o600)
    return WebStarting(process, directory, user, host, port, probe_host)


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child, started by this helper run
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.02)


def stop_web(vm_dir: str) -> bool:
    """This desktop's stunnel stopped (and its pid file gone); True if it was running. The key
    and certificate stay for the next start."""
    directory = web_dir(vm_dir)
    if os.path.islink(directory) or not os.path.isdir(directory):
        return False
    pid = running_pid(directory)
    if pid is not None:
        _stop(pid)
    try:
        os.unlink(posixpath.join(directory, PID_NAME))
    except FileNotFoundError:
        pass
    return pid is not None
