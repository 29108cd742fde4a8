"""The elements pykp's nftables sets and maps should hold, tracked owner by owner.

Each owner (an engine service) contributes elements; an element several owners contribute
(a service IP shared by two services) stays while any of them does. `take_delta()` says
what changed since it was last called: what a sync sends to the kernel, and nothing else,
whatever the number of services. The backend ids' elements (`BackendElements`) are rendered
from the engine's id table instead of held: a hairpin pair stays while any id is on its
address.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    "BackendElements",
    "Contribution",
    "ElementDelta",
    "ElementTracker",
    "frontend_contribution",
]

# set or map name -> element key -> element text (``key : value`` for a map)
Contribution = Mapping[str, Mapping[str, str]]


class BackendIds(Protocol):
    """The engine's backend ids as `BackendElements.load` reads them (`BackendTable`)."""

    def items(self) -> Iterable[tuple[int, tuple[str, int]]]:
        """(id, (ip, port)) for each id."""
        ...

    def addresses(self) -> Iterable[str]:
        """The ip of each id (as `items`, without the tuples)."""
        ...


# Each name as one string object: an owner's elements name their set with it, and a name
# formatted per owner (f"slots{version}") would be held once per owner.
_NAMES: dict[str, str] = {name: name for name in (*_SYNCED, *RR_CHAIN_SETS)}


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
# three items per element (a tuple per element would cost 64 bytes each). A grouped set's
# elements are one item: (name, "", their texts joined by newlines).
_Held = tuple[str, ...]

# The kernel path's slots: three or so per frontend, each owned by its frontend's service
# alone, so held as one text per owner and set, not as a key, a text and an index entry
# per slot (~500 bytes per service less). What makes them one owner's: the engine refuses
# a second service on a frontend (FrontendTaken), refused services contribute nothing, and
# a slot's key starts with its frontend's. Two owners of one slot key would be counted
# twice (a count the kernel never shows: a repair at every check), so that must hold.
_GROUPED = frozenset({"slots4", "slots6"})

# The kernel path's verdict maps: a frontend's value is one of a few verdicts ("goto
# pick4_3"), so each is held once, as the value alone, and spelt "key : value" when handed
# out (a text per frontend: 96 bytes each).
_VERDICTS = frozenset({"fallback4", "fallback6", "fallback_sc4", "fallback_sc6"})


def _text(name: str, key: str, held: str) -> str:
    """An element's text from what the tracker holds of it."""
    return f"{key} : {held}" if name in _VERDICTS else held


def _lines(text: str | None) -> dict[str, str]:
    """A group's elements by key (a slot's key is its text up to " : ")."""
    if not text:
        return {}
    return {line.split(" : ", 1)[0]: line for line in text.split("\n")}


