"""The `pykp` command: a thin Typer layer over plain functions.

Commands import the Rust extension only when they run, so `pykp --help` and
`pykp validate` work without it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pykp import __version__
from pykp.services_file import (
    POLICIES,
    Problem,
    ServicesFile,
    ServicesFileError,
    load_bundled_example,
    load_services_file,
)
from pykp.simulate import render_simulation, simulate_connections

app = typer.Typer(
    name="pykp",
    no_args_is_help=True,
    add_completion=False,
)

_EXTENSION = "pykp._fastpath"
_NOT_BUILT = (
    f"{_EXTENSION} (the Rust extension) is not built: run `maturin develop` or `pip install -e .`"
)


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        # Piped or captured output has no width to fit: do not cut tables at rich's default 80.
        console.width = 200
    return console


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pykp {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """pykp: a Kubernetes node service proxy (Rust fast path, Python control plane)."""


# --- validate -----------------------------------------------------------------------------


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def services_summary(services: ServicesFile, problems: list[Problem]) -> str:
    """One line: what loaded, and how many problems were skipped."""
    summary = ", ".join(
        (
            _plural(len(services.services), "service"),
            _plural(services.port_count, "port"),
            _plural(services.endpoint_count, "endpoint"),
        )
    )
    if problems:
        summary += f"; {_plural(len(problems), 'problem')} (invalid entries skipped)"
    return summary


@app.command()
def validate(
    file: Annotated[
        Path,
        typer.Argument(help="The services file (YAML).", exists=True, dir_okay=False),
    ],
) -> None:
    """Check a services file: print each problem with its location, then a summary.

    Exits with 1 when there is any problem, 0 when the file is clean.
    """
    try:
        services, problems = load_services_file(file)
    except ServicesFileError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    for problem in problems:
        typer.echo(str(problem))
    typer.echo(services_summary(services, problems))
    if problems:
        raise typer.Exit(1)


# --- simulate -----------------------------------------------------------------------------


def _check_policy(value: str | None) -> str | None:
    if value is not None and value not in POLICIES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(POLICIES)}")
    return value


def _load_services(path: Path | None) -> ServicesFile:
    """The services file at `path` (the bundled example if None); problems go to stderr."""
    try:
        services, problems = load_bundled_example() if path is None else load_services_file(path)
    except ServicesFileError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    for problem in problems:
        typer.echo(f"warning: {problem} (skipped)", err=True)
    return services


@app.command()
def simulate(
    services: Annotated[
        Path | None,
        typer.Option(
            "--services",
            "-f",
            help="The services file (default: the bundled example).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    connections: Annotated[
        int,
        typer.Option("--connections", "-n", help="New connections per service port.", min=1),
    ] = 1000,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for the clients and the engine (default: random, printed).", min=0),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help=f"Override every service's policy: {', '.join(POLICIES)}.",
            callback=_check_policy,
        ),
    ] = None,
) -> None:
    """Show how the engine spreads synthetic connections over backends (no cluster needed)."""
    services_file = _load_services(services)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    try:
        result = simulate_connections(
            services_file, connections=connections, seed=seed, policy=policy
        )
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        typer.echo(_NOT_BUILT, err=True)
        raise typer.Exit(1) from None
    render_simulation(result, _console())


if __name__ == "__main__":  # `python -m pykp.cli`, for when the script is not on PATH
    app()
