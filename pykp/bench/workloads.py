"""The measurements, one function each; every one returns a JSON-able sample.

* `conns`: new TCP connections per second, closed loop (C connections in flight, each:
  connect, one small request, the answer, close), to the service last in iptables' list
  (``end``) or to services picked at random (``random``); its latencies too.
* `conns` with a rate: the same open loop at a fixed rate below saturation, for connect
  latency without queueing and for CPU cost per connection.
* `throughput`: iperf3 through the service, one and several streams.
* `program`: from no services to the last one answering (a probe connects every ms).
* `propagation`: from changing one service's endpoints (to the spare backend) to the first
  connection answered by it (what is the proxy's input, a services file's text, is made
  before the clock starts: `Contender.prepare_change`).
* `kube_start`, `kube_change`, `kube_new` (the ``pykp/kube-*`` contenders, fed through
  the Kubernetes source): agent start to the last service answering (and the agent's RSS
  after its first sync); one EndpointSlice changed to the first connection its new backend
  answers, repeated, p50 and p99; a new Service to its first answered connection.
* `fault`: a steady 200 new connections/s (1 s connect timeout) while the contender's agent
  is killed and restarted 2 s later, or stopped for 5 s: failed connections and the longest
  wait for the next successful one. Static rule sets (kube-proxy's) have no agent to lose.
  `flush`: the same load while `nft flush ruleset` empties the node's ruleset under the
  agent (pykp contenders only: a static rule set has no agent to restore it).

CPU cost comes from /proc/stat (the whole machine: user, nice, system, irq and softirq;
forwarding and netfilter run in softirq) over the run, per 1000 connections; a second
figure subtracts the machine's busy rate measured for 0.5 s just before the run, for
machines that other work shares.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykp.bench.contenders import (
    SERVING,
    BenchNode,
    Contender,
    ContenderError,
    PykpContender,
    PykpKubeContender,
    ServiceSet,
)
from pykp.bench.loadgen import run_conns, start_probe

__all__ = [
    "LoadSettings",
    "conns",
    "cpu_times",
    "fault",
    "kube_change",
    "kube_new",
    "kube_start",
    "program",
    "propagation",
    "throughput",
]

FAULT_RATE = 200.0  # new connections/s during a fault run
FAULT_TIMEOUT_MS = 1000
# seconds: load before the fault, the fault (dark agent), load after recovery
FAULT_TIMES = {"kill": (1.5, 2.0, 3.0), "stop": (1.5, 5.0, 2.0), "flush": (1.5, 0.0, 3.0)}

_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_BUSY = ("user", "nice", "system", "irq", "softirq", "steal")


@dataclass(frozen=True)
class LoadSettings:
    duration: float  # seconds of each closed-loop run
    concurrency: int  # connections in flight
    threads: int  # generator threads
    rate: float  # connections/s of the fixed-rate run
    rate_duration: float
    timeout_ms: int  # a connection not done by then counts as failed
    probe_timeout: float  # bound of program/propagation probes
    probe_interval_us: int


def cpu_times() -> dict[str, float]:
    """Seconds of each /proc/stat CPU state, all CPUs summed."""
    import os

    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return {name: int(value) / hz for name, value in zip(_CPU_FIELDS, fields)}


def _busy(before: dict[str, float], after: dict[str, float]) -> float:
    return sum(after[k] - before[k] for k in _BUSY)


def _cpu_delta(
    before: dict[str, float], after: dict[str, float], conns: int, elapsed: float, background: float
) -> dict[str, float]:
    """CPU seconds over a run; `per_1000` for the whole machine, `per_1000_net` less the
    background rate measured just before (other work on a shared machine)."""
    delta = {k: round(after[k] - before[k], 4) for k in before}
    busy = _busy(before, after)
    delta["busy"] = round(busy, 4)
    delta["background_per_s"] = round(background, 4)
    delta["per_1000"] = busy / conns * 1000 if conns else float("nan")
    net = max(0.0, busy - background * elapsed)
    delta["per_1000_net"] = net / conns * 1000 if conns else float("nan")
    return delta


def background_cpu(seconds: float = 0.5) -> float:
    """Busy CPU seconds per second of the machine while this harness sends nothing."""
    before = cpu_times()
    time.sleep(seconds)
    return _busy(before, cpu_times()) / seconds


def conns(
    node: BenchNode,
    contender: Contender,
    services: ServiceSet,
    which: str,
    load: LoadSettings,
    binary: str,
    workdir: Path,
    fixed_rate: bool = False,
) -> dict[str, Any]:
    node.flush_conntrack()
    indices = [services.count - 1] if which == "end" else list(range(services.count))
    targets = contender.targets(services, indices)
    background = background_cpu()
    before = cpu_times()
    started = time.monotonic()
    result = run_conns(
        node.lab,
        node.client,
        binary,
        targets,
        duration=load.rate_duration if fixed_rate else load.duration,
        concurrency=load.concurrency,
        threads=load.threads,
        rate=load.rate if fixed_rate else 0.0,
        timeout_ms=load.timeout_ms,
        workdir=workdir,
    )
    after = cpu_times()
    result["cpu"] = _cpu_delta(
        before, after, int(result["ok"]), time.monotonic() - started, background
    )
    result["targets"] = len(targets)
    return result


def throughput(
    contender: Contender, services: ServiceSet, seconds: float, streams: int
) -> dict[str, Any]:
    return contender.run_iperf(services, seconds, streams)


def _names(services: ServiceSet, indices: range) -> list[str]:
    return [f"backend-{i}" for i in indices]


def program(
    node: BenchNode, contender: Contender, services: ServiceSet, load: LoadSettings, binary: str
) -> dict[str, Any]:
    """Seconds from the start of programming every service to the last one answering."""
    target = contender.targets(services, [services.count - 1])[0]
    probe = start_probe(
        node.lab, node.client, binary, target, _names(services, range(SERVING)),
        load.probe_timeout, load.probe_interval_us,
    )  # fmt: skip
    try:
        started = time.monotonic()
        details = contender.program_all(services)
        result = probe.result()
    finally:
        probe.kill()
    if isinstance(contender, PykpContender):
        contender.wait_programmed(services, load.probe_timeout)
    return {
        "seconds": (result["t_mono"] - started) if result["found"] else None,
        "found": result["found"],
        "probe": result,
        **details,
    }


def propagation(
    node: BenchNode, contender: Contender, services: ServiceSet, load: LoadSettings, binary: str
) -> dict[str, Any]:
    """Seconds from changing the last service's endpoints (to backend-3 only) to the first
    connection backend-3 answers. Leaves `services` changed."""
    index = services.count - 1
    old = services.service(index)
    spare = services.backends[SERVING]
    services.changed[index] = ((spare, services.port(index)),)
    new = services.service(index)
    target = contender.targets(services, [index])[0]
    probe = start_probe(
        node.lab, node.client, binary, target, [f"backend-{SERVING}"],
        load.probe_timeout, load.probe_interval_us,
    )  # fmt: skip
    try:
        contender.prepare_change(services)
        started = time.monotonic()
        details = contender.change(services, old, new)
        result = probe.result()
    finally:
        probe.kill()
    return {
        "seconds": (result["t_mono"] - started) if result["found"] else None,
        "found": result["found"],
        "probe": result,
        **details,
    }


def fault(
    node: BenchNode, contender: Contender, services: ServiceSet, kind: str, binary: str
) -> dict[str, Any]:
    """Failed connections and the longest dark gap while the agent suffers `kind`."""
    import threading

    before, dark, after = FAULT_TIMES[kind]
    target = contender.targets(services, [services.count - 1])[0]
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.update(
                run_conns(
                    node.lab, node.client, binary, [target], duration=before + dark + after,
                    concurrency=512, threads=1, rate=FAULT_RATE, timeout_ms=FAULT_TIMEOUT_MS,
                )
            )  # fmt: skip
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(error)

    load = threading.Thread(target=run, name="pykp-bench-fault")
    load.start()
    try:
        time.sleep(before)
        contender.disrupt(kind)
        time.sleep(dark)
    finally:
        contender.recover(kind)
        load.join()
    if failure:
        raise failure[0]
    if isinstance(contender, PykpContender):
        contender.wait_programmed(services, 60)
    return {**result, "fault": kind, "dark_seconds": dark}


# --- through the Kubernetes source -------------------------------------------------------------

# Past --min-sync-period since the previous sync began: a write then never waits for the
# rate limiter (what is measured is one change in a quiet cluster, as the file-based
# baselines' `propagation` is).
KUBE_SPACING_MARGIN = 0.25


def _quantile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it (p99
    of 20 changes is their maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _expect(services: ServiceSet, index: int) -> list[str]:
    names = {ip: f"backend-{i}" for i, ip in enumerate(services.backends)}
    return [names[ip] for ip, _ in services.endpoints(index)]


def kube_start(
    node: BenchNode, contender: PykpKubeContender, services: ServiceSet, load: LoadSettings,
    binary: str,
) -> dict[str, Any]:  # fmt: skip
    """Seconds from launching the agent (on a clean node, the API server holding the
    services) to the last service answering; the first sync's end by the agent's own
    metric; the agent's RSS right after."""
    contender.stop_agent()
    published = contender.publish(services)
    contender.clean_node()
    index = services.count - 1
    target = contender.targets(services, [index])[0]
    # Nothing may answer before the agent runs (a rule left behind would make the start free).
    stale = start_probe(
        node.lab, node.client, binary, target, _expect(services, index), 0.3,
        load.probe_interval_us,
    ).result()  # fmt: skip
    if stale["found"]:
        raise ContenderError(f"{target} answered before the agent started: rules left behind")
    probe = start_probe(
        node.lab, node.client, binary, target, _expect(services, index),
        load.probe_timeout, load.probe_interval_us,
    )  # fmt: skip
    try:
        wall = time.time()
        started = time.monotonic()
        contender.start_agent()
        result = probe.result()
    finally:
        probe.kill()
    contender.check_running()
    contender.wait_programmed(services, load.probe_timeout)
    # The services count as programmed from the engine's commit on; the sync is recorded
    # (its end, then its duration: the histogram's count) a moment later.
    deadline = time.monotonic() + load.probe_timeout
    while not contender.syncs() and time.monotonic() < deadline:
        time.sleep(0.02)
    rss = contender.rss_kib()
    last_sync = contender.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    syncs = contender.syncs()
    sync_sum = contender.metric("kubeproxy_sync_proxy_rules_duration_seconds_sum")
    return {
        "seconds": (result["t_mono"] - started) if result["found"] else None,
        "found": result["found"],
        # The end of the latest sync: the first one's when `syncs` is 1.
        "synced_seconds": (last_sync - wall) if last_sync else None,
        "syncs": syncs,
        # The first sync's own duration (the agent's histogram), when it is the only one:
        # the rest of `synced_seconds` is the process start and the API server's lists.
        "sync_seconds": sync_sum if syncs == 1 else None,
        "rss_kib": rss,
        "probe": result,
        "api_writes": published["writes"],
        "api_write_seconds": published["seconds"],
    }


