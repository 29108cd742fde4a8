"""A source's snapshots of its table (`pykp.sources.snapshot`): each one is what the table
held when it was taken, whatever came after, through folds of the base."""

from __future__ import annotations

import random

import pytest

from pykp.sources import snapshot
from pykp.sources.snapshot import Layered, LayeredTable, LazyValues


def test_a_snapshot_keeps_what_the_table_held_when_taken() -> None:
    table: LayeredTable[int] = LayeredTable()
    table.set("a", 1)
    table.set("b", 2)
    first = table.snapshot()
    table.set("a", 10)
    table.delete("b")
    table.set("c", 3)
    second = table.snapshot()

    assert dict(first) == {"a": 1, "b": 2} and len(first) == 2
    assert dict(second) == {"a": 10, "c": 3} and len(second) == 2
    assert second.get("b") is None and "b" not in second and second.get("b", 7) == 7
    assert "c" in second and second["c"] == 3


def test_snapshots_match_a_plain_dict_through_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random histories against a dict copied at each snapshot; small folds so that many
    happen, with snapshots taken before them checked again after. The table's own `get`
    and `keys` follow the dict at every step."""
    monkeypatch.setattr(snapshot, "_MIN_FOLD", 4)
    rng = random.Random(7)
    table: LayeredTable[int] = LayeredTable()
    truth: dict[str, int] = {}
    taken: list[tuple[Layered[int], dict[str, int]]] = []
    for step in range(3000):
        key = f"k{rng.randrange(60)}"
        if rng.random() < 0.3:
            truth.pop(key, None)
            table.delete(key)
        else:
            truth[key] = step
            table.set(key, step)
        # The table itself reads as it is now, between snapshots too.
        assert table.get(key) == truth.get(key)
        if rng.random() < 0.05:
            assert sorted(table.keys()) == sorted(truth)
        if rng.random() < 0.2:
            taken.append((table.snapshot(), dict(truth)))
    for view, expected in taken:
        assert dict(view) == expected
        assert len(view) == len(expected)
        assert sorted(view) == sorted(expected)
        assert all(view.get(f"k{i}") == expected.get(f"k{i}") for i in range(60))


def test_lazy_values_are_the_tables_values_as_a_tuple() -> None:
    table: LayeredTable[str] = LayeredTable()
    for key in "abc":
        table.set(key, key.upper())
    values = LazyValues(table.snapshot())

    assert len(values) == 3
    assert list(values) == ["A", "B", "C"] and values[1] == "B" and values[-1] == "C"
    assert values == ("A", "B", "C") and values == LazyValues(table.snapshot())
    assert values != ("A", "B")
