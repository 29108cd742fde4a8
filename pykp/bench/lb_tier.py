"""`pykp bench --lb-tier`: the load-balancer tier (issue 12) on `LoadBalancerLab`: an
external client, a multipath router over two load-balancer nodes, backends answering
directly. Contenders take turns on one lab, round by round (the order rotates), and every
one runs the same workloads:

* ``direct``: no load balancer; the client dials the backends' own addresses (the ceiling).
* ``kernel-dsr``: the kernel forwards by L2 direct server return (nftables netdev ingress:
  destination MAC by ``jhash`` of the 5-tuple, ``fwd``), what pykp's AF_PACKET datapath
  does in user space.
* ``kernel-nat``: the kernel forwards by full NAT (nftables DNAT by ``jhash`` and
  masquerade on each load-balancer node, forwarding on): replies come back through the
  load balancer, as with IPVS NAT or kube-proxy.
* ``pykp-afpacket``: ``pykp lb`` on each load-balancer node (AF_PACKET, one worker, L2
  direct server return, Maglev with one seed on both nodes).

Workloads: new connections/s (closed loop, `pykp-loadgen`), bulk TCP throughput (iperf3,
1 and 4 streams, one backend: iperf3's control and data connections must meet one server;
the 4 streams hash over both load-balancer nodes) with the machine's CPU use over the run
(and, for pykp, its worker threads'), and small-packet UDP (iperf3 -u, 64-byte datagrams,
4 MB socket buffers, as fast as the client sends: datagrams/s received and lost, and the
kernel's drop counters on the way: softnet backlog, veth ends, the backend's socket).
Results are medians over rounds, with every sample kept.

Bulk TCP through pykp: a veth hands the client's GSO super-packets (up to 64 kB) to the
ring whole, and `pykp lb` forwards them whole with their virtio headers (PACKET_VNET_HDR,
see crates/fastpath/src/datapath/afpacket/mod.rs), as the kernel's own paths do.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

from pykp.bench.loadgen import LoadgenError, find_loadgen, iperf3, run_conns, start_server
from pykp.labs.lab import Host, LabError
from pykp.labs.lb_lab import LoadBalancerLab

__all__ = ["LB_CONTENDERS", "LbBenchSettings", "run_lb_bench"]

LB_CONTENDERS: Final = ("direct", "kernel-dsr", "kernel-nat", "pykp-afpacket")
CONN_PORT: Final = 8080
IPERF_PORT: Final = 5201  # the backend's own address: the direct baseline
# Through the load balancers: a server bound to the VIP, so that its UDP replies come from
# the VIP (an unbound UDP socket would answer from the backend's own address under DSR,
# and the client's connected socket would not take it).
IPERF_VIP_PORT: Final = 5202
# The UDP run's socket buffers (iperf3 -w, both ends). With the default (about 200 kB, some
# 270 small datagrams at their 768-byte truesize) the backend's socket overflowed behind a
# batching load balancer while its reader waited for a CPU: a receiver limit, not the load
# balancer's (RcvbufErrors; benches/README.md).
UDP_SOCKET_BUFFER: Final = "4M"


@dataclass
class LbBenchSettings:
    rounds: int = 3
    duration: float = 5.0  # seconds of each new-connections run
    concurrency: int = 64
    threads: int = 2
    iperf_seconds: float = 3.0
    contenders: Sequence[str] = LB_CONTENDERS


def _backend_targets(lab: LoadBalancerLab, port: int) -> list[str]:
    return [f"{b.ipv4}:{port}" for b in lab.backend_hosts]


def _kernel_nat(lab: LoadBalancerLab, lb: Host, backends: Sequence[Host], port: int) -> None:
    targets = ", ".join(f"{i} : {b.ipv4}" for i, b in enumerate(backends))
    script = f"""
