"""pykp's writes to its nf_tables table straight over netlink: each one nf_tables batch
(one transaction), built message by message (`Batch`).

Why not nft (libnftables): nft parses and evaluates every element of the script it is
given (about 4 us each on top of the kernel's 2: 0.7 s for the 120,000 elements of a full
load at 10,000 services, 4-5 s at 100,000, and a gigabyte of C heap), and before each
change it reloads its cache of the table's chains (~1 ms per 1,000 round-robin chains),
where the binary form of an element is a few bytes Python packs in about a microsecond.
A full load is the same single transaction nft would send (flush every synced set, then
add every element), so packets never see a half-loaded table; a change is one transaction
of adds (or of removals), as nft's would be.

The elements come as nft text (what `pykp.netfilter.elements` tracks, owner by owner) and
are encoded by their set's type, field by field the way nft lays a concatenation out (each
field padded to 4 bytes; addresses and ports in network order, marks and `numgen` values
in host order). The tests `test_rules.py::test_bulk_load_matches_nft` and
`::test_changes_over_netlink_match_nft` write the same elements both ways and compare
nft's listings of them.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping

from pykp.netfilter.nfnetlink import (
    NETLINK_NETFILTER,
    NEWSETELEM,
    NFGENMSG,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NLA_HDR,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_HDR,
    NetlinkError,
    messages,
)

__all__ = ["Batch", "encoder", "key_encoder", "load_sets"]

NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, DELSETELEM = 3, 5, 6, 8, 14
NLM_F_APPEND = 0x800
NFTA_CHAIN_NAME = 3
NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 2, 4
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE = 1, 2, 3
NFT_NG_INCREMENTAL = 0
NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG = 1, 2, 3
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_GOTO = -4
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# The element list is one attribute (16-bit length): a message carries at most this much.
_MAX_LIST = 60000

_HOST = "<" if sys.byteorder == "little" else ">"
_U32_HOST = struct.Struct(_HOST + "I")
_BE32 = struct.Struct(">I")
_PROTOCOL = {"tcp": 6, "udp": 17, "sctp": 132}

# One element's attribute, from the set's text of it.
Encoder = Callable[[str], bytes]


def _attr(type_: int, value: bytes) -> bytes:
    data = NLA_HDR.pack(NLA_HDR.size + len(value), type_) + value
    return data + b"\0" * (-len(data) % 4)


def _nested(type_: int, value: bytes) -> bytes:
    return _attr(type_ | NLA_F_NESTED, value)


def _z(name: str) -> bytes:
    return name.encode() + b"\0"


def _expression(name: str, *attributes: tuple[int, int | bytes]) -> bytes:
    """One NFTA_LIST_ELEM of a rule: the expression `name` with its attributes (an int is
    a big-endian u32, as registers and nf_tables' numbers are)."""
    data = b"".join(
        _attr(type_, _BE32.pack(value) if isinstance(value, int) else value)
        for type_, value in attributes
    )
    return _nested(NFTA_LIST_ELEM, _attr(NFTA_EXPR_NAME, _z(name)) + _nested(NFTA_EXPR_DATA, data))


_addresses: dict[str, bytes] = {}


def _address(text: str) -> bytes:
    packed = _addresses.get(text)
    if packed is None:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        if len(_addresses) < 1 << 20:
            _addresses[text] = packed
    return packed


_ports: dict[str, bytes] = {}


def drop_caches() -> None:
    """Forget the packed addresses a full load cached: one per address of the cluster,
    worth keeping while 100,000s of elements are packed, not between two small changes."""
    _addresses.clear()


def _port(text: str) -> bytes:
    packed = _ports.get(text)
    if packed is None:
        port = int(text)
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {text}")
        packed = _ports[text] = port.to_bytes(2, "big") + b"\0\0"
    return packed


def _proto(text: str) -> bytes:
    return bytes((_PROTOCOL[text], 0, 0, 0))


_prefixes: dict[tuple[int, int], tuple[bytes, bytes]] = {}


def _element(key: bytes, data: bytes = b"", verdict: bool = False) -> bytes:
    """One NFTA_LIST_ELEM: its key and, for a map, its data (a value, or a verdict's
    attribute when `verdict`). Keys and values are whole 32-bit words (no padding), so
    the headers depend on their lengths alone: built once per pair of lengths."""
    size = (len(key), -len(data) if verdict else len(data))
    prefixes = _prefixes.get(size)
    if prefixes is None:
        if len(key) % 4 or len(data) % 4:
            raise ValueError("keys and values are whole 32-bit words")
        value = NLA_HDR.size + len(key)
        key_attr = NLA_HDR.size + value
        data_attr = 0
        after_key = b""
        if data:
            inner = len(data) if verdict else NLA_HDR.size + len(data)
            data_attr = NLA_HDR.size + inner
            after_key = NLA_HDR.pack(data_attr, NFTA_SET_ELEM_DATA | NLA_F_NESTED)
            if not verdict:
                after_key += NLA_HDR.pack(NLA_HDR.size + len(data), NFTA_DATA_VALUE)
        total = NLA_HDR.size + key_attr + data_attr
        prefixes = (
            NLA_HDR.pack(total, NFTA_LIST_ELEM | NLA_F_NESTED)
            + NLA_HDR.pack(key_attr, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
            + NLA_HDR.pack(value, NFTA_DATA_VALUE),
            after_key,
        )
        _prefixes[size] = prefixes
    return prefixes[0] + key + prefixes[1] + data


def _frontend(text: str) -> bytes:
    ip, proto, port = text.split(" . ")
    return _address(ip) + _proto(proto) + _port(port)


@functools.lru_cache(maxsize=1 << 14)  # the pick chains, and round-robin chains that come and go
def _verdict_goto(chain: str) -> bytes:
    return _nested(
        NFTA_DATA_VERDICT,
        _attr(NFTA_VERDICT_CODE, struct.pack(">i", NFT_GOTO))
        + _attr(NFTA_VERDICT_CHAIN, _z(chain)),
    )


def encoder(type_: str) -> Encoder:
    """The encoder of one element of a set or map of type `type_` (as `rules._SYNCED`
    declares it); ValueError for a type it does not know."""
    frontend = type_.startswith(("ipv4_addr . inet_proto", "ipv6_addr . inet_proto"))
    if frontend and not type_.endswith(": verdict"):
        return lambda text: _element(_frontend(text))
    if frontend:

        def fallback(text: str) -> bytes:
            key, verdict = text.split(" : ")
            word, chain = verdict.split()
            if word != "goto":
                raise ValueError(f"not a goto verdict: {verdict!r}")
            return _element(_frontend(key), _verdict_goto(chain), verdict=True)

        return fallback
    if type_.startswith("typeof numgen inc") and type_.endswith(": verdict"):

        def rotation_slot(text: str) -> bytes:
            index, verdict = text.split(" : ")
            word, chain = verdict.split()
            if word != "goto":
                raise ValueError(f"not a goto verdict: {verdict!r}")
            return _element(_U32_HOST.pack(int(index)), _verdict_goto(chain), verdict=True)

        return rotation_slot
    if type_.startswith("typeof ") and "numgen random" in type_:

        def slot(text: str) -> bytes:
            key, value = text.split(" : ")
            backend, backend_port = value.split(" . ")
            return _element(_slot_key(key), _address(backend) + _port(backend_port))

        return slot
    if type_ in ("ipv4_addr", "ipv6_addr"):
        return lambda text: _element(_address(text))
    if type_ in ("ipv4_addr . ipv4_addr", "ipv6_addr . ipv6_addr"):

        def pair(text: str) -> bytes:
            first, second = text.split(" . ")
            return _element(_address(first) + _address(second))

        return pair
    if type_ in ("mark : ipv4_addr . inet_service", "mark : ipv6_addr . inet_service"):

        def backend(text: str) -> bytes:
            mark, value = text.split(" : ")
            ip, port = value.split(" . ")
            return _element(_U32_HOST.pack(int(mark, 0)), _address(ip) + _port(port))

        return backend
    raise ValueError(f"no netlink encoding for set type {type_!r}")


def key_encoder(type_: str) -> Encoder:
    """The encoder of one element's key alone (what a delete names), from the key's text,
    for a set or map of type `type_`."""
    if ":" not in type_:  # a set: its element is its key
        return encoder(type_)
    if type_.startswith(("ipv4_addr . inet_proto", "ipv6_addr . inet_proto")):
        return lambda text: _element(_frontend(text))
    if type_.startswith("typeof ") and "numgen random" in type_:
        return lambda text: _element(_slot_key(text))
    if type_.startswith("mark : "):
        return lambda text: _element(_U32_HOST.pack(int(text, 0)))
    raise ValueError(f"no netlink encoding for the keys of {type_!r}")


def _slot_key(text: str) -> bytes:
    """A `slots` map's key: frontend . slot index."""
    ip, proto, port, index = text.split(" . ")
    return _address(ip) + _proto(proto) + _port(port) + _U32_HOST.pack(int(index))


def _message(type_: int, flags: int, seq: int, body: bytes, res_id: int = 0) -> bytes:
    payload = NFGENMSG.pack(NFPROTO_INET, 0, res_id) + body
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), type_, flags, seq, 0) + payload


