"""Kubernetes objects to services: the translation, from real Service/EndpointSlice YAML."""

from __future__ import annotations

import random
import socket
import textwrap
from types import ModuleType
from typing import Any

import pytest
import yaml

from pykp.agent.plan import (
    EngineBackend,
    EngineService,
    apply_to_engine,
    service_ports_to_engine,
    services_file_to_engine,
)
from pykp.model import Catalog, EndpointPort, EndpointSpec, ServicePort, ServiceSpec
from pykp.sources.kube.translate import (
    KubeProblem,
    ParsedSlice,
    parse_node,
    service_endpoints,
    translate,
)


def docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(textwrap.dedent(text)) if doc is not None]


def run(text: str, node: str | None = None) -> tuple[Catalog, list[KubeProblem]]:
    """Translate a YAML stream of Services, EndpointSlices and at most one Node."""
    objects = docs(text)
    services = [obj for obj in objects if obj["kind"] == "Service"]
    slices = [obj for obj in objects if obj["kind"] == "EndpointSlice"]
    nodes = [obj for obj in objects if obj["kind"] == "Node"]
    return translate(services, slices, nodes[0] if nodes else None)


def clean(text: str) -> Catalog:
    services_file, problems = run(text)
    assert problems == []
    return services_file


def by_name(services: list[EngineService]) -> dict[str, EngineService]:
    return {service.name: service for service in services}


WEB = """\
    apiVersion: v1
    kind: Service
    metadata:
      name: web
      namespace: shop
      creationTimestamp: "2024-05-01T10:00:00Z"
    spec:
      type: ClusterIP
      clusterIP: 10.96.0.10
      clusterIPs: [10.96.0.10, "fd00:96::10"]
      ipFamilies: [IPv4, IPv6]
      ipFamilyPolicy: PreferDualStack
      selector: {app: web}
      ports:
        - {name: http, port: 80, targetPort: http, protocol: TCP}
        - {name: metrics, port: 9090, targetPort: 9100, protocol: TCP}
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: web-v4-abcde
      namespace: shop
      labels:
        kubernetes.io/service-name: web
        endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    addressType: IPv4
    ports:
      - {name: http, port: 8080, protocol: TCP}
      - {name: metrics, port: 9100, protocol: TCP}
    endpoints:
      - addresses: [10.244.1.10]
        conditions: {ready: true, serving: true, terminating: false}
        nodeName: node-a
        zone: zone-a
      - addresses: [10.244.2.10]
        conditions: {ready: false, serving: true, terminating: true}
        nodeName: node-b
        zone: zone-b
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: web-v6-fghij
      namespace: shop
      labels: {kubernetes.io/service-name: web}
    addressType: IPv6
    ports:
      - {name: http, port: 8080, protocol: TCP}
    endpoints:
      - addresses: ["fd00:244::10"]
        nodeName: node-a
    """


# --- services -----------------------------------------------------------------------------


def test_a_dual_stack_cluster_ip_service_with_its_slices() -> None:
    (web,) = clean(WEB).services

    assert web.key == "shop/web"
    assert web.cluster_ips == ("10.96.0.10", "fd00:96::10")
    assert web.ports == (
        ServicePort(port=80, target_port=80, protocol="TCP", name="http"),
        ServicePort(port=9090, target_port=9100, protocol="TCP", name="metrics"),
    )
    http_and_metrics = (
        EndpointPort("http", 8080, "TCP"),
        EndpointPort("metrics", 9100, "TCP"),
    )
    assert web.endpoints == (
        EndpointSpec(ip="10.244.1.10", node_name="node-a", zone="zone-a", ports=http_and_metrics),
        EndpointSpec(
            ip="10.244.2.10",
            ready=False,
            serving=True,
            terminating=True,
            node_name="node-b",
            zone="zone-b",
            ports=http_and_metrics,
        ),
        EndpointSpec(
            ip="fd00:244::10", node_name="node-a", ports=(EndpointPort("http", 8080, "TCP"),)
        ),
    )


