"""Several nodes, one engine each: how per-node policy state adds up across a cluster.

Every node of a cluster runs its own proxy with its own policy state: a round-robin
position per node, Maglev tables that agree because every node builds them from the same
seed, random draws of its own. `simulate_nodes` gives each simulated node its own
`pykp._fastpath.Engine`, sends synthetic connections from clients on the nodes a schedule
picks, and records where each one went; `converged_at` quantifies "eventually": the
connection from which every backend's cumulative share stays near its fair share.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pykp.agent.plan import EngineService, apply_to_engine, services_file_to_engine
from pykp.labs.simulate import endpoint_text
from pykp.model import Catalog

if TYPE_CHECKING:
    from pykp._fastpath import Decision, Engine

# "round-robin": over every node; "alternate": the first two nodes in turn (the answer's
# two client pods on node 1 and node 2); "random": any node, uniformly.
SCHEDULES: Final = ("round-robin", "alternate", "random")
# The policies whose convergence is always compared (and plotted).
COMPARED_POLICIES: Final = ("random", "round-robin", "maglev")
DEFAULT_TOLERANCE: Final = 0.05  # of the fair share: 50 % +- 2.5 points for two backends
MAX_NODES: Final = 250  # node k's clients come from a /24 numbered k

# Never-routed ranges, as in the one-node simulation: node k has address 192.0.2.k
# (TEST-NET-1) and its clients come from 198.18.k.0/24 and fd00:c1e:17:k::/64.
_NODE_ADDRESSES: Final = ipaddress.ip_network("192.0.2.0/24")
_IPV4_CLIENTS: Final = ipaddress.ip_network("198.18.0.0/16")
_IPV6_CLIENTS: Final = ipaddress.ip_network("fd00:c1e:17::/48")
_CLIENTS_PER_NODE: Final = 64
_TCP_SYN: Final = 0x02
_SECONDS_BETWEEN_CONNECTIONS: Final = 0.001


@dataclass(frozen=True)
class SimulatedNode:
    """One node: its name (an endpoint's nodeName makes it local here), address and engine."""

    name: str
    address: str
    engine: Engine


@dataclass(frozen=True)
class Step:
    """One connection: from a client on `node`, to `frontend`, and where it went."""

    node: str
    client: tuple[str, int]
    frontend: tuple[str, int, str]
    outcome: str  # the backend ("10.244.1.10:8080"), or "reject: no_endpoints" and the like


@dataclass(frozen=True)
class ServiceRun:
    """One engine service's connections under one policy, on every node."""

    service: str
    policy: str
    steps: tuple[Step, ...]
    fair_shares: dict[str, float]  # backend -> its share by weight (eligible backends only)

    @property
    def backends(self) -> tuple[str, ...]:
        """The eligible backends, then any other outcome, in first-seen order."""
        seen = dict.fromkeys(self.fair_shares)
        seen.update(dict.fromkeys(step.outcome for step in self.steps))
        return tuple(seen)

    def shares_after(self, connections: int) -> dict[str, float]:
        """Each backend's (and outcome's) share of the first `connections` connections."""
        counts = Counter(step.outcome for step in self.steps[:connections])
        return {backend: counts[backend] / connections for backend in self.backends}

    def share_series(self) -> dict[str, list[float]]:
        """Cumulative share after every connection, per backend (and other outcome)."""
        series: dict[str, list[float]] = {backend: [] for backend in self.backends}
        counts: Counter[str] = Counter()
        for index, step in enumerate(self.steps, start=1):
            counts[step.outcome] += 1
            for backend, shares in series.items():
                shares.append(counts[backend] / index)
        return series

    def converged_at(self, tolerance: float = DEFAULT_TOLERANCE) -> int | None:
        """The first connection count from which every backend's cumulative share stays
        within `tolerance` (a fraction of its fair share) until the end of the run; None
        when it is not within at the end (or nothing is eligible)."""
        if not self.fair_shares or not self.steps:
            return None
        counts: Counter[str] = Counter()
        last_outside = 0
        for index, step in enumerate(self.steps, start=1):
            counts[step.outcome] += 1
            # Any other outcome (a reject) is a share that should be 0 and never is.
            outside = any(outcome not in self.fair_shares for outcome in counts) or any(
                abs(counts[backend] / index - fair) > tolerance * fair
                for backend, fair in self.fair_shares.items()
            )
            if outside:
                last_outside = index
        return last_outside + 1 if last_outside < len(self.steps) else None


@dataclass(frozen=True)
class NodesSimulation:
    """Every engine service's run under the services' own policies (or the override), and
    under each compared policy, from the same schedule and clients."""

    nodes: tuple[str, ...]
    schedule: str
    connections_per_service: int
    seed: int
    runs: tuple[ServiceRun, ...]  # the services' own (or overridden) policies, file order
    compared: dict[str, tuple[ServiceRun, ...]]  # policy -> runs, same order as `runs`


def node_names(count: int) -> list[str]:
    return [f"node-{index}" for index in range(1, count + 1)]


def build_nodes(
    services_file: Catalog, count: int, *, seed: int, policy: str | None = None
) -> tuple[list[SimulatedNode], list[list[EngineService]]]:
    """`count` nodes with an engine each, loaded with the file as that node sees it (its
    name and address: traffic policies and nodePorts differ per node), and the engine
    services of each. Maglev tables agree because every engine has the default
    `maglev_seed`; the random policy's draws differ per node (a seed of their own)."""
    from pykp._fastpath import Engine

    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}, not {count}")
    nodes, engine_services = [], []
    for index, name in enumerate(node_names(count), start=1):
        address = str(_NODE_ADDRESSES.network_address + index)
        services = services_file_to_engine(services_file, [address], name)
        if policy is not None:
            services = [dataclasses.replace(service, policy=policy) for service in services]
        engine = Engine(seed=random.Random(f"{seed}/{name}").getrandbits(63))
        apply_to_engine(engine, services)
        nodes.append(SimulatedNode(name=name, address=address, engine=engine))
        engine_services.append(services)
    return nodes, engine_services


