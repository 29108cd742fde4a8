"""`pykp run`, `pykp cleanup` and `pykp status` through Typer's CliRunner, without root.

`run` is exercised for real (signals, servers, the sync loop) with the kernel pieces
replaced by test_agent_unit's fakes; the privileged end-to-end tests run it in a lab.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_unit import SERVICES, Harness, StaticSource
from typer.testing import CliRunner

from pykp.agent.agent import Agent, AgentConfig
from pykp.cli import app as cli
from pykp.netfilter.conntrack_sysctls import ConntrackSettings, SysctlResult
from pykp.netfilter.rules import RulesError
from pykp.observe.metrics import MetricsServer
from pykp.observe.status import write_status_file

runner = CliRunner()

RUN_FLAGS = [
    "--services",
    "--hostname-override",
    "--cluster-cidr",
    "--healthz-bind-address",
    "--metrics-bind-address",
    "--nodeport-addresses",
    "--cleanup",
    "--default-policy",
    "--min-sync-period",
    "--sync-period",
    "--queue-num",
    "--queues",
    "--mark-mask",
    "--fail-open",
    "--no-fail-open",
    "--queue-max-len",
    "--kernel-random",
    "--no-kernel-random",
    "--kernel-round-robin",
    "--no-kernel-round-robin",
    "--conntrack-capacity",
    "--maglev-table-size",
    "--maglev-seed",
    "--state-dir",
    "--cleanup-on-exit",
    "--no-cleanup-on-exit",
    "--verbose",
    "--allow-node-address-service-ips",
]


def plain(output: str) -> str:
    """Rich's panels without frames, colour and line breaks, for matching messages."""
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


@pytest.fixture
def services(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(SERVICES)
    return path


def test_run_help_lists_every_flag() -> None:
    # Wide enough that rich does not shorten the long flag names.
    result = runner.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "250"})

    assert result.exit_code == 0
    text = plain(result.output)
    for flag in RUN_FLAGS:
        assert flag in text, flag


def test_top_level_help_lists_the_new_commands() -> None:
    result = runner.invoke(cli.app, ["--help"])

    assert result.exit_code == 0
    for command in ("run", "cleanup", "status"):
        assert re.search(rf"\b{command}\b", result.output)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mark-mask", "zz"], "'zz' is not a hexadecimal mask"),
        (["--mark-mask", "0xc000"], "0xc000: masq_bit lies inside backend_mask"),
        (["--mark-mask", "0x18000"], "overlaps kube-proxy's mark bits"),
        (["--mark-mask", "0x0f0f0000"], "not contiguous"),
        (["--cluster-cidr", "10.244.0.0/16,10.0.0.0/33"], "'10.0.0.0/33' is not a CIDR"),
        (["--nodeport-addresses", "eth0"], "'eth0' is not a CIDR"),
        (["--min-sync-period", "soon"], "'soon' is not a duration"),
        (["--sync-period=-5s"], "is not a duration"),
        (["--min-sync-period", "1m", "--sync-period", "30s"], "longer than --sync-period"),
        (["--healthz-bind-address", "localhost:10256"], "is not an IP address"),
        (["--metrics-bind-address", "127.0.0.1:99999"], "the port must be 0..65535"),
        (["--metrics-bind-address", "::1:10249"], "in brackets"),
        (["--default-policy", "fastest"], "'fastest' is not one of random"),
        (["--queues", "0"], "Invalid value for '--queues'"),
        (["--queue-num", "65535", "--queues", "2"], "--queue-num + --queues - 1 <= 65535"),
        (["--queue-num", "-1"], "Invalid value for '--queue-num'"),
        (["--maglev-table-size", "65536"], "65536 is not a prime"),
        (["--conntrack-capacity", "0"], "Invalid value for '--conntrack-capacity'"),
        (["--conntrack-max-per-core", "-1"], "Invalid value for '--conntrack-max-per-core'"),
        (["--conntrack-udp-timeout", "soon"], "'soon' is not a duration"),
        (["--conntrack-tcp-timeout-close-wait", "500ms"], "or at least 1s"),
    ],
)
def test_bad_flag_values_exit_2_with_a_message(
    services: Path, flags: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "make_agent", _must_not_run)

    result = runner.invoke(cli.app, ["run", "--services", str(services), *flags])

    assert result.exit_code == 2, result.output
    assert message in plain(result.output)


