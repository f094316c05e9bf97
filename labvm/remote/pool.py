"""Run one function against many nodes at once; every node gets its own result.

A slow or dead node costs its own timeout and nothing more: its row reports
the error and the other nodes' results are kept, as Fabric's GroupResult does.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

from ..config import Node
from ..errors import LabvmError

T = TypeVar("T")

DEFAULT_NODE_TIMEOUT = 30.0


@dataclass
class NodeOutcome(Generic[T]):
    node: str
    value: T | None = None
    error: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def run_on_nodes(
    nodes: Iterable[Node],
    work: Callable[[Node], T],
    timeout: float = DEFAULT_NODE_TIMEOUT,
) -> list[NodeOutcome[T]]:
    """Call work(node) for every node in parallel; results come back in the nodes' order."""
    nodes = list(nodes)
    results: queue.Queue[NodeOutcome[T]] = queue.Queue()
    for node in nodes:
        # Daemon threads: a node hung in a socket read must not keep labvm from exiting,
        # which a ThreadPoolExecutor's workers would (they are joined at interpreter exit).
        threading.Thread(
            target=lambda n=node: results.put(_timed(work, n)), name=f"labvm-{node.name}", daemon=True
        ).start()
    outcomes: dict[str, NodeOutcome[T]] = {}
    started = time.monotonic()
    deadline = started + timeout
    while len(outcomes) < len(nodes):
        try:
            outcome = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        outcomes[outcome.node] = outcome
    elapsed = time.monotonic() - started
    for node in nodes:
        outcomes.setdefault(
            node.name,
            NodeOutcome(node.name, error=f"no answer within {timeout:g}s", error_kind="timeout", seconds=elapsed),
        )
    return [outcomes[node.name] for node in nodes]


def _timed(work: Callable[[Node], T], node: Node) -> NodeOutcome[T]:
    started = time.monotonic()
    try:
        value = work(node)
    except LabvmError as exc:
        # The outcome is already keyed by node; drop the "n1: " that node errors start with.
        message = str(exc).removeprefix(f"{node.name}: ")
        return NodeOutcome(node.name, error=message, error_kind=type(exc).__name__, seconds=time.monotonic() - started)
    except Exception as exc:  # one node's surprise must not hide the others' results
        return NodeOutcome(
            node.name, error=f"{type(exc).__name__}: {exc}", error_kind="internal", seconds=time.monotonic() - started
        )
    return NodeOutcome(node.name, value=value, seconds=time.monotonic() - started)
