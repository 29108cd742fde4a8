"""pykp.netfilter.rules and pykp.netfilter.conntrack: rendering, and the real kernel inside namespaces.

Kernel tests need root; CI runs as root, so they never skip there. Every kernel test
works in network namespaces it creates and deletes (even on failure): nothing here
touches the machine's root namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from pykp.labs.lab import NETNS_DIR, Lab, in_namespace
from pykp.netfilter import bulk_load
from pykp.netfilter import conntrack as kernel_conntrack
from pykp.netfilter.executor import NftRecorder
from pykp.netfilter.nfnetlink import NetlinkError
from pykp.netfilter.rules import (
    _SYNCED,
    MAX_SLOTS,
    FrontendRule,
    MarkLayout,
    RuleManager,
    RulesError,
    RuleState,
    cleanup_all,
    run_tool,
)

privileged = pytest.mark.privileged
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="network namespaces need root"
)
NS_PREFIX = "pykp-rules-"


# ------------------------------------------------------------------ helpers and fixtures


def _remove_stale_namespaces() -> None:
    """Namespaces of earlier runs whose pytest process is gone (names carry its PID)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            m = re.fullmatch(rf"{NS_PREFIX}(\d+)-[0-9a-f]+", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (loopback up), deleted afterwards."""
    _remove_stale_namespaces()
    name = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def sh(ns: str, *argv: str, stdin: str | None = None) -> str:
    return run_tool(argv, netns=ns, stdin=stdin).stdout


def _elem_text(elem: Any) -> str:
    if isinstance(elem, dict) and "concat" in elem:
        return " . ".join(_elem_text(e) for e in elem["concat"])
    if isinstance(elem, dict) and "prefix" in elem:
        return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
    if isinstance(elem, dict) and "elem" in elem:
        return _elem_text(elem["elem"]["val"])
    if isinstance(elem, dict) and "goto" in elem:  # a verdict map's value
        return f"goto {elem['goto']['target']}"
    if isinstance(elem, list):  # map element: [key, value]
        key, value = elem
        key_text = f"{key:#010x}" if isinstance(key, int) else _elem_text(key)
        return f"{key_text} : {_elem_text(value)}"
    return str(elem)


def table_elements(ns: str, table: str = "pykp") -> dict[str, set[str]]:
    """Every set and map of the table -> its elements as text (maps: "0x00010000 : ip . port")."""
    out: dict[str, set[str]] = {}
    for item in json.loads(sh(ns, "nft", "-j", "list", "table", "inet", table))["nftables"]:
        for kind in ("set", "map"):
            if kind in item:
                obj = item[kind]
                out[obj["name"]] = {_elem_text(e) for e in obj.get("elem", [])}
    return out


def mangle_rules(ns: str, save: str = "iptables-save") -> list[str]:
    return [line for line in sh(ns, save, "-t", "mangle").splitlines() if line.startswith("-A ")]


def pykp_leftovers(ns: str) -> list[str]:
    """Any trace of pykp in the namespace."""
    left = []
    if "table inet pykp" in sh(ns, "nft", "list", "tables"):
        left.append("nft table")
    for save in ("iptables-save", "ip6tables-save"):
        left += [
            f"{save}: {line}"
            for line in sh(ns, save, "-t", "mangle").splitlines()
            if "PYKP" in line or "pykp" in line
        ]
    return left


SMALL = RuleState(
    frontends=frozenset(
        {
            FrontendRule("10.96.0.10", 53, "UDP"),
            FrontendRule("10.96.0.10", 53, "TCP"),
            FrontendRule("10.96.0.20", 80, "SCTP"),
            FrontendRule("192.168.77.1", 30080, "TCP", external=True),
            FrontendRule(
                "192.168.77.1",
                30081,
                "TCP",
                external=True,
                masquerade=False,
                no_local_endpoints=True,
                short_circuit=True,
            ),
            FrontendRule("fd00:10:96::a", 53, "UDP"),
            FrontendRule("fd00:77::1", 30080, "TCP", external=True),
        }
    ),
    service_ips=frozenset({"10.96.0.10", "10.96.0.20", "fd00:10:96::a"}),
    backends={
        1: ("10.244.0.11", 53),
        2: ("10.244.0.12", 53),
        3: ("fd00:10:244::11", 53),
        4: ("10.244.0.11", 8080),
    },
    fallback={
        ("10.96.0.10", 53, "UDP"): (("10.244.0.11", 53), ("10.244.0.12", 53)),
        ("fd00:10:96::a", 53, "UDP"): (("fd00:10:244::11", 53),),
        ("10.96.0.20", 80, "SCTP"): (),  # no ready backend: refused, no slots
    },
    # Pods and the node reach the Local-policy NodePort's endpoints elsewhere.
    short_circuit_fallback={("192.168.77.1", 30081, "TCP"): (("10.244.0.11", 8080),)},
)
SMALL_EXPECTED = {
    "frontends4": {
        "10.96.0.10 . udp . 53",
        "10.96.0.10 . tcp . 53",
        "10.96.0.20 . sctp . 80",
        "192.168.77.1 . tcp . 30080",
        "192.168.77.1 . tcp . 30081",
    },
    "frontends6": {"fd00:10:96::a . udp . 53", "fd00:77::1 . tcp . 30080"},
    "queued4": {
        "10.96.0.10 . udp . 53",
        "10.96.0.10 . tcp . 53",
        "10.96.0.20 . sctp . 80",
        "192.168.77.1 . tcp . 30080",
        "192.168.77.1 . tcp . 30081",
    },
    "queued6": {"fd00:10:96::a . udp . 53", "fd00:77::1 . tcp . 30080"},
    "fallback4": {"10.96.0.10 . udp . 53 : goto pick4_2"},
    "fallback6": {"fd00:10:96::a . udp . 53 : goto pick6_1"},
    "fallback_sc4": {"192.168.77.1 . tcp . 30081 : goto pick_sc4_1"},
    "fallback_sc6": set(),
    "slots4": {
        "10.96.0.10 . udp . 53 . 0 : 10.244.0.11 . 53",
        "10.96.0.10 . udp . 53 . 1 : 10.244.0.12 . 53",
        "192.168.77.1 . tcp . 30081 . 128 : 10.244.0.11 . 8080",
    },
    "slots6": {"fd00:10:96::a . udp . 53 . 0 : fd00:10:244::11 . 53"},
    "masq_frontends4": {"192.168.77.1 . tcp . 30080"},
    "masq_frontends6": {"fd00:77::1 . tcp . 30080"},
    "local_frontends4": {"192.168.77.1 . tcp . 30081"},
    "local_frontends6": set(),
    "no_local_endpoints4": {"192.168.77.1 . tcp . 30081"},
    "no_local_endpoints6": set(),
    "short_circuit4": {"192.168.77.1 . tcp . 30081"},
    "short_circuit6": set(),
    "service_ips4": {"10.96.0.10", "10.96.0.20"},
    "service_ips6": {"fd00:10:96::a"},
    "hairpin4": {"10.244.0.11 . 10.244.0.11", "10.244.0.12 . 10.244.0.12"},
    "hairpin6": {"fd00:10:244::11 . fd00:10:244::11"},
    "backends4": {
        "0x00010000 : 10.244.0.11 . 53",
        "0x00020000 : 10.244.0.12 . 53",
        "0x00040000 : 10.244.0.11 . 8080",
    },
    "backends6": {"0x00030000 : fd00:10:244::11 . 53"},
    "cluster_cidrs4": {"10.244.0.0/16"},
    "cluster_cidrs6": {"fd00:10:244::/56"},
    # Static: a rotation's slot index -> the chain that DNATs to that slot, per slot count.
    **{
        f"rr_at{v}_{n}": {f"{i:#010x} : goto pick_at{v}_{i}" for i in range(n)}
        for v in (4, 6)
        for n in range(1, MAX_SLOTS + 1)
    },
}


# ------------------------------------------------------------------ marks and rendering


def test_mark_layout_defaults() -> None:
    layout = MarkLayout()
    layout.validate()
    assert layout.shift == 16
    assert layout.max_backend_id == 0xFFFE
    assert layout.reject_mark == 0xFFFF0000
    assert layout.backend_mark(1) == 0x10000
    assert layout.backend_mark(0xFFFE) == 0xFFFE0000
    for bad in (0, 0xFFFF, -1):
        with pytest.raises(ValueError):
            layout.backend_mark(bad)
    small = MarkLayout(backend_mask=0x0FF0, queue_bit=0x1, masq_bit=0x4000)
    small.validate()
    assert (small.shift, small.max_backend_id, small.reject_mark) == (4, 254, 0x0FF0)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (MarkLayout(backend_mask=0), "non-zero"),
        (MarkLayout(backend_mask=1 << 32), "non-zero"),
        (MarkLayout(backend_mask=0xFF0F0000), "contiguous"),
        (MarkLayout(backend_mask=0x80000000), "at least 2 bits"),
        (MarkLayout(backend_mask=0xFFFF8000, masq_bit=0x1), "kube-proxy"),
        (MarkLayout(backend_mask=0x0000FF00, queue_bit=0x1, masq_bit=0x2), "kube-proxy"),
        (MarkLayout(queue_bit=0x00010000), "queue_bit lies inside"),
        (MarkLayout(masq_bit=0x00020000), "masq_bit lies inside"),
        (MarkLayout(queue_bit=0x3000), "single bit"),
        (MarkLayout(masq_bit=0x4001), "single bit"),
        (MarkLayout(queue_bit=0x4000), "same bit"),
        (MarkLayout(queue_bit=0x8000), "kube-proxy"),
        (MarkLayout(masq_bit=0x8000), "drop bit"),
    ],
)
def test_mark_layout_rejects(layout: MarkLayout, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layout.validate()
    with pytest.raises(ValueError):
        RuleManager(layout)


def test_frontend_rule_validates() -> None:
    with pytest.raises(ValueError):
        FrontendRule("10.0.0.1", 80, "ICMP")
    with pytest.raises(ValueError):
        FrontendRule("10.0.0.1", 0, "TCP")
    with pytest.raises(ValueError):
        FrontendRule("10.0.0.300", 80, "TCP")
    with pytest.raises(ValueError):
        RuleManager(queues=(3, 1))


def test_render_table_has_sets_maps_and_chains() -> None:
    text = RuleManager(cluster_cidrs=["10.244.0.0/16"]).render_table()
    for decl in (
        "set frontends4 { type ipv4_addr . inet_proto . inet_service; }",
        "set frontends6 { type ipv6_addr . inet_proto . inet_service; }",
        "set masq_frontends4 {",
        "set masq_frontends6 {",
        "set service_ips4 { type ipv4_addr; }",
        "set service_ips6 { type ipv6_addr; }",
        "map backends4 { type mark : ipv4_addr . inet_service; }",
        "map backends6 { type mark : ipv6_addr . inet_service; }",
        "set cluster_cidrs4 { type ipv4_addr; flags interval; }",
        "set cluster_cidrs6 { type ipv6_addr; flags interval; }",
        "type filter hook prerouting priority -151;",
        "type filter hook output priority -151;",
        "type nat hook prerouting priority -100;",
        "type nat hook output priority -100;",
        "type nat hook postrouting priority 100;",
        "type filter hook input priority 0;",
        "type filter hook forward priority 0;",
        "type filter hook output priority 0;",
        "ct state new ip daddr . meta l4proto . th dport @frontends4 meta mark set",
        "dnat ip to meta mark & 0xffff0000 map @backends4",
        "dnat ip6 to meta mark & 0xffff0000 map @backends6",
        (
            "ip saddr != @cluster_cidrs4 ip daddr . meta l4proto . th dport != @local_frontends4 "
            "meta mark set meta mark | 0x00004000"
        ),
        "@masq_frontends4 meta mark set meta mark | 0x00004000",
        "meta mark & 0x00004000 == 0x00004000",
        "ip daddr @service_ips4 jump do_reject",
        "meta mark & 0xffff0000 == 0xffff0000 jump do_reject",
        # kube-proxy's "has no local endpoints" DROP: clusterIPs from anywhere, external
        # frontends from outside the cluster and the node.
        (
            "meta mark & 0xffff0000 == 0xffff0000 ip daddr . meta l4proto . th dport "
            "@no_local_endpoints4 ip daddr . meta l4proto . th dport != @local_frontends4 drop"
        ),
        (
            "meta mark & 0xffff0000 == 0xffff0000 ip daddr . meta l4proto . th dport "
            "@no_local_endpoints4 ip saddr != @cluster_cidrs4 fib saddr type != local drop"
        ),
        "reject with tcp reset",
        "reject with icmpx port-unreachable",
        # The kernel path: undecided new connections to a frontend pick a slot at random.
        "ct state new ip daddr . meta l4proto . th dport @queued4 meta mark set meta mark | 0x00002000",
        "map fallback4 { type ipv4_addr . inet_proto . inet_service : verdict; }",
        (
            "map slots4 { typeof ip daddr . meta l4proto . th dport . numgen random mod 128 : "
            "ip daddr . th dport; }"
        ),
        (
            "meta mark & 0xffff0000 == 0x00000000 ip daddr . meta l4proto . th dport @frontends4 "
            "jump nat_fallback"
        ),
        "ip daddr . meta l4proto . th dport vmap @fallback4",
        "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @slots4",
        "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 128 map @slots6",
    ):
        assert decl in text, decl
    # Only IPv4 cluster CIDRs: no IPv6 --cluster-cidr rule.
    assert "@cluster_cidrs6 ip6" not in text
    # No nft queue statement (CONFIG_NFT_QUEUE is off here): iptables' NFQUEUE target queues.
    assert not re.search(r"(^|\s)queue(\s|$)", text)
    for name in (
        "mark_new",
        "mark_new_out",
        "nat_pre",
        "nat_out",
        "nat_post",
        "nat_backend",
        "reject_in",
        "reject_fwd",
        "reject_out",
        "do_reject",
    ):
        assert f"chain {name} {{" in text


def test_forward_drops_invalid_packets_unless_conntrack_is_liberal() -> None:
    """kube-proxy drops INVALID packets in forward (an out-of-window segment of a NATed
    connection would reach the client un-NATed and get the connection reset), except with
    --conntrack-tcp-be-liberal, which makes conntrack call no such segment INVALID."""

    def forward_chain(manager: RuleManager) -> str:
        return manager.render_table().split("chain reject_fwd {", 1)[1].split("}", 1)[0]

    strict = forward_chain(RuleManager())
    assert strict.index("ct state invalid drop") < strict.index("ct state != new accept")
    assert "ct state invalid drop" not in forward_chain(RuleManager(drop_invalid=False))
    # Only forwarded packets: the node's own sockets are left to their TCP stacks.
    text = RuleManager().render_table()
    for chain in ("reject_in", "reject_out"):
        assert "invalid" not in text.split(f"chain {chain} {{", 1)[1].split("}", 1)[0]


def test_pods_and_the_node_reach_a_local_services_external_frontends_through_the_reader() -> None:
    """kube-proxy's short-circuit: new connections from the cluster CIDR (prerouting) or
    the node itself (output) to an external frontend of an externalTrafficPolicy Local
    service are queued with the cluster-source bit, and the reader decides them as the
    port's cluster-wide service."""
    from pykp.netfilter.elements import frontend_contribution

    lb = FrontendRule("192.0.2.5", 80, "TCP", external=True, masquerade=False, short_circuit=True)
    lb6 = FrontendRule(
        "2001:db8::5", 80, "TCP", external=True, masquerade=False, short_circuit=True
    )
    elements = frontend_contribution([lb, lb6], {}, [])
    assert elements["short_circuit4"] == {"192.0.2.5 . tcp . 80": "192.0.2.5 . tcp . 80"}
    assert elements["short_circuit6"] == {"2001:db8::5 . tcp . 80": "2001:db8::5 . tcp . 80"}
    text = RuleManager(cluster_cidrs=["10.244.0.0/16"]).render_table()
    prerouting = text.split("chain mark_new {", 1)[1].split("}", 1)[0]
    output = text.split("chain mark_new_out {", 1)[1].split("}", 1)[0]
    queue_and_cluster = "meta mark set meta mark | 0x00003000"
    assert (
        "ct state new ip saddr @cluster_cidrs4 ip daddr . meta l4proto . th dport "
        f"@short_circuit4 {queue_and_cluster}" in prerouting
    )
    assert "ip6 saddr @cluster_cidrs6" not in prerouting  # no IPv6 cluster CIDR given
    assert (
        f"ct state new ip daddr . meta l4proto . th dport @short_circuit4 {queue_and_cluster}"
        in output
    )


def test_render_iptables() -> None:
    one = RuleManager().render_iptables()
    assert (
        "-A PYKP-QUEUE -m mark --mark 0x2000/0xffff2000 -j NFQUEUE --queue-num 0 --queue-bypass"
        in one
    )
    assert "-I PREROUTING 1 -m comment --comment pykp -j PYKP-QUEUE" in one
    assert "-I OUTPUT 1 -m comment --comment pykp -j PYKP-QUEUE" in one
    many = RuleManager(queues=(2, 5), chain="X-Q").render_iptables()
    assert "-j NFQUEUE --queue-balance 2:5 --queue-bypass" in many
    assert ":X-Q - [0:0]" in many


# ------------------------------------------------------------------ kernel: install and sync


@privileged
@needs_root
def test_install_and_sync_load_the_elements(netns: str) -> None:
    mgr = RuleManager(cluster_cidrs=["10.244.0.0/16", "fd00:10:244::/56"], netns=netns)
    assert not mgr.installed()
    with pytest.raises(RulesError):
        mgr.sync(SMALL)  # no table yet
    mgr.install()
    assert mgr.installed()
    assert mgr.holds_no_elements  # a table it made: a first load may go in parts
    stats = mgr.sync(SMALL)
    assert not mgr.holds_no_elements
    assert stats.full
    assert stats.removed == 0
    expected_synced = {
        k: v for k, v in SMALL_EXPECTED.items() if not k.startswith(("cluster", "rr_at"))
    }
    assert stats.added == sum(len(v) for v in expected_synced.values())
    assert table_elements(netns) == SMALL_EXPECTED
    rules = sh(netns, "iptables-save", "-t", "mangle")
    assert "-A PYKP-QUEUE -m mark --mark 0x2000/0xffff2000 -j NFQUEUE --queue-num 0" in rules
    assert mangle_rules(netns, "ip6tables-save")[:2] == [
        "-A PREROUTING -m comment --comment pykp -j PYKP-QUEUE",
        "-A OUTPUT -m comment --comment pykp -j PYKP-QUEUE",
    ]
    # Nothing changed: nothing sent.
    again = mgr.sync(SMALL)
    assert (again.added, again.removed, again.full) == (0, 0, False)


@privileged
@needs_root
def test_second_sync_sends_only_the_difference(netns: str) -> None:
    mgr = RuleManager(netns=netns)
    mgr.install()
    mgr.sync(SMALL)
    backends = dict(SMALL.backends)
    backends[2] = ("10.244.0.12", 5353)  # same backend id, new port
    stats = mgr.sync(dataclasses.replace(SMALL, backends=backends))
    assert not stats.full
    assert (stats.added, stats.removed) == (1, 1)
    assert dict(stats.by_set) == {"backends4": (1, 1)}
    assert table_elements(netns)["backends4"] == {
        "0x00010000 : 10.244.0.11 . 53",
        "0x00020000 : 10.244.0.12 . 5353",
        "0x00040000 : 10.244.0.11 . 8080",
    }
    # A removed frontend and backend, an added service IP.
    frontends = SMALL.frontends - {FrontendRule("10.96.0.20", 80, "SCTP")}
    del backends[4]
    service_ips = SMALL.service_ips | {"10.96.0.30"}
    stats = mgr.sync(
        dataclasses.replace(SMALL, frontends=frontends, service_ips=service_ips, backends=backends)
    )
    assert dict(stats.by_set) == {
        "frontends4": (0, 1),
        "queued4": (0, 1),
        "backends4": (0, 1),
        "service_ips4": (1, 0),
    }
    elements = table_elements(netns)
    assert "10.96.0.20 . sctp . 80" not in elements["frontends4"]
    assert "0x00040000 : 10.244.0.11 . 8080" not in elements["backends4"]
    assert "10.96.0.30" in elements["service_ips4"]
    # The hairpin pair stays while another backend (id 1) still uses the address.
    assert "10.244.0.11 . 10.244.0.11" in elements["hairpin4"]


@privileged
@needs_root
def test_reinstall_keeps_elements_until_the_next_sync(netns: str) -> None:
    mgr = RuleManager(netns=netns)
    mgr.install()
    mgr.sync(SMALL)
    restarted = RuleManager(netns=netns, queues=(1, 3))  # a new process, new settings
    restarted.install()
    assert not restarted.holds_no_elements  # a kept table: its next load replaces them whole
    assert table_elements(netns)["backends4"] == SMALL_EXPECTED["backends4"]
    assert "--queue-balance 1:3" in sh(netns, "iptables-save", "-t", "mangle")
    assert len([r for r in mangle_rules(netns) if "--comment pykp" in r]) == 2  # no duplicates
    smaller = RuleState(frozenset(), frozenset(), {1: ("10.244.0.11", 53)})
    stats = restarted.sync(smaller)
    assert stats.full
    elements = table_elements(netns)
    assert elements["backends4"] == {"0x00010000 : 10.244.0.11 . 53"}
    assert elements["frontends4"] == set()


@privileged
@needs_root
def test_install_replaces_a_table_of_another_shape(netns: str) -> None:
    sh(
        netns,
        "nft",
        "-f",
        "-",
        stdin=(
            "table inet pykp {\n"
            "\tset frontends4 { type ipv4_addr; }\n"
            "\tset old_stuff { type ipv4_addr; }\n"
            "\tchain old_chain { type filter hook input priority 5; policy accept; }\n"
            "}\n"
        ),
    )
    mgr = RuleManager(netns=netns)
    mgr.install()
    listing = sh(netns, "nft", "list", "table", "inet", "pykp")
    assert "old_stuff" not in listing and "old_chain" not in listing
    mgr.sync(SMALL)
    assert table_elements(netns)["frontends4"] == SMALL_EXPECTED["frontends4"]
    # Same shape plus stale objects: updated in place, stale objects removed.
    sh(
        netns,
        "nft",
        "-f",
        "-",
        stdin=(
            "table inet pykp {\n"
            "\tset old_stuff { type ipv4_addr; }\n"
            "\tmap old_map { type ipv4_addr : verdict; }\n"
            "\tchain old_chain { type filter hook input priority 5; policy accept; }\n"
            "}\n"
            "add rule inet pykp old_chain ip saddr @old_stuff accept\n"
            "add rule inet pykp old_chain ip saddr vmap @old_map\n"
        ),
    )
    RuleManager(netns=netns).install()
    listing = sh(netns, "nft", "list", "table", "inet", "pykp")
    assert "old_" not in listing
    assert table_elements(netns)["frontends4"] == SMALL_EXPECTED["frontends4"]


FOREIGN_NFT = """table inet foreign {
\tchain pre {
\t\ttype filter hook prerouting priority -151; policy accept;
\t\tmeta mark 0x00000001 counter
\t}
\tchain out {
\t\ttype filter hook output priority -151; policy accept;
\t\tmeta mark 0x00000001 counter
\t}
\tchain natpre {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tip daddr 198.51.100.1 dnat ip to 198.51.100.2
\t}
\tchain post {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tip saddr 198.51.100.0/24 masquerade
\t}
\tchain input {
\t\ttype filter hook input priority 0; policy accept;
\t\ttcp dport 22 accept
\t}
}
"""
FOREIGN_IPT = [
    "-A PREROUTING -s 198.51.100.7/32 -j MARK --set-xmark 0x1/0xffffffff",
    "-A OUTPUT -d 198.51.100.7/32 -j MARK --set-xmark 0x2/0xffffffff",
]
FOREIGN_IP6T = [
    "-A PREROUTING -s 2001:db8::7/128 -j MARK --set-xmark 0x1/0xffffffff",
    "-A OUTPUT -d 2001:db8::7/128 -j MARK --set-xmark 0x2/0xffffffff",
]


@privileged
@needs_root
def test_foreign_rules_survive_install_sync_cleanup(netns: str) -> None:
    sh(netns, "nft", "-f", "-", stdin=FOREIGN_NFT)
    for rule in FOREIGN_IPT:
        sh(netns, "iptables", "-t", "mangle", *rule.split())
    for rule in FOREIGN_IP6T:
        sh(netns, "ip6tables", "-t", "mangle", *rule.split())
    # Text without counters, to compare before and after.
    foreign = re.sub(
        r"counter packets \d+ bytes \d+",
        "counter",
        sh(netns, "nft", "list", "table", "inet", "foreign"),
    )

    def check() -> None:
        now = re.sub(
            r"counter packets \d+ bytes \d+",
            "counter",
            sh(netns, "nft", "list", "table", "inet", "foreign"),
        )
        assert now == foreign
        assert [r for r in mangle_rules(netns) if "pykp" not in r.lower()] == FOREIGN_IPT
        ip6 = mangle_rules(netns, "ip6tables-save")
        assert [r for r in ip6 if "pykp" not in r.lower()] == FOREIGN_IP6T

    mgr = RuleManager(netns=netns)
    mgr.install()
    check()
    # Our jumps come first, the foreign rules keep their order after them.
    assert mangle_rules(netns)[0] == "-A PREROUTING -m comment --comment pykp -j PYKP-QUEUE"
    mgr.sync(SMALL)
    mgr.sync(RuleState(SMALL.frontends, frozenset(), {}))
    check()
    mgr.install()
    check()
    mgr.cleanup()
    check()
    assert pykp_leftovers(netns) == []


@privileged
@needs_root
def test_cleanup_is_complete_and_idempotent(netns: str) -> None:
    mgr = RuleManager(netns=netns, cluster_cidrs=["10.244.0.0/16"])
    mgr.cleanup()  # nothing installed yet: fine
    mgr.install()
    mgr.sync(SMALL)
    assert pykp_leftovers(netns)
    mgr.cleanup()
    assert pykp_leftovers(netns) == []
    assert not mgr.installed()
    mgr.cleanup()
    assert pykp_leftovers(netns) == []
    # Usable again afterwards.
    mgr.install()
    assert mgr.sync(SMALL).full
    assert table_elements(netns)["frontends4"] == SMALL_EXPECTED["frontends4"]


@privileged
@needs_root
def test_cleanup_all_without_state(netns: str) -> None:
    assert cleanup_all(netns=netns) == []
    RuleManager(netns=netns).install()
    RuleManager(netns=netns, table="pykp2", chain="PYKP2-QUEUE", ipv6=False).install()
    # A jump that lost its twin (half-removed by hand) and a duplicate are both found.
    sh(
        netns,
        "iptables",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "pykp",
        "-j",
        "PYKP-QUEUE",
    )
    removed = cleanup_all(netns=netns)
    assert removed == [
        "nft table inet pykp",
        "iptables mangle PREROUTING jump to PYKP-QUEUE",
        "iptables mangle PREROUTING jump to PYKP-QUEUE",
        "iptables mangle OUTPUT jump to PYKP-QUEUE",
        "iptables mangle chain PYKP-QUEUE",
        "ip6tables mangle PREROUTING jump to PYKP-QUEUE",
        "ip6tables mangle OUTPUT jump to PYKP-QUEUE",
        "ip6tables mangle chain PYKP-QUEUE",
    ]
    # The other instance is untouched.
    assert "table inet pykp2" in sh(netns, "nft", "list", "tables")
    assert RuleManager(netns=netns, table="pykp2", chain="PYKP2-QUEUE", ipv6=False).installed()
    assert cleanup_all(netns=netns) == []
    assert cleanup_all("pykp2", "PYKP2-QUEUE", netns=netns)
    assert pykp_leftovers(netns) == []


@privileged
@needs_root
def test_cleanup_keeps_a_chain_that_foreign_rules_use(netns: str) -> None:
    mgr = RuleManager(netns=netns, ipv6=False)
    mgr.install()
    sh(netns, "iptables", "-t", "mangle", "-A", "FORWARD", "-j", "PYKP-QUEUE")
    removed = cleanup_all(netns=netns, ipv6=False)
    assert "iptables mangle chain PYKP-QUEUE (flushed; foreign rules use it)" in removed
    rules = mangle_rules(netns)
    assert rules == ["-A FORWARD -j PYKP-QUEUE"]


@privileged
@needs_root
def test_errors_name_the_command(netns: str) -> None:
    with pytest.raises(RulesError) as info:
        run_tool(["nft", "-f", "-"], netns=netns, stdin="this is not nft\n")
    assert info.value.returncode != 0
    assert "nft -f -" in str(info.value)
    assert info.value.stderr
    with pytest.raises(RulesError) as missing:
        run_tool(["pykp-no-such-tool"])
    assert missing.value.returncode == 127


@privileged
@needs_root
def test_large_state_loads_in_one_sync(netns: str) -> None:
    mgr = RuleManager(netns=netns, cluster_cidrs=["10.244.0.0/16"])
    mgr.install()
    base4 = int(ipaddress.ip_address("10.96.0.0"))
    frontends = {
        FrontendRule(str(ipaddress.ip_address(base4 + 1 + i)), 80, "TCP") for i in range(10_000)
    }
    service_ips = frozenset(f.ip for f in frontends)
    pods = int(ipaddress.ip_address("10.244.0.0"))
    backends = {i + 1: (str(ipaddress.ip_address(pods + 1 + i)), 8080) for i in range(30_000)}
    state = RuleState(frozenset(frontends), service_ips, backends)
    full = mgr.sync(state)
    assert full.full and full.added == 10_000 + 10_000 + 10_000 + 30_000 + 30_000
    backends[5] = ("10.244.200.1", 8080)
    diff = mgr.sync(RuleState(state.frontends, service_ips, backends))
    assert dict(diff.by_set) == {"backends4": (1, 1), "hairpin4": (1, 1)}
    started = time.perf_counter()
    RuleManager(netns=netns, cluster_cidrs=["10.244.0.0/16"]).install()
    reinstall = time.perf_counter() - started
    elements = table_elements(netns)
    assert len(elements["frontends4"]) == 10_000
    assert len(elements["backends4"]) == 30_000
    assert "0x00050000 : 10.244.200.1 . 8080" in elements["backends4"]
    print(
        f"\n10,000 frontends + 30,000 backends: full sync {full.seconds:.3f} s, "
        f"one-backend diff sync {diff.seconds:.3f} s, re-install {reinstall:.3f} s"
    )


def _every_kind_of_element() -> dict[str, dict[str, str]]:
    """Elements for every synced set and map, both families, each protocol, the widest
    marks and ports: what a full load may hold."""
    wanted: dict[str, dict[str, str]] = {name: {} for name in _SYNCED}
    for version, ip, backend in ((4, "10.96.0.1", "10.244.0.5"), (6, "fd00::1", "fd01::5")):
        for i, protocol in enumerate(("tcp", "udp", "sctp")):
            key = f"{ip} . {protocol} . {80 + i}"
            for name in (
                "frontends", "queued", "masq_frontends", "local_frontends", "short_circuit",
                "no_local_endpoints",
            ):  # fmt: skip
                wanted[f"{name}{version}"][key] = key
            wanted[f"fallback{version}"][key] = f"{key} : goto pick{version}_{i + 1}"
            for j in range(i + 1):
                slot = f"{key} . {j}"
                wanted[f"slots{version}"][slot] = f"{slot} : {backend} . {8080 + j}"
            # The short-circuit's slots, after the frontend's own (MAX_SLOTS on).
            wanted[f"fallback_sc{version}"][key] = f"{key} : goto pick_sc{version}_{i + 1}"
            for j in range(MAX_SLOTS, MAX_SLOTS + i + 1):
                slot = f"{key} . {j}"
                wanted[f"slots{version}"][slot] = f"{slot} : {backend} . {9080 + j}"
        wanted[f"service_ips{version}"][ip] = ip
        wanted[f"hairpin{version}"][f"{backend} . {backend}"] = f"{backend} . {backend}"
        wanted[f"backends{version}"]["0x00010000"] = f"0x00010000 : {backend} . 65535"
        wanted[f"backends{version}"]["0xfffe0000"] = f"0xfffe0000 : {backend} . 1"
    return wanted


def _listings(ns: str) -> dict[str, str]:
    return {
        name: sh(ns, "nft", "list", "map" if ":" in type_ else "set", "inet", "pykp", name)
        for name, type_ in _SYNCED.items()
    }


@privileged
@needs_root
def test_bulk_load_matches_nft(netns: str) -> None:
    """The full load over netlink writes exactly what nft writes for the same text: nft
    decodes both back (byte order, padding, verdicts), and the listings agree."""
    wanted = _every_kind_of_element()
    mgr = RuleManager(netns=netns)
    mgr.install()
    mgr.load_elements(wanted)  # nft: another namespace's manager runs `nft -f -`
    by_nft = _listings(netns)
    assert "0xfffe0000 : 10.244.0.5 . 1" in by_nft["backends4"]
    for name, type_ in _SYNCED.items():
        sh(netns, "nft", "flush", "map" if ":" in type_ else "set", "inet", "pykp", name)
    assert all("elements" not in text for text in _listings(netns).values())
    encoders = bulk_load.encoders(_SYNCED)
    with in_namespace(netns):
        # Over stale content too: the batch flushes every set first.
        bulk_load.load_sets(
            "pykp", [("frontends4", encoders["frontends4"], ["10.0.0.9 . tcp . 1"])]
        )
        bulk_load.load_sets(
            "pykp", [(name, encoders[name], wanted[name].values()) for name in _SYNCED]
        )
    assert _listings(netns) == by_nft
    # A refused batch (no such set) raises and applies nothing.
    with in_namespace(netns), pytest.raises(NetlinkError):
        bulk_load.load_sets(
            "pykp",
            [
                ("frontends4", encoders["frontends4"], []),
                ("nosuch", encoders["frontends4"], ["10.0.0.9 . tcp . 1"]),
            ],
        )
    assert _listings(netns) == by_nft


@privileged
@needs_root
def test_changes_over_netlink_match_nft(netns: str) -> None:
    """Element changes and round-robin chains over netlink (the agent's own namespace)
    write what nft writes for the same text; deletes by key leave nothing behind."""
    wanted = _every_kind_of_element()
    for v in (4, 6):  # the kernel path's rotation: a verdict to a round-robin chain
        key = next(iter(wanted[f"fallback{v}"]))
        wanted[f"fallback{v}"][key] = f"{key} : goto rr{v}_00000000000000a{v}"
    chains = {"rr_chains4": ["rr4_00000000000000a4 3"], "rr_chains6": ["rr6_00000000000000a6 1"]}

    def rr_chains() -> str:
        return "\n".join(
            sh(netns, "nft", "list", "chain", "inet", "pykp", chain.split()[0])
            for names in chains.values()
            for chain in names
        )

    by_nft = RuleManager(netns=netns)  # another namespace's manager: nft scripts
    by_nft.install()
    by_nft.add_elements({**{n: list(e.values()) for n, e in wanted.items()}, **chains})
    listings, chain_listing = _listings(netns), rr_chains()
    assert "numgen inc mod 3 vmap @rr_at4_3" in chain_listing
    by_nft.cleanup()

    with in_namespace(netns):
        mgr = RuleManager()
        assert mgr._bulk_load
        mgr.install()
        mgr.add_elements({**{n: list(e.values()) for n, e in wanted.items()}, **chains})
        assert _listings(netns) == listings
        assert rr_chains() == chain_listing
        # A changed slot count rewrites the chain; a replaced value is one transaction.
        mgr.add_elements(
            {},
            {
                "rr_chains4": [("rr4_00000000000000a4", "rr4_00000000000000a4 2")],
                "backends4": [("0x00010000", "0x00010000 : 10.244.0.9 . 80")],
            },
        )
        assert "numgen inc mod 2 vmap @rr_at4_2" in rr_chains()
        assert "0x00010000 : 10.244.0.9 . 80" in _listings(netns)["backends4"]
        # Deleted by key, the chains after the verdicts naming them.
        mgr.remove_elements(
            {
                **{n: list(e) for n, e in wanted.items()},
                "rr_chains4": ["rr4_00000000000000a4"],
                "rr_chains6": ["rr6_00000000000000a6"],
            }
        )
        assert all("elements" not in text for text in _listings(netns).values())
        assert mgr._rr_chains_held() == {}
        assert mgr.installed()


def test_bulk_load_refuses_what_it_cannot_encode() -> None:
    encoders = bulk_load.encoders(_SYNCED)
    for name, text in (
        ("frontends4", "10.0.0.1 . icmp . 1"),
        ("frontends4", "10.0.0.1 . tcp . 70000"),
        ("backends4", "0x10000 : 10.0.0.300 . 80"),
        ("fallback4", "10.0.0.1 . tcp . 1 : jump pick4_1"),
    ):
        with pytest.raises((ValueError, KeyError, OSError)):
            bulk_load.batch("pykp", [(name, encoders[name], [text])])
    with pytest.raises(ValueError):
        bulk_load.encoder("ipv4_addr . mark")


def test_a_full_load_the_netlink_batch_fails_goes_through_nft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = NftRecorder()
    mgr = RuleManager(nft=recorder)
    mgr._bulk_load = True  # as in the agent's own namespace

    def refused(*_: object) -> None:
        raise NetlinkError(1, "Operation not permitted")

    monkeypatch.setattr(bulk_load, "_send", refused)
    assert mgr.load_elements({"frontends4": {"10.0.0.1 . tcp . 80": "10.0.0.1 . tcp . 80"}}) == 1
    [script] = recorder.scripts
    assert "flush set inet pykp frontends4" in script
    assert "add element inet pykp frontends4 { 10.0.0.1 . tcp . 80 }" in script
    # A change too: the same transaction, through nft.
    recorder.scripts.clear()
    mgr.add_elements(
        {"rr_chains4": ["rr4_0123456789abcdef 2"]},
        {"backends4": [("0x00010000", "0x00010000 : 10.0.0.2 . 80")]},
    )
    assert recorder.scripts == [
        "add chain inet pykp rr4_0123456789abcdef\n"
        "flush chain inet pykp rr4_0123456789abcdef\n"
        "add rule inet pykp rr4_0123456789abcdef numgen inc mod 2 vmap @rr_at4_2\n"
        "delete element inet pykp backends4 { 0x00010000 }\n"
        "add element inet pykp backends4 { 0x00010000 : 10.0.0.2 . 80 }\n"
    ]


# ------------------------------------------------------------------ datapath end to end

UDP_PORT = 5353


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(backends=2, clients=1, prefix="pykp-rules-lab-") as lab:
        lab.start_udp_echo(UDP_PORT)
        yield lab


def _udp_ask(
    lab: Lab, host: str, dst: tuple[str, int], payload: bytes = b"clientip", timeout: float = 2.0
) -> str:
    """One datagram from `host`; the answer, or the exception's name."""
    family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
    with lab.in_namespace(host):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(dst)
            sock.send(payload)
            return sock.recv(256).decode().strip()
        except OSError as error:
            return type(error).__name__


@privileged
@needs_root
def test_datapath_end_to_end(lab: Lab, fastpath: ModuleType) -> None:
    """Client pod, external host, node itself and hairpin, through the Rust reader."""
    b0, b1 = lab.backend_pods
    client = lab.client_pods[0]
    engine = fastpath.Engine(default_policy="round-robin")
    F, B = fastpath.Frontend, fastpath.Backend
    engine.upsert_service(
        "dns",
        [
            F("10.96.0.10", 53, "UDP"),
            F("fd00:10:96::a", 53, "UDP"),
            F(lab.node_ip4, 30053, "UDP"),
            F(lab.node_ip4, 30054, "UDP"),
        ],
        [B(b0.ipv4, UDP_PORT), B(b0.ipv6, UDP_PORT)],
    )
    engine.upsert_service("self", [F("10.96.0.11", 53, "UDP")], [B(b0.ipv4, UDP_PORT)])
    engine.upsert_service("empty", [F("10.96.0.12", 53, "UDP")], [])
    frontends = frozenset(
        {
            FrontendRule("10.96.0.10", 53, "UDP"),
            FrontendRule("fd00:10:96::a", 53, "UDP"),
            FrontendRule(lab.node_ip4, 30053, "UDP", external=True),
            FrontendRule(lab.node_ip4, 30054, "UDP", external=True, masquerade=False),
            FrontendRule("10.96.0.11", 53, "UDP"),
            FrontendRule("10.96.0.12", 53, "UDP"),
        }
    )
    mgr = RuleManager(netns=lab.node.netns, cluster_cidrs=[lab.pod_cidr4, lab.pod_cidr6])
    layout = mgr.layout
    datapath = fastpath.NfqueueDatapath(engine, backend_mask=layout.backend_mask)
    assert datapath.reject_mark == layout.reject_mark
    mgr.install()
    service_ips = frozenset({"10.96.0.10", "fd00:10:96::a", "10.96.0.11", "10.96.0.12"})
    mgr.sync(RuleState(frontends, service_ips, engine.backend_ids()))
    node = lab.node.netns

    # No reader and no kernel-path slots: --queue-bypass lets the packet on undecided, the
    # reject rules refuse it at once, and no conntrack entry is confirmed for it.
    assert _udp_ask(lab, client.name, ("10.96.0.10", 53), timeout=0.5) == "ConnectionRefusedError"
    assert "dport=53" not in sh(node, "conntrack", "-L")

    with lab.in_namespace(lab.node):
        datapath.start()
    try:
        # A pod client keeps its address (inside the cluster CIDR).
        assert _udp_ask(lab, client.name, ("10.96.0.10", 53)) == client.ipv4
        assert _udp_ask(lab, client.name, ("fd00:10:96::a", 53)) == client.ipv6
        # External traffic to a NodePort: masqueraded (Cluster) or not (Local).
        gateway = lab.gateway4
        assert _udp_ask(lab, "external", (lab.node_ip4, 30053)) == gateway
        assert _udp_ask(lab, "external", (lab.node_ip4, 30054)) == lab.external.ipv4
        # The node itself (OUTPUT path): outside the cluster CIDR, so masqueraded.
        assert _udp_ask(lab, "node", ("10.96.0.10", 53)) == gateway
        # Hairpin: a pod reaching itself through its service.
        assert _udp_ask(lab, b0.name, ("10.96.0.11", 53)) == gateway
        # No endpoints: the reader's reject mark; a port the service lacks: the service IP set.
        assert _udp_ask(lab, client.name, ("10.96.0.12", 53)) == "ConnectionRefusedError"
        assert _udp_ask(lab, client.name, ("10.96.0.10", 54)) == "ConnectionRefusedError"
        with lab.in_namespace(client.name):
            tcp = socket.socket()
        with tcp:
            tcp.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                tcp.connect(("10.96.0.10", 80))
        stats = datapath.stats()
        assert stats["forwarded"] >= 6 and stats["rejected"] >= 1
        # The engine picks a backend the map does not hold yet: refused, not un-NATed.
        lagging = mgr.sync(RuleState(frontends, service_ips, {}))
        assert lagging.by_set["backends4"][1] >= 1
        assert table_elements(node)["backends4"] == set()
        assert _udp_ask(lab, client.name, ("10.96.0.10", 53)) == "ConnectionRefusedError"
        assert _udp_ask(lab, "external", (lab.node_ip4, 30053)) == "ConnectionRefusedError"
        mgr.sync(RuleState(frontends, service_ips, engine.backend_ids()))

        # Stale-UDP cleanup against the entries just made.
        assert kernel_conntrack.count_entries(netns=node) >= 3
        listing = sh(node, "conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.0.10")
        assert f"src={b0.ipv4}" in listing
        assert kernel_conntrack.delete_udp_flows("10.96.0.10", b1.ipv4, netns=node) == 0
        assert (
            kernel_conntrack.delete_udp_flows("10.96.0.10", b0.ipv4, UDP_PORT + 1, netns=node) == 0
        )
        assert kernel_conntrack.delete_udp_flows("10.96.0.10", b0.ipv4, UDP_PORT, netns=node) >= 1
        assert "dport=53" not in sh(
            node, "conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.0.10"
        )
        assert kernel_conntrack.delete_udp_flows("fd00:10:96::a", b0.ipv6, netns=node) == 1
        # The NodePort and hairpin flows, whatever their frontend, all go to b0.
        assert kernel_conntrack.delete_udp_flows_to_backend(b0.ipv4, netns=node) >= 3
        assert kernel_conntrack.delete_udp_flows_to_backend(b0.ipv4, netns=node) == 0
    finally:
        datapath.stop()
    mgr.cleanup()
    assert pykp_leftovers(node) == []


@privileged
@needs_root
def test_established_flows_outlive_the_reader_but_not_the_table(
    lab: Lab, fastpath: ModuleType
) -> None:
    """Why an agent that restarts should leave its rules installed.

    Without a reader, established flows go on (conntrack NAT) and new connections are
    served by the kernel path from the last synced slots. Deleting the table also
    unregisters the namespace's NAT hooks when it held the last NAT chain, and established
    NATed flows stop working.
    """
    b0 = lab.backend_pods[0]
    client = lab.client_pods[0].name
    engine = fastpath.Engine()
    engine.upsert_service("dns", [fastpath.Frontend("10.96.0.10", 53, "UDP")],
                          [fastpath.Backend(b0.ipv4, UDP_PORT)])  # fmt: skip
    mgr = RuleManager(netns=lab.node.netns, cluster_cidrs=[lab.pod_cidr4])
    mgr.install()
    frontends = frozenset({FrontendRule("10.96.0.10", 53, "UDP")})
    slots = {("10.96.0.10", 53, "UDP"): ((b0.ipv4, UDP_PORT),)}
    mgr.sync(RuleState(frontends, frozenset({"10.96.0.10"}), engine.backend_ids(), slots))
    datapath = fastpath.NfqueueDatapath(engine)
    with lab.in_namespace(lab.node):
        datapath.start()
    with lab.in_namespace(client):
        flow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with flow:
        flow.settimeout(2)
        flow.connect(("10.96.0.10", 53))

        def ask() -> str:
            try:
                flow.send(b"clientip")
                return flow.recv(256).decode().strip()
            except OSError as error:
                return type(error).__name__

        try:
            assert ask() == lab.client_pods[0].ipv4
        finally:
            datapath.stop()
        assert ask() == lab.client_pods[0].ipv4  # no reader: the kernel carries the flow
        # ... and a new flow is decided by the kernel path (--queue-bypass, fallback slots).
        assert _udp_ask(lab, client, ("10.96.0.10", 53), timeout=2) == lab.client_pods[0].ipv4
        mgr.cleanup()
        flow.settimeout(0.5)
        assert ask() == "TimeoutError"  # no NAT hooks left: the reply never comes back


@privileged
@needs_root
def test_conntrack_cleanup_keeps_un_natted_flows(lab: Lab) -> None:
    """A pod talking to a backend's own address is not a stale service flow."""
    b0 = lab.backend_pods[0]
    client = lab.client_pods[0]
    node = lab.node.netns
    RuleManager(netns=node).install()  # conntrack only tracks once something uses it
    assert _udp_ask(lab, client.name, (b0.ipv4, UDP_PORT)) == client.ipv4
    assert kernel_conntrack.count_entries(netns=node) >= 1
    assert kernel_conntrack.delete_udp_flows_to_backend(b0.ipv4, netns=node) == 0
    assert f"dst={b0.ipv4}" in sh(node, "conntrack", "-L", "-p", "udp")
