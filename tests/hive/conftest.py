"""Fixtures of the hive tests: a real ``rbee-hive`` process, its SSE streams, the fake Hub."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from rbee.narration import sse
from rbee.narration.events import Done, Event
from tests.hive.fakehub import FakeHub, write_small_gguf
from tests.processes import RbeeProcess, children_of, pid_alive, program, wait_gone


class Hive:
    """One running ``rbee-hive daemon --port 0`` and an HTTP client for it."""

    def __init__(self, proc: RbeeProcess, url: str) -> None:
        self.proc = proc
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=120)

    def workers(self) -> list[dict[str, Any]]:
        return self.http.get("/v1/workers").json()["workers"]

    def spawn(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/workers/spawn", json={"model": "gemma3-270m", **body})

    def wait_state(self, worker_id: str, state: str, seconds: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            for w in self.workers():
                if w["worker_id"] == worker_id and w["state"] == state:
                    return w
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker_id} never reached {state}: {self.workers()}")
            time.sleep(0.1)

    def sse(self, path: str, *, until: Callable[[Event], bool] | None = None, seconds: float = 60) -> list[Event]:
        """Events of an SSE route until ``[DONE]`` (included) or ``until(event)`` is true."""
        return read_sse(self.url + path, until=until, seconds=seconds)


def read_sse(url: str, *, until: Callable[[Event], bool] | None = None, seconds: float = 60,
             headers: dict[str, str] | None = None) -> list[Event]:
    """Read an SSE stream into events (within ``seconds``)."""
    events: list[Event] = []
    decoder = sse.Decoder()
    deadline = time.monotonic() + seconds
    with httpx.stream("GET", url, timeout=httpx.Timeout(seconds), headers=headers) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                events.append(event)
                if isinstance(event, Done) or (until is not None and until(event)):
                    return events
            if time.monotonic() > deadline:
                raise TimeoutError(f"SSE {url} did not finish in {seconds} s: {events[-5:]}")
    raise AssertionError(f"SSE {url} ended without [DONE]: {events[-5:]}")


@contextlib.contextmanager
def running_hive(env: dict[str, str] | None = None, *, stdin: Any = subprocess.DEVNULL,
                 args: tuple[str, ...] = (),
                 wrap: Callable[[list[str]], list[str]] = lambda argv: argv) -> Iterator[Hive]:
    """Start a hive on a free port; at the end stop it by PID and check no worker is left.

    ``wrap`` turns the hive's command line into the one to run (a namespace around it)."""
    proc = RbeeProcess(wrap([program("rbee-hive"), "daemon", "--port", "0", *args]), env=env, stdin=stdin)
    hive: Hive | None = None
    try:
        url = proc.bound_url(seconds=60)
        proc.wait_for_action("hive_ready", 30)
        hive = Hive(proc, url)
        yield hive
    finally:
        kids = children_of(proc.pid) if pid_alive(proc.pid) else []
        if hive is not None:
            hive.http.close()
        proc.stop(grace=20)
        assert wait_gone(kids, 10) == [], f"processes of the hive left behind: {kids}"


@pytest.fixture
def small_gguf(tmp_path: Path) -> Path:
    """A valid 4 MiB GGUF (not loadable by llama.cpp: its one tensor is not a model)."""
    return write_small_gguf(tmp_path / "small-Q4_K_M.gguf")


@pytest.fixture
def fakehub(small_gguf: Path) -> Iterator[FakeHub]:
    """The fake Hub serving ``rbee-test/small-GGUF`` (a Q4_K_M and a Q8_0 GGUF), throttled."""
    hub = FakeHub(bytes_per_sec=3_000_000).start()
    hub.add_file("rbee-test/small-GGUF", "small-Q4_K_M.gguf", small_gguf)
    hub.add_file("rbee-test/small-GGUF", "small-Q8_0.gguf", small_gguf)
    try:
        yield hub
    finally:
        hub.close()


@pytest.fixture
def hf_env(fakehub: FakeHub, tmp_path: Path, rbee_home: Path) -> dict[str, str]:
    """Environment that points huggingface_hub at the fake Hub, with an empty HF cache;
    ``tmp_path`` (where ``small_gguf`` lies) is a model directory, so ``file:`` may name it."""
    return {"HF_ENDPOINT": fakehub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "RBEE_HOME": str(rbee_home), "RBEE_MODEL_DIRS": str(tmp_path)}
