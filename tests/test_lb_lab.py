"""The load-balancer lab of the AF_PACKET datapath (issue 12), checked with the kernel's
reference datapath (nftables L2 direct server return on each load-balancer node): the
router spreads flows over both load-balancer nodes, every flow reaches a backend, and the
backends answer the client directly, past the load balancers.

Runs as root (CI runs as root): real namespaces, a bridge, multipath routes, nftables.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest

from pykp.labs.lab_agent import TCP_ECHO
from pykp.labs.lb_lab import LoadBalancerLab, connect_from

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

PORT = 8080


@pytest.fixture(scope="module")
def lab() -> Iterator[LoadBalancerLab]:
    with LoadBalancerLab(lb_nodes=2, backends=3) as lab:
        lab.start_http_servers(port=PORT)
        yield lab


def ingress_packets(lab: LoadBalancerLab, lb: str) -> int:
    """Packets the load-balancer node's eth0 received (its own counter, in its namespace)."""
    text = lab.exec(lb, ["cat", "/sys/class/net/eth0/statistics/rx_packets"], check=True).stdout
    return int(text)


def test_without_a_load_balancer_the_vip_does_not_answer(lab: LoadBalancerLab) -> None:
    """The load-balancer nodes do not forward (the VIP is on none of their interfaces)."""
    with pytest.raises(OSError):
        connect_from(lab, 41000, PORT, timeout=1.0)


def test_flows_spread_over_both_nodes_and_backends_answer_directly(lab: LoadBalancerLab) -> None:
    for lb in lab.lb_hosts:
        lab.kernel_l2_dsr(lb, list(lab.backend_hosts), PORT)
    before = {lb.name: ingress_packets(lab, lb.name) for lb in lab.lb_hosts}
    answers = Counter(connect_from(lab, 42000 + i, PORT) for i in range(60))
    assert set(answers) == {b.name for b in lab.backend_hosts}, answers
    # The router's L4 hash sent flows through both load-balancer nodes.
    through = {lb.name: ingress_packets(lab, lb.name) - before[lb.name] for lb in lab.lb_hosts}
    assert all(n >= 20 for n in through.values()), through
    # Direct return: a node sees only the client's direction (SYN, ACK, request, FIN, ACK:
    # about 5 packets a flow), never the backends' replies.
    assert sum(through.values()) < 60 * 8, through
    # The same 5-tuple always gets the same backend, through whichever node it hashes to.
    assert {connect_from(lab, 42005, PORT) for _ in range(5)} == {connect_from(lab, 42005, PORT)}


def test_the_lb_tier_bench_measures_every_contender(tmp_path: object) -> None:
    """`pykp bench --lb-tier`'s runner, shortened: every contender serves every connection
    it attempts, and every workload gives a figure (no timing asserted)."""
    from pathlib import Path

    from pykp.bench.lb_tier import LB_CONTENDERS, LbBenchSettings, run_lb_bench

    settings = LbBenchSettings(rounds=1, duration=0.5, concurrency=16, iperf_seconds=1.0)
    result = run_lb_bench(settings, workdir=Path(str(tmp_path)), log=lambda _: None)
    assert set(result["summary"]) == set(LB_CONTENDERS)
    for name, runs in result["samples"].items():
        (run,) = runs
        assert run["conns"]["ok"] > 0 and run["conns"]["failed"] == 0, (name, run["conns"])
        for tcp in (run["tcp"], run["tcp4"]):
            assert tcp["bits_per_second"] > 0 and tcp["machine_cpus_busy"] > 0, (name, tcp)
        if name == "pykp-afpacket":
            # Bulk TCP went through pykp's workers as GSO super-packets, none dropped.
            counters = run["tcp"]["lb_counters"]
            assert counters.get("rx_gso", 0) > 0 and run["tcp"]["lb_worker_cpus"] > 0, counters
            assert not any(k.startswith("drops_") for k in counters), counters
        assert "error" not in run["udp"] and run["udp"]["datagrams_per_second"] > 0, (
            name,
            run["udp"],
        )


