"""The services file: parsing, defaults, validation with locations, translation."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pykp.agent.plan import (
    EngineBackend,
    EngineService,
    service_port_name,
    service_ports_to_engine,
    services_file_to_engine,
)
from pykp.model import (
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    POLICIES,
    Catalog,
    EndpointSpec,
    Problem,
    ServicePort,
    ServiceSpec,
)
from pykp.sources.services_file import (
    ServicesFileError,
    load_bundled_example,
    load_services_file,
    load_services_text,
)

COMPLETE = """\
defaults:
  policy: round-robin
services:
  - name: web
    namespace: shop
    clusterIPs: [10.96.0.10, "fd00:96::10"]
    externalIPs: [192.0.2.10]
    loadBalancerIPs: [198.51.100.10]
    ports:
      - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
      - {name: metrics, port: 9090}
    policy: maglev
    hashKey: source-ip
    sessionAffinity: ClientIP
    sessionAffinityTimeoutSeconds: 600
    externalTrafficPolicy: Local
    internalTrafficPolicy: Local
    endpoints:
      - ip: 10.244.1.10
        ready: true
        serving: true
        terminating: false
        nodeName: node-a
        zone: z1
        weight: 3
      - {ip: "fd00:244::10", ready: false, serving: true, terminating: true, nodeName: node-b}
  - name: dns
    clusterIP: 10.96.0.53
    ports:
      - {port: 53, protocol: UDP}
