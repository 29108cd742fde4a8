"""What the agent sends to nftables, without root: a real engine and `ServiceSync`, the real
`RuleManager` with an `NftRecorder` in place of the kernel (kube-proxy's proxier tests use a
fake nftables the same way). Table-driven: services in, the elements of each set out; then
a change in, the exact transactions out, in the order that never shows a new connection a
half-applied change."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable

import pytest

from pykp._fastpath import Engine
from pykp.agent.sync import NodeContext, ServiceSync
from pykp.netfilter.executor import NftRecorder
from pykp.netfilter.rules import MarkLayout, RuleManager, rr_chain_name
from pykp.sources.services_file import load_services_text

NODE = "192.168.77.1"
# As the Kubernetes source delivers them: traffic policies applied.
CONTEXT = NodeContext("node-a", (NODE,), frozenset({NODE}), True, None, "random")
_ELEMENT_LINE = re.compile(r"^(add|delete) element inet pykp (\w+) \{ (.*) \}$")


def elements(script: str, verb: str = "add") -> dict[str, set[str]]:
    """The elements a script adds (or deletes), per set or map."""
    out: dict[str, set[str]] = {}
    for line in script.splitlines():
        match = _ELEMENT_LINE.match(line)
        if match and match.group(1) == verb:
            out.setdefault(match.group(2), set()).update(match.group(3).split(", "))
    return out


def synced(
    text: str, *, kernel_random: bool = True, kernel_round_robin: bool = False
) -> tuple[ServiceSync, NftRecorder]:
    recorder = NftRecorder()
    rules = RuleManager(MarkLayout(), nft=recorder, ipv6=False)
    sync = ServiceSync(
        Engine(max_backend_id=MarkLayout().max_backend_id),
        rules,
        MarkLayout(),
        kernel_random=kernel_random,
        kernel_round_robin=kernel_round_robin,
        allow_node_address_service_ips=False,
    )
    catalog, problems = load_services_text(textwrap.dedent(text))
    assert problems == []
    sync.sync(catalog, None, CONTEXT)
    return sync, recorder


WEB = """\
services:
  - name: web
    clusterIP: 10.96.0.10
    policy: {policy}
    ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
    externalTrafficPolicy: {etp}
    endpoints:
      - {{ip: 10.244.1.10, nodeName: node-a}}
      - {{ip: 10.244.2.10, nodeName: node-b}}