def node_schedule(schedule: str, node_count: int, rng: random.Random) -> Iterator[int]:
    """The index of the node each successive connection starts on."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    step = 0
    while True:
        if schedule == "round-robin":
            yield step % node_count
        elif schedule == "alternate":
            yield step % min(2, node_count)
        else:
            yield rng.randrange(node_count)
        step += 1


def simulate_nodes(
    services_file: Catalog,
    *,
    nodes: int,
    schedule: str = "round-robin",
    connections: int = 1000,
    seed: int = 0,
    policy: str | None = None,
) -> NodesSimulation:
    """Send `connections` new connections to each engine service, each from a client on
    the node the schedule picks, decided by that node's engine. Deterministic for `seed`;
    every policy's run sees the same nodes and clients in the same order."""
    runs = _run_policy(services_file, nodes, schedule, connections, seed, policy)
    compared = {
        compared_policy: _run_policy(
            services_file, nodes, schedule, connections, seed, compared_policy
        )
        for compared_policy in COMPARED_POLICIES
    }
    return NodesSimulation(
        nodes=tuple(node_names(nodes)),
        schedule=schedule,
        connections_per_service=connections,
        seed=seed,
        runs=runs,
        compared=compared,
    )


def _run_policy(
    services_file: Catalog,
    node_count: int,
    schedule: str,
    connections: int,
    seed: int,
    policy: str | None,
) -> tuple[ServiceRun, ...]:
    nodes, engine_services = build_nodes(services_file, node_count, seed=seed, policy=policy)
    runs = []
    for service_index, service in enumerate(engine_services[0]):
        # A fresh generator per service and policy: each run sees the same schedule and clients.
        rng = random.Random(f"{seed}/{service.name}")
        clients = [_NodeClients(rng, index) for index in range(node_count)]
        starts = node_schedule(schedule, node_count, rng)
        steps = []
        now = 0.0
        for index in range(connections if service.frontends else 0):
            node_index = next(starts)
            node, node_service = nodes[node_index], engine_services[node_index][service_index]
            ip, port, protocol = node_service.frontends[index % len(node_service.frontends)]
            client_ip, client_port = clients[node_index].next_client(
                ipaddress.ip_address(ip).version
            )
            now += _SECONDS_BETWEEN_CONNECTIONS
            decision = node.engine.decide(
                client_ip, client_port, ip, port, protocol, tcp_flags=_TCP_SYN, now=now
            )
            no_local = ipaddress.ip_address(ip).version in node_service.no_local_endpoints
            outcome = _outcome(decision, no_local_endpoints=no_local)
            steps.append(Step(node.name, (client_ip, client_port), (ip, port, protocol), outcome))
        runs.append(
            ServiceRun(
                service=service.name,
                policy=service.policy,
                steps=tuple(steps),
                fair_shares=fair_shares(nodes[0].engine, service.name),
            )
        )
    return tuple(runs)


def fair_shares(engine: Engine, service: str) -> dict[str, float]:
    """Each eligible backend's share by weight, as the engine's pool has them (what the
    policies aim at), in pool order (by address)."""
    pools = engine.pools([service]).get(service)
    if pools is None:
        return {}
    addresses = engine.backend_ids()
    pool = [*pools[0], *pools[1]]
    total = sum(weight for _, weight in pool)
    return {endpoint_text(*addresses[backend_id]): weight / total for backend_id, weight in pool}


def decide_on_every_node(
    nodes: Sequence[SimulatedNode], client: tuple[str, int], frontend: tuple[str, int, str]
) -> dict[str, str]:
    """Where each node sends one 5-tuple (no state kept: Maglev's answer, for instance)."""
    ip, port, protocol = frontend
    return {
        node.name: _outcome(
            node.engine.decide(*client, ip, port, protocol, tcp_flags=_TCP_SYN, now=0.0)
        )
        for node in nodes
    }


def _outcome(decision: Decision, *, no_local_endpoints: bool = False) -> str:
    """The backend a decision names, or what happened instead."""
    if decision.action == "forward" and decision.backend is not None:
        return endpoint_text(*decision.backend)
    if decision.action == "reject" and no_local_endpoints:
        # The engine refuses; the agent's rules then drop, as kube-proxy does.
        return "drop: no local endpoints"
    return f"{decision.action}: {decision.reason}"


