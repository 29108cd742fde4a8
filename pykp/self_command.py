"""How pykp starts pykp in a child process (the agent of a demo, a lab or a bench)."""

from __future__ import annotations

import sys

# `python -m pykp` puts the current directory first on sys.path: run from a source
# checkout, the child would import the tree's `pykp/` (which has no built extension)
# instead of the installed package. `-c` with that entry removed runs the pykp this
# interpreter has installed, whatever the current directory.
_SAFE_PATH = "import sys; sys.path[:] = [p for p in sys.path if p != '']; "


def python_command(code: str, *args: str) -> list[str]:
    """The argv of `python -c CODE ARGS...` by this interpreter, importing the installed pykp."""
    return [sys.executable, "-c", _SAFE_PATH + code, *args]


def pykp_command(*args: str) -> list[str]:
    """The argv of `pykp ARGS...` run by this interpreter's installed pykp."""
    return python_command("from pykp.cli.app import app; app(prog_name='pykp')", *args)
