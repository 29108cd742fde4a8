"""End to end: what a user switching from kube-proxy expects of a node proxy, on one lab node.

`pykp run` in the lab node's namespace, fed by the stand-in Kubernetes API server (listening
on the node's loopback), with real clients in pod namespaces:

- the `service.kubernetes.io/headless` label: such a Service is not proxied;
- `/proxyMode` on the metrics address;
- kube-proxy's conntrack sysctls, read back from the node namespace's /proc/sys;
- a UDP flow begun while its Service had no serving endpoint (or was not programmed yet)
  is answered within a second of the endpoint turning ready.

Runs as root (CI runs as root). Each test publishes its own Services (distinct ClusterIPs).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykp.labs.kube_apiserver import ClusterApiServer
from pykp.labs.lab import Lab
from pykp.labs.lab_agent import METRICS, connect_error, http_get, wait_for
from pykp.labs.lab_agent import LabAgent as Node
from pykp.self_command import pykp_command

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

UDP_PORT = 5353
HEADLESS = "service.kubernetes.io/headless"
# Flags that differ from kube-proxy's defaults, to see each one reach the kernel.
# (LabAgent passes --conntrack-max-per-core 0: nf_conntrack_max is the machine's, not the
# lab node's, and read-only outside the initial namespace.)
CONNTRACK_FLAGS = (
    "--conntrack-tcp-timeout-established", "2h0m0s",
    "--conntrack-tcp-be-liberal",
    "--conntrack-udp-timeout", "45s",
    "--conntrack-udp-timeout-stream", "150s",
)  # fmt: skip


def root_sysctls() -> dict[str, int]:
    """This process's (the machine's own namespace's) conntrack values: read, never set."""
    names = ["nf_conntrack_max", *(f"nf_conntrack_{n}" for n in ROOT_NAMES)]
    return {n: int(Path(f"/proc/sys/net/netfilter/{n}").read_text()) for n in names}


ROOT_NAMES = (
    "tcp_timeout_established", "tcp_timeout_close_wait", "tcp_be_liberal", "udp_timeout",
    "udp_timeout_stream",
)  # fmt: skip
ROOT_SYSCTLS = root_sysctls() if Path("/proc/sys/net/netfilter/nf_conntrack_max").exists() else {}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=2, clients=1) as lab:
        lab.start_http_servers(port=8080)
        lab.start_udp_echo(port=UDP_PORT)
        yield lab


@pytest.fixture(scope="module")
def apiserver(lab: Lab) -> Iterator[ClusterApiServer]:
    server = ClusterApiServer(lab.ns("node"), "127.0.0.1")
    server.start()
    try:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node", "labels": {}}}
        server.create("nodes", node)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def node(
    lab: Lab, apiserver: ClusterApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("compat")
    kubeconfig = apiserver.write_kubeconfig(base / "kubeconfig")
    agent = Node(lab, None, *CONNTRACK_FLAGS, kubeconfig=kubeconfig, workdir=base / "node")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


# --- helpers ----------------------------------------------------------------------------


def service(
    name: str,
    cluster_ip: str,
    *,
    protocol: str = "TCP",
    port: int = 80,
    target: int = 8080,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app": name, **(labels or {})},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "p", "port": port, "targetPort": target, "protocol": protocol}],
        },
    }


def endpoint_slice(
    lab: Lab, name: str, pods: dict[str, bool], *, protocol: str = "TCP", port: int = 8080
) -> dict[str, Any]:
    """The EndpointSlice of Service `name`: each pod with its readiness."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-abcde",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
        "endpoints": [
            {
                "addresses": [lab.host(pod).ipv4],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "nodeName": "node",
            }
            for pod, ready in pods.items()
        ],
    }


def remove(apiserver: ClusterApiServer, *names: str) -> None:
    for name in names:
        if apiserver.get("services", "default", name) is not None:
            apiserver.delete("services", "default", name)
        if apiserver.get("endpointslices", "default", f"{name}-abcde") is not None:
            apiserver.delete("endpointslices", "default", f"{name}-abcde")


def programmed(node: Node, name: str) -> bool:
    """The agent holds the Service's port (with or without a serving backend)."""
    status, body = node.get(METRICS, "/status")
    return status == 200 and any(
        s["name"] == f"default/{name}:p" for s in json.loads(body)["services"]
    )


