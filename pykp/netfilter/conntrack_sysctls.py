"""kube-proxy's conntrack sysctls, set once when the agent starts.

The same settings, defaults and rules as kube-proxy's `--conntrack-*` flags (its
pkg/proxy/conntrack/sysctls.go):

- ``nf_conntrack_max`` = max(max-per-core x the node's CPUs, min), the product capped at
  2^20; only ever raised, never lowered. With it the conntrack module's ``hashsize`` is
  raised to a quarter of that when smaller. max-per-core 0 leaves both alone.
- ``nf_conntrack_tcp_timeout_established`` (default 24h) and
  ``nf_conntrack_tcp_timeout_close_wait`` (default 1h): set to the value, up or down;
  0 leaves them.
- ``nf_conntrack_tcp_be_liberal``: set to 1 when asked; never cleared.
- ``nf_conntrack_udp_timeout`` and ``nf_conntrack_udp_timeout_stream``: set when given
  (default 0: left alone).

Timeouts are whole seconds (a Go duration divided by time.Second). Where kube-proxy gives up
its start when a write fails, pykp logs a warning and goes on: a read-only /proc/sys (a
container), or a sysctl that is not this network namespace's to write (nf_conntrack_max is
global and read-only outside the initial namespace), must not stop the node proxy.

`apply_conntrack_sysctls` takes the /proc/sys root and the hashsize file as paths, so it is
tested on a temporary directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CPU_ONLINE",
    "HASHSIZE",
    "MAX_SCALED",
    "PROC_SYS",
    "ConntrackSettings",
    "SysctlResult",
    "apply_conntrack_sysctls",
    "conntrack_max",
    "node_cpus",
]

_log = logging.getLogger(__name__)

PROC_SYS: Final = Path("/proc/sys")
HASHSIZE: Final = Path("/sys/module/nf_conntrack/parameters/hashsize")
CPU_ONLINE: Final = Path("/sys/devices/system/cpu/online")
MAX_SCALED: Final = 1 << 20  # kube-proxy's cap on max-per-core x CPUs (1M entries)


@dataclass(frozen=True)
class ConntrackSettings:
    """kube-proxy's conntrack configuration (`--conntrack-*`, `conntrack.*`); its defaults."""

    max_per_core: int = 32768  # 0: leave nf_conntrack_max (and hashsize) alone
    min: int = 131072
    tcp_established_timeout: float = 86400.0  # seconds; 0: leave
    tcp_close_wait_timeout: float = 3600.0  # seconds; 0: leave
    tcp_be_liberal: bool = False  # True: set nf_conntrack_tcp_be_liberal to 1
    udp_timeout: float = 0.0  # seconds; 0: leave
    udp_stream_timeout: float = 0.0  # seconds; 0: leave


@dataclass(frozen=True)
class SysctlResult:
    """What became of one setting."""

    name: str  # "nf_conntrack_max", ...; "hashsize" for the module parameter
    wanted: int
    found: int | None  # the value before (None: unreadable)
    outcome: str  # "set", "unchanged" (already so; for the max: as high or higher), "failed"
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wanted": self.wanted,
            "found": self.found,
            "outcome": self.outcome,
            "error": self.error,
        }


def node_cpus(online: Path = CPU_ONLINE) -> int:
    """The node's online CPUs, from sysfs as kube-proxy counts them (not the process's
    cpuset, which a static CPU policy narrows: the table is the node's); else os.cpu_count()."""
    try:
        count = 0
        for part in online.read_text().strip().split(","):
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
        if count > 0:
            return count
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


def conntrack_max(settings: ConntrackSettings, cpus: int) -> int:
    """The nf_conntrack_max kube-proxy wants; 0: none (max-per-core 0)."""
    if settings.max_per_core <= 0:
        return 0
    scaled = settings.max_per_core * cpus
    if scaled > MAX_SCALED:
        return MAX_SCALED
    return max(scaled, settings.min)


def _read(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write(path: Path, value: int) -> None:
    # Never creates the file: a sysctl that does not exist is an error, as in /proc/sys.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


def _apply(name: str, path: Path, wanted: int, *, raise_only: bool = False) -> SysctlResult:
    found = _read(path)
    if found is not None and (found >= wanted if raise_only else found == wanted):
        return SysctlResult(name, wanted, found, "unchanged")
    try:
        _write(path, wanted)
    except OSError as error:
        message = error.strerror or str(error)
        _log.warning(
            "cannot set %s to %d (%s; a read-only /proc/sys or /sys, or not this network "
            "namespace's to set): left at %s",
            name,
            wanted,
            message,
            "an unreadable value" if found is None else found,
        )
        return SysctlResult(name, wanted, found, "failed", message)
    _log.info("set %s to %d (was %s)", name, wanted, found)
    return SysctlResult(name, wanted, found, "set")


def apply_conntrack_sysctls(
    settings: ConntrackSettings,
    *,
    proc_sys: Path = PROC_SYS,
    hashsize: Path = HASHSIZE,
    cpus: int | None = None,
) -> list[SysctlResult]:
    """Set the conntrack sysctls as kube-proxy does at start; never raises for a write
    that fails (logged, and reported as "failed")."""
    netfilter = proc_sys / "net" / "netfilter"
    results = []
    maximum = conntrack_max(settings, node_cpus() if cpus is None else cpus)
    if maximum > 0:
        result = _apply(
            "nf_conntrack_max", netfilter / "nf_conntrack_max", maximum, raise_only=True
        )
        results.append(result)
        if result.outcome != "failed":
            # kube-proxy's rule: the hash table has at least a bucket per 4 entries.
            results.append(_apply("hashsize", hashsize, maximum // 4, raise_only=True))
    timeouts = (
        ("nf_conntrack_tcp_timeout_established", settings.tcp_established_timeout),
        ("nf_conntrack_tcp_timeout_close_wait", settings.tcp_close_wait_timeout),
        ("nf_conntrack_tcp_be_liberal", 1 if settings.tcp_be_liberal else 0),
        ("nf_conntrack_udp_timeout", settings.udp_timeout),
        ("nf_conntrack_udp_timeout_stream", settings.udp_stream_timeout),
    )
    for name, value in timeouts:
        if value > 0:
            results.append(_apply(name, netfilter / name, int(value)))
    return results
