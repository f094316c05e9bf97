"""The contract every node helper follows (see ARCHITECTURE.md, "Contract between labvm and
node helpers").

A helper reads one JSON request on stdin, `{"action": str, "params": {...}, "check": bool}`,
and writes exactly one JSON object on stdout:

    {"ok": true, "changed": bool, "data": {...}}
    {"ok": false, "error": {"code": str, "msg": str, "retryable": bool}}

Exit codes: 0 ok, 1 failed, 2 bad request, 3 precondition failed, 75 temporary failure.
Logs go to stderr.

A batch runs several actions, of any helpers, in one process: one SSH round trip where a
desktop's bring-up would otherwise take eight. Its request is

    {"steps": [{"helper": str, "action": str, "params": {...}, "check": bool}, ...]}

and it runs the steps in order, stopping after the first that does not succeed. Its reply is

    {"ok": true, "changed": bool, "data": {"replies": [{"exit_code": int, <reply>}, ...]}}

with one reply per step that ran, each exactly what that step alone would have answered; the
batch's own exit code is 0 unless the batch request itself is wrong (2).

Standard library only: this runs with the node's system python3.
"""

import json
import os
import posixpath
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

MAX_REQUEST_BYTES = 1024 * 1024
REQUEST_KEYS = ("action", "params", "check")
BATCH = "batch"
STEP_KEYS = ("helper",) + REQUEST_KEYS
MAX_BATCH_STEPS = 32

# A key whose name contains one of these holds a secret, wherever it sits in the request;
# so does every value under a "secrets" object.
SECRET_NAME_PARTS = ("password", "passwd", "secret", "token")
SECRETS_KEY = "secrets"
REDACTED = "<redacted>"


# --- errors -------------------------------------------------------------------------------


class HelperError(Exception):
    """A failure the helper reports as a JSON error; subclasses carry the exit code."""

    exit_code = 1
    default_code = "failed"
    retryable = False

    def __init__(self, msg: str, code: str | None = None):
        super().__init__(msg)
        self.msg = msg
        self.code = code or self.default_code


class Failed(HelperError):
    """The action was attempted and did not succeed."""


class BadRequest(HelperError):
    """The request itself is wrong; sending it again will not help."""

    exit_code = 2
    default_code = "bad_request"


class PreconditionFailed(HelperError):
    """The node is not in a state where the action can run; someone must fix that first."""

    exit_code = 3
    default_code = "precondition_failed"


class TemporaryFailure(HelperError):
    """Something outside the helper is unavailable right now; the caller may retry."""

    exit_code = 75
    default_code = "temporary_failure"
    retryable = True


# --- actions and their parameters ---------------------------------------------------------


@dataclass(frozen=True)
class Result:
    changed: bool
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """One accepted parameter: `validate(name, value)` returns the cleaned value or raises
    BadRequest."""

    validate: Callable[[str, Any], Any]
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Action:
    """`run(params, check)` returns a Result; with check=True it must change nothing."""

    run: Callable[[dict, bool], Result]
    params: Mapping[str, Param] = field(default_factory=dict)


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered == SECRETS_KEY or any(part in lowered for part in SECRET_NAME_PARTS)


def shown_value(name: str, value: Any) -> str:
    """The value as an error message may show it: never for a secret-looking name."""
    if is_secret_name(name):
        return REDACTED
    return shorten(repr(value))


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_params(spec: Mapping[str, Param], params: dict) -> dict:
    unknown = sorted(set(params) - set(spec))
    if unknown:
        names = ", ".join(shorten(repr(name), 40) for name in unknown)
        accepted = ", ".join(sorted(spec)) or "none"
        raise BadRequest(f"unknown param(s) {names}; accepted: {accepted}", "unknown_param")
    cleaned = {}
    for name, param in spec.items():
        # null stands for "not given", so a caller can pass an unset config value as is.
        value = params.get(name)
        if value is not None:
            cleaned[name] = param.validate(name, value)
        elif param.required:
            raise BadRequest(f"missing required param {name!r}", "missing_param")
        else:
            cleaned[name] = param.default
    return cleaned


def absolute_path(name: str, value: Any) -> str:
    """An absolute, normalised path. NUL and line breaks are refused: they end up in
    argument lists, mount tables and logs where they would split or truncate the path."""
    if not isinstance(value, str):
        raise BadRequest(f"param {name!r} must be a string path", "bad_param")
    if any(char in value for char in "\0\n\r"):
        raise BadRequest(f"param {name!r} must not contain NUL or line breaks", "bad_param")
    if not value.startswith("/"):
        raise BadRequest(f"param {name!r} must be an absolute path, got {shown_value(name, value)}", "bad_param")
    if len(value) > 4096:
        raise BadRequest(f"param {name!r} is longer than 4096 characters", "bad_param")
    return posixpath.normpath(value)


