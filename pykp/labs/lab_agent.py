"""`pykp run` inside a lab node, and clients in lab pods: what tests, demos and benches drive.

Everything happens inside the namespaces a `Lab` or `ClusterLab` creates; the root
namespace is never touched. Clients use real sockets, created in a pod's namespace.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pykp.labs.lab import ClusterLab, Lab
from pykp.self_command import pykp_command

AnyLab = Lab | ClusterLab

HEALTHZ = "127.0.0.1:10256"
METRICS = "127.0.0.1:10249"

TCP_ECHO = """
import socket, socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(sys.argv[1].encode() + b" " + line)
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    address_family = socket.AF_INET6
S(("::", int(sys.argv[2])), H).serve_forever()
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class AgentStartError(RuntimeError):
    """`pykp run` in a lab did not start; the message holds its log."""


class LabAgent:
    """`pykp run` inside a lab node's namespace, fed by a services file or, with
    `kubeconfig` (and no services file), by the Kubernetes API.

    `host` is the node's namespace in the lab ("node" in a `Lab`, "node-1" in a
    `ClusterLab`); `hostname` its --hostname-override (default: `host`). Give each node
    of a cluster its own `workdir` (log and state directory).
    """

    def __init__(
        self,
        lab: AnyLab,
        services_file: Path | None,
        *extra: str,
        kubeconfig: Path | None = None,
        host: str = "node",
        hostname: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        if (services_file is None) == (kubeconfig is None):
            raise ValueError("a services file or a kubeconfig, not both")
        self.lab = lab
        self.services_file = services_file
        self.kubeconfig = kubeconfig
        self.extra = extra
        self.host = host
        self.hostname = hostname or host
        self.proc: subprocess.Popen[Any] | None = None
        self.workdir = workdir
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            self.log = workdir / "pykp.log"
        else:
            assert services_file is not None
            self.log = services_file.with_suffix(".log")

    def argv(self) -> list[str]:
        source = (
            ["--services", str(self.services_file)]
            if self.services_file is not None
            else ["--kubeconfig", str(self.kubeconfig)]
        )
        # Nodes of one machine share /run: each its own status file.
        state = ["--state-dir", str(self.workdir / "state")] if self.workdir is not None else []
        return [
            *pykp_command("run"),
            *source,
            "--hostname-override", self.hostname,
            "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48",
            "--healthz-bind-address", HEALTHZ,
            "--metrics-bind-address", METRICS,
            "--min-sync-period", "0.1",
            # nf_conntrack_max and the module's hashsize are the machine's, not the lab
            # node's: a lab leaves them alone (a later --conntrack-max-per-core wins).
            "--conntrack-max-per-core", "0",
            *state,
            *self.extra,
        ]  # fmt: skip

    def start(self) -> None:
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """Start the process without waiting (start several nodes at once, then wait)."""
        log = self.log.open("a")
        self.proc = self.lab.popen(self.host, self.argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own copy

    def wait_started(self, timeout: float = 20) -> None:
        """Wait for the first sync; an agent that exits is reported at once, with its log."""

        def synced_or_exited() -> bool:
            return (self.proc is not None and self.proc.poll() is not None) or self.synced()

        wait_for(synced_or_exited, timeout=timeout)
        if self.proc is not None and self.proc.poll() is None and self.synced():
            return
        code = self.stop()
        state = "did not become healthy" if code is None or code < 0 else f"exited ({code})"
        raise AgentStartError(f"pykp run on {self.host} {state}:\n{self.log.read_text().strip()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def get(self, address: str, path: str) -> tuple[int, str]:
        """GET a URL of the agent's servers from inside the node namespace."""
        with self.lab.in_namespace(self.host):
            try:
                with urllib.request.urlopen(f"http://{address}{path}", timeout=2) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                return 0, ""

    def healthy(self) -> bool:
        status, body = self.get(HEALTHZ, "/healthz")
        return status == 200 and json.loads(body).get("lastUpdated") is not None

    def synced(self) -> bool:
        """Healthy and past its first sync: the rules hold the services."""
        return (
            self.healthy() and self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0
        )

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        _, text = self.get(METRICS, "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, label_text = series.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def write_services(self, text: str) -> None:
        """Replace the services file and wait until the agent has synced it."""
        if self.services_file is None:
            raise ValueError("this agent is fed by the Kubernetes API, not a services file")
        before = self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        tmp = self.services_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.services_file)
        if not wait_for(
            lambda: self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > before,
            timeout=15,
        ):
            raise RuntimeError(
                f"no sync after the services file changed:\n{self.log.read_text()[-3000:]}"
            )


def http_get(
    lab: AnyLab,
    pod: str,
    host: str,
    port: int = 80,
    timeout: float = 2.0,
    *,
    source_port: int | None = None,
    path: str = "/",
) -> str:
    """One HTTP request on a new connection from `pod`; the answering backend's name.

    `source_port` fixes the client's port (and so the connection's 5-tuple); the path
    "/clientip" asks for the client address the backend saw instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.in_namespace(pod):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        if source_port is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode().rpartition("\r\n\r\n")[2].strip()


def distribution(lab: AnyLab, pod: str, host: str, n: int, port: int = 80) -> Counter[str]:
    return Counter(http_get(lab, pod, host, port) for _ in range(n))


def connect_error(lab: AnyLab, pod: str, host: str, port: int, timeout: float = 3.0) -> str:
    """How a TCP connect from `pod` ends: "connected", "refused" or "timeout"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.in_namespace(pod):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"


@contextmanager
def udp_socket(lab: AnyLab, pod: str, family: int = socket.AF_INET) -> Iterator[socket.socket]:
    with lab.in_namespace(pod):
        s = socket.socket(family, socket.SOCK_DGRAM)
    with s:
        s.settimeout(2)
        yield s


def udp_ask(s: socket.socket, host: str, port: int, payload: bytes = b"hello") -> str:
    s.sendto(payload, (host, port))
    data, _ = s.recvfrom(4096)
    return data.decode().strip()


def start_nodes(nodes: Sequence[LabAgent], timeout: float = 30) -> None:
    """Start several agents at once and wait until every one has synced."""
    for node in nodes:
        node.launch()
    deadline = time.monotonic() + timeout
    for node in nodes:
        node.wait_started(timeout=max(1.0, deadline - time.monotonic()))


def in_parallel(fn: Callable[[int], Any], count: int) -> list[Any]:
    """fn(0) .. fn(count-1), each in its own thread (a namespace switch is per thread)."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = fn(index)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