def served(lab: Lab, pod: str, host: str) -> str | None:
    try:
        return http_get(lab, pod, host, timeout=1.0)
    except OSError:
        return None


class UdpClient:
    """Sends a datagram every 100 ms from one fixed source port (one conntrack entry),
    and notes when each answer arrives."""

    def __init__(self, lab: Lab, pod: str, host: str, port: int, source_port: int) -> None:
        with lab.in_namespace(pod):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", source_port))
        self.sock.settimeout(0.1)
        self.target = (host, port)
        self.answers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sock.sendto(b"hello", self.target)
                data, _ = self.sock.recvfrom(4096)
                self.answers.append((time.monotonic(), data.decode()))
            except OSError:  # no answer (timeout), or an ICMP error for the last datagram
                pass
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def __enter__(self) -> UdpClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def first_answer_after(self, since: float) -> float | None:
        return next((at - since for at, _ in self.answers if at >= since), None)


def udp_entries(lab: Lab, cluster_ip: str) -> str:
    return lab.exec("node", ["conntrack", "-L", "-p", "udp", "--orig-dst", cluster_ip]).stdout


# --- the tests --------------------------------------------------------------------------


def test_proxy_mode_answers_on_the_metrics_address(node: Node) -> None:
    assert node.get(METRICS, "/proxyMode") == (200, "nfqueue")


def test_conntrack_sysctls_are_set_in_the_nodes_namespace(lab: Lab, node: Node) -> None:
    def value(name: str) -> int:
        out = lab.exec("node", ["cat", f"/proc/sys/net/netfilter/{name}"], check=True).stdout
        return int(out)

    assert value("nf_conntrack_tcp_timeout_established") == 7200
    assert value("nf_conntrack_tcp_timeout_close_wait") == 3600, "kube-proxy's default, 1h"
    assert value("nf_conntrack_tcp_be_liberal") == 1
    assert value("nf_conntrack_udp_timeout") == 45
    assert value("nf_conntrack_udp_timeout_stream") == 150
    # The machine's own namespace keeps its values (these are per namespace), and the
    # machine-wide nf_conntrack_max was left alone.
    assert root_sysctls() == ROOT_SYSCTLS
    assert value("nf_conntrack_max") == ROOT_SYSCTLS["nf_conntrack_max"]

    status = lab.exec("node", pykp_command("status", "--flows", "0"), check=True).stdout
    assert "conntrack sysctls: nf_conntrack_tcp_timeout_established 7200" in status, status
    assert "nf_conntrack_udp_timeout_stream 150" in status


def test_a_service_labelled_headless_is_not_proxied(
    lab: Lab, apiserver: ClusterApiServer, node: Node
) -> None:
    """Upstream's "should implement service.kubernetes.io/headless": a Service with the
    label is not reachable through the proxy; without it, it is."""
    pods = {"backend-0": True}
    apiserver.apply("endpointslices", endpoint_slice(lab, "plain", pods))
    apiserver.apply("endpointslices", endpoint_slice(lab, "marked", pods))
    apiserver.apply("services", service("plain", "10.96.1.10"))
    apiserver.apply("services", service("marked", "10.96.1.11", labels={HEADLESS: ""}))
    try:
        assert wait_for(lambda: served(lab, "client-0", "10.96.1.10") == "backend-0")
        assert not programmed(node, "marked")
        assert connect_error(lab, "client-0", "10.96.1.11", 80, timeout=1.0) != "connected"
        rules = lab.exec("node", ["nft", "list", "table", "inet", "pykp"], check=True).stdout
        assert "10.96.1.10" in rules and "10.96.1.11" not in rules

        # The label removed: proxied like any Service.
        apiserver.update("services", service("marked", "10.96.1.11"))
        assert wait_for(lambda: served(lab, "client-0", "10.96.1.11") == "backend-0")
    finally:
        remove(apiserver, "plain", "marked")


