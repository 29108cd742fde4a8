"""The agent's C heap (`pykp.agent.heap`): one malloc arena for every thread, as `pykp run`
sets it, checked in a fresh process through glibc's own report (malloc_info)."""

from __future__ import annotations

import subprocess
import sys

_THREADS_ALLOCATE = """
import ctypes, os, sys, tempfile, threading
from pykp.agent.heap import one_malloc_arena, trim_heap
if sys.argv[1] == "one":
    assert one_malloc_arena()
def work():
    held = [bytearray(100_000) for _ in range(20)]  # past pymalloc: glibc's malloc
    del held
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
trim_heap()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(delete=False) as handle:
    path = handle.name
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
report = open(path).read()
os.unlink(path)
print(report.count("<heap nr="))
"""


def _arenas(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _THREADS_ALLOCATE, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout.strip())


def test_threads_share_one_arena_once_set() -> None:
    # glibc's default: a thread that allocates takes an arena of its own.
    assert _arenas("default") > 1
    assert _arenas("one") == 1
