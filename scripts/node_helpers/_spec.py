"""The vm helper's request values: the container spec, the password, the image's sessions.

Each validator takes (param name, value) and answers the cleaned value or raises BadRequest,
as the contract's Param checks do; the messages never show a password. A validated spec has
every key (null or empty where not given), so its hash does not depend on how it was spelled.
"""

import ipaddress
import json
import re
from typing import Any

from _contract import USER_PATTERN, BadRequest, shorten
from _images import image_ref

# The container's name is CONTAINER_PREFIX + the user; LABEL_USER and LABEL_SPEC_HASH are set
# by the helper itself, so a spec may not set the hash.
CONTAINER_PREFIX = "labvm-"
LABEL_USER = "labvm.user"
LABEL_SPEC_HASH = "labvm.spec-hash"
MAX_PASSWORD_CHARS = 256
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # dockerd refuses less


TLS_KEYS = ("tls_key", "tls_cert")
MAX_PEM_CHARS = 16384


def password_secrets(name: str, value: Any) -> dict:
    """{"password": str, "tls_key": PEM or None, "tls_cert": PEM or None}: the desktop's password
    and, for its HTTPS (noVNC), the key and certificate labvm's CA issued it; both or neither.
    Messages never show a value."""
    if not isinstance(value, dict):
        raise BadRequest(f"param {name!r} must be an object holding 'password'", "bad_param")
    unknown = sorted(set(value) - {"password", *TLS_KEYS})
    if unknown:
        raise BadRequest(
            f"param {name!r}: unknown key(s) {', '.join(repr(key)[:40] for key in unknown)}; "
            "accepted: password, tls_key, tls_cert", "bad_param"
        )
    password = value.get("password")
    if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD_CHARS:
        raise BadRequest(f"param {name!r}: 'password' must be a string of 1 to {MAX_PASSWORD_CHARS} characters", "bad_param")
    # chpasswd reads `user:password` lines: a line break would start another user's line.
    if any(ord(char) < 32 or ord(char) == 127 for char in password):
        raise BadRequest(f"param {name!r}: 'password' must not contain control characters or line breaks", "bad_param")
    tls = {key: value.get(key) for key in TLS_KEYS}
    if (tls["tls_key"] is None) != (tls["tls_cert"] is None):
        raise BadRequest(f"param {name!r}: 'tls_key' and 'tls_cert' go together", "bad_param")
    _check_pems(name, tls)
    return {"password": password, **tls}


def tls_secrets(name: str, value: Any) -> dict:
    """{"tls_key": PEM, "tls_cert": PEM}: a desktop's new HTTPS key and certificate, alone."""
    if not isinstance(value, dict) or set(value) != set(TLS_KEYS):
        raise BadRequest(f"param {name!r} must be an object of exactly 'tls_key' and 'tls_cert'", "bad_param")
    _check_pems(name, value)
    return {key: value[key] for key in TLS_KEYS}


def _check_pems(name: str, tls: dict) -> None:
    for key, pem in tls.items():
        if pem is not None and not (
            isinstance(pem, str) and len(pem) <= MAX_PEM_CHARS and pem.isascii() and pem.startswith("-----BEGIN ")
            and "\0" not in pem
        ):
            raise BadRequest(f"param {name!r}: {key!r} must be PEM text of at most {MAX_PEM_CHARS} characters", "bad_param")


def ip_address_param(name: str, value: Any) -> str:
    try:
        return _ip_address(value)
    except ValueError:
        raise BadRequest(f"param {name!r} must be an IP address", "bad_param") from None


