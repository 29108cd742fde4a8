"""One sync, incremental: the services that changed in, engine and rule changes out.

For each changed service (its key named by the source, or every key on a full resync):
translate it (node addresses, frontend ownership, engine services), stage the engine
services that differ in one engine batch, render their rule elements, then commit in the
order that never shows a new connection a half-applied change:

1. one nft transaction adds the new elements (new backend ids' map entries included) and
   replaces changed ones;
2. the engine publishes the batch (one snapshot swap);
3. one nft transaction removes what nobody holds any more.

Work per sync is proportional to what changed, not to the number of services; a service
whose spec object and node context are unchanged is skipped by identity.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from pykp.agent.backend_table import BackendTable
from pykp.agent.ownership import NODE_PORT, Claim, FrontendOwners, claim_text
from pykp.agent.plan import (
    EXTERNAL_SUFFIX,
    EngineBackend,
    EngineService,
    engine_update,
    service_ports_to_engine,
)
from pykp.model import Catalog, ServiceSpec
from pykp.netfilter.elements import (
    BackendElements,
    ElementDelta,
    ElementTracker,
    frontend_contribution,
)
from pykp.netfilter.part_load import PartLoad
from pykp.netfilter.rules import MAX_SLOTS, FrontendRule, MarkLayout, rr_chain_name

if TYPE_CHECKING:
    from pykp._fastpath import Engine, ServiceUpdate

__all__ = [
    "NodeContext",
    "RulesLike",
    "ServiceSync",
    "SyncResult",
    "fallback_slots",
    "kernel_decider",
    "newly_served_udp_frontends",
    "stale_udp_flows",
    "without_node_address_ips",
]

Pool = list[tuple[int, int]]  # (backend id, weight)
_NONE: Mapping[str, str] = MappingProxyType({})
_NO_CLAIMS: Mapping[Claim, str] = MappingProxyType({})


class RulesLike(Protocol):
    """The element operations of pykp.netfilter.rules.RuleManager."""

    holds_no_elements: bool  # a first load may go in parts (`add_elements`)

    def load_elements(self, wanted: Mapping[str, Mapping[str, str]]) -> int: ...
    def add_elements(
        self,
        added: Mapping[str, Sequence[str]],
        replaced: Mapping[str, Sequence[tuple[str, str]]] = ...,
    ) -> None: ...
    def remove_elements(self, removed: Mapping[str, Sequence[str]]) -> None: ...


@dataclass(frozen=True)
class NodeContext:
    """What a service's translation depends on besides the service."""

    node_name: str | None
    node_addresses: tuple[str, ...]  # where NodePorts listen
    interface_addresses: frozenset[str]  # every address of the node (capture check)
    traffic_policies: bool
    zone: str | None
    default_policy: str


@dataclass(slots=True)
class _Plan:
    """What one service translated to, and from what.

    Its engine services are not held: `ServiceSync._built` builds them again from the
    plan (a pure function of `spec`, `context` and `lost`), for the few services a change
    touches. Held, they cost ~600 bytes per service (60 MB at 100,000 services) for what
    the engine holds anyway.
    """

    spec: ServiceSpec
    context: NodeContext
    # Its engine services' names: the name alone when there is one, as for most services
    # (a tuple of one costs 48 bytes more); read through `_names`.
    names: str | tuple[str, ...]
    lost: Mapping[Claim, str]  # the frontends older services held when it was planned
    # What rendering needs besides the engine service, the same for each of them: the
    # service's ClusterIPs, its addresses that are not the node's, whether it masquerades.
    # Tuples: a frozenset of one address costs 216 bytes, and this is held per service.
    cluster_ips: tuple[str, ...]
    service_ips: tuple[str, ...]
    masquerade: bool
    refused: Mapping[str, str]


@dataclass
class SyncResult:
    """What a sync did."""

    services: int  # keys translated
    upserted: int  # engine services staged
    removed: int  # engine services removed
    elements_added: int
    elements_removed: int
    full_load: bool
    stale_udp: list[tuple[str, str, int]] = field(default_factory=list)
    newly_served_udp: list[tuple[str, int]] = field(default_factory=list)
    service_changes: int = 0
    endpoint_changes: int = 0
    # Refused services may fit now (backend ids were freed): sync again soon.
    retry: bool = False


