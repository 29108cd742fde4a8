"""The node agent behind `pykp run`: a source of services in, engine + rules + datapath out.

The shape is kube-proxy's pkg/proxy: a source records which services changed, a
bounded-frequency runner coalesces the changes into syncs, and each sync works on those
services alone (`pykp.agent.sync`): translate, stage in the engine, render their rule
elements, commit, clean up stale UDP conntrack, record metrics and status. Every
--sync-period a full resync re-derives everything (cheap when nothing changed: unchanged
services are skipped by identity) and checks the rules are still in place. Failures are
reported (log, `pykp_sync_errors_total`, /healthz after its timeout, /status) and retried
by the runner as a full sync; they never end the agent, and never reach the source.

Everything the agent needs from the kernel comes through `Dependencies`, so the sync logic
is tested with a real `Engine` and fakes of the rules, the datapath and conntrack.
"""

from __future__ import annotations

import gc
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pykp.agent.config import (
    DEFAULT_STATE_DIR,
    PROXY_MODE,
    AgentConfig,
    ConfigError,
    check_mark_mask,
)
from pykp.agent.heap import trim_heap
from pykp.agent.node_addresses import filter_node_addresses, interface_addresses
from pykp.agent.plan import EngineService
from pykp.agent.sync import NodeContext, ServiceSync, canonical_addresses
from pykp.agent.sync import RulesLike as ElementRules
from pykp.agent.sync_runner import BoundedFrequencyRunner
from pykp.netfilter.conntrack_sysctls import ConntrackSettings, SysctlResult
from pykp.netfilter.monitor import ForeignChange, RulesetMonitor
from pykp.netfilter.rules import MarkLayout
from pykp.observe.explain import NodeView, explain_report
from pykp.observe.flows import (
    FLOWS_LISTED_MAX,
    active_flow_family,
    flows_report,
    follower_families,
)
from pykp.observe.health import HealthServer, ProxierHealth
from pykp.observe.metrics import (
    AgentMetrics,
    Family,
    MetricsServer,
    Registry,
    datapath_families,
    engine_families,
)
from pykp.observe.service_health import WILDCARD, HealthCheck, ServiceHealthServers
from pykp.observe.status import build_status, write_status_file
from pykp.sources.base import ServiceSource
from pykp.sources.file import FileSource

if TYPE_CHECKING:
    from pykp._fastpath import Engine, KernelFlow
    from pykp.model import Catalog

__all__ = [
    "DEFAULT_STATE_DIR",
    "Agent",
    "AgentConfig",
    "ConfigError",
    "Dependencies",
    "check_mark_mask",
    "filter_node_addresses",
    "interface_addresses",
]

_log = logging.getLogger(__name__)

# Elements past which the agent no longer counts the sets' elements in the kernel: an
# element dump restarts its walk of the set for every batch it returns (1.3 s of kernel
# time for 300,000 elements). Past it, the rules monitor still sees others' deletions.
_ELEMENT_CHECK_LIMIT = 250_000


# --- what the agent drives (protocols, with the real implementations as defaults) ---------


class RulesLike(ElementRules, Protocol):
    """pykp.netfilter.rules.RuleManager, as far as the agent uses it: the sync's element
    operations, and these."""

    def install(self) -> None: ...
    def installed(self) -> bool: ...
    def undecided_connections(self) -> int: ...
    def cleanup(self) -> None: ...


class DatapathLike(Protocol):
    """pykp._fastpath.NfqueueDatapath, as far as the agent uses it."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...


class FollowerLike(Protocol):
    """pykp._fastpath.ConntrackFollower, as far as the agent uses it."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...


def _make_engine(config: AgentConfig) -> Engine:
    from pykp._fastpath import Engine

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
        # As kube-proxy: liberal conntrack calls no out-of-window segment INVALID.
        drop_invalid=not config.conntrack.tcp_be_liberal,
        ipv6=_ipv6_enabled(),
        conntrack_events=config.follow_conntrack,
    )


def _make_monitor(
    rules: RulesLike, on_change: Callable[[ForeignChange], None]
) -> RulesetMonitor | None:
    """nf_tables' notifications, when the agent's own transactions can be told apart
    (committed in-process through libnftables, under the writer's name)."""
    from pykp.netfilter.executor import LibNftables
    from pykp.netfilter.rules import RuleManager

    if not isinstance(rules, RuleManager) or not isinstance(rules.nft, LibNftables):
        return None
    return RulesetMonitor(on_change, table=rules.table, chain=rules.chain)


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
            cluster_source_bit=MarkLayout(backend_mask=config.mark_mask).cluster_source_bit,
        )
    )


