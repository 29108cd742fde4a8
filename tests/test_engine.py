"""The Rust engine through its Python bindings, as `pykp/_fastpath.pyi` describes them.

Importing the extension at module level is deliberate: without it these tests fail to
collect (an error, not a skip). Every call passes `now` so nothing depends on a clock.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykp import model
from pykp._fastpath import (
    POLICIES,
    Backend,
    Decision,
    Engine,
    Frontend,
    ServiceUpdate,
    StagedChange,
)
from pykp.agent import plan
from pykp.sources import services_file

SERVICE = "default/web:http"
VIP = "10.96.0.10"
VIP6 = "fd00:96::10"
PORT = 80
TARGET_PORT = 8080
NOW = 1.0
SYN, ACK = 0x02, 0x10
ACTIONS = {"forward", "pass", "reject", "drop"}


def backends(count: int, *, weights: Sequence[int] | None = None) -> list[Backend]:
    """`count` ready backends 10.244.<i>.10:8080, i = 1..count."""
    weights = weights or [1] * count
    return [
        Backend(f"10.244.{i}.10", TARGET_PORT, weight=weights[i - 1]) for i in range(1, count + 1)
    ]


def address(backend: Backend) -> tuple[str, int]:
    return (backend.ip, backend.port)


def engine_with(
    service_backends: list[Backend],
    *,
    policy: str = "random",
    affinity_timeout: float | None = None,
    hash_key: str | None = None,
    engine: Engine | None = None,
) -> Engine:
    """An engine (seeded) with one service at VIP:80 over `service_backends`."""
    engine = engine or Engine(seed=1)
    engine.upsert_service(
        SERVICE,
        [Frontend(VIP, PORT)],
        service_backends,
        policy=policy,
        affinity_timeout=affinity_timeout,
        hash_key=hash_key,
    )
    return engine


def clients(count: int) -> Iterator[tuple[str, int]]:
    """`count` distinct (address, port) client ends: 256 ports on each of many addresses."""
    for index in range(count):
        yield f"10.1.{index // 256 // 250}.{index // 256 % 250 + 1}", 10000 + index % 256 * 7


def connect(
    engine: Engine, client: tuple[str, int], *, now: float = NOW, tcp_flags: int = SYN
) -> Decision:
    return engine.decide(client[0], client[1], VIP, PORT, "TCP", tcp_flags=tcp_flags, now=now)


def chosen(engine: Engine, flows: int) -> list[tuple[str, int] | None]:
    """The backend of each of `flows` new connections from distinct clients."""
    return [connect(engine, client).backend for client in clients(flows)]


def chi_square_p_value(observed: Sequence[int], expected: Sequence[float]) -> float:
    """Pearson's test; the p-value in closed form, which exists for even degrees of freedom."""
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    degrees = len(observed) - 1
    assert degrees % 2 == 0, "the closed form below needs even degrees of freedom"
    half = statistic / 2
    return math.exp(-half) * sum(half**k / math.factorial(k) for k in range(degrees // 2))


def test_chi_square_helper_matches_known_values() -> None:
    # Two degrees of freedom: p = exp(-x/2); the 0.001 critical value is 13.8155.
    assert chi_square_p_value([1000, 1000, 1000], [1000, 1000, 1000]) == 1.0
    assert chi_square_p_value([10, 0, 0], [10 / 3] * 3) == pytest.approx(math.exp(-10))
    # Four degrees of freedom, statistic 5: scipy.stats.chi2.sf(5, 4) = 0.28730.
    assert chi_square_p_value([5, 5, 5, 5, 0], [4] * 5) == pytest.approx(0.28730, abs=1e-5)


# --- the bindings' values -----------------------------------------------------------------


def test_policies_match_the_services_file() -> None:
    assert set(POLICIES) == set(model.POLICIES)


def test_frontend_and_backend_keep_their_values_and_defaults() -> None:
    frontend = Frontend(VIP, PORT)
    assert (frontend.ip, frontend.port, frontend.protocol) == (VIP, PORT, "TCP")
    assert Frontend(VIP6, 53, "UDP").protocol == "UDP"

    backend = Backend("10.244.1.10", TARGET_PORT)
    assert (backend.ip, backend.port, backend.weight) == ("10.244.1.10", TARGET_PORT, 1)
    assert (backend.ready, backend.serving, backend.terminating, backend.local) == (
        True,
        True,
        False,
        False,
    )
    other = Backend(
        "10.244.1.11", 1, weight=7, ready=False, serving=True, terminating=True, local=True
    )
    assert (other.weight, other.ready, other.serving, other.terminating, other.local) == (
        7,
        False,
        True,
        True,
        True,
    )


@pytest.mark.parametrize(
    "upsert",
    [
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend("10.96.0.300", 80)], []), id="bad frontend ip"
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend("web", 80)], []), id="frontend name not ip"
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend(VIP, 70000)], []), id="frontend port 70000"
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend(VIP, 80, "ICMP")], []), id="unknown protocol"
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend(VIP, 80)], [Backend("10.244.1", 8080)]),
            id="bad backend ip",
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend(VIP, 80)], [Backend("10.244.1.1", 70000)]),
            id="backend port 70000",
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend(VIP, 80)], [], policy="fastest"),
            id="unknown policy",
        ),
        pytest.param(
            lambda e: e.upsert_service("x", [Frontend(VIP, 80)], [], hash_key="dst-ip"),
            id="unknown hash key",
        ),
    ],
)
def test_invalid_input_raises_value_error_and_changes_nothing(
    upsert: Callable[[Engine], object],
) -> None:
    engine = Engine(seed=1)

    with pytest.raises(ValueError):
        upsert(engine)

    assert engine.services() == []


