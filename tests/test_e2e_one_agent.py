"""One agent per node: a second `pykp run` in the same network namespace exits with one
line before it touches anything, whatever its flags, and the first keeps serving.

Privileged: a namespace lab, real netfilter rules, real connections.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import LabAgent, http_get

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

SERVICES = """
services:
  - name: web
    clusterIP: 10.96.0.10
    policy: round-robin
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}]
"""


@pytest.fixture(scope="module")
def first(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabAgent]:
    path = tmp_path_factory.mktemp("first") / "services.yaml"
    path.write_text(SERVICES)
    # The reader decides (not the kernel's rotation): "the first keeps serving" then
    # proves its queue binding survived the second agent, not only the kernel path.
    agent = LabAgent(lab, path, "--no-kernel-round-robin")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def node_rules(lab: Lab) -> str:
    """The node's whole netfilter state, packet counters aside."""
    dumps = [
        lab.exec("node", argv, check=True).stdout
        for argv in (["nft", "list", "ruleset"], ["iptables-save"], ["ip6tables-save"])
    ]
    text = "\n".join(dumps)
    text = re.sub(r"\[\d+:\d+\]", "[:]", text)  # iptables-save counters
    text = re.sub(r"counter packets \d+ bytes \d+", "counter", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--queue-num", "7"],
        ["--healthz-bind-address", "127.0.0.1:10266", "--metrics-bind-address", "127.0.0.1:10259"],
    ],
    ids=["same-flags", "other-queue", "other-ports"],
)
def test_a_second_agent_exits_with_one_line_and_leaves_the_rules_alone(
    lab: Lab, first: LabAgent, tmp_path: Path, flags: list[str]
) -> None:
    before = node_rules(lab)
    assert {http_get(lab, "client-0", "10.96.0.10") for _ in range(6)} == {
        "backend-0", "backend-1", "backend-2",
    }  # fmt: skip
    second = LabAgent(lab, first.services_file, *flags, workdir=tmp_path / "second")

    proc = lab.exec("node", second.argv(), timeout=60)

    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "another pykp agent" in lines[0], proc.stderr
    assert first.proc is not None and f"pid {first.proc.pid}" in lines[0]
    assert node_rules(lab) == before
    assert first.synced()
    assert {http_get(lab, "client-0", "10.96.0.10") for _ in range(6)} == {
        "backend-0", "backend-1", "backend-2",
    }  # fmt: skip
