"""The local services file: pykp's own source of services when no cluster is used.

The format borrows Kubernetes' names (a Service's spec plus its endpoints) so operators
recognise it:

    defaults:
      policy: random                 # random | round-robin | maglev | least-conn
    services:
      - name: web
        namespace: default
        clusterIPs: [10.96.0.10, "fd00:96::10"]
        ports:
          - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
        endpoints:
          - {ip: 10.244.1.10, ready: true, nodeName: node-a}

Loading never stops at the first mistake: every invalid entry is reported with the
file:line:column of the offending node and skipped, and the rest of the file loads. An
invalid endpoint skips only that endpoint (as with an EndpointSlice); anything else wrong
in a service skips the whole service. Only a file that is not YAML, or whose top level is
not a mapping, is fatal (`ServicesFileError`).

The second half of this module translates the parsed services into the engine's terms
(one engine service per service port, like kube-proxy's ServicePortName) and applies them.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

if TYPE_CHECKING:
    from pykp._fastpath import Engine

# Kept in step with `pykp._fastpath.POLICIES` (tested); duplicated here so that parsing
# and the CLI work without the extension.
POLICIES: Final = ("random", "round-robin", "maglev", "least-conn")
DEFAULT_POLICY: Final = "random"
PROTOCOLS: Final = ("TCP", "UDP", "SCTP")
HASH_KEYS: Final = ("5-tuple", "source-ip")
SESSION_AFFINITIES: Final = ("None", "ClientIP")
TRAFFIC_POLICIES: Final = ("Cluster", "Local")
# Kubernetes' defaults and limits for ClientIP session affinity.
DEFAULT_AFFINITY_TIMEOUT_SECONDS: Final = 10800
MAX_AFFINITY_TIMEOUT_SECONDS: Final = 86400
MAX_WEIGHT: Final = 65535

BUNDLED_EXAMPLE: Final = "examples/services.yaml"


# --- the parsed file ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePort:
    """One port of a service. `name` is "" when the service has a single unnamed port."""

    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""
    node_port: int | None = None


@dataclass(frozen=True)
class EndpointPort:
    """A port of an endpoint, as an EndpointSlice names it (matched to service ports)."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint (a pod address) with Kubernetes' endpoint conditions.

    `ports` None (the services file) means every service port's targetPort; a Kubernetes
    source sets it from the EndpointSlice, whose port numbers can differ per pod when a
    service's targetPort is a name. `zone_hints` and `node_hints` are the slice's
    topology hints (empty: none).
    """

    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    weight: int = 1
    ports: tuple[EndpointPort, ...] | None = None
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()

    def port_for(self, port: ServicePort) -> int | None:
        """This endpoint's port for a service port; None when it does not serve it."""
        if self.ports is None:
            return port.target_port
        for endpoint_port in self.ports:
            if endpoint_port.name == port.name and endpoint_port.protocol == port.protocol:
                return endpoint_port.port
        return None


