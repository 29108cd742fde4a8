"""A stand-in Kubernetes API server for tests: the real wire protocol, in one process.

No kube-apiserver can be installed here, so tests run this instead. It speaks what pykp's
Kubernetes source uses, as the real server does (see the Kubernetes "API concepts" page:
efficient detection of changes, watch bookmarks, resource versions):

- core/v1 `services` and `nodes`, discovery.k8s.io/v1 `endpointslices`; cluster-wide and
  per-namespace collections and single objects (GET only).
- LIST: `{"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
  "items": [...]}` (items without kind and apiVersion, like the real server), in pages with
  `limit` and `continue`.
- WATCH (`watch=1|true`): a chunked response of newline-delimited JSON events
  `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}`. Without a
  resourceVersion (or "0") it starts with synthetic ADDED events for what exists; from a
  resourceVersion it replays the history after it. `allowWatchBookmarks` gets BOOKMARK
  events (only metadata.resourceVersion set), `timeoutSeconds` ends the stream cleanly.
- One global resourceVersion counter (etcd's revision) and a bounded event history; a
  watch from a version older than the history gets an ERROR event with a 410 `Expired`
  Status, a LIST with `resourceVersionMatch=Exact` and such a version an HTTP 410.
- `fieldSelector` (metadata.name, metadata.namespace) and simple `labelSelector`s
  (`k`, `!k`, `k=v`, `k!=v`); a watch sees objects entering and leaving the selection as
  ADDED and DELETED, as with the real server.
- Bearer-token authentication (401 otherwise).

Test controls: `create`/`update`/`apply`/`delete` objects, `send_bookmarks`,
`drop_watches` (cut every watch stream mid-flight), `stall_watches` (keep them open but
silent), `compact` (forget history: older versions answer 410), `set_available(False)`
(refuse connections, drop open ones), `fail_requests` (an HTTP error status for one
resource) and the `requests` log.
"""

from __future__ import annotations

import copy
import json
import queue
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pykp.labs.lab import in_namespace

Obj = dict[str, Any]

TOKEN = "pykp-stand-in-token"
# The real server's default cap on a watch without timeoutSeconds is 30-60 minutes.
DEFAULT_WATCH_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Resource:
    plural: str
    api_version: str
    kind: str
    namespaced: bool

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


RESOURCES = {
    "services": Resource("services", "v1", "Service", True),
    "nodes": Resource("nodes", "v1", "Node", False),
    "endpointslices": Resource("endpointslices", "discovery.k8s.io/v1", "EndpointSlice", True),
}

_PATH = re.compile(
    r"^/(?:api/v1|apis/discovery\.k8s\.io/v1)"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
)
_GROUP_OF = {"v1": "/api/v1", "discovery.k8s.io/v1": "/apis/discovery.k8s.io/v1"}


@dataclass(frozen=True)
class Request:
    """One request the server answered (for tests to count lists and watches)."""

    method: str
    path: str
    query: dict[str, str]
    resource: str | None
    watch: bool


@dataclass
class _Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    old: Obj | None
    new: Obj


@dataclass
class _Selector:
    namespace: str | None = None
    fields: list[tuple[str, str, bool]] = field(default_factory=list)  # (path, value, equal)
    labels: list[tuple[str, str | None, bool]] = field(default_factory=list)  # None: exists

    def matches(self, obj: Obj) -> bool:
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        for path, value, equal in self.fields:
            actual = metadata.get(path.removeprefix("metadata."))
            if (actual == value) != equal:
                return False
        labels = metadata.get("labels") or {}
        for key, label_value, positive in self.labels:
            present = key in labels if label_value is None else labels.get(key) == label_value
            if present != positive:
                return False
        return True


class _BadRequest(Exception):
    pass


def _parse_selector(namespace: str | None, query: dict[str, str]) -> _Selector:
    selector = _Selector(namespace=namespace)
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        match = re.fullmatch(r"(metadata\.(?:name|namespace))(==|=|!=)(.*)", term)
        if match is None:
            raise _BadRequest(f"unsupported field selector {term!r}")
        selector.fields.append((match[1], match[3], match[2] != "!="))
    for term in filter(None, query.get("labelSelector", "").split(",")):
        match = re.fullmatch(r"(!?)([\w./-]+)(?:(==|=|!=)([\w.-]*))?", term)
        if match is None:
            raise _BadRequest(f"unsupported label selector {term!r}")
        negated, key, operator, value = match.groups()
        if operator is None:
            selector.labels.append((key, None, not negated))
        elif negated:
            raise _BadRequest(f"unsupported label selector {term!r}")
        else:
            selector.labels.append((key, value, operator != "!="))
    return selector


