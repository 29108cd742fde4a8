"""The Kubernetes source: the agent's view of Services and EndpointSlices.

Shape (the agent's source protocol, `pykp.sources.file.ServiceSource`): `start(notify)`,
`current()`, `stop()`, `problems()`, `status()`, plus `last_change_time()` and
`invalid_objects_total`. Three reflectors (Services, EndpointSlices and, with
a node name, this node's Node for its zone) keep caches equal to the API; `current()`
translates them into a `Catalog`, re-using each object's translation until its
resourceVersion changes.

Like kube-proxy, nothing is offered before the first lists of Services and
EndpointSlices are in (`current()` is None until then), and an unreachable API server
changes nothing: the last state stays.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import kubernetes.client

from pykp.model import DEFAULT_POLICY, Problem, Catalog
from pykp.sources.file import SourceStatus
from pykp.sources.kube.client import ApiListWatch, Timeouts, api_client
from pykp.sources.kube.translate import (
    KubeProblem,
    NodeInfo,
    ParsedService,
    ParsedSlice,
    build_services_file,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from pykp.sources.kube.watch import Backoff, ListWatch, Reflector, ReflectorStats

log = logging.getLogger("pykp.sources.kube")

_GATING = ("services", "endpointslices")  # the lists that must be in before programming

JSON = Mapping[str, Any]
_P = TypeVar("_P")


@dataclass
class _Memo(Generic[_P]):
    version: str | None
    parsed: _P | None
    problems: list[KubeProblem]


def _version(obj: JSON) -> str | None:
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    return version if isinstance(version, str) else None


class _Translations(Generic[_P]):
    """Per-object translations, recomputed only for objects whose version changed."""

    def __init__(self, parse: Callable[[JSON], tuple[_P | None, list[KubeProblem]]]) -> None:
        self._parse = parse
        self._memo: dict[str, _Memo[_P]] = {}

    def update(self, cache: Mapping[str, JSON]) -> tuple[list[_P], list[KubeProblem]]:
        for key in self._memo.keys() - cache.keys():
            del self._memo[key]
        parsed: list[_P] = []
        problems: list[KubeProblem] = []
        for key, obj in cache.items():
            version = _version(obj)
            memo = self._memo.get(key)
            if memo is None or memo.version != version or version is None:
                memo = _Memo(version, *self._parse(obj))
                self._memo[key] = memo
            if memo.parsed is not None:
                parsed.append(memo.parsed)
            problems += memo.problems
        return parsed, problems


class KubeSource:
    """Services from the Kubernetes API, for `pykp run` (see the module docstring).

    `list_watches` replaces the API client (tests); otherwise one is made from
    `kubeconfig`/`master`/`context` as `client.api_client` does. `node_name` is this
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
        self._client: kubernetes.client.ApiClient | None = None
        if list_watches is None:
            self._client = api_client(kubeconfig, master, context)
            list_watches = _api_list_watches(self._client, node_name, timeouts or Timeouts())
        self._reflectors = {
            name: Reflector(
                list_watch,
                self._changed,
                backoff=Backoff(initial=backoff_initial, maximum=backoff_max),
            )
            for name, list_watch in list_watches.items()
        }
        self._lock = threading.Lock()
        self._notify: Callable[[], None] | None = None
        self._generation = 0
        self._last_change: float | None = None
        self._built_generation = -1
        self._built: Catalog | None = None
        self._build_lock = threading.Lock()
        self._services: _Translations[ParsedService] = _Translations(self._parse_service)
        self._slices: _Translations[ParsedSlice] = _Translations(parse_endpoint_slice)
        self._node: NodeInfo | None = None
        self._problems: list[Problem] = []
        self._reported: set[KubeProblem] = set()
        self._invalid_objects_total = 0

    # -- the source protocol

    def start(self, notify: Callable[[], None]) -> None:
        """Start listing and watching; `notify()` follows every change (from a thread)."""
        self._notify = notify
        for reflector in self._reflectors.values():
            reflector.start()

    def stop(self) -> None:
        for reflector in self._reflectors.values():
            reflector.stop()
        if self._client is not None:
            self._client.close()  # type: ignore[no-untyped-call]  # the connection pool

    def current(self) -> Catalog | None:
        """None until every first list is in; then the services the API describes."""
        if not self.synced:
            return None
        with self._build_lock:
            with self._lock:
                generation = self._generation
            if generation != self._built_generation:
                self._built = self._build()
                self._built_generation = generation
            return self._built

    def problems(self) -> list[Problem]:
        """The objects (or parts) left out in the latest `current()`, and why.

        Each is a `KubeProblem` (kind, namespace, name, message).
        """
        with self._build_lock:
            return list(self._problems)

    @property
    def invalid_objects_total(self) -> int:
        """Problems found so far, each object version counted once (a counter)."""
        with self._build_lock:
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
        self.current()
        with self._build_lock:
            return self._node

    def stats(self) -> dict[str, ReflectorStats]:
        return {name: reflector.stats for name, reflector in self._reflectors.items()}

    def resource_versions(self) -> dict[str, str]:
        return {name: reflector.resource_version for name, reflector in self._reflectors.items()}

    # -- internals

    def _changed(self) -> None:
        with self._lock:
            self._generation += 1
            self._last_change = time.time()
            notify = self._notify
        if notify is not None:
            notify()

    def _parse_service(self, obj: JSON) -> tuple[ParsedService | None, list[KubeProblem]]:
        return parse_service(obj, self.default_policy)

    def _build(self) -> Catalog:
        services, problems = self._services.update(self._cache("services"))
        slices, slice_problems = self._slices.update(self._cache("endpointslices"))
        problems += slice_problems
        self._node = None
        if "nodes" in self._reflectors:
            for obj in self._cache("nodes").values():
                self._node, node_problems = parse_node(obj)
                problems += node_problems
        services_file, build_problems = build_services_file(
            services,
            slices,
            zone=self._node.zone if self._node is not None else None,
            default_policy=self.default_policy,
        )
        problems += build_problems
        self._report(problems)
        return services_file

    def _cache(self, name: str) -> dict[str, JSON]:
        reflector = self._reflectors.get(name)
        return reflector.cache() if reflector is not None else {}

    def _report(self, problems: list[KubeProblem]) -> None:
        """Log and count each problem once while it lasts (it recurs on every build)."""
        current = set(problems)
        for problem in problems:
            if problem not in self._reported:
                log.warning("invalid object: %s", problem)
                self._invalid_objects_total += 1
        self._reported = current
        self._problems = list(dict.fromkeys(problems))


def _api_list_watches(
    client: kubernetes.client.ApiClient, node_name: str | None, timeouts: Timeouts
) -> dict[str, ListWatch]:
    core = kubernetes.client.CoreV1Api(client)
    discovery = kubernetes.client.DiscoveryV1Api(client)
    list_watches: dict[str, ListWatch] = {
        "services": ApiListWatch(
            "services", core.list_service_for_all_namespaces, timeouts=timeouts
        ),
        "endpointslices": ApiListWatch(
            "endpointslices", discovery.list_endpoint_slice_for_all_namespaces, timeouts=timeouts
        ),
    }
    if node_name:
        list_watches["nodes"] = ApiListWatch(
            "nodes",
            core.list_node,
            field_selector=f"metadata.name={node_name}",
            timeouts=timeouts,
        )
    return list_watches
