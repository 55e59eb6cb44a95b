"""Helpers of the worker tests: start a real `llm-worker-rbee`, read its SSE streams.

Every worker here is the real program started by ``tests.processes.RbeeProcess`` on
127.0.0.1 port 0 with the embedded model; the streams are read with rbee's own SSE
decoder, so what the tests see is what any client sees.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from rbee.narration import sse
from rbee.requests import Message
from tests.processes import RbeeProcess, program, wait_gone

#: Small and fixed so tests are quick and two threads leave a core to the test itself.
WORKER_ARGS = ["--threads", "2"]
#: Tokens of one stream unless a test needs more (the KV cache holds this × --parallel).
CTX_SIZE = 512
#: A raw prompt after which Gemma-3 270M, greedy, writes "}\n" and then end-of-text.
EOS_PROMPT = "#include <stdio.h>\nint main(void) {\n    return 0;\n"
#: A raw prompt that, greedy, counts on: " 5, 6, 7, 8, 9, ..."
COUNTING_PROMPT = "1, 2, 3, 4,"
HTTP_TIMEOUT = httpx.Timeout(60.0)
#: A two-turn conversation: the second user turn only makes sense after the first.
CONVERSATION = (
    Message("system", "Answer with one word"),
    Message("user", "What colour is the sky?"),
    Message("assistant", "Blue"),
    Message("user", "And grass?"),
)
#: llama.cpp's built-in "gemma" template (the embedded GGUF carries none): the system
#: message goes into the first user turn, "assistant" is "model", the model's turn is opened.
CONVERSATION_RENDERED = (
    "<start_of_turn>user\nAnswer with one word\n\nWhat colour is the sky?<end_of_turn>\n"
    "<start_of_turn>model\nBlue<end_of_turn>\n"
    "<start_of_turn>user\nAnd grass?<end_of_turn>\n"
    "<start_of_turn>model\n"
)
#: Found by trying prompts (greedy): with the json_object grammar the model writes a short
#: object and then <eos>.
JSON_OBJECT_ASK = (Message("user", 'Answer in JSON: {"sky": "<colour>"}. What colour is the sky?'),)
#: A bounded schema: an enum, an integer with bounds, a short string, all required, nothing else.
#: (llama-cpp-python 0.3.36's converter does not put minimum/maximum into the grammar, a TODO
#: of its own: the grammar bounds the enum, the string's length and the keys; the count's
#: bounds are checked on the output.)
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["colour", "count", "name"],
    "additionalProperties": False,
}
BOUNDED_ASK = (Message("user", "Pick a colour, a count from 1 to 9 and a short name. Answer in JSON."),)


def fits_bounded_schema(value: Any) -> bool:
    """Whether ``value`` fits BOUNDED_SCHEMA (no jsonschema package in this environment)."""
    return (isinstance(value, dict) and set(value) == {"colour", "count", "name"}
            and value["colour"] in ("red", "green", "blue")
            and type(value["count"]) is int and 1 <= value["count"] <= 9
            and isinstance(value["name"], str) and len(value["name"]) <= 8)


def start_worker(model: Path, *args: str, worker_id: str = "w-test", env: dict[str, str] | None = None,
                 ctx_size: int = CTX_SIZE) -> RbeeProcess:
    """Start `llm-worker-rbee` on port 0 serving ``model``."""
    argv = [program("llm-worker-rbee"), "--model", str(model), "--worker-id", worker_id, *WORKER_ARGS,
            "--ctx-size", str(ctx_size), *args]
    return RbeeProcess(argv, env=env)


@contextlib.contextmanager
def running_worker(model: Path, *args: str, worker_id: str, ctx_size: int = CTX_SIZE) -> Iterator[tuple[RbeeProcess, str]]:
    """A loaded worker for the block: (process, base URL); stopped (exit 0) and gone after."""
    proc = start_worker(model, *args, worker_id=worker_id, ctx_size=ctx_size)
    try:
        url = proc.bound_url()
        assert wait_ready(url)["ready"]
        yield proc, url
    finally:
        assert proc.stop() == 0
    assert wait_gone([proc.pid], 5.0) == []


def wait_ready(url: str, *, headers: dict[str, str] | None = None, seconds: float = 60.0) -> dict[str, Any]:
    """Poll ``GET /v1/ready`` until the worker is ready; returns the last body."""
    deadline = time.monotonic() + seconds
    while True:
        body = httpx.get(f"{url}/v1/ready", headers=headers, timeout=HTTP_TIMEOUT).json()
        if body["ready"] or body["state"] == "error" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def wait_state(url: str, state: str, *, headers: dict[str, str] | None = None, seconds: float = 5.0) -> float:
    """Poll ``/v1/ready`` until ``state``; returns the seconds it took (AssertionError if never)."""
    start = time.monotonic()
    while True:
        body = httpx.get(f"{url}/v1/ready", headers=headers, timeout=HTTP_TIMEOUT).json()
        if body["state"] == state:
            return time.monotonic() - start
        assert time.monotonic() - start < seconds, f"worker stayed {body} instead of {state!r}"
        time.sleep(0.01)


@dataclass
class Stream:
    """What one SSE response carried: status, headers and every decoded event in order."""

    status: int
    headers: httpx.Headers
    events: list[Any] = field(default_factory=list)
    raw: bytes = b""
    body: Any = None  # the JSON body of a non-SSE answer

    def of_type(self, kind: str) -> list[Any]:
        """The events of one wire type (``token``, ``narration``, ``end`` ...)."""
        return [e for e in self.events if e.type == kind]

    @property
    def text(self) -> str:
        """The generated text: every token's ``t`` joined."""
        return "".join(e.t for e in self.of_type("token"))

    @property
    def end(self) -> Any:
        """The one ``end`` event."""
        (end,) = self.of_type("end")
        return end


def infer(url: str, body: dict[str, Any] | bytes, *, headers: dict[str, str] | None = None) -> Stream:
    """``POST /v1/inference`` and read the whole answer (SSE or JSON error)."""
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        with client.stream("POST", f"{url}/v1/inference", headers=headers, **kwargs) as response:
            return read_stream(response)


def read_stream(response: httpx.Response) -> Stream:
    """Read a response to its end: SSE events through rbee's decoder, or a JSON body."""
    stream = Stream(response.status_code, response.headers)
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        stream.raw = response.read()
        stream.body = response.json()
        return stream
    decoder = sse.Decoder()
    chunks = []
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        stream.events += decoder.feed(chunk)
    stream.events += decoder.close()
    stream.raw = b"".join(chunks)
    return stream


def wait_for_job_event(proc: RbeeProcess, action: str, job_id: str, seconds: float = 10.0) -> dict[str, Any]:
    """The first stdout narration with ``action`` and ``job_id`` (waits for it)."""
    deadline = time.monotonic() + seconds
    while True:
        for obj in proc.json_lines():
            if obj.get("action") == action and obj.get("job_id") == job_id:
                return obj
        assert time.monotonic() < deadline, f"no {action!r} for {job_id} on stdout: {proc.stdout_lines[-10:]}"
        time.sleep(0.05)
