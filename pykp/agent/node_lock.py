"""One pykp agent per node: a lock scoped to the network namespace the agent programs.

The lock is a listening Unix socket in the abstract namespace. Abstract socket names
belong to a network namespace, so agents of different lab nodes (or a DaemonSet pod with
hostNetwork and a shell on the host) see the same lock exactly when they program the same
netfilter state; the kernel releases it when the holder dies, even by SIGKILL, so a
restart never finds a stale lock. A second agent learns the holder's pid (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time

DEFAULT_NAME = "pykp-agent"


class NodeLockHeld(Exception):
    """Another agent holds the lock of this network namespace."""

    def __init__(self, name: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"another pykp agent ({holder}) already runs in this network namespace "
            f"(lock @{name}); stop it first: two agents would fight over one node's rules"
        )
        self.pid = pid


class NodeLock:
    """Held from `acquire()` until `release()` or the process's end."""

    def __init__(self, name: str = DEFAULT_NAME) -> None:
        self.name = name
        self._socket: socket.socket | None = None
        self._answering: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op when this object holds it); raises NodeLockHeld."""
        if self._socket is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind("\0" + self.name)
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:
                raise NodeLockHeld(self.name, self.holder_pid()) from None
            raise
        sock.listen(64)  # only so that a second agent can ask who holds it
        self._socket = sock
        # Accepting (and closing) those questions keeps the queue from filling up.
        self._answering = threading.Thread(
            target=self._answer, args=(sock,), name="pykp-node-lock", daemon=True
        )
        self._answering.start()

    @staticmethod
    def _answer(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # released
                return
            conn.close()

    def holder_pid(self) -> int | None:
        """The pid that holds the lock, or None (not held, or it cannot be told)."""
        for _ in range(40):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect("\0" + self.name)
                    creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                except BlockingIOError:  # its backlog is full for a moment: ask again
                    time.sleep(0.025)
                    continue
                except OSError:
                    return None
            pid, _, _ = struct.unpack("3i", creds)
            return pid or None
        return None

    def release(self) -> None:
        if self._socket is not None:
            # shutdown wakes the accepting thread; a bare close would leave it blocked in
            # accept(), holding the socket (and the name) open.
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
            if self._answering is not None:
                # Its accept() holds the socket (and the name) until it has returned.
                self._answering.join(timeout=5)
                self._answering = None
            self._socket.close()
            self._socket = None

    def __enter__(self) -> NodeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
