"""`pykp explain`: offline from a services file (CliRunner), through the agent's /explain
(an in-process agent with a real engine and fake kernel pieces), and the report's
eligibility reasons. What explain names must be what the engine then decides."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_unit import Harness, StaticSource
from typer.testing import CliRunner

from pykp.agent.plan import apply_to_engine, service_ports_to_engine, services_file_to_engine
from pykp.cli.app import app
from pykp.observe.explain import NodeView, explain_report
from pykp.observe.metrics import MetricsServer
from pykp.sources.services_file import load_services_text

pytest.importorskip("pykp._fastpath")

runner = CliRunner()

SERVICES = """\
services:
  - name: web-rr
    clusterIP: 10.96.0.10
    policy: round-robin
    ports: [{name: http, port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10, nodeName: node-a}
      - {ip: 10.244.0.11, nodeName: node-b}
      - {ip: 10.244.0.12, nodeName: node-b, ready: false, serving: true, terminating: true}
  - name: web-maglev
    clusterIP: 10.96.0.12
    policy: maglev
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10}
      - {ip: 10.244.0.11}
      - {ip: 10.244.0.12}
  - name: web-lc
    clusterIP: 10.96.0.13
    policy: least-conn
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10}
      - {ip: 10.244.0.11, weight: 3}
  - name: web-random
    clusterIP: 10.96.0.14
    policy: random
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10}
      - {ip: 10.244.0.11, weight: 3}
  - name: draining
    clusterIP: 10.96.0.15
    policy: round-robin
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.20, ready: false, serving: true, terminating: true}
      - {ip: 10.244.0.21, ready: false, serving: false, terminating: true}
      - {ip: "fd00::21"}
  - name: sticky
    clusterIP: 10.96.0.16
    policy: round-robin
    sessionAffinity: ClientIP
    sessionAffinityTimeoutSeconds: 60
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10}
      - {ip: 10.244.0.11}
