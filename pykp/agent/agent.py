"""The node agent behind `pykp run`: a source of services in, engine + rules + datapath out.

The shape is kube-proxy's pkg/proxy: a source tells the agent that something changed,
a bounded-frequency runner coalesces the changes into syncs, and each sync is a full,
level-triggered pass (translate -> apply to the engine -> render the rule state -> commit
it to netfilter -> clean up stale UDP conntrack -> record metrics and status). Failures are
reported (log, `pykp_sync_errors_total`, /healthz after its timeout, /status) and retried
by the runner; they never end the agent, and never reach the source (Cilium's style).

Everything the agent needs from the kernel comes through `Dependencies`, so the sync logic
is tested with a real `Engine` and fakes of the rules, the datapath and conntrack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from pykp.agent.plan import (
    EXTERNAL_SUFFIX,
    EngineBackend,
    EngineService,
    apply_to_engine,
    service_port_name,
    services_file_to_engine,
)
from pykp.agent.sync_runner import BoundedFrequencyRunner
from pykp.model import POLICIES, Catalog, ServiceSpec
from pykp.observe.health import HealthServer, ProxierHealth, parse_bind_address
from pykp.observe.metrics import (
    AgentMetrics,
    Family,
    MetricsServer,
    Registry,
    datapath_families,
    engine_families,
)
from pykp.observe.status import build_status, write_status_file
from pykp.sources.file import FileSource, ServiceSource

if TYPE_CHECKING:
    from pykp._fastpath import Engine
    from pykp.netfilter.rules import RuleState

__all__ = [
    "DEFAULT_STATE_DIR",
    "Agent",
    "AgentConfig",
    "ConfigError",
    "Dependencies",
    "build_rule_state",
    "check_mark_mask",
    "count_changes",
    "filter_node_addresses",
    "interface_addresses",
    "stale_udp_flows",
]

_log = logging.getLogger(__name__)

DEFAULT_STATE_DIR: Final = Path("/run/pykp")
_MAX_MAGLEV_TABLE: Final = 1 << 24


# --- configuration ------------------------------------------------------------------------


class ConfigError(ValueError):
    """A setting is invalid; `flag` names it as the command line spells it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