def _quiet(contender: PykpKubeContender, since: float) -> None:
    """Wait until --min-sync-period (+ a margin) has passed since `since`."""
    delay = since + contender.min_sync_period + KUBE_SPACING_MARGIN - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def kube_change(
    node: BenchNode, contender: PykpKubeContender, services: ServiceSet, load: LoadSettings,
    binary: str, changes: int,
) -> dict[str, Any]:  # fmt: skip
    """`changes` times: one EndpointSlice written with its endpoints moved (to the spare
    backend only; a service already moved goes back to its 3), the seconds to the first
    connection its new backend answers. Services are taken from the last one down (a
    single service alternates). Each write comes more than --min-sync-period after the
    previous change was answered. Leaves `services` (and the API server) changed."""
    contender.check_running()
    spare = services.backends[SERVING]
    seconds: list[float] = []
    counts: list[float | None] = []  # the agent's syncs so far, before each write
    missed = 0
    last = time.monotonic()
    for j in range(changes):
        index = services.count - 1 - (j % services.count)
        if index in services.changed:
            del services.changed[index]
        else:
            services.changed[index] = ((spare, services.port(index)),)
        target = contender.targets(services, [index])[0]
        probe = start_probe(
            node.lab, node.client, binary, target, _expect(services, index),
            load.probe_timeout, load.probe_interval_us,
        )  # fmt: skip
        try:
            _quiet(contender, last)
            counts.append(contender.syncs())
            started = time.monotonic()
            contender.write_slice(services, index)
            result = probe.result()
        finally:
            probe.kill()
        last = time.monotonic()
        if result["found"]:
            seconds.append(result["t_mono"] - started)
        else:
            missed += 1
    _quiet(contender, last)
    counts.append(contender.syncs())
    syncs = [b - a if a is not None and b is not None else None for a, b in zip(counts, counts[1:])]
    contender.check_running()
    return {
        "changes": changes,
        "found": missed == 0,
        "missed": missed,
        "seconds": seconds,
        "p50": _quantile(seconds, 0.5) if seconds else None,
        "p99": _quantile(seconds, 0.99) if seconds else None,
        "max": max(seconds) if seconds else None,
        # Syncs the agent did from each write to the next one's (1 expected; more: a
        # periodic resync ran in between, and may have held the change up).
        "syncs": syncs,
        "min_sync_period": contender.min_sync_period,
    }


