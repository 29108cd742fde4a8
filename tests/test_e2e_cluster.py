"""End to end on several nodes: one `pykp run` per node, all fed by one Kubernetes API.

A `ClusterLab` (3 nodes, 2 routed pods each, a bridge as the cluster network, pod CIDRs
routed between nodes like a host-gw CNI) and the stand-in API server listening on that
network. Every agent watches the same Services and EndpointSlices; clients are real
sockets in pod namespaces (and on the external host). Each test writes its own Services
(distinct ClusterIPs) and deletes them at the end.

Runs as root (CI runs as root). The propagation figures are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from e2e_support import cluster_agents, cluster_apiserver, kube_service, kube_slice

from pykp.labs.kube_apiserver import ClusterApiServer
from pykp.labs.lab import NETNS_DIR, RECORD_DIR, ClusterLab
from pykp.labs.lab_agent import (
    TCP_ECHO,
    connect_error,
    http_get,
    in_parallel,
    wait_for,
)
from pykp.labs.lab_agent import LabAgent as Node

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

NODES = 3
POLICY = "pykp.io/lb-policy"
ECHO_PORT = 7000
PROGRAMMING = "kubeproxy_network_programming_duration_seconds"
PROPAGATION_BOUND = 5.0  # seconds from an API write to every node (min-sync-period is 0.1)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    with ClusterLab(nodes=NODES, pods_per_node=2) as lab:
        lab.start_http_servers(port=8080)  # on every pod: any pod can be a backend
        for pod in lab.pods:
            lab.popen(pod, ["python3", "-c", TCP_ECHO, pod.name, str(ECHO_PORT)])
        yield lab


@pytest.fixture(scope="module")
def apiserver(cluster: ClusterLab) -> Iterator[ClusterApiServer]:
    with cluster_apiserver(cluster) as server:
        yield server


@pytest.fixture(scope="module")
def nodes(
    cluster: ClusterLab, apiserver: ClusterApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Node]]:
    with cluster_agents(cluster, apiserver, tmp_path_factory.mktemp("cluster")) as agents:
        yield agents


# --- helpers ----------------------------------------------------------------------------------


def try_get(cluster: ClusterLab, pod: str, host: str, port: int = 80) -> str | None:
    try:
        return http_get(cluster, pod, host, port, timeout=1.0)
    except OSError:
        return None


def client(k: int) -> str:
    return f"pod-{k}-0"


def publish(apiserver: ClusterApiServer, service: dict[str, Any], *slices: dict[str, Any]) -> None:
    # Slices first, as a controller usually has them by the time a proxy sees the Service.
    for endpoint_slice in slices:
        apiserver.apply("endpointslices", endpoint_slice)
    apiserver.apply("services", service)


def unpublish(apiserver: ClusterApiServer, name: str) -> None:
    if apiserver.get("services", "default", name) is not None:
        apiserver.delete("services", "default", name)
    for family in (4, 6):
        if apiserver.get("endpointslices", "default", f"{name}-ipv{family}") is not None:
            apiserver.delete("endpointslices", "default", f"{name}-ipv{family}")


def every_node_reaches(
    cluster: ClusterLab, host: str, wanted: set[str], port: int = 80, timeout: float = 10.0
) -> None:
    """Wait until a pod on every node has seen exactly the backends `wanted` through `host`."""

    def one(k: int) -> bool:
        seen: set[str] = set()

        def check() -> bool:
            seen.add(try_get(cluster, client(k), host, port) or "")
            seen.discard("")
            return wanted <= seen

        return wait_for(check, timeout=timeout, step=0.02) and seen == wanted

    reached = in_parallel(one, NODES)
    assert all(reached), f"{host}: nodes reaching {wanted}: {reached}"


def time_until(predicate: Callable[[], bool], since: float, timeout: float) -> float | None:
    """Seconds from `since` (monotonic) until `predicate` first holds; None on timeout."""
    if wait_for(predicate, timeout=timeout, step=0.005):
        return time.monotonic() - since
    return None


def programming(node: Node) -> tuple[float, float]:
    """(sum, count) of the node's network-programming-duration histogram."""
    return node.metric(PROGRAMMING + "_sum"), node.metric(PROGRAMMING + "_count")


