"""What the quart-trio apps of the hive, the queen and the worker share.

Each daemon keeps its own routes; this is the edge they share: the bearer check, the
handlers that turn every error (ours, Werkzeug's 4xx, a bug) into the one JSON envelope,
the one way a request body is read (``request_body``, ``json_body``: whole, bounded in size
and in patience, strict JSON), how an SSE response is built, an app whose responses are not
cut by Quart's timeouts, and the server's limits (``hypercorn_config``).

Limits, and where each is enforced (docs/http-edge.md tells the why of each figure):

- a body larger than ``MAX_BODY_BYTES``: 413 (Quart counts it, before and while reading);
- a body that stops arriving for ``BODY_IDLE_TIMEOUT_S``: 408, and the connection closes;
- a request line and header fields over ``MAX_HEADER_BYTES``: 431 (our check, here); a head
  still incomplete past ``H11_MAX_INCOMPLETE_BYTES`` never reaches the app: hypercorn
  answers a bare 431 itself and closes;
- ``Connection: close`` is honoured, and an idle keep-alive connection is closed after
  ``KEEP_ALIVE_TIMEOUT_S`` (both needed ``_complete_responses_shielded``).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Mapping

import trio
from hypercorn.config import Config as HypercornConfig
from quart import Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .errors import (
    AuthError,
    HeadersTooLargeError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RbeeError,
    RequestTimeoutError,
    UnavailableError,
    single_cause,
)
from .requests import parse_json_object

#: The largest request body a daemon reads: a prompt is text, and 16 MiB is far beyond
#: any context a worker holds (the worker refuses a prompt by its size before that).
#: The queen takes no more than its workers, so it never forwards what they would refuse.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: A body that stops arriving for this long is given up (408): a half-sent body must not
#: hold a connection and a request task. Per chunk, not in total: a large body on a slow
#: link keeps going as long as bytes come.
BODY_IDLE_TIMEOUT_S = 5.0
#: An idle keep-alive connection is closed after this long. Longer than httpx's 5 s pool
#: expiry, so that our own clients let an idle connection go before the server does (never
#: a request sent on a connection the server is closing).
KEEP_ALIVE_TIMEOUT_S = 10.0
#: The request line and header fields a daemon takes (a bearer token and a few headers
#: are well under 1 KiB; nginx's default is 8 KiB per line); more: 431.
MAX_HEADER_BYTES = 16 * 1024
#: What h11 buffers of a request head that has not ended yet; beyond it hypercorn answers
#: 431 itself, without our envelope. Larger than MAX_HEADER_BYTES, so that a head between
#: the two still reaches the app and gets the envelope.
H11_MAX_INCOMPLETE_BYTES = 64 * 1024

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
    """The ``QuartTrio`` app of a daemon: Quart's response timeout off, bodies up to
    ``MAX_BODY_BYTES``, and every response completed shielded (``_complete_responses_shielded``).

    Streams live as long as their job (a model download can take many minutes), and a
    hive's spawn waits for a download before it answers. Quart's body timeout (a total)
    is off too: ``request_body`` gives up on a body that stops arriving instead.
    """
    app = QuartTrio(name, static_folder=None)  # no /static route: nothing is served from disk
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.asgi_app = _complete_responses_shielded(app.asgi_app)  # type: ignore[method-assign]
    return app


def _complete_responses_shielded(asgi_app: Any) -> Any:
    """``asgi_app`` with the last send of each HTTP response shielded from cancellation.

    Why (hypercorn 0.18 with quart-trio 0.12): the send that ends a response runs, in the
    app's own task, hypercorn's end of the exchange: close the socket (``Connection:
    close``, or a request whose body was not read) or start the keep-alive timer. Within
    that same call hypercorn tells the app the exchange is over (``http.disconnect``), and
    quart-trio cancels the app's task on it, so the close (or the timer) was cancelled at
    its first checkpoint: sockets stayed open until the client gave up. The work shielded
    is short: hypercorn already shields its socket writes.
    """

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return

        async def send_completing_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await asgi_app(scope, receive, send_completing_shielded)

    return app


def hypercorn_config(host: str, port: int, *, graceful_timeout_s: float) -> HypercornConfig:
    """Hypercorn bound to ``host:port`` (an IPv6 host in brackets) with rbee's limits: idle
    keep-alive connections closed after ``KEEP_ALIVE_TIMEOUT_S``, request heads bounded by
    ``H11_MAX_INCOMPLETE_BYTES``, ``graceful_timeout_s`` for open requests at stop. No access
    log and only hypercorn's warnings (our narration says what happens).

    No ``read_timeout``: hypercorn applies it to every read of the connection, also while
    the server streams an SSE response and the client, rightly, sends nothing.
    """
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.loglevel = "WARNING"
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    hc.h11_max_incomplete_size = H11_MAX_INCOMPLETE_BYTES
    hc.graceful_timeout = graceful_timeout_s
    return hc


def _check_header_size() -> None:
    """``HeadersTooLargeError`` (431) when the request line and fields exceed ``MAX_HEADER_BYTES``."""
    scope = request.scope
    size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + len(request.method) + 12
    size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
    if size > MAX_HEADER_BYTES:
        raise HeadersTooLargeError(f"the request line and header fields are {size} bytes; "
                                   f"this daemon takes at most {MAX_HEADER_BYTES}")


async def request_body() -> bytes:
    """The whole body of the current request, read once (a later call returns it again).
    Every route reads its body through this: it consumes Quart's body stream, after which
    Quart's own ``get_data``/``get_json`` would see an empty body.

    ``PayloadTooLargeError`` (413) past ``MAX_CONTENT_LENGTH`` (Werkzeug's 413, turned into
    the envelope by ``install_error_edge``); ``RequestTimeoutError`` (408) when no byte
    came for ``BODY_IDLE_TIMEOUT_S``.
    """
    cached = g.get("rbee_body")
    if cached is not None:
        return cached
    chunks = []
    body = request.body
    while True:
        with trio.move_on_after(BODY_IDLE_TIMEOUT_S) as waiting:
            try:
                chunks.append(await body.__anext__())
            except StopAsyncIteration:
                break
        if waiting.cancelled_caught:
            got = sum(map(len, chunks))
            expected = f" of {request.content_length}" if request.content_length is not None else ""
            raise RequestTimeoutError(f"the request body stopped arriving: {got}{expected} bytes came, then "
                                      f"nothing for {BODY_IDLE_TIMEOUT_S:g} s")
    g.rbee_body = b"".join(chunks)
    return g.rbee_body


async def json_body(*, required: bool = True) -> dict[str, Any]:
    """The JSON object of the current request's body: every JSON route of the daemons
    reads its body through this (``request_body``, then ``rbee.requests.parse_json_object``:
    400 for an empty body when ``required`` (else ``{}``), bytes that are not UTF-8, JSON
    nested too deep, NaN or Infinity, or anything but an object)."""
    return parse_json_object(await request_body(), required=required)


def model_query() -> str:
    """The ``?model=REF`` of the current request (the model routes that take no body:
    ``DELETE /v1/models`` on the hive, ``DELETE /v1/nodes/{name}/models`` on the queen):
    exactly one, not blank; else 400 naming the field."""
    given = request.args.getlist("model")
    if len(given) != 1 or not given[0].strip():
        why = "given more than once" if len(given) > 1 else "required"
        raise InvalidRequestError(
            f"the query parameter model is {why}: ?model=REFERENCE (e.g. ?model=gemma3-270m)",
            details=[{"field": "model", "constraint": "one non-empty string", "message": f"model is {why}"}],
        )
    return given[0].strip()


def bearer_matches(header: str | None, token: str) -> bool:
    """``header`` is ``Bearer <token>``: the scheme in any case (RFC 9110 says schemes are
    case-insensitive), the token compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