class _NodeClients:
    """Synthetic clients on one node (its pods): a few dozen addresses from the node's own
    block, each with ephemeral ports counting up, so no two connections share a 5-tuple."""

    def __init__(self, rng: random.Random, node_index: int) -> None:
        self._rng = rng
        block = node_index + 1  # node k's clients: 198.18.k.0/24, fd00:c1e:17:k::/64
        v4 = _IPV4_CLIENTS.network_address + (block << 8)
        v6 = _IPV6_CLIENTS.network_address + (block << 64)
        self._addresses = {
            4: [str(v4 + offset) for offset in rng.sample(range(1, 255), _CLIENTS_PER_NODE)],
            6: [str(v6 + rng.randrange(1, 1 << 32)) for _ in range(_CLIENTS_PER_NODE)],
        }
        self._next_port: dict[str, int] = {}

    def next_client(self, family: int) -> tuple[str, int]:
        address = self._rng.choice(self._addresses[family])
        port = self._next_port.get(address, self._rng.randrange(32768, 49152))
        self._next_port[address] = 32768 if port >= 65535 else port + 1
        return address, port


# --- rendering ----------------------------------------------------------------------------


def render_nodes_simulation(result: NodesSimulation, console: Console, *, steps: int = 8) -> None:
    """Per service: its first `steps` connections (node, client, backend, the cumulative
    shares after each), the totals per node and backend; then how soon each policy
    converges."""
    console.print(
        Text(
            f"{len(result.nodes)} nodes ({', '.join(result.nodes)}), one engine each; clients "
            f"on {_schedule_text(result.schedule, len(result.nodes))}; "
            f"{result.connections_per_service} new connections per service port "
            f"(seed {result.seed})"
        )
    )
    for run in result.runs:
        if steps > 0:
            console.print(_steps_table(run, steps))
        console.print(_totals_table(run, result.nodes))
    console.print(_convergence_table(result))


def _schedule_text(schedule: str, node_count: int) -> str:
    if schedule == "alternate":
        return "the first two nodes in turn" if node_count > 1 else "node-1"
    if schedule == "round-robin":
        return "every node in turn"
    return "a node picked at random for each connection"


def _percent(share: float) -> str:
    return f"{100 * share:.1f} %"


def _steps_table(run: ServiceRun, steps: int) -> Table:
    backends = run.backends
    table = Table(
        title=f"{run.service} ({run.policy}): the first {min(steps, len(run.steps))} connections",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("step", justify="right")
    table.add_column("node", no_wrap=True)
    table.add_column("client", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    for backend in backends:
        table.add_column(Text(f"share {backend}"), justify="right", no_wrap=True)
    for index, step in enumerate(run.steps[:steps], start=1):
        shares = run.shares_after(index)
        table.add_row(
            str(index),
            step.node,
            Text(endpoint_text(*step.client)),
            Text(step.outcome, style="" if step.outcome in run.fair_shares else "red"),
            *(_percent(shares[backend]) for backend in backends),
        )
    return table


def _totals_table(run: ServiceRun, nodes: Sequence[str]) -> Table:
    connections = len(run.steps)
    table = Table(title=f"{run.service}: after {connections} connections", box=box.SIMPLE_HEAD)
    table.add_column("backend", no_wrap=True)
    for node in nodes:
        table.add_column(node, justify="right")
    table.add_column("connections", justify="right")
    table.add_column("share", justify="right")
    table.add_column("fair share", justify="right")
    per_node = Counter((step.node, step.outcome) for step in run.steps)
    shares = run.shares_after(connections) if connections else {}
    for backend in run.backends:
        fair = run.fair_shares.get(backend)
        table.add_row(
            Text(backend, style="" if fair is not None else "red"),
            *(str(per_node[(node, backend)]) for node in nodes),
            str(sum(per_node[(node, backend)] for node in nodes)),
            _percent(shares.get(backend, 0.0)),
            _percent(fair) if fair is not None else "-",
        )
    return table


def _convergence_table(result: NodesSimulation) -> Table:
    table = Table(
        title=(
            f"eventually: the connection from which every backend's share stays within "
            f"±{100 * DEFAULT_TOLERANCE:g} % of its fair share to the end of the run"
        ),
        caption="one run: the figures of random draws and Maglev hashes vary with --seed",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("service", no_wrap=True)
    for policy in COMPARED_POLICIES:
        table.add_column(policy, justify="right")
    table.add_column("its own policy", justify="right", no_wrap=True)
    for index, run in enumerate(result.runs):
        cells = [_converged_text(result.compared[p][index]) for p in COMPARED_POLICIES]
        table.add_row(run.service, *cells, f"{run.policy}: {_converged_text(run)}")
    return table


def _converged_text(run: ServiceRun) -> str:
    converged = run.converged_at()
    if converged is None:
        return f"not by {len(run.steps)}" if run.steps else "-"
    return str(converged)