def test_a_missing_services_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["run", "--services", str(tmp_path / "nope.yaml")])

    assert result.exit_code == 2
    assert "does not exist" in plain(result.output)


def _must_not_run(config: AgentConfig) -> Agent:
    raise AssertionError("the agent must not be made")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("0.5", 0.5), ("500ms", 0.5), ("1m30s", 90.0), ("2h", 7200.0), ("0", 0.0)],
)
def test_durations_are_seconds_or_go_durations(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == pytest.approx(seconds)


def test_flags_reach_the_agent_config(services: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[AgentConfig] = []

    class Stub:
        def serve(self, stop: threading.Event) -> None:
            pass

    def make(config: AgentConfig) -> Any:
        seen.append(config)
        return Stub()

    monkeypatch.setattr(cli, "make_agent", make)
    result = runner.invoke(
        cli.app,
        [
            "run",
            "--services", str(services),
            "--hostname-override", "node-7",
            "--cluster-cidr", "10.244.0.0/16, fd00:10:244::/48",
            "--nodeport-addresses", "192.168.77.0/24",
            "--healthz-bind-address", "[::]:10256",
            "--metrics-bind-address", "",
            "--default-policy", "maglev",
            "--min-sync-period", "250ms",
            "--sync-period", "1m",
            "--queue-num", "4",
            "--queues", "3",
            "--mark-mask", "ff000000",
            "--fail-open",
            "--conntrack-capacity", "1000",
            "--maglev-table-size", "251",
            "--maglev-seed", "9",
            "--no-cleanup-on-exit",
            "--conntrack-max-per-core", "0",
            "--conntrack-min", "65536",
            "--conntrack-tcp-timeout-established", "12h",
            "--conntrack-tcp-timeout-close-wait", "30m0s",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout", "45s",
            "--conntrack-udp-timeout-stream", "3m",
        ],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [config] = seen
    assert config == AgentConfig(
        services=services,
        hostname_override="node-7",
        cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"),
        healthz_bind_address="[::]:10256",
        metrics_bind_address="",
        nodeport_addresses=("192.168.77.0/24",),
        default_policy="maglev",
        min_sync_period=0.25,
        sync_period=60.0,
        queue_num=4,
        queues=3,
        mark_mask=0xFF000000,
        fail_open=True,
        conntrack_capacity=1000,
        maglev_table_size=251,
        maglev_seed=9,
        state_dir=Path("/run/pykp"),
        cleanup_on_exit=False,
        conntrack=ConntrackSettings(
            max_per_core=0,
            min=65536,
            tcp_established_timeout=43200.0,
            tcp_close_wait_timeout=1800.0,
            tcp_be_liberal=True,
            udp_timeout=45.0,
            udp_stream_timeout=180.0,
        ),
    )
    assert (config.first_queue, config.last_queue) == (4, 6)


def test_conntrack_flags_default_to_kube_proxys() -> None:
    assert AgentConfig().conntrack == ConntrackSettings(
        max_per_core=32768,
        min=131072,
        tcp_established_timeout=24 * 3600.0,
        tcp_close_wait_timeout=3600.0,
        tcp_be_liberal=False,
        udp_timeout=0.0,
        udp_stream_timeout=0.0,
    )


def test_run_serves_until_sigterm_then_cleans_up_and_exits_0(
    services: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real agent and signal handling; only the kernel pieces are fakes."""
    harnesses: list[Harness] = []

    def make(config: AgentConfig) -> Agent:
        harness = Harness(StaticSource(SERVICES), tmp_path, config={})
        agent = Agent(config, source=harness.agent.source, deps=harness.deps)
        harness.agent = agent
        harnesses.append(harness)
        return agent

    def terminate_when_synced() -> None:
        deadline = time.monotonic() + 10  # never leave the test hanging
        while time.monotonic() < deadline:
            if harnesses and harnesses[0].rules.synced.is_set():
                status = harnesses[0].agent.health.healthz()[0]
                if status == 200:
                    break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "make_agent", make)
    killer = threading.Thread(target=terminate_when_synced, daemon=True)
    killer.start()
    before = signal.getsignal(signal.SIGTERM)
    result = runner.invoke(
        cli.app,
        [
            "run",
            "--services", str(services),
            "--healthz-bind-address", "127.0.0.1:0",
            "--metrics-bind-address", "127.0.0.1:0",
            "--min-sync-period", "0",
            "--state-dir", str(tmp_path / "state"),
            "--cleanup-on-exit",
        ],
    )  # fmt: skip
    killer.join()

    assert result.exit_code == 0, result.output
    [harness] = harnesses
    assert harness.rules.states, "the agent synced before the signal"
    assert harness.events.log[-2:] == ["rules.cleanup", "datapath.stop"]
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is put back"
    assert (tmp_path / "state" / "status.json").exists()


def test_run_reports_a_start_failure_and_exits_1(
    services: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(config: AgentConfig) -> Agent:
        harness = Harness(StaticSource(SERVICES), tmp_path)

        def install() -> None:
            raise RulesError(["nft", "-f", "-"], 1, "Error: Operation not permitted")

        harness.rules.install = install  # type: ignore[method-assign]
        return Agent(config, source=harness.agent.source, deps=harness.deps)

    monkeypatch.setattr(cli, "make_agent", make)
    result = runner.invoke(
        cli.app, ["run", "--services", str(services), "--healthz-bind-address", ""]
    )

    assert result.exit_code == 1
    assert (
        "pykp run: cannot start: `nft -f -` exited with 1: Error: Operation not permitted"
        in result.output
    )


def test_run_cleanup_removes_the_rules_and_exits(
    services: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "make_agent", _must_not_run)
    monkeypatch.setattr(cli, "_cleanup_rules", lambda: ["nft table inet pykp"])

    result = runner.invoke(cli.app, ["run", "--services", str(services), "--cleanup"])

    assert result.exit_code == 0
    assert result.output == "removed nft table inet pykp\n"


def test_cleanup_says_when_there_was_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_cleanup_rules", list)

    result = runner.invoke(cli.app, ["cleanup"])

    assert result.exit_code == 0
    assert result.output == "nothing to remove\n"


def test_cleanup_failure_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[str]:
        raise RulesError(["nft", "delete", "table", "inet", "pykp"], 1, "Operation not permitted")

    monkeypatch.setattr(cli, "_cleanup_rules", fail)

    result = runner.invoke(cli.app, ["cleanup"])

    assert result.exit_code == 1
    assert result.output.startswith("pykp cleanup: ")
    assert "Operation not permitted" in result.output


# --- status -------------------------------------------------------------------------------


@pytest.fixture
def agent_status(tmp_path: Path) -> Iterator[tuple[Harness, str]]:
    """A synced agent (fakes for the kernel) with its metrics server on a free port."""
    harness = Harness(StaticSource(SERVICES), tmp_path)
    harness.agent.sync()
    harness.agent.engine.decide("10.244.9.1", 40000, "10.96.0.10", 80)
    server = MetricsServer("127.0.0.1:0", harness.agent.registry.render, harness.agent.snapshot)
    server.start()
    try:
        host, port = server.bound_address
        yield harness, f"{host}:{port}"
    finally:
        server.stop()


def test_status_prints_services_backends_counters_and_flows(
    agent_status: tuple[Harness, str],
) -> None:
    _, address = agent_status

    result = runner.invoke(cli.app, ["status", "--address", address])

    assert result.exit_code == 0, result.output
    out = result.output
    assert "node node-a (192.168.77.1, fd00:77::1); mode nfqueue; healthy" in out
    for text in (
        "default/web:http",
        "round-robin",
        "[fd00:96::10]:80/TCP",
        "10.244.1.10:8080 ready,serving,local",
        "10.244.2.10:8080 ready,serving",
        "kube-system/dns:dns",
        "decisions_forward",
        "queue packets",
        "Flows (1 of 1 shown)",
        "10.244.9.1:40000",
    ):
        assert text in out, text


def test_status_json_is_the_snapshot(agent_status: tuple[Harness, str]) -> None:
    harness, address = agent_status

    result = runner.invoke(cli.app, ["status", "--address", address, "--json"])

    assert result.exit_code == 0
    snapshot = json.loads(result.output)
    assert [s["name"] for s in snapshot["services"]] == [
        s["name"] for s in harness.agent.snapshot()["services"]
    ]
    assert snapshot["counters"]["decisions_forward"] == 1


def test_status_reads_a_state_file(agent_status: tuple[Harness, str], tmp_path: Path) -> None:
    harness, _ = agent_status
    path = write_status_file(tmp_path / "elsewhere", harness.agent.snapshot())

    result = runner.invoke(cli.app, ["status", "--file", str(path), "--flows", "0"])

    assert result.exit_code == 0
    assert "default/local" in result.output
    assert "Flows (0 of 1 shown)" in result.output


def test_status_shows_the_conntrack_sysctls_set_at_start_and_those_that_failed(
    agent_status: tuple[Harness, str], tmp_path: Path
) -> None:
    harness, _ = agent_status
    snapshot = harness.agent.snapshot()
    snapshot["conntrackSysctls"] = [
        SysctlResult("nf_conntrack_max", 131072, 262144, "unchanged").as_json(),
        SysctlResult("nf_conntrack_tcp_timeout_close_wait", 3600, 60, "set").as_json(),
        SysctlResult(
            "nf_conntrack_udp_timeout", 45, 30, "failed", "Read-only file system"
        ).as_json(),
    ]
    path = write_status_file(tmp_path / "elsewhere", snapshot)

    result = runner.invoke(cli.app, ["status", "--file", str(path)])

    assert result.exit_code == 0, result.output
    assert (
        "conntrack sysctls: nf_conntrack_max 262144, "
        "nf_conntrack_tcp_timeout_close_wait 3600 (was 60)"
    ) in result.output
    assert (
        "conntrack sysctl nf_conntrack_udp_timeout not set to 45 (Read-only file system): "
        "left at 30"
    ) in result.output


def test_status_without_an_agent_exits_1_with_a_hint() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    result = runner.invoke(cli.app, ["status", "--address", f"127.0.0.1:{port}"])

    assert result.exit_code == 1
    assert f"http://127.0.0.1:{port}/status" in result.output
    assert "is `pykp run` running?" in result.output


def test_status_of_something_else_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text('{"not": "a snapshot"}')

    result = runner.invoke(cli.app, ["status", "--file", str(path)])

    assert result.exit_code == 1
    assert "not a pykp status snapshot" in result.output


def test_status_reaches_a_wildcard_bind_address_through_loopback(
    agent_status: tuple[Harness, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = agent_status
    port = address.rpartition(":")[2]
    urls: list[str] = []
    real = urllib.request.urlopen

    def spy(url: str, timeout: float) -> Any:
        urls.append(url)
        return real(url, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    result = runner.invoke(cli.app, ["status", "--address", f"0.0.0.0:{port}", "--json"])

    assert result.exit_code == 0
    assert urls == [f"http://127.0.0.1:{port}/status"]
