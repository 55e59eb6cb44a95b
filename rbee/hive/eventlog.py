"""An append-only log of stream events that any number of readers follow as SSE.

A worker's narration and a download's progress are each one ``EventLog``: the writer
appends events as they come (from any Trio task, synchronously), a reader gets everything
since the log began and then the live events, and the SSE body ends with ``[DONE]`` once
the log is closed (the worker exited, the download finished). A log keeps at most
``limit`` events: a reader that joins later misses the oldest, never the newest.
"""

from __future__ import annotations

from typing import AsyncIterator

import trio

from ..narration import sse
from ..narration.events import Event

#: Keep-alive comment interval of DESIGN.md.
PING_INTERVAL_S = 15.0


class EventLog:
    """History plus live tail of one stream of events."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._events: list[Event] = []
        self._dropped = 0  # events cut from the front; absolute index = _dropped + position
        self._changed = trio.Event()
        self.closed = False

    def append(self, event: Event) -> None:
        """Add one event (ignored once closed) and wake the readers."""
        if self.closed:
            return
        self._events.append(event)
        if len(self._events) > self.limit:
            cut = len(self._events) - self.limit
            del self._events[:cut]
            self._dropped += cut
        self._wake()

    def close(self) -> None:
        """No more events: readers end with ``[DONE]`` after what they have not seen."""
        if not self.closed:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def events(self) -> list[Event]:
        """The events kept so far (for tests and status)."""
        return list(self._events)

    def since(self, index: int) -> tuple[list[Event], int]:
        """Events from absolute ``index`` on, and the index after them."""
        start = max(0, index - self._dropped)
        batch = self._events[start:]
        return batch, self._dropped + len(self._events)

    async def wait_change(self) -> None:
        """Return after the next append or close."""
        await self._changed.wait()

    async def follow(self) -> AsyncIterator[list[Event]]:
        """Every event since the start in batches, live, until the log is closed."""
        index = 0
        while True:
            batch, index = self.since(index)
            if batch:
                yield batch
                continue
            if self.closed:
                return
            await self.wait_change()


async def sse_body(log: EventLog, ping_interval_s: float = PING_INTERVAL_S) -> AsyncIterator[bytes]:
    """The SSE bytes of ``log``: history, live events, ``: ping`` when quiet, ``[DONE]``."""
    index = 0
    while True:
        batch, index = log.since(index)
        if batch:
            yield b"".join(sse.encode(e) for e in batch)
            continue
        if log.closed:
            break
        changed = False
        # No yield inside the cancel scope: a generator must not suspend inside one.
        with trio.move_on_after(ping_interval_s):
            await log.wait_change()
            changed = True
        if not changed:
            yield sse.encode_ping()
    yield sse.encode_done()
