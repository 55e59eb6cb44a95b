"""The one error tree of rbee: the class decides the code.

Every error rbee raises on purpose is an ``RbeeError`` subclass declared here, nested by
concern (the request, the resources it asks for, capacity, the programs below, state on
disk). Each class has one stable ``code`` (the ``code`` of the JSON error envelope and of a
job's ``error`` event) and one HTTP status; a call site picks the class, never the code.
``ERRORS`` is the explicit registry of codes; a test checks that it holds every class once.

The statuses a daemon answers: 4xx when the caller must change something, 502 when a node
or worker below failed, 503 when it is busy, full, draining or broke on its own (a bug is
no reason to tell a client "your request was fine, try the same elsewhere" with a 500 that
OpenAI's SDK retries blindly; 503 without ``Retry-After`` says "not now, not you"), 504
when a node or worker below timed out. Never 500.

The envelope is OpenAI's error object, a superset of rbee's own ``{code, message,
details}``: ``{"error": {"message", "type", "param", "code", "details"}}``. ``type`` follows
the status (``error_type``), ``param`` names the first bad field of ``details``, so that
OpenAI's clients read every rbee daemon's errors as their own.

An error that crossed a stream as ``{code, message}`` (a job's ``error`` event) becomes
its class again on the other side with ``error_for_code``: a worker's ``ModelLoadError``
is a ``ModelLoadError`` in the queen and in the keeper, with its status.
"""

from __future__ import annotations

from typing import Any


class RbeeError(Exception):
    """Root of every error rbee raises on purpose (and, as ``internal_error``, of the
    unexpected ones once a daemon's edge has caught them)."""

    code = "internal_error"
    http_status = 503

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def envelope(self, status: int | None = None) -> dict[str, Any]:
        """The JSON error envelope: rbee's ``{code, message, details}`` plus OpenAI's
        ``type`` (from the HTTP status the answer has: ``status``, else the error's own)
        and ``param`` (the first bad field, else null)."""
        return {"error": {
            "message": self.message,
            "type": error_type(self.http_status if status is None else status),
            "param": error_param(self.details),
            "code": self.code,
            "details": self.details,
        }}


class InternalError(RbeeError):
    """A bug: something a daemon did not expect. Its message names the exception."""

    code = "internal_error"
    http_status = 503


# -- the request itself ---------------------------------------------------------------


class InvalidRequestError(RbeeError):
    """The caller sent something we cannot act on; ``details`` lists the fields."""

    code = "invalid_request"
    http_status = 400


class BackendUnavailableError(InvalidRequestError):
    """The requested backend or device does not exist on this machine."""

    code = "backend_unavailable"


class MethodNotAllowedError(InvalidRequestError):
    """The route exists, but not with this HTTP method."""

    code = "method_not_allowed"
    http_status = 405


class PayloadTooLargeError(InvalidRequestError):
    """The body (or the prompt in it) is larger than this daemon takes."""

    code = "payload_too_large"
    http_status = 413


class HeadersTooLargeError(InvalidRequestError):
    """The request's header fields are larger than this daemon takes."""

    code = "headers_too_large"
    http_status = 431


class RequestTimeoutError(InvalidRequestError):
    """The request's body stopped arriving before it was whole (a client that went quiet)."""

    code = "request_timeout"
    http_status = 408


class NodeExistsError(InvalidRequestError):
    """``add-node`` for a name, or an SSH host and port, that a node already has."""

    code = "node_exists"
    http_status = 409


class JobExistsError(InvalidRequestError):
    """A request reused the ``job_id`` of a stream that still runs here."""

    code = "job_exists"
    http_status = 409


class AuthError(RbeeError):
    """A route that needs a bearer token was called without the right one."""

    code = "unauthorized"
    http_status = 401


class NotFoundError(RbeeError):
    """The named job, worker, node, route or download does not exist."""

    code = "not_found"
    http_status = 404


class ModelNotFoundError(NotFoundError):
    """No model by that name: not a model reference, no such repository, or a ``file:``
    outside the model directories (the same answer, so that it reveals nothing)."""

    code = "model_not_found"


# -- the model a request asks for ----------------------------------------------------


class ModelError(RbeeError):
    """The model cannot be had or used on this node (the caller must pick another)."""

    code = "model_error"
    http_status = 422


class ModelLoadError(ModelError):
    """A model file is missing, unreadable or not a GGUF llama.cpp can load."""

    code = "model_load_failed"


class ProvisionError(ModelError):
    """A model could not be resolved or downloaded."""

    code = "provision_failed"


class ChecksumMismatchError(ProvisionError):
    """A downloaded file's sha256 is not the one the Hub published."""

    code = "checksum_mismatch"
    http_status = 502


class PreflightError(ModelError):
    """The node cannot take this model: disk, memory, backend or device is short."""

    code = "preflight_failed"
    http_status = 409


class ModelInUseError(ModelError):
    """The model cannot be removed: a worker has it loaded, or a spawn is provisioning it."""

    code = "model_in_use"
    http_status = 409


# -- capacity: not now ---------------------------------------------------------------


class UnavailableError(RbeeError):
    """The daemon cannot take this now; ``details.retry_after`` (seconds) when it knows."""

    code = "unavailable"
    http_status = 503


class BusyError(UnavailableError):
    """The resource is serving someone else; try again later."""

    code = "busy"


class SlotsFullError(UnavailableError):
    """Every slot of the worker is taken."""

    code = "full"


