"""Typed errors. Each carries its own exit code; the CLI maps them in one place.

The class docstring is the message template, formatted with the keyword
arguments given at raise time, so every message reads the same wherever the
error is raised.
"""

from __future__ import annotations


class LabvmError(Exception):
    """{msg}"""

    exit_code = 1

    def __init__(self, msg: str | None = None, **fields):
        self.fields = dict(fields)
        if msg is not None:
            self.fields.setdefault("msg", msg)
        template = (type(self).__doc__ or "{msg}").strip().splitlines()[0]
        try:
            text = template.format(**self.fields)
        except (KeyError, IndexError):
            text = self.fields.get("msg") or type(self).__name__
        super().__init__(text)

    @property
    def message(self) -> str:
        return str(self)


class BadInput(LabvmError):
    """{msg}"""

    exit_code = 2


class ConfigError(LabvmError):
    """{msg}"""

    exit_code = 3


class NotFound(LabvmError):
    """{msg}"""

    exit_code = 4


class AlreadyExists(LabvmError):
    """{msg}"""

    exit_code = 5


class FilesOfAnotherMember(AlreadyExists):
    """{msg}"""

    op_state = "refused"  # refused in create's preflight, before anything changed


class StateError(LabvmError):
    """{msg}"""

    exit_code = 6


class InsecureFile(StateError):
    """{path} {problem}; run: {fix}"""


class NodeError(LabvmError):
    """{node}: {msg}"""

    exit_code = 7


class NodeUnreachable(NodeError):
    """{node}: unreachable: {msg}"""


class HostKeyMismatch(NodeError):
    """{node}: host key changed (now {fingerprint}); refusing to connect. If the node was reinstalled, run: labvm node rekey {node}"""

    exit_code = 8


class HostKeyUnknown(NodeError):
    """{node}: no pinned host key for {host}:{port}; add the node with: labvm node add {node} {host}"""

    exit_code = 8


class HelperFailed(NodeError):
    """{node}: {helper}.{action} failed [{code}]: {msg}"""

    def __init__(self, node, helper, action, code, msg, retryable=False, exit_status=1):
        self.code = code
        self.retryable = retryable
        self.exit_status = exit_status
        super().__init__(node=node, helper=helper, action=action, code=code, msg=msg)


class HelperCrashed(NodeError):
    """{node}: {helper}.{action} crashed (exit {status}): {tail}"""


class ImageError(LabvmError):
    """{msg}"""

    exit_code = 9


class ToolMissing(ImageError):
    """{tool} is not installed on this host; install it with: apt-get install {package}"""


class ImageBuildFailed(ImageError):
    """building the {desktop} image failed at {step}: {detail} (full log: {log})"""


class NoCapacity(LabvmError):
    """{msg}"""

    exit_code = 10


class PartlyDone(LabvmError):
    """{msg}"""

    exit_code = 11


class Busy(LabvmError):
    """{msg}"""

    exit_code = 75


class Aborted(LabvmError):
    """Aborted."""

    exit_code = 1


class RolledBack(StateError):
    """{msg}"""

    op_state = "rolled_back"