def integer_between(low: int, high: int) -> Callable[[str, Any], int]:
    def validate(name: str, value: Any) -> int:
        # bool is an int in Python, but `"port": true` is a caller bug.
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"param {name!r} must be an integer", "bad_param")
        if not low <= value <= high:
            raise BadRequest(f"param {name!r} must be between {low} and {high}, got {shown_value(name, value)}", "bad_param")
        return value

    return validate


def string_matching(pattern: str, description: str) -> Callable[[str, Any], str]:
    compiled = re.compile(pattern)

    def validate(name: str, value: Any) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise BadRequest(f"param {name!r} must be {description}, got {shown_value(name, value)}", "bad_param")
        return value

    return validate


# The member name rule, the same as labvm/names.py's USER_NAME_PATTERN (a unit test holds the
# two equal): it becomes an account in the desktop and part of its host name.
USER_PATTERN = r"[a-z](?:[a-z0-9-]{0,29}[a-z0-9])?"
user_name = string_matching(USER_PATTERN, "a user name: a lowercase letter, then up to 30 of a-z 0-9 -, not ending in -")

# Characters with a meaning in overlay's option string (and in docker's Binds "src:dst:mode").
LAYER_PATH_FORBIDDEN = ",:\\"


NODE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"


def node_name(name: str, value: Any) -> str:
    """A node's name as the cluster file spells it."""
    if not isinstance(value, str) or not re.fullmatch(NODE_NAME_PATTERN, value):
        raise BadRequest(f"param {name!r} must be a node name", "bad_param")
    return value


def layer_path(name: str, value: Any) -> str:
    """An absolute path that can sit in overlay's option string: no ',', ':' or backslash,
    which would split it, and not / itself."""
    path = absolute_path(name, value)
    if path == "/":
        raise BadRequest(f"param {name!r} must not be /", "bad_param")
    if any(char in path for char in LAYER_PATH_FORBIDDEN):
        raise BadRequest(f"param {name!r} must not contain ',', ':' or '\\': overlay options would split it", "bad_param")
    return path


# --- requests and replies -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    action: str
    params: dict
    check: bool


@dataclass(frozen=True)
class Reply:
    exit_code: int
    body: dict


def decode_request_document(raw: bytes) -> Any:
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request is larger than {MAX_REQUEST_BYTES} bytes", "malformed_request")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request is not valid UTF-8", "malformed_request") from None
    if not text.strip():
        raise BadRequest("empty request: expected one JSON object on stdin", "malformed_request")
    try:
        # The decoder's message gives only a position, never request content.
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRequest(f"request is not valid JSON: {error}", "malformed_request") from None


def request_from_document(document: Any) -> Request:
    if not isinstance(document, dict):
        raise BadRequest(f"request must be a JSON object, got a JSON {json_type_name(document)}", "malformed_request")
    unknown = sorted(set(document) - set(REQUEST_KEYS))
    if unknown:
        names = ", ".join(shorten(repr(name), 40) for name in unknown)
        raise BadRequest(f"unknown request key(s) {names}; accepted: {', '.join(REQUEST_KEYS)}", "malformed_request")
    action = document.get("action")
    params = document.get("params", {})
    check = document.get("check", False)
    if not isinstance(action, str) or not action:
        raise BadRequest("request key 'action' must be a non-empty string", "malformed_request")
    if not isinstance(params, dict):
        raise BadRequest("request key 'params' must be a JSON object", "malformed_request")
    if not isinstance(check, bool):
        raise BadRequest("request key 'check' must be true or false", "malformed_request")
    return Request(action, params, check)


