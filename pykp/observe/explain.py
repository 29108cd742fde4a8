"""`pykp explain`: what a new connection to a service gets on this node, and why.

`explain_report` turns the engine's dry run (`pykp._fastpath.explain`, which changes no
engine state: no round-robin ticket, no entropy drawn, no flow or affinity entry) and the
model the engine was built from into one plain JSON report. The agent serves it at
`/explain?service=...&client=...`; `pykp explain --services FILE` builds an engine from a
file and reports on that. `render_explain` prints the report for people.

A service is named `namespace/name` (every port), `namespace/name:port` (one port), or
`IP:port[/protocol]` (the service at that frontend). A name without a namespace is in
`default`. A client is `IP` or `IP:port`; without one, the report is for any client that
has no affinity entry (Maglev, which hashes the client, then says what it needs).

Where the kernel decides (random, and round-robin rotated by `numgen inc`, with `pykp
run`'s defaults) the report says so, and names a backend only when every slot holds it:
the engine's dry run is what pykp's reader would do, and the kernel's counter cannot be
read.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pykp.agent.plan import (
    EXTERNAL_SUFFIX,
    EngineService,
    apply_to_engine,
    service_port_name,
    service_ports_to_engine,
    services_file_to_engine,
)
from pykp.agent.sync import kernel_decider, rotation_slots
from pykp.model import PROTOCOLS, Catalog, ServiceSpec
from pykp.observe.health import parse_bind_address

# rich is imported where something is printed: `pykp run` prints nothing with it, and
# importing it cost 25 ms of the agent's start.
if TYPE_CHECKING:
    from rich.console import Console

    from pykp._fastpath import Engine, Explanation

__all__ = [
    "ExplainError",
    "NodeView",
    "explain_report",
    "explain_services_file",
    "fetch_explain",
    "parse_client",
    "render_explain",
]

SCHEMA_VERSION: Final = 1


class ExplainError(Exception):
    """The question cannot be answered; `status` is what `/explain` answers it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NodeView:
    """What the node's engine services were built with (see `service_ports_to_engine`)."""

    node_name: str | None = None
    node_addresses: tuple[str, ...] = ()
    traffic_policies: bool = False
    zone: str | None = None
    # --cluster-cidr: a client in one (or at a node address) is inside the cluster, where
    # an externalTrafficPolicy Local service's short-circuit applies.
    cluster_cidrs: tuple[str, ...] = ()

    def inside(self, client_ip: str | None) -> bool:
        """Whether the datapath takes `client_ip` for a pod or the node itself."""
        if client_ip is None:
            return False
        address = ipaddress.ip_address(client_ip)
        if any(address == ipaddress.ip_address(a) for a in self.node_addresses):
            return True
        return any(
            address in ipaddress.ip_network(cidr, strict=False) for cidr in self.cluster_cidrs
        )


