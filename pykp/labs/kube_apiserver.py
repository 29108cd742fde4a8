"""A stand-in Kubernetes API server for tests: the real wire protocol, in one process.

No kube-apiserver can be installed here, so tests run this instead. It speaks what pykp's
Kubernetes source uses, as the real server does (see the Kubernetes "API concepts" page:
efficient detection of changes, watch bookmarks, resource versions):

- core/v1 `services` and `nodes`, discovery.k8s.io/v1 `endpointslices`; cluster-wide and
  per-namespace collections and single objects (GET only).
- LIST: `{"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
  "items": [...]}` (items without kind and apiVersion, like the real server), in pages with
  `limit` and `continue`; the pages of one list are one snapshot, as with the real server,
  whatever is written meanwhile.
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
- Bearer-token authentication (401 otherwise); with `tls` (a server SSLContext), HTTPS,
  where a client certificate the context verifies authenticates too.

Built to keep up with 100,000s of objects: each object's JSON is encoded once when it is
written (a stored version never changes), a list joins those bytes, a watch event wraps them,
and an event is offered only to the watches of its kind.

Test controls: `create`/`update`/`apply`/`delete` objects (`create_many` for many at once:
the same versions and events), `send_bookmarks`, `drop_watches` (cut every watch stream
mid-flight), `stall_watches` (keep them open but silent), `compact` (forget history: older
versions answer 410), `set_available(False)` (refuse connections, drop open ones),
`fail_requests` (an HTTP error status for one resource) and the `requests` log.
`benches/standin_scale.py` measures it with 100,000 Services and EndpointSlices.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
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
# Snapshots held for paged lists to continue from (each is one list of references).
PAGED_SNAPSHOTS = 64
WATCH_LINES_PER_CHUNK = 500


@dataclass(frozen=True)
class Resource:
    plural: str
    api_version: str
    kind: str
    namespaced: bool

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def prefix(self) -> bytes:
        """The start of an object's JSON up to its first own field."""
        return b'{"kind":"%s","apiVersion":"%s",' % (self.kind.encode(), self.api_version.encode())


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


@dataclass(frozen=True, slots=True)
class _Stored:
    """One object as stored at its resourceVersion; never changed once made.

    The JSON is encoded once, at write time: a list joins these bytes and a watch event
    wraps them, so serving costs no re-encoding and no copying of the object.
    """

    namespace: str  # "" for a cluster-scoped object
    name: str
    labels: dict[str, str]  # a private copy, for selectors
    uid: str
    created: str
    generation: int
    item: bytes  # the object without kind and apiVersion, as a list's item

    def body(self, resource: Resource) -> bytes:
        """The object with kind and apiVersion first (a GET's body, a watch event's object)."""
        return resource.prefix + self.item[1:]  # item is "{" + at least "metadata"

    def decoded(self, resource: Resource) -> Obj:
        decoded: Obj = json.loads(self.body(resource))  # a fresh copy for the caller
        return decoded


@dataclass(frozen=True, slots=True)
class _Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    old: _Stored | None
    new: _Stored


