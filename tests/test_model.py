"""The model's value objects (`pykp.model`): an endpoint is held packed (its conditions,
weight and hints in two slots) and reads back, compares, hashes and prints as the ten
fields it is given."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from pykp.model import EndpointPort, EndpointSpec

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
