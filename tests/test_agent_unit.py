"""The agent without root: a real `Engine`, fakes for the rules, the datapath and conntrack.

Also the pieces it is made of: the file source, the healthz state, node addresses,
configuration checks and the status snapshot. The fakes here are shared with
test_metrics.py and test_cli_run.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pykp.agent.agent import (
    Agent,
    AgentConfig,
    ConfigError,
    Dependencies,
    filter_node_addresses,
)
from pykp.agent.plan import EngineBackend, EngineService
from pykp.agent.sync import newly_served_udp_frontends, stale_udp_flows
from pykp.model import Catalog, Problem
from pykp.netfilter.conntrack_sysctls import ConntrackSettings, SysctlResult
from pykp.netfilter.rules import FrontendRule, MarkLayout, RulesError, RuleState
from pykp.netfilter.rules import _elements as rules_elements
from pykp.observe.health import GO_ZERO_TIME, ProxierHealth, go_time
from pykp.observe.status import STATUS_FILE, read_status_file
from pykp.sources.base import ChangeLog, Changes, SourceStatus
from pykp.sources.file import FileSource, diff_catalogs
from pykp.sources.services_file import ServicesFileCache, load_services_text

# --- fakes --------------------------------------------------------------------------------


class Events:
    """One ordered log of what the fakes were asked to do."""

    def __init__(self) -> None:
        self.log: list[str] = []


class FakeRules:
    """RuleManager's interface without a kernel: keeps the elements it is sent, and the
    RuleState they spell after each change; fails while `fail` is set."""

    def __init__(self, events: Events | None = None, shift: int = 16) -> None:
        self.events = events or Events()
        self.states: list[RuleState] = []
        self.elements: dict[str, dict[str, str]] = {}
        self.fail: Exception | None = None
        self.present = False
        # A fake's first load goes whole (its states are recorded per load); the parts of a
        # first load are tested on their own (test_service_sync.py).
        self.holds_no_elements = False
        self.loads = 0
        self.shift = shift
        self.synced = threading.Event()

    def install(self) -> None:
        self.events.log.append("rules.install")
        self.present = True

    def load_elements(self, wanted: Any) -> int:
        if self.fail is not None:
            raise self.fail
        self.loads += 1
        self.elements = {name: dict(items) for name, items in wanted.items()}
        self._changed()
        return sum(map(len, wanted.values()))

    def add_elements(self, added: Any, replaced: Any = {}) -> None:  # noqa: B006
        if self.fail is not None:
            raise self.fail
        for name, pairs in replaced.items():
            for key, element in pairs:
                self.elements.setdefault(name, {})[key] = element
        for name, items in added.items():
            for element in items:
                self.elements.setdefault(name, {})[element.split(" : ")[0]] = element

    def remove_elements(self, removed: Any) -> None:
        if self.fail is not None:
            raise self.fail
        for name, keys in removed.items():
            for key in keys:
                del self.elements[name][key]
        self._changed()

    def _changed(self) -> None:
        self.states.append(state_of(self.elements, self.shift))
        self.synced.set()

    def cleanup(self) -> None:
        self.events.log.append("rules.cleanup")
        self.present = False

    def installed(self) -> bool:
        return self.present

    def undecided_connections(self) -> int:
        return 3 if self.present else 0

    @property
    def last(self) -> RuleState:
        return self.states[-1]


_PROTOCOL_NAMES = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}


def state_of(elements: dict[str, dict[str, str]], shift: int = 16) -> RuleState:
    """The RuleState that nftables elements spell (the agent's output, read back)."""

    def keys(name: str) -> set[str]:
        return set(elements.get(f"{name}4", {})) | set(elements.get(f"{name}6", {}))

    def frontend(key: str) -> tuple[str, int, str]:
        ip, protocol, port = key.split(" . ")
        return ip, int(port), _PROTOCOL_NAMES[protocol]

    queued, masq, local = keys("queued"), keys("masq_frontends"), keys("local_frontends")
    frontends = frozenset(
        FrontendRule(
            *frontend(key),
            external=key in masq or key in local,
            masquerade=key not in local,
            queued=key in queued,
        )
        for key in keys("frontends")
    )
    backends = {}
    for family in (4, 6):
        for mark, element in elements.get(f"backends{family}", {}).items():
            ip, port = element.split(" : ")[1].split(" . ")
            backends[int(mark, 16) >> shift] = (ip, int(port))
    slots: dict[tuple[str, int, str], dict[int, tuple[str, int]]] = {}
    for family in (4, 6):
        for slot, element in elements.get(f"slots{family}", {}).items():
            key, _, index = slot.rpartition(" . ")
            ip, port = element.split(" : ")[1].split(" . ")
            slots.setdefault(frontend(key), {})[int(index)] = (ip, int(port))
    return RuleState(
        frontends=frontends,
        service_ips=frozenset(keys("service_ips")),
        backends=backends,
        fallback={f: tuple(s[i] for i in sorted(s)) for f, s in slots.items()},
    )


class FakeDatapath:
    """NfqueueDatapath's interface, without queues."""

    def __init__(self, events: Events | None = None, fail: Exception | None = None) -> None:
        self.events = events or Events()
        self.fail = fail
        self._running = False
        self.counters = {"packets": 7, "accepted": 6, "dropped": 1, "kernel_queue_dropped": 2}

    def start(self) -> None:
        self.events.log.append("datapath.start")
        if self.fail is not None:
            raise self.fail
        self._running = True

    def stop(self) -> None:
        self.events.log.append("datapath.stop")
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def stats(self) -> dict[str, int]:
        return dict(self.counters)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StaticSource:
    """A source the test sets by hand."""

    def __init__(self, text: str | None = None, changed_at: float | None = None) -> None:
        self._file: Catalog | None = None
        self._problems: list[Problem] = []
        self._changed_at = changed_at
        self._changes = ChangeLog()
        self.notify: Callable[[], None] | None = None
        self.stopped = False
        if text is not None:
            self.set(text, changed_at)

    def set(self, text: str, changed_at: float | None = None) -> None:
        loaded, self._problems = load_services_text(textwrap.dedent(text), "test.yaml")
        self._file, keys = diff_catalogs(self._file, loaded)
        self._changes.add(keys)
        self._changed_at = changed_at
        if self.notify is not None:
            self.notify()

    def start(self, notify: Callable[[], None]) -> None:
        self.notify = notify
        if self._file is not None:
            notify()

    def stop(self) -> None:
        self.stopped = True

    def current(self) -> Catalog | None:
        return self._file

    def take_changes(self) -> Changes | None:
        if self._file is None:
            return None
        return Changes(self._file, self._changes.take())

    def problems(self) -> list[Problem]:
        return list(self._problems)

    def status(self) -> SourceStatus:
        return SourceStatus(
            name="static",
            initialized=self._file is not None,
            changed_at=self._changed_at,
            loads=1,
            load_errors=0,
            invalid_objects=len(self._problems),
            last_error=None,
        )


INTERFACES = ["127.0.0.1", "192.168.77.1", "::1", "fd00:77::1", "fe80::1%eth0", "not-an-ip"]
NODE_ADDRESSES = ["192.168.77.1", "fd00:77::1"]


class Harness:
    """An agent with a real engine, fake kernel pieces and fake clocks."""

    def __init__(
        self,
        source: StaticSource | FileSource,
        tmp_path: Path,
        *,
        config: dict[str, Any] | None = None,
        datapath_fail: Exception | None = None,
    ) -> None:
        self.events = Events()
        self.rules = FakeRules(self.events)
        self.datapath = FakeDatapath(self.events, datapath_fail)
        self.deleted: list[tuple[str, str, int | None]] = []
        # UDP frontends whose un-NATed entries the agent asked to delete, by sync.
        self.unnated: list[list[tuple[str, int]]] = []
        # The conntrack sysctls the agent asked for at start (never the machine's own).
        self.sysctls: list[ConntrackSettings] = []
        self.delete_fails: Exception | None = None
        self.wall = FakeClock(1_700_000_000.0)
        self.mono = FakeClock(1000.0)
        self.interfaces = list(INTERFACES)
        settings: dict[str, Any] = {
            "hostname_override": "node-a",
            "healthz_bind_address": "",
            "metrics_bind_address": "",
            "state_dir": tmp_path / "state",
            "status_interval": 0,
        }
        settings.update(config or {})
        self.config = AgentConfig(**settings)
        self.deps = Dependencies(
            make_rules=lambda config: self.rules,
            make_datapath=lambda engine, config: self.datapath,
            interface_addresses=lambda: list(self.interfaces),
            delete_udp_flows=self._delete,
            delete_unnated_udp_flows=self._delete_unnated,
            set_conntrack_sysctls=self._set_sysctls,
            wall_clock=self.wall,
            monotonic=self.mono,
        )
        self.agent = Agent(self.config, source=source, deps=self.deps)

    def _set_sysctls(self, settings: ConntrackSettings) -> list[SysctlResult]:
        self.sysctls.append(settings)
        return [SysctlResult("nf_conntrack_tcp_timeout_close_wait", 3600, 60, "set")]

    def _delete_unnated(self, frontends: Sequence[tuple[str, int]]) -> int:
        if self.delete_fails is not None:
            raise self.delete_fails
        self.unnated.append(list(frontends))
        return 0  # a fake kernel: no flow ever began unserved

    def _delete(self, service_ip: str, backend_ip: str, backend_port: int | None) -> int:
        if self.delete_fails is not None:
            raise self.delete_fails
        self.deleted.append((service_ip, backend_ip, backend_port))
        return 1


def agent_with(
    text: str | None, tmp_path: Path, *, changed_at: float | None = None, **config: Any
) -> tuple[Harness, StaticSource]:
    source = StaticSource(text, changed_at)
    return Harness(source, tmp_path, config=config), source


# --- the services used throughout ---------------------------------------------------------

SERVICES = """\
services:
  - name: web
    clusterIPs: [10.96.0.10, "fd00:96::10"]
    externalIPs: [203.0.113.10]
    loadBalancerIPs: [198.51.100.10]
    policy: round-robin
    ports:
      - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    endpoints:
      - {ip: 10.244.1.10, nodeName: node-a}
      - {ip: 10.244.2.10, nodeName: node-b}
  - name: local
    clusterIP: 10.96.0.11
    externalTrafficPolicy: Local
    ports: [{port: 443, targetPort: 8443, nodePort: 30443}]
    endpoints: [{ip: 10.244.1.11, nodeName: node-a}]
  - name: dns
    namespace: kube-system
    clusterIP: 10.96.0.53
    externalIPs: [203.0.113.53]
    ports:
      - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
      - {name: dns-tcp, port: 53, protocol: TCP}
    endpoints:
      - {ip: 10.244.1.53}
      - {ip: 10.244.2.53}
"""


def without_endpoint(text: str, ip: str) -> str:
    return "\n".join(line for line in text.splitlines() if f"ip: {ip}" not in line) + "\n"


def ext(ip: str, port: int, protocol: str = "TCP", masquerade: bool = True) -> FrontendRule:
    return FrontendRule(ip, port, protocol, external=True, masquerade=masquerade)


# --- the sync -----------------------------------------------------------------------------


def test_a_sync_renders_every_frontend_with_its_kind_and_masquerade(tmp_path: Path) -> None:
    # Every frontend queued: random and round-robin decided by pykp's reader too.
    h, _ = agent_with(SERVICES, tmp_path, kernel_random=False, kernel_round_robin=False)

    h.agent.sync()

    assert h.rules.last.frontends == {
        # web: ClusterIPs internal; external IPs, LB IPs and the NodePort on every node
        # address external and masqueraded (externalTrafficPolicy Cluster).
        FrontendRule("10.96.0.10", 80, "TCP"),
        FrontendRule("fd00:96::10", 80, "TCP"),
        ext("203.0.113.10", 80),
        ext("198.51.100.10", 80),
        ext("192.168.77.1", 30080),
        ext("fd00:77::1", 30080),
        # local: externalTrafficPolicy Local keeps the client address.
        FrontendRule("10.96.0.11", 443, "TCP"),
        ext("192.168.77.1", 30443, masquerade=False),
        ext("fd00:77::1", 30443, masquerade=False),
        # dns: two ports, two protocols.
        FrontendRule("10.96.0.53", 53, "UDP"),
        FrontendRule("10.96.0.53", 53, "TCP"),
        ext("203.0.113.53", 53, "UDP"),
        ext("203.0.113.53", 53, "TCP"),
        ext("192.168.77.1", 30053, "UDP"),
        ext("fd00:77::1", 30053, "UDP"),
    }
    assert h.rules.last.service_ips == {
        "10.96.0.10",
        "fd00:96::10",
        "203.0.113.10",
        "198.51.100.10",
        "10.96.0.11",
        "10.96.0.53",
        "203.0.113.53",
    }


def test_the_backend_map_is_the_engines(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path)

    h.agent.sync()

    backends = dict(h.rules.last.backends)
    assert backends == h.agent.engine.backend_ids()
    assert set(backends.values()) == {
        ("10.244.1.10", 8080),
        ("10.244.2.10", 8080),
        ("10.244.1.11", 8443),
        ("10.244.1.53", 53),
        ("10.244.2.53", 53),
    }


def test_the_engine_gets_every_service_port_and_decides_for_its_frontends(
    tmp_path: Path,
) -> None:
    h, _ = agent_with(SERVICES, tmp_path)

    h.agent.sync()

    engine = h.agent.engine
    assert sorted(engine.services()) == [
        "default/local",
        "default/local#external",  # externalTrafficPolicy Local: this node's endpoints only
        "default/web:http",
        "kube-system/dns:dns",
        "kube-system/dns:dns-tcp",
    ]
    decision = engine.decide("192.0.2.1", 40000, "192.168.77.1", 30080)  # a NodePort
    assert decision.action == "forward"
    assert decision.service == "default/web:http"
    local = engine.decide("192.0.2.1", 40001, "192.168.77.1", 30443)
    assert (local.service, local.backend) == ("default/local#external", ("10.244.1.11", 8443))
    # nodeName node-a is this node (--hostname-override): the status shows it local.
    web = next(s for s in h.agent.snapshot()["services"] if s["name"] == "default/web:http")
    assert [b["local"] for b in web["backends"]] == [True, False]


def test_nodeport_addresses_limit_the_node_addresses(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path, nodeport_addresses=("192.168.77.0/24",))

    h.agent.sync()

    node_ports = {f.ip for f in h.rules.last.frontends if f.port in (30080, 30443, 30053)}
    assert node_ports == {"192.168.77.1"}


def test_node_addresses_are_read_at_every_sync(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    h.interfaces = ["192.168.77.1", "192.168.88.1"]

    h.agent.sync()

    node_ports = {f.ip for f in h.rules.last.frontends if f.port == 30080}
    assert node_ports == {"192.168.77.1", "192.168.88.1"}
    decision = h.agent.engine.decide("192.0.2.1", 40000, "192.168.88.1", 30080)
    assert decision.action == "forward"


def test_a_removed_udp_backend_has_its_kernel_flows_deleted_on_every_udp_frontend(
    tmp_path: Path,
) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    assert h.deleted == []

    source.set(without_endpoint(SERVICES, "10.244.2.53"))
    h.agent.sync()

    # The UDP port's frontends only: ClusterIP, external IP and the NodePort's node
    # addresses. Nothing for the TCP port that lost the same endpoint.
    assert sorted(h.deleted) == [
        ("10.96.0.53", "10.244.2.53", 53),
        ("192.168.77.1", "10.244.2.53", 53),
        ("203.0.113.53", "10.244.2.53", 53),
        ("fd00:77::1", "10.244.2.53", 53),
    ]
    assert h.agent.metrics.stale_udp_flows_deleted == 4


def test_a_removed_tcp_backend_needs_no_conntrack_cleanup(tmp_path: Path) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()

    source.set(without_endpoint(SERVICES, "10.244.2.10"))
    h.agent.sync()

    assert h.deleted == []
    assert ("10.244.2.10", 8080) not in h.rules.last.backends.values()


def test_a_removed_udp_service_has_all_its_flows_deleted(tmp_path: Path) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()

    source.set(SERVICES.split("  - name: dns")[0])
    h.agent.sync()

    assert {(ip, backend) for ip, backend, _ in h.deleted} == {
        (ip, backend)
        for ip in ("10.96.0.53", "203.0.113.53", "192.168.77.1", "fd00:77::1")
        for backend in ("10.244.1.53", "10.244.2.53")
    }


def test_a_udp_backend_that_stops_serving_is_stale_too(tmp_path: Path) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()

    source.set(
        SERVICES.replace("- {ip: 10.244.2.53}", "- {ip: 10.244.2.53, ready: false, serving: false}")
    )
    h.agent.sync()

    assert {backend for _, backend, _ in h.deleted} == {"10.244.2.53"}


def test_stale_udp_flows_are_kept_for_the_next_sync_when_the_rules_fail(tmp_path: Path) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    source.set(without_endpoint(SERVICES, "10.244.2.53"))
    h.rules.fail = RulesError(["nft", "-f", "-"], 1, "Error: boom")

    with pytest.raises(RulesError):
        h.agent.sync()

    assert h.deleted == [], "conntrack is cleaned only after the rules are committed"
    h.rules.fail = None
    h.agent.sync()
    assert {backend for _, backend, _ in h.deleted} == {"10.244.2.53"}


DNS_FRONTENDS = [
    ("10.96.0.53", 53),
    ("192.168.77.1", 30053),
    ("203.0.113.53", 53),
    ("fd00:77::1", 30053),
]


def test_udp_frontends_going_from_no_endpoints_to_some_have_unnated_flows_deleted(
    tmp_path: Path,
) -> None:
    """kube-proxy's newly active UDP services: every UDP frontend of the port (ClusterIP,
    external IP, the NodePort on each node address) once it has a serving endpoint."""
    unready = SERVICES.replace("- {ip: 10.244.1.53}", "- {ip: 10.244.1.53, ready: false}")
    unready = unready.replace("- {ip: 10.244.2.53}", "- {ip: 10.244.2.53, ready: false}")
    h, source = agent_with(unready, tmp_path)
    h.agent.sync()
    assert h.unnated == [], "no serving endpoint: nothing to clear yet"

    source.set(unready.replace("- {ip: 10.244.2.53, ready: false}", "- {ip: 10.244.2.53}"))
    h.agent.sync()
    assert h.unnated == [DNS_FRONTENDS], "the UDP port only, not its TCP twin"

    source.set(SERVICES)  # a second endpoint: already served
    h.agent.sync()
    assert len(h.unnated) == 1
    assert h.deleted == [], "no backend left: nothing NATed is stale"


def test_a_new_udp_service_and_an_agents_first_sync_clear_unnated_flows(
    tmp_path: Path,
) -> None:
    """A datagram sent before its Service was programmed went its routed way, un-NATed;
    kube-proxy clears a service it has not seen before too, at start included."""
    without_dns = SERVICES.split("  - name: dns")[0]
    h, source = agent_with(without_dns, tmp_path)
    h.agent.sync()
    assert h.unnated == []

    source.set(SERVICES)
    h.agent.sync()
    assert h.unnated == [DNS_FRONTENDS]

    restarted, _ = agent_with(SERVICES, tmp_path / "restarted")
    restarted.agent.sync()
    assert restarted.unnated == [DNS_FRONTENDS]


def test_unnated_flows_are_cleared_after_a_sync_that_failed(tmp_path: Path) -> None:
    without_dns = SERVICES.split("  - name: dns")[0]
    h, source = agent_with(without_dns, tmp_path)
    h.agent.sync()
    source.set(SERVICES)
    h.rules.fail = RulesError(["nft", "-f", "-"], 1, "Error: boom")
    with pytest.raises(RulesError):
        h.agent.sync()
    assert h.unnated == [], "only after the rules are committed"

    h.rules.fail = None
    h.agent.sync()
    assert h.unnated == [DNS_FRONTENDS]


def test_a_conntrack_failure_is_counted_and_does_not_fail_the_sync(tmp_path: Path) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    source.set(without_endpoint(SERVICES, "10.244.2.53"))
    h.delete_fails = RulesError(["conntrack", "-D"], 127, "not installed")

    h.agent.sync()

    assert h.agent.metrics.conntrack_cleanup_errors == 4
    assert h.agent.metrics.sync_errors == 0


def test_nothing_is_programmed_before_the_source_is_initialized(tmp_path: Path) -> None:
    h, _ = agent_with(None, tmp_path)

    h.agent.sync()

    assert h.rules.states == []
    assert h.agent.engine.services() == []
    assert h.agent.metrics.last_sync_timestamp == 0.0
    assert h.agent.metrics.sync_duration.count == 0


@pytest.mark.usefixtures("utc")
def test_a_failed_sync_is_reported_and_turns_healthz_unhealthy_after_the_timeout(
    tmp_path: Path,
) -> None:
    h, source = agent_with(SERVICES, tmp_path, sync_period=30.0)
    h.agent.sync()
    synced_at = h.wall.now
    h.wall.now += 5
    source.set(without_endpoint(SERVICES, "10.244.2.10"))
    h.rules.fail = RulesError(["nft"], 1, "Error: no such table")

    with pytest.raises(RulesError):
        h.agent.sync()

    assert h.agent.metrics.sync_errors == 1
    assert h.agent.health.healthz()[0] == 200, "not late yet"
    h.wall.now += 59.9
    assert h.agent.health.healthz()[0] == 200
    h.wall.now += 0.2  # 2 x --sync-period after the failure
    code, body = h.agent.health.healthz()
    assert code == 503
    assert json.loads(body)["lastUpdated"] == go_time(synced_at), "the last successful sync"
    assert h.agent.health.livez()[0] == 503

    h.rules.fail = None
    h.agent.sync()
    assert h.agent.health.healthz()[0] == 200
    assert h.agent.metrics.last_sync_timestamp == h.wall.now


def test_a_change_that_finds_the_resync_due_goes_first_and_the_resync_next(
    tmp_path: Path,
) -> None:
    """The periodic resync walks every service (~0.3 s at 100,000): a change that finds it
    due is synced alone, and the resync is the next sync; under a stream of changes it is
    put off once only. The period counts from the end of the last full pass."""
    h, source = agent_with(SERVICES, tmp_path, sync_period=30.0)
    synced: list[set[str] | None] = []
    real = h.agent.service_sync.sync

    def recorded(catalog: Catalog, keys: Iterable[str] | None, context: Any) -> Any:
        synced.append(None if keys is None else set(keys))
        if len(synced) == 1:
            h.mono.now += 20  # a long first sync
        return real(catalog, keys, context)

    h.agent.service_sync.sync = recorded  # type: ignore[method-assign]
    h.agent.sync()  # the first: every service
    h.mono.now += 29
    source.set(without_endpoint(SERVICES, "10.244.2.10"))
    h.agent.sync()  # within the period: the change alone
    h.mono.now += 2
    source.set(SERVICES)
    h.agent.sync()  # the resync is due: the change first, alone
    h.agent.sync()  # then the resync
    assert synced == [None, {"default/web"}, {"default/web"}, None]

    h.mono.now += 30
    source.set(without_endpoint(SERVICES, "10.244.2.10"))
    h.agent.sync()
    source.set(SERVICES)
    h.agent.sync()  # a second change while it is put off: the resync, with the change
    assert synced[4:] == [{"default/web"}, None]


def test_healthz_waits_for_the_first_sync_but_livez_does_not(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path)
    h.agent.health.queued_update()  # as start() does

    assert h.agent.health.healthz()[0] == 503, "nothing is programmed yet"
    assert h.agent.health.livez()[0] == 200, "starting up is alive"
    h.agent.sync()
    assert h.agent.health.healthz()[0] == 200


def test_a_first_sync_that_keeps_failing_fails_livez_after_the_timeout(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path, sync_period=30.0)
    h.agent.health.queued_update()
    h.rules.fail = RulesError(["nft"], 1, "Error: Operation not permitted")

    with pytest.raises(RulesError):
        h.agent.sync()
    h.wall.now += 60

    assert h.agent.health.livez()[0] == 503
    assert h.agent.health.healthz()[0] == 503


def test_a_contested_frontend_goes_to_the_older_service_and_only_it_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An external IP equal to the node address, on another service's NodePort: the file
    # cannot know (node addresses are the agent's). The older service (a tie in a file:
    # then the smaller name) keeps the node's port; b keeps its ClusterIP.
    text = """\
    services:
      - name: a
        clusterIP: 10.96.0.20
        ports: [{port: 80, nodePort: 30080}]
        endpoints: [{ip: 10.244.1.20}]
      - name: b
        clusterIP: 10.96.0.21
        externalIPs: [192.168.77.1]
        ports: [{port: 30080}]
        endpoints: [{ip: 10.244.1.21}]
    """
    h, _ = agent_with(text, tmp_path, allow_node_address_service_ips=True)

    with caplog.at_level(logging.ERROR, logger="pykp.agent.agent"):
        h.agent.sync()
        h.agent.sync()  # a periodic resync: the same refusal is not reported again

    assert h.agent.engine.services() == ["default/a", "default/b"]
    assert {(f.ip, f.port) for f in h.rules.last.frontends} == {
        ("10.96.0.20", 80),
        ("192.168.77.1", 30080),
        ("fd00:77::1", 30080),
        ("10.96.0.21", 30080),
    }
    decision = h.agent.engine.decide("10.0.0.9", 40000, "192.168.77.1", 30080)
    assert decision.service == "default/a"
    assert "held by default/a" in h.agent._refused["default/b (frontend taken)"]
    assert h.agent.metrics.refused_services == 1
    assert h.agent.metrics.sync_errors == 0
    why = h.agent.snapshot()["refused"]["default/b (frontend taken)"]
    assert "nodePort 30080/TCP (held by default/a, the older service)" in why
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [
        f"service default/b (frontend taken) refused (skipped): {why}"
    ]


def test_a_node_address_never_becomes_a_service_ip(tmp_path: Path) -> None:
    text = """\
    services:
      - name: b
        clusterIP: 10.96.0.21
        externalIPs: [192.168.77.1]
        ports: [{port: 8080}]
        endpoints: [{ip: 10.244.1.21}]
    """
    h, _ = agent_with(text, tmp_path, allow_node_address_service_ips=True)

    h.agent.sync()

    assert ("192.168.77.1", 8080, "TCP") in {
        (f.ip, f.port, f.protocol) for f in h.rules.last.frontends
    }
    assert h.rules.last.service_ips == {"10.96.0.21"}, "the node's own ports stay reachable"


@pytest.mark.parametrize("field", ["clusterIP", "externalIPs", "loadBalancerIPs"])
def test_a_service_ip_that_is_a_node_address_is_not_served_by_default(
    tmp_path: Path, field: str
) -> None:
    address = "192.168.77.1" if field == "clusterIP" else "[192.168.77.1]"
    cluster_ip = "" if field == "clusterIP" else "\n        clusterIP: 10.96.0.22"
    text = f"""\
    services:
      - name: ok
        clusterIP: 10.96.0.21
        ports: [{{port: 80}}]
        endpoints: [{{ip: 10.244.1.21}}]
      - name: capture{cluster_ip}
        {field}: {address}
        ports: [{{port: 22}}]
        endpoints: [{{ip: 10.244.1.22}}]
    """
    h, _ = agent_with(text, tmp_path)

    h.agent.sync()

    # Only the node's address goes: the service keeps its other ClusterIP.
    kept = set() if field == "clusterIP" else {"10.96.0.22"}
    assert {f.ip for f in h.rules.last.frontends} == {"10.96.0.21"} | kept
    why = h.agent.snapshot()["refused"]["default/capture (node address)"]
    assert "192.168.77.1 not served: an address of this node" in why and "CVE-2020-8554" in why
    assert h.agent.metrics.refused_services == 1
    assert h.agent.metrics.sync_errors == 0


def test_two_services_swapping_addresses_both_apply_in_one_sync(tmp_path: Path) -> None:
    text = """\
    services:
      - name: a
        clusterIP: {a}
        ports: [{{port: 80}}]
        endpoints: [{{ip: 10.244.1.1}}]
      - name: b
        clusterIP: {b}
        ports: [{{port: 80}}]
        endpoints: [{{ip: 10.244.1.2}}]
    """
    h, source = agent_with(text.format(a="10.96.0.30", b="10.96.0.31"), tmp_path)
    h.agent.sync()

    source.set(text.format(a="10.96.0.31", b="10.96.0.30"))
    h.agent.sync()

    assert h.agent.snapshot()["refused"] == {}
    assert h.agent.engine.decide("192.0.2.1", 1, "10.96.0.31", 80).service == "default/a"
    assert h.agent.engine.decide("192.0.2.1", 1, "10.96.0.30", 80).service == "default/b"


def test_a_periodic_resync_leaves_unchanged_services_alone(tmp_path: Path) -> None:
    """Re-upserting would restart round-robin (and rebuild Maglev tables) every 30 s."""
    h, _ = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    engine = h.agent.engine

    first = engine.decide("192.0.2.1", 1, "10.96.0.10", 80).backend
    h.agent.sync()
    second = engine.decide("192.0.2.2", 1, "10.96.0.10", 80).backend

    assert {first, second} == {("10.244.1.10", 8080), ("10.244.2.10", 8080)}
    assert len(h.rules.states) == 2, "the rules are still re-committed (repair)"


def test_service_and_endpoint_changes_are_counted_like_kube_proxy(tmp_path: Path) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    assert (h.agent.metrics.service_changes, h.agent.metrics.endpoint_changes) == (3, 3)

    h.agent.sync()  # nothing changed
    assert (h.agent.metrics.service_changes, h.agent.metrics.endpoint_changes) == (3, 3)

    source.set(without_endpoint(SERVICES, "10.244.2.53"))
    h.agent.sync()
    assert (h.agent.metrics.service_changes, h.agent.metrics.endpoint_changes) == (3, 4)

    source.set(SERVICES.replace("policy: round-robin", "policy: maglev"))
    h.agent.sync()
    assert (h.agent.metrics.service_changes, h.agent.metrics.endpoint_changes) == (4, 5)


def test_network_programming_latency_runs_from_the_change_to_the_end_of_the_sync(
    tmp_path: Path,
) -> None:
    h, source = agent_with(SERVICES, tmp_path)
    start = h.wall.now
    # A change from before the agent started is not counted (kube-proxy's rule).
    source.set(SERVICES, changed_at=start - 100)
    h.agent.sync()
    assert h.agent.metrics.network_programming.count == 0

    source.set(without_endpoint(SERVICES, "10.244.2.10"), changed_at=start + 5)
    h.wall.now = start + 7.5
    h.mono.now += 0.25
    h.agent.sync()
    h.agent.sync()  # the same change again: observed once

    histogram = h.agent.metrics.network_programming.family("x", "x")
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.samples}
    assert samples["x_count", None] == 1
    assert samples["x_sum", None] == pytest.approx(2.5)
    assert samples["x_bucket", "2.0"] == 0 and samples["x_bucket", "3.0"] == 1


def test_each_sync_records_its_duration_and_time(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path)
    started = h.mono.now

    load = h.rules.load_elements

    def slow_load(wanted: Any) -> int:
        h.mono.now = started + 0.04
        return load(wanted)

    h.rules.load_elements = slow_load  # type: ignore[method-assign]
    h.agent.sync()

    family = h.agent.metrics.sync_duration.family("d", "d")
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert values["d_sum", None] == pytest.approx(0.04)
    assert values["d_bucket", "0.032"] == 0 and values["d_bucket", "0.064"] == 1
    assert h.agent.metrics.last_sync_timestamp == h.wall.now


def test_each_sync_writes_the_status_file(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path)
    h.agent.sync()
    h.agent.engine.decide("10.244.9.9", 5353, "10.96.0.53", 53, "UDP")
    h.agent.sync()

    snapshot = read_status_file(tmp_path / "state" / STATUS_FILE)
    assert snapshot["node"] == {"name": "node-a", "addresses": NODE_ADDRESSES}
    assert snapshot["healthy"] is True
    assert snapshot["lastSync"] == h.wall.now
    names = [service["name"] for service in snapshot["services"]]
    assert names == [
        "default/local",
        "default/local#external",
        "default/web:http",
        "kube-system/dns:dns",
        "kube-system/dns:dns-tcp",
    ]
    dns = snapshot["services"][3]
    assert dns["frontends"][:2] == ["10.96.0.53:53/UDP", "203.0.113.53:53/UDP"]
    assert "[fd00:77::1]:30053/UDP" in dns["frontends"]
    assert snapshot["counters"]["decisions_forward"] == 1
    [flow] = snapshot["flows"]
    assert flow["client"] == "10.244.9.9:5353"
    assert flow["service"] == "kube-system/dns:dns"
    assert snapshot["datapath"]["packets"] == 7


def test_an_unwritable_state_dir_does_not_fail_the_sync(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    h, _ = agent_with(SERVICES, tmp_path, state_dir=blocker / "state")

    h.agent.sync()

    assert h.agent.metrics.sync_errors == 0
    assert len(h.rules.states) == 1


# --- the agent's lifecycle ----------------------------------------------------------------


def http_get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Harness, Path]]:
    """A started agent on a real services file, with servers on free loopback ports."""
    path = tmp_path / "services.yaml"
    path.write_text(SERVICES)
    harness = Harness(
        FileSource(path, poll_interval=0.02),
        tmp_path,
        config={
            "healthz_bind_address": "127.0.0.1:0",
            "metrics_bind_address": "127.0.0.1:0",
            "min_sync_period": 0.0,
        },
    )
    harness.agent.start()
    try:
        yield harness, path
    finally:
        harness.agent.stop()


