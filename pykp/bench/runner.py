"""`pykp bench`'s driver: labs up, rounds of interleaved contenders, samples out.

For every scale (number of services), `rounds` rounds; in each round every contender takes
its turn (the order rotates from round to round, so no contender is always first or last
after another's load) and runs every workload once: programming all services, new
connections (last service, random services), the fixed-rate run (latency and CPU),
throughput (at the first scale only: the established path does not depend on the number
of services for any contender here) and the endpoint change. A ``pykp/kube-*`` contender
(the agent fed through the Kubernetes source) runs the ``kube_*`` workloads instead: agent
start to all services programmed (and its RSS), `kube_changes` EndpointSlice changes, one
new Service; then the last-service and fixed-rate connection runs. Raw samples are kept;
the report takes medians and spreads over the rounds, and ratios per round.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pykp.bench import workloads
from pykp.bench.contenders import (
    BenchNode,
    Contender,
    PykpContender,
    PykpKubeContender,
    ServiceSet,
    make_contender,
)
from pykp.bench.loadgen import find_loadgen
from pykp.bench.workloads import LoadSettings

__all__ = ["DEFAULT_CONTENDERS", "BenchSettings", "machine_description", "run_bench"]

DEFAULT_CONTENDERS = (
    "direct",
    "loopback",
    "iptables",
    "nftables",
    "pykp/random",
    "pykp/round-robin",
    "pykp/maglev",
    "pykp/kube-random",
)
SCHEMA = "pykp-bench/1"


@dataclass
class BenchSettings:
    scales: list[int] = field(default_factory=lambda: [1, 1000, 10000])
    rounds: int = 3
    contenders: list[str] = field(default_factory=lambda: list(DEFAULT_CONTENDERS))
    duration: float = 4.0
    concurrency: int = 32
    threads: int = 1
    rate: float = 2000.0
    rate_duration: float = 3.0
    throughput_seconds: float = 3.0
    streams: list[int] = field(default_factory=lambda: [1, 4])
    timeout_ms: int = 3000
    probe_timeout: float = 120.0
    probe_interval_us: int = 1000
    # Fault runs at the first scale: the agent killed and restarted, or stopped for 5 s,
    # under a steady load (workloads.fault).
    faults: list[str] = field(default_factory=lambda: ["kill", "stop"])
    # EndpointSlice changes per round of a pykp/kube-* contender (its p50 and p99).
    kube_changes: int = 20
    preset: str = "custom"

    def load(self) -> LoadSettings:
        return LoadSettings(
            duration=self.duration,
            concurrency=self.concurrency,
            threads=self.threads,
            rate=self.rate,
            rate_duration=self.rate_duration,
            timeout_ms=self.timeout_ms,
            probe_timeout=self.probe_timeout,
            probe_interval_us=self.probe_interval_us,
        )


def _run_text(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (
        (proc.stdout or proc.stderr).strip().splitlines()[0]
        if (proc.stdout or proc.stderr)
        else "?"
    )


def machine_description() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    repo = Path(__file__).resolve().parents[2]
    commit = _run_text(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "python": platform.python_version(),
        "iptables": _run_text(["iptables", "-V"]),
        "nft": _run_text(["nft", "-v"]),
        "iperf3": _run_text(["iperf3", "-v"]),
        "git": commit + (" (with local changes)" if dirty not in ("", "?") else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


Progress = Callable[[str, dict[str, Any] | None], None]


def _steps(settings: BenchSettings, contenders: Sequence[Contender]) -> int:
    total = 0
    for i, scale in enumerate(settings.scales):
        for c in contenders:
            if isinstance(c, PykpKubeContender):
                total += 5 * settings.rounds  # start, conns end, rate, change, new service
                continue
            per = 2 + (1 if scale > 1 else 0)  # conns end, rate, conns random
            per += 2 if c.proxies else 0  # program, propagation
            per += len(settings.streams) if (c.throughput and i == 0) else 0
            per += len(settings.faults) if (c.proxies and i == 0) else 0
            total += per * settings.rounds
    return total


def run_bench(
    settings: BenchSettings,
    progress: Progress,
    json_path: Path | None = None,
    set_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run everything; returns the results document (also written to `json_path` after
    every scale, so a long run that is stopped keeps what it measured)."""
    if os.geteuid() != 0:
        raise PermissionError("pykp bench needs root (network namespaces, netfilter)")
    for tool in ("ip", "iptables-restore", "nft", "conntrack", "iperf3"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"{tool} is not installed (apt-get install iproute2 iptables nftables conntrack iperf3)"
            )
    binary = find_loadgen()
    contenders = [make_contender(name, binary) for name in settings.contenders]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": asdict(settings),
        "machine": machine_description(),
        "loadgen": binary,
        "contenders": {},
        "samples": {},
        "errors": [],
    }
    if set_total is not None:
        set_total(_steps(settings, contenders))
    workdir = Path(tempfile.mkdtemp(prefix="pykp-bench-"))
    nodes: dict[str, BenchNode] = {}
    ok = False
    try:
        shared: BenchNode | None = None  # direct and loopback share a lab: neither has rules
        for c in contenders:
            progress(f"setting up {c.name}", None)
            if isinstance(c, PykpKubeContender):  # one more port: the new Service's
                node = BenchNode(binary, max(settings.scales), with_iperf=False, spare_ports=1)
            elif c.proxies:
                node = BenchNode(binary, max(settings.scales))
            else:
                if shared is None:
                    shared = BenchNode(binary, max(settings.scales))
                node = shared
            nodes[c.name] = node
            c.setup(node, workdir)
            c.pause()
            doc["contenders"][c.name] = c.settings()
        for scale_index, scale in enumerate(settings.scales):
            per_scale: dict[str, dict[str, list[Any]]] = {c.name: {} for c in contenders}
            doc["samples"][str(scale)] = per_scale
            for rnd in range(settings.rounds):
                order = contenders[rnd % len(contenders) :] + contenders[: rnd % len(contenders)]
                for c in order:
                    tag = f"{scale} svc, round {rnd + 1}/{settings.rounds}, {c.name}"
                    c.resume()
                    try:
                        _turn(
                            c, nodes[c.name], scale, scale_index == 0, rnd, settings, binary,
                            workdir, per_scale[c.name], tag, progress,
                        )  # fmt: skip
                    finally:
                        c.pause()
            if json_path is not None:
                _write_json(json_path, doc)
        ok = True
    finally:
        for c in contenders:
            with contextlib.suppress(Exception):
                c.teardown()
        for node in {id(n): n for n in nodes.values()}.values():
            with contextlib.suppress(Exception):
                node.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            doc["workdir"] = str(workdir)  # agent logs stay for a look
    return doc