# --- parsing --------------------------------------------------------------------------------


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _split_host_port(text: str) -> tuple[str, str | None]:
    """`IP`, `IP:port`, `[IPv6]` or `[IPv6]:port` -> (ip text, port text or None)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(text)
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, None  # an IPv4 address, or a bare IPv6 one


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ExplainError(f"{what} port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_client(text: str) -> tuple[str, int | None]:
    """`IP` or `IP:port` (`[IPv6]:port`) -> (canonical IP, port or None)."""
    try:
        host, port = _split_host_port(text.strip())
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ExplainError(f"client {text!r} is not IP or IP:port") from None
    return ip, None if port is None else _port(port, "client")


def parse_frontend(text: str) -> tuple[str, int, str] | None:
    """`IP:port[/protocol]` -> (canonical IP, port, protocol); None when `text` is not an
    address (then it names a service)."""
    address, _, protocol = text.partition("/")
    try:
        host, port = _split_host_port(address)
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    if port is None:
        raise ExplainError(f"{text!r}: a frontend needs its port (IP:port[/protocol])")
    protocol = protocol.upper() or "TCP"
    if protocol not in PROTOCOLS:
        raise ExplainError(f"{text!r}: protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return ip, _port(port, "frontend"), protocol


def _key_of(name: str) -> str:
    """`ns/name` of an engine service name (`ns/name[:port][#external]`)."""
    return name.removesuffix(EXTERNAL_SUFFIX).split(":", 1)[0]


def _engine_names(query: str, services: Mapping[str, EngineService]) -> list[str]:
    """The engine services a name query means: that port (and its #external half), or
    every port of the service."""
    name = query if "/" in query else f"default/{query}"
    exact = [n for n in (name, name + EXTERNAL_SUFFIX) if n in services]
    if exact:
        return exact
    return sorted(n for n in services if _key_of(n) == name)


# --- the report -----------------------------------------------------------------------------

_REASONS: Final = {
    "ready": "ready",
    "terminating-fallback": "terminating: used because no endpoint is ready (kube-proxy's fallback)",
    "terminating": "terminating: unused while a ready endpoint exists",
    "not-serving": "not serving",
    "not-ready": "not ready",
    "weight-0": "weight 0: drained (keeps its flows, gets no new ones)",
    "other-family": "of the other address family: serves the other family's clients",
}


def explain_report(
    engine: Engine,
    services: Mapping[str, EngineService],
    spec_of: Callable[[str], ServiceSpec | None],
    node: NodeView,
    query: str,
    client: str | None = None,
    *,
    now: float | None = None,
    kernel_random: bool = True,
    kernel_round_robin: bool = True,
) -> dict[str, Any]:
    """The report for `query` (a service name or frontend) and `client` (IP or IP:port).

    `services`: the engine's services by name, as they were built from the model;
    `spec_of` gives a service's model by `namespace/name`, for the endpoints left out
    before the engine (topology, traffic policy, address family). `kernel_random` and
    `kernel_round_robin`: the agent's `pykp run` switches, which say where the kernel
    decides instead of pykp's reader. Raises ExplainError (status 404 for an unknown
    service).
    """
    from pykp._fastpath import explain

    client_ip, client_port = parse_client(client) if client else (None, None)
    frontend = parse_frontend(query.strip())
    explanations: list[Explanation] = []
    try:
        if frontend is not None:
            explanations.append(
                explain(
                    engine,
                    frontend=frontend,
                    client=client_ip,
                    client_port=client_port,
                    now=now,
                    from_cluster=node.inside(client_ip),
                )
            )
        else:
            names = _engine_names(query.strip(), services)
            if not names:
                raise ExplainError(f"no service {query!r} on this node", status=404)
            for name in names:
                explanations.append(
                    explain(
                        engine,
                        service=name,
                        client=client_ip,
                        client_port=client_port,
                        now=now,
                        from_cluster=node.inside(client_ip),
                    )
                )
    except KeyError as error:
        raise ExplainError(f"{error.args[0]} on this node", status=404) from None
    except ValueError as error:
        raise ExplainError(str(error)) from None
    pools = engine.pools(sorted({x.service for x in explanations}))

    def kernel_slots(x: Explanation) -> tuple[str, ...] | None:
        return _kernel_slots(
            x,
            pools.get(x.service, ([], [])),
            kernel_random=kernel_random,
            kernel_round_robin=kernel_round_robin,
        )

    return {
        "schema": SCHEMA_VERSION,
        "query": query,
        "client": None if client_ip is None else _client_text(client_ip, client_port),
        "node": node.node_name,
        "services": [
            _service_report(
                x, services.get(x.service), spec_of(_key_of(x.service)), node, kernel_slots(x)
            )
            for x in explanations
        ],
    }


def _client_text(ip: str, port: int | None) -> str:
    return ip if port is None else _address(ip, port)


def _frontend_text(frontend: Sequence[Any]) -> str:
    ip, port, protocol = frontend
    return f"{_address(ip, port)}/{protocol}"


def _kernel_slots(
    x: Explanation,
    pools: tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]],
    *,
    kernel_random: bool,
    kernel_round_robin: bool,
) -> tuple[str, ...] | None:
    """The slots the kernel picks from for a new connection to `x`'s frontend (for
    round-robin in the order its counter visits them), or None where pykp's reader
    decides, by the rule the sync programs (`kernel_decider`). A short-circuited
    connection (a pod or the node to an externalTrafficPolicy Local frontend) is queued
    whatever the policy."""
    if x.short_circuited_from is not None:
        return None
    decider = kernel_decider(
        x.policy,
        x.affinity_timeout,
        (len(pools[0]), len(pools[1])),
        kernel_random=kernel_random,
        kernel_round_robin=kernel_round_robin,
    )
    if decider is None:
        return None
    frontend = x.frontend or (x.frontends[0] if x.frontends else None)
    v6 = frontend is not None and ipaddress.ip_address(frontend[0]).version == 6
    backends = {b.id: (b.ip, b.port) for b in x.backends}
    return tuple(_address(*slot) for slot in rotation_slots(pools[1 if v6 else 0], backends))


def _service_report(
    x: Explanation,
    built: EngineService | None,
    spec: ServiceSpec | None,
    node: NodeView,
    kernel_slots: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    endpoints = _endpoints_by_address(spec)
    backends = []
    for b in x.backends:
        endpoint = endpoints.get((b.ip, b.port))
        backends.append(
            {
                "address": _address(b.ip, b.port),
                "id": b.id,
                "weight": b.weight,
                "ready": b.ready,
                "serving": b.serving,
                "terminating": b.terminating,
                "local": b.local,
                "nodeName": endpoint[0] if endpoint else None,
                "zone": endpoint[1] if endpoint else None,
                "eligible": b.eligible,
                "reason": b.reason,
                "why": _REASONS.get(b.reason, b.reason),
                "active": b.active,
                "maglevSlots": b.maglev_slots,
            }
        )
    return {
        "service": x.service,
        "shortCircuitFrom": x.short_circuited_from,
        "policy": x.policy,
        "hashKey": x.hash_key,
        "affinityTimeout": x.affinity_timeout,
        "frontends": [_frontend_text(f) for f in x.frontends],
        "frontend": None if x.frontend is None else _frontend_text(x.frontend),
        "trafficPolicy": _traffic_policy(x.service, spec, node),
        "backends": backends,
        "excluded": _excluded(x, spec, node),
        "fallback": x.fallback,
        "state": _policy_state(x, kernel_slots),
        "policyChoice": _maybe_address(x.policy_choice),
        "affinity": None
        if x.affinity is None
        else {
            "backend": _address(*x.affinity.backend),
            "expiresIn": round(x.affinity.expires_in, 3),
            "inPool": x.affinity.in_pool,
        },
        "flow": None
        if x.flow is None
        else {
            "backend": _address(*x.flow.backend),
            "state": x.flow.state,
            "expiresIn": round(x.flow.expires_in, 3),
            "kept": x.flow.kept,
        },
        "decision": _decision(x, built, spec, kernel_slots),
    }


def _maybe_address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else _address(*address)


def _endpoints_by_address(
    spec: ServiceSpec | None,
) -> dict[tuple[str, int], tuple[str | None, str | None]]:
    """(ip, port) -> (nodeName, zone), for every port the endpoints serve."""
    if spec is None:
        return {}
    found: dict[tuple[str, int], tuple[str | None, str | None]] = {}
    for port in spec.ports:
        for endpoint in spec.endpoints:
            backend_port = endpoint.port_for(port)
            if backend_port is not None:
                found.setdefault((endpoint.ip, backend_port), (endpoint.node_name, endpoint.zone))
    return found


def _scope(name: str, spec: ServiceSpec) -> str:
    """Which traffic policy governs an engine service: "internal" (clusterIPs) or "external"."""
    return "external" if name.endswith(EXTERNAL_SUFFIX) or not spec.cluster_ips else "internal"


def _traffic_policy(name: str, spec: ServiceSpec | None, node: NodeView) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {
        "internal": spec.internal_traffic_policy,
        "external": spec.external_traffic_policy,
        "scope": _scope(name, spec),
        # False when the source reads them without applying them.
        "applied": node.traffic_policies,
    }


def _excluded(x: Explanation, spec: ServiceSpec | None, node: NodeView) -> list[dict[str, Any]]:
    """Endpoints of the service port left out before the engine, with why."""
    if spec is None:
        return []
    base = x.service.removesuffix(EXTERNAL_SUFFIX)
    port = next((p for p in spec.ports if service_port_name(spec, p) == base), None)
    if port is None:
        return []
    # The same port with topology but no traffic policy: what topology alone keeps.
    by_topology = {
        (b.ip, b.port)
        for s in service_ports_to_engine(
            spec, node.node_addresses, node.node_name, traffic_policies=False, zone=node.zone
        )
        if s.name == base
        for b in s.backends
    }
    in_engine = {(b.ip, b.port) for b in x.backends}
    families = {ipaddress.ip_address(ip).version for ip, _, _ in x.frontends}
    policy = (
        spec.internal_traffic_policy
        if _scope(x.service, spec) == "internal"
        else spec.external_traffic_policy
    )
    policy_name = f"{_scope(x.service, spec)}TrafficPolicy"
    excluded = []
    for endpoint in spec.endpoints:
        backend_port = endpoint.port_for(port)
        if backend_port is None or (endpoint.ip, backend_port) in in_engine:
            continue
        if families and ipaddress.ip_address(endpoint.ip).version not in families:
            reason, why = "other-family", "no frontend of its address family"
        elif (endpoint.ip, backend_port) not in by_topology:
            reason, why = "topology", "topology hints give it to other zones or nodes"
        elif node.traffic_policies and policy == "Local":
            reason = "traffic-policy-local"
            why = f"on node {endpoint.node_name or '?'}, not this one ({policy_name}: Local)"
        else:
            reason, why = "not-programmed", "not in the engine (see pykp status: refused?)"
        excluded.append(
            {
                "address": _address(endpoint.ip, backend_port),
                "nodeName": endpoint.node_name,
                "zone": endpoint.zone,
                "reason": reason,
                "why": why,
            }
        )
    return excluded


def _policy_state(x: Explanation, kernel_slots: tuple[str, ...] | None) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if x.policy == "round-robin" and kernel_slots is not None:
        # The reader's ticket does not move for these connections: the kernel's counter
        # is the rotation, and where it stands cannot be read.
        state["kernelRoundRobin"] = {"rotation": list(kernel_slots)}
    elif x.round_robin_ticket is not None and x.round_robin_cycle:
        state["roundRobin"] = {
            "ticket": x.round_robin_ticket,
            "cycle": x.round_robin_cycle,
            "position": x.round_robin_ticket % x.round_robin_cycle,
            "next": _maybe_address(x.policy_choice),
        }
    if x.maglev_table_size is not None:
        state["maglev"] = {
            "tableSize": x.maglev_table_size,
            "hashKey": x.hash_key,
            "slot": x.maglev_slot,
            "owner": _maybe_address(x.policy_choice) if x.maglev_slot is not None else None,
        }
    if x.policy == "least-conn":
        state["leastConn"] = {_address(b.ip, b.port): b.active for b in x.backends if b.eligible}
    return state


def _decision(
    x: Explanation,
    built: EngineService | None,
    spec: ServiceSpec | None,
    kernel_slots: tuple[str, ...] | None,
) -> dict[str, Any]:
    """The backend and why. A random choice is not named: each connection is a fresh
    draw. Nor is round-robin's where the kernel rotates (`kernel_slots` not None) over
    more than one backend: its counter is not readable."""
    family = ipaddress.ip_address(x.frontend[0]).version if x.frontend else None
    if x.decided_by == "reject" and built is not None and family in built.no_local_endpoints:
        # The rules drop these before the engine sees them (kube-proxy's "has no local
        # endpoints"); the endpoints elsewhere are not used from this node.
        scope = _scope(x.service, spec) if spec is not None else "internal"
        why = (
            f"{scope}TrafficPolicy Local and no usable endpoint on this node: dropped, as "
            "kube-proxy does"
        )
        if scope == "external":
            why += (
                " (clients in --cluster-cidr and the node itself take the short-circuit to "
                "every endpoint instead)"
            )
        return {"backend": None, "decidedBy": "drop", "why": why}
    if x.policy == "random" and x.decided_by == "policy":
        eligible = [b for b in x.backends if b.eligible]
        total = sum(b.weight for b in eligible) or 1
        shares = ", ".join(
            f"{_address(b.ip, b.port)} {100.0 * b.weight / total:.0f}%" for b in eligible
        )
        why = f"random: each new connection is an independent draw ({shares})"
        why += "; pykp's reader draws" if kernel_slots is None else "; the kernel draws"
        return {"backend": None, "decidedBy": "random", "why": why}
    if x.policy == "round-robin" and x.decided_by == "policy" and kernel_slots is not None:
        # One backend in every slot: whatever the counter says, the next one gets it.
        only = set(kernel_slots)
        return {
            "backend": only.pop() if len(only) == 1 else None,
            "decidedBy": "kernel",
            "why": (
                "round-robin in the kernel: each new connection to this frontend on this "
                "node takes the next slot of the service's rotation, on a counter of the "
                "kernel's that pykp cannot read (with `pykp run --no-kernel-round-robin` "
                "pykp's reader rotates, and explain names the next backend)"
            ),
        }
    return {
        "backend": _maybe_address(x.backend),
        "decidedBy": x.decided_by,
        "why": _decision_why(x),
    }


def _decision_why(x: Explanation) -> str:
    if x.decided_by == "flow" and x.flow is not None:
        return (
            f"a live flow with this 5-tuple ({x.flow.state}, {x.flow.expires_in:.0f}s left) "
            "keeps its backend"
        )
    if x.decided_by == "affinity" and x.affinity is not None:
        return f"ClientIP session affinity pins this client ({x.affinity.expires_in:.0f}s left)"
    if x.decided_by == "reject":
        return "no eligible endpoint: the connection is refused"
    if x.decided_by == "undetermined":
        return x.note or "undetermined"
    if x.policy == "round-robin" and x.round_robin_cycle:
        position = (x.round_robin_ticket or 0) % x.round_robin_cycle
        return (
            f"round-robin: the next connection takes position {position} of its "
            f"{x.round_robin_cycle}-connection cycle (ticket {x.round_robin_ticket}); another "
            "new connection to this service on this node first would take it instead"
        )
    if x.policy == "maglev":
        return f"maglev: slot {x.maglev_slot} of {x.maglev_table_size} is this backend's"
    return "least-conn: the fewest active flows per unit of weight"


def explain_services_file(
    catalog: Catalog,
    query: str,
    client: str | None = None,
    *,
    node: NodeView | None = None,
    maglev_table_size: int = 65537,
    maglev_seed: int = 0,
    kernel_random: bool = True,
    kernel_round_robin: bool = True,
) -> dict[str, Any]:
    """The report from a fresh engine loaded with a services file, as `pykp run` would
    load it on `node` (no flows yet: round-robin at its start, no affinity, no counts).
    Maglev's answer is every node's with the same table size and seed (the agent's
    defaults here); the kernel decides where `pykp run` with these switches would have it
    decide."""
    from pykp._fastpath import Engine

    node = node or NodeView()
    node = NodeView(
        node.node_name,
        node.node_addresses,
        catalog.traffic_policies,
        catalog.zone,
        node.cluster_cidrs,
    )
    engine = Engine(
        default_policy=catalog.default_policy,
        maglev_table_size=maglev_table_size,
        maglev_seed=maglev_seed,
        seed=0,
    )
    services = services_file_to_engine(catalog, node.node_addresses, node.node_name)
    try:
        apply_to_engine(engine, services)
    except ValueError as error:  # the others are applied; the refused one is unknown
        raise ExplainError(f"the engine refused part of the file: {error}") from None
    built = {service.name: service for service in services}
    return explain_report(
        engine,
        built,
        catalog.get,
        node,
        query,
        client,
        kernel_random=kernel_random,
        kernel_round_robin=kernel_round_robin,
    )


# --- fetching from the agent ----------------------------------------------------------------


def fetch_explain(
    address: str, service: str, client: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """GET /explain from the agent's metrics server (`IP:port`, as --metrics-bind-address)."""
    try:
        host, port = parse_bind_address(address)
    except ValueError as error:
        raise ExplainError(str(error)) from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    query = {"service": service} | ({"client": client} if client else {})
    url = f"http://{_address(host, port)}/explain?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # http only
            body = json.load(response)
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error)["error"]
        except (ValueError, KeyError, TypeError):
            message = f"{url}: HTTP {error.code}"
        raise ExplainError(str(message), status=error.code) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ExplainError(f"{url}: {reason} (is `pykp run` running?)", status=503) from None
    except json.JSONDecodeError as error:
        raise ExplainError(f"{url}: not JSON ({error})", status=502) from None
    if not isinstance(body, dict) or "services" not in body:
        raise ExplainError(f"{url}: not a pykp explain report", status=502)
    return body