# --- policies -----------------------------------------------------------------------------


def test_round_robin_cycles_through_the_backends_in_order() -> None:
    b1, b2, b3 = service_backends = backends(3)
    engine = engine_with(service_backends, policy="round-robin")

    assert chosen(engine, 7) == [address(b) for b in (b1, b2, b3, b1, b2, b3, b1)]


def test_round_robin_goes_on_where_it_was_when_the_endpoints_change() -> None:
    """IPVS rr keeps its place when destinations change; restarting at the lowest address
    on every change would skew every node towards it under endpoint churn."""
    b1, b2, b3, b4 = backends(4)
    engine = engine_with([b1, b2, b3], policy="round-robin")
    assert chosen(engine, 2) == [address(b1), address(b2)]

    engine.upsert_service(SERVICE, [Frontend(VIP, PORT)], [b1, b2, b3, b4], policy="round-robin")
    later = [connect(engine, ("10.2.0.1", port)).backend for port in (1001, 1002, 1003)]
    assert later == [address(b3), address(b4), address(b1)]
    # The backend whose turn it is (b2) leaves: the next one by address takes it.
    engine.upsert_service(SERVICE, [Frontend(VIP, PORT)], [b1, b3, b4], policy="round-robin")
    assert connect(engine, ("10.2.0.1", 2001)).backend == address(b3)


def test_random_is_uniform_by_chi_square() -> None:
    service_backends = backends(3)
    engine = engine_with(service_backends, policy="random", engine=Engine(seed=20240601))

    counts = Counter(chosen(engine, 3000))

    observed = [counts[address(backend)] for backend in service_backends]
    assert sum(observed) == 3000
    assert chi_square_p_value(observed, [1000.0] * 3) > 0.001, observed


def test_random_honours_weights() -> None:
    service_backends = backends(3, weights=[1, 2, 3])
    engine = engine_with(service_backends, policy="random", engine=Engine(seed=7))

    counts = Counter(chosen(engine, 6000))

    observed = [counts[address(backend)] for backend in service_backends]
    assert sum(observed) == 6000
    assert chi_square_p_value(observed, [1000.0, 2000.0, 3000.0]) > 0.001, observed