def check_bearer(token: str | None, header: str | None, *, hint: str) -> None:
    """``AuthError`` (with ``hint``: where the token comes from) unless ``token`` is None
    or ``header`` carries it."""
    if token is not None and not bearer_matches(header, token):
        raise AuthError(f"missing or wrong bearer token ({hint})")


def error_answer(exc: RbeeError, *, retry_after_s: int | None = None) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The answer of an ``RbeeError``: its envelope, its status and its headers.

    A refusal that asks the client to come back says when (RFC 9110 Retry-After): the
    error's ``details.retry_after``, else ``retry_after_s`` for a daemon that always knows.
    """
    headers = {}
    retry_after = exc.details.get("retry_after") if isinstance(exc.details, dict) else None
    if retry_after is None and isinstance(exc, UnavailableError):
        retry_after = retry_after_s
    if exc.http_status == 503 and retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return exc.envelope(), exc.http_status, headers


def error_response(exc: RbeeError, *, retry_after_s: int | None = None) -> Response:
    """``error_answer`` as a Quart ``Response`` (for hooks that return one)."""
    body, status, headers = error_answer(exc, retry_after_s=retry_after_s)
    return Response(json.dumps(body, ensure_ascii=False), status=status, headers=headers,
                    mimetype="application/json")


#: Werkzeug's routing and protocol errors as our classes (the class decides the code).
_HTTP_ERRORS: dict[int, type[RbeeError]] = {
    400: InvalidRequestError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    408: RequestTimeoutError,
    413: PayloadTooLargeError,
    431: HeadersTooLargeError,
}


def install_error_edge(app: QuartTrio, daemon: str, *, on_bug: Callable[[BaseException], None] | None = None,
                       retry_after_s: int | None = None) -> None:
    """Register the handlers that make every error answer of ``app`` the JSON envelope:
    ``RbeeError`` with its own class's status; Werkzeug's 4xx (404, 405, 413, 431 ...) as
    the class of their status; anything else a bug: ``InternalError`` (503, never 500),
    its one-line cause given to ``on_bug`` (the daemon's log or narration), no traceback
    to the client.

    And the first ``before_request`` of every request: the header size check (431), then
    the whole body read (``request_body``: 413, 408) before any route or check answers. An
    answer given while the client still sends its body would be followed by a close with
    unread bytes, which the kernel turns into a reset that can destroy the answer on its
    way; and a 401 or 404 should not depend on how the body was sent.
    """

    @app.before_request
    async def read_the_request() -> None:
        _check_header_size()
        await request_body()

    @app.errorhandler(RbeeError)
    async def rbee_error(exc: RbeeError) -> Response:
        return error_response(exc, retry_after_s=retry_after_s)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 400
        cls = _HTTP_ERRORS.get(status, InvalidRequestError)  # any other 4xx: a bad request
        if status == 404:
            message = f"no route {request.method} {request.path} on {daemon}"
        elif status == 405:
            message = f"{request.path} on {daemon} does not take {request.method}"
        elif status == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH") or MAX_BODY_BYTES
            message = f"the request body is larger than {limit // 1048576} MiB ({limit} bytes), the most {daemon} takes"
        else:
            message = f"{request.method} {request.path}: {exc.description or exc.name}"
        if status >= 500:  # Werkzeug raises none of these on its own; a bug if it does
            cls = InternalError
        return error_response(cls(message))

    @app.errorhandler(Exception)
    async def bug(exc: Exception) -> Response:
        exc = single_cause(exc)
        if isinstance(exc, RbeeError):
            return error_response(exc, retry_after_s=retry_after_s)
        if on_bug is not None:
            on_bug(exc)
        return error_response(InternalError(f"{daemon} bug: {type(exc).__name__}: {exc}"))
