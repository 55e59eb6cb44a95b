"""The typed values that travel in rbee's streams.

Every event is a frozen, slotted dataclass with a class-level ``type`` (the SSE ``event:``
name and the ``"type"`` key of the JSON form). ``DONE`` marks the end of a stream.
The codec modules (``sse``, ``jsonlines``) turn these into bytes and back; nothing here
does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

#: The value types allowed in ``NarrationEvent.extra``.
ExtraValue = str | int | float | bool | None

LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True, slots=True)
class NarrationEvent:
    """What a component tells the user about what it is doing.

    ``extra`` holds free numeric/string fields (``bytes_done``, ``tokens_out``,
    ``duration_ms`` ...); on the wire they sit beside the named fields.
    """

    type: ClassVar[str] = "narration"

    actor: str
    action: str
    target: str = ""
    human: str = ""
    cute: str | None = None
    story: str | None = None
    level: str = "info"
    job_id: str | None = None
    correlation_id: str | None = None
    worker_id: str | None = None
    node: str | None = None
    ts_ms: int | None = None
    extra: Mapping[str, ExtraValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Started:
    """A request began; the first event of an inference stream."""

    type: ClassVar[str] = "started"

    job_id: str | None = None
    worker_id: str | None = None
    model: str | None = None
    ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Token:
    """One piece of generated text (always whole UTF-8 characters); ``i`` counts from 0."""

    type: ClassVar[str] = "token"

    t: str
    i: int


@dataclass(frozen=True, slots=True)
class Metrics:
    """Timing of one request, sent once just before ``End``."""

    type: ClassVar[str] = "metrics"

    prompt_tokens: int = 0
    tokens_out: int = 0
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_time_ms: float = 0.0
    tokens_per_sec: float = 0.0
    #: Of ``prompt_tokens``, those reused from the KV cache (prompt-prefix reuse).
    prompt_tokens_cached: int = 0


@dataclass(frozen=True, slots=True)
class End:
    """The request finished; ``stop_reason`` is max_tokens|stop_sequence|eos|cancelled."""

    type: ClassVar[str] = "end"

    tokens_out: int
    decode_time_ms: float
    tokens_per_sec: float
    stop_reason: str
    prompt_tokens_cached: int = 0


@dataclass(frozen=True, slots=True)
class Prefill:
    """Progress of a long prompt's evaluation: one per prefill chunk, so that a slow
    prefill is seen as progress, not as a stall (``tokens_done`` of ``tokens_total``)."""

    type: ClassVar[str] = "prefill"

    tokens_done: int
    tokens_total: int


@dataclass(frozen=True, slots=True)
class Error:
    """The request failed; ``code`` is a stable string, ``message`` names cause and fix."""

    type: ClassVar[str] = "error"

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Loading:
    """Progress of something slow: a model load (layers) or a download (bytes)."""

    type: ClassVar[str] = "loading"

    stage: str = ""
    layers_done: int | None = None
    layers_total: int | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """A worker finished loading and takes requests (or a download completed)."""

    type: ClassVar[str] = "ready"

    worker_id: str | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class WorkerChange:
    """A hive's news about one of its workers (its ``GET /v1/events`` stream).

    ``change`` is ``present`` (a live worker, sent to a new subscriber), ``spawned``
    (its process started; state ``loading``), ``ready`` (its ready callback came),
    ``capacity`` (its busy slot count changed), ``stopping`` (its stop began; ``reason``
    says why) or ``exited`` (deregistered; ``reason`` and ``exit_code`` say why). ``state`` is ``loading``, ``idle``, ``busy``, ``full``,
    ``stopping`` or ``exited``.
    """

    type: ClassVar[str] = "worker"

    change: str
    worker_id: str
    state: str
    #: The catalog's canonical reference of the model.
    model_ref: str = ""
    #: Of the GGUF file the worker loaded.
    sha256: str | None = None
    backend: str = "cpu"
    device: int = 0
    url: str = ""
    #: The worker's key (the stream is for the hive's parent only).
    api_key: str | None = None
    pid: int | None = None
    ctx_size: int | None = None
    slots_total: int = 1
    slots_busy: int = 0
    #: The memory the preflight planned for the worker.
    memory_bytes: int = 0
    #: The hive's idle unload timeout in seconds (0: never).
    idle_timeout_s: float = 0.0
    #: ``exited``: why, in words (idle timeout, asked over HTTP, hive shutdown, crashed: exit code N / signal N).
    reason: str | None = None
    exit_code: int | None = None
    ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event type this version does not know; kept whole so nothing is lost."""

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Done:
    """The end-of-stream marker (``data: [DONE]`` on SSE)."""

    type: ClassVar[str] = "done"


DONE = Done()

#: Every typed event class, by its wire ``type``.
EVENT_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (NarrationEvent, Started, Token, Prefill, Metrics, End, Error, Loading, Ready, WorkerChange)
}

Event = (
    NarrationEvent | Started | Token | Prefill | Metrics | End | Error | Loading | Ready | WorkerChange
    | UnknownEvent | Done
)
