"""BackendTable: the sync's packed id -> (ip, port) table reads as the dict it replaces."""

from __future__ import annotations

import random

import pytest

from pykp.agent.backend_table import BackendTable

# The engine's spelling of addresses, and spellings it never returns (kept as given).
ADDRESSES = [
    "10.244.0.7",
    "0.0.0.0",
    "255.255.255.255",
    "fd00::1",
    "2001:db8::a:0:0:1",
    "::",
    "::ffff:1.2.3.4",
    "FD00::2",
]


def test_random_changes_read_as_a_dict() -> None:
    rng = random.Random(7)
    table, expected = BackendTable(), {}
    for _ in range(20_000):
        backend_id = rng.randrange(1, 3_000)
        if rng.random() < 0.6:
            address = (rng.choice(ADDRESSES), rng.randrange(1, 65_536))
            table[backend_id] = expected[backend_id] = address
        elif backend_id in expected:
            del table[backend_id], expected[backend_id]
        assert len(table) == len(expected)
    assert dict(table) == expected
    assert list(table) == sorted(expected)
    assert all(backend_id in table for backend_id in expected)


def test_absent_ids() -> None:
    table = BackendTable({3: ("10.244.0.3", 8080)})
    assert (0 in table, 3 in table, 4 in table, 10**9 in table, -1 in table) == (
        False,
        True,
        False,
        False,
        False,
    )
    with pytest.raises(KeyError):
        table[4]
    with pytest.raises(KeyError):
        del table[10**9]
    assert table.pop(3) == ("10.244.0.3", 8080)
    assert (len(table), dict(table)) == (0, {})


def test_an_address_that_is_not_one_is_refused() -> None:
    table = BackendTable()
    with pytest.raises(OSError):
        table[1] = ("10.244.0.999", 80)
    assert len(table) == 0
