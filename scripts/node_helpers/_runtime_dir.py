"""What the desktop container runs from: <data_dir>/vms/<user>/runtime/, 0700 root, bound
read-only at /run/labvm in the container. It holds the node's static tini (the entrypoint),
init (the desktop's init, below), apply-password, and for a moment `secret` (with HTTPS,
`web-passwd` beside it: the password's scrypt line, which the node makes once a password).

The password reaches the container only as runtime/secret (0600 root). The helper writes it
just before the container starts (or before `apply-password` runs), and deletes it as soon as
it is used: for a start, once the VNC port answers with an RFB greeting, because init applies
the password before it starts the VNC server; for set_password, once the exec has returned.
The container cannot delete it itself: /run/labvm is read-only in there.

(Not the OCI runtime: that is runtime.py and oci_shim.py.)
"""

import os
import posixpath

from _contract import PreconditionFailed
from _system import find_tool, make_dirs, write_file_atomically

RUNTIME_IN_CONTAINER = "/run/labvm"
INIT_PATH = f"{RUNTIME_IN_CONTAINER}/init"
TINI_PATH = f"{RUNTIME_IN_CONTAINER}/tini"
# docker's own Init (HostConfig.Init) mounts tini at /sbin/docker-init, into the root docker
# prepared, which is not the one the desktop runs on. So the node's static tini travels in the
# runtime dir and is the entrypoint instead; it is the same binary docker would use.
TINI_CANDIDATES = ("docker-init", "tini-static", "tini")
APPLY_PASSWORD_PATH = f"{RUNTIME_IN_CONTAINER}/apply-password"
SECRET_NAME = "secret"
# The HTTPS password's hash line (labvm_web_auth's make_line), beside the secret for as long:
# the init copies it to where websockify reads it, instead of hashing (scrypt) at every start.
WEB_HASH_NAME = "web-passwd"
# The node keeps each desktop's line, and a note of the password it was made from (the same
# HMAC the plugin notes a passed password with), in the desktop's web dir (0700 root, out of
# the container): a start with an unchanged password reuses it.
WEB_LINE_NAME, WEB_LINE_NOTE_NAME = "passwd.line", "passwd.note"
# websockify's auth plugin, for noVNC behind HTTP Basic auth. The desktop's TLS key is never
# here (the member, root in their desktop, could read it): TLS ends on the node (_web.py).
WEB_AUTH_NAME = "labvm_web_auth.py"
# Where an older helper kept the desktop's TLS key and certificate: removed on sight.
STALE_NAMES = ("tls.key", "tls.crt")


def ensure_runtime_files(runtime_dir: str) -> bool:
    """tini, init and apply-password in the runtime dir; True if any was (re)written."""
    if os.path.islink(runtime_dir):
        raise PreconditionFailed(f"{runtime_dir} is a symlink; it must be a directory of root's", "runtime_is_symlink")
    tini = find_static_tini()
    created = not os.path.isdir(runtime_dir)
    make_dirs(runtime_dir, 0o700)
    with open(tini, "rb") as stream:
        tini_content = stream.read()
    changed = [
        write_file_atomically(posixpath.join(runtime_dir, "tini"), tini_content, 0o700),
        write_file_atomically(posixpath.join(runtime_dir, "init"), INIT_SCRIPT.encode(), 0o700),
        write_file_atomically(posixpath.join(runtime_dir, "apply-password"), APPLY_PASSWORD_SCRIPT.encode(), 0o700),
        write_file_atomically(posixpath.join(runtime_dir, WEB_AUTH_NAME), WEB_AUTH_MODULE.encode(), 0o600),
    ]
    for name in STALE_NAMES:
        try:
            os.unlink(posixpath.join(runtime_dir, name))
            changed.append(True)
        except FileNotFoundError:
            pass
    return created or any(changed)


