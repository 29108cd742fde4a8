"""A one-node "cluster" built from network namespaces, for tests, `pykp bench` and `pykp demo`;
and `ClusterLab`, several such nodes on a shared cluster network (see its docstring).

Topology (defaults; every name below is prefixed with ``pykp-lab-<id>-``)::

    external (eth0 192.168.77.2/24, fd00:77::2/64; default via the node)
        |
    node     (eth0 192.168.77.1/24, fd00:77::1/64 = the node IP; default via external;
        |     ip_forward and IPv6 forwarding on; one veth per pod, named v-<pod>,
        |     each carrying the pod gateway 10.244.0.1/32 and fe80::1/64,
        |     with a /32 and a /128 route to its pod)
    backend-N (eth0 10.244.0.(10+N)/32, fd00:10:244::(10+N)/128)
    client-N  (eth0 10.244.0.(100+N)/32, fd00:10:244::(100+N)/128)
        (the IPv6 host part repeats the IPv4 one's decimal digits: .101 and ::101;
         past 90 backends the clients follow right after the backends)
        each pod: default via 10.244.0.1 and via fe80::1 on eth0

Why routed /32 pods instead of a bridge: every pod-to-pod packet (and so every
service packet, including the replies) crosses the node's IP layer, where
netfilter and the fast path see it, without relying on br_netfilter and hairpin
mode. The node's default route points at the external host (which does not
forward), like a real node's default gateway, so that node-local connections to
ClusterIPs have a route before the proxy's OUTPUT rules rewrite them.

The root namespace is never touched: veth pairs are created inside the node
namespace with their peer placed directly in the pod namespace.

Leftovers of crashed runs are found through a record per lab under
``/run/pykp-lab/`` holding the owner's PID and start time; `cleanup_stale`
removes the namespaces (and kills the processes inside) of labs whose owner is
gone. A new `Lab` runs it first.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2 import netns as _pr_netns

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "DEFAULT_PREFIX",
    "NETNS_DIR",
    "RECORD_DIR",
    "SERVICE_CIDR4",
    "SERVICE_CIDR6",
    "ClusterLab",
    "Host",
    "Lab",
    "LabError",
    "cleanup_stale",
    "in_namespace",
    "netns_pids",
]

DEFAULT_PREFIX = "pykp-lab-"
NETNS_DIR = Path("/run/netns")
RECORD_DIR = Path("/run/pykp-lab")

# Service ranges the lab leaves unrouted on purpose (only the proxy makes them
# reachable); offered so tests and demos agree on them.
SERVICE_CIDR4 = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:10:96::/112"

_IFA_F_NODAD = 0x02  # IPv6 DAD would hold addresses "tentative" for ~1 s.
_BACKEND_OFFSET = 10
_CLIENT_OFFSET = 100


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class Host:
    """One namespace of the lab: a pod, the node or the external host."""

    name: str  # short name: "node", "external", "backend-0", "client-1"
    netns: str  # full namespace name, usable with `ip netns exec`
    role: str  # "node" | "external" | "backend" | "client"
    ipv4: str
    ipv6: str
    ifname: str = "eth0"  # the interface inside this namespace
    host_ifname: str | None = None  # for pods: the node end of the veth


NsRef = Host | str


# --------------------------------------------------------------------------- namespaces


@contextlib.contextmanager
def in_namespace(netns: str) -> Iterator[None]:
    """Move the calling thread into `netns` for the block, then back.

    Sockets created inside stay in that namespace after the block. Per thread
    only: other threads of the process are not moved.
    """
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _pr_netns.setns(netns, flags=0)
        try:
            yield
        finally:
            _pr_netns.setns(saved, flags=0)
    finally:
        os.close(saved)


def _write_sysctls(netns: str, values: Mapping[str, str]) -> None:
    # /proc/sys/net is resolved against the reading thread's namespace.
    with in_namespace(netns):
        for key, value in values.items():
            Path("/proc/sys", key.replace(".", "/")).write_text(value)


def netns_pids(netns: str) -> list[int]:
    """PIDs of processes whose network namespace is `netns` (our own excluded)."""
    try:
        st = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return []
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (ns.st_ino, ns.st_dev) == (st.st_ino, st.st_dev):
            pids.append(int(entry.name))
    return pids


def _kill_and_remove(names: Iterable[str]) -> list[str]:
    """Kill every process inside the namespaces, then delete them (and so their veths)."""
    names = [n for n in names if (NETNS_DIR / n).exists()]
    victims: list[int] = []
    for name in names:
        victims += netns_pids(name)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    removed = []
    for name in names:
        try:
            _pr_netns.remove(name)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(record: Path) -> bool:
    try:
        data = json.loads(record.read_text())
        return _proc_starttime(int(data["pid"])) == int(data["starttime"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces starting with `prefix` whose lab owner is dead.

    A namespace belongs to the lab whose record key (``<prefix><id>``) starts
    its name; one with no record at all is an orphan and goes too (a lab writes
    its record before creating any namespace). Returns the removed names.
    """
    records = {p.stem: p for p in RECORD_DIR.glob(f"{prefix}*.json")} if RECORD_DIR.is_dir() else {}
    live = {key for key, path in records.items() if _owner_alive(path)}
    try:
        present = [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix)]
    except FileNotFoundError:
        present = []
    stale = [n for n in present if not any(n.startswith(key + "-") for key in live)]
    removed = _kill_and_remove(stale)
    for key, path in records.items():
        if key not in live:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return removed


