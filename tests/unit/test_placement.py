"""GPU, port and node choices for a new desktop (pure functions)."""

import pytest

from labvm.config import Node
from labvm.errors import BadInput, NoCapacity
from labvm.placement import GpuRequest, NodeCapacity, allocate_gpus, allocate_ports, choose_node

GPUS = [{"index": i, "uuid": f"GPU-{i}"} for i in range(4)]


@pytest.mark.parametrize(
    "text, count, indexes",
    [(None, 1, None), ("0", 0, None), ("2", 2, None), ("0,2", 2, (0, 2)), ("1,", 1, (1,)), (" 3 ", 3, None)],
)
def test_gpu_request_parse(text, count, indexes):
    request = GpuRequest.parse(text, default=1)
    assert (request.count, request.indexes) == (count, indexes)


@pytest.mark.parametrize("text", ["-1", "a", "1;2", "0,,1", "1,1", "$(x)", "1 2"])
def test_gpu_request_rejects(text):
    with pytest.raises(BadInput):
        GpuRequest.parse(text)


def test_allocate_first_free_by_index():
    chosen = allocate_gpus("n1", list(reversed(GPUS)), {"GPU-0", "GPU-2"}, GpuRequest(count=2))
    assert [g["uuid"] for g in chosen] == ["GPU-1", "GPU-3"]


def test_allocate_named_gpus_and_refuse_busy_or_missing():
    assert [g["uuid"] for g in allocate_gpus("n1", GPUS, set(), GpuRequest.parse("2,0"))] == ["GPU-2", "GPU-0"]
    with pytest.raises(NoCapacity, match="GPU 2 on n1 is already given"):
        allocate_gpus("n1", GPUS, {"GPU-2"}, GpuRequest.parse("0,2"))
    with pytest.raises(BadInput, match="n1 has no GPU 7"):
        allocate_gpus("n1", GPUS, set(), GpuRequest.parse("7,"))


def test_more_gpus_than_free_is_refused():
    with pytest.raises(NoCapacity, match="n1 has 1 free GPU"):
        allocate_gpus("n1", GPUS, {"GPU-0", "GPU-1", "GPU-2"}, GpuRequest(count=2))
    assert allocate_gpus("n1", GPUS, set(GPUS[i]["uuid"] for i in range(4)), GpuRequest(count=0)) == []


def test_ports_come_in_slots_and_run_out():
    node = Node(name="n1", host="h", docker_port_base=20000, docker_user_port_num=2, docker_port_slots=3)
    assert allocate_ports(node, set()) == (20000, 20001)
    assert allocate_ports(node, {20000, 20001}) == (20002, 20003)
    assert allocate_ports(node, {20001}) == (20002, 20003)
    with pytest.raises(NoCapacity, match="all 3 port slots"):
        allocate_ports(node, set(range(20000, 20006)))


def test_a_slot_whose_https_port_is_in_use_is_skipped():
    node = Node(name="n1", host="h", docker_port_base=20000, docker_user_port_num=2, docker_port_slots=3)
    assert node.https_port(20000) == 20006
    assert allocate_ports(node, {20006}) == (20002, 20003)


def cap(name, free_gpus, free_gib, error=None):
    gpus = [{"index": i, "uuid": f"{name}-{i}"} for i in range(4)]
    taken = {g["uuid"] for g in gpus[free_gpus:]}
    return NodeCapacity(Node(name=name, host=name), gpus, taken, 64 << 30, (64 - free_gib) << 30, error)


def test_choose_node_prefers_room_and_explains():
    node, reason = choose_node([cap("n1", 1, 60), cap("n2", 3, 10), cap("n3", 0, 60)], GpuRequest(count=1), 8 << 30)
    assert node.name == "n2"
    assert reason.startswith("chose n2: 3 free GPU(s)") and "n3: 0 free GPU(s)" in reason


def test_choose_node_skips_unreachable_and_full_nodes_and_says_why():
    with pytest.raises(NoCapacity) as err:
        choose_node([cap("n1", 4, 60, error="unreachable: refused"), cap("n2", 0, 60), cap("n3", 4, 1)], GpuRequest(count=1), 8 << 30)
    message = str(err.value)
    assert "n1: unreachable: refused" in message and "n2: 0 free GPU(s)" in message and "n3: 1024 MiB" in message