def test_engine_services_take_backend_ports_from_the_slices() -> None:
    services_file = clean(WEB)

    engine = by_name(services_file_to_engine(services_file, ["192.168.0.5"], "node-a"))

    http, metrics = engine["shop/web:http"], engine["shop/web:metrics"]
    assert http.frontends == (("10.96.0.10", 80, "TCP"), ("fd00:96::10", 80, "TCP"))
    assert [(b.ip, b.port, b.local) for b in http.backends] == [
        ("10.244.1.10", 8080, True),
        ("10.244.2.10", 8080, False),
        ("fd00:244::10", 8080, True),
    ]
    # The IPv6 slice has no metrics port: that endpoint does not serve it.
    assert [(b.ip, b.port) for b in metrics.backends] == [
        ("10.244.1.10", 9100),
        ("10.244.2.10", 9100),
    ]


def test_node_port_load_balancer_and_external_ips() -> None:
    services_file = clean("""\
        apiVersion: v1
        kind: Service
        metadata: {name: edge, namespace: default}
        spec:
          type: LoadBalancer
          clusterIP: 10.96.0.20
          clusterIPs: [10.96.0.20]
          externalIPs: [192.0.2.20]
          ports:
            - {name: https, port: 443, targetPort: 8443, nodePort: 30443, protocol: TCP}
        status:
          loadBalancer:
            ingress:
              - ip: 198.51.100.20
              - hostname: lb.example.com
              - {ip: 198.51.100.21, ipMode: Proxy}
              - {ip: 198.51.100.22, ipMode: VIP}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: np, namespace: default}
        spec:
          type: NodePort
          clusterIP: 10.96.0.21
          ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: plain, namespace: default}
        spec:
          type: ClusterIP
          clusterIP: 10.96.0.22
          ports: [{port: 80, nodePort: 30099}]
          status: {}
        """)

    edge, np, plain = services_file.services
    assert edge.external_ips == ("192.0.2.20",)
    # Hostname-only ingress has no address; ipMode Proxy means the LB proxies to nodes.
    assert edge.load_balancer_ips == ("198.51.100.20", "198.51.100.22")
    assert edge.ports[0].node_port == 30443
    assert np.ports == (ServicePort(port=80, target_port=8080, name="", node_port=30080),)
    # A nodePort on a ClusterIP service is not a thing: ignored.
    assert plain.ports[0].node_port is None

    (engine_service,) = service_ports_to_engine(edge, ["192.168.0.5"])
    assert engine_service.name == "default/edge:https"
    assert engine_service.frontends == (
        ("10.96.0.20", 443, "TCP"),
        ("192.0.2.20", 443, "TCP"),
        ("198.51.100.20", 443, "TCP"),
        ("198.51.100.22", 443, "TCP"),
        ("192.168.0.5", 30443, "TCP"),
    )


def test_services_kube_proxy_skips_are_skipped_silently() -> None:
    services_file, problems = run("""\
        apiVersion: v1
        kind: Service
        metadata: {name: alias, namespace: default}
        spec: {type: ExternalName, externalName: db.example.com}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: headless, namespace: default}
        spec:
          clusterIP: None
          clusterIPs: [None]
          ports: [{port: 80}]
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: other-proxy
          namespace: default
          labels: {service.kubernetes.io/service-proxy-name: someone-else}
        spec:
          clusterIP: 10.96.0.30
          ports: [{port: 80}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: kept, namespace: default}
        spec:
          clusterIP: 10.96.0.31
          ports: [{port: 80}]
        """)

    assert problems == []
    assert [service.name for service in services_file.services] == ["kept"]


