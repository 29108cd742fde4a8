"""Driving `pykp-loadgen` (crates/loadgen) and iperf3 inside lab namespaces.

The generator is Rust (crates/loadgen: epoll, nonblocking sockets) so that the Python harness
never sits on the measured path. The extension carries it and the wheel installs it as the
``pykp-loadgen`` command, so a user of the wheel needs no cargo.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykp.labs.lab import Host, _Namespaces

# Any lab: these only run commands in its namespaces.
Lab = _Namespaces

__all__ = [
    "BINARY",
    "LoadgenError",
    "ProbeHandle",
    "find_loadgen",
    "iperf3",
    "run_conns",
    "start_probe",
    "start_server",
]

BINARY = "pykp-loadgen"


class LoadgenError(RuntimeError):
    pass


def find_loadgen() -> str:
    """The load generator's path: ``$PYKP_LOADGEN``, else the ``pykp-loadgen`` command installed
    with this pykp (beside the interpreter, e.g. a virtual environment's bin/), else ``$PATH``."""
    env = os.environ.get("PYKP_LOADGEN")
    if env:
        if not os.access(env, os.X_OK):
            raise LoadgenError(f"PYKP_LOADGEN={env} is not an executable")
        return env
    beside = Path(sys.executable).parent / BINARY
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(BINARY)
    if found:
        return found
    raise LoadgenError(
        f"{BINARY} not found: it is installed with pykp (pip install .); "
        "or point PYKP_LOADGEN at a `cargo build --release -p loadgen` binary"
    )


def main() -> None:
    """The ``pykp-loadgen`` command: the generator built into the extension (no cargo needed)."""
    import signal

    from pykp._fastpath import loadgen_main

    # The generator runs in Rust with the GIL released, where Python's own SIGINT handler
    # would never run: Ctrl-C ends it as it ends the plain binary.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    loadgen_main(sys.argv[1:])


def _read_line(proc: subprocess.Popen[Any], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LoadgenError(f"{what}: no output within {timeout:.0f} s")
        if select.select([proc.stdout], [], [], min(left, 0.2))[0]:
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise LoadgenError(f"{what}: exited ({proc.poll()}) {err}")
            line += chunk
        elif proc.poll() is not None:
            raise LoadgenError(f"{what}: exited with {proc.returncode}")
    return line.decode().strip()


# Listeners per `serve` process: one descriptor each, under a default hard RLIMIT_NOFILE of
# 20,000 with room for connections (raising the hard limit needs CAP_SYS_RESOURCE, which a
# container's root may lack). A bigger range is served by several processes.
PORTS_PER_SERVER = 12000


def start_server(lab: Lab, pod: Host | str, binary: str, ports: str, name: str) -> None:
    """`pykp-loadgen serve` backends in `pod` on `ports` ("8080" or "10000-10999"),
    answering with `name` (one process per `PORTS_PER_SERVER` ports); killed with the lab."""
    first_text, _, last_text = ports.partition("-")
    first, last = int(first_text), int(last_text or first_text)
    procs = []
    for start in range(first, last + 1, PORTS_PER_SERVER):
        end = min(last, start + PORTS_PER_SERVER - 1)
        chunk = str(start) if start == end else f"{start}-{end}"
        procs.append(
            lab.popen(
                pod,
                [binary, "serve", "--port", chunk, "--name", name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    for proc in procs:
        if _read_line(proc, 60, f"server in {pod}") != "ready":
            raise LoadgenError(f"server in {pod} did not start")


def run_conns(
    lab: Lab,
    pod: Host | str,
    binary: str,
    targets: list[str],
    *,
    duration: float,
    concurrency: int,
    threads: int,
    rate: float = 0.0,
    max_conns: int = 2_000_000,
    timeout_ms: int = 3000,
    pick: str = "random",
    workdir: Path | None = None,
) -> dict[str, Any]:
    """One bounded run of new connections; the generator's JSON summary."""
    argv = [
        binary, "conns",
        "--duration", f"{duration}",
        "--concurrency", str(concurrency),
        "--threads", str(threads),
        "--rate", f"{rate}",
        "--max-conns", str(max_conns),
        "--timeout-ms", str(timeout_ms),
        "--pick", pick,
    ]  # fmt: skip
    if len(targets) > 64 and workdir is not None:
        path = workdir / "targets.txt"
        path.write_text("\n".join(targets) + "\n")
        argv += ["--targets-file", str(path)]
    else:
        argv += ["--target", ",".join(targets)]
    proc = lab.exec(pod, argv, timeout=duration + timeout_ms / 1000 + 30)
    if proc.returncode != 0:
        raise LoadgenError(f"loadgen conns failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@dataclass
class ProbeHandle:
    """A running probe: started, announced its first attempt; `result()` waits for it."""

    proc: subprocess.Popen[Any]
    timeout: float

    def result(self) -> dict[str, Any]:
        line = _read_line(self.proc, self.timeout + 10, "probe")
        self.proc.wait(5)
        data: dict[str, Any] = json.loads(line)
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_probe(
    lab: Lab,
    pod: Host | str,
    binary: str,
    target: str,
    expect: list[str],
    timeout: float,
    interval_us: int = 1000,
) -> ProbeHandle:
    """Start probing `target` until one of `expect` answers; returns once it is probing."""
    proc = lab.popen(
        pod,
        [
            binary,
            "probe",
            "--target",
            target,
            "--expect",
            ",".join(expect),
            "--timeout",
            f"{timeout}",
            "--interval-us",
            str(interval_us),
            "--connect-timeout-ms",
            "20",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    handle = ProbeHandle(proc, timeout)
    try:
        if _read_line(proc, 10, "probe") != "ready":
            raise LoadgenError("probe did not start")
    except BaseException:
        handle.kill()
        raise
    return handle


def iperf3(
    lab: Lab, pod: Host | str, host: str, port: int, seconds: float, streams: int
) -> dict[str, Any]:
    """One iperf3 run from `pod`; received bits/s and retransmits."""
    proc = lab.exec(
        pod,
        ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds}", "-P", str(streams), "-J"],
        timeout=seconds + 30,
    )
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise LoadgenError(f"iperf3 failed: {proc.stderr[-1000:] or proc.stdout[-1000:]}") from None
    if "error" in data:
        raise LoadgenError(f"iperf3: {data['error']}")
    end = data["end"]
    return {
        "bits_per_second": end["sum_received"]["bits_per_second"],
        "sent_bits_per_second": end["sum_sent"]["bits_per_second"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "streams": streams,
        "seconds": seconds,
    }
