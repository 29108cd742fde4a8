"""A source's table of specs as a catalog hands it out: a snapshot taken in O(changes).

Copying a table of 100,000 services for each change cost ~10 ms in the agent (the copy
touches every spec's reference count, in a heap that no longer fits the caches): most of a
change's time at that size. A snapshot is instead a shared base, never changed once
handed out, and the keys changed since, copied; the base is folded again once the changes
grow past a sixteenth of it. A snapshot then copies at most that sixteenth (usually a few
keys: 0.1-0.2 ms at 100,000 services), and a fold, once every such sixteenth, the table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Generic, TypeVar, overload

_V = TypeVar("_V")
_MIN_FOLD = 1024  # changes kept beside the base before a fold, at least


class Layered(Mapping[str, _V]):
    """An immutable view: `base` with `changes` over it (a None value: deleted)."""

    __slots__ = ("_base", "_changes", "_len")

    def __init__(self, base: Mapping[str, _V], changes: Mapping[str, _V | None]) -> None:
        self._base = base
        self._changes = changes
        self._len = len(base) + sum(
            (value is not None) - (key in base) for key, value in changes.items()
        )

    def __getitem__(self, key: str) -> _V:
        if key in self._changes:
            value = self._changes[key]
            if value is None:
                raise KeyError(key)
            return value
        return self._base[key]

    def get(self, key: str, default: _V | None = None) -> _V | None:  # type: ignore[override]
        value = _get(self._base, self._changes, key)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        if key in self._changes:
            return self._changes[key] is not None  # type: ignore[index]
        return key in self._base

    def __iter__(self) -> Iterator[str]:
        return _keys(self._base, self._changes)

    def __len__(self) -> int:
        return self._len


class LayeredTable(Generic[_V]):
    """The source's side: `set` and `delete` record what changed since the base; `snapshot()`
    hands out a `Layered` view that later changes do not reach. Between two snapshots the
    table may hold what no snapshot should show (a source's half-built values): only what
    it holds when a snapshot is taken is handed out."""

    def __init__(self) -> None:
        self._base: dict[str, _V] = {}
        self._changes: dict[str, _V | None] = {}

    def get(self, key: str) -> _V | None:
        """The value now (set since the last snapshot or not)."""
        return _get(self._base, self._changes, key)

    def keys(self) -> Iterator[str]:
        """The keys now."""
        return _keys(self._base, self._changes)

    def set(self, key: str, value: _V) -> None:
        self._changes[key] = value

    def delete(self, key: str) -> None:
        self._changes[key] = None

    def snapshot(self) -> Layered[_V]:
        if len(self._changes) > max(_MIN_FOLD, len(self._base) // 16):
            base = dict(self._base)
            for key, value in self._changes.items():
                if value is None:
                    base.pop(key, None)
                else:
                    base[key] = value
            self._base, self._changes = base, {}
        return Layered(self._base, dict(self._changes))


def _get(base: Mapping[str, _V], changes: Mapping[str, _V | None], key: str) -> _V | None:
    """`key`'s value in `base` with `changes` over it; None when absent or deleted."""
    if key in changes:
        return changes[key]
    return base.get(key)


def _keys(base: Mapping[str, _V], changes: Mapping[str, _V | None]) -> Iterator[str]:
    """The keys of `base` with `changes` over it."""
    yield from (key for key in base if key not in changes)
    yield from (key for key, value in changes.items() if value is not None)


class LazyValues(Sequence[_V]):
    """A snapshot's values as a sequence, made into a tuple only when first read (an agent
    reads a catalog by key: only some commands list every service)."""

    __slots__ = ("_mapping", "_values")

    def __init__(self, mapping: Mapping[str, _V]) -> None:
        self._mapping = mapping
        self._values: tuple[_V, ...] | None = None

    def _tuple(self) -> tuple[_V, ...]:
        if self._values is None:
            self._values = tuple(self._mapping.values())
        return self._values

    @overload
    def __getitem__(self, index: int) -> _V: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[_V]: ...
    def __getitem__(self, index: int | slice) -> _V | Sequence[_V]:
        return self._tuple()[index]

    def __len__(self) -> int:
        return len(self._mapping)

    def __iter__(self) -> Iterator[_V]:
        return iter(self._tuple())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyValues):
            other = other._tuple()
        return isinstance(other, (tuple, list)) and self._tuple() == tuple(other)

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return repr(self._tuple())