class ElementTracker:
    """The elements wanted, with who wants them, and what changed since `take_delta()`.

    Held compactly (at 100,000 services this is most of the agent's Python state): each
    owner's elements as one flat tuple, each element once as its text (a set's text is
    its key: the same string), a count only for the few elements several owners hold, and
    the slots of an owner as one text.
    """

    def __init__(self, *, loading: bool = False, in_parts: bool = False) -> None:
        """`loading`: the first contributions go to the kernel in one full load (from
        `wanted()`), not as a delta: nothing is recorded for `take_delta()` until
        `loaded()` is called (a fifth of a full sync's time at 10,000 services).
        `in_parts` (with `loading`): or in parts, each what `take_part()` hands out."""
        self._loading = loading
        # The elements held for the first time since the last `take_part()`, as texts.
        self._part: dict[str, list[str]] | None = {} if loading and in_parts else None
        self._owners: dict[str, _Held] = {}
        # name -> key -> element text, a verdict map's value alone (grouped sets: empty,
        # their elements are the owners')
        self._elements: dict[str, dict[str, str]] = {
            name: {} for name in (*_SYNCED, *RR_CHAIN_SETS)
        }
        self._grouped_counts = dict.fromkeys(_GROUPED, 0)
        # (name, key) -> owners past the first, for elements held by more than one
        self._extra: dict[tuple[str, str], int] = {}
        # (name, key) -> the element text the kernel held at the last take (None: absent)
        self._touched: dict[tuple[str, str], str | None] = {}
        # (owner, grouped set) -> the owner's group at the last take (None: absent)
        self._touched_groups: dict[tuple[str, str], str | None] = {}
        self.generation = 0  # bumped by every change of the elements wanted
        self._verdicts: dict[str, str] = {}  # each verdict map value, as one string

    def __len__(self) -> int:
        return sum(self.counts().values())

    def set(self, owner: str, contribution: Contribution | None) -> None:
        """Make `owner` contribute exactly `contribution` (None or empty: nothing)."""
        old = self._owners.pop(owner, ())
        parts: list[str] = []
        for name, items in (contribution or {}).items():
            name = _NAMES[name]
            if name in _GROUPED:
                if items:
                    parts += (name, "", "\n".join(items.values()))
            elif name in _VERDICTS:
                for key, text in items.items():
                    parts += (name, key, self._verdict(key, text))
            else:
                for key, text in items.items():
                    parts += (name, key, text)
        new: _Held = tuple(parts)
        if old == new:
            if new:
                self._owners[owner] = old
            return
        if not old:  # a new owner (every owner of a full load): nothing to compare
            for i in range(0, len(new), 3):
                self._hold(owner, new[i], new[i + 1], new[i + 2])
            self._owners[owner] = new
            return
        old_triples = list(zip(old[0::3], old[1::3], old[2::3], strict=True))
        new_triples = list(zip(new[0::3], new[1::3], new[2::3], strict=True))
        kept = set(old_triples).intersection(new_triples) if new else set()
        for triple in old_triples:
            if triple not in kept:
                self._release(owner, *triple)
        for triple in new_triples:
            if triple not in kept:
                self._hold(owner, *triple)
        if new:
            self._owners[owner] = new

    def owners(self) -> Iterable[str]:
        return self._owners.keys()

    def wanted(self) -> dict[str, dict[str, str]]:
        """Every element wanted now, per set or map (for a full load)."""
        wanted = {
            name: {key: _text(name, key, held) for key, held in items.items()}
            if name in _VERDICTS
            else dict(items)
            for name, items in self._elements.items()
        }
        for held in self._owners.values():
            for i in range(0, len(held), 3):
                if held[i] in _GROUPED:
                    wanted[held[i]].update(_lines(held[i + 2]))
        return wanted

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
                delta.added.setdefault(name, []).append(_text(name, key, now))
            else:
                delta.replaced.setdefault(name, []).append((key, _text(name, key, now)))
        self._touched.clear()
        # Grouped elements, over every group touched at once: a slot that moved from one
        # owner's group to another's (a frontend changing hands) is replaced, not removed.
        before_of: dict[tuple[str, str], str] = {}
        now_of: dict[tuple[str, str], str] = {}
        for (owner, name), before in self._touched_groups.items():
            now = self._group(owner, name)
            if now == before:
                continue
            before_of.update(((name, key), line) for key, line in _lines(before).items())
            now_of.update(((name, key), line) for key, line in _lines(now).items())
        self._touched_groups.clear()
        for (name, key), line in now_of.items():
            was = before_of.get((name, key))
            if was is None:
                delta.added.setdefault(name, []).append(line)
            elif was != line:
                delta.replaced.setdefault(name, []).append((key, line))
        for name, key in before_of.keys() - now_of.keys():
            delta.removed.setdefault(name, []).append(key)
        return delta

    def take_part(self) -> dict[str, list[str]]:
        """A load in parts: the elements held for the first time since the last call (each
        element once, as `wanted()` has it), per set or map."""
        part, self._part = self._part, {}
        if part is None:
            raise RuntimeError("not a load in parts")
        return part

    def loaded(self) -> None:
        """The full load is in: changes from now on are recorded for `take_delta()`."""
        self._loading = False
        self._part = None
        self._touched.clear()
        self._touched_groups.clear()

    def forget_kernel(self) -> None:
        """The kernel's content is unknown (a full load follows): nothing is pending."""
        self._touched.clear()
        self._touched_groups.clear()

    def counts(self) -> dict[str, int]:
        """Elements wanted per set or map."""
        counts = {name: len(items) for name, items in self._elements.items()}
        counts.update(self._grouped_counts)
        return counts

    def _verdict(self, key: str, text: str) -> str:
        """A verdict map element's value (its text past "key : "), as the one string."""
        if text[len(key) : len(key) + 3] != " : " or not text.startswith(key):
            raise ValueError(f"not an element of key {key!r}: {text!r}")
        value = text[len(key) + 3 :]
        return self._verdicts.setdefault(value, value)

    def _group(self, owner: str, name: str) -> str | None:
        held = self._owners.get(owner, ())
        for i in range(0, len(held), 3):
            if held[i] == name:
                return held[i + 2]
        return None

    def _touch(self, name: str, key: str, text: str | None) -> None:
        self.generation += 1
        if not self._loading and (name, key) not in self._touched:
            self._touched[(name, key)] = text

    def _hold(self, owner: str, name: str, key: str, text: str) -> None:
        if name in _GROUPED:
            self.generation += 1
            if not self._loading:
                self._touched_groups.setdefault((owner, name), None)
            self._grouped_counts[name] += text.count("\n") + 1
            if self._part is not None:
                self._part.setdefault(name, []).extend(text.split("\n"))
            return
        items = self._elements[name]
        entry = items.get(key)
        self._touch(name, key, entry)
        # Two owners of one key agree on its value (service IPs, hairpin pairs); if they
        # ever did not, the first one's stays.
        if entry is None:
            items[key] = text
            if self._part is not None:
                self._part.setdefault(name, []).append(_text(name, key, text))
        else:
            self._extra[(name, key)] = self._extra.get((name, key), 0) + 1

    def _release(self, owner: str, name: str, key: str, text: str) -> None:
        if name in _GROUPED:
            self.generation += 1
            if not self._loading:
                self._touched_groups.setdefault((owner, name), text)
            self._grouped_counts[name] -= text.count("\n") + 1
            return
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