class _Watch:
    """One open watch stream: what the handler thread sends, fed by the server."""

    def __init__(self, resource: str, selector: _Selector, bookmarks: bool) -> None:
        self.resource = resource
        self.selector = selector
        self.bookmarks = bookmarks
        self.stalled = False
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def offer(self, event: _Event) -> None:
        """Queue `event` as this watcher sees it through its selector."""
        if self.stalled or event.resource != self.resource:
            return
        was = event.old is not None and self.selector.matches(event.old)
        now = event.type != "DELETED" and self.selector.matches(event.new)
        if event.type == "DELETED":
            if self.selector.matches(event.new):
                self.items.put(("DELETED", event.new))
        elif was and now:
            self.items.put(("MODIFIED", event.new))
        elif now:
            self.items.put(("ADDED", event.new))
        elif was:
            # Left the selection: the real server reports it as deleted.
            self.items.put(("DELETED", event.new))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class KubeApiServer:
    """The stand-in server. Use as a context manager, or `start()` and `stop()`."""

    def __init__(
        self,
        *,
        history_limit: int = 1000,
        bookmark_interval: float | None = None,
        token: str = TOKEN,
        address: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        # Where it listens: loopback of this namespace by default; a lab's network with
        # `netns` and an address there.
        self.address = address
        self.netns = netns
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._rv = 1  # like etcd, whose first revision is 1: no list ever says "0"
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {name: {} for name in RESOURCES}
        self._history: deque[_Event] = deque(maxlen=history_limit)
        self._compacted = 0  # a watch may start at this version or later
        self._watches: set[_Watch] = set()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._available = False
        self._failing: dict[str, int] = {}  # plural -> HTTP status every request gets
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- life cycle

    def start(self) -> KubeApiServer:
        self._listen()
        if self.bookmark_interval is not None:
            self._ticker = threading.Thread(target=self._tick, name="apiserver-bookmarks")
            self._ticker.daemon = True
            self._ticker.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._close()
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self._port}"

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        """A kubeconfig for this server (bearer token, plain HTTP on loopback)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.token}}],
            "contexts": [
                {"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester"}}
            ],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
        return path

    def _listen(self) -> None:
        server = self

        class Handler(_Handler):
            apiserver = server

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self.address else socket.AF_INET

        # A socket keeps the namespace it was made in: made inside `netns`, it serves that
        # namespace's network while this thread (and the server's) stay where they are.
        with in_namespace(self.netns) if self.netns else nullcontext():
            httpd = Server((self.address, self._port), Handler)
        httpd.daemon_threads = True
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._available = True
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="apiserver"
        )
        self._thread.daemon = True
        self._thread.start()

    def _close(self) -> None:
        with self._lock:
            self._available = False
            httpd, self._httpd = self._httpd, None
            connections = list(self._connections)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()  # the port now refuses connections
        self.drop_watches()
        for connection in connections:  # idle keep-alive connections too
            _shutdown(connection)

    def set_available(self, available: bool) -> None:
        """False: refuse new connections and cut open ones. True: listen again (same port)."""
        if available and self._httpd is None:
            self._listen()
        elif not available:
            self._close()

    def _tick(self) -> None:
        assert self.bookmark_interval is not None
        while not self._stopping.wait(self.bookmark_interval):
            self.send_bookmarks()

    # -- objects

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._objects[plural].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def create(self, plural: str, obj: Obj) -> Obj:
        return self._write(plural, obj, create=True)

    def update(self, plural: str, obj: Obj) -> Obj:
        return self._write(plural, obj, create=False)

    def apply(self, plural: str, obj: Obj) -> Obj:
        """Create, or update when it exists (kubectl apply's effect, without merging)."""
        return self._write(plural, obj, create=None)

    def _write(self, plural: str, obj: Obj, create: bool | None) -> Obj:
        resource = RESOURCES[plural]
        new = copy.deepcopy(obj)
        metadata = new.setdefault("metadata", {})
        if resource.namespaced:
            metadata.setdefault("namespace", "default")
        key = (metadata.get("namespace", ""), metadata["name"])
        with self._lock:
            old = self._objects[plural].get(key)
            if create is True and old is not None:
                raise KeyError(f"{plural} {key} already exists")
            if create is False and old is None:
                raise KeyError(f"{plural} {key} not found")
            self._rv += 1
            new["kind"], new["apiVersion"] = resource.kind, resource.api_version
            if old is None:
                metadata["uid"] = str(uuid.uuid4())
                metadata.setdefault("creationTimestamp", _now())
                metadata["generation"] = 1
            else:
                for kept in ("uid", "creationTimestamp"):
                    metadata[kept] = old["metadata"][kept]
                metadata["generation"] = old["metadata"].get("generation", 1) + 1
            metadata["resourceVersion"] = str(self._rv)
            self._objects[plural][key] = new
            self._record(_Event(self._rv, plural, "ADDED" if old is None else "MODIFIED", old, new))
            return copy.deepcopy(new)

    def delete(self, plural: str, namespace: str, name: str) -> Obj:
        with self._lock:
            old = self._objects[plural].pop((namespace, name))
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)  # the deletion's version
            self._record(_Event(self._rv, plural, "DELETED", old, gone))
            return copy.deepcopy(gone)

    def _record(self, event: _Event) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv  # about to fall out of the window
        self._history.append(event)
        for watch in self._watches:
            watch.offer(event)

    # -- faults and controls

    def compact(self) -> None:
        """Forget the history: a watch from any earlier version now gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv

    def send_bookmarks(self) -> None:
        """A BOOKMARK at the current version to every watch that allowed them."""
        with self._lock:
            for watch in self._watches:
                if watch.bookmarks and not watch.stalled:
                    watch.items.put(("BOOKMARK", self._rv))

    def drop_watches(self) -> int:
        """Cut every open watch stream (no final chunk: the client sees a broken stream)."""
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.items.put(("DROP", None))
        return len(watches)

    def stall_watches(self) -> int:
        """Keep every open watch stream open but send nothing more on it, bookmarks included."""
        with self._lock:
            for watch in self._watches:
                watch.stalled = True
            return len(self._watches)

    def fail_requests(self, plural: str, code: int | None = 500) -> None:
        """Answer every request for `plural` with HTTP `code` (None: serve it again)."""
        with self._lock:
            if code is None:
                self._failing.pop(plural, None)
            else:
                self._failing[plural] = code

    def _failure(self, plural: str) -> int | None:
        with self._lock:
            return self._failing.get(plural)

    def open_watches(self, plural: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watches if plural is None or w.resource == plural)

    def count(self, plural: str | None = None, *, watch: bool | None = None) -> int:
        """Requests answered so far, by resource and kind (list or watch)."""
        with self._lock:
            return sum(
                1
                for request in self.requests
                if (plural is None or request.resource == plural)
                and (watch is None or request.watch == watch)
            )

    # -- serving (called by the handler)

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    @contextmanager
    def _connection(self, connection: socket.socket) -> Iterator[None]:
        with self._lock:
            self._connections.add(connection)
        try:
            yield
        finally:
            with self._lock:
                self._connections.discard(connection)

    def _list(self, plural: str, selector: _Selector, query: dict[str, str]) -> tuple[int, Obj]:
        resource = RESOURCES[plural]
        with self._lock:
            requested = query.get("resourceVersion", "")
            exact = query.get("resourceVersionMatch") == "Exact" and requested not in ("", "0")
            if exact and int(requested) < self._compacted:
                message = f"too old resource version: {requested} ({self._compacted})"
                return 410, _status(410, "Expired", message)
            # Paging: `continue` is "version:offset" (the real token is opaque too); the
            # pages are served from the current state, so tests should not write between.
            version, offset = self._rv, 0
            if query.get("continue"):
                version, offset = (int(part) for part in query["continue"].split(":"))
                if version < self._compacted:
                    message = "The provided continue parameter is too old"
                    return 410, _status(410, "Expired", message)
            items = []
            for key in sorted(self._objects[plural]):
                obj = self._objects[plural][key]
                if selector.matches(obj):
                    item = copy.deepcopy(obj)
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                    items.append(item)
            metadata: Obj = {"resourceVersion": str(version)}
            limit = int(query.get("limit") or 0)
            if limit > 0 and len(items) > offset + limit:
                metadata["continue"] = f"{version}:{offset + limit}"
                metadata["remainingItemCount"] = len(items) - offset - limit
            end = offset + limit if limit > 0 else len(items)
            return 200, {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": metadata,
                "items": items[offset:end],
            }

    def _open_watch(
        self, plural: str, selector: _Selector, query: dict[str, str]
    ) -> tuple[_Watch, list[tuple[str, Any]]]:
        """Register a watch; the events it starts with (synthetic, replayed, or a 410)."""
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        watch = _Watch(plural, selector, bookmarks)
        requested = query.get("resourceVersion", "")
        with self._lock:
            first: list[tuple[str, Any]] = []
            if requested in ("", "0"):
                for key in sorted(self._objects[plural]):
                    if selector.matches(self._objects[plural][key]):
                        first.append(("ADDED", copy.deepcopy(self._objects[plural][key])))
            elif int(requested) < self._compacted:
                message = f"too old resource version: {requested} ({self._compacted})"
                return watch, [("ERROR", _status(410, "Expired", message))]
            else:
                replay = _Watch(plural, selector, bookmarks)
                for event in self._history:
                    if event.rv > int(requested):
                        replay.offer(event)
                while not replay.items.empty():
                    first.append(replay.items.get_nowait())
            self._watches.add(watch)  # under the lock: no event between replay and live
            return watch, first

    def _close_watch(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _bookmark(self, plural: str, rv: int) -> Obj:
        resource = RESOURCES[plural]
        return {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
        }


def _shutdown(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    apiserver: KubeApiServer
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read `requests` instead

    def handle(self) -> None:
        with self.apiserver._connection(self.connection):
            try:
                super().handle()
            except (ConnectionError, OSError):
                pass  # the client went away, or a fault control cut the connection

    def do_GET(self) -> None:  # http.server's naming
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        match = _PATH.match(url.path)
        plural = match["plural"] if match else None
        is_watch = query.get("watch") in ("1", "true")
        self.apiserver._log(Request("GET", url.path, query, plural, is_watch))
        if self.headers.get("Authorization") != f"Bearer {self.apiserver.token}":
            self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if match is None or plural not in RESOURCES:
            self._send_json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
            return
        failure = self.apiserver._failure(plural)
        if failure is not None:
            self._send_json(failure, _status(failure, "InternalError", "injected failure"))
            return
        resource = RESOURCES[plural]
        expected_prefix = _GROUP_OF[resource.api_version]
        namespace, name = match["namespace"], match["name"]
        if not url.path.startswith(expected_prefix) or (namespace and not resource.namespaced):
            self._send_json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
            return
        if name is not None:
            obj = self.apiserver.get(plural, namespace or "", name)
            if obj is None:
                message = f'{plural} "{name}" not found'
                self._send_json(404, _status(404, "NotFound", message))
            else:
                self._send_json(200, obj)
            return
        try:
            selector = _parse_selector(namespace, query)
        except _BadRequest as error:
            self._send_json(400, _status(400, "BadRequest", str(error)))
            return
        if is_watch:
            self._watch(plural, selector, query)
        else:
            self._send_json(*self.apiserver._list(plural, selector, query))

    def _send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, kind: str, obj: Obj) -> None:
        self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def _watch(self, plural: str, selector: _Selector, query: dict[str, str]) -> None:
        timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        deadline = time.monotonic() + timeout
        watch, first = self.apiserver._open_watch(plural, selector, query)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for kind, obj in first:
                self._event(kind, obj)
                if kind == "ERROR":
                    self._chunk(b"")  # the server ends the stream after an error
                    return
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._chunk(b"")  # a clean end: the client resumes from its version
                    return
                try:
                    kind, obj = watch.items.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                if kind == "DROP":
                    self.close_connection = True
                    _shutdown(self.connection)
                    return
                if kind == "BOOKMARK":
                    obj = self.apiserver._bookmark(plural, obj)
                self._event(kind, obj)
        finally:
            self.apiserver._close_watch(watch)


# --- object builders for tests ----------------------------------------------------------------


def service(
    name: str,
    cluster_ip: str,
    *,
    namespace: str = "default",
    ports: list[Obj] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> Obj:
    """A Service as the API server stores it (defaults filled in)."""
    metadata: Obj = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    return {
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            "sessionAffinity": "None",
            **spec,
        },
    }


def endpoint_slice(
    name: str,
    service_name: str,
    addresses: list[str],
    *,
    namespace: str = "default",
    port: int = 8080,
    port_name: str = "http",
    node_name: str | None = None,
) -> Obj:
    """An IPv4 EndpointSlice of ready endpoints, as the EndpointSlice controller writes it."""
    endpoints = []
    for address in addresses:
        endpoint: Obj = {
            "addresses": [address],
            "conditions": {"ready": True, "serving": True, "terminating": False},
        }
        if node_name is not None:
            endpoint["nodeName"] = node_name
        endpoints.append(endpoint)
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def node(name: str, zone: str | None = None, address: str = "192.168.0.1") -> Obj:
    labels = {"kubernetes.io/hostname": name}
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }


class ClusterApiServer(KubeApiServer):
    """The stand-in API server listening on a lab's cluster network.

    Its socket is created inside `netns` (a socket keeps the namespace it was made in),
    so it serves the lab's nodes while running in the test process; `set_available(True)`
    listens there again on the same port.
    """

    def __init__(self, netns: str, address: str, **kwargs: Any) -> None:
        super().__init__(address=address, netns=netns, **kwargs)
