"""A bounded-frequency runner, after kube-proxy's `async.BoundedFrequencyRunner`.

`run()` asks for a sync; the loop thread calls `fn`:

* at most once per `min_interval` (measured from the start of the previous call): requests
  that arrive in between coalesce into one call, so a burst of changes costs one sync;
* at least once per `max_interval`, requested or not (the periodic resync that repairs
  rules someone else changed);
* after a failure, again after a backoff (doubling from `retry_initial` up to `retry_max`),
  so a failing `fn` is retried without hammering. A new `run()` request is not held back by
  the backoff (only by `min_interval`): new input may well be what makes the sync pass.

A failing `fn` is logged and counted; it never ends the loop. An `fn` that returns False
did nothing (kube-proxy's "not initialized yet"): that call does not hold back the next one,
which may then run at once (at start, the first real sync would otherwise wait out
`min_interval` behind a call that found no services yet).

Time comes from an injected `clock` and waiting from an injected `wait`, so tests drive the
runner with a fake clock and never sleep.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BoundedFrequencyRunner", "RunnerStats"]

_log = logging.getLogger(__name__)

# The default wait never blocks longer than this, so a loop whose stop event was set
# without a `wake()` still notices within this time.
_STOP_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class RunnerStats:
    """What the runner did so far (times are the runner's clock)."""

    runs: int  # calls of fn, failed or not
    failures: int
    consecutive_failures: int
    last_error: str | None  # of the most recent call; None when it succeeded
    last_start: float | None
    last_success: float | None


class BoundedFrequencyRunner:
    """Calls `fn` when asked, at most every `min_interval` and at least every `max_interval`."""

    def __init__(
        self,
        fn: Callable[[], bool | None],
        min_interval: float,
        max_interval: float,
        name: str = "sync",
        *,
        retry_initial: float = 1.0,
        retry_max: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not (min_interval >= 0 and math.isfinite(min_interval)):
            raise ValueError(f"{name}: min_interval must be >= 0, not {min_interval}")
        if not (max_interval > 0 and max_interval >= min_interval):
            raise ValueError(
                f"{name}: max_interval ({max_interval}) must be > 0 and >= min_interval"
                f" ({min_interval})"
            )
        if retry_initial <= 0:
            raise ValueError(f"{name}: retry_initial must be > 0, not {retry_initial}")
        self.fn = fn
        self.name = name
        self.min_interval = float(min_interval)
        self.max_interval = float(max_interval)
        self.retry_initial = float(retry_initial)
        self.retry_max = float(max_interval if retry_max is None else retry_max)
        self._clock = clock
        self._wait = wait if wait is not None else self._wait_for_wake
        self._log = logger or _log
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending = False
        self._retry_at: float | None = None
        self._base: float | None = None  # loop start: the periodic timer's origin before any run
        self._last_start: float | None = None
        self._last_success: float | None = None
        self._runs = 0
        self._failures = 0
        self._consecutive = 0
        self._last_error: str | None = None

    # -- requests (any thread)

    def run(self) -> None:
        """Ask for a sync: soon, but never sooner than `min_interval` after the last one."""
        with self._lock:
            self._pending = True
        self._wake.set()

    def retry_after(self, interval: float) -> None:
        """Ask for a sync after `interval` seconds (kept if an earlier retry is due)."""
        at = self._clock() + max(0.0, interval)
        with self._lock:
            if self._retry_at is None or at < self._retry_at:
                self._retry_at = at
        self._wake.set()

    def wake(self) -> None:
        """Interrupt the loop's wait (after setting its stop event, for a prompt exit)."""
        self._wake.set()

    @property
    def stats(self) -> RunnerStats:
        with self._lock:
            return RunnerStats(
                runs=self._runs,
                failures=self._failures,
                consecutive_failures=self._consecutive,
                last_error=self._last_error,
                last_start=self._last_start,
                last_success=self._last_success,
            )

    # -- the loop

    def next_due(self) -> float:
        """When the next call is due, on the runner's clock."""
        with self._lock:
            return self._due_locked(self._clock())

    def _due_locked(self, now: float) -> float:
        if self._base is None:
            self._base = now
        last = self._last_start
        floor = -math.inf if last is None else last + self.min_interval
        due = (self._base if last is None else last) + self.max_interval
        if self._pending:
            due = min(due, max(floor, now))
        if self._retry_at is not None:
            due = min(due, self._retry_at)
        return max(due, floor)

    def step(self) -> float:
        """Call `fn` if a call is due; return the seconds until the next one is."""
        now = self._clock()
        with self._lock:
            due = self._due_locked(now)
            if now < due:
                return due - now
            # Cleared before the call: a request made while fn runs asks for one more sync.
            self._pending = False
            self._retry_at = None
            previous_start = self._last_start
            self._last_start = now
            self._runs += 1
        try:
            did = self.fn()
        except Exception as error:  # noqa: BLE001 - retried, never fatal
            self._failed(error)
        else:
            with self._lock:
                if did is False and self._last_start == now:
                    self._last_start = previous_start
                self._consecutive = 0
                self._last_error = None
                self._last_success = now
        after = self._clock()
        with self._lock:
            return max(0.0, self._due_locked(after) - after)

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self._failures += 1
            self._consecutive += 1
            consecutive = self._consecutive
            self._last_error = f"{type(error).__name__}: {error}"
            backoff = min(self.retry_initial * 2 ** min(consecutive - 1, 62), self.retry_max)
            self._retry_at = self._clock() + max(backoff, self.min_interval)
        # The traceback once per failure streak; later failures of the streak in one line.
        self._log.error(
            "%s failed (%d in a row), retrying in %.1fs: %s",
            self.name,
            consecutive,
            max(backoff, self.min_interval),
            error,
            exc_info=error if consecutive == 1 else None,
        )

    def loop(self, stop_event: threading.Event) -> None:
        """Run syncs until `stop_event` is set (meant for its own thread)."""
        with self._lock:
            if self._base is None:
                self._base = self._clock()
        while not stop_event.is_set():
            delay = self.step()
            if stop_event.is_set():
                break
            self._wait(delay)

    def _wait_for_wake(self, timeout: float) -> None:
        # Cleared after the wait and before the next step: a request that lands in between
        # is seen by that step through `_pending`, so none is lost.
        self._wake.wait(min(timeout, _STOP_POLL_SECONDS))
        self._wake.clear()
