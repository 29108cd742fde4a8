"""The node's own addresses: where NodePorts listen, and which service IPs would capture
the node's traffic."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["filter_node_addresses", "interface_addresses"]


def interface_addresses() -> list[str]:
    """Every address on the interfaces of this network namespace (netlink, no privilege)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        # IFA_LOCAL is the local end of a point-to-point link, where IFA_ADDRESS is the peer.
        return [
            str(message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS"))
            for message in ipr.get_addr()
        ]


def filter_node_addresses(addresses: Iterable[str], cidrs: Sequence[str]) -> list[str]:
    """The addresses NodePorts listen on, sorted (IPv4 first) and without duplicates.

    With CIDRs (--nodeport-addresses), the addresses inside them; without, every address
    but loopback and link-local ones (a link-local address needs a zone to be reached).
    """
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
    chosen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if networks:
            if any(address in network for network in networks):
                chosen.add(address)
        elif not (address.is_loopback or address.is_link_local):
            chosen.add(address)
    return [str(address) for address in sorted(chosen, key=lambda a: (a.version, int(a)))]
