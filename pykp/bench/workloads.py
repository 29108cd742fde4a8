"""The measurements, one function each; every one returns a JSON-able sample.

* `conns`: new TCP connections per second, closed loop (C connections in flight, each:
  connect, one small request, the answer, close), to the service last in iptables' list
  (``end``) or to services picked at random (``random``); its latencies too.
* `conns` with a rate: the same open loop at a fixed rate below saturation, for connect
  latency without queueing and for CPU cost per connection.
* `throughput`: iperf3 through the service, one and several streams.
* `program`: from no services to the last one answering (a probe connects every ms).
* `propagation`: from changing one service's endpoints (to the spare backend) to the first
  connection answered by it.
* `fault`: a steady 200 new connections/s (1 s connect timeout) while the contender's agent
  is killed and restarted 2 s later, or stopped for 5 s: failed connections and the longest
  wait for the next successful one. Static rule sets (kube-proxy's) have no agent to lose.

CPU cost comes from /proc/stat (the whole machine: user, nice, system, irq and softirq;
forwarding and netfilter run in softirq) over the run, per 1000 connections; a second
figure subtracts the machine's busy rate measured for 0.5 s just before the run, for
machines that other work shares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykp.bench.contenders import SERVING, BenchNode, Contender, PykpContender, ServiceSet
from pykp.bench.loadgen import run_conns, start_probe

__all__ = [
    "LoadSettings",
    "conns",
    "cpu_times",
    "fault",
    "program",
    "propagation",
    "throughput",
]

FAULT_RATE = 200.0  # new connections/s during a fault run
FAULT_TIMEOUT_MS = 1000
# seconds: load before the fault, the fault (dark agent), load after recovery
FAULT_TIMES = {"kill": (1.5, 2.0, 3.0), "stop": (1.5, 5.0, 2.0)}

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


def throughput(contender: Contender, services: ServiceSet, seconds: float, streams: int) -> dict[str, Any]:
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