class QueueFullError(UnavailableError):
    """The model's queue is full: refused at once (HTTP 503 with ``Retry-After``)."""

    code = "queue_full"


class LoadingError(UnavailableError):
    """A request came while the model is still loading."""

    code = "loading"


class ShuttingDownError(UnavailableError):
    """The daemon is draining or stopping: it takes no new work."""

    code = "shutting_down"


class JobCancelledError(UnavailableError):
    """The job was cancelled by someone other than its own client (a DELETE from another
    caller, or the queen's stop after its grace period)."""

    code = "cancelled"


# -- the programs below: a node, a hive, a worker ----------------------------------


class BelowError(RbeeError):
    """A program this one drives (a hive, a worker, the native core) failed."""

    code = "upstream_failed"
    http_status = 502


class WorkerError(BelowError):
    """A worker failed to start, crashed, or answered with an error."""

    code = "worker_error"


class WorkerFailedError(WorkerError):
    """A request came after the model failed to load (the worker is about to exit)."""

    code = "worker_failed"
    http_status = 503


class WorkerLostError(WorkerError):
    """A worker was stopped under a running job: its hive died or stopped it, or it crashed."""

    code = "worker_lost"


class WorkerStalledError(WorkerError):
    """A running job's worker sent nothing (no token, no prefill progress) for too long."""

    code = "worker_stalled"
    http_status = 504


class CallbackError(WorkerError):
    """The worker's ready callback never succeeded."""

    code = "callback_failed"


class BindFailedError(WorkerError):
    """A daemon could not listen on its address (the port is taken, or not allowed)."""

    code = "bind_failed"


class NativeError(BelowError):
    """The native core (our C over llama.cpp) reported a failure."""

    code = "native_error"


class NarrationError(BelowError):
    """A narration stream is malformed or ended in the middle of an event."""

    code = "narration_error"


class JobError(BelowError):
    """A job failed on the way through the queen (its stream broke, or ended untold)."""

    code = "job_failed"


class QueenUnreachableError(BelowError):
    """No queen answers at the URL (nothing listens, or the connection broke)."""

    code = "queen_unreachable"


class NotAQueenError(QueenUnreachableError):
    """Something answers at the queen's URL, but it is not queen-rbee (its ``/health`` does
    not say ``"service": "queen-rbee"``)."""

    code = "not_a_queen"


class QueenStartError(BelowError):
    """The ephemeral or persistent queen did not come up."""

    code = "queen_start_failed"


class HiveStartError(BelowError):
    """A hive exited or broke before it said ``hive_ready``."""

    code = "hive_start_failed"


class HiveLostError(BelowError):
    """A running hive went away (it died, or its SSH session broke)."""

    code = "hive_lost"


class SshError(BelowError):
    """A node could not be reached or driven over SSH."""

    code = "ssh_failed"


class NodeUnreachableError(SshError):
    """Adding a node failed its SSH test; a 4xx because the caller's input must change."""

    code = "node_unreachable"
    http_status = 422


# -- state on disk -------------------------------------------------------------------


class StateError(RbeeError):
    """A file under ``RBEE_HOME`` cannot be read or written (read-only, full, corrupt)."""

    code = "state_error"
    http_status = 503


#: Every error class by its code: the explicit registry (``tests/test_errors.py`` checks
#: that it holds each class of this module exactly once, and each code once).
ERRORS: dict[str, type[RbeeError]] = {cls.code: cls for cls in (
    InternalError,
    InvalidRequestError, BackendUnavailableError, MethodNotAllowedError, PayloadTooLargeError,
    HeadersTooLargeError, RequestTimeoutError, JobExistsError, NodeExistsError,
    AuthError,
    NotFoundError, ModelNotFoundError,
    ModelError, ModelLoadError, ProvisionError, ChecksumMismatchError, PreflightError, ModelInUseError,
    UnavailableError, BusyError, SlotsFullError, QueueFullError, LoadingError, ShuttingDownError,
    JobCancelledError,
    BelowError, WorkerError, WorkerFailedError, WorkerLostError, WorkerStalledError, CallbackError,
    BindFailedError, NativeError, NarrationError, JobError, QueenUnreachableError, NotAQueenError, QueenStartError,
    HiveStartError, HiveLostError, SshError, NodeUnreachableError,
    StateError,
)}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (its clients pick the exception by status)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_param(details: Any) -> str | None:
    """OpenAI's ``param``: the ``field`` of the first detail, when details list fields."""
    if isinstance(details, list) and details and isinstance(details[0], dict):
        field = details[0].get("field")
        if isinstance(field, str) and field and not field.startswith("("):
            return field
    return None


def error_class(code: str) -> type[RbeeError]:
    """The class of ``code``; an unknown code (a newer peer's) is a ``BelowError``: it
    came from below, and says what it is in its message."""
    return ERRORS.get(code, BelowError)


def http_status_for_code(code: str) -> int:
    """The HTTP status of an error known only by its ``code`` (from a job's ``error`` event)."""
    return error_class(code).http_status


def error_for_code(code: str, message: str, details: Any = None) -> RbeeError:
    """The error of ``code`` as its own class again, after it crossed a stream.

    An unknown code keeps its text: the instance carries it, the class stays ``BelowError``.
    """
    error = error_class(code)(message, details=details)
    if code not in ERRORS:
        error.code = code
    return error


def single_cause(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups (Trio's nurseries wrap
    what a child raised), so that no user ever reads "Exceptions from Trio nursery"."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