table ip pykp_lab_nat {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {lab.vip} meta l4proto {{ tcp, udp }} th dport {port} \\
            dnat to jhash ip saddr . th sport . ip daddr . th dport mod {len(backends)} map {{ {targets} }}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ct status dnat masquerade
    }}
}}
"""
    _nft(lab, lb, script)


def _nft(lab: LoadBalancerLab, host: Host, script: str) -> None:
    proc = lab.exec(host, ["nft", "-f", "-"], input=script)
    if proc.returncode != 0:
        raise LabError(f"nft on {host.name}: {proc.stderr.strip()}")


def _program(lab: LoadBalancerLab, contender: str, workdir: Path, running: list[Any]) -> None:
    """Set up one contender on every load-balancer node (after `_unprogram`); processes it
    starts go to `running`."""
    if contender == "pykp-afpacket":
        services = workdir / "lb-services.yaml"
        services.write_text(
            lab.services_yaml(CONN_PORT)
            + lab.services_yaml(IPERF_VIP_PORT, [lab.backend_hosts[0]]).split("\n", 1)[1]
        )
        for lb in lab.lb_hosts:
            log = (workdir / f"pykp-lb-{lb.name}.log").open("w")
            running.append(
                lab.popen(lb, lab.pykp_lb_argv(lb, str(services)), stdout=log, stderr=log)
            )
            log.close()
        if not _wait_vip(lab):
            raise LoadgenError("pykp lb did not answer on the VIP")
        return
    for lb in lab.lb_hosts:
        if contender == "kernel-dsr":
            lab.kernel_l2_dsr(lb, list(lab.backend_hosts), CONN_PORT)
            _nft(lab, lb, _dsr_extra_port(lab, lb, IPERF_VIP_PORT))
        elif contender == "kernel-nat":
            lab.exec(lb, ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
            _kernel_nat(lab, lb, lab.backend_hosts, CONN_PORT)
            _nft(lab, lb, _nat_extra_port(lab, IPERF_VIP_PORT))


def _dsr_extra_port(lab: LoadBalancerLab, lb: Host, port: int) -> str:
    # iperf3's control and data connections must reach one server: one backend for it.
    own, mac = lab.mac(lb), lab.mac(lab.backend_hosts[0])
    return (
        f"add rule netdev pykp_lab_dsr ingress ip daddr {lab.vip} meta l4proto {{ tcp, udp }} "
        f"th dport {port} ether saddr set {own} ether daddr set {mac} fwd to eth0\n"
    )


def _nat_extra_port(lab: LoadBalancerLab, port: int) -> str:
    # Full NAT reaches the backend at its own address: its server that is not bound to the VIP.
    backend = lab.backend_hosts[0].ipv4
    return (
        f"add rule ip pykp_lab_nat pre ip daddr {lab.vip} meta l4proto {{ tcp, udp }} "
        f"th dport {port} dnat to {backend}:{IPERF_PORT}\n"
    )


def _lb_counters(lab: LoadBalancerLab, workdir: Path) -> dict[str, int]:
    """Every `pykp lb`'s last counter line (``name=value ...``), summed over the nodes."""
    total: dict[str, int] = {}
    for lb in lab.lb_hosts:
        path = workdir / f"pykp-lb-{lb.name}.log"
        lines = [
            line for line in path.read_text().splitlines() if "=" in line and "pykp lb:" not in line
        ]
        if not lines:
            continue
        for field_ in lines[-1].split():
            name, sep, value = field_.partition("=")
            if sep and value.isdigit():
                total[name] = total.get(name, 0) + int(value)
    return total


