"""The worker's engine: one loaded GGUF model and the token loop in our C core.

``Engine`` is the one typed wrapper over ``native/rbee_core.h``: it maps every
``RBEE_STATUS_*`` to an ``RbeeError`` and frees sequence → context → model in one place
(``close``). ``Engine.generate`` is blocking; ``open_generation`` runs it from Trio.

Token delivery (measured in ``benchmarks/bench_worker.py``, described in docs/native.md
and ``native_stream.py``): the whole prefill + decode loop is one C call on one thread.
Per piece of text the C loop calls back into Python, which appends the piece to a deque;
the C loop then wakes the event loop through a pipe, outside the GIL: no per-token round
trip, the decode thread never waits for the event loop.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from rbee.errors import BackendUnavailableError, BusyError, InvalidRequestError, ModelLoadError
from rbee.narration.events import Token
from rbee.worker.native_lib import TokenSink, c_string, check, native
from rbee.worker.native_thread import EngineThread

#: ``stop_reason`` values, indexed by ``rbee_stop_reason``.
STOP_REASONS = ("none", "max_tokens", "stop_sequence", "eos", "cancelled")
#: rbee's backend names and the ggml registry names they stand for.
_REGISTRIES = {"CPU": "cpu", "CUDA": "cuda", "MTL": "metal", "METAL": "metal"}
_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: let llama.cpp pick
_MAX_STOPS = 16


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens; the defaults are llama.cpp's. ``temperature == 0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def problems(self) -> list[dict[str, str]]:
        """Every invalid field as ``{field, constraint, message}`` (empty when all are fine)."""
        found: list[dict[str, str]] = []

        def bad(field: str, constraint: str, message: str) -> None:
            found.append({"field": field, "constraint": constraint, "message": message})

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "integer >= 1", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not number(self.temperature) or self.temperature < 0:
            bad("temperature", "number >= 0", f"temperature must be a number >= 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "0 < top_p <= 1", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not integer(self.top_k) or self.top_k < 0:
            bad("top_k", "integer >= 0", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "0 <= min_p <= 1", f"min_p must be in [0, 1], got {self.min_p!r}")
        if not number(self.repeat_penalty) or self.repeat_penalty <= 0:
            bad("repeat_penalty", "number > 0", f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty!r}")
        if self.seed is not None and (not integer(self.seed) or not 0 <= self.seed < _RANDOM_SEED):
            bad("seed", f"integer in [0, {_RANDOM_SEED})", f"seed must be null or an integer in [0, {_RANDOM_SEED})")
        # A NUL cannot cross into C inside a string.
        stops_ok = isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s and "\0" not in s
                                                                for s in self.stop)
        if not stops_ok or len(self.stop) > _MAX_STOPS:
            bad("stop", f"at most {_MAX_STOPS} non-empty strings without NUL",
                f"stop must be a list of at most {_MAX_STOPS} non-empty strings")
        return found


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What one generation did. ``tokens_out`` counts the pieces handed to ``on_token``
    (what a client receives); ``tokens_per_sec`` is model tokens per second of decode."""

    prompt_tokens: int
    tokens_out: int
    stop_reason: str  # "max_tokens" | "stop_sequence" | "eos" | "cancelled"
    prefill_ms: float
    time_to_first_token_ms: float
    decode_time_ms: float
    tokens_per_sec: float
    #: Parts of ``decode_time_ms`` (for the benchmark): sampling + detokenizing, and the
    #: time spent inside ``on_token`` (the cost of token delivery on the decode thread).
    sample_ms: float = 0.0
    callback_ms: float = 0.0


def available_backends() -> list[str]:
    """Backends this llama.cpp build has (``"cpu"`` always; ``"cuda"``/``"metal"`` if compiled in)."""
    lib = native().lib
    names = {_REGISTRIES.get(c_string(lib.rbee_backend_name(i)).upper()) for i in range(lib.rbee_backend_count())}
    return ["cpu"] + [b for b in ("cuda", "metal") if b in names]