def report(title: str, figures: Mapping[str, float | None]) -> None:
    text = ", ".join(
        f"{name} {'-' if value is None else f'{value * 1000:.0f} ms'}"
        for name, value in figures.items()
    )
    print(f"\n[cluster] {title}: {text}")


# --- the lab itself -----------------------------------------------------------------------------


def test_cluster_lab_routes_pods_between_nodes(cluster: ClusterLab) -> None:
    client_pod, server_pod = cluster.host("pod-0-0"), cluster.host("pod-2-1")
    assert cluster.node_of(server_pod).name == "node-2"
    assert server_pod.ipv4 == "10.244.2.11" and server_pod.ipv6 == "fd00:10:244:2::11"
    # Routed between nodes, never NATed: the server sees the client pod's own address.
    for address, own in ((server_pod.ipv4, client_pod.ipv4), (server_pod.ipv6, client_pod.ipv6)):
        assert http_get(cluster, "pod-0-0", address, 8080, path="/clientip") == own
    assert http_get(cluster, "external", "10.244.1.10", 8080) == "pod-1-0"
    # Every node reaches the API server's address on the cluster network.
    with cluster.in_namespace("net"):
        listener = socket.create_server((cluster.api_ip4, 0))
    with listener:
        port = listener.getsockname()[1]
        for node in cluster.node_hosts:
            assert connect_error(cluster, node.name, cluster.api_ip4, port) == "connected"


def test_cluster_lab_cleans_up_after_a_partial_setup_and_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pyroute2.netns  # type: ignore[import-untyped]

    real_create = pyroute2.netns.create
    calls: list[str] = []

    def flaky_create(name: str) -> None:
        calls.append(name)
        if len(calls) == 5:
            raise OSError("injected failure")
        real_create(name)

    monkeypatch.setattr(pyroute2.netns, "create", flaky_create)
    with pytest.raises(OSError, match="injected"):
        ClusterLab(nodes=2, pods_per_node=1, prefix="pykp-lab-cpartial-")
    assert len(calls) == 5
    assert not [n for n in os.listdir(NETNS_DIR) if n.startswith("pykp-lab-cpartial-")]
    assert not list(RECORD_DIR.glob("pykp-lab-cpartial-*"))
    monkeypatch.undo()

    lab = ClusterLab(nodes=2, pods_per_node=1, prefix="pykp-lab-cclose-")
    server = lab.start_http_servers()[0]
    assert len([n for n in os.listdir(NETNS_DIR) if n.startswith(lab.key + "-")]) == 6
    lab.close()
    lab.close()  # idempotent
    assert not [n for n in os.listdir(NETNS_DIR) if n.startswith(lab.key + "-")]
    assert server.poll() is not None


# --- the agents -------------------------------------------------------------------------------


def test_agents_run_on_every_node_with_their_own_node_name(
    cluster: ClusterLab, nodes: list[Node]
) -> None:
    for node, host in zip(nodes, cluster.node_hosts):
        status, body = node.get("127.0.0.1:10249", "/status")
        assert status == 200, body
        snapshot = json.loads(body)
        assert snapshot["node"]["name"] == host.name
        assert host.ipv4 in snapshot["node"]["addresses"]
        assert snapshot["source"]["name"].startswith("kubernetes:")