class BackendElements:
    """The elements of the backend ids: each id's mark -> address entry in `backends<v>`,
    and each backend address's hairpin pair in `hairpin<v>` (one pair per address,
    whatever the number of ids on it).

    Rendered from the id table when a load or a change needs them, not held as text: at
    three backends per service that text was a fifth of the agent's Python state. What is
    held is a count of ids per address (the pair goes with the last of them) and the
    counts per set.
    """

    def __init__(self, layout: MarkLayout) -> None:
        self._layout = layout
        self._ids_on: dict[str, int] = {}  # backend address -> backend ids on it
        self._counts = dict.fromkeys(_BACKEND_SETS, 0)
        self.generation = 0  # bumped by every change of the elements wanted

    def load(self, backends: BackendIds) -> dict[str, dict[str, str]]:
        """Every element of `backends`, the whole id table (a full load)."""
        # The counts kept first, from the addresses alone, then the texts the load sends
        # and drops: counted along with the texts, the kept addresses were scattered among
        # them and held their memory (12 of 16 MiB left free at 30,000 services).
        self._ids_on = {}
        for ip in backends.addresses():
            address = _ip(ip)[1]
            self._ids_on[address] = self._ids_on.get(address, 0) + 1
        self._counts = dict.fromkeys(_BACKEND_SETS, 0)
        self.generation += 1
        wanted: dict[str, dict[str, str]] = {name: {} for name in _BACKEND_SETS}
        for backend_id, (ip, port) in backends.items():
            v6, mark, element = self._render(backend_id, ip, port)
            wanted[_MAPS[v6]][mark] = element
            self._counts[_MAPS[v6]] += 1
        for address in self._ids_on:
            pairs, pair = _PAIRS[":" in address], _pair(address)
            wanted[pairs][pair] = pair
            self._counts[pairs] += 1
        return wanted

    def change(
        self,
        added: Mapping[int, tuple[str, int]],
        removed: Mapping[int, tuple[str, int]],
    ) -> ElementDelta:
        """What the kernel must add and remove for ids `added` and `removed` (the engine
        frees an id only after the batch that allocated: no id is in both)."""
        delta = ElementDelta()
        if not (added or removed):
            return delta
        self.generation += 1
        # Pairs counted over the whole change: an address moving from one id to another
        # keeps its pair, never removed and added again.
        before: dict[str, int] = {}
        family: dict[str, bool] = {}
        for ids, step in ((added, 1), (removed, -1)):
            for backend_id, (ip, port) in ids.items():
                v6, mark, element = self._render(backend_id, ip, port)
                # The address itself counts its ids: the id table's string (canonical),
                # not a pair's text held once more per address.
                address = _ip(ip)[1]
                if step > 0:
                    delta.added.setdefault(_MAPS[v6], []).append(element)
                else:
                    delta.removed.setdefault(_MAPS[v6], []).append(mark)
                self._counts[_MAPS[v6]] += step
                before.setdefault(address, self._ids_on.get(address, 0))
                family[address] = v6
                if step > 0:
                    self._hold(address, v6)
                else:
                    self._release(address, v6)
        for address, count in before.items():
            now = self._ids_on.get(address, 0)
            if count == 0 and now:
                delta.added.setdefault(_PAIRS[family[address]], []).append(_pair(address))
            elif count and not now:
                delta.removed.setdefault(_PAIRS[family[address]], []).append(_pair(address))
        return delta

    def counts(self) -> dict[str, int]:
        """Elements wanted per set or map."""
        return dict(self._counts)

    def _render(self, backend_id: int, ip: str, port: int) -> tuple[bool, str, str]:
        """(is IPv6, mark, map element). Raises for an id or a port out of range: before
        anything is committed."""
        v6, mark, element, _ = _backend_elements(
            backend_id, ip, port, self._layout.shift, self._layout.max_backend_id
        )
        return v6, mark, element

    def _hold(self, address: str, v6: bool) -> None:
        """Count one more id on `address` (the first brings its pair)."""
        count = self._ids_on.get(address, 0)
        self._ids_on[address] = count + 1
        if count == 0:
            self._counts[_PAIRS[v6]] += 1

    def _release(self, address: str, v6: bool) -> None:
        count = self._ids_on.get(address, 0)
        if count > 1:
            self._ids_on[address] = count - 1
        elif count == 1:
            del self._ids_on[address]
            self._counts[_PAIRS[v6]] -= 1


def _pair(address: str) -> str:
    """The hairpin pair of a backend address (a pod reaching itself through a service)."""
    return f"{address} . {address}"


_MAPS = {False: "backends4", True: "backends6"}  # by "is IPv6"
_PAIRS = {False: "hairpin4", True: "hairpin6"}
_BACKEND_SETS = (*_MAPS.values(), *_PAIRS.values())
