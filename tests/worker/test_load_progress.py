"""Model load progress from llama.cpp's progress callback, in fixed 10% steps.

The embedded model loads in about a second, and all of its weights' progress comes in the
last ~40 ms of it (its first tensor alone is 72% of the bytes): steps, not a clock, are
what lets every one of them be seen. Checked at three levels: ``LoadSteps`` (pure), the
engine (the real load through the C callback), the worker (stdout narration and the
``/v1/loading/progress`` SSE).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from rbee.errors import ModelLoadError
from rbee.narration import sse
from rbee.worker.engine import LOAD_PROGRESS_STEP, Engine, LoadSteps

from tests.processes import RbeeProcess

from .workers import HTTP_TIMEOUT, start_worker

EVERY_STEP = list(range(LOAD_PROGRESS_STEP, 101, LOAD_PROGRESS_STEP))


def test_steps_come_once_each_and_in_order_however_the_fractions_jump() -> None:
    seen: list[int] = []
    steps = LoadSteps(seen.append)
    # What llama.cpp reports for Gemma-3 270M, roughly: a jump past 70%, then small steps.
    for fraction in (0.0, 0.7229, 0.7229, 0.75, 0.8, 0.99, 0.9985, 1.0, 1.0):
        assert steps.report(fraction)
    assert seen == EVERY_STEP
    # A C float: 0.7 arrives as 0.69999998..., which is 70% all the same.
    seen.clear()
    LoadSteps(seen.append).report(0.699999988079071)
    assert seen == [10, 20, 30, 40, 50, 60, 70]


def test_a_step_that_says_false_stops_the_load_there() -> None:
    seen: list[int] = []

    def on_step(percent: int) -> bool:
        seen.append(percent)
        return percent < 30

    steps = LoadSteps(on_step)
    assert not steps.report(0.9)
    assert not steps.report(1.0)
    assert seen == [10, 20, 30] and steps.stopped and steps.reported == 30


@pytest.mark.model
def test_the_engine_reports_every_step_of_a_real_load(embedded_model: Path) -> None:
    seen: list[int] = []
    with Engine.load(embedded_model, n_ctx=64, n_threads=2, n_slots=1, on_progress=seen.append) as engine:
        assert engine.n_layers == 18
    assert seen == EVERY_STEP


@pytest.mark.model
def test_a_progress_callback_can_stop_the_load_and_its_error_comes_back(embedded_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="stopped at 30%"):
        Engine.load(embedded_model, n_ctx=64, n_threads=2, n_slots=1, on_progress=lambda p: p < 30)

    def broken(percent: int) -> bool:
        raise LookupError(f"bug at {percent}%")

    with pytest.raises(LookupError, match="bug at 10%"):
        Engine.load(embedded_model, n_ctx=64, n_threads=2, n_slots=1, on_progress=broken)


def wait_load_done(proc: RbeeProcess, seconds: float = 30.0) -> list[dict]:
    """The worker's ``model_load`` narration, once its ``done`` line is on stdout."""
    deadline = time.monotonic() + seconds
    while True:
        narrated = [o for o in proc.json_lines() if o.get("action") == "model_load"]
        if narrated and narrated[-1].get("phase") == "done" or time.monotonic() > deadline:
            return narrated
        time.sleep(0.05)


@pytest.mark.model
def test_the_worker_narrates_and_streams_every_10_percent_step(embedded_model: Path) -> None:
    size = embedded_model.stat().st_size
    with start_worker(embedded_model) as proc:
        url = proc.bound_url()
        # The server is up ~1 s before the weights start to load (GGUF header, vocabulary).
        with httpx.Client(timeout=HTTP_TIMEOUT) as client, client.stream("GET", f"{url}/v1/loading/progress") as r:
            decoder, events = sse.Decoder(), []
            for chunk in r.iter_bytes():
                events += decoder.feed(chunk)
        narrated = wait_load_done(proc)
    # stdout: the seeds' start line, every step with its bytes, the seeds' end line.
    assert [o["phase"] for o in narrated] == ["start"] + ["progress"] * 10 + ["done"], narrated
    assert all(o["actor"] == "model-loader" and o["worker_id"] == "w-test" for o in narrated)
    assert narrated[0]["human"].startswith(f"Loading model from {embedded_model}")
    assert narrated[-1]["human"].startswith("Model loaded! ")
    steps = narrated[1:-1]
    assert [o["percent"] for o in steps] == EVERY_STEP
    # Rounded up: a bar of 10% of the bytes reads 10%, not 9%.
    assert [o["bytes_done"] * 100 // size for o in steps] == EVERY_STEP
    assert [o["bytes_done"] for o in steps] == [-(-size * p // 100) for p in EVERY_STEP]
    assert all(o["bytes_total"] == size and o["cute"] and o["story"] for o in steps)
    # The progress SSE: from its first step on, every later one, then the loaded step and ready.
    loading = [e for e in events if e.type == "loading" and e.stage == "loading"]
    assert [e.bytes_done for e in loading][-10:] == [-(-size * p // 100) for p in EVERY_STEP], loading
    assert all(e.bytes_total == size for e in loading)
    assert [e.type for e in events[-3:]] == ["loading", "ready", "done"]
    assert events[-3].stage == "loaded" and events[-3].layers_done == 18
