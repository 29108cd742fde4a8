"""The namespace lab: topology, reachability, servers, teardown and crash recovery.

Needs root (network namespaces); CI runs as root, so these never skip there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykp.labs.lab import NETNS_DIR, RECORD_DIR, Lab, LabError, cleanup_stale, netns_pids

pytestmark = [
    pytest.mark.privileged,
    # A developer without root skips; CI (root) must never skip these silently.
    pytest.mark.skipif(
        os.geteuid() != 0 and not os.environ.get("CI"), reason="network namespaces need root"
    ),
]

REPO = Path(__file__).resolve().parent.parent
HTTP_PORT = 8080
UDP_PORT = 5353


def namespaces(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def gone(pid: int) -> bool:
    """Dead or a zombie (a killed orphan may wait a moment for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def curl(lab: Lab, ns: str, url: str) -> str:
    res = lab.exec(ns, ["curl", "-gsS", "--max-time", "3", url], timeout=10)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=2) as lab:
        lab.start_http_servers(HTTP_PORT)
        lab.start_udp_echo(UDP_PORT)
        yield lab


def spawn_lab(prefix: str, then: str) -> tuple[subprocess.Popen[str], str, list[int]]:
    """A lab in another Python process; returns it, its key and its server PIDs."""
    code = (
        "import sys, time\n"
        "from pykp.labs.lab import Lab\n"
        f"lab = Lab(backends=2, clients=1, prefix={prefix!r}, clean_stale=False)\n"
        "procs = lab.start_http_servers()\n"
        "print(lab.key, *[p.pid for p in procs], flush=True)\n"
        f"{then}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    key, *pids = proc.stdout.readline().split()
    proc.stdout.close()  # nothing more is printed
    return proc, key, [int(p) for p in pids]


# ----------------------------------------------------------------------------- topology


def test_names_and_addresses(lab: Lab) -> None:
    assert lab.key.startswith("pykp-lab-")
    assert namespaces(lab.key + "-") == sorted(h.netns for h in lab.hosts)
    assert [h.ipv4 for h in lab.backend_pods] == ["10.244.0.10", "10.244.0.11", "10.244.0.12"]
    assert [h.ipv6 for h in lab.client_pods] == ["fd00:10:244::100", "fd00:10:244::101"]
    assert (lab.node_ip4, lab.node_ip6) == ("192.168.77.1", "fd00:77::1")
    assert (lab.external.ipv4, lab.external.ipv6) == ("192.168.77.2", "fd00:77::2")
    assert lab.host("backend-1") is lab.backend_pods[1]
    assert lab.host(lab.node.netns) is lab.node
    assert (RECORD_DIR / f"{lab.key}.json").exists()


def test_node_forwards(lab: Lab) -> None:
    out = lab.exec(
        "node", ["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"]
    )
    assert out.stdout.split() == ["1", "1"]
    # ...while the pods do not: each namespace got its own sysctls.
    assert lab.exec("client-0", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"


def test_setup_is_fast() -> None:
    t0 = time.monotonic()
    with Lab(backends=3, clients=2):
        elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"lab setup took {elapsed:.2f}s"


# ----------------------------------------------------------------------------- traffic


def test_clients_reach_every_backend_ipv4(lab: Lab) -> None:
    for client in lab.client_pods:
        for backend in lab.backend_pods:
            assert curl(lab, client.name, f"http://{backend.ipv4}:{HTTP_PORT}/") == backend.name


def test_clients_reach_every_backend_ipv6(lab: Lab) -> None:
    for client in lab.client_pods:
        for backend in lab.backend_pods:
            assert curl(lab, client.name, f"http://[{backend.ipv6}]:{HTTP_PORT}/") == backend.name


def test_backend_sees_client_pod_address(lab: Lab) -> None:
    c, b = lab.client_pods[1], lab.backend_pods[0]
    assert curl(lab, c.name, f"http://{b.ipv4}:{HTTP_PORT}/clientip") == c.ipv4
    assert curl(lab, c.name, f"http://[{b.ipv6}]:{HTTP_PORT}/clientip") == c.ipv6


def test_node_and_external_reach_pods(lab: Lab) -> None:
    b = lab.backend_pods[2]
    assert curl(lab, "node", f"http://{b.ipv4}:{HTTP_PORT}/") == b.name
    assert curl(lab, "external", f"http://[{b.ipv6}]:{HTTP_PORT}/clientip") == lab.external.ipv6


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_external_reaches_node_address(lab: Lab, family: socket.AddressFamily) -> None:
    node_ip = lab.node_ip4 if family == socket.AF_INET else lab.node_ip6
    with lab.in_namespace("node"):
        server = socket.socket(family, socket.SOCK_STREAM)
    with lab.in_namespace("external"):
        client = socket.socket(family, socket.SOCK_STREAM)
    with server, client:
        server.bind((node_ip, 0))
        server.listen()
        client.settimeout(3)
        client.connect((node_ip, server.getsockname()[1]))
        conn, peer = server.accept()
        with conn:
            assert peer[0] == (lab.external.ipv4 if family == socket.AF_INET else lab.external.ipv6)
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
    # The thread went back to the root namespace: the lab's node IP is not ours.
    assert (
        lab.node_ip4
        not in subprocess.run(
            ["ip", "-4", "addr"], capture_output=True, text=True, check=True
        ).stdout
    )


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_udp_echo(lab: Lab, family: socket.AddressFamily) -> None:
    with lab.in_namespace("client-0"):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(3)
        for backend in lab.backend_pods:
            addr = backend.ipv4 if family == socket.AF_INET else backend.ipv6
            sock.sendto(b"hello", (addr, UDP_PORT))
            data, src = sock.recvfrom(100)
            assert (data.decode(), src[0]) == (backend.name, addr)
        b0, c0 = lab.backend_pods[0], lab.client_pods[0]
        v4 = family == socket.AF_INET
        sock.sendto(b"clientip", (b0.ipv4 if v4 else b0.ipv6, UDP_PORT))
        assert sock.recvfrom(100)[0].decode() == (c0.ipv4 if v4 else c0.ipv6)


def test_services_are_not_routed_to_pods(lab: Lab) -> None:
    # Without a proxy a ClusterIP leads nowhere: the node sends it to its default
    # gateway, the external host, which does not forward.
    res = lab.exec(
        "client-0", ["curl", "-sS", "--max-time", "0.5", f"http://10.96.0.10:{HTTP_PORT}/"]
    )
    assert res.returncode != 0


# ----------------------------------------------------------------------------- teardown


def test_teardown_removes_everything() -> None:
    lab = Lab(backends=2, clients=1)
    procs = lab.start_http_servers() + lab.start_udp_echo()
    extra = lab.popen("node", ["sleep", "60"])
    assert namespaces(lab.key + "-")
    lab.close()
    assert namespaces(lab.key + "-") == []
    assert not (RECORD_DIR / f"{lab.key}.json").exists()
    assert all(p.poll() is not None for p in [*procs, extra])
    lab.close()  # idempotent


def test_partial_setup_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyroute2.netns  # type: ignore[import-untyped]

    real_create = pyroute2.netns.create
    calls = []

    def flaky_create(name: str) -> None:
        calls.append(name)
        if len(calls) == 4:
            raise OSError("injected failure")
        real_create(name)

    monkeypatch.setattr(pyroute2.netns, "create", flaky_create)
    with pytest.raises(OSError, match="injected"):
        Lab(backends=3, clients=2, prefix="pykp-lab-partial-")
    assert len(calls) == 4
    assert namespaces("pykp-lab-partial-") == []
    assert list(RECORD_DIR.glob("pykp-lab-partial-*")) == []


def test_server_failure_is_reported(lab: Lab) -> None:
    # The port is already taken by the module's server: the new one exits at once.
    with pytest.raises(LabError, match="did not start|exited"):
        lab.start_http_servers(HTTP_PORT, pods=["backend-0"], timeout=5)


def test_atexit_tears_down_a_lab_left_open() -> None:
    proc, key, pids = spawn_lab("pykp-lab-atexit-", "sys.exit(0)")
    assert proc.wait(20) == 0
    assert namespaces(key + "-") == []
    assert all(gone(p) for p in pids)


def test_crash_then_cleanup_stale(lab: Lab) -> None:
    proc, key, pids = spawn_lab("pykp-lab-crash-", "time.sleep(60)")
    try:
        before = namespaces(key + "-")
        assert len(before) == 5
        assert not set(before) & set(cleanup_stale())  # the owner is alive: not stale yet
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert len(namespaces(key + "-")) == 5  # nobody cleaned up
        assert not any(gone(p) for p in pids)  # its servers outlived it

        # A new lab can be built while the stale one exists...
        with Lab(backends=1, clients=1, clean_stale=False) as other:
            assert namespaces(key + "-")
            other.start_http_servers()
            assert (
                curl(other, "client-0", f"http://{other.backend_pods[0].ipv4}:8080/") == "backend-0"
            )

        assert set(before) <= set(cleanup_stale())
        assert namespaces(key + "-") == []
        assert not (RECORD_DIR / f"{key}.json").exists()
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(p) for p in pids)
        # ...and the live module lab was left alone.
        assert (
            curl(lab, "client-0", f"http://{lab.backend_pods[0].ipv4}:{HTTP_PORT}/") == "backend-0"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_stale()


def test_new_lab_removes_stale_ones() -> None:
    proc, key, _ = spawn_lab("pykp-lab-", "time.sleep(60)")
    proc.kill()
    proc.wait(10)
    assert namespaces(key + "-")
    with Lab(backends=1, clients=1) as lab:  # clean_stale=True by default
        assert namespaces(key + "-") == []
        assert netns_pids(lab.node.netns) == []


def test_builds_inside_a_running_event_loop() -> None:
    # pyroute2's sync API runs its own loop; an async caller (pykp demo) must still work.
    import asyncio

    async def main() -> str:
        with Lab(backends=1, clients=1) as lab:
            lab.start_http_servers()
            return curl(lab, "client-0", f"http://{lab.backend_pods[0].ipv4}:8080/")

    assert asyncio.run(main()) == "backend-0"
