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

Every error is the envelope ``{"error": {"code", "message", "details"}}``, never a
traceback: unknown routes 404, wrong methods 405, bodies over ``MAX_BODY_BYTES`` 413.
With an API key, every route but ``/health`` needs ``Authorization: Bearer <key>``
(compared in constant time).
"""

from __future__ import annotations

import functools
import hmac
import json
import math
from typing import Any, AsyncIterator

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import AuthError, RbeeError
from ..http_common import sse_response
from ..narration import Error, Ready, narration_context, sse
from .inference import KEEPALIVE_SECONDS, SseBody, run_inference
from .narrator import Narrator
from .state import RETRY_AFTER_SECONDS, LoadingError, WorkerState
from .validation import check_fits_context, parse_inference_request

#: A prompt is text: 16 MiB is far beyond any context this worker holds.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Prompts longer than this are tokenized on a thread, so /health never waits on them.
TOKENIZE_INLINE_CHARS = 16 * 1024

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    400: "invalid_request",
}


def error_response(error: RbeeError, status: int | None = None) -> Response:
    """The JSON envelope of ``error`` with its status (and ``Retry-After`` for 503s)."""
    status = status or error.http_status
    response = Response(_dumps(error.envelope()), status=status, mimetype="application/json")
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if isinstance(error, AuthError):
        response.headers["WWW-Authenticate"] = 'Bearer realm="llm-worker-rbee"'
    return response


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status=status, mimetype="application/json")


def bearer_matches(header: str | None, key: str) -> bool:
    """True if ``header`` is ``Bearer <key>`` (constant-time comparison of the key)."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8"))


def create_app(state: WorkerState) -> QuartTrio:
    """The quart-trio application of one worker over its ``state``."""
    app = QuartTrio("rbee.worker")
    app.config["RESPONSE_TIMEOUT"] = None  # SSE streams are long; the job bounds them
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    say = Narrator(state.config.worker_id)
    api_key = state.config.api_key

    @app.before_request
    async def read_body_then_check_auth() -> Response | None:
        """Read the body, then answer 401 unless the bearer key matches (not /health)."""
        # The whole body is read before any answer: answering a keep-alive client while
        # its body is unread can leave the connection stuck for its next request
        # (seen with hypercorn 0.18). MAX_CONTENT_LENGTH bounds what this reads.
        await request.get_data()
        if api_key and request.path != "/health" and not bearer_matches(
            request.headers.get("Authorization"), api_key
        ):
            return error_response(AuthError(
                "this worker needs 'Authorization: Bearer <api key>' (the key it was started with)"
            ))
        return None

    @app.errorhandler(RbeeError)
    async def on_rbee_error(error: RbeeError) -> Response:
        """Our own errors: their envelope and status."""
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        """Routing and protocol errors (404, 405, 413 ...) in the same envelope."""
        status = error.code or 500
        code = _HTTP_CODES.get(status, f"http_{status}")
        message = error.description or error.name
        if status == 404:
            message = f"no route {request.method} {request.path} on this worker"
        elif status == 413:
            message = f"the request body is over {MAX_BODY_BYTES} bytes"
        return error_response(RbeeError(message, code=code), status)

    @app.errorhandler(Exception)
    async def on_bug(error: Exception) -> Response:
        """Anything else is a bug: narrated, and a 500 envelope without a traceback."""
        # A bug: the parent sees it narrated on stdout, the client gets the envelope.
        say("request_failed", f"{request.method} {request.path} failed: "
            f"{type(error).__name__}: {error}", level="error")
        return error_response(RbeeError(f"internal error: {type(error).__name__}: {error}"))

    @app.get("/health")
    async def health() -> Response:
        """Liveness: answers in every state, without auth."""
        return _json({"status": "ok", "worker_id": state.config.worker_id, "state": state.state})

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
        body = await request.get_data(as_text=False)  # already read (before_request)
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
        """Answer, then shut down as on SIGTERM."""
        say("shutdown_request", "Shutdown requested over HTTP")
        state.shutdown_requested.set()
        return _json({"shutting_down": True})

    return app


async def _progress_stream(state: WorkerState) -> AsyncIterator[bytes]:
    """``loading`` events as the load goes, then ``ready`` or ``error``, then ``[DONE]``."""
    last = None
    while True:
        changed = state.changed()
        if state.phase == "idle" and not state.stopping:
            # A stream that watched the load sees its last step (all layers) first.
            final = sse.encode(state.progress) if last is not None and state.progress != last else b""
            yield final + sse.encode(Ready(worker_id=state.config.worker_id, url=state.url)) + sse.encode_done()
            return
        if state.phase == "error" or state.stopping:
            failure = state.failure or LoadingError("the worker is shutting down", code="shutting_down")
            yield sse.encode(Error(code=failure.code, message=failure.message)) + sse.encode_done()
            return
        if state.progress != last:
            last = state.progress
            yield sse.encode(last)
            continue
        with trio.move_on_after(KEEPALIVE_SECONDS) as wait:
            await changed.wait()
        if wait.cancelled_caught:
            yield sse.encode_ping()

