"""`pykp bench`: the rule generators, the report, and the quick preset end to end (as root).

The end-to-end test asserts what must hold on any machine: every contender served every
connection it attempted, every probe saw its change, and the JSON has its structure. It
asserts no timing: figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pykp.bench import rulegen
from pykp.bench.contenders import (
    CLUSTER_CIDR,
    SERVICE_CIDR,
    PykpContender,
    ServiceSet,
    make_contender,
)
from pykp.bench.report import METRICS, served_failures, summarize
from pykp.bench.runner import DEFAULT_CONTENDERS, SCHEMA
from pykp.cli.app import app
from pykp.sources.services_file import load_services_file

BACKENDS = ["10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.13"]


# --- rule generators --------------------------------------------------------------------------


def test_iptables_full_is_kube_proxys_shape() -> None:
    services = ServiceSet(3, BACKENDS)
    text = rulegen.iptables_full(services.all(), CLUSTER_CIDR)
    lines = text.splitlines()
    assert lines[0] == "*filter" and "*nat" in lines and lines[-1] == "COMMIT"
    # One KUBE-SERVICES jump per service, in order, the measured (last) service last,
    # followed only by the nodeports rule.
    jumps = [line for line in lines if line.startswith("-A KUBE-SERVICES") and "KUBE-SVC-" in line]
    assert len(jumps) == 4  # iperf3 + 3
    assert services.ip(2) in jumps[-1]
    kube_services = [line for line in lines if line.startswith("-A KUBE-SERVICES")]
    assert "KUBE-NODEPORTS" in kube_services[-1]
    # Per service: masquerade of non-pod sources, then 1/3, 1/2, rest.
    svc = services.service(0)
    chain = rulegen._svc_chain(svc)
    rules = [line for line in lines if line.startswith(f"-A {chain} ")]
    assert f"! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ" in rules[0]
    assert "--probability 0.3333333333" in rules[1]
    assert "--probability 0.5000000000" in rules[2]
    assert "statistic" not in rules[3]
    for ip in BACKENDS[:3]:
        # Every service's endpoints have ports of their own (10000 + index).
        assert f"-j DNAT --to-destination {ip}:10000" in text
        assert f"-j DNAT --to-destination {ip}:10002" in text
    assert f"-A KUBE-MARK-MASQ -j MARK --or-mark {rulegen.MASQ_MARK:#x}" in lines
    assert any("MASQUERADE --random-fully" in line for line in lines)
    assert (
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in lines
    )
    # Chain names are kube-proxy's length.
    assert all(len(m) == len("KUBE-SVC-") + 16 for m in re.findall(r"KUBE-SVC-\w+", text))


def test_iptables_change_is_a_partial_sync() -> None:
    services = ServiceSet(5, BACKENDS)
    old = services.service(4)
    services.changed[4] = ((BACKENDS[3], services.port(4)),)
    new = services.service(4)
    text = rulegen.iptables_change(services.all(), old, new, CLUSTER_CIDR)
    # Only the changed service's chains besides the top-level ones; stale ones deleted.
    svc_chains = set(re.findall(r"^:(KUBE-SVC-\w+)", text, re.M))
    assert svc_chains == {rulegen._svc_chain(new)}
    deleted = re.findall(r"^-X (KUBE-SEP-\w+)", text, re.M)
    assert sorted(deleted) == sorted(rulegen._sep_chain(old, ep) for ep in old.endpoints)
    assert f"--to-destination {BACKENDS[3]}:10004" in text
    assert text.count("-A KUBE-SERVICES") == 5 + 1 + 1  # every service, iperf3, nodeports


def test_nftables_full_and_change() -> None:
    services = ServiceSet(3, BACKENDS)
    text = rulegen.nftables_full(services.all(), CLUSTER_CIDR, SERVICE_CIDR)
    assert "numgen random mod 3 vmap" in text
    assert text.count("add element ip kube-proxy service-ips") == 4
    assert "masquerade fully-random" in text
    assert "dnat to 10.244.0.10:10000" in text
    old = services.service(2)
    services.changed[2] = ((BACKENDS[3], services.port(2)),)
    change = rulegen.nftables_change(old, services.service(2), CLUSTER_CIDR, SERVICE_CIDR)
    assert "numgen random mod 1 vmap" in change
    assert change.count("delete chain") == 3
    assert "add element" not in change  # the service-ips element still points at the chain


def test_services_file_matches_the_rule_sets() -> None:
    services = ServiceSet(4, BACKENDS)
    services.changed[3] = ((BACKENDS[3], services.port(3)),)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pykp-bench-test-{os.getpid()}.yaml"
    try:
        path.write_text(services.pykp_yaml("maglev"))
        loaded, problems = load_services_file(path)
    finally:
        path.unlink(missing_ok=True)
    assert problems == []
    assert len(loaded.services) == 5
    last = loaded.services[-1]
    assert last.cluster_ips == (services.ip(3),)
    assert [e.ip for e in last.endpoints] == [BACKENDS[3]]
    assert last.ports[0].target_port == 10003


# --- report -----------------------------------------------------------------------------------


def _sample(rnd: int, per_s: float, p99_us: int) -> dict[str, object]:
    lat = {
        "p50": p99_us // 2,
        "p90": p99_us,
        "p99": p99_us,
        "p999": p99_us,
        "max": p99_us,
        "mean": 1.0,
    }
    return {
        "round": rnd, "attempted": 10, "ok": 10, "failed": 0, "errors": {}, "conns_per_s": per_s,
        "connect_us": lat, "total_us": lat, "cpu": {"per_1000": 1.0, "per_1000_net": 1.0},
    }  # fmt: skip


def test_summary_takes_ratios_per_round_and_checks_targets() -> None:
    doc = {
        "settings": {"streams": [1]},
        "contenders": {"iptables": {}, "pykp/random": {}},
        "samples": {
            "10000": {
                "iptables": {
                    "conns_end": [_sample(0, 1000, 800), _sample(1, 2000, 800)],
                    "rate_end": [_sample(0, 1, 800), _sample(1, 1, 800)],
                    "propagation": [{"round": 0, "seconds": 4.0, "found": True}],
                },
                "pykp/random": {
                    "conns_end": [_sample(0, 4000, 100), _sample(1, 4000, 100)],
                    "rate_end": [_sample(0, 1, 100), _sample(1, 1, 100)],
                    "propagation": [{"round": 0, "seconds": 1.0, "found": True}],
                },
            }
        },
    }
    summary = summarize(doc)
    fig = summary["figures"]["10000"]["conns_end"]
    assert fig["iptables"] == {"median": 1500, "min": 1000, "max": 2000, "n": 2}
    ratio = summary["ratios"]["10000"]["pykp/random"]["conns_end"]["iptables"]
    assert ratio == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 2}  # per round, not of medians
    targets = {t["target"]: t for t in summary["targets"]}
    assert targets["new conn/s at 10,000 services vs iptables"]["met"]
    assert targets["connect p99 at 10,000 services vs iptables"]["met"]
    prop = targets["propagation at 10,000 services vs iptables (100x faster)"]
    assert not prop["met"] and prop["ratio"] == 0.25
    assert served_failures(doc) == []
    doc["samples"]["10000"]["iptables"]["conns_end"][0]["ok"] = 9
    assert len(served_failures(doc)) == 1
    assert {m.key for m in METRICS} >= {"conns_end", "lat_p99", "cpu", "tput_1", "propagation"}


def test_kube_metrics_are_compared_with_the_file_baselines() -> None:
    change = {"changes": 3, "missed": 0, "found": True}
    doc = {
        "settings": {"streams": [1]},
        "contenders": {"iptables": {}, "nftables": {}, "pykp/kube-random": {}},
        "samples": {
            "10000": {
                "iptables": {"propagation": [{"round": 0, "seconds": 2.0, "found": True}]},
                "nftables": {"propagation": [{"round": 0, "seconds": 0.4, "found": True}]},
                "pykp/kube-random": {
                    "kube_start": [{"round": 0, "seconds": 1.5, "found": True, "syncs": 1,
                                    "synced_seconds": 1.4, "rss_kib": 204800}],
                    "kube_change": [{"round": 0, **change, "seconds": [0.01, 0.02, 0.06],
                                     "p50": 0.02, "p99": 0.06}],
                    "kube_new": [{"round": 0, "seconds": 0.025, "found": True}],
                },
            }
        },
    }  # fmt: skip
    summary = summarize(doc)
    figures = summary["figures"]["10000"]
    assert figures["kube_rss"]["pykp/kube-random"]["median"] == 200.0
    ratios = summary["ratios"]["10000"]["pykp/kube-random"]
    assert ratios["kube_change_p50"]["iptables"]["median"] == 0.01
    assert ratios["kube_change_p50"]["nftables"]["median"] == pytest.approx(0.05)
    targets = {t["target"]: t for t in summary["targets"]}
    p50 = targets["kube: slice change p50 at 10,000 services <= 15 ms"]
    assert p50["kind"] == "value" and p50["value"] == 0.02 and not p50["met"]
    assert not targets["kube: slice change p99 at 10,000 services <= 50 ms"]["met"]
    assert targets["kube: slice change p50 at 10,000 vs iptables propagation (100x faster)"]["met"]
    nft = targets["kube: slice change p50 at 10,000 vs nftables propagation (25x faster)"]
    assert nft["kind"] == "ratio" and nft["ratio"] == pytest.approx(0.05) and not nft["met"]
    assert targets["kube: new Service -> first conn at 10,000 services <= 30 ms"]["met"]
    assert targets["kube: agent start -> 10,000 services programmed <= 2 s"]["met"]
    assert served_failures(doc) == []
    doc["samples"]["10000"]["pykp/kube-random"]["kube_change"][0].update(missed=1, found=False)
    assert len(served_failures(doc)) == 1
    from pykp.bench.report import markdown

    assert "kube: EndpointSlice change -> first conn, p50" in markdown(doc, summary)


def test_kube_objects_match_the_services_file() -> None:
    services = ServiceSet(3, BACKENDS)
    services.changed[2] = ((BACKENDS[3], services.port(2)),)
    svc, eps = services.kube_service(2), services.kube_slice(2)
    assert svc["spec"]["clusterIP"] == services.ip(2)
    assert svc["spec"]["ports"][0] == {
        "name": "http",
        "port": 80,
        "targetPort": 10002,
        "protocol": "TCP",
    }
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == "svc-2"
    assert [e["addresses"] for e in eps["endpoints"]] == [[BACKENDS[3]]]
    assert eps["ports"][0]["port"] == 10002
    assert len(services.kube_slice(0)["endpoints"]) == 3


def test_a_pykp_contender_name_adds_pykp_run_switches() -> None:
    # pykp/round-robin rotates in the kernel (the default); this one measures the reader.
    queued = make_contender("pykp/round-robin:no-kernel-round-robin", "")
    assert isinstance(queued, PykpContender)
    assert queued.name == "pykp/round-robin:no-kernel-round-robin"
    assert queued.policy == "round-robin"
    assert queued.extra_args == ["--no-kernel-round-robin"]
    with pytest.raises(ValueError, match="no-kernel-round-robin"):
        make_contender("pykp/round-robin:queued", "")


# --- end to end -------------------------------------------------------------------------------


def _root() -> bool:
    return os.geteuid() == 0


@pytest.mark.privileged
@pytest.mark.skipif(not _root() and not os.environ.get("CI"), reason="needs root")
def test_quick_bench_end_to_end(tmp_path: Path) -> None:
    missing = [t for t in ("nft", "iptables-restore", "conntrack", "iperf3") if not shutil.which(t)]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"missing tools: {missing}")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA
    assert doc["settings"]["preset"] == "quick"
    assert doc["settings"]["scales"] == [1]
    assert set(doc["machine"]) >= {"kernel", "cpus", "iptables", "nft"}
    assert list(doc["contenders"]) == list(DEFAULT_CONTENDERS)
    rounds = doc["settings"]["rounds"]
    per = doc["samples"]["1"]
    assert set(per) == set(DEFAULT_CONTENDERS)
    for name, samples in per.items():
        expected = {"conns_end", "rate_end"}
        if name.startswith("pykp/kube-"):
            expected |= {"kube_start", "kube_change", "kube_new"}
        else:
            if name != "loopback":
                expected |= {"tput_1", "tput_2"}
            if name not in ("direct", "loopback"):
                expected |= {"program", "propagation"}
        assert set(samples) == expected, name
        for metric, runs in samples.items():
            assert len(runs) == rounds, (name, metric)
        for run in samples["conns_end"] + samples["rate_end"]:
            # Every connection the generator attempted was served, by a real backend.
            assert run["attempted"] > 0 and run["ok"] == run["attempted"], (name, run)
            assert run["failed"] == 0 and run["errors"] == {}, (name, run)
            allowed = (
                {"loopback"} if name == "loopback" else {"backend-0", "backend-1", "backend-2"}
            )
            assert set(run["backends"]) <= allowed, (name, run["backends"])
        for run in samples.get("program", []) + samples.get("propagation", []):
            assert run["found"] and run["seconds"] is not None, (name, run)
        for run in samples.get("tput_1", []):
            assert run["bits_per_second"] > 0
        # Through the Kubernetes source: every probe saw its change, with numbers.
        for run in samples.get("kube_start", []) + samples.get("kube_new", []):
            assert run["found"] and run["seconds"] is not None, (name, run)
        for run in samples.get("kube_start", []):
            assert run["rss_kib"] > 0 and run["synced_seconds"] is not None, (name, run)
        for run in samples.get("kube_change", []):
            assert run["found"] and run["missed"] == 0, (name, run)
            assert len(run["seconds"]) == run["changes"] == doc["settings"]["kube_changes"]
            assert run["p50"] is not None and run["p99"] >= run["p50"], (name, run)
    assert served_failures(doc) == []
    summary = doc["summary"]
    assert set(summary) == {"figures", "ratios", "targets"}
    assert set(summary["ratios"]["1"]) == {c for c in DEFAULT_CONTENDERS if c.startswith("pykp")}
    assert any(t["metric"] == "conns_end" for t in summary["targets"])
    kube = [c for c in DEFAULT_CONTENDERS if c.startswith("pykp/kube-")]
    assert kube, "the quick preset runs a Kubernetes-source contender"
    figures = summary["figures"]["1"]
    for key in ("kube_start", "kube_rss", "kube_change_p50", "kube_change_p99", "kube_new"):
        assert set(figures[key]) == set(kube), key
    for contender in kube:
        # Its slice changes against the file-based propagation of kube-proxy's rule sets.
        assert set(summary["ratios"]["1"][contender]["kube_change_p50"]) == {"iptables", "nftables"}
