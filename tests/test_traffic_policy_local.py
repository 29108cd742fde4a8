"""externalTrafficPolicy / internalTrafficPolicy Local from a services file: the same engine
services as the Kubernetes source gives, kube-proxy's DROP when this node has no endpoint
(but the service has some elsewhere), and a refusal when the file cannot say which
endpoints are on this node."""

from __future__ import annotations

import textwrap
from types import ModuleType

import pytest

from pykp.agent.plan import EngineService, apply_to_engine, services_file_to_engine
from pykp.netfilter.elements import frontend_contribution
from pykp.netfilter.rules import FrontendRule
from pykp.sources.kube.translate import translate
from pykp.sources.services_file import load_services_text

NODE_ADDRESS = "192.168.0.1"

TWO_NODES = "[{ip: 10.244.1.1, nodeName: node-a}, {ip: 10.244.2.1, nodeName: node-b}]"


def services_text(etp: str, itp: str, endpoints: str = TWO_NODES) -> str:
    return f"""\
services:
  - name: ingress
    clusterIP: 10.96.2.1
    externalIPs: [192.0.2.1]
    loadBalancerIPs: [198.51.100.1]
    externalTrafficPolicy: {etp}
    internalTrafficPolicy: {itp}
    ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
    endpoints: {endpoints}
"""


def kubernetes_objects(etp: str, itp: str) -> tuple[list[object], list[object]]:
    """The same service as the Kubernetes API holds it."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ingress", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.2.1",
            "externalIPs": ["192.0.2.1"],
            "externalTrafficPolicy": etp,
            "internalTrafficPolicy": itp,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}},
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "ingress-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "ingress"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.244.1.1"], "nodeName": "node-a"},
            {"addresses": ["10.244.2.1"], "nodeName": "node-b"},
        ],
    }
    return [service], [endpoint_slice]


def from_file(
    etp: str, itp: str, node: str, endpoints: str = TWO_NODES
) -> dict[str, EngineService]:
    catalog, problems = load_services_text(services_text(etp, itp, endpoints))
    assert problems == []
    return {s.name: s for s in services_file_to_engine(catalog, [NODE_ADDRESS], node)}


def from_kubernetes(etp: str, itp: str, node: str) -> dict[str, EngineService]:
    catalog, problems = translate(*kubernetes_objects(etp, itp))
    assert problems == []
    return {s.name: s for s in services_file_to_engine(catalog, [NODE_ADDRESS], node)}


@pytest.mark.parametrize("node", ["node-a", "node-b", "node-c"])
@pytest.mark.parametrize(
    ("etp", "itp"), [("Local", "Cluster"), ("Cluster", "Local"), ("Local", "Local")]
)
def test_the_file_gives_the_engine_services_the_kubernetes_source_gives(
    etp: str, itp: str, node: str
) -> None:
    assert from_file(etp, itp, node) == from_kubernetes(etp, itp, node)


def test_external_local_sends_external_frontends_to_this_nodes_endpoints_only() -> None:
    engine = from_file("Local", "Cluster", "node-a")

    internal, external = engine["default/ingress:http"], engine["default/ingress:http#external"]
    assert internal.frontends == (("10.96.2.1", 80, "TCP"),)
    assert [b.ip for b in internal.backends] == ["10.244.1.1", "10.244.2.1"]
    assert set(external.frontends) == {
        ("192.0.2.1", 80, "TCP"),
        ("198.51.100.1", 80, "TCP"),
        (NODE_ADDRESS, 30080, "TCP"),
    }
    assert [(b.ip, b.local) for b in external.backends] == [("10.244.1.1", True)]
    assert not external.no_local_endpoints and not internal.no_local_endpoints  # empty


@pytest.mark.parametrize(
    ("etp", "itp", "short_circuit"),
    [("Local", "Cluster", "default/ingress:http"), ("Cluster", "Local", None)],
)
def test_external_local_short_circuits_the_cluster_to_the_cluster_wide_service(
    etp: str, itp: str, short_circuit: str | None
) -> None:
    """kube-proxy sends pods and the node to every endpoint through a Local service's
    external addresses: the external engine service names the port's cluster-wide one."""
    engine = from_file(etp, itp, "node-c")
    assert engine["default/ingress:http#external"].short_circuit == short_circuit
    assert engine["default/ingress:http"].short_circuit is None
    # Both policies Local: no cluster-wide service to short-circuit to.
    assert all(s.short_circuit is None for s in from_file("Local", "Local", "node-c").values())
    frontend = FrontendRule(NODE_ADDRESS, 30080, "TCP", external=True, short_circuit=True)
    key = f"{NODE_ADDRESS} . tcp . 30080"
    assert frontend_contribution([frontend], {}, [])["short_circuit4"] == {key: key}


def test_no_local_endpoint_but_some_elsewhere_is_marked_for_a_drop() -> None:
    engine = from_file("Local", "Cluster", "node-c")

    external = engine["default/ingress:http#external"]
    assert external.backends == ()
    assert external.no_local_endpoints == {4}  # kube-proxy: DROP ("has no local endpoints")
    assert not engine["default/ingress:http"].no_local_endpoints  # ClusterIP: unaffected


def test_internal_local_without_a_local_endpoint_is_marked_for_a_drop_too() -> None:
    engine = from_file("Cluster", "Local", "node-c")

    assert engine["default/ingress:http"].no_local_endpoints == {4}
    assert not engine["default/ingress:http#external"].no_local_endpoints


