"""End to end: the kernel's conntrack is the source of truth for live flows.

A real agent on a lab node follows the kernel's conntrack events. Least-connections then
counts active connections as IPVS `lc` does: a closed connection frees its backend at
once (before, every first packet counted for two minutes), and `/metrics` and
`pykp flows` count exactly what the kernel holds.

Runs as root (CI runs as root).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import METRICS, TCP_ECHO, wait_for
from pykp.labs.lab_agent import LabAgent as Node
from pykp.self_command import pykp_command

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

VIP = "10.96.0.20"
PORT = 7000
BACKENDS = ["10.244.0.10", "10.244.0.11", "10.244.0.12"]


def services_yaml(backends: list[str]) -> str:
    endpoints = "\n".join(f"      - {{ip: {ip}, nodeName: node}}" for ip in backends)
    return f"""
services:
  - name: lc
    clusterIP: {VIP}
    policy: least-conn
    ports: [{{name: echo, port: {PORT}, targetPort: {PORT}}}]
    endpoints:
{endpoints}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=1) as lab:
        for pod in lab.backend_pods:
            lab.popen(pod, ["python3", "-c", TCP_ECHO, pod.name, str(PORT)])
        yield lab


@pytest.fixture()
def node(lab: Lab, tmp_path: object) -> Iterator[Node]:
    from pathlib import Path

    path = Path(str(tmp_path)) / "services.yaml"
    path.write_text(services_yaml(BACKENDS[:1]))
    node = Node(lab, path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def open_connection(lab: Lab) -> tuple[socket.socket, str]:
    """A connection to the service from the client pod, and the backend that answers."""
    with lab.in_namespace("client-0"):
        s = socket.create_connection((VIP, PORT), timeout=3)
    s.sendall(b"hello\n")
    answer = s.makefile("rb").readline().decode().split()
    return s, answer[0]


def flows_cli(lab: Lab, *args: str) -> dict[str, object]:
    """`pykp flows --json` as a user runs it on the node."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.ns("node"), *pykp_command("flows"), "--json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    report = json.loads(out)
    assert isinstance(report, dict)
    return report


def active_flows_metric(node: Node, backend_ip: str) -> float:
    return node.metric("pykp_backend_active_flows", backend=f"{backend_ip}:{PORT}")


def test_least_conn_counts_live_connections_and_a_close_frees_them_at_once(
    lab: Lab, node: Node
) -> None:
    with ExitStack() as held:
        # Ten long connections, all on the only backend there is.
        for _ in range(10):
            s, backend = open_connection(lab)
            held.callback(s.close)
            assert backend == "backend-0"
        assert wait_for(lambda: active_flows_metric(node, BACKENDS[0]) == 10, timeout=5), (
            f"/metrics counts the 10 live flows: {active_flows_metric(node, BACKENDS[0])}"
        )
        report = flows_cli(lab, "--service", "default/lc")
        assert report["total"] == 10
        per_backend = {row["backend"]: row["flows"] for row in report["perBackend"]}  # type: ignore[index, union-attr]
        assert per_backend == {f"{BACKENDS[0]}:{PORT}": 10}
        states = {row["state"] for row in report["flows"]}  # type: ignore[index, union-attr]
        assert states == {"ESTABLISHED"}
        # Two more backends join while the ten are open.
        node.write_services(services_yaml(BACKENDS))
    # The ten are closed (FIN). Within a second, their backend is free again...
    closed_at = time.monotonic()
    assert wait_for(lambda: active_flows_metric(node, BACKENDS[0]) == 0, timeout=1.0), (
        f"still counted after the close: {active_flows_metric(node, BACKENDS[0])}"
    )
    assert time.monotonic() - closed_at < 1.0
    # ... so the next 30 new connections spread evenly over the three backends (before,
    # the closed ones kept counting for two minutes and backend-0 got ~3 of 30).
    with ExitStack() as held:
        seen: Counter[str] = Counter()
        for _ in range(30):
            s, backend = open_connection(lab)
            held.callback(s.close)
            seen[backend] += 1
        assert seen == Counter({"backend-0": 10, "backend-1": 10, "backend-2": 10})
        assert wait_for(
            lambda: all(active_flows_metric(node, ip) == 10 for ip in BACKENDS), timeout=5
        )
        report = flows_cli(lab, "--backend", BACKENDS[1])
        assert report["total"] == 10
        assert all(row["backend"] == f"{BACKENDS[1]}:{PORT}" for row in report["flows"])  # type: ignore[index, union-attr]
        assert all(row["age"] is not None and row["age"] >= 0 for row in report["flows"])  # type: ignore[index, union-attr]
    assert wait_for(lambda: sum(active_flows_metric(node, ip) for ip in BACKENDS) == 0, timeout=2)
    assert node.metric("pykp_conntrack_service_flows_total", event="ended") >= 40
    status = subprocess.run(
        ["ip", "netns", "exec", lab.ns("node"), *pykp_command("status")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "conntrack follower: " in status and " ended; 0 event losses" in status


def test_flows_of_the_kernel_path_and_of_a_previous_agent_are_counted(lab: Lab, node: Node) -> None:
    """Connections opened while no agent runs (the kernel path decides) are counted by the
    next agent's first listing, and their backends weigh in least-conn."""
    node.write_services(services_yaml(BACKENDS))
    node.stop()
    with ExitStack() as held:
        backends: Counter[str] = Counter()
        for _ in range(6):
            s, backend = open_connection(lab)
            held.callback(s.close)
            backends[backend] += 1
        node.start()
        assert wait_for(
            lambda: sum(active_flows_metric(node, ip) for ip in BACKENDS) == 6, timeout=5
        ), "the new agent's first listing adopts the six"
        for name, count in backends.items():
            ip = BACKENDS[int(name.rsplit("-", 1)[1])]
            assert active_flows_metric(node, ip) == count
        assert node.metric("pykp_conntrack_service_flows_total", event="adopted") >= 6


def test_a_bad_flows_query_is_a_clear_error(lab: Lab, node: Node) -> None:
    status, body = node.get(METRICS, "/flows?backend=not-an-address")
    assert status == 400
    assert "not IP or IP:port" in body
    result = subprocess.run(
        ["ip", "netns", "exec", lab.ns("node"), *pykp_command("flows"), "--backend", "x:y:z"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "HTTP 400" in result.stderr
    assert "Traceback" not in result.stderr
