"""How an nft script reaches the kernel: one place, replaceable.

`LibNftables` runs the script inside this process through libnftables (what the `nft`
command is built on): no fork and exec per transaction, which is most of a small change's
cost. `NftCommand` runs `nft -f -` (in another network namespace when asked: the library
works in the caller's). `NftRecorder` keeps the scripts it is given, for tests that check
what would be sent without root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Protocol

from pykp.netfilter.monitor import as_writer
from pykp.netfilter.tool import RulesError, run_tool

__all__ = [
    "LibNftables",
    "NftCommand",
    "NftExecutor",
    "NftRecorder",
    "make_executor",
]

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_OUTPUT_TERSE = 1 << 11  # NFT_CTX_OUTPUT_TERSE: sets without their elements


class NftExecutor(Protocol):
    """Runs one nft script as one transaction; raises RulesError when nft refuses it.
    `list_json` runs one listing command and returns nft's JSON output."""

    def run(self, script: str) -> None: ...
    def list_json(self, command: str, *, terse: bool = False) -> str: ...
    def list_text(self, command: str) -> str: ...


class NftCommand:
    """`nft -f -`, optionally in a named network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def run(self, script: str) -> None:
        run_tool(["nft", "-f", "-"], netns=self.netns, stdin=script)

    def list_json(self, command: str, *, terse: bool = False) -> str:
        flags = ["-j", "-t"] if terse else ["-j"]
        return run_tool(["nft", *flags, *command.split()], netns=self.netns).stdout

    def list_text(self, command: str) -> str:
        return run_tool(["nft", *command.split()], netns=self.netns).stdout


class NftRecorder:
    """Records scripts instead of running them; `fail` makes the next runs raise."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail: str | None = None
        self.listings: dict[str, str] = {}  # command -> the JSON to answer

    def run(self, script: str) -> None:
        if self.fail is not None:
            raise RulesError(["nft", "-f", "-"], 1, self.fail)
        self.scripts.append(script)

    def list_text(self, command: str) -> str:
        return self.list_json(command)

    def list_json(self, command: str, *, terse: bool = False) -> str:
        if command not in self.listings:
            raise RulesError(["nft", "-j", command], 1, "Error: No such file or directory")
        return self.listings[command]


class LibNftables:
    """libnftables in this process (and its network namespace). Thread-safe."""

    def __init__(self, library: str = "libnftables.so.1") -> None:
        lib = ctypes.CDLL(library, use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise OSError("libnftables: nft_ctx_new failed")
        # Buffered: messages come back to us instead of going to the process's stderr.
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib = lib
        self._ctx = ctx
        self._lock = threading.Lock()

    def run(self, script: str) -> None:
        # Under the writer's name: the kernel records it with the transaction, so pykp's
        # rules monitor can tell its own transactions from anyone else's.
        with self._lock, as_writer():
            status = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            error = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if status != 0:
            raise RulesError(["libnftables", "-f", "-"], status, error.decode(errors="replace"))

    def run_apart(self, script: str) -> None:
        """Run one large script (a full load) in a forked child of this process: the
        memory libnftables takes to parse and send it (about a gigabyte for 720,000
        elements) is the child's and leaves with it. Run here, glibc keeps it: the agent's
        RSS doubles, and giving it back (`malloc_trim`) holds the allocator's locks for up
        to a second, stalling every other thread's allocations. The child inherits the
        writer's thread name (the rules monitor knows the transaction for pykp's)."""
        data = script.encode()
        with self._lock, as_writer():
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: ctypes calls and _exit only (no lock of the parent's)
                status = 2
                try:
                    os.close(read_end)
                    lib = self._lib
                    ctx = lib.nft_ctx_new(0)
                    lib.nft_ctx_buffer_output(ctx)
                    lib.nft_ctx_buffer_error(ctx)
                    status = 0 if lib.nft_run_cmd_from_buffer(ctx, data) == 0 else 1
                    error = lib.nft_ctx_get_error_buffer(ctx) or b""
                    os.write(write_end, error[: 1 << 16])
                finally:
                    os._exit(status)
            os.close(write_end)
            chunks = []
            with os.fdopen(read_end, "rb") as reader:
                chunks.append(reader.read())
            _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            error = b"".join(chunks).decode(errors="replace") or f"child exited with {code}"
            raise RulesError(["libnftables (child)", "-f", "-"], code, error)

    def list_text(self, command: str) -> str:
        """nft's text listing: for big sets far lighter than JSON (which builds the whole
        document in memory: gigabytes at 100,000 services)."""
        return self._list(command, 0)

    def list_json(self, command: str, *, terse: bool = False) -> str:
        return self._list(command, _OUTPUT_JSON | (_OUTPUT_TERSE if terse else 0))

    def _list(self, command: str, wanted: int) -> str:
        with self._lock:
            flags = self._lib.nft_ctx_output_get_flags(self._ctx)
            self._lib.nft_ctx_output_set_flags(self._ctx, flags | wanted)
            try:
                status = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
                output = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
                error = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            finally:
                self._lib.nft_ctx_output_set_flags(self._ctx, flags)
        if status != 0:
            raise RulesError(["libnftables", "-j", command], status, error.decode(errors="replace"))
        return output.decode()

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __del__(self) -> None:
        self.close()


def make_executor(netns: str | None = None) -> NftExecutor:
    """The library in our own namespace when it loads, else the command."""
    if netns is None:
        try:
            return LibNftables()
        except OSError:
            pass
    return NftCommand(netns)
