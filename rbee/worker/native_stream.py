"""Running the engine's blocking token loop from Trio: ``open_generation``.

Import it from ``rbee.worker.engine`` (which re-exports it); it lives apart only to keep
modules small.

How a token reaches Trio (measured in benchmarks/bench_worker.py, see docs/native.md):

* The whole prefill + decode loop is one C call on the engine's own long-lived thread
  (``native_thread.py`` says why not a Trio worker thread: OpenMP pools).
* Per piece, the C loop calls a cffi callback that only appends ``Token(t, i)`` to a
  ``deque``: no lock, no syscall, so it never releases the GIL.
* Then the C loop, outside the GIL, writes one byte to a pipe; ``Generation.__anext__``
  waits for that pipe with ``trio.lowlevel.wait_readable`` and drains the deque.

Why not ``TrioToken.run_sync_soon`` per token (the first design): it writes to Trio's
wake-up socket from Python, and that syscall releases the GIL; the woken event loop takes
the GIL and the decode thread waits until the loop has handled the token: a per-token
round trip of about 200 µs here, on the decode thread's critical path. The pipe write from
C costs a few µs and lets the decode thread go on at once.

The thread's end is posted with ``run_sync_soon`` (once) after its last append, so every
token is in the deque before the generation is marked finished. Without a nursery, the
caller's own exceptions leave ``async with`` unwrapped (no ExceptionGroup). Leaving the
block early, or a cancellation, sets the abort flag and waits, shielded, for the loop to
stop (within one token): the loop owns the KV cache until it returns, so it is never
abandoned (the equivalent of ``abandon_on_cancel=False``).
"""

from __future__ import annotations

import collections
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import outcome
import trio

from rbee.errors import InvalidRequestError
from rbee.narration.events import Token

if TYPE_CHECKING:
    from rbee.worker.engine import Engine, GenerationResult, SamplingParams


class Generation:
    """One generation seen from Trio: async-iterate for ``Token(t, i)`` events; once the
    iteration ends, ``result`` holds the ``GenerationResult``. An error of the loop is
    raised by the iteration (or, if nobody iterated to the end, when the block exits)."""

    def __init__(self, wakeup_fd: int) -> None:
        self.result: GenerationResult | None = None
        self._tokens: collections.deque[Token] = collections.deque()
        self._wakeup_fd = wakeup_fd
        self._finished = False
        self._error: BaseException | None = None
        self._error_raised = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Token:
        waited = False
        while not self._tokens:
            if self._finished:
                if self._error is not None and not self._error_raised:
                    self._error_raised = True
                    raise self._error
                raise StopAsyncIteration
            await trio.lowlevel.wait_readable(self._wakeup_fd)
            _drain(self._wakeup_fd)
            waited = True
        if not waited:
            await trio.lowlevel.checkpoint()  # every await is a checkpoint, as in Trio itself
        return self._tokens.popleft()


def _drain(fd: int) -> None:
    # One read is enough: the reader wakes for every few bytes, and anything left over just
    # makes the next wait_readable return at once.
    try:
        os.read(fd, 4096)
    except BlockingIOError:  # a spurious wake-up
        pass


@asynccontextmanager
async def open_generation(engine: Engine, prompt: str, params: SamplingParams, *,
                          chat: bool = False) -> AsyncIterator[Generation]:
    """Start a generation on ``engine`` and yield its ``Generation``.

    Raises at once (before any thread starts): ``InvalidRequestError`` for bad params or a
    prompt that does not fit the context, ``BusyError`` if the engine is already generating.
    """
    from rbee.worker.engine import AbortFlag

    problems = params.problems()
    if problems:
        raise InvalidRequestError("; ".join(p["message"] for p in problems), details=problems)
    engine._claim()
    claimed = True
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)  # the C loop must never block on a full pipe
        # Tokenizing is quick but not free for a long prompt: keep it off the event loop.
        n_prompt = await trio.to_thread.run_sync(lambda: engine.count_tokens(prompt, chat=chat))
        engine.check_fits(n_prompt, params)
        abort = AbortFlag()
        generation = Generation(read_fd)
        trio_token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        append = generation._tokens.append

        def work() -> GenerationResult:  # generating thread
            try:
                return engine._generate_claimed(prompt, params, on_token=lambda i, t: append(Token(t=t, i=i)),
                                                abort=abort, chat=chat, notify_fd=write_fd)
            finally:
                # Released here, not in `finish`: an Engine.close() blocking the Trio thread
                # must be able to get the engine once the loop has stopped.
                engine._busy.release()

        def finish(result: outcome.Outcome[GenerationResult]) -> None:  # Trio thread
            try:
                generation.result = result.unwrap()
            except BaseException as exc:
                generation._error = exc
            generation._finished = True
            os.write(write_fd, b"\0")  # wake a reader waiting for more tokens
            finished.set()

        engine._thread.submit(work, lambda result: trio_token.run_sync_soon(finish, result))
        claimed = False  # from here `work` releases the engine
    finally:
        if claimed:
            engine._busy.release()
            os.close(read_fd)
            os.close(write_fd)
    try:
        yield generation
    finally:
        abort.set()
        with trio.CancelScope(shield=True):
            await finished.wait()
        os.close(read_fd)
        os.close(write_fd)
    if generation._error is not None and not generation._error_raised:
        generation._error_raised = True
        raise generation._error
