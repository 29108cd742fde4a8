"""`ServiceSync`'s own state, without root: a real engine, the real `RuleManager` with an
`NftRecorder` for the kernel. What it holds between syncs (plans, not engine services), and
what it knows again after `reset()` (the engine kept every service)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import replace
from typing import Any

from pykp._fastpath import Engine
from pykp.agent.plan import service_ports_to_engine
from pykp.agent.sync import NodeContext, ServiceSync
from pykp.model import Catalog
from pykp.netfilter.executor import NftRecorder
from pykp.netfilter.rules import MarkLayout, RuleManager
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