class Batch:
    """One nf_tables transaction for pykp's table, built message by message, sent whole
    by `send()`: sets flushed, elements added or deleted, the round-robin chains created,
    flushed, given their rule or deleted, in the order the calls came."""

    def __init__(self, table: str) -> None:
        self._table = _attr(1, _z(table))  # NFTA_*_TABLE is 1 for all
        self._res_id = socket.htons(NFNL_SUBSYS_NFTABLES)
        self._messages: list[tuple[int, int, bytes]] = []  # (type, flags, body)
        self.last = 0  # the last message's sequence number (0: nothing in it)

    def _add(self, verb: int, flags: int, body: bytes) -> None:
        self.last += 1
        self._messages.append(((NFNL_SUBSYS_NFTABLES << 8) | verb, flags, body))

    def _elements(self, verb: int, flags: int, name: str, elements: Iterable[bytes]) -> None:
        head = self._table + _attr(NFTA_SET_ELEM_LIST_SET, _z(name))
        chunk: list[bytes] = []
        size = 0
        for element in elements:
            if chunk and size + len(element) > _MAX_LIST:
                self._add(verb, flags, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk)))
                chunk, size = [], 0
            chunk.append(element)
            size += len(element)
        if chunk:
            self._add(verb, flags, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk)))

    def flush_set(self, name: str) -> None:
        self._add(DELSETELEM, 0, self._table + _attr(NFTA_SET_ELEM_LIST_SET, _z(name)))

    def add_elements(self, name: str, elements: Iterable[bytes]) -> None:
        self._elements(NEWSETELEM, NLM_F_CREATE, name, elements)

    def delete_elements(self, name: str, keys: Iterable[bytes]) -> None:
        self._elements(DELSETELEM, 0, name, keys)

    def add_chain(self, name: str) -> None:
        """A regular chain (kept as it is when it exists)."""
        self._add(NEWCHAIN, NLM_F_CREATE, self._table + _attr(NFTA_CHAIN_NAME, _z(name)))

    def flush_chain(self, name: str) -> None:
        self._add(DELRULE, 0, self._table + _attr(NFTA_RULE_CHAIN, _z(name)))

    def delete_chain(self, name: str) -> None:
        self._add(DELCHAIN, 0, self._table + _attr(NFTA_CHAIN_NAME, _z(name)))

    def add_rotation_rule(self, chain: str, slots: int, verdict_map: str) -> None:
        """`numgen inc mod <slots> vmap @<verdict_map>`: the rotation's counter is this
        rule's (nft's own expressions for it, `nft --debug=netlink`)."""
        if not 1 <= slots <= 0xFFFFFFFF:
            raise ValueError(f"slots out of range: {slots}")
        expressions = _expression(
            "numgen",
            (NFTA_NG_DREG, NFT_REG_1),
            (NFTA_NG_MODULUS, slots),
            (NFTA_NG_TYPE, NFT_NG_INCREMENTAL),
        ) + _expression(
            "lookup",
            (NFTA_LOOKUP_SET, _z(verdict_map)),
            (NFTA_LOOKUP_SREG, NFT_REG_1),
            (NFTA_LOOKUP_DREG, NFT_REG_VERDICT),
        )
        self._add(
            NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            self._table
            + _attr(NFTA_RULE_CHAIN, _z(chain))
            + _nested(NFTA_RULE_EXPRESSIONS, expressions),
        )

    def data(self) -> bytes:
        """The batch; only its last message asks for an ack (the kernel reports every
        failed one anyway): an ack per message overflows the socket's receive buffer
        (ENOBUFS) past a few thousand, as 10,000 round-robin chains make."""
        begin = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, b"", self._res_id)
        end = _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self.last + 1, b"", self._res_id)
        body = [
            _message(
                type_, NLM_F_REQUEST | flags | (NLM_F_ACK if seq == self.last else 0), seq, data
            )
            for seq, (type_, flags, data) in enumerate(self._messages, start=1)
        ]
        return b"".join([begin, *body, end])

    def send(self) -> None:
        """Send the transaction; NetlinkError when the kernel refuses it (nothing of it is
        applied then). Nothing to send: nothing sent."""
        if self.last:
            _send(self.data(), self.last)


