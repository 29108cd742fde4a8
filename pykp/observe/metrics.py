"""Prometheus metrics, exposed with prometheus_client.

The agent's own metrics are a handful of counters and two histograms, kept in
`AgentMetrics`; the Rust core's counters are read at scrape time (`Engine.counters()`,
`NfqueueDatapath.stats()`). Collectors turn both into metric families at each scrape, so
nothing is copied on the packet path. Each agent has its own `Registry` (never the
library's global one); the library writes the page: the text format 0.0.4, or OpenMetrics
when the scraper's Accept header asks for it.

kube-proxy's names are used where the meaning is the same (`kubeproxy_*`, with its
buckets); pykp's own start with `pykp_`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Final, Literal

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from pykp.observe.explain import ExplainError
from pykp.observe.health import HttpServer, Response

__all__ = [
    "CONTENT_TYPE",
    "NETWORK_PROGRAMMING_BUCKETS",
    "SYNC_DURATION_BUCKETS",
    "AgentMetrics",
    "Family",
    "FunctionCollector",
    "Histogram",
    "MetricsServer",
    "Registry",
    "datapath_families",
    "engine_families",
]

_log = logging.getLogger(__name__)

# What a scraper gets unless its Accept header asks for something else (e.g. OpenMetrics).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

MetricType = Literal["counter", "gauge", "untyped"]


def _exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    return tuple(start * factor**i for i in range(count))


def _linear(start: float, width: float, count: int) -> tuple[float, ...]:
    return tuple(start + width * i for i in range(count))


# kube-proxy's buckets (pkg/proxy/metrics): 1 ms .. 16.4 s for a sync;
# 0.25 s .. 5 min for network programming.
SYNC_DURATION_BUCKETS: Final = _exponential(0.001, 2, 15)
NETWORK_PROGRAMMING_BUCKETS: Final = (
    _linear(0.25, 0.25, 2) + _linear(1, 1, 59) + _linear(60, 5, 12) + _linear(120, 30, 7)
)


# --- families and collectors --------------------------------------------------------------


class Family(Metric):
    """A metric family as collectors yield it (prometheus_client's), with shorthands.

    Counters are named as served, with their `_total` (the library strips it from the
    family's name and puts it back on the samples).
    """

    @staticmethod
    def single(name: str, type_: MetricType, help_: str, value: float, **labels: str) -> Family:
        family = _family(name, type_, help_, tuple(labels))
        family.add_metric(tuple(labels.values()), value)
        return family

    @staticmethod
    def labelled(
        name: str, type_: MetricType, help_: str, label: str, values: Mapping[str, float]
    ) -> Family:
        family = _family(name, type_, help_, (label,))
        for key in sorted(values):
            family.add_metric((key,), values[key])
        return family

    @staticmethod
    def rows(
        name: str,
        type_: MetricType,
        help_: str,
        labels: Sequence[str],
        values: Iterable[tuple[Sequence[str], float]],
    ) -> Family:
        """A family with several labels: `values` as (label values, value) rows."""
        family = _family(name, type_, help_, tuple(labels))
        for label_values, value in values:
            family.add_metric(tuple(label_values), value)
        return family


class _Counter(CounterMetricFamily, Family):
    pass


class _Gauge(GaugeMetricFamily, Family):
    pass


class _Untyped(UnknownMetricFamily, Family):
    pass


class _Histogram(HistogramMetricFamily, Family):
    pass


def _family(
    name: str, type_: MetricType, help_: str, labels: Sequence[str]
) -> _Counter | _Gauge | _Untyped:
    if type_ == "counter":
        return _Counter(name, help_, labels=labels)
    if type_ == "gauge":
        return _Gauge(name, help_, labels=labels)
    return _Untyped(name, help_, labels=labels)


class Histogram:
    """A cumulative histogram with fixed upper bounds (an implicit +Inf last). Thread-safe."""

    def __init__(self, buckets: Sequence[float]) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("buckets must be strictly increasing and not empty")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def family(self, name: str, help_: str) -> Family:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), counts):
            cumulative += count
            # "le" as the library writes it (its helper is untyped)
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        return _Histogram(name, help_, buckets=buckets, sum_value=total)


class FunctionCollector:
    """A collector whose families a function builds at each scrape.

    A function that fails is logged and its families left out; the rest are served.
    """

    def __init__(self, name: str, build: Callable[[], Iterable[Metric]]) -> None:
        self.name = name
        self.build = build

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self.build())
        except Exception:  # noqa: BLE001 - serve the rest
            _log.exception("metrics collector %s failed", self.name)
            return
        yield from families


class Registry(CollectorRegistry):
    """One agent's collectors, called at every scrape (not the library's global registry)."""

    def add(self, name: str, build: Callable[[], Iterable[Metric]]) -> None:
        self.register(FunctionCollector(name, build))

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for family in super().collect():
            # A scraper refuses a page with a family twice: serve the first one only.
            if family.name in seen:
                _log.error("metric family %s collected twice; the second left out", family.name)
                continue
            seen.add(family.name)
            yield family

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The page for a scraper that sent `accept` (its Accept header), and its Content-Type.

        OpenMetrics when the header asks for it, else the text format 0.0.4.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self), content_type


# --- the agent's own metrics --------------------------------------------------------------


@dataclass
class AgentMetrics:
    """What the sync loop records; read by `families()` at scrape time."""

    sync_duration: Histogram = field(default_factory=lambda: Histogram(SYNC_DURATION_BUCKETS))
    network_programming: Histogram = field(
        default_factory=lambda: Histogram(NETWORK_PROGRAMMING_BUCKETS)
    )
    last_sync_timestamp: float = 0.0  # wall clock of the last successful sync; 0: none yet
    last_queued_timestamp: float = 0.0  # wall clock of the last change that asked for a sync
    syncs: int = 0
    sync_errors: int = 0
    service_changes: int = 0
    endpoint_changes: int = 0
    refused_services: int = 0  # engine services the engine refused (skipped), summed
    stale_udp_flows_deleted: int = 0
    conntrack_cleanup_errors: int = 0
    rules_repairs: int = 0  # times the rules were found changed by someone else and restored
    foreign_rule_changes: int = 0  # nf_tables transactions of others that touched pykp's rules

    def families(self) -> list[Family]:
        return [
            self.sync_duration.family(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            ),
            Family.single(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "gauge",
                "The last time proxy rules were successfully synced",
                self.last_sync_timestamp,
            ),
            Family.single(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "gauge",
                "The last time a sync of proxy rules was queued",
                self.last_queued_timestamp,
            ),
            self.network_programming.family(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
            ),
            Family.single(
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "counter",
                "Cumulative proxy rules Endpoint changes",
                self.endpoint_changes,
            ),
            Family.single(
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "counter",
                "Cumulative proxy rules Service changes",
                self.service_changes,
            ),
            Family.single("pykp_syncs_total", "counter", "Syncs attempted", self.syncs),
            Family.single(
                "pykp_sync_errors_total", "counter", "Syncs that failed", self.sync_errors
            ),
            Family.single(
                "pykp_stale_udp_flows_deleted_total",
                "counter",
                "Kernel conntrack UDP entries deleted because their backend left, or because "
                "they were never NATed (sent while the service had no endpoints)",
                self.stale_udp_flows_deleted,
            ),
            Family.single(
                "pykp_conntrack_cleanup_errors_total",
                "counter",
                "Failed attempts to delete stale kernel conntrack UDP entries",
                self.conntrack_cleanup_errors,
            ),
            Family.single(
                "pykp_rules_repairs_total",
                "counter",
                "Times pykp's rules were found deleted or changed by someone else and restored",
                self.rules_repairs,
            ),
            Family.single(
                "pykp_rules_foreign_changes_total",
                "counter",
                "nf_tables transactions by another process that touched pykp's rules, seen as "
                "they committed (or notifications lost)",
                self.foreign_rule_changes,
            ),
        ]


# --- the Rust core's counters, read at scrape time ----------------------------------------


def engine_families(counters: Mapping[str, int]) -> list[Family]:
    """`Engine.counters()` as families; keys this code does not know go to a catch-all."""
    decisions: dict[str, float] = {}
    new_flows: dict[str, float] = {}
    drops: dict[str, float] = {}
    conntrack: dict[str, float] = {}
    other: dict[str, float] = {}
    for key, value in counters.items():
        if key.startswith("decisions_"):
            decisions[key.removeprefix("decisions_")] = value
        elif key.startswith("new_flows_"):
            # The policy as users spell it: round_robin -> round-robin.
            new_flows[key.removeprefix("new_flows_").replace("_", "-")] = value
        elif key.startswith("drops_"):
            drops[key.removeprefix("drops_")] = value
        elif key.startswith("conntrack_"):
            conntrack[key.removeprefix("conntrack_")] = value
        else:
            other[key] = value
    families = [
        Family.labelled(
            "pykp_decisions_total",
            "counter",
            "Decisions of the engine, by action (forward, pass, reject, drop)",
            "action",
            decisions,
        ),
        Family.labelled(
            "pykp_new_flows_total", "counter", "Flows opened, by policy", "policy", new_flows
        ),
        Family.labelled(
            "pykp_dropped_packets_total",
            "counter",
            "Packets the engine dropped, by reason",
            "reason",
            drops,
        ),
    ]
    if "entries" in conntrack:
        families.append(
            Family.single(
                "pykp_conntrack_entries",
                "gauge",
                "Entries in pykp's connection table",
                conntrack.pop("entries"),
            )
        )
    if "capacity" in conntrack:
        families.append(
            Family.single(
                "pykp_conntrack_capacity",
                "gauge",
                "Capacity of pykp's connection table",
                conntrack.pop("capacity"),
            )
        )
    for key in sorted(conntrack):  # evictions, inserts, expirations, ...: all counters
        families.append(
            Family.single(
                f"pykp_conntrack_{key}_total",
                "counter",
                f"Connection table {key.replace('_', ' ')}",
                conntrack[key],
            )
        )
    if "affinity_hits" in other:
        families.append(
            Family.single(
                "pykp_affinity_hits_total",
                "counter",
                "New flows sent to a backend by ClientIP session affinity",
                other.pop("affinity_hits"),
            )
        )
    if other:
        families.append(
            Family.labelled(
                "pykp_engine_counter", "untyped", "Other engine counters", "name", other
            )
        )
    return families


# NfqueueDatapath.stats() keys with their own family; the rest go to a catch-all.
_QUEUE_COUNTERS: Final = {
    "packets": ("pykp_queue_packets_total", "Packets read from the NFQUEUE queues"),
    "batches": ("pykp_queue_batches_total", "Verdict batches sent back to the kernel"),
    "errors": ("pykp_queue_errors_total", "Errors reading or answering the queues"),
    "id_overflow": (
        "pykp_queue_id_overflow_total",
        "Packets whose backend id did not fit the mark field (passed unmarked)",
    ),
}
_QUEUE_LABELLED: Final = {
    # nfnetlink_queue's own counters: the queue was full / the socket buffer overflowed.
    "pykp_queue_dropped_total": (
        "Packets the kernel dropped before pykp saw them, by reason",
        "reason",
        {"kernel_queue_dropped": "queue_full", "kernel_user_dropped": "socket_full"},
    ),
    "pykp_queue_verdicts_total": (
        "Verdicts sent back to the kernel, by verdict",
        "verdict",
        {"accepted": "accept", "dropped": "drop"},
    ),
    "pykp_queue_decisions_total": (
        "The engine's decisions for queued packets, by decision",
        "decision",
        {
            "forwarded": "forward",
            "passed": "pass",
            "rejected": "reject",
            "decision_drops": "drop",
        },
    ),
}
# The sum of the verdicts by kind: not exported twice.
_QUEUE_REDUNDANT: Final = ("verdicts",)


def datapath_families(stats: Mapping[str, int]) -> list[Family]:
    """`NfqueueDatapath.stats()` as families (those whose keys are present)."""
    families = [
        Family.single(name, "counter", help_, stats[key])
        for key, (name, help_) in _QUEUE_COUNTERS.items()
        if key in stats
    ]
    known = {*_QUEUE_COUNTERS, *_QUEUE_REDUNDANT}
    for name, (help_, label, keys) in _QUEUE_LABELLED.items():
        known.update(keys)
        values = {value: stats[key] for key, value in keys.items() if key in stats}
        if values:
            families.append(Family.labelled(name, "counter", help_, label, values))
    other = {key: value for key, value in stats.items() if key not in known}
    if other:
        families.append(
            Family.labelled(
                "pykp_queue_stat", "untyped", "Other NFQUEUE datapath statistics", "name", other
            )
        )
    return families


# --- the server ---------------------------------------------------------------------------


class MetricsServer(HttpServer):
    """`/metrics` (and `/status`, the agent's JSON snapshot, `/flows`, `/proxyMode`, and
    `/explain?service=...&client=...`) on --metrics-bind-address.

    `metrics` answers a scrape: given the request's Accept header, the body and its
    Content-Type (`Registry.render`). `proxy_mode` is the body of `/proxyMode`, as
    kube-proxy answers it there ("iptables", "nftables"; pykp's is "nfqueue"). `explain`
    answers `/explain` (`pykp explain`): given the service and the client (or None), the
    report (see `pykp.observe.explain`).
    """

    def __init__(
        self,
        address: str,
        metrics: Callable[[str], tuple[bytes, str]],
        status: Callable[[], Mapping[str, Any]] | None = None,
        proxy_mode: str | None = None,
        *,
        flows: Callable[[Mapping[str, str]], Mapping[str, Any]] | None = None,
        explain: Callable[[str, str | None], Mapping[str, Any]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.status = status
        self.proxy_mode = proxy_mode
        self.flows = flows
        self.explain = explain
        super().__init__(address, name="metrics")

    def respond(self, request: BaseHTTPRequestHandler, path: str) -> Response | None:
        if path == "/metrics":
            page, content_type = self.metrics(request.headers.get("Accept", ""))
            return Response(200, page, content_type)
        if path == "/status" and self.status is not None:
            body = json.dumps(self.status(), indent=1, sort_keys=True) + "\n"
            return Response(200, body.encode(), "application/json")
        if path == "/flows" and self.flows is not None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.path).query))
            try:
                body = json.dumps(self.flows(query), indent=1, sort_keys=True) + "\n"
            except ValueError as error:  # a bad query (FlowQueryError, a bad limit)
                return Response(400, f"{error}\n".encode(), "text/plain; charset=utf-8")
            return Response(200, body.encode(), "application/json")
        if path == "/explain" and self.explain is not None:
            return _explain_response(self.explain, request.path)
        if path == "/proxyMode" and self.proxy_mode is not None:
            # kube-proxy's answer: the mode's name alone, no newline.
            return Response(
                200,
                self.proxy_mode.encode(),
                "text/plain; charset=utf-8",
                {"X-Content-Type-Options": "nosniff"},
            )
        return None


def _explain_response(
    explain: Callable[[str, str | None], Mapping[str, Any]], target: str
) -> Response:
    """`/explain?service=...&client=...`: the report, or `{"error": ...}` with a 4xx."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
    service = query.get("service", [""])[0]
    client = query.get("client", [""])[0] or None
    status, body = 200, {}
    if not service:
        status, body = 400, {"error": "give ?service=namespace/name[:port] or IP:port[/proto]"}
    else:
        try:
            body = dict(explain(service, client))
        except ExplainError as error:
            status, body = error.status, {"error": str(error)}
    text = json.dumps(body, indent=1, sort_keys=True) + "\n"
    return Response(status, text.encode(), "application/json")
