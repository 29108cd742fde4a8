"""pykp's domain model: services, their ports and endpoints, as every source delivers them.

Kubernetes' names and semantics (a Service's spec plus its endpoints); the services file and
the Kubernetes source both produce these, and the agent consumes nothing else.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import Final

# Kept in step with `pykp._fastpath.POLICIES` (tested); duplicated here so that parsing
# and the CLI work without the extension.
POLICIES: Final = ("random", "round-robin", "maglev", "least-conn")
DEFAULT_POLICY: Final = "random"
# `pykp lb`'s: the one policy on which every load-balancer node picks the same backend.
LB_DEFAULT_POLICY: Final = "maglev"
PROTOCOLS: Final = ("TCP", "UDP", "SCTP")
HASH_KEYS: Final = ("5-tuple", "source-ip")
SESSION_AFFINITIES: Final = ("None", "ClientIP")
TRAFFIC_POLICIES: Final = ("Cluster", "Local")
# Kubernetes' defaults and limits for ClientIP session affinity.
DEFAULT_AFFINITY_TIMEOUT_SECONDS: Final = 10800
MAX_AFFINITY_TIMEOUT_SECONDS: Final = 86400
MAX_WEIGHT: Final = 65535


# --- the parsed file ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a service. `name` is "" when the service has a single unnamed port."""

    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """A port of an endpoint, as an EndpointSlice names it (matched to service ports)."""

    name: str
    port: int
    protocol: str = "TCP"


_READY, _SERVING, _TERMINATING, _WEIGHT_SHIFT = 1, 2, 4, 3


class EndpointSpec:
    """One endpoint (a pod address) with Kubernetes' endpoint conditions: a frozen value,
    as a frozen dataclass would be (equality, hash, repr over its ten fields).

    `ports` None (the services file) means every service port's targetPort; a Kubernetes
    source sets it from the EndpointSlice, whose port numbers can differ per pod when a
    service's targetPort is a name. `zone_hints` and `node_hints` are the slice's
    topology hints (empty: none).

    Held once per endpoint (300,000 at 100,000 services), so in six slots, not ten: its
    conditions and weight are one small int (a cached object for weights up to 31), its
    hints one field, None for none (32 bytes less per endpoint).
    """

    __slots__ = ("ip", "_flags", "node_name", "zone", "ports", "_hints")

    ip: str
    node_name: str | None
    zone: str | None
    ports: tuple[EndpointPort, ...] | None
    _flags: int
    _hints: tuple[tuple[str, ...], tuple[str, ...]] | None

    def __init__(
        self,
        ip: str,
        ready: bool = True,
        serving: bool = True,
        terminating: bool = False,
        node_name: str | None = None,
        zone: str | None = None,
        weight: int = 1,
        ports: tuple[EndpointPort, ...] | None = None,
        zone_hints: tuple[str, ...] = (),
        node_hints: tuple[str, ...] = (),
    ) -> None:
        if weight < 0:
            raise ValueError(f"endpoint {ip}: weight {weight} is negative")
        flags = (weight << _WEIGHT_SHIFT) | (_READY if ready else 0) | (_SERVING if serving else 0)
        _init = object.__setattr__
        _init(self, "ip", ip)
        _init(self, "_flags", flags | (_TERMINATING if terminating else 0))
        _init(self, "node_name", node_name)
        _init(self, "zone", zone)
        _init(self, "ports", ports)
        _init(self, "_hints", (zone_hints, node_hints) if zone_hints or node_hints else None)

    @property
    def ready(self) -> bool:
        return bool(self._flags & _READY)

    @property
    def serving(self) -> bool:
        return bool(self._flags & _SERVING)

    @property
    def terminating(self) -> bool:
        return bool(self._flags & _TERMINATING)

    @property
    def weight(self) -> int:
        return self._flags >> _WEIGHT_SHIFT

    @property
    def zone_hints(self) -> tuple[str, ...]:
        return self._hints[0] if self._hints is not None else ()

    @property
    def node_hints(self) -> tuple[str, ...]:
        return self._hints[1] if self._hints is not None else ()

    @property
    def hinted(self) -> bool:
        """It carries a zone or node hint."""
        return self._hints is not None

    def with_ports(self, ports: tuple[EndpointPort, ...] | None) -> EndpointSpec:
        """This endpoint with other ports."""
        other = object.__new__(EndpointSpec)
        for name in EndpointSpec.__slots__:
            object.__setattr__(other, name, getattr(self, name))
        object.__setattr__(other, "ports", ports)
        return other

    def _key(self) -> tuple[object, ...]:
        return (self.ip, self._flags, self.node_name, self.zone, self.ports, self._hints)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not EndpointSpec:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"EndpointSpec(ip={self.ip!r}, ready={self.ready!r}, serving={self.serving!r},"
            f" terminating={self.terminating!r}, node_name={self.node_name!r},"
            f" zone={self.zone!r}, weight={self.weight!r}, ports={self.ports!r},"
            f" zone_hints={self.zone_hints!r}, node_hints={self.node_hints!r})"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (
            EndpointSpec,
            (
                self.ip,
                self.ready,
                self.serving,
                self.terminating,
                self.node_name,
                self.zone,
                self.weight,
                self.ports,
                self.zone_hints,
                self.node_hints,
            ),
        )

    def port_for(self, port: ServicePort) -> int | None:
        """This endpoint's port for a service port; None when it does not serve it."""
        if self.ports is None:
            return port.target_port
        for endpoint_port in self.ports:
            if endpoint_port.name == port.name and endpoint_port.protocol == port.protocol:
                return endpoint_port.port
        return None


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """What a service sets besides its name, cluster IPs, ports and endpoints. Most
    services leave all of it as the defaults (or as every other service of their cluster
    sets it): one object is shared by the services that agree on all of it
    (`ServiceOptions.shared`), held in one slot of each `ServiceSpec`."""

    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    policy: str = DEFAULT_POLICY
    hash_key: str | None = None  # None: the engine's default
    session_affinity: str = "None"
    session_affinity_timeout_seconds: int | None = None  # set exactly when ClientIP
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    # spec.healthCheckNodePort: set (with externalTrafficPolicy Local) when this node serves
    # the service's health check there (kube-proxy's service health server).
    health_check_node_port: int | None = None

    @staticmethod
    def shared(*values: object) -> ServiceOptions:
        """The options of these field values (in field order), as one object per distinct
        value: a table of them, bounded (options with external IPs or a health check port
        are each their own, and start it again when it is full)."""
        options = _SHARED_OPTIONS.get(values)
        if options is None:
            if len(_SHARED_OPTIONS) >= _SHARED_OPTIONS_MAX:
                _SHARED_OPTIONS.clear()
            options = _SHARED_OPTIONS[values] = ServiceOptions(*values)  # type: ignore[arg-type]
        return options


