"""The Kubernetes source against the stand-in API server: sync, watch, resume, relist, outages."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykp.agent.plan import services_file_to_engine
from pykp.labs.kube_apiserver import KubeApiServer, endpoint_slice, node, service
from pykp.model import Catalog
from pykp.sources.base import ServiceSource
from pykp.sources.kube.client import ApiListWatch, Timeouts, raw_list_function
from pykp.sources.kube.connection import connect
from pykp.sources.kube.source import KubeSource
from pykp.sources.kube.watch import Backoff, Reflector

FAST = Timeouts(connect=2.0, list=5.0, silence=5.0, watch_min=30, watch_max=60)


def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll until `condition()` is truthy; its value, or a failure after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(0.02)


class Notes:
    """Counts the source's notify() calls."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture
def apiserver() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        yield server


@pytest.fixture
def make_source(
    apiserver: KubeApiServer, tmp_path: Path
) -> Iterator[Callable[..., tuple[KubeSource, Notes]]]:
    sources: list[KubeSource] = []
    kubeconfig = str(apiserver.write_kubeconfig(tmp_path / "kubeconfig"))

    def make(timeouts: Timeouts = FAST, start: bool = True) -> tuple[KubeSource, Notes]:
        source = KubeSource(
            kubeconfig=kubeconfig,
            node_name="node-a",
            timeouts=timeouts,
            backoff_initial=0.05,
            backoff_max=0.4,
        )
        notes = Notes()
        sources.append(source)
        if start:
            source.start(notes)
        return source, notes

    yield make
    for source in sources:
        source.stop()


def names(source: KubeSource) -> list[str]:
    current = source.current()
    assert current is not None
    return sorted(spec.key for spec in current.services)


def has(source: KubeSource, expected: list[str]) -> Callable[[], bool]:
    return lambda: source.current() is not None and names(source) == expected


def test_nothing_until_both_initial_lists_are_in(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.create("services", service("web", "10.96.0.10"))
    apiserver.fail_requests("endpointslices", 500)

    source, notes = make_source()
    wait_for(lambda: source.stats()["endpointslices"].errors >= 2)

    assert source.stats()["services"].lists == 1
    assert source.current() is None  # services are in, slices are not: program nothing
    apiserver.fail_requests("endpointslices", None)
    wait_for(has(source, ["default/web"]))
    assert notes.count >= 1


def test_adds_modifications_and_deletions_reach_current(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    source, notes = make_source()
    wait_for(has(source, []))
    before = time.time()

    apiserver.create("services", service("web", "10.96.0.10"))
    apiserver.create("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.1"]))
    wait_for(lambda: names(source) == ["default/web"] and _endpoints(source) == ["10.244.0.1"])
    change_time = source.last_change_time()
    assert change_time is not None and change_time >= before

    apiserver.update("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.2"]))
    wait_for(lambda: _endpoints(source) == ["10.244.0.2"])

    apiserver.delete("services", "default", "web")
    wait_for(has(source, []))
    assert notes.count >= 4  # the first list, then each change


def test_a_services_slices_are_merged_as_they_come_and_go(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    source, _ = make_source()
    apiserver.create("services", service("web", "10.96.0.10"))
    apiserver.create("services", service("api", "10.96.0.11"))
    apiserver.create("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.1"]))
    apiserver.create("endpointslices", endpoint_slice("web-2", "web", ["10.244.0.2"]))
    apiserver.create("endpointslices", endpoint_slice("web-3", "web", ["10.244.0.3"]))

    def endpoints() -> dict[str, list[str]]:
        current = source.current()
        if current is None:
            return {}
        return {s.key: [e.ip for e in s.endpoints] for s in current.services}

    everything = ["10.244.0.1", "10.244.0.2", "10.244.0.3"]
    wait_for(lambda: endpoints() == {"default/web": everything, "default/api": []})
    apiserver.delete("endpointslices", "default", "web-1")
    wait_for(lambda: endpoints()["default/web"] == ["10.244.0.2", "10.244.0.3"])
    apiserver.delete("endpointslices", "default", "web-3")
    wait_for(lambda: endpoints()["default/web"] == ["10.244.0.2"])
    # A slice relabelled to another Service leaves the first one.
    apiserver.update("endpointslices", endpoint_slice("web-2", "api", ["10.244.0.2"]))
    wait_for(lambda: endpoints() == {"default/web": [], "default/api": ["10.244.0.2"]})
    apiserver.create("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.1"]))
    wait_for(lambda: endpoints() == {"default/web": ["10.244.0.1"], "default/api": ["10.244.0.2"]})


def _endpoints(source: KubeSource) -> list[str]:
    current = source.current()
    if current is None or not current.services:
        return []
    return [endpoint.ip for endpoint in current.services[0].endpoints]


