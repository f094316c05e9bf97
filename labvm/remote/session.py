"""One SSH session to a node for the length of a command: its connection and helper runner."""

from __future__ import annotations

from ..config import Node
from .connection import NodeConnection
from .helpers import HelperBundle, HelperCall, HelperRunner


class NodeSession:
    """One SSH connection and helper runner for a node, for the length of a command."""

    def __init__(self, home, node: Node, bundle: HelperBundle):
        self.node = node
        self.conn = NodeConnection(node, home.home)
        self.runner = HelperRunner(self.conn, bundle)

    def call(self, helper: str, action: str, params: dict, timeout: float = 180, check: bool = False) -> dict:
        """One helper action; with check, what it would change, changing nothing."""
        return self.runner.call(helper, action, params, check=check, timeout=timeout)

    def run(self, call: HelperCall, check: bool = False) -> dict:
        """One typed call (see recipes.py); its reply's data."""
        return self.runner.call(call.helper, call.action, call.params, timeout=call.timeout, check=check)["data"]

    def call_many(self, calls: list[HelperCall], done=lambda _index: None, check: bool = False) -> list[dict]:
        """Several calls in one round trip; see HelperRunner.call_many."""
        return self.runner.call_many(calls, done=done, check=check)

    def send_image(self, cfg, path, image: str, progress=lambda _done, _total: None) -> bool:
        """Desktop image `image` (its tarball at path, here) into the node's store unless the
        node holds it; True if it was sent."""
        from ..images import send_image

        return send_image(cfg, self.conn, self.runner, path, image, progress)

    def alive(self, timeout: float) -> None:
        """Raise unless the node answers over this connection within timeout seconds."""
        self.conn.run(["true"], timeout=timeout)

    def close(self) -> None:
        self.conn.close()
