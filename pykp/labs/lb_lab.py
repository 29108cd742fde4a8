"""A load-balancer tier in network namespaces, for the AF_PACKET datapath (issue 12): an
external client, a router that spreads flows over the load-balancer nodes (Linux
multipath routes, hashed on the L4 5-tuple), and backends that answer the client
directly (direct server return).

Topology (every name prefixed with ``pykp-lab-<id>-``)::

    client  (eth0 10.10.0.2/24; default via the router)
       |
    router  (c0 10.10.0.1/24; br0 10.20.0.1/24, a bridge: the load-balancer segment;
       |     forwarding on; VIP/32 via every load-balancer node, one multipath route,
       |     a custom fib_multipath_hash_policy on the 5-tuple)
       +-- lb-K      (eth0 10.20.0.(10+K)/24; forwarding OFF; the VIP is on no interface)
       +-- backend-J (eth0 10.20.0.(100+J)/24; the VIP on lo, arp_ignore 1 and
                      arp_announce 2 so it never answers ARP for it; default via router)

Why L2 direct server return and not IP-in-IP: this kernel (and CI's) has no IP-in-IP,
GRE, FOU or ip6 tunnel support, so a backend here cannot decapsulate; on one L2 segment a
load balancer only rewrites the destination MAC (IPVS "direct routing"), the backend
accepts the packet for the VIP on its loopback and replies to the client through the
router, past the load balancers. A load-balancer node receives the VIP's packets (the
router resolves the node's address by ARP) but does not forward them: with forwarding off
and the VIP not local, its kernel drops them after an AF_PACKET socket has seen them.

`kernel_l2_dsr` programs a reference datapath in the kernel of a load-balancer node:
nftables in the netdev ingress hook rewrites the destination MAC to a backend's chosen by
`jhash` of the 5-tuple and forwards the frame (`fwd`): what pykp's AF_PACKET datapath
does in user space, for tests and as a baseline. Namespaces only: the root namespace is
never touched.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Final

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from pykp.labs.lab import (
    DEFAULT_PREFIX,
    Host,
    LabError,
    NsRef,
    _link_up,
    _Namespaces,
    _new_key,
    _write_sysctls,
)

__all__ = ["LoadBalancerLab"]

VIP4: Final = "10.96.100.1"  # the service address the load balancers announce
_CLIENT_NET: Final = ipaddress.IPv4Network("10.10.0.0/24")
_LB_NET: Final = ipaddress.IPv4Network("10.20.0.0/24")
_LB_OFFSET: Final = 10
_BACKEND_OFFSET: Final = 100
_BRIDGE: Final = "br0"
# One seed on every load-balancer node: they agree on every flow's backend, as Maglev
# nodes do, so a flow that moves to the other node keeps its backend.
_JHASH_SEED: Final = 0x5EED


@dataclass
class LoadBalancerLab(_Namespaces):
    """See the module docs. Built on construction; `close()` (or the ``with`` block)
    removes everything."""

    lb_nodes: int = 2
    backends: int = 3
    prefix: str = DEFAULT_PREFIX
    clean_stale: bool = True

    id: str = field(init=False, default="")
    key: str = field(init=False, default="")
    client: Host = field(init=False)
    router: Host = field(init=False)
    lb_hosts: list[Host] = field(init=False, default_factory=list)
    backend_hosts: list[Host] = field(init=False, default_factory=list)
    vip: str = field(init=False, default=VIP4)

    def __post_init__(self) -> None:
        self._init_state()
        self._create()

    @property
    def hosts(self) -> list[Host]:
        return [self.client, self.router, *self.lb_hosts, *self.backend_hosts]

    def _server_pods(self) -> list[Host]:
        return self.backend_hosts

    def mac(self, ref: NsRef, ifname: str = "eth0") -> str:
        """The MAC address of `ifname` in a host's namespace."""
        with IPRoute(netns=self.ns(ref), flags=0) as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            address: str = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
            return address

    def kernel_l2_dsr(self, lb: NsRef, backends: list[NsRef], port: int) -> None:
        """Program `lb` to forward the VIP's TCP and UDP `port` to `backends` by L2 DSR in
        its kernel (nftables netdev ingress): the reference datapath."""
        if not backends:
            raise LabError("kernel_l2_dsr needs at least one backend")
        macs = [self.mac(b) for b in backends]
        own = self.mac(lb)
        slots = ", ".join(f"{i} : {mac}" for i, mac in enumerate(macs))
        script = f"""
table netdev pykp_lab_dsr {{
    chain ingress {{
        type filter hook ingress device eth0 priority 0; policy accept;
        ip daddr {self.vip} meta l4proto {{ tcp, udp }} th dport {port} \\
            ether saddr set {own} \\
            ether daddr set jhash ip saddr . th sport . ip daddr . th dport mod {len(macs)} seed {_JHASH_SEED:#x} map {{ {slots} }} \\
            fwd to eth0
    }}
}}
"""
        proc = self.exec(lb, ["nft", "-f", "-"], input=script)
        if proc.returncode != 0:
            raise LabError(f"nft on {self.host(lb).name}: {proc.stderr.strip()}")

    def services_yaml(
        self, port: int, backends: list[NsRef] | None = None, *, policy: str | None = None
    ) -> str:
        """A services file for `pykp lb`: the VIP at `port`, TCP and UDP, over `backends`
        (all by default), at the same port (direct server return translates no port), with
        `policy` (None: none named, `pykp lb`'s default)."""
        hosts = [self.host(b) for b in backends] if backends is not None else self.backend_hosts
        endpoints = ", ".join(f"{{ip: {h.ipv4}}}" for h in hosts)
        policy_line = f"    policy: {policy}\n" if policy else ""
        return (
            "services:\n"
            f"  - name: vip-{port}\n"
            f"    clusterIP: {self.vip}\n"
            f"{policy_line}"
            f"    ports: [{{name: tcp, port: {port}, targetPort: {port}}}, "
            f"{{name: udp, port: {port}, targetPort: {port}, protocol: UDP}}]\n"
            f"    endpoints: [{endpoints}]\n"
        )

    def pykp_lb_argv(self, lb: NsRef, services_file: str, *, workers: int = 1) -> list[str]:
        """`pykp lb` on a load-balancer node: L2 direct server return to every backend of
        the segment, one Maglev seed on every node (they agree on every flow)."""
        from pykp.self_command import pykp_command

        host = self.host(lb)
        neighbours = [f"--neighbour={b.ipv4}={self.mac(b)}" for b in self.backend_hosts]
        return pykp_command(
            "lb", services_file, "--interface", "eth0", "--address", host.ipv4,
            "--forwarding", "l2-dsr", "--maglev-seed", "7", "--workers", str(workers),
            "--stats-every", "1s", *neighbours,
        )  # fmt: skip

    def withdraw(self, lb: NsRef) -> None:
        """Take a load-balancer node out of the router's multipath route, as a routing
        protocol withdraws a dead node's announcement."""
        gone = self.host(lb)
        self.route_via([h for h in self.lb_hosts if h.name != gone.name])

    def route_via(self, lbs: list[NsRef]) -> None:
        """The router's route to the VIP: through `lbs` only (one multipath route over
        several); `route_via(lab.lb_hosts)` restores the lab's own."""
        left = [self.host(lb) for lb in lbs]
        if not left:
            raise LabError("the VIP needs at least one load-balancer node")
        with IPRoute(netns=self.router.netns, flags=0) as router:
            bridge = router.link_lookup(ifname=_BRIDGE)[0]
            if len(left) == 1:
                router.route("replace", dst=f"{self.vip}/32", gateway=left[0].ipv4, oif=bridge)
            else:
                router.route(
                    "replace",
                    dst=f"{self.vip}/32",
                    multipath=[{"gateway": h.ipv4, "oif": bridge} for h in left],
                )

    # ---------------------------------------------------------------- construction

    def _plan(self) -> None:
        if not 1 <= self.lb_nodes <= _BACKEND_OFFSET - _LB_OFFSET:
            raise ValueError("lb_nodes out of range")
        if not 1 <= self.backends <= 100:
            raise ValueError("backends must be 1..100")
        self.id, self.key = _new_key(self.prefix)

        def named(name: str, role: str, ip4: str) -> Host:
            return Host(name, f"{self.key}-{name}", role, ip4, "")

        self.client = named("client", "client", str(_CLIENT_NET[2]))
        self.router = named("router", "router", str(_LB_NET[1]))
        self.lb_hosts = [
            named(f"lb-{k}", "lb", str(_LB_NET[_LB_OFFSET + k])) for k in range(self.lb_nodes)
        ]
        self.backend_hosts = [
            named(f"backend-{j}", "backend", str(_LB_NET[_BACKEND_OFFSET + j]))
            for j in range(self.backends)
        ]

    def _build(self) -> None:
        self._write_record()
        self._create_namespaces()
        prefix = _LB_NET.prefixlen
        _write_sysctls(
            self.router.netns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                # Multipath routes hash the 5-tuple: one flow, one load-balancer node.
                # Policy 3 (custom fields: addresses, protocol, ports) and not 1: policy 1
                # takes a packet's ready-made L4 hash, and a veth keeps the sending
                # socket's random one (rehashed on retransmits), as no real router would.
                "net.ipv4.fib_multipath_hash_policy": "3",
                "net.ipv4.fib_multipath_hash_fields": "0x0037",
            },
        )
        with IPRoute(netns=self.router.netns, flags=0) as router:
            _link_up(router, "lo")
            router.link("add", ifname=_BRIDGE, kind="bridge")
            bridge = _link_up(router, _BRIDGE)
            router.addr("add", index=bridge, address=self.router.ipv4, prefixlen=prefix)
            router.link(
                "add",
                ifname="c0",
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": self.client.netns},
            )
            c0 = _link_up(router, "c0")
            router.addr(
                "add", index=c0, address=str(_CLIENT_NET[1]), prefixlen=_CLIENT_NET.prefixlen
            )
            for host in (*self.lb_hosts, *self.backend_hosts):
                port = f"p-{host.name}"[:15]
                router.link(
                    "add",
                    ifname=port,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": host.netns},
                )
                index = router.link_lookup(ifname=port)[0]
                router.link("set", index=index, master=bridge)
                router.link("set", index=index, state="up")
            router.route(
                "add",
                dst=f"{self.vip}/32",
                multipath=[{"gateway": lb.ipv4, "oif": bridge} for lb in self.lb_hosts],
            )

        with IPRoute(netns=self.client.netns, flags=0) as client:
            _link_up(client, "lo")
            index = _link_up(client, "eth0")
            client.addr(
                "add", index=index, address=self.client.ipv4, prefixlen=_CLIENT_NET.prefixlen
            )
            client.route("add", dst="default", gateway=str(_CLIENT_NET[1]), oif=index)

        for lb in self.lb_hosts:
            _write_sysctls(lb.netns, {"net.ipv4.ip_forward": "0"})
            self._wire_segment_host(lb)
        for backend in self.backend_hosts:
            _write_sysctls(
                backend.netns,
                {
                    "net.ipv4.conf.all.arp_ignore": "1",
                    "net.ipv4.conf.all.arp_announce": "2",
                    "net.ipv4.conf.all.rp_filter": "0",
                    "net.ipv4.conf.default.rp_filter": "0",
                },
            )
            self._wire_segment_host(backend)
            with IPRoute(netns=backend.netns, flags=0) as ipr:
                ipr.addr(
                    "add", index=ipr.link_lookup(ifname="lo")[0], address=self.vip, prefixlen=32
                )

    def _wire_segment_host(self, host: Host) -> None:
        with IPRoute(netns=host.netns, flags=0) as ipr:
            _link_up(ipr, "lo")
            index = _link_up(ipr, "eth0")
            ipr.addr("add", index=index, address=host.ipv4, prefixlen=_LB_NET.prefixlen)
            ipr.route("add", dst="default", gateway=self.router.ipv4, oif=index)


def connect_from(lab: LoadBalancerLab, source_port: int, port: int, timeout: float = 3.0) -> str:
    """One HTTP GET from the client to the VIP from `source_port`: the answering backend."""
    with lab.in_namespace(lab.client):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((lab.client.ipv4, source_port))
        s.connect((lab.vip, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {lab.vip}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode().strip()
