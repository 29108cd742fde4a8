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
    RR_CHAIN_SETS,
    FrontendRule,
    MarkLayout,
    _backend_elements,
    _frontend_key,
    _ip,
    slot_elements,
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
    rr_chains: Mapping[int, str] | None = None,
) -> dict[str, dict[str, str]]:
    """The elements of one engine service: its frontends (and their kind), the kernel
    path's slots of each (`slots`: frontend -> backends, repeated by weight), the slots a
    short-circuited frontend gives pods and the node on the kernel path (its service's
    cluster-wide backends, after the offset `MAX_SLOTS`), and the service addresses its
    frontends use. `rr_chains` (family -> chain): the service rotates on the kernel path,
    through that chain, over slots in rotation order."""
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
        frontend = (f.ip, f.port, f.protocol)
        kernel_path = slot_elements(
            version, key, slots.get(frontend, ()), rr_chain=(rr_chains or {}).get(version)
        )
        if f.short_circuit and short_circuit_slots:
            kernel_path += slot_elements(version, key, short_circuit_slots.get(frontend, ()), True)
        for name, element_key, text in kernel_path:
            put(name, element_key, text)
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


# One contribution as the tracker keeps it: (set or map, key, element text) flattened,
# three items per element (a tuple per element would cost 64 bytes each).
_Held = tuple[str, ...]


class ElementTracker:
    """The elements wanted, with who wants them, and what changed since `take_delta()`.

    Held compactly (at 100,000 services this is most of the agent's Python state): each
    owner's elements as one flat tuple, each element once as its text (a set's text is
    its key: the same string), and a count only for the few elements several owners hold.
    """

    def __init__(self, *, loading: bool = False) -> None:
        """`loading`: the first contributions go to the kernel in one full load (from
        `wanted()`), not as a delta: nothing is recorded for `take_delta()` until
        `loaded()` is called (a fifth of a full sync's time at 10,000 services)."""
        self._loading = loading
        self._owners: dict[str, _Held] = {}
        # name -> key -> element text
        self._elements: dict[str, dict[str, str]] = {
            name: {} for name in (*_SYNCED, *RR_CHAIN_SETS)
        }
        # (name, key) -> owners past the first, for elements held by more than one
        self._extra: dict[tuple[str, str], int] = {}
        # (name, key) -> the element text the kernel held at the last take (None: absent)
        self._touched: dict[tuple[str, str], str | None] = {}
        self.generation = 0  # bumped by every change of the elements wanted

    def __len__(self) -> int:
        return sum(map(len, self._elements.values()))

    def set(self, owner: str, contribution: Contribution | None) -> None:
        """Make `owner` contribute exactly `contribution` (None or empty: nothing)."""
        old = self._owners.pop(owner, ())
        new: _Held = tuple(
            part
            for name, items in (contribution or {}).items()
            for key, text in items.items()
            for part in (name, key, text)
        )
        if old == new:
            if new:
                self._owners[owner] = old
            return
        if not old:  # a new owner (every owner of a full load): nothing to compare
            for i in range(0, len(new), 3):
                self._hold(new[i], new[i + 1], new[i + 2])
            self._owners[owner] = new
            return
        old_triples = list(zip(old[0::3], old[1::3], old[2::3], strict=True))
        new_triples = list(zip(new[0::3], new[1::3], new[2::3], strict=True))
        kept = set(old_triples).intersection(new_triples) if new else set()
        for triple in old_triples:
            if triple not in kept:
                self._release(triple[0], triple[1])
        for triple in new_triples:
            if triple not in kept:
                self._hold(*triple)
        if new:
            self._owners[owner] = new

    def owners(self) -> Iterable[str]:
        return self._owners.keys()

    def wanted(self) -> dict[str, dict[str, str]]:
        """Every element wanted now, per set or map (for a full load)."""
        return {name: dict(items) for name, items in self._elements.items()}

    def take_delta(self) -> ElementDelta:
        """What changed since the last call (or since `forget_kernel`)."""
        delta = ElementDelta()
        for (name, key), before in self._touched.items():
            now = self._elements[name].get(key)
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

    def _touch(self, name: str, key: str, text: str | None) -> None:
        self.generation += 1
        if not self._loading and (name, key) not in self._touched:
            self._touched[(name, key)] = text

    def _hold(self, name: str, key: str, text: str) -> None:
        items = self._elements[name]
        entry = items.get(key)
        self._touch(name, key, entry)
        # Two owners of one key agree on its value (service IPs, hairpin pairs); if they
        # ever did not, the first one's stays.
        if entry is None:
            items[key] = text
        else:
            self._extra[(name, key)] = self._extra.get((name, key), 0) + 1

    def _release(self, name: str, key: str) -> None:
        items = self._elements[name]
        entry = items.get(key)
        if entry is None:
            return
        self._touch(name, key, entry)
        extra = self._extra.get((name, key), 0)
        if extra > 1:
            self._extra[(name, key)] = extra - 1
        elif extra == 1:
            del self._extra[(name, key)]
        else:
            del items[key]