def test_a_pod_reaches_a_service_whose_backends_are_all_on_other_nodes(
    cluster: ClusterLab, apiserver: ClusterApiServer, nodes: list[Node]
) -> None:
    backends = ["pod-1-0", "pod-2-0"]  # none on node-0
    publish(
        apiserver,
        kube_service("web", ["10.96.0.10", "fd00:10:96::10"], annotations={POLICY: "round-robin"}),
        kube_slice(cluster, "web", backends, family=4),
        kube_slice(cluster, "web", backends, family=6),
    )
    try:
        every_node_reaches(cluster, "10.96.0.10", set(backends))
        # From node-0's pod, both families, round-robin over the two remote backends.
        for address in ("10.96.0.10", "fd00:10:96::10"):
            seen = [http_get(cluster, "pod-0-0", address) for _ in range(4)]
            assert sorted(seen) == sorted(backends * 2), f"{address}: {seen}"
        # Pod to pod across nodes is routed, not NATed: the backend sees the client pod.
        pod = cluster.host("pod-0-0")
        assert http_get(cluster, "pod-0-0", "10.96.0.10", path="/clientip") == pod.ipv4
        assert http_get(cluster, "pod-0-0", "fd00:10:96::10", path="/clientip") == pod.ipv6
        # The node itself (host network) reaches it too; it is masqueraded to the node IP.
        assert http_get(cluster, "node-0", "10.96.0.10") in backends
        assert http_get(cluster, "node-0", "10.96.0.10", path="/clientip") == cluster.node(0).ipv4
    finally:
        unpublish(apiserver, "web")


def test_scaling_reaches_every_node_within_a_bound(
    cluster: ClusterLab, apiserver: ClusterApiServer, nodes: list[Node]
) -> None:
    service = kube_service("scale", ["10.96.0.20"], annotations={POLICY: "round-robin"})
    publish(apiserver, service, kube_slice(cluster, "scale", ["pod-1-1"]))
    try:
        every_node_reaches(cluster, "10.96.0.20", {"pod-1-1"})
        before = [programming(node) for node in nodes]

        # Scale up: the EndpointSlice controller adds pod-2-1's endpoint.
        started = time.monotonic()
        apiserver.update("endpointslices", kube_slice(cluster, "scale", ["pod-1-1", "pod-2-1"]))
        # Round-robin: the new backend answers within two connections once programmed.
        delays = in_parallel(
            lambda k: time_until(
                lambda: try_get(cluster, client(k), "10.96.0.20") == "pod-2-1", started, 10.0
            ),
            NODES,
        )
        report("scale-up, API write -> first connection to the new backend", {
            f"node-{k}": d for k, d in enumerate(delays)
        })  # fmt: skip
        assert all(d is not None and d < PROPAGATION_BOUND for d in delays), delays

        # Each agent's own view: the source's receipt of the change -> rules committed.
        def observed(k: int) -> bool:
            return programming(nodes[k])[1] > before[k][1]

        assert all(wait_for(partial(observed, k), timeout=5) for k in range(NODES))
        after = [programming(node) for node in nodes]
        durations = {
            f"node-{k}": (a[0] - b[0]) / (a[1] - b[1])
            for k, (a, b) in enumerate(zip(after, before))
        }
        report(f"scale-up, {PROGRAMMING} (mean of this change's observations)", durations)
        assert all(0 <= d < PROPAGATION_BOUND for d in durations.values()), durations
    finally:
        unpublish(apiserver, "scale")


def test_deleting_a_service_removes_it_on_every_node(
    cluster: ClusterLab, apiserver: ClusterApiServer, nodes: list[Node]
) -> None:
    publish(
        apiserver,
        kube_service("gone", ["10.96.0.40"], annotations={POLICY: "round-robin"}),
        kube_slice(cluster, "gone", ["pod-0-1", "pod-2-1"]),
    )
    every_node_reaches(cluster, "10.96.0.40", {"pod-0-1", "pod-2-1"})
    for k in range(NODES):
        assert (
            "10.96.0.40"
            in cluster.exec(f"node-{k}", ["nft", "list", "table", "inet", "pykp"]).stdout
        )

    started = time.monotonic()
    unpublish(apiserver, "gone")
    delays = in_parallel(
        lambda k: time_until(
            lambda: connect_error(cluster, client(k), "10.96.0.40", 80, timeout=0.3) != "connected",
            started,
            10.0,
        ),
        NODES,
    )
    report("delete, API write -> first connection not served", {
        f"node-{k}": d for k, d in enumerate(delays)
    })  # fmt: skip
    assert all(d is not None and d < PROPAGATION_BOUND for d in delays), delays

    # Gone as if it never existed: the same outcome as an address no Service ever had
    # (the lab's nodes route unknown service addresses to the external host, which drops
    # them: a timeout, as on a real node whose default gateway does not know them).
    never = connect_error(cluster, client(0), "10.96.0.249", 80, timeout=0.5)
    outcomes = in_parallel(
        lambda k: connect_error(cluster, client(k), "10.96.0.40", 80, timeout=0.5), NODES
    )
    assert outcomes == [never] * NODES and never != "connected", (outcomes, never)
    for k in range(NODES):
        rules = cluster.exec(f"node-{k}", ["nft", "list", "table", "inet", "pykp"], check=True)
        assert "10.96.0.40" not in rules.stdout, f"node-{k} still has the frontend"


