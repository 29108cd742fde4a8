"""End to end: a Local service's health check node port, served by `pykp run` on a lab node
and asked from a client pod at the node's address, through the changes upstream's e2e
cases make (endpoints moving away, terminating, the policy going Cluster and back)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import METRICS, connect_error, wait_for
from pykp.labs.lab_agent import LabAgent as Node

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

HC_PORT = 32100
OTHER_HC_PORT = 32101


def services(endpoint: str, policy: str = "Local", hc_port: int = HC_PORT) -> str:
    health_check = f"\n    healthCheckNodePort: {hc_port}" if policy == "Local" else ""
    return f"""
services:
  - name: web
    namespace: shop
    clusterIP: 10.96.0.40
    externalTrafficPolicy: {policy}{health_check}
    ports: [{{port: 80, targetPort: 8080, nodePort: 30040}}]
    endpoints:
      - {endpoint}
"""


LOCAL = "{ip: 10.244.0.10, nodeName: node}"
ELSEWHERE = "{ip: 10.244.0.10, nodeName: node-2}"
TERMINATING = "{ip: 10.244.0.10, nodeName: node, ready: false, serving: true, terminating: true}"


def health_check(
    lab: Lab, pod: str, host: str, port: int = HC_PORT
) -> tuple[int, dict[str, str], str]:
    """GET /healthz on a new connection from `pod`: status, headers and body."""
    with lab.in_namespace(pod):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(3)
        s.connect((host, port))
        s.sendall(f"GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=1, clients=1) as lab:
        yield lab


@pytest.fixture(scope="module")
def node(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    path: Path = tmp_path_factory.mktemp("hc") / "services.yaml"
    path.write_text(services(LOCAL))
    node = Node(lab, path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def expect(lab: Lab, code: int, count: int) -> None:
    status, headers, body = health_check(lab, "client-0", lab.node_ip4)
    assert (status, json.loads(body)) == (
        code,
        {
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": count,
            "serviceProxyHealthy": True,
        },
    ), body
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == str(count)


def test_the_health_check_follows_endpoints_and_the_policy(lab: Lab, node: Node) -> None:
    expect(lab, 200, 1)
    node.write_services(services(ELSEWHERE))
    expect(lab, 503, 0)
    node.write_services(services(TERMINATING))
    expect(lab, 503, 0)
    node.write_services(services(LOCAL, policy="Cluster"))
    assert connect_error(lab, "client-0", lab.node_ip4, HC_PORT) == "refused"
    node.write_services(services(LOCAL))
    expect(lab, 200, 1)
    # The status lists it.
    _, text = node.get(METRICS, "/status")
    assert json.loads(text)["healthChecks"] == [
        {
            "port": HC_PORT,
            "service": "shop/web",
            "localEndpoints": 1,
            "serving": True,
            "error": None,
        }
    ]


def test_a_port_in_use_is_reported_and_served_once_free(lab: Lab, node: Node) -> None:
    before = node.metric("pykp_healthcheck_bind_errors_total")
    with lab.in_namespace("node"):
        blocker = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        blocker.bind(("::", OTHER_HC_PORT))
        blocker.listen()
        node.write_services(services(LOCAL, hc_port=OTHER_HC_PORT))
        assert node.metric("pykp_healthcheck_bind_errors_total") > before
        _, text = node.get(METRICS, "/status")
        [check] = json.loads(text)["healthChecks"]
        assert check["port"] == OTHER_HC_PORT and not check["serving"] and check["error"]
        assert connect_error(lab, "client-0", lab.node_ip4, HC_PORT) == "refused"
    finally:
        blocker.close()
    # Retried at the next sync (any change, or the periodic one).
    node.write_services(services(LOCAL, hc_port=OTHER_HC_PORT).replace("10.96.0.40", "10.96.0.41"))
    assert wait_for(lambda: node.metric("pykp_healthcheck_servers") == 1)
    status, _, body = health_check(lab, "client-0", lab.node_ip4, OTHER_HC_PORT)
    assert (status, json.loads(body)["localEndpoints"]) == (200, 1)
    node.write_services(services(LOCAL))
