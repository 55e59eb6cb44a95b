"""OpenAI's API on the queen: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /v1/models/{id}``.

Same port and auth as the rest of the queen (the OpenAI ``api_key`` is the queen's bearer
token). Each completion is an ``infer`` job like any other: submitted through the same
function as ``POST /v1/jobs`` (checked, admitted or refused with 503 + ``Retry-After``,
queued, narrated, cancellable with ``DELETE /v1/jobs/{id}``); the answer carries its id in
``X-Rbee-Job-Id``, and a client that goes away cancels it. The wire format is the
sans-I/O codec ``rbee.narration.openai``.

- Not streamed: the job's events are read to the end; 200 with the completion object, or
  the job's error with the status of its code (``rbee.errors.http_status_for_code``).
- Streamed: the answer waits until the worker has accepted the request (its ``started``
  event, which comes after the queen leased a slot) or the job failed, so that every
  failure before the first token still has its HTTP status, and OpenAI's clients raise
  their typed exceptions. With ``X-Rbee-Narration: 1`` it answers 200 at once instead and
  sends the narration as SSE comments while the job is routed, queued and loaded.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import trio
from quart import request
from quart_trio import QuartTrio

from ..errors import ModelNotFoundError, NotFoundError, RbeeError, error_for_code
from ..http_common import error_answer, json_body, sse_response
from ..narration import sse
from ..narration.events import End, Error, Event, Prefill, Started, Token
from ..narration.openai import (
    NARRATION_HEADER,
    ChatResult,
    ChatStream,
    OpenAIRequest,
    TextResult,
    TextStream,
    parse_chat_request,
    parse_completion_request,
    split_model,
)
from ..requests import EMBEDDED_ALIAS
from .jobs import Job

if TYPE_CHECKING:
    from .state import QueenState

#: How long one hive may take to list its catalog for ``GET /v1/models``.
CATALOG_TIMEOUT_S = 5.0
#: The worker's events that mean it accepted the request: a stream may answer 200 now.
_STARTED = (Started, Token, Prefill, End)


def register_openai_routes(app: QuartTrio, state: "QueenState", submit_infer: Callable[[dict[str, Any]], Job]) -> None:
    """Add OpenAI's routes to the queen's app; ``submit_infer(body)`` is how
    ``POST /v1/jobs`` submits an infer job (the very same checks and admission)."""

    def is_node(name: str) -> bool:
        try:
            state.nodes.get(name)
        except NotFoundError:
            return False
        return True

    async def body() -> Any:
        return await json_body()

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        return await answer(parse_chat_request(await body(), is_node=is_node), chat=True)

    @app.post("/v1/completions")
    async def completions() -> Any:
        return await answer(parse_completion_request(await body(), is_node=is_node), chat=False)

    async def answer(req: OpenAIRequest, *, chat: bool) -> Any:
        job = submit_infer(req.body)
        state.jobs.take_stream(job.job_id)  # this request is the job's one reader
        created = int(time.time())
        completion_id = ("chatcmpl-" if chat else "cmpl-") + job.job_id.removeprefix("job-")
        headers = {"X-Rbee-Job-Id": job.job_id}
        handed_over = False
        try:
            if not req.stream:
                result = ChatResult() if chat else TextResult()
                async for event in job.receive:
                    result.feed(event)
                result.close()
                if result.error is not None:
                    return _error(result.error, headers)
                return result.body(req.model, completion_id, created), 200, headers
            narration = request.headers.get(NARRATION_HEADER, "").strip() == "1"
            codec = (ChatStream if chat else TextStream)(
                req.model, completion_id, created, include_usage=req.include_usage, narration=narration)
            held: list[Event] = []
            if not narration:
                async for event in job.receive:
                    held.append(event)
                    if isinstance(event, _STARTED):
                        break
                    if isinstance(event, Error):
                        async for _ in job.receive:  # the job's last steps: its channel ends now
                            pass
                        return _error(event, headers)
            response = sse_response(_stream(state, job, codec, held), headers=headers)
            handed_over = True
            return response
        finally:
            if not handed_over:
                _let_go(state, job)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": await _models(state)}

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> dict[str, Any]:
        models = {m["id"]: m for m in await _models(state)}
        if model_id in models:
            return models[model_id]
        reference, node = split_model(model_id, is_node)
        if node is not None and reference in models and f"rbee:{node}" in _owners(models[reference]):
            return {**models[reference], "id": model_id, "owned_by": f"rbee:{node}"}
        raise ModelNotFoundError(
            f"the model {model_id!r} does not exist on any running rbee-hive (GET /v1/models lists them;"
            " a model that is not there yet is downloaded by its first request)",
            details=[{"field": "model", "constraint": "known", "message": f"no model {model_id!r}"}],
        )


def _owners(model: dict[str, Any]) -> list[str]:
    return [f"rbee:{n}" for n in model["owned_by"].removeprefix("rbee:").split(",")]


def _error(event: Error, headers: dict[str, str]) -> tuple[dict[str, Any], int, dict[str, str]]:
    envelope, status, extra = error_answer(error_for_code(event.code, event.message))
    return envelope, status, {**extra, **headers}


def _let_go(state: "QueenState", job: Job) -> None:
    """The request is over: forget a finished job, cancel one still running.

    Synchronous on purpose: this runs while the request is being cancelled. A cancelled
    job is no longer this request's: the registry forgets it some time after it ended.
    """
    if job.finished.is_set():
        state.jobs.forget(job)
    else:
        job.stream_taken = False
        job.cancel()


async def _stream(state: "QueenState", job: Job, codec: ChatStream | TextStream, held: list[Event]) -> AsyncIterator[bytes]:
    """The SSE body of a streamed completion: what the codec makes of the job's events,
    ``: ping`` after ``ping_interval_s`` without a write, ``data: [DONE]`` at the job's end."""
    finished = False
    try:
        first = b"".join([codec.feed(event) for event in held])
        if first:
            yield first
        last_write = trio.current_time()
        # The keep-alive counts from the last write: events the codec drops (narration,
        # unless asked for) do not keep a client's connection alive.
        while (events := await job.receive_batch(last_write + state.ping_interval_s)) is not None:
            data = b"".join(codec.feed(event) for event in events)
            if data or not events:
                yield data or sse.encode_ping()
                last_write = trio.current_time()
        finished = True
        yield codec.close()
    finally:
        if finished:
            state.jobs.forget(job)
        else:
            _let_go(state, job)


