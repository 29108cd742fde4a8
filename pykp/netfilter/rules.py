"""Kernel rules of the pykp datapath: one nftables table plus a tiny iptables chain.

Only the first packet of a new connection to a service frontend goes to user space:

1. ``mark_new`` / ``mark_new_out`` (nft, priority -151, just before mangle) set the
   queue bit on ``ct state new`` packets whose ``daddr . l4proto . dport`` is in
   ``frontends4/6``;
2. iptables mangle PREROUTING/OUTPUT jump to ``PYKP-QUEUE``, which hands packets
   carrying the queue bit to NFQUEUE (this kernel has no nft ``queue`` statement, and
   xtables NFQUEUE through iptables-nft works everywhere);
3. pykp's Rust reader accepts the packet with a mark naming the backend
   (``id << shift`` inside ``backend_mask``) or the reject mark;
4. ``nat_pre`` / ``nat_out`` DNAT by looking the mark up in ``backends4/6``, setting
   the masquerade bit first where needed; ``nat_post`` masquerades;
5. ``reject_*`` reject the reject mark and anything still addressed to a service IP.

Conntrack carries every later packet. Per-packet cost is a few set lookups whatever
the number of services: there are no per-service rules, only set and map elements,
which `RuleManager.sync` updates by difference in one ``nft -f -`` transaction.

Every command runs through `run_tool` (optionally inside ``ip netns exec <netns>``),
which raises `RulesError` on failure.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import shlex
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pykp.netfilter import bulk_load
from pykp.netfilter.executor import LibNftables, NftExecutor, make_executor
from pykp.netfilter.monitor import as_writer
from pykp.netfilter.nfnetlink import NetlinkError, NftReader, TableSummary
from pykp.netfilter.tool import RulesError, ToolResult, run_tool

__all__ = [
    "CT_CLOSING_MARK",
    "JUMP_COMMENT",
    "KUBE_PROXY_DROP_BIT",
    "KUBE_PROXY_MASQ_BIT",
    "FrontendRule",
    "MarkLayout",
    "RuleManager",
    "RuleState",
    "RulesError",
    "SyncStats",
    "ToolResult",
    "cleanup_all",
    "run_tool",
]

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

# The conntrack mark bit a service flow's first FIN or RST sets (with --follow-conntrack):
# pykp's queue bit, here in the conntrack mark's space.
CT_CLOSING_MARK = 0x00002000
KUBE_PROXY_MASQ_BIT = 0x4000
KUBE_PROXY_DROP_BIT = 0x8000
JUMP_COMMENT = "pykp"
_MARK_BITS = 0xFFFFFFFF
_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_HOOKS = ("PREROUTING", "OUTPUT")
# Elements per `add element` statement; all statements still form one transaction.
_CHUNK = 4096


# --- marks --------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkLayout:
    """How pykp's fields share the 32-bit packet mark.

    The backend field holds ``id << shift``; id 0 means "no decision" and the
    all-ones id is the reject mark, so ids run from 1 to `max_backend_id`.
    """

    backend_mask: int = 0xFFFF0000
    queue_bit: int = 0x00002000
    masq_bit: int = KUBE_PROXY_MASQ_BIT
    # Set with the queue bit on a new connection from a pod or the node to an external
    # frontend of an externalTrafficPolicy Local service: the reader then decides it as
    # the port's cluster-wide service (kube-proxy's short-circuit).
    cluster_source_bit: int = 0x00001000

    def validate(self) -> None:
        """Raise ValueError unless the fields are sane and do not collide."""
        for name in ("backend_mask", "queue_bit", "masq_bit", "cluster_source_bit"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= _MARK_BITS:
                raise ValueError(f"{name} must be a non-zero 32-bit mask, got {value!r}")
        field_ = self.backend_mask >> self.shift
        if field_ & (field_ + 1):
            raise ValueError(f"backend_mask {self.backend_mask:#x} is not contiguous")
        if field_ < 3:
            raise ValueError("backend_mask needs at least 2 bits (one id plus the reject id)")
        for name in ("queue_bit", "masq_bit", "cluster_source_bit"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name} must be a single bit, got {value:#x}")
        if self.cluster_source_bit & (
            self.backend_mask | self.queue_bit | self.masq_bit | KUBE_PROXY_DROP_BIT
        ):
            raise ValueError("cluster_source_bit collides with another field or kube-proxy's bits")
        if self.queue_bit & self.backend_mask:
            raise ValueError("queue_bit lies inside backend_mask")
        if self.masq_bit & self.backend_mask:
            raise ValueError("masq_bit lies inside backend_mask")
        if self.queue_bit == self.masq_bit:
            raise ValueError("queue_bit and masq_bit are the same bit")
        kube = KUBE_PROXY_MASQ_BIT | KUBE_PROXY_DROP_BIT
        if self.backend_mask & kube:
            raise ValueError("backend_mask overlaps kube-proxy's mark bits 0x4000/0x8000")
        if self.queue_bit & kube:
            raise ValueError("queue_bit is one of kube-proxy's mark bits 0x4000/0x8000")
        if self.masq_bit == KUBE_PROXY_DROP_BIT:
            raise ValueError("masq_bit is kube-proxy's drop bit 0x8000")

    @property
    def shift(self) -> int:
        mask = self.backend_mask
        return (mask & -mask).bit_length() - 1 if mask > 0 else 0

    @property
    def max_backend_id(self) -> int:
        return (self.backend_mask >> self.shift) - 1

    @property
    def reject_mark(self) -> int:
        return self.backend_mask

    def backend_mark(self, backend_id: int) -> int:
        if not 1 <= backend_id <= self.max_backend_id:
            raise ValueError(f"backend id {backend_id} outside 1..{self.max_backend_id}")
        return backend_id << self.shift


# --- desired state ------------------------------------------------------------------


@dataclass(frozen=True)
class FrontendRule:
    """An address, port and protocol where a service is reached."""

    ip: str
    port: int
    protocol: str  # "TCP" | "UDP" | "SCTP"
    external: bool = False  # NodePort on a node address, externalIP, LB ingress IP
    masquerade: bool = True  # external only: policy Cluster -> SNAT; Local -> keep client IP
    # Its first packets go to pykp's reader; False: the kernel path decides them (a policy
    # the kernel expresses), and never a user-space hop.
    queued: bool = True
    # A Local traffic policy left it no endpoint on this node (the service has some
    # elsewhere): what it cannot serve is dropped, not refused, as kube-proxy does.
    no_local_endpoints: bool = False
    # External only, externalTrafficPolicy Local: pods and the node reach every endpoint.
    short_circuit: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be TCP, UDP or SCTP, got {self.protocol!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        _ip(self.ip)


@dataclass(frozen=True)
class RuleState:
    """What the kernel should hold."""

    frontends: frozenset[FrontendRule]
    # ClusterIPs, externalIPs, LB IPs (not node addresses): unmatched traffic is rejected.
    service_ips: frozenset[str]
    # backend id -> (ip, port), both families
    backends: Mapping[int, tuple[str, int]]
    # The kernel path: (frontend ip, port, protocol) -> the backends its slots hold (a
    # backend repeated by weight), picked by `numgen random`. Serves the frontends that are
    # not queued, and queued ones whose packet no reader decided (none bound, stalled,
    # overloaded). A frontend without slots has no ready backend: it is refused.
    fallback: Mapping[tuple[str, int, str], tuple[tuple[str, int], ...]] = field(
        default_factory=dict
    )
    # Short-circuited frontends on the kernel path, for pods and the node: frontend -> its
    # service's cluster-wide backends (what pykp's reader would pick among).
    short_circuit_fallback: Mapping[tuple[str, int, str], tuple[tuple[str, int], ...]] = field(
        default_factory=dict
    )


@dataclass(frozen=True)
class SyncStats:
    added: int
    removed: int
    seconds: float
    full: bool  # a complete reload (first sync after install) rather than a difference
    by_set: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # name -> (added, removed)


# --- nftables rendering ---------------------------------------------------------------

_FRONTEND_TYPE = "{} . inet_proto . inet_service"
# Connections to queued frontends that the kernel path served (no reader decided them).
UNDECIDED_COUNTER = "undecided"
# The most slots (backends, repeated by weight) the kernel path holds per frontend: one
# `pick<family>_<n>` chain per count, so `numgen random mod n` has a constant n.
MAX_SLOTS = 128
# Slots 0..MAX_SLOTS-1 are a frontend's own; MAX_SLOTS.. its short-circuit slots.
_SLOTS_TYPE = (
    "typeof {p} daddr . meta l4proto . th dport . numgen random mod {n} : {p} daddr . th dport"
)
# Sets and maps `sync` maintains, with their types.
_SYNCED: dict[str, str] = {
    # Every frontend (its backend field is cleared on a new connection) ...
    "frontends4": _FRONTEND_TYPE.format("ipv4_addr"),
    "frontends6": _FRONTEND_TYPE.format("ipv6_addr"),
    # ... and those whose first packet goes to pykp's reader.
    "queued4": _FRONTEND_TYPE.format("ipv4_addr"),
    "queued6": _FRONTEND_TYPE.format("ipv6_addr"),
    # The kernel path: frontend -> goto pick<family>_<slots>, which DNATs to a random slot.
    "fallback4": _FRONTEND_TYPE.format("ipv4_addr") + " : verdict",
    "fallback6": _FRONTEND_TYPE.format("ipv6_addr") + " : verdict",
    # The kernel path of short-circuited frontends for pods and the node: frontend -> goto
    # pick_sc<family>_<slots>, over its service's cluster-wide backends (slots from MAX_SLOTS).
    "fallback_sc4": _FRONTEND_TYPE.format("ipv4_addr") + " : verdict",
    "fallback_sc6": _FRONTEND_TYPE.format("ipv6_addr") + " : verdict",
    "slots4": _SLOTS_TYPE.format(p="ip", n=MAX_SLOTS),
    "slots6": _SLOTS_TYPE.format(p="ip6", n=MAX_SLOTS),
    "masq_frontends4": _FRONTEND_TYPE.format("ipv4_addr"),
    "masq_frontends6": _FRONTEND_TYPE.format("ipv6_addr"),
    # External frontends with externalTrafficPolicy Local: never SNATed, so that the
    # --cluster-cidr rule (meant for ClusterIPs) does not hide the client address.
    "local_frontends4": _FRONTEND_TYPE.format("ipv4_addr"),
    "local_frontends6": _FRONTEND_TYPE.format("ipv6_addr"),
    # External frontends of externalTrafficPolicy Local services: pods and the node reach
    # every endpoint of the port through them (kube-proxy's short-circuit).
    "short_circuit4": _FRONTEND_TYPE.format("ipv4_addr"),
    "short_circuit6": _FRONTEND_TYPE.format("ipv6_addr"),
    # Frontends whose Local traffic policy left this node no endpoint: dropped, not refused.
    "no_local_endpoints4": _FRONTEND_TYPE.format("ipv4_addr"),
    "no_local_endpoints6": _FRONTEND_TYPE.format("ipv6_addr"),
    "service_ips4": "ipv4_addr",
    "service_ips6": "ipv6_addr",
    # (ip . ip) for every backend ip: nft cannot compare saddr with daddr, so hairpin
    # traffic (a pod reaching itself through its service) is found by a set lookup.
    "hairpin4": "ipv4_addr . ipv4_addr",
    "hairpin6": "ipv6_addr . ipv6_addr",
    "backends4": "mark : ipv4_addr . inet_service",
    "backends6": "mark : ipv6_addr . inet_service",
}
_STATIC: dict[str, str] = {
    "cluster_cidrs4": "ipv4_addr; flags interval",
    "cluster_cidrs6": "ipv6_addr; flags interval",
}
# name -> base chain spec ("" for regular chains)
_CHAINS: dict[str, str] = {
    "mark_new": "type filter hook prerouting priority -151; policy accept;",
    "mark_new_out": "type filter hook output priority -151; policy accept;",
    "nat_pre": "type nat hook prerouting priority -100; policy accept;",
    "nat_out": "type nat hook output priority -100; policy accept;",
    "nat_backend": "",
    "nat_fallback": "",
    "nat_masq": "",
    **{f"pick{v}_{n}": "" for v in (4, 6) for n in range(1, MAX_SLOTS + 1)},
    **{f"pick_sc{v}_{n}": "" for v in (4, 6) for n in range(1, MAX_SLOTS + 1)},
    **{f"pick_at{v}_{i}": "" for v in (4, 6) for i in range(MAX_SLOTS)},
    "nat_post": "type nat hook postrouting priority 100; policy accept;",
    "reject_in": "type filter hook input priority 0; policy accept;",
    "reject_fwd": "type filter hook forward priority 0; policy accept;",
    "reject_out": "type filter hook output priority 0; policy accept;",
    "do_reject": "",
}


_PICKS = frozenset(n for n in _CHAINS if n.startswith("pick"))
# Round-robin on the kernel path (pykp run's default; --no-kernel-round-robin queues it):
# each engine service has a chain `rr<family>_<id>` of one rule, `numgen inc mod <n> vmap
# @rr_at<family>_<n>` for its n slots, whose counter is that service's rotation (numgen
# keeps its counter per rule).
# `rr_at<family>_<n>` maps 0..n-1 to the `pick_at` chains that DNAT to that slot: one map
# per n, so that the kernel's validation of a commit visits n chains per rotation, not
# MAX_SLOTS. (A rule DNATing from the `slots` map itself would make every element added to
# that map, and every rule bound to it, walk the other: quadratic in the services, and nft
# 1.0.6 cannot add it to a table the kernel holds, see `_update_script`.) The `rr` chains
# come and go with their services, tracked as the pseudo-sets `rr_chains<family>` (key:
# the chain, text: "<chain> <slots>").
RR_CHAIN_SETS = ("rr_chains4", "rr_chains6")
_RR_AT: dict[str, str] = {
    f"rr_at{v}_{n}": f"typeof numgen inc mod {n} : verdict"
    for v in (4, 6)
    for n in range(1, MAX_SLOTS + 1)
}


def rr_chain_name(version: int, engine_service: str) -> str:
    """The kernel-path round-robin chain of one engine service, per family: a name of
    fixed length (service names may hold any character nft would need quoted)."""
    digest = hashlib.blake2b(engine_service.encode(), digest_size=8).hexdigest()
    return f"rr{version}_{digest}"


def _rr_at_elements(name: str) -> list[str]:
    """The elements of the map `rr_at<family>_<n>`: 0..n-1 -> goto its `pick_at` chain."""
    version, slots = name.removeprefix("rr_at").split("_")
    return [f"{i} : goto pick_at{version}_{i}" for i in range(int(slots))]


def is_rr_chain(name: str) -> bool:
    return name.startswith(("rr4_", "rr6_"))


@functools.cache
def _encoders() -> dict[str, bulk_load.Encoder]:
    return bulk_load.encoders(_SYNCED)


@functools.cache
def _key_encoders() -> dict[str, bulk_load.Encoder]:
    return {name: bulk_load.key_encoder(type_) for name, type_ in _SYNCED.items()}


def _is_map(type_: str) -> bool:
    return ":" in type_


def _set_decl(name: str, type_: str) -> str:
    kind = "map" if _is_map(type_) else "set"
    spec = type_ if type_.startswith("typeof ") else f"type {type_}"
    return f"\t{kind} {name} {{ {spec}; }}"


def _ip(text: str) -> tuple[int, str]:
    """(4 or 6, canonical text); inet_pton is ~10x faster than ipaddress at 100k ips.

    Not cached: a cache of every address a full render meets was made among what the
    render keeps and emptied after the load, leaving its memory in holes among it. An
    IPv4 address costs one inet_pton.
    """
    if ":" not in text:
        try:
            # glibc's inet_pton takes exactly the canonical IPv4 spelling (four decimal
            # parts, no leading zeros): what it takes is the text itself.
            socket.inet_pton(socket.AF_INET, text)
        except OSError:
            pass
        else:
            return 4, text
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            canonical = socket.inet_ntop(family, socket.inet_pton(family, text))
        except OSError:
            continue
        # The text itself when it is canonical: one string, not two, per address held.
        return version, text if canonical == text else canonical
    raise ValueError(f"not an IP address: {text!r}")


def _frontend_key(f: FrontendRule) -> tuple[int, str]:
    version, ip = _ip(f.ip)
    return version, f"{ip} . {_PROTOCOLS[f.protocol]} . {f.port}"


def slot_elements(
    version: int,
    key: str,
    backends: Sequence[tuple[str, int]],
    short_circuit: bool = False,
    rr_chain: str | None = None,
) -> list[tuple[str, str, str]]:
    """The kernel path's elements of the frontend `key`, as (set or map, key, text): its
    verdict-map entry and its slots over `backends` (at most MAX_SLOTS). Its own slots
    count from 0; a short-circuit's (pods and the node, every endpoint) from MAX_SLOTS, in
    the same `slots` map, picked by the `pick_sc` chains. With `rr_chain` the verdict goes
    to that round-robin chain (and the chain is an element of `rr_chains`), not to the
    random `pick` chain."""
    chosen = tuple(backends)[:MAX_SLOTS]
    if not chosen:
        return []
    if short_circuit:
        fallback, pick, start = "fallback_sc", "pick_sc", MAX_SLOTS
    else:
        fallback, pick, start = "fallback", "pick", 0
    if rr_chain is not None and not short_circuit:
        out = [
            (f"fallback{version}", key, f"{key} : goto {rr_chain}"),
            (f"rr_chains{version}", rr_chain, f"{rr_chain} {len(chosen)}"),
        ]
    else:
        out = [(f"{fallback}{version}", key, f"{key} : goto {pick}{version}_{len(chosen)}")]
    for index, (backend_ip, backend_port) in enumerate(chosen, start=start):
        slot = f"{key} . {index}"
        out.append((f"slots{version}", slot, f"{slot} : {_ip(backend_ip)[1]} . {backend_port}"))
    return out


def _elements(state: RuleState, layout: MarkLayout) -> dict[str, dict[str, str]]:
    """Per set/map: element key -> full element text (``key : value`` for maps)."""
    out: dict[str, dict[str, str]] = {name: {} for name in _SYNCED}
    for f in state.frontends:
        version, key = _frontend_key(f)
        out[f"frontends{version}"][key] = key
        if f.queued:
            out[f"queued{version}"][key] = key
        if f.external:
            out[f"{'masq' if f.masquerade else 'local'}_frontends{version}"][key] = key
        if f.no_local_endpoints:
            out[f"no_local_endpoints{version}"][key] = key
        if f.short_circuit:
            out[f"short_circuit{version}"][key] = key
    short_circuited = {(f.ip, f.port, f.protocol) for f in state.frontends if f.short_circuit}
    for fallback, short_circuit in ((state.fallback, False), (state.short_circuit_fallback, True)):
        for frontend, slots in fallback.items():
            if short_circuit and frontend not in short_circuited:
                continue
            version, key = _frontend_key(FrontendRule(*frontend))
            for name, element_key, text in slot_elements(version, key, slots, short_circuit):
                out[name][element_key] = text
    for text in state.service_ips:
        version, ip = _ip(text)
        out[f"service_ips{version}"][ip] = ip
    shift, top = layout.shift, layout.max_backend_id
    backends = (out["backends4"], out["backends6"])
    hairpin = (out["hairpin4"], out["hairpin6"])
    for backend_id, (text, port) in state.backends.items():
        v6, mark, elem, pair = _backend_elements(backend_id, text, port, shift, top)
        backends[v6][mark] = elem
        hairpin[v6][pair] = pair
    return out


def _backend_elements(
    backend_id: int, text: str, port: int, shift: int, top: int
) -> tuple[bool, str, str, str]:
    """(is IPv6, map key, map element, hairpin element)."""
    version, ip = _ip(text)
    if not 1 <= backend_id <= top:
        raise ValueError(f"backend id {backend_id} outside 1..{top}")
    if not 1 <= port <= 65535:
        raise ValueError(f"backend {backend_id}: port out of range: {port}")
    mark = f"{backend_id << shift:#010x}"
    return version == 6, mark, f"{mark} : {ip} . {port}", f"{ip} . {ip}"


def _element_lines(verb: str, table: str, name: str, items: Iterable[str]) -> list[str]:
    items = list(items)
    return [
        f"{verb} element inet {table} {name} {{ {', '.join(items[i : i + _CHUNK])} }}"
        for i in range(0, len(items), _CHUNK)
    ]


def _rr_chain_lines(table: str, texts: Iterable[str]) -> list[str]:
    """Create (or rewrite) round-robin chains from their `rr_chains` element texts
    ("<chain> <slots>"). Rewriting restarts the chain's rotation: only when its slot
    count changed (a new `mod`), or at a full load."""
    lines: list[str] = []
    for text in texts:
        chain, slots = text.split(" ")
        lines += [
            f"add chain inet {table} {chain}",
            f"flush chain inet {table} {chain}",
            f"add rule inet {table} {chain} numgen inc mod {slots} vmap @rr_at{chain[2]}_{slots}",
        ]
    return lines


def _rr_chain_ops(batch: bulk_load.Batch, texts: Iterable[str]) -> None:
    """`_rr_chain_lines` as netlink messages."""
    for text in texts:
        chain, slots = text.split(" ")
        batch.add_chain(chain)
        batch.flush_chain(chain)
        batch.add_rotation_rule(chain, int(slots), f"rr_at{chain[2]}_{slots}")


def _split_rr(
    elements: Mapping[str, _T],
) -> tuple[dict[str, _T], list[_T]]:
    """(the sets' and maps' part, the round-robin chains' part) of per-name contents."""
    sets = {name: items for name, items in elements.items() if name not in RR_CHAIN_SETS}
    return sets, [elements[name] for name in RR_CHAIN_SETS if name in elements]


def _chain_rules(
    layout: MarkLayout,
    cidrs: Mapping[int, Sequence[str]],
    conntrack_events: bool = False,
    drop_invalid: bool = True,
) -> dict[str, list[str]]:
    mask = f"{layout.backend_mask:#010x}"
    reject = f"{layout.reject_mark:#010x}"
    queue = f"{layout.queue_bit:#010x}"
    masq = f"{layout.masq_bit:#010x}"
    keep = f"{~layout.backend_mask & _MARK_BITS:#010x}"
    fams = (("ip", 4), ("ip6", 6))
    # Clearing the backend field lets a stale foreign value there never reach the
    # iptables rule, which queues only packets whose backend field is still empty, nor
    # hide a new connection from the kernel path.
    # Every packet of every flow passes these hooks: all but a connection's first leave
    # at the first rule (kube-proxy's nftables chains check `ct state new` first too).
    # With pykp following conntrack events: a service flow's first FIN or RST (either
    # direction) sets the closing bit of its ct mark, the one event that says a connection
    # ended (the kernel would otherwise announce every TCP state change, or only the
    # entry's end, minutes after TIME_WAIT). A cheap test on every packet.
    closing = (
        [
            f"tcp flags & (fin | rst) != 0 ct status dnat ct mark set ct mark | {CT_CLOSING_MARK:#010x}"
        ]
        if conntrack_events
        else []
    )
    mark_new = (
        [*closing, "ct state != new accept"]
        + [
            f"ct state new {p} daddr . meta l4proto . th dport @frontends{v} "
            f"meta mark set meta mark & {keep}"
            for p, v in fams
        ]
        + [
            f"ct state new {p} daddr . meta l4proto . th dport @queued{v} "
            f"meta mark set meta mark | {queue}"
            for p, v in fams
        ]
    )
    # From a pod (prerouting) or the node (output) to a short-circuited frontend: queued
    # with the cluster-source bit, whatever the policy.
    short_circuit = f"{layout.queue_bit | layout.cluster_source_bit:#010x}"
    mark_new_in = mark_new + [
        f"ct state new {p} saddr @cluster_cidrs{v} {p} daddr . meta l4proto . th dport "
        f"@short_circuit{v} meta mark set meta mark | {short_circuit}"
        for p, v in fams
        if cidrs[v]
    ]
    mark_new_out = mark_new + [
        f"ct state new {p} daddr . meta l4proto . th dport @short_circuit{v} "
        f"meta mark set meta mark | {short_circuit}"
        for p, v in fams
    ]
    has_backend = f"meta mark & {mask} != 0x00000000 meta mark & {mask} != {reject}"
    # A new connection to a frontend that no reader decided (not queued, or queued while
    # no reader is bound, stalled or overloaded: --queue-bypass and fail-open let it on).
    undecided = [
        f"meta mark & {mask} == 0x00000000 {p} daddr . meta l4proto . th dport @frontends{v} "
        "jump nat_fallback"
        for p, v in fams
    ]
    nat_masq = [
        # kube-proxy's --cluster-cidr rule: SNAT what does not come from a pod.
        f"{p} saddr != @cluster_cidrs{v} {p} daddr . meta l4proto . th dport != "
        f"@local_frontends{v} meta mark set meta mark | {masq}"
        for p, v in fams
        if cidrs[v]
    ]
    nat_masq += [
        f"{p} daddr . meta l4proto . th dport @masq_frontends{v} meta mark set meta mark | {masq}"
        for p, v in fams
    ]
    # A service flow announces itself, its closing mark and its end: no per-state events.
    # ("mark" quoted: nft 1.0.6 parses it bare as the keyword.)
    events = ['ct event set new,destroy,"mark"'] if conntrack_events else []
    nat_backend = [*events, "jump nat_masq"]
    nat_backend += [
        f"meta l4proto {{ tcp, udp, sctp }} dnat {p} to meta mark & {mask} map @backends{v}"
        for p, v in fams
    ]
    cluster_source = f"{layout.cluster_source_bit:#010x}"
    nat_fallback = [
        *events,
        # A queued frontend's connection that no reader decided: its policy degraded to
        # random. Counted in a named counter, which outlives the chain rewrites of restarts.
        f"meta mark & {queue} == {queue} counter name {UNDECIDED_COUNTER}",
        "jump nat_masq",
    ]
    # A pod or the node to a short-circuited frontend (mark_new set the cluster-source
    # bit): every endpoint of the service, as the reader would give it, not this node's.
    nat_fallback += [
        f"meta mark & {cluster_source} == {cluster_source} "
        f"{p} daddr . meta l4proto . th dport vmap @fallback_sc{v}"
        for p, v in fams
    ]
    nat_fallback += [f"{p} daddr . meta l4proto . th dport vmap @fallback{v}" for p, v in fams]
    # No slots (no ready backend): the reject mark, so that do_reject refuses it even on a
    # node address (a NodePort), which service_ips never holds.
    nat_fallback.append(f"meta mark set meta mark & {keep} | {reject}")
    picks = {
        f"pick{v}_{n}": [
            f"dnat {p} to {p} daddr . meta l4proto . th dport . numgen random mod {n} map @slots{v}"
        ]
        for p, v in fams
        for n in range(1, MAX_SLOTS + 1)
    }
    picks.update(
        {
            f"pick_sc{v}_{n}": [
                f"dnat {p} to {p} daddr . meta l4proto . th dport . numgen random mod {n} "
                f"offset {MAX_SLOTS} map @slots{v}"
            ]
            for p, v in fams
            for n in range(1, MAX_SLOTS + 1)
        }
    )
    picks.update(
        {
            f"pick_at{v}_{i}": [
                f"dnat {p} to {p} daddr . meta l4proto . th dport . numgen random mod 1 "
                f"offset {i} map @slots{v}"
            ]
            for p, v in fams
            for i in range(MAX_SLOTS)
        }
    )
    # Reached only when the map lacks the id (sync lagging behind the engine): refuse,
    # rather than let conntrack record the connection un-NATed.
    nat_backend.append(f"meta mark set meta mark & {keep} | {reject}")
    frontend = "{p} daddr . meta l4proto . th dport"
    reject_rules = ["ct state != new accept"]
    # kube-proxy's "has no local endpoints" DROP (a Local policy, endpoints elsewhere only),
    # before the refusal: for clusterIPs (internalTrafficPolicy) from anywhere; for external
    # frontends (externalTrafficPolicy, in local_frontends) from outside the cluster only.
    # Pods and the node itself are short-circuited to every endpoint of the port (queued
    # with the cluster-source bit, see mark_new), as kube-proxy does; refused only when the
    # kernel path decides for them (no reader), where the short-circuit does not apply.
    reject_rules += [
        f"meta mark & {mask} == {reject} {frontend.format(p=p)} @no_local_endpoints{v} "
        f"{frontend.format(p=p)} != @local_frontends{v} drop"
        for p, v in fams
    ]
    reject_rules += [
        f"meta mark & {mask} == {reject} {frontend.format(p=p)} @no_local_endpoints{v} "
        f"{p} saddr != @cluster_cidrs{v} fib saddr type != local drop"
        for p, v in fams
    ]
    reject_rules += [
        f"meta mark & {mask} == {reject} jump do_reject",
    ] + [f"{p} daddr @service_ips{v} jump do_reject" for p, v in fams]
    # kube-proxy's drop of INVALID packets in forward (unless nf_conntrack_tcp_be_liberal):
    # an out-of-window segment from a backend skips the reverse NAT, reaches the client
    # with the backend's own address, and the client's reset kills the real connection.
    forward_rules = ["ct state invalid drop", *reject_rules] if drop_invalid else reject_rules
    return {
        "mark_new": mark_new_in,
        "mark_new_out": mark_new_out,
        "nat_pre": [f"{has_backend} jump nat_backend", *undecided],
        "nat_out": [f"{has_backend} jump nat_backend", *undecided],
        "nat_backend": nat_backend,
        "nat_fallback": nat_fallback,
        "nat_masq": nat_masq,
        **picks,
        "nat_post": [
            # Cleared first, as kube-proxy does, so an encapsulated copy is not SNATed twice.
            f"meta mark & {masq} == {masq} meta mark set meta mark ^ {masq} masquerade fully-random",
            *(f"ct status dnat {p} saddr . {p} daddr @hairpin{v} masquerade" for p, v in fams),
        ],
        "reject_in": reject_rules,
        "reject_fwd": forward_rules,
        "reject_out": reject_rules,
        "do_reject": [
            "meta l4proto tcp reject with tcp reset",
            "reject with icmpx port-unreachable",
        ],
    }


def _split_cidrs(cidrs: Sequence[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {4: [], 6: []}
    for text in cidrs:
        net = ipaddress.ip_network(text, strict=False)
        out[net.version].append(str(net))
    return out


# --- iptables -------------------------------------------------------------------------


def _iptables_families(ipv6: bool) -> list[tuple[str, str]]:
    fams = [("iptables-save", "iptables-restore")]
    if ipv6:
        fams.append(("ip6tables-save", "ip6tables-restore"))
    return fams


@dataclass(frozen=True)
class _Mangle:
    """What mangle holds of ours: whether the chain exists, our jumps, foreign references."""

    chain_exists: bool
    jumps: dict[str, list[str]]  # hook -> our rules in iptables-save form ("-A HOOK ...")
    foreign_refs: list[str]
    queue_rule: bool = False  # our chain holds its NFQUEUE rule


def _read_mangle(save: str, chain: str, netns: str | None) -> _Mangle:
    text = run_tool([save, "-t", "mangle"], netns=netns).stdout
    exists = False
    queue_rule = False
    jumps: dict[str, list[str]] = {}
    foreign: list[str] = []
    for line in text.splitlines():
        if line.startswith(f":{chain} "):
            exists = True
        if line.startswith(f"-A {chain} ") and "-j NFQUEUE" in line:
            queue_rule = True
        if not line.startswith("-A "):
            continue
        tokens = shlex.split(line)
        if tokens[-2:] not in (["-j", chain], ["-g", chain]) or tokens[1] == chain:
            continue
        ours = any(a == "--comment" and b == JUMP_COMMENT for a, b in itertools.pairwise(tokens))
        if ours:
            jumps.setdefault(tokens[1], []).append(line)
        else:
            foreign.append(line)
    return _Mangle(exists, jumps, foreign, queue_rule)


def _delete_line(saved: str) -> str:
    return "-D" + saved[2:]  # "-A HOOK spec" -> "-D HOOK spec"


# --- the manager ----------------------------------------------------------------------


class RuleManager:
    """Owns ``table inet <table>`` and the mangle chain ``<chain>`` (IPv4 and IPv6)."""

    def __init__(
        self,
        layout: MarkLayout = MarkLayout(),
        *,
        queues: tuple[int, int] = (0, 0),
        cluster_cidrs: Sequence[str] = (),
        drop_invalid: bool = True,
        table: str = "pykp",
        chain: str = "PYKP-QUEUE",
        ipv6: bool = True,
        netns: str | None = None,
        nft: NftExecutor | None = None,
        conntrack_events: bool = False,
    ) -> None:
        layout.validate()
        first, last = queues
        if not 0 <= first <= last <= 65535:
            raise ValueError(f"queues must satisfy 0 <= first <= last <= 65535, got {queues}")
        self.layout = layout
        self.queues = (first, last)
        self.cluster_cidrs = _split_cidrs(cluster_cidrs)
        self.drop_invalid = drop_invalid
        self.table = table
        self.chain = chain
        self.ipv6 = ipv6
        self.netns = netns
        self.conntrack_events = conntrack_events
        # Scripts go through the library in-process when it loads (no exec per change).
        self.nft = nft if nft is not None else make_executor(netns)
        self._given_nft = nft
        # What the kernel holds since the last successful sync; None forces a full load.
        self._current: dict[str, dict[str, str]] | None = None
        # Full loads over netlink (bulk_load) for our own namespace's library; a given
        # executor (tests' recorders) or another namespace gets nft scripts.
        self._bulk_load = nft is None and netns is None and isinstance(self.nft, LibNftables)
        # True while the synced sets and maps hold nothing: `install` made the table, and
        # no element went in since (a first load may then go in parts: `add_elements`).
        self.holds_no_elements = False

    # rendering (public so tests and `pykp` can show it)

    def _rules(self) -> dict[str, list[str]]:
        return _chain_rules(
            self.layout, self.cluster_cidrs, self.conntrack_events, self.drop_invalid
        )

    def render_table(self) -> str:
        """The complete table, rules included, as installed on an empty kernel."""
        rules = self._rules()
        lines = [f"table inet {self.table} {{", f"\tcounter {UNDECIDED_COUNTER} {{ }}"]
        lines += [_set_decl(n, t) for n, t in {**_SYNCED, **_STATIC, **_RR_AT}.items()]
        for name, spec in _CHAINS.items():
            lines.append(f"\tchain {name} {{")
            if spec:
                lines.append(f"\t\t{spec}")
            lines += [f"\t\t{rule}" for rule in rules[name]]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _cidr_lines(self) -> list[str]:
        out: list[str] = []
        for v in (4, 6):
            out += _element_lines("add", self.table, f"cluster_cidrs{v}", self.cluster_cidrs[v])
        return out

    def _rr_at_lines(self) -> list[str]:
        """The static elements of the `rr_at` maps: slot index -> its `pick_at` chain."""
        return [
            f"add element inet {self.table} {name} {{ {', '.join(_rr_at_elements(name))} }}"
            for name in _RR_AT
        ]

    def _replace_script(self) -> str:
        t = self.table
        head = [f"table inet {t}", f"delete table inet {t}"]
        body = self.render_table().rstrip("\n")
        return "\n".join([*head, body, *self._cidr_lines(), *self._rr_at_lines()]) + "\n"

    def _update_script(
        self,
        stale_chains: Iterable[str],
        stale_sets: Iterable[tuple[str, str]],
        existing_sets: Iterable[str] = (),
    ) -> str:
        """Rewrite chains and static sets in place, keeping the synced elements.

        Only missing sets are declared, and the `pick*` chains (whose rules never change)
        are left as they are: nft 1.0.6 can neither redeclare the `slots` maps nor add a
        rule that uses them once they come from the kernel ("conflicting protocols
        specified: ip vs. th", its parse of a `typeof` key that mixes `ip` and `th`).
        `install` replaces the whole table when a `pick*` chain is missing.
        """
        t = self.table
        rules = {n: r for n, r in self._rules().items() if n not in _PICKS}
        existing = set(existing_sets)
        decl = [f"table inet {t} {{", f"\tcounter {UNDECIDED_COUNTER} {{ }}"]
        decl += [_set_decl(n, ty) for n, ty in {**_SYNCED, **_STATIC}.items() if n not in existing]
        decl += [f"\tchain {n} {{ {spec} }}" for n, spec in _CHAINS.items() if n not in _PICKS]
        decl.append("}")
        stale_chains = list(stale_chains)
        ops = [f"flush chain inet {t} {n}" for n in [*rules, *stale_chains]]
        ops += [f"delete chain inet {t} {n}" for n in stale_chains]
        ops += [f"delete {kind} inet {t} {n}" for kind, n in stale_sets]
        ops += [f"flush set inet {t} {n}" for n in _STATIC]
        for name, chain_rules in rules.items():
            ops += [f"add rule inet {t} {name} {rule}" for rule in chain_rules]
        return "\n".join([*decl, *ops, *self._cidr_lines()]) + "\n"

    def render_iptables(self, existing_jumps: Mapping[str, Sequence[str]] | None = None) -> str:
        """The ``iptables-restore --noflush`` input for one family.

        `existing_jumps` (hook -> our jump rules as iptables-save prints them) keeps a
        single existing jump in place and replaces duplicates.
        """
        first, last = self.queues
        target = f"--queue-balance {first}:{last}" if last > first else f"--queue-num {first}"
        q = self.layout.queue_bit
        lines = [
            "*mangle",
            # Declaring an existing chain under --noflush flushes it: the rule is replaced.
            f":{self.chain} - [0:0]",
            # Only while the backend field is empty: a packet already decided (e.g. a
            # local connection looping back through PREROUTING) is never queued again.
            # --queue-bypass: with no reader bound (pykp stopped, crashed, restarting) the
            # packet goes on undecided and the kernel path (nat_fallback) picks a backend,
            # as kube-proxy's static rules would: new connections never wait for pykp.
            (
                f"-A {self.chain} -m mark --mark {q:#x}/{q | self.layout.backend_mask:#x} "
                f"-j NFQUEUE {target} --queue-bypass"
            ),
        ]
        for hook in _HOOKS:
            existing = (existing_jumps or {}).get(hook, [])
            if len(existing) == 1:
                continue
            lines += [_delete_line(rule) for rule in existing]
            lines.append(f"-I {hook} 1 -m comment --comment {JUMP_COMMENT} -j {self.chain}")
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    # kernel operations

    def _nft(self, script: str) -> None:
        self.nft.run(script)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[NftExecutor]:
        """An executor for listings (the agent's checks, from another thread): a context of
        its own, so a listing never holds up a sync's transaction, and freed after use (a
        context keeps a cache of every element it listed)."""
        if self._given_nft is not None:
            yield self._given_nft
            return
        reader = make_executor(self.netns)
        try:
            yield reader
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()

    def _kernel_reader(self) -> NftReader | None:
        """Straight to the kernel (no nft cache of every element) for the agent's own
        rules in its own namespace; None for another namespace or a given executor."""
        if self._given_nft is not None or self.netns is not None:
            return None
        try:
            return NftReader()
        except OSError:
            return None

    def _summary(self) -> TableSummary | None:
        """The table's chains (with rule counts), sets and maps; None when it is missing.
        Raises LookupError when no kernel reader can be used here."""
        reader = self._kernel_reader()
        if reader is None:
            raise LookupError("no kernel reader")
        with reader:
            try:
                summary = reader.table_summary(self.table)
            except NetlinkError:
                return None
        return summary if summary.chains or summary.sets or summary.maps else None

    def _table_objects(self) -> dict[str, set[str]] | None:
        """Names of our table's chains, sets and maps, or None when it holds none.

        Three terse listings: listing the table itself would dump every element.
        """
        try:
            summary = self._summary()
        except LookupError:
            pass
        else:
            if summary is None:
                return None
            return {"chain": set(summary.chains), "set": summary.sets, "map": summary.maps}
        found: dict[str, set[str]] = {"chain": set(), "set": set(), "map": set()}
        for kind, names in found.items():
            argv = ["nft", "-t", "-j", "list", f"{kind}s", "inet"]
            for item in json.loads(run_tool(argv, netns=self.netns).stdout)["nftables"]:
                obj = item.get(kind)
                if obj and obj.get("table") == self.table:
                    names.add(obj["name"])
        return found if any(found.values()) else None

    def install(self) -> None:
        """Create or update pykp's table and mangle chains, idempotently.

        An existing table has its chains rewritten in one transaction while its set and
        map elements are kept, so a restarting pykp does not open a window in which
        service traffic escapes un-NATed; the next `sync` replaces them atomically.
        A table of another shape (another pykp version) is replaced whole.
        """
        objects = self._table_objects()
        self.holds_no_elements = False
        if (
            objects is None
            or not _PICKS <= objects["chain"]
            or not _RR_AT.keys() <= objects["map"]
            or not self._picks_whole()
        ):
            self._nft(self._replace_script())
            self.holds_no_elements = True
        else:
            known = _SYNCED.keys() | _STATIC.keys() | _RR_AT.keys()
            # The round-robin chains stay with the verdicts that name them (a restarting
            # agent keeps serving); its first full load rewrites them.
            script = self._update_script(
                sorted(n for n in objects["chain"] - _CHAINS.keys() if not is_rr_chain(n)),
                [("set", n) for n in sorted(objects["set"] - known)]
                + [("map", n) for n in sorted(objects["map"] - known)],
                (objects["set"] | objects["map"]) & known,
            )
            try:
                self._nft(script)
            except RulesError:
                self._nft(self._replace_script())
                self.holds_no_elements = True
        for save, restore in _iptables_families(self.ipv6):
            current = _read_mangle(save, self.chain, self.netns)
            run_tool(
                [restore, "-w", "5", "--noflush"],
                netns=self.netns,
                stdin=self.render_iptables(current.jumps),
            )
        self._current = None

    def sync(self, state: RuleState) -> SyncStats:
        """Bring the sets and maps to `state` in one ``nft -f -`` transaction.

        The first call after `install` (or after a failed sync) flushes and reloads every
        set; later calls send only added and deleted elements (a changed map value is a
        delete plus an add). Raises RulesError (the next call then reloads everything).
        """
        started = time.perf_counter()
        self.holds_no_elements = False
        wanted = _elements(state, self.layout)
        t = self.table
        lines: list[str] = []
        by_set: dict[str, tuple[int, int]] = {}
        current = self._current
        if current is None:
            for name, elems in wanted.items():
                kind = "map" if _is_map(_SYNCED[name]) else "set"
                lines.append(f"flush {kind} inet {t} {name}")
                lines += _element_lines("add", t, name, elems.values())
                if elems:
                    by_set[name] = (len(elems), 0)
        else:
            deletes: list[str] = []
            for name, elems in wanted.items():
                old = current[name]
                # Item views compare as sets in C: a changed map value is in both.
                gone = [k for k, _ in old.items() - elems.items()]
                new = [v for _, v in elems.items() - old.items()]
                deletes += _element_lines("delete", t, name, gone)
                lines += _element_lines("add", t, name, new)
                if gone or new:
                    by_set[name] = (len(new), len(gone))
            lines = deletes + lines  # deletes first: a changed map key is re-added after
        if lines:
            self._current = None
            self._nft("\n".join(lines) + "\n")
        self._current = wanted
        return SyncStats(
            added=sum(a for a, _ in by_set.values()),
            removed=sum(r for _, r in by_set.values()),
            seconds=time.perf_counter() - started,
            full=current is None,
            by_set=by_set,
        )

    # the incremental path: element changes, owner by owner (pykp.netfilter.elements)

    def load_elements(self, wanted: Mapping[str, Mapping[str, str]]) -> int:
        """Replace the content of every synced set and map by `wanted`, in one
        transaction; returns the elements sent. The round-robin chains `wanted` names
        (`rr_chains*`) are written in it first, and the others deleted in it last."""
        t = self.table
        self._current = None
        self.holds_no_elements = False
        sets, chain_parts = _split_rr(wanted)
        chains = {text.split(" ")[0]: text for part in chain_parts for text in part.values()}
        stale = [c for c in self._rr_chains_held() if c not in chains]
        sent = sum(len(items) for items in sets.values()) + len(chains)
        if self._bulk_load:
            # Straight to nf_tables, one batch: nft would parse every element (~4 us each).
            try:
                batch = bulk_load.Batch(t)
                _rr_chain_ops(batch, chains.values())
                encode = _encoders()
                for name in _SYNCED:
                    batch.flush_set(name)
                    batch.add_elements(name, encode[name]((sets.get(name) or {}).values()))
                # Static, but a repair's full load restores them too (someone may have
                # flushed one: the rotations over that many slots would miss).
                encode_rr_at = bulk_load.encoder(_RR_AT["rr_at4_1"])
                for name in _RR_AT:
                    batch.flush_set(name)
                    batch.add_elements(name, encode_rr_at(_rr_at_elements(name)))
                for chain in stale:
                    batch.delete_chain(chain)
                with as_writer():
                    batch.send()
                return sent
            except OSError as error:
                # Refused by the kernel (nothing of the batch applied) or no such socket
                # (a buffer we may not size): nft gets the same load, and says why if it
                # fails too.
                _log.warning("full load over netlink failed (%s); loading through nft", error)
        lines = _rr_chain_lines(t, chains.values())
        for name in _SYNCED:
            kind = "map" if _is_map(_SYNCED[name]) else "set"
            lines.append(f"flush {kind} inet {t} {name}")
            lines += _element_lines("add", t, name, (sets.get(name) or {}).values())
        lines += [f"flush map inet {t} {name}" for name in _RR_AT]
        lines += self._rr_at_lines()
        lines += [f"delete chain inet {t} {chain}" for chain in stale]
        script = "\n".join(lines) + "\n"
        run_apart = getattr(self.nft, "run_apart", None)
        if run_apart is not None:  # in a child: its memory does not stay in this process
            run_apart(script)
        else:
            self._nft(script)
        return sent

    def _rr_chains_held(self) -> dict[str, int]:
        """The round-robin chains the kernel's table holds, with their rule counts."""
        summary = self._any_summary()
        chains = summary.chains if summary is not None else {}
        return {name: rules for name, rules in chains.items() if is_rr_chain(name)}

    def add_elements(
        self,
        added: Mapping[str, Sequence[str]],
        replaced: Mapping[str, Sequence[tuple[str, str]]] = {},  # noqa: B006 - read only
    ) -> None:
        """New elements, and new values of map keys, in one transaction (a replaced key
        is deleted and added in it: atomic for packets). New round-robin chains, and
        those whose slot count changed, are written in it first: its verdicts name them."""
        self._change(added, replaced, {})

    def remove_elements(self, removed: Mapping[str, Sequence[str]]) -> None:
        """Delete elements by key, in one transaction; then the round-robin chains
        removed, whose verdicts it deleted."""
        self._change({}, {}, removed)

    def _change(
        self,
        added: Mapping[str, Sequence[str]],
        replaced: Mapping[str, Sequence[tuple[str, str]]],
        removed: Mapping[str, Sequence[str]],
    ) -> None:
        if not (added or replaced or removed):
            return
        self._current = None
        self.holds_no_elements = False
        added, new_chains = _split_rr(added)
        replaced, changed_chains = _split_rr(replaced)
        removed, gone_chains = _split_rr(removed)
        chains = [text for part in new_chains for text in part]
        chains += [text for part in changed_chains for _, text in part]
        gone = [chain for part in gone_chains for chain in part]
        if self._bulk_load:
            # Straight to nf_tables: libnftables would first load a cache of the table's
            # chains (~1 ms per 1,000 round-robin chains) for every change.
            try:
                batch = bulk_load.Batch(self.table)
                _rr_chain_ops(batch, chains)
                encode, keys = _encoders(), _key_encoders()
                for name, pairs in replaced.items():
                    batch.delete_elements(name, keys[name](key for key, _ in pairs))
                    batch.add_elements(name, encode[name](element for _, element in pairs))
                for name, elements in added.items():
                    batch.add_elements(name, encode[name](elements))
                for name, dropped in removed.items():
                    batch.delete_elements(name, keys[name](dropped))
                for chain in gone:
                    batch.delete_chain(chain)
                with as_writer():
                    batch.send()
                return
            except OSError as error:
                _log.warning("change over netlink failed (%s); sending it through nft", error)
        t = self.table
        lines = _rr_chain_lines(t, chains)
        for name, pairs in replaced.items():
            lines += _element_lines("delete", t, name, [key for key, _ in pairs])
        for name, pairs in replaced.items():
            lines += _element_lines("add", t, name, [element for _, element in pairs])
        for name, elements in added.items():
            lines += _element_lines("add", t, name, elements)
        for name, keys_ in removed.items():
            lines += _element_lines("delete", t, name, keys_)
        lines += [f"delete chain inet {t} {chain}" for chain in gone]
        if lines:
            self._nft("\n".join(lines) + "\n")

    def cleanup(self) -> None:
        """Remove the table, the mangle chains and our jump rules; safe when absent."""
        cleanup_all(self.table, self.chain, netns=self.netns, ipv6=self.ipv6)
        self._current = None
        self.holds_no_elements = False

    def element_counts(self) -> dict[str, int]:
        """How many elements each synced set and map holds in the kernel (-1: missing)."""
        counts: dict[str, int] = {name: 0 for name in RR_CHAIN_SETS}
        for chain, rules in self._rr_chains_held().items():
            if rules == 1:
                counts[f"rr_chains{chain[2]}"] += 1
        kernel = self._kernel_reader()
        if kernel is not None:
            with kernel:
                for name in _SYNCED:
                    try:
                        counts[name] = kernel.element_count(self.table, name)
                    except NetlinkError:
                        counts[name] = -1
            return counts
        for name, type_ in _SYNCED.items():
            kind = "map" if _is_map(type_) else "set"
            try:
                with self._reader() as reader:
                    listing = reader.list_text(f"list {kind} inet {self.table} {name}")
            except RulesError:
                counts[name] = -1
                continue
            counts[name] = _count_elements(listing)
        return counts

    def _picks_whole(self) -> bool:
        """Every `pick*` chain holds its rule (a flush of the table empties them all, a flush
        of one chain one of them: `installed()` sees either); `install` cannot rewrite
        them in place (see `_update_script`), so it replaces the table then."""
        summary = self._any_summary()
        return summary is not None and all(summary.chains.get(c) == 1 for c in _PICKS)

    def undecided_connections(self) -> int:
        """Connections to queued frontends that the kernel path served since the table was
        made (the reader was away, stalled or overloaded): their policy degraded to random.
        Straight from the kernel: microseconds at any table size (nft would first load
        every element of the table)."""
        kernel = self._kernel_reader()
        if kernel is not None:
            with kernel:
                try:
                    return kernel.counter_packets(self.table, UNDECIDED_COUNTER)
                except NetlinkError:
                    return 0
        try:
            with self._reader() as reader:  # in-process: a scrape forks nothing
                listing = reader.list_json(f"list counter inet {self.table} {UNDECIDED_COUNTER}")
        except RulesError:
            return 0
        for item in json.loads(listing).get("nftables", []):
            if "counter" in item:
                return int(item["counter"].get("packets", 0))
        return 0

    def installed(self) -> bool:
        """True when the table holds every chain, set and map pykp's rules need, every
        chain holds its rules, and both jump rules of each family and the queue rule exist:
        what a flush of the ruleset, of the table or of a chain, or another tool deleting
        any of them, breaks. One listing of the table (it costs what the kernel's element
        dump costs: run it off the sync path), or, in the agent's own namespace, three
        requests to the kernel that read no element."""
        summary = self._any_summary()
        if summary is None:
            return False
        chains, sets, maps = summary.chains, summary.sets, summary.maps
        if not (
            {n for n, t in _SYNCED.items() if not _is_map(t)} | _STATIC.keys() <= sets
            and {n for n, t in _SYNCED.items() if _is_map(t)} | _RR_AT.keys() <= maps
        ):
            return False
        rules = self._rules()
        if any(chains.get(chain, -1) != len(chain_rules) for chain, chain_rules in rules.items()):
            return False
        if not self._rr_at_whole():
            return False
        for save, _ in _iptables_families(self.ipv6):
            current = _read_mangle(save, self.chain, self.netns)
            if not current.queue_rule or any(not current.jumps.get(h) for h in _HOOKS):
                return False
        return True

    def _rr_at_whole(self) -> bool:
        """Every `rr_at` map holds its n elements (where the kernel can be asked directly:
        256 small dumps; elsewhere the maps' presence is what is checked)."""
        kernel = self._kernel_reader()
        if kernel is None:
            return True
        with kernel:
            try:
                return all(
                    kernel.element_count(self.table, name) == int(name.rsplit("_", 1)[1])
                    for name in _RR_AT
                )
            except NetlinkError:
                return False

    def _any_summary(self) -> TableSummary | None:
        """`_summary` from the kernel where it can be asked, else through nft."""
        try:
            return self._summary()
        except LookupError:
            return self._listed_summary()

    def _listed_summary(self) -> TableSummary | None:
        """`_summary` through nft's terse listing (another namespace, a given executor)."""
        try:
            with self._reader() as reader:
                listing = json.loads(reader.list_json(f"list table inet {self.table}", terse=True))
        except RulesError:
            return None
        chains: dict[str, int] = {}
        sets: set[str] = set()
        maps: set[str] = set()
        for item in listing["nftables"]:
            if "chain" in item:
                chains.setdefault(item["chain"]["name"], 0)
            elif "rule" in item:
                chain = item["rule"]["chain"]
                chains[chain] = chains.get(chain, 0) + 1
            elif "set" in item:
                sets.add(item["set"]["name"])
            elif "map" in item:
                maps.add(item["map"]["name"])
        return TableSummary(chains=chains, sets=sets, maps=maps)


def _count_elements(listing: str) -> int:
    """The elements of one set or map in nft's text listing: `elements = { a, b : c, ... }`
    (no element holds a comma)."""
    start = listing.find("elements = {")
    if start < 0:
        return 0
    end = listing.find("}", start)
    return listing.count(",", start, end) + 1


def cleanup_all(
    table: str = "pykp",
    chain: str = "PYKP-QUEUE",
    *,
    netns: str | None = None,
    ipv6: bool = True,
) -> list[str]:
    """Remove whatever pykp left, without prior state; returns what was removed.

    Foreign rules are kept. Should a foreign rule jump to our chain, the chain is only
    flushed (deleting it would fail the transaction and keep everything).
    """
    removed: list[str] = []
    res = run_tool(["nft", "delete", "table", "inet", table], netns=netns, check=False)
    if res.returncode == 0:
        removed.append(f"nft table inet {table}")
    elif "No such file or directory" not in res.stderr:
        raise RulesError(["nft", "delete", "table", "inet", table], res.returncode, res.stderr)
    for save, restore in _iptables_families(ipv6):
        family = save.removesuffix("-save")
        current = _read_mangle(save, chain, netns)
        lines = ["*mangle"]
        for hook, rules in current.jumps.items():
            lines += [_delete_line(rule) for rule in rules]
            removed += [f"{family} mangle {hook} jump to {chain}"] * len(rules)
        if current.chain_exists:
            lines.append(f":{chain} - [0:0]")
            if current.foreign_refs:
                removed.append(f"{family} mangle chain {chain} (flushed; foreign rules use it)")
            else:
                lines.append(f"-X {chain}")
                removed.append(f"{family} mangle chain {chain}")
        if len(lines) > 1:
            run_tool(
                [restore, "-w", "5", "--noflush"],
                netns=netns,
                stdin="\n".join([*lines, "COMMIT"]) + "\n",
            )
    return removed
