"""Run one job from the shell: find or start a queen, stream the job, handle Ctrl-C.

Ctrl-C policy (the DESIGN's cascade):
- first SIGINT: cancel the job scope. Leaving ``open_job_stream`` early sends
  ``DELETE /v1/jobs/{id}`` (the queen cancels the job, which ``DELETE``s the inference on
  the worker: decode stops within one token). We print ``Cancelled.`` and exit 130. An
  ephemeral queen gets SIGTERM and shuts its hives and workers down after we are gone
  (we wait for it only briefly, so that the exit stays within a second);
- second SIGINT: SIGKILL the ephemeral queen (its hives still get SIGTERM through
  PR_SET_PDEATHSIG) and exit 130 at once.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import trio

from ..client import open_job_stream
from ..errors import RbeeError, single_cause
from ..narration.events import End, Error, NarrationEvent, Token
from .exit_codes import EXIT_CANCELLED, EXIT_JOB_FAILED, EXIT_OK
from .output import Output
from .queen_control import EphemeralQueen, api_token, find_queen

#: After a Ctrl-C, how long we let an ephemeral queen finish before we exit anyway
#: (it goes on shutting its cascade down without us).
CANCEL_EXIT_WAIT_S = 0.2


class _JobOutcome:
    def __init__(self) -> None:
        self.end: End | None = None
        self.error: Error | None = None
        self.first_token_s: float | None = None
        self.tokens = 0
        #: Where the job ran: the node and worker the queen's narration named last.
        self.node: str | None = None
        self.worker_id: str | None = None


async def _stream(url: str, request: dict[str, Any], out: Output, outcome: _JobOutcome, started: float) -> None:
    operation = request.get("operation", "infer")
    out.narrate("job_submit", f"Submitting {operation} job to queen-rbee at {url}", target=operation,
                cute=f"Buzzing off to the queen with your {operation} job! 👑",
                story=f"The keeper carried the {operation} request to the queen, who held court at {url}.")
    async with open_job_stream(url, request, token=api_token()) as job:
        async for event in job:
            kind = type(event)
            if kind is Token:
                if outcome.first_token_s is None:
                    outcome.first_token_s = time.monotonic() - started
                outcome.tokens += 1
                out.token(event.t)
                continue
            if kind is End:
                outcome.end = event
            elif kind is Error:
                outcome.error = event
                continue  # said once, at the end: "Failed: infer — <cause>"
            elif kind is NarrationEvent and event.node and event.worker_id:
                outcome.node, outcome.worker_id = event.node, event.worker_id  # the summary says where
            out.event(event)


async def run_job(request: dict[str, Any], out: Output) -> int:
    """Run ``request`` to the end on a queen; returns the process exit code."""
    started = time.monotonic()
    outcome = _JobOutcome()
    queen: EphemeralQueen | None = None
    cancelled = False
    said_cancelled = False
    with trio.open_signal_receiver(signal.SIGINT) as sigint:
        async with trio.open_nursery() as nursery:
            job_scope = trio.CancelScope()

            async def watch_ctrl_c() -> None:
                nonlocal cancelled
                async for _ in sigint:
                    if cancelled:  # the second Ctrl-C: end what is left, now
                        if queen is not None:
                            queen.kill()
                        if not said_cancelled:
                            out.line("Cancelled.")
                        os._exit(EXIT_CANCELLED)
                    cancelled = True
                    job_scope.cancel()

            nursery.start_soon(watch_ctrl_c)
            code = EXIT_OK
            with job_scope:
                try:
                    url = await find_queen()
                    if url is None:
                        queen = await EphemeralQueen.start(nursery, out.event)
                        url = queen.url
                        queen.mute(True)
                    await _stream(url, request, out, outcome, started)
                except Exception as exc:
                    cause = single_cause(exc)  # a nursery's group: its one cause, never the group's text
                    if not isinstance(cause, RbeeError):
                        raise
                    out.end_text()
                    operation = request.get("operation", "infer")
                    out.narrate("job_complete", f"Failed: {operation} — {cause.message}", level="error",
                                target=operation, error_code=cause.code)
                    code = EXIT_JOB_FAILED
            out.end_text()
            if cancelled:
                out.line("Cancelled.")
                said_cancelled = True
                code = EXIT_CANCELLED
            else:
                if code == EXIT_OK:
                    code = _report(request, out, outcome, time.monotonic() - started)
            if queen is not None:
                queen.mute(False)  # show the cascade shutting down
                if cancelled:
                    queen.terminate()
                    with trio.move_on_after(CANCEL_EXIT_WAIT_S):
                        await queen.child.wait()
                else:
                    await queen.shutdown()
            nursery.cancel_scope.cancel()
    return code


def _failure(operation: str, outcome: _JobOutcome) -> str | None:
    """Why the job did not deliver its whole answer, or None when it did.

    Exit 0 means the whole answer arrived: an ``error`` event, a stream that ended without
    ``end``, or an ``end`` stopped as ``cancelled`` (someone else cancelled it: this
    keeper's own Ctrl-C never gets here) is a failure, whatever came before it.
    """
    if outcome.error is not None:
        return outcome.error.message
    if operation != "infer":
        return None
    if outcome.end is None:
        return f"the answer stopped after {outcome.tokens} tokens without an end (the stream was cut)"
    if outcome.end.stop_reason == "cancelled":
        return f"the job was cancelled by someone else after {outcome.end.tokens_out} tokens"
    return None


def _report(request: dict[str, Any], out: Output, outcome: _JobOutcome, elapsed_s: float) -> int:
    operation = request.get("operation", "infer")
    failure = _failure(operation, outcome)
    if failure is not None:
        # The partial answer stays on stdout; stderr says it is not the whole one.
        code = outcome.error.code if outcome.error is not None else None
        out.narrate("job_complete", f"Failed: {operation} — {failure}", level="error", target=operation,
                    error_code=code)
        return EXIT_JOB_FAILED
    if operation != "infer":
        out.narrate("job_complete", f"Complete: {operation}", target=operation,
                    cute=f"{operation.capitalize()} done! 🍯", story=f"And so the {operation} was done.")
        return EXIT_OK
    _summary(out, outcome, elapsed_s)
    return EXIT_OK


def _summary(out: Output, outcome: _JobOutcome, elapsed_s: float) -> None:
    """The one line that ends an infer: what came, how fast, where it ran.

    It says what the worker's ``inference_complete`` and the queen's ``infer_complete``
    say too; the keeper folds those into it (``Output``).
    """
    end = outcome.end
    tokens = end.tokens_out if end else outcome.tokens
    rate = end.tokens_per_sec if end else 0.0
    first_ms = round(outcome.first_token_s * 1000) if outcome.first_token_s is not None else None
    ttft = f", first token after {first_ms} ms" if first_ms is not None else ""
    where = ""
    if outcome.node and outcome.worker_id:
        where = f" on {outcome.node} by {outcome.worker_id}"
    # An answer cut by the limit is complete, but the user may want more of it.
    cut = "; stopped at --max-tokens" if end is not None and end.stop_reason == "max_tokens" else ""
    out.narrate(
        "job_complete",
        f"Complete: infer — {tokens} tokens, {rate:.1f} tok/s{ttft} ({elapsed_s:.2f} s in all){where}{cut}",
        target="infer",
        cute=f"All done: {tokens} tokens at {rate:.1f} tok/s{where}! 🍯",
        story=(f"And so the answer was told: {tokens} tokens at {rate:.1f} tok/s"
               + (f", spun by {outcome.worker_id} on {outcome.node}" if where else "")
               + ", and the keeper went home."),
        tokens_out=tokens,
        tokens_per_sec=round(rate, 2),
        first_token_ms=first_ms,
        elapsed_ms=round(elapsed_s * 1000),
        node=outcome.node,
        worker_id=outcome.worker_id,
        stop_reason=end.stop_reason if end is not None else None,
    )
