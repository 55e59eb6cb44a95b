"""A worker's life: start, load, call back, auth, fail fast, shut down, die with its parent.

Each test starts its own `llm-worker-rbee` (the point is how the process starts or ends),
ends it by PID and checks it is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from rbee.narration import DONE, sse
from tests.processes import RbeeProcess, pid_alive, program, wait_gone
from tests.worker.workers import COUNTING_PROMPT, HTTP_TIMEOUT, infer, start_worker, wait_ready

pytestmark = pytest.mark.model

API_KEY = "worker-key-0123456789abcdef"


def actions(proc: RbeeProcess) -> list[str]:
    return [o.get("action") for o in proc.json_lines()]


def assert_one_line_no_traceback(proc: RbeeProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr_lines if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in proc.stderr_text()
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class CallbackReceiver:
    """A plain HTTP server standing in for the hive: records each callback it gets and
    answers with the next status of ``statuses`` (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                receiver.calls.append({"path": self.path, "headers": dict(self.headers),
                                       "body": json.loads(self.rfile.read(length))})
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/workers/ready"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CallbackReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- failing fast ----------------------------------------------------------------------


def test_missing_backend_fails_fast_naming_what_is_available(embedded_model):
    with start_worker(embedded_model, "--backend", "cuda") as proc:
        assert proc.wait(30) == 4
    line = assert_one_line_no_traceback(proc, "cuda", "available: cpu")
    assert line.startswith("llm-worker-rbee: ")
    failed = [o for o in proc.json_lines() if o.get("action") == "device_init"]
    assert failed and failed[0]["level"] == "error" and "cpu" in failed[0]["human"]
    assert "server_bind" not in actions(proc)  # failed before listening


def test_unknown_backend_is_a_usage_error(embedded_model):
    with start_worker(embedded_model, "--backend", "rocm") as proc:
        assert proc.wait(30) == 2
    assert_one_line_no_traceback(proc, "rocm", "cpu", "cuda", "metal")


def test_missing_model_names_the_file(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with start_worker(missing) as proc:
        assert proc.wait(30) == 5
    assert_one_line_no_traceback(proc, str(missing))
    assert any(o.get("action") == "model_load" and o["level"] == "error" for o in proc.json_lines())


@pytest.mark.parametrize("kind", ["garbage", "truncated-gguf"])
def test_corrupt_model_names_the_file(tmp_path, embedded_model, kind):
    bad = tmp_path / f"{kind}.gguf"
    if kind == "garbage":
        bad.write_bytes(b"this is not a model\n" * 100)
    else:
        with embedded_model.open("rb") as f:
            bad.write_bytes(f.read(1 << 20))  # a real GGUF header, then nothing
    with start_worker(bad) as proc:
        assert proc.wait(60) == 5
    assert_one_line_no_traceback(proc, str(bad))
    assert actions(proc)[-1] == "exiting"


def test_port_in_use_is_one_line_not_a_traceback(embedded_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with start_worker(embedded_model, "--port", str(port)) as proc:
            assert proc.wait(30) == 1
    assert_one_line_no_traceback(proc, f"127.0.0.1:{port}", "in use")


# -- loading, progress, shutdown ---------------------------------------------------------


def test_http_answers_while_loading_then_progress_ends_with_ready(embedded_model):
    with start_worker(embedded_model) as proc:
        url = proc.bound_url()
        # The server is up before the model: these come while it loads (~0.5 s).
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            ready = client.get(f"{url}/v1/ready").json()
            early = client.post(f"{url}/v1/inference", json={"prompt": "Hello", "max_tokens": 2})
            with client.stream("GET", f"{url}/v1/loading/progress") as response:
                decoder, events = sse.Decoder(), []
                for chunk in response.iter_bytes():
                    events += decoder.feed(chunk)
        assert ready == {"ready": False, "state": "loading", "slots": {"total": 4, "busy": 0}}
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert early.json()["error"]["code"] == "loading"
        assert events[0].type == "loading" and events[0].bytes_total == embedded_model.stat().st_size
        assert [e.type for e in events[-2:]] == ["ready", "done"]
        assert events[-2].url == url
        loaded = [e for e in events if e.type == "loading" and e.stage == "loaded"]
        assert loaded and loaded[0].layers_done == loaded[0].layers_total == 18
        assert infer(url, {"prompt": "Hello", "max_tokens": 2}).end.tokens_out == 2
        # Lifecycle narration on stdout, in order.
        seen = actions(proc)
        order = ["startup", "server_bind", "device_init", "model_load", "model_load"]
        assert [a for a in seen if a in order][:5] == order
        load_done = [o for o in proc.json_lines() if o.get("phase") == "done"][0]
        assert load_done["duration_ms"] > 0 and load_done["size_bytes"] > 200_000_000
    assert proc.proc.returncode == 0


def _stop_mid_stream(url: str, stop) -> list:
    """The events of a long inference during which ``stop()`` is called (after a token)."""
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        body = {"prompt": COUNTING_PROMPT, "max_tokens": 400, "temperature": 0}
        with client.stream("POST", f"{url}/v1/inference", json=body) as response:
            decoder, events = sse.Decoder(), []
            chunks = response.iter_bytes()
            while not any(e.type == "token" for e in events):
                events += decoder.feed(next(chunks))
            stop()
            for chunk in chunks:
                events += decoder.feed(chunk)
    return events


def test_sigterm_ends_the_stream_with_the_truth_frees_the_model_and_exits_0(embedded_model):
    proc = start_worker(embedded_model)
    try:
        url = proc.bound_url()
        assert wait_ready(url)["ready"]
        events = _stop_mid_stream(url, lambda: proc.signal(signal.SIGTERM))
        # A cut answer is never an `end`: its own client did not cancel it.
        assert events[-1] is DONE and events[-2].type == "error", events[-3:]
        assert events[-2].code == "shutting_down" and "SIGTERM" in events[-2].message
        assert not any(e.type == "end" for e in events)
        assert proc.wait(30) == 0
    finally:
        proc.stop()
    seen = actions(proc)
    tail = ["signal_received", "server_shutdown", "memory_freed", "exiting"]
    assert [a for a in seen if a in tail] == tail
    assert proc.stderr_text().strip() == ""


def test_a_stop_by_the_hive_ends_the_stream_with_its_reason(embedded_model):
    proc = start_worker(embedded_model)
    try:
        url = proc.bound_url()
        assert wait_ready(url)["ready"]
        events = _stop_mid_stream(url, lambda: httpx.post(
            f"{url}/v1/shutdown", json={"reason": "idle for 300 s"}, timeout=HTTP_TIMEOUT))
        assert events[-1] is DONE and events[-2].type == "error", events[-3:]
        assert events[-2].code == "shutting_down" and "stopped by its hive (idle for 300 s)" in events[-2].message
        assert proc.wait(30) == 0
    finally:
        proc.stop()


def test_sigterm_while_loading_exits_0_at_once(embedded_model):
    with start_worker(embedded_model) as proc:
        proc.bound_url()
        proc.signal(signal.SIGTERM)  # the model is still loading (~0.5 s)
        started = time.monotonic()
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 10
    seen = actions(proc)
    assert seen[-1] == "exiting" and "server_shutdown" in seen
    assert proc.stderr_text().strip() == ""


def test_post_shutdown_exits_0(embedded_model):
    with start_worker(embedded_model) as proc:
        url = proc.bound_url()
        assert wait_ready(url)["ready"]
        response = httpx.post(f"{url}/v1/shutdown", timeout=HTTP_TIMEOUT)
        assert response.status_code == 200 and response.json() == {"shutting_down": True}
        assert proc.wait(30) == 0
    assert actions(proc)[-3:] == ["server_shutdown", "memory_freed", "exiting"]
    assert wait_gone([proc.pid], 5) == []


# -- ready callback and auth -------------------------------------------------------------


def test_ready_callback_is_retried_and_auth_guards_every_route_but_health(embedded_model):
    with CallbackReceiver([503, 503, 200]) as receiver:
        with start_worker(embedded_model, "--callback-url", receiver.url, "--api-key", API_KEY,
                          "--model-ref", "hf:test/model", worker_id="w-cb") as proc:
            url = proc.bound_url()
            done = proc.wait_for_action("callback_ready", 60)
            assert done["attempts"] == 3
            assert len(receiver.calls) == 3
            call = receiver.calls[-1]
            assert call["path"] == "/v1/workers/ready"
            assert call["body"] == {"worker_id": "w-cb", "url": url, "model_ref": "hf:test/model",
                                    "backend": "cpu", "device": 0}
            assert call["headers"]["Authorization"] == f"Bearer {API_KEY}"

            good = {"Authorization": f"Bearer {API_KEY}"}
            assert httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT).status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}):
                for method, path in (("GET", "/v1/ready"), ("GET", "/v1/loading/progress"),
                                     ("POST", "/v1/inference"), ("DELETE", "/v1/inference/x"),
                                     ("POST", "/v1/shutdown"), ("GET", "/no/such/route")):
                    response = httpx.request(method, f"{url}{path}", headers=headers, timeout=HTTP_TIMEOUT,
                                             json={"prompt": "Hello"} if method == "POST" else None)
                    assert response.status_code == 401, (method, path, headers)
                    assert response.json()["error"]["code"] == "unauthorized"
                    assert response.headers["www-authenticate"].startswith("Bearer")
            assert httpx.get(f"{url}/v1/ready", headers=good, timeout=HTTP_TIMEOUT).json()["ready"] is True
            stream = infer(url, {"prompt": "Hello", "max_tokens": 2}, headers=good)
            assert stream.end.tokens_out == 2
            assert httpx.post(f"{url}/v1/shutdown", headers=good, timeout=HTTP_TIMEOUT).status_code == 200
            assert proc.wait(30) == 0
    # The key is never narrated.
    assert API_KEY not in "\n".join(proc.stdout_lines)


