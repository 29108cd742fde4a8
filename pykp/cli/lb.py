"""`pykp lb`: the AF_PACKET load balancer on one interface of a load-balancer node.

The services file's frontends are the VIPs (answered in ARP/ND, never configured on the
node); every VIP packet goes to a backend chosen by its service's policy, wrapped in
IP-in-IP from `address` (or, with `forwarding="l2-dsr"`, sent as it is to the backend's MAC
on this segment), and the backend answers the client directly. See
crates/fastpath/src/datapath/afpacket/mod.rs.

Policies: Maglev (the default) picks the same backend for a flow on every load-balancer
node with the same services and `maglev_seed`, so a flow the router moves to another node
keeps its backend. random, round-robin and least-conn decide per node (round-robin's
position and least-conn's counts are each node's own, least-conn counting only the flows
through it): a flow keeps its backend only while it stays on its node.
"""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

from pykp.agent.plan import apply_to_engine, services_file_to_engine
from pykp.model import LB_DEFAULT_POLICY, Catalog


def parse_neighbour(text: str) -> tuple[str, str]:
    """`IP=MAC` -> (IP, MAC); ValueError otherwise (the extension checks both halves)."""
    ip, sep, mac = text.partition("=")
    if not sep or not ip or not mac:
        raise ValueError(f"{text!r} is not IP=MAC")
    return ip.strip(), mac.strip()


_COALESCING: Final = ("generic-receive-offload", "large-receive-offload", "rx-gro-hw")


def coalescing_offloads(ethtool_features: str) -> list[str]:
    """The receive offloads that merge frames into super-packets and are on, from the
    output of `ethtool -k IF` (``name: on``, ``name: on [fixed]``)."""
    on = []
    for line in ethtool_features.splitlines():
        name, _, value = line.strip().partition(":")
        if name in _COALESCING and value.split()[:1] == ["on"]:
            on.append(name)
    return on


def offload_warning(interface: str) -> str | None:
    """With IP-in-IP, GSO super-packets cannot be forwarded (dropped, `drops_gso_tunnel`):
    a warning if the interface coalesces received frames; None if not (or unknown)."""
    try:
        proc = subprocess.run(
            ["ethtool", "-k", interface], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    on = coalescing_offloads(proc.stdout) if proc.returncode == 0 else []
    if not on:
        return None
    return (
        f"pykp lb: {interface} has {', '.join(on)} on: IP-in-IP cannot forward the "
        f"super-packets they make (dropped, drops_gso_tunnel); turn them off "
        f"(ethtool -K {interface} gro off lro off)"
    )


def nonzero(stats: dict[str, int]) -> str:
    """The counters that moved, in a stable order: one log line."""
    return " ".join(f"{k}={v}" for k, v in sorted(stats.items()) if v) or "no frames yet"


def run_load_balancer(
    services: Catalog,
    *,
    interface: str,
    address: str,
    neighbours: Sequence[tuple[str, str]],
    gateway_mac: str | None,
    workers: int,
    maglev_seed: int,
    stop: threading.Event,
    forwarding: str = "ipip",
    report: Callable[[str], None],
    stats_every: float = 10.0,
) -> dict[str, int]:
    """Run until `stop` is set, reporting the counters every `stats_every` seconds; returns
    the last counters. Raises OSError from the sockets, ValueError from the arguments."""
    from pykp._fastpath import AfpacketDatapath, Engine

    engine = Engine(default_policy=LB_DEFAULT_POLICY, maglev_seed=maglev_seed)
    engine_services = services_file_to_engine(services)
    apply_to_engine(engine, engine_services)
    vips = sorted({ip for service in engine_services for ip, _, _ in service.frontends})
    datapath = AfpacketDatapath(
        engine,
        interface,
        address,
        vips,
        neighbours=dict(neighbours),
        gateway_mac=gateway_mac,
        workers=workers,
        forwarding=forwarding,
    )
    if forwarding == "ipip" and (warning := offload_warning(interface)):
        report(warning)
    datapath.start()
    policies = Counter(service.policy for service in engine_services)
    report(
        f"pykp lb: {interface}, {len(engine_services)} service ports "
        f"({', '.join(f'{n} {policy}' for policy, n in sorted(policies.items()))}), "
        f"VIPs {', '.join(vips)}"
    )
    if set(policies) - {"maglev"}:
        report(
            "pykp lb: only maglev gives a flow the same backend on every load-balancer "
            "node; with the others a flow keeps its backend only while it stays on this one"
        )
    try:
        while not stop.wait(stats_every):
            report(nonzero(datapath.stats()))
    finally:
        stats = datapath.stats()
        datapath.stop()
    return stats
