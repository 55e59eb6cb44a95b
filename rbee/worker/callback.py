"""The ready callback: telling the parent (the hive) that this worker takes requests.

``POST <callback_url>`` with ``{worker_id, url, model_ref, backend, device}`` and, when the
worker has an API key, ``Authorization: Bearer <key>`` (the parent minted the key, so it
proves the caller is the worker it spawned). Retried with exponential backoff (0.1 s
doubling up to 2 s, for ``CALLBACK_PATIENCE`` seconds in all) because the parent may be
busy or restarting its listener; an answer that cannot change by waiting (400, 401, 403,
405, 422: a bad body or a wrong key) ends the retries at once. A worker whose callback
never succeeds is unknown to its parent and would only hold memory: the caller exits.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from ..errors import CallbackError
from ..http_client import async_client
from .narrator import Narrator

SECONDS = 1.0
FIRST_DELAY = 0.1 * SECONDS
MAX_DELAY = 2 * SECONDS
#: Total time spent trying before giving up.
CALLBACK_PATIENCE = 30 * SECONDS
#: Time one attempt may take (connect, send, answer).
ATTEMPT_LIMIT = 5 * SECONDS
#: Answers that no retry can turn into a success.
PERMANENT_STATUSES = frozenset({400, 401, 403, 405, 422})



def callback_body(
    *, worker_id: str, url: str, model_ref: str, backend: str, device: int
) -> dict[str, Any]:
    """The JSON body of the ready callback (DESIGN.md)."""
    return {"worker_id": worker_id, "url": url, "model_ref": model_ref,
            "backend": backend, "device": device}


async def post_ready_callback(
    callback_url: str, body: dict[str, Any], *, api_key: str | None, say: Narrator
) -> None:
    """POST ``body`` to ``callback_url`` until it answers 2xx; ``CallbackError`` if never.

    Narrates ``callback_ready`` on success, ``callback_retry`` (debug) per failed attempt.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = trio.current_time() + CALLBACK_PATIENCE
    delay = FIRST_DELAY
    attempt = 0
    async with async_client(callback_url) as client:
        while True:
            attempt += 1
            problem, permanent = await _attempt(client, callback_url, body, headers)
            if problem is None:
                say("callback_ready", f"Told {callback_url} that this worker is ready",
                    target=callback_url, attempts=attempt, cute="Ready to buzz! 🐝",
                    story="The worker told its hive that it was ready for work.")
                return
            if permanent or trio.current_time() + delay > deadline:
                say("callback_failed",
                    f"Ready callback to {callback_url} failed after {attempt} attempt(s): {problem}",
                    level="error", target=callback_url, attempts=attempt)
                raise CallbackError(
                    f"ready callback to {callback_url} failed after {attempt} attempt(s): {problem}",
                    details={"callback_url": callback_url, "attempts": attempt},
                )
            say("callback_retry", f"Ready callback attempt {attempt} failed ({problem}); "
                f"retrying in {delay:g} s", level="debug", target=callback_url, attempts=attempt)
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)


async def _attempt(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[str | None, bool]:
    """One POST: ``(None, False)`` on success, else ``(problem, permanent)``."""
    with trio.move_on_after(ATTEMPT_LIMIT):
        try:
            response = await client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": "), False
        if response.is_success:
            return None, False
        text = response.text.strip().replace("\n", " ")[:200]
        return f"HTTP {response.status_code} {text}".strip(), response.status_code in PERMANENT_STATUSES
    return f"no answer within {ATTEMPT_LIMIT:g} s", False
