"""`pykp simulate --nodes N`: several nodes, one engine and one policy state each.

The answer this product grew from (per-node round-robin, two client nodes, two backends:
100 % / 0 % after two connections, 50 / 50 after four) must come out exactly.
"""

from __future__ import annotations

import struct
import textwrap
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pykp.cli.app import app
from pykp.labs.simulate_nodes import (
    COMPARED_POLICIES,
    build_nodes,
    decide_on_every_node,
    simulate_nodes,
)
from pykp.sources.services_file import load_services_text

runner = CliRunner()

POD1, POD2 = "10.244.3.10:8080", "10.244.4.10:8080"

# The answer's cluster: application2's two pods on node-3 and node-4, its clients on
# node-1 and node-2.
ANSWER = """\
services:
  - name: application2
    clusterIP: 10.96.0.2
    policy: {policy}
    ports: [{{name: http, port: 80, targetPort: 8080}}]
    endpoints:
      - {{ip: 10.244.4.10, nodeName: node-4}}
      - {{ip: 10.244.3.10, nodeName: node-3}}
"""

THREE_BACKENDS = """\
services:
  - name: web
    clusterIP: 10.96.0.10
    externalIPs: [203.0.113.10]
    policy: maglev
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    endpoints: [{ip: 10.244.1.10}, {ip: 10.244.2.10}, {ip: 10.244.3.10}]
"""


def answer(policy: str = "round-robin") -> str:
    return ANSWER.format(policy=policy)


@pytest.mark.usefixtures("fastpath")
@pytest.mark.parametrize("nodes", [2, 4])
def test_the_answers_four_steps_come_out_exactly(nodes: int) -> None:
    services_file, _ = load_services_text(answer())

    result = simulate_nodes(services_file, nodes=nodes, schedule="alternate", connections=4, seed=3)

    (run,) = result.runs
    assert [(step.node, step.outcome) for step in run.steps] == [
        ("node-1", POD1),  # 1. application1_pod1 -> application2_pod1
        ("node-2", POD1),  # 2. node2 does not know of step 1
        ("node-1", POD2),  # 3. because of 1.1
        ("node-2", POD2),  # 4. because of 2.1
    ]
    assert run.shares_after(2) == {POD1: 1.0, POD2: 0.0}
    assert run.shares_after(4) == {POD1: 0.5, POD2: 0.5}


@pytest.mark.usefixtures("fastpath")
def test_one_node_is_strictly_round_robin_and_two_are_only_eventually() -> None:
    services_file, _ = load_services_text(answer())

    one = simulate_nodes(services_file, nodes=1, connections=400, seed=5).runs[0]
    two = simulate_nodes(services_file, nodes=2, connections=400, seed=5).runs[0]

    assert [step.outcome for step in one.steps[:4]] == [POD1, POD2, POD1, POD2]
    # p1 p2 p1 p2 ...: after 2k+1 connections p1 has k+1; 10/19 is the last one above 52.5 %.
    assert one.converged_at() == 20
    # p1 p1 p2 p2 ...: after 4k+2 connections p1 has 2k+2; 20/38 is the last one above 52.5 %.
    assert two.converged_at() == 39
    assert two.shares_after(400) == {POD1: 0.5, POD2: 0.5}


