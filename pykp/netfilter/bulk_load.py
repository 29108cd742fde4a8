"""pykp's writes to its nf_tables table straight over netlink: each one nf_tables batch
(one transaction), built message by message (`Batch`).

Why not nft (libnftables): nft parses and evaluates every element of the script it is
given (about 4 us each on top of the kernel's 2: 0.7 s for the 120,000 elements of a full
load at 10,000 services, 4-5 s at 100,000, and a gigabyte of C heap), and before each
change it reloads its cache of the table's chains (~1 ms per 1,000 round-robin chains),
where the binary form of an element is a few bytes the Rust core packs in 0.2-0.3 us
(reading the Python string included).
A full load is the same single transaction nft would send (flush every synced set, then
add every element), so packets never see a half-loaded table; a change is one transaction
of adds (or of removals), as nft's would be.

The elements come as nft text (what `pykp.netfilter.elements` tracks, owner by owner) and
are encoded by their set's type, field by field the way nft lays a concatenation out (each
field padded to 4 bytes; addresses and ports in network order, marks and `numgen` values
in host order), by `pykp._fastpath.encode_elements` (the crate's `nft_elements`: parsing
the texts back in Python was a quarter of a first sync's time). The tests
`test_rules.py::test_bulk_load_matches_nft` and `::test_changes_over_netlink_match_nft`
write the same elements both ways and compare nft's listings of them.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
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

_BE32 = struct.Struct(">I")

# The elements of one set or map, from their texts: chunks of encoded elements, each of
# which fits one message's element list.
Encoder = Callable[[Iterable[str]], list[bytes]]


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


def _kind(type_: str) -> str:
    """The kind of element (`pykp._fastpath.encode_elements`) a set or map of type `type_`
    holds; ValueError for a type it does not know."""
    frontend = type_.startswith(("ipv4_addr . inet_proto", "ipv6_addr . inet_proto"))
    if frontend:
        return "frontend-verdict" if type_.endswith(": verdict") else "frontend"
    if type_.startswith("typeof numgen inc") and type_.endswith(": verdict"):
        return "rotation-slot"
    if type_.startswith("typeof ") and "numgen random" in type_:
        return "slot"
    if type_ in ("ipv4_addr", "ipv6_addr"):
        return "address"
    if type_ in ("ipv4_addr . ipv4_addr", "ipv6_addr . ipv6_addr"):
        return "pair"
    if type_ in ("mark : ipv4_addr . inet_service", "mark : ipv6_addr . inet_service"):
        return "backend"
    raise ValueError(f"no netlink encoding for set type {type_!r}")


# What a delete names of a map's element: its key alone.
_KEY_KINDS = {"frontend-verdict": "frontend", "slot": "slot-key", "backend": "mark"}


def _encoder(kind: str) -> Encoder:
    from pykp._fastpath import encode_elements  # the Rust core parses and packs them

    return functools.partial(encode_elements, kind, max_chunk=_MAX_LIST)


def encoder(type_: str) -> Encoder:
    """The encoder of the elements of a set or map of type `type_` (as `rules._SYNCED`
    declares it); ValueError for a type it does not know."""
    return _encoder(_kind(type_))


def key_encoder(type_: str) -> Encoder:
    """The encoder of elements' keys alone (what a delete names), from the keys' texts,
    for a set or map of type `type_`."""
    kind = _kind(type_)
    return _encoder(_KEY_KINDS.get(kind, kind))


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

    def _elements(self, verb: int, flags: int, name: str, chunks: Iterable[bytes]) -> None:
        head = self._table + _attr(NFTA_SET_ELEM_LIST_SET, _z(name))
        for chunk in chunks:  # an `Encoder`'s: each fits one element list
            self._add(verb, flags, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, chunk))

    def flush_set(self, name: str) -> None:
        self._add(DELSETELEM, 0, self._table + _attr(NFTA_SET_ELEM_LIST_SET, _z(name)))

    def add_elements(self, name: str, chunks: Iterable[bytes]) -> None:
        """Elements as an `Encoder` makes them."""
        self._elements(NEWSETELEM, NLM_F_CREATE, name, chunks)

    def delete_elements(self, name: str, chunks: Iterable[bytes]) -> None:
        """Keys as a `key_encoder` makes them."""
        self._elements(DELSETELEM, 0, name, chunks)

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
        out.add_elements(name, encode(elements))
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