_SHARED_OPTIONS: dict[tuple[object, ...], ServiceOptions] = {}
_SHARED_OPTIONS_MAX = 4096


@dataclass(frozen=True, slots=True, init=False)
class ServiceSpec:
    """A service and its endpoints. Addresses are normalised (`ipaddress` spelling).

    Made as if every option were a field (`ServiceSpec(name, external_ips=..., ...)`), and
    read so (`spec.policy`); held as seven slots, the options in one shared object (64
    bytes less per service than fifteen slots: 100,000 services are 6 MB).
    """

    name: str
    namespace: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    options: ServiceOptions
    endpoints: tuple[EndpointSpec, ...]
    # metadata.creationTimestamp (RFC 3339, which sorts as text); "" in a services file.
    # Two services that claim one frontend: the older keeps it (then the smaller key).
    created: str

    def __init__(
        self,
        name: str,
        namespace: str = "default",
        cluster_ips: tuple[str, ...] = (),
        external_ips: tuple[str, ...] = (),
        load_balancer_ips: tuple[str, ...] = (),
        ports: tuple[ServicePort, ...] = (),
        policy: str = DEFAULT_POLICY,
        hash_key: str | None = None,
        session_affinity: str = "None",
        session_affinity_timeout_seconds: int | None = None,
        external_traffic_policy: str = "Cluster",
        internal_traffic_policy: str = "Cluster",
        health_check_node_port: int | None = None,
        endpoints: tuple[EndpointSpec, ...] = (),
        created: str = "",
        *,
        options: ServiceOptions | None = None,
    ) -> None:
        if options is None:
            options = ServiceOptions.shared(
                external_ips,
                load_balancer_ips,
                policy,
                hash_key,
                session_affinity,
                session_affinity_timeout_seconds,
                external_traffic_policy,
                internal_traffic_policy,
                health_check_node_port,
            )
        _init = object.__setattr__
        _init(self, "name", name)
        _init(self, "namespace", namespace)
        _init(self, "cluster_ips", cluster_ips)
        _init(self, "ports", ports)
        _init(self, "options", options)
        _init(self, "endpoints", endpoints)
        _init(self, "created", created)

    @property
    def external_ips(self) -> tuple[str, ...]:
        return self.options.external_ips

    @property
    def load_balancer_ips(self) -> tuple[str, ...]:
        return self.options.load_balancer_ips

    @property
    def policy(self) -> str:
        return self.options.policy

    @property
    def hash_key(self) -> str | None:
        return self.options.hash_key

    @property
    def session_affinity(self) -> str:
        return self.options.session_affinity

    @property
    def session_affinity_timeout_seconds(self) -> int | None:
        return self.options.session_affinity_timeout_seconds

    @property
    def external_traffic_policy(self) -> str:
        return self.options.external_traffic_policy

    @property
    def internal_traffic_policy(self) -> str:
        return self.options.internal_traffic_policy

    @property
    def health_check_node_port(self) -> int | None:
        return self.options.health_check_node_port

    @property
    def key(self) -> str:
        """`namespace/name`, as kubectl and kube-proxy spell a service."""
        return f"{self.namespace}/{self.name}"

    def with_endpoints(self, endpoints: tuple[EndpointSpec, ...]) -> ServiceSpec:
        """This service with other endpoints (a Kubernetes source rebuilds every service
        so at its start: `dataclasses.replace` costs twice as much)."""
        return self._with(self.cluster_ips, self.options, endpoints)

    def with_addresses(
        self,
        cluster_ips: tuple[str, ...],
        external_ips: tuple[str, ...],
        load_balancer_ips: tuple[str, ...],
    ) -> ServiceSpec:
        """This service with other addresses."""
        options = self.options
        if (external_ips, load_balancer_ips) != (options.external_ips, options.load_balancer_ips):
            options = ServiceOptions.shared(
                external_ips, load_balancer_ips, *_option_values(options)[2:]
            )
        return self._with(cluster_ips, options, self.endpoints)

    def _with(
        self,
        cluster_ips: tuple[str, ...],
        options: ServiceOptions,
        endpoints: tuple[EndpointSpec, ...],
    ) -> ServiceSpec:
        other = object.__new__(ServiceSpec)
        _init = object.__setattr__
        _init(other, "name", self.name)
        _init(other, "namespace", self.namespace)
        _init(other, "cluster_ips", cluster_ips)
        _init(other, "ports", self.ports)
        _init(other, "options", options)
        _init(other, "endpoints", endpoints)
        _init(other, "created", self.created)
        return other

    def local_ready_endpoints(self, node_name: str | None) -> int:
        """kube-proxy's count for the health check: distinct addresses of the endpoints on
        `node_name` that are ready (a terminating endpoint is not: only terminating ones
        left make the node fail the check)."""
        if node_name is None:
            return 0
        return len(
            {
                endpoint.ip
                for endpoint in self.endpoints
                if endpoint.ready and endpoint.node_name == node_name
            }
        )