@dataclass(frozen=True)
class ServiceSpec:
    """A service and its endpoints. Addresses are normalised (`ipaddress` spelling)."""

    name: str
    namespace: str = "default"
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    policy: str = DEFAULT_POLICY
    hash_key: str | None = None  # None: the engine's default
    session_affinity: str = "None"
    session_affinity_timeout_seconds: int | None = None  # set exactly when ClientIP
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    endpoints: tuple[EndpointSpec, ...] = ()

    @property
    def key(self) -> str:
        """`namespace/name`, as kubectl and kube-proxy spell a service."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicesFile:
    """Everything that loaded from a services file (invalid entries left out).

    A Kubernetes source sets `traffic_policies` (apply externalTrafficPolicy and
    internalTrafficPolicy when translating, as kube-proxy does) and `zone` (this node's
    topology.kubernetes.io/zone, for topology hints); a services file keeps the defaults.
    """

    services: tuple[ServiceSpec, ...] = ()
    default_policy: str = DEFAULT_POLICY
    traffic_policies: bool = False
    zone: str | None = None
    # namespace/name of entries with a problem (skipped, or loaded without their invalid
    # endpoints): a source that has a last good version of one keeps serving that instead.
    invalid: frozenset[str] = frozenset()

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


class ServicesFileError(Exception):
    """The file cannot be read at all: not YAML, or not a mapping at the top."""

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.source = source
        self.line = line
        self.column = column
        self.message = message


def family_warnings(services_file: ServicesFile) -> list[str]:
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


# --- loading ------------------------------------------------------------------------------


# libyaml's loader when PyYAML has it: ~4x faster on large files (10,000 services: 4 s
# instead of 16 s), with the same node marks for problem locations.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_services_file(
    path: str | os.PathLike[str],
) -> tuple[ServicesFile, list[Problem]]:
    """Load a services file; problems name the file as `path` was given.

    Raises `ServicesFileError` when the file is not YAML or not a mapping, and `OSError`
    when it cannot be read.
    """
    source = os.fspath(path)
    with open(source, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ServicesFileError(source, 1, 1, f"not UTF-8 text ({error.reason})") from None
    return load_services_text(text, source)


def load_bundled_example() -> tuple[ServicesFile, list[Problem]]:
    """The example services file shipped inside the package (`pykp/examples/`)."""
    resource = resources.files("pykp").joinpath(BUNDLED_EXAMPLE)
    return load_services_text(resource.read_text(encoding="utf-8"), f"pykp/{BUNDLED_EXAMPLE}")


def load_services_text(
    text: str, source_name: str = "<string>"
) -> tuple[ServicesFile, list[Problem]]:
    """Parse services-file text. Raises `ServicesFileError` only for fatal errors."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = error.problem or "syntax error"
        if error.context:
            message += f" ({error.context})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ServicesFileError(source_name, line, column, f"invalid YAML: {message}") from None
    if root is None:  # an empty file: no services, nothing wrong
        return ServicesFile(), []
    if not isinstance(root, MappingNode):
        line, column = _position(root)
        raise ServicesFileError(
            source_name,
            line,
            column,
            f"the top level must be a mapping, not {_kind(root)}",
        )
    parser = _Parser(source_name)
    services_file = parser.parse_file(root)
    return services_file, parser.problems


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a scalar"


_FILE_FIELDS: Final = ("defaults", "services")
_DEFAULTS_FIELDS: Final = ("policy",)
_SERVICE_FIELDS: Final = (
    "name",
    "namespace",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "loadBalancerIPs",
    "ports",
    "policy",
    "hashKey",
    "sessionAffinity",
    "sessionAffinityTimeoutSeconds",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
    "endpoints",
)
_PORT_FIELDS: Final = ("name", "port", "targetPort", "protocol", "nodePort")
_ENDPOINT_FIELDS: Final = (
    "ip",
    "ready",
    "serving",
    "terminating",
    "nodeName",
    "zone",
    "weight",
)

# Kubernetes' name rules: service names are DNS-1035 labels, namespaces and port names
# DNS-1123 labels.
_DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_LABEL_LENGTH: Final = 63


class _Invalid(Exception):
    """A field or entry is invalid; its problem is already recorded."""


_T = TypeVar("_T")
_D = TypeVar("_D")


