"""Reading nf_tables objects straight from the kernel: one counter, a table's chains with
their rule counts, its sets, one set's element count.

Why not nft (libnftables) for these: to list anything of a table, nft first fills its
cache with every object of it, every set element included (0.6 s and hundreds of MB of C
heap at 30,000 services, seconds at 100,000), where the kernel answers these requests
directly: a counter in microseconds, a table's chains and rules without a single element,
an element count by walking one dump. The agent reads these at every scrape and every
check, so their cost must not grow with the table.

`NetlinkMessages` holds the sans-I/O part (requests out, replies parsed);
`NftReader` does the I/O on a NETLINK_NETFILTER socket in this process's namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "NLMSG_HDR",
    "NftReader",
    "TableSummary",
    "attributes",
    "messages",
]

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")
NLA_LEN = struct.Struct("=H")
NLA_TYPE_MASK = 0x3FFF
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, unused here)
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

NFPROTO_INET = 1
# NFT_MSG_*
GETCHAIN, GETRULE, GETSET, GETSETELEM, GETOBJ = 4, 7, 10, 13, 19
NEWCHAIN, NEWRULE, NEWSET, NEWSETELEM, NEWOBJ = 3, 6, 9, 12, 18
# Attributes (linux/netfilter/nf_tables.h)
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS = 1, 2, 3
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_PACKETS = 2
NFT_OBJECT_COUNTER = 1
NFT_SET_ANONYMOUS = 0x1  # a rule's inline set (`{ tcp, udp }`): nft does not list these
NFT_SET_MAP = 0x8


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, body) of each netlink message in one datagram; stops at a
    truncated one."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, type_, _flags, seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            return
        yield type_, seq, data[offset + NLMSG_HDR.size : offset + length]
        offset += (length + 3) & ~3


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each netlink attribute in `data[offset:]`; stops at a truncated one."""
    while offset + NLA_HDR.size <= len(data):
        length, type_ = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size or offset + length > len(data):
            return
        yield type_ & NLA_TYPE_MASK, data[offset + NLA_HDR.size : offset + length]
        offset += (length + 3) & ~3


def _attribute(type_: int, value: bytes) -> bytes:
    data = NLA_HDR.pack(NLA_HDR.size + len(value), type_) + value
    return data + b"\0" * (-len(data) % 4)


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _text(value: bytes) -> str:
    return value.split(b"\0")[0].decode(errors="replace")


def request(message: int, flags: int, seq: int, family: int, *attrs: bytes) -> bytes:
    body = NFGENMSG.pack(family, 0, 0) + b"".join(attrs)
    return (
        NLMSG_HDR.pack(
            NLMSG_HDR.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | message, flags, seq, 0
        )
        + body
    )


class NetlinkError(OSError):
    """The kernel refused a request (ENOENT: no such table, set or object)."""


@dataclass
class TableSummary:
    """A table's chains with how many rules each holds, and its named sets and maps (as
    nft lists them: the anonymous sets of rules left out)."""

    chains: dict[str, int] = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)
    maps: set[str] = field(default_factory=set)


class NftReader:
    """Requests to nf_tables over one netlink socket of this process's namespace.
    Not thread-safe: one per thread, or one per use."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(10)
        self._seq = 0
        self._buffer = bytearray(1 << 18)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NftReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _exchange(self, message: int, dump: bool, *attrs: bytes) -> list[bytes]:
        """Send one request; the body of each reply (nfgenmsg included), all read (replies
        to an earlier request left unread are told apart by their sequence number)."""
        self._seq += 1
        seq = self._seq
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        self._sock.send(request(message, flags, seq, NFPROTO_INET, *attrs))
        view = memoryview(self._buffer)
        replies: list[bytes] = []
        while True:
            size = self._sock.recv_into(self._buffer)
            for type_, reply_seq, body in messages(bytes(view[:size])):
                if reply_seq != seq:
                    continue
                if type_ == NLMSG_DONE:
                    return replies
                if type_ == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
                    if code != 0:
                        raise NetlinkError(code, os.strerror(code))
                    if not dump:
                        return replies  # the ACK after a plain request's answer
                    continue
                if type_ >> 8 == NFNL_SUBSYS_NFTABLES:
                    replies.append(body)

    def counter_packets(self, table: str, name: str) -> int:
        """Packets of a named counter object of `table inet <table>`."""
        for body in self._exchange(
            GETOBJ,
            False,
            _attribute(NFTA_OBJ_TABLE, _name(table)),
            _attribute(NFTA_OBJ_NAME, _name(name)),
            _attribute(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER)),
        ):
            for type_, value in attributes(body, NFGENMSG.size):
                if type_ == NFTA_OBJ_DATA:
                    for inner, number in attributes(value):
                        if inner == NFTA_COUNTER_PACKETS and len(number) == 8:
                            return int(struct.unpack(">Q", number)[0])
        return 0

    def table_summary(self, table: str) -> TableSummary:
        """Chains (with rule counts), sets and maps of `table inet <table>`; no element is
        read. A missing table raises NetlinkError(ENOENT) or comes back empty."""
        summary = TableSummary()
        for body in self._exchange(GETCHAIN, True):
            found = dict(attributes(body, NFGENMSG.size))
            if _text(found.get(NFTA_CHAIN_TABLE, b"")) == table:
                summary.chains.setdefault(_text(found.get(NFTA_CHAIN_NAME, b"")), 0)
        for body in self._exchange(GETRULE, True, _attribute(NFTA_RULE_TABLE, _name(table))):
            found = dict(attributes(body, NFGENMSG.size))
            if _text(found.get(NFTA_RULE_TABLE, b"")) == table:
                chain = _text(found.get(NFTA_RULE_CHAIN, b""))
                summary.chains[chain] = summary.chains.get(chain, 0) + 1
        for body in self._exchange(GETSET, True, _attribute(NFTA_SET_TABLE, _name(table))):
            found = dict(attributes(body, NFGENMSG.size))
            if _text(found.get(NFTA_SET_TABLE, b"")) != table:
                continue
            raw = found.get(NFTA_SET_FLAGS, b"\0\0\0\0")
            flags = struct.unpack(">I", raw)[0] if len(raw) == 4 else 0
            if flags & NFT_SET_ANONYMOUS:
                continue
            (summary.maps if flags & NFT_SET_MAP else summary.sets).add(
                _text(found.get(NFTA_SET_NAME, b""))
            )
        return summary

    def element_count(self, table: str, name: str) -> int:
        """Elements of one set or map of `table inet <table>` (NetlinkError when missing)."""
        count = 0
        for body in self._exchange(
            GETSETELEM,
            True,
            _attribute(NFTA_SET_ELEM_LIST_TABLE, _name(table)),
            _attribute(NFTA_SET_ELEM_LIST_SET, _name(name)),
        ):
            for type_, value in attributes(body, NFGENMSG.size):
                if type_ == NFTA_SET_ELEM_LIST_ELEMENTS:
                    count += _count_attributes(value)
        return count


def _count_attributes(data: bytes) -> int:
    """How many attributes `data` holds (a tight loop: a dump holds one per element)."""
    count = offset = 0
    end = len(data) - NLA_HDR.size
    length_at = NLA_LEN.unpack_from
    while offset <= end:
        length = length_at(data, offset)[0]
        if length < NLA_HDR.size:
            break
        count += 1
        offset += (length + 3) & ~3
    return count
