"""Kernel conntrack cleanup for stale UDP flows (kube-proxy's conntrack.ClearEntries*).

A UDP "connection" NATed to a backend keeps going to that backend for as long as the
client keeps sending, even after the backend is gone; kube-proxy deletes such entries
when an endpoint goes away. TCP needs none of this: a dead backend resets or times out.

Implemented with the ``conntrack`` CLI (Debian package ``conntrack``), run through
`pykp.netfilter.rules.run_tool` like every other kernel command, so ``netns`` works the same way
and failures raise `pykp.netfilter.rules.RulesError`. The CLI was chosen over pyroute2's
conntrack support because it filters by NAT state and works in another namespace
without moving a thread there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pykp.netfilter.rules import RulesError, run_tool

__all__ = ["count_entries", "delete_udp_flows", "delete_udp_flows_to_backend"]

_DELETED = re.compile(r"(\d+) flow entries have been deleted")


def _family(ip: str) -> list[str]:
    return ["-f", "ipv6"] if ":" in ip else []


def _delete(argv: Sequence[str], netns: str | None) -> int:
    full = ["conntrack", "-D", *argv]
    res = run_tool(full, netns=netns, check=False)
    found = _DELETED.search(res.stderr)
    # Exit status 1 with "0 flow entries have been deleted" just means nothing matched.
    if found is None or res.returncode not in (0, 1):
        raise RulesError(full, res.returncode, res.stderr)
    return int(found.group(1))


def delete_udp_flows(
    service_ip: str,
    backend_ip: str,
    backend_port: int | None = None,
    *,
    netns: str | None = None,
) -> int:
    """Delete UDP entries sent to `service_ip` and DNATed to `backend_ip` (and port).

    `service_ip` is the original destination: a ClusterIP, externalIP, LB IP or, for a
    NodePort, the node address. Returns how many entries were deleted.
    """
    argv = [*_family(service_ip), "-p", "udp", "--orig-dst", service_ip, "--reply-src", backend_ip]
    if backend_port is not None:
        argv += ["--reply-port-src", str(backend_port)]
    return _delete(argv, netns)


def delete_udp_flows_to_backend(backend_ip: str, *, netns: str | None = None) -> int:
    """Delete every DNATed UDP entry whose backend is `backend_ip`, whatever the frontend.

    Flows sent to the pod's own address (not NATed) are left alone.
    """
    return _delete([*_family(backend_ip), "-p", "udp", "--dst-nat", backend_ip], netns)


def count_entries(*, netns: str | None = None) -> int:
    """Entries in the conntrack table (of `netns`, or of the caller's namespace)."""
    argv = ["conntrack", "-C"]
    out = run_tool(argv, netns=netns).stdout.strip()
    try:
        return int(out)
    except ValueError:
        raise RulesError(argv, 0, f"unexpected output: {out!r}") from None
