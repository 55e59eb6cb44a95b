"""The worker's HTTP/SSE contract, on one real `llm-worker-rbee` with the real model.

One worker process serves the whole module (loading the model is the slow part); each
test leaves it idle for the next one.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import pytest

from rbee.narration import DONE, sse
from tests.processes import RbeeProcess
from tests.worker.workers import (
    COUNTING_PROMPT,
    EOS_PROMPT,
    HTTP_TIMEOUT,
    infer,
    read_stream,
    running_worker,
    wait_for_job_event,
    wait_state,
)

pytestmark = pytest.mark.model

REQUEST_ACTIONS = ["execute_request", "tokenize", "inference_start"]
#: Two slots: enough to see idle, busy and full without a long test.
SLOTS = 2


@pytest.fixture(scope="module")
def worker(embedded_model) -> Iterator[tuple[RbeeProcess, str]]:
    """One worker for the module: (process, base URL)."""
    with running_worker(embedded_model, "--parallel", str(SLOTS), worker_id="w-server") as running:
        yield running


@pytest.fixture
def url(worker) -> str:
    return worker[1]


def greedy(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_health_and_ready_answer_idle(url):
    health = httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "worker_id": "w-server", "state": "idle"}
    ready = httpx.get(f"{url}/v1/ready", timeout=HTTP_TIMEOUT)
    assert ready.json() == {"ready": True, "state": "idle", "slots": {"total": SLOTS, "busy": 0}}


def test_loading_progress_once_loaded_is_ready_then_done(url):
    with httpx.stream("GET", f"{url}/v1/loading/progress", timeout=HTTP_TIMEOUT) as response:
        stream = read_stream(response)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert [e.type for e in stream.events] == ["ready", "done"]
    assert stream.events[0].worker_id == "w-server"
    assert stream.events[0].url == url
    assert stream.raw.endswith(b"data: [DONE]\n\n")


def test_stream_order_and_content_for_max_tokens(worker, url):
    proc, _ = worker
    stream = infer(url, greedy(COUNTING_PROMPT, 33, job_id="job-order-1"))
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    events = stream.events
    assert events[0].type == "started" and events[0].job_id == "job-order-1"
    assert events[0].worker_id == "w-server"
    assert events[-1] is DONE and events[-2].type == "end" and events[-3].type == "metrics"
    assert stream.raw.endswith(sse.encode(events[-2]) + b"data: [DONE]\n\n")
    tokens = stream.of_type("token")
    assert [t.i for t in tokens] == list(range(33))
    assert stream.text.startswith(" 5, 6, 7")
    end, metrics = stream.end, stream.of_type("metrics")[0]
    assert end.tokens_out == len(tokens) == 33 == metrics.tokens_out
    assert end.stop_reason == "max_tokens"
    assert end.decode_time_ms > 0 and end.tokens_per_sec > 0
    # Narration: every per-request event in the stream, tagged with the job, in order,
    # before the first token (start) and after the last (complete).
    narration = stream.of_type("narration")
    assert all(n.job_id == "job-order-1" and n.actor == "llm-worker-rbee" and n.worker_id == "w-server"
               for n in narration)
    actions = [n.action for n in narration]
    assert actions == REQUEST_ACTIONS + ["token_generate", "inference_complete"]
    first_token = events.index(tokens[0])
    assert all(events.index(n) < first_token for n in narration[:3])
    assert narration[1].extra["prompt_tokens"] == metrics.prompt_tokens > 4
    assert narration[3].extra["tokens_out"] == 32
    complete = narration[-1]
    assert complete.extra["tokens_out"] == 33 and complete.extra["stop_reason"] == "max_tokens"
    assert "tok/s" in complete.human
    # ... and not also on stdout: the user must not see them twice.
    time.sleep(0.2)
    on_stdout = [o for o in proc.json_lines() if o.get("job_id") == "job-order-1"]
    assert on_stdout == []


def test_stop_sequence_ends_before_it(url):
    full = infer(url, greedy(COUNTING_PROMPT, 12)).text
    assert full.startswith(" 5, 6, 7, 8")
    stream = infer(url, greedy(COUNTING_PROMPT, 12, stop=["8,", "never"]))
    assert stream.end.stop_reason == "stop_sequence"
    assert stream.text == full[: full.index("8,")]
    assert stream.end.tokens_out == len(stream.of_type("token"))
    assert [t.i for t in stream.of_type("token")] == list(range(stream.end.tokens_out))


def test_end_of_generation_token_stops_with_eos(url):
    stream = infer(url, greedy(EOS_PROMPT, 40))
    assert stream.end.stop_reason == "eos"
    assert stream.text == "}\n"
    assert stream.end.tokens_out == len(stream.of_type("token")) == 2


def test_job_id_is_made_up_when_missing(url):
    stream = infer(url, {"prompt": "Hello", "max_tokens": 1})
    started = stream.events[0]
    assert started.type == "started" and started.job_id.startswith("job-")
    assert all(n.job_id == started.job_id for n in stream.of_type("narration"))
    assert stream.end.tokens_out == 1


def _read_until_tokens(chunks: Iterator[bytes], decoder: sse.Decoder, n: int, events: list) -> None:
    # One chunk iterator per response: dropping an httpx byte iterator closes the connection.
    while sum(1 for e in events if e.type == "token") < n:
        events += decoder.feed(next(chunks))


def _open(client: httpx.Client, url: str, job_id: str, stack) -> tuple[Iterator[bytes], sse.Decoder, list]:
    """Start a 400-token stream and read until its third token; (chunks, decoder, events)."""
    response = stack.enter_context(client.stream("POST", f"{url}/v1/inference",
                                                 json=greedy(COUNTING_PROMPT, 400, job_id=job_id)))
    assert response.status_code == 200
    chunks, decoder, events = response.iter_bytes(), sse.Decoder(), []
    _read_until_tokens(chunks, decoder, 3, events)
    return chunks, decoder, events


def test_busy_then_full_answer_then_cancel_by_delete_stops_within_one_step(url):
    from contextlib import ExitStack

    def ready() -> dict:
        return httpx.get(f"{url}/v1/ready", timeout=HTTP_TIMEOUT).json()

    with httpx.Client(timeout=HTTP_TIMEOUT) as client, ExitStack() as stack:
        chunks, decoder, events = _open(client, url, "job-long", stack)
        assert ready() == {"ready": True, "state": "busy", "slots": {"total": SLOTS, "busy": 1}}
        other_chunks, other_decoder, other_events = _open(client, url, "job-other", stack)
        assert ready() == {"ready": True, "state": "full", "slots": {"total": SLOTS, "busy": 2}}

        full = httpx.post(f"{url}/v1/inference", json=greedy("Hello", 4), timeout=HTTP_TIMEOUT)
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        error = full.json()["error"]
        assert error["code"] == "full" and f"all {SLOTS} slots" in error["message"]
        again = httpx.post(f"{url}/v1/inference", json=greedy("Hello", 4, job_id="job-other"), timeout=HTTP_TIMEOUT)
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_exists"

        sent = time.monotonic()
        cancel = httpx.delete(f"{url}/v1/inference/job-long", timeout=HTTP_TIMEOUT)
        assert cancel.status_code == 200 and cancel.json() == {"job_id": "job-long", "cancelled": True}
        for chunk in chunks:
            events += decoder.feed(chunk)
        took = time.monotonic() - sent
        # The other stream runs on; cancel it too, by disconnecting.
        _read_until_tokens(other_chunks, other_decoder, len(other_events) + 2, other_events)
    assert events[-1] is DONE and events[-2].type == "end"
    end = events[-2]
    assert end.stop_reason == "cancelled"
    tokens = [e for e in events if e.type == "token"]
    assert end.tokens_out == len(tokens) < 400
    assert [t.i for t in tokens] == list(range(len(tokens)))
    by_action = {e.action: e for e in events if e.type == "narration"}
    at_cancel = by_action["cancel_request"].extra["tokens_out"]
    # Nothing reaches the stream after the cancel; the core itself decodes at most one
    # more step for it (the one in flight when the cancel came).
    assert end.tokens_out == at_cancel
    assert by_action["inference_complete"].extra["tokens_generated"] <= at_cancel + 1
    assert took < 5.0
    assert wait_state(url, "idle", seconds=3.0) < 2.0
    # The next request is served at once.
    assert infer(url, greedy("Hello", 2)).end.tokens_out == 2


def test_cancel_by_disconnect_frees_the_worker_at_once(worker, url):
    proc, _ = worker
    decoder, events = sse.Decoder(), []
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        with client.stream("POST", f"{url}/v1/inference",
                           json=greedy(COUNTING_PROMPT, 400, job_id="job-gone")) as response:
            _read_until_tokens(response.iter_bytes(), decoder, 3, events)
        # Leaving the block closes the connection in the middle of the stream.
    took = wait_state(url, "idle", seconds=3.0)
    assert took < 2.0
    gone = wait_for_job_event(proc, "client_disconnected", "job-gone")
    complete = wait_for_job_event(proc, "inference_complete", "job-gone")
    assert complete["stop_reason"] == "cancelled"
    assert complete["tokens_out"] <= gone["tokens_out"] + 1
    assert complete["tokens_generated"] <= gone["tokens_out"] + 2
    assert complete["tokens_generated"] < 400
    assert infer(url, greedy("Hello", 2)).end.tokens_out == 2


def test_delete_is_idempotent_and_200_for_unknown_jobs(url):
    for _ in range(2):
        response = httpx.delete(f"{url}/v1/inference/no-such-job", timeout=HTTP_TIMEOUT)
        assert response.status_code == 200
        assert response.json() == {"job_id": "no-such-job", "cancelled": False}


def test_unknown_route_and_wrong_method_get_the_envelope(url):
    missing = httpx.get(f"{url}/v1/nothing-here", timeout=HTTP_TIMEOUT)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert "/v1/nothing-here" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{url}/v1/inference", timeout=HTTP_TIMEOUT)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
