"""Shared pieces of the end-to-end tests: a lab node running `pykp run`, and clients.

Everything happens inside the namespaces a `Lab` creates; the root namespace is never
touched. Clients use real sockets (in-process, moved into a pod's namespace) and curl.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pykp.lab import Lab

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


class Node:
    """`pykp run` inside the lab's node namespace, fed by a services file."""

    def __init__(self, lab: Lab, services_file: Path, *extra: str) -> None:
        self.lab = lab
        self.services_file = services_file
        self.extra = extra
        self.proc: subprocess.Popen[Any] | None = None
        self.log = services_file.with_suffix(".log")

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "pykp", "run",
            "--services", str(self.services_file),
            "--hostname-override", "node",
            "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48",
            "--healthz-bind-address", HEALTHZ,
            "--metrics-bind-address", METRICS,
            "--min-sync-period", "0.1",
            *self.extra,
        ]  # fmt: skip
        log = self.log.open("a")
        self.proc = self.lab.popen("node", argv, stdout=log, stderr=subprocess.STDOUT)
        if not wait_for(self.synced, timeout=20):
            self.stop()
            raise AssertionError(f"pykp run did not become healthy:\n{self.log.read_text()}")

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
        with self.lab.in_namespace("node"):
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
        return self.healthy() and self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0

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
        before = self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        tmp = self.services_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.services_file)
        assert wait_for(
            lambda: self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > before,
            timeout=15,
        ), f"no sync after the services file changed:\n{self.log.read_text()[-3000:]}"


def http_get(lab: Lab, pod: str, host: str, port: int = 80, timeout: float = 2.0) -> str:
    """One HTTP request on a new connection from `pod`; the answering backend's name."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.in_namespace(pod):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode().rpartition("\r\n\r\n")[2].strip()


def distribution(lab: Lab, pod: str, host: str, n: int, port: int = 80) -> Counter[str]:
    return Counter(http_get(lab, pod, host, port) for _ in range(n))


def connect_error(lab: Lab, pod: str, host: str, port: int, timeout: float = 3.0) -> str:
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
def udp_socket(lab: Lab, pod: str, family: int = socket.AF_INET) -> Iterator[socket.socket]:
    with lab.in_namespace(pod):
        s = socket.socket(family, socket.SOCK_DGRAM)
    with s:
        s.settimeout(2)
        yield s


def udp_ask(s: socket.socket, host: str, port: int, payload: bytes = b"hello") -> str:
    s.sendto(payload, (host, port))
    data, _ = s.recvfrom(4096)
    return data.decode().strip()
