"""OpenAI's API on the queen, driven by the official ``openai`` client against a real
queen (and its real hive and worker, the real embedded model)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from rbee.narration import sse
from rbee.narration.events import DONE, End, Error, Metrics, Token
from tests.processes import RbeeProcess, program
from tests.queen.support import wait_no_rbee_processes

pytestmark = pytest.mark.model
MODEL = "gemma3-270m"
PROMPT = "The honey bee is"
MESSAGES = [{"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "What do bees make?"}]
#: Greedy, seeded, no prompt cache: a lone request gives the same tokens every time.
SAME = {"temperature": 0, "seed": 1234, "extra_body": {"cache_prompt": False}}
TOKEN = "openai-test-token-4d1f9a"


def start(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[RbeeProcess, str]:
    queen = RbeeProcess([program("queen-rbee"), "--port", "0", *args], env={"RBEE_HOME": str(home), **(env or {})})
    try:
        return queen, queen.bound_url()
    except BaseException:
        queen.stop()
        raise


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One queen for the module (its worker stays loaded between the tests)."""
    home = tmp_path_factory.mktemp("rbee-home")
    proc, url = start(home)
    try:
        yield url
    finally:
        proc.stop()
        assert not wait_no_rbee_processes(home, 10)


@pytest.fixture(scope="module")
def client(queen: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{queen}/v1", api_key="anything", max_retries=0, timeout=300)


def rbee_task(url: str, body: dict[str, Any]) -> list[Any]:
    """rbee's own one-shot job (``POST /v2/tasks``): its typed events to [DONE]."""
    events: list[Any] = []
    with httpx.stream("POST", f"{url}/v2/tasks", json={"operation": "infer", **body}, timeout=300) as response:
        assert response.status_code == 200, response.read()
        decoder = sse.Decoder()
        for chunk in response.iter_raw():
            events += decoder.feed(chunk)
    assert events[-1] is DONE and not [e for e in events if isinstance(e, Error)], events[-3:]
    return events


def tokens_of(events: list[Any]) -> str:
    return "".join(e.t for e in events if isinstance(e, Token))


def one(events: list[Any], kind: type) -> Any:
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, events[-4:]
    return found[0]


def busy_slots(url: str) -> int:
    return sum(w["slots"]["busy"] for w in httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"])


def wait_slots_free(url: str, seconds: float) -> float:
    """Seconds until no slot is busy (fails after ``seconds``)."""
    began = time.monotonic()
    while busy_slots(url):
        assert time.monotonic() - began < seconds, httpx.get(f"{url}/v1/workers").json()
        time.sleep(0.05)
    return time.monotonic() - began


# -- completions (prompt) -------------------------------------------------------------------


def test_completion_equals_rbee_job(queen: str, client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=12, **SAME)
    assert raw.status_code == 200 and raw.headers["x-rbee-job-id"].startswith("job-")
    answer = raw.parse()
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.text
    native = rbee_task(queen, {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                               "seed": 1234, "cache_prompt": False})
    assert choice.text == tokens_of(native)
    metrics, end = one(native, Metrics), one(native, End)
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (metrics.prompt_tokens, end.tokens_out)
    assert answer.usage.total_tokens == metrics.prompt_tokens + end.tokens_out == metrics.prompt_tokens + 12


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **SAME)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **SAME))
    assert all(isinstance(c, openai.types.Completion) for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage
    # One chunk per token, then the finish.
    assert len(texts) == whole.usage.completion_tokens + 1


def test_raw_stream_is_only_data_lines(queen: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{queen}/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-rbee-job-id"].startswith("job-")
        raw = b"".join(response.iter_raw())
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw[:-2].split(b"\n\n")
    assert all(f.startswith(b"data: ") and b"\n" not in f for f in frames), raw[:300]
    assert b"event:" not in raw
    for frame in frames[:-1]:
        assert json.loads(frame[6:])["object"] == "text_completion"


def test_narration_comes_as_comments_when_asked(queen: str, client: openai.OpenAI) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{queen}/v1/completions", json=body, headers={"X-Rbee-Narration": "1"},
                      timeout=300) as response:
        assert response.status_code == 200
        raw = b"".join(response.iter_raw())
    comments = [f for f in raw.split(b"\n\n") if f.startswith(b": narration ")]
    actions = [json.loads(f[len(b": narration "):]).get("action") for f in comments]
    assert "job_create" in actions and "infer_lease" in actions, actions
    assert raw.endswith(b"data: [DONE]\n\n")
    # The SDK skips the comments and parses every chunk.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, stream=True, **SAME,
                                            extra_headers={"X-Rbee-Narration": "1"}))
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, **SAME)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_closing_a_stream_cancels_its_job(queen: str, client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="Write a very long story about bees.",
                                       max_tokens=2000, stream=True, temperature=0)
    job_id = stream.response.headers["x-rbee-job-id"]
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            break
    assert busy_slots(queen) == 1
    stream.close()
    assert wait_slots_free(queen, 2.0) < 2.0
    jobs = {j["job_id"]: j for j in httpx.get(f"{queen}/v1/jobs", timeout=10).json()["jobs"]}
    assert job_id not in jobs or jobs[job_id]["state"] == "cancelled", jobs.get(job_id)


def test_a_client_that_gives_up_waiting_cancels_its_job(queen: str, client: openai.OpenAI) -> None:
    impatient = client.with_options(timeout=3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="Write a very long story about bees.", max_tokens=2000,
                                     temperature=0)
    assert wait_slots_free(queen, 2.0) < 2.0


