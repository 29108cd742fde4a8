"""What the agent needs from a source of services, whatever the source.

A source keeps the services it knows (a `Catalog`) and the keys of those that changed since
the agent last asked (`take_changes()`): the agent then works on those alone, and a periodic
full resync covers everything. Sources report what is wrong (`problems()`, `status()`)
instead of raising into the agent, in the manner of Cilium's reconcilers: a bad entry is
skipped, a bad file or an unreachable API server keeps the last good state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pykp.model import Catalog, Problem

__all__ = ["ChangeLog", "Changes", "ServiceSource", "SourceStatus"]


@dataclass(frozen=True)
class Changes:
    """The state after some changes, and which services they touched."""

    catalog: Catalog
    # namespace/name of every service added, changed or removed since the last call;
    # None: anything may have changed (the first state, or a change of the whole context).
    keys: frozenset[str] | None


class ChangeLog:
    """The keys a source changed since the agent last took them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[str] | None = None  # None: everything (nothing taken yet)

    def add(self, keys: Iterable[str]) -> None:
        with self._lock:
            if self._keys is not None:
                self._keys.update(keys)

    def everything(self) -> None:
        with self._lock:
            self._keys = None

    def take(self) -> frozenset[str] | None:
        with self._lock:
            keys, self._keys = self._keys, set()
        return None if keys is None else frozenset(keys)


@dataclass(frozen=True)
class SourceStatus:
    """A source's health, for metrics, `/status` and logs."""

    name: str  # e.g. "file:/etc/pykp/services.yaml"
    initialized: bool  # a first full state has loaded (nothing is programmed before)
    changed_at: float | None  # wall-clock time of the change `current()` reflects
    loads: int  # successful (re)loads
    load_errors: int  # reads that failed (the last good state was kept)
    invalid_objects: int  # invalid entries skipped, summed over every load
    last_error: str | None  # the latest failed read, None once a read succeeds again


@runtime_checkable
class ServiceSource(Protocol):
    """What the agent needs from a source of services."""

    def start(self, notify: Callable[[], None]) -> None:
        """Begin watching; call `notify()` (from any thread) whenever `current()` changes."""

    def current(self) -> Catalog | None:
        """The latest complete state; None until the first full load."""

    def take_changes(self) -> Changes | None:
        """The latest state and the keys changed since the previous call (None: all of
        them, as on the first call); None until the first full load."""

    def problems(self) -> list[Problem]:
        """The invalid entries the latest load skipped, with their locations."""

    def status(self) -> SourceStatus: ...

    def stop(self) -> None: ...
