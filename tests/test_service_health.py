"""The services' health check servers (kube-proxy's service_health.go) on real sockets,
on loopback only; the model's and the sources' side of healthCheckNodePort."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from pykp.model import EndpointSpec, ServiceSpec
from pykp.observe.service_health import HealthCheck, ServiceHealthServers, health_check_body
from pykp.observe.status import render_status
from pykp.sources.kube.translate import parse_service
from pykp.sources.services_file import load_services_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/healthz") -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def servers() -> Iterator[ServiceHealthServers]:
    servers = ServiceHealthServers()
    try:
        yield servers
    finally:
        servers.stop()


def test_the_body_is_kube_proxys_byte_for_byte() -> None:
    assert health_check_body("ns-1/web", 2, True) == (
        '{\n\t"service": {\n\t\t"namespace": "ns-1",\n\t\t"name": "web"\n\t},\n'
        '\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )


def test_answers_200_then_503_follows_counts_and_closes(servers: ServiceHealthServers) -> None:
    port = free_port()
    servers.sync({"default/web": HealthCheck(port, 1)}, ["127.0.0.1"])
    code, headers, body = get(port, "/healthz")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    assert json.loads(body) == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }
    assert body == health_check_body("default/web", 1, True)
    # Any path; the count follows without a new server.
    listener = servers._ports[port].listeners[0]
    servers.sync({"default/web": HealthCheck(port, 3)}, ["127.0.0.1"])
    assert servers._ports[port].listeners[0] is listener
    code, headers, body = get(port, "/anything?x=1")
    assert (code, json.loads(body)["localEndpoints"]) == (200, 3)
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "3"
    servers.sync({"default/web": HealthCheck(port, 0)}, ["127.0.0.1"])
    code, headers, body = get(port)
    assert code == 503
    assert json.loads(body)["localEndpoints"] == 0
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    [status] = servers.statuses()
    assert (status.port, status.service, status.local_endpoints, status.serving) == (
        port,
        "default/web",
        0,
        True,
    )
    servers.sync({}, ["127.0.0.1"])
    assert refused(port)
    assert servers.statuses() == []


def test_an_unhealthy_proxy_answers_503() -> None:
    servers = ServiceHealthServers(lambda: False)
    port = free_port()
    try:
        servers.sync({"ns/a": HealthCheck(port, 2)}, ["127.0.0.1"])
        code, _, body = get(port)
        assert code == 503
        assert json.loads(body)["serviceProxyHealthy"] is False
        assert json.loads(body)["localEndpoints"] == 2
    finally:
        servers.stop()
    assert refused(port)


def test_a_port_in_use_is_counted_and_retried(servers: ServiceHealthServers) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = int(blocker.getsockname()[1])
    try:
        servers.sync({"ns/a": HealthCheck(port, 1)}, ["127.0.0.1"])
        assert servers.bind_errors == 1
        [status] = servers.statuses()
        assert not status.serving and status.error
        servers.sync({"ns/a": HealthCheck(port, 1)}, ["127.0.0.1"])
        assert servers.bind_errors == 2
    finally:
        blocker.close()
    servers.sync({"ns/a": HealthCheck(port, 1)}, ["127.0.0.1"])
    assert servers.statuses()[0].serving and servers.statuses()[0].error is None
    assert get(port)[0] == 200


def test_a_port_moves_with_its_service_and_two_services_never_share_one(
    servers: ServiceHealthServers,
) -> None:
    first, second = free_port(), free_port()
    servers.sync({"ns/a": HealthCheck(first, 1), "ns/b": HealthCheck(first, 1)}, ["127.0.0.1"])
    assert [(s.port, s.service) for s in servers.statuses()] == [(first, "ns/a")]
    servers.sync({"ns/a": HealthCheck(second, 1)}, ["127.0.0.1"])
    assert refused(first)
    assert json.loads(get(second)[2])["service"]["name"] == "a"


def test_local_ready_endpoints_count_ready_addresses_on_this_node() -> None:
    spec = ServiceSpec(
        name="web",
        endpoints=(
            EndpointSpec("10.0.0.1", node_name="n1"),
            EndpointSpec("10.0.0.2", node_name="n1", ready=False, terminating=True),
            EndpointSpec("10.0.0.3", node_name="n2"),
            EndpointSpec("10.0.0.4", node_name="n1", ready=False, serving=False),
        ),
    )
    assert spec.local_ready_endpoints("n1") == 1
    assert spec.local_ready_endpoints("n2") == 1
    assert spec.local_ready_endpoints("n3") == 0
    assert spec.local_ready_endpoints(None) == 0


def _service(spec: dict[str, object]) -> ServiceSpec | None:
    parsed, _ = parse_service(
        {
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.1",
                "clusterIPs": ["10.96.0.1"],
                "ports": [{"port": 80, "nodePort": 30080}],
                **spec,
            },
        },
        "random",
    )
    return parsed.spec if parsed else None


def test_kubernetes_health_check_node_port_as_kube_proxy_takes_it() -> None:
    local_lb = {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}
    spec = _service({**local_lb, "healthCheckNodePort": 32000})
    assert spec is not None and spec.health_check_node_port == 32000
    cluster = _service({"type": "LoadBalancer", "healthCheckNodePort": 32000})
    assert cluster is not None and cluster.health_check_node_port is None
    node_port = _service(
        {"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}
    )
    assert node_port is not None and node_port.health_check_node_port is None


def test_services_file_health_check_node_port() -> None:
    text = """
services:
  - name: web
    externalTrafficPolicy: Local
    healthCheckNodePort: 32000
    ports: [{port: 80, nodePort: 30080}]
"""
    catalog, problems = load_services_text(text, "s.yaml")
    assert problems == []
    assert catalog.services[0].health_check_node_port == 32000
    for bad, message in [
        ("externalTrafficPolicy: Cluster\n    healthCheckNodePort: 32000", "Local"),
        ("externalTrafficPolicy: Local\n    healthCheckNodePort: 70000", "healthCheckNodePort"),
    ]:
        catalog, problems = load_services_text(
            text.replace("externalTrafficPolicy: Local\n    healthCheckNodePort: 32000", bad),
            "s.yaml",
        )
        assert catalog.services == ()
        assert any(message in str(problem) for problem in problems), problems


def test_status_shows_a_line_per_health_check() -> None:
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    console = Console(file=out, width=200)
    snapshot = {
        "node": {"name": "n1", "addresses": []},
        "healthy": True,
        "healthChecks": [
            {"port": 32000, "service": "ns/a", "localEndpoints": 2, "serving": True},
            {
                "port": 32001,
                "service": "ns/b",
                "localEndpoints": 0,
                "serving": False,
                "error": "[Errno 98] Address already in use",
            },
        ],
    }
    render_status(snapshot, console)
    text = out.getvalue()
    assert "health check :32000 ns/a: 2 local endpoints, serving 200" in text
    assert "health check :32001 ns/b: 0 local endpoints, not serving ([Errno 98]" in text
