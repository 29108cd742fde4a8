"""End to end: `pykp run`'s datapath flags, each through the real CLI on a lab node, with
real clients in pod namespaces and real netfilter rules.

--queues (several queues and reader threads), --mark-mask (a non-default field, foreign
mark bits kept), --conntrack-capacity (a tiny table: evictions counted, nothing refused),
--maglev-table-size (a non-default prime is the table used; a non-prime is refused),
--fail-open / --no-fail-open (a full queue: the kernel path, or a counted drop) and
`pykp run --cleanup` (kube-proxy's: remove the rules and exit).

Privileged: namespaces are the lab's; the root namespace is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykp.labs.lab import Lab
from pykp.labs.lab_agent import TCP_ECHO, LabAgent, connect_error, http_get, wait_for
from pykp.self_command import pykp_command

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

SERVICES = """
services:
  - name: web-rr
    clusterIP: 10.96.0.10
    policy: round-robin
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}]
  - name: web-maglev
    clusterIP: 10.96.0.12
    policy: maglev
    hashKey: 5-tuple
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}]
  - name: echo
    clusterIP: 10.96.0.17
    policy: round-robin
    ports: [{port: 7000, targetPort: 7000}]
    endpoints: [{ip: 10.244.0.10}, {ip: 10.244.0.11}, {ip: 10.244.0.12}]
"""
NAMES = {"10.244.0.10": "backend-0", "10.244.0.11": "backend-1", "10.244.0.12": "backend-2"}
ALL = set(NAMES.values())
RULESET = ["sh", "-c", "nft list ruleset; iptables-save; ip6tables-save"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=1) as lab:
        lab.start_http_servers(port=8080)
        for pod in lab.backend_pods:
            lab.popen(pod, ["python3", "-c", TCP_ECHO, pod.name, "7000"])
        yield lab


@pytest.fixture
def start(
    lab: Lab, write_services: Callable[[str], Path], tmp_path: Path
) -> Iterator[Callable[..., LabAgent]]:
    """Start `pykp run` on the node with extra flags; stopped (and its rules removed) after."""
    services = write_services(SERVICES)
    agents: list[LabAgent] = []

    def start_agent(*flags: str) -> LabAgent:
        # The round-robin services stand for any policy pykp's reader decides: these flags
        # are about its queues, its verdicts' marks and its flow table.
        agent = LabAgent(
            lab,
            services,
            "--no-kernel-round-robin",
            *flags,
            workdir=tmp_path / f"node-{len(agents)}",
        )
        agents.append(agent)
        agent.start()
        return agent

    yield start_agent
    for agent in agents:
        if agent.proc is not None:
            agent.proc.send_signal(signal.SIGCONT)
        agent.stop()
    lab.exec("node", ["python3", "-m", "pykp", "cleanup"])


def kernel_queues(lab: Lab) -> dict[int, tuple[int, int, int]]:
    """The node's NFQUEUE queues as the kernel counts them: queue -> (packets queued so
    far, i.e. the last packet id; packets dropped because the queue was full; packets
    waiting for a verdict now)."""
    text = lab.exec("node", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=True).stdout
    queues = {}
    for line in text.splitlines():
        fields = [int(f) for f in line.split()]
        queues[fields[0]] = (fields[7], fields[5], fields[2])
    return queues


SOURCES = [f"10.244.0.{200 + i}" for i in range(12)]


@pytest.fixture
def many_sources(lab: Lab) -> Iterator[list[str]]:
    """SOURCES added to client-0 (and routed to it by the node), removed after."""
    client = lab.host("client-0")
    added: list[str] = []
    try:
        for ip in SOURCES:
            lab.exec(client, ["ip", "addr", "add", f"{ip}/32", "dev", "eth0"], check=True)
            added.append(ip)
            lab.exec(
                "node",
                ["ip", "route", "add", f"{ip}/32", "dev", str(client.host_ifname)],
                check=True,
            )
        yield list(SOURCES)
    finally:
        for ip in added:
            lab.exec("node", ["ip", "route", "del", f"{ip}/32"])
            lab.exec(client, ["ip", "addr", "del", f"{ip}/32", "dev", "eth0"])


def http_get_from(lab: Lab, source: str, host: str, port: int = 80) -> str:
    """One HTTP request from client-0 on a new connection bound to the address `source`."""
    with lab.in_namespace("client-0"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(3)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode().rpartition("\r\n\r\n")[2].strip()


def test_several_queues_each_read_by_a_thread_decide_together(
    lab: Lab, start: Callable[..., LabAgent], many_sources: list[str]
) -> None:
    node = start("--queue-num", "5", "--queues", "3")
    before = kernel_queues(lab)
    assert set(before) == {5, 6, 7}, before  # three queues bound, and only those
    queued = node.metric("pykp_queue_packets_total")
    # --queue-balance spreads by address hash: twelve client addresses, five connections each.
    counts = Counter(
        http_get_from(lab, source, "10.96.0.10") for source in many_sources for _ in range(5)
    )
    after = kernel_queues(lab)
    # The kernel spread the 60 flows over the three queues ...
    per_queue = {q: after[q][0] - before[q][0] for q in (5, 6, 7)}
    assert all(n > 0 for n in per_queue.values()), per_queue
    assert sum(per_queue.values()) == 60, per_queue
    # ... every one was read and decided by pykp (none went by undecided) ...
    assert node.metric("pykp_queue_packets_total") == queued + 60
    assert node.metric("pykp_kernel_path_undecided_connections_total") == 0
    # ... by one engine: round-robin's cycle is shared by the three reader threads.
    assert counts == {"backend-0": 20, "backend-1": 20, "backend-2": 20}


def test_a_non_default_mark_mask_carries_the_backend_and_keeps_foreign_bits(
    lab: Lab, start: Callable[..., LabAgent]
) -> None:
    """Another program marks the client's packets (bit 0x1) before pykp sees them; after
    pykp's decision and DNAT the SYN leaving for the backend still has that bit, and the
    backend id sits inside --mark-mask 0x0ff00000 (not where the default mask puts it)."""
    node = start("--mark-mask", "0x0ff00000")
    syn = "ip daddr { 10.244.0.10, 10.244.0.11, 10.244.0.12 } tcp dport 8080 tcp flags & (syn | ack) == syn"
    script = f"""
