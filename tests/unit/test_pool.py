"""Parallel node runs: each node has its own outcome; a slow node costs only its timeout."""

import threading

from labvm.config import Node
from labvm.errors import NodeUnreachable
from labvm.remote.pool import run_on_nodes

NODES = [Node(name=f"n{i}", host=f"10.0.0.{i}") for i in range(1, 5)]


def test_results_come_back_in_node_order_with_errors_per_node():
    def work(node):
        if node.name == "n2":
            raise NodeUnreachable(node=node.name, msg="connection refused")
        if node.name == "n3":
            raise RuntimeError("surprise")
        return node.host

    outcomes = run_on_nodes(NODES, work)
    assert [o.node for o in outcomes] == ["n1", "n2", "n3", "n4"]
    assert outcomes[0].ok and outcomes[0].value == "10.0.0.1"
    assert not outcomes[1].ok and outcomes[1].error == "unreachable: connection refused"
    assert outcomes[1].error_kind == "NodeUnreachable"
    assert outcomes[2].error_kind == "internal" and "surprise" in outcomes[2].error
    assert outcomes[3].ok


def test_nodes_run_concurrently():
    barrier = threading.Barrier(len(NODES), timeout=5)

    def work(node):
        barrier.wait()  # only passes if all nodes are in flight at once
        return True

    assert all(o.ok for o in run_on_nodes(NODES, work))


def test_a_hung_node_is_reported_as_timeout_without_holding_the_others():
    release = threading.Event()
    hung_node_done = threading.Event()

    def work(node):
        if node.name == "n1":
            release.wait(30)
            hung_node_done.set()
        return node.name

    outcomes = run_on_nodes(NODES, work, timeout=0.5)
    # run_on_nodes came back while n1 was still stuck: it never waited for the hung node.
    assert not hung_node_done.is_set()
    release.set()
    assert outcomes[0].error_kind == "timeout" and "0.5s" in outcomes[0].error
    assert [o.value for o in outcomes[1:]] == ["n2", "n3", "n4"]


def test_no_nodes_no_work():
    assert run_on_nodes([], lambda n: 1) == []
