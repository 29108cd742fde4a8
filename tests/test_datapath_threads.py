"""The NFQUEUE datapath's Python object used from several threads at once, as the agent
does: the sync thread starts and stops it while the metrics server reads its stats.

Privileged: the queues are bound in a network namespace this test creates (and removes).
A deadlock here once left an agent that never answered /metrics after its first sync.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from pykp.self_command import python_command

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (a network namespace, NFQUEUE)", allow_module_level=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pykp-dp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


_SCENARIO = """
import threading
from pykp._fastpath import Engine, NfqueueDatapath

datapath = NfqueueDatapath(Engine(), first_queue=7, last_queue=8)
stop = threading.Event()
reads = 0

def scrape():
    global reads
    while not stop.is_set():
        datapath.stats()  # holds the GIL while it takes the datapath's lock
        datapath.running
        reads += 1

scraper = threading.Thread(target=scrape)
scraper.start()
for _ in range(20):
    datapath.start()
    datapath.stop()
stop.set()
scraper.join()
print("reads", reads)
"""


def test_stats_read_while_the_datapath_starts_and_stops_never_deadlock(netns: str) -> None:
    # In a child: a deadlock holds the GIL for good, and only a process can be given up on.
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *python_command(_SCENARIO)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("start/stop and stats() deadlocked")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0
