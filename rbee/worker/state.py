"""The live state of one worker, shared by its routes and its lifecycle.

``WorkerState`` answers three questions: what phase the worker is in (``loading``,
``idle``/``busy``/``full``, ``error``), how far the model load has got (for the progress
SSE), and which inference jobs hold its slots.

Slots: the engine serves ``--parallel`` streams at once (continuous batching). ``idle``
means no slot is busy, ``busy`` some, ``full`` all; only a ``full`` worker answers a new
request with ``503 full`` and ``Retry-After`` instead of queueing it: the queen, which sees
every worker, is the place to queue and to pick another worker. Everything here runs on
the Trio thread, so check-and-reserve needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import trio

from ..errors import JobExistsError, LoadingError, RbeeError, ShuttingDownError, SlotsFullError, WorkerFailedError
from ..narration.events import Loading
from .config import WorkerConfig

if TYPE_CHECKING:
    from .engine import Engine

#: Seconds a busy or loading answer asks the client to wait (``Retry-After``).
RETRY_AFTER_SECONDS = 1
#: How long a new request waits for a job that was already told to stop (a DELETE or a
#: disconnect just before it): the core stops within one token, so this is generous.
CANCELLED_JOB_GRACE = 2.0


@dataclass(eq=False)
class Job:
    """An inference job holding a slot: cancel it with ``cancel()``."""

    job_id: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    #: Tokens put into the stream so far (read by the cancel narration).
    tokens_out: int = 0
    #: The job's narration sink (its stream), once it runs: a DELETE narrates into it.
    sink: Callable[[Any], None] | None = None
    #: Why the worker stopped this job, when not at its client's request: the stream
    #: then ends with this error instead of ``end`` (a cut answer is never a success).
    stop_error: RbeeError | None = None

    def cancel(self, because: RbeeError | None = None) -> None:
        """Ask the job to stop; the core ends it at its next step. Idempotent.

        ``because``: the worker's own reason (shutdown, its hive gone); None when the
        job's client asked (DELETE or disconnect), which ends the stream ``cancelled``.
        """
        if because is not None and self.stop_error is None:
            self.stop_error = because
        self.cancel_scope.cancel()

    @property
    def cancelled(self) -> bool:
        """True once someone asked the job to stop."""
        return self.cancel_scope.cancel_called


class WorkerState:
    """Phase, load progress, engine and job slots of this worker."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.phase = "loading"  # loading | idle | error; busy/full are idle with jobs
        self.engine: Engine | None = None
        self.failure: RbeeError | None = None
        self.url: str | None = None
        #: Every step of the model load so far, in order (the progress streams send each
        #: one, however fast they came: a sub-second load still shows its 10% steps).
        self.progress_steps: list[Loading] = [Loading(stage="starting")]
        #: The jobs holding a slot, by job id (at most ``config.parallel``).
        self.jobs: dict[str, Job] = {}
        self.stopping = False
        self.shutdown_requested = trio.Event()
        #: Why the worker is shutting down: what a running job's stream ends with.
        self.stop_error: RbeeError | None = None
        #: Where inference jobs run; set by ``serve`` before the first request can come.
        self.nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    # -- phase and progress ------------------------------------------------------------

    @property
    def slots_total(self) -> int:
        return self.config.parallel

    @property
    def slots_busy(self) -> int:
        return len(self.jobs)

    @property
    def state(self) -> str:
        """What `/v1/ready` reports: ``loading``, ``idle``, ``busy``, ``full`` or ``error``."""
        if self.phase == "idle" and self.jobs:
            return "full" if len(self.jobs) >= self.slots_total else "busy"
        return self.phase

    @property
    def ready(self) -> bool:
        """True when the model is loaded and the worker is not shutting down."""
        return self.phase == "idle" and not self.stopping

    def ready_body(self) -> dict[str, Any]:
        """The JSON body of `GET /v1/ready`."""
        body: dict[str, Any] = {"ready": self.ready, "state": self.state,
                                "slots": {"total": self.slots_total, "busy": self.slots_busy}}
        if self.failure is not None:
            body["error"] = {"code": self.failure.code, "message": self.failure.message}
        return body

    def changed(self) -> trio.Event:
        """An event set at the next change of phase or progress (take it, then look)."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def progress(self) -> Loading:
        """How far the model load has got (its latest step)."""
        return self.progress_steps[-1]

    def set_progress(self, progress: Loading) -> None:
        """Publish a new load step to the progress streams."""
        self.progress_steps.append(progress)
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

    def request_shutdown(self, because: RbeeError) -> None:
        """Shut the worker down; running jobs end with ``because`` (the first cause wins)."""
        if self.stop_error is None:
            self.stop_error = because
        self.shutdown_requested.set()

    def begin_stopping(self) -> None:
        """The worker is shutting down: no new request, progress streams end."""
        self.stopping = True
        self._notify()

    # -- the job slots -------------------------------------------------------------------

    def check_can_serve(self) -> None:
        """Raise the error a request gets now if the worker cannot take one at all."""
        if self.stopping:
            raise ShuttingDownError("the worker is shutting down")
        if self.phase == "loading":
            raise LoadingError("the model is still loading; retry in a moment")
        if self.phase == "error":
            message = self.failure.message if self.failure else "the model failed to load"
            raise WorkerFailedError(message)

    async def reserve(self, job_id: str) -> Job:
        """Take a slot for ``job_id``, or raise ``BusyError`` (``full``, or the id runs).

        When every slot is taken but some job was already cancelled, that job is waited
        for (it ends at its next step): a client that cancels and asks again at once is
        served, not turned away.
        """
        self._check_job_id_free(job_id)
        if len(self.jobs) >= self.slots_total:
            ending = [job for job in self.jobs.values() if job.cancelled]
            if ending:
                with trio.move_on_after(CANCELLED_JOB_GRACE):
                    await ending[0].done.wait()
        self.check_can_serve()
        self._check_job_id_free(job_id)  # again: the same id may have come in while we waited
        if len(self.jobs) >= self.slots_total:
            raise SlotsFullError(
                f"all {self.slots_total} slots of this worker are busy; retry in "
                f"{RETRY_AFTER_SECONDS} s or use another worker",
                details={"slots": {"total": self.slots_total, "busy": len(self.jobs)},
                         "retry_after": RETRY_AFTER_SECONDS},
            )
        job = Job(job_id)
        self.jobs[job_id] = job
        self._notify()
        return job

    def _check_job_id_free(self, job_id: str) -> None:
        if job_id in self.jobs:
            raise JobExistsError(f"job {job_id} is already running on this worker; use another job_id",
                                 details={"job_id": job_id})

    def release(self, job: Job) -> None:
        """Free the slot ``job`` held (a no-op if it no longer holds it)."""
        job.done.set()
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]
            self._notify()