_option_values: Final = operator.attrgetter(*(f.name for f in fields(ServiceOptions)))


@dataclass(frozen=True)
class Catalog:
    """Every service a source holds (invalid entries left out): a services file's content,
    or the Kubernetes API's Services and EndpointSlices.

    Both sources set `traffic_policies` (apply externalTrafficPolicy and
    internalTrafficPolicy when translating, as kube-proxy does: an endpoint is local when
    its nodeName is the agent's node name); a Kubernetes source also sets `zone` (this
    node's topology.kubernetes.io/zone, for topology hints).
    """

    # A tuple, or a source's lazy view of its table (`sources.snapshot.LazyValues`).
    services: Sequence[ServiceSpec] = ()
    default_policy: str = DEFAULT_POLICY
    traffic_policies: bool = False
    zone: str | None = None
    # namespace/name of entries with a problem (skipped, or loaded without their invalid
    # endpoints): a source that has a last good version of one keeps serving that instead.
    invalid: frozenset[str] = frozenset()
    # The services by key, when the source keeps them so (else built on first use).
    by_key: Mapping[str, ServiceSpec] | None = field(default=None, compare=False, repr=False)

    def get(self, key: str) -> ServiceSpec | None:
        """The service `namespace/name`, or None."""
        if self.by_key is None:
            # Frozen, but a cache is not state: built once, on first use.
            object.__setattr__(self, "by_key", {s.key: s for s in self.services})
        assert self.by_key is not None
        return self.by_key.get(key)

    def keys(self) -> Iterable[str]:
        if self.by_key is not None:
            return self.by_key.keys()
        return [s.key for s in self.services]

    @property
    def port_count(self) -> int:
        return sum(len(service.ports) for service in self.services)

    @property
    def endpoint_count(self) -> int:
        return sum(len(service.endpoints) for service in self.services)


@dataclass(frozen=True)
class Problem:
    """An invalid entry, where it is and what is wrong with it."""

    source: str  # the file, as the caller named it
    line: int  # 1-based
    column: int  # 1-based
    path: str  # the field, e.g. "services[1].ports[0].port"
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.column}: {self.path}: {self.message}"


def family_warnings(services_file: Catalog) -> list[str]:
    """Valid but likely wrong: a service address of a family none of its endpoints has.

    NAT does not cross families, so every connection to that address is refused; a
    dual-stack service needs endpoints of both families.
    """
    warnings = []
    for service in services_file.services:
        families = {ipaddress.ip_address(endpoint.ip).version for endpoint in service.endpoints}
        if not families:
            continue  # no endpoints at all: refused on purpose, as kube-proxy does
        addresses = (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
        for address in addresses:
            version = ipaddress.ip_address(address).version
            if version not in families:
                warnings.append(
                    f"{service.key}: {address} has no IPv{version} endpoint, so every "
                    f"connection to it is refused (add IPv{version} endpoints or drop the address)"
                )
    return warnings
