"""`FileSource`: services from a local services file, watched for edits.

Each load is compared with the previous one entry by entry: the agent hears only of the
services that changed, and an unchanged service keeps its very object (the agent's caches
key on it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable

from pykp.model import Catalog, Problem, ServiceSpec
from pykp.sources.base import ChangeLog, Changes, SourceStatus
from pykp.sources.services_file import ServicesFileError, load_services_file

__all__ = ["FileSource"]

_log = logging.getLogger(__name__)


# What identifies a version of the file without reading it. The inode and device catch
# editors and ConfigMap mounts that replace the file by a rename; ctime catches a rewrite
# that keeps the size within one mtime tick.
_Signature = tuple[int, int, int, int, int]


class FileSource:
    """A services file, polled for changes (stat every `poll_interval` seconds).

    Writers should replace the file atomically (write elsewhere, then rename): a reader
    that catches a half-written file may load a prefix of it until the next poll.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        poll_interval: float = 1.0,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, not {poll_interval}")
        self.path = os.fspath(path)
        self.poll_interval = poll_interval
        self._log = logger or _log
        self._lock = threading.Lock()
        self._current: Catalog | None = None
        self._problems: list[Problem] = []
        self._signature: _Signature | str | None = None  # a str: the error of the last attempt
        self._changed_at: float | None = None
        self._loads = 0
        self._load_errors = 0
        self._invalid_objects = 0
        self._last_error: str | None = None
        self._notify: Callable[[], None] | None = None
        self._changes = ChangeLog()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the protocol

    def start(self, notify: Callable[[], None]) -> None:
        """Load once now (so a good file is ready at once), then poll in a daemon thread."""
        self._notify = notify
        self._stop.clear()
        self.check()
        self._thread = threading.Thread(
            target=self._poll, name=f"pykp-source:{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def current(self) -> Catalog | None:
        with self._lock:
            return self._current

    def take_changes(self) -> Changes | None:
        with self._lock:
            current = self._current
            if current is None:
                return None
            return Changes(current, self._changes.take())

    def problems(self) -> list[Problem]:
        with self._lock:
            return list(self._problems)

    def status(self) -> SourceStatus:
        with self._lock:
            return SourceStatus(
                name=f"file:{self.path}",
                initialized=self._current is not None,
                changed_at=self._changed_at,
                loads=self._loads,
                load_errors=self._load_errors,
                invalid_objects=self._invalid_objects,
                last_error=self._last_error,
            )

    # -- watching

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - keep watching
                self._log.exception("checking %s failed", self.path)

    def check(self) -> bool:
        """Reload the file if it changed on disk; True when `current()` changed."""
        try:
            # stat before reading: a write that lands during the read changes the
            # signature again, so the next poll reads the finished file.
            st = os.stat(self.path)
            signature: _Signature = (
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
            if signature == self._signature:
                return False
            services, problems = load_services_file(self.path)
        except ServicesFileError as error:
            return self._failed(str(error))
        except OSError as error:
            return self._failed(f"{self.path}: {error.strerror or error}")
        return self._loaded(signature, st.st_mtime, services, problems)

    def _failed(self, message: str) -> bool:
        if message == self._signature:
            return False  # the same error as last time: counted and logged once
        self._signature = message
        with self._lock:
            self._load_errors += 1
            self._last_error = message
            initialized = self._current is not None
        if initialized:
            self._log.error("cannot load services (keeping the last good state): %s", message)
        else:
            self._log.error("cannot load services (nothing is programmed yet): %s", message)
        return False

    def _keep_last_good(self, services: Catalog) -> Catalog:
        """An entry with a problem keeps its last good version serving, as a file that does
        not load at all keeps the whole last good state (its problems are still reported)."""
        with self._lock:
            current = self._current
        if current is None or not services.invalid:
            return services
        last_good = {s.key: s for s in current.services if s.key in services.invalid}
        if not last_good:
            return services
        for key in sorted(last_good):
            self._log.error("service %s: invalid edit, keeping its last good version", key)
        kept = [last_good.pop(s.key, s) for s in services.services]  # loaded, minus bad endpoints
        kept += last_good.values()  # skipped whole
        return dataclasses.replace(services, services=tuple(kept))

    def _loaded(
        self,
        signature: _Signature,
        mtime: float,
        services: Catalog,
        problems: list[Problem],
    ) -> bool:
        self._signature = signature
        for problem in problems:
            self._log.warning("invalid entry skipped: %s", problem)
        services = self._keep_last_good(services)
        with self._lock:
            self._loads += 1
            self._invalid_objects += len(problems)
            self._last_error = None
            services, changed_keys = diff_catalogs(self._current, services)
            changed = (
                self._current is None
                or bool(changed_keys)
                or dataclasses.replace(services, services=(), by_key=None)
                != dataclasses.replace(self._current, services=(), by_key=None)
                or problems != self._problems
            )
            if changed:
                if self._current is not None and services.default_policy != (
                    self._current.default_policy
                ):
                    self._changes.everything()
                else:
                    self._changes.add(changed_keys)
                self._current = services
                self._problems = list(problems)
                self._changed_at = mtime
        self._log.info(
            "loaded %s: %d services, %d ports, %d endpoints, %d invalid entries skipped%s",
            self.path,
            len(services.services),
            services.port_count,
            services.endpoint_count,
            len(problems),
            "" if changed else " (no change)",
        )
        if changed and self._notify is not None:
            self._notify()
        return changed


def diff_catalogs(old: Catalog | None, new: Catalog) -> tuple[Catalog, set[str]]:
    """`new` with each unchanged service replaced by its object in `old`, and the keys of
    the services added, changed or removed."""
    by_key: dict[str, ServiceSpec] = {}
    before = old.by_key if old is not None and old.by_key is not None else {}
    changed: set[str] = set()
    for spec in new.services:
        previous = before.get(spec.key)
        if previous is not None and previous == spec:
            spec = previous
        else:
            changed.add(spec.key)
        by_key[spec.key] = spec
    changed.update(before.keys() - by_key.keys())
    return dataclasses.replace(new, services=tuple(by_key.values()), by_key=by_key), changed
