"""The metrics as a scraper reads them: what /metrics serves, parsed by prometheus_client.

The text format (0.0.4) is read with `prometheus_client.parser`, OpenMetrics with its
strict parser; on top of them, `scrape` checks what a scraper would also reject: a family
declared twice, histogram buckets that are not cumulative or disagree with `_count`.
Metrics are looked up by the names written in queries (counters with their `_total`).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from test_agent_unit import SERVICES, Harness, StaticSource, without_endpoint

from pykp.observe.metrics import (
    CONTENT_TYPE,
    NETWORK_PROGRAMMING_BUCKETS,
    SYNC_DURATION_BUCKETS,
    Family,
    Histogram,
    MetricsServer,
    Registry,
    datapath_families,
    engine_families,
)

# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# --- reading a page -----------------------------------------------------------------------


@dataclass
class Scrape:
    """A page's families, by the name users query (a counter's with its `_total`)."""

    families: dict[str, Metric]

    def type(self, name: str) -> str:
        return self.families[name].type

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for family in self.families.values():
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value

    def value(self, name: str, /, **labels: str) -> float:
        [value] = [v for n, l, v in self.samples() if n == name and l == labels]
        return value

    def label_values(self, name: str, label: str) -> set[str]:
        return {l[label] for n, l, _ in self.samples() if n == name and label in l}


def _checked(families: Iterable[Metric]) -> Scrape:
    by_name: dict[str, Metric] = {}
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        assert name not in by_name, f"family {name} served twice"
        by_name[name] = family
        if family.type == "histogram":
            check_histogram(family)
    return Scrape(by_name)


def check_histogram(family: Metric) -> None:
    name = family.name
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name == f"{name}_bucket"]
    bounds = [float(le) for le, _ in buckets]
    counts = [value for _, value in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}: bucket bounds"
    assert counts == sorted(counts), f"{name}: buckets must be cumulative"
    [count] = [s.value for s in family.samples if s.name == f"{name}_count"]
    assert counts[-1] == count, f"{name}: +Inf bucket == _count"


def scrape(text: str) -> Scrape:
    """A page in the text format 0.0.4."""
    assert text.endswith("\n"), "the format ends with a newline"
    declared = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
    # prometheus_client's text parser merges a family declared twice; a scraper does not.
    assert len(declared) == len(set(declared)), "a family declared twice"
    return _checked(text_string_to_metric_families(text))


def scrape_openmetrics(text: str) -> Scrape:
    assert text.endswith("# EOF\n"), "an OpenMetrics page ends with # EOF"
    return _checked(openmetrics_families(text))


def render(registry: Registry) -> str:
    """The registry's page for a scraper that sends no Accept header."""
    page, content_type = registry.render()
    assert content_type == CONTENT_TYPE
    return page.decode()


def render_families(*families: Family) -> str:
    registry = Registry()
    registry.add("test", lambda: families)
    return render(registry)


def collected(*families: Family) -> Scrape:
    return scrape(render_families(*families))


@pytest.mark.parametrize(
    "text",
    [
        "# HELP pykp_x x\n# TYPE pykp_x gauge\npykp_x{a=b} 1\n",  # unquoted label
        "# HELP pykp_x x\n# TYPE pykp_x gauge\npykp_x 1",  # no final newline
        '# TYPE pykp_x gauge\npykp_x 1\n# TYPE pykp_x gauge\npykp_x{a="b"} 2\n',  # twice
        (  # buckets not cumulative
            "# HELP h x\n# TYPE h histogram\n"
            'h_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
        ),
        (  # +Inf bucket != _count
            "# HELP h x\n# TYPE h histogram\n"
            'h_bucket{le="1"} 1\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 2\n'
        ),
    ],
)
def test_the_checks_reject_malformed_text(text: str) -> None:
    with pytest.raises((AssertionError, ValueError)):
        scrape(text)


