"""End to end: `pykp explain` against running agents, checked by real connections.

A one-node `Lab` with a round-robin service: with `--no-kernel-round-robin` explain names
the backend the next connection gets (pykp's reader rotates), then a client pod connects
and reaches exactly that backend, again and again; by default the kernel rotates, and
explain shows that rotation, which the connections then follow. A three-node `ClusterLab`
with a Maglev service: for a given 5-tuple, explain on every node names the same backend,
and a connection with exactly that client address and source port reaches it through
every node.

Runs as root (CI runs as root). `pykp explain` runs as a command inside each node's
namespace and asks that node's agent, as an operator on the node would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykp.labs.lab import ClusterLab, Lab
from pykp.labs.lab_agent import METRICS, http_get, in_parallel, start_nodes
from pykp.labs.lab_agent import LabAgent as Node
from pykp.self_command import pykp_command

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)


def explain(lab: Lab | ClusterLab, node: str, *args: str, as_json: bool = True) -> Any:
    """`pykp explain ARGS` in `node`'s namespace, against its agent."""
    argv = [*pykp_command("explain"), "--address", METRICS, *args]
    result = lab.exec(node, [*argv, "--json"] if as_json else argv)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if as_json else result.stdout


def decided(report: dict[str, Any]) -> str:
    """The one service port's backend, as `IP:port`."""
    (service,) = report["services"]
    backend = service["decision"]["backend"]
    assert backend is not None, service["decision"]
    return str(backend)


# --- one node, round-robin ------------------------------------------------------------------

ROUND_ROBIN = """
services:
  - name: web-rr
    clusterIP: 10.96.0.10
    policy: round-robin
    ports: [{name: http, port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10, nodeName: node}
      - {ip: 10.244.0.11, nodeName: node}
      - {ip: 10.244.0.12, nodeName: node}
"""


