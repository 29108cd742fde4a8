"""The bounded-frequency runner, driven by a fake clock (no sleeping but in the last tests).

kube-proxy's contract: requests coalesce, syncs are at most `min_interval` apart and at
most `max_interval` apart, and a failing sync is retried with backoff without ending the
loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from pykp.agent.sync_runner import BoundedFrequencyRunner


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """The sync function: records when it ran; fails while `failing` is set."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []
        self.failing: Exception | None = None
        self.during: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.calls.append(self.clock.now)
        if self.during is not None:
            self.during()
        if self.failing is not None:
            raise self.failing


def make(
    min_interval: float = 1.0,
    max_interval: float = 30.0,
    retry_initial: float = 1.0,
    retry_max: float | None = None,
) -> tuple[BoundedFrequencyRunner, FakeClock, Recorder]:
    clock = FakeClock()
    fn = Recorder(clock)
    runner = BoundedFrequencyRunner(
        fn,
        min_interval,
        max_interval,
        "test",
        clock=clock,
        retry_initial=retry_initial,
        retry_max=retry_max,
    )
    return runner, clock, fn


def test_a_first_request_runs_at_once() -> None:
    runner, _, fn = make()
    runner.run()

    assert runner.step() == pytest.approx(30.0)  # then nothing until the periodic resync
    assert fn.calls == [100.0]


def test_nothing_runs_before_a_request_or_the_max_interval() -> None:
    runner, clock, fn = make()

    assert runner.step() == pytest.approx(30.0)
    clock.advance(29.9)
    assert runner.step() == pytest.approx(0.1)
    assert fn.calls == []


def test_requests_within_min_interval_coalesce_into_one_sync() -> None:
    runner, clock, fn = make(min_interval=1.0)
    runner.run()
    runner.step()
    for _ in range(5):
        clock.advance(0.1)
        runner.run()
        assert runner.step() > 0  # held back by min_interval
    assert fn.calls == [100.0]

    clock.now = 101.0
    assert runner.step() == pytest.approx(30.0)
    assert fn.calls == [100.0, 101.0], "five requests, one sync"
    assert runner.step() == pytest.approx(30.0), "and no sync is left pending"


def test_min_interval_is_measured_from_the_start_of_the_last_sync() -> None:
    runner, clock, fn = make(min_interval=2.0)
    runner.run()
    runner.step()
    clock.advance(1.5)
    runner.run()

    assert runner.step() == pytest.approx(0.5)
    clock.advance(0.5)
    runner.step()
    assert fn.calls == [100.0, 102.0]


def test_a_call_that_did_nothing_does_not_hold_back_the_next() -> None:
    """At start the first call may find no services yet (False): the first real sync,
    asked for a moment later, runs at once instead of waiting out min_interval."""
    runner, clock, fn = make(min_interval=1.0)
    results = iter([False, None])

    def sync() -> bool | None:
        fn()
        return next(results)

    runner.fn = sync
    runner.run()
    runner.step()
    clock.advance(0.05)
    runner.run()  # the source's first state arrives
    assert runner.step() == pytest.approx(30.0)
    assert fn.calls == [100.0, 100.05]
    clock.advance(0.05)
    runner.run()  # a real sync ran: min_interval holds again
    assert runner.step() == pytest.approx(0.95)


def test_a_request_long_after_the_last_sync_runs_at_once() -> None:
    runner, clock, fn = make(min_interval=1.0)
    runner.run()
    runner.step()
    clock.advance(10)
    runner.run()
    runner.step()

    assert fn.calls == [100.0, 110.0]


def test_max_interval_resyncs_periodically_without_requests() -> None:
    runner, clock, fn = make(min_interval=1.0, max_interval=30.0)
    for _ in range(3):
        clock.advance(runner.step())
    runner.step()

    assert fn.calls == [130.0, 160.0, 190.0]


def test_a_request_resets_the_periodic_timer() -> None:
    runner, clock, fn = make(min_interval=1.0, max_interval=30.0)
    clock.advance(20)
    runner.run()
    runner.step()

    assert runner.step() == pytest.approx(30.0)
    assert fn.calls == [120.0]


def test_a_request_made_while_the_sync_runs_asks_for_one_more() -> None:
    runner, clock, fn = make(min_interval=1.0)
    fn.during = runner.run  # a change arrives mid-sync
    runner.run()

    assert runner.step() == pytest.approx(1.0)
    fn.during = None
    clock.advance(1.0)
    runner.step()
    assert fn.calls == [100.0, 101.0]


