"""The engine's backend ids and their addresses, as the rules name them: id -> (ip, port)."""

from __future__ import annotations

import socket
from array import array
from collections.abc import Iterator, Mapping, MutableMapping

_V4, _V6 = 4, 6
_ABSENT = 0
_WIDTH = 16  # bytes of address per id (an IPv4 address uses the first 4)


class BackendTable(MutableMapping[int, tuple[str, int]]):
    """id -> (ip, port), packed.

    Held per backend (300,000 of them at 100,000 services of 3 endpoints), so in arrays
    indexed by id, which the engine hands out small and recycles: 19 bytes per backend,
    where a dict of (ip, port) tuples held 146 (tracemalloc, 300,000 backends). A read
    makes the (ip, port) it returns.
    An address not in its canonical spelling (which the engine never returns) is kept as
    given, beside the arrays.
    """

    def __init__(self, items: Mapping[int, tuple[str, int]] | None = None) -> None:
        self._families = bytearray()  # per id: 0 (absent), 4 or 6
        self._addresses = bytearray()  # per id: _WIDTH bytes
        self._ports = array("H")
        self._spelled: dict[int, str] = {}  # ids whose address is not spelt canonically
        self._count = 0
        if items:
            self.update(items)

    def __getitem__(self, backend_id: int) -> tuple[str, int]:
        family = self._family(backend_id)
        if family == _ABSENT:
            raise KeyError(backend_id)
        return self._ip(backend_id, family), self._ports[backend_id]

    def _ip(self, backend_id: int, family: int) -> str:
        spelled = self._spelled.get(backend_id) if self._spelled else None
        if spelled is not None:
            return spelled
        start = backend_id * _WIDTH
        if family == _V4:
            return socket.inet_ntop(socket.AF_INET, self._addresses[start : start + 4])
        return socket.inet_ntop(socket.AF_INET6, self._addresses[start : start + _WIDTH])

    def __contains__(self, backend_id: object) -> bool:
        return isinstance(backend_id, int) and self._family(backend_id) != _ABSENT

    def __setitem__(self, backend_id: int, address: tuple[str, int]) -> None:
        ip, port = address
        if backend_id < 0:
            raise KeyError(backend_id)
        family, af = (_V6, socket.AF_INET6) if ":" in ip else (_V4, socket.AF_INET)
        packed = socket.inet_pton(af, ip)
        missing = backend_id + 1 - len(self._families)
        if missing > 0:
            # Grown by at least half again: ids are handed out in increasing order at first.
            missing = max(missing, len(self._families) // 2)
            self._families.extend(bytes(missing))
            self._addresses.extend(bytes(missing * _WIDTH))
            self._ports.frombytes(bytes(missing * self._ports.itemsize))
        if self._families[backend_id] == _ABSENT:
            self._count += 1
        self._families[backend_id] = family
        start = backend_id * _WIDTH
        self._addresses[start : start + len(packed)] = packed
        self._ports[backend_id] = port
        if socket.inet_ntop(af, packed) != ip:
            self._spelled[backend_id] = ip
        else:
            self._spelled.pop(backend_id, None)

    def __delitem__(self, backend_id: int) -> None:
        if self._family(backend_id) == _ABSENT:
            raise KeyError(backend_id)
        self._families[backend_id] = _ABSENT
        self._spelled.pop(backend_id, None)
        self._count -= 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return (i for i, family in enumerate(self._families) if family != _ABSENT)

    def addresses(self) -> Iterator[str]:
        """Each id's ip, in id order (what `items()` gives, without its tuples)."""
        for backend_id, family in enumerate(self._families):
            if family != _ABSENT:
                yield self._ip(backend_id, family)

    def _family(self, backend_id: int) -> int:
        if 0 <= backend_id < len(self._families):
            return self._families[backend_id]
        return _ABSENT
