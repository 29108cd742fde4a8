"""The metrics in Prometheus' text format, checked by parsing what is served.

The parser below follows the 0.0.4 text format strictly enough to catch what a scraper
would reject: samples outside their family, TYPE after samples, bad label syntax,
non-cumulative histogram buckets, duplicate families.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pykp.metrics import (
    CONTENT_TYPE,
    NETWORK_PROGRAMMING_BUCKETS,
    SYNC_DURATION_BUCKETS,
    Family,
    Histogram,
    MetricsServer,
    Registry,
    Sample,
    datapath_families,
    engine_families,
    render,
)
from tests.test_agent_unit import SERVICES, Harness, StaticSource, without_endpoint

# --- a strict little parser ---------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL},?)*)\}})? (\S+)")
_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


@dataclass
class Parsed:
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, suffix: str = "", **labels: str) -> float:
        [value] = [v for s, l, v in self.samples if s == suffix and l == labels]
        return value

    def label_values(self, label: str) -> set[str]:
        return {labels[label] for _, labels, _ in self.samples if label in labels}


def parse(text: str) -> dict[str, Parsed]:
    assert text.endswith("\n"), "the format ends with a newline"
    families: dict[str, Parsed] = {}
    current: str | None = None
    pending_help: tuple[str, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name), where
            assert name not in families, f"{where}: family {name} declared twice"
            pending_help = (name, help_)
        elif line.startswith("# TYPE "):
            name, _, type_ = line[7:].partition(" ")
            assert pending_help is not None and pending_help[0] == name, f"{where}: HELP first"
            assert type_ in _SUFFIXES, where
            families[name] = Parsed(type_, pending_help[1])
            current, pending_help = name, None
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"{where}: not a sample"
            sample_name, label_text, value_text = match[1], match[2] or "", match[5]
            assert current is not None, f"{where}: sample before any TYPE"
            family = families[current]
            suffix = sample_name[len(current) :]
            assert sample_name.startswith(current) and suffix in _SUFFIXES[family.type], (
                f"{where}: not a sample of {current} ({family.type})"
            )
            labels = dict(re.findall(_LABEL, label_text))
            family.samples.append((suffix, labels, float(value_text)))
    for name, family in families.items():
        if family.type == "histogram":
            check_histogram(name, family)
    return families


def check_histogram(name: str, family: Parsed) -> None:
    buckets = [(labels["le"], value) for s, labels, value in family.samples if s == "_bucket"]
    bounds = [float(le) for le, _ in buckets]
    counts = [value for _, value in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}: bucket bounds"
    assert counts == sorted(counts), f"{name}: buckets must be cumulative"
    assert counts[-1] == family.value("_count"), f"{name}: +Inf bucket == _count"


@pytest.mark.parametrize(
    "text",
    [
        "pykp_x 1\n",  # no HELP/TYPE
        "# HELP pykp_x x\n# TYPE pykp_x gauge\npykp_y 1\n",  # another family's sample
        "# HELP pykp_x x\n# TYPE pykp_x counter\npykp_x_sum 1\n",  # a suffix counters lack
        "# HELP pykp_x x\n# TYPE pykp_x gauge\npykp_x{a=b} 1\n",  # unquoted label
        "# HELP pykp_x x\n# TYPE pykp_x gauge\npykp_x 1",  # no final newline
        (  # buckets not cumulative
            "# HELP h x\n# TYPE h histogram\n"
            'h_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
        ),
    ],
)
def test_the_parser_rejects_malformed_text(text: str) -> None:
    with pytest.raises(AssertionError):
        parse(text)


# --- the format ---------------------------------------------------------------------------


def test_render_writes_help_type_and_samples_with_escaped_labels() -> None:
    family = Family(
        "pykp_test_total",
        "counter",
        "A help text with a backslash \\ and\na newline",
        (
            Sample("", (("reason", 'quote " backslash \\ newline \n'),), 3),
            Sample("", (("reason", "plain"),), 0.5),
        ),
    )

    text = render([family, Family.single("pykp_up", "gauge", "Up", 1)])

    assert text == textwrap.dedent(
        """\
        # HELP pykp_test_total A help text with a backslash \\\\ and\\na newline
        # TYPE pykp_test_total counter
        pykp_test_total{reason="quote \\" backslash \\\\ newline \\n"} 3
        pykp_test_total{reason="plain"} 0.5
        # HELP pykp_up Up
        # TYPE pykp_up gauge
        pykp_up 1
        """
    )
    parsed = parse(text)
    assert parsed["pykp_test_total"].value(reason="plain") == 0.5


@pytest.mark.parametrize(
    "families",
    [
        [Family.single("bad-name", "gauge", "x", 1)],
        [Family.single("pykp_x", "gauge", "x", 1, **{"bad-label": "v"})],
        [Family.single("pykp_x", "gauge", "x", 1), Family.single("pykp_x", "gauge", "x", 2)],
    ],
)
def test_render_refuses_what_a_scraper_would(families: list[Family]) -> None:
    with pytest.raises(ValueError):
        render(families)


@pytest.mark.parametrize(
    ("value", "text"),
    [(3, "3"), (3.0, "3"), (0.25, "0.25"), (float("inf"), "+Inf"), (float("nan"), "NaN")],
)
def test_values_are_written_as_prometheus_reads_them(value: float, text: str) -> None:
    assert render([Family.single("pykp_x", "gauge", "x", value)]).endswith(f"pykp_x {text}\n")


def test_a_histogram_is_cumulative_with_sum_and_count() -> None:
    histogram = Histogram([0.1, 1.0, 10.0])
    for value in (0.05, 0.1, 0.5, 5.0, 50.0):
        histogram.observe(value)

    parsed = parse(render([histogram.family("pykp_h_seconds", "h")]))["pykp_h_seconds"]

    assert parsed.type == "histogram"
    assert [v for s, _, v in parsed.samples if s == "_bucket"] == [2, 3, 4, 5]
    assert parsed.value("_bucket", le="+Inf") == 5 == parsed.value("_count")
    assert parsed.value("_sum") == pytest.approx(55.65)


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

    assert parse(registry.render())["pykp_ok"].value() == 1
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

    parsed = parse(render(engine_families(counters)))

    assert parsed["pykp_decisions_total"].type == "counter"
    assert parsed["pykp_decisions_total"].value(action="forward") == 5
    assert parsed["pykp_new_flows_total"].label_values("policy") == {"round-robin", "maglev"}
    assert parsed["pykp_dropped_packets_total"].value(reason="truncated") == 2
    assert parsed["pykp_conntrack_entries"].type == "gauge"
    assert parsed["pykp_conntrack_entries"].value() == 3
    assert parsed["pykp_conntrack_capacity"].value() == 100
    assert parsed["pykp_conntrack_evictions_total"].type == "counter"
    assert parsed["pykp_affinity_hits_total"].value() == 9
    assert parsed["pykp_engine_counter"].value(name="something_new") == 11


def test_every_real_engine_counter_is_exported(fastpath: object) -> None:
    from pykp._fastpath import Engine

    counters = Engine().counters()
    parsed = parse(render(engine_families(counters)))

    exported = sum(len(family.samples) for family in parsed.values())
    assert exported == len(counters)
    assert "pykp_engine_counter" not in parsed, "every engine counter has its own family"


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

    parsed = parse(render(datapath_families(stats)))

    assert parsed["pykp_queue_packets_total"].value() == 10
    assert parsed["pykp_queue_dropped_total"].value(reason="queue_full") == 2
    assert parsed["pykp_queue_dropped_total"].value(reason="socket_full") == 3
    assert parsed["pykp_queue_verdicts_total"].value(verdict="drop") == 1
    assert parsed["pykp_queue_decisions_total"].value(decision="forward") == 8
    assert parsed["pykp_queue_stat"].samples == [("", {"name": "future_counter"}, 5)]


def test_a_stopped_datapaths_stats_still_render() -> None:
    parsed = parse(render(datapath_families({"kernel_queue_dropped": 0, "kernel_user_dropped": 0})))

    assert set(parsed) == {"pykp_queue_dropped_total"}


# --- the agent's /metrics -----------------------------------------------------------------

BRIEF_METRICS = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_total": "counter",
    "pykp_decisions_total": "counter",
    "pykp_new_flows_total": "counter",
    "pykp_dropped_packets_total": "counter",
    "pykp_queue_packets_total": "counter",
    "pykp_queue_dropped_total": "counter",
    "pykp_conntrack_entries": "gauge",
    "pykp_conntrack_evictions_total": "counter",
    "pykp_sync_errors_total": "counter",
    "pykp_services": "gauge",
    "pykp_backends": "gauge",
    "pykp_invalid_objects_total": "counter",
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
    parsed = parse(synced.agent.registry.render())

    for name, type_ in BRIEF_METRICS.items():
        assert name in parsed, name
        assert parsed[name].type == type_, name
    m = {name: parsed[name] for name in parsed}
    assert m["kubeproxy_sync_proxy_rules_duration_seconds"].value("_count") == 2
    assert m["kubeproxy_sync_proxy_rules_last_timestamp_seconds"].value() == synced.wall.now
    assert m["kubeproxy_sync_proxy_rules_service_changes_total"].value() == 2
    assert m["kubeproxy_sync_proxy_rules_endpoint_changes_total"].value() == 3
    assert m["pykp_decisions_total"].value(action="forward") == 2
    assert m["pykp_new_flows_total"].value(policy="round-robin") == 2
    assert m["pykp_conntrack_entries"].value() == 2
    assert m["pykp_queue_packets_total"].value() == 7  # the fake datapath's
    assert m["pykp_sync_errors_total"].value() == 0
    assert m["pykp_services"].value() == 3  # the service with the bad port was skipped
    assert m["pykp_backends"].value() == len(synced.agent.engine.backend_ids()) == 3
    assert m["pykp_invalid_objects_total"].value() == 1
    assert m["pykp_stale_udp_flows_deleted_total"].value() == 4  # one per UDP frontend


def test_sync_errors_are_counted_in_the_metrics(synced: Harness) -> None:
    from pykp.rules import RulesError

    synced.rules.fail = RulesError(["nft"], 1, "boom")
    with pytest.raises(RulesError):
        synced.agent.sync()

    parsed = parse(synced.agent.registry.render())
    assert parsed["pykp_sync_errors_total"].value() == 1
    assert parsed["pykp_syncs_total"].value() == 3


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
        parsed = parse(response.read().decode())
    assert "pykp_decisions_total" in parsed

    with urllib.request.urlopen(f"{server}/status?flows=all", timeout=5) as response:
        assert response.headers["Content-Type"] == "application/json"
        status = json.load(response)
    assert len(status["flows"]) == 2
    assert status["node"]["name"] == "node-a"

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{server}/healthz", timeout=5)
    assert caught.value.code == 404


def test_an_ipv6_bind_address_serves_too() -> None:
    server = MetricsServer("[::1]:0", lambda: "# nothing\n")
    try:
        server.start()
    except OSError as error:  # a machine without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {error}")
    try:
        host, port = server.bound_address
        assert host == "::1"
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as response:
            assert response.read() == b"# nothing\n"
    finally:
        server.stop()
