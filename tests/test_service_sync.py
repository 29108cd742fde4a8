"""`ServiceSync`'s own state, without root: a real engine, the real `RuleManager` with an
`NftRecorder` for the kernel. What it holds between syncs (plans, not engine services), and
what it knows again after `reset()` (the engine kept every service)."""

from __future__ import annotations

import re
import textwrap
import threading
from dataclasses import replace
from typing import Any

import pytest

from pykp._fastpath import Engine
from pykp.agent.plan import service_ports_to_engine
from pykp.agent.sync import NodeContext, ServiceSync, fallback_slots
from pykp.model import Catalog
from pykp.netfilter.executor import NftRecorder
from pykp.netfilter.rules import MAX_SLOTS, MarkLayout, RuleManager
from pykp.netfilter.tool import RulesError
from pykp.sources.services_file import load_services_text

NODE = "192.168.77.1"
CONTEXT = NodeContext("node-a", (NODE,), frozenset({NODE}), True, None, "random")

SERVICES = """\
services:
  - name: web
    clusterIP: 10.96.0.10
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    endpoints: [{ip: 10.244.1.10, nodeName: node-a}, {ip: 10.244.2.10, nodeName: node-b}]
  - name: dns
    clusterIP: 10.96.0.53
    ports: [{port: 53, targetPort: 5353, protocol: UDP}]
    endpoints: [{ip: 10.244.1.53}, {ip: 10.244.2.53}]
  - name: late
    clusterIP: 10.96.0.11
    externalIPs: [203.0.113.7]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.3.10}]
"""


def loaded(script: str) -> dict[str, set[str]]:
    """The elements a full load's script adds, per set or map."""
    out: dict[str, set[str]] = {}
    for match in re.finditer(r"^add element inet pykp (\w+) \{ (.*) \}$", script, re.M):
        out.setdefault(match.group(1), set()).update(match.group(2).split(", "))
    return out


class RecordingEngine:
    """The engine, with each batch staged recorded: (upserted names, removed names)."""

    def __init__(self) -> None:
        self.engine = Engine(max_backend_id=MarkLayout().max_backend_id)
        self.batches: list[tuple[list[str], list[str]]] = []

    def stage(self, upserts: list[Any], removals: list[str]) -> Any:
        self.batches.append(([u.name for u in upserts], sorted(removals)))
        return self.engine.stage(upserts, removals)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def catalog(text: str = SERVICES) -> Catalog:
    loaded, problems = load_services_text(textwrap.dedent(text))
    assert problems == []
    return loaded


def service_sync() -> tuple[ServiceSync, RecordingEngine, NftRecorder]:
    engine = RecordingEngine()
    recorder = NftRecorder()
    sync = ServiceSync(
        engine,  # type: ignore[arg-type]
        RuleManager(MarkLayout(), nft=recorder, ipv6=False),
        MarkLayout(),
        kernel_random=True,
        allow_node_address_service_ips=False,
    )
    return sync, engine, recorder


def test_applied_is_what_the_engine_holds_built_from_each_services_plan() -> None:
    sync, engine, _ = service_sync()
    services = catalog()
    sync.sync(services, None, CONTEXT)

    assert (
        sorted(sync.applied)
        == sorted(engine.services())
        == ["default/dns", "default/late", "default/web"]
    )
    for spec in services.services:
        [built] = service_ports_to_engine(
            spec, CONTEXT.node_addresses, CONTEXT.node_name, traffic_policies=True
        )
        assert sync.applied[built.name] == built

    # One endpoint fewer: the next read builds the new version.
    changed = catalog(SERVICES.replace(", {ip: 10.244.2.53}", ""))
    sync.sync(changed, {"default/dns"}, CONTEXT)
    assert [b.ip for b in sync.applied["default/dns"].backends] == ["10.244.1.53"]
    assert "default/gone" not in sync.applied and len(sync.applied) == 3


def test_a_service_refused_a_frontend_is_applied_without_it() -> None:
    # Two Services claim one external IP (a services file refuses that; the API does not):
    # the older keeps it, the other its ClusterIP only.
    spec = catalog().get("default/late")
    assert spec is not None
    late = replace(spec, created="2026-02-01T00:00:00Z")
    first = replace(late, name="first", cluster_ips=("10.96.0.12",), created="2026-01-01T00:00:00Z")
    sync, _, _ = service_sync()
    sync.sync(Catalog(services=(late, first), traffic_policies=True), None, CONTEXT)

    assert sync.applied["default/late"].frontends == (("10.96.0.11", 80, "TCP"),)
    assert ("203.0.113.7", 80, "TCP") in sync.applied["default/first"].frontends
    assert "default/late (frontend taken)" in sync.refused