def test_a_failing_sync_is_counted_logged_and_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner, clock, fn = make(min_interval=0.5, max_interval=30.0, retry_initial=1.0, retry_max=4.0)
    fn.failing = RuntimeError("nft said no")
    runner.run()
    delays = []
    with caplog.at_level(logging.ERROR, logger="pykp.agent.sync_runner"):
        for _ in range(5):
            delay = runner.step()
            delays.append(delay)
            clock.advance(delay)

    assert delays == pytest.approx([1.0, 2.0, 4.0, 4.0, 4.0]), "doubling, capped at retry_max"
    stats = runner.stats
    assert stats.runs == 5
    assert stats.failures == stats.consecutive_failures == 5
    assert stats.last_error == "RuntimeError: nft said no"
    assert stats.last_success is None
    assert len(caplog.records) == 5
    assert "nft said no" in caplog.records[0].getMessage()
    # The traceback once per streak, not at every retry.
    assert caplog.records[0].exc_info is not None
    assert all(record.exc_info is None for record in caplog.records[1:])

    fn.failing = None
    runner.step()
    stats = runner.stats
    assert stats.consecutive_failures == 0
    assert stats.failures == 5
    assert stats.last_error is None
    assert stats.last_success == clock.now
    assert runner.step() == pytest.approx(30.0), "back to the periodic resync"


def test_a_retry_never_comes_sooner_than_min_interval() -> None:
    runner, _, fn = make(min_interval=3.0, retry_initial=1.0)
    fn.failing = ValueError("bad")
    runner.run()

    assert runner.step() == pytest.approx(3.0)


def test_a_new_request_is_not_held_back_by_the_backoff() -> None:
    runner, clock, fn = make(min_interval=1.0, retry_initial=8.0)
    fn.failing = ValueError("bad input")
    runner.run()
    assert runner.step() == pytest.approx(8.0)

    fn.failing = None
    clock.advance(1.0)
    runner.run()  # new input, which may well fix the sync
    runner.step()
    assert fn.calls == [100.0, 101.0]


def test_retry_after_schedules_a_sync() -> None:
    runner, clock, fn = make(min_interval=1.0)
    runner.run()
    runner.step()
    runner.retry_after(5.0)

    assert runner.step() == pytest.approx(5.0)
    clock.advance(5.0)
    runner.step()
    assert fn.calls == [100.0, 105.0]


@pytest.mark.parametrize(
    ("min_interval", "max_interval"),
    [(-1.0, 10.0), (5.0, 1.0), (0.0, 0.0), (float("nan"), 1.0)],
)
def test_invalid_intervals_are_refused(min_interval: float, max_interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        BoundedFrequencyRunner(lambda: None, min_interval, max_interval)


def test_the_loop_follows_a_schedule_of_requests_on_a_fake_clock() -> None:
    """The loop itself, with a fake wait that moves the clock and delivers requests."""
    clock = FakeClock(0.0)
    stop = threading.Event()
    calls: list[float] = []
    requests = [0.0, 0.2, 0.4, 0.6, 5.0, 5.1]  # a burst, then a pair

    def fn() -> None:
        calls.append(clock.now)
        if len(calls) == 5:
            stop.set()
        if len(calls) == 2:
            raise OSError("a failure along the way")

    def wait(timeout: float) -> None:
        until = clock.now + timeout
        due = [t for t in requests if clock.now < t <= until]
        clock.now = due[0] if due else until
        if due:
            requests.remove(due[0])
            runner.run()

    runner = BoundedFrequencyRunner(
        fn, 1.0, 30.0, "loop", clock=clock, wait=wait, retry_initial=2.0
    )
    requests.remove(0.0)
    runner.run()
    runner.loop(stop)

    # 0: first request. 1.0: the coalesced burst, which fails. 3.0: its retry (backoff 2 s).
    # 5.0: the next request. 6.0: the request at 5.1, held back by min_interval.
    assert calls == pytest.approx([0.0, 1.0, 3.0, 5.0, 6.0])
    assert runner.stats.failures == 1


def test_the_real_loop_wakes_on_a_request_and_stops_promptly() -> None:
    """Real threads and clock: a request from another thread is served at once."""
    ran = threading.Event()
    runner = BoundedFrequencyRunner(ran.set, 0.0, 60.0, "real")
    stop = threading.Event()
    thread = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        runner.run()
        assert ran.wait(5.0)
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        runner.wake()
        thread.join(5.0)
    assert not thread.is_alive()


def test_the_real_loop_survives_an_exception_and_keeps_serving() -> None:
    results: list[str] = []
    second = threading.Event()

    def fn() -> None:
        results.append("call")
        if len(results) == 1:
            raise RuntimeError("first call fails")
        second.set()

    runner = BoundedFrequencyRunner(fn, 0.0, 60.0, "real", retry_initial=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    thread.start()
    try:
        runner.run()
        assert second.wait(5.0), "the retry after the failure never came"
    finally:
        stop.set()
        runner.wake()
        thread.join(5.0)
    assert runner.stats.failures == 1
    assert not thread.is_alive()
