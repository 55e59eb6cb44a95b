"""Slots: a worker serves ``parallel`` streams at once; the hive spawns, lists and times them out.

The first tests are pure (the spawn body check, the settings, the reading of a worker's
``/v1/ready`` and the idle-timeout rule, with explicit clock values: no timing involved);
the others run a real ``rbee-hive`` and, where marked ``model``, real workers.
"""

from __future__ import annotations

import time
from pathlib import Path
import httpx
import pytest

from rbee.errors import InvalidRequestError
from rbee.hive.config import DEFAULT_WORKER_PARALLEL, WORKER_PARALLEL_ENV, HiveConfig, worker_parallel_from_env
from rbee.hive.eventlog import EventLog
from rbee.hive.service import validate_spawn
from rbee.hive.workers import Worker, slot_state, slots_from_ready
from rbee.narration import sse
from tests.hive.conftest import running_hive
from tests.processes import RbeeProcess, program, wait_gone

BAD_PARALLEL = (0, -1, "x", "2", True, False, 2.0, [2], {"n": 2})


def _worker(parallel: int) -> Worker:
    return Worker(worker_id="worker-test", model_ref="gemma3-270m", model_path="m.gguf", backend="cpu", device=0,
                  ctx_size=None, parallel=parallel, url="http://127.0.0.1:9", api_key="k", log=EventLog(),
                  planned_bytes=0)


def test_spawn_body_takes_parallel_and_refuses_what_is_not_a_count() -> None:
    assert validate_spawn({"model": "gemma3-270m"}).parallel is None  # the hive's default applies
    assert validate_spawn({"model": "gemma3-270m", "parallel": None}).parallel is None
    assert validate_spawn({"model": "gemma3-270m", "parallel": 2}).parallel == 2
    for bad in BAD_PARALLEL:
        with pytest.raises(InvalidRequestError) as caught:
            validate_spawn({"model": "gemma3-270m", "parallel": bad})
        assert caught.value.http_status == 400
        assert caught.value.details == [{"field": "parallel", "constraint": "integer >= 1",
                                         "message": f"parallel is the number of streams the worker serves "
                                                    f"at once, not {bad!r}"}], bad


def test_worker_parallel_setting_from_env_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_PARALLEL_ENV, raising=False)
    assert worker_parallel_from_env() == DEFAULT_WORKER_PARALLEL == 4
    assert HiveConfig().worker_parallel == 4
    monkeypatch.setenv(WORKER_PARALLEL_ENV, "7")
    assert worker_parallel_from_env() == 7 and HiveConfig().worker_parallel == 7
    for bad in ("0", "-2", "many", "1.5"):
        monkeypatch.setenv(WORKER_PARALLEL_ENV, bad)
        with pytest.raises(ValueError, match=f"{WORKER_PARALLEL_ENV}='{bad}' is not an integer >= 1"):
            worker_parallel_from_env()
    monkeypatch.delenv(WORKER_PARALLEL_ENV)
    with pytest.raises(ValueError, match="--worker-parallel must be an integer >= 1"):
        HiveConfig(worker_parallel=0)


def test_busy_slots_are_read_from_the_ready_answer() -> None:
    answer = {"ready": True, "state": "busy", "slots": {"total": 4, "busy": 3}}
    assert slots_from_ready(answer, 4) == 3
    assert slots_from_ready({"ready": True, "state": "idle", "slots": {"total": 4, "busy": 0}}, 4) == 0
    assert slots_from_ready({"ready": True, "state": "full", "slots": {"total": 2, "busy": 2}}, 2) == 2
    # A worker that says nothing of its slots is judged by its state.
    assert [slots_from_ready({"ready": True, "state": s}, 4) for s in ("idle", "busy", "full")] == [0, 1, 4]
    assert slots_from_ready({"state": "busy", "slots": {"busy": "two"}}, 4) == 1
    # Nothing about serving: no change.
    for answer in ({"ready": False, "state": "loading"}, {"ready": False, "state": "error"}, [], None, "idle"):
        assert slots_from_ready(answer, 4) is None
    assert [slot_state(busy, 3) for busy in (0, 1, 2, 3, 4)] == ["idle", "busy", "busy", "full", "full"]