# --- rendering ------------------------------------------------------------------------------


def render_explain(report: Mapping[str, Any], console: Console) -> None:
    """Print the report: per service port, its frontends, a table of endpoints with why,
    the policy's state, and the backend the connection gets."""
    client = report.get("client")
    for service in report["services"]:
        _render_service(service, client, report.get("node"), console)


def _render_service(
    service: Mapping[str, Any], client: str | None, node: str | None, console: Console
) -> None:
    from rich.table import Table
    from rich.text import Text

    policy = service["policy"]
    if service.get("hashKey"):
        policy += f" ({service['hashKey']})"
    if service.get("affinityTimeout") is not None:
        policy += f", ClientIP affinity {service['affinityTimeout']:g}s"
    console.print(Text.assemble((service["service"], "bold"), f"  {policy}"))
    if service.get("shortCircuitFrom"):
        console.print(
            Text(
                f"short-circuit: a client inside the cluster reaches {service['shortCircuitFrom']} "
                "(externalTrafficPolicy Local) through every endpoint of the port, as kube-proxy does"
            )
        )
    others = [f for f in service["frontends"] if f != service["frontend"]]
    console.print(
        Text(
            f"frontend {service['frontend'] or 'none'}"
            + (f" (also {', '.join(others)})" if others else "")
        )
    )
    traffic = service.get("trafficPolicy")
    if traffic and "Local" in (traffic["internal"], traffic["external"]):
        line = (
            f"internalTrafficPolicy {traffic['internal']}, externalTrafficPolicy "
            f"{traffic['external']}: "
        )
        if traffic["applied"]:
            line += f"these frontends follow the {traffic['scope']} one"
        else:
            line += "not applied by this source: every endpoint serves"
        console.print(Text(line, style="" if traffic["applied"] else "yellow"))

    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("endpoint", "node", "conditions", "eligible", "why", "active"):
        table.add_column(column, justify="right" if column == "active" else "left")
    maglev = service["state"].get("maglev")
    if maglev:
        table.add_column("maglev share", justify="right")
    chosen = service["decision"]["backend"]
    for backend in service["backends"]:
        conditions = (
            ",".join(name for name in ("ready", "serving", "terminating") if backend[name])
            or "none"
        )
        if backend["weight"] != 1:
            conditions += f" w={backend['weight']}"
        style = "green" if backend["eligible"] else "dim"
        node_text = backend["nodeName"] or "?"
        if backend["local"]:
            node_text += " (this node)"
        row: list[Text | str] = [
            Text(
                ("→ " if backend["address"] == chosen else "  ") + backend["address"], style=style
            ),
            Text(node_text),
            Text(conditions),
            Text("yes" if backend["eligible"] else "no", style=style),
            Text(backend["why"]),
            str(backend["active"]),
        ]
        if maglev:
            slots = backend["maglevSlots"] or 0
            row.append(f"{100.0 * slots / maglev['tableSize']:.1f}%")
        table.add_row(*row)
    for endpoint in service["excluded"]:
        row = [
            Text("  " + endpoint["address"], style="dim"),
            Text(endpoint["nodeName"] or "?"),
            Text(""),
            Text("no", style="dim"),
            Text(endpoint["why"]),
            "",
        ]
        if maglev:
            row.append("")
        table.add_row(*row)
    if service["backends"] or service["excluded"]:
        console.print(table)
    else:
        console.print(Text("no endpoints", style="red"))
    if service["fallback"]:
        console.print(
            Text("no endpoint is ready: the terminating ones serve (fallback)", style="yellow")
        )

    state = service["state"]
    if "kernelRoundRobin" in state:
        rotation = state["kernelRoundRobin"]["rotation"]
        console.print(
            Text(
                f"round-robin in the kernel over {len(rotation)} "
                f"slot{'' if len(rotation) == 1 else 's'}, in this order: "
                f"{', '.join(rotation) or 'none'} (where its counter stands is the kernel's)"
            )
        )
    if "roundRobin" in state:
        rr = state["roundRobin"]
        console.print(
            Text(
                f"round-robin: {rr['ticket']} connections handed out; position {rr['position']} "
                f"of {rr['cycle']}: next {rr['next']}"
            )
        )
    if maglev:
        slot = "needs the full tuple" if maglev["slot"] is None else f"slot {maglev['slot']}"
        owner = f", owned by {maglev['owner']}" if maglev["owner"] else ""
        console.print(Text(f"maglev: {maglev['tableSize']} slots; {slot}{owner}"))
    if "leastConn" in state:
        counts = ", ".join(f"{a} {n}" for a, n in state["leastConn"].items())
        console.print(Text(f"least-conn active flows: {counts or 'no eligible endpoint'}"))
    if service.get("affinity"):
        a = service["affinity"]
        gone = "" if a["inPool"] else " (left the pool: ignored)"
        console.print(
            Text(f"affinity: {client} -> {a['backend']}, {a['expiresIn']:.0f}s left{gone}")
        )
    if service.get("flow"):
        f = service["flow"]
        kept = "kept" if f["kept"] else "decided afresh for a new connection"
        console.print(
            Text(
                f"flow: {client} -> {f['backend']} ({f['state']}, {f['expiresIn']:.0f}s left): {kept}"
            )
        )

    decision = service["decision"]
    who = f"from {client}" if client else "from a new client"
    where = f" on {node}" if node else ""
    if decision["backend"]:
        head = Text.assemble(
            (f"the next connection {who}{where} gets ", "bold"),
            (decision["backend"], "bold green"),
        )
    elif decision["decidedBy"] == "reject":
        head = Text(f"the next connection {who}{where} is refused", style="bold red")
    elif decision["decidedBy"] == "drop":
        head = Text(f"the next connection {who}{where} is dropped", style="bold red")
    elif decision["decidedBy"] == "random":
        head = Text(f"the next connection {who}{where} gets a random endpoint", style="bold")
    elif decision["decidedBy"] == "kernel":
        head = Text(
            f"the next connection {who}{where} gets the next slot of the kernel's rotation",
            style="bold",
        )
    else:
        head = Text(f"the next connection {who}{where}: undetermined", style="bold yellow")
    console.print(head)
    console.print(Text(f"  {decision['why']}", style="dim"))
    console.print()
