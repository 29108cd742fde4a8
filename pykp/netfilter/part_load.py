"""A first load sent in parts: each part added in a transaction of its own, by a thread of
its own, while the caller renders the next.

Why: the kernel's part of a full load (0.2-0.3 s at 10,000 services, seconds at 100,000) runs
with the GIL released, but in one transaction it can only start once every service is
rendered. Sent in parts, it runs on the other core beside the rendering.

Only for sets and maps that hold nothing yet (a table the agent has just made): a reload
over elements the kernel holds must replace them in one transaction, or a packet would
meet half of the old and half of the new.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence

__all__ = ["PartLoad"]

Part = Mapping[str, Sequence[str]]  # element texts per set or map


class PartLoad:
    """Parts sent in the order given; `finish()` waits for the last and says how many
    elements went, or raises what a part raised (the parts after it are not sent)."""

    def __init__(self, add_elements: Callable[[Part], None]) -> None:
        self._add = add_elements
        self._parts: queue.SimpleQueue[Part | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._sent = 0
        self._thread = threading.Thread(target=self._run, name="pykp-part-load", daemon=True)
        self._thread.start()

    def send(self, part: Part) -> None:
        if part and self._error is None:
            self._parts.put(part)

    def finish(self) -> int:
        self.close()
        if self._error is not None:
            raise self._error
        return self._sent

    def close(self) -> None:
        """Wait for the parts given so far (for a caller that fails half way)."""
        if self._thread.is_alive():
            self._parts.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (part := self._parts.get()) is not None:
            if self._error is not None:
                continue
            try:
                self._add(part)
            except BaseException as error:  # noqa: BLE001 - handed to finish()'s caller
                self._error = error
            else:
                self._sent += sum(len(texts) for texts in part.values())