def test_callback_refused_exits_3_with_one_line(embedded_model):
    with CallbackReceiver([401]) as receiver:
        env = {"RBEE_WORKER_API_KEY": API_KEY}  # the key may come from the environment
        with start_worker(embedded_model, "--callback-url", receiver.url, env=env) as proc:
            assert proc.wait(60) == 3
        assert len(receiver.calls) == 1  # a 401 cannot get better by retrying
        assert receiver.calls[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert_one_line_no_traceback(proc, "ready callback", "401")
    failed = [o for o in proc.json_lines() if o.get("action") == "callback_failed"]
    assert failed and failed[0]["level"] == "error"
    assert actions(proc)[-1] == "exiting"


# -- dying with the parent ---------------------------------------------------------------

PARENT = """
import subprocess, sys, time
# Spawned without any preexec_fn: the worker must arrange to die with us by itself.
subprocess.Popen(sys.argv[1:])
time.sleep(600)
"""


def test_worker_dies_with_its_parent(embedded_model):
    argv = [sys.executable, "-c", PARENT, program("llm-worker-rbee"), "--model", str(embedded_model),
            "--worker-id", "w-orphan", "--threads", "2", "--ctx-size", "512"]
    parent = RbeeProcess(argv)
    worker_pid = None
    try:
        worker_pid = parent.wait_for_action("startup", 60)["pid"]
        assert parent.wait_for_action("model_load", 60)
        os.kill(parent.pid, signal.SIGKILL)  # no chance to clean up: only PDEATHSIG helps
        assert wait_gone([worker_pid], 15) == [], "the worker outlived its parent"
    finally:
        parent.stop()
        if worker_pid is not None and pid_alive(worker_pid):  # only when the test failed
            os.kill(worker_pid, signal.SIGKILL)
            assert wait_gone([worker_pid], 10) == []


# -- the command line ------------------------------------------------------------------


def test_help_exits_0_and_names_every_option(capsys):
    from rbee.worker.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--port", "--backend", "--device", "--worker-id", "--callback-url",
                   "--api-key", "--host", "--threads", "--ctx-size", "--model-ref"):
        assert option in out


@pytest.mark.parametrize("argv, needle", [
    (["--port", "8080"], "--model"),
    (["--model", "m.gguf", "--port", "70000"], "--port"),
    (["--model", "m.gguf", "--threads", "0"], "--threads"),
    (["--model", "m.gguf", "--ctx-size", "abc"], "--ctx-size"),
    (["--model", "m.gguf", "--no-such-option", "1"], "--no-such-option"),
])
def test_bad_command_lines_exit_2_with_one_line(capsys, argv, needle):
    from rbee.worker.main import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("llm-worker-rbee: ")
    assert captured.out == ""
