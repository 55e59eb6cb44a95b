"""The live state of one worker, shared by its routes and its lifecycle.

``WorkerState`` answers three questions: what phase the worker is in (``loading``,
``idle``/``busy``, ``error``), how far the model load has got (for the progress SSE),
and which inference job holds the one slot.

One slot: the native core runs one sequence at a time today, so a second request while
one is running is answered ``503 busy`` with ``Retry-After`` (as llama-server does with
one slot) instead of being queued: the queen, which sees every worker, is the place to
queue and to pick another worker. Everything here runs on the Trio thread, so
check-and-reserve needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import trio

from ..errors import BusyError, RbeeError
from ..narration.events import Loading
from .config import WorkerConfig

if TYPE_CHECKING:
    from .engine import Engine

#: Seconds a busy or loading answer asks the client to wait (``Retry-After``).
RETRY_AFTER_SECONDS = 1
#: How long a new request waits for a job that was already told to stop (a DELETE or a
#: disconnect just before it): the core stops within one token, so this is generous.
CANCELLED_JOB_GRACE = 2.0


class LoadingError(RbeeError):
    """A request came while the model is still loading."""

    code = "loading"
    http_status = 503


class WorkerFailedError(RbeeError):
    """A request came after the model failed to load (the worker is about to exit)."""

    code = "model_load_failed"
    http_status = 503


@dataclass(eq=False)
class Job:
    """The inference job holding the slot: cancel it with ``cancel()``."""

    job_id: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    #: Tokens put into the stream so far (read by the cancel narration).
    tokens_out: int = 0
    #: The job's narration sink (its stream), once it runs: a DELETE narrates into it.
    sink: Callable[[Any], None] | None = None

    def cancel(self) -> None:
        """Ask the job to stop; the core aborts before its next token. Idempotent."""
        self.cancel_scope.cancel()

    @property
    def cancelled(self) -> bool:
        """True once someone asked the job to stop."""
        return self.cancel_scope.cancel_called


class WorkerState:
    """Phase, load progress, engine and job slot of this worker."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.phase = "loading"  # loading | idle | error; "busy" is idle with a job
        self.engine: Engine | None = None
        self.failure: RbeeError | None = None
        self.url: str | None = None
        self.progress = Loading(stage="starting")
        self.job: Job | None = None
        self.stopping = False
        self.shutdown_requested = trio.Event()
        #: Where inference jobs run; set by ``serve`` before the first request can come.
        self.nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    # -- phase and progress ------------------------------------------------------------

    @property
    def state(self) -> str:
        """What `/v1/ready` reports: ``loading``, ``idle``, ``busy`` or ``error``."""
        if self.phase == "idle" and self.job is not None:
            return "busy"
        return self.phase

    @property
    def ready(self) -> bool:
        """True when the model is loaded and the worker is not shutting down."""
        return self.phase == "idle" and not self.stopping

    def ready_body(self) -> dict[str, Any]:
        """The JSON body of `GET /v1/ready`."""
        body: dict[str, Any] = {"ready": self.ready, "state": self.state}
        if self.failure is not None:
            body["error"] = {"code": self.failure.code, "message": self.failure.message}
        return body

    def changed(self) -> trio.Event:
        """An event set at the next change of phase or progress (take it, then look)."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def set_progress(self, progress: Loading) -> None:
        """Publish a new load progress to the progress streams."""
        self.progress = progress
        self._notify()

    def set_loaded(self, engine: Engine) -> None:
        """The model is loaded: requests may come."""
        self.engine = engine
        self.phase = "idle"
        self._notify()

    def set_failed(self, error: RbeeError) -> None:
        """The model could not be loaded: the worker answers ``error`` until it exits."""
        self.failure = error
        self.phase = "error"
        self._notify()

    def begin_stopping(self) -> None:
        """The worker is shutting down: no new request, progress streams end."""
        self.stopping = True
        self._notify()

    # -- the job slot ------------------------------------------------------------------

    def check_can_serve(self) -> None:
        """Raise the error a request gets now if the worker cannot take one at all."""
        if self.stopping:
            raise BusyError("the worker is shutting down", code="shutting_down")
        if self.phase == "loading":
            raise LoadingError("the model is still loading; retry in a moment")
        if self.phase == "error":
            message = self.failure.message if self.failure else "the model failed to load"
            raise WorkerFailedError(message)

    async def reserve(self, job_id: str) -> Job:
        """Take the slot for ``job_id``, or raise ``BusyError``.

        A job that was already cancelled is waited for (it ends within one token): a
        client that cancels and asks again at once is served, not turned away.
        """
        current = self.job
        if current is not None and current.cancelled:
            with trio.move_on_after(CANCELLED_JOB_GRACE):
                await current.done.wait()
        self.check_can_serve()
        if self.job is not None:
            raise BusyError(
                f"the worker is busy with job {self.job.job_id}; retry in "
                f"{RETRY_AFTER_SECONDS} s or use another worker",
                details={"job_id": self.job.job_id, "retry_after": RETRY_AFTER_SECONDS},
            )
        job = Job(job_id)
        self.job = job
        self._notify()
        return job

    def release(self, job: Job) -> None:
        """Free the slot ``job`` held (a no-op if it no longer holds it)."""
        job.done.set()
        if self.job is job:
            self.job = None
            self._notify()