def test_a_dropped_watch_resumes_from_its_version_without_loss(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    source, _ = make_source()
    wait_for(lambda: apiserver.open_watches("services") == 1)

    apiserver.drop_watches()
    apiserver.create("services", service("during", "10.96.0.11"))  # while reconnecting

    wait_for(has(source, ["default/during"]))
    assert apiserver.count("services", watch=False) == 1  # resumed, not relisted
    assert apiserver.count("services", watch=True) >= 2
    resumed = [r for r in apiserver.requests if r.resource == "services" and r.watch][1]
    assert resumed.query["resourceVersion"] != "0"
    assert resumed.query["allowWatchBookmarks"] == "true"


def test_a_stream_ended_by_the_server_is_resumed(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    source, _ = make_source(Timeouts(connect=2, list=5, silence=5, watch_min=1, watch_max=1))
    wait_for(lambda: source.synced)

    wait_for(lambda: apiserver.count("services", watch=True) >= 2, timeout=5)
    apiserver.create("services", service("later", "10.96.0.12"))

    wait_for(has(source, ["default/later"]))
    assert apiserver.count("services", watch=False) == 1


def test_bookmarks_move_the_version_so_a_resume_needs_no_relist(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    source, _ = make_source()
    wait_for(lambda: source.synced and apiserver.open_watches("services") == 1)
    for index in range(3):  # other resources' changes move the global version on
        apiserver.create("nodes", node(f"other-{index}"))

    apiserver.send_bookmarks()
    latest = str(apiserver.resource_version)
    wait_for(lambda: source.resource_versions()["services"] == latest)
    apiserver.compact()  # anything before the bookmark would now be 410 Gone
    apiserver.drop_watches()

    wait_for(lambda: apiserver.count("services", watch=True) >= 2)
    apiserver.create("services", service("web", "10.96.0.10"))
    wait_for(has(source, ["default/web"]))
    assert source.stats()["services"].relists_after_gone == 0
    assert apiserver.count("services", watch=False) == 1


def test_410_gone_relists_and_deletes_what_vanished(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.create("services", service("stays", "10.96.0.1"))
    apiserver.create("services", service("goes", "10.96.0.2"))
    source, _ = make_source()
    wait_for(has(source, ["default/goes", "default/stays"]))

    apiserver.set_available(False)
    apiserver.delete("services", "default", "goes")  # the delete event is then compacted away
    apiserver.create("services", service("new", "10.96.0.3"))
    apiserver.compact()
    apiserver.set_available(True)

    wait_for(has(source, ["default/new", "default/stays"]))
    assert source.stats()["services"].relists_after_gone >= 1
    assert apiserver.count("services", watch=False) == 2


def test_an_unreachable_server_keeps_the_last_state_then_recovers(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.create("services", service("web", "10.96.0.10"))
    apiserver.create("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.1"]))
    source, _ = make_source()
    wait_for(lambda: _endpoints(source) == ["10.244.0.1"])
    programmed = source.current()

    apiserver.set_available(False)
    wait_for(lambda: source.stats()["services"].errors >= 3)
    assert source.current() == programmed  # the last known state stays
    errors_before = source.stats()["services"].errors
    time.sleep(0.5)
    # Backing off (at most 0.4s here, jittered): a handful of attempts, not a busy loop.
    assert source.stats()["services"].errors - errors_before <= 8

    apiserver.update("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.9"]))
    apiserver.set_available(True)
    wait_for(lambda: _endpoints(source) == ["10.244.0.9"])


def test_a_server_down_at_start_is_waited_for(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.set_available(False)
    source, _ = make_source()
    wait_for(lambda: source.stats()["services"].errors >= 2)
    assert source.current() is None

    apiserver.create("services", service("web", "10.96.0.10"))
    apiserver.set_available(True)
    wait_for(has(source, ["default/web"]))


def test_a_silent_watch_is_restarted(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    source, _ = make_source(Timeouts(connect=2, list=5, silence=0.5, watch_min=60, watch_max=60))
    wait_for(lambda: source.synced and apiserver.open_watches("services") == 1)

    apiserver.stall_watches()  # open, but nothing more arrives on it (a dead connection)
    apiserver.create("services", service("web", "10.96.0.10"))

    wait_for(has(source, ["default/web"]), timeout=5)
    assert source.stats()["services"].silent_restarts >= 1
    assert apiserver.count("services", watch=False) == 1


def test_invalid_objects_are_reported_and_counted_once(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.create("services", service("good", "10.96.0.10"))
    apiserver.create("services", service("bad", "10.96.0.300"))
    source, _ = make_source()
    wait_for(has(source, ["default/good"]))

    for _ in range(3):
        source.current()
    assert [str(problem) for problem in source.problems()] == [
        "Service default/bad: rejected: spec.clusterIPs[0]: '10.96.0.300' is not a valid IP address"
    ]
    assert source.invalid_objects_total == 1

    apiserver.apply("services", service("bad", "10.96.0.30"))  # fixed
    wait_for(has(source, ["default/bad", "default/good"]))
    assert source.problems() == []
    assert source.invalid_objects_total == 1


def test_an_object_the_clients_models_reject_breaks_nothing_else(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    # The official client's models would fail the whole list on this one (strict types):
    # the source reads raw JSON and rejects only the object.
    odd = service("odd", "10.96.0.11", ports=[{"port": "eighty", "protocol": "TCP"}])
    apiserver.create("services", odd)
    apiserver.create("services", service("good", "10.96.0.10"))
    source, _ = make_source()

    wait_for(has(source, ["default/good"]))
    assert [str(problem) for problem in source.problems()] == [
        "Service default/odd: rejected: spec.ports[0].port: expected an integer,"
        " got a string ('eighty')"
    ]


def test_the_nodes_zone_drives_topology_hints(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.create("nodes", node("node-a", zone="zone-a"))
    apiserver.create("nodes", node("node-b", zone="zone-b"))
    apiserver.create("services", service("api", "10.96.0.10"))
    hinted = endpoint_slice("api-1", "api", ["10.244.1.1", "10.244.2.1"])
    hinted["endpoints"][0]["hints"] = {"forZones": [{"name": "zone-a"}]}
    hinted["endpoints"][1]["hints"] = {"forZones": [{"name": "zone-b"}]}
    apiserver.create("endpointslices", hinted)

    source, _ = make_source()
    # The Node does not gate the first state: wait for its zone.
    current: Catalog = wait_for(
        lambda: (c := source.current()) is not None and c.zone == "zone-a" and c
    )

    info = source.node()
    assert info is not None and info.addresses == ("192.168.0.1",)
    (engine_service,) = services_file_to_engine(current, [], source.node_name)
    assert [backend.ip for backend in engine_service.backends] == ["10.244.1.1"]
    assert [r.query.get("fieldSelector") for r in apiserver.requests if r.resource == "nodes"][
        0
    ] == "metadata.name=node-a"

    apiserver.apply("nodes", node("node-a", zone="zone-b"))  # relabelled
    wait_for(lambda: (c := source.current()) is not None and c.zone == "zone-b")


def five_services_in_pages_of_two(apiserver: KubeApiServer, tmp_path: Path) -> ApiListWatch:
    for index in range(5):
        apiserver.create("services", service(f"s{index}", f"10.96.1.{index + 1}"))
    connection = connect(str(apiserver.write_kubeconfig(tmp_path / "kubeconfig")))
    return ApiListWatch(
        "services",
        raw_list_function(connection, "/api/v1/services"),
        page_size=2,
        timeouts=FAST,
    )


def test_a_list_in_pages_is_one_list(apiserver: KubeApiServer, tmp_path: Path) -> None:
    services = five_services_in_pages_of_two(apiserver, tmp_path)

    pages = list(services.pages())

    assert [len(items) for items, _ in pages] == [2, 2, 1]
    assert {version for _, version in pages} == {str(apiserver.resource_version)}
    assert [r.query.get("continue") for r in apiserver.requests] == [None, "6:2", "6:4"]


def test_a_list_is_handed_over_page_by_page(apiserver: KubeApiServer, tmp_path: Path) -> None:
    """The reflector hands each page over before it reads the next (so that a list of
    100,000 objects is never held whole), and a relist still deletes what vanished."""
    services = five_services_in_pages_of_two(apiserver, tmp_path)
    handed: list[tuple[int, dict[str, bool]]] = []  # (list requests so far, keys: deleted?)

    def on_change(objects: Any) -> None:
        lists = sum(1 for r in apiserver.requests if "watch" not in r.query)
        handed.append((lists, {key: obj is None for key, obj in objects.items()}))

    reflector = Reflector(services, on_change)
    reflector._list()

    assert [(lists, sorted(keys)) for lists, keys in handed] == [
        (1, ["default/s0", "default/s1"]),
        (2, ["default/s2", "default/s3"]),
        (3, ["default/s4"]),
        (3, []),  # the first list is in (called even with nothing left to hand over)
    ]
    assert sorted(reflector.keys()) == [f"default/s{index}" for index in range(5)]

    handed.clear()
    apiserver.delete("services", "default", "s1")
    apiserver.apply("services", service("s3", "10.96.1.9"))
    reflector._list()

    changed = {key: deleted for _, keys in handed for key, deleted in keys.items()}
    assert changed == {"default/s1": True, "default/s3": False}
    assert sorted(reflector.keys()) == ["default/s0", "default/s2", "default/s3", "default/s4"]


def test_a_node_that_may_not_read_nodes_still_proxies(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.fail_requests("nodes", 403)
    apiserver.create("services", service("web", "10.96.0.10"))

    source, _ = make_source()

    wait_for(has(source, ["default/web"]))
    current = source.current()
    assert current is not None and current.zone is None
    wait_for(lambda: source.stats()["nodes"].last_error is not None)


def test_it_is_a_service_source_with_a_status(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.fail_requests("services", 503)
    source, _ = make_source()
    assert isinstance(source, ServiceSource)
    wait_for(lambda: source.status().load_errors >= 1)

    down = source.status()
    assert not down.initialized
    assert down.last_error is not None and "503" in down.last_error
    apiserver.fail_requests("services", None)
    wait_for(lambda: source.status().initialized and source.status().loads >= 3)

    up = source.status()
    assert up.name.startswith("kubernetes:") and up.name.endswith("kubeconfig")
    assert up.last_error is None
    assert up.loads >= 3  # services, endpointslices and the node


def test_stop_ends_the_threads_promptly(
    make_source: Callable[..., tuple[KubeSource, Notes]],
) -> None:
    source, _ = make_source()
    wait_for(lambda: source.synced)

    started = time.monotonic()
    source.stop()

    assert time.monotonic() - started < 2
    assert not any(thread.name.startswith("reflector-") for thread in threading.enumerate())


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    random.seed(4)
    backoff = Backoff(initial=1.0, maximum=8.0)

    delays = [backoff.next_delay() for _ in range(6)]

    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_a_watch_that_ends_at_once_backs_off_instead_of_spinning(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    """The server ends every watch at once (timeoutSeconds 0: a clean, empty stream),
    again and again: each such watch counts as a failure and the reflector backs off
    (0.05 s doubling to 0.4 s here), a handful of watches per second, not a busy loop;
    what it knows stays, and changes still arrive through the short watches."""
    source, _ = make_source(Timeouts(connect=2, list=5, silence=5, watch_min=0, watch_max=0))
    wait_for(lambda: source.synced)
    wait_for(lambda: source.stats()["services"].errors >= 2)
    watches = apiserver.count("services", watch=True)
    time.sleep(2.0)
    during = apiserver.count("services", watch=True) - watches
    # Backing off: at most ~2 s / 0.2 s (the jittered cap's lower half) plus slack.
    assert 1 <= during <= 15, f"{during} watches in 2 s"
    assert source.stats()["services"].last_error is not None
    assert apiserver.count("services", watch=False) == 1  # resumed each time, never relisted
    apiserver.create("services", service("later", "10.96.0.12"))
    wait_for(has(source, ["default/later"]))


def test_410_gone_twice_in_a_row_relists_each_time_and_ends_consistent(
    apiserver: KubeApiServer, make_source: Callable[..., tuple[KubeSource, Notes]]
) -> None:
    apiserver.create("services", service("stays", "10.96.0.1"))
    apiserver.create("services", service("goes", "10.96.0.2"))
    source, _ = make_source()
    wait_for(has(source, ["default/goes", "default/stays"]))

    apiserver.set_available(False)
    apiserver.delete("services", "default", "goes")  # its delete event is compacted away
    apiserver.create("services", service("new", "10.96.0.3"))
    apiserver.compact()
    apiserver.fail_requests("services", 410)  # the resumed watch, and every relist, are Gone
    apiserver.set_available(True)

    wait_for(lambda: source.stats()["services"].relists_after_gone >= 3)
    assert names(source) == ["default/goes", "default/stays"]  # the last known state stays
    lists = apiserver.count("services", watch=False)
    time.sleep(1.0)
    # Gone again right after a relist: it pauses (0.05 s doubling to 0.4 s), no busy loop.
    assert apiserver.count("services", watch=False) - lists <= 10

    apiserver.fail_requests("services", None)
    wait_for(has(source, ["default/new", "default/stays"]))  # consistent: "goes" is gone
    # Every Gone led to one relist (the first list aside), the last of which succeeded.
    wait_for(lambda: source.stats()["services"].last_error is None)
    assert (
        apiserver.count("services", watch=False) - 1
        == source.stats()["services"].relists_after_gone
    )
    # And the reflector watches on from the relist's version: a later change arrives.
    apiserver.create("services", service("after", "10.96.0.4"))
    wait_for(has(source, ["default/after", "default/new", "default/stays"]))
    assert (
        apiserver.count("services", watch=False) - 1
        == source.stats()["services"].relists_after_gone
    )