table inet foreign {{
    counter syn_all {{ }}
    counter syn_kept {{ }}
    counter syn_in_mask {{ }}
    counter syn_default_field {{ }}
    chain pre {{
        type filter hook prerouting priority -300; policy accept;
        ip saddr 10.244.0.100 meta mark set meta mark | 0x1
    }}
    chain post {{
        type filter hook postrouting priority 300; policy accept;
        {syn} counter name syn_all
        {syn} meta mark & 0x1 == 0x1 counter name syn_kept
        {syn} meta mark & 0x0ff00000 != 0 counter name syn_in_mask
        {syn} meta mark & 0x000f0000 != 0 counter name syn_default_field
    }}
}}
"""
    lab.exec("node", ["nft", "-f", "-"], input=script, check=True)
    try:
        queued = node.metric("pykp_queue_packets_total")
        answers = [http_get(lab, "client-0", "10.96.0.10") for _ in range(9)]
        assert Counter(answers) == {"backend-0": 3, "backend-1": 3, "backend-2": 3}
        assert node.metric("pykp_queue_packets_total") == queued + 9  # decided by pykp

        def counter(name: str) -> int:
            out = lab.exec(
                "node", ["nft", "list", "counter", "inet", "foreign", name], check=True
            ).stdout
            return int(out.split("packets")[1].split()[0])

        assert counter("syn_all") == 9
        assert counter("syn_in_mask") == 9, "the backend id is not in --mark-mask's field"
        assert counter("syn_default_field") == 0, "the default mask's field was used"
        assert counter("syn_kept") == 9, "pykp's verdict dropped a foreign mark bit"
    finally:
        lab.exec("node", ["nft", "delete", "table", "inet", "foreign"])


def test_a_full_connection_table_evicts_counted_and_serves_everything(
    lab: Lab, start: Callable[..., LabAgent]
) -> None:
    node = start("--conntrack-capacity", "2")
    assert node.metric("pykp_conntrack_capacity") == 2
    # Five long-lived connections, then thirty short ones: the table overflows many times.
    held = []
    try:
        for _ in range(5):
            with lab.in_namespace("client-0"):
                s = socket.create_connection(("10.96.0.17", 7000), timeout=3)
            held.append((s, s.makefile("rwb")))

        def ask(f: object, line: str) -> str:
            f.write(line.encode() + b"\n")  # type: ignore[attr-defined]
            f.flush()  # type: ignore[attr-defined]
            return f.readline().decode().strip()  # type: ignore[attr-defined]

        first = [ask(f, "hello").split()[0] for _, f in held]
        counts = Counter(http_get(lab, "client-0", "10.96.0.10") for _ in range(30))
        assert counts == {"backend-0": 10, "backend-1": 10, "backend-2": 10}
        # Full: old entries were evicted (counted), never a refusal, a drop or a crash.
        assert node.metric("pykp_conntrack_evictions_total") >= 30
        assert node.metric("pykp_conntrack_entries") <= 2
        assert node.metric("pykp_dropped_packets_total") == 0
        assert node.metric("pykp_decisions_total", action="reject") == 0
        # The evicted long-lived flows go on: the kernel's conntrack carries them.
        for (_, f), backend in zip(held, first):
            assert ask(f, "still there") == f"{backend} still there"
        assert node.proc is not None and node.proc.poll() is None
        assert node.healthy()
    finally:
        for s, f in held:
            f.close()
            s.close()


def test_a_non_default_maglev_table_size_is_the_table_used(
    lab: Lab, start: Callable[..., LabAgent]
) -> None:
    """A Maglev service (5-tuple hash) on a 251-entry table: each connection, from a fixed
    source port, reaches the backend pykp's engine computes with a 251-entry table, which
    for these ports is not always the default table's choice."""
    from pykp._fastpath import Backend, Engine, Frontend

    def engine(size: int) -> Engine:
        e = Engine(maglev_table_size=size)
        e.upsert_service(
            "web-maglev",
            [Frontend("10.96.0.12", 80)],
            [Backend(ip, 8080) for ip in NAMES],
            policy="maglev",
            hash_key="5-tuple",
        )
        return e

    client = lab.host("client-0").ipv4
    ports = list(range(41000, 41012))

    def expected(size: int) -> list[str]:
        e = engine(size)
        picks = [e.decide(client, port, "10.96.0.12", 80).backend for port in ports]
        return [NAMES[b[0]] for b in picks if b is not None]

    small, default = expected(251), expected(65537)
    assert small != default  # else this test could not tell the tables apart

    node = start("--maglev-table-size", "251")
    queued = node.metric("pykp_queue_packets_total")
    seen = [http_get(lab, "client-0", "10.96.0.12", source_port=port) for port in ports]
    assert node.metric("pykp_queue_packets_total") == queued + len(ports)
    assert seen == small


