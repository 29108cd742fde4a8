"""`FileSource`: services from a local services file, watched for edits.

Each load is compared with the previous one entry by entry: the agent hears only of the
services that changed, and an unchanged service keeps its very object (the agent's caches
key on it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Mapping
from itertools import compress
from operator import is_not

from pykp.model import Catalog, Problem, ServiceSpec
from pykp.sources.base import ChangeLog, Changes, SourceStatus
from pykp.sources.services_file import ServicesFileCache, ServicesFileError, load_services_file

__all__ = ["FileSource"]

_log = logging.getLogger(__name__)


# What identifies a version of the file without reading it. The inode and device catch
# editors and ConfigMap mounts that replace the file by a rename; ctime catches a rewrite
# that keeps the size within one mtime tick.
_Signature = tuple[int, int, int, int, int]


class FileSource:
    """A services file, watched for changes: inotify on its directory (Linux) wakes the
    watcher at once, and a stat every `poll_interval` seconds is the fallback (no inotify)
    and the safety net (a missed event).

    Writers should replace the file atomically (write elsewhere, then rename): a reader
    that catches a half-written file may load a prefix of it until the next poll. inotify
    wakes on a finished write (a close after writing, a rename, a delete), not on each
    write, so a writer that closes the file once it is complete is read whole.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        poll_interval: float = 1.0,
        *,
        watch: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, not {poll_interval}")
        self.path = os.fspath(path)
        self.poll_interval = poll_interval
        self._inotify = watch  # False: poll only (tests that call check() themselves)
        self._log = logger or _log
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()  # one check at a time (the thread's, a caller's)
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
        self._cache = ServicesFileCache()  # unchanged entries are not parsed again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: _DirectoryWatch | None = None

    # -- the protocol

    def start(self, notify: Callable[[], None]) -> None:
        """Load once now (so a good file is ready at once), then watch in a daemon thread."""
        self._notify = notify
        self._stop.clear()
        # Watching before the first load: an edit while it loads is not missed.
        if self._inotify:
            self._watch = _DirectoryWatch.open(self._directories(), self._log)
        self.check()
        self._thread = threading.Thread(
            target=self._poll, name=f"pykp-source:{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.interrupt()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None

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

    @property
    def watching(self) -> bool:
        """Whether inotify wakes the watcher (else it only polls)."""
        return self._watch is not None

    def _directories(self) -> list[str]:
        """The file's directory, and its real one when it is a symlink elsewhere (a
        ConfigMap's swap renames `..data` in the first; an edit of a linked file lands in
        the second)."""
        path = os.path.abspath(self.path)
        return list(dict.fromkeys([os.path.dirname(path), os.path.dirname(os.path.realpath(path))]))

    def _poll(self) -> None:
        watch = self._watch
        while not self._stop.is_set():
            if watch is None:
                if self._stop.wait(self.poll_interval):
                    break
            else:
                watch.wait(self.poll_interval)
                if self._stop.is_set():
                    break
            try:
                self.check()
                if watch is not None:
                    watch.watch(self._directories())
            except Exception:  # noqa: BLE001 - keep watching
                self._log.exception("checking %s failed", self.path)

    def check(self) -> bool:
        """Reload the file if it changed on disk; True when `current()` changed."""
        with self._check_lock:
            return self._check()

    def _check(self) -> bool:
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
            # No cyclic GC while loading, as in the agent's sync: the nodes and specs are
            # acyclic, and the collector's passes over a large file's objects cost more
            # than the load itself.
            collecting = gc.isenabled()
            gc.disable()
            try:
                services, problems = load_services_file(self.path, self._cache)
            finally:
                if collecting:
                    gc.enable()
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
        before = current.by_key if current.by_key is not None else _by_key(current)
        invalid = services.invalid
        # In the order of the current services, without Python work for each of them.
        last_good = {
            key: before[key] for key in compress(before, map(invalid.__contains__, before))
        }
        if not last_good:
            return services
        for key in sorted(last_good):
            self._log.error("service %s: invalid edit, keeping its last good version", key)
        # Loaded, minus bad endpoints: in its place; skipped whole: after the others.
        kept = dict(services.by_key) if services.by_key is not None else _by_key(services)
        kept.update(last_good)
        return dataclasses.replace(services, services=tuple(kept.values()), by_key=kept)

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
    before = old.by_key if old is not None and old.by_key is not None else {}
    after: Mapping[str, ServiceSpec]
    if new.by_key is not None and len(new.by_key) == len(new.services):
        # The services that are not the very objects of `old` (the rest is unchanged),
        # found without Python work for each service.
        after = new.by_key
        differ = list(compress(after, map(is_not, after.values(), map(before.get, after))))
    else:
        after = _by_key(new)
        differ = list(after)
    changed = set(before.keys() - after.keys())
    replaced: dict[str, ServiceSpec] = {}
    for key in differ:
        previous = before.get(key)
        if previous is not None and previous == after[key]:
            replaced[key] = previous  # equal: the old object stays
        else:
            changed.add(key)
    if not replaced:  # (a catalog's by_key holds its services in their order)
        services = new.services if after is new.by_key else tuple(after.values())
        return dataclasses.replace(new, services=services, by_key=after), changed
    by_key = {**after, **replaced}
    return dataclasses.replace(new, services=tuple(by_key.values()), by_key=by_key), changed


def _by_key(catalog: Catalog) -> dict[str, ServiceSpec]:
    return {spec.key: spec for spec in catalog.services}


# --- inotify ------------------------------------------------------------------------------

# <sys/inotify.h>
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
# A finished write, not each write(): IN_MODIFY would wake the watcher in the middle of a
# writer's work and load a prefix of the file. IN_CREATE is for symlinks (`ln -s` makes no
# other event); a regular file is created empty and ends with IN_CLOSE_WRITE.
_MASK = (
    _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, len bytes)
# After a first event, further ones are awaited this long (and at most _SETTLE_MAX in all)
# so that one editor's save or a ConfigMap's swap (a burst of creates, renames and
# deletes) loads once, from the finished state, instead of once per step.
_SETTLE = 0.003
_SETTLE_MAX = 0.02


class _DirectoryWatch:
    """inotify watches on directories, through libc (no dependency)."""

    def __init__(self, libc: ctypes.CDLL, fd: int, logger: logging.Logger) -> None:
        self._libc = libc
        self._fd = fd
        self._log = logger
        self._watches: dict[str, int] = {}  # directory -> watch descriptor
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @classmethod
    def open(cls, directories: list[str], logger: logging.Logger) -> _DirectoryWatch | None:
        """A watch on `directories`; None where inotify is unavailable (then poll)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError):
            return None
        init.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            logger.warning(
                "inotify unavailable (%s): polling only", os.strerror(ctypes.get_errno())
            )
            return None
        watch = cls(libc, fd, logger)
        watch.watch(directories)
        return watch

    def watch(self, directories: list[str]) -> None:
        """Watch these directories (and no others); one that is missing is retried later,
        the poll covering it meanwhile."""
        for directory in list(self._watches):
            if directory not in directories:
                self._libc.inotify_rm_watch(self._fd, self._watches.pop(directory))
        for directory in directories:
            if directory in self._watches:
                continue
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK)
            if wd < 0:
                self._log.debug(
                    "cannot watch %s (%s): polling it", directory, os.strerror(ctypes.get_errno())
                )
                continue
            self._watches[directory] = wd

    def wait(self, timeout: float) -> bool:
        """Until a change in a watched directory (then a short settle), `interrupt()` or
        `timeout` seconds; True on a change."""
        readable, _, _ = select.select([self._fd, self._wake_read], [], [], timeout)
        if self._wake_read in readable:
            return False
        if not readable or not self._drain():
            return False
        deadline = time.monotonic() + _SETTLE_MAX
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._fd], [], [], min(_SETTLE, left))
            if not readable:
                break
            self._drain()
        return True

    def _drain(self) -> bool:
        """Read the pending events; True when one of them may concern the file."""
        relevant = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return relevant
            except OSError:
                return True
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & _IN_CREATE and not mask & _IN_Q_OVERFLOW:
                    name = data[offset - length : offset].rstrip(b"\0")
                    directory = next((d for d, w in self._watches.items() if w == wd), None)
                    if directory is None or not os.path.islink(
                        os.path.join(os.fsencode(directory), name)
                    ):
                        continue  # a new regular file: its IN_CLOSE_WRITE follows
                relevant = True
                if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF):
                    # The directory went away: watch it again (by name) after the check.
                    for directory, w in list(self._watches.items()):
                        if w == wd:
                            del self._watches[directory]

    def interrupt(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._fd, self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
