"""The inference stream's body: keep-alive, batching of waiting events, cut-short streams.

These run ``SseBody`` on real Trio channels with Trio's virtual clock, so the 15 s
keep-alive is checked without waiting 15 s.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from rbee.narration import DONE, End, Error, NarrationEvent, Token, set_process_sink, sse
from rbee.worker.inference import KEEPALIVE_SECONDS, SseBody
from rbee.worker.state import Job


def run(async_fn) -> None:
    trio.run(async_fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_quiet_stream_gets_a_ping_every_keepalive_interval():
    async def main():
        send, receive = trio.open_memory_channel(math.inf)
        body = SseBody(receive, Job("job-1"), "w")
        with trio.fail_after(10 * KEEPALIVE_SECONDS):
            start = trio.current_time()
            assert await body.__anext__() == sse.encode_ping()
            assert trio.current_time() - start == pytest.approx(KEEPALIVE_SECONDS)
            assert await body.__anext__() == sse.encode_ping()
            send.send_nowait(Token("a", 0))
            assert await body.__anext__() == sse.encode(Token("a", 0))

    run(main)
    assert sse.encode_ping() == b": ping\n\n"


def test_waiting_events_go_out_as_one_chunk_and_done_ends_the_body():
    async def main():
        send, receive = trio.open_memory_channel(math.inf)
        body = SseBody(receive, Job("job-1"), "w")
        events = [Token("a", 0), Token("é", 1), End(2, 1.0, 2000.0, "max_tokens"), DONE]
        for event in events:
            send.send_nowait(event)
        with trio.fail_after(1):
            chunk = await body.__anext__()
            with pytest.raises(StopAsyncIteration):
                await body.__anext__()
        assert chunk == b"".join(sse.encode(e) for e in events)
        assert chunk.endswith(b"data: [DONE]\n\n")

    run(main)


def test_a_stream_whose_job_vanished_ends_with_error_then_done():
    async def main():
        send, receive = trio.open_memory_channel(math.inf)
        body = SseBody(receive, Job("job-1"), "w")
        send.close()  # the job task was cancelled from outside (shutdown)
        with trio.fail_after(1):
            chunk = await body.__anext__()
        decoder = sse.Decoder()
        events = decoder.feed(chunk) + decoder.close()
        assert events == [Error(code="shutting_down", message="the worker is shutting down"), DONE]

    run(main)


def test_closing_the_body_mid_stream_cancels_the_job_and_says_so_on_stdout():
    seen: list[NarrationEvent] = []
    previous = set_process_sink(seen.append)
    try:
        async def main():
            send, receive = trio.open_memory_channel(math.inf)
            job = Job("job-gone")
            job.tokens_out = 3
            body = SseBody(receive, job, "w-1")
            send.send_nowait(Token("a", 0))
            with trio.fail_after(1):
                await body.__anext__()
            await body.aclose()
            assert job.cancelled
            with pytest.raises(trio.BrokenResourceError):
                send.send_nowait(Token("b", 1))

        run(main)
    finally:
        set_process_sink(previous)
    (said,) = seen
    assert said.action == "client_disconnected" and said.job_id == "job-gone"
    assert said.worker_id == "w-1" and said.extra["tokens_out"] == 3
