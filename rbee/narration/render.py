"""The keeper's narration renderer: events to display lines, pure (it never prints).

``NarrationRenderer(mode).render(event)`` returns one line (no newline) or None when the
event shows nothing in that mode. Modes:

- ``human``: ``[actor] <emoji> human``; ``cute`` and ``story`` use the event's ``cute`` /
  ``story`` text when it has one, else ``human``;
- ``json``: the JSON-lines form of every event but tokens and the end marker;
- ``quiet``: errors only (level ``error`` narration and ``Error`` events).

Every line names a real component as its actor, never a pseudo-actor: typed events that
carry none are rendered as the component that sends them (``Loading`` as the worker's
``model-loader``, ``Prefill`` and ``Ready`` as ``llm-worker-rbee``, ``Error`` as the
``queen-rbee`` whose job stream carries it). Tokens, ``Started``, ``Metrics``, ``End``
and the end marker render as nothing: the keeper prints the generated text itself, and
its own summary line says what ``End`` says.

Download and load progress (narration with ``bytes_done`` or ``layers_done`` /
``layers_total`` in ``extra``, ``Loading`` and ``Prefill``) renders as a bar,
``[model-provisioner] ⬇ gemma.gguf [#####-----] 52% 130.0/253.1 MB 41.2 MB/s``;
``draws_bar(event)`` says which events do (the keeper redraws those in place). The speed
is ``extra["bytes_per_sec"]`` when given, else computed from the ``ts_ms`` and
``bytes_done`` of the previous event of the same actor and target. Debug narration shows
only with ``show_debug=True``.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import jsonlines
from .events import DONE, Error, Event, Loading, NarrationEvent, Prefill, Ready, Token

RENDER_MODES = ("human", "cute", "story", "json", "quiet")
#: The components that send the typed events which carry no actor of their own.
WORKER_ACTOR = "llm-worker-rbee"
#: The worker's model loader, as the seeds call it (``[model-loader] 📦 Loading ...``).
LOADER_ACTOR = "model-loader"
QUEEN_ACTOR = "queen-rbee"
BAR_WIDTH = 10
MEGABYTE = 1_000_000  # decimal, as download sizes are quoted

_LEVEL_EMOJI = {"error": "❌", "warn": "⚠️", "debug": "🔍"}
# The seeds' emoji for the model load: the start (and its bar) and the end.
_PHASE_EMOJI = {("model_load", "start"): "📦", ("model_load", "progress"): "📦", ("model_load", "done"): "🛏️"}
# First matching word of the action wins; the order puts specific words first.
_ACTION_EMOJI = (
    ("download", "⬇"),
    ("stdout", "📄"),
    ("bind", "🔌"),
    ("ready", "✅"),
    ("spawn", "🚀"),
    ("assemble", "📦"),
    ("load", "⏳"),
    ("device", "🖥️"),
    ("tokenize", "🍰"),
    ("startup", "🌅"),
    ("hive_start", "🌅"),
    ("queen_start", "🌅"),
    ("shutdown", "🛑"),
    ("stop", "🛑"),
    ("cancel", "🛑"),
    ("infer", "💬"),
    ("token", "💬"),
    ("ssh", "🔐"),
    ("preflight", "🧪"),
    ("detect", "🔎"),
    ("complete", "✅"),
    ("done", "✅"),
)
_DEFAULT_EMOJI = "🐝"


def emoji_for(level: str, action: str, phase: object = None) -> str:
    """The emoji of a narration line: by level for warn/error/debug, else by action (and
    its ``phase`` extra, for the model load's start and end)."""
    by_level = _LEVEL_EMOJI.get(level)
    if by_level is not None:
        return by_level
    by_phase = _PHASE_EMOJI.get((action, phase)) if isinstance(phase, str) else None
    if by_phase is not None:
        return by_phase
    for word, emoji in _ACTION_EMOJI:
        if word in action:
            return emoji
    return _DEFAULT_EMOJI


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#####-----]`` for ``fraction`` in 0..1 (clamped)."""
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _megabytes(n: float) -> str:
    return f"{n / MEGABYTE:.1f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class NarrationRenderer:
    """Turns stream events into display lines for one ``mode`` of ``RENDER_MODES``."""

    def __init__(self, mode: str = "human", *, show_debug: bool = False) -> None:
        if mode not in RENDER_MODES:
            raise ValueError(f"narration mode must be one of {RENDER_MODES}, not {mode!r}")
        self.mode = mode
        self.show_debug = show_debug
        # (actor, target) -> (ts_ms, bytes_done) of the last progress event, for the speed.
        self._last_progress: dict[tuple[str, str], tuple[int, float]] = {}

    def draws_bar(self, event: Event) -> bool:
        """True when ``event`` renders as a progress bar (in a mode that shows bars): the
        keeper redraws such a line in place on a terminal and leaves it out elsewhere."""
        if self.mode in ("json", "quiet"):
            return False
        kind = type(event)
        if kind is Prefill:
            return True
        if kind is Loading:
            return event.bytes_done is not None or (event.layers_done is not None and bool(event.layers_total))
        if kind is not NarrationEvent or event.level in ("error", "warn") or (
            event.level == "debug" and not self.show_debug
        ):
            return False
        extra = event.extra
        return _is_number(extra.get("bytes_done")) or (
            _is_number(extra.get("layers_done")) and _is_number(extra.get("layers_total"))
        )

    def render(self, event: Event) -> str | None:
        """One display line for ``event``, or None to show nothing."""
        if type(event) is Token or event is DONE:
            return None
        if self.mode == "json":
            return jsonlines.encode(event).decode("utf-8").rstrip("\n")
        if self.mode == "quiet":
            if type(event) is Error or (type(event) is NarrationEvent and event.level == "error"):
                return self._render_human(event)
            return None
        return self._render_human(event)

    def _render_human(self, event: Event) -> str | None:
        kind = type(event)
        if kind is NarrationEvent:
            return self._render_narration(event)
        if kind is Loading:
            return self._render_loading(event)
        if kind is Prefill:
            share = event.tokens_done / event.tokens_total if event.tokens_total > 0 else 0.0
            return (f"[{WORKER_ACTOR}] ⏳ prompt {progress_bar(share)} "
                    f"{event.tokens_done}/{event.tokens_total} tokens")
        if kind is Error:
            return f"[{QUEEN_ACTOR}] ❌ {event.code}: {event.message}"
        if kind is Ready:
            where = f" at {event.url}" if event.url else ""
            who = event.worker_id or "the worker"
            return f"[{WORKER_ACTOR}] ✅ {who} is ready{where}"
        # End: the keeper's summary says it; Started, Metrics, UnknownEvent: nothing to say.
        return None

    def _render_narration(self, event: NarrationEvent) -> str | None:
        if event.level == "debug" and not self.show_debug:
            return None
        # A warning or an error is said in words, even when it carries figures.
        bar = None if event.level in ("error", "warn") else self._progress(
            event.actor, event.target, event.ts_ms, event.extra)
        emoji = emoji_for(event.level, event.action, event.extra.get("phase"))
        if bar is not None:
            what = event.target.rsplit("/", 1)[-1] or event.action  # a file's name, not its path
            return f"[{event.actor}] {emoji} {what} {bar}"
        text = event.human
        if self.mode == "cute" and event.cute:
            text = event.cute
        elif self.mode == "story" and event.story:
            text = event.story
        return f"[{event.actor}] {emoji} {text}"

    def _render_loading(self, event: Loading) -> str:
        extra = {
            "bytes_done": event.bytes_done,
            "bytes_total": event.bytes_total,
            "layers_done": event.layers_done,
            "layers_total": event.layers_total,
        }
        bar = self._progress(LOADER_ACTOR, event.stage, None, extra)
        return f"[{LOADER_ACTOR}] 📦 {event.stage or 'model'} {bar or ''}".rstrip()

    def _progress(
        self, actor: str, target: str, ts_ms: int | None, extra: Mapping[str, Any]
    ) -> str | None:
        done, total = extra.get("bytes_done"), extra.get("bytes_total")
        if _is_number(done):
            parts = []
            if _is_number(total) and total > 0:
                parts += [progress_bar(done / total), f"{int(done * 100 // total)}%"]
                parts.append(f"{_megabytes(done)}/{_megabytes(total)} MB")
            else:
                parts.append(f"{_megabytes(done)} MB")
            speed = self._speed(actor, target, ts_ms, done, extra.get("bytes_per_sec"))
            if speed is not None:
                parts.append(f"{_megabytes(speed)} MB/s")
            return " ".join(parts)
        done, total = extra.get("layers_done"), extra.get("layers_total")
        if _is_number(done) and _is_number(total) and total > 0:
            return f"{progress_bar(done / total)} {done}/{total} layers"
        return None

    def _speed(
        self, actor: str, target: str, ts_ms: int | None, done: float, given: Any
    ) -> float | None:
        if _is_number(given):
            return float(given)
        if ts_ms is None:
            return None
        key = (actor, target)
        previous = self._last_progress.get(key)
        self._last_progress[key] = (ts_ms, done)
        if previous is None or ts_ms <= previous[0] or done < previous[1]:
            return None
        return (done - previous[1]) * 1000 / (ts_ms - previous[0])