def test_the_openmetrics_checks_want_the_eof() -> None:
    with pytest.raises(AssertionError):
        scrape_openmetrics("# HELP pykp_x x\n# TYPE pykp_x gauge\npykp_x 1\n")


# --- families and the registry ------------------------------------------------------------


def test_help_and_label_values_are_escaped_and_read_back() -> None:
    label = 'quote " backslash \\ newline \n'
    family = Family.labelled(
        "pykp_test_total",
        "counter",
        "A help text with a backslash \\ and\na newline",
        "reason",
        {label: 3, "plain": 0.5},
    )
    registry = Registry()
    registry.add("test", lambda: [family, Family.single("pykp_up", "gauge", "Up", 1)])

    text = render(registry)
    assert "# HELP pykp_test_total A help text with a backslash \\\\ and\\na newline\n" in text
    assert "# TYPE pykp_test_total counter\n" in text
    assert 'pykp_test_total{reason="quote \\" backslash \\\\ newline \\n"} 3' in text

    for parsed in (
        scrape(text),
        scrape_openmetrics(registry.render(PROMETHEUS_ACCEPT)[0].decode()),
    ):
        assert parsed.type("pykp_test_total") == "counter"
        assert parsed.families["pykp_test_total"].documentation == (
            "A help text with a backslash \\ and\na newline"
        )
        assert parsed.value("pykp_test_total", reason=label) == 3
        assert parsed.value("pykp_test_total", reason="plain") == 0.5
        assert parsed.value("pykp_up") == 1


def test_an_untyped_family_is_served_untyped() -> None:
    text = render_families(Family.labelled("pykp_other", "untyped", "x", "name", {"a": 1}))

    assert "# TYPE pykp_other untyped\n" in text
    assert scrape(text).value("pykp_other", name="a") == 1


def test_names_a_scraper_cannot_read_are_escaped() -> None:
    parsed = collected(Family.single("pykp_bad-name", "gauge", "x", 1, **{"bad-label": "v"}))

    assert parsed.value("pykp_bad_name", bad_label="v") == 1


def test_a_family_collected_twice_is_served_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    registry.add("one", lambda: [Family.single("pykp_x", "gauge", "x", 1)])
    registry.add("two", lambda: [Family.single("pykp_x", "gauge", "x", 2)])

    assert scrape(render(registry)).value("pykp_x") == 1
    assert "metric family pykp_x collected twice" in caplog.text


@pytest.mark.parametrize("value", [3, 3.0, 0.25, 1e-9, 2**60, math.inf, -math.inf])
def test_values_are_read_back_as_written(value: float) -> None:
    assert collected(Family.single("pykp_x", "gauge", "x", value)).value("pykp_x") == value


def test_nan_is_read_back() -> None:
    assert math.isnan(collected(Family.single("pykp_x", "gauge", "x", math.nan)).value("pykp_x"))


def test_a_histogram_is_cumulative_with_sum_and_count() -> None:
    histogram = Histogram([0.1, 1.0, 10.0])
    for value in (0.05, 0.1, 0.5, 5.0, 50.0):
        histogram.observe(value)

    parsed = collected(histogram.family("pykp_h_seconds", "h"))

    assert parsed.type("pykp_h_seconds") == "histogram"
    buckets = {
        le: v for n, l, v in parsed.samples() if n == "pykp_h_seconds_bucket" for le in [l["le"]]
    }
    assert buckets == {"0.1": 2, "1.0": 3, "10.0": 4, "+Inf": 5}
    assert parsed.value("pykp_h_seconds_count") == 5
    assert parsed.value("pykp_h_seconds_sum") == pytest.approx(55.65)
    assert histogram.count == 5


def test_kube_proxys_buckets() -> None:
    assert SYNC_DURATION_BUCKETS[0] == 0.001 and len(SYNC_DURATION_BUCKETS) == 15
    assert SYNC_DURATION_BUCKETS[-1] == pytest.approx(16.384)
    assert NETWORK_PROGRAMMING_BUCKETS[:3] == (0.25, 0.5, 1.0)
    assert NETWORK_PROGRAMMING_BUCKETS[-1] == 300.0
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 2 + 59 + 12 + 7
    assert list(NETWORK_PROGRAMMING_BUCKETS) == sorted(set(NETWORK_PROGRAMMING_BUCKETS))


