"""The one error tree of rbee.

Every error rbee raises on purpose is an ``RbeeError``. Each carries a stable ``code``
(the ``code`` of the JSON error envelope) and an HTTP status hint, so that a daemon can
turn it into a 4xx/5xx answer and the CLI into one line on stderr without a traceback.

The envelope is OpenAI's error object, a superset of rbee's own ``{code, message,
details}``: ``{"error": {"message", "type", "param", "code", "details"}}``. ``type`` follows
the status (``error_type``), ``param`` names the first bad field of ``details``, so that
OpenAI's clients read every rbee daemon's errors as their own.

An error that crossed a stream as ``{code, message}`` (a job's ``error`` event) gets its
status back from its code: ``http_status_for_code`` / ``error_for_code``.
"""

from __future__ import annotations

from typing import Any


class RbeeError(Exception):
    """Root of every error rbee raises on purpose."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def envelope(self, status: int | None = None) -> dict[str, Any]:
        """The JSON error envelope: rbee's ``{code, message, details}`` plus OpenAI's
        ``type`` (from the HTTP status the answer has: ``status``, else the error's own)
        and ``param`` (the first bad field, else null)."""
        if status is None:
            status = self.http_status
            if type(self) is RbeeError and "http_status" not in vars(self):
                status = http_status_for_code(self.code)  # RbeeError(msg, code=...) of another kind
        return {"error": {
            "message": self.message,
            "type": error_type(status),
            "param": error_param(self.details),
            "code": self.code,
            "details": self.details,
        }}


class InvalidRequestError(RbeeError):
    """The caller sent something we cannot act on; ``details`` lists the fields."""

    code = "invalid_request"
    http_status = 400


class AuthError(RbeeError):
    """A route that needs a bearer token was called without the right one."""

    code = "unauthorized"
    http_status = 401


class NotFoundError(RbeeError):
    """The named job, worker, node, model or download does not exist."""

    code = "not_found"
    http_status = 404


class BusyError(RbeeError):
    """The resource is serving someone else; try again later."""

    code = "busy"
    http_status = 503


class NarrationError(RbeeError):
    """A narration stream is malformed or ended in the middle of an event."""

    code = "narration_error"
    http_status = 502


class NativeError(RbeeError):
    """The native core (our C over llama.cpp) reported a failure."""

    code = "native_error"
    http_status = 500


class BackendUnavailableError(RbeeError):
    """The requested backend or device does not exist on this machine."""

    code = "backend_unavailable"
    http_status = 400


class ModelLoadError(RbeeError):
    """A model file is missing, unreadable or not a GGUF llama.cpp can load."""

    code = "model_load_failed"
    http_status = 422


class WorkerError(RbeeError):
    """A worker failed to start, crashed, or answered with an error."""

    code = "worker_error"
    http_status = 502


class ProvisionError(RbeeError):
    """A model could not be resolved, downloaded or verified."""

    code = "provision_failed"
    http_status = 422


class PreflightError(RbeeError):
    """The node cannot take this model: disk, memory, backend or device is short."""

    code = "preflight_failed"
    http_status = 409


class JobError(RbeeError):
    """A job failed on the way through the queen."""

    code = "job_failed"
    http_status = 500


class QueenUnreachableError(JobError):
    """No queen answers at the URL (nothing listens, or the connection broke)."""

    code = "queen_unreachable"
    http_status = 502


class SshError(RbeeError):
    """A node could not be reached or driven over SSH."""

    code = "ssh_failed"
    http_status = 502


class QueenStartError(RbeeError):
    """The ephemeral or persistent queen did not come up."""

    code = "queen_start_failed"
    http_status = 500


class HiveStartError(RbeeError):
    """A hive exited or broke before it said ``hive_ready``."""

    code = "hive_start_failed"
    http_status = 502


class NodeUnreachableError(SshError):
    """Adding a node failed its SSH test; a 4xx because the caller's input must change."""

    code = "node_unreachable"
    http_status = 422


class ModelNotFoundError(NotFoundError):
    """No model by that name: not a model reference, or no such file or repository."""

    code = "model_not_found"
    http_status = 404


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


#: Codes that are raised with ``code=`` on a class of another code (or outside any
#: class), with the status their answer has.
_CODE_STATUS_EXTRA = {
    "cancelled": 503,  # the job was cancelled (DELETE, or the queen shuts down)
    "shutting_down": 503,
    "full": 503,
    "checksum_mismatch": 502,
    "bind_failed": 500,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "too_large": 413,
}


def _classes_by_code() -> dict[str, type[RbeeError]]:
    found: dict[str, type[RbeeError]] = {}
    todo = list(RbeeError.__subclasses__())
    while todo:  # breadth first: this module's classes win over later subclasses' codes
        cls = todo.pop(0)
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


def http_status_for_code(code: str) -> int:
    """The HTTP status of an error known only by its ``code`` (from a job's ``error``
    event): the status of the ``RbeeError`` class of that code, else 500."""
    cls = _classes_by_code().get(code)
    if cls is not None:
        return cls.http_status
    return _CODE_STATUS_EXTRA.get(code, 500)


def error_for_code(code: str, message: str, details: Any = None) -> RbeeError:
    """An ``RbeeError`` of ``code`` whose ``http_status`` is that code's (see above)."""
    cls = _classes_by_code().get(code, RbeeError)
    error = cls(message, details=details, code=code)
    error.http_status = http_status_for_code(code)
    return error