@dataclass(frozen=True)
class AgentConfig:
    """Everything `pykp run` takes; the defaults are kube-proxy's where it has the flag."""

    services: Path | None = None  # the services file; None: the Kubernetes API
    kubeconfig: str | None = None  # None: in-cluster credentials, else ~/.kube/config
    master: str | None = None  # the API server's URL, overriding the kubeconfig's
    kube_context: str | None = None
    hostname_override: str | None = None
    cluster_cidrs: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"  # "" turns the server off
    metrics_bind_address: str = "127.0.0.1:10249"  # "" turns the server off
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; () = every non-loopback address
    default_policy: str = "random"
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    queue_num: int = 0  # the first NFQUEUE queue
    queues: int = 1  # queues (and datapath worker threads)
    mark_mask: int = 0xFFFF0000
    # A full queue (or socket buffer) accepts new packets undecided: the kernel path then
    # serves them, instead of dropping them while the reader is stalled or overloaded.
    fail_open: bool = True
    conntrack_capacity: int = 262144
    maglev_table_size: int = 65537
    maglev_seed: int = 0
    state_dir: Path | None = DEFAULT_STATE_DIR  # None: no status file
    # Remove the rules when stopping. False leaves them, as kube-proxy does: established
    # flows keep their NAT across a restart (deleting pykp's nat chains ends them), and the
    # kernel path serves new connections until the next agent.
    cleanup_on_exit: bool = False
    # A service IP (ClusterIP, externalIP, LB IP) equal to one of the node's own addresses
    # would capture the node's traffic to that port (the CVE-2020-8554 class): refused
    # unless this is set.
    allow_node_address_service_ips: bool = False
    # Random services without session affinity are decided in the kernel (numgen random,
    # as kube-proxy's nftables mode) instead of by pykp's reader: no user-space hop.
    kernel_random: bool = True
    # Packets that may wait for the reader's verdict: what a stalled reader holds up before
    # fail-open hands new connections to the kernel path.
    queue_max_len: int = 32
    poll_interval: float = 1.0  # how often the services file is checked
    status_flows: int = 100  # flows included in a status snapshot

    @property
    def first_queue(self) -> int:
        return self.queue_num

    @property
    def last_queue(self) -> int:
        return self.queue_num + self.queues - 1

    @property
    def health_timeout(self) -> float:
        """kube-proxy's: two sync periods."""
        return 2 * self.sync_period

    @property
    def node_name(self) -> str:
        return self.hostname_override or socket.gethostname()

    def validate(self) -> None:
        """Raise `ConfigError` for the first invalid setting."""
        if self.services is not None and (self.kubeconfig or self.master or self.kube_context):
            raise ConfigError(
                "--services", "a services file and a Kubernetes API source exclude each other"
            )
        for flag, cidrs in (
            ("--cluster-cidr", self.cluster_cidrs),
            ("--nodeport-addresses", self.nodeport_addresses),
        ):
            for cidr in cidrs:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ConfigError(flag, f"{cidr!r} is not a CIDR") from None
        for flag, address in (
            ("--healthz-bind-address", self.healthz_bind_address),
            ("--metrics-bind-address", self.metrics_bind_address),
        ):
            if address:
                try:
                    parse_bind_address(address)
                except ValueError as error:
                    raise ConfigError(flag, str(error)) from None
        if self.default_policy not in POLICIES:
            raise ConfigError(
                "--default-policy",
                f"{self.default_policy!r} is not one of {', '.join(POLICIES)}",
            )
        if not self.min_sync_period >= 0:
            raise ConfigError("--min-sync-period", "must be >= 0")
        if not self.sync_period > 0:
            raise ConfigError("--sync-period", "must be > 0")
        if self.min_sync_period > self.sync_period:
            raise ConfigError(
                "--min-sync-period",
                f"{self.min_sync_period}s is longer than --sync-period ({self.sync_period}s)",
            )
        if not 0 <= self.queue_num <= 65535:
            raise ConfigError("--queue-num", "must be 0..65535")
        if self.queues < 1 or self.last_queue > 65535:
            raise ConfigError("--queues", "must be >= 1 with --queue-num + --queues - 1 <= 65535")
        message = check_mark_mask(self.mark_mask)
        if message:
            raise ConfigError("--mark-mask", message)
        if self.conntrack_capacity < 1:
            raise ConfigError("--conntrack-capacity", "must be >= 1")
        if not (
            3 <= self.maglev_table_size <= _MAX_MAGLEV_TABLE and _is_prime(self.maglev_table_size)
        ):
            raise ConfigError(
                "--maglev-table-size",
                f"{self.maglev_table_size} is not a prime between 3 and {_MAX_MAGLEV_TABLE}"
                " (65537 is the default)",
            )
        if not 0 <= self.maglev_seed < 2**64:
            raise ConfigError("--maglev-seed", "must be 0..2^64-1")
        if self.poll_interval <= 0:
            raise ConfigError("--poll-interval", "must be > 0")


def check_mark_mask(mask: int) -> str | None:
    """Why `mask` cannot hold backend ids next to pykp's other mark bits, or None."""
    from pykp.netfilter.rules import MarkLayout

    try:
        MarkLayout(backend_mask=mask).validate()
    except ValueError as error:
        return f"{mask:#x}: {error}"
    return None


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


# --- node addresses -----------------------------------------------------------------------


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


# --- the pieces of a sync (pure functions) ------------------------------------------------


def without_node_address_ips(
    services_file: Catalog, node_addresses: Iterable[str]
) -> tuple[Catalog, dict[str, str]]:
    """The services minus any ClusterIP, externalIP or LB IP that is one of the node's own
    addresses, and why, by service: serving one would capture the node's own traffic to
    that port (kube-proxy's CVE-2020-8554 class). Only the address goes; the service keeps
    its other addresses and its NodePorts.
    """
    nodes = set()
    for address in node_addresses:
        with contextlib.suppress(ValueError):  # what interfaces report is not ours to check
            nodes.add(str(ipaddress.ip_address(address.split("%")[0])))
    refused: dict[str, str] = {}
    specs = []
    for spec in services_file.services:
        fields = {
            "clusterIP": spec.cluster_ips,
            "externalIP": spec.external_ips,
            "loadBalancerIP": spec.load_balancer_ips,
        }
        taken = [f"{name} {ip}" for name, ips in fields.items() for ip in ips if ip in nodes]
        if taken:
            # Its own key: the service's ports themselves may well be served.
            refused[f"{spec.key} (node address)"] = (
                f"{', '.join(taken)} not served: an address of this node, where a service "
                "would capture the node's own traffic (CVE-2020-8554); "
                "--allow-node-address-service-ips allows it"
            )
            spec = dataclasses.replace(
                spec,
                cluster_ips=tuple(ip for ip in spec.cluster_ips if ip not in nodes),
                external_ips=tuple(ip for ip in spec.external_ips if ip not in nodes),
                load_balancer_ips=tuple(ip for ip in spec.load_balancer_ips if ip not in nodes),
            )
        specs.append(spec)
    if not refused:
        return services_file, {}
    return dataclasses.replace(services_file, services=tuple(specs)), refused