def batch(
    table: str,
    sets: Iterable[tuple[str, Encoder, Iterable[str]]],
) -> tuple[bytes, int]:
    """(the batch, its last sequence number): per set, a flush and its elements added."""
    out = Batch(table)
    for name, encode, elements in sets:
        out.flush_set(name)
        out.add_elements(name, map(encode, elements))
    return out.data(), out.last


def load_sets(table: str, sets: Iterable[tuple[str, Encoder, Iterable[str]]]) -> None:
    """Replace the elements of each set of `table inet <table>` in one transaction: per
    set (name, encoder, element texts). Raises ValueError for an element it cannot
    encode (before anything is sent), NetlinkError when the kernel refuses the batch
    (nothing of it is applied then)."""
    _send(*batch(table, sets))


# One socket per network namespace, kept open: closing a nf_tables socket waits for the
# release of the last commit's objects (an RCU grace period, 5-17 ms here), which would
# otherwise add to every change. Used by one thread at a time.
_sockets: dict[int, socket.socket] = {}
_sockets_lock = threading.Lock()


def _send(data: bytes, last: int) -> None:
    namespace = os.stat("/proc/thread-self/ns/net").st_ino
    with _sockets_lock:
        sock = _sockets.pop(namespace, None)
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            try:
                sock.bind((0, 0))
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without our message
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
                sock.settimeout(60)
            except OSError:
                sock.close()
                raise
        try:
            # The batch goes in one send (one skb: one transaction).
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + (1 << 16))
            sent = sock.send(data)
            if sent != len(data):
                raise NetlinkError(errno.EMSGSIZE, f"sent {sent} of {len(data)} bytes")
            _acks(sock, last)
        except BaseException:
            sock.close()  # what it may still hold answers this batch: never reused
            raise
        _sockets[namespace] = sock


def _acks(sock: socket.socket, last: int) -> None:
    """Wait for the ack of message `last` (the one that asks for it); raise on the first
    error (after the kernel reported the rest: the batch is then aborted as a whole)."""
    pending = {last}
    failure: NetlinkError | None = None
    buffer = bytearray(1 << 20)
    while pending:
        try:
            size = sock.recv_into(buffer)
        except TimeoutError:
            if failure is not None:
                break
            raise
        if failure is not None:
            sock.settimeout(0.2)  # the rest of the reports, if any: never wait long
        for type_, seq, body in messages(bytes(buffer[:size])):
            if type_ != NLMSG_ERROR:
                continue
            pending.discard(seq)
            code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
            if code != 0 and failure is None:
                failure = NetlinkError(
                    code, f"nf_tables batch (message {seq}): {os.strerror(code)}"
                )
                sock.settimeout(0.2)
    if failure is not None:
        raise failure


def encoders(types: Mapping[str, str]) -> dict[str, Encoder]:
    """An encoder per set or map name."""
    return {name: encoder(type_) for name, type_ in types.items()}