# --------------------------------------------------------------------------- servers

# One small script for both servers so the lab needs nothing beyond Python.
# Binding "::" with V6ONLY off serves IPv4 and IPv6 from one socket.
# GET /clientip (or the UDP payload "clientip") returns the peer address
# instead of the pod name, for source-NAT checks.
_SERVER = r"""
import socket, socketserver, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
mode, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def peer(addr):
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host
if mode == "http":
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = (peer(self.client_address) if self.path == "/clientip" else name).encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    class S(ThreadingHTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        request_queue_size = 1024
        def server_bind(self):
            # HTTPServer.server_bind would do a reverse DNS lookup of "::".
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = name, port
    srv = S(("::", port), H)
    print("ready", flush=True)
    srv.serve_forever()
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto((peer(addr) if data.strip() == b"clientip" else name).encode(), addr)
"""


# --------------------------------------------------------------------------- the lab


@dataclass
class _Proc:
    popen: subprocess.Popen[Any]
    netns: str


class _Namespaces:
    """What every lab shares: host lookup, processes in namespaces, servers, teardown.

    A subclass plans its `hosts` and `key`, calls `_init_state()` and builds.
    """

    key: str
    prefix: str
    clean_stale: bool
    _namespaces: list[str]
    _procs: list[_Proc]
    _closed: bool
    _owner_pid: int
    _record: Path | None

    @property
    def hosts(self) -> list[Host]:
        raise NotImplementedError

    def _server_pods(self) -> list[Host]:
        """The pods `start_http_servers` and `start_udp_echo` use by default."""
        raise NotImplementedError

    def _create(self) -> None:
        """Remove stale labs, plan, then build; a failure half-way tears down what was built."""
        if self.clean_stale:
            cleanup_stale(self.prefix)
        self._plan()
        atexit.register(self.close)
        try:
            _outside_event_loop(self._build)
        except BaseException:
            self.close()
            raise

    def _plan(self) -> None:
        raise NotImplementedError

    def _build(self) -> None:
        raise NotImplementedError

    def _init_state(self) -> None:
        self._namespaces = []
        self._procs = []
        self._closed = False
        self._owner_pid = os.getpid()
        self._record = None

    def host(self, ref: NsRef) -> Host:
        """Resolve a Host, a short name ("backend-0") or a full namespace name."""
        if isinstance(ref, Host):
            return ref
        for h in self.hosts:
            if ref in (h.name, h.netns):
                return h
        raise KeyError(f"no host {ref!r} in lab {self.key}")

    def ns(self, ref: NsRef) -> str:
        return self.host(ref).netns

    def exec(
        self,
        ref: NsRef,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside a namespace and wait; output captured as text."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(ref), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
            env=None if env is None else dict(env),
        )

    def popen(self, ref: NsRef, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in the background inside a namespace; killed at teardown.

        stdin and stdout/stderr default to /dev/null; pass ``stdout=PIPE`` etc. to read them.
        """
        netns = self.ns(ref)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)  # own process group: killpg at teardown
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], **kwargs
        )
        self._procs.append(_Proc(proc, netns))
        return proc

    def start_http_servers(
        self, port: int = 8080, pods: Iterable[NsRef] | None = None, timeout: float = 10.0
    ) -> list[subprocess.Popen[Any]]:
        """An HTTP server per pod answering GET with the pod name.

        By default on a `Lab`'s backends, on every pod of a `ClusterLab`.
        """
        return self._start_servers("http", port, pods, timeout)

    def start_udp_echo(
        self, port: int = 5353, pods: Iterable[NsRef] | None = None, timeout: float = 10.0
    ) -> list[subprocess.Popen[Any]]:
        """A UDP server per pod answering any datagram with the pod name (default pods as above)."""
        return self._start_servers("udp", port, pods, timeout)

    def in_namespace(self, ref: NsRef) -> contextlib.AbstractContextManager[None]:
        """Run the block's in-process socket calls inside a lab namespace (calling thread only)."""
        return in_namespace(self.ns(ref))

    def close(self) -> None:
        """Kill tracked processes and delete every namespace. Safe to call repeatedly."""
        if os.getpid() != self._owner_pid:
            return  # a forked child exiting must not tear down its parent's lab
        self._stop_procs()
        _kill_and_remove(self._namespaces)
        # Anything named after this lab that we lost track of (a failed half-setup).
        with contextlib.suppress(FileNotFoundError):
            _kill_and_remove(
                n for n in os.listdir(NETNS_DIR) if self.key and n.startswith(self.key + "-")
            )
        if self._record is not None:
            with contextlib.suppress(FileNotFoundError):
                self._record.unlink()
        self._closed = True
        atexit.unregister(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write_record(self) -> None:
        RECORD_DIR.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        data = {
            "pid": pid,
            "starttime": _proc_starttime(pid),
            "argv": sys.argv,
            "namespaces": [h.netns for h in self.hosts],
        }
        path = RECORD_DIR / f"{self.key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(path)
        self._record = path

    def _create_namespaces(self) -> None:
        for h in self.hosts:
            _pr_netns.create(h.netns)
            self._namespaces.append(h.netns)
            sysctls = {
                # before any interface exists, so every address skips DAD
                "net.ipv6.conf.all.accept_dad": "0",
                "net.ipv6.conf.default.accept_dad": "0",
            }
            if h.role == "node":
                sysctls.update(
                    {
                        "net.ipv4.ip_forward": "1",
                        "net.ipv6.conf.all.forwarding": "1",
                        "net.ipv4.conf.all.rp_filter": "0",
                        "net.ipv4.conf.default.rp_filter": "0",
                    }
                )
            _write_sysctls(h.netns, sysctls)

    # ---------------------------------------------------------------- internals

    def _start_servers(
        self, mode: str, port: int, pods: Iterable[NsRef] | None, timeout: float
    ) -> list[subprocess.Popen[Any]]:
        hosts = self._server_pods() if pods is None else [self.host(p) for p in pods]
        procs = [
            self.popen(
                h, [sys.executable, "-c", _SERVER, mode, h.name, str(port)], stdout=subprocess.PIPE
            )
            for h in hosts
        ]
        deadline = time.monotonic() + timeout
        for h, proc in zip(hosts, procs):
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise LabError(f"{mode} server in {h.name} did not start (exit {proc.poll()})")
                if select.select([proc.stdout], [], [], min(left, 0.1))[0]:
                    chunk = os.read(proc.stdout.fileno(), 64)
                    if not chunk:
                        raise LabError(f"{mode} server in {h.name} exited (exit {proc.wait(1)})")
                    line += chunk
            proc.stdout.close()  # it prints nothing more
        return procs

    def _stop_procs(self) -> None:
        live = [p for p in self._procs if p.popen.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for p in live:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(1.0)
        for p in self._procs:
            for stream in (p.popen.stdin, p.popen.stdout, p.popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()


@dataclass(eq=False)
class Lab(_Namespaces):
    """A node, its pods and an external host, each in its own network namespace.

    Built on construction; torn down by `close()`, by leaving a ``with`` block,
    at interpreter exit, or by a later `cleanup_stale()` if the process died.
    """

    backends: int = 3
    clients: int = 2
    pod_cidr4: str = "10.244.0.0/24"
    pod_cidr6: str = "fd00:10:244::/64"
    node_net4: str = "192.168.77.0/24"
    node_net6: str = "fd00:77::/64"
    prefix: str = DEFAULT_PREFIX
    clean_stale: bool = True

    id: str = field(init=False, default="")
    key: str = field(init=False, default="")  # "<prefix><id>"; namespaces are "<key>-<name>"
    node: Host = field(init=False)
    external: Host = field(init=False)
    backend_pods: list[Host] = field(init=False, default_factory=list)
    client_pods: list[Host] = field(init=False, default_factory=list)
    gateway4: str = field(init=False, default="")
    gateway6: str = field(init=False, default="fe80::1")

    def __post_init__(self) -> None:
        self._init_state()
        self._create()

    # ---------------------------------------------------------------- public API

    @property
    def pods(self) -> list[Host]:
        return self.backend_pods + self.client_pods

    @property
    def hosts(self) -> list[Host]:
        return [self.node, self.external, *self.pods]

    @property
    def node_ip4(self) -> str:
        return self.node.ipv4

    @property
    def node_ip6(self) -> str:
        return self.node.ipv6

    def _server_pods(self) -> list[Host]:
        return self.backend_pods

    # ---------------------------------------------------------------- construction

    def _plan(self) -> None:
        if self.backends < 0 or self.clients < 0:
            raise ValueError("backends and clients must be >= 0")
        self.id, self.key = _new_key(self.prefix)
        net4, net6 = ipaddress.ip_network(self.pod_cidr4), ipaddress.ip_network(self.pod_cidr6)
        nn4, nn6 = ipaddress.ip_network(self.node_net4), ipaddress.ip_network(self.node_net6)
        # Clients start at .100 while that leaves room for the backends; bigger labs
        # stack clients right after the backends.
        client_base = (
            _CLIENT_OFFSET
            if self.backends <= _CLIENT_OFFSET - _BACKEND_OFFSET
            else (_BACKEND_OFFSET + self.backends)
        )
        last = client_base + self.clients - 1
        if last >= net4.num_addresses - 1 or int(str(last), 16) >= net6.num_addresses - 1:
            raise ValueError(f"{self.backends}+{self.clients} pods do not fit in {self.pod_cidr4}")
        self.gateway4 = str(net4[1])

        def pod(role: str, i: int, offset: int) -> Host:
            name = f"{role}-{i}"
            return Host(
                name=name,
                netns=f"{self.key}-{name}",
                role=role,
                ipv4=str(net4[offset]),
                ipv6=str(net6[int(str(offset), 16)]),  # ::100 for .100: easier to read
                host_ifname=f"v-{name}"[:15],
            )

        self.backend_pods = [pod("backend", i, _BACKEND_OFFSET + i) for i in range(self.backends)]
        self.client_pods = [pod("client", i, client_base + i) for i in range(self.clients)]
        self.node = Host("node", f"{self.key}-node", "node", str(nn4[1]), str(nn6[1]))
        self.external = Host(
            "external", f"{self.key}-external", "external", str(nn4[2]), str(nn6[2])
        )

    def _build(self) -> None:
        self._write_record()  # before any namespace, so no live lab looks orphaned
        self._create_namespaces()

        p4 = ipaddress.ip_network(self.node_net4).prefixlen
        p6 = ipaddress.ip_network(self.node_net6).prefixlen
        with IPRoute(netns=self.node.netns, flags=0) as node:
            _link_up(node, "lo")
            # The node's own NIC, facing the external host.
            node.link(
                "add",
                ifname="eth0",
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": self.external.netns},
            )
            idx = _link_up(node, "eth0")
            node.addr("add", index=idx, address=self.node.ipv4, prefixlen=p4)
            node.addr("add", index=idx, address=self.node.ipv6, prefixlen=p6, flags=_IFA_F_NODAD)
            node.route("add", dst="default", gateway=self.external.ipv4, oif=idx)
            node.route(
                "add", dst="default", gateway=self.external.ipv6, oif=idx, family=socket.AF_INET6
            )
            for pod in self.pods:
                _wire_pod(node, pod, self.gateway4, self.gateway6)

        with IPRoute(netns=self.external.netns, flags=0) as ext:
            _link_up(ext, "lo")
            idx = _link_up(ext, "eth0")
            ext.addr("add", index=idx, address=self.external.ipv4, prefixlen=p4)
            ext.addr("add", index=idx, address=self.external.ipv6, prefixlen=p6, flags=_IFA_F_NODAD)
            ext.route("add", dst="default", gateway=self.node.ipv4, oif=idx)
            ext.route("add", dst="default", gateway=self.node.ipv6, oif=idx, family=socket.AF_INET6)

        for pod in self.pods:
            _configure_pod(pod, self.gateway4, self.gateway6)


# --------------------------------------------------------------------------- the cluster lab

_NODE_OFFSET = 10  # node-<n> is .(10+n) on the cluster network
_EXTERNAL_OFFSET = 100
_API_OFFSET = 1  # the bridge's own address, where the stand-in API server listens
_MAX_NODES = _EXTERNAL_OFFSET - _NODE_OFFSET
_BRIDGE = "br0"


def _decimal_hex(n: int) -> int:
    """n's decimal digits read as hex: ::110 for .110, fd00:10:244:12:: for node 12."""
    return int(str(n), 16)


@dataclass(eq=False)
class ClusterLab(_Namespaces):
    """Several nodes with routed pods on a shared cluster network, like a host-gw CNI.

    Topology (defaults; namespaces are ``<prefix><id>-<name>``)::

        net       bridge br0 192.168.78.1/24, fd00:78::1/64 (the API server's address);
           |      one port per node (n<k>) and one for the external host (ext)
        node-<k>  eth0 192.168.78.(10+k)/24, fd00:78::(10+k)/64 = the node IP;
           |      routes to every other node's pod CIDR via that node's IP;
           |      default via the external host (which does not forward), as in `Lab`;
           |      forwarding on; one veth v-pod-<k>-<i> per pod carrying the pod
           |      gateway 10.244.<k>.1/32 and fe80::1/64
        pod-<k>-<i>  eth0 10.244.<k>.(10+i)/32, fd00:10:244:<k>::(10+i)/128;
                     default via the gateway
        external  eth0 192.168.78.100/24, fd00:78::100/64; routes to each pod CIDR
                  via its node; `route_services_via` points the service CIDRs at nodes

    (IPv6 host parts and the node part of the pod CIDRs repeat the decimal digits.)
    Pod traffic between nodes is routed, never NATed, so a service connection DNATed
    on one node to a pod on another comes back through the first node's conntrack.

    Each node may run its own proxy; the API server belongs in `net` (create its
    listening socket under ``lab.in_namespace("net")``; a socket keeps its namespace).
    Built on construction; `close()` (or the ``with`` block, or exit, or a later
    `cleanup_stale`) kills the processes and deletes the namespaces.
    """

    nodes: int = 3
    pods_per_node: int = 2
    cluster_cidr4: str = "10.244.0.0/16"  # node k gets the k-th /24
    cluster_cidr6: str = "fd00:10:244::/48"  # node k gets the /64 numbered like k's digits
    node_net4: str = "192.168.78.0/24"
    node_net6: str = "fd00:78::/64"
    prefix: str = DEFAULT_PREFIX
    clean_stale: bool = True

    id: str = field(init=False, default="")
    key: str = field(init=False, default="")
    node_hosts: list[Host] = field(init=False, default_factory=list)
    pods_by_node: list[list[Host]] = field(init=False, default_factory=list)
    pod_cidrs4: list[str] = field(init=False, default_factory=list)
    pod_cidrs6: list[str] = field(init=False, default_factory=list)
    gateways4: list[str] = field(init=False, default_factory=list)
    gateway6: str = field(init=False, default="fe80::1")
    net: Host = field(init=False)
    external: Host = field(init=False)

    def __post_init__(self) -> None:
        self._init_state()
        self._pod_node: dict[str, Host] = {}
        self._create()

    # ---------------------------------------------------------------- public API

    @property
    def pods(self) -> list[Host]:
        return [pod for pods in self.pods_by_node for pod in pods]

    @property
    def hosts(self) -> list[Host]:
        return [self.net, *self.node_hosts, self.external, *self.pods]

    @property
    def cluster_cidrs(self) -> tuple[str, str]:
        """For `pykp run --cluster-cidr` (joined by a comma)."""
        return self.cluster_cidr4, self.cluster_cidr6

    @property
    def api_ip4(self) -> str:
        """The address on the cluster network reserved for the API server (in `net`)."""
        return self.net.ipv4

    @property
    def api_ip6(self) -> str:
        return self.net.ipv6

    def node(self, ref: int | NsRef) -> Host:
        """A node by index, Host, short name ("node-1") or namespace."""
        return self.node_hosts[ref] if isinstance(ref, int) else self._node_host(ref)

    def node_name(self, ref: int | NsRef) -> str:
        """The node's Kubernetes name (its short name: "node-1")."""
        return self.node(ref).name

    def pods_of(self, ref: int | NsRef) -> list[Host]:
        return self.pods_by_node[self.node_hosts.index(self.node(ref))]

    def node_of(self, pod: NsRef) -> Host:
        """The node a pod runs on."""
        return self._pod_node[self.host(pod).name]

    def route_services_via(
        self, *nodes: int | NsRef, cidrs: Sequence[str] = (SERVICE_CIDR4, SERVICE_CIDR6)
    ) -> None:
        """Route the service CIDRs from the external host via `nodes` (several: ECMP).

        Like a router in front of the cluster announcing ClusterIPs to every node; with
        no node the routes go away.
        """
        hosts = [self.node(n) for n in nodes]

        def apply() -> None:
            with IPRoute(netns=self.external.netns, flags=0) as ext:
                idx = ext.link_lookup(ifname="eth0")[0]
                for cidr in cidrs:
                    family = socket.AF_INET6 if ":" in cidr else socket.AF_INET
                    gateways = [h.ipv6 if family == socket.AF_INET6 else h.ipv4 for h in hosts]
                    with contextlib.suppress(Exception):  # absent: nothing to delete
                        ext.route("del", dst=cidr, family=family)
                    if len(gateways) == 1:
                        ext.route("add", dst=cidr, gateway=gateways[0], oif=idx, family=family)
                    elif gateways:
                        ext.route(
                            "add",
                            dst=cidr,
                            family=family,
                            multipath=[{"gateway": g, "oif": idx} for g in gateways],
                        )

        _outside_event_loop(apply)

    def node_objects(self, zones: Sequence[str] = ("zone-a", "zone-b")) -> list[dict[str, Any]]:
        """The nodes as Kubernetes Node objects (what each kubelet would register):
        addresses, hostname label and a zone label (zones assigned round-robin)."""
        objects = []
        for index, node in enumerate(self.node_hosts):
            labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}
            if zones:
                labels["topology.kubernetes.io/zone"] = zones[index % len(zones)]
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": node.name, "labels": labels},
                    "spec": {
                        "podCIDR": self.pod_cidrs4[index],
                        "podCIDRs": [self.pod_cidrs4[index], self.pod_cidrs6[index]],
                    },
                    "status": {
                        "addresses": [
                            {"type": "InternalIP", "address": node.ipv4},
                            {"type": "InternalIP", "address": node.ipv6},
                            {"type": "Hostname", "address": node.name},
                        ],
                    },
                }
            )
        return objects

    def _server_pods(self) -> list[Host]:
        return self.pods

    def _node_host(self, ref: NsRef) -> Host:
        host = self.host(ref)
        if host.role != "node":
            raise KeyError(f"{host.name} is not a node of lab {self.key}")
        return host

    # ---------------------------------------------------------------- construction

    def _plan(self) -> None:
        if not 1 <= self.nodes <= _MAX_NODES:
            raise ValueError(f"nodes must be 1..{_MAX_NODES}")
        if not 0 <= self.pods_per_node <= _EXTERNAL_OFFSET - _BACKEND_OFFSET:
            raise ValueError(f"pods_per_node must be 0..{_EXTERNAL_OFFSET - _BACKEND_OFFSET}")
        c4, c6 = (
            ipaddress.IPv4Network(self.cluster_cidr4),
            ipaddress.IPv6Network(self.cluster_cidr6),
        )
        if self.nodes > min(2 ** (24 - c4.prefixlen), 2 ** (64 - c6.prefixlen)):
            raise ValueError(
                f"{self.nodes} nodes' pod CIDRs (/24, /64) do not fit the cluster CIDRs"
            )
        nn4, nn6 = ipaddress.ip_network(self.node_net4), ipaddress.ip_network(self.node_net6)
        self.id, self.key = _new_key(self.prefix)

        def named(name: str, role: str, ip4: str, ip6: str, ifname: str | None = None) -> Host:
            return Host(name, f"{self.key}-{name}", role, ip4, ip6, host_ifname=ifname)

        self.net = named("net", "net", str(nn4[_API_OFFSET]), str(nn6[_API_OFFSET]))
        self.external = named(
            "external",
            "external",
            str(nn4[_EXTERNAL_OFFSET]),
            str(nn6[_decimal_hex(_EXTERNAL_OFFSET)]),
        )
        for k in range(self.nodes):
            offset = _NODE_OFFSET + k
            node = named(f"node-{k}", "node", str(nn4[offset]), str(nn6[_decimal_hex(offset)]))
            net4 = ipaddress.IPv4Network((int(c4.network_address) + (k << 8), 24))
            # fd00:10:244:<k>::/64, k's decimal digits again
            net6 = ipaddress.IPv6Network((int(c6.network_address) + (_decimal_hex(k) << 64), 64))
            self.node_hosts.append(node)
            self.pod_cidrs4.append(str(net4))
            self.pod_cidrs6.append(str(net6))
            self.gateways4.append(str(net4[1]))
            pods = []
            for i in range(self.pods_per_node):
                offset = _BACKEND_OFFSET + i
                name = f"pod-{k}-{i}"
                pod = named(
                    name,
                    "pod",
                    str(net4[offset]),
                    str(net6[_decimal_hex(offset)]),
                    f"v-{name}"[:15],
                )
                pods.append(pod)
                self._pod_node[name] = node
            self.pods_by_node.append(pods)

    def _build(self) -> None:
        self._write_record()  # before any namespace, so no live lab looks orphaned
        self._create_namespaces()
        p4 = ipaddress.ip_network(self.node_net4).prefixlen
        p6 = ipaddress.ip_network(self.node_net6).prefixlen

        # The cluster network: a bridge with a port per node and one for the external host.
        with IPRoute(netns=self.net.netns, flags=0) as net:
            _link_up(net, "lo")
            # No multicast snooping: IPv6 neighbour discovery must flood without MLD state.
            net.link("add", ifname=_BRIDGE, kind="bridge", br_mcast_snooping=0)
            bridge = _link_up(net, _BRIDGE)
            net.addr("add", index=bridge, address=self.net.ipv4, prefixlen=p4)
            net.addr("add", index=bridge, address=self.net.ipv6, prefixlen=p6, flags=_IFA_F_NODAD)
            ports = [(f"n{k}", node) for k, node in enumerate(self.node_hosts)]
            for port, host in [*ports, ("ext", self.external)]:
                net.link(
                    "add",
                    ifname=port,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": host.netns},
                )
                idx = net.link_lookup(ifname=port)[0]
                net.link("set", index=idx, master=bridge)
                net.link("set", index=idx, state="up")

        for k, node in enumerate(self.node_hosts):
            with IPRoute(netns=node.netns, flags=0) as ipr:
                _link_up(ipr, "lo")
                idx = _link_up(ipr, "eth0")
                ipr.addr("add", index=idx, address=node.ipv4, prefixlen=p4)
                ipr.addr("add", index=idx, address=node.ipv6, prefixlen=p6, flags=_IFA_F_NODAD)
                # host-gw: the other nodes' pods are one hop away, via their node IP.
                for m, other in enumerate(self.node_hosts):
                    if m == k:
                        continue
                    ipr.route("add", dst=self.pod_cidrs4[m], gateway=other.ipv4, oif=idx)
                    ipr.route(
                        "add",
                        dst=self.pod_cidrs6[m],
                        gateway=other.ipv6,
                        oif=idx,
                        family=socket.AF_INET6,
                    )
                # As in `Lab`: node-local connections to ClusterIPs need some route before
                # the proxy's OUTPUT rules rewrite them; the external host drops strays.
                ipr.route("add", dst="default", gateway=self.external.ipv4, oif=idx)
                ipr.route(
                    "add",
                    dst="default",
                    gateway=self.external.ipv6,
                    oif=idx,
                    family=socket.AF_INET6,
                )
                for pod in self.pods_by_node[k]:
                    _wire_pod(ipr, pod, self.gateways4[k], self.gateway6)

        with IPRoute(netns=self.external.netns, flags=0) as ext:
            _link_up(ext, "lo")
            idx = _link_up(ext, "eth0")
            ext.addr("add", index=idx, address=self.external.ipv4, prefixlen=p4)
            ext.addr("add", index=idx, address=self.external.ipv6, prefixlen=p6, flags=_IFA_F_NODAD)
            for k, node in enumerate(self.node_hosts):
                ext.route("add", dst=self.pod_cidrs4[k], gateway=node.ipv4, oif=idx)
                ext.route(
                    "add",
                    dst=self.pod_cidrs6[k],
                    gateway=node.ipv6,
                    oif=idx,
                    family=socket.AF_INET6,
                )

        for k, pods in enumerate(self.pods_by_node):
            for pod in pods:
                _configure_pod(pod, self.gateways4[k], self.gateway6)


def _outside_event_loop(fn: Callable[[], None]) -> None:
    # pyroute2's synchronous API drives an asyncio loop of its own, which cannot
    # run in a thread whose loop is already running (an async `pykp demo`).
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(fn).result()


def _new_key(prefix: str) -> tuple[str, str]:
    """A fresh lab id and key ("<prefix><id>") that no record or namespace uses yet."""
    while True:
        lab_id = secrets.token_hex(3)
        key = f"{prefix}{lab_id}"
        taken = (RECORD_DIR / f"{key}.json").exists()
        if not taken and not any(n.startswith(key + "-") for n in _listnetns()):
            return lab_id, key


def _wire_pod(node: Any, pod: Host, gateway4: str, gateway6: str) -> None:
    """The node's end of a routed pod: a veth carrying the gateway, /32 and /128 routes."""
    assert pod.host_ifname is not None
    node.link(
        "add",
        ifname=pod.host_ifname,
        kind="veth",
        peer={"ifname": "eth0", "net_ns_fd": pod.netns},
    )
    idx = _link_up(node, pod.host_ifname)
    node.addr("add", index=idx, address=gateway4, prefixlen=32)
    node.addr("add", index=idx, address=gateway6, prefixlen=64, flags=_IFA_F_NODAD)
    node.route("add", dst=f"{pod.ipv4}/32", oif=idx, scope=253, prefsrc=gateway4)
    node.route("add", dst=f"{pod.ipv6}/128", oif=idx, family=socket.AF_INET6)


def _configure_pod(pod: Host, gateway4: str, gateway6: str) -> None:
    """The pod's end: its /32 and /128 addresses, default routes via the node's gateway."""
    with IPRoute(netns=pod.netns, flags=0) as ipr:
        _link_up(ipr, "lo")
        idx = _link_up(ipr, "eth0")
        ipr.addr("add", index=idx, address=pod.ipv4, prefixlen=32)
        ipr.addr("add", index=idx, address=pod.ipv6, prefixlen=128, flags=_IFA_F_NODAD)
        ipr.route("add", dst=f"{gateway4}/32", oif=idx, scope=253)
        ipr.route("add", dst="default", gateway=gateway4, oif=idx)
        ipr.route("add", dst="default", gateway=gateway6, oif=idx, family=socket.AF_INET6)


def _listnetns() -> list[str]:
    try:
        return os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []


def _link_up(ipr: Any, ifname: str) -> int:
    idx: int = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    return idx
