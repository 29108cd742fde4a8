"""End to end: the real agent repairs rules someone else removed behind its back.

`pykp run --no-kernel-round-robin` with a short --sync-period on a lab node; another tool
(nft, iptables) removes pykp's table, a jump rule, a set's or a map's elements, a chain's
rules; then real connections from a client pod (and from the node itself) must work again,
decided by pykp's reader, without anyone touching the agent. About every half sync period the agent
checks that every chain holds its rules (`installed()`, in the sync thread) and that every
set and map holds as many elements as it programmed (the housekeeping thread); either
damage makes the next sync reinstall or reload everything. The last tests: the same damage
found as it commits, from nf_tables' notifications, with a period too long to matter.
Privileged: real namespaces, netfilter and sockets; the root namespace is never touched.
"""

from __future__ import annotations

import json
import os
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
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}]
"""
SYNC_PERIOD = 2.0
ALL = {"backend-0", "backend-1", "backend-2"}


@pytest.fixture
def node(lab: Lab, write_services: Callable[[str], Path], tmp_path: Path) -> Iterator[LabAgent]:
    # A fresh agent per test: its install and first (full) sync undo what a test broke.
    # The periodic check alone: the notifications would repair before a test sees damage.
    # Round-robin through the queue: the repaired path is the reader's (the kernel's
    # rotation has its own repair tests, test_e2e_kernel_round_robin.py).
    agent = LabAgent(
        lab,
        write_services(SERVICES),
        "--no-kernel-round-robin",
        "--sync-period", f"{SYNC_PERIOD}s",
        "--no-watch-rules",
        workdir=tmp_path / "node",
    )  # fmt: skip
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def decided_by_the_reader(lab: Lab, node: LabAgent, pod: str = "client-0") -> bool:
    """Three new connections reach the three backends in turn (round-robin) and each cost
    one queued packet: pykp's reader decided them, not the kernel path at random."""
    before = node.metric("pykp_queue_packets_total")
    try:
        answers = [http_get(lab, pod, "10.96.0.10", timeout=0.5) for _ in range(3)]
    except OSError as error:
        print(f"not decided by the reader: {error!r}")  # shown when the test fails
        return False
    queued = node.metric("pykp_queue_packets_total") - before
    if set(answers) != ALL or queued != 3:
        print(f"not decided by the reader: answers {answers}, {queued:g} packets queued")
        return False
    return True


def reader_decides(lab: Lab, node: LabAgent, pod: str = "client-0") -> bool:
    """The precondition: the reader decides, within a moment (on a loaded machine the queue
    keeper may have lent the queue to the kernel path for a beat: counted, not an error)."""
    return wait_for(lambda: decided_by_the_reader(lab, node, pod), timeout=3, step=0.2)


def in_node(lab: Lab, *argv: str) -> None:
    lab.exec("node", list(argv), check=True)


REPAIRED = {
    "delete-table": ["nft", "delete", "table", "inet", "pykp"],
    # Both families' jumps to the queue chain: new connections then skip the reader.
    "delete-jump": [
        "sh", "-c",
        "iptables -t mangle -D PREROUTING -m comment --comment pykp -j PYKP-QUEUE && "
        "ip6tables -t mangle -D PREROUTING -m comment --comment pykp -j PYKP-QUEUE",
    ],
    "delete-queue-chain-rule": ["iptables", "-t", "mangle", "-D", "PYKP-QUEUE", "1"],
}  # fmt: skip


@pytest.mark.parametrize("argv", REPAIRED.values(), ids=REPAIRED.keys())
def test_removed_rules_are_restored_and_connections_decided_again(
    lab: Lab, node: LabAgent, argv: list[str]
) -> None:
    assert reader_decides(lab, node)
    in_node(lab, *argv)
    assert wait_for(lambda: node.metric("pykp_rules_repairs_total") >= 1, timeout=3 * SYNC_PERIOD)
    assert wait_for(lambda: decided_by_the_reader(lab, node), timeout=2 * SYNC_PERIOD, step=0.2)


def delete_one_backend(lab: Lab) -> None:
    """Delete one element (one backend's id -> address) of the map `backends4`."""
    listing = lab.exec(
        "node", ["nft", "-j", "list", "map", "inet", "pykp", "backends4"], check=True
    )
    elements = [
        item["map"]["elem"] for item in json.loads(listing.stdout)["nftables"] if "map" in item
    ][0]
    key = elements[0][0]  # [[key, value], ...]
    in_node(lab, "nft", "delete", "element", "inet", "pykp", "backends4", f"{{ {key:#x} }}")


