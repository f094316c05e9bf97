"""Pure decisions for a new desktop: which GPUs, which ports, which node. No I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import Node
from .errors import BadInput, NoCapacity


@dataclass(frozen=True)
class GpuRequest:
    """`--gpus N` asks for N free GPUs; `--gpus 0,2` (or `1,`) names GPU indexes; `--gpus 0` asks for none."""

    count: int = 0
    indexes: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str | int | None, default: int = 0) -> "GpuRequest":
        if text is None:
            return cls(count=default)
        text = str(text).strip()
        if re.fullmatch(r"[0-9]{1,3}", text):
            return cls(count=int(text))
        if re.fullmatch(r"[0-9]{1,3}(,[0-9]{1,3})*,?", text):
            indexes = tuple(int(i) for i in text.split(",") if i)
            if len(set(indexes)) != len(indexes):
                raise BadInput(f"--gpus {text}: a GPU index is named twice")
            return cls(count=len(indexes), indexes=indexes)
        raise BadInput(f"--gpus {text!r}: give a count (2), or GPU indexes separated by commas (0,2 or 1,)")

    def describe(self) -> str:
        if self.indexes is not None:
            return "GPU " + ",".join(map(str, self.indexes))
        return f"{self.count} GPU" + ("" if self.count == 1 else "s")


def allocate_gpus(node_name: str, gpus: list[dict], taken: set[str], request: GpuRequest) -> list[dict]:
    """The GPUs to give: named ones if free, else the first free ones by index."""
    free = [g for g in sorted(gpus, key=lambda g: g["index"]) if g["uuid"] not in taken]
    if request.indexes is not None:
        by_index = {g["index"]: g for g in gpus}
        chosen = []
        for index in request.indexes:
            if index not in by_index:
                raise BadInput(f"{node_name} has no GPU {index} (it has {len(gpus)}: {', '.join(str(g['index']) for g in gpus) or 'none'})")
            if by_index[index]["uuid"] in taken:
                raise NoCapacity(f"GPU {index} on {node_name} is already given to another desktop")
            chosen.append(by_index[index])
        return chosen
    if request.count > len(free):
        raise NoCapacity(f"{node_name} has {len(free)} free GPU(s) of {len(gpus)}; {request.describe()} asked")
    return free[: request.count]


def port_slots(node: Node):
    for slot in range(node.docker_port_slots):
        first = node.docker_port_base + slot * node.docker_user_port_num
        yield first, (first + 1 if node.docker_user_port_num >= 2 else None)


def allocate_ports(node: Node, used: set[int]) -> tuple[int, int | None]:
    for vnc, ssh in port_slots(node):
        # The slot's HTTPS port (Node.https_port) is its own too: something else on the node
        # listening there takes the slot out.
        if vnc not in used and (ssh is None or ssh not in used) and node.https_port(vnc) not in used:
            return vnc, ssh
    raise NoCapacity(
        f"{node.name}: all {node.docker_port_slots} port slots from {node.docker_port_base} are taken; "
        "raise docker_port_slots in the cluster file"
    )


@dataclass(frozen=True)
class NodeCapacity:
    """What a node can still give, from its probe facts and the state database."""

    node: Node
    gpus: list[dict]
    taken_gpus: set[str]
    memory_total: int
    memory_promised: int
    error: str | None = None
    disk_device: str | None = None
    blkio_weight: bool = True
    ports_in_use: frozenset[int] = frozenset()

    @property
    def free_gpus(self) -> int:
        return len([g for g in self.gpus if g["uuid"] not in self.taken_gpus])

    @property
    def free_memory(self) -> int:
        return self.memory_total - self.memory_promised

    def pick_gpus(self, request: GpuRequest, taken: set[str]) -> list[dict]:
        """The request's GPUs among those not taken."""
        return allocate_gpus(self.node.name, self.gpus, taken, request)

    def pick_ports(self, used: set[int]) -> tuple[int, int | None]:
        """Ports neither used (by a desktop there, a switch to it) nor listened on by the node."""
        return allocate_ports(self.node, set(self.ports_in_use) | used)

    def choice(self, request: GpuRequest):
        """How a reservation on this node picks, inside the store's transaction (StateDB.reserve)."""
        def pick(taken: set[str], used: set[int]) -> tuple[list[dict], tuple[int, int | None]]:
            return self.pick_gpus(request, taken), self.pick_ports(used)

        return pick


def choose_node(capacities: list[NodeCapacity], request: GpuRequest, memory: int) -> tuple[Node, str]:
    """Pick the node with room for the GPUs and memory asked; prefer the most free GPUs, then memory.

    Returns the node and a one-line reason, or raises NoCapacity naming why each node was passed over.
    """
    fits, passed = [], []
    for cap in capacities:
        name = cap.node.name
        if cap.error:
            passed.append(f"{name}: {cap.error}")
        elif request.indexes is None and cap.free_gpus < request.count:
            passed.append(f"{name}: {cap.free_gpus} free GPU(s)")
        elif cap.free_memory < memory:
            passed.append(f"{name}: {cap.free_memory >> 20} MiB memory unpromised")
        else:
            fits.append(cap)
    if not fits:
        raise NoCapacity(f"no node can take a desktop with {request.describe()} and {memory >> 20} MiB ({'; '.join(passed)})")
    best = max(fits, key=lambda c: (c.free_gpus - request.count, c.free_memory, -capacities.index(c)))
    reason = (
        f"chose {best.node.name}: {best.free_gpus} free GPU(s), {best.free_memory >> 30} GiB memory unpromised"
        + (f"; passed over {'; '.join(passed)}" if passed else "")
    )
    return best.node, reason