def test_maglev_agrees_across_engines_with_the_same_maglev_seed() -> None:
    # Two nodes: their random seeds differ, their Maglev seed (cluster-wide) does not.
    node_a = engine_with(backends(5), policy="maglev", engine=Engine(seed=1, maglev_seed=99))
    node_b = engine_with(backends(5), policy="maglev", engine=Engine(seed=2, maglev_seed=99))

    on_a, on_b = chosen(node_a, 2000), chosen(node_b, 2000)

    assert on_a == on_b
    assert len(set(on_a)) == 5


def test_maglev_moves_about_a_fifth_of_flows_when_one_of_five_backends_goes() -> None:
    five = engine_with(backends(5), policy="maglev", engine=Engine(seed=1, maglev_seed=3))
    four = engine_with(backends(5)[:4], policy="maglev", engine=Engine(seed=1, maglev_seed=3))

    before, after = chosen(five, 5000), chosen(four, 5000)

    moved = sum(b != a for b, a in zip(before, after, strict=True)) / 5000
    assert 0.1 < moved < 0.3, moved


def test_maglev_source_ip_key_sends_every_port_of_a_client_to_one_backend() -> None:
    engine = engine_with(backends(5), policy="maglev", hash_key="source-ip")

    per_client = {
        client: {connect(engine, (client, port)).backend for port in range(20000, 20200, 10)}
        for client in (f"10.1.0.{i}" for i in range(1, 41))
    }

    assert all(len(chosen_backends) == 1 for chosen_backends in per_client.values())
    assert len(set.union(*per_client.values())) > 1  # yet clients spread over backends


def test_engine_hash_key_is_the_default_for_maglev_services() -> None:
    engine = engine_with(backends(5), policy="maglev", engine=Engine(seed=1, hash_key="source-ip"))

    assert len({connect(engine, ("10.1.0.1", port)).backend for port in range(20000, 20100)}) == 1


def test_least_conn_balances_open_flows_exactly() -> None:
    service_backends = backends(3)
    engine = engine_with(service_backends, policy="least-conn")

    counts = Counter(chosen(engine, 30))  # 30 SYNs, none closed

    assert counts == {address(backend): 10 for backend in service_backends}


def test_least_conn_sends_new_flows_to_the_backend_with_the_fewest() -> None:
    b1, b2, b3 = backends(3)
    engine = engine_with([b1, b2], policy="least-conn")
    first = list(clients(15))
    for client in first[:10]:  # five open flows on each of b1 and b2
        connect(engine, client)

    engine_with([b1, b2, b3], policy="least-conn", engine=engine)  # scale up: b3 has none

    assert [connect(engine, client).backend for client in first[10:]] == [address(b3)] * 5


def test_session_affinity_keeps_a_client_until_the_timeout_passes() -> None:
    engine = engine_with(backends(3), policy="random", affinity_timeout=10.0)
    addresses = [f"10.1.0.{i}" for i in range(1, 31)]

    first = {client: connect(engine, (client, 40000), now=0.0).backend for client in addresses}
    for port in range(40001, 40006):  # new source ports, within the timeout
        for client in addresses:
            assert connect(engine, (client, port), now=5.0).backend == first[client]
    later = {client: connect(engine, (client, 41000), now=100.0).backend for client in addresses}

    # Past the timeout each client is placed afresh: that all 30 land where they were
    # by chance has probability 3**-30.
    assert later != first


def test_terminating_backends_serve_only_when_no_backend_is_ready() -> None:
    ready = Backend("10.244.1.10", TARGET_PORT)
    terminating = Backend("10.244.2.10", TARGET_PORT, ready=False, serving=True, terminating=True)
    gone = Backend("10.244.3.10", TARGET_PORT, ready=False, serving=False, terminating=True)
    not_ready = Backend("10.244.1.10", TARGET_PORT, ready=False, serving=False)
    engine = engine_with([ready, terminating, gone])

    assert set(chosen(engine, 100)) == {address(ready)}

    engine_with([not_ready, terminating, gone], engine=engine)
    flows = [connect(engine, (client, port + 1)) for client, port in clients(100)]
    assert {decision.backend for decision in flows} == {address(terminating)}

    engine_with([not_ready, gone], engine=engine)
    decision = connect(engine, ("10.9.9.9", 5555))
    assert (decision.action, decision.reason) == ("reject", "no_endpoints")


