"""Round-robin rotated in the kernel (`pykp run`'s default): each service's rotation is
one `numgen inc` counter in its own chain, so no first packet goes to pykp's reader, the
order is exact, weights interleave, and the rotation goes on while the agent is away. With
--no-kernel-round-robin pykp's reader rotates instead, each first packet through the
queue. Privileged: a namespace lab, real netfilter rules, real sockets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import LabAgent, http_get, wait_for

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

SERVICES = """
services:
  - name: web-rr
    clusterIP: 10.96.0.10
    policy: round-robin
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}]
  - name: web-weighted
    clusterIP: 10.96.0.11
    policy: round-robin
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10, weight: 2}, {ip: 10.244.0.11}]
  - name: web-dual
    clusterIPs: [10.96.0.12, "fd00:10:96::12"]
    policy: round-robin
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: "fd00:10:244::10"},
                {ip: "fd00:10:244::11"}, {ip: "fd00:10:244::12"}]
"""
ALL = {"backend-0", "backend-1", "backend-2"}
SYNC_PERIOD = 2.0  # the rules and their element counts are checked every half period


@pytest.fixture
def agent(lab: Lab, write_services: Callable[[str], Path], tmp_path: Path) -> Iterator[LabAgent]:
    node = LabAgent(
        lab, write_services(SERVICES), "--sync-period", f"{SYNC_PERIOD}s", workdir=tmp_path
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


def answers(lab: Lab, address: str, count: int) -> list[str]:
    return [http_get(lab, "client-0", address) for _ in range(count)]


def periodic(sequence: list[str], period: int) -> bool:
    return all(sequence[i] == sequence[i % period] for i in range(len(sequence)))


def rr_chains(lab: Lab) -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "exec", lab.node.netns, "nft", "list", "chains", "inet"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [line.split()[1] for line in listing.splitlines() if line.strip().startswith("chain rr")]


def test_round_robin_rotates_in_the_kernel_exactly_and_goes_on_without_the_agent(
    lab: Lab, agent: LabAgent
) -> None:
    queued = agent.metric("pykp_queue_packets_total")
    first = answers(lab, "10.96.0.10", 9)
    assert set(first[:3]) == ALL, first
    assert periodic(first, 3), first
    # 2:1 interleaved (a b a), not a a b.
    weighted = answers(lab, "10.96.0.11", 9)
    assert periodic(weighted, 3), weighted
    assert Counter(weighted[:3]) == {"backend-0": 2, "backend-1": 1}, weighted
    assert weighted[0] != weighted[1], weighted
    # Each family rotates on its own counter, over its own backends.
    v6 = answers(lab, "fd00:10:96::12", 6)
    assert set(v6[:3]) == ALL and periodic(v6, 3), v6
    v4 = answers(lab, "10.96.0.12", 4)
    assert set(v4[:2]) == {"backend-0", "backend-1"} and periodic(v4, 2), v4
    assert agent.metric("pykp_queue_packets_total") == queued  # no first packet queued
    assert len(rr_chains(lab)) == 4  # one per round-robin service and family

    # The agent killed: the kernel's counter goes on where it was.
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=15)
    after = answers(lab, "10.96.0.10", 6)
    assert periodic(first + after, 3), (first, after)


def test_a_changed_pool_rotates_over_its_new_backends_and_a_removed_service_leaves_no_chain(
    lab: Lab, agent: LabAgent
) -> None:
    assert periodic(answers(lab, "10.96.0.10", 6), 3)
    two = SERVICES.replace(
        "{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}",
        "{ip: 10.244.0.11}, {ip: 10.244.0.12}",
    )
    agent.write_services(two)

    def two_left() -> bool:
        return set(answers(lab, "10.96.0.10", 4)) == {"backend-1", "backend-2"}

    assert wait_for(two_left, timeout=10, step=0.2)
    sequence = answers(lab, "10.96.0.10", 8)
    assert periodic(sequence, 2) and set(sequence) == {"backend-1", "backend-2"}, sequence
    # Through the NodePort too: the same service, the same rotation.
    node_port = [http_get(lab, "external", lab.node_ip4, 30080) for _ in range(4)]
    assert set(node_port) == {"backend-1", "backend-2"}, node_port

    # Two services gone: their chains go with their verdicts, the other one stays.
    before = rr_chains(lab)
    agent.write_services(two.split("  - name: web-weighted")[0])
    assert wait_for(lambda: len(rr_chains(lab)) == 1, timeout=10, step=0.2)
    assert set(rr_chains(lab)) < set(before)
    assert periodic(answers(lab, "10.96.0.10", 4), 2)
    # All of it pykp's own writes: neither the change notifications nor the periodic check
    # of chains and element counts (round-robin chains included) took any for damage.
    time.sleep(SYNC_PERIOD)
    assert agent.metric("pykp_rules_repairs_total") == 0
    assert agent.metric("pykp_rules_foreign_changes_total") == 0


def test_with_no_kernel_round_robin_the_reader_rotates_each_first_packet_queued(
    lab: Lab, write_services: Callable[[str], Path], tmp_path: Path
) -> None:
    node = LabAgent(lab, write_services(SERVICES), "--no-kernel-round-robin", workdir=tmp_path)
    node.start()
    try:
        assert rr_chains(lab) == []
        queued = node.metric("pykp_queue_packets_total")
        sequence = answers(lab, "10.96.0.10", 9)
        assert set(sequence[:3]) == ALL and periodic(sequence, 3), sequence
        weighted = answers(lab, "10.96.0.11", 6)
        assert periodic(weighted, 3) and Counter(weighted[:3]) == {"backend-0": 2, "backend-1": 1}
        assert node.metric("pykp_queue_packets_total") == queued + 15  # one per connection
        assert node.metric("pykp_kernel_path_undecided_connections_total") == 0
    finally:
        node.stop()


@pytest.mark.parametrize(
    "damage",
    [
        ["flush", "map", "inet", "pykp", "rr_at4_3"],  # every rotation over 3 slots
        ["flush", "chain", "inet", "pykp", "pick_at4_1"],  # slot 1 of every rotation
        ["flush", "chain", "inet", "pykp", "{rr}"],  # one service's rotation
    ],
    ids=["rr_at-map", "pick_at-chain", "rr-chain"],
)
def test_a_damaged_rotation_is_repaired(lab: Lab, agent: LabAgent, damage: list[str]) -> None:
    assert periodic(answers(lab, "10.96.0.10", 6), 3)
    chain = next(c for c in rr_chains(lab) if c.startswith("rr4_"))
    command = [part.replace("{rr}", chain) for part in damage]
    subprocess.run(["ip", "netns", "exec", lab.node.netns, "nft", *command], check=True)

    def rotates() -> bool:
        try:
            sequence = answers(lab, "10.96.0.10", 6)
        except OSError:
            return False
        return set(sequence[:3]) == ALL and periodic(sequence, 3)

    assert wait_for(lambda: agent.metric("pykp_rules_repairs_total") >= 1, timeout=3 * SYNC_PERIOD)
    assert wait_for(rotates, timeout=SYNC_PERIOD, step=0.2)
    assert agent.healthy()