def test_a_full_resync_after_a_reset_stages_nothing_the_engine_already_holds() -> None:
    sync, engine, recorder = service_sync()
    services = catalog()
    sync.sync(services, None, CONTEXT)
    [first_load] = recorder.scripts

    sync.reset()  # as after a failed commit: every service is planned again
    result = sync.sync(services, None, CONTEXT)

    assert engine.batches[-1] == ([], [])  # the engine kept them all, unchanged
    assert result.full_load and loaded(recorder.scripts[-1]) == loaded(first_load)


def test_a_reset_keeps_what_is_needed_to_clear_a_removed_udp_services_flows() -> None:
    sync, engine, _ = service_sync()
    sync.sync(catalog(), None, CONTEXT)
    sync.reset()

    without_dns = (
        SERVICES.split("  - name: dns")[0] + "  - name: late" + SERVICES.split("  - name: late")[1]
    )
    result = sync.sync(catalog(without_dns), None, CONTEXT)

    assert engine.batches[-1] == ([], ["default/dns"])
    assert result.stale_udp == [
        ("10.96.0.53", "10.244.1.53", 5353),
        ("10.96.0.53", "10.244.2.53", 5353),
    ]
    assert "default/dns" not in sync.applied


def test_a_change_stages_only_the_changed_service() -> None:
    sync, engine, _ = service_sync()
    sync.sync(catalog(), None, CONTEXT)

    changed = catalog(SERVICES.replace("{ip: 10.244.3.10}", "{ip: 10.244.3.11}"))
    sync.sync(changed, {"default/late", "default/web"}, CONTEXT)  # web: named, unchanged

    assert engine.batches[-1] == (["default/late"], [])


def test_a_first_load_hands_the_engine_every_backend_and_names_the_udp_frontends_served() -> None:
    # The first load hands each engine service over as it is planned and keeps it without
    # its backends: the engine must still get them, and the UDP frontends with a serving
    # backend are still the ones whose stale conntrack entries are cleared.
    text = SERVICES + (
        "  - name: quiet\n"
        "    clusterIP: 10.96.0.54\n"
        "    ports: [{port: 53, targetPort: 5353, protocol: UDP}]\n"
        "    endpoints: [{ip: 10.244.1.54, ready: false}]\n"
    )
    sync, engine, _ = service_sync()
    result = sync.sync(catalog(text), None, CONTEXT)

    assert result.newly_served_udp == [("10.96.0.53", 53)]  # quiet: none serving
    addresses = engine.backend_ids()
    [(v4_pool, _)] = engine.pools(["default/dns"]).values()
    assert sorted(addresses[backend_id] for backend_id, _ in v4_pool) == [
        ("10.244.1.53", 5353),
        ("10.244.2.53", 5353),
    ]
    assert [b.ip for b in sync.applied["default/web"].backends] == ["10.244.1.10", "10.244.2.10"]


def many_services(count: int) -> str:
    """`count` more services after SERVICES, three endpoints each (some shared)."""
    lines = [SERVICES]
    for i in range(count):
        lines.append(
            f"  - name: s{i}\n"
            f"    clusterIP: 10.97.{i // 256}.{i % 256}\n"
            "    ports: [{port: 80, targetPort: 8080}]\n"
            f"    endpoints: [{{ip: 10.245.{i % 50}.1}}, {{ip: 10.245.{i // 200}.{i % 200 + 2}}},"
            f" {{ip: 10.246.{i // 256}.{i % 256}}}]\n"
        )
    return "".join(lines)


class OrderedLog(NftRecorder):
    """The recorder, its scripts and the engine's commits in one log, in order; fails
    its `fail_at`-th script (counted from 1)."""

    def __init__(self, fail_at: int = 0) -> None:
        super().__init__()
        self.log: list[str] = []
        self.fail_at = fail_at
        self.sync: ServiceSync | None = None
        self.programmed_seen: list[int] = []  # the sync's `programmed` at each script

    def run(self, script: str) -> None:
        if len(self.scripts) + 1 == self.fail_at:
            raise RulesError(["nft", "-f", "-"], 1, "Error: refused")
        super().run(script)
        self.log.append(script)
        if self.sync is not None:
            self.programmed_seen.append(self.sync.programmed)


