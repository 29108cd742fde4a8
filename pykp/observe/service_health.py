"""kube-proxy's service health check servers (pkg/proxy/healthcheck/service_health.go).

For every Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`, an HTTP
server on that port of the node's addresses. Any GET answers

    200 {"service": {"namespace": NS, "name": NAME}, "localEndpoints": N, "serviceProxyHealthy": true}

when the service has N >= 1 ready endpoints on this node and the proxy is healthy, else 503
(N = 0: none, or only terminating ones; or the proxy is unhealthy). External load balancers
ask it to pick the nodes that hold endpoints. The body is printed as kube-proxy prints it
(indented JSON), with its headers (`X-Load-Balancing-Endpoint-Weight: N` included).

`ServiceHealthServers.sync` takes the wanted state (service key -> port and local endpoint
count) after each sync of the agent: servers of services that left (or changed port) are
closed, new ones opened, counts updated in place. A port that cannot be bound is logged,
counted and retried at the next sync; it never fails the sync.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from pykp.observe.health import HttpServer, Response, _Server

__all__ = ["HealthCheck", "HealthCheckStatus", "ServiceHealthServers", "health_check_body"]

_log = logging.getLogger(__name__)

WILDCARD: tuple[str, ...] = ()  # bind hosts: every address of the node (both families)


@dataclass(frozen=True)
class HealthCheck:
    """What one service asks for: its port and its count of local ready endpoints."""

    port: int
    local_endpoints: int


@dataclass(frozen=True)
class HealthCheckStatus:
    """One health check server, as `pykp status` shows it."""

    port: int
    service: str  # namespace/name
    local_endpoints: int
    serving: bool
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "port": self.port,
            "service": self.service,
            "localEndpoints": self.local_endpoints,
            "serving": self.serving,
            "error": self.error,
        }


def health_check_body(key: str, count: int, healthy: bool) -> str:
    """The body as kube-proxy prints it (its dedented template, trimmed of newlines)."""
    namespace, _, name = key.partition("/")
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {_go_quote(namespace)},\n'
        f'\t\t"name": {_go_quote(name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {count},\n'
        f'\t"serviceProxyHealthy": {"true" if healthy else "false"}\n'
        "}"
    )


def _go_quote(text: str) -> str:
    """Go's %q for the names Kubernetes allows (DNS labels): a plain quoted string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class _DualStackServer(_Server):
    """`[::]` with IPV6_V6ONLY off: both families on one socket, as Go's ":port"."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Listener(HttpServer):
    """One address of a health check port; answers from its `_Port`."""

    def __init__(self, address: str, port: _Port, *, dual_stack: bool = False) -> None:
        self.port = port
        self.dual_stack = dual_stack
        super().__init__(address, name=f"healthcheck {port.service} {address}")

    def respond(self, request: BaseHTTPRequestHandler, path: str) -> Response | None:
        return self.port.response()

    def _server_class(self, host: str) -> type[_Server]:
        # [::]:port for both families (as Go's ":port"), when no address was asked for.
        return _DualStackServer if self.dual_stack else super()._server_class(host)


class _Port:
    """A health check port of one service: its listeners and its count (thread-safe)."""

    def __init__(self, number: int, service: str, healthy: Callable[[], bool]) -> None:
        self.number = number
        self.service = service
        self._healthy = healthy
        self._lock = threading.Lock()
        self._count = 0
        self.listeners: list[_Listener] = []
        self.error: str | None = None

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def set_count(self, count: int) -> None:
        with self._lock:
            self._count = count

    @property
    def serving(self) -> bool:
        return bool(self.listeners)

    def response(self) -> Response:
        count = self.count
        healthy = self._healthy()
        code = 200 if count > 0 and healthy else 503
        return Response(
            code,
            health_check_body(self.service, count, healthy).encode(),
            "application/json",
            {
                "X-Content-Type-Options": "nosniff",
                "X-Load-Balancing-Endpoint-Weight": str(count),
            },
        )

    def open(self, hosts: Sequence[str]) -> None:
        """Listen on every host (all or none: a failure closes what opened; raises)."""
        if hosts == WILDCARD:
            listeners = [_Listener(f"[::]:{self.number}", self, dual_stack=True)]
        else:
            listeners = [
                _Listener(
                    f"[{host}]:{self.number}" if ":" in host else f"{host}:{self.number}", self
                )
                for host in hosts
            ]
        try:
            for listener in listeners:
                listener.start()
                self.listeners.append(listener)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for listener in self.listeners:
            try:
                listener.stop()
            except Exception:  # noqa: BLE001 - close the others
                _log.exception("closing the health check of %s failed", self.service)
        self.listeners.clear()


class ServiceHealthServers:
    """Every health check server of the node: port -> server. `sync` from one thread."""

    def __init__(self, healthy: Callable[[], bool] = lambda: True) -> None:
        self._healthy = healthy
        self._ports: dict[int, _Port] = {}
        self._hosts: tuple[str, ...] | None = None
        self._lock = threading.Lock()  # against status readers
        self.bind_errors = 0

    def sync(self, wanted: Mapping[str, HealthCheck], hosts: Sequence[str] = WILDCARD) -> None:
        """Make the servers those of `wanted` (service key -> port and count), listening on
        `hosts` (WILDCARD: every address). Ports that failed to bind are tried again."""
        hosts = tuple(hosts)
        by_port: dict[int, tuple[str, int]] = {}
        conflicts: dict[str, int] = {}
        for key in sorted(wanted):
            check = wanted[key]
            if check.port in by_port:
                conflicts[key] = check.port
                continue
            by_port[check.port] = (key, check.local_endpoints)
        for key, taken in conflicts.items():
            _log.warning(
                "health check node port %d of %s is already %s's: not served",
                taken,
                key,
                by_port[taken][0],
            )
        with self._lock:
            current = dict(self._ports)
        hosts_changed = self._hosts is not None and hosts != self._hosts
        self._hosts = hosts
        for number, port in current.items():
            wanted_here = by_port.get(number)
            if hosts_changed or wanted_here is None or wanted_here[0] != port.service:
                if port.serving:
                    _log.info("closing health check %s on port %d", port.service, number)
                port.close()
                with self._lock:
                    del self._ports[number]
        for number, (key, count) in sorted(by_port.items()):
            with self._lock:
                existing = self._ports.get(number)
                if existing is None:
                    existing = self._ports[number] = _Port(number, key, self._healthy)
            port = existing
            port.set_count(count)
            if port.serving:
                continue
            try:
                port.open(hosts)
            except OSError as error:
                self.bind_errors += 1
                if port.error != str(error):
                    _log.error(
                        "cannot serve the health check of %s on port %d (retried at the "
                        "next sync): %s",
                        key,
                        number,
                        error,
                    )
                port.error = str(error)
            else:
                port.error = None
                _log.info("serving the health check of %s on port %d", key, number)

    def stop(self) -> None:
        """Close every server."""
        with self._lock:
            ports = list(self._ports.values())
            self._ports.clear()
        for port in ports:
            port.close()
        self._hosts = None

    def statuses(self) -> list[HealthCheckStatus]:
        with self._lock:
            ports = sorted(self._ports.items())
        return [
            HealthCheckStatus(
                port=number,
                service=port.service,
                local_endpoints=port.count,
                serving=port.serving,
                error=port.error,
            )
            for number, port in ports
        ]

    def bound_ports(self) -> list[int]:
        return [status.port for status in self.statuses() if status.serving]
