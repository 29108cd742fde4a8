"""The control plane at scale, through the Kubernetes source: `pykp run` against the stand-in
API server holding N Services and N EndpointSlices (3 endpoints each), no traffic.

Run as root from the repository root with the venv of `bash scripts/install.sh --test`:

    .venv/bin/python benches/control_plane_scale.py 10000 30000 100000

Per N, in a network namespace of its own (removed afterwards):
- start: agent launched -> all N services programmed (its /healthz answers 200 and its
  `pykp_services` gauge is N: the first sync, engine and nftables included, is committed;
  /metrics is read only then, each answer costing the agent's start ~5 ms at 10,000
  services), and the agent's RSS then
  (the peak of the first load, or just after the heap was given back: it varies) and at
  the end of the run (`rss_end_mib`: what it holds in steady state);
- change: one EndpointSlice updated (an endpoint replaced) -> the end of the sync that
  programmed it (`kubeproxy_sync_proxy_rules_last_timestamp_seconds` past the write; the
  kernel's sets hold the new backend at that point), 20 times, each more than
  --min-sync-period (1 s, the default) after the previous one;
- new Service: its EndpointSlice first, then (past --min-sync-period) the Service ->
  programmed, the same way.
`pykp bench` measures the same through real connections, against iptables and nftables, up
to 30,000 services (the load generator's backend ports run out past that).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

NAMESPACE = f"pykp-cp-scale-{os.getpid()}"
METRICS = "127.0.0.1:10249"
HEALTHZ = "127.0.0.1:10256"
PROGRAMMED = "kubeproxy_network_programming_duration_seconds_count"


# Distinct backends the default --mark-mask (16 bits of ids) can name: past it, services
# are refused (counted) until the mask is widened. Larger sets share backends.
_BACKEND_POOL = 60000


def _pods(index: int) -> list[str]:
    pods = [(index * 3 + k) % _BACKEND_POOL for k in range(3)]
    return [f"10.{244 + pod // 65536}.{pod // 256 % 256}.{pod % 256}" for pod in pods]


def _cluster_ip(index: int) -> str:
    return f"10.{96 + index // 65536}.{index // 256 % 256}.{index % 256}"


def _server(count: int, pipe: Connection) -> None:
    """The child: the API server inside the namespace, writing what the parent asks."""
    from pykp.labs.kube_apiserver import KubeApiServer, endpoint_slice, service
    from pykp.labs.lab import in_namespace

    with in_namespace(NAMESPACE):
        server = KubeApiServer().start()
    server.create_many(
        "services", (service(f"svc-{i}", _cluster_ip(i), namespace="ns") for i in range(count))
    )
    server.create_many(
        "endpointslices",
        (endpoint_slice(f"svc-{i}-1", f"svc-{i}", _pods(i), namespace="ns") for i in range(count)),
    )
    pipe.send(str(server.write_kubeconfig(Path(f"/tmp/{NAMESPACE}.kubeconfig"))))
    while True:
        command, index, extra = pipe.recv()
        if command == "stop":
            server.stop()
            pipe.send(None)
            return
        written = time.time()
        if command == "slice":
            server.update(
                "endpointslices",
                endpoint_slice(f"svc-{index}-1", f"svc-{index}", extra, namespace="ns"),
            )
        elif command == "slice-of-new":
            server.create(
                "endpointslices",
                endpoint_slice(f"svc-{index}-1", f"svc-{index}", _pods(index), namespace="ns"),
            )
        elif command == "service":
            server.create("services", service(f"svc-{index}", _cluster_ip(index), namespace="ns"))
        pipe.send(written)


def _metric(name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return None


def _in_namespace_metric(name: str) -> float | None:
    from pykp.labs.lab import in_namespace

    with in_namespace(NAMESPACE):
        return _metric(name)


def _in_namespace_synced() -> bool:
    """/healthz answers 200: the first sync is committed (kube-proxy's meaning)."""
    from pykp.labs.lab import in_namespace

    with in_namespace(NAMESPACE):
        try:
            with urllib.request.urlopen(f"http://{HEALTHZ}/healthz", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:  # 503 (an HTTPError) until then, or not listening yet
            return False


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _agent_pid(pid: int) -> int:
    """The agent's pid: `pid` itself, or its child when py-spy runs it (--profile)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    exe = os.readlink(f"/proc/{pid}/exe")
    return int(children[0]) if "py-spy" in exe and children else pid


def _wait(predicate: Any, timeout: float, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def measure(count: int, changes: int, profile: str | None = None) -> dict[str, Any]:
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the namespace is removed anyway
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_server, args=(count, child), daemon=True)
    agent: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"], check=True)
        server.start()
        kubeconfig = parent.recv()
        log = open(f"/tmp/{NAMESPACE}-{count}.log", "w")  # noqa: SIM115 - lives with the agent
        started = time.monotonic()
        # py-spy (when asked) samples the agent from its first instruction: its raw stacks
        # are written when the agent stops.
        wrapper = (
            ["py-spy", "record", "--format", "raw", "--threads", "-r", "250", "-o",
             f"{profile}.{count}.txt", "--"]
            if profile else []
        )  # fmt: skip
        agent = subprocess.Popen(
            ["ip", "netns", "exec", NAMESPACE, *wrapper, sys.executable, "-c",
             "import sys; from pykp.cli.app import app; sys.argv[0] = 'pykp'; app()",
             "run", "--kubeconfig", kubeconfig, "--hostname-override", "node",
             "--healthz-bind-address", HEALTHZ, "--metrics-bind-address", METRICS,
             "--state-dir", f"/tmp/{NAMESPACE}-state"],
            stdout=log, stderr=subprocess.STDOUT, cwd="/",
        )  # fmt: skip
        # /healthz until the first sync is in (cheap for the agent: polled often, /metrics
        # cost it ~5 ms of its interpreter per answer at 10,000 services, 10% of its start
        # at 20 answers a second), then the gauge, which the first sync brings to N.
        if not (
            _wait(_in_namespace_synced, 600, 0.01)
            and _wait(lambda: _in_namespace_metric("pykp_services") == count, 60, 0.05)
        ):
            raise RuntimeError(f"not programmed in 600 s; see {log.name}")
        start = time.monotonic() - started
        rss = _rss_mib(_agent_pid(agent.pid))
        seconds = []
        for j in range(changes):
            time.sleep(1.2)  # past --min-sync-period: no change waits for the limiter
            index = (j * 7919) % count
            pods = [*_pods(index)[:2], f"10.245.{j // 256}.{j % 256}"]
            # A sync that programs a change counts it in the programming-latency histogram
            # (a periodic resync with nothing new does not).
            programmed = _in_namespace_metric(PROGRAMMED) or 0
            parent.send(("slice", index, pods))
            written = parent.recv()
            if _wait(lambda seen=programmed: (_in_namespace_metric(PROGRAMMED) or 0) > seen, 10):
                synced = _in_namespace_metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                seconds.append((synced or 0) - written)
        # The new Service's slice first (it programs nothing alone), then, past
        # --min-sync-period, the Service: timed alone.
        synced_before = _in_namespace_metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        parent.send(("slice-of-new", count, None))
        parent.recv()
        # The slice's own sync (which programs nothing) may itself wait out the rate limit:
        # the Service is written past --min-sync-period after that sync, not after the write.
        _wait(
            lambda: (
                _in_namespace_metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                != synced_before
            ),
            10,
        )
        time.sleep(1.2)
        programmed = _in_namespace_metric(PROGRAMMED) or 0
        parent.send(("service", count, None))
        written = parent.recv()
        new_service = None
        if _wait(
            lambda seen=programmed: (
                (_in_namespace_metric(PROGRAMMED) or 0) > seen
                and _in_namespace_metric("pykp_services") == count + 1
            ),
            30,
        ):
            new_service = (
                _in_namespace_metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") or 0
            ) - written
        seconds.sort()
        rss_end = _rss_mib(_agent_pid(agent.pid))
        return {
            "services": count,
            "start_s": round(start, 2),
            "rss_mib": round(rss),
            "rss_end_mib": round(rss_end),
            "change_p50_ms": round(statistics.median(seconds) * 1e3, 1) if seconds else None,
            "change_max_ms": round(seconds[-1] * 1e3, 1) if seconds else None,
            "changes_seen": len(seconds),
            "new_service_ms": round(new_service * 1e3, 1) if new_service is not None else None,
        }
    finally:
        if agent is not None:
            if profile:  # py-spy is the child of `ip netns exec`: stop the agent itself
                subprocess.run(["pkill", "-TERM", "-P", str(agent.pid)], check=False)
            else:
                agent.terminate()
            agent.wait(30)
        if server.is_alive():
            parent.send(("stop", 0, None))
            server.join(30)
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument(
        "--profile", metavar="PREFIX", help="run the agent under py-spy (on PATH): PREFIX.N.txt"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace)")
    for count in args.counts:
        print(measure(count, args.changes, args.profile), flush=True)


if __name__ == "__main__":
    main()