"""
FRONTEND = "10.96.0.10 . tcp . 80"
NODE_PORT = f"{NODE} . tcp . 30080"

CASES = {
    # random, no affinity: the kernel decides (numgen over two slots), nothing is queued.
    "random-cluster": (
        {"policy": "random", "etp": "Cluster"},
        {
            "frontends4": {FRONTEND, NODE_PORT},
            "queued4": None,
            "fallback4": {f"{FRONTEND} : goto pick4_2", f"{NODE_PORT} : goto pick4_2"},
            "masq_frontends4": {NODE_PORT},
            "service_ips4": {"10.96.0.10"},
            "backends4": {"0x00010000 : 10.244.1.10 . 8080", "0x00020000 : 10.244.2.10 . 8080"},
            "hairpin4": {"10.244.1.10 . 10.244.1.10", "10.244.2.10 . 10.244.2.10"},
        },
    ),
    # round-robin: pykp's reader decides; the kernel path stays as the fallback.
    "round-robin": (
        {"policy": "round-robin", "etp": "Cluster"},
        {
            "queued4": {FRONTEND, NODE_PORT},
            "fallback4": {f"{FRONTEND} : goto pick4_2", f"{NODE_PORT} : goto pick4_2"},
        },
    ),
    # externalTrafficPolicy Local: the NodePort keeps the client address and only this
    # node's endpoint; the ClusterIP keeps both.
    "local-nodeport": (
        {"policy": "random", "etp": "Local"},
        {
            "local_frontends4": {NODE_PORT},
            "masq_frontends4": None,
            "fallback4": {f"{FRONTEND} : goto pick4_2", f"{NODE_PORT} : goto pick4_1"},
            # Pods and the node are short-circuited to both, on the kernel path too.
            "short_circuit4": {NODE_PORT},
            "fallback_sc4": {f"{NODE_PORT} : goto pick_sc4_2"},
        },
    ),
}


@pytest.mark.parametrize(("fields", "expected"), CASES.values(), ids=CASES.keys())
def test_a_full_load_holds_each_sets_elements(
    fields: dict[str, str], expected: dict[str, set[str] | None]
) -> None:
    _, recorder = synced(WEB.format(**fields))

    [script] = recorder.scripts  # one transaction
    assert script.splitlines()[0] == "flush set inet pykp frontends4"
    loaded = elements(script)
    for name, wanted in expected.items():
        assert loaded.get(name) == wanted, name


def test_a_moved_endpoint_is_added_before_the_engine_and_removed_after() -> None:
    sync, recorder = synced(WEB.format(policy="round-robin", etp="Cluster"))
    moved = WEB.format(policy="round-robin", etp="Cluster").replace("10.244.2.10", "10.244.3.10")
    catalog, _ = load_services_text(textwrap.dedent(moved))
    recorder.scripts.clear()

    sync.sync(catalog, {"default/web"}, CONTEXT)

    first, second = recorder.scripts
    # 1: the new backend's id and its slot, before any decision can use them; the slot of
    # the old backend is replaced in place (a delete and an add in one transaction).
    added = elements(first)
    assert added["backends4"] == {"0x00030000 : 10.244.3.10 . 8080"}
    assert {slot.split(" : ")[1] for slot in added["slots4"]} == {"10.244.3.10 . 8080"}
    assert elements(first, "delete").keys() == {"slots4"}
    # 3 (after the engine's commit): the old backend's id, which nothing holds any more.
    assert elements(second, "delete") == {
        "backends4": {"0x00020000"},
        "hairpin4": {"10.244.2.10 . 10.244.2.10"},
    }
    assert elements(second) == {}


def test_an_endpoint_elsewhere_reaches_the_short_circuit_slots_of_a_local_service() -> None:
    # The external engine service (this node's endpoint only) does not change; the slots
    # its short-circuit gives pods and the node (every endpoint) do.
    local = WEB.format(policy="random", etp="Local")
    sync, recorder = synced(local)
    grown = local + "      - {ip: 10.244.3.10, nodeName: node-c}\n"
    catalog, _ = load_services_text(textwrap.dedent(grown))
    recorder.scripts.clear()

    sync.sync(catalog, {"default/web"}, CONTEXT)

    added = elements(recorder.scripts[0])
    assert added["fallback_sc4"] == {f"{NODE_PORT} : goto pick_sc4_3"}
    assert f"{NODE_PORT} . 130 : 10.244.3.10 . 8080" in added["slots4"]
    assert "fallback4" not in added or f"{NODE_PORT} : goto pick4_1" not in added["fallback4"]


def test_an_unchanged_service_sends_nothing() -> None:
    sync, recorder = synced(WEB.format(policy="random", etp="Cluster"))
    catalog, _ = load_services_text(textwrap.dedent(WEB.format(policy="random", etp="Cluster")))
    recorder.scripts.clear()

    result = sync.sync(catalog, {"default/web"}, CONTEXT)

    assert recorder.scripts == []
    assert (result.upserted, result.elements_added, result.elements_removed) == (0, 0, 0)


def test_a_failed_transaction_leaves_the_engine_as_it_was_and_the_next_sync_reloads() -> None:
    sync, recorder = synced(WEB.format(policy="round-robin", etp="Cluster"))
    engine = sync.engine
    before = engine.backend_ids()
    moved = WEB.format(policy="round-robin", etp="Cluster").replace("10.244.2.10", "10.244.3.10")
    catalog, _ = load_services_text(textwrap.dedent(moved))
    recorder.scripts.clear()
    recorder.fail = "Error: Could not process rule: No such file or directory"

    with pytest.raises(Exception, match="No such file"):
        sync.sync(catalog, {"default/web"}, CONTEXT)

    assert engine.backend_ids() == before  # staged, never committed
    recorder.fail = None
    sync.reset()  # what the agent does after a failed sync
    sync.sync(catalog, {"default/web"}, CONTEXT)
    [reload] = recorder.scripts
    assert "flush set inet pykp frontends4" in reload
    assert "0x00030000 : 10.244.3.10 . 8080" in reload


TWO_PORTS = """\
services:
  - name: pod
    clusterIP: 10.96.0.20
    ports: [{{name: a, port: 80, targetPort: 8080}}{more}]
    endpoints: [{{ip: {ip}}}]
