"""`pykp demo`: the whole node proxy on a lab, with real connections, in one command.

Builds a namespace lab (a node, backend pods with HTTP servers, a client pod), runs
`pykp run` in the node namespace on a services file with one service per policy, opens
connections from the client pod to every service, and reports which backend answered each.
Everything is torn down afterwards, also on failure. Needs root.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import LabAgent, http_get

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


@dataclass(frozen=True)
class DemoResult:
    """Where each service's connections went, and what the datapath counted."""

    connections: int
    by_service: dict[str, Counter[str]]
    queued_packets: float
    seconds: float


def run_demo(connections: int = 60, console: Console | None = None) -> DemoResult:
    """Build the lab, run the agent, connect `connections` times to each service."""

    def say(text: str) -> None:
        if console is not None:
            console.print(text)

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
                by_service[name] = Counter(
                    http_get(lab, "client-0", vip) for _ in range(connections)
                )
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
        f"{total} connections in {result.seconds:.1f} s; {result.queued_packets:.0f} first "
        "packets went to user space (one per Maglev and least-conn connection; random ones "
        "are decided in the kernel, as kube-proxy's nftables mode does, and round-robin "
        "ones rotate there); the kernel carried every other packet"
    )
