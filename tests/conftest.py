"""Shared fixtures: services files on disk, the Rust extension for tests that need it, and
the end-to-end tests' usual lab (a module overrides `lab` when it needs another)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pykp.labs.lab import Lab


@pytest.fixture
def write_services(tmp_path: Path) -> Callable[[str], Path]:
    """Write (dedented) services-file text to `tmp_path/services.yaml` and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "services.yaml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def fastpath() -> ModuleType:
    """The built extension. Missing, it fails the test (CI builds it): never a silent skip."""
    try:
        import pykp._fastpath as fastpath
    except ModuleNotFoundError as error:
        pytest.fail(f"pykp._fastpath is not built (run `maturin develop`): {error}")
    return fastpath


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A node, three backend pods answering HTTP on port 8080 with their name, one client
    pod: built once per test module, removed after it (privileged: namespaces)."""
    with Lab(backends=3, clients=1) as lab:
        lab.start_http_servers(port=8080)
        yield lab