@pytest.mark.parametrize("value", ["", "true", "anything"])
def test_a_service_labelled_headless_is_not_proxied_whatever_its_cluster_ip(value: str) -> None:
    """kube-proxy's label selector leaves out `service.kubernetes.io/headless` (any value)
    as it does service-proxy-name: such a Service has no frontend, its slices no backend."""
    text = f"""\
        apiVersion: v1
        kind: Service
        metadata:
          name: marked
          namespace: default
          labels: {{service.kubernetes.io/headless: "{value}"}}
        spec:
          clusterIP: 10.96.0.32
          ports: [{{port: 80}}]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: marked-abc
          namespace: default
          labels: {{kubernetes.io/service-name: marked, service.kubernetes.io/headless: "{value}"}}
        addressType: IPv4
        ports: [{{name: "", port: 80, protocol: TCP}}]
        endpoints: [{{addresses: [10.244.1.5]}}]
        """
    services_file, problems = run(text)
    assert problems == []
    assert services_file.services == ()

    # The label removed: an ordinary ClusterIP service again.
    unlabelled = text.replace(f'service.kubernetes.io/headless: "{value}"', 'app: "marked"')
    (service,) = clean(unlabelled).services
    assert (service.name, service.cluster_ips) == ("marked", ("10.96.0.32",))
    assert [endpoint.ip for endpoint in service.endpoints] == ["10.244.1.5"]


def test_session_affinity_client_ip_with_its_timeout() -> None:
    services_file = clean("""\
        apiVersion: v1
        kind: Service
        metadata: {name: sticky, namespace: default}
        spec:
          clusterIP: 10.96.0.40
          ports: [{port: 80}]
          sessionAffinity: ClientIP
          sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: sticky-default, namespace: default}
        spec:
          clusterIP: 10.96.0.41
          ports: [{port: 80}]
          sessionAffinity: ClientIP
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: loose, namespace: default}
        spec:
          clusterIP: 10.96.0.42
          ports: [{port: 80}]
          sessionAffinity: None
        """)

    loose, sticky, sticky_default = services_file.services
    assert (sticky.session_affinity, sticky.session_affinity_timeout_seconds) == ("ClientIP", 600)
    assert sticky_default.session_affinity_timeout_seconds == 10800  # Kubernetes' default
    assert (loose.session_affinity, loose.session_affinity_timeout_seconds) == ("None", None)
    (engine_service,) = service_ports_to_engine(sticky, [])
    assert engine_service.affinity_timeout == 600.0


def test_the_policy_annotation_and_an_invalid_one() -> None:
    services_file, problems = run("""\
        apiVersion: v1
        kind: Service
        metadata:
          name: hashed
          namespace: default
          annotations: {pykp.io/lb-policy: maglev, pykp.io/hash-key: source-ip}
        spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: typo
          namespace: default
          annotations: {pykp.io/lb-policy: fastest}
        spec: {clusterIP: 10.96.0.51, ports: [{port: 80}]}
        """)

    hashed, typo = services_file.services
    assert (hashed.policy, hashed.hash_key) == ("maglev", "source-ip")
    assert typo.policy == "random"  # still programmed, with the default policy
    assert problems == [
        KubeProblem.about(
            "Service",
            "default",
            "typo",
            "annotation pykp.io/lb-policy: 'fastest' is not one of"
            " random, round-robin, maglev, least-conn; using random",
        )
    ]


# --- endpoints ----------------------------------------------------------------------------

SVC_80 = """\
    apiVersion: v1
    kind: Service
    metadata: {name: app, namespace: default}
    spec:
      clusterIP: 10.96.1.1
      ports: [{name: http, port: 80, targetPort: http}]
    """


def slice_doc(name: str, body: str, service: str = "app") -> str:
    return (
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        f"metadata: {{name: {name}, namespace: default,"
        f" labels: {{kubernetes.io/service-name: {service}}}}}\n" + textwrap.dedent(body)
    )


