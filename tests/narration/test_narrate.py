"""narrate(): ids from the context, redaction, routing between job sink and process sink."""

from __future__ import annotations

import json
import time

import pytest
import trio
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rbee.narration import jsonlines, sse
from rbee.narration.events import NarrationEvent
from rbee.narration.narrate import (
    current_correlation_id,
    current_job_id,
    emit,
    get_process_sink,
    narrate,
    narration_context,
    set_process_sink,
    stdout_sink,
)

from .strategies import ENV_SECRET, secrets, text


@pytest.fixture
def process_events():
    """The events that reach the process sink during the test."""
    seen: list[NarrationEvent] = []
    previous = set_process_sink(seen.append)
    yield seen
    set_process_sink(previous)


def test_an_event_outside_any_job_goes_to_the_process_sink(process_events):
    before = time.time_ns() // 1_000_000
    event = narrate(
        "queen-rbee", "server_bind", "Listening", port=8080, url="http://127.0.0.1:8080"
    )
    after = time.time_ns() // 1_000_000
    assert process_events == [event]
    assert (event.actor, event.action, event.human, event.level) == (
        "queen-rbee",
        "server_bind",
        "Listening",
        "info",
    )
    assert event.job_id is None and event.correlation_id is None
    assert before <= event.ts_ms <= after
    assert event.extra == {"port": 8080, "url": "http://127.0.0.1:8080"}


def test_a_job_context_fills_the_ids_and_routes_to_the_job_sink(process_events):
    job_events: list[NarrationEvent] = []
    with narration_context(job_id="job-1", correlation_id="corr-1", sink=job_events.append):
        assert (current_job_id(), current_correlation_id()) == ("job-1", "corr-1")
        event = narrate(
            "llm-worker-rbee", "inference_start", "Starting", worker_id="w1", node="n1"
        )
    assert current_job_id() is None
    assert job_events == [event] and process_events == []
    assert (event.job_id, event.correlation_id, event.worker_id, event.node) == (
        "job-1",
        "corr-1",
        "w1",
        "n1",
    )


def test_an_event_without_job_id_never_reaches_a_job_sink(process_events):
    job_events: list[NarrationEvent] = []
    with narration_context(sink=job_events.append):
        event = narrate("rbee-hive", "tick", "no job here")
    assert job_events == [] and process_events == [event]


def test_nested_contexts_keep_what_they_do_not_override(process_events):
    job_events: list[NarrationEvent] = []
    with narration_context(job_id="job-1", sink=job_events.append):
        with narration_context(correlation_id="corr-2"):
            inner = narrate("a", "b", "inner")
        outer = narrate("a", "b", "outer")
    assert job_events == [inner, outer]
    assert (inner.job_id, inner.correlation_id, outer.correlation_id) == ("job-1", "corr-2", None)


def test_secrets_are_redacted_before_any_sink_sees_them(process_events):
    event = narrate(
        "rbee-hive",
        "worker_spawn",
        "llm-worker-rbee --api-key s3cr3t-value",
        target="https://bob:hunter2@example.org",
        cute="Bearer abc.def",
        api_key="plain-secret",
        hint="HF_TOKEN=hf_xyz",
    )
    assert process_events == [event]
    wire = jsonlines.encode(event)
    for secret in (b"s3cr3t-value", b"hunter2", b"abc.def", b"plain-secret", b"hf_xyz"):
        assert secret not in wire


@pytest.mark.parametrize(
    "error", [trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError]
)
def test_a_job_sink_that_cannot_take_the_event_falls_back_to_the_process_sink(
    process_events, error
):
    def sink(event):
        raise error()

    with narration_context(job_id="job-1", sink=sink):
        event = narrate("a", "b", "falls back")
    assert process_events == [event]


def test_a_job_sink_that_fails_otherwise_is_a_bug_and_propagates(process_events):
    def sink(event):
        raise RuntimeError("bug")

    with narration_context(job_id="job-1", sink=sink), pytest.raises(RuntimeError):
        narrate("a", "b", "c")


