"""net: the desktops' own docker network on a node, and the packet filter that keeps a
member's root inside their desktop away from everything but the outside world.

A member has root in their desktop, so whatever their container can reach, they can reach with
any tool: MooseFS trusts its clients by IP address (and chunkservers ask nothing at all), the
node's own services answer on the node's addresses, and other desktops sit on the same bridge.

- Desktops run on the docker network `labvm` (bridge `labvm0`) with inter-container traffic off,
  not on docker's default bridge: the rules below then name one interface, and other
  containers on the node are left alone.
- iptables, filter table, in chains of our own (dockerd never flushes them, and a dockerd
  restart keeps DOCKER-USER's jump to them):
    DOCKER-USER  -i labvm0 -> LABVM-FORWARD: replies pass; the denied ranges (MooseFS master,
                 every node, <network><deny>), MooseFS ports anywhere and other desktops
                 (-o labvm0) are refused; the rest (the outside world, through NAT) passes.
    INPUT        -i labvm0 -> LABVM-INPUT: replies pass; anything else addressed to the node
                 itself (sshd, dockerd, a published port of another desktop reached through
                 the node's address) is refused.
  The same for IPv6 with ip6tables, where desktops have no address but link-local: all new
  traffic from labvm0 is refused.
- Each chain is written whole with one `iptables-restore --noflush` transaction, so no packet
  ever sees half a rule set; the jumps are added only once their chain is complete.

Members still reach their own published ports from outside: those arrive on the node's uplink,
not on labvm0.

Actions:
    ensure_isolation  the network and the rules exist as wanted (check mode: would change?)
    isolation_status  what is missing, for `labvm node check`
"""

import ipaddress
import socket

from _contract import Action, BadRequest, Failed, Param, PreconditionFailed, Result
from _docker import DEFAULT_DOCKER_SOCKET, api_url, docker_json_call, quoted, unexpected
from _system import require_tool, run_command

NETWORK_NAME = "labvm"
BRIDGE = "labvm0"
NETWORK_LABEL = "org.labvm.network"
NETWORK_OPTIONS = {
    "com.docker.network.bridge.name": BRIDGE,
    # docker then drops labvm0 -> labvm0 itself as well.
    "com.docker.network.bridge.enable_icc": "false",
}
FORWARD_CHAIN = "LABVM-FORWARD"
INPUT_CHAIN = "LABVM-INPUT"
# (builtin or docker's chain, our chain): the jump sits first in the parent.
JUMPS = (("DOCKER-USER", FORWARD_CHAIN), ("INPUT", INPUT_CHAIN))
# master (9419 metalogger, 9420 chunkservers, 9421 clients), 9422 chunkservers, 9425 CGI.
MOOSEFS_PORTS = "9419:9425"
# Written as `iptables -S` prints them, so what is there compares with what is wanted.
REJECT = ("-j", "REJECT", "--reject-with", "icmp-port-unreachable")
REJECT6 = ("-j", "REJECT", "--reject-with", "icmp6-port-unreachable")
REPLIES = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN")
IPTABLES_TIMEOUT_S = 30.0


def address_list(name: str, value) -> list[str]:
    """Host names or addresses (nodes, the MooseFS master) and CIDR ranges."""
    if not isinstance(value, list) or not all(isinstance(item, str) and 0 < len(item) <= 253 for item in value):
        raise BadRequest(f"param {name!r} must be a list of host names, addresses or ranges", "bad_param")
    for item in value:
        if any(char.isspace() or char in "\0,;/" for char in item.split("/", 1)[0]) or item.startswith("-"):
            raise BadRequest(f"param {name!r}: {item[:80]!r} is not a host name, address or range", "bad_param")
    return value


ISOLATION_PARAMS = {
    "deny": Param(address_list, required=True),
    "docker_socket": Param(lambda _n, v: str(v), default=DEFAULT_DOCKER_SOCKET),
}


# --- what is wanted ---------------------------------------------------------------------------


