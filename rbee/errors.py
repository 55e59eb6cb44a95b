"""The one error tree of rbee.

Every error rbee raises on purpose is an ``RbeeError``. Each carries a stable ``code``
(the ``code`` of the JSON error envelope ``{"error": {"code", "message", "details"}}``)
and an HTTP status hint, so that a daemon can turn it into a 4xx/5xx answer and the CLI
into one line on stderr without a traceback.
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

    def envelope(self) -> dict[str, Any]:
        """The JSON error envelope of DESIGN.md for this error."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


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
