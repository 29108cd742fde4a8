"""kube-proxy's healthz contract (pkg/proxy/healthcheck/proxier_health.go).

* `queued_update()` when a change arrives that needs a sync (kept at its oldest time);
  `updated()` when a sync succeeded.
* Healthy while no update is pending, or while the oldest pending one is younger than
  the health timeout (kube-proxy passes 2 x --sync-period).
* `GET /healthz`: 200 or 503 with
  `{"lastUpdated": "<time>","currentTime": "<time>", "nodeEligible": <bool>}`, byte for
  byte the way kube-proxy prints it (Go's `%q` of a `time.Time`). When healthy,
  lastUpdated is reported as the current time (kube-proxy keeps that for compatibility);
  when not, it is the time of the last successful sync (Go's zero time if there was none).
  `GET /livez`: the same without nodeEligible (and without the node's eligibility).

Where pykp is stricter than kube-proxy, on purpose:

* `/healthz` is 503 until the first successful sync (`initial_sync_required`). kube-proxy
  answers 200 while starting up; but /healthz is what load balancers ask before sending a
  node traffic, and a node with nothing programmed refuses it. `/livez` keeps kube-proxy's
  grace, so a liveness probe never restarts an agent that is still starting.
* The agent queues an update when it starts and again when a sync fails, so an agent that
  never manages to program the node, or keeps failing, also fails /livez after the timeout.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = [
    "GO_ZERO_TIME",
    "HealthServer",
    "HttpServer",
    "ProxierHealth",
    "Response",
    "go_time",
    "parse_bind_address",
]

_log = logging.getLogger(__name__)

GO_ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"


def go_time(timestamp: float | None) -> str:
    """A wall-clock time as Go's `time.Time.String()` prints it, in the local zone.

    Layout "2006-01-02 15:04:05.999999999 -0700 MST": trailing zeros of the fraction
    dropped. (Go appends the monotonic reading, " m=+1.23", too; it means nothing
    outside the process and is left out.) None gives Go's zero time.
    """
    if timestamp is None:
        return GO_ZERO_TIME
    moment = dt.datetime.fromtimestamp(timestamp).astimezone()
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    if fraction:
        text += f".{fraction}"
    return f"{text} {moment.strftime('%z')} {moment.tzname() or moment.strftime('%z')}"


class ProxierHealth:
    """The health state behind /healthz and /livez. Thread-safe."""

    def __init__(
        self,
        health_timeout: float,
        *,
        clock: Callable[[], float] = time.time,
        initial_sync_required: bool = True,
    ) -> None:
        self.health_timeout = health_timeout
        self.initial_sync_required = initial_sync_required
        self._clock = clock
        self._lock = threading.Lock()
        self._last_updated: float | None = None
        self._oldest_pending: float | None = None
        self._node_eligible = True  # nothing removes a node from service yet
        self.responses: dict[tuple[str, int], int] = {}  # (path, code) -> count

    def queued_update(self) -> None:
        with self._lock:
            if self._oldest_pending is None:
                self._oldest_pending = self._clock()

    def updated(self) -> None:
        with self._lock:
            self._oldest_pending = None
            self._last_updated = self._clock()

    def set_node_eligible(self, eligible: bool) -> None:
        """A Kubernetes source reports here a node marked for deletion (ToBeDeleted taint)."""
        with self._lock:
            self._node_eligible = eligible

    @property
    def last_updated(self) -> float | None:
        with self._lock:
            return self._last_updated

    def is_healthy(self) -> bool:
        """What `GET /healthz` answers (200), so that `pykp status` says the same."""
        return self.unhealthy_reason() is None

    def unhealthy_reason(self) -> str | None:
        """Why /healthz answers 503, or None when it answers 200."""
        healthy, last_updated, now, eligible = self._check()
        if not eligible:
            return "the node is marked for deletion"
        if last_updated is None and self.initial_sync_required:
            return "waiting for the first successful sync"
        if not healthy:
            return f"an update has waited more than {self.health_timeout:g} s to be programmed"
        return None

    def _check(self) -> tuple[bool, float | None, float, bool]:
        with self._lock:
            now = self._clock()
            pending = self._oldest_pending
            healthy = pending is None or now - pending < self.health_timeout
            return healthy, self._last_updated, now, self._node_eligible

    def healthz(self) -> tuple[int, str]:
        """The status code and body of `GET /healthz`."""
        healthy, last_updated, now, eligible = self._check()
        synced = last_updated is not None or not self.initial_sync_required
        healthy = healthy and eligible and synced
        shown = now if healthy else last_updated
        body = (
            f'{{"lastUpdated": {json.dumps(go_time(shown))},'
            f'"currentTime": {json.dumps(go_time(now))}, '
            f'"nodeEligible": {"true" if eligible else "false"}}}'
        )
        return self._count("/healthz", 200 if healthy else 503), body

    def livez(self) -> tuple[int, str]:
        """The status code and body of `GET /livez` (node eligibility does not count)."""
        healthy, last_updated, now, _ = self._check()
        shown = now if healthy else last_updated
        body = (
            f'{{"lastUpdated": {json.dumps(go_time(shown))},'
            f'"currentTime": {json.dumps(go_time(now))}}}'
        )
        return self._count("/livez", 200 if healthy else 503), body

    def _count(self, path: str, code: int) -> int:
        with self._lock:
            self.responses[path, code] = self.responses.get((path, code), 0) + 1
        return code

    def response_counts(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self.responses)


# --- the HTTP servers (health here, metrics and status in pykp.observe.metrics) -------------------


def parse_bind_address(text: str) -> tuple[str, int]:
    """`IP:port` or `[IPv6]:port`, as kube-proxy's --*-bind-address take them.

    Raises ValueError with a message fit for the command line.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not IP:port (e.g. 0.0.0.0:10256 or [::]:10256)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::]:10256")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be 0..65535")
    return host, int(port_text)