def parts_sync(fail_at: int = 0) -> tuple[ServiceSync, OrderedLog]:
    recorder = OrderedLog(fail_at)
    engine = RecordingEngine()
    commit = engine.engine.commit

    def logged_commit(staged: Any) -> None:
        recorder.log.append("engine commit")
        commit(staged)

    engine.commit = logged_commit  # type: ignore[method-assign]
    rules = RuleManager(MarkLayout(), nft=recorder, ipv6=False)
    rules.holds_no_elements = True  # as `install` leaves a table it made
    sync = ServiceSync(
        engine,  # type: ignore[arg-type]
        rules,
        MarkLayout(),
        kernel_random=True,
        allow_node_address_service_ips=False,
    )
    recorder.sync = sync
    return sync, recorder


def test_a_first_load_into_empty_sets_goes_in_parts_with_the_elements_of_one_load() -> None:
    text = many_services(2500)
    services = catalog(text)
    whole, _, recorder = service_sync()
    whole.sync(services, None, CONTEXT)
    [script] = recorder.scripts
    expected = {name: items for name, items in loaded(script).items() if "rr_at" not in name}

    in_parts, recorder = parts_sync()
    result = in_parts.sync(services, None, CONTEXT)
    log = recorder.log

    # The engine first, then the backends' elements, then the services' in parts of
    # 1,000: each element once, all of them together the one load's.
    assert log[0] == "engine commit"
    parts = [loaded(script) for script in log[1:]]
    assert len(parts) == 1 + 3
    assert set(parts[0]) == {"backends4", "hairpin4"}
    assert all("flush" not in script for script in log[1:])
    sent: dict[str, set[str]] = {}
    for part in parts:
        for name, items in part.items():
            assert not items & sent.get(name, set()), f"{name}: sent twice"
            sent.setdefault(name, set()).update(items)
    assert sent == expected
    assert result.full_load and result.elements_added == sum(map(len, expected.values()))
    # Not programmed (the `pykp_services` gauge) until the last part is in.
    assert recorder.programmed_seen == [0] * len(parts)
    assert in_parts.programmed == len(in_parts.applied) == 2503
    assert not in_parts.rules.holds_no_elements  # type: ignore[attr-defined]
    assert not [t for t in threading.enumerate() if t.name == "pykp-part-load"]

    # What follows is a change, as after any full load.
    log.clear()
    changed = catalog(text.replace("{ip: 10.246.0.7}", "{ip: 10.246.99.7}"))
    result = in_parts.sync(changed, ["default/s7"], CONTEXT)
    assert not result.full_load and result.upserted == 1
    assert log[1:2] == ["engine commit"] and len(log) == 3  # add, engine, remove


def test_a_part_refused_fails_the_sync_and_the_next_load_is_whole() -> None:
    services = catalog(many_services(2500))
    sync, recorder = parts_sync(fail_at=2)
    with pytest.raises(RulesError, match="refused"):
        sync.sync(services, None, CONTEXT)
    # Nothing sent past the refused part, and its thread is gone.
    assert len(recorder.scripts) == 1 and recorder.log[0] == "engine commit"
    assert not [t for t in threading.enumerate() if t.name == "pykp-part-load"]

    # The agent resets after a failed sync: the next load is one transaction that flushes
    # every set first, whatever the parts left, and stages nothing the engine holds.
    sync.reset()
    recorder.fail_at = 0
    recorder.log.clear()
    result = sync.sync(services, None, CONTEXT)
    script, engine_commit = recorder.log  # the elements first, as in any load but a first
    assert engine_commit == "engine commit"
    assert result.full_load and result.upserted == 0
    assert "flush map inet pykp backends4" in script
    assert sum(len(v) for v in loaded(script).values()) >= result.elements_added


BACKEND_ADDRESSES = {i: (f"10.244.{i // 250}.{i % 250}", 8080) for i in range(1, 300)}


@pytest.mark.parametrize(
    ("pool", "expected_ids"),
    [
        ([], []),
        ([(1, 1), (2, 1), (3, 1)], [1, 2, 3]),
        ([(1, 5), (2, 5)], [1, 2]),  # one weight, however large: once each
        ([(1, 2), (2, 1)], [1, 1, 2]),  # repeated by weight
        ([(1, 4), (2, 2)], [1, 1, 2]),  # over the weights' common divisor
        ([(1, 1), (999, 1), (2, 1)], [1, 2]),  # an id the table no longer holds: left out
        ([(i, 1) for i in range(1, 200)], list(range(1, MAX_SLOTS + 1))),  # at most MAX_SLOTS
        ([(1, MAX_SLOTS), (2, 1)], [1, 2]),  # repeats past MAX_SLOTS: once each
    ],
)
def test_fallback_slots_repeat_each_backend_by_its_weight(
    pool: list[tuple[int, int]], expected_ids: list[int]
) -> None:
    assert fallback_slots(pool, BACKEND_ADDRESSES) == tuple(
        BACKEND_ADDRESSES[i] for i in expected_ids
    )