# One validator per spec key: (required, default, check(value) -> cleaned or raise ValueError(reason)).
def _integer(low: int, high: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return check


def _matching(pattern: str, description: str):
    compiled = re.compile(pattern)

    def check(value):
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise ValueError(description)
        return value

    return check


def _cpus(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.01 <= value <= 4096:
        raise ValueError("a number of CPUs from 0.01 to 4096")
    return value


def _string_map(key_pattern: str, reserved, what: str):
    compiled = re.compile(key_pattern)

    def check(value):
        if not isinstance(value, dict):
            raise ValueError(f"an object of {what}")
        for key, item in value.items():
            if not compiled.fullmatch(key):
                raise ValueError(f"an object of {what}; {key[:40]!r} is not a valid name")
            if reserved(key):
                raise ValueError(f"an object of {what}; {key[:40]!r} is set by the helper")
            if not isinstance(item, str) or "\0" in item:
                raise ValueError(f"an object of {what} with string values (no NUL)")
        return dict(value)

    return check


def _gpus(value):
    if not isinstance(value, list):
        raise ValueError("a list of GPU UUIDs")
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}", item):
            raise ValueError("a list of GPU UUIDs (such as GPU-0c6a1f2e-...)")
    if len(set(value)) != len(value):
        raise ValueError("a list of distinct GPU UUIDs")
    return list(value)


_port = _integer(1, 65535)


def _ports(value):
    if not isinstance(value, dict) or set(value) - {"vnc", "ssh", "https"} or "vnc" not in value:
        raise ValueError('an object {"vnc": PORT, "ssh": PORT or null, "https": PORT or null}')
    ports = {key: None if value.get(key) is None else _port(value[key]) for key in ("vnc", "ssh", "https")}
    taken = [port for port in ports.values() if port is not None]
    if len(set(taken)) != len(taken):
        raise ValueError("different ports for vnc, ssh and https")
    return ports


# Where the raw VNC port is published: on bind_address (published), on the node's 127.0.0.1
# only (loopback, for SSH tunnels), or not at all (off: noVNC over HTTPS only).
VNC_LISTEN = ("published", "loopback", "off")


def _vnc_listen(value):
    if value not in VNC_LISTEN:
        raise ValueError(f"one of {', '.join(VNC_LISTEN)}")
    return value


def _ip_address(value):
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ValueError("an IP address") from None


def _device_path(value):
    if not isinstance(value, str) or not re.fullmatch(r"/dev/[A-Za-z0-9/_.-]{1,200}", value) or ".." in value:
        raise ValueError("a block device path under /dev")
    return value


def _command(value):
    if not isinstance(value, str) or not value.strip() or "\0" in value or len(value) > 4096:
        raise ValueError("a non-empty shell command of at most 4096 characters")
    return value


def image_sessions(name: str, value: Any) -> dict:
    """{"image": the desktop's image (_images.image_ref), "by_desktop": {kind: session command}}:
    the session the image's own marker asks for replaces the spec's desktop_cmd, so a start needs
    no round trip to learn which desktop the image is."""
    if not isinstance(value, dict) or set(value) != {"image", "by_desktop"}:
        raise BadRequest(f"param {name!r} must be an object with 'image' and 'by_desktop'", "bad_param")
    by_desktop = value["by_desktop"]
    if not isinstance(by_desktop, dict) or not 1 <= len(by_desktop) <= 16:
        raise BadRequest(f"param {name!r}: 'by_desktop' must map 1 to 16 desktop kinds to commands", "bad_param")
    sessions = {}
    for kind, command in by_desktop.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", kind):
            raise BadRequest(f"param {name!r}: desktop kind {shorten(repr(kind), 40)} is not a-z, 0-9 and -", "bad_param")
        try:
            sessions[kind] = _command(command)
        except ValueError as reason:
            raise BadRequest(f"param {name!r}: the command for {kind!r} must be {reason}", "bad_param") from None
    return {"image": image_ref(f"{name}.image", value["image"]), "by_desktop": sessions}


_IMAGE_REFERENCE = r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_HOSTNAME = r"(?=.{1,63}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"

SPEC_FIELDS = {
    "name": (True, None, _matching(CONTAINER_PREFIX + USER_PATTERN, f"'{CONTAINER_PREFIX}' followed by the user name")),
    "image": (True, None, _matching(_IMAGE_REFERENCE, "a docker image name with a tag, such as labvm/base:0123abcd")),
    "hostname": (True, None, _matching(_HOSTNAME, "a host name of at most 63 characters")),
    "uid": (True, None, _integer(1000, 2**31 - 2)),
    "env": (
        False,
        {},
        _string_map(
            r"[A-Za-z_][A-Za-z0-9_]{0,127}",
            lambda key: key.startswith("LABVM_") or key == "NVIDIA_VISIBLE_DEVICES",
            "environment variables",
        ),
    ),
    "labels": (
        False,
        {},
        _string_map(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", lambda key: key == LABEL_SPEC_HASH, "labels"),
    ),
    "cpus": (False, None, _cpus),
    "cpuset": (False, None, _matching(r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*", "a cpuset such as 0-3,8")),
    "memory": (True, None, _integer(MIN_MEMORY_BYTES, 2**62)),
    "shm": (False, None, _integer(1024 * 1024, 2**62)),
    "pids": (False, None, _integer(16, 2**31 - 1)),
    "io_weight": (False, None, _integer(10, 1000)),
    "io_read_bps": (False, None, _integer(1, 2**62)),
    "io_write_bps": (False, None, _integer(1, 2**62)),
    "io_device": (False, None, _device_path),
    "gpus": (False, [], _gpus),
    "ports": (True, None, _ports),
    "bind_address": (True, None, _ip_address),
    "vnc_listen": (False, "published", _vnc_listen),
    "vnc_geometry": (False, "1280x800", _matching(r"[1-9][0-9]{1,4}x[1-9][0-9]{1,4}", "WIDTHxHEIGHT, such as 1280x800")),
    "desktop_cmd": (True, None, _command),
}


def container_spec(name: str, value: Any) -> dict:
    """The spec with every key present (null or empty where not given): its hash must not
    depend on whether the admin side spelled out a default."""
    if not isinstance(value, dict):
        raise BadRequest(f"param {name!r} must be an object", "bad_param")
    unknown = sorted(set(value) - set(SPEC_FIELDS))
    if unknown:
        shown = ", ".join(repr(key)[:40] for key in unknown)
        raise BadRequest(f"param {name!r}: unknown key(s) {shown}; accepted: {', '.join(SPEC_FIELDS)}", "bad_param")
    spec = {}
    for key, (required, default, check) in SPEC_FIELDS.items():
        item = value.get(key)
        if item is None:
            if required:
                raise BadRequest(f"param {name!r}: {key!r} is required", "bad_param")
            spec[key] = json.loads(json.dumps(default))
            continue
        try:
            spec[key] = check(item)
        except ValueError as reason:
            raise BadRequest(f"param {name!r}: {key!r} must be {reason}", "bad_param") from None
    if spec["vnc_listen"] == "off" and spec["ports"]["https"] is None:
        raise BadRequest(f"param {name!r}: with 'vnc_listen' off the desktop needs an https port", "bad_param")
    if (spec["io_read_bps"] or spec["io_write_bps"]) and not spec["io_device"]:
        raise BadRequest(f"param {name!r}: 'io_device' is required with io_read_bps or io_write_bps", "bad_param")
    return spec