class ServiceSync:
    """The incremental pipeline's state: plans by service, the engine's services, the
    rule elements wanted. `reset()` drops it all: the next sync is a full one."""

    def __init__(
        self,
        engine: Engine,
        rules: RulesLike,
        layout: MarkLayout,
        *,
        kernel_random: bool,
        allow_node_address_service_ips: bool,
        kernel_round_robin: bool = True,
    ) -> None:
        self.engine = engine
        self.rules = rules
        self.layout = layout
        self.kernel_random = kernel_random
        self.kernel_round_robin = kernel_round_robin
        self.allow_node_address_service_ips = allow_node_address_service_ips
        # The engine services the engine holds are asked of it (`engine.holds`: a set of
        # their names here cost 4 MB at 100,000 services); each is as its plan builds it,
        # kept across `reset()` with the plans they were built from (`_before_reset`)
        # until a full sync has planned every service again.
        self._plans: dict[str, _Plan] = {}
        self._before_reset: dict[str, _Plan] = {}
        self._parts: PartLoad | None = None  # a first load's, during its sync
        # Engine services the engine and the kernel hold, as of the last sync's end (the
        # engine may hold them sooner: a first load in parts commits it first).
        self.programmed = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything but what the engine holds: the next sync re-derives every
        service and reloads every element."""
        self._before_reset = {**self._before_reset, **self._plans}
        self._plans = {}
        self._owners = FrontendOwners()
        self._elements = ElementTracker()
        self._backends = BackendTable()
        self._backend_elements = BackendElements(self.layout)
        self._full_load = True
        self._refused: dict[str, str] = {}
        # Services with an engine service the engine refused, retried by the sync after
        # one that freed backend ids (and by every full resync).
        self._retry: set[str] = set()
        self._freed = False
        self._orphans: dict[str, set[str]] = {}

    # -- reading

    @property
    def applied(self) -> Mapping[str, EngineService]:
        """The engine services the engine holds, by name (each built on access)."""
        return _Applied(self)

    @property
    def refused(self) -> Mapping[str, str]:
        return self._refused

    def spec(self, key: str) -> ServiceSpec | None:
        """The service `key` as its engine services were last built from (for explain)."""
        plan = self._plans.get(key)
        return plan.spec if plan is not None else None

    @property
    def backends(self) -> Mapping[int, tuple[str, int]]:
        return self._backends

    def elements(self) -> dict[str, dict[str, str]]:
        return {**self._elements.wanted(), **BackendElements(self.layout).load(self._backends)}

    def element_counts(self) -> tuple[int, dict[str, int]] | None:
        """(generation, elements wanted per set) as the kernel should hold them now; None
        while a change is not fully committed (a full load is pending)."""
        if self._full_load:
            return None
        generation = self._elements.generation + self._backend_elements.generation
        return generation, {**self._elements.counts(), **self._backend_elements.counts()}

    # -- the sync

    def sync(
        self, catalog: Catalog, keys: Iterable[str] | None, context: NodeContext
    ) -> SyncResult:
        """Bring the engine and the rules to `catalog` for `keys` (None: every key).

        Raises on a failed commit, after which `reset()` must be called (the agent does):
        the next sync then starts from a full reload.
        """
        try:
            return self._sync(catalog, keys, context)
        finally:
            if self._parts is not None:  # a failed sync's parts: none sent after it
                self._parts.close()
                self._parts = None

    def _sync(
        self, catalog: Catalog, keys: Iterable[str] | None, context: NodeContext
    ) -> SyncResult:
        full = keys is None or self._full_load
        # After a reset the engine may hold services no plan knows: their names by key,
        # built once (never a scan of every name per key).
        self._orphans = {}
        if not self._plans:
            for name in self.engine.services():
                self._orphans.setdefault(_key_of(name), set()).add(name)
        candidates: Iterable[str]
        if full:
            # Each key once, without sets of every key: three of them, freed at once, left
            # the agent 21 MiB larger after its first periodic resync at 100,000 services.
            plans, listed = self._plans, catalog.get
            candidates = itertools.chain(
                catalog.keys(),
                (key for key in plans if listed(key) is None),
                (k for k in self._orphans if listed(k) is None and k not in plans),
            )
        else:
            assert keys is not None
            candidates = set(keys) | (self._retry if self._freed else set())

        # (a) translate the changed services; ownership may pull in others. A full resync
        # also retries the engine services the engine refused (ids may have freed up).
        # Each key once (as the sets of candidates were), in the order found.
        work = list(
            dict.fromkeys(
                key
                for key in candidates
                if self._stale(key, catalog.get(key), context)
                or (key in self._retry and (full or self._freed))
            )
        )
        specs = {key: catalog.get(key) for key in work}
        pending = list(work)
        seen = set(work)
        while pending:
            key = pending.pop()
            for other in self._owners.update(
                key, specs.get(key, catalog.get(key)), context.node_addresses
            ):
                if other not in seen:
                    seen.add(other)
                    specs[other] = catalog.get(other)
                    pending.append(other)
        service_changes = endpoint_changes = 0
        new_plans: dict[str, _Plan | None] = {}
        # A load into an empty engine (the first sync) upserts every engine service, with
        # nothing to compare it to: each is handed to the engine's types as it is made and
        # kept without its backends (rendering does not read them). Held whole until the
        # commit, 100,000 services' backends left ~55 MB of the interpreter's blocks free
        # but never returned, among the plans made beside them.
        holds = self.engine.holds  # what the engine publishes: unchanged until the commit
        first_load = self._full_load and self.engine.service_count() == 0
        updates: dict[str, ServiceUpdate] = {}
        udp_served: dict[str, tuple[tuple[str, int], ...]] = {}
        # The engine services of the services planned now, and of the others this sync
        # reads (built again from their plans): only for this sync.
        built: dict[str, dict[str, EngineService]] = {}
        # What the engine must change: on a first load, every engine service, as planned.
        upserts: dict[str, EngineService] = {}
        removals: list[str] = []
        previous_of: dict[str, dict[str, EngineService]] = {}
        for key in seen:
            spec = specs[key]
            old = self._plans.get(key)
            if old is None or spec is None or old.spec is not spec:
                s, e = _count_change(old.spec if old else None, spec)
                service_changes += s
                endpoint_changes += e
            if spec is None:
                new_plans[key] = None
            else:
                new_plans[key], services = self._plan(key, spec, context)
                if first_load:
                    _hand_over(services, upserts, updates, udp_served)
                else:
                    built[key] = services

        def services_of(key: str) -> dict[str, EngineService]:
            """A service's engine services: planned now, else as the engine holds them."""
            if key not in built:
                plan = self._plans.get(key) or self._before_reset.get(key)
                built[key] = self._built(plan) if plan is not None else {}
            return built[key]

        # (b) the engine services that differ from what the engine holds.
        for key in () if first_load else new_plans:
            old = self._plans.get(key) or self._before_reset.get(key)
            before = set(_names(old)) if old else set()
            if key not in self._plans:
                before |= self._orphans.get(key, set())
            after = built.get(key, {})
            # What the engine holds for this key, built again from the plan it came from.
            held = (
                self._built(old)
                if old is not None and any(holds(n) for n in (*before, *after))
                else {}
            )
            for name in before - after.keys():
                if holds(name):
                    removals.append(name)
            for name, service in after.items():
                if not holds(name) or held.get(name) != service:
                    upserts[name] = service
            if held:
                previous_of[key] = held
        # The oldest service first: the engine's own frontend check then agrees with
        # ownership, and ids run out for the newest services first.
        upserts = _oldest_first(upserts, new_plans)
        staged = self.engine.stage(
            [updates.pop(name) if first_load else engine_update(s) for name, s in upserts.items()],
            removals,
        )
        updates.clear()

        # (c) render: backends first (slots name their addresses), then each service.
        full_load = self._full_load
        # Updated in place on a change (a copy would cost O(backends) per change: 5 ms at
        # 100,000 services); a failed sync is followed by reset() and a full load anyway.
        backends = BackendTable(self.engine.backend_ids()) if full_load else self._backends
        new_ids = staged.backends_added
        backends.update(new_ids)
        for backend_id in staged.backends_removed:
            backends.pop(backend_id, None)
        # What rendering reads the ids from: on a first load every id is one the batch
        # added, read from its own dict (the packed table makes each (ip, port) it hands
        # out: ~0.1 s of a first sync at 10,000 services).
        ids: _AddedIds | BackendTable = (
            _AddedIds(new_ids) if first_load and len(backends) == len(new_ids) else backends
        )
        if full_load:
            # A first load into sets that hold nothing (a table this agent made) goes in
            # parts, each sent while the next services render (`PartLoad`): the backends'
            # elements, then the services'. The engine commits first: no packet reaches it
            # before its frontend is in the kernel, and by then it knows the service.
            in_parts = first_load and self.rules.holds_no_elements
            self._elements = ElementTracker(loading=True, in_parts=in_parts)
            backend_delta = ElementDelta()
            if in_parts:
                self.engine.commit(staged)
                self._record_plans(new_plans, full_load)
                self._parts = PartLoad(self.rules.add_elements)
                self._parts.send(
                    {n: list(e.values()) for n, e in self._backend_elements.load(ids).items()}
                )
        else:
            backend_delta = self._backend_elements.change(new_ids, staged.backends_removed)
        refused_now = dict(staged.refused)
        gone = set(removals) | set(staged.removed)
        for name in gone:
            self._elements.set(name, None)
        render = {name: s for name, s in upserts.items() if name not in refused_now}
        # The pools rendering reads: a staged upsert's from the staged change as it is
        # rendered (read all at once, a first load held 100,000 of them through the
        # render), the others' from the engine, here.
        pools: dict[str, tuple[Pool, Pool]] = {}

        def pool_of(name: str) -> tuple[Pool, Pool] | None:
            pool = pools.get(name)
            return pool if pool is not None else staged.pool(name)

        def staged_pool(name: str) -> bool:
            return name in upserts and name not in refused_now

        if full_load and not first_load:  # a first load's engine held nothing to keep
            kept = [n for n in self.engine.services() if n not in gone and n not in upserts]
            pools.update(self.engine.pools(kept))
            render.update((name, services_of(_key_of(name))[name]) for name in kept)

        def plan_of(key: str) -> _Plan:
            plan = new_plans.get(key) or self._plans.get(key)
            assert plan is not None
            return plan

        # A short-circuited external service's kernel-path slots hold its internal
        # service's backends: it is rendered again when only the internal one changed (a
        # full load renders every service anyway).
        for name in [] if full_load else list(render):
            sibling = services_of(_key_of(name)).get(name + EXTERNAL_SUFFIX)
            if (
                sibling is not None
                and sibling.short_circuit == name
                and sibling.name not in upserts  # else rendered, or refused
                and holds(sibling.name)
            ):
                render[sibling.name] = sibling
        wanted_pools = {n for n in render if n not in pools and not staged_pool(n)}
        wanted_pools |= {
            s.short_circuit
            for s in render.values()
            if s.short_circuit and s.short_circuit not in pools and not staged_pool(s.short_circuit)
        }
        if wanted_pools:
            pools.update(self.engine.pools(sorted(wanted_pools)))

        for name in refused_now:
            self._elements.set(name, None)
        parts = self._parts
        for rendered, (name, service) in enumerate(render.items(), 1):
            short_circuit_pools = pool_of(service.short_circuit) if service.short_circuit else None
            self._elements.set(
                name,
                self._contribution(
                    service,
                    plan_of(_key_of(name)),
                    pool_of(name) or ([], []),
                    ids,
                    short_circuit_pools,
                ),
            )
            if first_load:
                # Read for the last time (only names are read past here on a first
                # load): freed now, where the render's own objects may reuse its memory.
                # At 30,000 services that left 6 MiB less free; at 100,000 the holes stay
                # (the render keeps objects of other sizes).
                upserts[name] = render[name] = _RENDERED
            if parts is not None and rendered % _PART_SERVICES == 0:
                parts.send(self._elements.take_part())
        delta = ElementDelta() if full_load else self._elements.take_delta()
        # The backends' sets and maps are theirs alone: their changes join the delta.
        delta.added.update(backend_delta.added)
        delta.removed.update(backend_delta.removed)

        # (d) commit: additions, the engine, removals.
        if parts is not None:
            parts.send(self._elements.take_part())
            parts.finish()
            self._elements.loaded()
        elif full_load:
            # The backends' elements made last, once rendering has made what it keeps:
            # dropped after the load, they leave no holes among it.
            backend_elements = self._backend_elements.load(ids)
            self.rules.load_elements({**self._elements.wanted(), **backend_elements})
            del backend_elements
            self._elements.loaded()
        else:
            self.rules.add_elements(delta.added, delta.replaced)
        # What the engine held of what this commit replaces or removes (read before it).
        # None on a first load, whose every name would be walked for nothing.
        previous = {
            name: service
            for key in ({_key_of(name) for name in gone | upserts.keys()} if previous_of else ())
            for name, service in previous_of.get(key, {}).items()
            if (name in gone or name in upserts) and holds(name)
        }
        if parts is None:  # else committed before the parts
            self.engine.commit(staged)
            self._record_plans(new_plans, full_load)
        self._backends = backends
        self._full_load = True  # until the removals are in too
        if not full_load:
            self.rules.remove_elements(delta.removed)
        self._full_load = False

        # (e) record.
        if first_load:  # nothing before: every UDP frontend served now (its backends gone)
            stale: list[tuple[str, str, int]] = []
            newly_served = sorted(
                {f for name, udp in udp_served.items() if name not in refused_now for f in udp}
            )
        else:
            changed = {name: s for name, s in upserts.items() if name not in refused_now}
            stale = stale_udp_flows(previous, changed)
            newly_served = newly_served_udp_frontends(previous, changed)
        # The refusals of the services synced go (once over the refusals, not once per
        # service: a first sync with thousands refused was quadratic), their plans' come.
        for name in [n for n in self._refused if _key_of(n.split(" (", 1)[0]) in new_plans]:
            del self._refused[name]
        for plan in new_plans.values():
            if plan is not None:
                self._refused.update(plan.refused)
        for name, message in refused_now.items():
            self._refused[name] = message
        self._retry = {_key_of(name) for name in refused_now} | {
            key for key in self._retry - new_plans.keys()
        }
        self._freed = bool(staged.backends_removed)
        self.programmed = self.engine.service_count()
        added, removed = delta.counts
        return SyncResult(
            services=len(new_plans),
            upserted=len(upserts),
            removed=len(gone),
            elements_added=(
                len(self._elements) + sum(self._backend_elements.counts().values())
                if full_load
                else added
            ),
            elements_removed=0 if full_load else removed,
            full_load=full_load,
            stale_udp=stale,
            newly_served_udp=newly_served,
            service_changes=service_changes,
            endpoint_changes=endpoint_changes,
            retry=bool(self._retry and self._freed),
        )

    # -- pieces

    def _record_plans(self, new_plans: Mapping[str, _Plan | None], full_load: bool) -> None:
        """The plans with what the engine now holds, once it committed (a failure past
        here is followed by a reset, which builds every service again from these)."""
        for key, plan in new_plans.items():
            if plan is None:
                self._plans.pop(key, None)
            else:
                self._plans[key] = plan
        if full_load:
            self._before_reset = {}

    def _stale(self, key: str, spec: ServiceSpec | None, context: NodeContext) -> bool:
        plan = self._plans.get(key)
        if plan is None:
            return spec is not None or key in self._orphans
        return spec is not plan.spec or (context is not plan.context and context != plan.context)

    def _plan(
        self, key: str, spec: ServiceSpec, context: NodeContext
    ) -> tuple[_Plan, dict[str, EngineService]]:
        """The plan of `spec` (whose key is `key`, the catalog's string: the engine services
        are named with it) and its engine services, with ownership as it is now."""
        refused: dict[str, str] = {}  # usually none: then the plan holds the shared _NONE
        served, message = self._served(spec, context)
        if message:
            refused[f"{spec.key} (node address)"] = message
        lost = self._owners.lost(spec.key)
        if lost:
            refused[f"{spec.key} (frontend taken)"] = (
                ", ".join(
                    f"{claim_text(claim)} (held by {holder}, the older service)"
                    for claim, holder in sorted(lost.items())
                )
                + " not served: the older service keeps a contested frontend"
            )
        engine_services = _engine_services(served, context, lost, key)
        nodes = set(context.node_addresses)
        service_ips = tuple(
            dict.fromkeys(
                ip
                for ip in (*served.cluster_ips, *served.external_ips, *served.load_balancer_ips)
                if ip not in nodes
            )
        )
        if service_ips == served.cluster_ips:
            service_ips = served.cluster_ips  # the spec's tuple, not a copy (most services)
        plan = _Plan(
            spec,
            context,
            next(iter(engine_services)) if len(engine_services) == 1 else tuple(engine_services),
            lost or _NO_CLAIMS,
            served.cluster_ips,
            service_ips,
            served.external_traffic_policy == "Cluster",
            refused or _NONE,
        )
        return plan, engine_services

    def _built(self, plan: _Plan) -> dict[str, EngineService]:
        """The engine services `plan` was made with, built again (the same ones: what it
        holds is all they depend on)."""
        served, _ = self._served(plan.spec, plan.context)
        return _engine_services(served, plan.context, plan.lost)

    def _served(self, spec: ServiceSpec, context: NodeContext) -> tuple[ServiceSpec, str | None]:
        if self.allow_node_address_service_ips:
            return spec, None
        return without_node_address_ips(spec, context.interface_addresses)

    def _contribution(
        self,
        service: EngineService,
        plan: _Plan,
        pools: tuple[Pool, Pool],
        backends: Mapping[int, tuple[str, int]],
        short_circuit_pools: tuple[Pool, Pool] | None = None,
    ) -> dict[str, dict[str, str]]:
        cluster_ips, service_ips, masquerade = plan.cluster_ips, plan.service_ips, plan.masquerade
        v4_pool, v6_pool = pools
        decider = kernel_decider(
            service.policy,
            service.affinity_timeout,
            (len(v4_pool), len(v6_pool)),
            kernel_random=self.kernel_random,
            kernel_round_robin=self.kernel_round_robin,
        )
        rotates = decider == "rotation"
        queued = decider is None
        slots_of = rotation_slots if rotates else fallback_slots
        rules = []
        slots: dict[tuple[str, int, str], tuple[tuple[str, int], ...]] = {}
        short_circuit_slots: dict[tuple[str, int, str], tuple[tuple[str, int], ...]] = {}
        used_ips = set()
        for ip, port, protocol in service.frontends:
            no_local = (6 if ":" in ip else 4) in service.no_local_endpoints
            if ip in cluster_ips:
                rules.append(
                    FrontendRule(ip, port, protocol, queued=queued, no_local_endpoints=no_local)
                )
            else:
                rules.append(
                    FrontendRule(
                        ip,
                        port,
                        protocol,
                        external=True,
                        masquerade=masquerade,
                        queued=queued,
                        no_local_endpoints=no_local,
                        short_circuit=service.short_circuit is not None,
                    )
                )
            if ip in service_ips:
                used_ips.add(ip)
            pool = v4_pool if ":" not in ip else v6_pool
            slots[(ip, port, protocol)] = slots_of(pool, backends)
            if short_circuit_pools is not None and ip not in cluster_ips:
                cluster_pool = short_circuit_pools[1 if ":" in ip else 0]
                short_circuit_slots[(ip, port, protocol)] = fallback_slots(cluster_pool, backends)
        rr_chains = {v: rr_chain_name(v, service.name) for v in (4, 6)} if rotates else None
        return frontend_contribution(rules, slots, used_ips, short_circuit_slots, rr_chains)