class _Parser:
    """Walks the composed YAML nodes (which keep their marks) and records problems.

    Field parsers raise `_Invalid` after recording a problem; an entry is skipped when any
    problem was recorded while parsing it (counted with `len(self.problems)`).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self._constructor = SafeConstructor()
        self._service_names: dict[str, Node] = {}  # namespace/name -> where first defined
        self._invalid_services: set[str] = set()
        self._frontend_owners: dict[tuple[str, int, str], str] = {}
        self._node_port_owners: dict[tuple[int, str], str] = {}

    # -- reporting and generic field access

    def report(self, node: Node, path: str, message: str) -> None:
        line, column = _position(node)
        self.problems.append(Problem(self.source, line, column, path, message))

    def fail(self, node: Node, path: str, message: str) -> _Invalid:
        self.report(node, path, message)
        return _Invalid()

    def fields(self, node: Node, path: str, known: Sequence[str]) -> dict[str, Node]:
        """The value nodes of a mapping's known keys.

        Unknown and repeated keys are recorded as problems but do not stop the parse, so
        one pass reports every mistake of an entry (the caller still skips the entry).
        """
        if not isinstance(node, MappingNode):
            raise self.fail(
                node,
                path or "(top level)",
                f"expected a mapping, got {self.describe(node)}",
            )
        fields: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.report(
                    key_node,
                    path or "(top level)",
                    f"field names must be strings, got {self.describe(key_node)}",
                )
            elif key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.report(key_node, _join(path, key), f"unknown field{hint}")
            elif key in fields:
                self.report(key_node, _join(path, key), "duplicate field")
            else:
                fields[key] = value_node
        return fields

    def optional(self, fields: dict[str, Node], key: str) -> Node | None:
        """A field's node, or None when absent or null (YAML's way of leaving it unset)."""
        node = fields.get(key)
        return None if node is None or _is_null(node) else node

    def field(
        self,
        fields: dict[str, Node],
        key: str,
        path: str,
        parse: Callable[[Node, str], _T],
        default: _D,
    ) -> _T | _D:
        """An optional field's value; `default` when unset or invalid (the problem is recorded)."""
        node = self.optional(fields, key)
        if node is None:
            return default
        try:
            return parse(node, _join(path, key))
        except _Invalid:
            return default

    def required(
        self,
        fields: dict[str, Node],
        key: str,
        path: str,
        owner: Node,
        parse: Callable[[Node, str], _T],
    ) -> _T:
        node = self.optional(fields, key)
        if node is None:
            # Point at the null value if there is one, else at the entry that lacks the key.
            raise self.fail(fields.get(key, owner), _join(path, key), "required field is missing")
        return parse(node, _join(path, key))

    def scalar(self, node: ScalarNode) -> object:
        return self._constructor.construct_object(node, deep=True)

    def describe(self, node: Node) -> str:
        if not isinstance(node, ScalarNode):
            return _kind(node)
        value = self.scalar(node)
        if value is None:
            return "null"
        if isinstance(value, bool):
            return f"a boolean ({node.value})"
        if isinstance(value, (int, float)):
            return f"a number ({node.value})"
        return f"a string ({node.value!r})"

    # -- typed values

    def string(self, node: Node, path: str) -> str:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            raise self.fail(node, path, f"expected a string, got {self.describe(node)}")
        return value

    def label(self, node: Node, path: str, pattern: re.Pattern[str], what: str) -> str:
        value = self.string(node, path)
        if len(value) > _MAX_LABEL_LENGTH or not pattern.fullmatch(value):
            raise self.fail(node, path, f"{value!r} is not a valid {what}")
        return value

    def service_name(self, node: Node, path: str) -> str:
        return self.label(node, path, _DNS1035_LABEL, "service name (lowercase DNS-1035 label)")

    def namespace(self, node: Node, path: str) -> str:
        return self.label(node, path, _DNS1123_LABEL, "namespace (lowercase DNS-1123 label)")

    def port_name(self, node: Node, path: str) -> str:
        return self.label(node, path, _DNS1123_LABEL, "port name (lowercase DNS-1123 label)")

    def integer(self, node: Node, path: str, low: int, high: int) -> int:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(node, path, f"expected an integer, got {self.describe(node)}")
        if not low <= value <= high:
            raise self.fail(node, path, f"{value} is out of range {low}..{high}")
        return value

    def port_number(self, node: Node, path: str) -> int:
        return self.integer(node, path, 1, 65535)

    def target_port(self, node: Node, path: str) -> int:
        if isinstance(node, ScalarNode) and isinstance(self.scalar(node), str):
            # Kubernetes allows a container port's name here, but this file has no pods.
            raise self.fail(
                node,
                path,
                f"expected a port number, got {self.describe(node)} (named target ports need pods)",
            )
        return self.port_number(node, path)

    def affinity_timeout(self, node: Node, path: str) -> int:
        return self.integer(node, path, 1, MAX_AFFINITY_TIMEOUT_SECONDS)

    def weight(self, node: Node, path: str) -> int:
        return self.integer(node, path, 1, MAX_WEIGHT)

    def boolean(self, node: Node, path: str) -> bool:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            raise self.fail(node, path, f"expected true or false, got {self.describe(node)}")
        return value

    def one_of(self, choices: Sequence[str]) -> Callable[[Node, str], str]:
        def parse(node: Node, path: str) -> str:
            value = self.string(node, path)
            if value not in choices:
                raise self.fail(node, path, f"{value!r} is not one of {', '.join(choices)}")
            return value

        return parse

    def ip(self, node: Node, path: str) -> str:
        # The raw text, not the constructed value: YAML 1.1 reads some IPv6 spellings
        # (e.g. 1:2:3:4:5:6:7:8) as base-60 integers.
        if not isinstance(node, ScalarNode) or _is_null(node):
            raise self.fail(node, path, f"expected an IP address, got {self.describe(node)}")
        try:
            address = ipaddress.ip_address(node.value)
        except ValueError:
            raise self.fail(node, path, f"{node.value!r} is not a valid IP address") from None
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise self.fail(node, path, f"{node.value!r}: a zone index (%...) is not allowed")
        return str(address)

    def items(self, node: Node, path: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, path, f"expected a list, got {self.describe(node)}")
        return list(node.value)

    def ip_list(self, node: Node, path: str) -> tuple[str, ...]:
        problems_before = len(self.problems)
        addresses: list[str] = []
        for index, item in enumerate(self.items(node, path)):
            try:
                address = self.ip(item, f"{path}[{index}]")
            except _Invalid:
                continue
            if address in addresses:
                self.report(item, f"{path}[{index}]", f"duplicate address {address}")
            addresses.append(address)
        if len(self.problems) > problems_before:
            raise _Invalid()
        return tuple(addresses)

    # -- the file

    def parse_file(self, root: MappingNode) -> ServicesFile:
        fields = self.fields(root, "", _FILE_FIELDS)  # unknown top-level keys are only reported
        default_policy = self.parse_defaults(fields)
        try:
            entries = self.required(fields, "services", "", root, self.items)
        except _Invalid:
            return ServicesFile(default_policy=default_policy)
        services = []
        for index, entry in enumerate(entries):
            service = self.parse_service(entry, f"services[{index}]", default_policy)
            if service is not None:
                services.append(service)
        return ServicesFile(
            services=tuple(services),
            default_policy=default_policy,
            invalid=frozenset(self._invalid_services),
        )

    def parse_defaults(self, fields: dict[str, Node]) -> str:
        node = self.optional(fields, "defaults")
        if node is None:
            return DEFAULT_POLICY
        try:
            defaults = self.fields(node, "defaults", _DEFAULTS_FIELDS)
        except _Invalid:
            return DEFAULT_POLICY
        return self.field(defaults, "policy", "defaults", self.one_of(POLICIES), DEFAULT_POLICY)

    # -- one service

    def parse_service(self, node: Node, path: str, default_policy: str) -> ServiceSpec | None:
        problems_before = len(self.problems)
        try:
            fields = self.fields(node, path, _SERVICE_FIELDS)
        except _Invalid:
            return None

        name = ""
        with contextlib.suppress(_Invalid):
            name = self.required(fields, "name", path, node, self.service_name)
        namespace = self.field(fields, "namespace", path, self.namespace, "default")
        key = f"{namespace}/{name}"
        if name:
            self.check_unique_name(key, fields["name"], _join(path, "name"))
        cluster_ips = self.cluster_ips(fields, path)
        external_ips = self.field(fields, "externalIPs", path, self.ip_list, ())
        load_balancer_ips = self.field(fields, "loadBalancerIPs", path, self.ip_list, ())
        policy = self.field(fields, "policy", path, self.one_of(POLICIES), default_policy)
        hash_key = self.field(fields, "hashKey", path, self.one_of(HASH_KEYS), None)
        affinity = self.field(
            fields, "sessionAffinity", path, self.one_of(SESSION_AFFINITIES), "None"
        )
        timeout = self.field(
            fields,
            "sessionAffinityTimeoutSeconds",
            path,
            self.affinity_timeout,
            DEFAULT_AFFINITY_TIMEOUT_SECONDS,
        )
        timeout_node = self.optional(fields, "sessionAffinityTimeoutSeconds")
        if timeout_node is not None and affinity != "ClientIP":
            self.report(
                timeout_node,
                _join(path, "sessionAffinityTimeoutSeconds"),
                "only allowed with sessionAffinity: ClientIP",
            )
        traffic_policy = self.one_of(TRAFFIC_POLICIES)
        external_traffic_policy = self.field(
            fields, "externalTrafficPolicy", path, traffic_policy, "Cluster"
        )
        internal_traffic_policy = self.field(
            fields, "internalTrafficPolicy", path, traffic_policy, "Cluster"
        )
        ports: list[tuple[ServicePort, Node]] = []
        with contextlib.suppress(_Invalid):
            ports = self.required(fields, "ports", path, node, self.parse_ports)
        addresses = (*cluster_ips, *external_ips, *load_balancer_ips)
        no_node_ports = all(port.node_port is None for port, _ in ports)
        if len(self.problems) == problems_before and not addresses and no_node_ports:
            self.report(
                node,
                path,
                "nothing to reach: set clusterIPs, externalIPs, loadBalancerIPs or a nodePort",
            )
        if len(self.problems) == problems_before:
            # Only a service that loads claims its frontends; a later one may not reuse them.
            self.claim_frontends(key, addresses, ports, path)
        service_is_valid = len(self.problems) == problems_before

        # Endpoints are checked even when the service is skipped, so one pass finds everything.
        endpoints = self.field(fields, "endpoints", path, self.parse_endpoints, ())
        if name and len(self.problems) > problems_before:
            self._invalid_services.add(key)
        if not service_is_valid:
            return None
        return ServiceSpec(
            name=name,
            namespace=namespace,
            cluster_ips=cluster_ips,
            external_ips=external_ips,
            load_balancer_ips=load_balancer_ips,
            ports=tuple(port for port, _ in ports),
            policy=policy,
            hash_key=hash_key,
            session_affinity=affinity,
            session_affinity_timeout_seconds=timeout if affinity == "ClientIP" else None,
            external_traffic_policy=external_traffic_policy,
            internal_traffic_policy=internal_traffic_policy,
            endpoints=endpoints,
        )

    def check_unique_name(self, key: str, name_node: Node, path: str) -> None:
        first = self._service_names.setdefault(key, name_node)
        if first is not name_node:
            self.report(
                name_node,
                path,
                f"duplicate service {key} (first defined at line {_position(first)[0]})",
            )

    def cluster_ips(self, fields: dict[str, Node], path: str) -> tuple[str, ...]:
        """clusterIP and clusterIPs merged with Kubernetes' rules (at most one per family)."""
        single = self.field(fields, "clusterIP", path, self.ip, None)
        many = self.field(fields, "clusterIPs", path, self.ip_list, ())
        if single is not None and many and many[0] != single:
            self.report(
                fields["clusterIP"],
                _join(path, "clusterIP"),
                f"{single} differs from clusterIPs[0] ({many[0]})",
            )
        if len(many) > 2 or (len(many) == 2 and _family(many[0]) == _family(many[1])):
            self.report(
                fields["clusterIPs"],
                _join(path, "clusterIPs"),
                "at most one IPv4 and one IPv6 address (dual-stack)",
            )
        return many or (() if single is None else (single,))

    def claim_frontends(
        self,
        key: str,
        addresses: Sequence[str],
        ports: list[tuple[ServicePort, Node]],
        path: str,
    ) -> None:
        """Report frontends and nodePorts an earlier service owns; claim the rest."""
        frontends = {
            (address, port.port, port.protocol): index
            for index, (port, _) in enumerate(ports)
            for address in addresses
        }
        node_ports = {
            (port.node_port, port.protocol): index
            for index, (port, _) in enumerate(ports)
            if port.node_port is not None
        }
        problems_before = len(self.problems)
        for frontend, index in frontends.items():
            owner = self._frontend_owners.get(frontend)
            if owner is not None:
                message = f"{_frontend_text(frontend)} is already used by {owner}"
                self.report(ports[index][1], f"{_join(path, 'ports')}[{index}]", message)
        for (node_port, protocol), index in node_ports.items():
            owner = self._node_port_owners.get((node_port, protocol))
            if owner is not None:
                message = f"nodePort {node_port}/{protocol} is already used by {owner}"
                self.report(ports[index][1], f"{_join(path, 'ports')}[{index}]", message)
        if len(self.problems) == problems_before:
            self._frontend_owners.update(dict.fromkeys(frontends, key))
            self._node_port_owners.update(dict.fromkeys(node_ports, key))

    # -- ports

    def parse_ports(self, node: Node, path: str) -> list[tuple[ServicePort, Node]]:
        """The ports with their nodes (kept for locating later conflicts)."""
        entries = self.items(node, path)
        if not entries:
            raise self.fail(node, path, "a service needs at least one port")
        problems_before = len(self.problems)
        ports: list[tuple[ServicePort, Node]] = []
        for index, entry in enumerate(entries):
            try:
                ports.append(
                    (
                        self.parse_port(entry, f"{path}[{index}]", len(entries) > 1),
                        entry,
                    )
                )
            except _Invalid:
                ports.append((ServicePort(port=0, target_port=0), entry))  # keeps indexes aligned
        names: set[str] = set()
        numbers: set[tuple[int, str]] = set()
        for index, (port, entry) in enumerate(ports):
            if port.port == 0:
                continue
            if port.name and port.name in names:
                message = f"duplicate port name {port.name!r}"
                self.report(_value_node(entry, "name"), f"{path}[{index}].name", message)
            if (port.port, port.protocol) in numbers:
                message = f"duplicate port {port.port}/{port.protocol}"
                self.report(_value_node(entry, "port"), f"{path}[{index}].port", message)
            names.add(port.name)
            numbers.add((port.port, port.protocol))
        if len(self.problems) > problems_before:
            raise _Invalid()
        return ports

    def parse_port(self, node: Node, path: str, name_required: bool) -> ServicePort:
        problems_before = len(self.problems)
        fields = self.fields(node, path, _PORT_FIELDS)
        name = self.field(fields, "name", path, self.port_name, "")
        if name_required and self.optional(fields, "name") is None:
            self.report(
                fields.get("name", node),
                _join(path, "name"),
                "required when a service has more than one port",
            )
        port = 0
        with contextlib.suppress(_Invalid):
            port = self.required(fields, "port", path, node, self.port_number)
        target_port = self.field(fields, "targetPort", path, self.target_port, port)
        protocol = self.field(fields, "protocol", path, self.one_of(PROTOCOLS), "TCP")
        node_port = self.field(fields, "nodePort", path, self.port_number, None)
        if len(self.problems) > problems_before:
            raise _Invalid()
        return ServicePort(
            port=port,
            target_port=target_port,
            protocol=protocol,
            name=name,
            node_port=node_port,
        )

    # -- endpoints

    def parse_endpoints(self, node: Node, path: str) -> tuple[EndpointSpec, ...]:
        """The valid endpoints; an invalid one is reported and left out, not fatal."""
        endpoints: list[EndpointSpec] = []
        for index, entry in enumerate(self.items(node, path)):
            entry_path = f"{path}[{index}]"
            try:
                endpoint = self.parse_endpoint(entry, entry_path)
            except _Invalid:
                continue
            if any(other.ip == endpoint.ip for other in endpoints):
                message = f"duplicate endpoint {endpoint.ip}"
                self.report(_value_node(entry, "ip"), f"{entry_path}.ip", message)
                continue
            endpoints.append(endpoint)
        return tuple(endpoints)

    def parse_endpoint(self, node: Node, path: str) -> EndpointSpec:
        problems_before = len(self.problems)
        fields = self.fields(node, path, _ENDPOINT_FIELDS)
        ip = ""
        with contextlib.suppress(_Invalid):
            ip = self.required(fields, "ip", path, node, self.ip)
        ready = self.field(fields, "ready", path, self.boolean, True)
        # Kubernetes: serving defaults to ready, terminating to false.
        serving = self.field(fields, "serving", path, self.boolean, ready)
        terminating = self.field(fields, "terminating", path, self.boolean, False)
        node_name = self.field(fields, "nodeName", path, self.string, None)
        zone = self.field(fields, "zone", path, self.string, None)
        weight = self.field(fields, "weight", path, self.weight, 1)
        if len(self.problems) > problems_before:
            raise _Invalid()
        return EndpointSpec(
            ip=ip,
            ready=ready,
            serving=serving,
            terminating=terminating,
            node_name=node_name,
            zone=zone,
            weight=weight,
        )


