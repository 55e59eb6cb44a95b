"""What the quart-trio apps of the hive, the queen and the worker share.

Each daemon keeps its own routes, auth and HTTP-error wording; this is the part that was
the same in all of them: how an SSE response is built, how an ``RbeeError`` leaves as the
JSON envelope, an app whose responses and bodies are not cut by Quart's timeouts, and the
hypercorn settings of the hive and the queen.
"""

from __future__ import annotations

from typing import Any, Mapping

from hypercorn.config import Config as HypercornConfig
from quart import Response
from quart_trio import QuartTrio

from .errors import RbeeError

#: No caching, and no buffering by a reverse proxy (nginx honours X-Accel-Buffering):
#: every event must reach the client when it is written.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(body: Any, headers: Mapping[str, str] | None = None) -> Response:
    """A 200 ``text/event-stream`` response streaming ``body`` (an async iterator of bytes).

    Its timeout is off: a stream lasts as long as its job or worker, which bound it.
    """
    response = Response(body, status=200, mimetype="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
    response.timeout = None
    return response


def streaming_app(name: str) -> QuartTrio:
    """A ``QuartTrio`` app with Quart's response and body timeouts off.

    Streams live as long as their job (a model download can take many minutes), and a
    hive's spawn waits for a download before it answers.
    """
    app = QuartTrio(name)
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None
    return app


def hypercorn_config(host: str, port: int, *, graceful_timeout_s: float) -> HypercornConfig:
    """Hypercorn bound to ``host:port``, silent (our narration says what happens), with
    keep-alive connections kept 75 s and ``graceful_timeout_s`` for open requests at stop."""
    hc = HypercornConfig()
    hc.bind = [f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = None
    hc.keep_alive_timeout = 75.0
    hc.graceful_timeout = graceful_timeout_s
    return hc


def error_answer(exc: RbeeError) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The answer of an ``RbeeError``: its envelope, its status and its headers."""
    headers = {}
    # A refusal that asks the client to come back says when (RFC 9110 Retry-After).
    retry_after = exc.details.get("retry_after") if isinstance(exc.details, dict) else None
    if exc.http_status == 503 and retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return exc.envelope(), exc.http_status, headers


def answer_rbee_errors_as_envelopes(app: QuartTrio) -> None:
    """Register the handler that turns any ``RbeeError`` into its envelope and status."""

    @app.errorhandler(RbeeError)
    async def rbee_error(exc: RbeeError) -> tuple[dict[str, Any], int, dict[str, str]]:
        return error_answer(exc)
