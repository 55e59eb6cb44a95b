"""The worker's HTTP routes (quart-trio), exactly those of DESIGN.md's Worker section.

- ``GET /health``: always answers (no auth), also while loading.
- ``GET /v1/ready``: ``{ready, state: loading|idle|busy|full|error, slots: {total, busy}}``.
- ``GET /v1/loading/progress``: SSE, ``loading`` events then ``ready`` (or ``error``),
  then ``[DONE]``; once loaded, just ``ready`` and ``[DONE]``.
- ``POST /v1/inference``: SSE of one generation (see ``rbee.worker.inference``); 400 for a
  bad body, 409 when its ``job_id`` already runs here, 503 + ``Retry-After`` while
  loading (``loading``) or when every slot is busy (``full``).
- ``DELETE /v1/inference/{job_id}``: cancel that stream alone; 200 whether or not it runs
  (idempotent).
- ``POST /v1/shutdown``: 200, then the worker stops (as on SIGTERM).

Every error is the envelope ``{"error": {"code", "message", "details", "type", "param"}}``, never a
traceback: unknown routes 404, wrong methods 405, bodies over ``MAX_BODY_BYTES`` 413.
With an API key, every route but ``/health`` and ``/openapi.json`` (the OpenAPI 3.1
document, ``rbee.openapi``) needs ``Authorization: Bearer <key>``
(compared in constant time).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, AsyncIterator

import trio
from quart import Response, request
from quart_trio import QuartTrio

from ..http_common import (
    check_bearer,
    install_error_edge,
    json_body,
    request_body,
    sse_response,
    streaming_app,
)
from ..narration import Error, Ready, narration_context, sse
from ..openapi import OPENAPI_PATH, WORKER, served_document
from .inference import KEEPALIVE_SECONDS, SseBody, run_inference
from .narrator import Narrator
from ..errors import ShuttingDownError
from .state import RETRY_AFTER_SECONDS, WorkerState
from .validation import check_fits_context, parse_inference_request

#: The routes anyone may call, also when the worker has an API key.
OPEN_PATHS = frozenset({"/health", OPENAPI_PATH})
#: Prompts longer than this are tokenized on a thread, so /health never waits on them.
TOKENIZE_INLINE_CHARS = 16 * 1024

def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status=status, mimetype="application/json")


def create_app(state: WorkerState) -> QuartTrio:
    """The quart-trio application of one worker over its ``state``."""
    # SSE streams are long (the job bounds them); bodies up to MAX_BODY_BYTES.
    app = streaming_app("rbee.worker")
    say = Narrator(state.config.worker_id)
    api_key = state.config.api_key

    def on_bug(error: BaseException) -> None:
        # A bug: the parent sees it narrated on stdout, the client gets the envelope.
        say("request_failed", f"{request.method} {request.path} failed: "
            f"{type(error).__name__}: {error}", level="error")

    install_error_edge(app, "llm-worker-rbee", on_bug=on_bug, retry_after_s=RETRY_AFTER_SECONDS)

    @app.before_request
    async def check_auth() -> Response | None:
        """Answer 401 unless the bearer key matches (not the open routes). The edge has
        read the whole body already (``install_error_edge``)."""
        if api_key and request.path not in OPEN_PATHS:
            check_bearer(api_key, request.headers.get("Authorization"), hint="the api key this worker was started with")
        return None

    @app.get("/health")
    async def health() -> Response:
        """Liveness: answers in every state, without auth."""
        return _json({"status": "ok", "worker_id": state.config.worker_id, "state": state.state})

    @app.get(OPENAPI_PATH)
    async def openapi_document() -> Response:
        """This worker's OpenAPI 3.1 document, without auth (it holds nothing secret)."""
        return _json(served_document(WORKER, app.url_map))

    @app.get("/v1/ready")
    async def ready() -> Response:
        """``{ready, state, slots}``."""
        return _json(state.ready_body())

    @app.get("/v1/loading/progress")
    async def loading_progress() -> Response:
        """SSE of the model load."""
        return sse_response(_progress_stream(state))

    @app.post("/v1/inference")
    async def inference() -> Response:
        """Validate, take the slot, open the generation, answer with its SSE stream."""
        body = await request_body()  # parsed strictly by parse_inference_request
        state.check_can_serve()
        engine = state.engine
        req = parse_inference_request(body, n_ctx=engine.n_ctx)
        if req.grammar is not None:
            # A 400 before any stream: llama.cpp parses it again when the request starts.
            engine.check_grammar(req.grammar, field="response_format")
        job = await state.reserve(req.job_id)
        try:
            count = functools.partial(engine.count_tokens, req.source, chat=req.chat)
            if req.prompt_chars > TOKENIZE_INLINE_CHARS:
                prompt_tokens = await trio.to_thread.run_sync(count)
            else:
                prompt_tokens = count()
            check_fits_context(req, prompt_tokens, engine.n_ctx)
            send, receive = trio.open_memory_channel(math.inf)
            await state.nursery.start(run_inference, state, job, req, prompt_tokens, send)
        except BaseException:
            job.cancel()
            state.release(job)
            raise
        return sse_response(SseBody(receive, job, state.config.worker_id))

    @app.delete("/v1/inference/<job_id>")
    async def cancel_inference(job_id: str) -> Response:
        """Cancel ``job_id`` if it runs; 200 in any case."""
        job = state.jobs.get(job_id)
        cancelled = job is not None and not job.cancelled
        if cancelled:
            # Into the job's own stream: its client sees why it ends, and at which token.
            with narration_context(job_id=job_id, sink=job.sink):
                say("cancel_request", f"Cancelling job {job_id} at token {job.tokens_out}",
                    target=job_id, tokens_out=job.tokens_out)
            job.cancel()
        return _json({"job_id": job_id, "cancelled": cancelled})

    @app.post("/v1/shutdown")
    async def shutdown() -> Response:
        """Answer, then shut down as on SIGTERM. The body may say why (``{"reason"}``, as
        the hive does): a running job's stream ends with that reason."""
        body = await json_body(required=False)
        reason = body.get("reason")
        why = f" ({reason})" if isinstance(reason, str) and reason else ""
        say("shutdown_request", f"Shutdown requested over HTTP{why}")
        state.request_shutdown(ShuttingDownError(
            f"worker {state.config.worker_id} was stopped by its hive{why} in the middle of the job"))
        return _json({"shutting_down": True})

    return app


async def _progress_stream(state: WorkerState) -> AsyncIterator[bytes]:
    """``loading`` events as the load goes, then ``ready`` or ``error``, then ``[DONE]``.

    A stream that comes during the load starts at its latest step and then gets every
    later one (the 10% steps); one that comes after it gets just ``ready``.
    """
    steps = state.progress_steps
    sent = len(steps) if state.phase != "loading" else len(steps) - 1
    while True:
        changed = state.changed()
        # Every step not sent yet, the last one (all layers) included, before the outcome.
        pending = b"".join(sse.encode(step) for step in steps[sent:])
        sent = len(steps)
        if state.phase == "idle" and not state.stopping:
            yield pending + sse.encode(Ready(worker_id=state.config.worker_id, url=state.url)) + sse.encode_done()
            return
        if state.phase == "error" or state.stopping:
            failure = state.failure or ShuttingDownError("the worker is shutting down")
            yield pending + sse.encode(Error(code=failure.code, message=failure.message)) + sse.encode_done()
            return
        if pending:
            yield pending
            continue
        with trio.move_on_after(KEEPALIVE_SECONDS) as wait:
            await changed.wait()
        if wait.cancelled_caught:
            yield sse.encode_ping()