def test_a_failing_collector_is_left_out_and_the_rest_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()

    def broken() -> list[Family]:
        raise RuntimeError("engine gone")

    registry.add("broken", broken)
    registry.add("ok", lambda: [Family.single("pykp_ok", "gauge", "ok", 1)])

    parsed = scrape(render(registry))
    assert set(parsed.families) == {"pykp_ok"}
    assert parsed.value("pykp_ok") == 1
    assert "metrics collector broken failed" in caplog.text


# --- the Rust counters --------------------------------------------------------------------


def test_engine_counters_become_labelled_families() -> None:
    counters = {
        "decisions_forward": 5,
        "decisions_reject": 1,
        "new_flows_round_robin": 4,
        "new_flows_maglev": 1,
        "drops_truncated": 2,
        "conntrack_entries": 3,
        "conntrack_capacity": 100,
        "conntrack_evictions": 7,
        "affinity_hits": 9,
        "something_new": 11,
    }

    parsed = collected(*engine_families(counters))

    assert parsed.type("pykp_decisions_total") == "counter"
    assert parsed.value("pykp_decisions_total", action="forward") == 5
    assert parsed.value("pykp_decisions_total", action="reject") == 1
    assert parsed.label_values("pykp_new_flows_total", "policy") == {"round-robin", "maglev"}
    assert parsed.value("pykp_dropped_packets_total", reason="truncated") == 2
    assert parsed.type("pykp_conntrack_entries") == "gauge"
    assert parsed.value("pykp_conntrack_entries") == 3
    assert parsed.type("pykp_conntrack_capacity") == "gauge"
    assert parsed.value("pykp_conntrack_capacity") == 100
    assert parsed.type("pykp_conntrack_evictions_total") == "counter"
    assert parsed.value("pykp_conntrack_evictions_total") == 7
    assert parsed.value("pykp_affinity_hits_total") == 9
    assert parsed.type("pykp_engine_counter") == "unknown"  # served as "untyped"
    assert parsed.value("pykp_engine_counter", name="something_new") == 11


def test_every_real_engine_counter_is_exported(fastpath: object) -> None:
    from pykp._fastpath import Engine

    counters = Engine().counters()
    parsed = collected(*engine_families(counters))

    exported = sum(1 for _ in parsed.samples())
    assert exported == len(counters)
    assert "pykp_engine_counter" not in parsed.families, "every engine counter has its own family"


def test_datapath_stats_become_queue_families() -> None:
    stats = {
        "packets": 10,
        "verdicts": 10,
        "accepted": 9,
        "dropped": 1,
        "errors": 0,
        "batches": 4,
        "forwarded": 8,
        "passed": 1,
        "rejected": 0,
        "decision_drops": 1,
        "id_overflow": 0,
        "kernel_queue_dropped": 2,
        "kernel_user_dropped": 3,
        "future_counter": 5,
    }

    parsed = collected(*datapath_families(stats))

    assert parsed.value("pykp_queue_packets_total") == 10
    assert parsed.value("pykp_queue_batches_total") == 4
    assert parsed.value("pykp_queue_errors_total") == 0
    assert parsed.value("pykp_queue_id_overflow_total") == 0
    assert parsed.value("pykp_queue_dropped_total", reason="queue_full") == 2
    assert parsed.value("pykp_queue_dropped_total", reason="socket_full") == 3
    assert parsed.value("pykp_queue_verdicts_total", verdict="accept") == 9
    assert parsed.value("pykp_queue_verdicts_total", verdict="drop") == 1
    assert parsed.value("pykp_queue_decisions_total", decision="forward") == 8
    assert parsed.value("pykp_queue_decisions_total", decision="drop") == 1
    assert [(s.name, s.labels, s.value) for s in parsed.families["pykp_queue_stat"].samples] == [
        ("pykp_queue_stat", {"name": "future_counter"}, 5)
    ]
    assert "verdicts" not in {labels.get("name") for _, labels, _ in parsed.samples()}


