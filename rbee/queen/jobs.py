"""Jobs: each one runs in its own cancel scope in the queen's job nursery, and its events
go into one unbounded memory channel that the job's SSE stream reads.

Why unbounded: a job's events are produced whether or not its client has connected yet
(``POST /v1/jobs`` answers before anyone reads), and they must all be kept for it; a job
produces at most a few thousand events, and ``narrate()`` needs a sink that never blocks.

Lifetime rules:
- The stream ends (``[DONE]``) exactly when the job's task ended: the send side of the
  channel is closed by ``async with`` at the end of the task, never on a quiet period.
- A failure becomes ``execute_error`` narration plus one ``error`` event, then ``[DONE]``.
- A cancelled job (``DELETE``, the client went away, queen shutdown) narrates
  ``execute_cancelled`` and sends ``error {code: "cancelled"}``.
- A job whose stream was never read is forgotten ``RETENTION_S`` after it ended.
"""

from __future__ import annotations

import math
import secrets
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from ..errors import BusyError, InternalError, JobCancelledError, NotFoundError, RbeeError, single_cause
from ..narration import narrate, narration_context
from ..narration.events import Error, Event

ACTOR = "queen-rbee"
RETENTION_S = 600.0


@dataclass
class Job:
    """One job: its request, its event channel and its cancel scope."""

    job_id: str
    operation: str
    request: dict[str, Any]
    detach: bool = False
    state: str = "queued"  # queued | running | completed | failed | cancelled
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)
    stream_taken: bool = False
    #: The typed request (``InferRequest`` for ``infer``), checked before the job existed.
    spec: Any = None

    def __post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Event](math.inf)

    def sink(self, event: Event) -> None:
        """Put one event into the job's stream (never blocks; the buffer is unbounded)."""
        self.send.send_nowait(event)

    async def receive_batch(self, deadline: float) -> list[Event] | None:
        """The next events of the stream: the first one to come and whatever else is ready
        with it (tokens come in bursts: one write for all); ``[]`` when none came by
        ``deadline`` (time for a keep-alive), ``None`` once the stream has ended."""
        batch: list[Event] = []
        with trio.move_on_at(deadline):
            try:
                batch.append(await self.receive.receive())
            except trio.EndOfChannel:
                return None
            while True:
                try:
                    batch.append(self.receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
        return batch

    def cancel(self) -> None:
        """Cancel the job's task (idempotent); its stream then ends with ``[DONE]``."""
        self.cancel_scope.cancel()

    def public(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs`` shows it."""
        return {"job_id": self.job_id, "operation": self.operation, "state": self.state, "detach": self.detach}


JobRunner = Callable[[Job], Awaitable[None]]


def new_job_id() -> str:
    """A fresh, unguessable job id."""
    return "job-" + secrets.token_hex(8)


class JobRegistry:
    """The queen's jobs, each running in the job nursery."""

    def __init__(self, nursery: trio.Nursery, on_finished: Callable[[Job], None] | None = None) -> None:
        self._nursery = nursery
        self._jobs: dict[str, Job] = {}
        self._on_finished = on_finished
        #: Why jobs are being cancelled wholesale (the queen's stop after its grace
        #: period), told to each; None: a job cancelled alone (DELETE, client gone).
        self.stop_reason: str | None = None

    def submit(
        self,
        operation: str,
        request: dict[str, Any],
        runner: JobRunner,
        *,
        detach: bool = False,
        spec: Any = None,
        admit: Callable[[str], None] | None = None,
    ) -> Job:
        """Create a job, narrate ``job_create`` into it and start ``runner(job)``.

        ``admit(job_id)`` runs first and may refuse the job (a full queue) by raising:
        then nothing was created.
        """
        job = Job(new_job_id(), operation, request, detach=detach, spec=spec)
        if admit is not None:
            admit(job.job_id)
        self._jobs[job.job_id] = job
        with narration_context(job_id=job.job_id, sink=job.sink):
            what = (f" of {request.get('model')}" if request.get("model") else "") + (
                f" on node {request.get('node')}" if request.get("node") else "")
            narrate(
                ACTOR,
                "job_create",
                f"Job {job.job_id} created: {operation}{what}",
                target=job.job_id,
                cute=f"New job for the hive: {operation}{what}! 📋🐝",
                story=f"A request reached the queen: {operation}{what}. She named it {job.job_id}.",
            )
            self._nursery.start_soon(self._run, job, runner)
        return job

    def get(self, job_id: str) -> Job:
        """The job ``job_id``; ``NotFoundError`` when unknown (or long finished)."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r} on this queen (finished jobs are kept {RETENTION_S:.0f} s)")
        return job

    def find(self, job_id: str) -> Job | None:
        """The job ``job_id`` if the queen still knows it."""
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        """Every job the queen still knows."""
        return list(self._jobs.values())

    def take_stream(self, job_id: str) -> Job:
        """Claim the job's one stream reader; ``BusyError`` if someone reads it already."""
        job = self.get(job_id)
        if job.stream_taken:
            raise BusyError(f"job {job_id} is already being streamed by another client")
        job.stream_taken = True
        return job

    def forget(self, job: Job) -> None:
        """Drop a finished job whose stream has been read to the end."""
        self._jobs.pop(job.job_id, None)

    async def _run(self, job: Job, runner: JobRunner) -> None:
        # The job's context (job_id + sink) is inherited from submit(): Trio copies the
        # context into the new task, so every narrate() below lands in the job's stream.
        async with job.send:
            job.state = "running"
            try:
                with job.cancel_scope:
                    try:
                        await runner(job)
                    except trio.Cancelled:
                        job.state = "cancelled"
                        why = self.stop_reason or f"job {job.job_id} was cancelled"
                        narrate(ACTOR, "execute_cancelled", f"Job {job.job_id} cancelled: {why}", target=job.job_id,
                                cute=f"Job {job.job_id} called off: {why} 🛑",
                                story=f"The job {job.job_id} was called off: {why}.")
                        error = JobCancelledError(why)
                        job.sink(Error(code=error.code, message=error.message))
                        raise
                    except Exception as exc:
                        # A nursery below wraps what its child raised: the user reads the
                        # one cause, never "Exceptions from Trio nursery".
                        cause = single_cause(exc)
                        if not isinstance(cause, RbeeError):  # a bug: keep the queen up, tell the client
                            traceback.print_exception(cause, file=sys.stderr)
                            cause = InternalError(f"queen-rbee bug: {type(cause).__name__}: {cause}")
                        self._fail(job, cause.code, cause.message)
                    else:
                        job.state = "completed"
            finally:
                job.finished.set()
                if self._on_finished is not None:
                    self._on_finished(job)
        if not job.stream_taken:
            self._nursery.start_soon(self._forget_later, job)

    def _fail(self, job: Job, code: str, message: str) -> None:
        job.state = "failed"
        narrate(ACTOR, "execute_error", f"Job {job.job_id} failed: {message}", target=job.job_id, level="error",
                cute=f"Oh no, job {job.job_id} fell over: {message} 😿",
                story=f"But the job {job.job_id} failed: {message}.")
        job.sink(Error(code=code, message=message))

    async def _forget_later(self, job: Job) -> None:
        await trio.sleep(RETENTION_S)
        if not job.stream_taken:
            self.forget(job)
