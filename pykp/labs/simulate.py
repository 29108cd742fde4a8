"""A decision demo: synthetic connections through the real engine, no cluster, no root.

`simulate_connections` loads services into a `pykp._fastpath.Engine`, opens N new
connections per service from many synthetic clients and counts where the engine sends
them; `render_simulation` prints the result as a table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections import Counter
from dataclasses import dataclass
from typing import Final

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pykp.agent.plan import EngineService, apply_to_engine, services_file_to_engine
from pykp.model import Catalog

# Synthetic addresses from ranges that are never routed, so the output cannot be mistaken
# for real traffic: a TEST-NET-1 node (RFC 5737), so services with nodePorts get that
# frontend too, and clients from the benchmarking range (RFC 2544) and a ULA prefix.
SIMULATED_NODE_ADDRESS: Final = "192.0.2.1"
_IPV4_CLIENTS: Final = ipaddress.ip_network("198.18.0.0/15")
_IPV6_CLIENTS: Final = ipaddress.ip_network("fd00:c1e:17::/64")
_CLIENTS_PER_FAMILY: Final = 512
_TCP_SYN: Final = 0x02
_SECONDS_BETWEEN_CONNECTIONS: Final = 0.001


@dataclass(frozen=True)
class ServiceTally:
    """Where one service's connections went."""

    service: str
    policy: str
    backends: tuple[tuple[str, int], ...]  # ("10.0.0.1:8080", connections), engine order
    not_forwarded: tuple[tuple[str, int], ...]  # ("reject: no_endpoints", connections)
    connections: int

    @property
    def forwarded(self) -> int:
        return sum(count for _, count in self.backends)


@dataclass(frozen=True)
class SimulationResult:
    services: tuple[ServiceTally, ...]
    counters: dict[str, int]  # the engine's, after the run
    connections_per_service: int
    seed: int


def simulate_connections(
    services_file: Catalog,
    *,
    connections: int = 1000,
    seed: int = 0,
    policy: str | None = None,
) -> SimulationResult:
    """Send `connections` new connections to each service port and count the decisions.

    Deterministic for a given `seed`. `policy` overrides every service's policy. Needs the
    Rust extension (raises `ModuleNotFoundError` for `pykp._fastpath` without it).
    """
    from pykp._fastpath import Engine

    engine = Engine(seed=seed)
    # One node that is none of the file's nodes: no endpoint would be local, and a Local
    # policy would turn every connection away. Traffic policies are `simulate --nodes`'s
    # to show; here every service spreads over all its endpoints.
    spread = dataclasses.replace(services_file, traffic_policies=False)
    engine_services = services_file_to_engine(spread, [SIMULATED_NODE_ADDRESS])
    if policy is not None:
        engine_services = [
            dataclasses.replace(service, policy=policy) for service in engine_services
        ]
    apply_to_engine(engine, engine_services)

    rng = random.Random(seed)
    clients = _ClientPool(rng)
    now = 0.0
    tallies = []
    for service in engine_services:
        outcomes: Counter[str] = Counter()
        forwarded: Counter[str] = Counter()
        for index in range(connections if service.frontends else 0):
            ip, port, protocol = service.frontends[index % len(service.frontends)]
            client_ip, client_port = clients.next_client(ipaddress.ip_address(ip).version)
            now += _SECONDS_BETWEEN_CONNECTIONS
            decision = engine.decide(
                client_ip, client_port, ip, port, protocol, tcp_flags=_TCP_SYN, now=now
            )
            if decision.action == "forward" and decision.backend is not None:
                forwarded[endpoint_text(*decision.backend)] += 1
            else:
                outcomes[f"{decision.action}: {decision.reason}"] += 1
        tallies.append(_tally(service, forwarded, outcomes, connections))
    return SimulationResult(
        services=tuple(tallies),
        counters=engine.counters(),
        connections_per_service=connections,
        seed=seed,
    )


class _ClientPool:
    """Synthetic clients: a few hundred addresses per family, each with fresh source ports."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._addresses = {
            4: _sample_hosts(rng, _IPV4_CLIENTS),
            6: _sample_hosts(rng, _IPV6_CLIENTS),
        }
        self._next_port: dict[str, int] = {}

    def next_client(self, family: int) -> tuple[str, int]:
        address = self._rng.choice(self._addresses[family])
        # Ephemeral ports counting up from a random start: no two connections share a 5-tuple.
        port = self._next_port.get(address, self._rng.randrange(32768, 49152))
        self._next_port[address] = 32768 if port >= 65535 else port + 1
        return address, port


def _sample_hosts(
    rng: random.Random, network: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> list[str]:
    offsets = rng.sample(range(1, min(network.num_addresses - 1, 1 << 24)), _CLIENTS_PER_FAMILY)
    return [str(network.network_address + offset) for offset in offsets]


def _tally(
    service: EngineService,
    forwarded: Counter[str],
    outcomes: Counter[str],
    connections: int,
) -> ServiceTally:
    # Every backend gets a row, the unused ones too (a terminating endpoint's 0 is the point).
    backends = [endpoint_text(backend.ip, backend.port) for backend in service.backends]
    backends += [backend for backend in forwarded if backend not in backends]
    return ServiceTally(
        service=service.name,
        policy=service.policy,
        backends=tuple((backend, forwarded[backend]) for backend in backends),
        not_forwarded=tuple(sorted(outcomes.items())),
        connections=connections if service.frontends else 0,
    )


def endpoint_text(ip: str, port: int) -> str:
    address = ipaddress.ip_address(ip)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# --- rendering ----------------------------------------------------------------------------

_SUMMARY_COUNTERS: Final = (
    "decisions_forward",
    "decisions_pass",
    "decisions_reject",
    "decisions_drop",
    "conntrack_entries",
)


def render_simulation(result: SimulationResult, console: Console) -> None:
    """Print the per-backend table and the engine's decision counters."""
    table = Table(
        title=f"{result.connections_per_service} new connections per service (seed {result.seed})",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("service", no_wrap=True)
    table.add_column("policy", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    table.add_column("connections", justify="right")
    table.add_column("share %", justify="right")
    for tally in result.services:
        rows: list[tuple[Text, int]] = [(Text(backend), count) for backend, count in tally.backends]
        rows += [(Text(outcome, style="red"), count) for outcome, count in tally.not_forwarded]
        if not rows:
            rows = [(Text("no backends", style="dim"), 0)]
        for index, (backend, count) in enumerate(rows):
            share = 100.0 * count / tally.connections if tally.connections else 0.0
            table.add_row(
                tally.service if index == 0 else "",
                tally.policy if index == 0 else "",
                backend,
                str(count),
                f"{share:.1f}",
                end_section=index == len(rows) - 1,
            )
    console.print(table)
    console.print(Text(totals_line(result)))
    console.print(Text(counters_line(result)))


def totals_line(result: SimulationResult) -> str:
    total = sum(tally.connections for tally in result.services)
    return f"total: {total} connections to {len(result.services)} service ports"


def counters_line(result: SimulationResult) -> str:
    counters = ", ".join(f"{name} {result.counters.get(name, 0)}" for name in _SUMMARY_COUNTERS)
    return f"engine counters: {counters}"