def test_slices_merge_and_deduplicate_by_address_and_port() -> None:
    text = textwrap.dedent(SVC_80) + slice_doc(
        "app-1",
        """\
        addressType: IPv4
        ports: [{name: http, port: 8080, protocol: TCP}]
        endpoints:
          - addresses: [10.244.0.1]
          - addresses: [10.244.0.2]
        """,
    )
    text += slice_doc(
        "app-2",
        """\
        addressType: IPv4
        ports: [{name: http, port: 8080, protocol: TCP}]
        endpoints:
          - addresses: [10.244.0.2]   # moving between slices: counted once
            conditions: {ready: false}
          - addresses: [10.244.0.3]
        """,
    )
    text += slice_doc(  # pods where the named port resolves to another number
        "app-3",
        """\
        addressType: IPv4
        ports: [{name: http, port: 9090, protocol: TCP}]
        endpoints:
          - addresses: [10.244.0.3]
        """,
    )
    text += slice_doc(
        "other-1",
        """\
        addressType: IPv4
        ports: [{name: http, port: 8080}]
        endpoints: [{addresses: [10.244.9.9]}]
        """,
        service="other",
    )

    (app,) = clean(text).services
    (http,) = service_ports_to_engine(app, [])

    assert [(b.ip, b.port, b.ready) for b in http.backends] == [
        ("10.244.0.1", 8080, True),
        ("10.244.0.2", 8080, True),  # the first slice by name wins
        ("10.244.0.3", 8080, True),
        ("10.244.0.3", 9090, True),
    ]


def test_a_lone_slice_merges_as_any_other() -> None:
    """A Service's lone slice is taken whole when nothing in it would merge differently
    (the common case, a shortcut): over random slices (ports that do or do not match,
    repeated names, addresses repeated, out of order, of the other family), the result
    equals the full merge's, forced by an empty second slice."""
    rng = random.Random(7)
    service = ServiceSpec(
        name="app",
        cluster_ips=("10.96.0.1",),
        ports=(ServicePort(name="http", port=80, target_port=8080),),
    )
    choices = [
        EndpointPort("http", 8080),
        EndpointPort("http", 9090),
        EndpointPort("metrics", 9100),
        EndpointPort("http", 8080, "UDP"),
    ]
    shortcuts = 0
    for _ in range(600):
        family = rng.choice((4, 4, 4, 6))
        ports = tuple(rng.sample(choices, rng.randint(0, 3)))
        addresses = [
            f"10.244.0.{rng.randint(1, 9)}" if family == 4 else f"fd00::{rng.randint(1, 9)}"
            for _ in range(rng.randint(0, 4))
        ]
        if rng.random() < 0.5:
            addresses.sort(
                key=lambda a: socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
            )
        endpoints = tuple(
            EndpointSpec(
                a, ready=rng.random() < 0.8, ports=ports if rng.random() < 0.9 else ports[:1]
            )
            for a in addresses
        )
        lone = ParsedSlice("default/app", family, ports, endpoints)
        empty = ParsedSlice("default/app", family, ports, ())
        alone = service_endpoints(service, {"app-1": lone})
        merged = service_endpoints(service, {"app-1": lone, "app-2": empty})
        assert alone == merged, (lone, alone, merged)
        shortcuts += alone is lone.endpoints and bool(endpoints)
    assert shortcuts > 10  # the shortcut was taken, not only the merge


def test_missing_conditions_take_the_api_defaults() -> None:
    text = textwrap.dedent(SVC_80) + slice_doc(
        "app-1",
        """\
        addressType: IPv4
        ports: [{name: http, port: 8080}]
        endpoints:
          - addresses: [10.244.0.1]
          - addresses: [10.244.0.2]
            conditions: {ready: false}
          - addresses: [10.244.0.3]
            conditions: {ready: false, serving: true, terminating: true}
          - addresses: [10.244.0.4]
            conditions: {serving: false, terminating: true}
        """,
    )

    (app,) = clean(text).services

    assert [(e.ready, e.serving, e.terminating) for e in app.endpoints] == [
        (True, True, False),  # nothing said: ready, serving, not terminating
        (False, False, False),  # serving defers to ready
        (False, True, True),
        (True, False, True),
    ]


