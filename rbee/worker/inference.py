"""One inference job: the engine's tokens turned into the request's SSE stream.

Shape (why it is not simply an async generator that runs the engine): the job runs as a
task in the worker's job nursery and puts its events into an unbounded memory channel;
the HTTP response body (``SseBody``) only reads that channel. So

- the job owns the slot and always frees it, even when the response body is never read
  (a client that disconnects before the first byte): nothing depends on the body
  generator being closed;
- no cancel scope or nursery ever stays open across a ``yield`` of a generator that
  Quart drives, which Trio forbids;
- a disconnect closes the body, the body cancels the job, and the native loop stops
  within one token; a ``DELETE`` cancels the same scope.

The channel is unbounded because what goes in is bounded anyway (at most ``max_tokens``
tokens plus a few narration events), and a slow reader must never stall the decode loop:
the slot is freed the moment the core is done, not when the client has read everything.

Events of one stream, in order: ``started``, ``narration`` (execute_request, tokenize,
inference_start), ``prefill``* (one per prompt chunk while a long prompt is evaluated),
``token``*, ``narration`` (token_generate every ``TOKEN_NARRATION_EVERY`` tokens,
inference_complete), ``metrics``, ``end``, ``[DONE]``; or, on a failure after the stream
began, ``error`` then ``[DONE]``. Several streams run at once, each in its own job task
with its own ``job_id`` in its narration.
"""

from __future__ import annotations

import math
import time
from typing import Any

import trio

from ..errors import RbeeError, ShuttingDownError
from ..narration import DONE, End, Error, Metrics, Prefill, Started, Token, narration_context, sse
from ..requests import SamplingParams
from .narrator import Narrator
from .state import Job, WorkerState
from .validation import InferenceRequest

#: A narration event with the running count every this many tokens.
TOKEN_NARRATION_EVERY = 32
#: Keep-alive comment interval on a quiet stream (DESIGN.md: every 15 s).
KEEPALIVE_SECONDS = 15.0
#: After the first token, tokens are written at most this often (several per chunk). Each
#: write costs the event loop CPU that, on a small machine, it takes from llama.cpp's decode
#: threads: an OpenMP barrier waits for a preempted thread, so per-write cost is amplified.
#: 20 ms is invisible to a reader and still streams (a decode step is ~10-25 ms here).
COALESCE_SECONDS = 0.020


def sampling_params(request: InferenceRequest) -> SamplingParams:
    """The ``SamplingParams`` of a validated request."""
    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        repeat_penalty=request.repeat_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=request.seed,
        stop=request.stop,
    )


def _limit(request: InferenceRequest, engine: Any, prompt_tokens: int) -> str:
    """``up to N tokens``, or with no limit what the context leaves."""
    if request.max_tokens is None:
        return (f"until the end of generation (at most {engine.n_ctx - prompt_tokens} tokens, "
                f"the context left)")
    return f"up to {request.max_tokens} tokens"