# --- decisions ----------------------------------------------------------------------------


def test_a_service_without_backends_rejects() -> None:
    engine = engine_with([])

    decision = connect(engine, ("10.1.0.1", 40000))

    assert (decision.action, decision.reason) == ("reject", "no_endpoints")
    assert decision.service == SERVICE
    assert decision.backend is None and decision.backend_id is None


@pytest.mark.parametrize(
    ("dst", "dst_port", "protocol"),
    [("10.96.0.99", 80, "TCP"), (VIP, 81, "TCP"), (VIP, 80, "UDP")],
    ids=["other address", "other port", "other protocol"],
)
def test_a_packet_for_no_frontend_passes(dst: str, dst_port: int, protocol: str) -> None:
    engine = engine_with(backends(3))

    decision = engine.decide("10.1.0.1", 40000, dst, dst_port, protocol, now=NOW)

    assert (decision.action, decision.reason) == ("pass", "no_service")
    assert decision.service is None and decision.backend is None


def test_a_forward_names_the_service_and_a_live_backend_id() -> None:
    service_backends = backends(3)
    engine = engine_with(service_backends)

    decision = connect(engine, ("10.1.0.1", 40000))

    assert (decision.action, decision.reason, decision.service) == ("forward", None, SERVICE)
    assert decision.backend in {address(backend) for backend in service_backends}
    assert decision.backend_id is not None
    assert engine.backend_ids()[decision.backend_id] == decision.backend


def test_an_established_flow_keeps_its_backend() -> None:
    engine = engine_with(backends(3), policy="random")

    opening = connect(engine, ("10.1.0.1", 40000), tcp_flags=SYN, now=1.0)
    following = [
        connect(engine, ("10.1.0.1", 40000), tcp_flags=ACK, now=1.0 + i) for i in range(1, 6)
    ]

    assert opening.action == "forward" and opening.new_flow
    for decision in following:
        assert decision.action == "forward"
        assert not decision.new_flow
        assert (decision.backend, decision.backend_id) == (opening.backend, opening.backend_id)


def test_udp_and_ipv6_frontends() -> None:
    engine = Engine(seed=1)
    engine.upsert_service(
        "kube-system/dns:dns",
        [Frontend("10.96.0.53", 53, "UDP"), Frontend("fd00:96::53", 53, "UDP")],
        [Backend("10.244.1.53", 53), Backend("fd00:244:1::53", 53)],
    )

    over_ipv4 = engine.decide("10.1.0.1", 5353, "10.96.0.53", 53, "UDP", now=NOW)
    over_ipv6 = engine.decide("fd00:1::1", 5353, "fd00:96::53", 53, "UDP", now=NOW)

    assert over_ipv4.action == over_ipv6.action == "forward"
    assert over_ipv4.service == over_ipv6.service == "kube-system/dns:dns"


# --- raw packets --------------------------------------------------------------------------


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(pseudo_header: bytes, src_port: int, dst_port: int, flags: int) -> bytes:
    header = struct.pack("!HHIIBBHHH", src_port, dst_port, 1000, 0, 5 << 4, flags, 65535, 0, 0)
    checksum = internet_checksum(pseudo_header + header)
    return header[:16] + struct.pack("!H", checksum) + header[18:]


def ipv4_tcp(src: str, src_port: int, dst: str, dst_port: int, flags: int = SYN) -> bytes:
    """An IPv4 TCP segment with no payload and correct checksums."""
    source, destination = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    pseudo = struct.pack("!4s4sBBH", source, destination, 0, 6, 20)
    segment = tcp_segment(pseudo, src_port, dst_port, flags)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 1, 0x4000, 64, 6, 0, source, destination
    )
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + segment


