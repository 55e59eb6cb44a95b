"""The hive's ``GET /v1/events``: one SSE stream of news about its workers.

``WorkerEvents`` fans each ``WorkerChange`` out to every subscriber. Each subscriber has
its own unbounded Trio memory channel, fed synchronously by ``publish`` (the
``WorkerRegistry`` calls it at each change, so the order of the changes is the order of
the stream); a subscriber whose reader went away (its channel is closed) is dropped at
the next publish. A new subscriber first gets one ``present`` change per live worker,
taken in the same synchronous step as its subscription, so that nothing falls between the
snapshot and the live changes. ``close()`` (the hive shuts down, after its workers'
``exited``) ends every stream with ``[DONE]``.
"""

from __future__ import annotations

import math
from typing import AsyncIterator, Callable, Iterable

import trio

from ..narration import sse
from ..narration.events import WorkerChange


class WorkerEvents:
    """The subscribers of ``GET /v1/events`` and the fan-out to them."""

    def __init__(self) -> None:
        self._subscribers: set[trio.MemorySendChannel[WorkerChange]] = set()
        self.closed = False

    def __len__(self) -> int:
        """How many subscribers are (still thought to be) listening."""
        return len(self._subscribers)

    def subscribe(self, present: Iterable[WorkerChange] = ()) -> trio.MemoryReceiveChannel[WorkerChange]:
        """A new subscriber's channel, holding ``present`` first; closed at once if the hive is."""
        send, receive = trio.open_memory_channel(math.inf)
        for change in present:
            send.send_nowait(change)
        if self.closed:
            send.close()
        else:
            self._subscribers.add(send)
        return receive

    def publish(self, change: WorkerChange) -> None:
        """Give ``change`` to every subscriber now (never blocks); drop those that went away."""
        for send in list(self._subscribers):
            try:
                send.send_nowait(change)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(send)

    def close(self) -> None:
        """No more changes: every stream ends with ``[DONE]`` after what it has not read."""
        self.closed = True
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()


async def sse_body(subscribe: Callable[[], trio.MemoryReceiveChannel[WorkerChange]],
                   ping_interval_s: float) -> AsyncIterator[bytes]:
    """The SSE bytes of one subscription: its changes, ``: ping`` when quiet, ``[DONE]`` at the end.

    ``subscribe()`` is called when the body starts, so a body that never runs never
    subscribes. The first bytes come at once: the ``present`` changes, or a ping when no
    worker lives, so a reader knows from them that it is subscribed. Closing the channel
    when the body ends (the client went away: Quart closes the body) is what lets
    ``publish`` drop the subscriber.
    """
    with subscribe() as receive:
        ended = False
        first = True  # the present workers, or a ping: the reader knows it is subscribed
        while not ended:
            batch: list[WorkerChange] = []
            if not first:
                # No yield inside the cancel scope: a generator must not suspend inside one.
                with trio.move_on_after(ping_interval_s):
                    try:
                        batch.append(await receive.receive())
                    except trio.EndOfChannel:
                        ended = True
            first = False
            while not ended:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    ended = True
            if batch:
                yield b"".join(sse.encode(change) for change in batch)
            elif not ended:
                yield sse.encode_ping()
    yield sse.encode_done()