def find_static_tini() -> str:
    """The node's tini, statically linked: it runs inside whatever rootfs the desktop has."""
    for name in TINI_CANDIDATES:
        path = find_tool(name)
        if path is not None and is_static_elf(os.path.realpath(path)):
            return os.path.realpath(path)
    raise PreconditionFailed(
        f"no statically linked tini on this node (looked for {', '.join(TINI_CANDIDATES)}); install docker.io or tini",
        "tini_missing",
    )


PT_INTERP = 3


def is_static_elf(path: str) -> bool:
    """An ELF executable without a program interpreter (no PT_INTERP program header)."""
    try:
        with open(path, "rb") as stream:
            header = stream.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] not in (1, 2):
                return False
            wide, order = header[4] == 2, "little" if header[5] == 1 else "big"
            if wide:
                table, entry_size, count = header[0x20:0x28], header[0x36:0x38], header[0x38:0x3A]
            else:
                table, entry_size, count = header[0x1C:0x20], header[0x2A:0x2C], header[0x2C:0x2E]
            table, entry_size, count = (int.from_bytes(field, order) for field in (table, entry_size, count))
            for index in range(count):
                stream.seek(table + index * entry_size)
                if int.from_bytes(stream.read(4), order) == PT_INTERP:
                    return False
            return count > 0
    except OSError:
        return False


def write_secret(runtime_dir: str, password: str, web_line: str | None = None) -> str:
    """The password (and the HTTPS password's hash line, where there is one) for the init."""
    path = posixpath.join(runtime_dir, SECRET_NAME)
    # One line: chpasswd gets "user:" + this line, `vncpasswd -f` reads one password per line.
    write_file_atomically(path, (password + "\n").encode(), 0o600)
    if web_line is not None:
        write_file_atomically(posixpath.join(runtime_dir, WEB_HASH_NAME), web_line.encode(), 0o600)
    return path


def remove_secret(runtime_dir: str) -> None:
    for name in (SECRET_NAME, WEB_HASH_NAME):
        try:
            os.unlink(posixpath.join(runtime_dir, name))
        except FileNotFoundError:
            pass


_WEB_AUTH: dict = {}


def web_auth() -> dict:
    """labvm_web_auth's functions, from the one text the container runs too."""
    if not _WEB_AUTH:
        exec(compile(WEB_AUTH_MODULE, WEB_AUTH_NAME, "exec"), _WEB_AUTH)  # noqa: S102 - our own module text
    return _WEB_AUTH


def web_password_line(cache_dir: str, user: str, password: str) -> str:
    """The HTTPS password's hash line for user and password: the one kept in cache_dir (a
    directory of root's) if it was made from this password, else a new one, kept there."""
    auth = web_auth()
    line_path, note_path = posixpath.join(cache_dir, WEB_LINE_NAME), posixpath.join(cache_dir, WEB_LINE_NOTE_NAME)
    secret = password.encode()
    try:
        with open(line_path, encoding="utf-8") as stream:
            line = stream.read()
        with open(note_path, encoding="utf-8") as stream:
            note = stream.read().strip()
        if auth["hmac"].compare_digest(note, auth["note_of"](line, user.encode(), secret) or ""):
            return line
    except (OSError, UnicodeDecodeError):
        pass
    line = auth["make_line"](user, secret)
    write_file_atomically(line_path, line.encode(), 0o600)
    write_file_atomically(note_path, (auth["note_of"](line, user.encode(), secret) + "\n").encode(), 0o600)
    return line


# --- what runs in the container -----------------------------------------------------------