def ipv6_tcp(src: str, src_port: int, dst: str, dst_port: int, flags: int = SYN) -> bytes:
    source, destination = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    pseudo = struct.pack("!16s16sI3xB", source, destination, 20, 6)
    segment = tcp_segment(pseudo, src_port, dst_port, flags)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(segment), 6, 64, source, destination)
    return header + segment


SYN_PACKET = ipv4_tcp("10.1.0.1", 40000, VIP, PORT)


def test_the_hand_built_packets_have_valid_checksums() -> None:
    assert internet_checksum(SYN_PACKET[:20]) == 0
    pseudo = struct.pack("!4s4sBBH", SYN_PACKET[12:16], SYN_PACKET[16:20], 0, 6, 20)
    assert internet_checksum(pseudo + SYN_PACKET[20:]) == 0


def test_decide_packet_forwards_a_tcp_syn() -> None:
    service_backends = backends(3)
    engine = engine_with(service_backends)

    decision = engine.decide_packet(SYN_PACKET, now=NOW)

    assert (decision.action, decision.service, decision.new_flow) == ("forward", SERVICE, True)
    assert decision.backend in {address(backend) for backend in service_backends}
    # The same flow described by its 5-tuple is the established flow.
    again = connect(engine, ("10.1.0.1", 40000), tcp_flags=ACK)
    assert (again.new_flow, again.backend) == (False, decision.backend)


def test_decide_packet_forwards_an_ipv6_tcp_syn() -> None:
    engine = Engine(seed=1)
    engine.upsert_service("default/web6", [Frontend(VIP6, PORT)], [Backend("fd00:244::10", 8080)])

    decision = engine.decide_packet(ipv6_tcp("fd00:1::1", 40000, VIP6, PORT), now=NOW)

    assert (decision.action, decision.backend) == ("forward", ("fd00:244::10", 8080))


def truncated_and_malformed() -> dict[str, bytes]:
    packets = {f"first {n} bytes of a SYN": SYN_PACKET[:n] for n in (0, 1, 10, 19, 20, 21, 39)}
    packets["one byte"] = b"\x45"
    packets["IP version 5"] = b"\x55" + SYN_PACKET[1:]
    packets["IPv4 header length below 20"] = b"\x44" + SYN_PACKET[1:]
    packets["IPv4 total length past the end"] = (
        SYN_PACKET[:2] + struct.pack("!H", 400) + SYN_PACKET[4:]
    )
    packets["IPv6 header cut short"] = ipv6_tcp("fd00:1::1", 40000, VIP6, PORT)[:30]
    packets["IPv6 payload length past the end"] = ipv6_tcp("fd00:1::1", 40000, VIP6, PORT)[:-4]
    packets["all ones"] = b"\xff" * 60
    return packets


@pytest.mark.parametrize(
    "packet", truncated_and_malformed().values(), ids=truncated_and_malformed()
)
def test_decide_packet_drops_malformed_input_with_a_reason(packet: bytes) -> None:
    engine = engine_with(backends(3))

    decision = engine.decide_packet(packet, now=NOW)

    assert decision.action == "drop"
    assert decision.reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_decide_packet_never_raises_on_arbitrary_bytes(packet: bytes) -> None:
    engine = engine_with(backends(3))

    decision = engine.decide_packet(packet, now=NOW)

    assert decision.action in ACTIONS
    if decision.action == "drop":
        assert decision.reason


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(SYN_PACKET) - 1), st.integers(0, 255))
def test_decide_packet_never_raises_on_a_corrupted_syn(offset: int, value: int) -> None:
    engine = engine_with(backends(3))
    packet = SYN_PACKET[:offset] + bytes([value]) + SYN_PACKET[offset + 1 :]

    assert engine.decide_packet(packet, now=NOW).action in ACTIONS


# --- the connection table, counters, service changes --------------------------------------


