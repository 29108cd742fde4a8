"""A one-node "cluster" built from network namespaces, for tests, `pykp bench` and `pykp demo`.

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
    from typing_extensions import Self

__all__ = [
    "DEFAULT_PREFIX",
    "NETNS_DIR",
    "RECORD_DIR",
    "SERVICE_CIDR4",
    "SERVICE_CIDR6",
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


@dataclass(eq=False)
class Lab:
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
        self._namespaces: list[str] = []
        self._procs: list[_Proc] = []
        self._closed = False
        self._owner_pid = os.getpid()
        self._record: Path | None = None
        if self.clean_stale:
            cleanup_stale(self.prefix)
        self._plan()
        atexit.register(self.close)
        try:
            _outside_event_loop(self._build)
        except BaseException:
            self.close()
            raise

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
        """An HTTP server per pod (backends by default) answering GET with the pod name."""
        return self._start_servers("http", port, pods, timeout)

    def start_udp_echo(
        self, port: int = 5353, pods: Iterable[NsRef] | None = None, timeout: float = 10.0
    ) -> list[subprocess.Popen[Any]]:
        """A UDP server per pod (backends by default) answering any datagram with the pod name."""
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

    # ---------------------------------------------------------------- construction

    def _plan(self) -> None:
        if self.backends < 0 or self.clients < 0:
            raise ValueError("backends and clients must be >= 0")
        while True:
            self.id = secrets.token_hex(3)
            self.key = f"{self.prefix}{self.id}"
            taken = (RECORD_DIR / f"{self.key}.json").exists()
            if not taken and not any(n.startswith(self.key + "-") for n in _listnetns()):
                break
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

    def _build(self) -> None:
        self._write_record()  # before any namespace, so no live lab looks orphaned
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
                assert pod.host_ifname is not None
                node.link(
                    "add",
                    ifname=pod.host_ifname,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": pod.netns},
                )
                idx = _link_up(node, pod.host_ifname)
                node.addr("add", index=idx, address=self.gateway4, prefixlen=32)
                node.addr("add", index=idx, address=self.gateway6, prefixlen=64, flags=_IFA_F_NODAD)
                node.route("add", dst=f"{pod.ipv4}/32", oif=idx, scope=253, prefsrc=self.gateway4)
                node.route("add", dst=f"{pod.ipv6}/128", oif=idx, family=socket.AF_INET6)

        with IPRoute(netns=self.external.netns, flags=0) as ext:
            _link_up(ext, "lo")
            idx = _link_up(ext, "eth0")
            ext.addr("add", index=idx, address=self.external.ipv4, prefixlen=p4)
            ext.addr("add", index=idx, address=self.external.ipv6, prefixlen=p6, flags=_IFA_F_NODAD)
            ext.route("add", dst="default", gateway=self.node.ipv4, oif=idx)
            ext.route("add", dst="default", gateway=self.node.ipv6, oif=idx, family=socket.AF_INET6)

        for pod in self.pods:
            with IPRoute(netns=pod.netns, flags=0) as ipr:
                _link_up(ipr, "lo")
                idx = _link_up(ipr, "eth0")
                ipr.addr("add", index=idx, address=pod.ipv4, prefixlen=32)
                ipr.addr("add", index=idx, address=pod.ipv6, prefixlen=128, flags=_IFA_F_NODAD)
                ipr.route("add", dst=f"{self.gateway4}/32", oif=idx, scope=253)
                ipr.route("add", dst="default", gateway=self.gateway4, oif=idx)
                ipr.route(
                    "add", dst="default", gateway=self.gateway6, oif=idx, family=socket.AF_INET6
                )

    # ---------------------------------------------------------------- internals

    def _start_servers(
        self, mode: str, port: int, pods: Iterable[NsRef] | None, timeout: float
    ) -> list[subprocess.Popen[Any]]:
        hosts = self.backend_pods if pods is None else [self.host(p) for p in pods]
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


def _listnetns() -> list[str]:
    try:
        return os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []


def _link_up(ipr: Any, ifname: str) -> int:
    idx: int = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    return idx