def test_a_stopped_datapaths_stats_still_render() -> None:
    parsed = collected(*datapath_families({"kernel_queue_dropped": 0, "kernel_user_dropped": 0}))

    assert set(parsed.families) == {"pykp_queue_dropped_total"}


# --- the agent's /metrics -----------------------------------------------------------------

BRIEF_METRICS = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_total": "counter",
    "kubeproxy_proxy_healthz_total": "counter",
    "kubeproxy_proxy_livez_total": "counter",
    "pykp_decisions_total": "counter",
    "pykp_new_flows_total": "counter",
    "pykp_dropped_packets_total": "counter",
    "pykp_queue_packets_total": "counter",
    "pykp_queue_dropped_total": "counter",
    "pykp_conntrack_entries": "gauge",
    "pykp_conntrack_evictions_total": "counter",
    "pykp_syncs_total": "counter",
    "pykp_sync_errors_total": "counter",
    "pykp_stale_udp_flows_deleted_total": "counter",
    "pykp_conntrack_cleanup_errors_total": "counter",
    "pykp_services": "gauge",
    "pykp_backends": "gauge",
    "pykp_invalid_objects_total": "counter",
    "pykp_source_errors_total": "counter",
    "pykp_source_initialized": "gauge",
}


# One invalid service (a port out of range): skipped, counted as an invalid object.
WITH_A_BAD_PORT = SERVICES.replace("ports: [{port: 443", "ports: [{port: 70000")


@pytest.fixture
def synced(tmp_path: Path) -> Harness:
    """Two syncs: the services, then a UDP endpoint gone; then two new flows."""
    source = StaticSource(WITH_A_BAD_PORT)
    harness = Harness(source, tmp_path)
    harness.agent.sync()
    source.set(without_endpoint(WITH_A_BAD_PORT, "10.244.2.53"))
    harness.agent.sync()
    engine = harness.agent.engine
    engine.decide("10.244.9.1", 1000, "10.96.0.10", 80)
    engine.decide("10.244.9.1", 1001, "10.96.0.10", 80)
    return harness


