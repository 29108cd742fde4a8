"""What a new user meets first: help that fits 80 columns, one clear line for every error
they can cause, and child processes that run the installed pykp.

Runs without root, except the capability test, which drops root's capabilities itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pykp import __version__
from pykp.cli.app import app
from pykp.cli.preflight import problems
from pykp.model import family_warnings
from pykp.self_command import pykp_command
from pykp.sources.services_file import load_services_text

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run_flags() -> list[str]:
    """Every long flag of `pykp run`, from the command itself."""
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    return [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def test_run_help_fits_80_columns_and_names_every_flag_in_full() -> None:
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "80"}, terminal_width=80)

    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "…" not in result.output
    flags = run_flags()
    assert len(flags) > 20
    for flag in flags:
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.output), flag
    assert "SIGTERM" in result.output and "stay" in result.output  # no promise of a cleanup


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--kubeconfig", "/nonexistent/kubeconfig"],
            "--kubeconfig /nonexistent/kubeconfig: no such file",
        ),
        (["--kubeconfig", "{garbage}"], "not a usable kubeconfig"),
        ([], "no source of services: give --services FILE, --kubeconfig FILE or --master URL"),
    ],
)
def test_a_bad_or_missing_kubeconfig_is_one_line(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    if "{garbage}" in argv:
        garbage = tmp_path / "garbage"
        garbage.write_text("apiVersion: [v1\n\tclusters: 3")
        argv = [str(garbage) if a == "{garbage}" else a for a in argv]

    result = runner.invoke(app, ["run", *argv])

    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


def test_preflight_names_what_is_missing_and_how_to_get_it() -> None:
    without_root = problems("run", (), extension=False, capabilities=0)
    missing_tool = problems(
        "demo", ("nft", "no-such-tool-pykp"), extension=False, capabilities=1 << 12
    )
    satisfied = problems("run", ("sh",), extension=True, capabilities=1 << 12)

    assert len(without_root) == 1 and "needs root (CAP_NET_ADMIN" in without_root[0]
    assert len(missing_tool) == 1 and "no-such-tool-pykp" in missing_tool[0]
    assert satisfied == []


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's capabilities, so it starts as root")
def test_run_without_net_admin_says_it_needs_root_and_touches_nothing(tmp_path: Path) -> None:
    services = tmp_path / "services.yaml"
    services.write_text("services: []\n")
    argv = pykp_command("run", "--services", str(services), "--state-dir", str(tmp_path))

    proc = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "needs root (CAP_NET_ADMIN" in lines[0], proc.stderr


def test_child_processes_run_the_installed_pykp_whatever_the_directory(tmp_path: Path) -> None:
    # A directory holding a `pykp` package that is not the installed one, as the source tree
    # is for a user who runs pykp from the repository's root.
    shadow = tmp_path / "pykp"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('imported the shadow pykp')\n")

    proc = subprocess.run(
        pykp_command("--version"), cwd=tmp_path, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pykp {__version__}"


def test_validate_warns_about_an_address_family_without_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(
        "services:\n"
        "  - name: web\n"
        '    clusterIPs: [10.96.0.10, "fd00:10:96::10"]\n'
        "    ports: [{port: 80, targetPort: 8080}]\n"
        "    endpoints: [{ip: 10.244.1.10}]\n"
    )

    result = runner.invoke(app, ["validate", str(path)])

    assert result.exit_code == 0  # valid, but likely wrong
    assert "warning: default/web: fd00:10:96::10 has no IPv6 endpoint" in result.output
    assert "1 warning" in result.output


def test_the_readme_example_is_clean_under_validate() -> None:
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", readme, re.S)
    assert example is not None

    services, found = load_services_text(example.group(1), "README.md")

    assert found == []
    assert len(services.services) == 1
    assert family_warnings(services) == []


def test_the_wheel_carries_the_load_generator() -> None:
    """`pykp-loadgen` is installed with pykp (built into the extension: no cargo at run time)."""
    from pykp.bench.loadgen import find_loadgen

    binary = find_loadgen()
    proc = subprocess.run(
        [binary, "no-such-mode"], capture_output=True, text=True, timeout=30, check=False
    )

    assert Path(binary).parent == Path(sys.executable).parent
    assert proc.returncode == 2
    assert "usage: pykp-loadgen serve" in proc.stderr