def test_counters_count_decisions_by_action() -> None:
    engine = engine_with(backends(3))
    engine.upsert_service("default/empty", [Frontend("10.96.0.11", PORT)], [])

    connect(engine, ("10.1.0.1", 40000))
    connect(engine, ("10.1.0.2", 40000))
    engine.decide("10.1.0.3", 40000, "10.96.0.99", PORT, now=NOW)
    engine.decide("10.1.0.4", 40000, "10.96.0.11", PORT, now=NOW)
    engine.decide_packet(b"", now=NOW)

    counters = engine.counters()
    assert (
        counters["decisions_forward"],
        counters["decisions_pass"],
        counters["decisions_reject"],
        counters["decisions_drop"],
        counters["conntrack_entries"],
    ) == (2, 1, 1, 1, 2)


def test_connections_lists_open_flows() -> None:
    service_backends = backends(3)
    engine = engine_with(service_backends)
    opened = list(clients(3))
    for client in opened:
        connect(engine, client)

    connections = engine.connections()

    assert sorted(connection.client for connection in connections) == sorted(opened)
    for connection in connections:
        assert (connection.protocol, connection.service) == ("TCP", SERVICE)
        assert connection.frontend == (VIP, PORT)
        assert connection.backend in {address(backend) for backend in service_backends}
        assert connection.state
        assert connection.expires_in > 0
    assert len(engine.connections(limit=2)) == 2


def test_flush_backend_forgets_its_flows() -> None:
    b1, b2, b3 = service_backends = backends(3)
    engine = engine_with(service_backends, policy="round-robin")
    for client in clients(30):
        connect(engine, client)

    assert engine.flush_backend(b1.ip, b1.port) == 10

    remaining = engine.connections()
    assert len(remaining) == 20
    assert {connection.backend for connection in remaining} == {address(b2), address(b3)}
    assert engine.counters()["conntrack_entries"] == 20
    assert engine.flush_backend(b1.ip, b1.port) == 0


def test_remove_service_makes_its_address_pass() -> None:
    engine = engine_with(backends(3))
    assert engine.services() == [SERVICE]

    assert engine.remove_service(SERVICE) is True

    assert engine.services() == []
    decision = connect(engine, ("10.1.0.1", 40000))
    assert (decision.action, decision.reason) == ("pass", "no_service")
    assert engine.remove_service(SERVICE) is False


def test_upsert_returns_a_stable_id_per_service() -> None:
    engine = Engine(seed=1)
    web = engine.upsert_service("a", [Frontend(VIP, PORT)], backends(2))
    other = engine.upsert_service("b", [Frontend("10.96.0.11", PORT)], backends(2))

    assert web != other
    assert engine.upsert_service("a", [Frontend(VIP, PORT)], backends(3)) == web
    assert sorted(engine.services()) == ["a", "b"]


def test_maglev_table_holds_every_backend_evenly() -> None:
    engine = engine_with(backends(3), policy="maglev", engine=Engine(seed=1, maglev_table_size=251))
    ids = engine.backend_ids()

    table = engine.maglev_table(SERVICE)

    assert len(table) == 251
    assert {ids[backend_id] for backend_id in table} == {address(b) for b in backends(3)}
    per_backend = Counter(table).values()
    assert max(per_backend) - min(per_backend) <= 1  # Maglev fills the table in turns
    assert engine_with(backends(3), policy="random").maglev_table(SERVICE) == []


# --- the services file, applied ------------------------------------------------------------


