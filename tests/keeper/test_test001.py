"""Test-001 end to end: rbee-keeper -> queen-rbee -> rbee-hive -> llm-worker-rbee.

Real processes, the real embedded model, a real sshd. Every test has its own RBEE_HOME
and an RBEE_QUEEN_URL where nothing listens (ephemeral mode) unless it starts a queen.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, wait_no_rbee_processes

pytestmark = pytest.mark.model
MODEL = "gemma3-270m"


def keeper(home: Path, *args: str, queen_url: str | None = None) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, queen_url))


def infer_args(node: str, max_tokens: int, *extra: str, prompt: str = "write a short story") -> list[str]:
    return ["infer", "--node", node, "--model", MODEL, "--prompt", prompt, "--max-tokens", str(max_tokens), *extra]


def first_index(lines: list[str], predicate) -> int:
    for i, line in enumerate(lines):
        if predicate(line):
            return i
    raise AssertionError("no matching line in:\n" + "\n".join(lines))


def is_worker_ready_line(line: str) -> bool:
    """The queen's ``infer_worker`` line: the inference request goes out right after it."""
    return line.startswith("[queen-rbee]") and "is ready at" in line


def wait_until_worker_ready(proc: RbeeProcess) -> None:
    """Wait (up to 600 s: a first run provisions the model) until the keeper's stderr says
    the worker is ready; fails at once if the keeper exited first."""
    deadline = time.monotonic() + 600
    while not any(is_worker_ready_line(line) for line in proc.stderr_lines):
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.stderr_text()
        time.sleep(0.05)


def summary(lines: list[str]) -> dict:
    """The keeper's summary: its job_complete narration (from --narration json output)."""
    for line in lines:
        if line.startswith("{") and '"job_complete"' in line:
            return json.loads(line)
    raise AssertionError("no job_complete line:\n" + "\n".join(lines))


