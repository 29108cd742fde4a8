"""Rule sets of the baselines, written the way kube-proxy writes them.

`iptables_*` render kube-proxy's iptables mode (pkg/proxy/iptables) for ClusterIP
services, as ``iptables-restore`` input; `nftables_*` render its nftables mode
(pkg/proxy/nftables) as the ``nft -f`` transaction knftables sends. Both cover what a
ClusterIP service with ready endpoints needs on the packet path, and the chains every
packet of a new connection crosses whatever the service (firewall/nodeport/endpoint checks),
so that the per-packet cost is kube-proxy's.

Where these differ from a real kube-proxy's output, and why that does not favour pykp:

* No NodePort, external IP, load-balancer, health-check or session-affinity rules: the
  services have none. For iptables this leaves KUBE-NODEPORTS and KUBE-EXTERNAL-SERVICES
  empty, as kube-proxy's would be; the jumps to them are kept (their cost is paid).
* No KUBE-PROXY-CANARY chains, no ``nfacct`` counter on the INVALID drop rule and no
  IPv6 family: none is on the path of the measured IPv4 connections.
* Chain-name hashes follow kube-proxy's recipe (sha256 + base32, truncated); comments are
  kube-proxy's, so the per-rule matching work (xt_comment included) is the same.
* A full load (all services at once) goes without ``--noflush`` and carries the built-in
  chain jumps in the same input: faster than kube-proxy's invocation.
* Changing one service's endpoints is a partial sync, as kube-proxy >= 1.28 does: iptables
  rewrites the top-level chains plus only the changed service's chains with
  ``iptables-restore --noflush`` (the jump rules from the built-in chains are only checked
  on full syncs); nftables sends one transaction with the changed chains. Both are the
  cheapest updates kube-proxy makes, which favours the baselines, not pykp.
* The order of KUBE-SERVICES is the order services are given (kube-proxy's is its map
  order): the benchmark puts the measured service last on purpose, kube-proxy's worst case,
  and measures random services as well.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MASQ_MARK",
    "Service",
    "iptables_change",
    "iptables_flush",
    "iptables_full",
    "nftables_change",
    "nftables_delete",
    "nftables_full",
]

MASQ_MARK = 0x4000
NFT_TABLE = "kube-proxy"


@dataclass(frozen=True)
class Service:
    """A ClusterIP service port (TCP) and its ready endpoints."""

    namespace: str
    name: str
    cluster_ip: str
    port: int
    port_name: str
    endpoints: tuple[tuple[str, int], ...]  # (ip, port)

    @property
    def port_key(self) -> str:
        """kube-proxy's ServicePortName, as it prints it."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def _hash(text: str, length: int) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode()[:length]


# --- iptables -------------------------------------------------------------------------------


def _svc_chain(svc: Service) -> str:
    return "KUBE-SVC-" + _hash(svc.port_key + "tcp", 16)


def _sep_chain(svc: Service, endpoint: tuple[str, int]) -> str:
    return "KUBE-SEP-" + _hash(f"{svc.port_key}tcp{endpoint[0]}:{endpoint[1]}", 16)


_FILTER_CHAINS = (
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SERVICES",
)
_NAT_TOP_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")

# The jumps kube-proxy ensures from the built-in chains (EnsureRule, on full syncs).
_FILTER_JUMPS = (
    "-A INPUT -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
    "-A INPUT -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes service portals" -j KUBE-SERVICES',
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "
    '"kubernetes service portals" -j KUBE-SERVICES',
)
_NAT_JUMPS = (
    '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
)


def _filter_table(with_jumps: bool) -> list[str]:
    lines = ["*filter"]
    lines += [f":{c} - [0:0]" for c in _FILTER_CHAINS]
    if with_jumps:
        lines += _FILTER_JUMPS
    lines += [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    return lines


def _nat_top_rules(services: Sequence[Service]) -> list[str]:
    lines = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK:#x}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK:#x}",
    ]
    for svc in services:
        if svc.endpoints:
            lines.append(
                f'-A KUBE-SERVICES -m comment --comment "{svc.port_key} cluster IP" '
                f"-m tcp -p tcp -d {svc.cluster_ip}/32 --dport {svc.port} -j {_svc_chain(svc)}"
            )
    lines.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    return lines


