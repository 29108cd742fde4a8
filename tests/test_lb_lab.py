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
        assert run["tcp"]["bits_per_second"] > 0, name
        assert "error" not in run["udp"] and run["udp"]["datagrams_per_second"] > 0, (name, run["udp"])