# POSIX sh, run as root by tini (docker's --init) as PID 2. The password never appears in argv,
# the environment or the log: chpasswd and vncpasswd read it from the secret file on stdin.
INIT_SCRIPT = r"""#!/bin/sh
# labvm desktop init. Written by the labvm vm helper into /run/labvm (read-only in here).
#   init                   create the user, apply a waiting password, start sshd, VNC, the desktop
#   init --apply-password  only apply /run/labvm/secret (labvm passwd, through docker exec)
set -u
RUNTIME=${LABVM_RUNTIME:-/run/labvm}
SECRET="$RUNTIME/secret"
USER_NAME=$LABVM_USER
USER_ID=$LABVM_UID
DISPLAY_NUMBER=1
VNC_PORT=5901
WEB_PORT=6901
# The hash of the password that noVNC's HTTPS asks for (HTTP Basic, the whole password): on
# /run, a tmpfs, written again at each start from the secret. Never the password itself.
WEB_DIR=${LABVM_WEB_DIR:-/run/labvm-web}
WEB_HASH="$WEB_DIR/passwd"
PIDS=""
VNC_PID=""

log() { echo "labvm-init: $*" >&2; }
die() { log "$*"; exit 1; }

as_user() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$USER_NAME" -- "$@"
    else
        su -s /bin/sh -c 'exec "$0" "$@"' -- "$USER_NAME" "$@"
    fi
}

home_of_user() { getent passwd "$USER_NAME" | cut -d: -f6; }

# labvm refuses the image's account names, but an image built elsewhere may hold others: never
# take over (and give sudo to) a system account or group. An account in the member's range with
# another uid is an earlier desktop's under this name (adopted files): its files are owned by it.
refuse_system_account() {
    uid=$(getent passwd "$USER_NAME" | cut -d: -f3)
    if [ -n "$uid" ] && { [ "$uid" -lt 1000 ] || [ "$uid" -ge 60000 ]; } 2>/dev/null; then
        die "the image already has a system account $USER_NAME (uid $uid); pick another member name"
    fi
    gid=$(getent group "$USER_NAME" | cut -d: -f3)
    if [ -n "$gid" ] && { [ "$gid" -lt 1000 ] || [ "$gid" -ge 60000 ]; } 2>/dev/null; then
        die "the image already has a system group $USER_NAME (gid $gid); pick another member name"
    fi
}

ensure_user() {
    refuse_system_account
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd -g "$USER_ID" "$USER_NAME" || groupadd "$USER_NAME" || die "cannot create group $USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        shell=/bin/sh
        [ -x /bin/bash ] && shell=/bin/bash
        useradd -m -u "$USER_ID" -g "$USER_NAME" -s "$shell" "$USER_NAME" || die "cannot create user $USER_NAME"
        log "created user $USER_NAME ($USER_ID)"
    fi
    if getent group sudo >/dev/null && ! id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx sudo; then
        usermod -aG sudo "$USER_NAME" || log "cannot add $USER_NAME to group sudo"
    fi
}

# The login, VNC and HTTPS passwords (labvm passwd). Returns 2 when no password is waiting.
apply_password() {
    apply_account_password || return $?
    apply_web_password || return 1
    log "password applied for $USER_NAME"
}

# The login and VNC passwords. Returns 2 when no password is waiting.
apply_account_password() {
    [ -s "$SECRET" ] || return 2
    { printf '%s:' "$USER_NAME"; cat "$SECRET"; } | chpasswd || { log "chpasswd failed"; return 1; }
    home=$(home_of_user)
    [ -n "$home" ] && [ -d "$home" ] || { log "user $USER_NAME has no home directory"; return 1; }
    vncpasswd=$(command -v tigervncpasswd || command -v vncpasswd) || { log "vncpasswd not found (tigervnc-tools)"; return 1; }
    mkdir -p "$home/.vnc" || return 1
    (umask 077 && "$vncpasswd" -f <"$SECRET" >"$home/.vnc/passwd.new") || { log "vncpasswd failed"; return 1; }
    mv -f "$home/.vnc/passwd.new" "$home/.vnc/passwd" || return 1
    chown "$USER_NAME:" "$home/.vnc" "$home/.vnc/passwd" && chmod 700 "$home/.vnc" && chmod 600 "$home/.vnc/passwd" || return 1
}

apply_web_password() {
    [ "${LABVM_HTTPS:-0}" = 1 ] || return 0
    if [ -s "$RUNTIME/web-passwd" ]; then
        # The node hashed this password already (once for each new password): copied as it is.
        (umask 077 && mkdir -p "$WEB_DIR" && chmod 700 "$WEB_DIR" && cp "$RUNTIME/web-passwd" "$WEB_HASH.new" &&
            mv -f "$WEB_HASH.new" "$WEB_HASH" && rm -f "$WEB_HASH.ok") || { log "cannot write the HTTPS password hash"; return 1; }
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || { log "python3 not found: no HTTPS password"; return 0; }
    (umask 077 && mkdir -p "$WEB_DIR" && chmod 700 "$WEB_DIR" &&
        python3 "$RUNTIME/labvm_web_auth.py" hash "$USER_NAME" <"$SECRET" >"$WEB_HASH.new" &&
        mv -f "$WEB_HASH.new" "$WEB_HASH" && rm -f "$WEB_HASH.ok") || { log "cannot write the HTTPS password hash"; return 1; }
}

start_sshd() {
    [ "${LABVM_SSH:-0}" = 1 ] || return 0
    [ -x /usr/sbin/sshd ] || { log "sshd is not installed; the ssh port stays closed"; return 0; }
    mkdir -p /run/sshd && chmod 755 /run/sshd
    ssh-keygen -A >/dev/null 2>&1 || log "ssh-keygen -A failed"
    /usr/sbin/sshd -D -e &
    PIDS="$PIDS $!"
}

start_vnc() {
    home=$(home_of_user)
    [ -s "$home/.vnc/passwd" ] || die "no VNC password for $USER_NAME yet: set one with labvm passwd"
    server=$(command -v Xtigervnc || command -v Xvnc) || die "Xtigervnc not found (tigervnc-standalone-server)"
    # Raw VNC off: only websockify, in here, reaches the server, after the HTTPS Basic auth
    # with the whole password; VncAuth would ask again for its first 8 characters.
    security="-SecurityTypes VncAuth"
    [ "${LABVM_VNC_LISTEN:-published}" != off ] || security="-localhost -SecurityTypes None"
    # /tmp persists with the upper layer: a lock from an earlier start names a PID that may be
    # alive again now, and the X server would refuse the display.
    rm -f "/tmp/.X$DISPLAY_NUMBER-lock" "/tmp/.X11-unix/X$DISPLAY_NUMBER"
    mkdir -p /tmp/.X11-unix && chmod 1777 /tmp/.X11-unix
    as_user "$server" ":$DISPLAY_NUMBER" -rfbport "$VNC_PORT" -rfbauth "$home/.vnc/passwd" $security \
        -geometry "${LABVM_VNC_GEOMETRY:-1280x800}" -desktop "$USER_NAME" -nolisten tcp &
    VNC_PID=$!
    PIDS="$PIDS $VNC_PID"
    tries=0
    while [ ! -S "/tmp/.X11-unix/X$DISPLAY_NUMBER" ]; do
        kill -0 "$VNC_PID" 2>/dev/null || die "the VNC server exited at start"
        tries=$((tries + 1))
        [ "$tries" -le 300 ] || die "the VNC server did not open display :$DISPLAY_NUMBER within 30 s"
        sleep 0.1
    done
}

# noVNC: websockify serves /usr/share/novnc and proxies WebSockets to the VNC server on this
# container's loopback, each request (page or upgrade) behind HTTP Basic auth against the
# password's hash. It speaks plain HTTP on the container's address, which only the node reaches
# (other desktops cannot: inter-container traffic is off); the node's stunnel adds the TLS, so
# the key stays out of here. It comes up beside the VNC server, not after it: the password's
# hash (scrypt) and websockify's Python take as long as the VNC server's start, and a start
# waits for both. A hash that cannot be written stops the desktop (USR1), as it did in turn.
start_web() {
    [ "${LABVM_HTTPS:-0}" = 1 ] || return 0
    (
        if [ -s "$SECRET" ]; then
            apply_web_password || { kill -USR1 $$; exit 1; }
        fi
        [ -s "$WEB_HASH" ] || { log "no HTTPS password hash: HTTPS stays closed"; exit 0; }
        [ -d /usr/share/novnc ] || { log "noVNC is not installed (novnc): HTTPS stays closed"; exit 0; }
        PYTHONPATH="$RUNTIME" exec python3 "$RUNTIME/labvm_web_auth.py" serve \
            --web /usr/share/novnc --web-auth --auth-plugin labvm_web_auth.BasicAuth --auth-source "$WEB_HASH" \
            "$WEB_PORT" "127.0.0.1:$VNC_PORT" </dev/null
    ) &
    PIDS="$PIDS $!"
}

start_desktop() {
    [ -n "${LABVM_DESKTOP_CMD:-}" ] || return 0
    (
        export DISPLAY=":$DISPLAY_NUMBER"
        cd "$home" 2>/dev/null || cd /
        as_user /bin/sh -c "$LABVM_DESKTOP_CMD"
    ) &
    PIDS="$PIDS $!"
}

stop() {
    trap - TERM INT
    log "stopping"
    for pid in $PIDS; do kill -TERM "$pid" 2>/dev/null; done
    wait
    exit "${1:-0}"
}

case "${1:-}" in
--apply-password)
    ensure_user
    apply_password
    status=$?
    [ "$status" -ne 2 ] || die "no password waiting in $SECRET"
    exit "$status"
    ;;
"") ;;
*) die "unknown argument: $1" ;;
esac

trap stop TERM INT
trap 'log "could not apply the HTTPS password"; stop 1' USR1
ensure_user
# The passwords before websockify: with raw VNC off, a start waits for websockify alone, and the
# node deletes the secret once it answers.
if [ -s "$SECRET" ]; then
    apply_account_password || die "could not apply the password"
    log "password applied for $USER_NAME"
fi
start_sshd
# websockify next: its Python starts while the VNC server does (it reaches VNC only when a
# browser connects), so a start waits for the slower of the two, not for both in turn.
start_web
start_vnc
start_desktop
log "desktop of $USER_NAME on display :$DISPLAY_NUMBER, VNC port $VNC_PORT"
wait "$VNC_PID"
status=$?
log "the VNC server exited (status $status)"
stop 1
"""