def build_rule_state(
    services_file: Catalog,
    services: Iterable[EngineService],
    backends: Mapping[int, tuple[str, int]],
    node_addresses: Iterable[str] = (),
    pools: Mapping[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] | None = None,
    *,
    kernel_random: bool = False,
) -> RuleState:
    """What netfilter must look like for the engine services the engine accepted.

    The frontends are exactly the engine's, so rules and decisions cannot disagree; each
    is classified by the service it came from. ClusterIPs are internal. External IPs,
    load-balancer IPs and NodePorts (on the node addresses) are external, masqueraded
    unless externalTrafficPolicy is Local (which keeps the client's address).
    `service_ips` never holds a node address, even one repeated as an external IP: traffic
    to a service IP on a port no service uses is refused, and a node's own ports must not be.

    `pools` (`Engine.pools()`) fill the kernel path: every frontend gets its service's
    eligible backends of its family as slots, so that a connection no reader decides still
    reaches one. With `kernel_random`, random services without session affinity are not
    queued at all: the kernel path is their policy (kube-proxy's nftables `numgen random`).
    """
    from pykp.netfilter.rules import MAX_SLOTS, FrontendRule, RuleState

    owners: dict[str, ServiceSpec] = {}
    for spec in services_file.services:
        for service_port in spec.ports:
            name = service_port_name(spec, service_port)
            owners[name] = owners[name + EXTERNAL_SUFFIX] = spec
    nodes = {str(ipaddress.ip_address(address)) for address in node_addresses}
    frontends: set[FrontendRule] = set()
    service_ips: set[str] = set()
    fallback: dict[tuple[str, int, str], tuple[tuple[str, int], ...]] = {}
    for service in services:
        spec = owners[service.name]
        masquerade = spec.external_traffic_policy == "Cluster"
        addresses = {*spec.cluster_ips, *spec.external_ips, *spec.load_balancer_ips}
        v4_pool, v6_pool = (pools or {}).get(service.name, ([], []))
        # The kernel path holds at most MAX_SLOTS backends per frontend: a bigger random
        # service keeps pykp's reader, which picks among all of them.
        queued = not (
            kernel_random
            and service.policy == "random"
            and service.affinity_timeout is None
            and max(len(v4_pool), len(v6_pool)) <= MAX_SLOTS
        )
        for ip, port, protocol in service.frontends:
            if ip in spec.cluster_ips:
                frontends.add(FrontendRule(ip, port, protocol, queued=queued))
            else:
                frontends.add(
                    FrontendRule(
                        ip, port, protocol, external=True, masquerade=masquerade, queued=queued
                    )
                )
            if ip in addresses and ip not in nodes:
                service_ips.add(ip)
            pool = v4_pool if ipaddress.ip_address(ip).version == 4 else v6_pool
            fallback[(ip, port, protocol)] = fallback_slots(pool, backends)
    return RuleState(
        frontends=frozenset(frontends),
        service_ips=frozenset(service_ips),
        backends=dict(backends),
        fallback=fallback,
    )


