"""The thin binding to ``_rbee_native`` (our C core, built by ``python native/build.py``).

This module owns the three things every caller of the C API shares: loading the compiled
module (with a clear error when it was never built), turning an ``RBEE_STATUS_*`` into
the right ``RbeeError``, and the one cffi callback through which the C token loop hands
each piece of text to Python. Everything typed and public lives in ``engine.py``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from rbee.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    ModelLoadError,
    NativeError,
    RbeeError,
)

_module: ModuleType | None = None

# Status codes whose meaning belongs to another branch of the error tree than NativeError.
_ERROR_CLASSES: dict[str, type[RbeeError]] = {
    "RBEE_STATUS_BACKEND_UNAVAILABLE": BackendUnavailableError,
    "RBEE_STATUS_MODEL_LOAD_FAILED": ModelLoadError,
    "RBEE_STATUS_PROMPT_TOO_LONG": InvalidRequestError,
    "RBEE_STATUS_NO_CHAT_TEMPLATE": InvalidRequestError,
    "RBEE_STATUS_GRAMMAR_FAILED": InvalidRequestError,
}


def native() -> ModuleType:
    """The compiled ``_rbee_native`` module (``.ffi``, ``.lib``), imported once."""
    global _module
    if _module is None:
        try:
            import _rbee_native
        except ImportError as exc:
            raise NativeError(
                "the native core is not built for this environment: run `python native/build.py` "
                f"with this environment's interpreter ({exc})"
            ) from None
        _register_callback(_rbee_native)
        _module = _rbee_native
    return _module


def c_string(value: Any) -> str:
    """A ``const char *`` from the C API as ``str`` (``""`` for NULL)."""
    ffi = native().ffi
    return "" if value == ffi.NULL else ffi.string(value).decode("utf-8", errors="replace")


def status_name(status: int) -> str:
    """``RBEE_STATUS_*`` name of a status code."""
    return c_string(native().lib.rbee_status_name(status))


def last_native_error() -> str:
    """The last error llama.cpp logged (empty if none): the *why* behind a failed call."""
    return c_string(native().lib.rbee_last_error())


def check(status: int, what: str, *, why: str | None = None, **kwargs: Any) -> None:
    """Raise the ``RbeeError`` for a non-OK status; ``what`` says which call failed and
    ``why`` what went wrong (default: the last error llama.cpp logged in this process)."""
    if status == 0:
        return
    name = status_name(status)
    why = last_native_error() if why is None else why
    message = f"{what}: {name}" + (f" ({why})" if why else "")
    raise _ERROR_CLASSES.get(name, NativeError)(message, **kwargs)


class TokenSink:
    """What the C loop's ``user_data`` points at during one generation.

    ``deliver`` runs on the generating thread for every piece. An exception there must
    not unwind through C: it is kept here, the C loop is told to stop (non-zero return,
    ``RBEE_STATUS_CALLBACK_FAILED``), and the caller re-raises it after the call returns.
    """

    __slots__ = ("on_token", "error")

    def __init__(self, on_token: Callable[[int, str], object]) -> None:
        self.on_token = on_token
        self.error: BaseException | None = None


class LoadProgressSink:
    """What ``rbee_model_params.progress_user_data`` points at during one model load.

    ``report(fraction)`` runs on the loading thread for each of llama.cpp's progress calls
    (the share of the weights' bytes read, 0..1) and returns False to stop the load. An
    exception there must not unwind through C: it is kept here, the load is stopped, and
    the caller re-raises it once ``rbee_model_load`` has returned.
    """

    __slots__ = ("report", "error")

    def __init__(self, report: Callable[[float], bool]) -> None:
        self.report = report
        self.error: BaseException | None = None


def _register_callback(module: ModuleType) -> None:
    """Attach the Python bodies of the C ``extern "Python"`` callbacks (once per process)."""
    ffi = module.ffi

    def on_error(exc_type: type, exc: BaseException, tb: object) -> None:
        # Only reached if the body below failed before it could catch (e.g. a bad handle).
        return None

    @ffi.def_extern(onerror=on_error, error=1)
    def rbee_py_on_token(user_data: Any, index: int, text: Any, length: int) -> int:
        sink: TokenSink = ffi.from_handle(user_data)
        try:
            # The C side guarantees whole, valid UTF-8.
            sink.on_token(index, ffi.unpack(text, length).decode("utf-8"))
        except BaseException as exc:  # re-raised by the caller once C has returned
            sink.error = exc
            return 1
        return 0

    @ffi.def_extern(onerror=on_error, error=False)
    def rbee_py_on_load_progress(progress: float, user_data: Any) -> bool:
        sink: LoadProgressSink = ffi.from_handle(user_data)
        try:
            return bool(sink.report(progress))
        except BaseException as exc:  # re-raised by the caller once C has returned
            sink.error = exc
            return False
