"""The NFQUEUE reader's sockets outlive a killed agent for as long as it takes to let
their waiting packets go on.

When the process that bound a queue dies, the kernel drops the packets still waiting for
its verdict: first packets of live connections, lost to a SIGKILL (an OOM kill, a crash)
that runs no code of pykp's. A small keeper process holds duplicates of the bound sockets
and the read end of a pipe whose write end only the agent holds. Once that end closes (the
agent stopped, or died), the keeper accepts what waits, unmarked, so that the kernel path
decides it, and closes the queues; `--queue-bypass` then lets later packets by until the
next agent binds. It also watches the reader threads' heartbeat: a reader that stops
reading (a stopped or stalled process) has its queues handed over the same way within
~0.1 s, and given back when it beats again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import TYPE_CHECKING, Any

from pykp.self_command import python_command

if TYPE_CHECKING:
    from pykp._fastpath import NfqueueDatapath

_KEEPER = (
    "import sys; from pykp._fastpath import queue_keeper; "
    "queue_keeper([tuple(map(int, s.split(':'))) for s in sys.argv[5:]], int(sys.argv[1]), "
    "int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1')"
)


class KeptDatapath:
    """An `NfqueueDatapath` whose queues a keeper process drains when this process ends."""

    def __init__(self, datapath: NfqueueDatapath) -> None:
        self.datapath = datapath
        self._keeper: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None

    @property
    def running(self) -> bool:
        return self.datapath.running

    def stats(self) -> dict[str, int]:
        return self.datapath.stats()

    def start(self) -> None:
        self.datapath.start()
        try:
            self._start_keeper()
        except BaseException:
            self.datapath.stop()  # the next start tries both again
            raise

    def _start_keeper(self) -> None:
        sockets = self.datapath.dup_sockets()
        heartbeat = self.datapath.heartbeat()
        read_end, write_end = os.pipe()  # neither inheritable: pass_fds hands one over
        fds = [fd for fd, _ in sockets] + [read_end, heartbeat]
        try:
            self._keeper = subprocess.Popen(
                python_command(
                    _KEEPER,
                    str(read_end),
                    str(heartbeat),
                    str(self.datapath.max_len),
                    str(int(self.datapath.fail_open)),
                    *(f"{fd}:{q}" for fd, q in sockets),
                ),
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C goes to the agent, which then stops
                # and closes the pipe; the keeper never dies before its agent.
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._pipe = write_end

    def stop(self) -> None:
        """Stop reading (the workers let waiting packets go on), then release the keeper."""
        self.datapath.stop()
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._keeper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._keeper.wait(timeout=5)
            if self._keeper.poll() is None:
                self._keeper.kill()
                self._keeper.wait()
            self._keeper = None

    def __getattr__(self, name: str) -> Any:  # reject_mark, max_backend_id, ...
        return getattr(self.datapath, name)
