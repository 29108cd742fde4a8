"""How pykp starts pykp in a child process (the agent of a demo, a lab or a bench)."""

from __future__ import annotations

import sys

# `python -m pykp` puts the current directory first on sys.path: run from a source
# checkout, the child would import the tree's `pykp/` (which has no built extension)
# instead of the installed package. `-c` with that entry removed runs the pykp this
# interpreter has installed, whatever the current directory.
_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.path if p != '']; "
    "from pykp.cli import app; app(prog_name='pykp')"
)


def pykp_command(*args: str) -> list[str]:
    """The argv of `pykp ARGS...` run by this interpreter's installed pykp."""
    return [sys.executable, "-c", _BOOTSTRAP, *args]
