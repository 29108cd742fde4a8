"""A reflector: one resource type's objects, kept equal to the API by list and watch.

The pattern is client-go's Reflector (Kubernetes "API concepts: efficient detection of
changes"): list, then watch from the list's resourceVersion with bookmarks; a stream
that ends is resumed from the last version seen (an event's or a bookmark's); 410 Gone
means the version left the server's history, so list again and diff the list against the
cache so that objects deleted meanwhile are deleted here too. Failures back off
exponentially with jitter, and the cache is kept meanwhile: what was last known stays.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import urllib3

from pykp.sources.kube.client import ApiError, Gone, WatchEvent

JSON = Mapping[str, Any]

log = logging.getLogger("pykp.sources.kube")


class EventStream(Protocol):
    def __iter__(self) -> Iterator[WatchEvent]: ...
    def close(self) -> None: ...


class ListWatch(Protocol):
    """What a reflector needs from the API (`client.ApiListWatch`, or a fake)."""

    name: str

    def pages(self) -> Iterator[tuple[list[JSON], str]]: ...
    def watch(self, resource_version: str) -> EventStream: ...


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": a delay in [d/2, d], d doubling to `maximum`.

    The jitter spreads out the reconnections of every node after an API server outage.
    """

    initial: float = 0.5
    maximum: float = 30.0
    _failures: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self._failures)
        self._failures = min(self._failures + 1, 32)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


@dataclass
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    silent_restarts: int = 0
    errors: int = 0
    events: int = 0
    bookmarks: int = 0
    last_error: str | None = None  # None again once a list or a watch event succeeds