def test_the_agents_metrics_have_kube_proxys_and_pykps_names(synced: Harness) -> None:
    m = scrape(render(synced.agent.registry))

    for name, type_ in BRIEF_METRICS.items():
        assert name in m.families, name
        assert m.type(name) == type_, name
    assert m.value("kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
    assert m.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") == synced.wall.now
    assert m.value("kubeproxy_sync_proxy_rules_service_changes_total") == 2
    assert m.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 3
    assert m.value("pykp_decisions_total", action="forward") == 2
    assert m.value("pykp_new_flows_total", policy="round-robin") == 2
    assert m.value("pykp_conntrack_entries") == 2
    assert m.value("pykp_queue_packets_total") == 7  # the fake datapath's
    assert m.value("pykp_syncs_total") == 2
    assert m.value("pykp_sync_errors_total") == 0
    assert m.value("pykp_services") == 3  # the service with the bad port was skipped
    assert m.value("pykp_backends") == len(synced.agent.engine.backend_ids()) == 3
    assert m.value("pykp_invalid_objects_total") == 1
    assert m.value("pykp_source_initialized") == 1
    assert m.value("pykp_stale_udp_flows_deleted_total") == 4  # one per UDP frontend
    les = m.label_values("kubeproxy_network_programming_duration_seconds_bucket", "le")
    assert sorted(map(float, les)) == [*NETWORK_PROGRAMMING_BUCKETS, math.inf]


def test_sync_errors_are_counted_in_the_metrics(synced: Harness) -> None:
    from pykp.netfilter.rules import RulesError

    synced.rules.fail = RulesError(["nft"], 1, "boom")
    with pytest.raises(RulesError):
        synced.agent.sync()

    parsed = scrape(render(synced.agent.registry))
    assert parsed.value("pykp_sync_errors_total") == 1
    assert parsed.value("pykp_syncs_total") == 3


def comparable(
    sample: tuple[str, dict[str, str], float],
) -> tuple[str, list[tuple[str, str]], float]:
    name, labels, value = sample
    return name, sorted(labels.items()), value


def test_openmetrics_serves_the_same_samples(synced: Harness) -> None:
    page, content_type = synced.agent.registry.render(PROMETHEUS_ACCEPT)

    assert content_type.startswith(OPENMETRICS_CONTENT_TYPE)
    openmetrics = scrape_openmetrics(page.decode())
    text = scrape(render(synced.agent.registry))
    assert sorted(map(comparable, openmetrics.samples())) == sorted(map(comparable, text.samples()))
    assert {n: f.type for n, f in openmetrics.families.items()} == {
        n: f.type for n, f in text.families.items()
    }


def test_each_agent_has_its_own_registry(synced: Harness, tmp_path: Path) -> None:
    other = Harness(StaticSource(SERVICES), tmp_path / "other")
    other.agent.sync()

    assert synced.agent.registry is not other.agent.registry
    assert scrape(render(synced.agent.registry)).value("pykp_syncs_total") == 2
    assert scrape(render(other.agent.registry)).value("pykp_syncs_total") == 1
    # Nothing in the library's global registry, which a host process may serve itself.
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "pykp_" not in default and "kubeproxy_" not in default


@pytest.fixture
def server(synced: Harness) -> Iterator[str]:
    server = MetricsServer("127.0.0.1:0", synced.agent.registry.render, synced.agent.snapshot)
    server.start()
    try:
        host, port = server.bound_address
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_metrics_are_served_over_http(server: str) -> None:
    with urllib.request.urlopen(f"{server}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE
        parsed = scrape(response.read().decode())
    assert parsed.value("pykp_decisions_total", action="forward") == 2
    assert parsed.type("kubeproxy_sync_proxy_rules_duration_seconds") == "histogram"

    with urllib.request.urlopen(f"{server}/status?flows=all", timeout=5) as response:
        assert response.headers["Content-Type"] == "application/json"
        status = json.load(response)
    assert len(status["flows"]) == 2
    assert status["node"]["name"] == "node-a"

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{server}/healthz", timeout=5)
    assert caught.value.code == 404


@pytest.mark.parametrize(
    "accept", [PROMETHEUS_ACCEPT, "application/openmetrics-text; version=1.0.0"]
)
def test_openmetrics_is_served_when_the_scraper_asks_for_it(server: str, accept: str) -> None:
    request = urllib.request.Request(f"{server}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith(OPENMETRICS_CONTENT_TYPE)
        text = response.read().decode()

    assert text.endswith("# EOF\n")
    parsed = scrape_openmetrics(text)
    assert parsed.value("pykp_decisions_total", action="forward") == 2
    assert parsed.type("pykp_decisions_total") == "counter"
    assert parsed.value("kubeproxy_sync_proxy_rules_duration_seconds_count") == 2


def test_a_text_accept_header_gets_the_text_format(server: str) -> None:
    request = urllib.request.Request(
        f"{server}/metrics", headers={"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE
        text = response.read().decode()

    assert "# EOF" not in text
    assert scrape(text).value("pykp_sync_errors_total") == 0


def test_an_ipv6_bind_address_serves_too() -> None:
    registry = Registry()
    registry.add("test", lambda: [Family.single("pykp_up", "gauge", "Up", 1)])
    server = MetricsServer("[::1]:0", registry.render)
    try:
        server.start()
    except OSError as error:  # a machine without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {error}")
    try:
        host, port = server.bound_address
        assert host == "::1"
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as response:
            assert scrape(response.read().decode()).value("pykp_up") == 1
    finally:
        server.stop()