def _wait_vip(lab: LoadBalancerLab, timeout: float = 15.0) -> bool:
    from pykp.labs.lb_lab import connect_from

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if connect_from(lab, 39999, CONN_PORT, timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _unprogram(lab: LoadBalancerLab, running: list[Any]) -> None:
    while running:
        proc = running.pop()
        proc.terminate()
        proc.wait(10)
    for lb in lab.lb_hosts:
        for table in ("netdev pykp_lab_dsr", "ip pykp_lab_nat"):
            lab.exec(lb, ["nft", "delete", "table", *table.split()])
        lab.exec(lb, ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        lab.exec(lb, ["conntrack", "-F"])


def _targets(lab: LoadBalancerLab, contender: str, port: int) -> tuple[list[str], str, int]:
    """The connection targets, and the iperf3 host and port, for a contender."""
    if contender == "direct":
        return _backend_targets(lab, port), lab.backend_hosts[0].ipv4, IPERF_PORT
    return [f"{lab.vip}:{port}"], lab.vip, IPERF_VIP_PORT


def _udp_pps(lab: LoadBalancerLab, host: str, port: int, seconds: float) -> dict[str, Any]:
    proc = lab.exec(
        lab.client,
        ["iperf3", "-c", host, "-p", str(port), "-u", "-b", "0", "-l", "64",
         "-w", UDP_SOCKET_BUFFER, "-t", f"{seconds}", "-J"],
        timeout=seconds + 30,
    )  # fmt: skip
    data = json.loads(proc.stdout or "{}")
    if "error" in data or "end" not in data:
        raise LoadgenError(f"iperf3 -u: {data.get('error') or proc.stderr[-500:]}")
    total = data["end"]["sum"]
    received = total["packets"] - total["lost_packets"]
    return {
        "datagrams_per_second": received / total["seconds"],
        "lost_percent": total["lost_percent"],
        "sent": total["packets"],
    }


def _cpu_jiffies() -> tuple[int, int]:
    """The machine's (busy, total) CPU time in clock ticks (`/proc/stat`): namespaces share
    the CPUs, so this is every hop of the lab, client and servers included."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _lb_worker_seconds(running: Sequence[Any]) -> float:
    """CPU seconds used so far by `pykp lb`'s worker threads (named ``pykp-lb-N``)."""
    ticks = 0
    for proc in running:
        task_dir = f"/proc/{proc.pid}/task"
        try:
            tasks = os.listdir(task_dir)
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"{task_dir}/{task}/comm") as comm:
                    if not comm.read().startswith("pykp-lb-"):
                        continue
                with open(f"{task_dir}/{task}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                continue
    return ticks / os.sysconf("SC_CLK_TCK")


def _tcp(
    lab: LoadBalancerLab,
    host: str,
    port: int,
    seconds: float,
    streams: int,
    running: Sequence[Any],
) -> dict[str, Any]:
    """A bulk TCP run (iperf3, `streams` streams), with what it cost: the machine's busy
    CPUs and `pykp lb`'s worker threads (in cores, averaged over the run)."""
    busy0, total0 = _cpu_jiffies()
    worker0, start = _lb_worker_seconds(running), time.monotonic()
    result = iperf3(lab, lab.client, host, port, seconds, streams)
    busy1, total1 = _cpu_jiffies()
    elapsed = time.monotonic() - start
    result["machine_cpus_busy"] = (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)
    if running:
        result["lb_worker_cpus"] = (_lb_worker_seconds(running) - worker0) / elapsed
    return result


def _loss_counters(lab: LoadBalancerLab) -> dict[str, int]:
    """Where a datagram can be lost between the client and the backend's socket, as the
    kernel counts it: the per-CPU backlog every veth delivery goes through
    (`netdev_max_backlog`; /proc/net/softnet_stat, the whole machine's), each veth end on
    the way (a veth counts a frame its peer's backlog refused as its own TX drop), and the
    iperf3 backend's UDP socket (a full receive buffer)."""
    counters: dict[str, int] = {}
    with open("/proc/net/softnet_stat") as softnet:
        counters["softnet_backlog_drops"] = sum(int(line.split()[1], 16) for line in softnet)

    def link(host: Host, ifname: str, label: str) -> None:
        for stat in ("tx_dropped", "rx_dropped"):
            proc = lab.exec(host, ["cat", f"/sys/class/net/{ifname}/statistics/{stat}"])
            if proc.returncode == 0:
                counters[f"{label}_{stat}"] = int(proc.stdout)

    for lb in lab.lb_hosts:
        link(lb, "eth0", lb.name)
    backend = lab.backend_hosts[0]
    link(lab.router, "c0", "router_to_client")
    link(lab.router, f"p-{backend.name}"[:15], "router_to_backend")
    link(backend, "eth0", backend.name)
    snmp = lab.exec(backend, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    udp = [line.split()[1:] for line in snmp if line.startswith("Udp: ")]
    if len(udp) == 2:
        for name in ("InDatagrams", "RcvbufErrors", "InErrors"):
            if name in udp[0]:
                counters[f"{backend.name}_udp_{name}"] = int(udp[1][udp[0].index(name)])
    return counters


def _retry(run: Callable[[], dict[str, Any]], attempts: int = 3) -> dict[str, Any]:
    """An iperf3 run, again after a pause if the server was still closing the last test
    (it serves one at a time and refuses the next for a moment)."""
    for attempt in range(attempts):
        time.sleep(1.0 + attempt)
        try:
            return run()
        except LoadgenError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _turn(
    lab: LoadBalancerLab,
    binary: str,
    contender: str,
    s: LbBenchSettings,
    workdir: Path,
    running: list[Any],
) -> dict[str, Any]:
    _unprogram(lab, running)
    _program(lab, contender, workdir, running)
    targets, iperf_host, iperf_port = _targets(lab, contender, CONN_PORT)
    conns = run_conns(
        lab,
        lab.client,
        binary,
        targets,
        duration=s.duration,
        concurrency=s.concurrency,
        threads=s.threads,
        workdir=workdir,
    )
    pykp = contender == "pykp-afpacket"
    tcp: dict[int, dict[str, Any]] = {}
    for streams in (1, 4):
        before = _lb_counters(lab, workdir) if pykp else {}
        tcp[streams] = _retry(
            partial(_tcp, lab, iperf_host, iperf_port, s.iperf_seconds, streams, running)
        )
        if pykp:
            time.sleep(1.5)  # the next counter line (pykp lb prints them every second)
            tcp[streams]["lb_counters"] = _counter_delta(before, _lb_counters(lab, workdir))
    counters_before = _lb_counters(lab, workdir) if pykp else {}
    loss_before = _loss_counters(lab)
    try:
        udp = _retry(lambda: _udp_pps(lab, iperf_host, iperf_port, s.iperf_seconds))
        # Where the datagrams the backend did not get were lost (the kernel's drop counters).
        udp["kernel_drops"] = _counter_delta(loss_before, _loss_counters(lab))
    except LoadgenError as error:  # recorded, not fatal: the other workloads stand
        udp = {"error": str(error)}
    if pykp:
        time.sleep(1.5)  # the next counter line (pykp lb prints them every second)
        # What the UDP run moved on the load balancers: received, sent, dropped and why.
        udp["lb_counters"] = _counter_delta(counters_before, _lb_counters(lab, workdir))
    return {"conns": conns, "tcp": tcp[1], "tcp4": tcp[4], "udp": udp}


def _counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(after)
        if after.get(k, 0) != before.get(k, 0)
    }


def run_lb_bench(
    settings: LbBenchSettings,
    *,
    workdir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every round, every contender once; the samples and medians."""
    unknown = [c for c in settings.contenders if c not in LB_CONTENDERS]
    if unknown:
        raise ValueError(f"unknown load-balancer contenders {unknown} (known: {LB_CONTENDERS})")
    binary = find_loadgen()
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in settings.contenders}
    with LoadBalancerLab(lb_nodes=2, backends=3) as lab:
        for backend in lab.backend_hosts:
            start_server(lab, backend, binary, str(CONN_PORT), backend.name)
        servers = [
            lab.popen(lab.backend_hosts[0], ["iperf3", "-s", "-p", str(port), *bind])
            for port, bind in ((IPERF_PORT, []), (IPERF_VIP_PORT, ["-B", lab.vip]))
        ]
        time.sleep(0.3)
        if any(server.poll() is not None for server in servers):
            raise LoadgenError("an iperf3 server did not start")
        running: list[Any] = []  # the processes of the contender on turn (pykp lb)
        order = list(settings.contenders)
        for round_ in range(settings.rounds):
            for contender in order:
                sample = _turn(lab, binary, contender, settings, workdir, running)
                samples[contender].append(sample)
                log(
                    f"  round {round_ + 1}/{settings.rounds}, {contender}: "
                    f"{sample['conns']['conns_per_s']:,.0f} conn/s "
                    f"({sample['conns']['failed']} failed), "
                    f"TCP {sample['tcp']['bits_per_second'] / 1e9:.2f} Gbit/s (1 stream) "
                    f"{sample['tcp4']['bits_per_second'] / 1e9:.2f} Gbit/s (4), "
                    + _udp_text(sample["udp"])
                )
            order = order[1:] + order[:1]
        _unprogram(lab, running)
    return {
        "schema": "pykp-bench-lb/1",
        "settings": vars(settings) | {"contenders": list(settings.contenders)},
        "samples": samples,
        "summary": summarize(samples),
    }


def _udp_text(udp: dict[str, Any]) -> str:
    if "error" in udp:
        return f"UDP failed: {udp['error']}"
    text = f"{udp['datagrams_per_second']:,.0f} datagrams/s ({udp['lost_percent']:.1f} % lost)"
    counters = udp.get("lb_counters")
    if counters:
        text += "; load balancers: " + " ".join(f"{k}={v}" for k, v in counters.items())
    return text


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians per contender, and each one's ratio to `direct` where measured."""

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    out: dict[str, dict[str, float]] = {}
    for contender, runs in samples.items():
        out[contender] = {
            "conn_per_s": median([r["conns"]["conns_per_s"] for r in runs]),
            "connect_p99_ms": median([r["conns"]["connect_us"]["p99"] / 1000 for r in runs]),
            "failed": sum(r["conns"]["failed"] for r in runs),
            "tcp_gbit_s": median([r["tcp"]["bits_per_second"] / 1e9 for r in runs]),
            "tcp4_gbit_s": median([r["tcp4"]["bits_per_second"] / 1e9 for r in runs]),
            "tcp_machine_cpus_busy": median([r["tcp"]["machine_cpus_busy"] for r in runs]),
            "tcp4_machine_cpus_busy": median([r["tcp4"]["machine_cpus_busy"] for r in runs]),
            "udp_datagrams_per_s": median(
                [r["udp"]["datagrams_per_second"] for r in runs if "error" not in r["udp"]]
            ),
            "udp_lost_percent": median(
                [r["udp"]["lost_percent"] for r in runs if "error" not in r["udp"]]
            ),
        }
    return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """Plain tables of the medians, with ratios to `direct` and, for bulk TCP, to
    `kernel-nat` when they ran."""
    base, nat = summary.get("direct"), summary.get("kernel-nat")

    def ratio(row: dict[str, float], to: dict[str, float] | None, key: str) -> str:
        return f"{row[key] / to[key]:.2f}" if to and to[key] else "-"

    lines = ["contender      conn/s  (x direct)  connect p99 ms  failed  UDP datagrams/s  lost %"]
    for name, row in summary.items():
        lines.append(
            f"{name:<12} {row['conn_per_s']:>8,.0f}  {ratio(row, base, 'conn_per_s'):>10}  "
            f"{row['connect_p99_ms']:>14.3f}  {row['failed']:>6.0f}  "
            f"{row['udp_datagrams_per_s']:>15,.0f}  {row['udp_lost_percent']:>6.1f}"
        )
    lines.append("")
    lines.append(
        "contender     TCP Gbit/s 1 stream (x direct, x kernel-nat, CPUs busy)"
        "   4 streams (x direct, x kernel-nat, CPUs busy)"
    )
    for name, row in summary.items():
        cells = [
            f"{row[f'{k}_gbit_s']:>6.2f} ({ratio(row, base, f'{k}_gbit_s')}, "
            f"{ratio(row, nat, f'{k}_gbit_s')}, {row[f'{k}_machine_cpus_busy']:.2f})"
            for k in ("tcp", "tcp4")
        ]
        lines.append(f"{name:<12}  {cells[0]:<48}  {cells[1]}")
    return "\n".join(lines)
