"""The tail of issue 9: wrk through a service whose proxy restarts before every run.

Run as root from the repository root with the venv of `bash scripts/install.sh --test`:

    sudo .venv/bin/python benches/tail_restarts.py --sequential --runs 12 \
        --contenders nftables,iptables,pykp/round-robin,pykp/random --json tail.json

Each contender gets a lab of its own (`pykp.bench.contenders.BenchNode`'s topology: a node
namespace, three nginx backends in pods, one client pod; every namespace is removed at the
end, on failure too) and one service (`ServiceSet(1)`: 10.96.0.16:80 -> the three backends'
port 10000). Before each of its runs a contender is "restarted": kube-proxy's rule sets
(`rulegen`, loaded by the bench's `NftablesContender` / `IptablesContender`) are deleted and
loaded again; a pykp agent (`PykpContender`: the real `pykp run` fed a services file) is
stopped (SIGTERM, as a DaemonSet rolling update does) and a new one started, and the run
waits until it has programmed the services. Then (after --settle seconds) one wrk run:

    wrk -t2 -c16 -d8s --latency -H 'Connection: close' http://10.96.0.16/

in the client pod. Per run: wrk's req/s and latency p50/p99 (wrk's latency excludes the
connect), its socket errors; the deltas over the run of the client's and the backends' TCP
counters (`nstat -asz` in each namespace: TcpExtTW*, PAWS*, TCPTimeWaitOverflow,
TCPSynRetrans, ListenOverflows/ListenDrops, TcpAttemptFails, TcpEstabResets, ...), the
TIME_WAIT sockets they hold (/proc/net/sockstat; the client's at the start and the end), the
time of one connect() syscall from the client before and after the run (the median of 40
non-blocking connects: the kernel's choice of a source port), the machine's CPU split
(/proc/stat), the node's conntrack statistics (`conntrack -S`: insert_failed, drop,
early_drop, clash_resolve) and entry count, and the client's ephemeral port range.
Contenders are interleaved run by run (the order rotates each round) unless --sequential,
which runs each contender's runs back to back in its lab (the original report's conditions:
one run every ~9.5 s; interleaved, a lab rests between its runs and its client never piles
up a minute of TIME_WAIT sockets). A run is "collapsed" below half its contender's median
rate, "dipped" below 3/4.

`--client-sysctl KEY=VALUE` sets a sysctl in the client pod's namespace only (e.g.
``net.ipv4.ip_local_port_range="1024 65535"`` or ``net.ipv4.tcp_tw_reuse=1``), to test a
cause on the lab's side. Nothing outside the lab's namespaces is changed.

What it found (benches/README.md, "The tail"): the collapse is the client's TIME_WAIT
sockets filling the even half of its port range (connect() then walks thousands of taken
ports in the kernel), for nftables and iptables as for pykp; a wider client port range
removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pykp.bench.contenders import (
    BACKEND_PORT,
    SERVICE_PORT,
    SERVING,
    BenchNode,
    Contender,
    IptablesContender,
    NftablesContender,
    PykpContender,
    ServiceSet,
    make_contender,
)
from pykp.bench.loadgen import find_loadgen
from pykp.labs.lab import Lab

DEFAULT_CONTENDERS = "nftables,iptables,pykp/round-robin,pykp/random"

# Counters shown in the table (summed over the three backends, or the client's); every
# counter that moved is kept in --json.
SHOWN = (
    "TcpExtTW",
    "TcpExtTWRecycled",
    "TcpExtTWKilled",
    "TcpExtPAWSActive",
    "TcpExtPAWSEstab",
    "TcpExtPAWSTimewait",
    "TcpExtPAWSOldAck",
    "TcpExtTSEcrRejected",
    "TcpExtTCPACKSkippedPAWS",
    "TcpExtTCPTimeWaitOverflow",
    "TcpExtTCPSynRetrans",
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpAttemptFails",
    "TcpEstabResets",
    "TcpExtTCPChallengeACK",
    "TcpOutRsts",
    "TcpActiveOpens",
    "TcpPassiveOpens",
)
CONNTRACK_KEYS = ("insert_failed", "drop", "early_drop", "clash_resolve", "invalid", "insert")

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {port};
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


class NginxNode(BenchNode):
    """`BenchNode`'s lab (a node, backend pods, one client pod) with nginx in each backend
    on port BACKEND_PORT (service 0's endpoint port) instead of the bench's generator."""

    def __init__(self, workdir: Path) -> None:  # not BenchNode.__init__: no loadgen servers
        self.lab = Lab(backends=SERVING, clients=1)
        self.created = time.monotonic()
        try:
            for pod in self.lab.backend_pods:
                conf_dir = workdir / f"{self.lab.key}-{pod.name}"
                conf_dir.mkdir(parents=True)
                conf = conf_dir / "nginx.conf"
                conf.write_text(NGINX_CONF.format(dir=conf_dir, port=BACKEND_PORT, name=pod.name))
                self.lab.popen(pod, ["nginx", "-c", str(conf), "-p", str(conf_dir)])
            self.client = self.lab.client_pods[0]
            self.backend_ips = [pod.ipv4 for pod in self.lab.backend_pods]
            self._wait_nginx()
        except BaseException:
            self.lab.close()
            raise

    def _wait_nginx(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for ip in self.backend_ips:
            while True:
                with self.lab.in_namespace(self.client):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.settimeout(1)
                    s.connect((ip, BACKEND_PORT))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nginx on {ip}:{BACKEND_PORT} did not start") from None
                    time.sleep(0.1)
                finally:
                    s.close()


# --- counters --------------------------------------------------------------------------------


def nstat(lab: Lab, ref: Any) -> dict[str, int]:
    """Absolute TCP/IP counters of one namespace (-s: nstat's history file is left alone)."""
    out = lab.exec(ref, ["nstat", "-asz"], check=True).stdout
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("#") and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def sockstat_tw(lab: Lab, ref: Any) -> int:
    """TIME_WAIT sockets the namespace holds now."""
    out = lab.exec(ref, ["cat", "/proc/net/sockstat"], check=True).stdout
    match = re.search(r"^TCP:.*\btw (\d+)", out, re.M)
    return int(match.group(1)) if match else -1


def cpu_times() -> list[int]:
    """The machine's CPU jiffies (/proc/stat's first line: user nice system idle iowait irq
    softirq ...): the whole machine, every lab and whatever else shares it."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]


def cpu_share(before: list[int], after: list[int]) -> dict[str, float]:
    d = [a - b for a, b in zip(after, before)]
    total = sum(d) or 1
    return {
        "user": round(100 * (d[0] + d[1]) / total, 1),
        "sys": round(100 * d[2] / total, 1),
        "softirq": round(100 * (d[5] + d[6]) / total, 1),
        "idle": round(100 * (d[3] + d[4]) / total, 1),
    }


def connect_cost_us(node: BenchNode, ip: str, port: int, count: int = 40) -> float:
    """Median time (us) of a non-blocking connect() from the client pod to ip:port: the
    syscall returns once the kernel has picked a source port (the SYN is sent, the socket
    closed at once, so it leaves no TIME_WAIT behind)."""
    samples = []
    linger = struct.pack("ii", 1, 0)
    for _ in range(count):
        with node.lab.in_namespace(node.client):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            started = time.perf_counter()
            s.connect_ex((ip, port))
            samples.append((time.perf_counter() - started) * 1e6)
        finally:
            s.close()
    return statistics.median(samples)


def conntrack_stats(node: BenchNode) -> dict[str, int]:
    """`conntrack -S` summed over the CPUs, plus the entry count."""
    totals: dict[str, int] = {}
    for line in node.node_exec(["conntrack", "-S"]).splitlines():
        for key, value in re.findall(r"(\w+)=(\d+)", line):
            if key != "cpu":
                totals[key] = totals.get(key, 0) + int(value)
    count = node.node_exec(["conntrack", "-C"]).strip()
    totals["entries"] = int(count) if count.isdigit() else -1
    return totals


def snapshot(node: BenchNode) -> dict[str, Any]:
    lab = node.lab
    return {
        "client": nstat(lab, node.client),
        "backends": [nstat(lab, pod) for pod in lab.backend_pods],
        "conntrack": conntrack_stats(node),
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    backends: dict[str, int] = {}
    for b, a in zip(before["backends"], after["backends"]):
        for key, value in _delta(a, b).items():
            backends[key] = backends.get(key, 0) + value
    conntrack = {
        k: after["conntrack"][k] - before["conntrack"].get(k, 0)
        for k in after["conntrack"]
        if k != "entries"
    }
    conntrack["entries_end"] = after["conntrack"]["entries"]
    return {
        "client": _delta(after["client"], before["client"]),
        "backends": backends,
        "conntrack": conntrack,
    }


# --- wrk -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rate"] = float(rate.group(1)) if rate else 0.0
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _ms(match.group(1)) if match else None
    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    result["requests"] = int(requests.group(1)) if requests else 0
    errors = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups())))
        if errors
        else {}
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    return result


def run_wrk(node: BenchNode, url: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
        "-H", "Connection: close", url,
    ]  # fmt: skip
    proc = node.lab.exec(node.client, argv, timeout=args.duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return parse_wrk(proc.stdout)


# --- restarts --------------------------------------------------------------------------------


class Subject:
    """One contender in its own lab, restarted before each run."""

    def __init__(self, name: str, workdir: Path, args: argparse.Namespace) -> None:
        self.name = name
        self.contender: Contender = make_contender(name, find_loadgen())
        self.node = NginxNode(workdir)
        try:
            self._setup(args, workdir)
        except BaseException:
            self.close()
            raise
        self.last_run_end: float | None = None
        self.first_run: float | None = None

    def _setup(self, args: argparse.Namespace, workdir: Path) -> None:
        self.services = ServiceSet(1, self.node.backend_ips)
        self.url = f"http://{self.services.ip(0)}:{SERVICE_PORT}/"
        for setting in args.client_sysctl:
            self.node.lab.exec(self.node.client, ["sysctl", "-w", setting], check=True)
        port_range = self.node.lab.exec(
            self.node.client, ["sysctl", "-n", "net.ipv4.ip_local_port_range"], check=True
        )
        tw_reuse = self.node.lab.exec(
            self.node.client, ["sysctl", "-n", "net.ipv4.tcp_tw_reuse"], check=True
        )
        self.port_range = " ".join(port_range.stdout.split())
        self.tw_reuse = tw_reuse.stdout.strip()
        self.contender.setup(self.node, workdir)
        self.contender.program_all(self.services)
        if isinstance(self.contender, PykpContender):
            self.contender.wait_programmed(self.services, timeout=60)
        self.contender.pause()

    def restart(self) -> float:
        """The proxy anew (seconds until it serves the services)."""
        c = self.contender
        started = time.monotonic()
        if isinstance(c, PykpContender):
            c.teardown()  # SIGCONT, SIGTERM, wait: the previous agent is gone
            c.recover("kill")  # a new `pykp run`, same flags and services file
            c.wait_programmed(self.services, timeout=60)
        elif isinstance(c, (NftablesContender, IptablesContender)):
            c.unprogram(self.services)
            c.program_all(self.services)
        else:
            raise ValueError(f"{self.name}: not a proxy with rules or an agent")
        return time.monotonic() - started

    def run(self, index: int, args: argparse.Namespace) -> dict[str, Any]:
        self.contender.resume()
        try:
            restart = self.restart()
            time.sleep(args.settle)
            tw_start = sockstat_tw(self.node.lab, self.node.client)
            probe_start = connect_cost_us(self.node, self.services.ip(0), SERVICE_PORT)
            cpu_before = cpu_times()
            started = time.monotonic()
            before = snapshot(self.node)
            wrk = run_wrk(self.node, self.url, args)
            after = snapshot(self.node)
            ended = time.monotonic()
            cpu = cpu_share(cpu_before, cpu_times())
            probe_end = connect_cost_us(self.node, self.services.ip(0), SERVICE_PORT)
            tw_client = sockstat_tw(self.node.lab, self.node.client)
            tw_backends = [sockstat_tw(self.node.lab, p) for p in self.node.lab.backend_pods]
        finally:
            self.contender.pause()
        record = {
            "contender": self.name,
            "run": index,
            "lab_age_s": round(started - self.node.created, 1),
            "since_previous_s": (
                None if self.last_run_end is None else round(started - self.last_run_end, 1)
            ),
            "restart_s": round(restart, 3),
            "wall_s": round(ended - started, 2),
            **wrk,
            "counters": deltas(before, after),
            "tw_end": {"client": tw_client, "backends": tw_backends},
            "client_tw_start": tw_start,
            "connect_us": {"start": round(probe_start, 1), "end": round(probe_end, 1)},
            "load_age_s": round(started - (self.first_run or started), 1),
            "machine_cpu": cpu,
        }
        self.last_run_end = ended
        self.first_run = self.first_run or started
        return record

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.contender.resume()
            self.contender.teardown()
        self.node.close()


# --- report ----------------------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:{fmt}} ({low:{fmt}}-{high:{fmt}})"


def mark_collapses(records: list[dict[str, Any]]) -> None:
    """A run below half its contender's median rate has collapsed; below 3/4, dipped."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["contender"], []).append(r)
    for runs in by_name.values():
        median = statistics.median(r["rate"] for r in runs)
        for r in runs:
            r["collapsed"] = r["rate"] < 0.5 * median
            r["dipped"] = r["rate"] < 0.75 * median


def _short(name: str) -> str:
    return name.removeprefix("TcpExt").removeprefix("Tcp")


def _picked(counters: dict[str, int]) -> str:
    skip = ("TcpActiveOpens", "TcpPassiveOpens")
    return " ".join(
        f"{_short(k)}={counters[k]}" for k in SHOWN if counters.get(k) and k not in skip
    )


def print_runs(records: list[dict[str, Any]]) -> None:
    """One line a run. load: s since the lab's first run; rst: restart s; cliTW: the client's
    TIME_WAIT sockets at the start > end; conn us: a connect()'s syscall at the start > end;
    sy/si: the machine's system / softirq CPU %; then the counters that moved (client |
    backends summed | node conntrack)."""
    print(
        f"{'contender':>16}  run  load    rst     req/s     p50     p99  errs        cliTW"
        f"    bkTW      conn us  sy/si  counters (client | backends | conntrack)"
    )
    for r in records:
        errs = sum(r["errors"].values()) if r["errors"] else 0
        c = r["counters"]
        ct = " ".join(
            f"{k}={c['conntrack'][k]}" for k in CONNTRACK_KEYS[:4] if c["conntrack"].get(k)
        )
        tw = f"{r['client_tw_start']}>{r['tw_end']['client']}"
        conn = f"{r['connect_us']['start']:.0f}>{r['connect_us']['end']:.0f}"
        cpu = f"{r['machine_cpu']['sys']:.0f}/{r['machine_cpu']['softirq']:.0f}"
        flag = "*" if r.get("collapsed") else ("~" if r.get("dipped") else " ")
        print(
            f"{r['contender']:>16}  {r['run']:>3}  {r['load_age_s']:>4.0f}  {r['restart_s']:>5.2f}"
            f"  {r['rate']:>7.0f}{flag}  {_fmt_ms(r['p50_ms']):>6}  {_fmt_ms(r['p99_ms']):>6}"
            f"  {errs:>4}  {tw:>11}  {sum(r['tw_end']['backends']):>6}  {conn:>11}  {cpu:>5}"
            f"  {_picked(c['client']) or '-'} | {_picked(c['backends']) or '-'}"
            f" | {ct or '-'} entries={c['conntrack']['entries_end']}"
        )


def print_summary(records: list[dict[str, Any]], names: list[str]) -> None:
    print()
    print(
        "| contender | runs | req/s median (min-max) | p99 ms median (min-max) "
        "| collapsed (< 0.5x median) | dipped (< 0.75x) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        runs = [r for r in records if r["contender"] == name]
        if not runs:
            continue
        rates = [r["rate"] for r in runs]
        p99 = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]

        def listed(key: str, runs: list[dict[str, Any]] = runs) -> str:
            hits = [str(r["run"]) for r in runs if r.get(key)]
            return f"{len(hits)}" + (f" (runs {','.join(hits)})" if hits else "")

        print(
            f"| {name} | {len(runs)} | {_median_range(rates, ',.0f')} "
            f"| {_median_range(p99, '.2f')} | {listed('collapsed')} | {listed('dipped')} |"
        )


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after a restart")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="each contender's runs back to back instead of interleaved",
    )
    parser.add_argument(
        "--client-sysctl",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in the client pod's namespace only (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]

    workdir = Path(tempfile.mkdtemp(prefix="pykp-tail-"))
    subjects: list[Subject] = []
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for name in names:
            subjects.append(Subject(name, workdir, args))
            s = subjects[-1]
            print(
                f"# {name}: lab {s.node.lab.key}, client port range {s.port_range}, "
                f"tcp_tw_reuse {s.tw_reuse}",
                flush=True,
            )
        if args.sequential:
            plan = [(s, i) for s in subjects for i in range(1, args.runs + 1)]
        else:
            plan = []
            for i in range(1, args.runs + 1):
                shift = (i - 1) % len(subjects)
                plan += [(s, i) for s in subjects[shift:] + subjects[:shift]]
        for subject, index in plan:
            record = subject.run(index, args)
            records.append(record)
            print(
                f"  {record['contender']:>16} run {index:>2}: {record['rate']:>8.0f} req/s "
                f"p50 {_fmt_ms(record['p50_ms'])} p99 {_fmt_ms(record['p99_ms'])} ms "
                f"(lab age {record['lab_age_s']:.0f} s, restart {record['restart_s']:.2f} s)",
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: the runs so far", file=sys.stderr)
    finally:
        for subject in subjects:
            subject.close()
    if not records:
        return 1
    mark_collapses(records)
    print()
    print_runs(records)
    print_summary(records, names)
    print(f"\n{len(records)} runs in {time.monotonic() - started:.0f} s; agent logs in {workdir}")
    if args.json:
        doc = {
            "argv": sys.argv,
            "command": f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency -H 'Connection: close' URL",
            "client_sysctl": args.client_sysctl,
            "port_range": {s.name: s.port_range for s in subjects},
            "tcp_tw_reuse": {s.name: s.tw_reuse for s in subjects},
            "uname": subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip(),
            "runs": records,
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