"""


@pytest.fixture
def services_file(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(SERVICES)
    return path


def explain_json(path: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["explain", "--services", str(path), "--json", *args])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def only(report: dict[str, Any]) -> dict[str, Any]:
    assert len(report["services"]) == 1, report["services"]
    service: dict[str, Any] = report["services"][0]
    return service


def offline_engine(path: Path, seed: int = 0) -> Any:
    """An engine as `pykp explain --services` builds it (the agent's defaults)."""
    from pykp._fastpath import Engine

    catalog, problems = load_services_text(path.read_text(), str(path))
    assert not problems
    engine = Engine(seed=seed)
    apply_to_engine(engine, services_file_to_engine(catalog))
    return engine


# --- offline, every policy ----------------------------------------------------------------


def test_round_robin_names_the_first_backend_and_why_the_others_are_not_next(
    services_file: Path,
) -> None:
    # pykp's reader rotates: its position is the engine's, and so is the backend named.
    service = only(
        explain_json(
            services_file, "default/web-rr:http", "--node", "node-a", "--no-kernel-round-robin"
        )
    )
    reasons = {b["address"]: (b["eligible"], b["reason"], b["local"]) for b in service["backends"]}
    assert reasons == {
        "10.244.0.10:8080": (True, "ready", True),
        "10.244.0.11:8080": (True, "ready", False),
        "10.244.0.12:8080": (False, "terminating", False),
    }
    assert service["state"]["roundRobin"] == {
        "ticket": 0,
        "cycle": 2,
        "position": 0,
        "next": "10.244.0.10:8080",
    }
    # A fresh engine's first connection: what the engine decides for it.
    engine = offline_engine(services_file)
    decided = engine.decide("10.244.0.101", 40000, "10.96.0.10", 80).backend
    assert service["decision"]["backend"] == f"{decided[0]}:{decided[1]}"
    assert service["decision"]["decidedBy"] == "policy"


def test_round_robin_in_the_kernel_shows_the_rotation_and_names_no_backend(
    services_file: Path,
) -> None:
    """`pykp run`'s default: the kernel rotates, over the slots the rules hold, on a
    counter pykp cannot read; session affinity keeps the reader, which names its pick."""
    service = only(explain_json(services_file, "default/web-rr:http", "--node", "node-a"))
    assert service["state"] == {
        "kernelRoundRobin": {"rotation": ["10.244.0.10:8080", "10.244.0.11:8080"]}
    }
    assert service["decision"]["backend"] is None
    assert service["decision"]["decidedBy"] == "kernel"
    assert "--no-kernel-round-robin" in service["decision"]["why"]
    text = runner.invoke(app, ["explain", "-f", str(services_file), "default/web-rr"]).stdout
    assert "round-robin in the kernel over 2 slots" in text
    assert "the next connection from a new client gets the next slot of the kernel's" in text

    sticky = only(explain_json(services_file, "default/sticky", "--client", "10.1.0.7"))
    assert sticky["decision"]["decidedBy"] == "policy"
    assert sticky["decision"]["backend"] == sticky["state"]["roundRobin"]["next"]


def test_the_kernel_rotation_interleaves_weights_in_the_rules_order(tmp_path: Path) -> None:
    from pykp.agent.sync import rotation_slots

    path = tmp_path / "weighted.yaml"
    path.write_text(
        "services:\n"
        "  - name: weighted\n"
        "    clusterIP: 10.96.0.30\n"
        "    policy: round-robin\n"
        "    ports: [{port: 80, targetPort: 8080}]\n"
        "    endpoints: [{ip: 10.244.0.10, weight: 2}, {ip: 10.244.0.11}]\n"
    )
    service = only(explain_json(path, "default/weighted"))
    rotation = service["state"]["kernelRoundRobin"]["rotation"]
    assert rotation == ["10.244.0.10:8080", "10.244.0.11:8080", "10.244.0.10:8080"]
    # What the sync writes into the service's slots, in the order its counter visits them.
    engine = offline_engine(path)
    (pool, _), ids = engine.pools()["default/weighted"], engine.backend_ids()
    assert [f"{ip}:{port}" for ip, port in rotation_slots(pool, ids)] == rotation


def test_a_name_without_a_port_explains_every_port_and_without_namespace_is_default(
    services_file: Path,
) -> None:
    by_key = explain_json(services_file, "web-rr")
    assert [s["service"] for s in by_key["services"]] == ["default/web-rr:http"]
    by_frontend = explain_json(services_file, "10.96.0.10:80/tcp")
    assert [s["service"] for s in by_frontend["services"]] == ["default/web-rr:http"]


def test_maglev_needs_the_client_port_and_then_names_what_the_engine_decides(
    services_file: Path,
) -> None:
    without_port = only(explain_json(services_file, "default/web-maglev", "--client", "10.1.0.7"))
    assert without_port["decision"]["backend"] is None
    assert without_port["decision"]["decidedBy"] == "undetermined"
    assert "port" in without_port["decision"]["why"]
    slots = [b["maglevSlots"] for b in without_port["backends"]]
    assert sum(slots) == without_port["state"]["maglev"]["tableSize"] == 65537

    engine = offline_engine(services_file)
    seen = set()
    for port in range(40000, 40012):
        service = only(explain_json(services_file, "10.96.0.12:80", "--client", f"10.1.0.7:{port}"))
        ip, backend_port = engine.decide("10.1.0.7", port, "10.96.0.12", 80).backend
        assert service["decision"]["backend"] == f"{ip}:{backend_port}", port
        assert service["state"]["maglev"]["owner"] == service["decision"]["backend"]
        assert isinstance(service["state"]["maglev"]["slot"], int)
        seen.add(service["decision"]["backend"])
    assert len(seen) >= 2, "twelve source ports all on one backend"


def test_least_conn_shows_the_counts_and_picks_by_weight(services_file: Path) -> None:
    service = only(explain_json(services_file, "default/web-lc", "--client", "10.1.0.7:1"))
    assert service["state"]["leastConn"] == {"10.244.0.10:8080": 0, "10.244.0.11:8080": 0}
    assert service["decision"]["decidedBy"] == "policy"
    assert service["decision"]["backend"] in service["state"]["leastConn"]


def test_random_names_no_backend_but_the_shares(services_file: Path) -> None:
    service = only(explain_json(services_file, "default/web-random"))
    assert service["decision"]["backend"] is None
    assert service["decision"]["decidedBy"] == "random"
    assert "10.244.0.10:8080 25%" in service["decision"]["why"]
    assert "10.244.0.11:8080 75%" in service["decision"]["why"]


def test_the_terminating_fallback_serves_when_no_endpoint_is_ready(services_file: Path) -> None:
    service = only(explain_json(services_file, "default/draining", "--client", "10.1.0.7:9"))
    reasons = {b["address"]: (b["eligible"], b["reason"]) for b in service["backends"]}
    assert reasons == {
        "10.244.0.20:8080": (True, "terminating-fallback"),
        "10.244.0.21:8080": (False, "not-serving"),
    }
    # The IPv6 endpoint never reaches the engine: the service has no IPv6 address.
    assert [(e["address"], e["reason"]) for e in service["excluded"]] == [
        ("[fd00::21]:8080", "other-family")
    ]
    assert service["fallback"] is True
    assert service["decision"]["backend"] == "10.244.0.20:8080"


def test_the_plain_text_names_the_backend_and_the_reasons(services_file: Path) -> None:
    result = runner.invoke(
        app, ["explain", "-f", str(services_file), "default/draining", "--client", "10.1.0.7"]
    )
    assert result.exit_code == 0, result.output
    assert "terminating: used because no endpoint is ready" in result.stdout
    assert "the next connection from 10.1.0.7 gets 10.244.0.20:8080" in result.stdout


# --- errors: a message and exit 1, never a traceback ----------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["default/nope"], "no service 'default/nope'"),
        (["10.96.0.99:80"], "no service at 10.96.0.99:80/TCP"),
        (["web-rr", "--client", "10.1.2"], "client '10.1.2' is not IP or IP:port"),
        (["web-rr", "--client", "10.1.2.3:0"], "client port '0'"),
        (["web-rr", "--client", "fd00::1"], "different address families"),
        (["10.96.0.10:80/ICMP"], "protocol 'ICMP'"),
        (["10.96.0.10"], "needs its port"),
    ],
)
def test_a_bad_question_is_one_line_on_stderr(
    services_file: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["explain", "-f", str(services_file), *args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_an_agent_that_does_not_answer_is_one_line_on_stderr() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = runner.invoke(app, ["explain", "web", "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert "is `pykp run` running?" in result.stderr
    assert "Traceback" not in result.output


# --- traffic policy and topology ------------------------------------------------------------


LOCAL = """\
services:
  - name: api
    clusterIP: 10.96.0.20
    policy: round-robin
    internalTrafficPolicy: Local
    ports: [{port: 443, targetPort: 8443}]
    endpoints:
      - {ip: 10.244.1.20, nodeName: node-a}
      - {ip: 10.244.2.20, nodeName: node-b}
"""


def test_a_local_traffic_policy_leaves_other_nodes_endpoints_out_or_drops(
    tmp_path: Path,
) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(LOCAL)
    service = only(explain_json(path, "default/api", "--node", "node-a"))
    assert [(b["address"], b["local"]) for b in service["backends"]] == [("10.244.1.20:8443", True)]
    assert service["excluded"] == [
        {
            "address": "10.244.2.20:8443",
            "nodeName": "node-b",
            "zone": None,
            "reason": "traffic-policy-local",
            "why": "on node node-b, not this one (internalTrafficPolicy: Local)",
        }
    ]
    assert service["trafficPolicy"]["applied"] is True
    assert service["decision"]["backend"] == "10.244.1.20:8443"
    # A node without an endpoint of its own drops, as kube-proxy does (never sends off).
    elsewhere = only(explain_json(path, "10.96.0.20:443", "--node", "node-c"))
    assert elsewhere["backends"] == []
    assert {e["reason"] for e in elsewhere["excluded"]} == {"traffic-policy-local"}
    assert elsewhere["decision"]["backend"] is None
    assert elsewhere["decision"]["decidedBy"] == "drop"


def test_topology_hints_leave_other_zones_endpoints_out_with_why() -> None:
    from pykp._fastpath import Engine
    from pykp.model import EndpointSpec, ServicePort, ServiceSpec

    spec = ServiceSpec(
        name="hinted",
        cluster_ips=("10.96.0.21",),
        ports=(ServicePort(port=80, target_port=8080),),
        policy="round-robin",
        endpoints=(
            EndpointSpec(
                ip="10.244.1.21", node_name="node-a", zone="zone-a", zone_hints=("zone-a",)
            ),
            EndpointSpec(
                ip="10.244.2.21", node_name="node-b", zone="zone-b", zone_hints=("zone-b",)
            ),
        ),
    )
    node = NodeView("node-a", (), traffic_policies=True, zone="zone-a")
    engine = Engine(seed=0)
    built = service_ports_to_engine(spec, (), "node-a", traffic_policies=True, zone="zone-a")
    apply_to_engine(engine, built)
    specs = {spec.key: spec}
    report = explain_report(engine, {s.name: s for s in built}, specs.get, node, "default/hinted")
    service = only(report)
    assert [b["address"] for b in service["backends"]] == ["10.244.1.21:8080"]
    assert [(e["address"], e["reason"]) for e in service["excluded"]] == [
        ("10.244.2.21:8080", "topology")
    ]


# --- through the agent's /explain -----------------------------------------------------------


@pytest.fixture
def agent_server(tmp_path: Path) -> Iterator[tuple[Harness, str]]:
    # pykp's reader rotates round-robin (what explain names is what the engine decides).
    harness = Harness(StaticSource(SERVICES), tmp_path, config={"kernel_round_robin": False})
    harness.agent.sync()
    server = MetricsServer(
        "127.0.0.1:0", harness.agent.registry.render, explain=harness.agent.explain
    )
    server.start()
    try:
        host, port = server.bound_address
        yield harness, f"{host}:{port}"
    finally:
        server.stop()


def agent_explain(address: str, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["explain", "--address", address, "--json", *args])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_the_agent_names_what_the_next_connections_get_and_explain_moves_nothing(
    agent_server: tuple[Harness, str],
) -> None:
    harness, address = agent_server
    engine = harness.agent.engine

    def decide(port: int) -> tuple[str, int] | None:
        return engine.decide("10.244.0.101", port, "10.96.0.10", 80).backend

    for port in range(40000, 40005):
        # Asked twice: asking does not take the turn.
        first = only(agent_explain(address, "default/web-rr:http", "--client", "10.244.0.101"))
        again = only(agent_explain(address, "default/web-rr:http", "--client", "10.244.0.101"))
        assert first["decision"] == again["decision"]
        ip, backend_port = decide(port) or ("", 0)
        assert first["decision"]["backend"] == f"{ip}:{backend_port}"
    assert only(agent_explain(address, "web-rr"))["state"]["roundRobin"]["ticket"] == 5


def test_the_agent_says_where_its_kernel_rotates_round_robin(tmp_path: Path) -> None:
    """The agent's own switch decides the answer: by default the kernel rotates; with
    --no-kernel-round-robin the reader does, and explain names its next backend."""
    for kernel_round_robin, decided_by in ((True, "kernel"), (False, "policy")):
        harness = Harness(
            StaticSource(SERVICES),
            tmp_path / str(kernel_round_robin),
            config={"kernel_round_robin": kernel_round_robin},
        )
        harness.agent.sync()
        service = only(harness.agent.explain("default/web-rr:http", "10.244.0.101"))
        assert service["decision"]["decidedBy"] == decided_by
        assert ("kernelRoundRobin" in service["state"]) is kernel_round_robin
        assert (service["decision"]["backend"] is None) is kernel_round_robin


def test_the_agent_shows_a_clients_affinity_and_its_flow(
    agent_server: tuple[Harness, str],
) -> None:
    harness, address = agent_server
    decided = harness.agent.engine.decide(
        "10.244.0.7", 5000, "10.96.0.16", 80, now=time.monotonic()
    ).backend
    assert decided is not None
    pinned = f"{decided[0]}:{decided[1]}"
    same_flow = only(agent_explain(address, "default/sticky", "--client", "10.244.0.7:5000"))
    assert same_flow["flow"]["backend"] == pinned and same_flow["flow"]["state"] == "SYN_SENT"
    assert same_flow["decision"]["decidedBy"] == "flow"
    new_port = only(agent_explain(address, "default/sticky", "--client", "10.244.0.7:5001"))
    assert new_port["flow"] is None
    assert new_port["affinity"]["backend"] == pinned
    assert 0 < new_port["affinity"]["expiresIn"] <= 60
    assert new_port["decision"] == {
        "backend": pinned,
        "decidedBy": "affinity",
        "why": new_port["decision"]["why"],
    }
    other_client = only(agent_explain(address, "default/sticky", "--client", "10.244.0.8"))
    assert other_client["affinity"] is None
    assert other_client["decision"]["backend"] != pinned, "round-robin moved on"


def test_the_agents_explain_answers_errors_with_a_status_and_json(
    agent_server: tuple[Harness, str],
) -> None:
    _, address = agent_server
    for query, status in (
        ("service=default/nope", 404),
        ("service=web-rr&client=x", 400),
        ("", 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{address}/explain?{query}", timeout=5)
        assert caught.value.code == status
        assert "error" in json.load(caught.value)
    result = runner.invoke(app, ["explain", "--address", address, "default/nope"])
    assert result.exit_code == 1
    assert "no service 'default/nope' on this node" in result.stderr


LOCAL_ELSEWHERE = """
services:
  - name: ingress
    namespace: shop
    clusterIP: 10.96.0.60
    externalIPs: [203.0.113.60]
    policy: round-robin
    externalTrafficPolicy: Local
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10, nodeName: node-2}, {ip: 10.244.0.11, nodeName: node-3}]
"""


def test_a_pod_client_takes_the_short_circuit_an_outside_one_is_dropped(tmp_path: Path) -> None:
    """externalTrafficPolicy Local, no endpoint on this node: explain tells a pod (inside
    --cluster-cidr) from an outside client, as the datapath does."""
    path = tmp_path / "local.yaml"
    path.write_text(LOCAL_ELSEWHERE)
    common = ("203.0.113.60:80", "--node", "node", "--cluster-cidr", "10.244.0.0/16")

    pod = only(explain_json(path, *common, "--client", "10.244.0.101:40000"))
    assert pod["service"] == "shop/ingress"
    assert pod["shortCircuitFrom"] == "shop/ingress#external"
    assert pod["decision"]["backend"] == "10.244.0.10:8080"

    outside = only(explain_json(path, *common, "--client", "192.0.2.9:40000"))
    assert outside["service"] == "shop/ingress#external"
    assert outside["shortCircuitFrom"] is None
    assert outside["decision"]["decidedBy"] == "drop"

    # Without --cluster-cidr the pod is an outside client too.
    unknown = only(
        explain_json(path, "203.0.113.60:80", "--node", "node", "--client", "10.244.0.101")
    )
    assert unknown["decision"]["decidedBy"] == "drop"