def _value_node(mapping: Node, key: str) -> Node:
    """The value of `key` in a mapping node that parsed cleanly (the mapping otherwise)."""
    if isinstance(mapping, MappingNode):
        for key_node, value_node in mapping.value:
            if isinstance(key_node, ScalarNode) and key_node.value == key:
                value: Node = value_node
                return value
    return mapping


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _frontend_text(frontend: tuple[str, int, str]) -> str:
    address, port, protocol = frontend
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


# --- translation to the engine ------------------------------------------------------------


@dataclass(frozen=True)
class EngineBackend:
    """A backend as `pykp._fastpath.Backend` takes it."""

    ip: str
    port: int
    weight: int = 1
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    local: bool = False


@dataclass(frozen=True)
class EngineService:
    """One engine service: what `Engine.upsert_service` takes, as plain data."""

    name: str
    frontends: tuple[tuple[str, int, str], ...]  # (ip, port, protocol)
    backends: tuple[EngineBackend, ...]
    policy: str = DEFAULT_POLICY
    affinity_timeout: float | None = None  # None: no session affinity
    hash_key: str | None = None  # None: the engine's default


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
) -> list[EngineService]:
    """One engine service per service port (kube-proxy programs each port separately).

    Frontends: every clusterIP, externalIP and loadBalancerIP at `port`, and every node
    address at `nodePort` when the port has one. Backends: every endpoint that serves the
    port, at its port (`targetPort` unless the endpoint names its own); `local` marks the
    endpoints on `node_name`. Endpoints with topology hints are narrowed to those hinted
    for this node or `zone`, exactly when kube-proxy would.

    With `traffic_policies`, a Local internalTrafficPolicy (for clusterIPs) or
    externalTrafficPolicy (for externalIPs, loadBalancerIPs and nodePorts) gives those
    frontends only this node's endpoints, none at all when the node has none (the engine
    then refuses the traffic rather than sending it off the node). When the two policies
    differ, a port becomes two engine services: `name` for the clusterIPs and
    `name#external` for the rest.
    """
    nodes = [str(ipaddress.ip_address(address)) for address in node_addresses]
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
        internal_backends = (
            local if traffic_policies and spec.internal_traffic_policy == "Local" else cluster
        )
        external_backends = (
            local if traffic_policies and spec.external_traffic_policy == "Local" else cluster
        )
        name = service_port_name(spec, port)
        groups: list[tuple[str, list[tuple[str, int, str]], tuple[EngineBackend, ...]]]
        if not internal:
            groups = [(name, external, external_backends)]
        elif not external or spec.internal_traffic_policy == spec.external_traffic_policy:
            groups = [(name, internal + external, internal_backends)]
        elif traffic_policies:
            # Split on the policies, not on whether the backend sets differ, so the
            # engine services' names stay put as endpoints come and go.
            groups = [
                (name, internal, internal_backends),
                (name + EXTERNAL_SUFFIX, external, external_backends),
            ]
        else:
            groups = [(name, internal + external, cluster)]
        for group_name, frontends, backends in groups:
            # The engine refuses a backend that no frontend's family reaches (NAT does not
            # cross families): e.g. IPv4 endpoints behind IPv6-only node addresses.
            families = {ipaddress.ip_address(address).version for address, _, _ in frontends}
            if frontends:
                backends = tuple(
                    backend
                    for backend in backends
                    if ipaddress.ip_address(backend.ip).version in families
                )
            engine_services.append(
                EngineService(
                    name=group_name,
                    # An externalIP may repeat a node address; a frontend is listed once.
                    frontends=tuple(dict.fromkeys(frontends)),
                    backends=backends,
                    policy=spec.policy,
                    affinity_timeout=affinity_timeout,
                    hash_key=spec.hash_key,
                )
            )
    return engine_services


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
    services_file: ServicesFile,
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


def apply_to_engine(engine: Engine, services: Sequence[EngineService]) -> None:
    """Make the engine's services exactly `services`: upsert each, remove the rest."""
    from pykp._fastpath import Backend, Frontend

    wanted = {service.name for service in services}
    # Remove first, so a frontend that moved to a renamed service is free when it arrives.
    for name in engine.services():
        if name not in wanted:
            engine.remove_service(name)
    for service in services:
        engine.upsert_service(
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
        )