def test_ports_match_by_name_and_protocol() -> None:
    services_file = clean("""\
        apiVersion: v1
        kind: Service
        metadata: {name: dns, namespace: kube-system}
        spec:
          clusterIP: 10.96.0.10
          ports:
            - {name: dns, port: 53, protocol: UDP}
            - {name: dns-tcp, port: 53, protocol: TCP}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: dns-1
          namespace: kube-system
          labels: {kubernetes.io/service-name: dns}
        addressType: IPv4
        ports:
          - {name: dns, port: 5353, protocol: UDP}
          - {name: dns-tcp, port: 5354, protocol: TCP}
          - {name: dns, port: 9999, protocol: TCP}   # no such service port: ignored
        endpoints: [{addresses: [10.244.0.53]}]
        """)

    engine = by_name(services_file_to_engine(services_file))

    assert engine["kube-system/dns:dns"].frontends == (("10.96.0.10", 53, "UDP"),)
    assert [(b.ip, b.port) for b in engine["kube-system/dns:dns"].backends] == [
        ("10.244.0.53", 5353)
    ]
    assert [(b.ip, b.port) for b in engine["kube-system/dns:dns-tcp"].backends] == [
        ("10.244.0.53", 5354)
    ]


def test_slices_of_another_family_or_fqdn_are_left_out() -> None:
    text = textwrap.dedent(SVC_80) + slice_doc(
        "app-v6",
        """\
        addressType: IPv6
        ports: [{name: http, port: 8080}]
        endpoints: [{addresses: ["fd00::1"]}]
        """,
    )
    text += slice_doc(
        "app-fqdn",
        """\
        addressType: FQDN
        ports: [{name: http, port: 8080}]
        endpoints: [{addresses: [db.example.com]}]
        """,
    )

    (app,) = clean(text).services

    assert app.endpoints == ()


# --- traffic policies and topology --------------------------------------------------------

LOCAL = """\
    apiVersion: v1
    kind: Service
    metadata: {{name: ingress, namespace: default}}
    spec:
      type: NodePort
      clusterIP: 10.96.2.1
      externalIPs: [192.0.2.1]
      externalTrafficPolicy: {etp}
      internalTrafficPolicy: {itp}
      ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: ingress-1
      namespace: default
      labels: {{kubernetes.io/service-name: ingress}}
    addressType: IPv4
    ports: [{{name: http, port: 8080}}]
    endpoints:
      - {{addresses: [10.244.1.1], nodeName: node-a}}
      - {{addresses: [10.244.2.1], nodeName: node-b}}
    """


def engine_for(etp: str, itp: str, node: str) -> dict[str, EngineService]:
    services_file = clean(LOCAL.format(etp=etp, itp=itp))
    return by_name(services_file_to_engine(services_file, ["192.168.0.1"], node))


def test_external_traffic_policy_local_gives_external_frontends_only_local_endpoints() -> None:
    engine = engine_for("Local", "Cluster", "node-a")

    assert set(engine) == {"default/ingress:http", "default/ingress:http#external"}
    internal, external = engine["default/ingress:http"], engine["default/ingress:http#external"]
    assert internal.frontends == (("10.96.2.1", 80, "TCP"),)
    assert [b.ip for b in internal.backends] == ["10.244.1.1", "10.244.2.1"]
    assert external.frontends == (("192.0.2.1", 80, "TCP"), ("192.168.0.1", 30080, "TCP"))
    assert [b.ip for b in external.backends] == ["10.244.1.1"]


def test_local_policy_without_a_local_endpoint_leaves_no_backend() -> None:
    engine = engine_for("Local", "Cluster", "node-c")

    assert engine["default/ingress:http#external"].backends == ()
    assert len(engine["default/ingress:http"].backends) == 2


def test_internal_traffic_policy_local_and_both_local() -> None:
    internal_only = engine_for("Cluster", "Local", "node-b")
    both = engine_for("Local", "Local", "node-b")

    assert [b.ip for b in internal_only["default/ingress:http"].backends] == ["10.244.2.1"]
    assert [b.ip for b in internal_only["default/ingress:http#external"].backends] == [
        "10.244.1.1",
        "10.244.2.1",
    ]
    # Same policy for every frontend: one engine service.
    (only,) = both.values()
    assert only.name == "default/ingress:http"
    assert [b.ip for b in only.backends] == ["10.244.2.1"]


