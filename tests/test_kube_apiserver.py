"""The stand-in API server speaks the real protocol: the official client runs against it as is."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import urllib3
from kubernetes import client, config, watch

from pykp.labs.kube_apiserver import KubeApiServer, endpoint_slice, node, service


@pytest.fixture
def apiserver() -> Iterator[KubeApiServer]:
    with KubeApiServer(history_limit=50) as server:
        yield server


@pytest.fixture
def api(apiserver: KubeApiServer, tmp_path: Path) -> client.ApiClient:
    """A client from a kubeconfig, with its own configuration (tests stay independent)."""
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(apiserver.write_kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
    )
    return client.ApiClient(configuration)


def stream(api: client.ApiClient, **kwargs: Any) -> list[dict[str, Any]]:
    """Every event of one watch of services that ends by timeoutSeconds."""
    watcher = watch.Watch()  # type: ignore[no-untyped-call]
    events = watcher.stream(  # type: ignore[no-untyped-call]
        client.CoreV1Api(api).list_service_for_all_namespaces, **kwargs
    )
    return list(events)


def test_the_default_configuration_flow_lists_services(
    apiserver: KubeApiServer, tmp_path: Path
) -> None:
    apiserver.create("services", service("web", "10.96.0.10"))
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(apiserver.write_kubeconfig(tmp_path / "kubeconfig"))
    )

    services = client.CoreV1Api().list_service_for_all_namespaces(_request_timeout=5)

    assert services.kind == "ServiceList"
    assert services.metadata is not None
    assert services.metadata.resource_version == "2"
    (web,) = services.items
    assert web.metadata is not None and web.spec is not None
    assert (web.metadata.namespace, web.metadata.name, web.spec.cluster_ip) == (
        "default",
        "web",
        "10.96.0.10",
    )
    assert web.spec.ports is not None
    assert web.spec.ports[0].port == 80


def test_endpointslices_and_a_node_by_field_selector(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    apiserver.create("endpointslices", endpoint_slice("web-1", "web", ["10.244.0.1"]))
    apiserver.create("nodes", node("node-a", zone="zone-a"))
    apiserver.create("nodes", node("node-b"))

    slices = client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces()
    nodes = client.CoreV1Api(api).list_node(field_selector="metadata.name=node-a")

    (web,) = slices.items
    assert web.address_type == "IPv4"
    assert web.endpoints is not None and web.endpoints[0].addresses == ["10.244.0.1"]
    assert [n.metadata.name for n in nodes.items if n.metadata is not None] == ["node-a"]
    assert nodes.metadata is not None and nodes.metadata.resource_version == "4"


def test_watch_streams_changes_after_the_version_and_ends_at_its_timeout(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    apiserver.create("services", service("old", "10.96.0.1"))
    version = apiserver.resource_version
    apiserver.create("services", service("web", "10.96.0.2"))
    changed = service("web", "10.96.0.2", ports=[{"port": 81, "protocol": "TCP"}])
    apiserver.update("services", changed)
    apiserver.delete("services", "default", "web")

    events = stream(api, resource_version=str(version), timeout_seconds=1)

    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "web"),
        ("MODIFIED", "web"),
        ("DELETED", "web"),
    ]
    assert [e["object"].metadata.resource_version for e in events] == ["3", "4", "5"]
    assert events[1]["object"].spec.ports[0].port == 81


def test_a_watch_without_a_version_starts_with_the_current_objects(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    apiserver.create("services", service("a", "10.96.0.1"))
    apiserver.create("services", service("b", "10.96.0.2"))
    apiserver.delete("services", "default", "a")

    events = stream(api, timeout_seconds=1)

    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "b")]


def test_live_events_and_bookmarks(apiserver: KubeApiServer, api: client.ApiClient) -> None:
    watcher = watch.Watch()  # type: ignore[no-untyped-call]
    seen: list[tuple[str, str]] = []

    def change_while_watching() -> None:
        while apiserver.open_watches("services") == 0:
            threading.Event().wait(0.01)
        apiserver.create("services", service("web", "10.96.0.2"))
        apiserver.create("nodes", node("node-a"))  # moves the global version on
        apiserver.send_bookmarks()

    threading.Thread(target=change_while_watching).start()
    for event in watcher.stream(  # type: ignore[no-untyped-call]
        client.CoreV1Api(api).list_service_for_all_namespaces,
        resource_version="0",
        allow_watch_bookmarks=True,
        timeout_seconds=5,
    ):
        seen.append((event["type"], event["raw_object"]["metadata"]["resourceVersion"]))
        if event["type"] == "BOOKMARK":
            watcher.stop()  # type: ignore[no-untyped-call]

    assert seen == [("ADDED", "2"), ("BOOKMARK", "3")]
    assert watcher.resource_version == "3"  # the client honours the bookmark


def test_an_expired_version_is_410_gone_then_a_relist_recovers(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    apiserver.create("services", service("a", "10.96.0.1"))
    apiserver.create("services", service("b", "10.96.0.2"))
    apiserver.compact()

    with pytest.raises(client.ApiException) as error:
        stream(api, resource_version="2", timeout_seconds=1)
    assert error.value.status == 410

    core = client.CoreV1Api(api)
    with pytest.raises(client.ApiException) as list_error:
        core.list_service_for_all_namespaces(resource_version="2", resource_version_match="Exact")
    assert list_error.value.status == 410

    listed = core.list_service_for_all_namespaces()
    assert listed.metadata is not None and listed.metadata.resource_version is not None
    apiserver.create("services", service("c", "10.96.0.3"))
    events = stream(api, resource_version=listed.metadata.resource_version, timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "c")]


def test_history_is_bounded(apiserver: KubeApiServer, api: client.ApiClient) -> None:
    for index in range(60):  # the fixture keeps 50 events
        apiserver.create("services", service(f"s{index}", f"10.96.1.{index + 1}"))

    with pytest.raises(client.ApiException) as error:
        stream(api, resource_version="6", timeout_seconds=1)
    assert error.value.status == 410
    assert len(stream(api, resource_version="16", timeout_seconds=1)) == 45


def test_a_watch_sees_objects_leave_its_label_selection(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    apiserver.create("services", service("web", "10.96.0.2"))
    version = apiserver.resource_version
    labelled = service("web", "10.96.0.2", labels={"service.kubernetes.io/service-proxy-name": "x"})
    apiserver.update("services", labelled)

    events = stream(
        api,
        resource_version=str(version),
        label_selector="!service.kubernetes.io/service-proxy-name",
        timeout_seconds=1,
    )

    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "web")]


def test_a_wrong_token_is_401(apiserver: KubeApiServer, tmp_path: Path) -> None:
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(apiserver.write_kubeconfig(tmp_path / "kubeconfig", token="wrong")),
        client_configuration=configuration,
    )

    with pytest.raises(client.ApiException) as error:
        client.CoreV1Api(client.ApiClient(configuration)).list_service_for_all_namespaces()

    assert error.value.status == 401


def test_the_wire_format_is_chunked_newline_delimited_json(apiserver: KubeApiServer) -> None:
    apiserver.create("services", service("web", "10.96.0.2"))
    connection = http.client.HTTPConnection(urlsplit(apiserver.url).netloc, timeout=5)

    connection.request(
        "GET",
        "/api/v1/services?watch=1&resourceVersion=0&timeoutSeconds=1",
        headers={"Authorization": f"Bearer {apiserver.token}"},
    )
    response = connection.getresponse()
    body = response.read()  # http.client undoes the chunking

    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Type") == "application/json"
    (line,) = body.splitlines()
    event = json.loads(line)
    assert event["type"] == "ADDED"
    assert (event["object"]["kind"], event["object"]["apiVersion"]) == ("Service", "v1")


def test_unavailable_refuses_connections_until_available_again(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    api.configuration.retries = False  # no urllib3 retries: the refusal itself surfaces
    core = client.CoreV1Api(client.ApiClient(api.configuration))
    core.list_service_for_all_namespaces(_request_timeout=2)

    apiserver.set_available(False)
    with pytest.raises(urllib3.exceptions.NewConnectionError, match="refused"):
        core.list_service_for_all_namespaces(_request_timeout=2)

    apiserver.set_available(True)
    assert core.list_service_for_all_namespaces(_request_timeout=2).items == []


def test_lists_come_in_pages(apiserver: KubeApiServer, api: client.ApiClient) -> None:
    for index in range(5):
        apiserver.create("services", service(f"s{index}", f"10.96.1.{index + 1}"))
    core = client.CoreV1Api(api)

    first = core.list_service_for_all_namespaces(limit=2)
    assert first.metadata is not None and first.metadata.var_continue is not None
    second = core.list_service_for_all_namespaces(limit=2, _continue=first.metadata.var_continue)
    assert second.metadata is not None and second.metadata.var_continue is not None
    third = core.list_service_for_all_namespaces(limit=2, _continue=second.metadata.var_continue)

    pages = [first, second, third]
    assert [len(page.items) for page in pages] == [2, 2, 1]
    assert third.metadata is not None and third.metadata.var_continue is None
    assert {page.metadata.resource_version for page in pages if page.metadata} == {"6"}


def test_thousands_of_objects_list_in_pages_of_one_snapshot_then_watch_from_its_version(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    count = 2000
    names = [f"s{i:04}" for i in range(count)]
    version = apiserver.create_many(
        "services", (service(name, f"10.96.{i // 256}.{i % 256}") for i, name in enumerate(names))
    )
    addresses = [f"10.244.{i // 256}.{i % 256}" for i in range(count)]
    apiserver.create_many(
        "endpointslices", (endpoint_slice(f"{n}-1", n, [a]) for n, a in zip(names, addresses))
    )
    core = client.CoreV1Api(api)

    whole = core.list_service_for_all_namespaces()
    assert whole.metadata is not None and whole.metadata.resource_version == str(version + count)
    assert [s.metadata.name for s in whole.items if s.metadata] == names
    assert all(s.metadata and s.metadata.resource_version for s in whole.items)

    # Pages are one snapshot: a write between them shows in none of them.
    pages = [core.list_service_for_all_namespaces(limit=700)]
    apiserver.delete("services", "default", "s1999")
    while pages[-1].metadata is not None and pages[-1].metadata.var_continue:
        token = pages[-1].metadata.var_continue
        pages.append(core.list_service_for_all_namespaces(limit=700, _continue=token))
    assert [len(page.items) for page in pages] == [700, 700, 600]
    assert {page.metadata.resource_version for page in pages if page.metadata} == {
        whole.metadata.resource_version
    }
    slices = client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces()
    assert len(slices.items) == count

    apiserver.update("services", service("s0007", "10.96.0.7", ports=[{"port": 81}]))
    events = stream(api, resource_version=whole.metadata.resource_version, timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("DELETED", "s1999"),
        ("MODIFIED", "s0007"),
    ]
    assert events[1]["object"].spec.ports[0].port == 81

    # A watch without a version starts with every object (many events to a chunk).
    assert len(stream(api, timeout_seconds=1)) == count - 1


def test_create_many_sends_an_event_for_each_object(
    apiserver: KubeApiServer, api: client.ApiClient
) -> None:
    watcher = watch.Watch()  # type: ignore[no-untyped-call]
    seen: list[tuple[str, str]] = []

    def create_while_watching() -> None:
        while apiserver.open_watches("services") == 0:
            threading.Event().wait(0.01)
        apiserver.create_many("services", (service(f"s{i}", f"10.96.1.{i}") for i in range(1, 4)))

    threading.Thread(target=create_while_watching).start()
    for event in watcher.stream(  # type: ignore[no-untyped-call]
        client.CoreV1Api(api).list_service_for_all_namespaces,
        resource_version="1",
        timeout_seconds=5,
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3:
            watcher.stop()  # type: ignore[no-untyped-call]

    assert seen == [("ADDED", "s1"), ("ADDED", "s2"), ("ADDED", "s3")]