def object_key(obj: JSON) -> str | None:
    """`namespace/name`, or `name` for a cluster-scoped object; None without a name."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str):
        return None
    namespace = metadata.get("namespace")
    name: str = metadata["name"]
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name


# An object's resourceVersion as the reflector keeps it (one per object: 200,000 at
# 100,000 Services): an int when it is one in decimal, as etcd's are (32 bytes instead of a
# 55-byte string); only compared for equality, so any other text is kept as it is.
_Version = str | int | None


def _version(obj: JSON) -> _Version:
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    return _compact(version) if isinstance(version, str) else None


def _compact(version: str) -> str | int:
    if version.isascii() and version.isdigit() and (version == "0" or version[0] != "0"):
        return int(version)
    return version


class Reflector:
    """Runs list and watch for one resource type in a thread; `cache()` is a snapshot.

    `on_change(objects)` is called (from the reflector's thread, no lock held) after every
    change with the objects that changed, by key (None: deleted), and once when the first
    list is in even if it is empty. A list's changes come a page at a time, its deletions
    last. The reflector keeps only each object's resourceVersion, not the object: the
    consumer translates what it is handed (one copy of the state).
    """

    # A stream that ends this soon without an event counts as a failure (a proxy that
    # answers and hangs up at once must not make the reflector spin).
    MIN_HEALTHY_STREAM = 1.0

    def __init__(
        self,
        list_watch: ListWatch,
        on_change: Callable[[Mapping[str, JSON | None]], None],
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = list_watch.name
        self.stats = ReflectorStats()
        self._list_watch = list_watch
        self._on_change = on_change
        self._backoff = backoff or Backoff()
        self._lock = threading.Lock()
        self._versions: dict[str, _Version] = {}  # key -> resourceVersion
        self._version = ""
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None

    # -- public

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def synced(self) -> bool:
        """True once the first list is in (and for good: later outages keep the cache)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    @property
    def resource_version(self) -> str:
        with self._lock:
            return self._version

    def keys(self) -> list[str]:
        """The keys of the objects the API holds, as far as this reflector knows."""
        with self._lock:
            return list(self._versions)

    # -- the loop

    def _run(self) -> None:
        must_list = True
        gone_in_a_row = 0
        while not self._stopping.is_set():
            try:
                if must_list:
                    self._list()
                    must_list = False
                self._watch()
                gone_in_a_row = 0
            except Gone as error:
                # The version left the history: only a fresh list can catch up.
                self.stats.relists_after_gone += 1
                log.info("%s; listing again", error)
                must_list = True
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # a relist should have fixed it: do not spin
                    self._pause(f"{self.name}: 410 Gone again")
            except urllib3.exceptions.ReadTimeoutError:
                # Silent past the bookmark interval: presume the connection dead.
                self.stats.silent_restarts += 1
                log.info("%s: watch silent too long; restarting it", self.name)
            except (ApiError, urllib3.exceptions.HTTPError, OSError) as error:
                if self._stopping.is_set():
                    break
                self.stats.errors += 1
                self._pause(str(error) if isinstance(error, ApiError) else f"{self.name}: {error}")
            except Exception:  # a bug must not end the thread silently
                self.stats.errors += 1
                log.exception("%s: unexpected error", self.name)
                self._pause(f"{self.name}: unexpected error")

    def _pause(self, why: str) -> None:
        self.stats.last_error = why
        delay = self._backoff.next_delay()
        log.warning("%s; retrying in %.1fs (keeping the last known state)", why, delay)
        self._stopping.wait(delay)

    def _list(self) -> None:
        self.stats.lists += 1
        old = self._versions  # only this thread writes it
        fresh: dict[str, _Version] = {}
        version = ""
        # Page by page: a page's objects are handed over (translated, then freed) before
        # the next page is read, so a list of 100,000 objects is never held whole.
        for page, page_version in self._list_watch.pages():
            version = page_version
            changed: dict[str, JSON | None] = {}
            for item in page:
                key = object_key(item)
                if key is None:
                    continue
                seen = fresh[key] = _version(item)
                if key not in old or seen != old[key] or seen is None:
                    changed[key] = item
            del page
            if changed:
                self._on_change(changed)
            del changed
        # What is gone from the list was deleted meanwhile.
        deleted: dict[str, JSON | None] = dict.fromkeys(old.keys() - fresh.keys())
        with self._lock:
            self._versions = fresh
            self._version = version
            first = not self._synced.is_set()
        self._backoff.reset()
        self.stats.last_error = None
        log.debug("%s: listed %d objects at version %s", self.name, len(fresh), version)
        self._synced.set()
        if deleted or first:
            self._on_change(deleted)

    def _watch(self) -> None:
        self.stats.watches += 1
        stream = self._list_watch.watch(self.resource_version)
        with self._lock:
            self._stream = stream
        if self._stopping.is_set():
            stream.close()
            return
        started = time.monotonic()
        events = 0
        try:
            for event in stream:
                events += 1
                self._apply(event)
                self._backoff.reset()
                self.stats.last_error = None
        finally:
            with self._lock:
                self._stream = None
        if events == 0 and time.monotonic() - started < self.MIN_HEALTHY_STREAM:
            raise ApiError(f"{self.name}: the watch ended at once")
        # Ended cleanly (timeoutSeconds): the loop resumes from the last version.

    def _apply(self, event: WatchEvent) -> None:
        if event.type == "BOOKMARK":
            self.stats.bookmarks += 1
            if event.resource_version:
                with self._lock:
                    self._version = event.resource_version
            return
        key = object_key(event.object)
        if key is None or event.type not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: ignoring a %s event without a name", self.name, event.type)
            return
        self.stats.events += 1
        with self._lock:
            if event.type == "DELETED":
                changed = key in self._versions
                self._versions.pop(key, None)
            else:
                old = self._versions.get(key, "")
                changed = old == "" or old is None or old != _compact(event.resource_version or "")
                self._versions[key] = _version(event.object)
            if event.resource_version:
                self._version = event.resource_version
        if changed:
            self._on_change({key: None if event.type == "DELETED" else event.object})


def all_synced(reflectors: Iterable[Reflector]) -> bool:
    return all(reflector.synced for reflector in reflectors)
