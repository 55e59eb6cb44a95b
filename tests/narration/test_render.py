"""The keeper's renderer: lines per mode, emojis, progress bars; pure (returns strings).

Every line's actor is a real component: the typed events that carry none are rendered as
the component that sends them, never as ``[end]``, ``[error]``, ``[loading]``...
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from rbee.narration.events import (
    DONE,
    End,
    Error,
    Loading,
    Metrics,
    NarrationEvent,
    Prefill,
    Ready,
    Started,
    Token,
    UnknownEvent,
)
from rbee.narration.render import NarrationRenderer, emoji_for, progress_bar

from .strategies import events

SPAWN = NarrationEvent(
    "rbee-hive",
    "worker_spawn",
    human="Spawning worker w1",
    cute="Waking up a little bee 🐝",
    story="'Go!' said the hive to w1.",
)
PLAIN = NarrationEvent("queen-rbee", "job_submit", human="Job accepted")


@pytest.mark.parametrize(
    ("mode", "event", "line"),
    [
        ("human", SPAWN, "[rbee-hive] 🚀 Spawning worker w1"),
        ("cute", SPAWN, "[rbee-hive] 🚀 Waking up a little bee 🐝"),
        ("story", SPAWN, "[rbee-hive] 🚀 'Go!' said the hive to w1."),
        # cute and story fall back to human when the event has no such text
        ("cute", PLAIN, "[queen-rbee] 🐝 Job accepted"),
        ("story", PLAIN, "[queen-rbee] 🐝 Job accepted"),
        ("quiet", SPAWN, None),
        ("human", NarrationEvent("w", "model_load", human="x", level="error"), "[w] ❌ x"),
        ("quiet", NarrationEvent("w", "model_load", human="x", level="error"), "[w] ❌ x"),
        (
            "human",
            NarrationEvent("w", "model_load", human="slow disk", level="warn"),
            "[w] ⚠️ slow disk",
        ),
        ("human", NarrationEvent("w", "model_load", human="Loading"), "[w] ⏳ Loading"),
        # The seeds' emoji for the model load's start and end.
        ("human", NarrationEvent("model-loader", "model_load", human="Loading model", extra={"phase": "start"}),
         "[model-loader] 📦 Loading model"),
        ("human", NarrationEvent("model-loader", "model_load", human="Model loaded!", extra={"phase": "done"}),
         "[model-loader] 🛏️ Model loaded!"),
        ("human", NarrationEvent("llm-worker-rbee", "startup", human="Starting"), "[llm-worker-rbee] 🌅 Starting"),
        ("human", NarrationEvent("w", "server_bind", human="Listening"), "[w] 🔌 Listening"),
        ("human", NarrationEvent("w", "x", human="noise", level="debug"), None),
        (
            "human",
            Error("model_load_failed", "no such file"),
            "[queen-rbee] ❌ model_load_failed: no such file",
        ),
        ("quiet", Error("busy", "try later"), "[queen-rbee] ❌ busy: try later"),
        # The keeper's summary line says what `end` says: no `[end]` line.
        ("human", End(10, 250.0, 40.0, "eos"), None),
        (
            "human",
            Ready(worker_id="w1", url="http://127.0.0.1:9300"),
            "[llm-worker-rbee] ✅ w1 is ready at http://127.0.0.1:9300",
        ),
        ("human", Prefill(256, 1024), "[llm-worker-rbee] ⏳ prompt [##--------] 256/1024 tokens"),
        ("human", Token("hi", 0), None),
        ("human", DONE, None),
        ("human", Started(), None),
        ("human", Metrics(), None),
        ("human", UnknownEvent("later", {}), None),
        ("json", Token("hi", 0), None),
        ("json", DONE, None),
    ],
)
def test_render_table(mode, event, line):
    assert NarrationRenderer(mode).render(event) == line


def test_debug_lines_show_when_asked():
    event = NarrationEvent("w", "x", human="noise", level="debug")
    assert NarrationRenderer("human", show_debug=True).render(event) == "[w] 🔍 noise"


def test_json_mode_gives_the_json_line_without_newline():
    line = NarrationRenderer("json").render(SPAWN)
    assert "\n" not in line
    assert json.loads(line)["cute"] == SPAWN.cute


def test_download_progress_bar_with_given_speed():
    event = NarrationEvent(
        "model-provisioner",
        "model_download",
        target="gemma.gguf",
        extra={"bytes_done": 132_000_000, "bytes_total": 253_113_024, "bytes_per_sec": 41_200_000},
    )
    assert NarrationRenderer("human").render(event) == (
        "[model-provisioner] ⬇ gemma.gguf [#####-----] 52% 132.0/253.1 MB 41.2 MB/s"
    )


def test_download_speed_is_computed_from_successive_events():
    renderer = NarrationRenderer("cute")

    def at(ts_ms, done):
        return NarrationEvent(
            "model-provisioner",
            "model_download",
            target="gemma.gguf",
            ts_ms=ts_ms,
            extra={"bytes_done": done, "bytes_total": 200_000_000},
        )

    assert (
        renderer.render(at(1_000, 0))
        == "[model-provisioner] ⬇ gemma.gguf [----------] 0% 0.0/200.0 MB"
    )
    assert renderer.render(at(3_000, 100_000_000)) == (
        "[model-provisioner] ⬇ gemma.gguf [#####-----] 50% 100.0/200.0 MB 50.0 MB/s"
    )
    assert renderer.render(at(4_000, 200_000_000)) == (
        "[model-provisioner] ⬇ gemma.gguf [##########] 100% 200.0/200.0 MB 100.0 MB/s"
    )


def test_unknown_total_shows_bytes_only_and_layers_show_a_bar():
    renderer = NarrationRenderer("human")
    assert renderer.render(
        NarrationEvent("p", "model_download", target="m", extra={"bytes_done": 5_000_000})
    ) == ("[p] ⬇ m 5.0 MB")
    layers = NarrationEvent(
        "llm-worker-rbee",
        "model_load",
        target="gemma",
        extra={"layers_done": 9, "layers_total": 18},
    )
    assert renderer.render(layers) == "[llm-worker-rbee] ⏳ gemma [#####-----] 9/18 layers"


def test_loading_events_render_as_bars_of_the_model_loader():
    renderer = NarrationRenderer("human")
    assert renderer.render(Loading("loaded", layers_done=18, layers_total=18)) == (
        "[model-loader] 📦 loaded [##########] 18/18 layers"
    )
    assert renderer.render(Loading("loading", bytes_done=1_000_000, bytes_total=4_000_000)) == (
        "[model-loader] 📦 loading [##--------] 25% 1.0/4.0 MB"
    )
    assert renderer.render(Loading()) == "[model-loader] 📦 model"


def test_a_load_progress_step_is_a_bar_named_by_the_file_not_its_path():
    step = NarrationEvent("model-loader", "model_load", target="/models/gemma.gguf", human="Loading gemma.gguf: 50%",
                          extra={"phase": "progress", "bytes_done": 100_000_000, "bytes_total": 200_000_000,
                                 "bytes_per_sec": 400_000_000})
    assert NarrationRenderer("story").render(step) == (
        "[model-loader] 📦 gemma.gguf [#####-----] 50% 100.0/200.0 MB 400.0 MB/s"
    )


@pytest.mark.parametrize(
    ("mode", "event", "bar"),
    [
        ("human", NarrationEvent("p", "download_progress", extra={"bytes_done": 1, "bytes_total": 2}), True),
        ("cute", NarrationEvent("p", "model_load", extra={"layers_done": 1, "layers_total": 2}), True),
        ("human", Prefill(1, 2), True),
        ("human", Loading("loading", bytes_done=0, bytes_total=2), True),
        # A start line carries the total only: it is a line, not a bar.
        ("human", NarrationEvent("p", "model_load", extra={"bytes_total": 2}), False),
        ("human", Loading("starting"), False),
        # A warning or an error with figures is said in words.
        ("human", NarrationEvent("p", "download_progress", level="warn", extra={"bytes_done": 1}), False),
        ("human", NarrationEvent("p", "x", human="noise", level="debug", extra={"bytes_done": 1}), False),
        ("json", NarrationEvent("p", "download_progress", extra={"bytes_done": 1, "bytes_total": 2}), False),
        ("quiet", Prefill(1, 2), False),
        ("human", End(1, 1.0, 1.0, "eos"), False),
    ],
)
def test_draws_bar_says_which_lines_are_bars(mode, event, bar):
    assert NarrationRenderer(mode).draws_bar(event) is bar


def test_a_warning_with_figures_is_a_line_of_words():
    event = NarrationEvent("p", "download_progress", human="slow: 1 MB/s", level="warn", extra={"bytes_done": 1})
    assert NarrationRenderer("human").render(event) == "[p] ⚠️ slow: 1 MB/s"


def test_helpers():
    assert progress_bar(0.5) == "[#####-----]"
    assert progress_bar(-1) == "[----------]" and progress_bar(7) == "[##########]"
    assert emoji_for("info", "model_download") == "⬇"
    assert emoji_for("error", "model_download") == "❌"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        NarrationRenderer("loud")


@settings(max_examples=150, deadline=None)
@given(events)
def test_any_event_renders_to_one_line_or_nothing_in_every_mode(event):
    for mode in ("human", "cute", "story", "json", "quiet"):
        line = NarrationRenderer(mode, show_debug=True).render(event)
        assert line is None or isinstance(line, str)
        if mode == "json" and line is not None:
            assert "\n" not in line
        if mode != "json" and line is not None:
            # No pseudo-actor: a narration's own actor, else the component that sends it.
            actor = event.actor if isinstance(event, NarrationEvent) else None
            assert line.startswith(f"[{actor}] ") if actor is not None else line.startswith(
                ("[llm-worker-rbee] ", "[model-loader] ", "[queen-rbee] ")), line