def test_maglev_sends_one_5_tuple_to_one_backend_on_every_node(
    cluster: ClusterLab, apiserver: ClusterApiServer, nodes: list[Node]
) -> None:
    from pykp._fastpath import Engine
    from pykp.agent.plan import apply_to_engine, services_file_to_engine
    from pykp.sources.kube.translate import translate

    backends = ["pod-0-1", "pod-1-0", "pod-1-1", "pod-2-1"]
    service = kube_service("hash", ["10.96.0.30"], annotations={POLICY: "maglev"})
    endpoint_slice = kube_slice(cluster, "hash", backends)
    publish(apiserver, service, endpoint_slice)
    ports = range(20000, 20016)  # below the ephemeral range: no clash with other clients
    try:
        every_node_reaches(cluster, "10.96.0.30", set(backends), timeout=15)

        # 1. The same 5-tuple through every node: the external host sends the same
        # connections (same source address and ports) to each node in turn, as a router
        # in front of the cluster might after a route change. Every node must agree.
        chosen: dict[str, list[str]] = {}
        try:
            for node, agent in zip(cluster.node_hosts, nodes):
                cluster.route_services_via(node)
                queued = agent.metric("pykp_queue_packets_total")
                chosen[node.name] = [
                    http_get(cluster, "external", "10.96.0.30", source_port=p) for p in ports
                ]
                # This node's engine made each decision: one queued packet per connection.
                assert agent.metric("pykp_queue_packets_total") == queued + len(ports)
        finally:
            cluster.route_services_via()
        print(f"\n[cluster] maglev, external client ports {ports.start}..: {chosen}")
        first = chosen["node-0"]
        assert all(choice == first for choice in chosen.values()), chosen
        assert len(set(first)) >= 2, f"16 flows all on one backend: {first}"

        # 2. Clients on every node against an offline engine with the same service and
        # the default seed: what each node did is what the offline engine decides.
        services_file, problems = translate([service], [endpoint_slice])
        assert not problems
        engine = Engine(default_policy="random")  # the agent's defaults: seed 0, 65537 slots
        apply_to_engine(engine, services_file_to_engine(services_file))
        by_ip = {cluster.host(pod).ipv4: pod for pod in backends}
        for k in range(NODES):
            pod = cluster.host(client(k))
            for p in ports:
                decision = engine.decide(pod.ipv4, p, "10.96.0.30", 80)
                assert decision.backend is not None
                expected = by_ip[decision.backend[0]]
                actual = http_get(cluster, pod.name, "10.96.0.30", source_port=p)
                assert actual == expected, f"{pod.name}:{p} went to {actual}, not {expected}"
    finally:
        unpublish(apiserver, "hash")


def echo(sock: socket.socket, line: str) -> str:
    sock.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().strip()


def echo_once(cluster: ClusterLab, pod: str, host: str, timeout: float = 1.0) -> str | None:
    try:
        with cluster.in_namespace(pod):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect((host, ECHO_PORT))
            return echo(sock, "hi").split()[0]
    except OSError:
        return None