def test_a_non_prime_maglev_table_size_is_refused_in_one_line(lab: Lab, tmp_path: Path) -> None:
    services = tmp_path / "services.yaml"
    services.write_text(SERVICES)
    run = lab.exec(
        "node",
        [*pykp_command("run"), "--services", str(services), "--maglev-table-size", "1000"],
    )
    assert run.returncode == 2, run
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, run.stderr
    assert "--maglev-table-size" in errors[0] and "1000 is not a prime" in errors[0]
    assert "Traceback" not in run.stderr
    assert "pykp" not in lab.exec("node", RULESET, check=True).stdout.lower()  # touched nothing


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "no-fail-open"])
def test_a_full_queue_goes_to_the_kernel_path_or_is_a_counted_drop(
    lab: Lab, start: Callable[..., LabAgent], fail_open: bool
) -> None:
    """The reader and its queue keeper stopped (SIGSTOP), a queue of one: one SYN waits,
    the next connection finds the queue full. Fail-open: the kernel path serves it at once
    (counted as undecided). --no-fail-open: the kernel drops its SYNs (counted), and the
    connection waits for the reader."""
    flag = "--fail-open" if fail_open else "--no-fail-open"
    node = start(flag, "--queue-max-len", "1")
    assert node.proc is not None
    pid = node.proc.pid
    # Any of the agent's threads may have started it: each task lists its own children.
    children = [child for task in Path(f"/proc/{pid}/task").iterdir() for child in _children(task)]
    assert len(children) == 1, children  # the queue keeper
    keeper = int(children[0])
    waiting = None
    stopped = [pid, keeper]
    try:
        for p in stopped:
            os.kill(p, signal.SIGSTOP)
        before = kernel_queues(lab)[0][1]
        with lab.in_namespace("client-0"):
            waiting = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        waiting.setblocking(False)
        waiting.connect_ex(("10.96.0.10", 80))  # its SYN fills the queue
        assert wait_for(lambda: kernel_queues(lab)[0][2] == 1, timeout=2)  # waiting
        outcome = connect_error(lab, "client-0", "10.96.0.10", 80, timeout=2.5)
        dropped = kernel_queues(lab)[0][1] - before
        if fail_open:
            assert outcome == "connected"
            assert dropped == 0
        else:
            assert outcome == "timeout"
            assert dropped >= 1
    finally:
        for p in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        if waiting is not None:
            waiting.close()
    assert wait_for(node.synced)
    undecided = node.metric("pykp_kernel_path_undecided_connections_total")
    queue_full = node.metric("pykp_queue_dropped_total", reason="queue_full")
    if fail_open:
        assert undecided >= 1 and queue_full == 0
    else:
        assert queue_full >= 1
    assert http_get(lab, "client-0", "10.96.0.10") in ALL  # and served again


