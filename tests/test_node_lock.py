"""The one-agent-per-node lock: held while its process lives, even past SIGKILL's cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from pykp.agent.node_lock import NodeLock, NodeLockHeld
from pykp.labs.lab_agent import wait_for

HOLD = "import sys, time; from pykp.agent.node_lock import NodeLock; NodeLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_second_holder_is_refused_with_the_first_ones_pid_until_it_releases() -> None:
    name = f"pykp-test-{uuid.uuid4().hex[:8]}"
    first = NodeLock(name)
    first.acquire()
    try:
        with pytest.raises(NodeLockHeld) as refused:
            NodeLock(name).acquire()
        for _ in range(20):  # asking who holds it never wears the lock out
            assert NodeLock(name).holder_pid() == os.getpid()
    finally:
        first.release()

    assert refused.value.pid == os.getpid()
    assert f"pid {os.getpid()}" in str(refused.value)
    with NodeLock(name):
        pass


def test_the_kernel_releases_the_lock_of_a_killed_holder() -> None:
    name = f"pykp-test-{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, name], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert NodeLock(name).holder_pid() == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)

        assert wait_for(lambda: NodeLock(name).holder_pid() is None, timeout=5)
        with NodeLock(name):
            pass
    finally:
        holder.kill()
        holder.wait()
