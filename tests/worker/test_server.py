"""The worker's HTTP/SSE contract, on one real `llm-worker-rbee` with the real model.

One worker process serves the whole module (loading the model is the slow part); each
test leaves it idle for the next one.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import pytest

from rbee.narration import DONE, sse
from tests.processes import RbeeProcess
from tests.worker.workers import (
    BOUNDED_ASK,
    BOUNDED_SCHEMA,
    CONVERSATION,
    CONVERSATION_RENDERED,
    COUNTING_PROMPT,
    EOS_PROMPT,
    HTTP_TIMEOUT,
    JSON_OBJECT_ASK,
    fits_bounded_schema,
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


def _messages(conversation) -> list[dict[str, str]]:
    return [m.as_json() for m in conversation]


def test_messages_are_rendered_with_the_chat_template(url):
    # The embedded GGUF has no chat template: the worker renders with llama.cpp's built-in
    # "gemma" one. The same text sent as a raw prompt gives the same prompt tokens (both
    # turns, the opened model turn) and, greedy from an empty slot, the same answer.
    body = {"max_tokens": 6, "temperature": 0, "cache_prompt": False}
    chat = infer(url, {"messages": _messages(CONVERSATION), **body, "job_id": "job-chat"})
    raw = infer(url, {"prompt": CONVERSATION_RENDERED, **body})
    assert chat.status == raw.status == 200
    metrics = chat.of_type("metrics")[0]
    assert metrics.prompt_tokens == raw.of_type("metrics")[0].prompt_tokens
    assert metrics.prompt_tokens == next(n.extra["prompt_tokens"] for n in chat.of_type("narration")
                                         if n.action == "tokenize")
    one_turn = infer(url, {"messages": _messages(CONVERSATION[-1:]), **body})
    assert metrics.prompt_tokens > one_turn.of_type("metrics")[0].prompt_tokens + 15  # the first turn is in it
    assert chat.end.tokens_out >= 1 and chat.text == raw.text
    execute = next(n for n in chat.of_type("narration") if n.action == "execute_request")
    assert execute.extra["messages"] == 4


def test_json_object_response_format_gives_a_json_object_and_eos(url):
    stream = infer(url, {"messages": _messages(JSON_OBJECT_ASK), "max_tokens": 60, "temperature": 0, "seed": 7,
                         "response_format": {"type": "json_object"}})
    assert stream.status == 200
    assert stream.end.stop_reason == "eos"  # OpenAI's finish_reason "stop"
    assert isinstance(json.loads(stream.text), dict)


def test_json_schema_response_format_fits_the_schema_and_ends_with_eos(url):
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "pick", "strict": True, "schema": BOUNDED_SCHEMA}}
    stream = infer(url, {"messages": _messages(BOUNDED_ASK), "max_tokens": 60, "temperature": 0, "seed": 7,
                         "response_format": response_format})
    assert stream.status == 200 and stream.end.stop_reason == "eos", stream.text
    assert fits_bounded_schema(json.loads(stream.text)), stream.text


def test_a_schema_the_converter_refuses_is_a_400_naming_response_format(url):
    response = httpx.post(f"{url}/v1/inference", json={
        "prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"$ref": "https://example.com/remote.json"}}}}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] == "response_format" and "remote" in detail["message"].lower()
    assert httpx.get(f"{url}/v1/ready", timeout=HTTP_TIMEOUT).json()["state"] == "idle"


def test_no_max_tokens_runs_until_the_context_is_full(embedded_model):
    with running_worker(embedded_model, "--parallel", "1", worker_id="w-small", ctx_size=64) as (_, small):
        stream = infer(small, {"prompt": COUNTING_PROMPT, "max_tokens": None, "temperature": 0})
        assert stream.status == 200
        metrics = stream.of_type("metrics")[0]
        assert stream.end.stop_reason == "max_tokens"  # OpenAI's finish_reason "length"
        assert metrics.prompt_tokens + stream.end.tokens_out == 64
        complete = next(n for n in stream.of_type("narration") if n.action == "inference_complete")
        assert complete.extra["tokens_generated"] == 64 - metrics.prompt_tokens
        # ... or until the end of generation, whichever comes first.
        eos = infer(small, {"prompt": EOS_PROMPT, "max_tokens": None, "temperature": 0})
        assert eos.end.stop_reason == "eos" and eos.text == "}\n"
        # A prompt that fills the context leaves no room: 400 before any stream.
        full = httpx.post(f"{small}/v1/inference", json={"prompt": "word " * 80, "max_tokens": None},
                          timeout=HTTP_TIMEOUT)
        assert full.status_code == 400 and full.json()["error"]["details"][0]["field"] == "prompt"


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
