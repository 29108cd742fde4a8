"""End to end: externalTrafficPolicy Local from a services file, on a lab node running
`pykp run` (--hostname-override node): external traffic reaches only this node's
endpoints; with none here but some elsewhere it is dropped (the client times out, as with
kube-proxy), with none at all refused; the ClusterIP keeps every endpoint, and pods and
the node itself are short-circuited to every endpoint through the external frontends, as
kube-proxy does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import LabAgent as Node
from pykp.labs.lab_agent import connect_error, http_get

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

CLUSTER_IP = "10.96.0.60"
EXTERNAL_IP = "203.0.113.60"
NODE_PORT = 30060
# backend-0 and backend-1 both run in the lab; nodeName says which node each is "on".
HERE_AND_ELSEWHERE = "[{ip: 10.244.0.10, nodeName: node}, {ip: 10.244.0.11, nodeName: node-2}]"
ELSEWHERE = "[{ip: 10.244.0.10, nodeName: node-2}, {ip: 10.244.0.11, nodeName: node-3}]"


def services(endpoints: str) -> str:
    return f"""
services:
  - name: ingress
    namespace: shop
    clusterIP: {CLUSTER_IP}
    externalIPs: [{EXTERNAL_IP}]
    policy: round-robin
    externalTrafficPolicy: Local
    ports: [{{port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]
    endpoints: {endpoints}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=2, clients=1) as lab:
        lab.start_http_servers(port=8080)
        yield lab


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Iterator[Node]:
    path = tmp_path / "services.yaml"
    path.write_text(services(HERE_AND_ELSEWHERE))
    node = Node(lab, path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def answers(lab: Lab, pod: str, host: str, port: int, count: int = 8) -> set[str]:
    return {http_get(lab, pod, host, port) for _ in range(count)}


def test_external_traffic_reaches_only_the_local_endpoint(lab: Lab, node: Node) -> None:
    # From outside the cluster: the NodePort and the external IP, this node's endpoint only
    # (round-robin over both would alternate).
    assert answers(lab, "external", lab.node_ip4, NODE_PORT) == {"backend-0"}
    assert answers(lab, "external", EXTERNAL_IP, 80) == {"backend-0"}
    # The client address is kept (Local is never masqueraded).
    assert http_get(lab, "external", lab.node_ip4, NODE_PORT, path="/clientip") == (
        lab.external.ipv4
    )
    # The ClusterIP is not affected: both endpoints.
    assert answers(lab, "client-0", CLUSTER_IP, 80) == {"backend-0", "backend-1"}
    # kube-proxy's short-circuit: a pod, and the node itself, reach every endpoint through
    # the external frontends too (round-robin alternates over both).
    assert answers(lab, "client-0", lab.node_ip4, NODE_PORT) == {"backend-0", "backend-1"}
    assert answers(lab, "client-0", EXTERNAL_IP, 80) == {"backend-0", "backend-1"}
    assert answers(lab, "node", EXTERNAL_IP, 80) == {"backend-0", "backend-1"}


def test_no_local_endpoint_drops_external_traffic_and_the_cluster_ip_still_works(
    lab: Lab, node: Node
) -> None:
    node.write_services(services(ELSEWHERE))

    # kube-proxy's "has no local endpoints" DROP: no reset, no ICMP; the client times out.
    assert connect_error(lab, "external", lab.node_ip4, NODE_PORT, timeout=2) == "timeout"
    assert connect_error(lab, "external", EXTERNAL_IP, 80, timeout=2) == "timeout"
    assert answers(lab, "client-0", CLUSTER_IP, 80) == {"backend-0", "backend-1"}
    # A pod of this node is short-circuited to the endpoints elsewhere, as by kube-proxy.
    assert answers(lab, "client-0", lab.node_ip4, NODE_PORT) == {"backend-0", "backend-1"}
    assert answers(lab, "client-0", EXTERNAL_IP, 80) == {"backend-0", "backend-1"}

    # No endpoint anywhere: refused, as kube-proxy's REJECT.
    node.write_services(services("[]"))
    assert connect_error(lab, "external", lab.node_ip4, NODE_PORT, timeout=2) == "refused"
    assert connect_error(lab, "client-0", CLUSTER_IP, 80, timeout=2) == "refused"

    # An endpoint turning up here serves again.
    node.write_services(services(HERE_AND_ELSEWHERE))
    assert answers(lab, "external", lab.node_ip4, NODE_PORT) == {"backend-0"}


def test_pods_keep_the_short_circuit_while_the_agent_is_away(lab: Lab, node: Node) -> None:
    # No endpoint on this node: pods and the node reach the others through the external
    # frontends, decided by pykp's reader while it runs ...
    node.write_services(services(ELSEWHERE))
    assert answers(lab, "client-0", EXTERNAL_IP, 80) == {"backend-0", "backend-1"}
    # ... and by the kernel path once it is killed (its rules stay): every endpoint of the
    # service, not this node's (none: it would refuse them).
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()
    node.proc = None
    both = {"backend-0", "backend-1"}
    assert answers(lab, "client-0", EXTERNAL_IP, 80, count=16) == both
    assert answers(lab, "client-0", lab.node_ip4, NODE_PORT, count=16) == both
    assert answers(lab, "node", EXTERNAL_IP, 80, count=16) == both
    # Outside the cluster it is still dropped, and the ClusterIP still serves.
    assert connect_error(lab, "external", EXTERNAL_IP, 80, timeout=2) == "timeout"
    assert answers(lab, "client-0", CLUSTER_IP, 80, count=16) == both