def addresses(h: Harness) -> tuple[str, str]:
    servers = {server.name: server.bound_address for server in h.agent._servers}
    return ":".join(map(str, servers["healthz"])), ":".join(map(str, servers["metrics"]))


def test_a_started_agent_syncs_serves_and_follows_the_file(
    running: tuple[Harness, Path],
) -> None:
    h, path = running
    healthz, metrics = addresses(h)
    assert h.rules.synced.wait(5), "no first sync"
    assert wait_for(lambda: h.datapath.running), "the reader never bound"
    # The reader binds after the first sync: until then --queue-bypass lets the kernel path
    # serve from the maps a previous agent left, instead of an empty engine refusing.
    assert h.events.log[:2] == ["rules.install", "datapath.start"]

    code, body, headers = http_get(f"http://{healthz}/healthz")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["nodeEligible"] is True
    assert http_get(f"http://{healthz}/livez")[0] == 200
    assert http_get(f"http://{healthz}/nope")[0] == 404

    code, text, _ = http_get(f"http://{metrics}/metrics")
    assert code == 200 and "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in text
    assert json.loads(http_get(f"http://{metrics}/status")[1])["node"]["name"] == "node-a"

    synced = len(h.rules.states)
    path.write_text(without_endpoint(SERVICES, "10.244.2.53"))
    assert wait_for(lambda: len(h.rules.states) > synced), "the change was not synced"
    assert wait_for(lambda: len(h.deleted) == 4)