def _engine_services(
    served: ServiceSpec, context: NodeContext, lost: Mapping[Claim, str], key: str | None = None
) -> dict[str, EngineService]:
    """A service's engine services by name, without the frontends older services hold."""
    engine_services: dict[str, EngineService] = {}
    nodes = set(context.node_addresses)
    for service in service_ports_to_engine(
        served,
        context.node_addresses,
        context.node_name,
        traffic_policies=context.traffic_policies,
        zone=context.zone,
        key=key,
    ):
        frontends = tuple(
            f
            for f in service.frontends
            if (f[0], f[1], f[2]) not in lost
            and not (f[0] in nodes and (NODE_PORT, f[1], f[2]) in lost)
        )
        if not frontends:
            continue
        if frontends != service.frontends:
            service = dataclasses.replace(service, frontends=frontends)
        engine_services[service.name] = service
    return engine_services


class _AddedIds(dict[int, tuple[str, int]]):
    """A batch's new backend ids, id -> (ip, port), as `BackendElements.load` reads them."""

    def addresses(self) -> Iterator[str]:
        return (ip for ip, _ in self.values())


def _names(plan: _Plan) -> tuple[str, ...]:
    return (plan.names,) if isinstance(plan.names, str) else plan.names


def _oldest_first(
    upserts: dict[str, EngineService], plans: Mapping[str, _Plan | None]
) -> dict[str, EngineService]:
    """`upserts` ordered by their services' age (creationTimestamp, then key)."""
    order = {key: (plan.spec.created, key) for key, plan in plans.items() if plan is not None}
    return dict(sorted(upserts.items(), key=lambda item: order[_key_of(item[0])]))