def _wait_sync(
    contender: PykpKubeContender, queued: float | None, before: float | None, timeout: float
) -> None:
    """After a write: if it queued a sync (the agent's last-queued timestamp moved within
    a second), wait for a sync to end."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        now = contender.metric("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds")
        if now != queued or (contender.syncs() or 0) > (before or 0):
            break
        time.sleep(0.02)
    else:
        return  # nothing queued: nothing to wait for
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (contender.syncs() or 0) > (before or 0):
            return
        time.sleep(0.05)


def kube_new(
    node: BenchNode, contender: PykpKubeContender, services: ServiceSet, load: LoadSettings,
    binary: str,
) -> dict[str, Any]:  # fmt: skip
    """Seconds from creating one more Service (index `services.count`, its EndpointSlice
    written before, as the controller has it by the time the Service is seen, and synced)
    to its first answered connection."""
    contender.check_running()
    index = services.count
    grown = ServiceSet(services.count + 1, services.backends, dict(services.changed))
    # The slice alone first; its sync (nothing to program without the Service) is waited
    # for, and --min-sync-period after it, so the Service's write waits for no one.
    queued = contender.metric("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds")
    before = contender.syncs()
    contender.write_slice(grown, index)
    _wait_sync(contender, queued, before, load.probe_timeout)
    target = contender.targets(grown, [index])[0]
    probe = start_probe(
        node.lab, node.client, binary, target, _expect(grown, index),
        load.probe_timeout, load.probe_interval_us,
    )  # fmt: skip
    try:
        _quiet(contender, time.monotonic())
        started = time.monotonic()
        contender.write_service(grown, index)
        result = probe.result()
    finally:
        probe.kill()
    contender.check_running()
    contender._published[index] = grown.endpoints(index)
    return {
        "seconds": (result["t_mono"] - started) if result["found"] else None,
        "found": result["found"],
        "probe": result,
    }