def test_a_started_agent_sets_the_conntrack_sysctls_once_and_reports_them(
    running: tuple[Harness, Path],
) -> None:
    h, _ = running
    assert h.rules.synced.wait(5)

    assert h.sysctls == [ConntrackSettings()], "kube-proxy's defaults, once, at start"
    assert h.agent.snapshot()["conntrackSysctls"] == [
        {
            "name": "nf_conntrack_tcp_timeout_close_wait",
            "wanted": 3600,
            "found": 60,
            "outcome": "set",
            "error": None,
        }
    ]


def test_proxy_mode_is_answered_on_the_metrics_address_like_kube_proxy(
    running: tuple[Harness, Path],
) -> None:
    """kube-proxy answers GET /proxyMode on its metrics address with its mode's name
    ("iptables"); pykp with its own, the one `pykp status` shows."""
    h, _ = running
    healthz, metrics = addresses(h)

    code, body, headers = http_get(f"http://{metrics}/proxyMode")
    assert (code, body) == (200, "nfqueue")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert json.loads(http_get(f"http://{metrics}/status")[1])["proxyMode"] == "nfqueue"
    assert http_get(f"http://{healthz}/proxyMode")[0] == 404, "the metrics address only"


def test_stop_with_cleanup_removes_the_rules_before_the_datapath_and_closes_everything(
    running: tuple[Harness, Path],
) -> None:
    h, _ = running
    healthz, _ = addresses(h)
    assert h.rules.synced.wait(5)
    threads = list(h.agent._threads)

    h.agent.stop(cleanup=True)

    assert h.events.log[-2:] == ["rules.cleanup", "datapath.stop"]
    assert not h.rules.present
    assert not any(thread.is_alive() for thread in threads)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{healthz}/healthz", timeout=1)
    h.agent.stop()  # idempotent
    assert h.events.log.count("rules.cleanup") == 1


