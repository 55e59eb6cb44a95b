"""Run asyncio coroutines (asyncssh) from Trio: one asyncio loop in its own thread.

asyncssh is built on asyncio; rbee runs on Trio. We measured two bridges (figures in
docs/queen.md) and chose this one: a private asyncio event loop on a daemon thread, and a
Trio-side ``await bridge.run(coro_fn, *args)`` that submits the coroutine with
``asyncio.run_coroutine_threadsafe`` and is woken through the Trio token when it is done.
It needs no extra dependency, keeps asyncssh on a stock asyncio loop (what it is tested
on), and Trio's cancellation maps onto it: cancelling the awaiting Trio task cancels the
asyncio task and waits for it to finish unwinding, so nothing runs on after we left.
Hand-over is two thread wake-ups (``call_soon_threadsafe`` there, ``run_sync_soon`` back).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, TypeVar

import trio

T = TypeVar("T")


class AsyncioBridge:
    """A private asyncio loop on a thread; ``run()`` awaits its coroutines from Trio."""

    def __init__(self, name: str = "rbee-asyncio") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=name, daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        # Once stopped: cancel whatever is left so that asyncssh closes its sockets.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop (only ever touch it from its own thread)."""
        return self._loop

    async def run(self, coro_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``coro_fn(*args)`` on the asyncio loop and return its result in Trio.

        On Trio cancellation the asyncio task is cancelled and awaited (shielded) before
        ``Cancelled`` propagates.
        """
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        box: dict[str, Any] = {}

        def on_task_done(task: asyncio.Task) -> None:  # on the asyncio thread
            box["task_done"] = True
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:
                pass

        def submit() -> None:  # on the asyncio thread
            task = self._loop.create_task(coro_fn(*args))
            task.add_done_callback(on_task_done)
            box["task"] = task

        def cancel() -> None:  # on the asyncio thread, always after submit (FIFO)
            box["task"].cancel()

        self._loop.call_soon_threadsafe(submit)
        try:
            await finished.wait()
        except trio.Cancelled:
            # Wait for the asyncio task to unwind so nothing of ours runs on after we left.
            self._loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(shield=True):
                await finished.wait()
            raise
        task = box["task"]
        if task.cancelled():
            raise trio.BrokenResourceError("the asyncio loop cancelled the call (bridge closing)")
        return task.result()

    def close(self) -> None:
        """Stop the loop; its leftover tasks are cancelled on its thread, which then ends."""
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            return  # already closed
        self._thread.join(timeout=5)