"""


def test_the_backends_of_one_pod_share_its_hairpin_pair_until_the_last_goes() -> None:
    both = TWO_PORTS.format(more=", {name: b, port: 90, targetPort: 9090}", ip="10.244.1.10")
    sync, recorder = synced(both)
    loaded = elements(recorder.scripts[0])
    assert loaded["backends4"] == {
        "0x00010000 : 10.244.1.10 . 8080",
        "0x00020000 : 10.244.1.10 . 9090",
    }
    assert loaded["hairpin4"] == {"10.244.1.10 . 10.244.1.10"}
    counts = sync.element_counts()
    assert counts is not None and (counts[1]["backends4"], counts[1]["hairpin4"]) == (2, 1)

    def change(text: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        catalog, _ = load_services_text(textwrap.dedent(text))
        recorder.scripts.clear()
        sync.sync(catalog, {"default/pod"}, CONTEXT)
        script = "\n".join(recorder.scripts)
        return elements(script), elements(script, "delete")

    # One of its two ids goes: the pair stays (the other id still uses it).
    added, deleted = change(TWO_PORTS.format(more="", ip="10.244.1.10"))
    assert deleted.get("backends4") == {"0x00020000"}
    assert "hairpin4" not in deleted and "hairpin4" not in added
    # The pod moves: its old pair goes with its last id, the new one comes with the new id.
    added, deleted = change(TWO_PORTS.format(more="", ip="10.244.1.11"))
    assert added["hairpin4"] == {"10.244.1.11 . 10.244.1.11"}
    assert deleted["hairpin4"] == {"10.244.1.10 . 10.244.1.10"}
    counts = sync.element_counts()
    assert counts is not None and (counts[1]["backends4"], counts[1]["hairpin4"]) == (1, 1)
    assert sync.elements()["hairpin4"] == {"10.244.1.11 . 10.244.1.11": "10.244.1.11 . 10.244.1.11"}


# --- round-robin rotated in the kernel (--kernel-round-robin)

RR_CHAIN = rr_chain_name(4, "default/web")


def test_a_kernel_round_robin_service_gets_its_chain_before_the_verdicts_that_name_it() -> None:
    weighted = WEB.format(policy="round-robin", etp="Cluster").replace(
        "{ip: 10.244.1.10, nodeName: node-a}", "{ip: 10.244.1.10, nodeName: node-a, weight: 2}"
    )
    _, recorder = synced(weighted, kernel_round_robin=True)

    [load] = recorder.scripts  # one transaction, the chain first
    assert load.splitlines()[:3] == [
        f"add chain inet pykp {RR_CHAIN}",
        f"flush chain inet pykp {RR_CHAIN}",
        f"add rule inet pykp {RR_CHAIN} numgen inc mod 3 vmap @rr_at4_3",
    ]
    loaded = elements(load)
    assert "queued4" not in loaded  # no first packet goes to pykp's reader
    assert loaded["fallback4"] == {
        f"{FRONTEND} : goto {RR_CHAIN}",
        f"{NODE_PORT} : goto {RR_CHAIN}",
    }
    # The slots in the rotation's order, the weight spread out: a b a, not a a b.
    assert {slot for slot in loaded["slots4"] if slot.startswith(FRONTEND)} == {
        f"{FRONTEND} . 0 : 10.244.1.10 . 8080",
        f"{FRONTEND} . 1 : 10.244.2.10 . 8080",
        f"{FRONTEND} . 2 : 10.244.1.10 . 8080",
    }


@pytest.mark.parametrize(
    ("change", "rewritten"),
    [
        # Same number of backends: new slot values, the rotation keeps its place.
        (lambda text: text.replace("10.244.2.10", "10.244.3.10"), False),
        # One more: the chain's rule is rewritten (mod 3), before the new slot is used.
        (lambda text: text + "      - {ip: 10.244.3.10, nodeName: node-c}\n", True),
    ],
    ids=["moved", "grown"],
)
def test_a_kernel_round_robin_change_rewrites_its_chain_only_for_a_new_count(
    change: Callable[[str], str], rewritten: bool
) -> None:
    text = WEB.format(policy="round-robin", etp="Cluster")
    sync, recorder = synced(text, kernel_round_robin=True)
    catalog, _ = load_services_text(textwrap.dedent(change(text)))
    recorder.scripts.clear()

    sync.sync(catalog, {"default/web"}, CONTEXT)

    first = recorder.scripts[0].splitlines()
    chain_lines = [line for line in first if RR_CHAIN in line and "element" not in line]
    rule = f"add rule inet pykp {RR_CHAIN} numgen inc mod 3 vmap @rr_at4_3"
    if rewritten:
        assert rule in chain_lines
        assert first.index(rule) < min(i for i, line in enumerate(first) if "element" in line)
    else:
        assert chain_lines == []  # the counter, and the rotation's place, stay


def test_a_removed_kernel_round_robin_service_deletes_its_chain_after_its_verdicts() -> None:
    sync, recorder = synced(
        WEB.format(policy="round-robin", etp="Cluster"), kernel_round_robin=True
    )
    catalog, _ = load_services_text("services: []\n")
    recorder.scripts.clear()

    sync.sync(catalog, {"default/web"}, CONTEXT)

    [removal] = recorder.scripts
    lines = removal.splitlines()
    assert lines[-1] == f"delete chain inet pykp {RR_CHAIN}"
    assert any(line.startswith("delete element inet pykp fallback4") for line in lines[:-1])
