"""The elements pykp's nftables sets and maps should hold, tracked owner by owner.

Each owner (an engine service, a backend) contributes elements; an element several owners
contribute (a service IP shared by two services, a hairpin pair of two backends on one pod)
stays while any of them does. `take_delta()` says what changed since it was last called:
what a sync sends to the kernel, and nothing else, whatever the number of services.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pykp.netfilter.rules import (
    _SYNCED,
    MAX_SLOTS,
    FrontendRule,
    MarkLayout,
    _backend_elements,
    _frontend_key,
    _ip,
)

__all__ = [
    "Contribution",
    "ElementDelta",
    "ElementTracker",
    "backend_contribution",
    "frontend_contribution",
]

# set or map name -> element key -> element text (``key : value`` for a map)
Contribution = Mapping[str, Mapping[str, str]]


def frontend_contribution(
    frontends: Iterable[FrontendRule],
    slots: Mapping[tuple[str, int, str], Sequence[tuple[str, int]]],
    service_ips: Iterable[str],
    short_circuit_slots: Mapping[tuple[str, int, str], Sequence[tuple[str, int]]] | None = None,
) -> dict[str, dict[str, str]]:
    """The elements of one engine service: its frontends (and their kind), the kernel
    path's slots of each (`slots`: frontend -> backends, repeated by weight), the slots a
    short-circuited frontend gives pods and the node on the kernel path (its service's
    cluster-wide backends, after the offset `MAX_SLOTS`), and the service addresses its
    frontends use."""
    out: dict[str, dict[str, str]] = {}

    def put(name: str, key: str, text: str) -> None:
        out.setdefault(name, {})[key] = text

    for f in frontends:
        version, key = _frontend_key(f)
        put(f"frontends{version}", key, key)
        if f.queued:
            put(f"queued{version}", key, key)
        if f.external:
            put(f"{'masq' if f.masquerade else 'local'}_frontends{version}", key, key)
        if f.no_local_endpoints:
            put(f"no_local_endpoints{version}", key, key)
        if f.short_circuit:
            put(f"short_circuit{version}", key, key)
        chosen = tuple(slots.get((f.ip, f.port, f.protocol), ()))[:MAX_SLOTS]
        if chosen:
            put(f"fallback{version}", key, f"{key} : goto pick{version}_{len(chosen)}")
            for index, (backend_ip, backend_port) in enumerate(chosen):
                slot = f"{key} . {index}"
                put(f"slots{version}", slot, f"{slot} : {_ip(backend_ip)[1]} . {backend_port}")
        cluster = tuple((short_circuit_slots or {}).get((f.ip, f.port, f.protocol), ()))
        if f.short_circuit and cluster:
            cluster = cluster[:MAX_SLOTS]
            put(f"fallback_sc{version}", key, f"{key} : goto pick_sc{version}_{len(cluster)}")
            for index, (backend_ip, backend_port) in enumerate(cluster, start=MAX_SLOTS):
                slot = f"{key} . {index}"
                put(f"slots{version}", slot, f"{slot} : {_ip(backend_ip)[1]} . {backend_port}")
    for text in service_ips:
        version, ip = _ip(text)
        put(f"service_ips{version}", ip, ip)
    return out


def backend_contribution(
    backend_id: int, ip: str, port: int, layout: MarkLayout
) -> dict[str, dict[str, str]]:
    """The elements of one backend id: its mark -> address map entry and its hairpin pair."""
    v6, mark, element, pair = _backend_elements(
        backend_id, ip, port, layout.shift, layout.max_backend_id
    )
    family = 6 if v6 else 4
    return {f"backends{family}": {mark: element}, f"hairpin{family}": {pair: pair}}


@dataclass
class ElementDelta:
    """What to change in the kernel, per set or map, in the order a sync applies it."""

    # New elements, and new values of existing map keys (sent as a delete and an add in
    # the same transaction: atomic for packets).
    added: dict[str, list[str]] = field(default_factory=dict)
    replaced: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # (key, element)
    # Elements no owner holds any more: removed after the engine no longer uses them.
    removed: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.replaced or self.removed)

    @property
    def counts(self) -> tuple[int, int]:
        """(elements added or replaced, elements removed)."""
        added = sum(map(len, self.added.values())) + sum(map(len, self.replaced.values()))
        return added, sum(map(len, self.removed.values()))


# One contribution as the tracker keeps it: (set or map, key, element text) triples.
_Held = tuple[tuple[str, str, str], ...]


class ElementTracker:
    """The elements wanted, with who wants them, and what changed since `take_delta()`.

    Held compactly (at 100,000 services this is most of the agent's Python state): each
    owner's elements as one tuple of triples, each element once with its owner count.
    """

    def __init__(self, *, loading: bool = False) -> None:
        """`loading`: the first contributions go to the kernel in one full load (from
        `wanted()`), not as a delta: nothing is recorded for `take_delta()` until
        `loaded()` is called (a fifth of a full sync's time at 10,000 services)."""
        self._loading = loading
        self._owners: dict[str, _Held] = {}
        # name -> key -> (element text, owners holding it)
        self._elements: dict[str, dict[str, tuple[str, int]]] = {name: {} for name in _SYNCED}
        # (name, key) -> the element text the kernel held at the last take (None: absent)
        self._touched: dict[tuple[str, str], str | None] = {}
        self.generation = 0  # bumped by every change of the elements wanted

    def __len__(self) -> int:
        return sum(map(len, self._elements.values()))

    def set(self, owner: str, contribution: Contribution | None) -> None:
        """Make `owner` contribute exactly `contribution` (None or empty: nothing)."""
        old = self._owners.pop(owner, ())
        new: _Held = tuple(
            (name, key, text)
            for name, items in (contribution or {}).items()
            for key, text in items.items()
        )
        if old == new:
            if new:
                self._owners[owner] = old
            return
        kept = set(new) & set(old) if old and new else set()
        for triple in old:
            if triple not in kept:
                self._release(triple[0], triple[1])
        for triple in new:
            if triple not in kept:
                self._hold(*triple)
        if new:
            self._owners[owner] = new

    def owners(self) -> Iterable[str]:
        return self._owners.keys()

    def wanted(self) -> dict[str, dict[str, str]]:
        """Every element wanted now, per set or map (for a full load)."""
        return {
            name: {key: entry[0] for key, entry in items.items()}
            for name, items in self._elements.items()
        }

    def take_delta(self) -> ElementDelta:
        """What changed since the last call (or since `forget_kernel`)."""
        delta = ElementDelta()
        for (name, key), before in self._touched.items():
            entry = self._elements[name].get(key)
            now = None if entry is None else entry[0]
            if now == before:
                continue
            if now is None:
                delta.removed.setdefault(name, []).append(key)
            elif before is None:
                delta.added.setdefault(name, []).append(now)
            else:
                delta.replaced.setdefault(name, []).append((key, now))
        self._touched.clear()
        return delta

    def loaded(self) -> None:
        """The full load is in: changes from now on are recorded for `take_delta()`."""
        self._loading = False
        self._touched.clear()

    def forget_kernel(self) -> None:
        """The kernel's content is unknown (a full load follows): nothing is pending."""
        self._touched.clear()

    def counts(self) -> dict[str, int]:
        """Elements wanted per set or map."""
        return {name: len(items) for name, items in self._elements.items()}

    def _touch(self, name: str, key: str) -> tuple[str, int] | None:
        self.generation += 1
        entry = self._elements[name].get(key)
        if not self._loading and (name, key) not in self._touched:
            self._touched[(name, key)] = None if entry is None else entry[0]
        return entry

    def _hold(self, name: str, key: str, text: str) -> None:
        entry = self._touch(name, key)
        # Two owners of one key agree on its value (service IPs, hairpin pairs); if they
        # ever did not, the first one's stays.
        self._elements[name][key] = (text, 1) if entry is None else (entry[0], entry[1] + 1)

    def _release(self, name: str, key: str) -> None:
        entry = self._elements[name].get(key)
        if entry is None:
            return
        self._touch(name, key)
        if entry[1] <= 1:
            del self._elements[name][key]
        else:
            self._elements[name][key] = (entry[0], entry[1] - 1)