def json_events(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def assert_test001_output(proc: RbeeProcess, node: str) -> list[str]:
    err = proc.stderr_lines
    # stdout holds only the generated text: no narration, no summary.
    stdout = "\n".join(proc.stdout_lines)
    assert stdout.strip(), proc.stderr_text()
    assert not any(line.startswith(("[queen-rbee]", "[rbee-hive]", "[llm-worker-rbee]", "[rbee-keeper]", "{")) for line in proc.stdout_lines)
    tokens = int(re.search(r"(\d+) tokens, [\d.]+ tok/s", "\n".join(err)).group(1))
    assert 0 < tokens <= 20
    # Narration on stderr, in the order of the cascade.
    queen = first_index(err, lambda l: l.startswith("[queen-rbee]"))
    hive = first_index(err, lambda l: l.startswith("[rbee-hive]"))
    worker = first_index(err, lambda l: l.startswith("[llm-worker-rbee]"))
    ready = first_index(err, is_worker_ready_line)
    inference = max(i for i, l in enumerate(err) if l.startswith("[llm-worker-rbee]"))
    complete = first_index(err, lambda l: "Complete: infer" in l)
    assert queen < hive < worker < ready < inference < complete, "\n".join(err)
    assert any(f"node {node}" in l for l in err[queen:hive])
    assert "Traceback" not in proc.stderr_text()
    return err


def test_test001_on_localhost(rbee_home: Path) -> None:
    proc = keeper(rbee_home, *infer_args("localhost", 20, "--temperature", "0.7"))
    assert proc.wait(600) == 0, proc.stderr_text()
    assert_test001_output(proc, "localhost")
    assert not wait_no_rbee_processes(rbee_home, 15)


@pytest.mark.sshd
def test_test001_over_ssh(rbee_home: Path, sshd_server) -> None:
    s = sshd_server
    # PATH differs under sshd: the node's hive command is absolute and carries RBEE_HOME.
    hive_command = f"env RBEE_HOME={rbee_home} {program('rbee-hive')}"
    add = keeper(
        rbee_home, "setup", "add-node", "blep", "--ssh-host", s.host, "--ssh-port", str(s.port),
        "--ssh-user", s.user, "--ssh-key", str(s.key_path), "--rbee-hive-command", hive_command,
    )
    assert add.wait(120) == 0, add.stderr_text()
    listed = keeper(rbee_home, "setup", "list-nodes", "--json")
    assert listed.wait(60) == 0
    nodes = json.loads("\n".join(listed.stdout_lines))["nodes"]
    assert any(n["name"] == "blep" and n["ssh_port"] == s.port for n in nodes), nodes

    proc = keeper(rbee_home, *infer_args("blep", 20, "--temperature", "0.7"))
    assert proc.wait(600) == 0, proc.stderr_text()
    err = assert_test001_output(proc, "blep")
    # The hive's startup narration came over the SSH channel (the only way for node blep).
    over_ssh = first_index(err, lambda l: "Starting rbee-hive on node blep over SSH" in l)
    assert over_ssh < first_index(err, lambda l: l.startswith("[rbee-hive]"))
    assert not wait_no_rbee_processes(rbee_home, 20)
    # sshd itself (and its sessions) is stopped and checked by the fixture.


def test_ctrl_c_in_ephemeral_mode_exits_130_within_a_second_and_leaves_nothing(rbee_home: Path) -> None:
    proc = keeper(rbee_home, *infer_args("localhost", 400, prompt="write a long story about a bee"))
    wait_until_worker_ready(proc)
    time.sleep(1.5)  # tokens are flowing now
    assert proc.proc.poll() is None, "the 400-token stream ended before Ctrl-C"
    sent = time.monotonic()
    proc.signal(signal.SIGINT)
    code = proc.proc.wait(timeout=10)
    took = time.monotonic() - sent
    proc.wait(10)
    assert code == 130, proc.stderr_text()
    assert took <= 1.0, f"exit took {took:.2f} s"
    assert "Cancelled." in proc.stderr_lines
    assert "Traceback" not in proc.stderr_text()
    assert not wait_no_rbee_processes(rbee_home, 5)


def test_persistent_mode_reuses_the_worker_and_ctrl_c_leaves_it_idle(rbee_home: Path) -> None:
    url = dead_url()  # a free port: `queen start` binds the port of RBEE_QUEEN_URL
    start = keeper(rbee_home, "queen", "start", queen_url=url)
    assert start.wait(120) == 0, start.stderr_text()
    record = json.loads((rbee_home / "queen.json").read_text())
    assert record["url"] == url
    try:
        status = keeper(rbee_home, "queen", "status", "--json", queen_url=url)
        assert status.wait(60) == 0 and json.loads("\n".join(status.stdout_lines))["running"]

        first = keeper(rbee_home, *infer_args("localhost", 8, "--narration", "json"), queen_url=url)
        assert first.wait(600) == 0, first.stderr_text()
        second = keeper(rbee_home, *infer_args("localhost", 8, "--narration", "json"), queen_url=url)
        assert second.wait(600) == 0, second.stderr_text()
        one, two = json_events(first.stderr_lines), json_events(second.stderr_lines)
        # The first run loaded a model; the second reused that worker and loaded nothing.
        assert any(e.get("actor") == "model-loader" and e.get("action") == "model_load" for e in one)
        assert not any("load" in e.get("action", "") for e in two)
        # No spawn asked: a free slot of the loaded worker was leased at once.
        assert not [e for e in two if e.get("action") == "infer_schedule"]
        leases = [e for e in two if e.get("action") == "infer_lease"]
        assert leases and leases[0]["human"].startswith("Slot 1 of 4 on worker ")
        assert summary(second.stderr_lines)["first_token_ms"] < summary(first.stderr_lines)["first_token_ms"]
        # No ephemeral queen was started: the persistent one did the work.
        assert not any(e.get("action") == "queen_start" for e in one + two)

        # Ctrl-C in persistent mode: the worker is idle again at once, and stays up.
        third = keeper(rbee_home, *infer_args("localhost", 400, prompt="write a long story"), queen_url=url)
        deadline = time.monotonic() + 120
        while not any(is_worker_ready_line(line) for line in third.stderr_lines):
            assert third.proc.poll() is None and time.monotonic() < deadline, third.stderr_text()
            time.sleep(0.05)
        time.sleep(1.0)
        sent = time.monotonic()
        third.signal(signal.SIGINT)
        assert third.proc.wait(timeout=10) == 130
        assert time.monotonic() - sent <= 1.0
        third.wait(10)
        workers: list = []
        while time.monotonic() - sent < 2.0:
            workers = httpx.get(f"{url}/v1/workers").json()["workers"]
            if workers and all(w["state"] == "ready" for w in workers):
                break
            time.sleep(0.05)
        assert len(workers) == 1 and workers[0]["state"] == "ready" and workers[0]["slots"]["busy"] == 0, workers
        assert "api_key" not in workers[0]
    finally:
        stop = keeper(rbee_home, "queen", "stop", queen_url=url)
        assert stop.wait(60) == 0, stop.stderr_text()
    assert not wait_no_rbee_processes(rbee_home, 15)


def test_a_second_ctrl_c_ends_what_is_left_at_once(rbee_home: Path) -> None:
    proc = keeper(rbee_home, *infer_args("localhost", 400, prompt="write a long story"))
    wait_until_worker_ready(proc)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.signal(signal.SIGINT)
    time.sleep(0.02)
    proc.signal(signal.SIGINT)
    assert proc.proc.wait(timeout=10) == 130
    assert time.monotonic() - sent <= 1.0
    proc.wait(10)
    assert "Cancelled." in proc.stderr_lines
    # The queen was killed; its hive got SIGTERM through PR_SET_PDEATHSIG, and so on down.
    assert not wait_no_rbee_processes(rbee_home, 5)


def test_ctrl_c_on_the_first_loading_event_is_cancelled_and_leaves_nothing(rbee_home: Path) -> None:
    proc = keeper(rbee_home, *infer_args("localhost", 20, "--narration", "json"))
    deadline = time.monotonic() + 600
    while not any(e.get("action") == "model_load" and e.get("phase") == "progress" for e in json_events(proc.stderr_lines)):
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.stderr_text()
        time.sleep(0.01)
    proc.signal(signal.SIGINT)
    assert proc.wait(30) == 130, proc.stderr_text()
    assert "Cancelled." in proc.stderr_lines and "Traceback" not in proc.stderr_text()
    assert not wait_no_rbee_processes(rbee_home, 10)
