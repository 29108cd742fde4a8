"""End to end: `pykp run` on a lab node, real clients in pod namespaces, real netfilter.

Runs as root (CI runs as root). One lab and one agent serve the module; tests that change
the services file put it back.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import (
    TCP_ECHO,
    connect_error,
    distribution,
    http_get,
    udp_ask,
    udp_socket,
    wait_for,
)
from pykp.labs.lab_agent import LabAgent as Node

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

BACKENDS = ["10.244.0.10", "10.244.0.11", "10.244.0.12"]
BACKENDS6 = ["fd00:10:244::10", "fd00:10:244::11", "fd00:10:244::12"]


def endpoints(ips: list[str], indent: str = "      ") -> str:
    return "\n".join(f"{indent}- {{ip: {ip}, nodeName: node}}" for ip in ips)


def services_yaml(udp_backends: list[str] = BACKENDS, empty_backends: list[str] = ()) -> str:  # type: ignore[assignment]
    return f"""
services:
  - name: web-rr
    clusterIP: 10.96.0.10
    externalIPs: [203.0.113.10]
    policy: round-robin
    ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
    endpoints:
{endpoints(BACKENDS)}
  - name: web-random
    clusterIP: 10.96.0.11
    policy: random
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
{endpoints(BACKENDS)}
  - name: web-maglev
    clusterIP: 10.96.0.12
    policy: maglev
    hashKey: source-ip
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
{endpoints(BACKENDS)}
  - name: web-sticky
    clusterIP: 10.96.0.13
    policy: round-robin
    sessionAffinity: ClientIP
    sessionAffinityTimeoutSeconds: 3
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
{endpoints(BACKENDS)}
  - name: web-empty
    clusterIP: 10.96.0.14
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
{endpoints(list(empty_backends)) if empty_backends else "      []"}
  - name: web-dual
    clusterIPs: [10.96.0.15, "fd00:10:96::15"]
    policy: round-robin
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
{endpoints(BACKENDS + BACKENDS6)}
  - name: web-terminating
    clusterIP: 10.96.0.16
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints:
      - {{ip: 10.244.0.10, ready: false, serving: true, terminating: true}}
      - {{ip: 10.244.0.11, ready: true}}
  - name: echo
    clusterIP: 10.96.0.17
    policy: least-conn
    ports: [{{port: 7000, targetPort: 7000}}]
    endpoints:
{endpoints(BACKENDS)}
  - name: dns
    clusterIP: 10.96.0.53
    policy: round-robin
    ports: [{{port: 53, targetPort: 5353, protocol: UDP}}]
    endpoints:
{endpoints(udp_backends)}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=2) as lab:
        lab.start_http_servers(port=8080)
        lab.start_udp_echo(port=5353)
        for pod in lab.backend_pods:
            lab.popen(pod, ["python3", "-c", TCP_ECHO, pod.name, "7000"])
        yield lab