def _hand_over(
    services: dict[str, EngineService],
    upserts: dict[str, EngineService],
    updates: dict[str, ServiceUpdate],
    udp_served: dict[str, tuple[tuple[str, int], ...]],
) -> None:
    """`services` for a first load: each in `updates` as the engine takes it, its UDP
    frontends in `udp_served` when it has a usable backend (what
    `newly_served_udp_frontends` reads), and in `upserts` without its backends."""
    for name, service in services.items():
        updates[name] = engine_update(service)
        if any(_usable(backend) for backend in service.backends):
            udp = tuple((ip, port) for ip, port, protocol in service.frontends if protocol == "UDP")
            if udp:
                udp_served[name] = udp
        upserts[name] = dataclasses.replace(service, backends=())


class _Applied(Mapping[str, EngineService]):
    """`ServiceSync.applied`: the engine services the engine holds, each built from its
    plan when read (for status and explain: a few at a time). Safe to read from another
    thread than the sync's: names are copied in one call, and a plan is never changed in
    place."""

    def __init__(self, sync: ServiceSync) -> None:
        self._sync = sync

    def __getitem__(self, name: str) -> EngineService:
        sync = self._sync
        if not sync.engine.holds(name):
            raise KeyError(name)
        key = _key_of(name)
        plan = sync._plans.get(key) or sync._before_reset.get(key)
        if plan is None:
            raise KeyError(name)
        return sync._built(plan)[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._sync.engine.holds(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sync.engine.services())

    def __len__(self) -> int:
        return self._sync.engine.service_count()


def kernel_decider(
    policy: str,
    affinity_timeout: object,
    pool_sizes: tuple[int, int],
    *,
    kernel_random: bool,
    kernel_round_robin: bool,
) -> str | None:
    """Who decides a new connection to an engine service, as the sync programs it:
    "random" (the kernel draws a slot), "rotation" (the kernel's per-service counter), or
    None (the first packet is queued to pykp's reader). The kernel path holds at most
    MAX_SLOTS backends per family and no session affinity: a bigger service, or one with
    affinity, keeps the reader, which picks among all of them."""
    if affinity_timeout is not None or max(pool_sizes) > MAX_SLOTS:
        return None
    if policy == "random" and kernel_random:
        return "random"
    if policy == "round-robin" and kernel_round_robin:
        return "rotation"
    return None


def _key_of(engine_service_name: str) -> str:
    """The service key of an engine service name (`ns/name[:port][#external]`)."""
    name = engine_service_name.removesuffix(EXTERNAL_SUFFIX)
    namespace, _, rest = name.partition("/")
    return f"{namespace}/{rest.split(':', 1)[0]}"


def _count_change(old: ServiceSpec | None, new: ServiceSpec | None) -> tuple[int, int]:
    """kube-proxy's counting: (the service changed, its endpoints changed)."""
    if old is None or new is None:
        return 1, int(bool((old or new) and (old or new).endpoints))  # type: ignore[union-attr]
    service = int(old.with_endpoints(()) != new.with_endpoints(()))
    return service, int(old.endpoints != new.endpoints)


def without_node_address_ips(
    spec: ServiceSpec, node_addresses: Iterable[str]
) -> tuple[ServiceSpec, str | None]:
    """The service minus any ClusterIP, externalIP or LB IP that is one of the node's own
    addresses, and why: serving one would capture the node's own traffic to that port
    (kube-proxy's CVE-2020-8554 class). Only the address goes; the service keeps its other
    addresses and its NodePorts."""
    nodes = node_addresses if isinstance(node_addresses, (set, frozenset)) else set(node_addresses)
    if (
        nodes.isdisjoint(spec.cluster_ips)
        and nodes.isdisjoint(spec.external_ips)
        and nodes.isdisjoint(spec.load_balancer_ips)
    ):
        return spec, None  # most services: nothing to say
    fields = {
        "clusterIP": spec.cluster_ips,
        "externalIP": spec.external_ips,
        "loadBalancerIP": spec.load_balancer_ips,
    }
    taken = [f"{name} {ip}" for name, ips in fields.items() for ip in ips if ip in nodes]
    if not taken:
        return spec, None
    message = (
        f"{', '.join(taken)} not served: an address of this node, where a service "
        "would capture the node's own traffic (CVE-2020-8554); "
        "--allow-node-address-service-ips allows it"
    )
    return (
        spec.with_addresses(
            tuple(ip for ip in spec.cluster_ips if ip not in nodes),
            tuple(ip for ip in spec.external_ips if ip not in nodes),
            tuple(ip for ip in spec.load_balancer_ips if ip not in nodes),
        ),
        message,
    )


def canonical_addresses(addresses: Iterable[str]) -> frozenset[str]:
    """Addresses as `ipaddress` spells them; what is not an address is left out."""
    out = set()
    for address in addresses:
        try:
            out.add(str(ipaddress.ip_address(address.split("%")[0])))
        except ValueError:
            continue
    return frozenset(out)


def fallback_slots(
    pool: Sequence[tuple[int, int]], backends: Mapping[int, tuple[str, int]]
) -> tuple[tuple[str, int], ...]:
    """The kernel path's slots of one frontend: each backend repeated by its weight (over
    the weights' common divisor) when that fits the rules' slot limit, else once each."""
    live = [(backend_id, weight) for backend_id, weight in pool if backend_id in backends]
    if not live:
        return ()
    if len({weight for _, weight in live}) == 1:  # one weight (nearly every service): once each
        return tuple(backends[backend_id] for backend_id, _ in live[:MAX_SLOTS])
    divisor = functools.reduce(math.gcd, (weight for _, weight in live))
    shares = [weight // divisor for _, weight in live]
    if sum(shares) > MAX_SLOTS:
        shares = [1] * len(live)
    return tuple(
        backends[backend_id]
        for (backend_id, _), share in zip(live, shares, strict=True)
        for _ in range(share)
    )[:MAX_SLOTS]


def rotation_slots(
    pool: Sequence[tuple[int, int]], backends: Mapping[int, tuple[str, int]]
) -> tuple[tuple[str, int], ...]:
    """A round-robin frontend's slots on the kernel path, in the order its rotation
    visits them: each backend as often as `fallback_slots` repeats it, spread out by
    smooth weighted round-robin (weights 3:1 give a a b a, not a a a b); equal weights
    keep the pool's order."""
    slots = fallback_slots(pool, backends)
    shares: dict[tuple[str, int], int] = {}
    for backend in slots:
        shares[backend] = shares.get(backend, 0) + 1
    if len(shares) == len(slots):
        return slots
    total = len(slots)
    current = dict.fromkeys(shares, 0)
    order: list[tuple[str, int]] = []
    for _ in range(total):
        for backend, share in shares.items():
            current[backend] += share
        chosen = max(current, key=current.__getitem__)  # the first of equals: pool order
        current[chosen] -= total
        order.append(chosen)
    return tuple(order)


def _usable(backend: EngineBackend) -> bool:
    # kube-proxy clears conntrack for endpoints that were serving and no longer are.
    return backend.ready or backend.serving


# What a first load's `upserts` hold once rendered: their names are what is read after.
_RENDERED = EngineService("", (), ())
# Services per part of a load in parts: ~12,000 elements, a tenth of the kernel's time for
# 10,000 services' load (0.2-0.3 s).
_PART_SERVICES = 1000


def stale_udp_flows(
    old: Mapping[str, EngineService], new: Mapping[str, EngineService]
) -> list[tuple[str, str, int]]:
    """(frontend IP, backend IP, backend port) whose kernel UDP conntrack entries are stale.

    kube-proxy's rule: a UDP "connection" never ends, so once its backend is gone the
    kernel's NAT binding would blackhole the client's next datagrams until the entry
    times out; deleting it lets the next datagram be decided again. Stale: a backend that
    left a UDP service (or stopped serving), or every backend of a UDP frontend that went
    away. TCP is left alone: its flows end on their own (RST/timeouts), as with kube-proxy.
    `old` and `new` hold the engine services that changed (a name missing from `new` is
    gone).
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


def newly_served_udp_frontends(
    old: Mapping[str, EngineService], new: Mapping[str, EngineService]
) -> list[tuple[str, int]]:
    """(IP, port) of the UDP frontends that went from no serving backend to some.

    kube-proxy's "newly active" UDP services: a datagram sent while its frontend had no
    backend (a Service not programmed yet, or without serving endpoints) can leave a
    conntrack entry that was never NATed (`dst=<service IP> [UNREPLIED]`, the packet went
    its routed way), and the flow's later datagrams follow that entry, not the new rules,
    until it times out. Deleting it lets the next datagram be NATed. A frontend new to a
    service that already had backends (an LB IP assigned late) counts too. Same arguments
    as `stale_udp_flows`.
    """
    fresh: set[tuple[str, int]] = set()
    for name, after in new.items():
        if not any(_usable(backend) for backend in after.backends):
            continue
        before = old.get(name)
        served = (
            {(ip, port) for ip, port, protocol in before.frontends if protocol == "UDP"}
            if before is not None and any(_usable(backend) for backend in before.backends)
            else set()
        )
        for ip, port, protocol in after.frontends:
            if protocol == "UDP" and (ip, port) not in served:
                fresh.add((ip, port))
    return sorted(fresh)