def test_apply_to_engine_programs_the_bundled_example_and_removes_what_went() -> None:
    services, _ = services_file.load_bundled_example()
    engine_services = plan.services_file_to_engine(services, ["192.168.0.10"], "node-a")
    engine = Engine(seed=1)

    plan.apply_to_engine(engine, engine_services)
    plan.apply_to_engine(engine, engine_services)  # idempotent

    assert sorted(engine.services()) == sorted(service.name for service in engine_services)
    by_vip = engine.decide("10.1.0.1", 40000, "10.96.0.10", 80, now=NOW)
    by_node_port = engine.decide("10.1.0.1", 40001, "192.168.0.10", 30080, now=NOW)
    dns = engine.decide("10.1.0.1", 40002, "10.96.0.53", 53, "UDP", now=NOW)
    assert (by_vip.action, by_vip.service) == ("forward", "default/web-random:http")
    assert (by_node_port.action, by_node_port.service) == ("forward", "default/web-random:http")
    assert (dns.action, dns.service) == ("forward", "kube-system/dns:dns")

    plan.apply_to_engine(engine, engine_services[1:])

    assert "default/web-random:http" not in engine.services()
    gone = engine.decide("10.1.0.1", 40003, "10.96.0.10", 80, now=NOW)
    assert gone.action == "pass"


# --- batches: stage, commit, apply -------------------------------------------------------

VIP_B = "10.96.0.11"


def owner(engine: Engine, vip: str) -> str | None:
    """The service a new connection to `vip`:80 goes to (None when no service has it)."""
    return engine.decide("10.1.0.1", 40000, vip, PORT, now=NOW).service


def update(name: str, vip: str, *addresses: str) -> ServiceUpdate:
    return ServiceUpdate(name, [Frontend(vip, PORT)], [Backend(a, TARGET_PORT) for a in addresses])


def test_service_update_keeps_its_values_and_refuses_bad_ones() -> None:
    u = ServiceUpdate(
        "a",
        (Frontend(VIP, PORT),),
        [Backend("10.244.1.10", TARGET_PORT)],
        policy="maglev",
        affinity_timeout=30.0,
        hash_key="source-ip",
    )
    assert (u.name, u.policy, u.affinity_timeout, u.hash_key) == ("a", "maglev", 30.0, "source-ip")
    assert [(f.ip, f.port) for f in u.frontends] == [(VIP, PORT)]
    assert [address(b) for b in u.backends] == [("10.244.1.10", TARGET_PORT)]
    assert (update("b", VIP).policy, update("b", VIP).affinity_timeout) == (None, None)
    with pytest.raises(ValueError):
        ServiceUpdate("a", [], [], policy="fastest")
    with pytest.raises(ValueError):
        ServiceUpdate("a", [], [], affinity_timeout=0.0)


def test_a_staged_batch_is_invisible_until_committed_then_whole() -> None:
    engine = Engine(seed=1)
    engine.apply([update("a", VIP, "10.244.1.10"), update("b", VIP_B, "10.244.2.10")], [])

    # Swap the two frontends and give b a new backend.
    staged = engine.stage(
        [update("a", VIP_B, "10.244.1.10"), update("b", VIP, "10.244.2.10", "10.244.2.11")], []
    )
    assert isinstance(staged, StagedChange)
    assert (staged.refused, staged.removed, staged.backends_removed) == ({}, [], {})
    assert list(staged.backends_added.values()) == [("10.244.2.11", TARGET_PORT)]
    assert (owner(engine, VIP), owner(engine, VIP_B)) == ("a", "b")
    assert not staged.committed
    assert set(staged.backends_added) - set(engine.backend_ids()) == set(staged.backends_added)

    engine.commit(staged)

    assert staged.committed
    assert (owner(engine, VIP), owner(engine, VIP_B)) == ("b", "a")
    assert engine.pools(["a", "b"]) == staged.pools
    assert set(staged.backends_added) <= set(engine.backend_ids())
    # One upsert's pools read alone are the same; a name not upserted has none.
    assert {name: staged.pool(name) for name in ("a", "b")} == staged.pools
    assert staged.pool("c") is None


