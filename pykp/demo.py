"""`pykp demo`: the whole node proxy on a lab, with real connections, in one command.

Builds a namespace lab (a node, backend pods with HTTP servers, a client pod), runs
`pykp run` in the node namespace on a services file with one service per policy, opens
connections from the client pod to every service, and reports which backend answered each.
Everything is torn down afterwards, also on failure. Needs root.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from pykp.lab import Lab

HEALTHZ = "127.0.0.1:10256"
METRICS = "127.0.0.1:10249"

# One service per policy, all on the same three backend pods (10.244.0.10-12 in a Lab).
DEMO_SERVICES = """
services:
{services}
"""

DEMO_POLICIES: tuple[tuple[str, str, str], ...] = (
    ("web-random", "10.96.0.10", "random"),
    ("web-rr", "10.96.0.11", "round-robin"),
    ("web-maglev", "10.96.0.12", "maglev"),
    ("web-leastconn", "10.96.0.13", "least-conn"),
)


def demo_services_yaml(backends: Sequence[str], port: int = 8080) -> str:
    endpoints = "".join(f"\n      - {{ip: {ip}, nodeName: node}}" for ip in backends)
    services = "".join(
        f"""
  - name: {name}
    clusterIP: {vip}
    policy: {policy}
    ports: [{{port: 80, targetPort: {port}}}]
    endpoints:{endpoints}"""
        for name, vip, policy in DEMO_POLICIES
    )
    return DEMO_SERVICES.format(services=services)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class LabAgent:
    """`pykp run` inside a lab's node namespace, fed by a services file."""

    def __init__(self, lab: Lab, services_file: Path, *extra: str) -> None:
        self.lab = lab
        self.services_file = services_file
        self.extra: tuple[str, ...] = extra
        self.proc: subprocess.Popen[Any] | None = None
        self.log = services_file.with_suffix(".log")

    def start(self, timeout: float = 20.0) -> None:
        argv = [
            sys.executable, "-m", "pykp", "run",
            "--services", str(self.services_file),
            "--hostname-override", "node",
            "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48",
            "--healthz-bind-address", HEALTHZ,
            "--metrics-bind-address", METRICS,
            "--min-sync-period", "0.1",
            *self.extra,
        ]  # fmt: skip
        with self.log.open("a") as log:
            self.proc = self.lab.popen("node", argv, stdout=log, stderr=subprocess.STDOUT)
        if not wait_for(self.synced, timeout=timeout):
            self.stop()
            raise RuntimeError(f"pykp run did not become ready:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def get(self, address: str, path: str) -> tuple[int, str]:
        """GET one of the agent's endpoints from inside the node namespace."""
        with self.lab.in_namespace("node"):
            try:
                with urllib.request.urlopen(f"http://{address}{path}", timeout=2) as r:
                    return int(r.status), r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                return 0, ""

    def healthy(self) -> bool:
        status, body = self.get(HEALTHZ, "/healthz")
        return status == 200 and json.loads(body).get("lastUpdated") is not None

    def synced(self) -> bool:
        """Healthy and past its first sync: the rules hold the services."""
        return self.healthy() and self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        _, text = self.get(METRICS, "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, label_text = series.partition("{")
            if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def write_services(self, text: str) -> None:
        """Replace the services file and wait until the agent has synced it."""
        before = self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        tmp = self.services_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.services_file)
        if not wait_for(
            lambda: self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > before,
            timeout=15,
        ):
            raise RuntimeError(f"no sync after the services file changed:\n{self.log.read_text()[-3000:]}")


def http_get(lab: Lab, pod: str, host: str, port: int = 80, timeout: float = 2.0) -> str:
    """One HTTP request on a new connection from `pod`; the answering backend's name."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.in_namespace(pod):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode().rpartition("\r\n\r\n")[2].strip()


@dataclass(frozen=True)
class DemoResult:
    """Where each service's connections went, and what the datapath counted."""

    connections: int
    by_service: dict[str, Counter[str]]
    queued_packets: float
    seconds: float


def run_demo(connections: int = 60, console: Console | None = None) -> DemoResult:
    """Build the lab, run the agent, connect `connections` times to each service."""
    say = console.print if console else (lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="pykp-demo-") as tmp, Lab(backends=3, clients=1) as lab:
        say("[bold]lab[/]: node, 3 backend pods (HTTP on :8080), 1 client pod")
        lab.start_http_servers(port=8080)
        path = Path(tmp) / "services.yaml"
        path.write_text(demo_services_yaml([pod.ipv4 for pod in lab.backend_pods]))
        agent = LabAgent(lab, path)
        agent.start()
        say(f"[bold]pykp run[/] is up in the node namespace (log: {agent.log.name})")
        try:
            started = time.monotonic()
            by_service: dict[str, Counter[str]] = {}
            for name, vip, _ in DEMO_POLICIES:
                by_service[name] = Counter(http_get(lab, "client-0", vip) for _ in range(connections))
            seconds = time.monotonic() - started
            queued = agent.metric("pykp_queue_packets_total")
        finally:
            agent.stop()
    return DemoResult(connections, by_service, queued, seconds)


def render_demo(result: DemoResult, console: Console) -> None:
    table = Table(title="pykp demo: which backend answered", box=box.SIMPLE_HEAVY)
    table.add_column("service")
    table.add_column("policy")
    table.add_column("backend")
    table.add_column("connections", justify="right")
    table.add_column("share", justify="right")
    policies = {name: policy for name, _, policy in DEMO_POLICIES}
    for service, counts in result.by_service.items():
        for i, (backend, n) in enumerate(sorted(counts.items())):
            table.add_row(
                service if i == 0 else "",
                policies[service] if i == 0 else "",
                backend,
                str(n),
                f"{100 * n / result.connections:.0f} %",
            )
    console.print(table)
    total = result.connections * len(result.by_service)
    console.print(
        f"{total} connections in {result.seconds:.1f} s; {result.queued_packets:.0f} packets went "
        "to user space (one per connection: the kernel carried the rest)"
    )
