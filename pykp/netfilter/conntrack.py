"""Kernel conntrack cleanup for stale UDP flows (kube-proxy's conntrack.ClearEntries*).

A UDP "connection" NATed to a backend keeps going to that backend for as long as the
client keeps sending, even after the backend is gone; kube-proxy deletes such entries
when an endpoint goes away. Likewise a UDP flow that began while its frontend had no
backend: its entry was never NATed, and kube-proxy deletes such entries when the service
goes from no endpoints to some. TCP needs none of this: a dead backend resets or times out.

Implemented with the ``conntrack`` CLI (Debian package ``conntrack``), run through
`pykp.netfilter.rules.run_tool` like every other kernel command, so ``netns`` works the same way
and failures raise `pykp.netfilter.rules.RulesError`. The CLI was chosen over pyroute2's
conntrack support because it filters by NAT state and works in another namespace
without moving a thread there.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from pykp.netfilter.rules import RulesError, run_tool

__all__ = [
    "count_entries",
    "delete_udp_flows",
    "delete_udp_flows_to_backend",
    "delete_unnated_udp_flows",
]

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


# Frontends past which one listing of the UDP table (per family) beats one `conntrack -D`
# per frontend (about 10 ms each): a restarted agent finds every UDP frontend newly served.
_DIRECT_LIMIT = 8
# An entry as `conntrack -L` prints it: the original tuple, then the reply tuple.
_ENTRY = re.compile(
    r"\bsrc=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)\b.*?\bsrc=(\S+) dst=\S+ sport=\d+ dport=\d+"
)


def _canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def delete_unnated_udp_flows(
    frontends: Iterable[tuple[str, int]], *, netns: str | None = None
) -> int:
    """Delete the UDP entries sent to these (IP, port) frontends that were never NATed:
    the reply would come from the frontend itself (`dst=<service IP> [UNREPLIED]`).

    Entries NATed to a backend are left alone: they are live flows (a backend that left
    has its entries deleted by `delete_udp_flows`). A few frontends cost a `conntrack -D`
    each; more, one listing of the table per family and a delete per entry found.
    """
    wanted = {(_canonical(ip), port) for ip, port in frontends}
    if len(wanted) <= _DIRECT_LIMIT:
        return sum(delete_udp_flows(ip, ip, port, netns=netns) for ip, port in sorted(wanted))
    deleted = 0
    for family in ("ipv4", "ipv6"):
        if not any((":" in ip) == (family == "ipv6") for ip, _ in wanted):
            continue
        argv = ["conntrack", "-L", "-f", family, "-p", "udp"]
        for line in run_tool(argv, netns=netns).stdout.splitlines():
            found = _ENTRY.search(line)
            if found is None:
                continue
            src, dst, sport, dport, reply_src = found.groups()
            dst = _canonical(dst)
            if (dst, int(dport)) not in wanted or _canonical(reply_src) != dst:
                continue
            deleted += _delete(
                [
                    "-f", family, "-p", "udp",
                    "--orig-src", src, "--orig-dst", dst, "--sport", sport, "--dport", dport,
                    "--reply-src", dst,
                ],
                netns,
            )  # fmt: skip
    return deleted


def count_entries(*, netns: str | None = None) -> int:
    """Entries in the conntrack table (of `netns`, or of the caller's namespace)."""
    argv = ["conntrack", "-C"]
    out = run_tool(argv, netns=netns).stdout.strip()
    try:
        return int(out)
    except ValueError:
        raise RulesError(argv, 0, f"unexpected output: {out!r}") from None