def test_state_follows_the_busy_slots_and_never_changes_a_loading_or_stopping_worker() -> None:
    worker = _worker(parallel=2)
    worker.note_slots(1, now=5.0)
    assert worker.state == "loading" and worker.slots_busy == 0  # only the ready callback ends loading
    worker.state, worker.idle_since = "idle", 10.0  # what the ready callback does
    seen = []
    for busy in (1, 2, 1, 0):
        worker.note_slots(busy, now=11.0)
        seen.append((worker.state, worker.slots))
    assert seen == [("busy", {"total": 2, "busy": 1}), ("full", {"total": 2, "busy": 2}),
                    ("busy", {"total": 2, "busy": 1}), ("idle", {"total": 2, "busy": 0})]
    worker.state = "stopping"
    worker.note_slots(2, now=12.0)
    assert worker.state == "stopping" and worker.slots_busy == 0


def test_idle_time_counts_from_the_moment_busy_fell_to_zero() -> None:
    worker = _worker(parallel=4)
    assert worker.idle_seconds(now=100.0) is None  # loading: not idle
    worker.state, worker.idle_since = "idle", 10.0  # ready at t=10
    assert worker.idle_seconds(now=40.0) == 30.0
    worker.note_slots(0, now=41.0)  # still idle: the count goes on
    assert worker.idle_seconds(now=50.0) == 40.0
    worker.note_slots(1, now=60.0)  # a stream starts
    worker.note_slots(3, now=61.0)
    worker.note_slots(1, now=500.0)  # streams run for a long time: never idle meanwhile
    assert worker.idle_seconds(now=1000.0) is None
    worker.note_slots(0, now=1001.0)  # the last stream ended: the count starts again
    assert worker.idle_seconds(now=1001.0) == 0.0 and worker.idle_seconds(now=1031.0) == 30.0
    worker.note_slots(0, now=1040.0)
    assert worker.idle_since == 1001.0
    worker.state = "stopping"
    assert worker.idle_seconds(now=2000.0) is None


def test_a_bad_parallel_is_a_400_naming_the_field(rbee_home: Path) -> None:
    with running_hive() as hive:
        for bad in (0, "x", True):
            answer = hive.spawn(parallel=bad)
            assert answer.status_code == 400, (bad, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "invalid_request" and "parallel" in error["message"]
            assert error["details"][0]["field"] == "parallel"
            assert error["details"][0]["constraint"] == "integer >= 1"
        assert hive.workers() == []


def test_a_bad_worker_parallel_setting_stops_the_hive_at_start(rbee_home: Path) -> None:
    for args, env, said in ((("--worker-parallel", "0"), {}, "--worker-parallel must be an integer >= 1"),
                            ((), {WORKER_PARALLEL_ENV: "lots"}, f"{WORKER_PARALLEL_ENV}='lots' is not an integer")):
        proc = RbeeProcess([program("rbee-hive"), "daemon", "--port", "0", *args], env=env)
        try:
            assert proc.wait(30) == 2
            assert said in proc.stderr_text()
        finally:
            proc.stop()
        assert wait_gone([proc.pid], 1) == []


@pytest.mark.model
def test_the_default_parallel_comes_from_the_option_then_the_env(rbee_home: Path) -> None:
    # A memory limit too small for any worker: the 409 carries the plan, no worker starts.
    small = {"RBEE_MEMORY_LIMIT_BYTES": str(64 * 1024 * 1024), WORKER_PARALLEL_ENV: "5"}
    with running_hive(env=small) as hive:
        assert hive.spawn().json()["error"]["details"]["parallel"] == 5
        assert hive.spawn(parallel=2).json()["error"]["details"]["parallel"] == 2
    with running_hive(env=small, args=("--worker-parallel", "3")) as hive:
        error = hive.spawn().json()["error"]
        assert error["details"]["parallel"] == 3 and "3 slots x 4096 tokens" in error["message"]
        assert hive.workers() == []


@pytest.mark.model
def test_spawn_with_parallel_2_lists_two_slots(rbee_home: Path) -> None:
    with running_hive(args=("--worker-parallel", "3")) as hive:
        answer = hive.spawn(parallel=2)
        assert answer.status_code == 201, answer.text
        spawned = answer.json()
        assert spawned["slots"] == {"total": 2, "busy": 0}
        listed = hive.wait_state(spawned["worker_id"], "idle", 60)
        assert listed["slots"] == {"total": 2, "busy": 0}
        cmdline = Path(f"/proc/{spawned['pid']}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--parallel") + 1] == b"2"
        # The worker itself agrees.
        ready = httpx.get(f"{spawned['url']}/v1/ready", headers={"Authorization": f"Bearer {spawned['api_key']}"},
                          timeout=30).json()
        assert ready["state"] == "idle" and ready["slots"] == {"total": 2, "busy": 0}
        # Without parallel, the hive's --worker-parallel.
        other = hive.spawn().json()
        assert hive.wait_state(other["worker_id"], "idle", 60)["slots"] == {"total": 3, "busy": 0}
        for w in (spawned, other):
            assert hive.http.post(f"/v1/workers/{w['worker_id']}/shutdown").status_code == 200
        assert hive.workers() == []
        assert wait_gone([spawned["pid"], other["pid"]], 2) == []


