"""Run one function against many nodes at once; every node gets its own result.

A slow or dead node costs its own timeout and nothing more: its row reports
the error and the other nodes' results are kept, as Fabric's GroupResult does.
"""

from __future__ import annotations

import concurrent.futures as cf
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
    if not nodes:
        return []
    outcomes: dict[str, NodeOutcome[T]] = {}
    started = time.monotonic()
    pool = cf.ThreadPoolExecutor(max_workers=min(32, len(nodes)), thread_name_prefix="labvm-node")
    futures = {pool.submit(_timed, work, node): node for node in nodes}
    try:
        for future in cf.as_completed(futures, timeout=timeout):
            node = futures[future]
            outcomes[node.name] = future.result()
    except cf.TimeoutError:
        pass
    finally:
        # Don't wait for a hung node's thread; its socket timeouts end it later.
        pool.shutdown(wait=False, cancel_futures=True)
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