@dataclass
class _Selector:
    namespace: str | None = None
    fields: list[tuple[str, str, bool]] = field(default_factory=list)  # (path, value, equal)
    labels: list[tuple[str, str | None, bool]] = field(default_factory=list)  # None: exists

    @property
    def everything(self) -> bool:
        return self.namespace is None and not self.fields and not self.labels

    def matches(self, stored: _Stored) -> bool:
        if self.namespace is not None and stored.namespace != self.namespace:
            return False
        for path, value, equal in self.fields:
            actual = stored.name if path == "metadata.name" else stored.namespace
            if (actual == value) != equal:
                return False
        labels = stored.labels
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
        # (ADDED|MODIFIED|DELETED, _Stored), (BOOKMARK, version), (ERROR, Status), (DROP, None)
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def view(self, event: _Event) -> tuple[str, _Stored] | None:
        """`event` as this watcher sees it through its selector (None: not at all)."""
        if event.type == "DELETED":
            return ("DELETED", event.new) if self.selector.matches(event.new) else None
        was = event.old is not None and self.selector.matches(event.old)
        now = self.selector.matches(event.new)
        if was and now:
            return ("MODIFIED", event.new)
        if now:
            return ("ADDED", event.new)
        if was:
            # Left the selection: the real server reports it as deleted.
            return ("DELETED", event.new)
        return None

    def offer(self, event: _Event) -> None:
        """Queue `event` as this watcher sees it through its selector."""
        if self.stalled:
            return
        seen = self.view(event)
        if seen is not None:
            self.items.put(seen)


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        # Where it listens: loopback of this namespace by default; a lab's network with
        # `netns` and an address there.
        self.address = address
        self.netns = netns
        self.token = token
        # HTTPS with this server context; a client certificate it verifies authenticates
        # its requests, as a bearer token does (the real server's x509 authenticator).
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._rv = 1  # like etcd, whose first revision is 1: no list ever says "0"
        self._objects: dict[str, dict[tuple[str, str], _Stored]] = {name: {} for name in RESOURCES}
        # Each kind's objects in key order, made on the first list after a write; immutable,
        # so a list (or a paged list's later pages) reads it outside the lock.
        self._sorted: dict[str, list[_Stored] | None] = {name: None for name in RESOURCES}
        self._written: dict[str, int] = {name: 0 for name in RESOURCES}  # version of last write
        # The snapshots that paged lists continue from, by (kind, version): pages stay one
        # consistent list while writes go on, as with the real server (etcd reads at a revision).
        self._paged: OrderedDict[tuple[str, int], list[_Stored]] = OrderedDict()
        self._history: deque[_Event] = deque(maxlen=history_limit)
        self._compacted = 0  # a watch may start at this version or later
        self._watches: dict[str, set[_Watch]] = {name: set() for name in RESOURCES}
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
        return f"{'https' if self.tls else 'http'}://{host}:{self._port}"

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
        if self.tls is not None:  # the handshake happens at accept; a failed one drops the client
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
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
            stored = self._objects[plural].get((namespace, name))
        return stored.decoded(RESOURCES[plural]) if stored is not None else None

    def create(self, plural: str, obj: Obj) -> Obj:
        with self._lock:
            stored = self._write(plural, obj, create=True)
        return stored.decoded(RESOURCES[plural])

    def create_many(self, plural: str, objects: Iterable[Obj]) -> int:
        """`create` each object (each its own version and ADDED event); the last version.

        For labs and benchmarks with many objects: it skips decoding a copy for the caller,
        and takes the lock per batch rather than per object.
        """
        batch: list[Obj] = []
        for obj in objects:
            batch.append(obj)
            if len(batch) == 1000:
                self._create_batch(plural, batch)
                batch = []
        self._create_batch(plural, batch)
        return self.resource_version

    def _create_batch(self, plural: str, batch: list[Obj]) -> None:
        with self._lock:
            for obj in batch:
                self._write(plural, obj, create=True)

    def update(self, plural: str, obj: Obj) -> Obj:
        with self._lock:
            stored = self._write(plural, obj, create=False)
        return stored.decoded(RESOURCES[plural])

    def apply(self, plural: str, obj: Obj) -> Obj:
        """Create, or update when it exists (kubectl apply's effect, without merging)."""
        with self._lock:
            stored = self._write(plural, obj, create=None)
        return stored.decoded(RESOURCES[plural])

    def _write(self, plural: str, obj: Obj, create: bool | None) -> _Stored:
        """Store `obj` at the next version (the caller holds the lock)."""
        resource = RESOURCES[plural]
        # Encoding below takes what the object holds now: only metadata is changed here,
        # so only it is copied (the caller's object stays as it was).
        metadata = dict(obj.get("metadata") or {})
        if resource.namespaced:
            metadata.setdefault("namespace", "default")
        key = (metadata.get("namespace", ""), metadata["name"])
        old = self._objects[plural].get(key)
        if create is True and old is not None:
            raise KeyError(f"{plural} {key} already exists")
        if create is False and old is None:
            raise KeyError(f"{plural} {key} not found")
        if old is None:
            uid, created, generation = str(uuid.uuid4()), metadata.get("creationTimestamp"), 1
            created = created or _now()
        else:
            uid, created, generation = old.uid, old.created, old.generation + 1
        version = self._rv + 1
        metadata["uid"], metadata["creationTimestamp"] = uid, created
        metadata["generation"], metadata["resourceVersion"] = generation, str(version)
        body = {"metadata": metadata}
        body.update((k, v) for k, v in obj.items() if k not in ("metadata", "kind", "apiVersion"))
        item = _encode(body)  # before anything changes: an object that cannot be encoded fails
        stored = _Stored(
            key[0], key[1], dict(metadata.get("labels") or {}), uid, created, generation, item
        )
        self._rv = version
        self._objects[plural][key] = stored
        self._record(_Event(version, plural, "ADDED" if old is None else "MODIFIED", old, stored))
        return stored

    def delete(self, plural: str, namespace: str, name: str) -> Obj:
        resource = RESOURCES[plural]
        with self._lock:
            old = self._objects[plural].pop((namespace, name))
            self._rv += 1
            body = json.loads(old.item)
            body["metadata"]["resourceVersion"] = str(self._rv)  # the deletion's version
            gone = dataclasses.replace(old, item=_encode(body))
            self._record(_Event(self._rv, plural, "DELETED", old, gone))
        return gone.decoded(resource)

    def _record(self, event: _Event) -> None:
        self._sorted[event.resource] = None
        self._written[event.resource] = event.rv
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv  # about to fall out of the window
        self._history.append(event)
        for watch in self._watches[event.resource]:
            watch.offer(event)

    def _current(self, plural: str) -> list[_Stored]:
        """This kind's objects in key order, now (the caller holds the lock)."""
        current = self._sorted[plural]
        if current is None:
            objects = self._objects[plural]
            current = [objects[key] for key in sorted(objects)]
            self._sorted[plural] = current
        return current

    # -- faults and controls

    def compact(self) -> None:
        """Forget the history: a watch from any earlier version now gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv
            self._paged.clear()  # continuing an older list is 410 too

    def send_bookmarks(self) -> None:
        """A BOOKMARK at the current version to every watch that allowed them."""
        with self._lock:
            for watch in self._all_watches():
                if watch.bookmarks and not watch.stalled:
                    watch.items.put(("BOOKMARK", self._rv))

    def drop_watches(self) -> int:
        """Cut every open watch stream (no final chunk: the client sees a broken stream)."""
        with self._lock:
            watches = self._all_watches()
        for watch in watches:
            watch.items.put(("DROP", None))
        return len(watches)

    def stall_watches(self) -> int:
        """Keep every open watch stream open but send nothing more on it, bookmarks included."""
        with self._lock:
            watches = self._all_watches()
            for watch in watches:
                watch.stalled = True
            return len(watches)

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
            return len(self._all_watches()) if plural is None else len(self._watches[plural])

    def _all_watches(self) -> list[_Watch]:
        return [watch for watches in self._watches.values() for watch in watches]

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

    def _list(self, plural: str, selector: _Selector, query: dict[str, str]) -> tuple[int, bytes]:
        """A list response's status and body: a page of a snapshot of the kind's objects."""
        resource = RESOURCES[plural]
        requested = query.get("resourceVersion", "")
        exact = query.get("resourceVersionMatch") == "Exact" and requested not in ("", "0")
        try:
            limit = int(query.get("limit") or 0)
            if exact:
                int(requested)
            # `continue` is "version:position" in the snapshot (the real token is opaque too).
            token = query.get("continue")
            version, position = (int(part) for part in token.split(":")) if token else (0, 0)
        except ValueError:
            return 400, _encode(_status(400, "BadRequest", "invalid limit, version or continue"))
        with self._lock:
            if exact and int(requested) < self._compacted:
                message = f"too old resource version: {requested} ({self._compacted})"
                return 410, _encode(_status(410, "Expired", message))
            if token:
                # A held snapshot serves until `compact()`; the real server's continue lasts
                # until etcd compacts (minutes), not only while the watch history has it.
                snapshot = self._paged.get((plural, version))
                if snapshot is not None:
                    self._paged.move_to_end((plural, version))
                elif version >= self._compacted and self._written[plural] <= version:
                    snapshot = self._current(plural)  # nothing of this kind changed since
                if snapshot is None:
                    message = "The provided continue parameter is too old"
                    return 410, _encode(_status(410, "Expired", message))
            else:
                version, snapshot = self._rv, self._current(plural)
        # The snapshot never changes: select and join the page without the lock.
        end = len(snapshot) if limit <= 0 else min(len(snapshot), position + limit)
        if selector.everything:
            page = snapshot[position:end]
            following = end
        else:
            page, following = [], position
            while following < len(snapshot) and (limit <= 0 or len(page) < limit):
                if selector.matches(snapshot[following]):
                    page.append(snapshot[following])
                following += 1
            # Continue only if another object matches (the real server may also send an
            # empty last page; this one does not).
            while following < len(snapshot) and not selector.matches(snapshot[following]):
                following += 1
        metadata: Obj = {"resourceVersion": str(version)}
        if limit > 0 and following < len(snapshot):
            metadata["continue"] = f"{version}:{following}"
            if selector.everything:  # the real server counts only unselected lists
                metadata["remainingItemCount"] = len(snapshot) - following
            with self._lock:
                self._paged[(plural, version)] = snapshot
                while len(self._paged) > PAGED_SNAPSHOTS:
                    self._paged.popitem(last=False)
        head = b'{"kind":"%s","apiVersion":"%s","metadata":%s,"items":[' % (
            resource.list_kind.encode(),
            resource.api_version.encode(),
            _encode(metadata),
        )
        return 200, b"".join((head, b",".join(stored.item for stored in page), b"]}"))

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
                first = [("ADDED", s) for s in self._current(plural) if selector.matches(s)]
            elif int(requested) < self._compacted:
                message = f"too old resource version: {requested} ({self._compacted})"
                return watch, [("ERROR", _status(410, "Expired", message))]
            else:
                for event in self._history:
                    if event.rv > int(requested) and event.resource == plural:
                        seen = watch.view(event)
                        if seen is not None:
                            first.append(seen)
            self._watches[plural].add(watch)  # under the lock: no event between replay and live
            return watch, first

    def _close_watch(self, watch: _Watch) -> None:
        with self._lock:
            self._watches[watch.resource].discard(watch)

    def _get(self, plural: str, namespace: str, name: str) -> bytes | None:
        with self._lock:
            stored = self._objects[plural].get((namespace, name))
        return stored.body(RESOURCES[plural]) if stored is not None else None

    def _event_line(self, plural: str, kind: str, payload: Any) -> bytes:
        """One watch event, newline-terminated, as it goes on the wire."""
        if kind == "BOOKMARK":
            resource = RESOURCES[plural]
            payload = {
                "kind": resource.kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(payload), "creationTimestamp": None},
            }
        obj = payload.body(RESOURCES[plural]) if isinstance(payload, _Stored) else _encode(payload)
        return b'{"type":"%s","object":%s}\n' % (kind.encode(), obj)


def _encode(obj: Obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


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
        certified = isinstance(self.connection, ssl.SSLSocket) and self.connection.getpeercert()
        if not certified and self.headers.get("Authorization") != f"Bearer {self.apiserver.token}":
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
            body = self.apiserver._get(plural, namespace or "", name)
            if body is None:
                message = f'{plural} "{name}" not found'
                self._send_json(404, _status(404, "NotFound", message))
            else:
                self._send(200, body)
            return
        try:
            selector = _parse_selector(namespace, query)
        except _BadRequest as error:
            self._send_json(400, _status(400, "BadRequest", str(error)))
            return
        if is_watch:
            self._watch(plural, selector, query)
        else:
            self._send(*self.apiserver._list(plural, selector, query))

    def _send_json(self, code: int, body: Obj) -> None:
        self._send(code, _encode(body))

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, plural: str, selector: _Selector, query: dict[str, str]) -> None:
        timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        deadline = time.monotonic() + timeout
        apiserver = self.apiserver
        watch, first = apiserver._open_watch(plural, selector, query)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            # Events go out in chunks of many lines (clients split the stream at newlines,
            # not at chunks): one write per event would cost a system call each.
            lines: list[bytes] = []
            for kind, payload in first:
                lines.append(apiserver._event_line(plural, kind, payload))
                if kind == "ERROR":
                    self._chunk(b"".join(lines))
                    self._chunk(b"")  # the server ends the stream after an error
                    return
                if len(lines) == WATCH_LINES_PER_CHUNK:
                    self._chunk(b"".join(lines))
                    lines = []
            if lines:
                self._chunk(b"".join(lines))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._chunk(b"")  # a clean end: the client resumes from its version
                    return
                try:
                    kind, payload = watch.items.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                lines = []
                while kind != "DROP":
                    lines.append(apiserver._event_line(plural, kind, payload))
                    if len(lines) == WATCH_LINES_PER_CHUNK:
                        break
                    try:
                        kind, payload = watch.items.get_nowait()
                    except queue.Empty:
                        break
                if lines:
                    self._chunk(b"".join(lines))
                if kind == "DROP":
                    self.close_connection = True
                    _shutdown(self.connection)
                    return
        finally:
            apiserver._close_watch(watch)


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
