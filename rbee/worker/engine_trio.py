"""The engine seen from Trio: ``open_generation``, built only on ``Engine``'s public API.

How a token reaches Trio (measured in benchmarks/bench_worker.py, see docs/native.md):

* The step loop runs on the engine's own long-lived thread (``native_thread.py`` says why
  not a Trio worker thread: OpenMP pools). Every step advances every stream at once.
* Per piece, the engine calls this generation's ``on_piece``, which only appends
  ``Token(t, i)`` to a ``deque``: no lock, no syscall, so it never releases the GIL.
* At the start of the next step, the C step, outside the GIL, writes one byte to this
  generation's pipe (``notify_fd``); ``Generation.__anext__`` waits for that pipe with
  ``trio.lowlevel.wait_readable`` and drains the deque.

Why not ``TrioToken.run_sync_soon`` per token (the first design): it writes to Trio's
wake-up socket from Python, and that syscall releases the GIL; the woken event loop takes
the GIL and the decode thread waits until the loop has handled the token: a per-token
round trip of about 200 µs here, on the decode thread's critical path. The pipe write from
C costs a few µs and lets the decode thread go on at once.

The request's end is posted with ``run_sync_soon`` (once) after its last append, so every
token is in the deque before the generation is marked finished. Without a nursery, the
caller's own exceptions leave ``async with`` unwrapped (no ExceptionGroup). Leaving the
block early, or a cancellation, cancels the request and waits, shielded, for the engine to
say it ended (at the next step boundary, within one prefill chunk): the engine owns the
sequence until then, so it is never abandoned (as ``abandon_on_cancel=False``).
"""

from __future__ import annotations

import collections
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from rbee.narration.events import Prefill, Token
from rbee.requests import SamplingParams
from rbee.worker.engine import Engine, GenerationResult, Prompt


class Generation:
    """One generation seen from Trio: async-iterate for ``Token(t, i)`` events (and
    ``Prefill(tokens_done, tokens_total)`` while a long prompt is evaluated); once the
    iteration ends, ``result`` holds the ``GenerationResult``. An error of the request is
    raised by the iteration (or, if nobody iterated to the end, when the block exits)."""

    def __init__(self, wakeup_fd: int) -> None:
        self.result: GenerationResult | None = None
        self._events: collections.deque[Token | Prefill] = collections.deque()
        self._wakeup_fd = wakeup_fd
        self._finished = False
        self._error: BaseException | None = None
        self._error_raised = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Token | Prefill:
        waited = False
        while not self._events:
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
        return self._events.popleft()


def _drain(fd: int) -> None:
    # One read is enough: the reader wakes for every few bytes, and anything left over just
    # makes the next wait_readable return at once.
    try:
        os.read(fd, 4096)
    except BlockingIOError:  # a spurious wake-up
        pass


@asynccontextmanager
async def open_generation(engine: Engine, prompt: Prompt, params: SamplingParams, *, chat: bool = False,
                          cache_prompt: bool = True, grammar: str | None = None) -> AsyncIterator[Generation]:
    """Submit a generation to ``engine`` and yield its ``Generation``. ``prompt`` is text or
    a conversation (a sequence of ``Message``); ``grammar`` (GBNF) constrains the output
    (see ``Engine.submit``).

    Raises at once (before anything runs): ``InvalidRequestError`` for a prompt that does
    not fit one stream's context (``params`` were checked when built), ``BusyError`` when
    every slot is taken.
    """
    read_fd, write_fd = os.pipe()
    submitted = False
    try:
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)  # the C step must never block on a full pipe
        # Tokenizing is quick but not free for a long prompt: keep it off the event loop.
        n_prompt = await trio.to_thread.run_sync(lambda: engine.count_tokens(prompt, chat=chat))
        engine.check_fits(n_prompt, params)
        generation = Generation(read_fd)
        trio_token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        events = generation._events

        def finish(result: GenerationResult | None, error: BaseException | None) -> None:  # Trio thread
            generation.result, generation._error = result, error
            generation._finished = True
            os.write(write_fd, b"\0")  # wake a reader waiting for more tokens
            finished.set()

        request = engine.submit(
            prompt, params, chat=chat, cache_prompt=cache_prompt, grammar=grammar, notify_fd=write_fd,
            on_piece=lambda i, t: events.append(Token(t=t, i=i)),
            on_prefill=lambda done, total: events.append(Prefill(tokens_done=done, tokens_total=total)),
            on_finish=lambda result, error: trio_token.run_sync_soon(finish, result, error),
        )
        submitted = True
    finally:
        if not submitted:
            os.close(read_fd)
            os.close(write_fd)
    try:
        yield generation
    finally:
        request.cancel()
        with trio.CancelScope(shield=True):
            await finished.wait()
        os.close(read_fd)
        os.close(write_fd)
    if generation._error is not None and not generation._error_raised:
        generation._error_raised = True
        raise generation._error