def test_local_policy_is_enforced_by_the_engine(fastpath: ModuleType) -> None:
    engine = fastpath.Engine(seed=1)
    services_file = clean(LOCAL.format(etp="Local", itp="Cluster"))
    apply_to_engine(engine, services_file_to_engine(services_file, ["192.168.0.1"], "node-c"))

    to_cluster_ip = engine.decide("10.0.0.9", 40000, "10.96.2.1", 80)
    to_node_port = engine.decide("10.0.0.9", 40001, "192.168.0.1", 30080)

    assert to_cluster_ip.action == "forward"
    assert to_node_port.action == "reject"  # no endpoint on this node: never sent elsewhere


TOPOLOGY = """\
    apiVersion: v1
    kind: Node
    metadata:
      name: node-a
      labels: {{topology.kubernetes.io/zone: {zone}, kubernetes.io/hostname: node-a}}
    status:
      addresses:
        - {{type: InternalIP, address: 192.168.0.1}}
        - {{type: Hostname, address: node-a}}
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: api
      namespace: default
      annotations: {{service.kubernetes.io/topology-mode: Auto}}
    spec:
      clusterIP: 10.96.3.1
      ports: [{{port: 80, targetPort: 8080}}]
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: api-1
      namespace: default
      labels: {{kubernetes.io/service-name: api}}
    addressType: IPv4
    ports: [{{name: "", port: 8080, protocol: TCP}}]
    endpoints:
      - addresses: [10.244.1.1]
        zone: zone-a
        hints: {{forZones: [{{name: zone-a}}]}}
      - addresses: [10.244.2.1]
        zone: zone-b
        hints: {{forZones: [{{name: zone-b}}]}}
      - addresses: [10.244.3.1]
        zone: zone-c
        {third_hint}
    """


def topology_backends(zone: str, third_hint: str) -> list[str]:
    services_file = clean(TOPOLOGY.format(zone=zone, third_hint=third_hint))
    (service,) = services_file_to_engine(services_file, [], "node-a")
    return [backend.ip for backend in service.backends]


def test_topology_hints_narrow_endpoints_to_the_nodes_zone() -> None:
    assert topology_backends("zone-a", "hints: {forZones: [{name: zone-b}]}") == ["10.244.1.1"]
    assert topology_backends("zone-b", "hints: {forZones: [{name: zone-b}]}") == [
        "10.244.2.1",
        "10.244.3.1",
    ]


def test_topology_hints_are_ignored_unless_kube_proxy_would_use_them() -> None:
    every = ["10.244.1.1", "10.244.2.1", "10.244.3.1"]
    # An endpoint without a hint: hints are not used at all.
    assert topology_backends("zone-a", "") == every
    # No endpoint hinted for this node's zone.
    assert topology_backends("zone-z", "hints: {forZones: [{name: zone-b}]}") == every


def test_the_node_gives_its_zone_and_addresses() -> None:
    (node_doc, *_) = docs(TOPOLOGY.format(zone="zone-a", third_hint=""))

    node, problems = parse_node(node_doc)

    assert problems == []
    assert node is not None
    assert (node.name, node.zone, node.addresses) == ("node-a", "zone-a", ("192.168.0.1",))


# --- invalid objects ----------------------------------------------------------------------