def test_without_cleanup_on_exit_the_rules_stay(tmp_path: Path) -> None:
    h = Harness(StaticSource(SERVICES), tmp_path, config={"cleanup_on_exit": False})
    h.agent.start()
    assert h.rules.synced.wait(5)

    h.agent.stop()

    assert h.events.log == ["rules.install", "datapath.start", "datapath.stop"]
    assert h.rules.present


def test_a_reader_that_cannot_bind_leaves_the_node_on_the_kernel_path(tmp_path: Path) -> None:
    h = Harness(
        StaticSource(SERVICES),
        tmp_path,
        config={"healthz_bind_address": "127.0.0.1:0", "min_sync_period": 0.0},
        datapath_fail=OSError(1, "Operation not permitted"),
    )

    h.agent.start()
    try:
        assert wait_for(lambda: h.agent.metrics.sync_errors >= 1)
        # The rules and their kernel-path slots were synced before the reader was tried,
        # so every service is served; the failure is a failing sync (retried, counted).
        assert h.rules.states and h.rules.last.fallback
        assert h.events.log[:2] == ["rules.install", "datapath.start"]
    finally:
        h.agent.stop()


def test_a_failed_rules_install_still_cleans_up_a_partial_install(tmp_path: Path) -> None:
    h = Harness(StaticSource(SERVICES), tmp_path, config={"cleanup_on_exit": False})

    def broken_install() -> None:
        h.events.log.append("rules.install")
        raise RulesError(["nft", "-f", "-"], 1, "Error: half done")

    h.rules.install = broken_install  # type: ignore[method-assign]

    with pytest.raises(RulesError):
        h.agent.start()

    assert h.events.log == ["rules.install", "rules.cleanup"]