"""


def load(text: str) -> tuple[Catalog, list[Problem]]:
    return load_services_text(textwrap.dedent(text), "services.yaml")


def load_clean(text: str) -> Catalog:
    services, problems = load(text)
    assert problems == []
    return services


def minimal(extra: str = "", endpoints: str = "") -> str:
    """One service with a single port; `extra` adds service fields, `endpoints` entries."""
    text = "services:\n  - name: web\n    clusterIP: 10.96.0.10\n    ports: [{port: 80}]\n"
    text += extra
    if endpoints:
        text += "    endpoints:\n" + endpoints
    return text


# --- valid files --------------------------------------------------------------------------


def test_a_complete_file_parses_into_its_dataclasses() -> None:
    services = load_clean(COMPLETE)

    assert services.default_policy == "round-robin"
    web, dns = services.services
    assert web == ServiceSpec(
        name="web",
        namespace="shop",
        cluster_ips=("10.96.0.10", "fd00:96::10"),
        external_ips=("192.0.2.10",),
        load_balancer_ips=("198.51.100.10",),
        ports=(
            ServicePort(port=80, target_port=8080, protocol="TCP", name="http", node_port=30080),
            ServicePort(port=9090, target_port=9090, protocol="TCP", name="metrics"),
        ),
        policy="maglev",
        hash_key="source-ip",
        session_affinity="ClientIP",
        session_affinity_timeout_seconds=600,
        external_traffic_policy="Local",
        internal_traffic_policy="Local",
        endpoints=(
            EndpointSpec(ip="10.244.1.10", node_name="node-a", zone="z1", weight=3),
            EndpointSpec(
                ip="fd00:244::10", ready=False, serving=True, terminating=True, node_name="node-b"
            ),
        ),
    )
    assert web.key == "shop/web"
    assert dns.key == "default/dns"
    assert (services.port_count, services.endpoint_count) == (3, 2)


def test_omitted_fields_take_kubernetes_defaults() -> None:
    (web,) = load_clean(minimal()).services

    assert web.namespace == "default"
    assert web.ports == (ServicePort(port=80, target_port=80, protocol="TCP", name=""),)
    assert web.policy == "random"
    assert web.hash_key is None
    assert web.session_affinity == "None"
    assert web.session_affinity_timeout_seconds is None
    assert web.external_traffic_policy == web.internal_traffic_policy == "Cluster"
    assert web.external_ips == web.load_balancer_ips == ()
    assert web.endpoints == ()


def test_defaults_policy_applies_unless_the_service_sets_its_own() -> None:
    services = load_clean("""\
        defaults: {policy: least-conn}
        services:
          - {name: a, clusterIP: 10.96.0.1, ports: [{port: 80}]}
          - {name: b, clusterIP: 10.96.0.2, ports: [{port: 80}], policy: maglev}
        """)

    assert [service.policy for service in services.services] == ["least-conn", "maglev"]


def test_client_ip_affinity_defaults_to_three_hours() -> None:
    (web,) = load_clean(minimal("    sessionAffinity: ClientIP\n")).services

    assert web.session_affinity_timeout_seconds == DEFAULT_AFFINITY_TIMEOUT_SECONDS == 10800


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ("", (True, True, False)),
        ("ready: false", (False, False, False)),  # serving defaults to ready
        ("ready: false, serving: true, terminating: true", (False, True, True)),
        ("ready: true, serving: false", (True, False, False)),
    ],
)
def test_endpoint_conditions_default_like_kubernetes(
    conditions: str, expected: tuple[bool, bool, bool]
) -> None:
    entry = (
        f"      - {{ip: 10.244.1.1, {conditions}}}\n"
        if conditions
        else "      - {ip: 10.244.1.1}\n"
    )
    (web,) = load_clean(minimal(endpoints=entry)).services

    (endpoint,) = web.endpoints
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == expected
    assert endpoint.weight == 1
    assert endpoint.node_name is None and endpoint.zone is None


def test_dual_stack_cluster_ips_are_normalised() -> None:
    services = load_clean("""\
        services:
          - name: dual
            clusterIPs: [10.96.0.10, "FD00:96:0:0::10"]
            ports: [{port: 80}]
            endpoints:
              - {ip: 10.244.1.1}
              - {ip: "fd00:244:0::1"}
          - name: single
            clusterIP: "fd00:96::11"
            ports: [{port: 80}]
        """)

    dual, single = services.services
    assert dual.cluster_ips == ("10.96.0.10", "fd00:96::10")
    assert [endpoint.ip for endpoint in dual.endpoints] == ["10.244.1.1", "fd00:244::1"]
    assert single.cluster_ips == ("fd00:96::11",)


def test_ipv6_addresses_that_yaml_would_read_as_numbers_stay_addresses() -> None:
    # YAML 1.1 reads 1:2:3:4:5:6:7:8 as a base-60 integer; the parser uses the raw text.
    (web,) = load_clean("""\
        services:
          - {name: web, clusterIP: 1:2:3:4:5:6:7:8, ports: [{port: 80}]}
        """).services

    assert web.cluster_ips == ("1:2:3:4:5:6:7:8",)


def test_same_name_in_another_namespace_is_a_different_service() -> None:
    services = load_clean("""\
        services:
          - {name: web, clusterIP: 10.96.0.1, ports: [{port: 80}]}
          - {name: web, namespace: other, clusterIP: 10.96.0.2, ports: [{port: 80}]}
        """)

    assert [service.key for service in services.services] == ["default/web", "other/web"]


def test_a_service_reachable_only_by_node_port_is_valid() -> None:
    (web,) = load_clean("""\
        services:
          - {name: web, ports: [{port: 80, nodePort: 30080}]}
        """).services

    assert web.cluster_ips == ()
    assert web.ports[0].node_port == 30080


def test_null_means_unset() -> None:
    (web,) = load_clean(minimal("    externalIPs:\n    policy: ~\n")).services

    assert web.external_ips == ()
    assert web.policy == "random"


def test_an_empty_file_has_no_services() -> None:
    assert load("") == (Catalog(traffic_policies=True), [])


def test_the_bundled_example_is_clean_and_covers_the_features() -> None:
    services, problems = load_bundled_example()

    assert problems == []
    assert {service.policy for service in services.services} == set(POLICIES)
    ports = [port for service in services.services for port in service.ports]
    assert any(port.protocol == "UDP" for port in ports)
    endpoints = [endpoint for service in services.services for endpoint in service.endpoints]
    assert any(endpoint.terminating for endpoint in endpoints)
    assert any(
        len(service.cluster_ips) == 2 and ":" in service.cluster_ips[1]
        for service in services.services
    )


def test_the_bundled_example_is_packaged_next_to_the_module() -> None:
    import pykp

    assert (Path(pykp.__file__).parent / "examples" / "services.yaml").is_file()


# --- validation: every problem, exactly where it is ---------------------------------------

HEAD = "services:\n  - name: web\n    clusterIP: 10.96.0.10\n"
PORT_80 = "    ports: [{port: 80}]\n"

# (text, "line:column", field path, message). Each text has one mistake.
INVALID = {
    "port out of range": (
        HEAD + "    ports:\n      - {port: 70000}\n",
        "5:16",
        "services[0].ports[0].port",
        "70000 is out of range 1..65535",
    ),
    "port zero": (
        HEAD + "    ports:\n      - port: 0\n",
        "5:15",
        "services[0].ports[0].port",
        "0 is out of range 1..65535",
    ),
    "port not a number": (
        HEAD + '    ports:\n      - port: "80"\n',
        "5:15",
        "services[0].ports[0].port",
        "expected an integer, got a string ('80')",
    ),
    "port missing": (
        HEAD + "    ports:\n      - {name: http, targetPort: 8080}\n",
        "5:9",
        "services[0].ports[0].port",
        "required field is missing",
    ),
    "targetPort out of range": (
        HEAD + "    ports:\n      - {port: 80, targetPort: 65536}\n",
        "5:32",
        "services[0].ports[0].targetPort",
        "65536 is out of range 1..65535",
    ),
    "targetPort named": (
        HEAD + "    ports:\n      - {port: 80, targetPort: http}\n",
        "5:32",
        "services[0].ports[0].targetPort",
        "expected a port number, got a string ('http') (named target ports need pods)",
    ),
    "nodePort out of range": (
        HEAD + "    ports:\n      - {port: 80, nodePort: 99999}\n",
        "5:30",
        "services[0].ports[0].nodePort",
        "99999 is out of range 1..65535",
    ),
    "protocol unknown": (
        HEAD + "    ports:\n      - {port: 80, protocol: ICMP}\n",
        "5:30",
        "services[0].ports[0].protocol",
        "'ICMP' is not one of TCP, UDP, SCTP",
    ),
    "protocol in lowercase": (
        HEAD + "    ports:\n      - {port: 80, protocol: tcp}\n",
        "5:30",
        "services[0].ports[0].protocol",
        "'tcp' is not one of TCP, UDP, SCTP",
    ),
    "port name invalid": (
        HEAD + "    ports:\n      - {name: HTTP_1, port: 80}\n",
        "5:16",
        "services[0].ports[0].name",
        "'HTTP_1' is not a valid port name (lowercase DNS-1123 label)",
    ),
    "port name missing with two ports": (
        HEAD + "    ports:\n      - {name: http, port: 80}\n      - {port: 443}\n",
        "6:9",
        "services[0].ports[1].name",
        "required when a service has more than one port",
    ),
    "port name repeated": (
        HEAD + "    ports:\n      - {name: http, port: 80}\n      - {name: http, port: 8080}\n",
        "6:16",
        "services[0].ports[1].name",
        "duplicate port name 'http'",
    ),
    "port number repeated": (
        HEAD + "    ports:\n      - {name: a, port: 80}\n      - {name: b, port: 80}\n",
        "6:25",
        "services[0].ports[1].port",
        "duplicate port 80/TCP",
    ),
    "ports empty": (
        HEAD + "    ports: []\n",
        "4:12",
        "services[0].ports",
        "a service needs at least one port",
    ),
    "ports missing": (
        HEAD + "    policy: maglev\n",
        "2:5",
        "services[0].ports",
        "required field is missing",
    ),
    "ports not a list": (
        HEAD + "    ports: {port: 80}\n",
        "4:12",
        "services[0].ports",
        "expected a list, got a mapping",
    ),
    "clusterIP invalid": (
        "services:\n  - name: web\n    clusterIP: 10.96.0.300\n" + PORT_80,
        "3:16",
        "services[0].clusterIP",
        "'10.96.0.300' is not a valid IP address",
    ),
    "clusterIP with a zone index": (
        'services:\n  - name: web\n    clusterIP: "fe80::1%eth0"\n' + PORT_80,
        "3:16",
        "services[0].clusterIP",
        "'fe80::1%eth0': a zone index (%...) is not allowed",
    ),
    "clusterIPs element invalid": (
        'services:\n  - name: web\n    clusterIPs: [10.96.0.10, "fd00::zz"]\n' + PORT_80,
        "3:30",
        "services[0].clusterIPs[1]",
        "'fd00::zz' is not a valid IP address",
    ),
    "clusterIPs of one family": (
        "services:\n  - name: web\n    clusterIPs: [10.96.0.10, 10.96.0.11]\n" + PORT_80,
        "3:17",
        "services[0].clusterIPs",
        "at most one IPv4 and one IPv6 address (dual-stack)",
    ),
    "clusterIP differs from clusterIPs": (
        "services:\n  - name: web\n    clusterIP: 10.96.0.9\n    clusterIPs: [10.96.0.10]\n"
        + PORT_80,
        "3:16",
        "services[0].clusterIP",
        "10.96.0.9 differs from clusterIPs[0] (10.96.0.10)",
    ),
    "externalIPs element invalid": (
        HEAD + "    externalIPs: [192.0.2.1, example.com]\n" + PORT_80,
        "4:30",
        "services[0].externalIPs[1]",
        "'example.com' is not a valid IP address",
    ),
    "loadBalancerIPs not a list": (
        HEAD + "    loadBalancerIPs: 198.51.100.1\n" + PORT_80,
        "4:22",
        "services[0].loadBalancerIPs",
        "expected a list, got a string ('198.51.100.1')",
    ),
    "policy unknown": (
        HEAD + "    policy: fastest\n" + PORT_80,
        "4:13",
        "services[0].policy",
        "'fastest' is not one of random, round-robin, maglev, least-conn",
    ),
    "defaults policy unknown": (
        "defaults:\n  policy: weighted\nservices: []\n",
        "2:11",
        "defaults.policy",
        "'weighted' is not one of random, round-robin, maglev, least-conn",
    ),
    "hashKey unknown": (
        HEAD + "    hashKey: dst-ip\n" + PORT_80,
        "4:14",
        "services[0].hashKey",
        "'dst-ip' is not one of 5-tuple, source-ip",
    ),
    "sessionAffinity unknown": (
        HEAD + "    sessionAffinity: Sticky\n" + PORT_80,
        "4:22",
        "services[0].sessionAffinity",
        "'Sticky' is not one of None, ClientIP",
    ),
    "affinity timeout above a day": (
        HEAD
        + "    sessionAffinity: ClientIP\n    sessionAffinityTimeoutSeconds: 86401\n"
        + PORT_80,
        "5:36",
        "services[0].sessionAffinityTimeoutSeconds",
        "86401 is out of range 1..86400",
    ),
    "affinity timeout zero": (
        HEAD + "    sessionAffinity: ClientIP\n    sessionAffinityTimeoutSeconds: 0\n" + PORT_80,
        "5:36",
        "services[0].sessionAffinityTimeoutSeconds",
        "0 is out of range 1..86400",
    ),
    "affinity timeout without affinity": (
        HEAD + "    sessionAffinityTimeoutSeconds: 60\n" + PORT_80,
        "4:36",
        "services[0].sessionAffinityTimeoutSeconds",
        "only allowed with sessionAffinity: ClientIP",
    ),
    "externalTrafficPolicy unknown": (
        HEAD + "    externalTrafficPolicy: Global\n" + PORT_80,
        "4:28",
        "services[0].externalTrafficPolicy",
        "'Global' is not one of Cluster, Local",
    ),
    "internalTrafficPolicy unknown": (
        HEAD + "    internalTrafficPolicy: local\n" + PORT_80,
        "4:28",
        "services[0].internalTrafficPolicy",
        "'local' is not one of Cluster, Local",
    ),
    "name missing": (
        "services:\n  - clusterIP: 10.96.0.10\n" + PORT_80,
        "2:5",
        "services[0].name",
        "required field is missing",
    ),
    "name invalid": (
        "services:\n  - name: Web_1\n    clusterIP: 10.96.0.10\n" + PORT_80,
        "2:11",
        "services[0].name",
        "'Web_1' is not a valid service name (lowercase DNS-1035 label)",
    ),
    "namespace invalid": (
        HEAD + "    namespace: kube_system\n" + PORT_80,
        "4:16",
        "services[0].namespace",
        "'kube_system' is not a valid namespace (lowercase DNS-1123 label)",
    ),
    "unknown field": (
        HEAD + "    sessionAfinity: ClientIP\n" + PORT_80,
        "4:5",
        "services[0].sessionAfinity",
        "unknown field; did you mean 'sessionAffinity'?",
    ),
    "field repeated": (
        HEAD + PORT_80 + "    ports: [{port: 81}]\n",
        "5:5",
        "services[0].ports",
        "duplicate field",
    ),
    "no address at all": (
        "services:\n  - name: web\n" + PORT_80,
        "2:5",
        "services[0]",
        "nothing to reach: set clusterIPs, externalIPs, loadBalancerIPs or a nodePort",
    ),
    "service not a mapping": (
        "services:\n  - web\n",
        "2:5",
        "services[0]",
        "expected a mapping, got a string ('web')",
    ),
    "services not a list": (
        "services:\n  web: {}\n",
        "2:3",
        "services",
        "expected a list, got a mapping",
    ),
    "services missing": (
        "defaults: {policy: maglev}\n",
        "1:1",
        "services",
        "required field is missing",
    ),
    "top-level unknown field": (
        "kind: ServiceList\nservices: []\n",
        "1:1",
        "kind",
        "unknown field",
    ),
    "service repeated": (
        HEAD + PORT_80 + "  - name: web\n    clusterIP: 10.96.0.11\n" + PORT_80,
        "5:11",
        "services[1].name",
        "duplicate service default/web (first defined at line 2)",
    ),
    "frontend of another service": (
        HEAD + PORT_80 + "  - name: web2\n    externalIPs: [10.96.0.10]\n" + PORT_80,
        "7:13",
        "services[1].ports[0]",
        "10.96.0.10:80/TCP is already used by default/web",
    ),
    "nodePort of another service": (
        HEAD
        + "    ports: [{port: 80, nodePort: 30080}]\n"
        + "  - name: web2\n    clusterIP: 10.96.0.11\n"
        + "    ports: [{port: 80, nodePort: 30080}]\n",
        "7:13",
        "services[1].ports[0]",
        "nodePort 30080/TCP is already used by default/web",
    ),
    "endpoint ip invalid": (
        HEAD + PORT_80 + "    endpoints:\n      - {ip: 10.244.1.256}\n",
        "6:14",
        "services[0].endpoints[0].ip",
        "'10.244.1.256' is not a valid IP address",
    ),
    "endpoint ip missing": (
        HEAD + PORT_80 + "    endpoints:\n      - {ready: true}\n",
        "6:9",
        "services[0].endpoints[0].ip",
        "required field is missing",
    ),
    "endpoint weight zero": (
        HEAD + PORT_80 + "    endpoints:\n      - {ip: 10.244.1.1, weight: 0}\n",
        "6:34",
        "services[0].endpoints[0].weight",
        "0 is out of range 1..65535",
    ),
    "endpoint weight too big": (
        HEAD + PORT_80 + "    endpoints:\n      - {ip: 10.244.1.1, weight: 65536}\n",
        "6:34",
        "services[0].endpoints[0].weight",
        "65536 is out of range 1..65535",
    ),
    "endpoint ready not a boolean": (
        HEAD + PORT_80 + '    endpoints:\n      - {ip: 10.244.1.1, ready: "true"}\n',
        "6:33",
        "services[0].endpoints[0].ready",
        "expected true or false, got a string ('true')",
    ),
    "endpoint repeated": (
        HEAD + PORT_80 + "    endpoints:\n      - {ip: 10.244.1.1}\n      - {ip: 10.244.1.1}\n",
        "7:14",
        "services[0].endpoints[1].ip",
        "duplicate endpoint 10.244.1.1",
    ),
    "endpoint unknown field": (
        HEAD + PORT_80 + "    endpoints:\n      - {ip: 10.244.1.1, hostname: a}\n",
        "6:26",
        "services[0].endpoints[0].hostname",
        "unknown field",
    ),
    "endpoint nodeName not a string": (
        HEAD + PORT_80 + "    endpoints:\n      - {ip: 10.244.1.1, nodeName: [a]}\n",
        "6:36",
        "services[0].endpoints[0].nodeName",
        "expected a string, got a list",
    ),
}


@pytest.mark.parametrize(("text", "location", "path", "message"), INVALID.values(), ids=INVALID)
def test_each_problem_is_reported_with_its_location(
    text: str, location: str, path: str, message: str
) -> None:
    _, problems = load_services_text(text, "services.yaml")

    assert [str(problem) for problem in problems] == [
        f"services.yaml:{location}: {path}: {message}"
    ]


def test_problem_reads_file_line_column_path_message() -> None:
    problem = Problem(
        "services.yaml", 12, 7, "services[1].ports[0].port", "70000 is out of range 1..65535"
    )

    assert (
        str(problem)
        == "services.yaml:12:7: services[1].ports[0].port: 70000 is out of range 1..65535"
    )


def test_an_invalid_service_is_skipped_and_the_rest_loads() -> None:
    services, problems = load("""\
        services:
          - {name: first, clusterIP: 10.96.0.1, ports: [{port: 80}]}
          - name: broken
            clusterIP: 10.96.0.2
            ports:
              - {name: http, port: 80}
              - {name: https, port: 70000}
          - {name: last, clusterIP: 10.96.0.3, ports: [{port: 80}]}
        """)

    assert [service.name for service in services.services] == ["first", "last"]
    assert [(problem.line, problem.column, problem.path) for problem in problems] == [
        (7, 29, "services[1].ports[1].port")
    ]


def test_an_invalid_endpoint_is_skipped_and_its_service_loads() -> None:
    endpoints = "      - {ip: 10.244.1.1}\n      - {ip: 10.244.1.999}\n      - {ip: 10.244.1.3}\n"
    services, problems = load(minimal(endpoints=endpoints))

    (web,) = services.services
    assert [endpoint.ip for endpoint in web.endpoints] == ["10.244.1.1", "10.244.1.3"]
    assert [problem.path for problem in problems] == ["services[0].endpoints[1].ip"]


def test_every_problem_of_an_entry_is_reported_in_one_pass() -> None:
    _, problems = load("""\
        services:
          - name: web
            clusterIP: 10.96.0.999
            policy: fastest
            ports: [{port: 0, protocol: ICMP}]
            endpoints: [{ip: nope}]
        """)

    assert [(problem.line, problem.path) for problem in problems] == [
        (3, "services[0].clusterIP"),
        (4, "services[0].policy"),
        (5, "services[0].ports[0].port"),
        (5, "services[0].ports[0].protocol"),
        (6, "services[0].endpoints[0].ip"),
    ]


def test_a_file_loaded_from_disk_names_itself_in_problems(
    write_services: Callable[[str], Path],
) -> None:
    path = write_services("""\
        services:
          - {name: web, clusterIP: 10.96.0.10, ports: [{port: 70000}]}
        """)

    services, problems = load_services_file(path)

    assert services.services == ()
    assert [str(problem) for problem in problems] == [
        f"{path}:2:55: services[0].ports[0].port: 70000 is out of range 1..65535"
    ]


# --- fatal errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("services:\n  - name: web\n   ports: [\n", 3, 4, "invalid YAML"),
        ("services: [a, b\n", 2, 1, "invalid YAML"),
        ("services: []\n---\nservices: []\n", 2, 1, "invalid YAML"),
        ("- name: web\n", 1, 1, "the top level must be a mapping, not a list"),
        ("just text\n", 1, 1, "the top level must be a mapping, not a scalar"),
    ],
    ids=["bad indentation", "unclosed list", "two documents", "a list", "a scalar"],
)
def test_a_file_that_cannot_be_read_is_fatal_with_its_location(
    text: str, line: int, column: int, message: str
) -> None:
    with pytest.raises(ServicesFileError) as raised:
        load_services_text(text, "services.yaml")

    error = raised.value
    assert (error.source, error.line, error.column) == ("services.yaml", line, column)
    assert message in error.message
    assert str(error).startswith(f"services.yaml:{line}:{column}: ")


def test_a_file_that_is_not_utf8_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_bytes(b"services: [\xff]\n")

    with pytest.raises(ServicesFileError, match="not UTF-8"):
        load_services_file(path)


# --- translation to engine services -------------------------------------------------------


def test_one_engine_service_per_port_named_like_kube_proxy() -> None:
    (web, dns) = load_clean(COMPLETE).services

    assert [engine_service.name for engine_service in service_ports_to_engine(web, [])] == [
        "shop/web:http",
        "shop/web:metrics",
    ]
    assert [engine_service.name for engine_service in service_ports_to_engine(dns, [])] == [
        "default/dns"
    ]
    assert service_port_name(dns, dns.ports[0]) == "default/dns"


def test_frontends_are_every_service_address_and_node_addresses_at_the_node_port() -> None:
    (web, _) = load_clean(COMPLETE).services

    http, metrics = service_ports_to_engine(web, ["192.168.0.1", "FD00::1"])

    assert http.frontends == (
        ("10.96.0.10", 80, "TCP"),
        ("fd00:96::10", 80, "TCP"),
        ("192.0.2.10", 80, "TCP"),
        ("198.51.100.10", 80, "TCP"),
        ("192.168.0.1", 30080, "TCP"),
        ("fd00::1", 30080, "TCP"),
    )
    # No nodePort on this port: the node addresses are not frontends.
    assert metrics.frontends == (
        ("10.96.0.10", 9090, "TCP"),
        ("fd00:96::10", 9090, "TCP"),
        ("192.0.2.10", 9090, "TCP"),
        ("198.51.100.10", 9090, "TCP"),
    )


def test_a_frontend_listed_twice_is_kept_once() -> None:
    (web,) = load_clean("""\
        services:
          - name: web
            externalIPs: [192.168.0.1]
            ports: [{port: 30080, nodePort: 30080}]
        """).services

    (engine_service,) = service_ports_to_engine(web, ["192.168.0.1"])

    assert engine_service.frontends == (("192.168.0.1", 30080, "TCP"),)


def test_backends_are_endpoints_at_the_target_port_with_conditions_and_locality() -> None:
    (web, _) = load_clean(COMPLETE).services

    http, metrics = service_ports_to_engine(web, [], node_name="node-b")

    assert http.backends == (
        EngineBackend(ip="10.244.1.10", port=8080, weight=3, local=False),
        EngineBackend(
            ip="fd00:244::10", port=8080, ready=False, serving=True, terminating=True, local=True
        ),
    )
    assert [backend.port for backend in metrics.backends] == [9090, 9090]


def test_without_a_node_name_no_backend_is_local() -> None:
    (web, _) = load_clean(COMPLETE).services

    http, _ = service_ports_to_engine(web, [])

    assert not any(backend.local for backend in http.backends)


def test_policy_affinity_and_hash_key_carry_over() -> None:
    (web, dns) = load_clean(COMPLETE).services

    http, _ = service_ports_to_engine(web, [])
    (dns_port,) = service_ports_to_engine(dns, [])

    assert (http.policy, http.affinity_timeout, http.hash_key) == ("maglev", 600.0, "source-ip")
    assert (dns_port.policy, dns_port.affinity_timeout, dns_port.hash_key) == (
        "round-robin",
        None,
        None,
    )
    assert dns_port == EngineService(
        name="default/dns",
        frontends=(("10.96.0.53", 53, "UDP"),),
        backends=(),
        policy="round-robin",
    )


def test_a_whole_file_translates_in_order() -> None:
    names = [
        engine_service.name for engine_service in services_file_to_engine(load_clean(COMPLETE))
    ]

    assert names == ["shop/web:http", "shop/web:metrics", "default/dns"]


def test_the_loader_default_policy_applies_only_where_the_file_names_none() -> None:
    """`pykp lb` loads with Maglev as the default: a service's own policy, then the file's
    `defaults`, then the loader's."""
    one = "services:\n  - {name: a, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
    own = (
        "services:\n  - {name: a, clusterIP: 10.96.0.1, policy: least-conn, ports: [{port: 80}]}\n"
    )
    file_default = "defaults: {policy: round-robin}\n" + one

    def policy(text: str, default: str) -> str:
        catalog, problems = load_services_text(text, "s.yaml", default_policy=default)
        assert problems == []
        return catalog.services[0].policy

    assert policy(one, "maglev") == "maglev"
    assert policy(one, "random") == "random"
    assert policy(file_default, "maglev") == "round-robin"
    assert policy(own, "maglev") == "least-conn"
    with pytest.raises(ValueError, match="is not one of"):
        load_services_text(one, default_policy="fastest")