# -- models ---------------------------------------------------------------------------------


def test_models(queen: str, client: openai.OpenAI) -> None:
    models = client.models.list()
    listed = {m.id: m for m in models}
    assert MODEL in listed and listed[MODEL].object == "model"
    assert listed[MODEL].owned_by == "rbee:localhost"
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(f"{MODEL}@localhost").owned_by == "rbee:localhost"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("hf:nobody/nothing:Q4_K_M")  # a "/" and a ":" in the id
    assert caught.value.code == "model_not_found"
    # rbee's own listing of one node's catalog moved here:
    catalog = httpx.get(f"{queen}/v1/nodes/localhost/models", timeout=60).json()
    assert catalog["node"] == "localhost" and [m["reference"] for m in catalog["models"]] == [MODEL]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_models_are_not_found(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt=PROMPT, stream=stream)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    # A model reference the node's catalog cannot resolve: the job fails before a slot, and
    # its error's code gives the answer its status.
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="file:/nonexistent/model.gguf", prompt=PROMPT, stream=stream)
    assert caught.value.code == "model_not_found" and caught.value.response.headers["x-rbee-job-id"]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_parameters_are_bad_requests(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, n=2, stream=stream)
    assert caught.value.param == "n" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1, stream=stream)
    assert caught.value.param == "temperature"
    # What only the worker knows (its context) is refused after the lease, before any
    # token: a stream still answers with the status.
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1_000_000, stream=stream)
    assert caught.value.code == "invalid_request"


# -- chat (messages, response_format: the worker side) --------------------------------------


def test_chat_equals_rbee_job(queen: str, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, **SAME)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    native = rbee_task(queen, {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "temperature": 0,
                               "seed": 1234, "cache_prompt": False})
    assert choice.message.content == tokens_of(native)
    metrics, end = one(native, Metrics), one(native, End)
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (metrics.prompt_tokens, end.tokens_out)


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, **SAME)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, **SAME)
    assert stream.response.headers["x-rbee-job-id"].startswith("job-")
    chunks = list(stream)
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage


def test_chat_content_parts_and_model_at_node(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What do bees make?"}]}]
    answer = client.chat.completions.create(model=f"{MODEL}@localhost", messages=parts, max_tokens=4, **SAME)
    assert answer.model == f"{MODEL}@localhost" and answer.choices[0].message.content


def test_chat_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["bee", "wasp", "ant"]},
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            "name": {"type": "string", "maxLength": 12},
        },
        "required": ["kind", "legs", "name"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a honey bee as JSON."}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "insect", "schema": schema, "strict": True}},
        **SAME)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    assert set(value) == {"kind", "legs", "name"}
    assert value["kind"] in ("bee", "wasp", "ant") and isinstance(value["legs"], int) and 0 <= value["legs"] <= 8
    assert isinstance(value["name"], str) and len(value["name"]) <= 12


# -- auth and a full queue: a queen with a token, one slot and a queue of one --------------------


@pytest.fixture(scope="module")
def strict_queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("rbee-home-strict")
    # --max-queue 1: with --max-queue 0 a queen with no worker yet refuses every job
    # (no free slot and no room to wait for the first worker).
    proc, url = start(home, "--max-queue", "1", env={"RBEE_API_TOKEN": TOKEN, "RBEE_WORKER_PARALLEL": "1"})
    try:
        yield url
    finally:
        proc.stop()
        assert not wait_no_rbee_processes(home, 10)


def test_a_wrong_key_is_an_authentication_error(strict_queen: str) -> None:
    wrong = openai.OpenAI(base_url=f"{strict_queen}/v1", api_key="wrong", max_retries=0, timeout=60)
    for call in (lambda: wrong.models.list(), lambda: wrong.completions.create(model=MODEL, prompt=PROMPT)):
        with pytest.raises(openai.AuthenticationError) as caught:
            call()
        assert caught.value.status_code == 401 and caught.value.code == "unauthorized"
        assert caught.value.type == "authentication_error"
    right = openai.OpenAI(base_url=f"{strict_queen}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert MODEL in {m.id for m in right.models.list()}


def test_a_full_queue_is_a_503_with_retry_after(strict_queen: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = openai.OpenAI(base_url=f"{strict_queen}/v1", api_key=TOKEN, max_retries=0, timeout=300)
    long = {"operation": "infer", "model": MODEL, "prompt": "Write a very long story about bees.",
            "max_tokens": 4000, "temperature": 0}
    jobs = []
    try:
        jobs.append(httpx.post(f"{strict_queen}/v1/jobs", json=long, headers=auth, timeout=30).json()["job_id"])
        deadline = time.monotonic() + 300
        while not sum(w["slots"]["busy"] for w in
                      httpx.get(f"{strict_queen}/v1/workers", headers=auth, timeout=10).json()["workers"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        jobs.append(httpx.post(f"{strict_queen}/v1/jobs", json=long, headers=auth, timeout=30).json()["job_id"])
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=stream)
            assert caught.value.status_code == 503 and caught.value.code == "queue_full"
            assert int(caught.value.response.headers["retry-after"]) >= 1
            assert "--max-queue" in caught.value.message
    finally:
        for job_id in jobs:
            httpx.delete(f"{strict_queen}/v1/jobs/{job_id}", headers=auth, timeout=10)
