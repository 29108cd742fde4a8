"""`pykp demo`, the README's main command: the whole node proxy on a lab, as a user runs it."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from pykp.cli import app as cli
from pykp.labs.demo import run_demo

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)


def test_every_policy_serves_every_connection_with_one_queued_packet_each() -> None:
    result = run_demo(connections=30)
    for service, counts in result.by_service.items():
        assert sum(counts.values()) == 30, service
        assert set(counts) <= {"backend-0", "backend-1", "backend-2"}
    assert result.by_service["web-rr"] == {"backend-0": 10, "backend-1": 10, "backend-2": 10}
    # One first packet per connection to user space for Maglev and least-conn; random and
    # round-robin are decided in the kernel.
    assert result.queued_packets == 2 * 30


def test_the_command_prints_the_distribution_and_leaves_nothing_behind() -> None:
    before = set(os.popen("ip netns list").read().split())
    result = CliRunner().invoke(cli.app, ["demo", "--connections", "6"])
    assert result.exit_code == 0, result.output
    for name in ("web-random", "web-rr", "web-maglev", "web-leastconn", "backend-2"):
        assert name in result.output
    assert "24 connections" in result.output
    after = set(os.popen("ip netns list").read().split())
    assert not {ns for ns in after - before if ns.startswith("pykp-lab-")}, after - before


def test_the_cluster_demo_reaches_backends_on_other_nodes_from_every_node() -> None:
    result = CliRunner().invoke(cli.app, ["demo", "--cluster", "--connections", "4"])
    assert result.exit_code == 0, result.output
    for client in ("pod-0-0", "pod-1-0", "pod-2-0"):
        assert client in result.output
    assert "@node-1" in result.output and "@node-2" in result.output
    assert "@node-0" not in result.output, "the first node has no backends"
