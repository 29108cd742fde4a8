"""`pykp lb`'s argument handling, without privileges. The datapath itself is tested as root
by crates/fastpath/tests/afpacket_privileged.rs (a real TCP connection through it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pykp.cli.app import app
from pykp.cli.lb import coalescing_offloads, nonzero, parse_neighbour


def test_a_neighbour_is_ip_equals_mac() -> None:
    assert parse_neighbour("10.0.0.3=02:00:00:00:00:03") == ("10.0.0.3", "02:00:00:00:00:03")
    assert parse_neighbour(" fd00::3 = 02:00:00:00:00:03 ") == ("fd00::3", "02:00:00:00:00:03")
    for bad in ("10.0.0.3", "=02:00:00:00:00:03", "10.0.0.3="):
        with pytest.raises(ValueError, match="is not IP=MAC"):
            parse_neighbour(bad)


def test_the_report_line_names_only_counters_that_moved() -> None:
    assert nonzero({"tx_forward": 3, "drops_truncated": 0, "frames": 5}) == "frames=5 tx_forward=3"
    assert nonzero({"frames": 0}) == "no frames yet"


WEB = """
services:
  - name: web
    clusterIPs: [10.96.0.10]
    ports: [{name: http, port: 8080}]
    endpoints: [{ip: 10.0.0.3}]
"""


def test_a_bad_neighbour_is_refused_before_anything_runs(
    write_services: Callable[[str], Path],
) -> None:
    path = write_services(WEB)
    args = ["lb", str(path), "--interface", "eth0", "--address", "10.0.0.1", "--neighbour", "x"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "is not IP=MAC" in result.output


def test_an_unknown_default_policy_is_refused_before_anything_runs(
    write_services: Callable[[str], Path],
) -> None:
    path = write_services(WEB)
    args = ["lb", str(path), "--interface", "eth0", "--address", "10.0.0.1"]
    result = CliRunner().invoke(app, [*args, "--default-policy", "fastest"])
    assert result.exit_code == 2
    assert "is not one of" in result.output


def test_the_offloads_that_make_super_packets_are_read_from_ethtool() -> None:
    features = """Features for eth0:
rx-checksumming: on
generic-receive-offload: on
large-receive-offload: off [fixed]
rx-gro-hw: on [fixed]
rx-gro-list: on
"""
    assert coalescing_offloads(features) == ["generic-receive-offload", "rx-gro-hw"]
    assert coalescing_offloads(features.replace(": on", ": off")) == []