def resolve(entries: list[str]) -> tuple[list[str], list[str]]:
    """(IPv4 ranges, IPv6 ranges) for host names, addresses and CIDR ranges. A name that does
    not resolve is an error: a deny rule silently left out is an open door."""
    v4, v6 = set(), set()
    for entry in entries:
        for network in networks_of(entry):
            (v4 if network.version == 4 else v6).add(str(network))
    return sorted(v4), sorted(v6)


def networks_of(entry: str) -> list:
    try:
        return [ipaddress.ip_network(entry, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(entry, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        raise PreconditionFailed(f"cannot resolve {entry!r} to deny desktops access to it: {error.strerror}", "unresolvable") from None
    return [ipaddress.ip_network(info[4][0]) for info in infos]


def forward_rules(denied: list[str], ipv6: bool) -> list[tuple[str, ...]]:
    rules = [REPLIES]
    if ipv6:
        # Desktops have only link-local IPv6 addresses: nothing new leaves on v6.
        return rules + [REJECT6]
    rules += [("-d", network, *REJECT) for network in denied]
    rules += [("-p", protocol, "-m", "multiport", "--dports", MOOSEFS_PORTS, *REJECT) for protocol in ("tcp", "udp")]
    rules.append(("-o", BRIDGE, *REJECT))
    return rules


def input_rules(ipv6: bool) -> list[tuple[str, ...]]:
    return [REPLIES, REJECT6 if ipv6 else REJECT]


def jump_rule(chain: str) -> tuple[str, ...]:
    return ("-i", BRIDGE, "-j", chain)


# --- iptables -----------------------------------------------------------------------------------


class Filter:
    """One family's tools: iptables or ip6tables (and their -restore)."""

    def __init__(self, ipv6: bool):
        self.ipv6 = ipv6
        name = "ip6tables" if ipv6 else "iptables"
        self.tool = require_tool(name, "install the iptables package", "iptables_missing")
        self.restore = require_tool(f"{name}-restore", "install the iptables package", "iptables_missing")

    def run(self, *args: str, stdin_text: str | None = None, tool: str | None = None):
        return run_command([tool or self.tool, "-w", *args], IPTABLES_TIMEOUT_S, stdin_text=stdin_text)

    def chain_rules(self, chain: str) -> list[str] | None:
        """The chain's rules as `-A CHAIN ...` lines, or None when it does not exist."""
        result = self.run("-t", "filter", "-S", chain)
        if result.returncode != 0:
            return None
        return [line for line in result.stdout.splitlines() if line.startswith("-A ")]

    def first_rule_is(self, parent: str, rule: tuple[str, ...]) -> bool:
        rules = self.chain_rules(parent)
        return bool(rules) and rules[0] == spelled(parent, rule)

    def write_chain(self, chain: str, rules: list[tuple[str, ...]]) -> None:
        lines = ["*filter", f":{chain} - [0:0]", f"-F {chain}"] + [spelled(chain, rule) for rule in rules] + ["COMMIT", ""]
        result = self.run("--noflush", stdin_text="\n".join(lines), tool=self.restore)
        if result.returncode != 0:
            raise Failed(f"{self.restore} could not write chain {chain}: {result.stderr.strip()[-300:]}", "iptables_failed")

    def ensure_first(self, parent: str, rule: tuple[str, ...]) -> None:
        """The jump sits first in parent, once: a copy further down is removed."""
        while self.run("-t", "filter", "-C", parent, *rule).returncode == 0:
            self.run("-t", "filter", "-D", parent, *rule)
        result = self.run("-t", "filter", "-I", parent, "1", *rule)
        if result.returncode != 0:
            raise Failed(f"cannot add the jump to {rule[-1]} in {parent}: {result.stderr.strip()[-300:]}", "iptables_failed")

    def ensure_parent(self, parent: str) -> None:
        """DOCKER-USER is dockerd's; on a node where it has not made it yet, we make it (dockerd
        adopts an existing one and keeps its rules)."""
        if self.chain_rules(parent) is None:
            self.run("-t", "filter", "-N", parent)


def spelled(chain: str, rule: tuple[str, ...]) -> str:
    return " ".join(["-A", chain, *rule])


# --- the docker network ---------------------------------------------------------------------


def inspect_network(socket_path: str) -> dict | None:
    status, body = docker_json_call(socket_path, "GET", api_url(f"/networks/{quoted(NETWORK_NAME)}"))
    if status == 404:
        return None
    if status != 200:
        raise unexpected(f"inspecting network {NETWORK_NAME}", status, body)
    return body


def network_problem(network: dict) -> str | None:
    options = network.get("Options") or {}
    if network.get("Driver") != "bridge":
        return f"docker network {NETWORK_NAME} uses driver {network.get('Driver')!r}, not bridge"
    for key, value in NETWORK_OPTIONS.items():
        if options.get(key) != value:
            return f"docker network {NETWORK_NAME} has {key}={options.get(key)!r}, wanted {value!r}"
    return None


def create_network(socket_path: str) -> None:
    payload = {
        "Name": NETWORK_NAME,
        "Driver": "bridge",
        "CheckDuplicate": True,
        "Options": NETWORK_OPTIONS,
        "Labels": {NETWORK_LABEL: "desktops"},
    }
    status, body = docker_json_call(socket_path, "POST", api_url("/networks/create"), payload)
    if status not in (200, 201):
        raise unexpected(f"creating network {NETWORK_NAME}", status, body)


# --- actions ------------------------------------------------------------------------------------


def wanted_chains(deny: list[str]) -> dict[bool, dict[str, list[tuple[str, ...]]]]:
    v4, v6 = resolve(deny)
    return {
        False: {FORWARD_CHAIN: forward_rules(v4, ipv6=False), INPUT_CHAIN: input_rules(ipv6=False)},
        True: {FORWARD_CHAIN: forward_rules(v6, ipv6=True), INPUT_CHAIN: input_rules(ipv6=True)},
    }


def missing_pieces(socket_path: str, chains: dict) -> list[str]:
    missing = []
    network = inspect_network(socket_path)
    if network is None:
        missing.append(f"docker network {NETWORK_NAME}")
    else:
        problem = network_problem(network)
        if problem:
            raise PreconditionFailed(f"{problem}; remove it (docker network rm {NETWORK_NAME}) to let labvm recreate it",
                                     "network_differs")  # fmt: skip
    for ipv6, wanted in chains.items():
        family = Filter(ipv6)
        label = "ip6tables" if ipv6 else "iptables"
        for chain, rules in wanted.items():
            if family.chain_rules(chain) != [spelled(chain, rule) for rule in rules]:
                missing.append(f"{label} chain {chain}")
        for parent, chain in JUMPS:
            if not family.first_rule_is(parent, jump_rule(chain)):
                missing.append(f"{label} jump {parent} -> {chain}")
    return missing


def ensure_isolation(params: dict, check: bool) -> Result:
    socket_path = params["docker_socket"]
    chains = wanted_chains(params["deny"])
    missing = missing_pieces(socket_path, chains)
    data = {"network": NETWORK_NAME, "bridge": BRIDGE, "missing": missing}
    if not missing or check:
        return Result(changed=bool(missing), data=data)
    if inspect_network(socket_path) is None:
        create_network(socket_path)
    for ipv6, wanted in chains.items():
        family = Filter(ipv6)
        for chain, rules in wanted.items():
            family.write_chain(chain, rules)
        for parent, chain in JUMPS:
            family.ensure_parent(parent)
            if not family.first_rule_is(parent, jump_rule(chain)):
                family.ensure_first(parent, jump_rule(chain))
    still = missing_pieces(socket_path, chains)
    if still:
        raise Failed(f"desktop isolation still incomplete after writing it: {', '.join(still)}", "isolation_incomplete")
    return Result(changed=True, data=data)


def isolation_status(params: dict, check: bool) -> Result:
    missing = missing_pieces(params["docker_socket"], wanted_chains(params["deny"]))
    return Result(changed=False, data={"network": NETWORK_NAME, "bridge": BRIDGE, "missing": missing})


ACTIONS = {
    "ensure_isolation": Action(run=ensure_isolation, params=ISOLATION_PARAMS),
    "isolation_status": Action(run=isolation_status, params=ISOLATION_PARAMS),
}