@pytest.mark.usefixtures("fastpath")
def test_every_policy_has_a_sane_convergence_figure() -> None:
    services_file, _ = load_services_text(THREE_BACKENDS)

    result = simulate_nodes(services_file, nodes=3, schedule="random", connections=20000, seed=9)

    assert set(result.compared) == set(COMPARED_POLICIES)
    for policy, (run,) in result.compared.items():
        assert run.policy == policy
        converged = run.converged_at()
        assert converged is not None, policy
        assert 1 <= converged <= len(run.steps), policy
        # Converged means within 5 % of a third from there on: check the claim directly.
        for connections in (converged, (converged + len(run.steps)) // 2, len(run.steps)):
            for share in run.shares_after(connections).values():
                assert abs(share - 1 / 3) <= 0.05 / 3 + 1e-12, (policy, connections)
        if converged > 1:
            assert any(
                abs(share - 1 / 3) > 0.05 / 3 for share in run.shares_after(converged - 1).values()
            ), policy
    # Per-node round-robin with three backends converges far sooner than hashing or chance.
    round_robin = result.compared["round-robin"][0].converged_at()
    random_policy = result.compared["random"][0].converged_at()
    assert round_robin is not None and random_policy is not None
    assert round_robin < random_policy


@pytest.mark.usefixtures("fastpath")
def test_a_share_that_never_settles_has_no_convergence_figure() -> None:
    # No endpoint at all: every connection is refused, no share is ever fair.
    services_file, _ = load_services_text(
        "services: [{name: web, clusterIP: 10.96.0.10, ports: [{port: 80}]}]"
    )

    (run,) = simulate_nodes(services_file, nodes=2, connections=50, seed=1).runs

    assert {step.outcome for step in run.steps} == {"reject: no_endpoints"}
    assert run.converged_at() is None


@pytest.mark.usefixtures("fastpath")
def test_maglev_nodes_agree_on_a_5_tuple() -> None:
    services_file, _ = load_services_text(THREE_BACKENDS)
    nodes, _ = build_nodes(services_file, 4, seed=11)

    backends_seen = set()
    for client_port in range(40000, 40064):
        client = ("198.18.1.7", client_port)
        to_cluster_ip = decide_on_every_node(nodes, client, ("10.96.0.10", 80, "TCP"))
        assert len(set(to_cluster_ip.values())) == 1, to_cluster_ip
        backends_seen |= set(to_cluster_ip.values())
        to_external_ip = decide_on_every_node(nodes, client, ("203.0.113.10", 80, "TCP"))
        assert len(set(to_external_ip.values())) == 1, to_external_ip
    assert backends_seen == {"10.244.1.10:8080", "10.244.2.10:8080", "10.244.3.10:8080"}


@pytest.mark.usefixtures("fastpath")
def test_a_seed_gives_the_same_run_and_the_random_schedule_uses_every_node() -> None:
    services_file, _ = load_services_text(answer("random"))

    first = simulate_nodes(services_file, nodes=3, schedule="random", connections=300, seed=4)
    second = simulate_nodes(services_file, nodes=3, schedule="random", connections=300, seed=4)

    assert first == second
    assert {step.node for step in first.runs[0].steps} == {"node-1", "node-2", "node-3"}


# --- the command --------------------------------------------------------------------------


@pytest.mark.usefixtures("fastpath")
def test_the_command_prints_the_answers_sequence(write_services: Callable[[str], Path]) -> None:
    path = write_services(answer())

    result = runner.invoke(
        app,
        ["simulate", "-f", str(path), "--nodes", "2", "--schedule", "alternate", "--seed", "1"],
    )

    assert result.exit_code == 0, result.output
    rows = [
        line.split()
        for line in result.output.splitlines()
        if line.split()[:1] in (["1"], ["2"], ["3"], ["4"]) and "node-" in line.split()[1]
    ]
    assert [(row[1], row[3], row[4], row[6]) for row in rows] == [
        ("node-1", POD1, "100.0", "0.0"),
        ("node-2", POD1, "100.0", "0.0"),
        ("node-1", POD2, "66.7", "33.3"),
        ("node-2", POD2, "50.0", "50.0"),
    ]
    convergence = next(
        line
        for line in result.output.splitlines()
        if "application2" in line and "round-robin:" in line
    )
    assert convergence.split()[-1] == "39"


@pytest.mark.usefixtures("fastpath")
def test_the_command_writes_a_png(write_services: Callable[[str], Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    plot = tmp_path / "shares.png"

    result = runner.invoke(
        app,
        [
            "simulate",
            "-f",
            str(write_services(answer())),
            "--nodes",
            "2",
            "-n",
            "500",
            "--plot",
            str(plot),
        ],
    )

    assert result.exit_code == 0, result.output
    assert f"plot written to {plot}" in result.output
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 800 and height >= 200
    assert len(data) > 20_000  # three panels of curves, not an empty canvas


@pytest.mark.usefixtures("fastpath")
def test_the_plot_says_when_matplotlib_is_missing(
    write_services: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    plot = tmp_path / "shares.png"

    result = runner.invoke(
        app, ["simulate", "-f", str(write_services(answer())), "--nodes", "2", "--plot", str(plot)]
    )

    assert result.exit_code == 1
    assert "plot skipped: matplotlib is not installed" in result.output
    assert not plot.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--nodes", "0"], "Invalid value for '--nodes'"),
        (
            ["--nodes", "2", "--schedule", "zigzag"],
            "'zigzag' is not one of round-robin, alternate, random",
        ),
        (["--schedule", "random"], "--schedule needs --nodes"),
        (["--plot", "x.png"], "--plot needs --nodes"),
    ],
)
def test_bad_flags_are_clear_errors(arguments: list[str], message: str) -> None:
    result = runner.invoke(app, ["simulate", *arguments])

    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("fastpath")
def test_the_bundled_answer_file_gives_the_answers_sequence() -> None:
    text = resources.files("pykp").joinpath("examples/eventually-round-robin.yaml").read_text()
    services_file, problems = load_services_text(text)

    (run,) = simulate_nodes(services_file, nodes=2, schedule="alternate", connections=4).runs

    assert problems == []
    assert [(step.node, step.outcome) for step in run.steps] == [
        ("node-1", POD1),
        ("node-2", POD1),
        ("node-1", POD2),
        ("node-2", POD2),
    ]


@pytest.mark.usefixtures("fastpath")
def test_each_node_applies_local_traffic_policy_with_its_own_name() -> None:
    services_file, _ = load_services_text(
        textwrap.dedent("""\
        services:
          - name: ingress
            clusterIP: 10.96.0.30
            externalTrafficPolicy: Local
            ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
            endpoints: [{ip: 10.244.1.10, nodeName: node-1}, {ip: 10.244.3.10, nodeName: node-3}]
        """)
    )

    result = simulate_nodes(services_file, nodes=2, connections=40, seed=2)

    internal, external = result.runs
    assert external.service == "default/ingress#external"
    # Every node's NodePort: node-1 sends to its own endpoint; node-2 has none, and drops.
    assert {(step.node, step.outcome) for step in external.steps} == {
        ("node-1", "10.244.1.10:8080"),
        ("node-2", "drop: no local endpoints"),
    }
    assert {step.outcome for step in internal.steps} == {"10.244.1.10:8080", "10.244.3.10:8080"}