@dataclass(frozen=True)
class Response:
    code: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up the agent's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpServer:
    """A tiny GET-only server in a daemon thread; subclasses answer in `respond`."""

    def __init__(self, address: str, *, name: str) -> None:
        self.address = address
        self.name = name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def respond(self, request: BaseHTTPRequestHandler, path: str) -> Response | None:
        """The response for `path` (query string removed); None for 404."""
        raise NotImplementedError

    @property
    def bound_address(self) -> tuple[str, int]:
        """The address actually bound (port 0 in the flag picks a free one)."""
        if self._server is None:
            raise RuntimeError(f"the {self.name} server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _server_class(self, host: str) -> type[_Server]:
        """The socket server for `host` (subclasses may bind otherwise)."""
        return _Server6 if ":" in host else _Server

    def start(self) -> None:
        """Bind (raising OSError, e.g. when the port is taken) and serve in a thread."""
        host, port = parse_bind_address(self.address)
        self._server = self._server_class(host)((host, port), self._handler_class())
        server = self._server
        self._thread = threading.Thread(
            # A short poll interval: `shutdown()` waits for the loop to see it.
            target=lambda: server.serve_forever(poll_interval=0.1),
            name=f"pykp-{self.name}",
            daemon=True,
        )
        self._thread.start()
        _log.info("serving %s on %s", self.name, self.address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server spelling
                path = self.path.split("?", 1)[0]
                try:
                    response = owner.respond(self, path)
                except Exception:  # noqa: BLE001 - keep serving
                    _log.exception("%s: GET %s failed", owner.name, path)
                    response = Response(500, b"internal error\n", "text/plain")
                if response is None:
                    response = Response(404, b"not found\n", "text/plain")
                try:
                    self.send_response(response.code)
                    self.send_header("Content-Type", response.content_type)
                    self.send_header("Content-Length", str(len(response.body)))
                    for name, value in response.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(response.body)
                except (BrokenPipeError, ConnectionResetError):
                    # The client gave up (a scraper's timeout): nothing to answer, and not
                    # the agent's error (socketserver would print its traceback).
                    _log.debug("%s: GET %s: the client left before the answer", owner.name, path)

            def log_message(self, format: str, *args: object) -> None:
                _log.debug("%s: %s", owner.name, format % args)

        return Handler


class HealthServer(HttpServer):
    """`/healthz` and `/livez` on --healthz-bind-address, served from a daemon thread."""

    def __init__(self, address: str, health: ProxierHealth) -> None:
        self.health = health
        super().__init__(address, name="healthz")

    def respond(self, request: BaseHTTPRequestHandler, path: str) -> Response | None:
        if path == "/healthz":
            code, body = self.health.healthz()
        elif path == "/livez":
            code, body = self.health.livez()
        else:
            return None
        # kube-proxy's headers: JSON, and no content sniffing.
        return Response(
            code,
            body.encode(),
            "application/json",
            {"X-Content-Type-Options": "nosniff"},
        )
