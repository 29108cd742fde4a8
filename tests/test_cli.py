"""The `pykp` command line, through Typer's CliRunner.

`--help`, `--version` and `validate` must work without the Rust extension; `simulate`
needs it (the `fastpath` fixture fails those tests when it is not built).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pykp import __version__
from pykp.agent.plan import services_file_to_engine
from pykp.cli.app import app
from pykp.sources.services_file import load_bundled_example

runner = CliRunner()

GOOD = """\
services:
  - name: web
    clusterIPs: [10.96.0.10, "fd00:96::10"]
    ports:
      - {name: http, port: 80, targetPort: 8080}
      - {name: https, port: 443, targetPort: 8443}
    endpoints:
      - {ip: 10.244.1.10}
      - {ip: 10.244.2.10}
      - {ip: 10.244.3.10}
      - {ip: "fd00:244:1::10"}
  - name: dns
    clusterIP: 10.96.0.53
    ports: [{port: 53, protocol: UDP}]
    endpoints: [{ip: 10.244.1.53}]
"""

BAD = """\
services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - {port: 70000}
  - name: dns
    clusterIP: 10.96.0.53
    ports: [{port: 53, protocol: UDP}]
    endpoints: [{ip: 10.244.1.999}, {ip: 10.244.1.53}]
"""

THREE_BACKENDS = """\
services:
  - name: web
    clusterIP: 10.96.0.10
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.1.10}, {ip: 10.244.2.10}, {ip: 10.244.3.10}]
"""


def unboxed(output: str) -> str:
    """Rich's error panel without its frame and line breaks, for matching a message."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


@pytest.fixture
def without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import pykp._fastpath` fail, as on a machine where it was never built."""
    monkeypatch.setitem(sys.modules, "pykp._fastpath", None)


# --- without the extension ----------------------------------------------------------------


def test_version() -> None:
    result = runner.invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.output == f"pykp {__version__}\n"


@pytest.mark.usefixtures("without_extension")
def test_help_lists_the_commands_without_the_extension() -> None:
    result = runner.invoke(app, ["--help"])

    assert result.exit_code == 0
    assert "validate" in result.output
    assert "simulate" in result.output


def test_importing_the_cli_does_not_import_the_extension() -> None:
    code = "import sys, pykp.cli.app; sys.exit('pykp._fastpath' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.usefixtures("without_extension")
def test_validate_a_clean_file(write_services: Callable[[str], Path]) -> None:
    result = runner.invoke(app, ["validate", str(write_services(GOOD))])

    assert result.exit_code == 0
    assert result.output == "2 services, 3 ports, 5 endpoints\n"


def test_validate_the_bundled_example() -> None:
    example = Path(__file__).parent.parent / "pykp" / "examples" / "services.yaml"

    result = runner.invoke(app, ["validate", str(example)])

    assert result.exit_code == 0
    assert result.output == "7 services, 8 ports, 21 endpoints\n"


def test_validate_prints_each_problem_with_its_location_and_fails(
    write_services: Callable[[str], Path],
) -> None:
    path = write_services(BAD)

    result = runner.invoke(app, ["validate", str(path)])

    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{path}:5:16: services[0].ports[0].port: 70000 is out of range 1..65535",
        f"{path}:9:22: services[1].endpoints[0].ip: '10.244.1.999' is not a valid IP address",
        "1 service, 1 port, 1 endpoint; 2 problems (invalid entries skipped)",
    ]


def test_validate_reports_a_yaml_error_with_its_location(
    write_services: Callable[[str], Path],
) -> None:
    path = write_services("services:\n  - name: web\n   ports: [\n")

    result = runner.invoke(app, ["validate", str(path)])

    assert result.exit_code == 1
    assert f"{path}:3:4: invalid YAML" in result.output


def test_validate_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])

    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_simulate_rejects_an_unknown_policy() -> None:
    result = runner.invoke(app, ["simulate", "--policy", "fastest"])

    assert result.exit_code == 2
    assert "'fastest' is not one of random, round-robin, maglev, least-conn" in unboxed(
        result.output
    )


@pytest.mark.usefixtures("without_extension")
def test_simulate_without_the_extension_says_how_to_build_it() -> None:
    result = runner.invoke(app, ["simulate", "--connections", "10"])

    assert result.exit_code == 1
    assert "pykp._fastpath (the Rust extension) is not built" in result.output


# --- with the extension -------------------------------------------------------------------


@pytest.mark.usefixtures("fastpath")
def test_simulate_the_bundled_example_shows_every_backend_and_the_totals() -> None:
    result = runner.invoke(app, ["simulate", "--connections", "200", "--seed", "7"])

    assert result.exit_code == 0, result.output
    services, _ = load_bundled_example()
    # One nameless node: traffic policies are left to `simulate --nodes`.
    engine_services = services_file_to_engine(replace(services, traffic_policies=False))
    for engine_service in engine_services:
        assert engine_service.name in result.output
        for backend in engine_service.backends:
            host = f"[{backend.ip}]" if ":" in backend.ip else backend.ip
            assert f"{host}:{backend.port}" in result.output
    assert f"total: {200 * len(engine_services)} connections" in result.output
    assert "decisions_forward" in result.output


@pytest.mark.usefixtures("fastpath")
def test_simulate_with_a_policy_override(write_services: Callable[[str], Path]) -> None:
    path = write_services(THREE_BACKENDS)

    result = runner.invoke(
        app,
        ["simulate", "--services", str(path), "--connections", "300", "--policy", "round-robin"],
    )

    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if "10.244." in line]
    # Round-robin over three backends: exactly a third each.
    assert [row[-3:] for row in rows] == [
        ["10.244.1.10:8080", "100", "33.3"],
        ["10.244.2.10:8080", "100", "33.3"],
        ["10.244.3.10:8080", "100", "33.3"],
    ]
    assert "round-robin" in result.output
    assert "total: 300 connections" in result.output


@pytest.mark.usefixtures("fastpath")
def test_simulate_is_deterministic_for_a_seed() -> None:
    arguments = ["simulate", "--connections", "300", "--seed", "42"]

    first = runner.invoke(app, arguments)
    second = runner.invoke(app, arguments)

    assert first.exit_code == second.exit_code == 0
    assert first.output == second.output


@pytest.mark.usefixtures("fastpath")
def test_simulate_warns_about_skipped_entries_and_runs_the_rest(
    write_services: Callable[[str], Path],
) -> None:
    result = runner.invoke(
        app, ["simulate", "--services", str(write_services(BAD)), "--connections", "10"]
    )

    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "services[0].ports[0].port" in result.output
    assert "10.244.1.53:53" in result.output
