"""``narrate()``: build a narration event, redact it and hand it to the current sink.

Routing: a job sets ``narration_context(job_id=..., sink=...)`` once; every ``narrate()``
inside that block (and in Trio tasks started inside it: Trio copies the context into child
tasks) carries the job's ``job_id``/``correlation_id`` and goes to the job's sink, e.g.
its SSE channel's ``send_nowait``. Everything else goes to the process sink, by default
JSON lines on stdout, which a parent process reads.

This module is the one adapter of the narration package that touches I/O: the default
process sink writes to ``sys.stdout.buffer``. The codec modules stay sans-I/O.

Rules:
- An event with no ``job_id`` never reaches a job sink (it goes to the process sink).
- A sink is a plain non-blocking callable ``sink(event) -> None``. A job sink that raises
  ``trio.WouldBlock`` (its buffer is full), ``trio.BrokenResourceError`` or
  ``trio.ClosedResourceError`` (its reader went away) does not fail the caller: the event
  goes to the process sink instead. Any other exception is a bug and propagates.
- The default process sink ignores a stdout that is closed or whose reader is gone
  (narration must never take a daemon down); it flushes after each line because the
  parent reads the lines as they come (``server_bind`` first of all).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import trio

from . import jsonlines
from .events import LEVELS, ExtraValue, NarrationEvent
from .redact import redact_event
from .wire import RESERVED_EXTRA_KEYS

Sink = Callable[[NarrationEvent], None]


@dataclass(frozen=True, slots=True)
class _JobContext:
    job_id: str | None = None
    correlation_id: str | None = None
    sink: Sink | None = None


_context: contextvars.ContextVar[_JobContext] = contextvars.ContextVar(
    "rbee_narration_context", default=_JobContext()
)


def stdout_sink(event: NarrationEvent) -> None:
    """Write ``event`` as one JSON line to stdout and flush (the default process sink)."""
    line = jsonlines.encode(event)
    try:
        out = sys.stdout.buffer
        out.write(line)
        out.flush()
    except (BrokenPipeError, ValueError, AttributeError):
        # The reader is gone, stdout is closed, or it was replaced by a text-only
        # object: nobody can read this narration, and it must not crash the program.
        pass


_process_sink: Sink = stdout_sink


def set_process_sink(sink: Sink) -> Sink:
    """Make ``sink`` the process sink (tests, the keeper's renderer); returns the old one."""
    global _process_sink
    previous, _process_sink = _process_sink, sink
    return previous


def get_process_sink() -> Sink:
    """The current process sink."""
    return _process_sink


def current_job_id() -> str | None:
    """The ``job_id`` of the enclosing ``narration_context``, or None."""
    return _context.get().job_id


@contextlib.contextmanager
def outside_jobs() -> Iterator[None]:
    """Within the block, ``narrate()`` belongs to no job: its events go to the process
    sink. For what a daemon says of its own life (a node lost or back) from a task that
    a job happened to start, and that outlives it (Trio tasks inherit their starter's
    context, and with it the job's sink)."""
    token = _context.set(_JobContext())
    try:
        yield
    finally:
        _context.reset(token)


def current_correlation_id() -> str | None:
    """The ``correlation_id`` of the enclosing ``narration_context``, or None."""
    return _context.get().correlation_id


@contextlib.contextmanager
def narration_context(
    job_id: str | None = None,
    correlation_id: str | None = None,
    sink: Sink | None = None,
) -> Iterator[None]:
    """Within the block, ``narrate()`` carries these ids and sends to ``sink``.

    An argument left as None keeps the value of an enclosing context, so a nested block
    can add a correlation id without losing the job's sink.
    """
    outer = _context.get()
    token = _context.set(
        _JobContext(
            job_id=outer.job_id if job_id is None else job_id,
            correlation_id=outer.correlation_id if correlation_id is None else correlation_id,
            sink=outer.sink if sink is None else sink,
        )
    )
    try:
        yield
    finally:
        _context.reset(token)


def narrate(
    actor: str,
    action: str,
    human: str,
    *,
    target: str = "",
    level: str = "info",
    cute: str | None = None,
    story: str | None = None,
    worker_id: str | None = None,
    node: str | None = None,
    **extra: ExtraValue,
) -> NarrationEvent:
    """Build, redact and emit one narration event; returns the event as emitted.

    ``job_id``, ``correlation_id`` come from ``narration_context``, ``ts_ms`` is the wall
    clock in milliseconds. ``extra`` keys sit beside the named fields on the wire, so they
    may not be a named field, and their values are str, int, float, bool or None
    (``TypeError`` otherwise).
    """
    if level not in LEVELS:
        raise ValueError(f"narration level must be one of {LEVELS}, not {level!r}")
    clash = RESERVED_EXTRA_KEYS.intersection(extra)
    if clash:
        raise TypeError(f"narrate() extra fields may not be named {sorted(clash)}")
    for key, value in extra.items():
        # Caught here, at the call site, rather than as an encoding error inside a sink.
        if value is not None and not isinstance(value, (str, int, float)):
            raise TypeError(f"narrate() extra field {key}={value!r} is not a str, number or None")
    ctx = _context.get()
    event = redact_event(
        NarrationEvent(
            actor=actor,
            action=action,
            target=target,
            human=human,
            cute=cute,
            story=story,
            level=level,
            job_id=ctx.job_id,
            correlation_id=ctx.correlation_id,
            worker_id=worker_id,
            node=node,
            ts_ms=time.time_ns() // 1_000_000,
            extra=extra,
        )
    )
    # Routed by the context's job, not the event's job_id: redaction may have changed it.
    if ctx.job_id is not None and ctx.sink is not None:
        _send_to_job(ctx.sink, event)
    else:
        _process_sink(event)
    return event


def emit(event: NarrationEvent) -> None:
    """Hand an already built (and redacted) event to the sink its ``job_id`` selects.

    It goes to the current job's sink only if it carries that job's id.
    """
    ctx = _context.get()
    if ctx.sink is not None and event.job_id is not None and event.job_id == ctx.job_id:
        _send_to_job(ctx.sink, event)
    else:
        _process_sink(event)


def _send_to_job(sink: Sink, event: NarrationEvent) -> None:
    try:
        sink(event)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        # The job's reader is slow or gone: the process sink still shows the event.
        _process_sink(event)
