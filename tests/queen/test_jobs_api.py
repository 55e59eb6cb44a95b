"""The queen's job API on a real ``queen-rbee`` process (no model needed here).

A job that can never finish on its own: a node whose "sshd" is a socket that accepts the
TCP connection and never says a word, so the SSH handshake waits forever. That is how a
slow model download looks from the stream: open, quiet but for keep-alive pings.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import trio

from rbee.narration import sse
from rbee.narration.events import DONE, Error, NarrationEvent
from rbee.queen.nodes import Node, NodeRegistry
from tests.processes import RbeeProcess, program
from tests.queen.support import start_queen, wait_no_rbee_processes


@pytest.fixture
def queen(rbee_home: Path, silent_ssh_port: int) -> Iterator[tuple[RbeeProcess, str]]:
    NodeRegistry(rbee_home / "nodes.db").put(Node(name="stuck", ssh_host="127.0.0.1", ssh_port=silent_ssh_port))
    proc = start_queen(rbee_home, "--ping-interval", "0.2")
    try:
        yield proc, proc.bound_url()
    finally:
        proc.stop()
        assert not wait_no_rbee_processes(rbee_home, 5)


def read_stream(url: str, path: str, *, method: str = "GET", body: dict | None = None, stop_after: int | None = None) -> tuple[list, bytes]:
    """Events of one SSE response (DONE included) and its raw bytes."""
    events: list = []
    raw = b""
    decoder = sse.Decoder()
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream(method, path, json=body) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for chunk in response.iter_raw():
                raw += chunk
                events += decoder.feed(chunk)
                if DONE in events or (stop_after is not None and len(events) >= stop_after):
                    break
    return events, raw


def test_a_failing_job_streams_narration_then_error_then_done_kept_for_a_late_client(queen) -> None:
    _, url = queen
    # A backend this machine lacks: refused by the job before any hive starts.
    created = httpx.post(f"{url}/v1/jobs", json={"operation": "infer", "node": "localhost", "model": "gemma3-270m",
                                                 "prompt": "p", "backend": "cuda"})
    assert created.status_code == 201
    job_id = created.json()["job_id"]
    assert created.json()["sse_url"] == f"/v1/jobs/{job_id}/stream"
    # The job has failed long before we connect: its events were kept for us.
    trio.run(trio.sleep, 0.5)
    events, raw = read_stream(url, created.json()["sse_url"])
    narration = [e for e in events if isinstance(e, NarrationEvent)]
    assert [e.action for e in narration] == ["job_create", "execute_error"]
    assert all(e.actor == "queen-rbee" and e.job_id == job_id for e in narration)
    errors = [e for e in events if isinstance(e, Error)]
    assert errors == [Error(code="backend_unavailable", message=errors[0].message)]
    assert "no cuda backend" in errors[0].message and "--backend" in errors[0].message
    assert events[-1] is DONE and raw.endswith(b"data: [DONE]\n\n")
    assert raw.index(b"event: error") < raw.index(b"[DONE]")
    # A stream read to its end forgets the job.
    assert httpx.get(f"{url}/v1/jobs/{job_id}/stream").status_code == 404


def test_v2_tasks_answers_with_the_stream(queen) -> None:
    _, url = queen
    events, _ = read_stream(url, "/v2/tasks", method="POST", body={"model": "gemma3-270m", "prompt": "p", "backend": "cuda"})
    assert [type(e).__name__ for e in events][-2:] == ["Error", "Done"]


def test_invalid_requests_are_400_with_details_and_unknown_jobs_404(queen) -> None:
    _, url = queen
    bad = httpx.post(f"{url}/v1/jobs", json={"operation": "infer", "node": "localhost"})
    assert bad.status_code == 400
    fields = {d["field"] for d in bad.json()["error"]["details"]}
    assert fields == {"model", "prompt"} and bad.json()["error"]["code"] == "invalid_request"
    assert httpx.post(f"{url}/v1/jobs", json={"operation": "dance"}).status_code == 400
    assert httpx.post(f"{url}/v1/jobs", content=b"not json").status_code == 400
    # An unknown node is refused before the job exists, naming the fix.
    nowhere = httpx.post(f"{url}/v1/jobs", json={"node": "nowhere", "model": "gemma3-270m", "prompt": "p"})
    assert nowhere.status_code == 404 and "setup add-node nowhere" in nowhere.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []
    missing = httpx.delete(f"{url}/v1/jobs/job-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_quiet_job_gets_pings_and_delete_cancels_it(queen) -> None:
    _, url = queen
    job = httpx.post(f"{url}/v1/jobs", json={"node": "stuck", "model": "gemma3-270m", "prompt": "p", "detach": True}).json()
    decoder = sse.Decoder()
    events: list = []
    raw = b""
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("GET", job["sse_url"]) as response:
            chunks = response.iter_raw()
            while raw.count(b": ping") < 3:  # the job is stuck in the SSH handshake
                chunk = next(chunks)
                raw += chunk
                events += decoder.feed(chunk)
            assert DONE not in events
            cancelled = client.delete(f"/v1/jobs/{job['job_id']}")
            assert cancelled.status_code == 200
            for chunk in chunks:
                raw += chunk
                events += decoder.feed(chunk)
    actions = [e.action for e in events if isinstance(e, NarrationEvent)]
    assert actions[:2] == ["job_create", "route_job"] and actions[-1] == "execute_cancelled"
    assert [e for e in events if isinstance(e, Error)][0].code == "cancelled"
    assert events[-1] is DONE


def test_a_client_that_goes_away_cancels_its_job_unless_detached(queen) -> None:
    _, url = queen
    attached = httpx.post(f"{url}/v1/jobs", json={"node": "stuck", "model": "gemma3-270m", "prompt": "p"}).json()
    detached = httpx.post(f"{url}/v1/jobs", json={"node": "stuck", "model": "gemma3-270m", "prompt": "p", "detach": True}).json()
    for job in (attached, detached):
        read_stream(url, job["sse_url"], stop_after=2)  # then hang up
    states = {}
    for _ in range(50):
        states = {j["job_id"]: j["state"] for j in httpx.get(f"{url}/v1/jobs").json()["jobs"]}
        if states.get(attached["job_id"]) == "cancelled":
            break
        trio.run(trio.sleep, 0.1)
    assert states[attached["job_id"]] == "cancelled"
    assert states[detached["job_id"]] == "running"
    # Only one reader per stream: the detached job's stream is claimed.
    assert httpx.get(f"{url}{detached['sse_url']}").status_code == 503


@pytest.mark.parametrize("how", ["http", "sigterm"])
def test_shutdown_drains_then_cancels_jobs_and_exits_zero(rbee_home: Path, silent_ssh_port: int, how: str) -> None:
    NodeRegistry(rbee_home / "nodes.db").put(Node(name="stuck", ssh_host="127.0.0.1", ssh_port=silent_ssh_port))
    # A job that cannot finish (its node never answers SSH) outlives a 1 s grace period.
    with start_queen(rbee_home, "--grace-period", "1") as proc:
        url = proc.bound_url()
        job = httpx.post(f"{url}/v1/jobs", json={"node": "stuck", "model": "gemma3-270m", "prompt": "p", "detach": True}).json()
        if how == "http":
            assert httpx.post(f"{url}/v1/shutdown").status_code == 202
        else:
            proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        actions = [o.get("action") for o in proc.json_lines()]
        assert actions[-1] == "queen_stopped" and "queen_shutdown" in actions
        drain = [o for o in proc.json_lines() if o.get("action") == "queen_drain"]
        assert drain and drain[0]["jobs"] == 1 and drain[0]["grace_period_s"] == 1
        assert job["job_id"]
    assert not wait_no_rbee_processes(rbee_home, 5)


def test_a_configured_token_guards_every_route_but_health(rbee_home: Path) -> None:
    queen = RbeeProcess([program("queen-rbee"), "--port", "0"], env={"RBEE_HOME": str(rbee_home), "RBEE_API_TOKEN": "s3cret"})
    with queen:
        url = queen.bound_url()
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/nodes").status_code == 401
        assert httpx.get(f"{url}/v1/nodes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(f"{url}/v1/nodes", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["nodes"][0]["name"] == "localhost"
        assert "s3cret" not in json.dumps(queen.json_lines())
    assert not wait_no_rbee_processes(rbee_home, 5)
