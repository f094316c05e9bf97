"""The few Docker Engine API calls the helpers make, over dockerd's unix socket.

Standard library only (http.client through _system.request_over_unix_socket): the docker SDK
is not on the nodes. Paths are pinned to API 1.41 (engine 20.10); newer engines still serve it.
Failures to reach dockerd become the contract's typed errors, so every helper reports them the
same way.
"""

import http.client
import json
import struct
import time
import urllib.parse
from typing import Any

from _contract import Failed, PreconditionFailed, TemporaryFailure
from _system import request_over_unix_socket

DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
API_VERSION = "1.41"
DOCKER_TIMEOUT_S = 60.0

# docker attach/exec/logs without a TTY: each frame is [stream, 0, 0, 0, size (big endian)].
STREAM_HEADER = struct.Struct(">BxxxI")
STDOUT, STDERR = 1, 2


def api_url(path: str, query: dict | None = None) -> str:
    url = f"/v{API_VERSION}{path}"
    return f"{url}?{urllib.parse.urlencode(query)}" if query else url


def quoted(name: str) -> str:
    """A container or exec name as one URL path segment."""
    return urllib.parse.quote(name, safe="")


def docker_call(
    socket_path: str,
    method: str,
    url: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout_s: float = DOCKER_TIMEOUT_S,
) -> tuple[int, bytes]:
    """One request to dockerd: (status, whole body)."""
    try:
        return request_over_unix_socket(socket_path, method, url, timeout_s, body=body, content_type=content_type)
    except FileNotFoundError:
        raise PreconditionFailed(
            f"docker socket {socket_path} does not exist: is dockerd running?", "docker_socket_missing"
        ) from None
    except TimeoutError:
        raise TemporaryFailure(f"docker socket {socket_path}: no answer within {timeout_s:g} s", "docker_unavailable") from None
    except (OSError, http.client.HTTPException) as error:
        raise TemporaryFailure(f"docker socket {socket_path}: {error or type(error).__name__}", "docker_unavailable") from None


def docker_json_call(
    socket_path: str, method: str, url: str, payload: Any = None, timeout_s: float = DOCKER_TIMEOUT_S
) -> tuple[int, Any]:
    """A request with an optional JSON body; (status, decoded JSON or None when the body is
    empty or not JSON)."""
    body = None if payload is None else json.dumps(payload).encode()
    status, answer = docker_call(
        socket_path, method, url, body=body, content_type="application/json" if body is not None else None, timeout_s=timeout_s
    )
    try:
        return status, json.loads(answer) if answer.strip() else None
    except ValueError:
        return status, None


def docker_message(body: Any) -> str:
    """What dockerd said about an error: its `message`, else the start of the body."""
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    if isinstance(body, bytes):
        try:
            return docker_message(json.loads(body))
        except ValueError:
            return body.decode("utf-8", errors="replace").strip()[:200] or "(empty body)"
    return str(body)[:200] if body is not None else "(empty body)"


def unexpected(what: str, status: int, body: Any, code: str = "docker_error") -> Failed:
    return Failed(f"{what} answered HTTP {status}: {docker_message(body)}", code)


def demux_stream(data: bytes) -> tuple[bytes, bytes]:
    """Split docker's multiplexed stream into (stdout, stderr). A body that does not start
    with a frame header (a TTY stream) is all stdout."""
    out, err = [], []
    offset = 0
    while offset + STREAM_HEADER.size <= len(data):
        stream, size = STREAM_HEADER.unpack_from(data, offset)
        if stream not in (0, STDOUT, STDERR):
            return data, b""
        offset += STREAM_HEADER.size
        (err if stream == STDERR else out).append(data[offset : offset + size])
        offset += size
    if offset == 0 and data:
        return data, b""
    return b"".join(out), b"".join(err)


# --- containers ---------------------------------------------------------------------------


def inspect_container(socket_path: str, name: str) -> dict | None:
    """GET /containers/NAME/json, or None when there is no such container."""
    status, body = docker_json_call(socket_path, "GET", api_url(f"/containers/{quoted(name)}/json"))
    if status == 404:
        return None
    if status != 200 or not isinstance(body, dict):
        raise unexpected(f"inspecting container {name}", status, body)
    return body


def container_logs_tail(socket_path: str, name: str, lines: int = 20) -> str:
    """The last lines the container wrote, for error messages; empty when unavailable."""
    try:
        status, body = docker_call(
            socket_path, "GET", api_url(f"/containers/{quoted(name)}/logs", {"stdout": 1, "stderr": 1, "tail": lines})
        )
    except (Failed, PreconditionFailed, TemporaryFailure):
        return ""
    if status != 200:
        return ""
    out, err = demux_stream(body)
    return (out + err).decode("utf-8", errors="replace").strip()


def exec_in_container(socket_path: str, name: str, argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run argv in a running container as root and wait for it: (exit code, its output).
    Nothing is sent on stdin; secrets reach the command through files, never argv."""
    status, created = docker_json_call(
        socket_path,
        "POST",
        api_url(f"/containers/{quoted(name)}/exec"),
        {"AttachStdin": False, "AttachStdout": True, "AttachStderr": True, "Tty": False, "User": "0:0", "Cmd": argv},
    )
    if status == 409:
        raise PreconditionFailed(f"container {name} is not running: {docker_message(created)}", "container_not_running")
    if status != 201 or not isinstance(created, dict) or "Id" not in created:
        raise unexpected(f"creating an exec in {name}", status, created)
    exec_id = str(created["Id"])
    # Without "Detach" dockerd hijacks the connection, streams the output and closes it when
    # the command ends; reading the body to its end therefore waits for the command.
    status, stream = docker_call(
        socket_path,
        "POST",
        api_url(f"/exec/{quoted(exec_id)}/start"),
        body=json.dumps({"Detach": False, "Tty": False}).encode(),
        content_type="application/json",
        timeout_s=timeout_s,
    )
    if status != 200:
        raise unexpected(f"starting an exec in {name}", status, stream)
    out, err = demux_stream(stream)
    output = (out + err).decode("utf-8", errors="replace").strip()
    return exec_exit_code(socket_path, exec_id), output


def exec_exit_code(socket_path: str, exec_id: str, attempts: int = 50) -> int:
    """dockerd may still report an exec as running just after its stream closed."""
    for _ in range(attempts):
        status, body = docker_json_call(socket_path, "GET", api_url(f"/exec/{quoted(exec_id)}/json"))
        if status != 200 or not isinstance(body, dict):
            raise unexpected(f"inspecting exec {exec_id[:12]}", status, body)
        if not body.get("Running") and body.get("ExitCode") is not None:
            return int(body["ExitCode"])
        time.sleep(0.1)
    raise Failed(f"exec {exec_id[:12]} still running after its output ended", "docker_error")
