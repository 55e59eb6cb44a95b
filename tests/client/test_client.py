"""``rbee.client`` from plain Trio programs against a real queen."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import trio

from rbee.client import QueenUnreachableError, cancel_job, open_job_stream, submit_job
from rbee.errors import InvalidRequestError
from rbee.narration.events import Error, NarrationEvent
from rbee.queen.nodes import Node, NodeRegistry
from tests.processes import RbeeProcess
from tests.queen.support import dead_url, start_queen, wait_no_rbee_processes


@pytest.fixture
def queen_url(rbee_home: Path) -> Iterator[str]:
    # "stuck": a node whose SSH server accepts and never answers, so its jobs never end.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        NodeRegistry(rbee_home / "nodes.db").put(Node(name="stuck", ssh_host="127.0.0.1", ssh_port=silent.getsockname()[1]))
        proc: RbeeProcess = start_queen(rbee_home)
        try:
            yield proc.bound_url()
        finally:
            proc.stop()
    assert not wait_no_rbee_processes(rbee_home, 5)


def test_a_failed_job_yields_its_error_and_ends(queen_url: str) -> None:
    async def main() -> list:
        with trio.fail_after(30):
            # A backend this machine lacks: the job fails before any hive starts.
            request = {"node": "localhost", "model": "gemma3-270m", "prompt": "p", "backend": "cuda"}
            async with open_job_stream(queen_url, request) as job:
                assert job.job_id.startswith("job-")
                events = [event async for event in job]
            assert job.finished
            return events

    events = trio.run(main)
    assert [e.action for e in events if isinstance(e, NarrationEvent)] == ["job_create", "execute_error"]
    assert isinstance(events[-1], Error) and events[-1].code == "backend_unavailable"


def test_leaving_the_block_early_cancels_the_job(queen_url: str) -> None:
    async def main() -> str:
        with trio.fail_after(30):
            async with open_job_stream(queen_url, {"node": "stuck", "model": "gemma3-270m", "prompt": "p"}) as job:
                async for event in job:
                    if isinstance(event, NarrationEvent) and event.action == "route_job":
                        break  # leave while the job still runs
            return job.job_id

    job_id = trio.run(main)
    # The DELETE was sent before the block returned: the job is cancelled by now.
    for _ in range(50):
        states = {j["job_id"]: j["state"] for j in httpx.get(f"{queen_url}/v1/jobs").json()["jobs"]}
        if states.get(job_id) == "cancelled":
            break
        trio.run(trio.sleep, 0.05)
    assert states[job_id] == "cancelled"


def test_submit_then_cancel(queen_url: str) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            submission = await submit_job(queen_url, {"node": "stuck", "model": "gemma3-270m", "prompt": "p", "detach": True})
            assert submission.sse_url.endswith("/stream")
            assert await cancel_job(queen_url, submission.job_id) is True
            assert await cancel_job(queen_url, "job-unknown") is False

    trio.run(main)


def test_errors_are_typed(queen_url: str) -> None:
    async def bad_request() -> None:
        with trio.fail_after(30):
            async with open_job_stream(queen_url, {"node": "localhost"}):
                pass

    with pytest.raises(InvalidRequestError) as info:
        trio.run(bad_request)
    assert {d["field"] for d in info.value.details} == {"model", "prompt"}

    async def nobody_home() -> None:
        with trio.fail_after(30):
            await submit_job(dead_url(), {"model": "gemma3-270m", "prompt": "p"})

    with pytest.raises(QueenUnreachableError, match="rbee-keeper queen start"):
        trio.run(nobody_home)


@pytest.mark.model
def test_a_plain_trio_program_drives_a_real_inference(rbee_home: Path) -> None:
    """The embeddable client end to end: a real queen, hive, worker and model."""
    from rbee.narration.events import End, Token

    proc = start_queen(rbee_home)
    try:
        url = proc.bound_url()
        request = {"operation": "infer", "node": "localhost", "model": "gemma3-270m",
                   "prompt": "Write a haiku about bees.", "max_tokens": 12, "temperature": 0.0, "seed": 7}

        async def main() -> tuple[str, list, End | None]:
            text, actors, end = "", [], None
            with trio.fail_after(300):
                async with open_job_stream(url, request) as job:
                    async for event in job:
                        if isinstance(event, Token):
                            text += event.t
                        elif isinstance(event, End):
                            end = event
                        elif isinstance(event, NarrationEvent):
                            actors.append(event.actor)
            return text, actors, end

        text, actors, end = trio.run(main)
        assert text.strip() and end is not None and 0 < end.tokens_out <= 12
        assert {"queen-rbee", "rbee-hive", "llm-worker-rbee"} <= set(actors)

        # Leaving after the first token cancels the job at every hop: the worker is idle again.
        async def leave_early() -> None:
            with trio.fail_after(120):
                async with open_job_stream(url, {**request, "max_tokens": 400}) as job:
                    async for event in job:
                        if isinstance(event, Token):
                            break

        trio.run(leave_early)
        workers: list = []
        for _ in range(40):
            workers = httpx.get(f"{url}/v1/workers").json()["workers"]
            if workers and workers[0]["state"] == "ready":
                break
            trio.run(trio.sleep, 0.05)
        assert [(w["state"], w["slots"]["busy"]) for w in workers] == [("ready", 0)]
    finally:
        proc.stop()
    assert not wait_no_rbee_processes(rbee_home, 15)