async def _models(state: "QueenState") -> list[dict[str, Any]]:
    """The models usable across the nodes without starting anything: the catalogs of the
    running hives, and the embedded model (every rbee-hive has it)."""
    owners: dict[str, list[str]] = {}
    created: dict[str, int] = {}
    for hive in state.hives.running():
        listing: Any = None
        with trio.move_on_after(CATALOG_TIMEOUT_S):
            try:
                listing = await hive.request("GET", "/v1/models")
            except RbeeError:
                listing = None
        entries = listing.get("models", []) if isinstance(listing, dict) else []
        for entry in entries:
            reference = entry.get("reference") if isinstance(entry, dict) else None
            if not isinstance(reference, str):
                continue
            nodes = owners.setdefault(reference, [])
            if hive.node.name not in nodes:
                nodes.append(hive.node.name)
            when = _unix_seconds(entry.get("downloaded_at"))
            if when is not None:
                created[reference] = min(created.get(reference, when), when)
    embedded = owners.setdefault(EMBEDDED_ALIAS, [])
    embedded.extend(n.name for n in state.nodes.list() if n.name not in embedded)
    return [
        {"id": reference, "object": "model", "created": created.get(reference, 0),
         "owned_by": "rbee:" + ",".join(nodes)}
        for reference, nodes in sorted(owners.items())
    ]


def _unix_seconds(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None