# websockify's auth plugin (websockify 0.10: a class built with --auth-source, whose
# authenticate(headers, target_host, target_port) raises AuthenticationError to refuse). The
# source is a file of one line `USER:scrypt$N$R$P$SALT$HASH` (base64), which init writes with
# `python3 labvm_web_auth.py hash USER <secret`. websockify runs it for every request, the pages
# and the WebSocket upgrade alike (--web-auth), in the process that serves the connection.
WEB_AUTH_MODULE = r'''"""labvm: HTTP Basic auth for noVNC, against the desktop's password hash."""
import base64
import hashlib
import hmac
import os
import sys

N, R, P = 2**14, 8, 1
REALM = "labvm desktop"


def scrypt(password, salt, n=N, r=R, p=P):
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


def make_line(user, password):
    salt = os.urandom(16)
    digest = scrypt(password, salt)
    encode = lambda data: base64.b64encode(data).decode()
    return "%s:scrypt$%d$%d$%d$%s$%s\n" % (user, N, R, P, encode(salt), encode(digest))


def parse(line):
    """(user, n, r, p, salt, digest) of a hash line, or None."""
    name, _, stored = line.strip().partition(":")
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return None
        return name.encode(), int(n), int(r), int(p), base64.b64decode(salt), base64.b64decode(digest)
    except ValueError:
        return None


def matches(line, user, password):
    parsed = parse(line)
    if parsed is None:
        return False
    name, n, r, p, salt, wanted = parsed
    try:
        got = scrypt(password, salt, n, r, p)
    except ValueError:
        return False
    return hmac.compare_digest(name, user) and hmac.compare_digest(got, wanted)


# A page of noVNC is some forty requests, each with the same Basic credentials, and websockify
# serves each connection in a process of its own: scrypt for every one costs seconds. So once a
# pair has passed scrypt, its HMAC keyed with the stored digest is kept beside the hash (same
# tmpfs, root's only) and lets the same pair in at HMAC's cost. A new password is a new digest:
# the old note matches nothing any more. Wrong pairs always pay scrypt.
def note_of(line, user, password):
    parsed = parse(line)
    return None if parsed is None else hmac.new(parsed[5], user + b":" + password, hashlib.sha256).hexdigest()


def noted(source, note):
    try:
        with open(source + ".ok") as stream:
            return note is not None and hmac.compare_digest(stream.read().strip(), note)
    except OSError:
        return False


def keep_note(source, note):
    temporary = "%s.ok.%d" % (source, os.getpid())
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(note + "\n")
        os.replace(temporary, source + ".ok")
    except OSError:
        pass  # only the next request's speed depends on it


class BasicAuth:
    def __init__(self, src=None):
        self.source = src

    def authenticate(self, headers, target_host, target_port):
        from websockify.auth_plugins import AuthenticationError

        demand = AuthenticationError(response_code=401, response_msg="Unauthorized",
                                     response_headers={"WWW-Authenticate": 'Basic realm="%s", charset="UTF-8"' % REALM})
        header = headers.get("Authorization") or ""
        if not header.startswith("Basic "):
            raise demand
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except ValueError:
            raise demand from None
        try:
            with open(self.source) as stream:
                line = stream.readline()
        except OSError:
            raise AuthenticationError(response_code=503, response_msg="No password set") from None
        if not sep:
            raise demand
        note = note_of(line, user, password)
        if noted(self.source, note):
            return
        if not matches(line, user, password):
            raise demand
        if note is not None:
            keep_note(self.source, note)


# The VNC server behind websockify asks VncAuth (DES, the password's first 8 characters) of
# whoever connects, the published port's clients too. The browser has given the whole password
# already, in the Basic auth that let its WebSocket in: so websockify answers VncAuth for it,
# with that password, and offers the browser security type None. One prompt, the whole
# password. (Not with raw VNC off: that server asks nothing.)
class RfbError(Exception):
    pass


def reverse_bits(byte):
    return int("{:08b}".format(byte)[::-1], 2)


def vnc_response(challenge, password):
    """VncAuth's answer: the 16-byte challenge DES-encrypted (ECB) with the password's first 8
    bytes, zero-padded, each byte's bits reversed (as every VNC server expects)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:  # before cryptography 43 (Debian 12 has 38)
        from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES
    key = bytes(reverse_bits(b) for b in (password[:8] + b"\0" * 8)[:8])
    # Triple DES with one key three times is single DES.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def exactly(recv, count):
    data = b""
    while len(data) < count:
        chunk = recv(count - len(data))
        if not chunk:
            raise RfbError("the VNC server closed the connection during its handshake")
        data += chunk
    return data


def log_in_to_server(recv, send, password):
    """As an RFB 3.8 client, through VncAuth (or None), up to the server's SecurityResult."""
    if not exactly(recv, 12).startswith(b"RFB 003."):
        raise RfbError("not a VNC server")
    send(b"RFB 003.008\n")
    count = exactly(recv, 1)[0]
    if count == 0:
        raise RfbError("the VNC server refused: " + exactly(recv, int.from_bytes(exactly(recv, 4), "big")).decode(errors="replace"))
    offered = exactly(recv, count)
    if 1 in offered:
        send(b"\x01")
    elif 2 in offered:
        send(b"\x02")
        send(vnc_response(exactly(recv, 16), password))
    else:
        raise RfbError("the VNC server offers no security type websockify speaks: %r" % list(offered))
    if int.from_bytes(exactly(recv, 4), "big") != 0:
        raise RfbError("the VNC server refused the password")


def greet_browser(recv, send):
    """As an RFB server to the browser, offering None: the handshake up to SecurityResult. What
    the browser sends next (ClientInit) is the real server's to read."""
    send(b"RFB 003.008\n")
    version = exactly(recv, 12)
    if version in (b"RFB 003.003\n",):
        send((1).to_bytes(4, "big"))  # 3.3: the server names the type
        return
    if not version.startswith(b"RFB 003."):
        raise RfbError("not a VNC client")
    send(b"\x01\x01")  # one type: None
    if exactly(recv, 1) != b"\x01":
        raise RfbError("the browser chose a security type that was not offered")
    if version >= b"RFB 003.008\n":
        send((0).to_bytes(4, "big"))


def basic_password(headers):
    header = headers.get("Authorization") or ""
    _user, _sep, password = base64.b64decode(header[6:].strip()).partition(b":")
    return password


def proxy_with_vnc_auth(handler):
    """ProxyRequestHandler.new_websocket_client, with the VNC server's VncAuth answered here."""
    import socket

    from websockify.websockifyserver import WebSockifyServer

    server = handler.server
    target = WebSockifyServer.socket(server.target_host, server.target_port, connect=True)
    pending = bytearray()

    def from_browser(count):
        while not pending:
            frames, closed = handler.recv_frames()
            for frame in frames:
                pending.extend(frame)
            if closed and not pending:
                return b""
        data = bytes(pending[:count])
        del pending[:count]
        return data

    try:
        log_in_to_server(target.recv, target.sendall, basic_password(handler.headers))
        greet_browser(from_browser, lambda data: handler.send_frames([data]))
        if pending:
            target.sendall(bytes(pending))
        handler.request.setsockopt(socket.SOL_TCP, socket.TCP_NODELAY, 1)
        target.setsockopt(socket.SOL_TCP, socket.TCP_NODELAY, 1)
        handler.do_proxy(target)
    except RfbError as error:
        handler.log_message("VNC handshake: %s", error)
        raise handler.CClose(1011, "VNC handshake failed")
    finally:
        target.close()


def serve(argv):
    """websockify with these arguments; unless raw VNC is off, it answers VncAuth itself."""
    import importlib.util
    import warnings

    # numpy would only speed up unmasking what the browser sends (keys and pointer moves, a few
    # bytes each), and importing it is most of websockify's start, which a desktop's start waits
    # for: websockify goes without (its pure-Python unmasking).
    sys.modules.setdefault("numpy", None)
    warnings.filterwarnings("ignore", message="no 'numpy' module")
    try:
        from websockify import websocketproxy
    except ImportError:
        sys.stderr.write("labvm-init: websockify is not installed (python3-websockify): HTTPS stays closed\n")
        return
    answers = os.environ.get("LABVM_VNC_LISTEN", "published") != "off"
    if answers and importlib.util.find_spec("cryptography") is None:  # DES for VncAuth, imported when asked
        sys.stderr.write("labvm-init: python3-cryptography is not installed (an older image): "
                         "noVNC asks for the VNC password too\n")
        answers = False
    if answers:
        websocketproxy.ProxyRequestHandler.new_websocket_client = proxy_with_vnc_auth
    sys.argv = ["websockify", *argv]
    websocketproxy.websockify_init()


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2:])
elif __name__ == "__main__" and sys.argv[1:2] == ["hash"] and len(sys.argv) == 3:
    secret = sys.stdin.buffer.readline().rstrip(b"\n")
    if not secret:
        sys.exit("no password on stdin")
    sys.stdout.write(make_line(sys.argv[2], secret))
elif __name__ == "__main__":
    sys.exit("usage: labvm_web_auth.py hash USER <PASSWORD_LINE")
'''

APPLY_PASSWORD_SCRIPT = r"""#!/bin/sh
# Applies /run/labvm/secret as the login and VNC password; run by the labvm vm helper through
# docker exec, which deletes the secret again afterwards.
exec "${LABVM_RUNTIME:-/run/labvm}/init" --apply-password
"""