@pytest.mark.parametrize(
    ("endpoints", "dropped"),
    [
        ("[]", False),  # no endpoint at all: refused, as kube-proxy's REJECT
        ("[{ip: 10.244.2.1, nodeName: node-b, ready: false, serving: false}]", False),
        ("[{ip: 10.244.2.1, nodeName: node-b}]", True),
        # A local endpoint that cannot serve does not count: dropped as with none.
        (
            "[{ip: 10.244.1.1, nodeName: node-a, ready: false, serving: false}, "
            "{ip: 10.244.2.1, nodeName: node-b}]",
            True,
        ),
        # Serving while terminating is kube-proxy's fallback: it serves, nothing dropped.
        (
            "[{ip: 10.244.1.1, nodeName: node-a, ready: false, serving: true, terminating: true},"
            " {ip: 10.244.2.1, nodeName: node-b}]",
            False,
        ),
    ],
)
def test_a_drop_needs_usable_endpoints_elsewhere_and_none_here(
    endpoints: str, dropped: bool
) -> None:
    engine = from_file("Local", "Cluster", "node-a", endpoints)

    assert engine["default/ingress:http#external"].no_local_endpoints == ({4} if dropped else set())


def test_the_drop_reaches_the_rules_as_a_set_element() -> None:
    frontend = FrontendRule(
        NODE_ADDRESS, 30080, "TCP", external=True, masquerade=False, no_local_endpoints=True
    )

    elements = frontend_contribution([frontend], {}, [])

    key = f"{NODE_ADDRESS} . tcp . 30080"
    assert elements["no_local_endpoints4"] == {key: key}
    assert elements["local_frontends4"] == {key: key}
    assert "fallback4" not in elements  # no slots: the kernel path refuses, the rule drops


def test_the_engine_refuses_what_the_rules_then_drop(fastpath: ModuleType) -> None:
    catalog, _ = load_services_text(services_text("Local", "Cluster"))
    engine = fastpath.Engine(seed=1)
    apply_to_engine(engine, services_file_to_engine(catalog, [NODE_ADDRESS], "node-c"))

    to_cluster_ip = engine.decide("10.0.0.9", 40000, "10.96.2.1", 80)
    to_node_port = engine.decide("10.0.0.9", 40001, NODE_ADDRESS, 30080)
    to_lb_ip = engine.decide("10.0.0.9", 40002, "198.51.100.1", 80)

    assert to_cluster_ip.action == "forward"
    assert (to_node_port.action, to_node_port.reason) == ("reject", "no_endpoints")
    assert to_lb_ip.action == "reject"


@pytest.mark.parametrize("policy", ["externalTrafficPolicy", "internalTrafficPolicy"])
def test_local_without_any_node_name_is_refused_naming_the_service(policy: str) -> None:
    text = textwrap.dedent(
        f"""\
        services:
          - name: ingress
            namespace: shop
            clusterIP: 10.96.2.1
            {policy}: Local
            ports: [{{port: 80, nodePort: 30080}}]
            endpoints: [{{ip: 10.244.1.1}}, {{ip: 10.244.2.1}}]
          - name: other
            clusterIP: 10.96.2.2
            externalTrafficPolicy: Cluster
            ports: [{{port: 80, nodePort: 30081}}]
            endpoints: [{{ip: 10.244.1.2}}]
        """
    )

    catalog, problems = load_services_text(text, "services.yaml")

    assert [service.key for service in catalog.services] == ["default/other"]
    (problem,) = problems
    assert problem.path == f"services[0].{policy}"
    assert (problem.line, problem.column) == (5, len(policy) + 7)
    assert problem.message.startswith("shop/ingress: Local sends traffic only to endpoints")
    assert "nodeName" in problem.message


def test_local_with_some_node_names_or_no_endpoints_is_accepted() -> None:
    text = textwrap.dedent(
        """\
        services:
          - name: partly
            clusterIP: 10.96.2.1
            externalTrafficPolicy: Local
            ports: [{port: 80, nodePort: 30080}]
            endpoints: [{ip: 10.244.1.1, nodeName: node-a}, {ip: 10.244.2.1}]
          - name: empty
            clusterIP: 10.96.2.2
            externalTrafficPolicy: Local
            ports: [{port: 80, nodePort: 30081}]
        """
    )

    catalog, problems = load_services_text(text)

    assert problems == []
    assert [service.name for service in catalog.services] == ["partly", "empty"]


@pytest.mark.parametrize(
    ("endpoints", "dropped"),
    [
        # An IPv4 endpoint here, the IPv6 one elsewhere: only the IPv6 frontends drop.
        ('[{ip: 10.244.1.1, nodeName: node-a}, {ip: "fd00:244::2", nodeName: node-b}]', {6}),
        # No IPv6 endpoint anywhere: the IPv6 frontends are refused (kube-proxy runs one
        # proxier per family, and the IPv6 one has no endpoint at all).
        ("[{ip: 10.244.1.1, nodeName: node-b}]", {4}),
    ],
)
def test_the_drop_is_decided_per_address_family(endpoints: str, dropped: set[int]) -> None:
    catalog, problems = load_services_text(
        textwrap.dedent(
            f"""\
            services:
              - name: dual
                externalTrafficPolicy: Local
                ports: [{{port: 80, nodePort: 30080}}]
                endpoints: {endpoints}
            """
        )
    )
    assert problems == []

    (external,) = services_file_to_engine(catalog, [NODE_ADDRESS, "fd00:77::1"], "node-a")

    assert {_family(ip) for ip, _, _ in external.frontends} == {4, 6}
    assert external.no_local_endpoints == dropped


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4
