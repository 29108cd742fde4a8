"""nf_tables' change notifications: parsing and what they mean for pykp (no root).

The bytes are built the way the kernel lays them out (nlmsghdr, nfgenmsg, attributes);
tests/test_e2e_repair.py reads the real ones from a real kernel."""

from __future__ import annotations

import struct

from pykp.netfilter.monitor import (
    Change,
    NotificationParser,
    Transaction,
    classify,
    writer_name,
)

INET, IPV4 = 1, 2
NEWTABLE, DELTABLE, DELCHAIN, NEWRULE, DELRULE, DELSETELEM, NEWGEN = 0, 2, 5, 6, 8, 14, 15


def attribute(type_: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), type_) + value
    return data + b"\0" * (-len(data) % 4)


def message(msg: int, family: int, *attributes: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attributes)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | msg, 0, 0, 0) + body


def newgen(process: str, pid: int) -> bytes:
    return message(
        NEWGEN,
        0,
        attribute(1, struct.pack(">I", 7)),
        attribute(2, struct.pack(">I", pid)),
        attribute(3, process.encode() + b"\0"),
    )


def test_a_transaction_ends_with_its_generation_and_names_its_process() -> None:
    parser = NotificationParser()
    data = message(
        DELCHAIN, INET, attribute(1, b"pykp\0"), attribute(2, b"\0" * 8), attribute(3, b"nat_out\0")
    ) + message(DELSETELEM, INET, attribute(1, b"pykp\0"), attribute(2, b"queued4\0"))
    assert parser.feed(data) == []  # no NEWGEN yet: the transaction is still open
    (done,) = parser.feed(newgen("nft", 4242))
    assert done.process == "nft" and done.pid == 4242
    assert done.changes == [
        Change("delete", "chain", "inet", "pykp", "nat_out"),
        Change("delete", "element", "inet", "pykp", "queued4"),
    ]


def test_truncated_or_foreign_messages_are_skipped() -> None:
    parser = NotificationParser()
    good = message(DELTABLE, INET, attribute(1, b"pykp\0"))
    other_subsystem = struct.pack("=IHHII", 20, (1 << 8) | 2, 0, 0, 0) + b"\0" * 4
    # An attribute whose length runs past its message: the table name is then unknown.
    bad_attribute = message(DELTABLE, INET, struct.pack("=HH", 200, 1) + b"pykp")
    (done,) = parser.feed(other_subsystem + bad_attribute + good + newgen("nft", 1))
    assert [change.table for change in done.changes] == ["", "pykp"]
    assert parser.feed(good[:-3]) == []  # cut short: ignored, nothing raised


def transaction(process: str, *changes: Change) -> Transaction:
    return Transaction(changes=list(changes), process=process, pid=1)


def classified(tx: Transaction):  # type: ignore[no-untyped-def]
    return classify(tx, table="pykp", chain="PYKP-QUEUE", own=writer_name())


def test_the_agents_own_transactions_are_not_reported() -> None:
    assert classified(transaction(writer_name(), Change("delete", "table", "inet", "pykp"))) is None


def test_others_changes_to_the_table_are_damage() -> None:
    flush = classified(
        transaction(
            "nft",
            Change("delete", "table", "inet", "pykp"),
            Change("delete", "rule", "ip", "filter", "INPUT"),
        )
    )
    assert flush is not None and flush.structure and not flush.elements
    assert flush.describe() == "nft (pid 1): delete table inet pykp"
    added_rule = classified(transaction("nft", Change("add", "rule", "inet", "pykp", "nat_pre")))
    assert added_rule is not None and added_rule.structure
    elements = classified(
        transaction("nft", Change("delete", "element", "inet", "pykp", "backends4"))
    )
    assert elements is not None and elements.elements and not elements.structure


def test_mangle_changes_are_checked_not_trusted() -> None:
    # pykp writes mangle through iptables-restore, another process: a listing decides.
    jump = classified(
        transaction("iptables", Change("delete", "rule", "ip", "mangle", "PREROUTING"))
    )
    assert jump is not None and jump.suspect and not jump.structure
    queue = classified(
        transaction("iptables-restor", Change("add", "rule", "ip6", "mangle", "PYKP-QUEUE"))
    )
    assert queue is not None and queue.suspect


def test_changes_elsewhere_are_not_reported() -> None:
    for change in (
        Change("delete", "table", "inet", "other"),
        Change("delete", "table", "ip", "pykp"),  # another family's table of that name
        Change("add", "rule", "ip", "mangle", "PREROUTING"),  # someone's own rule
        Change("delete", "rule", "ip", "mangle", "FORWARD"),
        Change("delete", "rule", "ip", "nat", "PREROUTING"),
    ):
        assert classified(transaction("nft", change)) is None, change