def fallback_slots(
    pool: Sequence[tuple[int, int]], backends: Mapping[int, tuple[str, int]]
) -> tuple[tuple[str, int], ...]:
    """The kernel path's slots of one frontend: each backend repeated by its weight (over
    the weights' common divisor) when that fits the rules' slot limit, else once each."""
    from pykp.netfilter.rules import MAX_SLOTS

    live = [(backend_id, weight) for backend_id, weight in pool if backend_id in backends]
    if not live:
        return ()
    divisor = functools.reduce(math.gcd, (weight for _, weight in live))
    shares = [weight // divisor for _, weight in live]
    if sum(shares) > MAX_SLOTS:
        shares = [1] * len(live)
    return tuple(
        backends[backend_id] for (backend_id, _), share in zip(live, shares) for _ in range(share)
    )[:MAX_SLOTS]


def _usable(backend: EngineBackend) -> bool:
    # kube-proxy clears conntrack for endpoints that were serving and no longer are.
    return backend.ready or backend.serving


def stale_udp_flows(
    old: Mapping[str, EngineService], new: Mapping[str, EngineService]
) -> list[tuple[str, str, int]]:
    """(frontend IP, backend IP, backend port) whose kernel UDP conntrack entries are stale.

    kube-proxy's rule: a UDP "connection" never ends, so once its backend is gone the
    kernel's NAT binding would blackhole the client's next datagrams until the entry
    times out; deleting it lets the next datagram be decided again. Stale: a backend that
    left a UDP service (or stopped serving), or every backend of a UDP frontend that went
    away. TCP is left alone: its flows end on their own (RST/timeouts), as with kube-proxy.
    """
    stale: set[tuple[str, str, int]] = set()
    for name, before in old.items():
        before_ips = {ip for ip, _, protocol in before.frontends if protocol == "UDP"}
        if not before_ips:
            continue
        after = new.get(name)
        after_ips = (
            {ip for ip, _, protocol in after.frontends if protocol == "UDP"} if after else set()
        )
        still_usable = {(b.ip, b.port) for b in after.backends if _usable(b)} if after else set()
        for backend in before.backends:
            if not _usable(backend):
                continue
            gone = (backend.ip, backend.port) not in still_usable
            for ip in before_ips:
                if gone or ip not in after_ips:
                    stale.add((ip, backend.ip, backend.port))
    return sorted(stale)


def count_changes(old: Catalog | None, new: Catalog) -> tuple[int, int]:
    """(service changes, endpoint changes) between two states, kube-proxy's way of counting:
    a service added, removed or whose spec changed; a service whose endpoints changed."""
    before = {service.key: service for service in old.services} if old else {}
    after = {service.key: service for service in new.services}
    service_changes = endpoint_changes = 0
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if (
            a is None
            or b is None
            or dataclasses.replace(a, endpoints=()) != dataclasses.replace(b, endpoints=())
        ):
            service_changes += 1
        if (a.endpoints if a else ()) != (b.endpoints if b else ()):
            endpoint_changes += 1
    return service_changes, endpoint_changes


# --- what the agent drives (protocols, with the real implementations as defaults) ---------


class RulesLike(Protocol):
    """pykp.netfilter.rules.RuleManager, as far as the agent uses it."""

    def install(self) -> None: ...
    def installed(self) -> bool: ...
    def undecided_connections(self) -> int: ...
    def sync(self, state: RuleState) -> object: ...
    def cleanup(self) -> None: ...


class DatapathLike(Protocol):
    """pykp._fastpath.NfqueueDatapath, as far as the agent uses it."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...


def _make_engine(config: AgentConfig) -> Engine:
    from pykp._fastpath import Engine
    from pykp.netfilter.rules import MarkLayout

    return Engine(
        default_policy=config.default_policy,
        conntrack_capacity=config.conntrack_capacity,
        maglev_table_size=config.maglev_table_size,
        maglev_seed=config.maglev_seed,
        # Ids past what the mark carries are refused per service (counted), so the rules
        # always render and every other service keeps syncing.
        max_backend_id=MarkLayout(backend_mask=config.mark_mask).max_backend_id,
    )


def _ipv6_enabled() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def _make_rules(config: AgentConfig) -> RulesLike:
    from pykp.netfilter.rules import MarkLayout, RuleManager

    return RuleManager(
        MarkLayout(backend_mask=config.mark_mask),
        queues=(config.first_queue, config.last_queue),
        cluster_cidrs=config.cluster_cidrs,
        ipv6=_ipv6_enabled(),
    )


def _make_datapath(engine: Engine, config: AgentConfig) -> DatapathLike:
    from pykp._fastpath import NfqueueDatapath
    from pykp.agent.queue_keeper import KeptDatapath

    return KeptDatapath(
        NfqueueDatapath(
            engine,
            first_queue=config.first_queue,
            last_queue=config.last_queue,
            backend_mask=config.mark_mask,
            fail_open=config.fail_open,
            max_len=config.queue_max_len,
        )
    )


def _delete_udp_flows(service_ip: str, backend_ip: str, backend_port: int | None) -> int:
    from pykp.netfilter.conntrack import delete_udp_flows

    return delete_udp_flows(service_ip, backend_ip, backend_port)


@dataclass(frozen=True)
class Dependencies:
    """The agent's ties to the kernel and the clock; tests replace them."""

    make_engine: Callable[[AgentConfig], Engine] = _make_engine
    make_rules: Callable[[AgentConfig], RulesLike] = _make_rules
    make_datapath: Callable[[Engine, AgentConfig], DatapathLike] = _make_datapath
    interface_addresses: Callable[[], list[str]] = interface_addresses
    delete_udp_flows: Callable[[str, str, int | None], int] = _delete_udp_flows
    wall_clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


class _UpsertOnly:
    """An engine seen by `apply_to_engine` as holding no services: it then upserts the
    services it is given and removes nothing, which lets the agent apply only changes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def services(self) -> list[str]:
        return []

    def upsert_service(self, *args: Any, **kwargs: Any) -> int:
        return self._engine.upsert_service(*args, **kwargs)


@dataclass
class _Programmed:
    """What the last successful sync programmed."""

    services: dict[str, EngineService] = field(default_factory=dict)
    node_addresses: list[str] = field(default_factory=list)
    change: float | None = None  # the source change it reflected (for programming latency)


# --- the agent ----------------------------------------------------------------------------


def make_source(config: AgentConfig) -> ServiceSource:
    """The services file when one is given, else the Kubernetes API (like kube-proxy)."""
    if config.services is not None:
        return FileSource(config.services, poll_interval=config.poll_interval)
    from pykp.sources.kube.source import KubeSource

    return KubeSource(
        kubeconfig=config.kubeconfig,
        master=config.master,
        context=config.kube_context,
        node_name=config.node_name,
        default_policy=config.default_policy,
    )


class Agent:
    """Runs the node: `start()`, then syncs on every change of the source; `stop()`."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        source: ServiceSource | None = None,
        deps: Dependencies | None = None,
    ) -> None:
        config.validate()
        if source is None:
            source = make_source(config)
        self.config = config
        self.source = source
        self.deps = deps or Dependencies()
        self.node_name = config.node_name
        self.engine = self.deps.make_engine(config)
        self.rules = self.deps.make_rules(config)
        self.datapath = self.deps.make_datapath(self.engine, config)
        self.health = ProxierHealth(config.health_timeout, clock=self.deps.wall_clock)
        self.metrics = AgentMetrics()
        self.registry = Registry()
        self.registry.add("agent", self.metrics.families)
        self.registry.add("engine", lambda: engine_families(self.engine.counters()))
        self.registry.add("datapath", self._datapath_families)
        self.registry.add("state", self._state_families)
        self.registry.add("kernel_path", self._kernel_path_families)
        self.runner = BoundedFrequencyRunner(
            self.sync,
            config.min_sync_period,
            config.sync_period,
            "sync",
            clock=self.deps.monotonic,
        )
        self._programmed = _Programmed()
        self._seen_file: Catalog | None = None
        self._refused: dict[str, str] = {}
        self._applied: dict[str, EngineService] = {}  # what the engine holds, by name
        self._sync_lock = threading.Lock()
        self._rules_checked = float("-inf")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[HealthServer | MetricsServer] = []
        self._started_wall = self.deps.wall_clock()
        self._running = False
        self._rules_touched = False
        self._state_dir_warned = False

    # -- lifecycle

    def start(self) -> None:
        """Start everything; on failure, undo what started and raise."""
        if self._running:
            raise RuntimeError("the agent is already running")
        self._running = True
        self._stop.clear()
        self._started_wall = self.deps.wall_clock()
        try:
            # The servers first: a port in use fails the start before the kernel is touched.
            if self.config.healthz_bind_address:
                self._start_server(HealthServer(self.config.healthz_bind_address, self.health))
            if self.config.metrics_bind_address:
                self._start_server(
                    MetricsServer(
                        self.config.metrics_bind_address,
                        self.registry.render,
                        self.snapshot,
                    )
                )
            # A failed start removes only rules it created: a previous agent's rules keep
            # serving the node (fail static), as kube-proxy's do when it cannot start.
            # Installing keeps the sets and maps a previous agent left: until this agent's
            # first sync, the kernel path serves every service from them.
            self._rules_touched = not self.rules.installed()
            self.rules.install()
            self._rules_checked = self.deps.monotonic()
            self._spawn("pykp-sync", lambda: self.runner.loop(self._stop))
            self._spawn("pykp-housekeeping", self._housekeeping)
            # A first sync is expected: /healthz turns unhealthy if it never succeeds.
            self.health.queued_update()
            self.source.start(self._on_change)
            self._rules_touched = True  # started: the rules are this agent's to remove
        except BaseException:
            self.stop(cleanup=True)  # a half-started agent leaves nothing it created
            raise
        _log.info(
            "pykp agent started on node %s (queues %d-%d)",
            self.node_name,
            self.config.first_queue,
            self.config.last_queue,
        )

    def stop(self, *, cleanup: bool | None = None) -> None:
        """Stop everything, then remove the rules (unless `cleanup`, by default
        --cleanup-on-exit, is False). Idempotent; every step is attempted.

        The rules go before the datapath stops: a packet queued meanwhile would only be
        handed over to the kernel path, but no rule should send it there.
        """
        remove_rules = self.config.cleanup_on_exit if cleanup is None else cleanup
        self._stop.set()
        self.runner.wake()
        steps: list[tuple[str, Callable[[], None]]] = [("source", self.source.stop)]
        steps += [(thread.name, thread.join) for thread in self._threads]
        if remove_rules:
            steps.append(("rules", self._cleanup_rules))
        steps.append(("datapath", self._stop_datapath))
        steps += [(server.name, server.stop) for server in self._servers]
        for name, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - the other steps must still run
                _log.exception("stopping %s failed", name)
        self._threads.clear()
        self._servers.clear()
        if self._running:
            _log.info("pykp agent stopped")
        self._running = False

    def serve(self, stop_event: threading.Event) -> None:
        """Start, block until `stop_event` is set (by a signal handler), then stop."""
        self.start()
        try:
            # In slices: a signal handler that sets the event runs between them at the latest.
            while not stop_event.wait(1.0):
                pass
        finally:
            self.stop()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_server(self, server: HealthServer | MetricsServer) -> None:
        server.start()
        self._servers.append(server)

    def _cleanup_rules(self) -> None:
        # Even after a failed install: cleanup removes a partial one and is safe when absent.
        if self._rules_touched:
            self.rules.cleanup()
            self._rules_touched = False

    def _stop_datapath(self) -> None:
        if self.datapath.running:
            self.datapath.stop()

    def _housekeeping(self) -> None:
        """GC of pykp's own flow table, about once a second."""
        while not self._stop.wait(1.0):
            try:
                self.engine.expire()
            except Exception:  # noqa: BLE001 - keep collecting
                _log.exception("flow table GC failed")

    def _on_change(self) -> None:
        """The source changed: note it for /healthz and metrics, and ask for a sync."""
        self.health.queued_update()
        self.metrics.last_queued_timestamp = self.deps.wall_clock()
        self.runner.run()

    # -- the sync

    def node_addresses(self) -> list[str]:
        return filter_node_addresses(
            self.deps.interface_addresses(), self.config.nodeport_addresses
        )

    def sync(self) -> None:
        """One full sync. Raises on failure (after recording it); the runner retries."""
        with self._sync_lock:
            started = self.deps.monotonic()
            self.metrics.syncs += 1
            try:
                synced = self._sync()
            except Exception:
                self.metrics.sync_errors += 1
                # A failing sync is a pending update: /healthz fails after its timeout.
                self.health.queued_update()
                raise
            if synced:
                self.metrics.sync_duration.observe(self.deps.monotonic() - started)

    def _sync(self) -> bool:
        # The change time first: if the source changes again in between, the newer state
        # is programmed and the older change is credited with it (never the other way).
        source_status = self.source.status()
        services_file = self.source.current()
        if services_file is None:
            # kube-proxy's "not initialized": program nothing before a first full state.
            _log.debug("no services loaded yet; not syncing")
            return False
        if services_file is not self._seen_file:
            service_changes, endpoint_changes = count_changes(self._seen_file, services_file)
            self.metrics.service_changes += service_changes
            self.metrics.endpoint_changes += endpoint_changes
            self._seen_file = services_file

        # (a) translate, (b) apply: the engine makes the decisions the rules will carry.
        interfaces = self.deps.interface_addresses()
        node_addresses = filter_node_addresses(interfaces, self.config.nodeport_addresses)
        captures: dict[str, str] = {}
        if not self.config.allow_node_address_service_ips:
            services_file, captures = without_node_address_ips(services_file, interfaces)
        services = services_file_to_engine(services_file, node_addresses, self.node_name)
        refused = self._apply(services, captures)
        wanted = {service.name: service for service in services if service.name not in refused}

        # (c) render and (d) commit the rules, restored first if someone removed them.
        state = build_rule_state(
            services_file,
            wanted.values(),
            self.engine.backend_ids(),
            node_addresses,
            self.engine.pools(),
            kernel_random=self.config.kernel_random,
        )
        self._repair_rules()
        self.rules.sync(state)
        if self._running and not self.datapath.running:
            # Only now, with the engine loaded: a reader bound earlier would refuse what it
            # does not know yet, where --queue-bypass lets the kernel path serve it.
            self.datapath.start()

        # (e) stale UDP: after the commit, so the next datagram is decided on the new rules.
        self._delete_stale_udp(stale_udp_flows(self._programmed.services, wanted))

        # (f) record.
        now = self.deps.wall_clock()
        change = source_status.changed_at
        if (
            change is not None
            and change != self._programmed.change
            and change >= self._started_wall  # kube-proxy ignores changes from before it started
            and now >= change
        ):
            self.metrics.network_programming.observe(now - change)
        self._programmed = _Programmed(wanted, node_addresses, change)
        self.metrics.last_sync_timestamp = now
        self.health.updated()
        self._write_status()
        _log.debug(
            "synced %d service ports, %d frontends, %d backends",
            len(wanted),
            len(state.frontends),
            len(state.backends),
        )
        return True

    def _repair_rules(self) -> None:
        """kube-proxy's canary, for the whole rule set: about once per --sync-period, check
        that pykp's table, chains, sets and jumps are all still there; a flush or another
        tool that removed any is undone (counted, logged) by a reinstall and a full load."""
        now = self.deps.monotonic()
        if not self._running or now - self._rules_checked < self.config.sync_period / 2:
            return
        self._rules_checked = now
        if self.rules.installed():
            return
        _log.error("pykp's rules were removed or changed by someone else: restoring them")
        self.rules.install()
        self.metrics.rules_repairs += 1

    def _apply(
        self, services: Sequence[EngineService], refused_before: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Make the engine hold `services`; return those it refused, with why.

        Only what changed is touched: re-upserting an unchanged service would restart its
        round-robin and rebuild its Maglev table on every periodic resync. A refusal (say
        an external IP equal to a node address, on another service's NodePort) skips that
        service port only, as an invalid object is skipped; the rest stays programmed.
        """
        wanted = {service.name: service for service in services}
        # Removals first, so a frontend that moved to a renamed service is free for it.
        for name in self.engine.services():
            if name not in wanted:
                self.engine.remove_service(name)
                self._applied.pop(name, None)
        present = set(self.engine.services())
        pending = [
            service
            for service in services
            if service.name not in present or self._applied.get(service.name) != service
        ]
        upsert_only = cast("Engine", _UpsertOnly(self.engine))
        refused: dict[str, str] = dict(refused_before or {})
        # Passes until no progress: when two services swap a frontend, the first may fail
        # until the second has let go of it.
        while pending:
            failed: list[EngineService] = []
            for service in pending:
                try:
                    apply_to_engine(upsert_only, [service])
                except ValueError as error:
                    refused[service.name] = str(error)
                    failed.append(service)
                    # Its previous version must not keep serving (or holding frontends).
                    self.engine.remove_service(service.name)
                    self._applied.pop(service.name, None)
                else:
                    refused.pop(service.name, None)
                    self._applied[service.name] = service
            if len(failed) == len(pending):
                break
            pending = failed
        new = {
            name: message for name, message in refused.items() if self._refused.get(name) != message
        }
        for name, message in new.items():
            _log.error("service %s refused (skipped): %s", name, message)
        self.metrics.refused_services += len(new)
        self._refused = refused
        return refused

    def _delete_stale_udp(self, stale: Sequence[tuple[str, str, int]]) -> None:
        for service_ip, backend_ip, backend_port in stale:
            try:
                deleted = self.deps.delete_udp_flows(service_ip, backend_ip, backend_port)
            except Exception as error:  # noqa: BLE001 - they time out anyway
                self.metrics.conntrack_cleanup_errors += 1
                _log.warning(
                    "cannot delete UDP conntrack entries %s -> %s:%d: %s",
                    service_ip,
                    backend_ip,
                    backend_port,
                    error,
                )
                continue
            self.metrics.stale_udp_flows_deleted += deleted
            _log.debug(
                "deleted %d stale UDP conntrack entries %s -> %s:%d",
                deleted,
                service_ip,
                backend_ip,
                backend_port,
            )

    # -- reporting

    def snapshot(self, flows: int | None = None) -> dict[str, Any]:
        """The status snapshot (`/status`, the state file, `pykp status`)."""
        programmed = self._programmed
        limit = self.config.status_flows if flows is None else flows
        snapshot = build_status(
            node_name=self.node_name,
            node_addresses=programmed.node_addresses,
            services=programmed.services.values(),
            refused=self._refused,
            problems=self.source.problems(),
            source=self.source.status(),
            counters=self.engine.counters(),
            datapath=self.datapath.stats(),
            runner=self.runner.stats,
            healthy=self.health.is_healthy(),
            unhealthy_reason=self.health.unhealthy_reason(),
            last_sync=self.metrics.last_sync_timestamp or None,
            flows=self.engine.connections(limit) if limit > 0 else (),
            now=self.deps.wall_clock(),
        )
        snapshot["kernelPathUndecided"] = self.rules.undecided_connections()
        return snapshot

    def _write_status(self) -> None:
        directory = self.config.state_dir
        if directory is None:
            return
        try:
            write_status_file(directory, self.snapshot())
        except OSError as error:
            if not self._state_dir_warned:  # once: a read-only /run must not flood the log
                _log.warning("cannot write the status file in %s: %s", directory, error)
                self._state_dir_warned = True

    def _datapath_families(self) -> list[Family]:
        return datapath_families(self.datapath.stats())

    def _kernel_path_families(self) -> list[Family]:
        return [
            Family.single(
                "pykp_kernel_path_undecided_connections_total",
                "counter",
                "Connections to services pykp's reader decides (round-robin, Maglev, "
                "least-conn, affinity) that the kernel path served at random instead, because "
                "no reader was bound, it was stalled or its queue was full",
                self.rules.undecided_connections(),
            )
        ]

    def _state_families(self) -> list[Family]:
        source = self.source.status()
        return [
            Family.single(
                "pykp_services",
                "gauge",
                "Engine services (one per service port) programmed",
                len(self._programmed.services),
            ),
            Family.single(
                "pykp_backends",
                "gauge",
                "Backends (distinct address and port) the engine knows",
                len(self.engine.backend_ids()),
            ),
            Family.single(
                "pykp_invalid_objects_total",
                "counter",
                "Invalid entries skipped: by the source on each load, or refused by the engine",
                source.invalid_objects + self.metrics.refused_services,
            ),
            Family.single(
                "pykp_source_errors_total",
                "counter",
                "Loads of the source that failed (the last good state was kept)",
                source.load_errors,
            ),
            Family.single(
                "pykp_source_initialized",
                "gauge",
                "1 once the source delivered a first full state",
                1 if source.initialized else 0,
            ),
            Family.labelled(
                "kubeproxy_proxy_healthz_total",
                "counter",
                "Cumulative proxy healthz HTTP status",
                "code",
                _codes(self.health.response_counts(), "/healthz"),
            ),
            Family.labelled(
                "kubeproxy_proxy_livez_total",
                "counter",
                "Cumulative proxy livez HTTP status",
                "code",
                _codes(self.health.response_counts(), "/livez"),
            ),
        ]


def _codes(counts: Mapping[tuple[str, int], int], path: str) -> dict[str, float]:
    return {str(code): count for (where, code), count in counts.items() if where == path}