def _put(send: trio.MemorySendChannel, event: Any) -> None:
    # The reader is gone once the client disconnected: the job is being cancelled then,
    # and what it still says has nobody to go to.
    try:
        send.send_nowait(event)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def run_inference(
    state: WorkerState,
    job: Job,
    request: InferenceRequest,
    prompt_tokens: int,
    send: trio.MemorySendChannel,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``request`` on the engine, putting its stream events into ``send``.

    Calls ``task_status.started()`` once the generation is open (the prompt was accepted);
    an ``RbeeError`` before that propagates to the caller (who answers with a plain JSON
    error instead of a stream). Always frees the slot and closes ``send``, last event
    ``DONE``.
    """
    from .engine_trio import open_generation

    say = Narrator(state.config.worker_id)
    engine = state.engine
    started = False
    finished = False  # the stream's last event before DONE (end or error) is in
    generation = None
    failure: RbeeError | None = None
    try:
        job.sink = send.send_nowait
        with narration_context(job_id=request.job_id, sink=job.sink):
            _put(send, Started(
                job_id=request.job_id,
                worker_id=state.config.worker_id,
                model=state.config.effective_model_ref,
                ts_ms=time.time_ns() // 1_000_000,
            ))
            limit = _limit(request, engine, prompt_tokens)
            say("execute_request",
                f"Executing job {request.job_id}: {limit} at temperature {request.temperature:g}",
                target=request.job_id, max_tokens=request.max_tokens,
                temperature=request.temperature, chat=request.chat,
                messages=None if request.messages is None else len(request.messages),
                response_format=None if request.response_format is None else request.response_format.get("type"),
                cute=f"A new question for {state.config.worker_id}! 💬",
                story=f"A prompt arrived at {state.config.worker_id}, asking for {limit}.")
            say("tokenize", f"Tokenized the prompt: {prompt_tokens} tokens",
                prompt_tokens=prompt_tokens,
                cute=f"Sliced the prompt into {prompt_tokens} tasty tokens!",
                story=f"The worker cut the prompt into {prompt_tokens} tokens.")
            try:
                with job.cancel_scope:
                    async with open_generation(
                        engine, request.source, sampling_params(request), chat=request.chat,
                        cache_prompt=request.cache_prompt, grammar=request.grammar,
                    ) as generation:
                        say("inference_start", f"Generating {limit}",
                            cute="Thinking hard! 🐝",
                            story="The worker began to think, one token after another.")
                        task_status.started()
                        started = True
                        async for token in generation:
                            _put(send, token)
                            if type(token) is Prefill:
                                continue
                            job.tokens_out += 1
                            if job.tokens_out % TOKEN_NARRATION_EVERY == 0:
                                say("token_generate", f"Generated {job.tokens_out} tokens",
                                    level="debug", tokens_out=job.tokens_out)
            except RbeeError as exc:
                if not started:
                    raise
                failure = exc
            if not started:
                # Cancelled (DELETE) before the generation opened: still a stream that says so.
                task_status.started()
                started = True
            state.release(job)  # before the last events: a client that reads `end` may ask again
            failure = failure or job.stop_error  # cut short by the worker, not by its client
            if failure is not None:
                say("inference_failed", f"Job {request.job_id} failed: {failure.message}",
                    level="error", error_code=failure.code)
                _put(send, Error(code=failure.code, message=failure.message))
            else:
                _finish(say, send, job, generation, prompt_tokens)
            finished = True
    except Exception as exc:
        if not started:
            raise
        # A bug in this worker: the client gets an error event, the parent a narration
        # (outside the job context, so on stdout), and the worker keeps serving.
        say("inference_failed", f"Job {request.job_id} failed: {type(exc).__name__}: {exc}",
            level="error", job=request.job_id)
        _put(send, Error(code="internal_error", message=f"{type(exc).__name__}: {exc}"))
        finished = True
    finally:
        state.release(job)
        if started:
            if not finished:
                # Cancelled from outside the job's own scope: the worker is shutting down.
                cause = job.stop_error or state.stop_error or ShuttingDownError("the worker is shutting down")
                _put(send, Error(code=cause.code, message=cause.message))
            _put(send, DONE)
        send.close()


def _finish(
    say: Narrator,
    send: trio.MemorySendChannel,
    job: Job,
    generation: Any,
    prompt_tokens: int,
) -> None:
    """Narrate the outcome and put ``metrics`` and ``end`` into the stream.

    ``tokens_out`` is what the client got; ``tokens_generated`` (narration only) is what
    the core emitted, which after a cancel may be one more that never reached the stream.
    """
    sent = job.tokens_out
    result = getattr(generation, "result", None) if generation is not None else None
    if job.cancel_scope.cancelled_caught or result is None:
        stop_reason = "cancelled"
    else:
        stop_reason = result.stop_reason
    decode_ms = float(result.decode_time_ms) if result is not None else 0.0
    tokens_per_sec = float(result.tokens_per_sec) if result is not None else 0.0
    if not math.isfinite(tokens_per_sec):
        tokens_per_sec = 0.0
    say("inference_complete",
        f"Generated {sent} tokens in {decode_ms:.0f} ms ({tokens_per_sec:.1f} tok/s), "
        f"stopped by {stop_reason.replace('_', ' ')}",
        tokens_out=sent, tokens_generated=int(result.tokens_out) if result is not None else sent,
        decode_time_ms=round(decode_ms, 3),
        tokens_per_sec=round(tokens_per_sec, 3), stop_reason=stop_reason,
        cute="All done! 🍯",
        story=f"The worker fell quiet after {sent} tokens ({stop_reason.replace('_', ' ')}).")
    cached = int(result.prompt_tokens_cached) if result is not None else 0
    _put(send, Metrics(
        prompt_tokens=int(result.prompt_tokens) if result is not None else prompt_tokens,
        prompt_tokens_cached=cached,
        tokens_out=sent,
        prefill_ms=float(result.prefill_ms) if result is not None else 0.0,
        time_to_first_token_ms=float(result.time_to_first_token_ms) if result is not None else 0.0,
        decode_time_ms=decode_ms,
        tokens_per_sec=tokens_per_sec,
    ))
    _put(send, End(tokens_out=sent, decode_time_ms=decode_ms,
                   tokens_per_sec=tokens_per_sec, stop_reason=stop_reason, prompt_tokens_cached=cached))


class SseBody:
    """The response body of one inference: SSE bytes read from the job's channel.

    Several events waiting in the channel are sent as one chunk (one socket write instead
    of several). A quiet stream gets a ``: ping`` comment every ``KEEPALIVE_SECONDS``.
    Closing the body (Quart does on disconnect) cancels the job.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel, job: Job, worker_id: str) -> None:
        self._receive = receive
        self._job = job
        self._worker_id = worker_id
        self._finished = False
        self._last_write = 0.0

    def __aiter__(self) -> SseBody:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        events = []
        with trio.move_on_after(KEEPALIVE_SECONDS):
            try:
                events.append(await self._receive.receive())
            except trio.EndOfChannel:
                return self._cut_short()
        if not events:
            return sse.encode_ping()
        if isinstance(events[0], Token) and events[0].i > 0:
            # Let a few more tokens gather; an `end` or DONE arriving meanwhile is drained too.
            await trio.sleep_until(self._last_write + COALESCE_SECONDS)
        while True:
            try:
                events.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if events[-1] is DONE:
            self._finished = True
        self._last_write = trio.current_time()
        return b"".join(sse.encode(event) for event in events)

    def _cut_short(self) -> bytes:
        # The job task ended without DONE: the worker is shutting down under it.
        self._finished = True
        cause = self._job.stop_error or ShuttingDownError("the worker is shutting down")
        return sse.encode(Error(code=cause.code, message=cause.message)) + sse.encode_done()

    async def aclose(self) -> None:
        """Stop reading: cancels the job (the core stops within one token)."""
        if not self._finished and not self._job.done.is_set():
            # The client went away mid-stream. Said on stdout (the stream is gone), with
            # the job's id so the parent can still route it.
            with narration_context(job_id=self._job.job_id):
                Narrator(self._worker_id)(
                    "client_disconnected",
                    f"Client of job {self._job.job_id} disconnected: cancelling",
                    tokens_out=self._job.tokens_out,
                )
        self._finished = True
        self._job.cancel()
        self._receive.close()
