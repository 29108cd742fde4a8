"""Kubernetes objects to pykp's services: pure functions over the API's JSON.

The input is what the API server sends (or a YAML manifest loads to): plain dicts with the
API's camelCase field names. Nothing here trusts it: a wrong type, a bad address or a
port out of range rejects that one object with a `KubeProblem` naming it, and the rest
translate. What kube-proxy skips is skipped silently (ExternalName and headless services,
Services labelled `service.kubernetes.io/headless` or another proxy's
`service.kubernetes.io/service-proxy-name`, slices of unknown services).

The result is a `Catalog`, so the agent translates it to the engine with the same
`services_file_to_engine` as a local file; it carries `traffic_policies=True` and the
node's zone so that translation applies traffic policies and topology like kube-proxy.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from pykp.model import (
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    DEFAULT_POLICY,
    HASH_KEYS,
    MAX_AFFINITY_TIMEOUT_SECONDS,
    POLICIES,
    PROTOCOLS,
    SESSION_AFFINITIES,
    TRAFFIC_POLICIES,
    Catalog,
    EndpointPort,
    EndpointSpec,
    Problem,
    ServicePort,
    ServiceSpec,
)

# Well-known labels and annotations.
LABEL_SERVICE_NAME: Final = "kubernetes.io/service-name"  # EndpointSlice -> its Service
LABEL_SERVICE_PROXY_NAME: Final = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS: Final = "service.kubernetes.io/headless"  # any value: not proxied
LABEL_ZONE: Final = "topology.kubernetes.io/zone"
ANNOTATION_POLICY: Final = "pykp.io/lb-policy"
ANNOTATION_HASH_KEY: Final = "pykp.io/hash-key"

SERVICE_TYPES: Final = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_NODE_PORT_TYPES: Final = ("NodePort", "LoadBalancer")

JSON = Mapping[str, Any]
_Port = TypeVar("_Port", ServicePort, EndpointPort)


@dataclass(frozen=True)
class KubeProblem(Problem):
    """An object (or a part of it) that could not be used, and why.

    A `services_file.Problem` (what the agent's sources report) whose place is the object
    (`path` is "Kind namespace/name"), not a file position: `line` and `column` are 0.
    Make one with `KubeProblem.about(kind, namespace, name, message)`.
    """

    kind: str = ""  # "Service", "EndpointSlice", "Node"
    namespace: str = ""  # "" for cluster-scoped objects
    name: str = ""

    @classmethod
    def about(cls, kind: str, namespace: str, name: str, message: str) -> KubeProblem:
        where = f"{namespace}/{name}" if namespace else name
        return cls(
            source="kubernetes",
            line=0,
            column=0,
            path=f"{kind} {where}",
            message=message,
            kind=kind,
            namespace=namespace,
            name=name,
        )

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class ParsedService:
    """A Service that kube-proxy would program, without its endpoints yet."""

    spec: ServiceSpec  # its `created` set (metadata.creationTimestamp), its endpoints not

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def created(self) -> str:
        """metadata.creationTimestamp (RFC 3339 sorts as text): the older wins."""
        return self.spec.created


@dataclass(frozen=True, slots=True)
class ParsedSlice:
    """An EndpointSlice of addressType IPv4 or IPv6 that names its Service. (Its own name is
    the source's key for it, not held here too.)"""

    # Its Service's `namespace/name`: one string, held here and as the key of the
    # source's index of slices by service (a property made a new one at every call).
    service_key: str
    family: int  # 4 or 6
    ports: tuple[EndpointPort, ...]
    # Each with the slice's ports (one tuple for all): a service's spec takes them as they
    # are when it uses every port, as it usually does, instead of a copy per endpoint.
    endpoints: tuple[EndpointSpec, ...]


_Report = Callable[[str], None]  # records a problem about the object being parsed


class _Invalid(Exception):
    """The object cannot be used; the message says where and why."""


# --- reading untrusted JSON -----------------------------------------------------------------


def _mapping(value: object, path: str, *, required: bool = False) -> JSON:
    if type(value) is dict:  # JSON's (an ABC's isinstance is slow, and this runs often)
        return value
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise _Invalid(f"{path}: expected an object, got {_describe(value)}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"{path}: expected a list, got {_describe(value)}")
    return value


def _string(value: object, path: str, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise _Invalid(f"{path}: expected a string, got {_describe(value)}")
    return value


def _optional_string(value: object, path: str) -> str | None:
    return None if value is None else _string(value, path)


def _integer(value: object, path: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"{path}: expected an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise _Invalid(f"{path}: {value} is out of range {low}..{high}")
    return value


def _boolean(value: object, path: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(f"{path}: expected true or false, got {_describe(value)}")
    return value


def _one_of(value: object, path: str, choices: tuple[str, ...], default: str) -> str:
    # The API server writes defaults, but "" is how an unset enum travels in places.
    if value is None or value == "":
        return default
    text = _string(value, path)
    if text not in choices:
        raise _Invalid(f"{path}: {text!r} is not one of {', '.join(choices)}")
    # The choice's own string, not the decoded JSON's: held per port and per service.
    return choices[choices.index(text)]


def _ip(value: object, path: str) -> str:
    return _ip_version(value, path)[1]


def _ip_version(value: object, path: str) -> tuple[int, str]:
    """(4 or 6, the address in `ipaddress` spelling), or `_Invalid`."""
    if type(value) is str:
        if ":" not in value:
            try:
                # glibc's inet_pton takes exactly ipaddress's IPv4 spelling (four decimal
                # parts, no leading zeros), which is already the canonical one: ~10x faster.
                _inet_pton(_AF_INET, value)
            except (OSError, ValueError):
                pass
            else:
                return 4, value
        else:
            try:
                text = _inet_ntop(_AF_INET6, _inet_pton(_AF_INET6, value))
            except (OSError, ValueError):
                pass
            else:
                # Already canonical: glibc and ipaddress spell an address alike except
                # with an embedded IPv4 part (::ffff:1.2.3.4), left to ipaddress.
                if text == value and "." not in text:
                    return 6, value
    text = _string(value, path)
    version, canonical = _parse_address(text)
    if version > 0:
        return version, canonical
    if version == -1:
        raise _Invalid(f"{path}: {text!r}: a zone index (%...) is not allowed")
    raise _Invalid(f"{path}: {text!r} is not a valid IP address")


_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop
# One string object per distinct value for what repeats across objects (namespaces, node
# names, zones, port names, creation times): each decoded JSON string is its own object,
# held per endpoint or per port. Names and addresses, mostly unique (a pod is usually in
# one service), are not: interning costs a table entry (~45 bytes) per string.
_intern = sys.intern
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


# Ports repeat across objects: most Services of a cluster have the same few (80 -> 8080
# "http"), and so do their slices. One tuple of them, shared, instead of the port objects
# and their tuple per Service and per EndpointSlice (~220 bytes per service). Bounded:
# ports with a nodePort are unique, so the table starts again when it is full.
_SHARED_PORTS: dict[tuple[object, ...], tuple[object, ...]] = {}
_SHARED_PORTS_MAX = 4096


def _shared_ports(ports: tuple[_Port, ...]) -> tuple[_Port, ...]:
    shared = _SHARED_PORTS.get(ports)
    if shared is None:
        if len(_SHARED_PORTS) >= _SHARED_PORTS_MAX:
            _SHARED_PORTS.clear()
        _SHARED_PORTS[ports] = shared = ports
    return shared  # type: ignore[return-value]  # equal to `ports`, so of its type


@functools.lru_cache(maxsize=1 << 14)
def _parse_address(text: str) -> tuple[int, str]:
    """(version, canonical text) by `ipaddress`; (0, "") when invalid, (-1, "") with a zone."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return 0, ""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return -1, ""
    return address.version, str(address)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _family(address: str) -> int:
    """The family of an address in canonical spelling (as `_ip` returns them)."""
    return 6 if ":" in address else 4


def _address_order(address: str) -> tuple[int, int]:
    """(family, integer value): numeric address order. Not cached: a cache as large as a
    cluster's endpoints held ~10 MB at 100,000 services (tracemalloc) to save ~0.1 s of a
    first sync (~0.45 us per address, timeit)."""
    if ":" in address:
        return 6, int.from_bytes(_inet_pton(_AF_INET6, address), "big")
    return 4, int.from_bytes(_inet_pton(_AF_INET, address), "big")


def object_name(obj: object) -> tuple[str, str]:
    """(namespace, name) of an API object, "" where missing or not a string."""
    metadata = obj.get("metadata") if type(obj) is dict or isinstance(obj, Mapping) else None
    if not isinstance(metadata, Mapping):
        return "", ""
    namespace, name = metadata.get("namespace"), metadata.get("name")
    return (
        namespace if isinstance(namespace, str) else "",
        name if isinstance(name, str) else "",
    )


def _metadata(obj: object, kind: str) -> tuple[JSON, str, str]:
    """The metadata, namespace and name; an object without a name is unusable."""
    root = _mapping(obj, kind, required=True)
    metadata = _mapping(root.get("metadata"), "metadata", required=True)
    name = _string(metadata.get("name"), "metadata.name")
    namespace = _intern(_string(metadata.get("namespace"), "metadata.namespace", default=""))
    return metadata, namespace, name


def _string_map(value: object, path: str) -> dict[str, str]:
    mapping = _mapping(value, path)
    if not mapping:
        return {}
    if not all(isinstance(key, str) and isinstance(item, str) for key, item in mapping.items()):
        raise _Invalid(f"{path}: expected string keys and values")
    return dict(mapping)


# --- Services -------------------------------------------------------------------------------


def parse_service(
    obj: object, default_policy: str = DEFAULT_POLICY
) -> tuple[ParsedService | None, list[KubeProblem]]:
    """A Service as kube-proxy sees it; None when it is skipped or invalid.

    Problems name the object: an invalid one is rejected whole, while a bad pykp
    annotation is reported and its default used.
    """
    namespace, name = object_name(obj)
    problems: list[KubeProblem] = []

    def problem(message: str) -> None:
        problems.append(KubeProblem.about("Service", namespace, name, message))

    try:
        spec = _service(obj, default_policy, problem)
    except _Invalid as error:
        problem(f"rejected: {error}")
        return None, problems
    return spec, problems


def _service(obj: object, default_policy: str, problem: _Report) -> ParsedService | None:
    metadata, namespace, name = _metadata(obj, "Service")
    labels = _string_map(metadata.get("labels"), "metadata.labels")
    annotations = _string_map(metadata.get("annotations"), "metadata.annotations")
    if LABEL_SERVICE_PROXY_NAME in labels or LABEL_HEADLESS in labels:
        # Another proxy's, or marked headless whatever its clusterIP: kube-proxy's label
        # selector (!service-proxy-name,!headless) leaves both out, with any value.
        return None
    root = _mapping(obj, "Service")
    spec = _mapping(root.get("spec"), "spec", required=True)
    service_type = _one_of(spec.get("type"), "spec.type", SERVICE_TYPES, "ClusterIP")
    if service_type == "ExternalName":
        return None  # a DNS alias: nothing for a proxy to do
    single = spec.get("clusterIP")
    if single in (None, "", "None"):
        # Headless ("None"), or no address allocated yet: kube-proxy skips both.
        return None
    cluster_ips = tuple(
        _ip(item, f"spec.clusterIPs[{index}]")
        for index, item in enumerate(_list(spec.get("clusterIPs"), "spec.clusterIPs"))
    ) or (_ip(single, "spec.clusterIP"),)
    if len(cluster_ips) > 2 or (
        len(cluster_ips) == 2 and _family(cluster_ips[0]) == _family(cluster_ips[1])
    ):
        raise _Invalid("spec.clusterIPs: at most one IPv4 and one IPv6 address")
    families = {_family(address) for address in cluster_ips}

    external_ips = _unique(
        _ip(item, f"spec.externalIPs[{index}]")
        for index, item in enumerate(_list(spec.get("externalIPs"), "spec.externalIPs"))
    )
    load_balancer_ips: tuple[str, ...] = ()
    if service_type == "LoadBalancer":
        status = _mapping(root.get("status"), "status")
        balancer = _mapping(status.get("loadBalancer"), "status.loadBalancer")
        ingress_ips = []
        for index, item in enumerate(_list(balancer.get("ingress"), "status.loadBalancer.ingress")):
            path = f"status.loadBalancer.ingress[{index}]"
            ingress = _mapping(item, path)
            if ingress.get("ip") in (None, ""):
                continue  # a hostname-only ingress: the load balancer is reached by name
            if ingress.get("ipMode") == "Proxy":
                continue  # the load balancer proxies to the nodes itself (KEP-1860)
            ingress_ips.append(_ip(ingress.get("ip"), f"{path}.ip"))
        load_balancer_ips = _unique(ingress_ips)
    # kube-proxy runs one proxier per family the service has; an address of another family
    # cannot be served (NAT does not cross families).
    for address in (*external_ips, *load_balancer_ips):
        if _family(address) not in families:
            problem(f"ignored {address}: the service has no IPv{_family(address)} clusterIP")
    external_ips = tuple(a for a in external_ips if _family(a) in families)
    load_balancer_ips = tuple(a for a in load_balancer_ips if _family(a) in families)

    ports = _service_ports(spec.get("ports"), service_type)
    if not ports:
        return None  # nothing to program

    affinity = _one_of(
        spec.get("sessionAffinity"), "spec.sessionAffinity", SESSION_AFFINITIES, "None"
    )
    timeout: int | None = None
    if affinity == "ClientIP":
        config = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
        client_ip = _mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        raw_timeout = client_ip.get("timeoutSeconds")
        timeout = (
            DEFAULT_AFFINITY_TIMEOUT_SECONDS
            if raw_timeout is None
            else _integer(
                raw_timeout,
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                1,
                MAX_AFFINITY_TIMEOUT_SECONDS,
            )
        )
    external_policy = _one_of(
        spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy", TRAFFIC_POLICIES, "Cluster"
    )
    internal_policy = _one_of(
        spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", TRAFFIC_POLICIES, "Cluster"
    )
    # kube-proxy's NeedsHealthCheck: a LoadBalancer with externalTrafficPolicy Local (the API
    # allocates the port for exactly those).
    health_check_node_port: int | None = None
    if (
        service_type == "LoadBalancer"
        and external_policy == "Local"
        and spec.get("healthCheckNodePort") not in (None, 0)
    ):
        health_check_node_port = _integer(
            spec.get("healthCheckNodePort"), "spec.healthCheckNodePort", 1, 65535
        )

    policy = annotations.get(ANNOTATION_POLICY, default_policy)
    if policy not in POLICIES:
        problem(
            f"annotation {ANNOTATION_POLICY}: {policy!r} is not one of {', '.join(POLICIES)};"
            f" using {default_policy}"
        )
        policy = default_policy
    hash_key = annotations.get(ANNOTATION_HASH_KEY)
    if hash_key is not None and hash_key not in HASH_KEYS:
        problem(
            f"annotation {ANNOTATION_HASH_KEY}: {hash_key!r} is not one of"
            f" {', '.join(HASH_KEYS)}; using the default"
        )
        hash_key = None

    timestamp = metadata.get("creationTimestamp")
    created = _intern(timestamp) if isinstance(timestamp, str) else ""
    return ParsedService(
        spec=ServiceSpec(
            name=name,
            namespace=namespace,
            cluster_ips=cluster_ips,
            external_ips=external_ips,
            load_balancer_ips=load_balancer_ips,
            ports=ports,
            policy=policy,
            hash_key=hash_key,
            session_affinity=affinity,
            session_affinity_timeout_seconds=timeout,
            external_traffic_policy=external_policy,
            internal_traffic_policy=internal_policy,
            health_check_node_port=health_check_node_port,
            created=created,
        )
    )


def _service_ports(value: object, service_type: str) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    for index, item in enumerate(_list(value, "spec.ports")):
        path = f"spec.ports[{index}]"
        entry = _mapping(item, path)
        port = _integer(entry.get("port"), f"{path}.port", 1, 65535)
        protocol = _one_of(entry.get("protocol"), f"{path}.protocol", PROTOCOLS, "TCP")
        name = _intern(_string(entry.get("name"), f"{path}.name", default=""))
        raw_target = entry.get("targetPort")
        if raw_target is None or isinstance(raw_target, str):
            # A named targetPort is resolved per pod: the EndpointSlice carries the number.
            target = port
        elif isinstance(raw_target, int) and not isinstance(raw_target, bool):
            target = _integer(raw_target, f"{path}.targetPort", 1, 65535)
        else:
            raise _Invalid(f"{path}.targetPort: expected a number or a name")
        node_port: int | None = None
        if service_type in _NODE_PORT_TYPES and entry.get("nodePort") not in (None, 0):
            node_port = _integer(entry.get("nodePort"), f"{path}.nodePort", 1, 65535)
        if any((other.name, other.protocol) == (name, protocol) for other in ports):
            raise _Invalid(f"{path}: duplicate port name {name!r}/{protocol}")
        ports.append(
            ServicePort(
                port=port, target_port=target, protocol=protocol, name=name, node_port=node_port
            )
        )
    return _shared_ports(tuple(ports))


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(addresses))


# --- EndpointSlices -------------------------------------------------------------------------


def parse_endpoint_slice(obj: object) -> tuple[ParsedSlice | None, list[KubeProblem]]:
    """An EndpointSlice's usable part; None when it is skipped or invalid.

    An invalid endpoint (a bad address) drops only that endpoint; anything else wrong
    rejects the slice.
    """
    namespace, name = object_name(obj)
    problems: list[KubeProblem] = []

    def problem(message: str) -> None:
        problems.append(KubeProblem.about("EndpointSlice", namespace, name, message))

    try:
        parsed = _endpoint_slice(obj, problem)
    except _Invalid as error:
        problem(f"rejected: {error}")
        return None, problems
    return parsed, problems


def _endpoint_slice(obj: object, problem: _Report) -> ParsedSlice | None:
    metadata, namespace, name = _metadata(obj, "EndpointSlice")
    labels = _string_map(metadata.get("labels"), "metadata.labels")
    service_name = labels.get(LABEL_SERVICE_NAME)
    if not service_name:
        return None  # not a Service's slice (kube-proxy ignores these too)
    root = _mapping(obj, "EndpointSlice")
    address_type = _string(root.get("addressType"), "addressType")
    if address_type == "FQDN":
        return None  # names are not proxied
    if address_type not in ("IPv4", "IPv6"):
        raise _Invalid(f"addressType: {address_type!r} is not one of IPv4, IPv6, FQDN")
    family = 4 if address_type == "IPv4" else 6

    ports: list[EndpointPort] = []
    for index, item in enumerate(_list(root.get("ports"), "ports")):
        path = f"ports[{index}]"
        entry = _mapping(item, path)
        if entry.get("name") is None or entry.get("port") in (None, 0):
            continue  # kube-proxy ignores ports without a name or a number
        ports.append(
            EndpointPort(
                name=_intern(_string(entry.get("name"), f"{path}.name")),
                port=_integer(entry.get("port"), f"{path}.port", 1, 65535),
                protocol=_one_of(entry.get("protocol"), f"{path}.protocol", PROTOCOLS, "TCP"),
            )
        )

    slice_ports = _shared_ports(tuple(ports))
    endpoints: list[EndpointSpec] = []
    for index, item in enumerate(_list(root.get("endpoints"), "endpoints")):
        try:
            endpoints.append(_slice_endpoint(item, f"endpoints[{index}]", family, slice_ports))
        except _Invalid as error:
            problem(f"endpoint skipped: {error}")
    return ParsedSlice(
        service_key=f"{namespace}/{service_name}",
        family=family,
        ports=slice_ports,
        endpoints=tuple(endpoints),
    )


def _slice_endpoint(
    item: object, path: str, family: int, ports: tuple[EndpointPort, ...]
) -> EndpointSpec:
    # The paths of the checks are spelt only when one fails: this runs for every endpoint.
    entry = _mapping(item, path)
    addresses = entry.get("addresses")
    if type(addresses) is not list:
        addresses = _list(addresses, f"{path}.addresses")
    if not addresses:
        raise _Invalid(f"{path}.addresses: no address")
    # Only the first address counts (the API says consumers use the first).
    version, ip = _ip_version(addresses[0], f"{path}.addresses[0]")
    if version != family:
        raise _Invalid(f"{path}.addresses[0]: {ip} is not an IPv{family} address")
    conditions = entry.get("conditions")
    if type(conditions) is not dict:
        conditions = _mapping(conditions, f"{path}.conditions")
    # The API's defaults: unknown readiness counts as ready, serving defers to ready.
    ready = conditions.get("ready")
    if ready is None:
        ready = True
    elif type(ready) is not bool:
        _boolean(ready, f"{path}.conditions.ready", True)
    serving = conditions.get("serving")
    if serving is None:
        serving = ready
    elif type(serving) is not bool:
        _boolean(serving, f"{path}.conditions.serving", ready)
    terminating = conditions.get("terminating")
    if terminating is None:
        terminating = False
    elif type(terminating) is not bool:
        _boolean(terminating, f"{path}.conditions.terminating", False)
    hints = entry.get("hints")
    if hints is not None:
        hints = _mapping(hints, f"{path}.hints")
    node_name = entry.get("nodeName")
    if node_name is not None:
        node_name = _intern(_string(node_name, f"{path}.nodeName"))
    zone = entry.get("zone")
    if zone is not None:
        zone = _intern(_string(zone, f"{path}.zone"))
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()
    if hints is not None:
        zone_hints = _hint_names(hints.get("forZones"), f"{path}.hints.forZones")
        node_hints = _hint_names(hints.get("forNodes"), f"{path}.hints.forNodes")
    return EndpointSpec(
        ip=ip,
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=node_name,
        zone=zone,
        ports=ports,
        zone_hints=zone_hints,
        node_hints=node_hints,
    )


def _hint_names(value: object, path: str) -> tuple[str, ...]:
    return tuple(
        _string(_mapping(item, f"{path}[{index}]").get("name"), f"{path}[{index}].name")
        for index, item in enumerate(_list(value, path))
    )


# --- Nodes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """What pykp reads from its own Node object."""

    name: str
    zone: str | None
    addresses: tuple[str, ...]  # status.addresses of type InternalIP and ExternalIP


def parse_node(obj: object) -> tuple[NodeInfo | None, list[KubeProblem]]:
    _, name = object_name(obj)
    try:
        metadata, _, name = _metadata(obj, "Node")
        labels = _string_map(metadata.get("labels"), "metadata.labels")
        status = _mapping(_mapping(obj, "Node").get("status"), "status")
        addresses = []
        for index, item in enumerate(_list(status.get("addresses"), "status.addresses")):
            entry = _mapping(item, f"status.addresses[{index}]")
            if entry.get("type") in ("InternalIP", "ExternalIP"):
                addresses.append(_ip(entry.get("address"), f"status.addresses[{index}].address"))
    except _Invalid as error:
        return None, [KubeProblem.about("Node", "", name, f"rejected: {error}")]
    return NodeInfo(
        name=name, zone=labels.get(LABEL_ZONE) or None, addresses=_unique(addresses)
    ), []


# --- putting it together --------------------------------------------------------------------


def service_endpoints(
    service: ServiceSpec, slices: Mapping[str, ParsedSlice]
) -> tuple[EndpointSpec, ...]:
    """A service's endpoints merged from its slices (by their names, or their keys: they are
    in the service's namespace), as kube-proxy's EndpointSliceCache does.

    Slices are read in name order; an endpoint address and port seen twice (an endpoint
    moving between slices) is kept once, the first time. Only ports that match a service
    port (by name and protocol) and addresses of the service's families are kept.
    """
    wanted = {(port.name, port.protocol) for port in service.ports}
    families = {_family(address) for address in service.cluster_ips}
    if len(slices) == 1:
        (lone,) = slices.values()
        if _kept_whole(lone, wanted, families):
            return lone.endpoints
    seen: set[tuple[str, str, str, int]] = set()
    # One EndpointSpec serves each port name once; an address with two numbers for one
    # name (pods resolving a named targetPort differently) becomes two EndpointSpecs.
    records: list[tuple[EndpointSpec, list[EndpointPort]]] = []
    records_of: dict[tuple[object, ...], list[int]] = {}  # an endpoint's records, by index
    ordered = [parsed for _, parsed in sorted(slices.items())]
    for parsed in ordered:
        if parsed.family not in families:
            continue
        ports = [port for port in parsed.ports if (port.name, port.protocol) in wanted]
        for endpoint in parsed.endpoints:
            # The same endpoint in two slices (their ports aside) is one record.
            same = (
                endpoint.ip,
                endpoint.ready,
                endpoint.serving,
                endpoint.terminating,
                endpoint.node_name,
                endpoint.zone,
                endpoint.zone_hints,
                endpoint.node_hints,
            )
            for port in ports:
                identity = (port.name, port.protocol, endpoint.ip, port.port)
                if identity in seen:
                    continue
                seen.add(identity)
                for index in records_of.setdefault(same, []):
                    record_ports = records[index][1]
                    if all(
                        (other.name, other.protocol) != (port.name, port.protocol)
                        for other in record_ports
                    ):
                        record_ports.append(port)
                        break
                else:
                    records_of[same].append(len(records))
                    records.append((endpoint, [port]))
    endpoints = [
        (
            endpoint
            if endpoint.ports == tuple(ports)
            else endpoint.with_ports(_shared_ports(tuple(ports)))
        )
        for endpoint, ports in records
    ]
    endpoints.sort(key=lambda endpoint: _address_order(endpoint.ip))
    merged = tuple(endpoints)
    # Usually one slice, its endpoints kept as they are: its tuple, not an equal copy.
    for parsed in ordered:
        if parsed.endpoints == merged:
            return parsed.endpoints
    return merged


def _kept_whole(parsed: ParsedSlice, wanted: set[tuple[str, str]], families: set[int]) -> bool:
    """Whether a service's lone slice gives its endpoints as they are (most do): every
    port serves the service, once per name, on every endpoint; its addresses of a family
    the service has, each once, in address order. What `service_endpoints` would merge
    then equals the slice's own tuple, which it returns (without a merge's sets and dicts
    per service: a third of its cost at a start)."""
    ports = parsed.ports
    if not ports or parsed.family not in families:
        return False
    names = {(port.name, port.protocol) for port in ports}
    if len(names) != len(ports) or not names <= wanted:
        return False
    last = (0, -1)
    for endpoint in parsed.endpoints:
        order = _address_order(endpoint.ip)
        if endpoint.ports is not ports or order <= last:
            return False
        last = order
    return True


def build_services_file(
    services: Iterable[ParsedService],
    slices: Iterable[tuple[str, ParsedSlice]],
    *,
    zone: str | None = None,
    default_policy: str = DEFAULT_POLICY,
) -> tuple[Catalog, list[KubeProblem]]:
    """The services with their endpoints (`slices`: each with its name), ready for
    `services_file_to_engine`.

    Two services may not share a frontend (an address, port and protocol) or a nodePort:
    the API allows it for externalIPs, the engine does not. The older service keeps it and
    the newer one is rejected with a problem.
    """
    slices_by_service: dict[str, dict[str, ParsedSlice]] = {}
    for name, parsed in slices:
        slices_by_service.setdefault(parsed.service_key, {})[name] = parsed
    problems: list[KubeProblem] = []
    frontend_owners: dict[tuple[str, int, str], str] = {}
    node_port_owners: dict[tuple[int, str], str] = {}
    specs: list[ServiceSpec] = []
    for parsed_service in sorted(services, key=lambda item: (item.created, item.key)):
        spec = parsed_service.spec
        addresses = (*spec.cluster_ips, *spec.external_ips, *spec.load_balancer_ips)
        frontends = {
            (address, port.port, port.protocol) for port in spec.ports for address in addresses
        }
        node_ports = {
            (port.node_port, port.protocol) for port in spec.ports if port.node_port is not None
        }
        taken = sorted(
            [
                f"{_frontend_text(f)} (used by {frontend_owners[f]})"
                for f in frontends
                if f in frontend_owners
            ]
            + [
                f"nodePort {n}/{p} (used by {node_port_owners[(n, p)]})"
                for n, p in node_ports
                if (n, p) in node_port_owners
            ]
        )
        if taken:
            problems.append(
                KubeProblem.about(
                    "Service", spec.namespace, spec.name, f"rejected: {', '.join(taken)} taken"
                )
            )
            continue
        frontend_owners.update(dict.fromkeys(frontends, spec.key))
        node_port_owners.update(dict.fromkeys(node_ports, spec.key))
        endpoints = service_endpoints(spec, slices_by_service.get(spec.key, {}))
        specs.append(replace(spec, endpoints=endpoints))
    specs.sort(key=lambda spec: spec.key)
    services_file = Catalog(
        services=tuple(specs),
        default_policy=default_policy,
        traffic_policies=True,
        zone=zone,
    )
    return services_file, problems


def _frontend_text(frontend: tuple[str, int, str]) -> str:
    address, port, protocol = frontend
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


def translate(
    services: Iterable[object],
    slices: Iterable[object],
    node: object | None = None,
    *,
    default_policy: str = DEFAULT_POLICY,
) -> tuple[Catalog, list[KubeProblem]]:
    """Everything at once, from raw objects (the unit tests' and a one-shot caller's entry)."""
    problems: list[KubeProblem] = []
    parsed_services = []
    for obj in services:
        parsed_service, found = parse_service(obj, default_policy)
        problems += found
        if parsed_service is not None:
            parsed_services.append(parsed_service)
    parsed_slices = []
    for obj in slices:
        parsed_slice, found = parse_endpoint_slice(obj)
        problems += found
        if parsed_slice is not None:
            parsed_slices.append((object_name(obj)[1], parsed_slice))
    zone = None
    if node is not None:
        node_info, found = parse_node(node)
        problems += found
        zone = node_info.zone if node_info is not None else None
    services_file, found = build_services_file(
        parsed_services, parsed_slices, zone=zone, default_policy=default_policy
    )
    return services_file, problems + found
