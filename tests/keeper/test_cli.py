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
    url = dead_url()
    proc = keeper(rbee_home, "setup", "remove-node", "ghost", queen_url=url)
    assert proc.wait(60) == 1
    errors = [line for line in proc.stderr_lines if line.startswith("Error:")]
    assert len(errors) == 1 and "ghost" in errors[0] and "list-nodes" in errors[0]
    # It started a queen for the command, and said so in one line before anything else.
    first = proc.stderr_lines[0]
    assert first.startswith("[rbee-keeper] ") and first.endswith(
        f"No queen-rbee at {url}: starting one until this command ends "
        "(ephemeral; `rbee-keeper queen start` keeps one running)"), proc.stderr_text()
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
        status = keeper(rbee_home, "queen", "status", "--json", queen_url=url)
        assert status.wait(60) == 0
        document = json.loads("\n".join(status.stdout_lines))
        assert {k: document[k] for k in ("url", "pid", "running", "recorded")} == \
            {"url": url, "pid": record["pid"], "running": True, "recorded": True}
        # With the persistent queen up, commands use it (listing nodes starts no other queen).
        listed = keeper(rbee_home, "setup", "list-nodes", "--json", queen_url=url)
        assert listed.wait(60) == 0
        assert [n["name"] for n in json.loads("\n".join(listed.stdout_lines))["nodes"]] == ["localhost"]
    finally:
        stop = keeper(rbee_home, "queen", "stop", queen_url=url)
        assert stop.wait(60) == 0
    assert not (rbee_home / "queen.json").exists()
    assert not wait_no_rbee_processes(rbee_home, 10)


def cut_table(lines: list[str], columns: tuple[str, ...]) -> list[list[str]]:
    """The rows of a keeper table, cut at its header's column starts."""
    header, *rows = lines
    starts = [header.index(name) for name in columns]
    return [[row[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for row in rows]


@pytest.mark.model
def test_workers_and_models_commands_on_a_persistent_queen(rbee_home: Path) -> None:
    from rbee.keeper.admin import MODEL_COLUMNS, NO_WORKERS_NOTE, PS_COLUMNS, no_models_note

    url = dead_url()
    assert keeper(rbee_home, "queen", "start", queen_url=url).wait(60) == 0

    def run(*args: str, code: int = 0) -> RbeeProcess:
        proc = keeper(rbee_home, *args, queen_url=url)
        assert proc.wait(120) == code, (args, proc.stdout_lines, proc.stderr_text())
        assert "Traceback" not in proc.stderr_text()
        return proc

    try:
        quiet = run("infer", "--model", "gemma3-270m", "--prompt", "hi", "--max-tokens", "3", "--narration", "quiet")
        assert quiet.stderr_lines == []  # quiet: errors only
        # ps and its older name print the same table; --json is the queen's listing.
        ps, listed = run("ps"), run("workers", "list")
        rows = cut_table(ps.stdout_lines, PS_COLUMNS)
        assert len(rows) == 1 and rows[0][:4] == ["localhost", "gemma3-270m", "cpu:0", "0/4"]
        assert [r[:5] + r[6:] for r in cut_table(listed.stdout_lines, PS_COLUMNS)] == [rows[0][:5] + rows[0][6:]]
        workers = json.loads("\n".join(run("ps", "--json").stdout_lines))["workers"]
        assert [(w["node"], w["model"], w["worker_id"]) for w in workers] == [("localhost", "gemma3-270m", rows[0][6])]
        run("workers", "health")

        models = run("models", "list", "--node", "localhost")
        [model] = cut_table(models.stdout_lines, MODEL_COLUMNS)
        assert model[:3] == ["gemma3-270m", "241 MiB", "a5fd3b62230a"] and model[4] != "never"
        catalog = json.loads("\n".join(run("models", "list", "--json").stdout_lines))
        assert catalog["node"] == "localhost" and [m["reference"] for m in catalog["models"]] == ["gemma3-270m"]
        model_file = Path(catalog["models"][0]["local_path"])

        # Removing a model a worker has loaded is refused (409), naming the worker.
        busy = run("models", "rm", "gemma3-270m", code=1)
        assert f"in use by worker {rows[0][6]}" in busy.stderr_text() and model_file.is_file()
        unknown = run("workers", "shutdown", "--node", "no-such-node", code=1)
        assert "no node named 'no-such-node'" in unknown.stderr_text()

        run("workers", "shutdown")
        for _ in range(100):
            after = run("ps")
            if after.stdout_lines == []:
                break
            time.sleep(0.1)
        assert after.stdout_lines == [] and after.stderr_lines == [NO_WORKERS_NOTE]
        nothing = run("workers", "shutdown", code=1)
        assert "no workers running: nothing to shut down" in nothing.stderr_text()

        removed = run("models", "rm", "gemma3-270m")
        assert "Removed gemma3-270m from localhost: its file" in removed.stderr_text() and not model_file.exists()
        empty = run("models", "list")
        assert empty.stdout_lines == [] and empty.stderr_lines == [no_models_note("localhost")]
        gone = run("models", "rm", "gemma3-270m", code=1)
        assert "no model gemma3-270m on node localhost" in gone.stderr_text()

        download = run("models", "download", "gemma3-270m", "--node", "localhost")
        assert "Complete: download" in download.stderr_text() and model_file.is_file()
    finally:
        assert keeper(rbee_home, "queen", "stop", queen_url=url).wait(60) == 0
    assert not wait_no_rbee_processes(rbee_home, 15)
