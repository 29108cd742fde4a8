"""The model's value objects (`pykp.model`), held compactly and read as they are made: an
endpoint packed (its conditions, weight and hints in two slots), a service's options in
one object shared by the services that agree on them. Each reads back, compares, hashes,
copies and prints as the fields it was given."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from pykp.model import EndpointPort, EndpointSpec, ServicePort, ServiceSpec

_FIELDS = {
    "ip": "10.244.0.7",
    "ready": False,
    "serving": True,
    "terminating": True,
    "node_name": "node-a",
    "zone": "zone-1",
    "weight": 40,
    "ports": (EndpointPort("http", 8080),),
    "zone_hints": ("zone-1",),
    "node_hints": ("node-a", "node-b"),
}


def test_an_endpoint_reads_back_every_field_it_was_given() -> None:
    endpoint = EndpointSpec(**_FIELDS)  # type: ignore[arg-type]
    assert {name: getattr(endpoint, name) for name in _FIELDS} == _FIELDS
    assert (
        repr(endpoint)
        == "EndpointSpec(" + ", ".join(f"{name}={value!r}" for name, value in _FIELDS.items()) + ")"
    )


def test_the_defaults_are_a_ready_endpoint_of_weight_one() -> None:
    endpoint = EndpointSpec("10.244.0.1")
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == (True, True, False)
    assert (endpoint.weight, endpoint.node_name, endpoint.zone, endpoint.ports) == (
        1,
        None,
        None,
        None,
    )
    assert (endpoint.zone_hints, endpoint.node_hints) == ((), ())
    assert not endpoint.hinted
    assert EndpointSpec("10.244.0.1", zone_hints=("zone-1",)).hinted
    assert EndpointSpec("10.244.0.1", node_hints=("node-a",)).hinted


@pytest.mark.parametrize("name", list(_FIELDS))
def test_endpoints_differing_in_one_field_differ(name: str) -> None:
    other_value = {
        "ip": "10.244.0.8",
        "ready": True,
        "serving": False,
        "terminating": False,
        "node_name": None,
        "zone": "zone-2",
        "weight": 1,
        "ports": None,
        "zone_hints": (),
        "node_hints": ("node-a",),
    }[name]
    one = EndpointSpec(**_FIELDS)  # type: ignore[arg-type]
    other = EndpointSpec(**{**_FIELDS, name: other_value})  # type: ignore[arg-type]
    assert one != other and getattr(other, name) == other_value
    assert one == EndpointSpec(**_FIELDS)  # type: ignore[arg-type]
    assert hash(one) == hash(EndpointSpec(**_FIELDS))  # type: ignore[arg-type]
    assert len({one, other, EndpointSpec(**_FIELDS)}) == 2  # type: ignore[arg-type]


def test_an_endpoint_is_frozen_and_copies_whole() -> None:
    endpoint = EndpointSpec(**_FIELDS)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        endpoint.ip = "10.0.0.1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del endpoint.zone
    assert pickle.loads(pickle.dumps(endpoint)) == endpoint
    assert copy.deepcopy(endpoint) == endpoint and copy.copy(endpoint) == endpoint
    moved = endpoint.with_ports((EndpointPort("http", 9090),))
    assert moved.ports == (EndpointPort("http", 9090),) and endpoint.ports == _FIELDS["ports"]
    assert moved == EndpointSpec(**{**_FIELDS, "ports": moved.ports})  # type: ignore[arg-type]
    assert endpoint != ("10.244.0.7",)


def test_a_negative_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        EndpointSpec("10.244.0.1", weight=-1)


_SERVICE = {
    "name": "web",
    "namespace": "shop",
    "cluster_ips": ("10.96.0.10",),
    "external_ips": ("192.0.2.10",),
    "load_balancer_ips": ("198.51.100.10",),
    "ports": (ServicePort(port=80, target_port=8080, name="http", node_port=30080),),
    "policy": "maglev",
    "hash_key": "source-ip",
    "session_affinity": "ClientIP",
    "session_affinity_timeout_seconds": 600,
    "external_traffic_policy": "Local",
    "internal_traffic_policy": "Local",
    "health_check_node_port": 32000,
    "endpoints": (EndpointSpec("10.244.0.7"),),
    "created": "2026-12-01T00:00:00Z",
}


def test_a_service_reads_back_every_field_it_was_given() -> None:
    spec = ServiceSpec(**_SERVICE)  # type: ignore[arg-type]
    assert {name: getattr(spec, name) for name in _SERVICE} == _SERVICE
    assert spec.key == "shop/web"
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(copy.deepcopy(spec)) == hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_services_that_agree_on_their_options_share_one_object() -> None:
    one = ServiceSpec("a", cluster_ips=("10.96.0.1",), policy="round-robin")
    two = ServiceSpec("b", cluster_ips=("10.96.0.2",), policy="round-robin")
    other = ServiceSpec("c", cluster_ips=("10.96.0.3",), policy="random")
    assert one.options is two.options and one.options is not other.options
    assert ServiceSpec("d") == ServiceSpec("d") and ServiceSpec("d") != ServiceSpec(
        "d", policy="maglev"
    )


def test_a_service_changed_keeps_what_it_does_not_change() -> None:
    spec = ServiceSpec(**_SERVICE)  # type: ignore[arg-type]
    endpoints = (EndpointSpec("10.244.0.8"),)
    assert spec.with_endpoints(endpoints) == dataclasses.replace(spec, endpoints=endpoints)
    assert spec.with_endpoints(endpoints) == ServiceSpec(**{**_SERVICE, "endpoints": endpoints})  # type: ignore[arg-type]
    moved = spec.with_addresses(("10.96.0.11",), (), ("198.51.100.10",))
    assert moved == ServiceSpec(
        **{**_SERVICE, "cluster_ips": ("10.96.0.11",), "external_ips": ()}  # type: ignore[arg-type]
    )
    assert spec.with_addresses(spec.cluster_ips, spec.external_ips, spec.load_balancer_ips) == spec
    older = dataclasses.replace(spec, created="2026-01-01T00:00:00Z")
    assert older.created == "2026-01-01T00:00:00Z" and older.policy == "maglev"