def test_a_frontend_conflict_is_refused_in_order_and_drops_the_refused_service() -> None:
    engine = Engine(seed=1)
    engine.apply([update("old", VIP, "10.244.1.10"), update("late", VIP_B, "10.244.2.10")], [])
    late_id = next(i for i, a in engine.backend_ids().items() if a[0] == "10.244.2.10")

    # "late" now also wants "old"'s frontend: refused, and its previous version goes too.
    change = engine.apply(
        [
            update("old", VIP, "10.244.1.10"),
            ServiceUpdate(
                "late",
                [Frontend(VIP_B, PORT), Frontend(VIP, PORT)],
                [Backend("10.244.2.10", TARGET_PORT)],
            ),
            update("", "10.96.0.12"),
        ],
        ["absent"],
    )

    assert change.committed
    assert set(change.refused) == {"late", ""}
    assert '"old"' in change.refused["late"]
    assert change.removed == ["late"]
    assert change.backends_removed == {late_id: ("10.244.2.10", TARGET_PORT)}
    assert set(change.pools) == {"old"}
    assert change.pool("late") is None  # refused: no pools
    assert (owner(engine, VIP), owner(engine, VIP_B)) == ("old", None)
    assert engine.services() == ["old"]


def test_commit_refuses_a_change_committed_twice_or_stale() -> None:
    engine = Engine(seed=1)
    first = engine.stage([update("a", VIP, "10.244.1.10")], [])
    second = engine.stage([update("b", VIP, "10.244.2.10")], [])
    engine.commit(second)

    with pytest.raises(ValueError, match="already committed"):
        engine.commit(second)
    with pytest.raises(ValueError, match="stage it again"):
        engine.commit(first)
    assert engine.services() == ["b"]
    # A change that is never committed changes nothing.
    engine.stage([], ["b"])
    assert engine.services() == ["b"]
    assert (engine.holds("b"), engine.holds("a"), engine.service_count()) == (True, False, 1)
    engine.commit(engine.stage([], ["b"]))
    assert (engine.holds("b"), engine.service_count(), engine.services()) == (False, 0, [])


def test_a_removal_in_a_batch_forgets_the_services_flows() -> None:
    engine = engine_with(backends(2))
    connect(engine, ("10.1.0.1", 40000))
    assert len(engine.connections(now=NOW)) == 1

    change = engine.apply([], [SERVICE])

    assert change.removed == [SERVICE]
    assert engine.connections(now=NOW) == []
    assert engine.backend_ids() == {}


def test_pools_can_be_restricted_to_some_services() -> None:
    engine = Engine(seed=1)
    engine.apply([update("a", VIP, "10.244.1.10"), update("b", VIP_B, "10.244.2.10")], [])

    assert set(engine.pools()) == {"a", "b"}
    assert set(engine.pools(["b", "absent"])) == {"b"}
    assert engine.pools([]) == {}
    assert engine.pools(["a"])["a"] == engine.pools()["a"]


# --- beyond the brief: properties a datapath needs ----------------------------------------


def test_maglev_does_not_depend_on_backend_order() -> None:
    # Nodes may list a service's endpoints in different orders (EndpointSlices are merged
    # in watch order); consistent hashing across nodes must not care.
    forward = engine_with(backends(5), policy="maglev", engine=Engine(seed=1, maglev_seed=5))
    reverse = engine_with(backends(5)[::-1], policy="maglev", engine=Engine(seed=1, maglev_seed=5))

    assert chosen(forward, 2000) == chosen(reverse, 2000)


def test_dual_stack_service_picks_a_backend_of_the_packets_family() -> None:
    # A packet cannot be DNATed across families: IPv4 in, IPv4 backend out.
    engine = Engine(seed=1)
    engine.upsert_service(
        "default/echo",
        [Frontend(VIP, PORT), Frontend(VIP6, PORT)],
        [Backend("10.244.1.10", 8080), Backend("fd00:244::10", 8080)],
    )

    for port in range(40000, 40050):
        over_ipv4 = engine.decide("10.1.0.1", port, VIP, PORT, now=NOW)
        over_ipv6 = engine.decide("fd00:1::1", port, VIP6, PORT, now=NOW)
        assert over_ipv4.backend == ("10.244.1.10", 8080)
        assert over_ipv6.backend == ("fd00:244::10", 8080)