def test_api_server_outage_leaves_the_datapath_alone_and_changes_follow_after(
    cluster: ClusterLab, apiserver: ClusterApiServer, nodes: list[Node]
) -> None:
    address = "10.96.0.50"
    service = kube_service("steady", [address], port=ECHO_PORT, target_port=ECHO_PORT,
                           annotations={POLICY: "round-robin"})  # fmt: skip

    def slice_of(*pods: str) -> dict[str, Any]:
        return kube_slice(cluster, "steady", pods, port=ECHO_PORT)

    def propagation(new_backend: str, started: float, timeout: float) -> list[float | None]:
        return in_parallel(
            lambda k: time_until(
                lambda: echo_once(cluster, client(k), address) == new_backend, started, timeout
            ),
            NODES,
        )

    publish(apiserver, service, slice_of("pod-0-1", "pod-2-0"))
    try:
        assert all(
            in_parallel(
                lambda k: wait_for(lambda: echo_once(cluster, client(k), address) is not None),
                NODES,
            )
        )
        # A long-lived connection through node-1, DNATed to a pod on another node.
        with cluster.in_namespace("pod-1-0"):
            long_lived = socket.create_connection((address, ECHO_PORT), timeout=3)
        with long_lived:
            backend = echo(long_lived, "hello").split()[0]

            # 1. Every watch stream cut mid-flight, and a change right away: the
            # reflectors resume from their resource version and get it.
            assert apiserver.drop_watches() >= NODES * 2
            started = time.monotonic()
            apiserver.update("endpointslices", slice_of("pod-0-1", "pod-2-0", "pod-1-1"))
            delays = propagation("pod-1-1", started, 10.0)
            report("after a watch drop, API write -> new backend", {
                f"node-{k}": d for k, d in enumerate(delays)
            })  # fmt: skip
            assert all(d is not None and d < PROPAGATION_BOUND for d in delays), delays

            # 2. The API server goes away (connections refused, open ones cut) for a while.
            apiserver.set_available(False)
            outage_end = time.monotonic() + 2.0
            rounds = 0
            try:
                while time.monotonic() < outage_end:
                    # 3 s: room for one SYN retransmission (at 1 s), which a loaded
                    # 2-core machine needed in 2 of ~10 full runs; a node that stopped
                    # serving still fails.
                    served = in_parallel(
                        lambda k: echo_once(cluster, client(k), address, timeout=3.0), NODES
                    )
                    assert all(served), f"a node stopped serving during the outage: {served}"
                    assert echo(long_lived, f"ping {rounds}") == f"{backend} ping {rounds}"
                    rounds += 1
                assert all(node.healthy() for node in nodes)
                assert all(node.proc is not None and node.proc.poll() is None for node in nodes)
            finally:
                apiserver.set_available(True)

            # 3. Back: a change made now reaches every node once its reflectors reconnect
            # (their backoff after a 2 s outage is at most a few seconds).
            started = time.monotonic()
            apiserver.update("endpointslices", slice_of("pod-0-1", "pod-2-0", "pod-1-1", "pod-2-1"))
            delays = propagation("pod-2-1", started, 20.0)
            report("after a 2 s API outage, API write -> new backend", {
                f"node-{k}": d for k, d in enumerate(delays)
            })  # fmt: skip
            assert all(d is not None and d < 15.0 for d in delays), delays
            assert echo(long_lived, "after") == f"{backend} after"
    finally:
        unpublish(apiserver, "steady")


def test_cluster_demo_builds_serves_and_tears_down(tmp_path: Path) -> None:
    from pykp.labs.cluster_demo import start_cluster_demo

    def apiserver(lab: ClusterLab) -> ClusterApiServer:
        server = ClusterApiServer(lab.ns("net"), lab.api_ip4)
        server.start()
        return server

    with start_cluster_demo(apiserver, nodes=2, pods_per_node=1, workdir=tmp_path) as demo:
        lab = demo.lab
        assert set(demo.agents) == {"node-0", "node-1"}
        assert all(demo.ready(node) for node in demo.agents)
        server = demo.apiserver
        assert isinstance(server, ClusterApiServer)
        server.apply("endpointslices", kube_slice(lab, "demo", ["pod-1-0"]))
        server.apply("services", kube_service("demo", ["10.96.0.60"]))
        assert wait_for(lambda: try_get(lab, "pod-0-0", "10.96.0.60") == "pod-1-0")
        agents = list(demo.agents.values())
    assert not [n for n in os.listdir(NETNS_DIR) if n.startswith(lab.key + "-")]
    assert all(agent.proc is None for agent in agents)
    demo.close()  # idempotent