@pytest.fixture(scope="module")
def node(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    path = tmp_path_factory.mktemp("node") / "services.yaml"
    path.write_text(services_yaml())
    node = Node(lab, path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_a_client_pod_reaches_every_backend_round_robin(lab: Lab, node: Node) -> None:
    first = [http_get(lab, "client-0", "10.96.0.10") for _ in range(6)]
    assert sorted(set(first)) == ["backend-0", "backend-1", "backend-2"]
    assert first[:3] == first[3:6], f"round-robin repeats its cycle: {first}"
    counts = distribution(lab, "client-1", "10.96.0.10", 300)
    assert counts == {"backend-0": 100, "backend-1": 100, "backend-2": 100}


def test_random_spreads_like_kube_proxy(lab: Lab, node: Node) -> None:
    counts = distribution(lab, "client-0", "10.96.0.11", 300)
    assert set(counts) == {"backend-0", "backend-1", "backend-2"}
    # Chi-square, 2 degrees of freedom: 13.82 is the 0.999 quantile.
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 13.82, counts


# Extra client addresses for the Maglev test: one client pod, many sources.
MAGLEV_SOURCES = [f"10.244.0.{200 + i}" for i in range(12)]


def http_get_from(lab: Lab, pod: str, source: str, host: str, port: int = 80) -> str:
    """One HTTP request from `pod` on a new connection bound to the address `source`."""
    with lab.in_namespace(pod):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(3)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode().rpartition("\r\n\r\n")[2].strip()


@pytest.fixture
def many_sources(lab: Lab) -> Iterator[list[str]]:
    """MAGLEV_SOURCES added to client-0 (and routed to it by the node), removed after."""
    client = lab.host("client-0")
    added: list[str] = []
    try:
        for ip in MAGLEV_SOURCES:
            lab.exec(client, ["ip", "addr", "add", f"{ip}/32", "dev", "eth0"], check=True)
            added.append(ip)
            lab.exec(
                "node",
                ["ip", "route", "add", f"{ip}/32", "dev", str(client.host_ifname)],
                check=True,
            )
        yield list(MAGLEV_SOURCES)
    finally:
        for ip in added:
            lab.exec("node", ["ip", "route", "del", f"{ip}/32"])
            lab.exec(client, ["ip", "addr", "del", f"{ip}/32", "dev", "eth0"])


def test_maglev_sends_each_source_to_one_backend_and_sources_to_several(
    lab: Lab, node: Node, many_sources: list[str]
) -> None:
    """hashKey source-ip: a client address always reaches the same backend (its many
    connections, with as many source ports, are decided afresh each time: no flow-table
    hit can explain it), different addresses spread over the backends, and the backend is
    the one pykp's engine computes for that address on any node (same table everywhere)."""
    from pykp._fastpath import Engine
    from pykp.agent.plan import apply_to_engine, services_file_to_engine
    from pykp.sources.services_file import load_services_file

    seen = {
        source: [http_get_from(lab, "client-0", source, "10.96.0.12") for _ in range(4)]
        for source in many_sources
    }
    for source, backends in seen.items():
        assert len(set(backends)) == 1, f"{source} moved between backends: {backends}"
    chosen = {source: backends[0] for source, backends in seen.items()}
    assert len(set(chosen.values())) >= 2, f"every source went to one backend: {chosen}"

    # What any node computes: the agent's defaults (table size 65537, seed 0).
    assert node.services_file is not None
    services, problems = load_services_file(node.services_file)
    assert not problems
    engine = Engine()
    apply_to_engine(engine, services_file_to_engine(services, [lab.node_ip4], "node"))
    name_of = dict(zip(BACKENDS, ["backend-0", "backend-1", "backend-2"]))
    expected = {}
    for i, source in enumerate(many_sources):
        decision = engine.decide(source, 40000 + i, "10.96.0.12", 80)
        assert decision.backend is not None, decision.reason
        expected[source] = name_of[decision.backend[0]]
    assert chosen == expected


def test_only_the_first_packet_is_queued_and_flows_survive_a_restart(lab: Lab, node: Node) -> None:
    with lab.in_namespace("client-0"):
        s = socket.create_connection(("10.96.0.17", 7000), timeout=3)
    with s:
        f = s.makefile("rwb")

        def ask(line: str) -> str:
            f.write(line.encode() + b"\n")
            f.flush()
            return f.readline().decode().strip()

        backend = ask("hello").split()[0]
        queued = node.metric("pykp_queue_packets_total")
        for i in range(100):
            assert ask(f"ping {i}") == f"{backend} ping {i}"
        assert node.metric("pykp_queue_packets_total") == queued, (
            "established packets stay in the kernel"
        )

        # The agent goes away and comes back; the kernel keeps carrying the flow.
        node.stop()
        assert ask("during restart") == f"{backend} during restart"
        node.start()
        assert ask("after restart") == f"{backend} after restart"
    # One new connection to a service pykp's reader decides (Maglev) costs one queued
    # packet; one to a round-robin service (the kernel rotates) none.
    before = node.metric("pykp_queue_packets_total")
    assert http_get(lab, "client-0", "10.96.0.12") in {"backend-0", "backend-1", "backend-2"}
    assert node.metric("pykp_queue_packets_total") == before + 1
    assert http_get(lab, "client-0", "10.96.0.10") in {"backend-0", "backend-1", "backend-2"}
    assert node.metric("pykp_queue_packets_total") == before + 1


def test_udp_stream_keeps_its_backend_until_the_backend_goes(lab: Lab, node: Node) -> None:
    with udp_socket(lab, "client-0") as s:
        first = udp_ask(s, "10.96.0.53", 53)
        for _ in range(20):
            assert udp_ask(s, "10.96.0.53", 53) == first
        remaining = [
            ip
            for ip, name in zip(BACKENDS, ["backend-0", "backend-1", "backend-2"])
            if name != first
        ]
        node.write_services(services_yaml(udp_backends=remaining))
        try:
            moved = udp_ask(s, "10.96.0.53", 53)
            assert moved != first, "the stale UDP flow was not moved"
            assert udp_ask(s, "10.96.0.53", 53) == moved
        finally:
            node.write_services(services_yaml())


def test_nodeport_and_external_ip_from_outside(lab: Lab, node: Node) -> None:
    seen = {http_get(lab, "external", lab.node_ip4, 30080) for _ in range(6)}
    assert seen == {"backend-0", "backend-1", "backend-2"}
    seen = {http_get(lab, "external", "203.0.113.10", 80) for _ in range(6)}
    assert seen == {"backend-0", "backend-1", "backend-2"}


def test_ipv6_cluster_ip(lab: Lab, node: Node) -> None:
    seen = {http_get(lab, "client-0", "fd00:10:96::15") for _ in range(6)}
    assert seen == {"backend-0", "backend-1", "backend-2"}
    seen = {http_get(lab, "client-0", "10.96.0.15") for _ in range(6)}
    assert seen == {"backend-0", "backend-1", "backend-2"}


def test_session_affinity_holds_until_the_timeout_then_decides_afresh(lab: Lab, node: Node) -> None:
    """ClientIP affinity on a round-robin service (timeoutSeconds 3): without affinity
    every new connection moves on to the next backend; with it, the client stays put
    until the timeout, after which round-robin decides again (the next backend) and binds
    the client anew."""
    first = http_get(lab, "client-1", "10.96.0.13")
    held = [http_get(lab, "client-1", "10.96.0.13") for _ in range(10)]
    assert held == [first] * 10, "affinity holds within the timeout"
    time.sleep(3.5)  # the service's sessionAffinityTimeoutSeconds is 3
    after = http_get(lab, "client-1", "10.96.0.13")
    assert after != first, "an expired affinity still binds the client"
    again = [http_get(lab, "client-1", "10.96.0.13") for _ in range(5)]
    assert again == [after] * 5, "a new affinity binds the client again"


def test_no_endpoints_refuses_at_once_until_an_endpoint_appears(lab: Lab, node: Node) -> None:
    started = time.monotonic()
    assert connect_error(lab, "client-0", "10.96.0.14", 80) == "refused"
    assert time.monotonic() - started < 1.0
    # A port the service does not expose is refused too.
    assert connect_error(lab, "client-0", "10.96.0.10", 81) == "refused"
    node.write_services(services_yaml(empty_backends=["10.244.0.12"]))
    try:
        assert http_get(lab, "client-0", "10.96.0.14") == "backend-2"
    finally:
        node.write_services(services_yaml())


def test_terminating_endpoints_only_without_ready_ones(lab: Lab, node: Node) -> None:
    assert distribution(lab, "client-0", "10.96.0.16", 20) == {"backend-1": 20}


def test_cleanup_removes_every_pykp_rule_and_keeps_foreign_ones(lab: Lab, node: Node) -> None:
    ruleset = ["sh", "-c", "nft list ruleset; iptables-save; ip6tables-save"]
    lab.exec("node", ["nft", "add table inet foreign"], check=True)
    lab.exec(
        "node",
        ["nft", "add chain inet foreign pre { type filter hook prerouting priority -151; }"],
        check=True,
    )
    lab.exec("node", ["nft", "add rule inet foreign pre meta mark 0x77 counter"], check=True)
    lab.exec(
        "node",
        ["iptables", "-t", "mangle", "-A", "PREROUTING", "-s", "192.0.2.1", "-j", "ACCEPT"],
        check=True,
    )
    try:
        # A plain stop leaves the rules (like kube-proxy: established flows keep their NAT).
        assert node.stop() == 0
        assert "table inet pykp" in lab.exec("node", ruleset, check=True).stdout
        # `pykp cleanup` removes everything pykp installed, and nothing else.
        lab.exec("node", ["python3", "-m", "pykp", "cleanup"], check=True)
        out = lab.exec("node", ruleset, check=True).stdout
        assert "pykp" not in out.lower(), out
        assert "table inet foreign" in out and "192.0.2.1" in out
        # With --cleanup-on-exit a clean shutdown removes them itself.
        node.extra = ("--cleanup-on-exit",)
        node.start()
        assert http_get(lab, "client-0", "10.96.0.10") in {"backend-0", "backend-1", "backend-2"}
        assert node.stop() == 0
        out = lab.exec("node", ruleset, check=True).stdout
        assert "pykp" not in out.lower(), out
        assert "table inet foreign" in out and "192.0.2.1" in out
    finally:
        node.extra = ()
        lab.exec("node", ["nft", "delete table inet foreign"])
        lab.exec(
            "node",
            ["iptables", "-t", "mangle", "-D", "PREROUTING", "-s", "192.0.2.1", "-j", "ACCEPT"],
        )
        if node.proc is None:
            node.start()


def test_crafted_packets_never_crash_the_agent(lab: Lab, node: Node) -> None:
    script = r"""
import sys
from scapy.all import IP, IPv6, TCP, UDP, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPOption_NOP, Raw, fragment, send, sr1, conf
conf.verb = 0
SRC4, SRC6 = sys.argv[1], sys.argv[2]
answers = {}
syn = lambda: TCP(sport=40000 + len(answers), dport=80, flags="S", seq=1)
r = sr1(IP(src=SRC4, dst="10.96.0.10", options=[IPOption_NOP()] * 4) / syn(), timeout=2)
answers["ipv4_options"] = bool(r and r.haslayer(TCP) and r[TCP].flags & 0x12 == 0x12)
# scapy does not match replies to requests with extension headers: the test reads conntrack.
send(IPv6(src=SRC6, dst="fd00:10:96::15") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=40999, dport=80, flags="S"))
frags = fragment(IP(src=SRC4, dst="10.96.0.53") / UDP(sport=5555, dport=53) / Raw(b"x" * 3000), fragsize=1000)
answers["fragments_sent"] = len(frags)
send(frags)
# Truncated and inconsistent headers: the kernel or pykp drops them, and pykp lives on.
send(IP(src=SRC4, dst="10.96.0.10", proto=6) / Raw(b"\x00\x01"))
send(IP(src=SRC4, dst="10.96.0.10", ihl=15) / TCP(dport=80, flags="S"))
send(IP(src=SRC4, dst="10.96.0.10", len=20) / TCP(dport=80, flags="S"))
send(IP(src=SRC4, dst="10.96.0.10") / TCP(dport=80, flags="S", dataofs=15))
send(IPv6(src=SRC6, dst="fd00:10:96::15", plen=4) / TCP(dport=80, flags="S"))
send(IP(src=SRC4, dst="10.96.0.53") / UDP(dport=53, len=4000) / Raw(b"x"))
print(answers)
"""
    client = lab.host("client-0")
    out = lab.exec(
        client, ["python3", "-c", script, client.ipv4, client.ipv6], check=True, timeout=60
    ).stdout
    answers = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own script's dict
    assert answers["ipv4_options"], out
    flows = lab.exec(
        "node", ["conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-port-src", "40999"]
    ).stdout
    assert any(f"src={ip} " in flows for ip in BACKENDS6), (
        f"IPv6 with extension headers not NATed: {flows}"
    )
    assert node.proc is not None and node.proc.poll() is None, "the agent died"
    assert wait_for(node.healthy)
    assert http_get(lab, "client-0", "10.96.0.10") in {"backend-0", "backend-1", "backend-2"}
