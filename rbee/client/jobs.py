"""Submit a job to a queen, stream its events, cancel it: the embeddable Trio job client.

``open_job_stream(queen_url, request)`` is the one call most programs need::

    async with open_job_stream("http://127.0.0.1:8080", {"operation": "infer", ...}) as job:
        async for event in job:
            ...

It submits the job and reads its SSE stream in one round trip (``POST /v2/tasks``; the
two-step ``POST /v1/jobs`` + ``GET /v1/jobs/{id}/stream`` is ``submit_job`` and any SSE
reader) through the narration codec and yields the typed events until ``[DONE]`` (which it does not
yield). Leaving the block before ``[DONE]`` (a ``break``, an exception, a cancellation)
cancels the job on the queen (``DELETE /v1/jobs/{id}``). Nothing here takes a timeout:
wrap the calls in ``trio.fail_after`` / ``trio.move_on_after``.

httpx runs on Trio through anyio; its own timeouts are switched off because a job stream may
stay quiet (keep-alive pings aside) for as long as a model download takes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

import httpx
import trio

from ..errors import JobError, NarrationError, QueenUnreachableError, RbeeError, error_for_code
from ..http_client import async_client
from ..narration import sse
from ..narration.events import Done, Event

#: How long a cleanup ``DELETE`` may take after the caller left (or was cancelled):
#: the caller is already on its way out, so this is a bound, not a policy.
CANCEL_GRACE_S = 2.0

@dataclass(frozen=True, slots=True)
class JobSubmission:
    """The queen's answer to a submitted job."""

    job_id: str
    sse_url: str


def error_from_response(response: httpx.Response) -> RbeeError:
    """The ``RbeeError`` of a non-2xx answer carrying rbee's JSON error envelope."""
    try:
        body = json.loads(response.content)
        err = body["error"]
        code, message, details = str(err["code"]), str(err["message"]), err.get("details")
    except (ValueError, KeyError, TypeError):
        text = response.content[:200].decode("utf-8", "replace")
        return JobError(f"{response.request.url} answered HTTP {response.status_code}: {text}")
    return error_for_code(code, message, details)


def auth_headers(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``token`` (none when no token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def open_http_client(base_url: str, token: str | None = None) -> httpx.AsyncClient:
    """An httpx client for one daemon: no timeouts (callers use Trio's), bearer auth, and
    TLS settings only for an ``https`` URL (see ``rbee.http_client``)."""
    return async_client(base_url, base_url=base_url.rstrip("/"), headers=auth_headers(token))


@contextlib.contextmanager
def _translate_transport_errors(queen_url: str, answered: Callable[[], bool] = lambda: False):
    """httpx's transport errors as one line: before the queen ``answered``, nothing
    listens there (and the fix is to start one); after, it went away mid-job."""
    try:
        yield
    except httpx.TransportError as exc:
        detail = f"{type(exc).__name__}: {exc or 'no detail'}"
        if answered():
            raise QueenUnreachableError(
                f"queen-rbee at {queen_url} went away in the middle of the job ({detail}); the job ended with it"
            ) from None
        raise QueenUnreachableError(
            f"queen-rbee at {queen_url} is not reachable ({detail});"
            " start one with `rbee-keeper queen start` or set RBEE_QUEEN_URL"
        ) from None


async def _submit(client: httpx.AsyncClient, queen_url: str, request: Mapping[str, Any]) -> JobSubmission:
    with _translate_transport_errors(queen_url):
        response = await client.post("/v1/jobs", json=dict(request))
    if response.status_code != 201:
        raise error_from_response(response)
    body = response.json()
    return JobSubmission(job_id=body["job_id"], sse_url=body["sse_url"])


async def submit_job(queen_url: str, request: Mapping[str, Any], *, token: str | None = None) -> JobSubmission:
    """Submit a job (``POST /v1/jobs``); returns its id and stream URL.

    The job runs on the queen whether or not anyone reads its stream; its events are kept
    until a client connects (ask for ``"detach": True`` if nobody will).
    """
    async with open_http_client(queen_url, token) as client:
        return await _submit(client, queen_url, request)


async def cancel_job(queen_url: str, job_id: str, *, token: str | None = None) -> bool:
    """Cancel a job (``DELETE /v1/jobs/{id}``); False when the queen does not know it."""
    async with open_http_client(queen_url, token) as client:
        with _translate_transport_errors(queen_url):
            response = await client.delete(f"/v1/jobs/{job_id}")
    if response.status_code == 404:
        return False
    if response.status_code >= 400:
        raise error_from_response(response)
    return True


async def iter_sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    """The typed events of an SSE response until ``[DONE]`` (not yielded).

    Raises ``NarrationError`` when the stream ends without ``[DONE]``: a stream that
    just stops means its producer went away, which must never look like success.
    """
    decoder = sse.Decoder()
    async for chunk in response.aiter_raw():
        for event in decoder.feed(chunk):
            if type(event) is Done:
                return
            yield event
    decoder.close()
    raise NarrationError(f"the stream from {response.request.url} ended without [DONE]")


class JobStream:
    """One submitted job and its event stream; iterate it for the typed events."""

    def __init__(self, job_id: str, sse_url: str, events: AsyncIterator[Event]) -> None:
        self.job_id = job_id
        self.sse_url = sse_url
        self.finished = False  # [DONE] was read: the job's nursery has ended on the queen
        self._events = events

    def __aiter__(self) -> "JobStream":
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise


@contextlib.asynccontextmanager
async def open_job_stream(
    queen_url: str, request: Mapping[str, Any], *, token: str | None = None
) -> AsyncIterator[JobStream]:
    """Submit ``request`` and yield a ``JobStream`` of its typed events until ``[DONE]``.

    It uses the queen's one-shot ``POST /v2/tasks`` (the job id comes in the
    ``X-Rbee-Job-Id`` header). Leaving the block before the stream ended cancels the job on the queen (a shielded
    ``DELETE``, bounded by ``CANCEL_GRACE_S``), so an abandoned job never keeps a worker.
    """
    async with open_http_client(queen_url, token) as client:
        # One round trip: the one-shot form answers with the stream, and names the job in
        # a header (what POST /v1/jobs + GET .../stream would take two round trips for).
        job_id: str | None = None
        stream: JobStream | None = None
        try:
            with _translate_transport_errors(queen_url, answered=lambda: job_id is not None):
                async with client.stream("POST", "/v2/tasks", json=dict(request)) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise error_from_response(response)
                    job_id = response.headers["X-Rbee-Job-Id"]
                    stream = JobStream(job_id, f"/v1/jobs/{job_id}/stream", iter_sse_events(response))
                    try:
                        yield stream
                    finally:
                        await stream._events.aclose()
        finally:
            if job_id is not None and (stream is None or not stream.finished):
                # Shielded: we are often here *because* of a cancellation (Ctrl-C).
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
                    with contextlib.suppress(httpx.TransportError):
                        await client.delete(f"/v1/jobs/{job_id}")