def backend_device_count(backend: str) -> int:
    """Devices of ``backend`` in this build (0 if the backend is absent; 1 for cpu)."""
    if backend == "cpu":
        return 1
    registry = {"cuda": b"CUDA", "metal": b"MTL"}.get(backend)
    return 0 if registry is None else max(0, native().lib.rbee_backend_device_count(registry))


def native_build_info() -> dict[str, Any]:
    """The llama.cpp this core was compiled against, and what the machine offers."""
    lib = native().lib
    return {
        "llama_cpp_python": c_string(lib.rbee_llama_cpp_python_version()),
        "llama_cpp_version": c_string(lib.rbee_llama_version()),
        "llama_cpp_commit": c_string(lib.rbee_llama_commit()),
        "system_info": c_string(lib.rbee_system_info()).strip(" |"),
        "backends": available_backends(),
    }


class AbortFlag:
    """A cancel flag in C memory; the token loop reads it before every decode step."""

    __slots__ = ("_ptr",)

    def __init__(self) -> None:
        ffi, lib = native().ffi, native().lib
        out = ffi.new("rbee_abort_flag **")
        check(lib.rbee_abort_flag_create(out), "rbee_abort_flag_create")
        self._ptr = ffi.gc(out[0], lib.rbee_abort_flag_free)

    def set(self) -> None:
        """Ask the loop to stop (safe from any thread, any number of times)."""
        native().lib.rbee_abort_flag_set(self._ptr)

    def clear(self) -> None:
        """Arm the flag again for another generation."""
        native().lib.rbee_abort_flag_clear(self._ptr)

    def is_set(self) -> bool:
        """True once ``set`` was called (and not cleared)."""
        return bool(native().lib.rbee_abort_flag_is_set(self._ptr))


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _check_model_file(path: Path) -> None:
    """Fail with a message naming the file before llama.cpp sees something it can't load."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", details={"path": str(path)})
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}", details={"path": str(path)})
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"model file is not readable: {path} ({exc.strerror})",
                             details={"path": str(path)}) from None
    if magic != b"GGUF":
        raise ModelLoadError(f"not a GGUF model file (bad magic {magic!r}): {path}", details={"path": str(path)})


def _free_handles(sequence: Any, context: Any, model: Any) -> None:
    """The one place native handles are freed, in the one order (sequence → context →
    model: nothing outlives what it borrows). NULL handles are fine."""
    lib = native().lib
    lib.rbee_sequence_free(sequence)
    lib.rbee_context_free(context)
    lib.rbee_model_free(model)


class Engine:
    """One GGUF model loaded on one backend/device, with one context and one sequence.

    Serves one generation at a time (a second concurrent one raises ``BusyError``).
    ``close`` (or leaving ``with``) frees sequence → context → model, in that order.
    """

    def __init__(self, handles: tuple[Any, Any, Any], thread: EngineThread, *, model_path: Path, backend: str,
                 device: int, n_threads: int) -> None:
        self._model, self._context, self._sequence = handles
        self._thread = thread
        self._model_path, self._backend, self._device, self._n_threads = model_path, backend, device, n_threads
        ffi, lib = native().ffi, native().lib
        info = ffi.new("rbee_model_info *")
        check(lib.rbee_model_get_info(self._model, info), "rbee_model_get_info")
        self._n_layers, self._n_params, self._size_bytes = info.n_layers, info.n_params, info.size_bytes
        self._description = c_string(info.description)
        self._n_ctx = lib.rbee_context_n_ctx_seq(self._context)
        self._busy = threading.Lock()
        self._current_abort: AbortFlag | None = None

    @classmethod
    def load(cls, model_path: str | os.PathLike[str], *, backend: str = "cpu", device: int = 0, n_ctx: int = 4096,
             n_threads: int | None = None, n_gpu_layers: int = -1) -> Engine:
        """Load a GGUF (blocking). Fails fast, never falls back to the CPU:
        ``BackendUnavailableError`` names what is available, ``ModelLoadError`` names the file."""
        path = Path(model_path).expanduser().resolve()
        available = available_backends()
        if backend not in available:
            raise BackendUnavailableError(
                f"backend {backend!r} is not available in this build; available: {', '.join(available)}",
                details={"backend": backend, "available": available},
            )
        n_devices = backend_device_count(backend)
        if backend != "cpu" and not 0 <= device < n_devices:
            raise BackendUnavailableError(
                f"{backend} device {device} does not exist; this machine has {n_devices} {backend} device(s)",
                details={"backend": backend, "device": device, "devices": n_devices},
            )
        _check_model_file(path)
        threads = n_threads if n_threads is not None else _default_threads()
        if threads < 1 or n_ctx < 16:
            raise InvalidRequestError(f"need n_threads >= 1 and n_ctx >= 16, got {threads} and {n_ctx}")
        ffi, lib = native().ffi, native().lib
        model_out = ffi.new("rbee_model **")
        context_out = ffi.new("rbee_context **")
        sequence_out = ffi.new("rbee_sequence **")
        backend_c = ffi.new("char[]", backend.encode())
        mparams = ffi.new("rbee_model_params *", {"backend": backend_c, "device": device, "n_gpu_layers": n_gpu_layers})
        cparams = ffi.new("rbee_context_params *", lib.rbee_context_default_params())
        cparams.n_ctx, cparams.n_batch, cparams.n_seq_max = n_ctx, min(512, n_ctx), 1
        cparams.n_threads = threads
        # Flash attention off: the same kernels llama-cpp-python's default uses, so greedy
        # output matches it token for token.
        cparams.flash_attn = 0

        def create() -> Engine:  # on the engine's own thread (see native_thread.py)
            try:
                check(lib.rbee_model_load(str(path).encode(), mparams, model_out), f"cannot load model {path}",
                      details={"path": str(path)})
                check(lib.rbee_context_create(model_out[0], cparams, context_out), "rbee_context_create")
                check(lib.rbee_sequence_create(context_out[0], 0, sequence_out), "rbee_sequence_create")
                return cls((model_out[0], context_out[0], sequence_out[0]), thread, model_path=path,
                           backend=backend, device=device, n_threads=threads)
            except BaseException:
                _free_handles(sequence_out[0], context_out[0], model_out[0])  # what was made so far
                raise

        thread = EngineThread()
        try:
            return thread.call(create)
        except BaseException:
            thread.stop()
            raise

    model_path = property(lambda self: self._model_path, doc="Absolute path of the loaded GGUF.")
    backend = property(lambda self: self._backend, doc='"cpu", "cuda" or "metal".')
    device = property(lambda self: self._device, doc="Device index within the backend.")
    n_ctx = property(lambda self: self._n_ctx, doc="Context length (tokens) of the one sequence.")
    n_layers = property(lambda self: self._n_layers, doc="Transformer layers of the model.")
    n_params = property(lambda self: self._n_params, doc="Parameter count of the model.")
    size_bytes = property(lambda self: self._size_bytes, doc="Bytes of the model's tensors.")
    description = property(lambda self: self._description, doc='llama.cpp\'s, e.g. "gemma3 270M Q4_K - Medium".')
    n_threads = property(lambda self: self._n_threads, doc="CPU threads used for decode and prefill.")

    def _handles(self) -> tuple[Any, Any, Any]:
        if self._model is None:
            raise InvalidRequestError("the engine is closed")
        return self._model, self._context, self._sequence

    def count_tokens(self, text: str, *, chat: bool = False) -> int:
        """How many prompt tokens ``text`` becomes (BOS and chat template included)."""
        ffi, lib = native().ffi, native().lib
        model, _, _ = self._handles()
        data = text.encode("utf-8")
        n = ffi.new("int32_t *")
        chat_problem = {"field": "chat", "constraint": "a chat template llama.cpp knows",
                        "message": "cannot apply the model's chat template"}
        check(lib.rbee_model_count_tokens(model, data, len(data), chat, n), "rbee_model_count_tokens",
              details=[chat_problem] if chat else None)
        return n[0]

    def check_fits(self, prompt_tokens: int, params: SamplingParams) -> None:
        """``InvalidRequestError`` unless prompt + ``max_tokens`` fit the context."""
        if prompt_tokens + params.max_tokens > self._n_ctx:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the context ({self._n_ctx})",
                details=[{"field": "max_tokens", "constraint": f"prompt_tokens + max_tokens <= {self._n_ctx}",
                          "message": f"the prompt is {prompt_tokens} tokens; at most "
                                     f"{max(0, self._n_ctx - prompt_tokens)} may be generated"}],
            )

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise BusyError("the engine is serving another generation")

    def generate(self, prompt: str, params: SamplingParams, *, on_token: Callable[[int, str], object] | None,
                 abort: AbortFlag | None = None, chat: bool = False) -> GenerationResult:
        """Run one generation (blocking). ``on_token(i, text)`` gets every piece of whole
        UTF-8 text on the generating thread, the engine's own (``None`` discards them);
        ``abort`` stops the loop before its next decode."""
        self._claim()
        try:
            return self._thread.call(
                lambda: self._generate_claimed(prompt, params, on_token=on_token, abort=abort, chat=chat))
        finally:
            self._busy.release()

    def _generate_claimed(self, prompt: str, params: SamplingParams, *, on_token: Callable[[int, str], object] | None,
                          abort: AbortFlag | None, chat: bool, notify_fd: int = -1) -> GenerationResult:
        problems = params.problems()
        if not isinstance(prompt, str):
            problems.append({"field": "prompt", "constraint": "string", "message": "prompt must be a string"})
        if problems:
            raise InvalidRequestError("; ".join(p["message"] for p in problems), details=problems)
        ffi, lib = native().ffi, native().lib
        _, _, sequence = self._handles()
        abort = abort if abort is not None else AbortFlag()
        self._current_abort = abort
        data = ffi.new("char[]", prompt.encode("utf-8"))
        stops = [ffi.new("char[]", s.encode("utf-8")) for s in params.stop]
        stop_array = ffi.new("const char *[]", stops) if stops else ffi.NULL
        gp = ffi.new("rbee_generate_params *", lib.rbee_generate_default_params())
        gp.prompt, gp.prompt_len, gp.chat = data, len(data) - 1, chat
        gp.max_tokens, gp.temperature, gp.top_p = params.max_tokens, params.temperature, params.top_p
        gp.top_k, gp.min_p, gp.repeat_penalty = params.top_k, params.min_p, params.repeat_penalty
        gp.seed = _RANDOM_SEED if params.seed is None else params.seed
        gp.stop, gp.n_stop, gp.abort, gp.notify_fd = stop_array, len(stops), abort._ptr, notify_fd
        # on_token=None runs the bare loop (a C callback that discards): the benchmark's baseline.
        sink = TokenSink(on_token) if on_token is not None else None
        handle = ffi.new_handle(sink) if sink is not None else ffi.NULL  # alive for the whole call
        callback = lib.rbee_py_on_token if sink is not None else lib.rbee_discard_token
        out = ffi.new("rbee_generation_result *")
        try:
            status = lib.rbee_sequence_generate(sequence, gp, callback, handle, out)
        finally:
            self._current_abort = None
        if sink is not None and sink.error is not None:
            raise sink.error
        if lib.RBEE_STATUS_PROMPT_TOO_LONG == status:
            self.check_fits(out.prompt_tokens, params)
        check(status, "rbee_sequence_generate")
        return GenerationResult(
            prompt_tokens=out.prompt_tokens, tokens_out=out.pieces_emitted, stop_reason=STOP_REASONS[out.stop_reason],
            prefill_ms=out.prefill_ms, time_to_first_token_ms=out.time_to_first_token_ms,
            decode_time_ms=out.decode_ms, tokens_per_sec=out.tokens_per_sec, sample_ms=out.sample_ms,
            callback_ms=out.callback_ms,
        )

    def close(self) -> None:
        """Free sequence → context → model (idempotent). A running generation is asked
        to stop and is waited for (within one token) first."""
        if self._model is None:
            return
        if self._current_abort is not None:
            self._current_abort.set()
        with self._busy:
            if self._model is None:  # closed by another thread meanwhile
                return
            sequence, context, model = self._sequence, self._context, self._model
            self._model = self._context = self._sequence = None
            self._thread.call(lambda: _free_handles(sequence, context, model))
            self._thread.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


from rbee.worker.native_stream import Generation as Generation, open_generation as open_generation  # noqa: E402
