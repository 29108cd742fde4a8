"""What `pykp bench` compares: one `Contender` per way of reaching a service.

Each proxying contender gets its own lab (`BenchNode`: a node namespace, four backend pods,
one client pod) of identical topology, so that a contender's rules, agent and conntrack
state never touch another's and every contender can stay programmed between its turns;
the harness interleaves the measurements round by round. The baselines:

* ``direct``: the client connects to a backend's own address (no service, no NAT).
* ``loopback``: the load generator against a server on 127.0.0.1 in the client pod: the
  ceiling of the generator on this machine (no routing, no veth).
* ``iptables``: kube-proxy's iptables mode (rules from `pykp.bench.rulegen`), loaded with
  ``iptables-restore`` (iptables-nft by default, as on Debian; ``iptables-legacy`` too).
* ``nftables``: kube-proxy's nftables mode, loaded with ``nft -f``.
* ``pykp/<policy>``: the real ``pykp run`` agent (NFQUEUE datapath) fed a services file.
* ``pykp/kube-<policy>``: the same agent fed through the Kubernetes source: a stand-in API
  server (`pykp.labs.kube_apiserver`, the real wire protocol) on the node's loopback holds the
  services as Services and EndpointSlices. Measured by the ``kube_*`` workloads (start,
  one EndpointSlice change, a new Service, RSS); kube-proxy's rule sets have no Kubernetes
  source here, so their file-based `propagation` and `program` are its baselines.

A new contender (say an AF_PACKET datapath) subclasses `Contender`: `setup` once,
`targets` for the clients, and `program_all` / `unprogram` / `change` when it proxies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykp.bench import rulegen
from pykp.bench.loadgen import iperf3, start_server
from pykp.labs.lab import Lab
from pykp.self_command import pykp_command

__all__ = [
    "BACKEND_PORT",
    "CLUSTER_CIDR",
    "SERVICE_CIDR",
    "BenchNode",
    "Contender",
    "Direct",
    "IptablesContender",
    "Loopback",
    "NftablesContender",
    "PykpContender",
    "PykpKubeContender",
    "ServiceSet",
    "make_contender",
]

CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
# Service i's endpoints listen on BACKEND_PORT + i: no two services share an endpoint
# (ip, port), as in a cluster where every service has pods of its own. With one shared
# port, a client source port reused towards another service that DNATs to the same
# backend clashes with the previous connection's conntrack entry (TIME_WAIT) and the SYN
# is dropped: a 1 s retransmit that has nothing to do with the proxy.
BACKEND_PORT = 10000
# A listener per service port in each backend (plus one for the Kubernetes workloads' new
# Service), spread over several server processes past 12,000 (`loadgen.start_server`).
MAX_SERVICES = 30000
SERVICE_PORT = 80
IPERF_PORT = 5201
LOOPBACK_PORT = 9999
SERVING = 3  # backends behind every service; backend-3 is the one endpoint changes move to
_FIRST_SERVICE_IP = int(ipaddress.ip_address("10.96.0.16"))
IPERF_SERVICE_IP = "10.96.255.250"


class ContenderError(RuntimeError):
    pass


# --- the services -----------------------------------------------------------------------------


@dataclass
class ServiceSet:
    """N ClusterIP services of 3 backends each, plus one service in front of iperf3.

    Service ``i`` is ``10.96.0.16 + i``:80 -> backends 0-2 on port 10000 + i; the iperf3 service
    (one endpoint, backend-0:5201: iperf3's data connections must reach its control
    connection's server) comes first, so the last measured service is last everywhere.
    """

    count: int
    backends: list[str]  # the node's backend pod addresses; index 3 is the spare
    changed: dict[int, tuple[tuple[str, int], ...]] = dataclasses.field(default_factory=dict)

    def port(self, index: int) -> int:
        return BACKEND_PORT + index

    def endpoints(self, index: int) -> tuple[tuple[str, int], ...]:
        default = tuple((ip, self.port(index)) for ip in self.backends[:SERVING])
        return self.changed.get(index, default)

    def ip(self, index: int) -> str:
        return str(ipaddress.ip_address(_FIRST_SERVICE_IP + index))

    def service(self, index: int) -> rulegen.Service:
        return rulegen.Service(
            "bench", f"svc-{index}", self.ip(index), SERVICE_PORT, "http", self.endpoints(index)
        )

    def iperf_service(self) -> rulegen.Service:
        return rulegen.Service(
            "bench", "iperf", IPERF_SERVICE_IP, IPERF_PORT, "iperf",
            ((self.backends[0], IPERF_PORT),),
        )  # fmt: skip

    def all(self) -> list[rulegen.Service]:
        return [self.iperf_service()] + [self.service(i) for i in range(self.count)]

    def pykp_yaml(self, policy: str) -> str:
        """The services file `pykp run` reads (same services, same endpoints)."""
        out = [f"defaults:\n  policy: {policy}\nservices:"]
        for svc in self.all():
            eps = "\n".join(f"      - {{ip: {ip}, nodeName: node}}" for ip, _ in svc.endpoints)
            target = svc.endpoints[0][1] if svc.endpoints else svc.port
            out.append(
                f"  - name: {svc.name}\n    namespace: {svc.namespace}\n"
                f"    clusterIP: {svc.cluster_ip}\n"
                f"    ports: [{{name: {svc.port_name}, port: {svc.port}, targetPort: {target}}}]\n"
                f"    endpoints:\n{eps if eps else '      []'}"
            )
        return "\n".join(out) + "\n"

    def kube_service(self, index: int) -> dict[str, Any]:
        """Service ``svc-<index>`` as the API server stores it (the same ClusterIP and port)."""
        name = f"svc-{index}"
        return {
            "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
            "spec": {
                "type": "ClusterIP",
                "selector": {"app": name},
                "clusterIP": self.ip(index),
                "clusterIPs": [self.ip(index)],
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "ports": [
                    {"name": "http", "port": SERVICE_PORT, "targetPort": self.port(index),
                     "protocol": "TCP"}
                ],
                "sessionAffinity": "None",
                "internalTrafficPolicy": "Cluster",
            },
        }  # fmt: skip

    def kube_slice(self, index: int) -> dict[str, Any]:
        """The EndpointSlice the controller would write for ``svc-<index>``'s endpoints."""
        name = f"svc-{index}"
        endpoints = [
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "node",
                "targetRef": {"kind": "Pod", "namespace": "bench", "name": f"{name}-{ip}"},
            }
            for ip, _ in self.endpoints(index)
        ]
        return {
            "metadata": {
                "name": f"{name}-ipv4",
                "namespace": "bench",
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": self.port(index), "protocol": "TCP"}],
            "endpoints": endpoints,
        }


# kube-proxy's rule sets here are static (no kube-proxy process sets its conntrack sysctls),
# so pykp leaves them alone too: every contender runs on the lab's conntrack settings, and
# a difference measured is the rules' and the agent's, not a timeout's.
_SAME_CONNTRACK = (
    "--conntrack-max-per-core", "0",
    "--conntrack-tcp-timeout-established", "0",
    "--conntrack-tcp-timeout-close-wait", "0",
)  # fmt: skip


# --- a lab node ----------------------------------------------------------------------------


class BenchNode:
    """A lab with the bench's backends: `pykp-loadgen serve` on ports 10000 to
    10000 + services - 1 in backends 0-3 (each answers with its name) and iperf3 on 5201
    in backend-0."""

    def __init__(
        self, binary: str, services: int, with_iperf: bool = True, spare_ports: int = 0
    ) -> None:
        if not 1 <= services <= MAX_SERVICES:
            raise ValueError(f"services must be 1..{MAX_SERVICES}, not {services}")
        self.lab = Lab(backends=SERVING + 1, clients=1)
        try:
            # `spare_ports`: listeners past the last service (the new Service of `kube_new`).
            ports = f"{BACKEND_PORT}-{BACKEND_PORT + services + spare_ports - 1}"
            for pod in self.lab.backend_pods:
                start_server(self.lab, pod, binary, ports, pod.name)
            if with_iperf:
                self.lab.popen(self.lab.backend_pods[0], ["iperf3", "-s", "-p", str(IPERF_PORT)])
        except BaseException:
            self.lab.close()
            raise
        self.client = self.lab.client_pods[0]
        self.backend_ips = [pod.ipv4 for pod in self.lab.backend_pods]

    def node_exec(self, argv: Sequence[str], stdin: str | None = None, timeout: float = 600) -> str:
        proc = self.lab.exec("node", argv, input=stdin, timeout=timeout)
        if proc.returncode != 0:
            raise ContenderError(
                f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
        return proc.stdout

    def flush_conntrack(self) -> None:
        """Empties the node's connection tracking table between runs (every contender alike):
        a run's TIME_WAIT entries must not fill the table during the next."""
        self.lab.exec("node", ["conntrack", "-F"], timeout=60)

    def close(self) -> None:
        self.lab.close()


# --- the interface ---------------------------------------------------------------------------


class Contender(ABC):
    """One way for the client pod to reach the services."""

    name: str = "?"
    proxies: bool = True  # programs services (program / change workloads apply)
    throughput: bool = True  # iperf3 through it

    def __init__(self) -> None:
        self.node: BenchNode | None = None

    @property
    def lab(self) -> Lab:
        assert self.node is not None
        return self.node.lab

    @abstractmethod
    def setup(self, node: BenchNode, workdir: Path) -> None:
        """Once, before any round: take the node, start what runs for the whole bench."""

    def settings(self) -> dict[str, Any]:
        """What identifies this contender's configuration (printed and saved)."""
        return {}

    @abstractmethod
    def targets(self, services: ServiceSet, indices: Sequence[int]) -> list[str]:
        """``ip:port`` the client connects to for these services."""

    def iperf_target(self, services: ServiceSet) -> tuple[str, int]:
        return IPERF_SERVICE_IP, IPERF_PORT

    def program_all(self, services: ServiceSet) -> dict[str, Any]:
        """Program every service from an empty state; returns details (command times)."""
        raise NotImplementedError

    def unprogram(self, services: ServiceSet) -> None:
        """Back to no services (the iperf3 one may stay)."""
        raise NotImplementedError

    def prepare_change(self, services: ServiceSet) -> None:
        """Before `change` is timed: make what is the proxy's input, not its work (a
        services file's text, as an operator's edit would leave it)."""

    def change(
        self, services: ServiceSet, old: rulegen.Service, new: rulegen.Service
    ) -> dict[str, Any]:
        """Apply one service's new endpoints (`services` already holds them)."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Stop what `setup` started (the node itself is closed by the harness)."""

    def disrupt(self, fault: str) -> None:
        """Do `fault` ("kill": SIGKILL, "stop": SIGSTOP) to the proxy's agent. A static rule
        set has no agent: its rules just stay, as kube-proxy's do."""

    def recover(self, fault: str) -> None:
        """Undo `disrupt`: restart the killed agent, continue the stopped one."""

    def pause(self) -> None:
        """Between its turns: stop background work (so it never loads another's turn)."""

    def resume(self) -> None:
        """Before its turn."""

    def run_iperf(self, services: ServiceSet, seconds: float, streams: int) -> dict[str, Any]:
        assert self.node is not None
        host, port = self.iperf_target(services)
        return iperf3(self.lab, self.node.client, host, port, seconds, streams)


# --- baselines -------------------------------------------------------------------------------


class Direct(Contender):
    name = "direct"
    proxies = False

    def setup(self, node: BenchNode, workdir: Path) -> None:
        self.node = node

    def settings(self) -> dict[str, Any]:
        return {"what": "client to the backends' own addresses, no service NAT, no rules"}

    def targets(self, services: ServiceSet, indices: Sequence[int]) -> list[str]:
        return [f"{ip}:{port}" for i in indices for ip, port in services.endpoints(i)]

    def iperf_target(self, services: ServiceSet) -> tuple[str, int]:
        return services.backends[0], IPERF_PORT


class Loopback(Contender):
    """The load generator's ceiling: a server on 127.0.0.1 in the client pod itself."""

    name = "loopback"
    proxies = False
    throughput = False

    def __init__(self, binary: str) -> None:
        super().__init__()
        self.binary = binary

    def setup(self, node: BenchNode, workdir: Path) -> None:
        self.node = node
        start_server(node.lab, node.client, self.binary, str(LOOPBACK_PORT), "loopback")

    def settings(self) -> dict[str, Any]:
        return {"what": "pykp-loadgen serve on 127.0.0.1 in the client pod (generator ceiling)"}

    def targets(self, services: ServiceSet, indices: Sequence[int]) -> list[str]:
        return [f"127.0.0.1:{LOOPBACK_PORT}"]


class IptablesContender(Contender):
    """kube-proxy's iptables mode: rules from `rulegen`, loaded with iptables-restore."""

    def __init__(self, variant: str = "nft") -> None:
        super().__init__()
        self.variant = variant
        self.name = "iptables" if variant == "nft" else "iptables-legacy"
        self.restore = "iptables-restore" if variant == "nft" else "iptables-legacy-restore"

    def setup(self, node: BenchNode, workdir: Path) -> None:
        self.node = node
        self.version = node.node_exec([self.restore.replace("-restore", ""), "-V"]).strip()

    def settings(self) -> dict[str, Any]:
        return {
            "loader": f"{self.restore} -w 5: full load without --noflush (faster), "
            "endpoint changes as kube-proxy's partial sync with --noflush",
            "version": self.version,
            "masquerade": f"! -s {CLUSTER_CIDR} (kube-proxy --cluster-cidr)",
        }

    def targets(self, services: ServiceSet, indices: Sequence[int]) -> list[str]:
        return [f"{services.ip(i)}:{SERVICE_PORT}" for i in indices]

    def _restore(self, text: str, noflush: bool = True) -> float:
        assert self.node is not None
        argv = [self.restore, "-w", "5"] + (["--noflush"] if noflush else [])
        started = time.perf_counter()
        self.node.node_exec(argv, stdin=text)
        return time.perf_counter() - started

    def program_all(self, services: ServiceSet) -> dict[str, Any]:
        # Without --noflush (the node holds nothing to keep): on iptables-nft 1.8.9,
        # kube-proxy's --noflush takes ~4x longer for a full load (2,000 services: 4.6 s
        # against 1.1 s), so this favours iptables. Partial syncs keep --noflush.
        started = time.perf_counter()
        text = rulegen.iptables_full(services.all(), CLUSTER_CIDR)
        restore = self._restore(text, noflush=False)
        return {
            "command_seconds": restore,
            "generate_seconds": time.perf_counter() - started - restore,
            "lines": text.count("\n"),
        }

    def unprogram(self, services: ServiceSet) -> None:
        self._restore(rulegen.iptables_flush(), noflush=False)

    def change(
        self, services: ServiceSet, old: rulegen.Service, new: rulegen.Service
    ) -> dict[str, Any]:
        started = time.perf_counter()
        text = rulegen.iptables_change(services.all(), old, new, CLUSTER_CIDR)
        restore = self._restore(text)
        return {
            "command_seconds": restore,
            "generate_seconds": time.perf_counter() - started - restore,
            "lines": text.count("\n"),
        }


class NftablesContender(Contender):
    """kube-proxy's nftables mode: rules from `rulegen`, loaded with ``nft -f -``."""

    name = "nftables"

    def setup(self, node: BenchNode, workdir: Path) -> None:
        self.node = node
        self.version = node.node_exec(["nft", "-v"]).strip()

    def settings(self) -> dict[str, Any]:
        return {
            "loader": "nft -f - (one transaction, one element per line as knftables writes)",
            "version": self.version,
        }

    def targets(self, services: ServiceSet, indices: Sequence[int]) -> list[str]:
        return [f"{services.ip(i)}:{SERVICE_PORT}" for i in indices]

    def _nft(self, text: str) -> float:
        assert self.node is not None
        started = time.perf_counter()
        self.node.node_exec(["nft", "-f", "-"], stdin=text)
        return time.perf_counter() - started

    def program_all(self, services: ServiceSet) -> dict[str, Any]:
        started = time.perf_counter()
        text = rulegen.nftables_full(services.all(), CLUSTER_CIDR, SERVICE_CIDR)
        load = self._nft(text)
        return {
            "command_seconds": load,
            "generate_seconds": time.perf_counter() - started - load,
            "lines": text.count("\n"),
        }

    def unprogram(self, services: ServiceSet) -> None:
        self._nft(rulegen.nftables_delete())

    def change(
        self, services: ServiceSet, old: rulegen.Service, new: rulegen.Service
    ) -> dict[str, Any]:
        started = time.perf_counter()
        text = rulegen.nftables_change(old, new, CLUSTER_CIDR, SERVICE_CIDR)
        load = self._nft(text)
        return {
            "command_seconds": load,
            "generate_seconds": time.perf_counter() - started - load,
            "lines": text.count("\n"),
        }


# --- pykp ------------------------------------------------------------------------------------

_HEALTHZ = "127.0.0.1:10256"
_METRICS = "127.0.0.1:10249"


class PykpContender(Contender):
    """The real `pykp run` (NFQUEUE datapath) in the node namespace, fed a services file.

    Flags are `pykp run`'s defaults except what the lab needs (the pod CIDR, the node name,
    servers on loopback, a state directory of its own).
    """

    def __init__(self, policy: str = "random", extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.policy = policy
        self.name = f"pykp/{policy}"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[Any] | None = None
        self._prepared: float | None = None  # seconds `prepare_change` took, until `change`

    def _argv(self) -> list[str]:
        return [
            *pykp_command("run"),
            "--services", str(self.services_path),
            "--hostname-override", "node",
            "--cluster-cidr", CLUSTER_CIDR,
            "--healthz-bind-address", _HEALTHZ,
            "--metrics-bind-address", _METRICS,
            "--state-dir", str(self.state_dir),
            "--default-policy", self.policy,
            *_SAME_CONNTRACK,
            *self.extra_args,
        ]  # fmt: skip

    def setup(self, node: BenchNode, workdir: Path) -> None:
        self.node = node
        slug = self.name.replace("/", "-")
        self.services_path = workdir / f"{slug}-services.yaml"
        self.state_dir = workdir / f"{slug}-state"
        self.log_path = workdir / f"{slug}.log"
        self._write(ServiceSet(0, node.backend_ips))
        log = self.log_path.open("a")
        self.proc = node.lab.popen("node", self._argv(), stdout=log, stderr=subprocess.STDOUT)
        self._wait_services(1, timeout=60)

    def settings(self) -> dict[str, Any]:
        return {
            "command": " ".join(["pykp", *self._argv()[3:]]),
            "policy": self.policy,
            "source": "services file (polled every 1 s by pykp's FileSource)",
        }

    def targets(self, services: ServiceSet, indices: Sequence[int]) -> list[str]:
        return [f"{services.ip(i)}:{SERVICE_PORT}" for i in indices]

    def _write(self, services: ServiceSet) -> None:
        tmp = self._tmp()
        tmp.write_text(services.pykp_yaml(self.policy))
        tmp.replace(self.services_path)  # atomic: the agent never reads half a file

    def _tmp(self) -> Path:
        return self.services_path.with_suffix(".tmp")

    def metric(self, name: str) -> float | None:
        with self.lab.in_namespace("node"):
            try:
                with urllib.request.urlopen(f"http://{_METRICS}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except (OSError, urllib.error.URLError):
                return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rpartition(" ")[2])
        return None

    def _wait_services(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ContenderError(
                    f"pykp run exited ({self.proc.returncode}); see {self.log_path}"
                )
            if self.metric("pykp_services") == count:
                return
            time.sleep(0.05)
        raise ContenderError(
            f"pykp did not program {count} services in {timeout:.0f} s; see {self.log_path}"
        )

    def program_all(self, services: ServiceSet) -> dict[str, Any]:
        started = time.perf_counter()
        self._write(services)
        return {"generate_seconds": time.perf_counter() - started}

    def wait_programmed(self, services: ServiceSet, timeout: float) -> None:
        self._wait_services(services.count + 1, timeout)

    def unprogram(self, services: ServiceSet) -> None:
        self._write(ServiceSet(0, services.backends))
        self._wait_services(1, timeout=300)

    def prepare_change(self, services: ServiceSet) -> None:
        # The new file is written beside the old one, not timed: the benchmark's making of
        # 10,000 entries' YAML (~75 ms) is an operator's edit, not the agent's work.
        started = time.perf_counter()
        self._tmp().write_text(services.pykp_yaml(self.policy))
        self._prepared = time.perf_counter() - started

    def change(
        self, services: ServiceSet, old: rulegen.Service, new: rulegen.Service
    ) -> dict[str, Any]:
        if self._prepared is None:
            self.prepare_change(services)
        generate, self._prepared = self._prepared, None
        self._tmp().replace(self.services_path)  # the edit lands at once (a rename)
        return {"generate_seconds": generate}

    def disrupt(self, fault: str) -> None:
        if self.proc is None:
            return
        if fault == "kill":
            self.proc.kill()  # SIGKILL to the agent alone: a crash, an OOM kill
            self.proc.wait(timeout=15)
        elif fault == "stop":
            self.proc.send_signal(signal.SIGSTOP)  # a stalled process
        elif fault == "flush":
            self.lab.exec("node", ["nft", "flush", "ruleset"], check=True)  # another tool
        else:
            raise ValueError(f"unknown fault {fault!r}")

    def recover(self, fault: str) -> None:
        if fault == "flush":
            return  # the agent restores its rules itself
        if fault == "stop":
            if self.proc is not None:
                self.proc.send_signal(signal.SIGCONT)
            return
        log = self.log_path.open("a")  # a restart, as a DaemonSet's would
        self.proc = self.lab.popen("node", self._argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def pause(self) -> None:
        # An idle agent still resyncs every --sync-period (a full pass over every service):
        # stopped between its turns so that it never takes CPU from another contender's.
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def teardown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class PykpKubeContender(PykpContender):
    """`pykp run` fed through its Kubernetes source: the stand-in API server
    (`pykp.labs.kube_apiserver.KubeApiServer`, the real list/watch wire protocol) listens on the
    node's loopback and holds the bench's services as Services with one EndpointSlice each
    (3 ready endpoints, as in the services file).

    The agent runs only inside this contender's turns: `start_agent` launches it on a clean
    node (`pykp cleanup` first: the kernel path would otherwise serve the previous agent's
    services before the first sync) with a fresh state directory, `stop_agent` ends it.
    Flags are `pykp run`'s defaults but what the lab needs, as for `PykpContender`; in
    particular --min-sync-period stays 1 s, kube-proxy's default.
    """

    proxies = True
    throughput = False
    source = "kube"

    def __init__(self, policy: str = "random", extra_args: Sequence[str] = ()) -> None:
        super().__init__(policy, extra_args)
        self.name = f"pykp/kube-{policy}"
        self.apiserver: Any = None
        self.kubeconfig: Path | None = None
        self.min_sync_period = 1.0  # pykp run's default, and kube-proxy's
        self._published: dict[int, tuple[tuple[str, int], ...]] = {}  # index -> endpoints
        self._starts = 0

    def _argv(self) -> list[str]:
        return [
            *pykp_command("run"),
            "--kubeconfig", str(self.kubeconfig),
            "--hostname-override", "node",
            "--cluster-cidr", CLUSTER_CIDR,
            "--healthz-bind-address", _HEALTHZ,
            "--metrics-bind-address", _METRICS,
            "--state-dir", str(self.state_dir),
            "--default-policy", self.policy,
            *_SAME_CONNTRACK,
            *self.extra_args,
        ]  # fmt: skip

    def setup(self, node: BenchNode, workdir: Path) -> None:
        from pykp.labs.kube_apiserver import KubeApiServer

        self.node = node
        slug = self.name.replace("/", "-")
        self.workdir = workdir
        self.state_dir = workdir / f"{slug}-state"
        self.log_path = workdir / f"{slug}.log"
        # On the node's loopback: the agent reaches it like a local apiserver, outside the
        # service CIDR and untouched by the proxy's rules.
        self.apiserver = KubeApiServer(address="127.0.0.1", netns=node.lab.ns("node"))
        self.apiserver.start()
        self.kubeconfig = self.apiserver.write_kubeconfig(workdir / f"{slug}.kubeconfig")
        self.apiserver.create(
            "nodes",
            {
                "metadata": {"name": "node", "labels": {"kubernetes.io/hostname": "node"}},
                "status": {"addresses": [{"type": "InternalIP", "address": node.lab.node_ip4}]},
            },
        )

    def settings(self) -> dict[str, Any]:
        return {
            "command": " ".join(["pykp", *self._argv()[3:]]),
            "policy": self.policy,
            "source": "Kubernetes API: the stand-in API server (pykp.labs.kube_apiserver) on the "
            "node's loopback, one Service and one EndpointSlice (3 endpoints) per service",
            "min_sync_period": f"{self.min_sync_period:g} s (pykp's and kube-proxy's default)",
        }

    # -- the API server's contents

    def publish(self, services: ServiceSet) -> dict[str, Any]:
        """Make the API server hold exactly `services` (every one with its endpoints):
        only what differs from what it holds is written."""
        assert self.apiserver is not None
        started = time.perf_counter()
        writes = 0
        for index in [i for i in self._published if i >= services.count]:
            self.apiserver.delete("services", "bench", f"svc-{index}")
            self.apiserver.delete("endpointslices", "bench", f"svc-{index}-ipv4")
            del self._published[index]
            writes += 2
        for index in range(services.count):
            endpoints = services.endpoints(index)
            have = self._published.get(index)
            if have == endpoints:
                continue
            self.apiserver.apply("endpointslices", services.kube_slice(index))
            writes += 1
            if have is None:
                self.apiserver.apply("services", services.kube_service(index))
                writes += 1
            self._published[index] = endpoints
        return {"writes": writes, "seconds": time.perf_counter() - started}

    def write_slice(self, services: ServiceSet, index: int) -> None:
        """Write service `index`'s EndpointSlice as `services` has it now (one API write)."""
        assert self.apiserver is not None
        self.apiserver.apply("endpointslices", services.kube_slice(index))
        self._published[index] = services.endpoints(index)

    def write_service(self, services: ServiceSet, index: int) -> None:
        """Create service `index` (its slice should be there already)."""
        assert self.apiserver is not None
        self.apiserver.apply("services", services.kube_service(index))

    # -- the agent

    def start_agent(self) -> None:
        """Launch the agent on a clean node (returns at once: the caller times it)."""
        assert self.node is not None
        self.stop_agent()
        self._starts += 1
        self.state_dir = self.workdir / f"{self.name.replace('/', '-')}-state-{self._starts}"
        log = self.log_path.open("a")
        self.proc = self.node.lab.popen("node", self._argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def clean_node(self) -> None:
        """No pykp rules, no conntrack entries: a node before its first agent."""
        assert self.node is not None
        self.node.node_exec(pykp_command("cleanup"), timeout=120)
        self.node.flush_conntrack()

    def stop_agent(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ContenderError(
                f"pykp run (Kubernetes source) exited ({code}); see {self.log_path}"
            )

    def rss_kib(self) -> int | None:
        """The agent process's VmRSS (KiB) from /proc/<pid>/status (`ip netns exec` execs
        the agent, so the child's pid is the agent's)."""
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def syncs(self) -> float | None:
        """Syncs the agent has done (successful or not): its sync duration histogram's count."""
        return self.metric("kubeproxy_sync_proxy_rules_duration_seconds_count")

    def wait_programmed(self, services: ServiceSet, timeout: float) -> None:
        self._wait_services(services.count, timeout)

    def program_all(self, services: ServiceSet) -> dict[str, Any]:
        raise NotImplementedError("pykp/kube-* is measured by the kube_* workloads")

    def unprogram(self, services: ServiceSet) -> None:
        raise NotImplementedError("pykp/kube-* is measured by the kube_* workloads")

    def pause(self) -> None:
        pass  # the agent lives only within this contender's turn

    def resume(self) -> None:
        pass

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_agent()
        if self.apiserver is not None:
            self.apiserver.stop()
            self.apiserver = None


def make_contender(name: str, binary: str) -> Contender:
    """A contender by its name on the command line."""
    if name == "direct":
        return Direct()
    if name == "loopback":
        return Loopback(binary)
    if name == "iptables":
        return IptablesContender("nft")
    if name == "iptables-legacy":
        return IptablesContender("legacy")
    if name == "nftables":
        return NftablesContender()
    if name == "pykp/random-nfqueue":  # random decided by pykp's reader, not the kernel
        contender = PykpContender("random", ["--no-kernel-random"])
        contender.name = name
        return contender
    if name.startswith("pykp/kube-"):
        return PykpKubeContender(_policy(name, name.removeprefix("pykp/kube-")))
    if name.startswith("pykp/"):
        # pykp/<policy>[:<switch>...]: the agent with some of its features switched, to
        # measure what they cost (e.g. pykp/least-conn:no-follow-conntrack).
        policy, *switches = name.split("/", 1)[1].split(":")
        unknown = [switch for switch in switches if switch not in _SWITCHES]
        if unknown:
            raise ValueError(
                f"unknown contender {name!r} (switches: {', '.join(sorted(_SWITCHES))})"
            )
        contender = PykpContender(_policy(name, policy), [f"--{switch}" for switch in switches])
        contender.name = name
        return contender
    raise ValueError(f"unknown contender {name!r}")


# `pykp run` flags a pykp contender's name may add. pykp/round-robin rotates in the kernel
# (the default); pykp/round-robin:no-kernel-round-robin goes through pykp's reader.
_SWITCHES = frozenset(
    {
        "no-follow-conntrack",
        "no-kernel-random",
        "no-watch-rules",
        "no-kernel-round-robin",
        "kernel-round-robin",
    }
)


def _policy(name: str, policy: str) -> str:
    from pykp.model import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"unknown contender {name!r} (policies: {', '.join(POLICIES)})")
    return policy