def test_run_cleanup_removes_the_rules_and_exits(lab: Lab, start: Callable[..., LabAgent]) -> None:
    node = start()
    assert http_get(lab, "client-0", "10.96.0.10") in ALL
    assert node.stop() == 0  # a plain stop leaves the rules (kube-proxy's way)
    assert "table inet pykp" in lab.exec("node", RULESET, check=True).stdout
    lab.exec(
        "node",
        ["iptables", "-t", "mangle", "-A", "PREROUTING", "-s", "192.0.2.7", "-j", "ACCEPT"],
        check=True,
    )
    try:
        run = lab.exec("node", [*pykp_command("run"), "--cleanup"])
        assert run.returncode == 0, run
        assert "removed nft table inet pykp" in run.stdout
        out = lab.exec("node", RULESET, check=True).stdout
        assert "pykp" not in out.lower(), out
        assert "192.0.2.7" in out  # someone else's rule stays
        # Nothing left: said so, still exit 0.
        again = lab.exec("node", [*pykp_command("run"), "--cleanup"])
        assert again.returncode == 0 and "nothing to remove" in again.stdout
        # No rules: the ClusterIP is unreachable (not served by leftovers).
        assert connect_error(lab, "client-0", "10.96.0.10", 80, timeout=1) != "connected"
    finally:
        lab.exec(
            "node",
            ["iptables", "-t", "mangle", "-D", "PREROUTING", "-s", "192.0.2.7", "-j", "ACCEPT"],
        )


def _children(task: Path) -> list[str]:
    """A task's children; none for a thread that ended since the listing (a request
    handler thread of the metrics server, say)."""
    try:
        return (task / "children").read_text().split()
    except FileNotFoundError:
        return []
