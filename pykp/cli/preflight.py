"""What a command needs of the machine, checked before it touches anything.

Each unmet need is one line that says what to do, instead of a failure halfway through
(a library's traceback, or "Operation not permitted" from a netlink socket).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterable
from pathlib import Path

CAP_NET_ADMIN = 12

# The commands pykp runs, and the Debian/Ubuntu package of each.
PACKAGES = {
    "nft": "nftables",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "conntrack": "conntrack",
    "ip": "iproute2",
    "iperf3": "iperf3",
}
NODE_TOOLS = ("nft", "iptables", "ip6tables", "conntrack")
LAB_TOOLS = (*NODE_TOOLS, "ip")


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int:
    """This process's effective capability set (0 where /proc does not say)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def missing_tools(tools: Iterable[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def problems(
    command: str,
    tools: Iterable[str] = NODE_TOOLS,
    *,
    extension: bool = True,
    capabilities: int | None = None,
) -> list[str]:
    """One line per unmet need of `pykp COMMAND` (empty: good to go)."""
    found: list[str] = []
    caps = effective_capabilities() if capabilities is None else capabilities
    if not caps >> CAP_NET_ADMIN & 1:
        found.append(
            f"pykp {command} needs root (CAP_NET_ADMIN, for netfilter rules and NFQUEUE): "
            f"run it as root, e.g. `sudo $(command -v pykp) {command} ...`"
        )
    missing = missing_tools(tools)
    if missing:
        packages = " ".join(dict.fromkeys(PACKAGES.get(tool, tool) for tool in missing))
        found.append(
            f"pykp {command} needs {', '.join(missing)} on PATH: install them "
            f"(Debian/Ubuntu: `apt-get install {packages}`, or `bash scripts/install.sh`)"
        )
    if extension and importlib.util.find_spec("pykp._fastpath") is None:
        found.append(
            "pykp._fastpath (the Rust extension) is not in this install: install pykp with "
            "`pip install .` from the source tree (or `maturin develop` for development)"
        )
    return found
