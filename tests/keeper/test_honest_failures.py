"""The outcome is the truth: a job cut short by anything but this keeper's own Ctrl-C exits
1 with "Failed: infer — <cause>", keeps its partial answer on stdout, and leaves nothing.

Real processes and the real model: a keeper, a queen, a hive and a worker; the test kills
one of them by its PID (found through this test's own RBEE_HOME) in the middle of a job.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.keeper.test_test001 import infer_args, is_worker_ready_line, keeper
from tests.processes import RbeeProcess, pid_alive, program
from tests.queen.support import dead_url, rbee_processes, wait_no_rbee_processes

pytestmark = pytest.mark.model

#: Long enough to be in the middle of it when something is killed (~6 s at 50 tok/s).
LONG = 300


def pid_of(home: Path, program: str) -> int:
    """The PID of this test's one process running ``program``."""
    for pid in rbee_processes(home):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(program.encode()) for arg in argv[:2]):
            return pid
    raise AssertionError(f"no {program} of this test runs")


def wait_mid_answer(proc, seconds: float = 600) -> None:
    """Wait until the worker is streaming this keeper's answer."""
    deadline = time.monotonic() + seconds
    while not any(is_worker_ready_line(line) for line in proc.stderr_lines):
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.stderr_text()
        time.sleep(0.05)
    time.sleep(0.8)  # some tokens out, most still to come
    assert proc.proc.poll() is None, proc.stderr_text()


def failed_line(proc) -> str:
    lines = [line for line in proc.stderr_lines if "Failed: infer — " in line]
    assert len(lines) == 1, proc.stderr_text()
    return lines[0]


@pytest.mark.parametrize(("victim", "named"), [
    ("rbee-hive", "lost its hive"),
    ("llm-worker-rbee", "was lost in the middle of the job"),
    ("queen-rbee", "went away in the middle of the job"),
])
def test_a_program_killed_mid_job_fails_the_job_by_name(rbee_home: Path, victim: str, named: str) -> None:
    proc = keeper(rbee_home, *infer_args("localhost", LONG, prompt="write a long story"))
    wait_mid_answer(proc)
    os.kill(pid_of(rbee_home, victim), signal.SIGKILL)
    assert proc.wait(30) == 1, proc.stderr_text()
    line = failed_line(proc)
    assert named in line, line
    assert "Traceback" not in proc.stderr_text() and "Exceptions from Trio" not in proc.stderr_text()
    assert "Complete: infer" not in proc.stderr_text()
    assert not wait_no_rbee_processes(rbee_home, 10)


def test_a_stalled_worker_fails_the_job_within_the_stall_timeout_and_is_killed(rbee_home: Path) -> None:
    url = dead_url()
    port = url.rsplit(":", 1)[1]
    # A persistent queen at RBEE_QUEEN_URL with a short stall timeout (its own flag).
    queen = RbeeProcess([program("queen-rbee"), "--port", port, "--stall-timeout", "3"],
                        env={"RBEE_HOME": str(rbee_home)})
    try:
        queen.bound_url(60)
        proc = keeper(rbee_home, *infer_args("localhost", LONG, prompt="write a long story"), queen_url=url)
        wait_mid_answer(proc)
        worker = pid_of(rbee_home, "llm-worker-rbee")
        stopped = time.monotonic()
        os.kill(worker, signal.SIGSTOP)  # as a driver stuck in the GPU would
        assert proc.wait(3 + 5 + 5) == 1, proc.stderr_text()
        assert time.monotonic() - stopped <= 3 + 5
        line = failed_line(proc)
        assert "stalled for 3 s" in line and "localhost" in line, line
        deadline = time.monotonic() + 10
        while pid_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(worker), "the stalled worker was not killed"
        # The hive reported it gone, and the queen forgot it.
        workers = None
        while time.monotonic() < deadline:
            workers = httpx.get(f"{url}/v1/workers").json()["workers"]
            if not workers:
                break
            time.sleep(0.1)
        assert workers == [], workers
    finally:
        queen.stop(grace=30)
    assert not wait_no_rbee_processes(rbee_home, 15)


def test_queen_stop_lets_a_running_job_finish_within_the_grace_period(rbee_home: Path) -> None:
    url = dead_url()
    start = keeper(rbee_home, "queen", "start", queen_url=url)
    assert start.wait(120) == 0, start.stderr_text()
    try:
        proc = keeper(rbee_home, *infer_args("localhost", 48, prompt="write a long story"), queen_url=url)
        wait_mid_answer(proc)
        stop = keeper(rbee_home, "queen", "stop", queen_url=url)
        # Draining: a new job is refused at once with 503 shutting_down. Probed with a job
        # the queen would refuse anyway (max_tokens 0: 400), so no probe ever runs.
        deadline = time.monotonic() + 30
        while True:
            refused = httpx.post(f"{url}/v1/jobs", json={"model": "gemma3-270m", "prompt": "hi", "max_tokens": 0})
            if refused.status_code != 400 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down", refused.text
        assert proc.proc.poll() is None, "the job should still be running while the queen drains"
        assert proc.wait(120) == 0, proc.stderr_text()
        assert any("Complete: infer" in line for line in proc.stderr_lines)
        assert stop.wait(120) == 0, stop.stderr_text()
    finally:
        stop_again = keeper(rbee_home, "queen", "stop", queen_url=url)
        stop_again.wait(120)
    assert not wait_no_rbee_processes(rbee_home, 15)


def test_a_model_that_will_not_load_is_one_line_with_its_cause(rbee_home: Path, embedded_model: Path) -> None:
    """A GGUF whose header is fine but whose tensors are cut off: preflight passes, the
    worker's load fails and the worker exits before it is ready. The user reads that
    cause, in one line, with the class's code kept across every hop."""
    models = rbee_home / "models"
    models.mkdir(exist_ok=True)
    truncated = models / "truncated.gguf"
    with embedded_model.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(20 * 1024 * 1024))
    proc = keeper(rbee_home, "infer", "--node", "localhost", "--model", f"file:{truncated}", "--prompt", "hi",
                  "--max-tokens", "4", "--narration", "json")
    assert proc.wait(300) == 1, proc.stderr_text()
    text = proc.stderr_text()
    assert "Traceback" not in text and "ExceptionGroup" not in text and "Exceptions from Trio" not in text, text
    failed = [json.loads(line) for line in proc.stderr_lines
              if line.startswith("{") and '"job_complete"' in line]
    assert len(failed) == 1 and failed[0]["human"].startswith("Failed: infer — "), text
    assert failed[0]["error_code"] == "model_load_failed", failed
    assert "truncated.gguf" in failed[0]["human"] and "corrupted or incomplete" in failed[0]["human"], failed
    assert proc.stdout_lines == []
    assert not wait_no_rbee_processes(rbee_home, 10)