@pytest.mark.model
def test_the_idle_timeout_never_stops_a_worker_while_a_stream_runs(rbee_home: Path) -> None:
    timeout = 2
    with running_hive(env={"RBEE_WORKER_IDLE_TIMEOUT": str(timeout)}) as hive:
        spawned = hive.spawn().json()
        hive.wait_state(spawned["worker_id"], "idle", 60)
        auth = {"Authorization": f"Bearer {spawned['api_key']}"}
        body = {"prompt": "1, 2, 3, 4,", "max_tokens": 3000, "temperature": 0, "job_id": "job-long"}
        decoder, events, listings = sse.Decoder(), [], []
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{spawned['url']}/v1/inference", json=body, headers=auth) as response:
                assert response.status_code == 200, response.read()
                chunks = response.iter_bytes()
                # Keep one stream running for twice the idle timeout (and a poll), looking at the listing.
                first_token_at, next_look = None, 0.0
                for chunk in chunks:
                    events += decoder.feed(chunk)
                    now = time.time()
                    if first_token_at is None and any(getattr(e, "type", "") == "token" for e in events):
                        first_token_at = now
                    if now >= next_look:
                        listings += [w for w in hive.workers() if w["worker_id"] == spawned["worker_id"]]
                        next_look = now + 0.5
                    if first_token_at is not None and now - first_token_at > 2 * timeout + 1:
                        break
                stops = [o for o in hive.proc.json_lines() if o.get("action") == "worker_stop"]
                assert stops == [], f"stopped while a stream ran: {stops}"
                busy = [w for w in listings if w["state"] == "busy"]
                assert busy and all(w["slots"] == {"total": 4, "busy": 1} for w in busy), listings
                assert client.delete(f"{spawned['url']}/v1/inference/job-long", headers=auth).status_code == 200
                for chunk in chunks:
                    events += decoder.feed(chunk)
        ended = time.time()
        end = [e for e in events if getattr(e, "type", "") == "end"]
        assert end and end[0].stop_reason == "cancelled", events[-3:]
        # Once the stream ended, the idle time counts from when the hive saw busy fall to 0.
        stop = hive.proc.wait_for_action("worker_stop", 15)
        assert "idle for 2 s" in stop["human"] and stop["worker_id"] == spawned["worker_id"]
        # Narration carries the wall clock (ts_ms); the stream ended a little before `ended`.
        assert stop["ts_ms"] / 1000 - ended >= 1.9, (stop["ts_ms"], ended)
        hive.proc.wait_for_action("worker_exit", 15)
        assert hive.workers() == []
        assert wait_gone([spawned["pid"]], 2) == []
