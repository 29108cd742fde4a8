"""The node's own addresses as the agent reads them at every sync (`interface_addresses`, one
rtnetlink dump): what `ip addr` lists, a point-to-point link's local end included.

The parsing test needs nothing; the dump's runs in a network namespace of its own, compared
with what `ip -j addr` lists there. Privileged: a real namespace; the root one is never
touched.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from pykp.agent.node_addresses import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFADDRMSG,
    address_of,
    interface_addresses,
)
from pykp.labs.lab import in_namespace

# Past one dump batch (a few KiB of messages): the reader must read every batch.
MANY = 400


def nla(type_: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), type_) + value
    return data + b"\0" * (-len(data) % 4)


def test_the_local_end_is_the_address_and_odd_messages_have_none() -> None:
    v4 = IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, 3)
    local, peer = socket.inet_aton("10.9.0.1"), socket.inet_aton("10.9.0.2")
    assert address_of(v4 + nla(IFA_ADDRESS, peer) + nla(IFA_LOCAL, local)) == "10.9.0.1"
    assert address_of(v4 + nla(IFA_ADDRESS, peer)) == "10.9.0.2"
    v6 = IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 3)
    assert address_of(v6 + nla(IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fd00::7"))) == (
        "fd00::7"
    )
    assert address_of(v4) is None  # no address attribute
    assert address_of(v4[:5]) is None  # shorter than its header
    assert address_of(v4 + nla(IFA_ADDRESS, b"\1\2\3")) is None  # not an IPv4 address's size
    assert address_of(v6 + nla(IFA_ADDRESS, local)) is None  # an IPv4 size in an IPv6 message


def privileged(test):  # type: ignore[no-untyped-def]
    """Marked privileged, and skipped only off CI without root (CI runs as root)."""
    skip = pytest.mark.skipif(
        os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root (a network namespace)"
    )
    return pytest.mark.privileged(skip(test))


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pykp-test-addr-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        script = [
            "link set lo up",
            "link add pykp0 type veth peer name pykp1",
            "link set pykp0 up",
            "addr add 10.9.0.1 peer 10.9.0.2 dev pykp0",  # point-to-point: the local end
            "addr add fd00:9::1/64 dev pykp0 nodad",
            *(f"addr add 10.10.{i // 256}.{i % 256}/32 dev pykp0" for i in range(MANY)),
        ]
        subprocess.run(
            ["ip", "-n", name, "-batch", "-"], input="\n".join(script), text=True, check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@privileged
def test_every_address_ip_lists_is_read(netns: str) -> None:
    listed = json.loads(
        subprocess.run(
            ["ip", "-n", netns, "-j", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    expected = sorted(info["local"] for link in listed for info in link["addr_info"])
    with in_namespace(netns):
        read = interface_addresses()
    assert sorted(read) == expected
    assert len(read) == len(set(read))
    assert {"127.0.0.1", "::1", "10.9.0.1", "fd00:9::1", "10.10.1.143"} <= set(read)
    assert "10.9.0.2" not in read  # the peer is not this node's
    assert len(read) >= MANY + 4
