"""Services in the engine's terms: one engine service per service port (kube-proxy's
ServicePortName), with the node's view applied (traffic policies, topology, node ports)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from pykp.model import DEFAULT_POLICY, Catalog, EndpointSpec, ServicePort, ServiceSpec

if TYPE_CHECKING:
    from pykp._fastpath import Engine, ServiceUpdate


# --- translation to the engine ------------------------------------------------------------


class EngineBackend(NamedTuple):
    """A backend as `pykp._fastpath.Backend` takes it. A named tuple: made three times per
    service at every plan, where a frozen dataclass's checked `__init__` cost 5% of a
    first sync."""

    ip: str
    port: int
    weight: int = 1
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    local: bool = False


# One shared empty set: `frozenset()` allocates a new one (216 bytes) on every call, and
# nearly every engine service holds one.
_NO_FAMILIES: Final[frozenset[int]] = frozenset()


@dataclass(frozen=True, slots=True)
class EngineService:
    """One engine service: what `Engine.upsert_service` takes, as plain data."""

    name: str
    frontends: tuple[tuple[str, int, str], ...]  # (ip, port, protocol)
    backends: tuple[EngineBackend, ...]
    policy: str = DEFAULT_POLICY
    affinity_timeout: float | None = None  # None: no session affinity
    hash_key: str | None = None  # None: the engine's default
    # The address families (4, 6) for which a Local traffic policy left this node no
    # usable endpoint while the service has some elsewhere: kube-proxy drops connections
    # to those frontends ("has no local endpoints") instead of refusing them (refused: no
    # endpoint of the family at all). Per family, as kube-proxy runs one proxier per family.
    no_local_endpoints: frozenset[int] = _NO_FAMILIES
    # externalTrafficPolicy Local, split from a cluster-wide internal service: pods and the
    # node reach every endpoint through the external frontends, decided as that service
    # (kube-proxy's short-circuit).
    short_circuit: str | None = None


@functools.lru_cache(maxsize=64)
def _canonical(addresses: tuple[str, ...]) -> list[str]:
    return [str(ipaddress.ip_address(address)) for address in addresses]


def _family(address: str) -> int:
    """4 or 6 for an address the model already normalised (cheap: once per backend)."""
    return 6 if ":" in address else 4


def service_port_name(service: ServiceSpec, port: ServicePort) -> str:
    """kube-proxy's ServicePortName: `namespace/name:port`, or `namespace/name` if unnamed."""
    return f"{service.key}:{port.name}" if port.name else service.key


EXTERNAL_SUFFIX: Final = "#external"


