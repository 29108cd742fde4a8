"""Running the commands of the rules layer (nft, iptables, conntrack): the only place it
execs, with one error type."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RulesError", "ToolResult", "run_tool"]

_TIMEOUT = 300.0


class RulesError(RuntimeError):
    """A command of the rules layer failed (or could not be started)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip()
        if len(detail) > 4000:
            detail = detail[:4000] + " ..."
        super().__init__(f"`{shlex.join(self.argv)}` exited with {returncode}: {detail}")


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: str
    stderr: str


def run_tool(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    stdin: str | None = None,
    check: bool = True,
) -> ToolResult:
    """Run one command (inside `netns` when given); the only place this layer execs."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    try:
        proc = subprocess.run(
            full,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as error:
        raise RulesError(full, 127, f"{error} (install iptables, nftables, conntrack)") from None
    except subprocess.TimeoutExpired:
        raise RulesError(full, -1, f"timed out after {_TIMEOUT:.0f} s") from None
    if check and proc.returncode != 0:
        raise RulesError(full, proc.returncode, proc.stderr)
    return ToolResult(proc.returncode, proc.stdout, proc.stderr)