def test_invalid_objects_are_rejected_alone_with_a_problem_naming_them() -> None:
    text = """\
        apiVersion: v1
        kind: Service
        metadata: {name: bad-ip, namespace: default}
        spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: bad-port, namespace: default}
        spec: {clusterIP: 10.96.0.61, ports: [{port: 70000}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: bad-protocol, namespace: default}
        spec: {clusterIP: 10.96.0.62, ports: [{port: 80, protocol: QUIC}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: bad-type, namespace: default}
        spec: {type: Magic, clusterIP: 10.96.0.63, ports: [{port: 80}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: good, namespace: default}
        spec: {clusterIP: 10.96.0.64, ports: [{name: http, port: 80}]}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: good-1
          namespace: default
          labels: {kubernetes.io/service-name: good}
        addressType: IPv4
        ports: [{name: http, port: 8080}]
        endpoints:
          - addresses: [10.244.0.999]
          - addresses: [10.244.0.1]
          - addresses: ["fd00::1"]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: good-2
          namespace: default
          labels: {kubernetes.io/service-name: good}
        addressType: IPv4
        ports: [{name: http, port: 0x10000}]
        endpoints: [{addresses: [10.244.0.2]}]
        """

    services_file, problems = run(text)

    (good,) = services_file.services
    assert good.name == "good"
    assert [e.ip for e in good.endpoints] == ["10.244.0.1"]  # only bad endpoints dropped
    assert [str(problem) for problem in problems] == [
        "Service default/bad-ip: rejected: spec.clusterIP: '10.96.0.300' is not a valid IP address",
        "Service default/bad-port: rejected: spec.ports[0].port: 70000 is out of range 1..65535",
        "Service default/bad-protocol: rejected: spec.ports[0].protocol:"
        " 'QUIC' is not one of TCP, UDP, SCTP",
        "Service default/bad-type: rejected: spec.type: 'Magic' is not one of"
        " ClusterIP, NodePort, LoadBalancer, ExternalName",
        "EndpointSlice default/good-1: endpoint skipped: endpoints[0].addresses[0]:"
        " '10.244.0.999' is not a valid IP address",
        "EndpointSlice default/good-1: endpoint skipped: endpoints[2].addresses[0]:"
        " fd00::1 is not an IPv4 address",
        "EndpointSlice default/good-2: rejected: ports[0].port: 65536 is out of range 1..65535",
    ]


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {"metadata": "web"},
        {"metadata": {"name": "web"}, "spec": []},
        {"metadata": {"name": "web"}, "spec": {"clusterIP": 7, "ports": [{"port": 80}]}},
        {"metadata": {"name": "web"}, "spec": {"clusterIP": "10.0.0.1", "ports": "80"}},
        {"metadata": {"name": "web", "labels": ["x"]}, "spec": {}},
        {"metadata": {"name": "web"}, "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": True}]}},
    ],
)
def test_garbage_is_a_problem_not_a_crash(obj: object) -> None:
    services_file, problems = translate([obj], [obj])

    assert services_file.services == ()
    assert len(problems) >= 1


def test_a_frontend_taken_by_an_older_service_rejects_the_newer_one() -> None:
    services_file, problems = run("""\
        apiVersion: v1
        kind: Service
        metadata: {name: newer, namespace: default, creationTimestamp: "2024-02-01T00:00:00Z"}
        spec: {clusterIP: 10.96.0.71, externalIPs: [192.0.2.7], ports: [{port: 80}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: older, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
        spec: {clusterIP: 10.96.0.70, externalIPs: [192.0.2.7], ports: [{port: 80}]}
        """)

    assert [service.name for service in services_file.services] == ["older"]
    assert [str(problem) for problem in problems] == [
        "Service default/newer: rejected: 192.0.2.7:80/TCP (used by default/older) taken"
    ]


def test_the_result_is_a_services_file_that_applies_kube_semantics() -> None:
    services_file = clean(WEB)

    assert services_file.traffic_policies is True
    assert isinstance(services_file.services[0], ServiceSpec)
    assert services_file_to_engine(services_file)[0].backends[0] == EngineBackend(
        ip="10.244.1.10", port=8080
    )


def test_backends_no_frontend_family_reaches_are_left_out(fastpath: ModuleType) -> None:
    spec = ServiceSpec(
        name="v4",
        cluster_ips=("10.96.0.1",),
        ports=(ServicePort(port=80, target_port=8080, node_port=30080),),
        external_traffic_policy="Local",
        endpoints=(EndpointSpec(ip="10.244.0.1", node_name="node-a"),),
    )

    # An IPv6-only node: the external frontends are all IPv6, the endpoint IPv4.
    internal, external = service_ports_to_engine(spec, ["fd00::1"], "node-a", traffic_policies=True)

    assert [b.ip for b in internal.backends] == ["10.244.0.1"]
    assert external.frontends == (("fd00::1", 30080, "TCP"),)
    assert external.backends == ()
    apply_to_engine(fastpath.Engine(), [internal, external])  # the engine accepts both