def test_a_full_or_closed_trio_channel_does_not_fail_the_caller(process_events):
    send, receive = trio.open_memory_channel(1)
    with narration_context(job_id="job-1", sink=send.send_nowait):
        first = narrate("a", "b", "fits")
        second = narrate("a", "b", "buffer full")  # WouldBlock
        assert receive.receive_nowait() == first
        receive.close()
        third = narrate("a", "b", "reader gone")  # BrokenResourceError
        send.close()
        fourth = narrate("a", "b", "channel closed")  # ClosedResourceError
    assert process_events == [second, third, fourth]


def test_trio_child_tasks_inherit_the_job_context(process_events):
    async def main():
        send, receive = trio.open_memory_channel(10)
        with trio.fail_after(5):
            with narration_context(job_id="job-9", sink=send.send_nowait):
                async with trio.open_nursery() as nursery:
                    for n in range(3):
                        nursery.start_soon(child, n)
            # A task started outside the block does not see the job.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child, 99)
            send.close()
            return [event async for event in receive]

    async def child(n):
        await trio.sleep(0)
        narrate("worker", "step", f"step {n}")

    job_events = trio.run(main)
    assert sorted(e.human for e in job_events) == ["step 0", "step 1", "step 2"]
    assert {e.job_id for e in job_events} == {"job-9"}
    assert [e.human for e in process_events] == ["step 99"]


def test_emit_sends_a_built_event_to_the_job_sink_only_if_it_is_that_jobs(process_events):
    job_events: list[NarrationEvent] = []
    mine = NarrationEvent("hive", "relay", job_id="job-1")
    other = NarrationEvent("hive", "relay", job_id="job-2")
    orphan = NarrationEvent("hive", "relay")
    with narration_context(job_id="job-1", sink=job_events.append):
        for event in (mine, other, orphan):
            emit(event)
    assert job_events == [mine] and process_events == [other, orphan]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        narrate("a", "b", "c", level="loud")
    with pytest.raises(TypeError):
        narrate("a", "b", "c", job_id="j")  # ids come from the context only
    with pytest.raises(TypeError):
        narrate("a", "b", "c", v=2)
    with pytest.raises(TypeError):
        narrate("a", "b", "c", path=object())


def test_set_process_sink_returns_the_previous_one():
    seen: list[NarrationEvent] = []
    original = set_process_sink(seen.append)
    try:
        assert get_process_sink() == seen.append
        assert original is stdout_sink
    finally:
        assert set_process_sink(original) == seen.append


def test_the_default_sink_writes_one_json_line_to_stdout(capsysbinary):
    event = narrate("queen-rbee", "server_bind", "Listening on 127.0.0.1", port=0)
    out = capsysbinary.readouterr().out
    assert out.count(b"\n") == 1
    obj = json.loads(out)
    assert obj["v"] == 1 and obj["type"] == "narration" and obj["action"] == "server_bind"
    decoder = jsonlines.Decoder()
    assert decoder.feed(out) == [event]


def test_the_default_sink_survives_a_closed_stdout(monkeypatch):
    class Closed:
        @property
        def buffer(self):
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr("sys.stdout", Closed())
    stdout_sink(NarrationEvent("a", "b"))  # must not raise


NARRATE_FIELDS = (
    "actor",
    "action",
    "human",
    "target",
    "cute",
    "story",
    "worker_id",
    "node",
    "note",
    "job_id",
)


@settings(max_examples=200, deadline=None)
@given(secrets(), st.sampled_from(NARRATE_FIELDS), text, text)
def test_a_secret_in_any_narrate_argument_never_reaches_a_sink(secret, field, prefix, suffix):
    secret_text, secret_value = secret
    assume(secret_value not in prefix and secret_value not in suffix)
    value = f"{prefix} {secret_text} {suffix}"
    args = {"actor": "a", "action": "b", "human": "c"}
    kwargs = {}
    job_id = value if field == "job_id" else "job-1"
    if field in args:
        args[field] = value
    elif field != "job_id":
        kwargs[field] = value
    seen: list[NarrationEvent] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBEE_API_TOKEN", ENV_SECRET)
        with narration_context(job_id=job_id, correlation_id="corr", sink=seen.append):
            narrate(args["actor"], args["action"], args["human"], **kwargs)
    [event] = seen
    assert secret_value.encode("utf-8") not in jsonlines.encode(event)
    assert secret_value.encode("utf-8") not in sse.encode(event)