def _make_follower(engine: Engine, config: AgentConfig) -> FollowerLike | None:
    from pykp._fastpath import ConntrackFollower

    if not config.follow_conntrack:
        return None
    from pykp.netfilter.rules import CT_CLOSING_MARK

    return ConntrackFollower(
        engine, resync_interval=config.conntrack_resync_interval, closing_mark=CT_CLOSING_MARK
    )


def _list_kernel_flows(engine: Engine, limit: int) -> list[KernelFlow]:
    from pykp._fastpath import kernel_flows

    return kernel_flows(engine, limit)


def _delete_udp_flows(service_ip: str, backend_ip: str, backend_port: int | None) -> int:
    from pykp.netfilter.conntrack import delete_udp_flows

    return delete_udp_flows(service_ip, backend_ip, backend_port)


def _delete_unnated_udp_flows(frontends: Sequence[tuple[str, int]]) -> int:
    from pykp.netfilter.conntrack import delete_unnated_udp_flows

    return delete_unnated_udp_flows(frontends)


def _set_conntrack_sysctls(settings: ConntrackSettings) -> list[SysctlResult]:
    from pykp.netfilter.conntrack_sysctls import apply_conntrack_sysctls

    return apply_conntrack_sysctls(settings)


@dataclass(frozen=True)
class Dependencies:
    """The agent's ties to the kernel and the clock; tests replace them."""

    make_engine: Callable[[AgentConfig], Engine] = _make_engine
    make_rules: Callable[[AgentConfig], RulesLike] = _make_rules
    make_datapath: Callable[[Engine, AgentConfig], DatapathLike] = _make_datapath
    make_follower: Callable[[Engine, AgentConfig], FollowerLike | None] = _make_follower
    kernel_flows: Callable[[Engine, int], list[KernelFlow]] = _list_kernel_flows
    make_monitor: Callable[[RulesLike, Callable[[ForeignChange], None]], RulesetMonitor | None] = (
        _make_monitor
    )
    interface_addresses: Callable[[], list[str]] = interface_addresses
    delete_udp_flows: Callable[[str, str, int | None], int] = _delete_udp_flows
    delete_unnated_udp_flows: Callable[[Sequence[tuple[str, int]]], int] = _delete_unnated_udp_flows
    set_conntrack_sysctls: Callable[[ConntrackSettings], list[SysctlResult]] = (
        _set_conntrack_sysctls
    )
    wall_clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


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
        self.follower = self.deps.make_follower(self.engine, config)
        self.health = ProxierHealth(config.health_timeout, clock=self.deps.wall_clock)
        # Services' health check node ports (externalTrafficPolicy Local).
        self.health_checks = ServiceHealthServers(self.health.is_healthy)
        self._health_check_wanted: dict[str, HealthCheck] = {}
        self._health_check_stale = True  # a failed sync lost the changed keys: check all
        self.metrics = AgentMetrics()
        self.registry = Registry()
        self.registry.add("agent", self.metrics.families)
        self.registry.add("engine", lambda: engine_families(self.engine.counters()))
        self.registry.add("datapath", self._datapath_families)
        self.registry.add("state", self._state_families)
        self.registry.add("kernel_path", self._kernel_path_families)
        self.registry.add("flows", self._flow_families)
        self.runner = BoundedFrequencyRunner(
            self.sync,
            config.min_sync_period,
            config.sync_period,
            "sync",
            clock=self.deps.monotonic,
        )
        self.service_sync = ServiceSync(
            self.engine,
            self.rules,
            MarkLayout(backend_mask=config.mark_mask),
            kernel_random=config.kernel_random,
            kernel_round_robin=config.kernel_round_robin,
            allow_node_address_service_ips=config.allow_node_address_service_ips,
        )
        self._context: NodeContext | None = None
        self._last_full = float("-inf")
        self._resync_deferred = False  # the last sync put off a due resync
        self._programmed_change: float | None = None
        self._refused: dict[str, str] = {}
        self._status_dirty = False
        self._status_written = float("-inf")
        self._rules_damaged = False
        self._frozen = False
        self._gc_held_since: float | None = None  # since when the start holds the GC
        self._trim_heap = False  # a full load (or a big listing) left freed C heap behind
        self._undecided = 0  # the kernel path's undecided counter, as last read
        self._element_check_off_logged = False
        self._elements_damaged = False
        self._sync_lock = threading.Lock()
        self._rules_checked = float("-inf")
        self._stop = threading.Event()
        self._check_now = threading.Event()  # someone else changed the rules, perhaps
        self._monitor: RulesetMonitor | None = None
        self._monitor_started = False
        self._threads: list[threading.Thread] = []
        self._servers: list[HealthServer | MetricsServer] = []
        self._started_wall = self.deps.wall_clock()
        self._running = False
        self._rules_touched = False
        self._state_dir_warned = False
        self._conntrack_sysctls: list[SysctlResult] = []

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
                        PROXY_MODE,
                        flows=self.kernel_flows,
                        explain=self.explain,
                    )
                )
            # The lists first: the API server answers them, and their pages are translated,
            # while the rules are installed (libnftables and the sysctls release the GIL;
            # ~0.12 s of a start). No sync runs before the rules are in: its thread starts
            # after them, and finds the changes waiting.
            self._hold_start_gc()
            self.source.start(self._on_change)
            # A failed start removes only rules it created: a previous agent's rules keep
            # serving the node (fail static), as kube-proxy's do when it cannot start.
            # Installing keeps the sets and maps a previous agent left: until this agent's
            # first sync, the kernel path serves every service from them.
            self._rules_touched = not self.rules.installed()
            self.rules.install()
            # kube-proxy's conntrack sysctls, once (nf_conntrack is loaded by now); a write
            # that fails is a warning, never a failed start.
            self._conntrack_sysctls = self.deps.set_conntrack_sysctls(self.config.conntrack)
            self._rules_checked = self.deps.monotonic()
            self._spawn("pykp-sync", lambda: self.runner.loop(self._stop))
            self._spawn("pykp-housekeeping", self._housekeeping)
            # A first sync is expected: /healthz turns unhealthy if it never succeeds.
            self.health.queued_update()
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
        self._check_now.set()
        self.runner.wake()
        steps: list[tuple[str, Callable[[], None]]] = [("source", self.source.stop)]
        steps.append(("rules monitor", self._stop_monitor))
        steps += [(thread.name, thread.join) for thread in self._threads]
        steps.append(("status", self._flush_status))
        if remove_rules:
            steps.append(("rules", self._cleanup_rules))
        steps.append(("datapath", self._stop_datapath))
        steps.append(("conntrack follower", self._stop_follower))
        steps += [(server.name, server.stop) for server in self._servers]
        steps.append(("health check servers", self.health_checks.stop))
        for name, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - the other steps must still run
                _log.exception("stopping %s failed", name)
        self._threads.clear()
        self._servers.clear()
        with self._sync_lock:
            if self._release_start_gc():
                gc.enable()
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

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        self._monitor_started = False

    def _start_monitor(self) -> None:
        """Watch for someone else's changes to the rules, from the first sync on (a
        listener makes the kernel announce every element of a full load: +20 % to it)."""
        try:
            self._monitor = self.deps.make_monitor(self.rules, self._on_foreign_change)
            if self._monitor is not None:
                self._monitor.start()
        except OSError as error:
            self._monitor = None
            _log.warning(
                "cannot watch nf_tables notifications (%s): someone else's changes to the "
                "rules are found by the periodic check only",
                error,
            )

    def _on_foreign_change(self, change: ForeignChange) -> None:
        """Someone else changed pykp's rules (monitor thread): repair now, not at the next
        periodic check. Until repaired, /healthz counts it as a pending update."""
        self.metrics.foreign_rule_changes += 1
        if change.suspect and not (change.structure or change.elements):
            _log.info("rules changed by %s: checking them", change.describe())
            self._check_now.set()
            return
        _log.error("pykp's rules changed by %s: restoring them", change.describe())
        if change.structure:
            self._rules_damaged = True
        else:
            self._elements_damaged = True
        if change.suspect:
            self._check_now.set()
        self.health.queued_update()
        self.runner.run()

    def _stop_datapath(self) -> None:
        if self.datapath.running:
            self.datapath.stop()

    def _start_follower(self) -> None:
        """Follow the kernel's conntrack, once the engine knows the services: its first
        listing then counts the flows that predate this agent."""
        if self.follower is None or self.follower.running:
            return
        try:
            self.follower.start()
        except OSError as error:
            _log.warning(
                "cannot follow the kernel's conntrack events (%s): least-conn counts flows "
                "opened in the last two minutes instead of live ones",
                error,
            )
            self.follower = None

    def _stop_follower(self) -> None:
        if self.follower is not None and self.follower.running:
            self.follower.stop()

    def _housekeeping(self) -> None:
        """GC of pykp's own flow table about once a second, the status file at most every
        --status-interval (off the sync path: a snapshot lists every service), and the
        rules' check: periodically, and at once when the rules monitor asks."""
        while True:
            asked = self._check_now.wait(1.0)  # else a second passed
            if self._stop.is_set():
                return
            self._check_now.clear()
            now = self.deps.monotonic()
            held = self._gc_held_since
            if held is not None and now - held >= 60 and self._sync_lock.acquire(blocking=False):
                try:  # no first sync yet (an unreachable API server): collect again
                    if self._release_start_gc():
                        gc.enable()
                finally:
                    self._sync_lock.release()
            if not asked:
                try:
                    self.engine.expire()
                except Exception:  # noqa: BLE001 - keep collecting
                    _log.exception("flow table GC failed")
            if self._status_dirty and now - self._status_written >= self.config.status_interval:
                self._write_status()
            if asked or now - self._rules_checked >= self.config.sync_period / 2:
                self._rules_checked = now
                try:
                    self._check_rules()
                except Exception:  # noqa: BLE001 - checked again next time
                    _log.exception("checking the rules failed")

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

    def sync(self) -> bool:
        """One sync; False when there was nothing to sync from yet (the source has no
        first state) or nothing changed, which the runner does not count against
        --min-sync-period. Raises on failure (after recording it); the runner retries."""
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
            return synced

    def _sync(self) -> bool:
        # No cyclic GC during a sync: a full one allocates millions of objects, and with
        # the agent's heap the collector's passes cost more than the sync itself (2.5x at
        # 10,000 services). The state is acyclic: reference counting frees it.
        collecting = gc.isenabled()
        gc.disable()
        synced = False
        try:
            synced = self._sync_changes()
        finally:
            if synced and not self._frozen:
                # What the first sync built lives as long as the agent: out of the
                # collector's sight from now on, and before it is switched back on (its
                # first pass would walk all of it: 0.25 s at 10,000 services, 0.7 s at
                # 30,000, just after the commit).
                gc.freeze()
                self._frozen = True
                collecting = collecting or self._release_start_gc()
            if collecting:
                gc.enable()
        if synced and self._trim_heap:
            self._trim_heap = False
            trim_heap()
        return synced

    def _hold_start_gc(self) -> None:
        """No cyclic GC from the start to the first sync: the lists and their translation
        allocate millions of objects, acyclic (freed by reference counting), and the
        collector's passes over them cost ~0.15 s at 10,000 services."""
        if gc.isenabled() and not self._frozen:
            gc.disable()
            self._gc_held_since = self.deps.monotonic()

    def _release_start_gc(self) -> bool:
        """End `_hold_start_gc` (True when it held the GC). Called by the first sync, by
        `stop()`, and by the housekeeping when no sync came within a minute."""
        held = self._gc_held_since is not None
        self._gc_held_since = None
        return held

    def _sync_changes(self) -> bool:
        # The change time first: if the source changes again in between, the newer state
        # is programmed and the older change is credited with it (never the other way).
        source_status = self.source.status()
        changes = self.source.take_changes()
        if changes is None:
            # kube-proxy's "not initialized": program nothing before a first full state.
            _log.debug("no services loaded yet; not syncing")
            return False
        catalog = changes.catalog
        interfaces = self.deps.interface_addresses()
        context = NodeContext(
            node_name=self.node_name,
            node_addresses=tuple(filter_node_addresses(interfaces, self.config.nodeport_addresses)),
            interface_addresses=canonical_addresses(interfaces),
            traffic_policies=catalog.traffic_policies,
            zone=catalog.zone,
            default_policy=catalog.default_policy,
        )
        if context == self._context:
            context = self._context  # the same object: each service's check is `is`
        # A new node context (addresses, zone) may change any service: all are checked.
        # The periodic resync checks all too, but not in the sync of the change that finds
        # it due: the change goes first, alone, and the resync follows in the next sync (a
        # walk of every service, ~0.3 s at 100,000, that the change would wait for). Once:
        # under a steady stream of changes the next sync is the resync.
        due = self.deps.monotonic() - self._last_full >= self.config.sync_period
        deferred = (
            due and bool(changes.keys) and context is self._context and not self._resync_deferred
        )
        full = context is not self._context or (due and not deferred)
        if self._rules_damaged:
            # Found by the check (off this thread): reinstall, then a full load.
            _log.error("pykp's rules were removed or changed by someone else: restoring them")
            self._rules_damaged = False
            self.rules.install()
            self.metrics.rules_repairs += 1
            self.service_sync.reset()
        elif self._elements_damaged:
            self._elements_damaged = False
            self.metrics.rules_repairs += 1
            self.service_sync.reset()
        try:
            result = self.service_sync.sync(catalog, None if full else changes.keys, context)
        except Exception:
            # What the kernel and the caches hold is uncertain: start over from a full load.
            self.service_sync.reset()
            self._health_check_stale = True
            raise
        if full:
            # Counted from its end: a first sync of 20 s is not followed by a resync 10 s on.
            self._last_full = self.deps.monotonic()
        self._resync_deferred = deferred
        if deferred:
            self.runner.run()
        if result.full_load:
            self._trim_heap = True
        self._context = context
        self._sync_health_checks(
            catalog, None if full or self._health_check_stale else changes.keys, context
        )
        self._health_check_stale = False
        self.metrics.service_changes += result.service_changes
        self.metrics.endpoint_changes += result.endpoint_changes
        self._note_refusals(self.service_sync.refused)
        if self._running and not self.datapath.running:
            # Only now, with the engine loaded: a reader bound earlier would refuse what it
            # does not know yet, where --queue-bypass lets the kernel path serve it.
            self.datapath.start()
            self._start_follower()
        if (
            self.config.watch_rules
            and self._running
            and not self._monitor_started
            and not self._stop.is_set()
        ):
            self._monitor_started = True
            self._start_monitor()

        # Record first: the programming latency ends with the commit.
        wall = self.deps.wall_clock()
        change = source_status.changed_at
        if (
            change is not None
            and change != self._programmed_change
            and change >= self._started_wall  # kube-proxy ignores changes from before it started
            and wall >= change
        ):
            self.metrics.network_programming.observe(wall - change)
        self._programmed_change = change
        self.metrics.last_sync_timestamp = wall
        self.health.updated()
        # Stale UDP: after the commit, so the next datagram is decided on the new rules.
        self._delete_stale_udp(result.stale_udp)
        self._delete_unnated_udp(result.newly_served_udp)
        if result.retry:
            self.runner.run()
        self._status_dirty = True
        if self.config.status_interval <= 0:
            self._write_status()
        _log.debug(
            "synced %d services (%s): %d engine services staged, %d removed, elements +%d -%d",
            result.services,
            "full load" if result.full_load else ("full resync" if full else "changes"),
            result.upserted,
            result.removed,
            result.elements_added,
            result.elements_removed,
        )
        # A sync that changed nothing (no service touched, not a full pass) does not hold
        # the next one back by --min-sync-period: after a first sync of 30,000 services, a
        # notification that came in meanwhile made such a sync, and the first real change
        # then waited ~0.5 s behind it.
        nothing = not full and not changes.keys and not result.full_load
        return not (nothing and result.upserted == 0 and result.removed == 0)

    def _check_rules(self) -> None:
        """kube-proxy's canary, for the whole rule set, twice per --sync-period, off the
        sync path, and at once when the rules monitor asks: are pykp's table, chains and
        their rules, sets and jumps all there (read from the kernel without its elements),
        and does every set and map hold as many elements as the agent programmed? Damage (a
        flush, another tool) is undone by the next sync, which it requests: a reinstall and
        a full load."""
        if not self._running:
            return
        self._undecided_connections()
        if not self.rules.installed():
            self._rules_damaged = True
            self.runner.run()
            return
        self._check_elements()

    def _undecided_connections(self) -> int:
        """The kernel path's undecided counter, read live (one request to the kernel)."""
        try:
            self._undecided = self.rules.undecided_connections()
        except Exception:  # noqa: BLE001 - a scrape shows the last value read
            _log.debug("reading the undecided counter failed", exc_info=True)
        return self._undecided

    def _check_elements(self) -> None:
        """Do the kernel's sets and maps hold as many elements as the
        agent programmed? Someone deleting elements (a flush of one set, a delete) is
        otherwise invisible: the agent sends only changes. A mismatch makes the next sync
        a full load (counted as a repair)."""
        counter = getattr(self.rules, "element_counts", None)
        if counter is None:
            return
        with self._sync_lock:
            wanted = self.service_sync.element_counts()
        if wanted is None:
            return
        generation, expected = wanted
        if sum(expected.values()) > _ELEMENT_CHECK_LIMIT:
            # nft lists a set by loading every element of the table: past this size the
            # check costs seconds and a gigabyte each time. Chains and sets are still
            # checked; a flush of one set's elements is then found by the next full resync
            # only if something else changed.
            if not self._element_check_off_logged:
                _log.info(
                    "%d elements: checking the sets' element counts is off past %d",
                    sum(expected.values()),
                    _ELEMENT_CHECK_LIMIT,
                )
                self._element_check_off_logged = True
            return
        found = counter()
        with self._sync_lock:
            now = self.service_sync.element_counts()
            if now is None or now[0] != generation:
                return  # a sync changed them meanwhile: compare next time
        damaged = sorted(
            f"{name} ({found.get(name, -1)} elements, {count} programmed)"
            for name, count in expected.items()
            if found.get(name, -1) != count
        )
        if damaged:
            _log.error(
                "pykp's sets and maps were changed by someone else (%s): reloading them",
                ", ".join(damaged),
            )
            self._elements_damaged = True
            self.runner.run()

    def _note_refusals(self, refused: Mapping[str, str]) -> None:
        """Log each refusal once while it lasts, and count it (pykp_invalid_objects_total)."""
        new = {
            name: message for name, message in refused.items() if self._refused.get(name) != message
        }
        for name, message in new.items():
            _log.error("service %s refused (skipped): %s", name, message)
        self.metrics.refused_services += len(new)
        self._refused = dict(refused)

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

    def _sync_health_checks(
        self, catalog: Catalog, keys: Iterable[str] | None, context: NodeContext
    ) -> None:
        """The services' health check servers after a sync: `keys` the services that
        changed (None: all). Never raises: a port that cannot be bound is retried later."""
        wanted = self._health_check_wanted
        if keys is None:
            wanted.clear()
            keys = catalog.keys()
        for key in keys:
            spec = catalog.get(key)
            if (
                spec is None
                or spec.health_check_node_port is None
                or spec.external_traffic_policy != "Local"
            ):
                wanted.pop(key, None)
            else:
                wanted[key] = HealthCheck(
                    spec.health_check_node_port, spec.local_ready_endpoints(self.node_name)
                )
        if not wanted and not self.health_checks.statuses():
            return
        # kube-proxy listens on the --nodeport-addresses, and on every address without.
        hosts = context.node_addresses if self.config.nodeport_addresses else WILDCARD
        if self._running and not self._stop.is_set():
            try:
                self.health_checks.sync(wanted, hosts or WILDCARD)
            except Exception:  # noqa: BLE001 - the proxy's sync succeeded
                _log.exception("updating the health check servers failed")

    def _delete_unnated_udp(self, frontends: Sequence[tuple[str, int]]) -> None:
        """UDP frontends now served: their flows that began unserved were never NATed."""
        if not frontends:
            return
        try:
            deleted = self.deps.delete_unnated_udp_flows(frontends)
        except Exception as error:  # noqa: BLE001 - they time out anyway
            self.metrics.conntrack_cleanup_errors += 1
            _log.warning("cannot delete un-NATed UDP conntrack entries: %s", error)
            return
        self.metrics.stale_udp_flows_deleted += deleted
        _log.debug(
            "%d UDP frontends newly served: deleted %d un-NATed conntrack entries",
            len(frontends),
            deleted,
        )

    # -- reporting

    def snapshot(self, flows: int | None = None) -> dict[str, Any]:
        """The status snapshot (`/status`, the state file, `pykp status`)."""
        limit = self.config.status_flows if flows is None else flows
        context = self._context
        snapshot = build_status(
            node_name=self.node_name,
            node_addresses=list(context.node_addresses) if context else [],
            # The first --status-services by name: at 100,000 services a full listing
            # costs seconds of the interpreter, every time the file is written.
            services=_first_services(self.service_sync.applied, self.config.status_services),
            services_total=len(self.service_sync.applied),
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
        snapshot["kernelPathUndecided"] = self._undecided_connections()
        snapshot["proxyMode"] = PROXY_MODE
        snapshot["conntrackSysctls"] = [result.as_json() for result in self._conntrack_sysctls]
        snapshot["healthChecks"] = [status.as_json() for status in self.health_checks.statuses()]
        follower = self.follower
        snapshot["conntrackFollower"] = (
            follower.stats() if follower is not None and follower.running else None
        )
        return snapshot

    def explain(self, service: str, client: str | None) -> dict[str, Any]:
        """`/explain`: what a new connection to `service` from `client` gets here, and why."""
        context = self._context
        node = NodeView(self.node_name)
        if context is not None:
            node = NodeView(
                context.node_name,
                tuple(context.node_addresses),
                context.traffic_policies,
                context.zone,
                tuple(self.config.cluster_cidrs),
            )
        return explain_report(
            self.engine,
            self.service_sync.applied,
            self.service_sync.spec,
            node,
            service,
            client,
            kernel_random=self.config.kernel_random,
            kernel_round_robin=self.config.kernel_round_robin,
        )

    def _flush_status(self) -> None:
        if self._status_dirty:
            self._write_status()

    def _write_status(self) -> None:
        self._status_dirty = False
        self._status_written = self.deps.monotonic()
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

    def kernel_flows(self, query: Mapping[str, str]) -> dict[str, Any]:
        """`/flows`: the kernel's live service flows, filtered by `service` (a name, or a
        prefix ending in ':' or '/') and `backend` (ip or ip:port), at most `limit`."""
        return flows_report(
            self.deps.kernel_flows(self.engine, FLOWS_LISTED_MAX),
            service=query.get("service"),
            backend=query.get("backend"),
            limit=int(query.get("limit", "100")),
            follower=self.follower.stats() if self.follower is not None else None,
        )

    def _flow_families(self) -> list[Family]:
        stats = self.follower.stats() if self.follower is not None else {}
        families = follower_families(stats)
        if self.config.flow_metrics_limit > 0 and stats:
            families.append(
                active_flow_family(self.engine.flow_counts(), self.config.flow_metrics_limit)
            )
        return families

    def _kernel_path_families(self) -> list[Family]:
        return [
            Family.single(
                "pykp_kernel_path_undecided_connections_total",
                "counter",
                "Connections to services pykp's reader decides (round-robin, Maglev, "
                "least-conn, affinity) that the kernel path served at random instead, because "
                "no reader was bound, it was stalled or its queue was full",
                self._undecided_connections(),
            )
        ]

    def _state_families(self) -> list[Family]:
        source = self.source.status()
        return [
            Family.single(
                "pykp_services",
                "gauge",
                "Engine services (one per service port) programmed",
                self.service_sync.programmed,
            ),
            Family.single(
                "pykp_backends",
                "gauge",
                "Backends (distinct address and port) the engine knows",
                # Counted from the sync's map, not the engine's (a copy per scrape).
                len(self.service_sync.backends),
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
                "pykp_healthcheck_bind_errors_total",
                "counter",
                "Failed attempts to listen on a service's health check node port (retried at "
                "later syncs)",
                self.health_checks.bind_errors,
            ),
            Family.single(
                "pykp_healthcheck_servers",
                "gauge",
                "Services' health check node ports served",
                len(self.health_checks.bound_ports()),
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


def _first_services(applied: Mapping[str, EngineService], count: int) -> list[EngineService]:
    """The first `count` engine services by name (each is built when read: a few of them,
    not every one)."""
    services = []
    for name in heapq.nsmallest(count, applied):  # the names are copied in one call
        try:
            services.append(applied[name])
        except KeyError:  # removed by a sync meanwhile
            continue
    return services


def _codes(counts: Mapping[tuple[str, int], int], path: str) -> dict[str, float]:
    return {str(code): count for (where, code), count in counts.items() if where == path}
