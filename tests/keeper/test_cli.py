"""rbee-keeper's command line: usage errors, one-line errors, the persistent queen."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, rbee_processes, wait_no_rbee_processes


def keeper(home: Path, *args: str, queen_url: str | None = None) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, queen_url))


def test_bad_usage_exits_2(rbee_home: Path) -> None:
    for args in (["infer", "--prompt", "hi"], ["infer", "--model", "m", "--prompt", "p", "--max-tokens", "many"], ["frobnicate"]):
        proc = keeper(rbee_home, *args)
        assert proc.wait(60) == 2, (args, proc.stderr_text())
        assert "Traceback" not in proc.stderr_text()


def test_an_unknown_node_exits_1_with_one_line_naming_the_fix(rbee_home: Path) -> None:
    # No queen runs: the keeper reads the node registry itself and starts nothing.
    proc = keeper(rbee_home, "infer", "--node", "nosuch", "--model", "gemma3-270m", "--prompt", "p")
    assert proc.wait(60) == 1
    assert len(proc.stderr_lines) == 1, proc.stderr_text()
    assert proc.stderr_lines[0].startswith("Error: no node named 'nosuch'")
    assert "setup add-node nosuch" in proc.stderr_lines[0]
    assert proc.stdout_lines == []
    assert not (rbee_home / "logs").exists()  # no ephemeral queen was started (nor its log)
    assert rbee_processes(rbee_home) == []


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--max-tokens", "0"], "max_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--model", "nonsense:x"], "model"),
    ],
    ids=["max-tokens-0", "temperature-negative", "model-unknown"],
)
def test_a_bad_request_exits_2_at_once_starting_nothing(rbee_home: Path, args: list[str], field: str) -> None:
    base = {"--model": "gemma3-270m", "--prompt": "hi"}
    base.update(dict(zip(args[::2], args[1::2])))
    started = time.monotonic()
    proc = keeper(rbee_home, "infer", *[x for kv in base.items() for x in kv])
    assert proc.wait(60) == 2
    elapsed = time.monotonic() - started
    assert len(proc.stderr_lines) == 1, proc.stderr_text()
    line = proc.stderr_lines[0]
    assert line.startswith("Error: invalid infer request: ") and field in line
    if field == "model":
        assert "accepted forms: hf:org/repo" in line
    assert proc.stdout_lines == []
    assert list(rbee_home.iterdir()) == []  # nothing started, nothing written
    assert rbee_processes(rbee_home) == []
    assert elapsed < 2.0, elapsed


def test_the_keepers_entry_point_imports_no_trio() -> None:
    # Why the exit codes live in rbee/keeper/exit_codes.py and trio is imported late: a
    # bad command line is refused before the ~0.35 s of trio, httpx and the renderer.
    code = ("import sys, rbee.keeper.main; "
            "print(sorted(m for m in ('trio', 'httpx', 'rbee.keeper.run_job') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_admin_errors_are_one_line(rbee_home: Path) -> None:
    proc = keeper(rbee_home, "setup", "remove-node", "ghost")
    assert proc.wait(60) == 1
    errors = [line for line in proc.stderr_lines if line.startswith("Error:")]
    assert len(errors) == 1 and "ghost" in errors[0] and "list-nodes" in errors[0]
    assert "Traceback" not in proc.stderr_text()
    bad_key = keeper(rbee_home, "setup", "add-node", "n1", "--ssh-host", "127.0.0.1", "--ssh-port", dead_url().rsplit(":", 1)[1])
    assert bad_key.wait(60) == 1
    assert any(line.startswith("Error: SSH to node 'n1'") and "--ssh-port" in line for line in bad_key.stderr_lines), bad_key.stderr_text()
    assert not wait_no_rbee_processes(rbee_home, 10)


def test_queen_start_status_stop(rbee_home: Path) -> None:
    url = dead_url()
    assert keeper(rbee_home, "queen", "status", queen_url=url).wait(60) == 1
    start = keeper(rbee_home, "queen", "start", queen_url=url)
    assert start.wait(60) == 0, start.stderr_text()
    record = json.loads((rbee_home / "queen.json").read_text())
    try:
        assert record["url"] == url
        again = keeper(rbee_home, "queen", "start", queen_url=url)
        assert again.wait(60) == 0 and "already runs" in again.stderr_text()
        status = keeper(rbee_home, "queen", "status", queen_url=url)
        assert status.wait(60) == 0
        assert json.loads(status.stdout_lines[-1]) == {"url": url, "pid": None, "running": True}
        # With the persistent queen up, commands use it (listing nodes starts no other queen).
        listed = keeper(rbee_home, "setup", "list-nodes", queen_url=url)
        assert listed.wait(60) == 0 and listed.stdout_lines[0].startswith("localhost\t")
    finally:
        stop = keeper(rbee_home, "queen", "stop", queen_url=url)
        assert stop.wait(60) == 0
    assert not (rbee_home / "queen.json").exists()
    assert not wait_no_rbee_processes(rbee_home, 10)


@pytest.mark.model
def test_workers_and_models_commands_on_a_persistent_queen(rbee_home: Path) -> None:
    url = dead_url()
    assert keeper(rbee_home, "queen", "start", queen_url=url).wait(60) == 0
    try:
        quiet = keeper(rbee_home, "infer", "--model", "gemma3-270m", "--prompt", "hi", "--max-tokens", "3", "--narration", "quiet", queen_url=url)
        assert quiet.wait(300) == 0, quiet.stderr_text()
        assert quiet.stderr_lines == []  # quiet: errors only
        listed = keeper(rbee_home, "workers", "list", queen_url=url)
        assert listed.wait(60) == 0
        rows = [line.split("\t") for line in listed.stdout_lines]
        assert len(rows) == 1 and rows[0][0] == "localhost" and rows[0][2] == "ready" and rows[0][3] == "gemma3-270m"
        assert keeper(rbee_home, "workers", "health", queen_url=url).wait(60) == 0
        models = keeper(rbee_home, "models", "list", "--node", "localhost", queen_url=url)
        assert models.wait(60) == 0 and models.stdout_lines[0].startswith("gemma3-270m\t")
        download = keeper(rbee_home, "models", "download", "gemma3-270m", "--node", "localhost", queen_url=url)
        assert download.wait(120) == 0 and "Complete: download" in download.stderr_text()
        assert keeper(rbee_home, "workers", "shutdown", queen_url=url).wait(60) == 0
        for _ in range(100):
            after = keeper(rbee_home, "workers", "list", queen_url=url)
            assert after.wait(60) == 0
            if after.stdout_lines == []:
                break
        assert after.stdout_lines == []
    finally:
        assert keeper(rbee_home, "queen", "stop", queen_url=url).wait(60) == 0
    assert not wait_no_rbee_processes(rbee_home, 15)