def test_the_housekeeping_thread_expires_flows(tmp_path: Path) -> None:
    h, _ = agent_with(SERVICES, tmp_path)
    calls = threading.Event()

    class Engine:
        def __init__(self, real: Any) -> None:
            self.real = real

        def expire(self) -> int:
            calls.set()
            return 0

    h.agent.engine = Engine(h.agent.engine)  # type: ignore[assignment]
    thread = threading.Thread(target=h.agent._housekeeping, daemon=True)
    thread.start()
    try:
        assert calls.wait(3), "engine.expire() was not called within ~1 s"
    finally:
        h.agent._stop.set()
        thread.join(3)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"cluster_cidrs": ("10.244.0.0/33",)}, "--cluster-cidr"),
        ({"nodeport_addresses": ("nope",)}, "--nodeport-addresses"),
        ({"healthz_bind_address": "localhost:10256"}, "--healthz-bind-address"),
        ({"metrics_bind_address": "127.0.0.1:70000"}, "--metrics-bind-address"),
        ({"default_policy": "fastest"}, "--default-policy"),
        ({"min_sync_period": -1.0}, "--min-sync-period"),
        ({"sync_period": 0.0}, "--sync-period"),
        ({"min_sync_period": 40.0}, "--min-sync-period"),
        ({"queue_num": 70000}, "--queue-num"),
        ({"queues": 0}, "--queues"),
        ({"queue_num": 65535, "queues": 2}, "--queues"),
        ({"mark_mask": 0x0000C000}, "--mark-mask"),
        ({"mark_mask": 0x0F0F0000}, "--mark-mask"),
        ({"mark_mask": 0x00002000}, "--mark-mask"),
        ({"conntrack_capacity": 0}, "--conntrack-capacity"),
        ({"maglev_table_size": 65536}, "--maglev-table-size"),
        ({"maglev_seed": -1}, "--maglev-seed"),
    ],
)
def test_invalid_settings_name_their_flag(settings: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentConfig(**settings).validate()
    assert caught.value.flag == flag


def test_the_defaults_are_valid_and_kube_proxys() -> None:
    config = AgentConfig()
    config.validate()

    assert (config.min_sync_period, config.sync_period, config.health_timeout) == (1, 30, 60)
    assert config.healthz_bind_address == "0.0.0.0:10256"
    assert config.metrics_bind_address == "127.0.0.1:10249"
    assert (config.first_queue, config.last_queue) == (0, 0)
    assert AgentConfig(queue_num=4, queues=3).last_queue == 6


def test_without_a_services_file_the_source_is_the_kubernetes_api(tmp_path: Path) -> None:
    from pykp.agent.agent import make_source
    from pykp.sources.kube.source import KubeSource

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    source = make_source(AgentConfig(kubeconfig=str(kubeconfig), hostname_override="node-a"))
    assert isinstance(source, KubeSource)
    assert source.current() is None, "nothing is programmed before the first lists"


def test_a_services_file_and_the_kubernetes_api_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--services"):
        AgentConfig(services=tmp_path / "s.yaml", kubeconfig="k").validate()


@pytest.mark.parametrize(
    ("cidrs", "expected"),
    [
        ((), NODE_ADDRESSES),
        (("192.168.0.0/16",), ["192.168.77.1"]),
        (("fd00::/8", "127.0.0.0/8"), ["127.0.0.1", "fd00:77::1"]),
        (("10.0.0.0/8",), []),
    ],
)
def test_node_addresses_are_filtered_by_cidr_or_default_to_non_loopback(
    cidrs: tuple[str, ...], expected: list[str]
) -> None:
    assert filter_node_addresses([*INTERFACES, "192.168.77.1"], cidrs) == expected


# --- pure pieces --------------------------------------------------------------------------


def engine_service(
    name: str, frontends: list[tuple[str, int, str]], *backends: str
) -> EngineService:
    return EngineService(
        name=name,
        frontends=tuple(frontends),
        backends=tuple(EngineBackend(ip, 53) for ip in backends),
    )


def test_stale_udp_flows_include_frontends_that_went_away() -> None:
    old = {
        "s": engine_service("s", [("10.96.0.1", 53, "UDP"), ("10.96.0.2", 53, "UDP")], "10.0.0.1")
    }
    new = {"s": engine_service("s", [("10.96.0.1", 53, "UDP")], "10.0.0.1")}

    assert stale_udp_flows(old, new) == [("10.96.0.2", "10.0.0.1", 53)]
    assert stale_udp_flows(old, old) == []


def test_stale_udp_flows_ignore_backends_that_were_not_serving() -> None:
    before = EngineService(
        "s",
        (("10.96.0.1", 53, "UDP"),),
        (EngineBackend("10.0.0.1", 53, ready=False, serving=False),),
    )

    assert stale_udp_flows({"s": before}, {}) == []


def test_newly_served_udp_frontends_are_those_that_had_no_serving_backend() -> None:
    frontends = [("10.96.0.1", 53, "UDP"), ("10.96.0.1", 53, "TCP"), ("192.168.0.5", 30053, "UDP")]
    unready = EngineService(
        "s", tuple(frontends), (EngineBackend("10.0.0.1", 53, ready=False, serving=False),)
    )
    served = engine_service("s", frontends, "10.0.0.1")
    udp = [("10.96.0.1", 53), ("192.168.0.5", 30053)]

    assert newly_served_udp_frontends({}, {"s": served}) == udp, "a new service"
    assert newly_served_udp_frontends({"s": unready}, {"s": served}) == udp
    assert newly_served_udp_frontends({}, {"s": unready}) == [], "still none serving"
    assert newly_served_udp_frontends({"s": served}, {"s": served}) == []
    more = engine_service("s", frontends, "10.0.0.1", "10.0.0.2")
    assert newly_served_udp_frontends({"s": served}, {"s": more}) == []
    # A frontend new to a served service (an LB IP assigned late) was not served either.
    late = engine_service("s", [*frontends, ("198.51.100.7", 53, "UDP")], "10.0.0.1")
    assert newly_served_udp_frontends({"s": served}, {"s": late}) == [("198.51.100.7", 53)]
    # Serving but terminating counts as serving, as kube-proxy's IsServing.
    terminating = EngineService(
        "s",
        tuple(frontends),
        (EngineBackend("10.0.0.1", 53, ready=False, serving=True, terminating=True),),
    )
    assert newly_served_udp_frontends({"s": unready}, {"s": terminating}) == udp


# --- the file source ----------------------------------------------------------------------


class Notified:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


def rewrite(path: Path, text: str) -> None:
    """Write and move the mtime on, so a change is seen however coarse the clock."""
    path.write_text(textwrap.dedent(text))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def services_path(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(SERVICES)
    return path


def test_the_file_source_loads_at_start_and_notifies(services_path: Path) -> None:
    source = FileSource(services_path, poll_interval=60, watch=False)
    notified = Notified()
    assert source.current() is None

    source.start(notified)
    try:
        assert notified.count == 1
        current = source.current()
        assert current is not None
        assert [s.key for s in current.services] == [
            "default/web",
            "default/local",
            "kube-system/dns",
        ]
        status = source.status()
        assert status.initialized and status.loads == 1 and status.load_errors == 0
        assert status.changed_at == services_path.stat().st_mtime
    finally:
        source.stop()


def test_the_file_source_sees_changes_and_ignores_rewrites_of_the_same_content(
    services_path: Path,
) -> None:
    source = FileSource(services_path, poll_interval=60, watch=False)
    notified = Notified()
    source.start(notified)
    try:
        assert source.check() is False, "nothing changed on disk"

        rewrite(services_path, without_endpoint(SERVICES, "10.244.2.10"))
        assert source.check() is True
        assert notified.count == 2
        current = source.current()
        assert current is not None and current.endpoint_count == 4

        rewrite(services_path, without_endpoint(SERVICES, "10.244.2.10"))  # touched only
        assert source.check() is False
        assert notified.count == 2
        assert source.status().loads == 3
    finally:
        source.stop()


def test_the_file_source_sees_an_atomic_replace(services_path: Path, tmp_path: Path) -> None:
    source = FileSource(services_path, poll_interval=60, watch=False)
    source.start(Notified())
    try:
        other = tmp_path / "new.yaml"
        other.write_text(SERVICES.replace("10.96.0.11", "10.96.0.12"))
        os.utime(other, ns=(0, services_path.stat().st_mtime_ns))  # same mtime, new inode
        other.replace(services_path)

        assert source.check() is True
        current = source.current()
        assert current is not None and current.services[1].cluster_ips == ("10.96.0.12",)
    finally:
        source.stop()


def test_the_file_source_polls_in_its_thread(services_path: Path) -> None:
    source = FileSource(services_path, poll_interval=0.01)
    notified = Notified()
    source.start(notified)
    try:
        notified.event.clear()
        rewrite(services_path, without_endpoint(SERVICES, "10.244.2.10"))
        assert notified.event.wait(5), "the poll thread did not notice the change"
    finally:
        source.stop()


def _watched(path: Path) -> tuple[FileSource, Notified]:
    """A started source that only inotify can wake (its poll is an hour away)."""
    source = FileSource(path, poll_interval=3600)
    notified = Notified()
    source.start(notified)
    if not source.watching:
        source.stop()
        pytest.skip("no inotify here")
    notified.event.clear()
    return source, notified


def test_inotify_wakes_the_file_source_on_an_in_place_write(services_path: Path) -> None:
    source, notified = _watched(services_path)
    try:
        started = time.monotonic()
        services_path.write_text(without_endpoint(SERVICES, "10.244.2.10"))
        assert notified.event.wait(5), "inotify did not wake the watcher"
        assert time.monotonic() - started < 1
        current = source.current()
        assert current is not None and current.endpoint_count == 4
    finally:
        source.stop()


def test_inotify_wakes_the_file_source_on_an_atomic_replace(
    services_path: Path, tmp_path: Path
) -> None:
    source, notified = _watched(services_path)
    try:
        other = tmp_path / ".services.yaml.tmp"
        other.write_text(SERVICES.replace("10.96.0.11", "10.96.0.12"))
        other.replace(services_path)
        assert notified.event.wait(5), "inotify did not wake the watcher"
        current = source.current()
        assert current is not None and current.services[1].cluster_ips == ("10.96.0.12",)
    finally:
        source.stop()


def test_inotify_follows_a_configmap_swap(tmp_path: Path) -> None:
    """kubelet's layout: services.yaml -> ..data/services.yaml, ..data -> a timestamped
    directory; an update writes a new directory and renames a new ..data symlink over."""
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "services.yaml").write_text(SERVICES)
    (mount / "..data").symlink_to("..v1")
    (mount / "services.yaml").symlink_to("..data/services.yaml")
    source, notified = _watched(mount / "services.yaml")
    try:
        (mount / "..v2").mkdir()
        (mount / "..v2" / "services.yaml").write_text(without_endpoint(SERVICES, "10.244.2.10"))
        (mount / "..data_tmp").symlink_to("..v2")
        (mount / "..data_tmp").replace(mount / "..data")
        assert notified.event.wait(5), "inotify did not see the swap"
        current = source.current()
        assert current is not None and current.endpoint_count == 4
    finally:
        source.stop()


def test_without_inotify_the_file_source_polls(
    services_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pykp.sources import file as file_module

    monkeypatch.setattr(file_module._DirectoryWatch, "open", classmethod(lambda *_: None))
    source = FileSource(services_path, poll_interval=0.01)
    notified = Notified()
    source.start(notified)
    try:
        assert not source.watching
        notified.event.clear()
        rewrite(services_path, without_endpoint(SERVICES, "10.244.2.10"))
        assert notified.event.wait(5), "the poll did not notice the change"
    finally:
        source.stop()


def test_stopping_a_watching_source_is_prompt(services_path: Path) -> None:
    source, _ = _watched(services_path)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1


def test_invalid_entries_are_skipped_logged_with_their_location_and_kept(
    services_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rewrite(
        services_path,
        """\
        services:
          - name: good
            clusterIP: 10.96.0.10
            ports: [{port: 80}]
          - name: bad
            clusterIP: 10.96.0.11
            ports: [{port: 70000}]
        """,
    )
    source = FileSource(services_path, poll_interval=60, watch=False)

    with caplog.at_level(logging.WARNING, logger="pykp.sources.file"):
        source.start(Notified())
    source.stop()

    current = source.current()
    assert current is not None and [s.name for s in current.services] == ["good"]
    [problem] = source.problems()
    assert (problem.line, problem.column, problem.path) == (7, 20, "services[1].ports[0].port")
    assert f"{services_path}:7:20: services[1].ports[0].port" in caplog.text
    assert source.status().invalid_objects == 1


def test_a_broken_file_keeps_the_last_good_state(
    services_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = FileSource(services_path, poll_interval=60, watch=False)
    notified = Notified()
    source.start(notified)
    good = source.current()
    try:
        with caplog.at_level(logging.ERROR, logger="pykp.sources.file"):
            rewrite(services_path, "services:\n  - name: web\n   ports: [\n")
            assert source.check() is False
            assert source.check() is False  # the same error: counted and logged once

        assert source.current() is good
        assert notified.count == 1
        status = source.status()
        assert status.load_errors == 1
        assert status.last_error is not None and f"{services_path}:3:4" in status.last_error
        # Errors only: the first load's INFO line is there too when an earlier test (the
        # CLI's) set pykp's loggers to INFO.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            f"cannot load services (keeping the last good state): {status.last_error}"
        ]

        services_path.unlink()
        assert source.check() is False
        assert source.current() is good
        assert source.status().load_errors == 2

        rewrite(services_path, SERVICES)  # fixed: the same services as the last good state
        assert source.check() is False, "nothing to sync"
        assert source.status().last_error is None
        assert source.status().loads == 2
    finally:
        source.stop()


def test_an_invalid_edit_of_one_service_keeps_its_last_good_version(
    services_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    two = """\
        services:
          - name: web
            clusterIP: 10.96.0.10
            ports: [{port: 80, targetPort: 8080}]
            endpoints: [{ip: 10.244.1.10}, {ip: 10.244.2.10}]
          - name: api
            clusterIP: 10.96.0.20
            ports: [{port: 443}]
            endpoints: [{ip: 10.244.1.20}]
        """
    rewrite(services_path, two)
    source = FileSource(services_path, poll_interval=60, watch=False)
    source.start(Notified())
    try:
        good = source.current()
        assert good is not None
        web = next(s for s in good.services if s.name == "web")

        # web's port broken, web's endpoint broken, api changed: api's change lands, web
        # keeps serving as it was (not removed, not shrunk to its valid endpoints).
        for broken in (
            two.replace("{port: 80, targetPort: 8080}", "{port: 80000}"),
            two.replace("{ip: 10.244.2.10}", "{ip: 10.244.2.999}"),
        ):
            rewrite(services_path, broken.replace("10.244.1.20", "10.244.3.20"))
            with caplog.at_level(logging.ERROR, logger="pykp.sources.file"):
                assert source.check() is True
            current = source.current()
            assert current is not None
            by_name = {s.name: s for s in current.services}
            assert by_name["web"] == web
            assert [e.ip for e in by_name["api"].endpoints] == ["10.244.3.20"]
            assert len(source.problems()) == 1
            assert "service default/web: invalid edit, keeping its last good version" in caplog.text

        rewrite(services_path, two.replace("10.244.2.10", "10.244.4.10"))  # a valid edit lands
        assert source.check() is True
        current = source.current()
        assert current is not None
        assert [e.ip for e in current.services[0].endpoints] == ["10.244.1.10", "10.244.4.10"]
        assert source.problems() == []
    finally:
        source.stop()


def test_a_file_missing_at_start_loads_when_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later.yaml"
    source = FileSource(path, poll_interval=60, watch=False)
    notified = Notified()
    source.start(notified)
    try:
        assert source.current() is None and notified.count == 0
        assert source.status().load_errors == 1

        path.write_text(SERVICES)
        assert source.check() is True
        assert notified.count == 1 and source.status().initialized
    finally:
        source.stop()


def test_the_cached_file_source_serves_what_a_full_parse_does(services_path: Path) -> None:
    """Edits (valid, one service broken, one skipped whole, fixed): the source with its
    entry cache serves what one that parses the whole file each time serves, in the same
    order, and its catalog's services by key are its services."""

    class _NoCache(ServicesFileCache):
        def load(self, text: str, source: str) -> None:
            return None

    entry = "  - {{name: s{i}, clusterIP: 10.96.0.{i}, ports: [{{port: 80}}], endpoints: {eps}}}\n"
    good = [entry.format(i=i, eps=f"[{{ip: 10.244.0.{i}}}]") for i in range(1, 7)]
    versions = [
        good,
        [*good[:2], entry.format(i=3, eps="[{ip: bad}]"), *good[3:]],  # one endpoint broken
        [*good[:3], good[3].replace("port: 80", "port: 0"), *good[4:]],  # s4 skipped whole
        [*good[:3], good[3].replace("port: 80", "port: 0"), *good[5:], good[4]],  # moved
        [*good[:1], *good[2:]],  # s2 removed
        good,
    ]
    cached = FileSource(services_path, poll_interval=60, watch=False)
    full = FileSource(services_path, poll_interval=60, watch=False)
    full._cache = _NoCache()
    for version in versions:
        rewrite(services_path, "services:\n" + "".join(version))
        before = cached.current()
        assert cached.check() == full.check()
        ours, theirs = cached.current(), full.current()
        assert ours is not None and theirs is not None
        assert ours == theirs and cached.problems() == full.problems()
        assert ours.by_key is not None and list(ours.by_key.items()) == [
            (spec.key, spec) for spec in ours.services
        ]
        if before is not None:  # unchanged services stay the same objects
            for spec in ours.services:
                previous = before.get(spec.key)
                assert previous is None or previous != spec or previous is spec


# --- healthz ------------------------------------------------------------------------------

# kube-proxy's exact bytes, odd spacing included.
HEALTHZ_BODY = (
    r'\{"lastUpdated": "(?P<last>[^"]*)","currentTime": "(?P<now>[^"]*)", '
    r'"nodeEligible": (?P<eligible>true|false)\}'
)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("utc")
def test_times_are_printed_the_way_go_prints_them() -> None:
    assert go_time(0) == "1970-01-01 00:00:00 +0000 UTC"
    assert go_time(1_700_000_000.25) == "2023-11-14 22:13:20.25 +0000 UTC"
    assert go_time(None) == GO_ZERO_TIME == "0001-01-01 00:00:00 +0000 UTC"


@pytest.mark.usefixtures("utc")
def test_healthz_follows_kube_proxys_rules() -> None:
    import re

    clock = FakeClock(1_700_000_000.0)
    health = ProxierHealth(60.0, clock=clock, initial_sync_required=False)

    code, body = health.healthz()  # starting up: healthy, nothing pending
    assert code == 200
    match = re.fullmatch(HEALTHZ_BODY, body)
    assert match is not None, body
    assert match["last"] == match["now"] == "2023-11-14 22:13:20 +0000 UTC"

    health.updated()
    clock.now += 10
    health.queued_update()
    clock.now += 30
    health.queued_update()  # the oldest pending update counts
    clock.now += 29.9
    assert health.healthz()[0] == 200
    clock.now += 0.1
    code, body = health.healthz()
    assert code == 503
    match = re.fullmatch(HEALTHZ_BODY, body)
    assert match is not None
    assert match["last"] == "2023-11-14 22:13:20 +0000 UTC", "the last successful update"
    assert match["now"] == "2023-11-14 22:14:30 +0000 UTC"
    assert health.livez()[0] == 503

    health.set_node_eligible(False)
    health.updated()
    code, body = health.healthz()
    assert code == 503 and body.endswith('"nodeEligible": false}')
    assert health.livez()[0] == 200, "livez ignores the node's eligibility"
    assert health.response_counts()["/healthz", 503] == 2


def test_backends_past_the_marks_range_are_refused_per_service_and_syncs_go_on(
    tmp_path: Path,
) -> None:
    def service(name: str, vip: str, first: int, count: int) -> str:
        endpoints = ", ".join(f"{{ip: 10.244.9.{first + i}}}" for i in range(count))
        return (
            f"  - name: {name}\n    clusterIP: {vip}\n    ports: [{{port: 80}}]\n"
            f"    endpoints: [{endpoints}]\n"
        )

    # A 3-bit backend field: ids 1..6 (7 is the reject mark).
    text = "services:\n" + service("a", "10.96.0.1", 1, 4) + service("b", "10.96.0.2", 11, 4)
    h, source = agent_with(text + service("c", "10.96.0.3", 21, 2), tmp_path, mark_mask=0x00070000)
    layout = MarkLayout(backend_mask=0x00070000)

    h.agent.sync()

    state = h.rules.last
    assert max(state.backends) <= layout.max_backend_id == 6
    assert {f.ip for f in state.frontends} == {"10.96.0.1", "10.96.0.3"}
    assert "the packet mark carries ids up to 6" in h.agent._refused["default/b"]
    assert h.agent.metrics.refused_services == 1
    rules_elements(state, layout)  # renders: no id outside the mark

    # Removing a frees its ids once that removal is committed: the next sync (which the
    # agent asks for at once) retries b, and it fits.
    source.set("services:\n" + service("b", "10.96.0.2", 11, 4) + service("c", "10.96.0.3", 21, 2))
    h.agent.sync()
    assert {f.ip for f in h.rules.last.frontends} == {"10.96.0.3"}
    h.agent.sync()

    assert {f.ip for f in h.rules.last.frontends} == {"10.96.0.2", "10.96.0.3"}
    assert max(h.rules.last.backends) <= 6
    assert h.agent._refused == {}


def test_the_kernel_path_holds_each_frontends_eligible_backends_and_serves_random_itself(
    tmp_path: Path,
) -> None:
    text = """\
    services:
      - name: rand
        clusterIPs: [10.96.0.40, "fd00:96::40"]
        ports: [{port: 80, targetPort: 8080}]
        endpoints:
          - {ip: 10.244.1.40, weight: 2}
          - {ip: 10.244.2.40, weight: 4}
          - {ip: 10.244.3.40, ready: false, serving: true, terminating: true}
          - {ip: "fd00:244::40"}
      - name: sticky
        clusterIP: 10.96.0.41
        sessionAffinity: ClientIP
        ports: [{port: 80}]
        endpoints: [{ip: 10.244.1.41, ready: false, serving: true, terminating: true}]
      - name: rr
        clusterIP: 10.96.0.42
        policy: round-robin
        ports: [{port: 80}]
        endpoints: [{ip: 10.244.1.42, ready: false, serving: false}]
    """
    h, _ = agent_with(text, tmp_path)

    h.agent.sync()

    state = h.rules.last
    queued = {f.ip: f.queued for f in state.frontends}
    assert queued == {
        "10.96.0.40": False,  # random: the kernel decides
        "fd00:96::40": False,
        "10.96.0.41": True,  # session affinity needs pykp's table
        "10.96.0.42": False,  # round-robin: the kernel rotates (one counter per service)
    }
    # Ready backends only while there are some, by weight (2:4 is 1:2); per family.
    assert sorted(state.fallback[("10.96.0.40", 80, "TCP")]) == [
        ("10.244.1.40", 8080), ("10.244.2.40", 8080), ("10.244.2.40", 8080),
    ]  # fmt: skip
    assert state.fallback[("fd00:96::40", 80, "TCP")] == (("fd00:244::40", 8080),)
    # Only terminating ones: kube-proxy's fallback to serving+terminating; none serving: none.
    assert state.fallback[("10.96.0.41", 80, "TCP")] == (("10.244.1.41", 80),)
    assert state.fallback.get(("10.96.0.42", 80, "TCP"), ()) == ()


def test_status_says_what_healthz_answers_and_why() -> None:
    clock = FakeClock(1_700_000_000.0)
    health = ProxierHealth(60.0, clock=clock)  # the agent's: the first sync is required

    answers = []
    for step in ("starting", "synced", "stuck", "leaving"):
        if step == "synced":
            health.updated()
        elif step == "stuck":
            health.queued_update()
            clock.now += 61
        elif step == "leaving":
            health.updated()
            health.set_node_eligible(False)
        answers.append((health.healthz()[0], health.is_healthy(), health.unhealthy_reason()))

    assert answers == [
        (503, False, "waiting for the first successful sync"),
        (200, True, None),
        (503, False, "an update has waited more than 60 s to be programmed"),
        (503, False, "the node is marked for deletion"),
    ]


def test_the_status_snapshot_lists_the_first_services_by_name_and_counts_all(
    tmp_path: Path,
) -> None:
    h, _ = agent_with(SERVICES, tmp_path, status_services=2)
    h.agent.sync()

    snapshot = h.agent.snapshot()

    assert [s["name"] for s in snapshot["services"]] == [
        "default/local",
        "default/local#external",
    ]
    assert snapshot["servicesTotal"] == 5


def test_a_local_services_health_check_node_port_is_served_and_closed_with_the_agent(
    tmp_path: Path,
) -> None:
    """Listening on the --nodeport-addresses (loopback here, in the test's namespace): the
    count is node-a's ready endpoints, it follows the file, and stop() closes the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    text = SERVICES.replace(
        "    externalTrafficPolicy: Local\n",
        f"    externalTrafficPolicy: Local\n    healthCheckNodePort: {port}\n",
    )
    path = tmp_path / "services.yaml"
    path.write_text(text)
    h = Harness(
        FileSource(path, poll_interval=0.02),
        tmp_path,
        config={"min_sync_period": 0.0, "nodeport_addresses": ("127.0.0.1/32",)},
    )
    h.agent.start()
    try:
        assert h.rules.synced.wait(5), "no first sync"
        assert wait_for(lambda: h.agent.health_checks.bound_ports() == [port])
        code, body, headers = http_get(f"http://127.0.0.1:{port}/healthz")
        assert (code, json.loads(body)) == (
            200,
            {
                "service": {"namespace": "default", "name": "local"},
                "localEndpoints": 1,
                "serviceProxyHealthy": True,
            },
        )
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
        assert h.agent.snapshot()["healthChecks"] == [
            {
                "port": port,
                "service": "default/local",
                "localEndpoints": 1,
                "serving": True,
                "error": None,
            }
        ]
        path.write_text(
            text.replace(
                "{ip: 10.244.1.11, nodeName: node-a}", "{ip: 10.244.1.11, nodeName: node-b}"
            )
        )
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 503)
        assert json.loads(http_get(f"http://127.0.0.1:{port}/")[1])["localEndpoints"] == 0
    finally:
        h.agent.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "stop() closes the health check port"
