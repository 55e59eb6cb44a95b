"""The hive's ``GET /v1/events`` (one SSE stream of worker changes) and ``POST /v1/models/resolve``.

The first tests are pure (the wire form, the fan-out, the SSE body, the fields of a
change); the others run a real ``rbee-hive`` and, where marked ``model``, real workers of
the embedded model.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import trio

from rbee.hive.eventlog import EventLog
from rbee.hive.events import WorkerEvents, sse_body
from rbee.hive.workers import Worker
from rbee.narration import jsonlines, sse
from rbee.narration.events import DONE, Done, Event, WorkerChange
from tests.hive.conftest import read_sse, running_hive
from tests.hive.fakehub import FakeHub

EMBEDDED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EMBEDDED_SIZE = 253_113_024
EMBEDDED_FILE = "gemma-3-270m-q4_k_m.gguf"
LISTED = {"worker_id", "url", "state", "model_ref", "sha256", "backend", "device", "pid", "ctx_size", "slots",
          "memory_bytes", "idle_timeout_s"}


def _change(kind: str = "ready", **fields: Any) -> WorkerChange:
    return WorkerChange(**{"change": kind, "worker_id": "worker-0a1b2c3d", "state": "idle", **fields})


def _worker(**fields: Any) -> Worker:
    return Worker(**{"worker_id": "worker-test", "model_ref": "gemma3-270m", "model_path": "m.gguf", "backend": "cpu",
                     "device": 0, "ctx_size": None, "parallel": 2, "url": "http://127.0.0.1:9", "api_key": "k",
                     "log": EventLog(), "planned_bytes": 123, **fields})


# --- pure -------------------------------------------------------------------------------


def test_a_worker_change_on_the_wire() -> None:
    change = _change(model_ref="gemma3-270m", sha256="ab" * 32, url="http://127.0.0.1:41234", api_key="key",
                     pid=4242, slots_total=4, memory_bytes=1 << 30, idle_timeout_s=300.0, ts_ms=1700000000000)
    wire = sse.encode(change)
    assert wire == (
        b'event: worker\ndata: {"type":"worker","change":"ready","worker_id":"worker-0a1b2c3d","state":"idle",'
        b'"model_ref":"gemma3-270m","sha256":"' + b"ab" * 32 + b'","backend":"cpu","device":0,'
        b'"url":"http://127.0.0.1:41234","api_key":"key","pid":4242,"slots_total":4,"slots_busy":0,'
        b'"memory_bytes":1073741824,"idle_timeout_s":300.0,"ts_ms":1700000000000}\n\n'
    )
    assert sse.Decoder().feed(wire) == [change]
    assert jsonlines.Decoder().feed(jsonlines.encode(change)) == [change]
    exited = _change("exited", state="exited", reason="crashed: killed by signal 9 (SIGKILL)", exit_code=-9)
    assert sse.Decoder().feed(sse.encode(exited)) == [exited]
    assert jsonlines.Decoder().feed(jsonlines.encode(exited)) == [exited]


def test_the_listing_and_the_change_are_one_set_of_fields() -> None:
    worker = _worker(sha256="cd" * 32, idle_timeout_s=60.0)
    worker.state, worker.slots_busy = "busy", 1
    listed = worker.public(with_key=True)
    assert set(listed) == LISTED | {"api_key"}
    assert set(worker.public(with_key=False)) == LISTED
    change = worker.change("capacity")
    assert listed["slots"] == {"total": change.slots_total, "busy": change.slots_busy} == {"total": 2, "busy": 1}
    for name in LISTED - {"slots"}:
        assert listed[name] == getattr(change, name), name
    assert (listed["sha256"], listed["memory_bytes"], listed["idle_timeout_s"]) == ("cd" * 32, 123, 60.0)
    assert change.change == "capacity" and change.state == "busy" and change.reason is None
    assert change.exit_code is None and isinstance(change.ts_ms, int)


def test_an_exit_says_why() -> None:
    for code, reason in ((-9, "crashed: killed by signal 9 (SIGKILL)"), (-15, "crashed: killed by signal 15 (SIGTERM)"),
                         (3, "crashed: exit code 3"), (0, "exited on its own with exit code 0")):
        worker = _worker()
        worker.returncode = code
        exited = worker.change("exited")
        assert (exited.state, exited.reason, exited.exit_code) == ("exited", reason, code)
    worker = _worker(stop_reason="asked over HTTP")
    worker.returncode = 0
    assert worker.change("exited").reason == "asked over HTTP"


def test_every_subscriber_gets_every_change_and_one_that_left_is_dropped() -> None:
    async def main() -> None:
        events = WorkerEvents()
        present = _change("present")
        first = events.subscribe([present])
        second = events.subscribe()
        assert len(events) == 2
        spawned, ready = _change("spawned", state="loading"), _change("ready")
        events.publish(spawned)
        second.close()  # its reader went away
        events.publish(ready)
        assert len(events) == 1
        assert [first.receive_nowait() for _ in range(3)] == [present, spawned, ready]
        events.close()
        with pytest.raises(trio.EndOfChannel):
            await first.receive()
        # Subscribing to a closed hive: the present workers, then the end.
        late = events.subscribe([present])
        assert late.receive_nowait() == present
        with pytest.raises(trio.EndOfChannel):
            late.receive_nowait()
        assert len(events) == 0

    trio.run(main)


def test_the_sse_body_pings_streams_batches_and_ends_with_done() -> None:
    async def main() -> None:
        events = WorkerEvents()
        body = sse_body(lambda: events.subscribe(), ping_interval_s=0.05)
        assert await body.__anext__() == b": ping\n\n"  # at once: the reader knows it is subscribed
        assert len(events) == 1
        spawned, ready = _change("spawned", state="loading"), _change("ready")
        events.publish(spawned)
        assert await body.__anext__() == sse.encode(spawned)
        assert await body.__anext__() == b": ping\n\n"  # quiet for a ping interval
        events.publish(ready)
        events.publish(spawned)
        assert await body.__anext__() == sse.encode(ready) + sse.encode(spawned)
        events.close()
        assert await body.__anext__() == sse.encode(DONE) == b"data: [DONE]\n\n"
        with pytest.raises(StopAsyncIteration):
            await body.__anext__()

        # Present workers come first; a body that is closed (the client left) unsubscribes.
        others = WorkerEvents()
        present = _change("present")
        left = sse_body(lambda: others.subscribe([present]), ping_interval_s=10)
        assert await left.__anext__() == sse.encode(present)
        await left.aclose()
        others.publish(ready)
        assert len(others) == 0
        # A body that never started never subscribed.
        never = sse_body(lambda: others.subscribe(), ping_interval_s=10)
        await never.aclose()
        assert len(others) == 0

    trio.run(main)


# --- a real hive ------------------------------------------------------------------------


class EventStream:
    """``GET /v1/events`` read in a thread; the changes and the end as they come."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url + "/v1/events"
        self.headers = headers
        self.events: list[Event] = []
        self.first_bytes: bytes | None = None
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        decoder = sse.Decoder()
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=httpx.Timeout(120)) as response:
                assert response.status_code == 200, response.read()
                for chunk in response.iter_raw():
                    with self._changed:
                        if self.first_bytes is None:
                            self.first_bytes = chunk
                        self.events += decoder.feed(chunk)
                        self._changed.notify_all()
                    if self.events and isinstance(self.events[-1], Done):
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by wait_for
            self.error = exc
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, match: Callable[[Event], bool], seconds: float = 60) -> Event:
        deadline = time.monotonic() + seconds
        with self._changed:
            while True:
                for event in self.events:
                    if match(event):
                        return event
                if self.error is not None or not self._thread.is_alive():
                    raise AssertionError(f"/v1/events ended ({self.error!r}) without it: {self.events[-5:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not on /v1/events within {seconds} s: {self.events[-5:]}")
                self._changed.wait(0.2)

    def change(self, kind: str, worker_id: str, seconds: float = 60, **fields: Any) -> WorkerChange:
        def match(e: Event) -> bool:
            return (isinstance(e, WorkerChange) and e.change == kind and e.worker_id == worker_id
                    and all(getattr(e, k) == v for k, v in fields.items()))

        found = self.wait_for(match, seconds)
        assert isinstance(found, WorkerChange)
        return found

    def wait_subscribed(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while self.first_bytes is None:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "no first bytes on /v1/events"
            time.sleep(0.02)

    def kinds(self, worker_id: str) -> list[str]:
        return [e.change for e in self.events if isinstance(e, WorkerChange) and e.worker_id == worker_id]

    def join(self, seconds: float = 30) -> None:
        self._thread.join(seconds)
        assert not self._thread.is_alive(), "the /v1/events reader is still running"


def test_events_need_the_token_start_at_once_and_end_at_shutdown(rbee_home: Path) -> None:
    token = "hive-token-for-events-test"
    with running_hive(env={"RBEE_API_TOKEN": token}) as hive:
        refused = hive.http.get("/v1/events")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        auth = {"Authorization": f"Bearer {token}"}
        stream = EventStream(hive.url, headers=auth)
        stream.wait_subscribed()
        assert stream.first_bytes == b": ping\n\n"  # no worker: a ping says the stream is open
        assert hive.http.post("/v1/shutdown", headers=auth).status_code == 202
        stream.wait_for(lambda e: isinstance(e, Done), 30)
        stream.join()
        assert [e for e in stream.events if not isinstance(e, Done)] == []
        assert hive.proc.wait(30) == 0


def test_resolve_names_the_file_without_fetching_it(fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path,
                                                    small_gguf: Path) -> None:
    with running_hive(env=hf_env) as hive:
        def resolve(model: Any) -> httpx.Response:
            return hive.http.post("/v1/models/resolve", json={"model": model})

        assert resolve("gemma3-270m").json() == {"reference": "gemma3-270m", "sha256": EMBEDDED_SHA256,
                                                 "size": EMBEDDED_SIZE, "on_disk": False, "file": EMBEDDED_FILE}
        hub = resolve("hf:rbee-test/small-GGUF")
        assert hub.status_code == 200, hub.text
        assert hub.json() == {"reference": "hf:rbee-test/small-GGUF/small-Q4_K_M.gguf",
                              "sha256": fakehub.repos["rbee-test/small-GGUF"]["small-Q4_K_M.gguf"].sha256,
                              "size": small_gguf.stat().st_size, "on_disk": False, "file": "small-Q4_K_M.gguf"}
        local = resolve(f"file:{small_gguf}").json()
        assert local == {"reference": f"file:{small_gguf}", "sha256": None, "size": small_gguf.stat().st_size,
                         "on_disk": True, "file": small_gguf.name}

        for bad in ("ollama:llama3", "", 7, "file:relative.gguf"):
            answer = resolve(bad)
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request", answer.text
        assert hive.http.post("/v1/models/resolve", content=b"not json").status_code == 400
        missing = resolve("file:/no/such.gguf")
        assert missing.status_code == 404, missing.text
        error = missing.json()["error"]
        assert error["code"] == "model_not_found" and "file:/no/such.gguf" in error["message"]
        assert "RBEE_MODEL_DIRS" in error["message"]
        nobody = resolve("hf:nobody/nothing")
        assert nobody.status_code == 404, nobody.text
        error = nobody.json()["error"]
        assert error["code"] == "model_not_found" and "hf:nobody/nothing" in error["message"]
        assert "HF_TOKEN" in error["message"]
        no_file = resolve("hf:rbee-test/small-GGUF/nope-Q2_K.gguf")
        assert no_file.status_code == 404 and "small-Q8_0.gguf" in no_file.json()["error"]["message"]
        assert hive.http.get("/v1/models").json()["models"] == []  # nothing was provisioned

        # Once downloaded, the catalog answers (also for the spelling the user typed).
        started = hive.http.post("/v1/models/download", json={"model": "hf:rbee-test/small-GGUF"})
        assert started.status_code == 202, started.text
        assert isinstance(hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress")[-1], Done)
        assert resolve("hf:rbee-test/small-GGUF").json()["on_disk"] is True
    assert len(fakehub.cdn_gets()) == 1  # only the download fetched the file

    offline = {**hf_env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    with running_hive(env=offline) as hive:
        known = hive.http.post("/v1/models/resolve", json={"model": "hf:rbee-test/small-GGUF"})
        assert known.status_code == 200 and known.json()["on_disk"] is True
        unknown = hive.http.post("/v1/models/resolve", json={"model": "hf:rbee-test/other-GGUF"})
        assert 400 <= unknown.status_code < 500, unknown.text
        message = unknown.json()["error"]["message"]
        assert "hf:rbee-test/other-GGUF is not on this node" in message
        assert "HF_HUB_OFFLINE" in message and "rbee-keeper models download hf:rbee-test/other-GGUF" in message


@pytest.mark.model
def test_events_follow_every_worker_from_spawn_to_exit(rbee_home: Path) -> None:
    with running_hive(args=("--worker-parallel", "2")) as hive:
        stream = EventStream(hive.url)
        stream.wait_subscribed()
        spawned = hive.spawn().json()
        wid = spawned["worker_id"]
        first = stream.change("spawned", wid)
        assert first.state == "loading" and first.pid == spawned["pid"] and first.api_key == spawned["api_key"]
        ready = stream.change("ready", wid)
        assert stream.kinds(wid) == ["spawned", "ready"]
        assert (ready.state, ready.model_ref, ready.sha256) == ("idle", "gemma3-270m", EMBEDDED_SHA256)
        assert (ready.slots_total, ready.slots_busy, ready.url, ready.api_key) == (2, 0, spawned["url"],
                                                                                  spawned["api_key"])
        assert ready.memory_bytes > EMBEDDED_SIZE and ready.backend == "cpu" and ready.device == 0
        listed = hive.workers()[0]
        assert (listed["sha256"], listed["memory_bytes"], listed["idle_timeout_s"]) == (
            ready.sha256, ready.memory_bytes, ready.idle_timeout_s)
        assert hive.http.post("/v1/models/resolve", json={"model": "gemma3-270m"}).json() == {
            "reference": "gemma3-270m", "sha256": EMBEDDED_SHA256, "size": EMBEDDED_SIZE, "on_disk": True,
            "file": EMBEDDED_FILE}

        # One stream on it: capacity goes busy (1 of 2 slots), then back to idle.
        auth = {"Authorization": f"Bearer {spawned['api_key']}"}
        body = {"prompt": "1, 2, 3, 4,", "max_tokens": 3000, "temperature": 0, "job_id": "job-events"}
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{spawned['url']}/v1/inference", json=body, headers=auth) as response:
                assert response.status_code == 200, response.read()
                busy = stream.change("capacity", wid, 30, slots_busy=1)
                assert busy.state == "busy" and busy.slots_total == 2
                assert client.delete(f"{spawned['url']}/v1/inference/job-events", headers=auth).status_code == 200
                for _ in response.iter_bytes():
                    pass
        idle = stream.change("capacity", wid, 30, slots_busy=0)
        assert idle.state == "idle"

        # A later subscriber starts with the live worker.
        later = read_sse(hive.url + "/v1/events", until=lambda e: isinstance(e, WorkerChange), seconds=30)
        assert isinstance(later[0], WorkerChange)
        assert (later[0].change, later[0].worker_id, later[0].state) == ("present", wid, "idle")
        assert later[0].api_key == spawned["api_key"] and later[0].sha256 == EMBEDDED_SHA256

        # Asked to stop over HTTP.
        stopped = hive.http.post(f"/v1/workers/{wid}/shutdown").json()
        exited = stream.change("exited", wid, 30)
        assert (exited.state, exited.reason, exited.exit_code) == ("exited", "asked over HTTP", stopped["exit_code"])
        kinds = stream.kinds(wid)
        assert kinds[:2] == ["spawned", "ready"] and kinds[-2:] == ["stopping", "exited"]
        assert set(kinds[2:-2]) == {"capacity"}
        stopping = stream.change("stopping", wid, 1)
        assert (stopping.state, stopping.reason) == ("stopping", "asked over HTTP")

        # Killed with SIGKILL (its pid, started through the hive); another one lives on.
        killed, kept = hive.spawn().json(), hive.spawn().json()
        stream.change("ready", killed["worker_id"])
        stream.change("ready", kept["worker_id"])
        os.kill(killed["pid"], signal.SIGKILL)
        crash = stream.change("exited", killed["worker_id"], 10)
        assert (crash.reason, crash.exit_code) == ("crashed: killed by signal 9 (SIGKILL)", -9)

        # The hive shuts down: the live worker's exit, then [DONE].
        assert hive.http.post("/v1/shutdown").status_code == 202
        last = stream.change("exited", kept["worker_id"], 30)
        assert last.reason == "the hive is shutting down"
        stream.wait_for(lambda e: isinstance(e, Done), 30)
        stream.join()
        assert isinstance(stream.events[-1], Done) and stream.events[-2] == last
        assert hive.proc.wait(30) == 0


@pytest.mark.model
def test_an_idle_timeout_stop_says_so(rbee_home: Path) -> None:
    with running_hive(env={"RBEE_WORKER_IDLE_TIMEOUT": "1"}) as hive:
        stream = EventStream(hive.url)
        stream.wait_subscribed()
        spawned = hive.spawn().json()
        ready = stream.change("ready", spawned["worker_id"])
        assert ready.idle_timeout_s == 1.0
        exited = stream.change("exited", spawned["worker_id"], 30)
        assert "idle timeout" in exited.reason and "idle for 1 s" in exited.reason
        assert stream.kinds(spawned["worker_id"]) == ["spawned", "ready", "stopping", "exited"]
        assert hive.workers() == []