def _turn(
    c: Contender,
    node: BenchNode,
    scale: int,
    first_scale: bool,
    rnd: int,
    settings: BenchSettings,
    binary: str,
    workdir: Path,
    samples: dict[str, list[Any]],
    tag: str,
    progress: Progress,
) -> None:
    """One contender's turn in one round: every workload once."""
    load = settings.load()
    services = ServiceSet(scale, node.backend_ips)

    def record(metric: str, sample: dict[str, Any]) -> None:
        sample["round"] = rnd
        samples.setdefault(metric, []).append(sample)
        progress(f"{tag}: {metric}", {"contender": c.name, "metric": metric, "sample": sample})

    if isinstance(c, PykpKubeContender):
        _kube_turn(c, node, scale, settings, binary, workdir, services, record, tag, progress)
        return
    if c.proxies:
        progress(f"{tag}: clearing", None)
        c.unprogram(services)
        progress(f"{tag}: programming {scale} services", None)
        record("program", workloads.program(node, c, services, load, binary))
    progress(f"{tag}: new connections", None)
    record("conns_end", workloads.conns(node, c, services, "end", load, binary, workdir))
    if scale > 1:
        record("conns_random", workloads.conns(node, c, services, "random", load, binary, workdir))
    record(
        "rate_end",
        workloads.conns(node, c, services, "end", load, binary, workdir, fixed_rate=True),
    )
    if c.throughput and first_scale:
        for streams in settings.streams:
            progress(f"{tag}: iperf3, {streams} stream(s)", None)
            record(
                f"tput_{streams}",
                workloads.throughput(c, services, settings.throughput_seconds, streams),
            )
    if c.proxies:
        progress(f"{tag}: changing endpoints", None)
        record("propagation", workloads.propagation(node, c, services, load, binary))
    if c.proxies and first_scale:
        for kind in settings.faults:
            if kind == "flush" and not isinstance(c, PykpContender):
                continue  # no agent to restore a static rule set
            progress(f"{tag}: fault ({kind}) under a steady load", None)
            record(f"fault_{kind}", workloads.fault(node, c, services, kind, binary))


def _kube_turn(
    c: PykpKubeContender,
    node: BenchNode,
    scale: int,
    settings: BenchSettings,
    binary: str,
    workdir: Path,
    services: ServiceSet,
    record: Callable[[str, dict[str, Any]], None],
    tag: str,
    progress: Progress,
) -> None:
    """A turn of the agent fed through the Kubernetes source: started, measured, stopped."""
    load = settings.load()
    try:
        progress(f"{tag}: API server holds {scale} services; agent start", None)
        record("kube_start", workloads.kube_start(node, c, services, load, binary))
        progress(f"{tag}: new connections", None)
        record("conns_end", workloads.conns(node, c, services, "end", load, binary, workdir))
        record(
            "rate_end",
            workloads.conns(node, c, services, "end", load, binary, workdir, fixed_rate=True),
        )
        progress(f"{tag}: {settings.kube_changes} EndpointSlice changes", None)
        record(
            "kube_change",
            workloads.kube_change(node, c, services, load, binary, settings.kube_changes),
        )
        progress(f"{tag}: a new Service", None)
        record("kube_new", workloads.kube_new(node, c, services, load, binary))
    finally:
        c.stop_agent()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
    tmp.replace(path)