def _service_chains(svc: Service, cluster_cidr: str) -> tuple[list[str], list[str]]:
    """(chain declarations, rules) of one service's KUBE-SVC and KUBE-SEP chains."""
    if not svc.endpoints:
        return [], []
    svc_chain = _svc_chain(svc)
    seps = [_sep_chain(svc, ep) for ep in svc.endpoints]
    chains = [f":{svc_chain} - [0:0]"] + [f":{sep} - [0:0]" for sep in seps]
    rules = [
        f'-A {svc_chain} -m comment --comment "{svc.port_key} cluster IP" -m tcp -p tcp '
        f"-d {svc.cluster_ip}/32 --dport {svc.port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
    ]
    n = len(seps)
    for i, (sep, (ip, port)) in enumerate(zip(seps, svc.endpoints)):
        comment = f'-m comment --comment "{svc.port_key} -> {ip}:{port}"'
        if i < n - 1:
            # kube-proxy: probability 1/(n-i), printed with %0.10f.
            rules.append(
                f"-A {svc_chain} {comment} -m statistic --mode random "
                f"--probability {1.0 / (n - i):0.10f} -j {sep}"
            )
        else:
            rules.append(f"-A {svc_chain} {comment} -j {sep}")
    for sep, (ip, port) in zip(seps, svc.endpoints):
        rules.append(f"-A {sep} -m comment --comment {svc.port_key} -s {ip}/32 -j KUBE-MARK-MASQ")
        rules.append(
            f"-A {sep} -m comment --comment {svc.port_key} -m tcp -p tcp "
            f"-j DNAT --to-destination {ip}:{port}"
        )
    return chains, rules