def service_ports_to_engine(
    spec: ServiceSpec,
    node_addresses: Sequence[str],
    node_name: str | None = None,
    *,
    traffic_policies: bool = False,
    zone: str | None = None,
    key: str | None = None,
) -> list[EngineService]:
    """One engine service per service port (kube-proxy programs each port separately).
    `key`: the service's `namespace/name` as the caller holds it, which an unnamed port's
    engine service is named (one string per service where it is held: `spec.key` makes a
    new one at each call).

    Frontends: every clusterIP, externalIP and loadBalancerIP at `port`, and every node
    address at `nodePort` when the port has one. Backends: every endpoint that serves the
    port, at its port (`targetPort` unless the endpoint names its own); `local` marks the
    endpoints on `node_name`. Endpoints with topology hints are narrowed to those hinted
    for this node or `zone`, exactly when kube-proxy would.

    With `traffic_policies`, a Local internalTrafficPolicy (for clusterIPs) or
    externalTrafficPolicy (for externalIPs, loadBalancerIPs and nodePorts) gives those
    frontends only this node's endpoints, none at all when the node has none (the traffic
    is then never sent off the node: `no_local_endpoints` says for which families to drop
    it, as kube-proxy does, because the service has usable endpoints elsewhere). When the
    two policies differ, a port becomes two engine services: `name` for the clusterIPs and
    `name#external` for the rest.
    """
    nodes = _canonical(tuple(node_addresses))
    affinity_timeout = (
        float(spec.session_affinity_timeout_seconds)
        if spec.session_affinity == "ClientIP" and spec.session_affinity_timeout_seconds is not None
        else None
    )
    engine_services = []
    for port in spec.ports:
        internal = [(address, port.port, port.protocol) for address in spec.cluster_ips]
        external = [
            (address, port.port, port.protocol)
            for address in (*spec.external_ips, *spec.load_balancer_ips)
        ]
        if port.node_port is not None:
            external += [(address, port.node_port, port.protocol) for address in nodes]
        every = _port_backends(spec, port, node_name)
        cluster = _topology_filter(every, spec.endpoints, port, node_name, zone)
        local = tuple(backend for backend in every if backend.local)
        internal_local = traffic_policies and spec.internal_traffic_policy == "Local"
        external_local = traffic_policies and spec.external_traffic_policy == "Local"
        internal_backends = local if internal_local else cluster
        external_backends = local if external_local else cluster
        name = (
            service_port_name(spec, port)
            if key is None
            else (f"{key}:{port.name}" if port.name else key)
        )
        short_circuit: dict[str, str] = {}
        # (engine service name, frontends, backends, narrowed to this node's endpoints)
        groups: list[tuple[str, list[tuple[str, int, str]], tuple[EngineBackend, ...], bool]]
        if not internal:
            groups = [(name, external, external_backends, external_local)]
        elif not external or spec.internal_traffic_policy == spec.external_traffic_policy:
            groups = [(name, internal + external, internal_backends, internal_local)]
        elif traffic_policies:
            # Split on the policies, not on whether the backend sets differ, so the
            # engine services' names stay put as endpoints come and go.
            groups = [
                (name, internal, internal_backends, internal_local),
                (name + EXTERNAL_SUFFIX, external, external_backends, external_local),
            ]
            if external_local and not internal_local:
                short_circuit = {name + EXTERNAL_SUFFIX: name}
        else:
            groups = [(name, internal + external, cluster, False)]
        for group_name, frontends, backends, narrowed in groups:
            # The engine refuses a backend that no frontend's family reaches (NAT does not
            # cross families): e.g. IPv4 endpoints behind IPv6-only node addresses.
            families = {_family(address) for address, _, _ in frontends}
            if frontends:
                backends = tuple(backend for backend in backends if _family(backend.ip) in families)
            engine_services.append(
                EngineService(
                    name=group_name,
                    # An externalIP may repeat a node address; a frontend is listed once.
                    frontends=tuple(dict.fromkeys(frontends)),
                    backends=backends,
                    policy=spec.policy,
                    affinity_timeout=affinity_timeout,
                    hash_key=spec.hash_key,
                    no_local_endpoints=(
                        _no_local_endpoints(families, backends, every) if narrowed else _NO_FAMILIES
                    ),
                    short_circuit=short_circuit.get(group_name),
                )
            )
    return engine_services


def _no_local_endpoints(
    families: set[int],
    local: tuple[EngineBackend, ...],
    every: tuple[EngineBackend, ...],
) -> frozenset[int]:
    """The families with a usable endpoint somewhere but none among `local`."""
    usable = {_family(backend.ip) for backend in every if _usable(backend)}
    served = {_family(backend.ip) for backend in local if _usable(backend)}
    return frozenset(families & usable - served) or _NO_FAMILIES


def _usable(backend: EngineBackend) -> bool:
    """kube-proxy's usable endpoint (the engine's pool rule): ready, or serving while
    terminating (used when none is ready)."""
    return backend.ready or (backend.serving and backend.terminating)


