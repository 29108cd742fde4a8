"""Reading nf_tables straight from the kernel (`pykp.netfilter.nfnetlink`): what nft would
list, without loading every element.

The parsing tests need nothing; the reader's run in a network namespace of their own,
against a table loaded with `nft -f` and compared with what nft itself lists.
Privileged: a real namespace; the root namespace is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
from collections.abc import Iterator

import pytest

from pykp.labs.lab import in_namespace
from pykp.netfilter.nfnetlink import (
    NetlinkError,
    NftReader,
    TableSummary,
    _count_attributes,
    attributes,
    messages,
)

TABLE = """
table inet pykp {
    counter undecided { packets 7 bytes 420 }
    set queued4 { type ipv4_addr . inet_proto . inet_service; elements = { %s } }
    map backends4 { type mark : ipv4_addr . inet_service; elements = { 0x10000 : 10.0.0.1 . 80 } }
    set empty6 { type ipv6_addr; }
    chain two { ip daddr 1.2.3.4 counter name undecided accept; meta l4proto { tcp, udp } accept; }
    chain none { }
}
table inet other {
    set queued4 { type ipv4_addr; elements = { 9.9.9.9 } }
    chain two { accept; }
}
"""
QUEUED = 3000  # past one dump batch: the count adds up every batch


def nla(type_: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), type_) + value
    return data + b"\0" * (-len(data) % 4)


def test_truncated_messages_and_attributes_end_the_walk_without_error() -> None:
    whole = struct.pack("=IHHII", 20, 0x0A03, 0, 9, 0) + b"abcd"
    assert list(messages(whole + whole[:10])) == [(0x0A03, 9, b"abcd")]
    assert list(messages(struct.pack("=IHHII", 8, 1, 0, 0, 0))) == []  # length < header
    data = nla(1, b"pykp\0") + nla(2, b"x\0") + struct.pack("=HH", 40, 3) + b"short"
    assert [(type_, value.rstrip(b"\0")) for type_, value in attributes(data)] == [
        (1, b"pykp"),
        (2, b"x"),
    ]
    assert _count_attributes(nla(1, b"a") * 5 + b"\0\0") == 5


def privileged(test):  # type: ignore[no-untyped-def]
    """Marked privileged, and skipped only off CI without root (CI runs as root)."""
    skip = pytest.mark.skipif(
        os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root (a network namespace)"
    )
    return pytest.mark.privileged(skip(test))


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"pykp-test-nfnl-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        elements = ", ".join(f"10.1.{i // 256}.{i % 256} . tcp . 80" for i in range(QUEUED))
        subprocess.run(
            ["ip", "netns", "exec", name, "nft", "-f", "-"],
            input=TABLE % elements, text=True, check=True,
        )  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft_json(netns: str, *argv: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out)["nftables"])


def reader_in(netns: str) -> NftReader:
    with in_namespace(netns):
        return NftReader()  # its socket stays in the namespace


@privileged
def test_the_table_summary_is_what_nft_lists(netns: str) -> None:
    listed = nft_json(netns, "list", "table", "inet", "pykp")
    chains = {item["chain"]["name"]: 0 for item in listed if "chain" in item}  # type: ignore[index]
    for item in listed:
        if "rule" in item:
            chains[item["rule"]["chain"]] += 1  # type: ignore[index]
    with reader_in(netns) as reader:
        summary = reader.table_summary("pykp")
    assert summary == TableSummary(chains=chains, sets={"queued4", "empty6"}, maps={"backends4"})
    assert chains == {"two": 2, "none": 0}
    # The rule's anonymous set ({ tcp, udp }) is not listed, as nft does not list it.


@privileged
def test_element_counts_and_the_counter(netns: str) -> None:
    with reader_in(netns) as reader:
        assert reader.element_count("pykp", "queued4") == QUEUED
        assert reader.element_count("pykp", "backends4") == 1
        assert reader.element_count("pykp", "empty6") == 0
        assert reader.element_count("other", "queued4") == 1
        assert reader.counter_packets("pykp", "undecided") == 7
        # Several requests on one socket: each answer is read whole.
        assert reader.counter_packets("pykp", "undecided") == 7


@privileged
def test_missing_objects_are_a_clear_error(netns: str) -> None:
    with reader_in(netns) as reader:
        with pytest.raises(NetlinkError) as missing:
            reader.element_count("pykp", "nope")
        assert missing.value.errno == 2
        with pytest.raises(NetlinkError):
            reader.counter_packets("nope", "undecided")
        with pytest.raises(NetlinkError):
            reader.table_summary("nope")
        assert reader.counter_packets("pykp", "undecided") == 7  # the socket still works