def test_pykp_lb_on_both_nodes_and_a_flow_survives_losing_its_node(
    lab: LoadBalancerLab, tmp_path: object
) -> None:
    """`pykp lb` (AF_PACKET, L2 direct server return, Maglev with one seed) on both
    load-balancer nodes: connections reach every backend, and an established TCP flow
    keeps its backend when the router stops sending it to its node (a dead node's route
    withdrawn): the other node, which never saw the flow, picks the same backend."""
    import socket
    import subprocess
    import time
    from pathlib import Path

    from pykp.labs.lab_agent import wait_for

    for lb in lab.lb_hosts:  # the kernel reference of the other tests, off
        lab.exec(lb, ["nft", "delete", "table", "netdev", "pykp_lab_dsr"])
    services = Path(str(tmp_path)) / "lb.yaml"
    services.write_text(lab.services_yaml(PORT) + lab.services_yaml(7000)[len("services:\n") :])
    for pod in lab.backend_hosts:
        lab.popen(pod, ["python3", "-c", TCP_ECHO, pod.name, "7000"])
    procs = [
        lab.popen(lb, lab.pykp_lb_argv(lb, str(services)), stdout=subprocess.PIPE, text=True)
        for lb in lab.lb_hosts
    ]
    try:
        assert wait_for(lambda: _answers(lab), timeout=10), "pykp lb never answered"
        answers = Counter(connect_from(lab, 43000 + i, PORT) for i in range(60))
        assert set(answers) == {b.name for b in lab.backend_hosts}, answers

        # Long connections, then the node each one went through disappears for the router.
        held = []
        through_first = ingress_packets(lab, lab.lb_hosts[0].name)
        for _ in range(8):
            with lab.in_namespace(lab.client):
                s = socket.create_connection((lab.vip, 7000), timeout=3)
            s.sendall(b"hello\n")
            held.append((s, s.recv(100).decode().split()[0]))
        # Some of them went through the node about to go (8 flows over 2 nodes).
        assert ingress_packets(lab, lab.lb_hosts[0].name) > through_first
        lab.withdraw(lab.lb_hosts[0])
        time.sleep(0.2)
        for i, (s, backend) in enumerate(held):
            s.sendall(f"after {i}\n".encode())
            assert s.recv(100).decode().strip() == f"{backend} after {i}"
            s.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _answers(lab: LoadBalancerLab) -> bool:
    try:
        return bool(connect_from(lab, 42999, PORT, timeout=0.5))
    except OSError:
        return False


ECHO_PORT = 7100  # the held connections of the policy test (a line echoed with its server)


@pytest.fixture(scope="module")
def echo_servers(lab: LoadBalancerLab) -> None:
    for pod in lab.backend_hosts:
        lab.popen(pod, ["python3", "-c", TCP_ECHO, pod.name, str(ECHO_PORT)])


def _hold(lab: LoadBalancerLab, source_port: int) -> tuple[object, str]:
    """An open TCP connection to the VIP's echo port from `source_port`, and its backend."""
    import socket

    with lab.in_namespace(lab.client):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    # As `connect_from` does: a port an earlier case left in TIME_WAIT is not "in use".
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((lab.client.ipv4, source_port))
    s.connect((lab.vip, ECHO_PORT))
    s.sendall(b"hello\n")
    return s, s.recv(100).decode().split()[0]


@pytest.mark.parametrize(
    "policy",
    ["round-robin", "random", "least-conn", pytest.param(None, id="maglev-by-default")],
)
def test_pykp_lb_forwards_by_each_services_policy(
    lab: LoadBalancerLab, echo_servers: None, tmp_path: object, policy: str | None
) -> None:
    """`pykp lb` on both nodes, the services naming `policy` (None: none, so Maglev, the
    default). Each node is made the router's only path in turn, so that every connection's
    node is known, and the backends it picks are what the policy says: round-robin rotates
    through the backends on each node; random uses every one; least-conn spreads held
    connections evenly on each node; Maglev gives a 5-tuple the same backend on either node
    (and spreads 5-tuples over every backend)."""
    import subprocess
    from pathlib import Path

    from pykp.labs.lab_agent import wait_for

    for lb in lab.lb_hosts:  # the kernel reference of the other tests, off
        lab.exec(lb, ["nft", "delete", "table", "netdev", "pykp_lab_dsr"])
    services = Path(str(tmp_path)) / "lb.yaml"
    services.write_text(
        lab.services_yaml(PORT, policy=policy)
        + lab.services_yaml(ECHO_PORT, policy=policy)[len("services:\n") :]
    )
    procs = [
        lab.popen(lb, lab.pykp_lb_argv(lb, str(services)), stdout=subprocess.PIPE, text=True)
        for lb in lab.lb_hosts
    ]
    everyone = {b.name for b in lab.backend_hosts}
    held: list[object] = []
    by_node: dict[str, list[str]] = {}
    try:
        assert wait_for(lambda: _answers(lab), timeout=10), "pykp lb never answered"
        for k, lb in enumerate(lab.lb_hosts):
            lab.route_via([lb])
            base = 44000 + 1000 * k
            if policy == "round-robin":
                answers = [connect_from(lab, base + i, PORT) for i in range(9)]
                # One backend after the other, in one order, from wherever it stood.
                assert set(answers[:3]) == everyone, (lb.name, answers)
                assert answers == answers[:3] * 3, (lb.name, answers)
            elif policy == "random":
                answers = [connect_from(lab, base + i, PORT) for i in range(30)]
                assert set(answers) == everyone, (lb.name, Counter(answers))
            elif policy == "least-conn":
                # The other node's held flows are not this node's to count.
                mine = [_hold(lab, base + i) for i in range(6)]
                held += [s for s, _ in mine]
                spread = Counter(backend for _, backend in mine)
                assert spread == dict.fromkeys(everyone, 2), (lb.name, spread)
            else:
                by_node[lb.name] = [connect_from(lab, 46000 + i, PORT) for i in range(20)]
        if policy is None:
            first, second = (by_node[lb.name] for lb in lab.lb_hosts)
            assert set(first) == everyone, first
            assert first == second, by_node
    finally:
        for s in held:
            s.close()  # type: ignore[attr-defined]
        lab.route_via(lab.lb_hosts)
        for proc in procs:
            proc.terminate()
            proc.wait(10)
