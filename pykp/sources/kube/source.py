"""The Kubernetes source: the agent's view of Services and EndpointSlices.

Shape (the agent's source protocol, `pykp.sources.file.ServiceSource`): `start(notify)`,
`current()`, `stop()`, `problems()`, `status()`, plus `last_change_time()` and
`invalid_objects_total`. Three reflectors (Services, EndpointSlices and, with
a node name, this node's Node for its zone) keep caches equal to the API. Each event is
translated as it comes, for the one object it names; a service's spec (the Service and its
EndpointSlices merged) is rebuilt only when one of them changed, and `take_changes()` tells
the agent which services those were.

Like kube-proxy, nothing is offered before the first lists of Services and
EndpointSlices are in (`current()` is None until then), and an unreachable API server
changes nothing: the last state stays.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pykp.model import DEFAULT_POLICY, Catalog, Problem, ServiceSpec
from pykp.sources.base import ChangeLog, Changes, SourceStatus
from pykp.sources.kube.client import ApiListWatch, Timeouts, raw_list_function
from pykp.sources.kube.connection import Connection, connect
from pykp.sources.kube.translate import (
    KubeProblem,
    NodeInfo,
    ParsedSlice,
    parse_endpoint_slice,
    parse_node,
    parse_service,
    service_endpoints,
)
from pykp.sources.kube.watch import Backoff, ListWatch, Reflector, ReflectorStats
from pykp.sources.snapshot import LayeredTable, LazyValues

log = logging.getLogger("pykp.sources.kube")

_GATING = ("services", "endpointslices")  # the lists that must be in before programming

JSON = Mapping[str, Any]


class KubeSource:
    """Services from the Kubernetes API, for `pykp run` (see the module docstring).

    `list_watches` replaces the API client (tests); otherwise one is made from
    `kubeconfig`/`master`/`context` as `connection.connect` does. `node_name` is this
    node's name (kube-proxy's --hostname-override): it selects the Node read for the
    zone, and must be the node name the agent passes to `services_file_to_engine`.
    """

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        master: str | None = None,
        context: str | None = None,
        node_name: str | None = None,
        default_policy: str = DEFAULT_POLICY,
        timeouts: Timeouts | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        list_watches: Mapping[str, ListWatch] | None = None,
    ) -> None:
        self.node_name = node_name
        self.default_policy = default_policy
        default = "in-cluster" if "KUBERNETES_SERVICE_HOST" in os.environ else "~/.kube/config"
        self.name = f"kubernetes:{kubeconfig or master or default}"
        self._connection: Connection | None = None
        if list_watches is None:
            self._connection = connect(kubeconfig, master, context)
            list_watches = _api_list_watches(self._connection, node_name, timeouts or Timeouts())
        self._reflectors = {
            name: Reflector(
                list_watch,
                functools.partial(self._changed, name),
                backoff=Backoff(initial=backoff_initial, maximum=backoff_max),
            )
            for name, list_watch in list_watches.items()
        }
        self._lock = threading.Lock()
        self._notify: Callable[[], None] | None = None
        self._last_change: float | None = None
        # What the API holds, translated object by object (under _lock).
        self._slices: dict[str, ParsedSlice] = {}
        # service key -> its slices' keys: the key itself when it is the only one (as most
        # are: a tuple of one costs 48 bytes more, a dict of one 232)
        self._slices_of: dict[str, str | tuple[str, ...]] = {}
        self._node: NodeInfo | None = None
        self._object_problems: dict[tuple[str, str], list[KubeProblem]] = {}
        self._invalid_objects_total = 0
        # key -> each Service's spec: as parsed (its endpoints not merged yet) until the
        # rebuild merges them, which the services `_stale` names. One table of specs, one
        # spec per service; the last catalog's `by_key` is `_built`, a snapshot of it.
        self._stale: set[str] = set()
        self._table: LayeredTable[ServiceSpec] = LayeredTable()
        self._built: Mapping[str, ServiceSpec] = {}
        self._catalog: Catalog | None = None
        self._changes = ChangeLog()

    # -- the source protocol

    def start(self, notify: Callable[[], None]) -> None:
        """Start listing and watching; `notify()` follows every change (from a thread)."""
        self._notify = notify
        for reflector in self._reflectors.values():
            reflector.start()

    def stop(self) -> None:
        for reflector in self._reflectors.values():
            reflector.stop()
        if self._connection is not None:
            self._connection.close()

    def current(self) -> Catalog | None:
        """None until every first list is in; then the services the API describes."""
        if not self.synced:
            return None
        with self._lock:
            return self._rebuild()

    def take_changes(self) -> Changes | None:
        if not self.synced:
            return None
        with self._lock:
            catalog = self._rebuild()
            return Changes(catalog, self._changes.take())

    def problems(self) -> list[Problem]:
        """The objects (or parts) left out, and why; each is a `KubeProblem`."""
        with self._lock:
            return [p for problems in self._object_problems.values() for p in problems]

    @property
    def invalid_objects_total(self) -> int:
        """Problems found so far, each object version counted once (a counter)."""
        with self._lock:
            return self._invalid_objects_total

    def status(self) -> SourceStatus:
        """Health for metrics and /status: lists and failures summed over the resources."""
        stats = [reflector.stats for reflector in self._reflectors.values()]
        errors = [s.last_error for s in stats if s.last_error is not None]
        return SourceStatus(
            name=self.name,
            initialized=self.synced,
            changed_at=self.last_change_time(),
            loads=sum(s.lists for s in stats),
            load_errors=sum(s.errors for s in stats),
            invalid_objects=self.invalid_objects_total,
            last_error=errors[0] if errors else None,
        )

    def last_change_time(self) -> float | None:
        """time.time() when the cache last changed (for network-programming latency)."""
        with self._lock:
            return self._last_change

    # -- more for the agent and for tests

    @property
    def synced(self) -> bool:
        """kube-proxy's "initialized": the first lists of Services and EndpointSlices are in.

        The Node does not gate (as in kube-proxy): its zone only narrows endpoints by
        topology hints, and a node that may not read Nodes must still proxy.
        """
        return all(self._reflectors[name].synced for name in _GATING if name in self._reflectors)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(
            self._reflectors[name].wait_synced(max(0.0, deadline - time.monotonic()))
            for name in _GATING
            if name in self._reflectors
        )

    def node(self) -> NodeInfo | None:
        """This node as the API last described it (zone, addresses); None if unknown."""
        with self._lock:
            return self._node

    def stats(self) -> dict[str, ReflectorStats]:
        return {name: reflector.stats for name, reflector in self._reflectors.items()}

    def resource_versions(self) -> dict[str, str]:
        return {name: reflector.resource_version for name, reflector in self._reflectors.items()}

    # -- internals

    def _changed(self, kind: str, objects: Mapping[str, JSON | None]) -> None:
        """A reflector's objects changed: translate those, note which services they touch."""
        with self._lock:
            for key, obj in objects.items():
                if kind == "services":
                    self._service_changed(key, obj)
                elif kind == "endpointslices":
                    self._slice_changed(key, obj)
                else:
                    self._node_changed(key, obj)
            self._last_change = time.time()
            notify = self._notify
        if notify is not None:
            notify()

    def _service_changed(self, key: str, obj: JSON | None) -> None:
        parsed, problems = (None, []) if obj is None else parse_service(obj, self.default_policy)
        self._set_problems(("Service", key), problems)
        if parsed is None:
            self._table.delete(key)
        else:
            if parsed.key != key:
                key = parsed.key  # as the object itself spells it
            # Its endpoints are merged in at the rebuild, before any snapshot shows it.
            self._table.set(key, parsed.spec)
        # The reflector's string, not a copy of it (one string per service key).
        self._stale.add(key)

    def _slice_changed(self, key: str, obj: JSON | None) -> None:
        parsed, problems = (None, []) if obj is None else parse_endpoint_slice(obj)
        self._set_problems(("EndpointSlice", key), problems)
        old = self._slices.pop(key, None)
        if old is not None:
            siblings = tuple(k for k in self._slice_keys(old.service_key) if k != key)
            if siblings:
                self._slices_of[old.service_key] = siblings[0] if len(siblings) == 1 else siblings
            else:
                self._slices_of.pop(old.service_key, None)
            self._stale.add(old.service_key)
        if parsed is not None:
            self._slices[key] = parsed
            others = self._slice_keys(parsed.service_key)
            self._slices_of[parsed.service_key] = (*others, key) if others else key
            self._stale.add(parsed.service_key)

    def _node_changed(self, key: str, obj: JSON | None) -> None:
        node, problems = (None, []) if obj is None else parse_node(obj)
        self._set_problems(("Node", key), problems)
        zone = self._node.zone if self._node is not None else None
        self._node = node
        if (node.zone if node is not None else None) != zone:
            # Topology hints are read against the zone: every service may change.
            self._stale.update(self._table.keys())
            self._catalog = None
            self._changes.everything()

    def _set_problems(self, where: tuple[str, str], problems: list[KubeProblem]) -> None:
        """Log and count each problem once per object version (an unchanged object that
        is listed again reports nothing new)."""
        before = self._object_problems.get(where, [])
        for problem in problems:
            if problem not in before:
                log.warning("invalid object: %s", problem)
                self._invalid_objects_total += 1
        if problems:
            self._object_problems[where] = problems
        else:
            self._object_problems.pop(where, None)

    def _slice_keys(self, service_key: str) -> tuple[str, ...]:
        keys = self._slices_of.get(service_key, ())
        return (keys,) if isinstance(keys, str) else keys

    def _rebuild(self) -> Catalog:
        """The catalog, with the specs of the services whose objects changed rebuilt."""
        changed: list[str] = []
        for key in self._stale:
            parsed = self._table.get(key)
            old = self._built.get(key)
            if parsed is None:
                if old is not None:
                    changed.append(key)  # deleted from the table by its event
                continue
            slices = {k: self._slices[k] for k in self._slice_keys(key)}
            spec = parsed.with_endpoints(service_endpoints(parsed, slices))
            if old is not None and spec == old:
                self._table.set(key, old)  # the same object: no change to sync
            else:
                self._table.set(key, spec)
                changed.append(key)
        self._stale.clear()
        if changed or self._catalog is None:
            self._changes.add(changed)
            # Every service parsed is built now: the catalog's table is a snapshot of the
            # specs (the source goes on changing its own), taken in O(changes).
            self._built = by_key = self._table.snapshot()
            self._catalog = Catalog(
                services=LazyValues(by_key),
                default_policy=self.default_policy,
                traffic_policies=True,
                zone=self._node.zone if self._node is not None else None,
                by_key=by_key,
            )
        return self._catalog


def _api_list_watches(
    connection: Connection, node_name: str | None, timeouts: Timeouts
) -> dict[str, ListWatch]:
    list_watches: dict[str, ListWatch] = {
        "services": ApiListWatch(
            "services", raw_list_function(connection, "/api/v1/services"), timeouts=timeouts
        ),
        "endpointslices": ApiListWatch(
            "endpointslices",
            raw_list_function(connection, "/apis/discovery.k8s.io/v1/endpointslices"),
            timeouts=timeouts,
        ),
    }
    if node_name:
        list_watches["nodes"] = ApiListWatch(
            "nodes",
            raw_list_function(connection, "/api/v1/nodes"),
            field_selector=f"metadata.name={node_name}",
            timeouts=timeouts,
        )
    return list_watches
