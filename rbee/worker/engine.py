"""The worker's engine: one loaded GGUF model, one KV cache, many streams.

``Engine`` is the blocking core and the one typed wrapper over ``native/rbee_core.h``: it
maps every ``RBEE_STATUS_*`` to an ``RbeeError`` and frees context → model in one place
(``close``). Its public API is all the Trio adapter (``engine_trio.py``) uses:

- ``Engine.submit(prompt, params, on_piece=..., on_prefill=..., on_finish=...)`` queues a
  request and returns its ``Request`` at once; ``Request.cancel()`` (any thread) ends it
  at the next step. Up to ``n_slots`` requests run together (continuous batching). The
  prompt is text, or a conversation (a sequence of ``rbee.requests.Message``) that the core
  renders with the model's chat template; ``grammar=`` (GBNF) constrains the output.
- ``Engine.generate(...)`` runs one request to its end on an otherwise idle engine
  (blocking; the C one-shot loop: the benchmark's baseline and the simplest use).

The step loop runs on the engine's own long-lived thread (``native_thread.py`` says why
one thread): while any request is active it calls ``rbee_context_step`` back to back (one
``llama_decode`` per step, every active stream in it) and hands each event to its
request's callbacks on that thread; with nothing active the thread sleeps on its job
queue (no spinning). New requests join at the next step, finished ones leave.

Token delivery stays as cheap as with one stream: a callback only appends to a deque,
and the C step itself writes each stream's wake-up byte to its pipe (``notify_fd``) at
the start of the next step, outside the GIL, so the decode thread never waits for the
event loop (measured in ``benchmarks/bench_worker.py``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from rbee.errors import BackendUnavailableError, BusyError, InvalidRequestError, ModelLoadError, RbeeError
from rbee.requests import Message, SamplingParams
from rbee.worker.native_lib import LoadProgressSink, TokenSink, c_string, check, last_native_error, native
from rbee.worker.native_thread import EngineThread

#: ``stop_reason`` values, indexed by ``rbee_stop_reason``.
STOP_REASONS = ("none", "max_tokens", "stop_sequence", "eos", "cancelled")
#: rbee's backend names and the ggml registry names they stand for.
_REGISTRIES = {"CPU": "cpu", "CUDA": "cuda", "MTL": "metal", "METAL": "metal"}
_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: let llama.cpp pick
#: Streams one engine serves at once when not told otherwise.
DEFAULT_SLOTS = 4
#: What a request continues: prompt text, or a conversation rendered with the chat template.
Prompt = Union[str, Sequence[Message]]
#: Prompt tokens evaluated per step (over all streams in prefill). Measured on 2 cores
#: with Gemma-3 270M (benchmarks/bench_batching.py): a 256-token chunk takes about as
#: long as ~20 decode steps, so running streams keep flowing while a long prompt is
#: evaluated, and the prompt throughput is within a few % of 512-token batches.
DEFAULT_CHUNK = 256
#: A model load reports its progress in these steps (percent of the weights' bytes).
LOAD_PROGRESS_STEP = 10


class LoadSteps:
    """llama.cpp's load progress (a fraction per tensor) as fixed steps:
    ``on_step(percent)`` once for each multiple of ``LOAD_PROGRESS_STEP`` the load passes,
    10, 20, ... 100, in order, whatever the fractions (Gemma-3 270M's first tensor, the
    token embedding, is 72% of its weights: 10 to 70 come together).

    Steps rather than a clock: a sub-second load reports every step too, so what a user
    (or a test) sees does not depend on the disk's speed. ``on_step`` returning False stops
    the load (``stopped``).
    """

    def __init__(self, on_step: Callable[[int], bool | None]) -> None:
        self.on_step = on_step
        self.reported = 0
        self.stopped = False

    def report(self, fraction: float) -> bool:
        """Report the steps up to ``fraction``; False once the load is to stop."""
        # The fraction is a C float: 0.7 arrives as 0.69999998..., which is 70% all the same.
        reached = min(100, int(fraction * 100 + 1e-3)) // LOAD_PROGRESS_STEP * LOAD_PROGRESS_STEP
        while self.reported < reached and not self.stopped:
            self.reported += LOAD_PROGRESS_STEP
            if self.on_step(self.reported) is False:
                self.stopped = True
        return not self.stopped

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
    #: Of ``prompt_tokens``, those reused from the KV cache instead of being evaluated.
    prompt_tokens_cached: int = 0


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
        # The bytes themselves are never quoted: they may be another file's (a symlink).
        raise ModelLoadError(f"not a GGUF model file (it does not begin with the GGUF magic): {path}",
                             details={"path": str(path)})


def _free_handles(context: Any, model: Any) -> None:
    """The one place native handles are freed, in the one order (context, with its
    sequences → model: nothing outlives what it borrows). NULL handles are fine."""
    lib = native().lib
    lib.rbee_context_free(context)
    lib.rbee_model_free(model)


def _result(out: Any) -> GenerationResult:
    return GenerationResult(
        prompt_tokens=out.prompt_tokens, tokens_out=out.pieces_emitted, stop_reason=STOP_REASONS[out.stop_reason],
        prefill_ms=out.prefill_ms, time_to_first_token_ms=out.time_to_first_token_ms,
        decode_time_ms=out.decode_ms, tokens_per_sec=out.tokens_per_sec, sample_ms=out.sample_ms,
        callback_ms=out.callback_ms, prompt_tokens_cached=out.prompt_tokens_cached,
    )


class Request:
    """One submitted generation. Its callbacks run on the engine thread: ``on_piece(i,
    text)`` per piece of whole UTF-8 text, ``on_prefill(done, total)`` per prompt chunk
    while the prompt is still being evaluated, and ``on_finish(result, error)`` once
    (exactly one of them is None). ``cancel()`` may be called from any thread."""

    __slots__ = ("prompt", "params", "chat", "cache_prompt", "grammar", "notify_fd", "on_piece", "on_prefill",
                 "on_finish", "abort", "result", "error", "done", "_seq", "_cancelled", "_lock")

    def __init__(self, prompt: Prompt, params: SamplingParams, *, chat: bool, cache_prompt: bool,
                 grammar: str | None, notify_fd: int,
                 on_piece: Callable[[int, str], object] | None, on_prefill: Callable[[int, int], object] | None,
                 on_finish: Callable[[GenerationResult | None, BaseException | None], object] | None,
                 abort: AbortFlag | None) -> None:
        self.prompt, self.params, self.chat, self.cache_prompt = prompt, params, chat, cache_prompt
        self.grammar = grammar
        self.notify_fd = notify_fd
        self.on_piece, self.on_prefill, self.on_finish = on_piece, on_prefill, on_finish
        self.abort = abort
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._seq: Any = None  # the C sequence while it runs (engine thread only)
        self._cancelled = False
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """End the request at the next step (within one prefill chunk); idempotent."""
        with self._lock:
            self._cancelled = True
            if self._seq is not None:
                native().lib.rbee_sequence_cancel(self._seq)

    @property
    def cancelled(self) -> bool:
        return self._cancelled or (self.abort is not None and self.abort.is_set())

    def _attach(self, seq: Any) -> None:  # engine thread
        with self._lock:
            self._seq = seq
            if self._cancelled:
                native().lib.rbee_sequence_cancel(seq)

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its result, or its error raised."""
        self.done.wait(timeout)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Engine:
    """One GGUF model loaded on one backend/device, with one context of ``n_slots``
    sequences served together. ``close`` (or leaving ``with``) ends every request and
    frees context → model, in that order."""

    def __init__(self, handles: tuple[Any, Any], thread: EngineThread, *, model_path: Path, backend: str,
                 device: int, n_threads: int) -> None:
        self._model, self._context = handles
        self._thread = thread
        self._model_path, self._backend, self._device, self._n_threads = model_path, backend, device, n_threads
        ffi, lib = native().ffi, native().lib
        info = ffi.new("rbee_model_info *")
        check(lib.rbee_model_get_info(self._model, info), "rbee_model_get_info")
        self._n_layers, self._n_params, self._size_bytes = info.n_layers, info.n_params, info.size_bytes
        self._description = c_string(info.description)
        self._n_ctx = lib.rbee_context_n_ctx_seq(self._context)
        self._n_slots = lib.rbee_context_n_seq_max(self._context)
        self._n_chunk = lib.rbee_context_n_chunk(self._context)
        self._events = ffi.new("rbee_event[]", lib.rbee_context_max_events(self._context))
        self._status = ffi.new("rbee_status *")
        #: Requests submitted and not yet finished (admission counts these).
        self._pending = 0
        self._lock = threading.Lock()
        self._running: dict[int, Request] = {}  # seq_id -> request (engine thread only)
        self._closed = False

    @classmethod
    def load(cls, model_path: str | os.PathLike[str], *, backend: str = "cpu", device: int = 0, n_ctx: int = 4096,
             n_threads: int | None = None, n_gpu_layers: int = -1, n_slots: int = DEFAULT_SLOTS,
             n_chunk: int = DEFAULT_CHUNK, on_progress: Callable[[int], bool | None] | None = None) -> Engine:
        """Load a GGUF (blocking). ``n_ctx`` is the tokens ONE stream may hold; the KV cache
        holds ``n_ctx × n_slots``. Fails fast, never falls back to the CPU:
        ``BackendUnavailableError`` names what is available, ``ModelLoadError`` names the file.

        ``on_progress(percent)`` is called on the engine's thread with 10, 20, ... 100 as the
        load passes each tenth of the weights' bytes (``LoadSteps``), every step even for a
        sub-second load; returning False stops the load (``ModelLoadError``), and an
        exception it raises stops it and is raised here."""
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
        if threads < 1 or n_ctx < 16 or not 1 <= n_slots <= 256 or n_chunk < 1:
            raise InvalidRequestError(f"need n_threads >= 1, n_ctx >= 16, 1 <= n_slots <= 256 and n_chunk >= 1, "
                                      f"got {threads}, {n_ctx}, {n_slots} and {n_chunk}")
        ffi, lib = native().ffi, native().lib
        model_out = ffi.new("rbee_model **")
        context_out = ffi.new("rbee_context **")
        backend_c = ffi.new("char[]", backend.encode())
        mparams = ffi.new("rbee_model_params *", {"backend": backend_c, "device": device, "n_gpu_layers": n_gpu_layers})
        cparams = ffi.new("rbee_context_params *", lib.rbee_context_default_params())
        cparams.n_ctx_seq, cparams.n_seq_max, cparams.n_chunk = n_ctx, n_slots, min(n_chunk, n_ctx)
        cparams.n_threads = threads
        # Flash attention off: the same kernels llama-cpp-python's default uses, so greedy
        # output matches it token for token.
        cparams.flash_attn = 0

        steps = LoadSteps(on_progress) if on_progress is not None else None
        progress = LoadProgressSink(steps.report) if steps is not None else None
        if progress is not None:
            mparams.progress = lib.rbee_py_on_load_progress

        def create() -> Engine:  # on the engine's own thread (see native_thread.py)
            handle = ffi.new_handle(progress) if progress is not None else ffi.NULL
            mparams.progress_user_data = handle  # the handle lives as long as this call
            try:
                status = lib.rbee_model_load(str(path).encode(), mparams, model_out)
                if status != 0 and progress is not None and progress.error is not None:
                    raise progress.error
                if status != 0 and steps is not None and steps.stopped:
                    raise ModelLoadError(f"loading {path} was stopped at {steps.reported}%",
                                         details={"path": str(path)})
                check(status, f"cannot load model {path}", details={"path": str(path)})
                if steps is not None:
                    steps.report(1.0)  # every weight is in: 100% even if llama.cpp never said 1.0
                check(lib.rbee_context_create(model_out[0], cparams, context_out), "rbee_context_create")
                engine = cls((model_out[0], context_out[0]), thread, model_path=path,
                             backend=backend, device=device, n_threads=threads)
            except BaseException:
                _free_handles(context_out[0], model_out[0])  # what was made so far
                raise
            thread.set_stepper(engine._step)
            return engine

        thread = EngineThread()
        try:
            return thread.call(create)
        except BaseException:
            thread.stop()
            raise

    model_path = property(lambda self: self._model_path, doc="Absolute path of the loaded GGUF.")
    backend = property(lambda self: self._backend, doc='"cpu", "cuda" or "metal".')
    device = property(lambda self: self._device, doc="Device index within the backend.")
    n_ctx = property(lambda self: self._n_ctx, doc="Tokens one stream may hold (prompt + generated).")
    n_slots = property(lambda self: self._n_slots, doc="Streams served at once (the context's sequences).")
    n_chunk = property(lambda self: self._n_chunk, doc="Prompt tokens evaluated per step (chunked prefill).")
    n_layers = property(lambda self: self._n_layers, doc="Transformer layers of the model.")
    n_params = property(lambda self: self._n_params, doc="Parameter count of the model.")
    size_bytes = property(lambda self: self._size_bytes, doc="Bytes of the model's tensors.")
    description = property(lambda self: self._description, doc='llama.cpp\'s, e.g. "gemma3 270M Q4_K - Medium".')
    n_threads = property(lambda self: self._n_threads, doc="CPU threads used for decode and prefill.")

    @property
    def busy_slots(self) -> int:
        """Requests submitted and not yet finished."""
        return self._pending

    def _handles(self) -> tuple[Any, Any]:
        if self._model is None:
            raise InvalidRequestError("the engine is closed")
        return self._model, self._context

    @property
    def chat_template(self) -> str:
        """The chat template ``chat`` and messages are rendered with: the GGUF's
        ``tokenizer.chat_template``, or, when it has none (``chat_template_builtin``), the
        name of llama.cpp's built-in template used instead (``gemma``, else ``chatml``)."""
        model, _ = self._handles()
        return c_string(native().lib.rbee_model_chat_template(model))

    @property
    def chat_template_builtin(self) -> bool:
        """True when the GGUF has no chat template and llama.cpp's built-in one is used."""
        ffi, lib = native().ffi, native().lib
        model, _ = self._handles()
        info = ffi.new("rbee_model_info *")
        check(lib.rbee_model_get_info(model, info), "rbee_model_get_info")
        return not info.has_chat_template

    def render_chat(self, messages: Sequence[Message], *, add_assistant: bool = True) -> str:
        """``messages`` rendered with the model's chat template, as a request with these
        messages is tokenized (``add_assistant``: the assistant's turn opened at the end)."""
        ffi, lib = native().ffi, native().lib
        model, _ = self._handles()
        self._check_request(tuple(messages), DEFAULT_PARAMS)
        array, keep = _message_array(messages)
        size = 256
        for _ in range(2):
            buf = ffi.new("char[]", size)
            n = lib.rbee_model_apply_chat_template(model, array, len(messages), add_assistant, buf, size)
            if n < 0:
                check(-n, "rbee_model_apply_chat_template", details=[_CHAT_PROBLEM["messages"]])
            if n <= size:
                return ffi.unpack(buf, n).decode("utf-8")
            size = n
        raise AssertionError("the rendering grew between two calls")

    def check_grammar(self, grammar: str, *, field: str = "grammar") -> None:
        """``InvalidRequestError`` naming ``field`` unless llama.cpp parses ``grammar`` (GBNF,
        start symbol ``root``) for this model's vocabulary."""
        ffi, lib = native().ffi, native().lib
        model, _ = self._handles()
        if "\0" in grammar:
            raise InvalidRequestError(f"{field}: the grammar contains a NUL character", details=[
                {"field": field, "constraint": "gbnf", "message": "the grammar contains a NUL character"}])
        status = lib.rbee_model_check_grammar(model, ffi.new("char[]", grammar.encode("utf-8")))
        if status != 0:
            why = last_native_error() or "llama.cpp refused it"
            raise InvalidRequestError(f"{field}: llama.cpp cannot parse the grammar: {why}", details=[
                {"field": field, "constraint": "gbnf", "message": f"llama.cpp cannot parse the grammar: {why}"}])

    def count_tokens(self, text: Prompt, *, chat: bool = False) -> int:
        """How many prompt tokens ``text`` becomes (BOS and chat template included); ``text``
        may be a conversation (a sequence of ``Message``), rendered with the chat template."""
        ffi, lib = native().ffi, native().lib
        model, _ = self._handles()
        self._check_request(text, DEFAULT_PARAMS)
        gp, keep = self._generate_params(text, DEFAULT_PARAMS, chat, True, None, -1)
        n = ffi.new("int32_t *")
        problem = None if isinstance(text, str) and not chat else _CHAT_PROBLEM["chat" if isinstance(text, str) else
                                                                                  "messages"]
        check(lib.rbee_model_count_request_tokens(model, gp, n), "rbee_model_count_request_tokens",
              details=[problem] if problem else None)
        del keep
        return n[0]

    def check_fits(self, prompt_tokens: int, params: SamplingParams) -> None:
        """``InvalidRequestError`` unless prompt + ``max_tokens`` fit one stream's context
        (``max_tokens`` None: unless the prompt leaves room for one token)."""
        wanted = 1 if params.max_tokens is None else params.max_tokens
        if prompt_tokens + wanted > self._n_ctx:
            limit = "no limit" if params.max_tokens is None else str(params.max_tokens)
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({limit}) "
                f"exceeds the context ({self._n_ctx})",
                details=[{"field": "max_tokens", "constraint": f"prompt_tokens + max_tokens <= {self._n_ctx}",
                          "message": f"the prompt is {prompt_tokens} tokens; at most "
                                     f"{max(0, self._n_ctx - prompt_tokens)} may be generated"}],
            )

    @staticmethod
    def _check_request(prompt: Prompt, params: SamplingParams) -> None:
        # The params were checked when they were built (``rbee.requests.SamplingParams``
        # refuses bad values on construction, and is frozen); so were Messages.
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be rbee.requests.SamplingParams, not {type(params).__name__}")
        if isinstance(prompt, str):
            return
        if (isinstance(prompt, (list, tuple)) and prompt
                and all(isinstance(m, Message) for m in prompt)):
            return
        raise InvalidRequestError("the prompt must be a string or a non-empty sequence of Message", details=[
            {"field": "prompt", "constraint": "type:string|messages",
             "message": "the prompt must be a string or a non-empty sequence of Message"}])

    def _generate_params(self, prompt: Prompt, params: SamplingParams, chat: bool, cache_prompt: bool,
                         grammar: str | None, notify_fd: int) -> tuple[Any, list[Any]]:
        """The C request parameters, and the buffers they point into (keep them alive)."""
        ffi, lib = native().ffi, native().lib
        keep: list[Any] = []
        gp = ffi.new("rbee_generate_params *", lib.rbee_generate_default_params())
        if isinstance(prompt, str):
            data = ffi.new("char[]", prompt.encode("utf-8"))
            keep.append(data)
            gp.prompt, gp.prompt_len, gp.chat = data, len(data) - 1, chat
        else:
            array, buffers = _message_array(prompt)
            keep += [array, buffers]
            gp.messages, gp.n_messages = array, len(prompt)
        stops = [ffi.new("char[]", s.encode("utf-8")) for s in params.stop]
        stop_array = ffi.new("const char *[]", stops) if stops else ffi.NULL
        keep += [stops, stop_array]
        if grammar:
            grammar_c = ffi.new("char[]", grammar.encode("utf-8"))
            keep.append(grammar_c)
            gp.grammar = grammar_c
        gp.max_tokens = -1 if params.max_tokens is None else params.max_tokens
        gp.temperature, gp.top_p = params.temperature, params.top_p
        gp.top_k, gp.min_p, gp.repeat_penalty = params.top_k, params.min_p, params.repeat_penalty
        gp.frequency_penalty, gp.presence_penalty = params.frequency_penalty, params.presence_penalty
        gp.seed = _RANDOM_SEED if params.seed is None else params.seed
        gp.stop, gp.n_stop, gp.cache_prompt, gp.notify_fd = stop_array, len(stops), cache_prompt, notify_fd
        return gp, keep

    def clear_cache(self) -> None:
        """Forget every cached prompt prefix of the free slots (blocking, on the engine
        thread): their memory back, and a known-empty cache for bit-exact comparisons."""
        _, context = self._handles()
        check(self._thread.call(lambda: native().lib.rbee_context_clear_cache(context)), "rbee_context_clear_cache")

    # -- many streams: submit and the step loop -------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams, *, chat: bool = False, cache_prompt: bool = True,
               grammar: str | None = None,
               on_piece: Callable[[int, str], object] | None = None,
               on_prefill: Callable[[int, int], object] | None = None,
               on_finish: Callable[[GenerationResult | None, BaseException | None], object] | None = None,
               notify_fd: int = -1, abort: AbortFlag | None = None) -> Request:
        """Queue a request; it joins the running streams at the next step.

        ``prompt`` is text (with ``chat``: one user message of the chat template) or a
        conversation (a sequence of ``Message``, rendered with the chat template, the
        assistant's turn opened). ``grammar`` (GBNF, start symbol ``root``) constrains what
        is generated; a grammar llama.cpp refuses ends this request with an
        ``InvalidRequestError`` (``check_grammar`` tells before).

        Raises at once: ``InvalidRequestError`` for a prompt that is neither (``params``
        were checked when built), ``BusyError`` when all ``n_slots`` are taken.
        ``notify_fd`` (non-blocking, or -1) gets a byte after every step that gave this
        request an event (see ``rbee_generate_params.notify_fd``)."""
        self._check_request(prompt, params)
        request = Request(prompt, params, chat=chat, cache_prompt=cache_prompt, grammar=grammar, notify_fd=notify_fd,
                          on_piece=on_piece, on_prefill=on_prefill, on_finish=on_finish, abort=abort)
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the engine is closed")
            if self._pending >= self._n_slots:
                raise BusyError(f"all {self._n_slots} slots of the engine are busy")
            self._pending += 1
        self._thread.post(lambda: self._start(request))
        return request

    def _start(self, request: Request) -> None:  # engine thread
        try:
            self._start_request(request)
        except BaseException as exc:  # never let a request's failure end the engine thread
            self._end(request, None, exc)

    def _start_request(self, request: Request) -> None:  # engine thread
        ffi, lib = native().ffi, native().lib
        if request.cancelled or self._context is None:
            self._end(request, _result(ffi.new("rbee_generation_result *", {"stop_reason": 4})), None)
            return
        gp, keep = self._generate_params(request.prompt, request.params, request.chat, request.cache_prompt,
                                         request.grammar, request.notify_fd)
        seq_out = ffi.new("rbee_sequence **")
        status = lib.rbee_context_submit(self._context, gp, seq_out)
        del keep
        if status != 0:
            try:
                if status == lib.RBEE_STATUS_PROMPT_TOO_LONG:
                    self.check_fits(self.count_tokens(request.prompt, chat=request.chat), request.params)
                if status == lib.RBEE_STATUS_GRAMMAR_FAILED:
                    check(status, "llama.cpp cannot parse the grammar", details=[
                        {"field": "grammar", "constraint": "gbnf", "message": "llama.cpp cannot parse the grammar"}])
                check(status, "rbee_context_submit")
            except RbeeError as exc:
                self._end(request, None, exc)
            return
        seq = seq_out[0]
        self._running[lib.rbee_sequence_id(seq)] = request
        request._attach(seq)

    def _step(self) -> bool:  # engine thread: one step; True while any stream is active
        ffi, lib = native().ffi, native().lib
        if not self._running or self._context is None:
            return False
        for request in self._running.values():
            if request.abort is not None and request.abort.is_set():
                request.cancel()
        events = self._events
        n = lib.rbee_context_step(self._context, events, len(events), self._status)
        for k in range(n):
            event = events[k]
            request = self._running.get(event.seq_id)
            if request is None:
                continue
            kind = event.kind
            if kind == lib.RBEE_EVENT_PIECE:
                if request.on_piece is not None:
                    # Whole UTF-8, by C's word.
                    _deliver(request, request.on_piece, event.index, ffi.unpack(event.text, event.len).decode("utf-8"))
            elif kind == lib.RBEE_EVENT_PREFILL:
                if request.on_prefill is not None:
                    _deliver(request, request.on_prefill, event.index, event.total)
            elif kind == lib.RBEE_EVENT_FINISHED:
                self._finish(event.seq_id, event.seq, request)
        if not self._running:
            lib.rbee_context_flush_notify(self._context)
        return bool(self._running)

    def _finish(self, seq_id: int, seq: Any, request: Request) -> None:  # engine thread
        ffi, lib = native().ffi, native().lib
        out = ffi.new("rbee_generation_result *")
        lib.rbee_sequence_get_result(seq, out)
        status = lib.rbee_sequence_status(seq)
        error: BaseException | None = request.error
        if status != 0 and error is None:
            why = c_string(lib.rbee_sequence_error(seq))
            error = _native_error(status, why)
        lib.rbee_sequence_release(seq)
        del self._running[seq_id]
        with request._lock:
            request._seq = None
        self._end(request, None if error is not None else _result(out), error)

    def _end(self, request: Request, result: GenerationResult | None, error: BaseException | None) -> None:
        request.result, request.error = result, error
        with self._lock:
            self._pending -= 1
        request.done.set()
        if request.on_finish is not None:
            request.on_finish(result, error)

    # -- one stream, blocking ------------------------------------------------------------

    def generate(self, prompt: Prompt, params: SamplingParams, *, on_token: Callable[[int, str], object] | None,
                 abort: AbortFlag | None = None, chat: bool = False, cache_prompt: bool = True,
                 grammar: str | None = None) -> GenerationResult:
        """Run one generation to its end (blocking) with the C one-shot loop, on the engine
        thread, while no other request runs (else ``BusyError``). ``on_token(i, text)``
        gets every piece on the engine thread (``None`` discards them in C: the bare loop);
        ``abort`` stops it at the next step."""
        self._check_request(prompt, params)
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the engine is closed")
            if self._pending:
                raise BusyError("the engine is serving other streams")
            self._pending += 1
        try:
            return self._thread.call(lambda: self._generate_now(prompt, params, on_token, abort, chat, cache_prompt,
                                                                grammar))
        finally:
            with self._lock:
                self._pending -= 1

    def _generate_now(self, prompt: Prompt, params: SamplingParams, on_token: Callable[[int, str], object] | None,
                      abort: AbortFlag | None, chat: bool, cache_prompt: bool, grammar: str | None) -> GenerationResult:
        ffi, lib = native().ffi, native().lib
        _, context = self._handles()
        gp, keep = self._generate_params(prompt, params, chat, cache_prompt, grammar, -1)
        # on_token=None runs the bare loop (a C callback that discards): the benchmark's baseline.
        sink = TokenSink(on_token) if on_token is not None else None
        handle = ffi.new_handle(sink) if sink is not None else ffi.NULL  # alive for the whole call
        callback = lib.rbee_py_on_token if sink is not None else lib.rbee_discard_token
        out = ffi.new("rbee_generation_result *")
        status = lib.rbee_context_generate(context, gp, abort._ptr if abort is not None else ffi.NULL,
                                           callback, handle, out)
        del keep
        if sink is not None and sink.error is not None:
            raise sink.error
        if lib.RBEE_STATUS_PROMPT_TOO_LONG == status:
            self.check_fits(out.prompt_tokens or self.count_tokens(prompt, chat=chat), params)
        check(status, "rbee_context_generate")
        return _result(out)

    def close(self) -> None:
        """End every request, then free context → model (idempotent). Running streams
        stop at once (a running decode is aborted) and get their ``on_finish``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        lib = native().lib
        if self._context is not None:
            lib.rbee_context_abort(self._context)  # any thread: the running decode stops

        def free() -> None:  # engine thread: no step runs meanwhile
            while self._running:
                if not self._step():
                    break
            context, model = self._context, self._model
            self._context = self._model = None
            _free_handles(context, model)

        self._thread.call(free)
        self._thread.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: Defaults for the calls that only tokenize.
DEFAULT_PARAMS = SamplingParams()
_CHAT_PROBLEM = {
    "chat": {"field": "chat", "constraint": "a chat template llama.cpp knows",
             "message": "cannot apply the model's chat template"},
    "messages": {"field": "messages", "constraint": "a chat template llama.cpp knows",
                 "message": "cannot apply the model's chat template"},
}


def _message_array(messages: Sequence[Message]) -> tuple[Any, list[Any]]:
    """``messages`` as a C ``rbee_chat_message[]``, and the strings it points into."""
    ffi = native().ffi
    buffers: list[Any] = []
    array = ffi.new("rbee_chat_message[]", len(messages))
    for k, message in enumerate(messages):
        if "\0" in message.content or "\0" in message.role:
            raise InvalidRequestError(f"messages[{k}] contains a NUL character", details=[
                {"field": f"messages[{k}].content", "constraint": "no_nul",
                 "message": f"messages[{k}].content must not contain a NUL character"}])
        role, content = ffi.new("char[]", message.role.encode()), ffi.new("char[]", message.content.encode("utf-8"))
        buffers += [role, content]
        array[k].role, array[k].content = role, content
    return array, buffers


def _deliver(request: Request, callback: Callable[..., object], *args: Any) -> None:
    """Call one of the request's callbacks; a failure there is the caller's bug: it ends
    that request (its error kept), never the step loop and the other streams."""
    try:
        callback(*args)
    except BaseException as exc:
        request.error = request.error or exc
        request.cancel()


def _native_error(status: int, why: str) -> RbeeError:
    """The ``RbeeError`` of a sequence that ended with ``status`` (``why``: its own error text)."""
    try:
        check(status, "rbee_context_step", why=why)
    except RbeeError as exc:
        return exc
    raise AssertionError("status was OK")