def _port_backends(
    spec: ServiceSpec, port: ServicePort, node_name: str | None
) -> tuple[EngineBackend, ...]:
    """Every endpoint serving `port`, as backends, in endpoint order."""
    backends = []
    for endpoint in spec.endpoints:
        backend_port = endpoint.port_for(port)
        if backend_port is None:
            continue
        backends.append(
            EngineBackend(
                ip=endpoint.ip,
                port=backend_port,
                weight=endpoint.weight,
                ready=endpoint.ready,
                serving=endpoint.serving,
                terminating=endpoint.terminating,
                local=node_name is not None and endpoint.node_name == node_name,
            )
        )
    return tuple(backends)


def _topology_filter(
    backends: tuple[EngineBackend, ...],
    endpoints: Sequence[EndpointSpec],
    port: ServicePort,
    node_name: str | None,
    zone: str | None,
) -> tuple[EngineBackend, ...]:
    """kube-proxy's topology-aware routing (pkg/proxy/topology.go) for one port.

    Hints are used only when every ready endpoint carries one and at least one is for this
    node (same-node hints) or this zone (same-zone hints); otherwise every endpoint stays.
    The ready-or-terminating fallback is the engine's, so only the hint filter is here.
    """
    if not any(endpoint.hinted for endpoint in endpoints):
        return backends  # no hint at all (most services): nothing below could narrow them
    serving = [endpoint for endpoint in endpoints if endpoint.port_for(port) is not None]
    ready = [endpoint for endpoint in serving if endpoint.ready]
    if not ready:
        return backends
    # Same-node hints win over same-zone ones, as in kube-proxy's topologyModeFromHints.
    hint_kinds: tuple[tuple[Callable[[EndpointSpec], tuple[str, ...]], str | None], ...] = (
        (_node_hints, node_name),
        (_zone_hints, zone),
    )
    for hints_of, wanted in hint_kinds:
        if (
            wanted
            and all(hints_of(endpoint) for endpoint in ready)
            and any(wanted in hints_of(endpoint) for endpoint in ready)
        ):
            # `serving` and `backends` are in the same order: one backend per endpoint.
            return tuple(
                backend
                for endpoint, backend in zip(serving, backends, strict=True)
                if wanted in hints_of(endpoint)
            )
    return backends


def _node_hints(endpoint: EndpointSpec) -> tuple[str, ...]:
    return endpoint.node_hints


def _zone_hints(endpoint: EndpointSpec) -> tuple[str, ...]:
    return endpoint.zone_hints


def services_file_to_engine(
    services_file: Catalog,
    node_addresses: Sequence[str] = (),
    node_name: str | None = None,
) -> list[EngineService]:
    """Every engine service of a services file, in file order.

    Traffic policies and topology apply as the file asks (`traffic_policies`, `zone`).
    """
    return [
        engine_service
        for service in services_file.services
        for engine_service in service_ports_to_engine(
            service,
            node_addresses,
            node_name,
            traffic_policies=services_file.traffic_policies,
            zone=services_file.zone,
        )
    ]


def engine_update(service: EngineService) -> ServiceUpdate:
    """`service` as the engine's batch API takes it."""
    from pykp._fastpath import Backend, Frontend, ServiceUpdate

    return ServiceUpdate(
        service.name,
        [Frontend(ip, port, protocol) for ip, port, protocol in service.frontends],
        [
            Backend(
                backend.ip,
                backend.port,
                weight=backend.weight,
                ready=backend.ready,
                serving=backend.serving,
                terminating=backend.terminating,
                local=backend.local,
            )
            for backend in service.backends
        ],
        policy=service.policy,
        affinity_timeout=service.affinity_timeout,
        hash_key=service.hash_key,
        short_circuit=service.short_circuit,
    )


def apply_to_engine(engine: Engine, services: Sequence[EngineService]) -> None:
    """Make the engine's services exactly `services`, in one batch (the rest removed).
    Raises ValueError naming the services the engine refused (the others are applied)."""
    wanted = {service.name for service in services}
    removals = [name for name in engine.services() if name not in wanted]
    staged = engine.apply([engine_update(service) for service in services], removals)
    if staged.refused:
        raise ValueError("; ".join(f"{name}: {why}" for name, why in staged.refused.items()))