def test_a_udp_flow_begun_before_its_endpoint_was_ready_is_answered_within_a_second(
    lab: Lab, apiserver: ClusterApiServer, node: Node
) -> None:
    """Upstream's "should be able to preserve UDP traffic when initial unready endpoints get
    ready": the client sends from one source port before the Service is programmed (its
    first datagrams go their routed way and leave a conntrack entry that was never NATed),
    goes on while the only endpoint is not ready, and must be answered within a second of
    the endpoint turning ready."""
    ip, name = "10.96.1.53", "late-udp"
    with UdpClient(lab, "client-0", ip, 53, source_port=40531) as client:
        assert wait_for(lambda: "[UNREPLIED]" in udp_entries(lab, ip), timeout=3)
        assert f"src={ip} " in udp_entries(lab, ip).split("[UNREPLIED]")[1], "never NATed"

        apiserver.apply(
            "endpointslices",
            endpoint_slice(lab, name, {"backend-0": False}, protocol="UDP", port=UDP_PORT),
        )
        apiserver.apply("services", service(name, ip, protocol="UDP", port=53, target=UDP_PORT))
        try:
            assert wait_for(lambda: programmed(node, name))
            time.sleep(0.5)
            assert client.answers == [], "no ready endpoint: nothing answers"

            became_ready = time.monotonic()
            apiserver.update(
                "endpointslices",
                endpoint_slice(lab, name, {"backend-0": True}, protocol="UDP", port=UDP_PORT),
            )
            assert wait_for(lambda: client.first_answer_after(became_ready) is not None, 5)
            delay = client.first_answer_after(became_ready)
            print(f"\n[compat] UDP endpoint ready -> first answer: {delay * 1000:.0f} ms")
            assert delay is not None and delay < 1.0, delay
            assert {answer for _, answer in client.answers} == {"backend-0"}
        finally:
            remove(apiserver, name)


def test_a_udp_flow_begun_before_its_service_existed_is_answered_within_a_second(
    lab: Lab, apiserver: ClusterApiServer, node: Node
) -> None:
    """The same flow when the Service arrives with a ready endpoint at once: a brand-new
    UDP Service clears the entries of flows that began before it was programmed."""
    ip, name = "10.96.1.54", "new-udp"
    with UdpClient(lab, "client-0", ip, 53, source_port=40532) as client:
        assert wait_for(lambda: "[UNREPLIED]" in udp_entries(lab, ip), timeout=3)
        created = time.monotonic()
        apiserver.apply(
            "endpointslices",
            endpoint_slice(lab, name, {"backend-1": True}, protocol="UDP", port=UDP_PORT),
        )
        apiserver.apply("services", service(name, ip, protocol="UDP", port=53, target=UDP_PORT))
        try:
            assert wait_for(lambda: client.first_answer_after(created) is not None, 5)
            delay = client.first_answer_after(created)
            print(f"\n[compat] new UDP Service -> first answer: {delay * 1000:.0f} ms")
            assert delay is not None and delay < 1.0, delay
        finally:
            remove(apiserver, name)


def test_many_unnated_udp_entries_are_found_in_one_listing(lab: Lab, node: Node) -> None:
    """Past a few frontends (an agent's first sync: every UDP frontend is newly served), the
    entries are found in one listing of the table: only those never NATed go."""
    from pykp.netfilter.conntrack import delete_unnated_udp_flows

    frontends = [(f"10.96.2.{i}", 53) for i in range(1, 13)]
    with lab.in_namespace("client-0"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for ip, port in frontends:
            sock.sendto(b"x", (ip, port))
            sock.sendto(b"x", (ip, 54))  # another port of the same address: kept
    assert wait_for(lambda: all(f"dst={ip} " in udp_entries(lab, ip) for ip, _ in frontends))

    deleted = delete_unnated_udp_flows(frontends, netns=lab.ns("node"))

    assert deleted == len(frontends)
    for ip, _ in frontends:
        left = udp_entries(lab, ip)
        assert "dport=53 " not in left and "dport=54 " in left, left