def iptables_full(services: Sequence[Service], cluster_cidr: str) -> str:
    """A full sync on an empty node: every chain, every rule, the built-in jumps.

    Loaded with ``iptables-restore -w`` into an empty node (kube-proxy adds ``--noflush``,
    which on iptables-nft 1.8.9 is ~4x slower for a full load; the jumps from the built-in
    chains are included here instead of kube-proxy's separate `iptables` calls). Both
    choices make the baseline faster, not slower.
    """
    lines = _filter_table(with_jumps=True)
    lines.append("*nat")
    lines += [f":{c} - [0:0]" for c in _NAT_TOP_CHAINS]
    rules: list[str] = []
    for svc in services:
        chains, svc_rules = _service_chains(svc, cluster_cidr)
        lines += chains
        rules += svc_rules
    lines += _NAT_JUMPS
    lines += _nat_top_rules(services)
    lines += rules
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_change(
    services: Sequence[Service], old: Service, new: Service, cluster_cidr: str
) -> str:
    """kube-proxy's partial sync after `old` became `new` (same service, other endpoints).

    Top-level chains in full (KUBE-SERVICES has a rule per service), the changed service's
    chains, and ``-X`` for the endpoint chains that went away. ``--noflush`` input.
    """
    lines = _filter_table(with_jumps=False)
    lines.append("*nat")
    lines += [f":{c} - [0:0]" for c in _NAT_TOP_CHAINS]
    chains, svc_rules = _service_chains(new, cluster_cidr)
    lines += chains
    kept = {_sep_chain(new, ep) for ep in new.endpoints}
    stale = [_sep_chain(old, ep) for ep in old.endpoints if _sep_chain(old, ep) not in kept]
    if not new.endpoints and old.endpoints:
        stale.append(_svc_chain(old))
    lines += [f":{c} - [0:0]" for c in stale]
    lines += _nat_top_rules(services)
    lines += svc_rules
    lines += [f"-X {c}" for c in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_flush() -> str:
    """Empties filter and nat (without --noflush: flushes every chain, deletes user chains)."""
    return "*filter\nCOMMIT\n*nat\nCOMMIT\n"


# --- nftables -------------------------------------------------------------------------------


def _nft_svc_chain(svc: Service) -> str:
    key = f"{svc.namespace}/{svc.name}/tcp/{svc.port_name}"
    return f"service-{_hash(key, 8)}-{key}"


def _nft_ep_chain(svc: Service, endpoint: tuple[str, int]) -> str:
    key = f"{svc.namespace}/{svc.name}/tcp/{svc.port_name}__{endpoint[0]}/{endpoint[1]}"
    return f"endpoint-{_hash(key, 8)}-{key}"


def _nft_base(service_cidr: str) -> list[str]:
    t = f"ip {NFT_TABLE}"
    lines = [f'add table {t} {{ comment "rules for kube-proxy" ; }}']
    base = {
        "filter-prerouting": "type filter hook prerouting priority -110",
        "filter-input": "type filter hook input priority -110",
        "filter-forward": "type filter hook forward priority -110",
        "filter-output": "type filter hook output priority -110",
        "filter-output-post-dnat": "type filter hook output priority -90",
        "nat-prerouting": "type nat hook prerouting priority -100",
        "nat-output": "type nat hook output priority -100",
        "nat-postrouting": "type nat hook postrouting priority 100",
    }
    regular = (
        "mark-for-masquerade",
        "masquerading",
        "services",
        "service-endpoints-check",
        "cluster-ips-check",
        "firewall-check",
        "nodeport-endpoints-check",
    )
    for name, spec in base.items():
        lines.append(f"add chain {t} {name} {{ {spec} ; }}")
    for name in regular:
        lines.append(f"add chain {t} {name}")
    lines += [
        f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f"add set {t} nodeport-ips {{ type ipv4_addr ; }}",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add map {t} no-endpoint-services "
        "{ type ipv4_addr . inet_proto . inet_service : verdict ; }",
        f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
    ]
    rules = {
        "filter-prerouting": ["ct state new jump firewall-check"],
        "filter-input": [
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check",
        ],
        "filter-forward": [
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ],
        "filter-output": [
            "ct state new jump service-endpoints-check",
            "ct state new jump firewall-check",
        ],
        "filter-output-post-dnat": ["ct state new jump cluster-ips-check"],
        "nat-prerouting": ["jump services"],
        "nat-output": ["jump services"],
        "nat-postrouting": ["jump masquerading"],
        "mark-for-masquerade": [f"mark set mark or {MASQ_MARK:#x}"],
        "masquerading": [
            f"mark and {MASQ_MARK:#x} == 0 return",
            f"mark set mark xor {MASQ_MARK:#x}",
            "masquerade fully-random",
        ],
        "services": [
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "fib daddr type local ip daddr @nodeport-ips meta l4proto . th dport "
            "vmap @service-nodeports",
        ],
        "service-endpoints-check": [
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ],
        "cluster-ips-check": [
            'ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
            f'ip daddr {{ {service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"',
        ],
        "firewall-check": ["ip daddr . meta l4proto . th dport vmap @firewall-ips"],
        "nodeport-endpoints-check": [
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
        ],
    }
    for chain, chain_rules in rules.items():
        lines.append(f"flush chain {t} {chain}")
        lines += [f"add rule {t} {chain} {rule}" for rule in chain_rules]
    return lines


def _nft_service(svc: Service, cluster_cidr: str, flush: bool) -> list[str]:
    t = f"ip {NFT_TABLE}"
    chain = _nft_svc_chain(svc)
    lines = [f"add chain {t} {chain}"]
    if flush:
        lines.append(f"flush chain {t} {chain}")
    eps = [_nft_ep_chain(svc, ep) for ep in svc.endpoints]
    for ep_chain, (ip, port) in zip(eps, svc.endpoints):
        lines.append(f"add chain {t} {ep_chain}")
        if flush:
            lines.append(f"flush chain {t} {ep_chain}")
        lines.append(f"add rule {t} {ep_chain} ip saddr {ip} jump mark-for-masquerade")
        lines.append(f"add rule {t} {ep_chain} meta l4proto tcp dnat to {ip}:{port}")
    lines.append(
        f"add rule {t} {chain} ip daddr {svc.cluster_ip} tcp dport {svc.port} "
        f"ip saddr != {cluster_cidr} jump mark-for-masquerade"
    )
    if eps:
        vmap = " , ".join(f"{i} : goto {c}" for i, c in enumerate(eps))
        lines.append(f"add rule {t} {chain} numgen random mod {len(eps)} vmap {{ {vmap} }}")
    return lines


def nftables_full(services: Iterable[Service], cluster_cidr: str, service_cidr: str) -> str:
    """A full sync on an empty node, one ``nft -f`` transaction (one element per line, as
    knftables writes them)."""
    t = f"ip {NFT_TABLE}"
    lines = _nft_base(service_cidr)
    elements: list[str] = []
    for svc in services:
        lines += _nft_service(svc, cluster_cidr, flush=False)
        elements.append(f"add element {t} cluster-ips {{ {svc.cluster_ip} }}")
        if svc.endpoints:
            elements.append(
                f"add element {t} service-ips {{ {svc.cluster_ip} . tcp . {svc.port} : "
                f"goto {_nft_svc_chain(svc)} }}"
            )
    return "\n".join(lines + elements) + "\n"


def nftables_change(old: Service, new: Service, cluster_cidr: str, service_cidr: str) -> str:
    """kube-proxy's partial sync after `old` became `new`: the changed chains in one
    transaction, stale endpoint chains flushed and deleted."""
    t = f"ip {NFT_TABLE}"
    lines = _nft_base(service_cidr)
    lines += _nft_service(new, cluster_cidr, flush=True)
    kept = {_nft_ep_chain(new, ep) for ep in new.endpoints}
    for ep in old.endpoints:
        chain = _nft_ep_chain(old, ep)
        if chain not in kept:
            lines.append(f"flush chain {t} {chain}")
            lines.append(f"delete chain {t} {chain}")
    return "\n".join(lines) + "\n"


def nftables_delete() -> str:
    return f"add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