@pytest.fixture
def start_node(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start `pykp run` on the lab's node with extra flags; stopped after the test."""
    agents: list[Node] = []

    def start(*flags: str) -> Node:
        path = tmp_path / "services.yaml"
        path.write_text(ROUND_ROBIN)
        agent = Node(lab, path, *flags, workdir=tmp_path / "node")
        agents.append(agent)
        agent.start()
        return agent

    yield start
    for agent in agents:
        agent.stop()


def test_round_robin_the_next_connection_gets_the_backend_explain_names(
    lab: Lab, start_node: Callable[..., Node]
) -> None:
    start_node("--no-kernel-round-robin")
    names = {f"{pod.ipv4}:8080": pod.name for pod in lab.backend_pods}
    client = lab.host("client-0")
    reached = []
    for _ in range(7):
        named = decided(explain(lab, "node", "default/web-rr:http", "--client", client.ipv4))
        # Asking again changes nothing: the same answer.
        assert decided(explain(lab, "node", "10.96.0.10:80", "--client", client.ipv4)) == named
        answered = http_get(lab, "client-0", "10.96.0.10")
        assert answered == names[named], f"explain named {named}, {answered} answered"
        reached.append(answered)
    # Round-robin went round: every backend was named in turn, none twice in a row.
    assert set(reached) == set(names.values())
    assert all(a != b for a, b in zip(reached, reached[1:], strict=False)), reached
    text = explain(lab, "node", "default/web-rr", "--client", client.ipv4, as_json=False)
    assert "round-robin: 7 connections handed out" in text
    assert "the next connection from 10.244.0." in text


def test_round_robin_in_the_kernel_connections_follow_the_rotation_explain_shows(
    lab: Lab, start_node: Callable[..., Node]
) -> None:
    node = start_node()  # `pykp run`'s default: the kernel rotates
    names = {f"{pod.ipv4}:8080": pod.name for pod in lab.backend_pods}
    client = lab.host("client-0").ipv4
    (service,) = explain(lab, "node", "default/web-rr:http", "--client", client)["services"]
    assert service["decision"]["decidedBy"] == "kernel"
    assert service["decision"]["backend"] is None  # where the kernel's counter stands is its own
    rotation = [names[slot] for slot in service["state"]["kernelRoundRobin"]["rotation"]]
    assert sorted(rotation) == sorted(names.values())

    queued = node.metric("pykp_queue_packets_total")
    reached = [http_get(lab, "client-0", "10.96.0.10") for _ in range(7)]
    # The rotation explain showed, from wherever the counter stood.
    start = rotation.index(reached[0])
    assert reached == [rotation[(start + i) % 3] for i in range(7)], (rotation, reached)
    assert node.metric("pykp_queue_packets_total") == queued  # no first packet queued
    text = explain(lab, "node", "10.96.0.10:80", as_json=False)
    assert "round-robin in the kernel over 3 slots" in text
    assert "gets the next slot of the kernel's rotation" in text


# --- three nodes, Maglev --------------------------------------------------------------------

NODES = 3
MAGLEV_VIP = "10.96.0.30"
# Below the ephemeral range: no clash with the kernel's own choice of client ports.
SOURCE_PORTS = range(21000, 21008)


def maglev_services(cluster: ClusterLab) -> str:
    backends = ["pod-0-1", "pod-1-0", "pod-1-1", "pod-2-1"]
    endpoints = "\n".join(
        f"      - {{ip: {cluster.host(p).ipv4}, nodeName: {cluster.node_of(p).name}}}"
        for p in backends
    )
    return f"""
services:
  - name: hash
    clusterIP: {MAGLEV_VIP}
    policy: maglev
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
{endpoints}
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    with ClusterLab(nodes=NODES, pods_per_node=2) as cluster:
        cluster.start_http_servers(port=8080)
        yield cluster


@pytest.fixture(scope="module")
def cluster_nodes(
    cluster: ClusterLab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Node]]:
    base = tmp_path_factory.mktemp("explain-cluster")
    agents = []
    for host in cluster.node_hosts:
        path: Path = base / f"{host.name}.yaml"
        path.write_text(maglev_services(cluster))
        agents.append(Node(cluster, path, host=host.name, workdir=base / host.name))
    try:
        start_nodes(agents)
        yield agents
    finally:
        in_parallel(lambda i: agents[i].stop(), len(agents))


def test_maglev_every_node_names_the_same_backend_for_a_5_tuple_and_it_answers(
    cluster: ClusterLab, cluster_nodes: list[Node]
) -> None:
    names = {f"{pod.ipv4}:8080": pod.name for pod in cluster.pods}
    external = cluster.external.ipv4
    expected: dict[int, str] = {}
    for port in SOURCE_PORTS:
        client = f"{external}:{port}"
        reports = [
            explain(cluster, node.name, f"{MAGLEV_VIP}:80/TCP", "--client", client)
            for node in cluster.node_hosts
        ]
        backends = {decided(r) for r in reports}
        slots = {r["services"][0]["state"]["maglev"]["slot"] for r in reports}
        assert len(backends) == 1 and len(slots) == 1, (client, backends, slots)
        expected[port] = backends.pop()
    assert len(set(expected.values())) >= 2, f"eight 5-tuples all on one backend: {expected}"

    # The same connections, from that address and source port, through each node in turn.
    try:
        for node in cluster.node_hosts:
            cluster.route_services_via(node)
            for port, backend in expected.items():
                answered = http_get(cluster, "external", MAGLEV_VIP, source_port=port)
                assert answered == names[backend], f"via {node.name}, port {port}"
    finally:
        cluster.route_services_via()

    # A pod client, through its own node: explain there, then connect.
    for k in range(NODES):
        pod = cluster.pods_of(k)[0]
        for port in SOURCE_PORTS[:3]:
            named = decided(
                explain(
                    cluster,
                    cluster.node_hosts[k].name,
                    "default/hash",
                    "--client",
                    f"{pod.ipv4}:{port}",
                )
            )
            answered = http_get(cluster, pod.name, MAGLEV_VIP, source_port=port)
            assert answered == names[named], f"{pod.name}:{port}"