ELEMENT_REMOVALS: dict[str, Callable[[Lab], None]] = {
    # The map from backend id to address: decided connections are then refused.
    "flush-backends-map": lambda lab: in_node(
        lab, "nft", "flush", "map", "inet", "pykp", "backends4"
    ),
    # One backend of it: a third of the connections are refused.
    "delete-backend-element": delete_one_backend,
    # The queued frontends: connections go to the kernel path (random), never to the reader.
    "flush-queued-set": lambda lab: in_node(lab, "nft", "flush", "set", "inet", "pykp", "queued4"),
    "delete-queued-element": lambda lab: in_node(
        lab, "nft", "delete", "element", "inet", "pykp", "queued4", "{ 10.96.0.10 . tcp . 80 }"
    ),
}


@pytest.mark.parametrize("remove", ELEMENT_REMOVALS.values(), ids=ELEMENT_REMOVALS.keys())
def test_removed_set_or_map_elements_are_restored(
    lab: Lab, node: LabAgent, remove: Callable[[Lab], None]
) -> None:
    assert reader_decides(lab, node)
    remove(lab)
    if decided_by_the_reader(lab, node):
        pytest.fail("the removal broke nothing: this test would prove nothing")
    assert wait_for(lambda: decided_by_the_reader(lab, node), timeout=3 * SYNC_PERIOD, step=0.2)


def test_a_flushed_output_nat_chain_is_restored(lab: Lab, node: LabAgent) -> None:
    """The node's own connections to a ClusterIP go through nat_out (a chain no client
    pod's connection uses)."""
    assert reader_decides(lab, node, pod="node")
    in_node(lab, "nft", "flush", "chain", "inet", "pykp", "nat_out")
    if decided_by_the_reader(lab, node, pod="node"):
        pytest.fail("the removal broke nothing: this test would prove nothing")
    assert wait_for(
        lambda: decided_by_the_reader(lab, node, pod="node"), timeout=3 * SYNC_PERIOD, step=0.2
    )


# --- found as it happens: nf_tables' notifications, not the periodic check ------------------

WATCHED_SYNC_PERIOD = 600.0  # the periodic check (every half period) never runs in a test


@pytest.fixture
def watched_node(
    lab: Lab, write_services: Callable[[str], Path], tmp_path: Path
) -> Iterator[LabAgent]:
    agent = LabAgent(
        lab,
        write_services(SERVICES),
        "--no-kernel-round-robin",
        "--sync-period", f"{WATCHED_SYNC_PERIOD}s",
        workdir=tmp_path / "node",
    )  # fmt: skip
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


FOUND_AT_ONCE = {
    "delete-table": (["nft", "delete", "table", "inet", "pykp"], "nft (pid"),
    "flush-queued-set": (["nft", "flush", "set", "inet", "pykp", "queued4"], "nft (pid"),
    "flush-ruleset": (["nft", "flush", "ruleset"], "nft (pid"),
    # Through iptables: only a listing can tell pykp's jump from others'; it is run at once.
    "delete-jump": (REPAIRED["delete-jump"], "rules changed by iptables (pid"),
}


@pytest.mark.parametrize(("argv", "logged"), FOUND_AT_ONCE.values(), ids=FOUND_AT_ONCE.keys())
def test_someone_elses_change_is_repaired_without_waiting_for_the_period(
    lab: Lab, watched_node: LabAgent, argv: list[str], logged: str
) -> None:
    node = watched_node
    assert reader_decides(lab, node)
    in_node(lab, *argv)
    # Seconds, where the periodic check would come after WATCHED_SYNC_PERIOD / 2.
    assert wait_for(lambda: decided_by_the_reader(lab, node), timeout=10, step=0.2)
    assert node.metric("pykp_rules_foreign_changes_total") >= 1
    assert node.metric("pykp_rules_repairs_total") >= 1
    assert logged in node.log.read_text()  # the log says who did it


def test_the_agents_own_changes_are_not_taken_for_damage(lab: Lab, watched_node: LabAgent) -> None:
    """The agent's own transactions (a backend removed from the services file) are
    announced too: they must not look like someone else's."""
    node = watched_node
    assert reader_decides(lab, node)
    assert node.services_file is not None
    node.services_file.write_text(SERVICES.replace(", {ip: 10.244.0.12}", ""))

    def two_backends() -> bool:
        return {http_get(lab, "client-0", "10.96.0.10", timeout=0.5) for _ in range(4)} == {
            "backend-0",
            "backend-1",
        }

    assert wait_for(two_backends, timeout=10, step=0.2)
    assert node.metric("pykp_rules_foreign_changes_total") == 0
    assert node.metric("pykp_rules_repairs_total") == 0
