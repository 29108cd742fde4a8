"""Who else changed pykp's rules, as it happens: nf_tables' change notifications.

Every committed nf_tables transaction is announced to the netlink group NFNLGRP_NFTABLES:
one message per object it added or deleted, then NFT_MSG_NEWGEN with the committing
thread's name and pid. iptables-nft goes through nf_tables too, so the mangle jumps and
the queue chain are announced the same way. The agent names the threads that write its
own transactions (`writer_name`, set around each libnftables call), so a transaction by
anyone else that touches pykp's table or queue chain is found the moment it commits,
instead of at the next periodic check (half a --sync-period at best).

`NotificationParser` is the sans-I/O part (bytes in, transactions out);
`RulesetMonitor` reads the socket in a thread.
Why not a BPF filter on the socket: the kernel packs many messages into one buffer, and a
socket filter sees only the first.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pykp.netfilter.nfnetlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, attributes, messages

__all__ = [
    "ForeignChange",
    "NotificationParser",
    "RulesetMonitor",
    "Transaction",
    "as_writer",
    "writer_name",
]

_log = logging.getLogger(__name__)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
SO_RCVBUFFORCE = 33
NFGENMSG_LEN = 4

# NFT_MSG_* (linux/netfilter/nf_tables.h)
_MESSAGES = {
    0: ("add", "table"),
    2: ("delete", "table"),
    3: ("add", "chain"),
    5: ("delete", "chain"),
    6: ("add", "rule"),
    8: ("delete", "rule"),
    9: ("add", "set"),
    11: ("delete", "set"),
    12: ("add", "element"),
    14: ("delete", "element"),
    18: ("add", "object"),
    20: ("delete", "object"),
    22: ("add", "flowtable"),
    24: ("delete", "flowtable"),
}
NFT_MSG_NEWGEN = 15
# The first attribute of every object message above is its table's name
# (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...).
NFTA_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_RULE_CHAIN = 2
NFTA_SET_NAME = 2  # and NFTA_SET_ELEM_LIST_SET
# The second name worth showing: a chain's, a rule's chain, a set's (an element's set).
_NAME_ATTRIBUTE = {
    "chain": NFTA_CHAIN_NAME,
    "rule": NFTA_RULE_CHAIN,
    "set": NFTA_SET_NAME,
    "element": NFTA_SET_NAME,
}
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
FAMILIES = {1: "inet", 2: "ip", 10: "ip6", 3: "arp", 7: "bridge", 5: "netdev"}

PR_SET_NAME = 15
PR_GET_NAME = 16


def writer_name() -> str:
    """The thread name under which this process commits its own transactions."""
    return f"pykp/{os.getpid()}"[:15]


_libc: ctypes.CDLL | None = None


def _prctl_name(option: int, value: bytes | ctypes.Array[ctypes.c_char]) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(option, value, 0, 0, 0)


@contextmanager
def as_writer() -> Iterator[None]:
    """Run the block under `writer_name()` (the kernel records the committing thread's
    name with each transaction), then give the thread its name back."""
    old = ctypes.create_string_buffer(16)
    try:
        _prctl_name(PR_GET_NAME, old)
        _prctl_name(PR_SET_NAME, writer_name().encode())
    except (OSError, AttributeError):  # no prctl: the monitor then sees ours as foreign
        yield
        return
    try:
        yield
    finally:
        _prctl_name(PR_SET_NAME, old.value)


@dataclass(frozen=True)
class Change:
    """One object a transaction added or deleted."""

    verb: str  # "add" or "delete"
    kind: str  # "table", "chain", "rule", "set", "element", "object", "flowtable"
    family: str
    table: str
    name: str = ""  # the chain's (chains, rules) or the set's (sets, elements); else ""

    def __str__(self) -> str:
        where = f"{self.family} {self.table}" + (f" {self.name}" if self.name else "")
        return (
            f"{self.verb} {self.kind} in {where}"
            if self.kind != "table"
            else (f"{self.verb} table {self.family} {self.table}")
        )


@dataclass
class Transaction:
    """What one commit changed, and who committed it."""

    changes: list[Change] = field(default_factory=list)
    process: str = ""
    pid: int = 0


class NotificationParser:
    """Netlink datagrams of NFNLGRP_NFTABLES in, whole transactions out (sans-I/O)."""

    def __init__(self) -> None:
        self._pending = Transaction()

    def feed(self, data: bytes) -> list[Transaction]:
        done: list[Transaction] = []
        for type_, _seq, body in messages(data):
            if type_ >> 8 != NFNL_SUBSYS_NFTABLES or len(body) < NFGENMSG_LEN:
                continue
            message = type_ & 0xFF
            if message == NFT_MSG_NEWGEN:
                attrs = dict(attributes(body, NFGENMSG_LEN))
                pid = attrs.get(NFTA_GEN_PROC_PID, b"")
                self._pending.pid = struct.unpack(">I", pid)[0] if len(pid) == 4 else 0
                self._pending.process = _text(attrs.get(NFTA_GEN_PROC_NAME, b""))
                done.append(self._pending)
                self._pending = Transaction()
                continue
            known = _MESSAGES.get(message)
            if known is None:
                continue
            verb, kind = known
            attrs = dict(attributes(body, NFGENMSG_LEN))
            named = _NAME_ATTRIBUTE.get(kind)
            self._pending.changes.append(
                Change(
                    verb=verb,
                    kind=kind,
                    family=FAMILIES.get(body[0], str(body[0])),
                    table=_text(attrs.get(NFTA_TABLE, b"")),
                    name=_text(attrs.get(named, b"")) if named is not None else "",
                )
            )
        return done

    def reset(self) -> None:
        """Forget a half-read transaction (after lost messages)."""
        self._pending = Transaction()


def _text(value: bytes) -> str:
    return value.split(b"\0")[0].decode(errors="replace")


@dataclass(frozen=True)
class ForeignChange:
    """Someone else's transaction that touched pykp's rules, or lost notifications.

    `structure`: pykp's table, its chains, rules or sets changed: a reinstall is due.
    `elements`: only its sets' or maps' elements changed: a reload is due. `suspect`: the
    queue chain or a mangle hook chain pykp jumps from changed, or notifications were lost:
    a check decides."""

    process: str
    pid: int
    changes: tuple[Change, ...]
    structure: bool = False
    elements: bool = False
    suspect: bool = False

    def describe(self) -> str:
        if not self.changes:
            return "notifications were lost (netlink buffer overrun)"
        shown = ", ".join(sorted({str(change) for change in self.changes})[:4])
        more = len({str(change) for change in self.changes}) - 4
        return f"{self.process or '?'} (pid {self.pid}): {shown}" + (
            f" and {more} more" if more > 0 else ""
        )


def classify(transaction: Transaction, *, table: str, chain: str, own: str) -> ForeignChange | None:
    """What someone else's transaction means for pykp's rules (None: nothing, or ours)."""
    if transaction.process == own:
        return None
    structure = elements = suspect = False
    touched: list[Change] = []
    for change in transaction.changes:
        if change.family == "inet" and change.table == table:
            touched.append(change)
            if change.kind == "element":
                elements = True
            else:
                structure = True
        elif change.family in ("ip", "ip6") and change.table == "mangle":
            # pykp writes these through iptables-restore, a process of another name: a
            # listing decides (else pykp's own reinstall would look like damage, forever).
            if (
                change.kind == "table"
                or change.name == chain
                or (change.verb == "delete" and change.name in ("PREROUTING", "OUTPUT"))
            ):
                touched.append(change)
                suspect = True
    if not touched:
        return None
    return ForeignChange(
        process=transaction.process,
        pid=transaction.pid,
        changes=tuple(touched),
        structure=structure,
        elements=elements and not structure,
        suspect=suspect and not structure,
    )


class RulesetMonitor:
    """Reads nf_tables' notifications in a daemon thread and reports someone else's
    changes to pykp's rules through `on_change` (called in that thread)."""

    def __init__(
        self,
        on_change: Callable[[ForeignChange], None],
        *,
        table: str = "pykp",
        chain: str = "PYKP-QUEUE",
        receive_buffer: int = 4 << 20,
    ) -> None:
        self.on_change = on_change
        self.table = table
        self.chain = chain
        self.receive_buffer = receive_buffer
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.transactions = 0  # every transaction seen, ours included
        self.overruns = 0

    def start(self) -> None:
        """Subscribe (in this process's network namespace) and start reading."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            try:  # root: past rmem_max, so that a whole ruleset flush fits
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.receive_buffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.settimeout(0.5)  # how soon stop() is noticed
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pykp-rules-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        assert self._sock is not None
        parser = NotificationParser()
        own = writer_name()
        buffer = bytearray(1 << 17)
        view = memoryview(buffer)
        while not self._stop.is_set():
            try:
                size = self._sock.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    _log.exception("reading nf_tables notifications failed; monitor stops")
                    return
                # Messages were dropped: whose, and what, cannot be known.
                self.overruns += 1
                parser.reset()
                self._report(ForeignChange(process="", pid=0, changes=(), suspect=True))
                continue
            for transaction in parser.feed(bytes(view[:size])):
                self.transactions += 1
                found = classify(transaction, table=self.table, chain=self.chain, own=own)
                if found is not None:
                    self._report(found)

    def _report(self, change: ForeignChange) -> None:
        try:
            self.on_change(change)
        except Exception:  # noqa: BLE001 - the monitor keeps reading
            _log.exception("handling a change of the rules failed")
