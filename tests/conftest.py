"""Shared fixtures: services files on disk, and the Rust extension for tests that need it."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


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