def json_type_name(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def success_body(result: Result) -> dict:
    return {"ok": True, "changed": bool(result.changed), "data": result.data}


def error_body(code: str, msg: str, retryable: bool) -> dict:
    return {"ok": False, "error": {"code": code, "msg": msg, "retryable": retryable}}


def run_one(helper: str, document: Any, load_actions: Callable[[str], Mapping[str, Action]]) -> Reply:
    """One action of one helper, from its request document; never raises."""
    try:
        actions = load_actions(helper)
        request = request_from_document(document)
        action = actions.get(request.action)
        if action is None:
            raise BadRequest(
                f"unknown action {shorten(repr(request.action), 60)} for helper {helper!r}; known: {', '.join(sorted(actions))}",
                "unknown_action",
            )
        params = validate_params(action.params, request.params)
        return Reply(0, success_body(action.run(params, request.check)))
    except HelperError as error:
        return Reply(error.exit_code, error_body(error.code, error.msg, error.retryable))
    except Exception as error:  # noqa: BLE001 - the caller must get JSON, whatever broke
        traceback.print_exc(file=sys.stderr)
        msg = f"internal error in helper: {type(error).__name__}: {shorten(str(error), 300)}"
        return Reply(Failed.exit_code, error_body("internal", msg, False))


def handle_request(argv: list[str], raw: bytes, load_actions: Callable[[str], Mapping[str, Action]]) -> Reply:
    """Turn argv (the helper name, or `batch`) and the raw request into a reply; never raises."""
    try:
        if len(argv) != 1:
            raise BadRequest("usage: labvm_helper.py HELPER|batch < request.json", "malformed_request")
        if argv[0] != BATCH:
            load_actions(argv[0])  # an unknown helper is refused before the request is read
        document = decode_request_document(raw)
        if argv[0] == BATCH:
            return run_batch(batch_steps(document), load_actions)
    except HelperError as error:
        return Reply(error.exit_code, error_body(error.code, error.msg, error.retryable))
    return run_one(argv[0], document, load_actions)


def batch_steps(document: Any) -> list[tuple[str, dict]]:
    """The (helper, request document) pairs of a batch request; BadRequest if it is not one."""
    if not isinstance(document, dict) or set(document) != {"steps"}:
        raise BadRequest('a batch request must be {"steps": [...]}', "malformed_request")
    steps = document["steps"]
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_BATCH_STEPS:
        raise BadRequest(f"a batch's 'steps' must be a list of 1 to {MAX_BATCH_STEPS} steps", "malformed_request")
    pairs = []
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict) or not isinstance(step.get("helper"), str) or step["helper"] == BATCH:
            raise BadRequest(f"batch step {number} must be an object naming its 'helper'", "malformed_request")
        unknown = sorted(set(step) - set(STEP_KEYS))
        if unknown:
            names = ", ".join(shorten(repr(name), 40) for name in unknown)
            raise BadRequest(f"unknown key(s) {names} in batch step {number}; accepted: {', '.join(STEP_KEYS)}", "malformed_request")
        pairs.append((step["helper"], {key: value for key, value in step.items() if key != "helper"}))
    return pairs


def run_batch(steps: list[tuple[str, dict]], load_actions: Callable[[str], Mapping[str, Action]]) -> Reply:
    replies, changed = [], False
    for helper, document in steps:
        reply = run_one(helper, document, load_actions)
        replies.append({"exit_code": reply.exit_code, **reply.body})
        if reply.exit_code != 0:
            break
        changed = changed or reply.body["changed"]
    return Reply(0, success_body(Result(changed, {"replies": replies})))


# --- secrets ------------------------------------------------------------------------------


def secret_values(document: Any, inside_secret: bool = False) -> set[str]:
    """Every scalar in the request that sits under a secret-looking key."""
    if isinstance(document, dict):
        found = set()
        for key, value in document.items():
            found |= secret_values(value, inside_secret or is_secret_name(str(key)))
        return found
    if isinstance(document, list):
        found = set()
        for item in document:
            found |= secret_values(item, inside_secret)
        return found
    if inside_secret and document is not None and not isinstance(document, bool):
        text = str(document)
        return {text} if text else set()
    return set()


def secret_values_in_raw(raw: bytes) -> set[str]:
    try:
        return secret_values(json.loads(raw.decode("utf-8")))
    except (ValueError, UnicodeDecodeError):
        return set()


class Redactor:
    def __init__(self, secrets: set[str]):
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def scrub(self, value: Any) -> Any:
        """Redact every string inside a reply before it is encoded: JSON escaping could
        otherwise hide a secret from a plain text search."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(str(key)): self.scrub(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub(item) for item in value]
        return value


class RedactingStream:
    """Wraps sys.stderr so no log line or traceback can carry a secret from the request."""

    def __init__(self, stream, redact: Redactor):
        self._stream = stream
        self._redact = redact

    def write(self, text: str) -> int:
        self._stream.write(self._redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def log(message: str) -> None:
    print(f"labvm-helper: {message}", file=sys.stderr, flush=True)


# --- process entry ------------------------------------------------------------------------


def claim_stdout():
    """Keep the real stdout for the single reply and point fd 1 at stderr, so a stray print
    or a child process that inherits fd 1 cannot add a second object to stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(reply_fd, "w", encoding="utf-8")


def main(argv: list[str], load_actions: Callable[[str], Mapping[str, Action]]) -> int:
    reply_stream = claim_stdout()
    raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    redact = Redactor(secret_values_in_raw(raw))
    sys.stderr = RedactingStream(sys.stderr, redact)
    sys.stdout = sys.stderr
    reply = handle_request(argv, raw, load_actions)
    reply_stream.write(json.dumps(redact.scrub(reply.body), sort_keys=True) + "\n")
    reply_stream.flush()
    return reply.exit_code
