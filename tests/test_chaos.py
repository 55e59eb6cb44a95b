"""The chaos harness, ten seeded runs: a program killed at a random moment of Test-001
leaves an honest outcome and nothing behind.

``benchmarks/chaos.py`` runs as a process (it is a script for people; its last stdout line
is a ``CHAOS_JSON`` summary of every run), with the session's assembled model shared into
each run's ``RBEE_HOME`` and the runs' homes under this test's tmp_path. Seed 1 with ten
runs puts every victim (keeper Ctrl-C and SIGKILL, queen, hive, worker) in both modes
(ephemeral, persistent), most of them between the first token and the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.processes import RbeeProcess
from tests.queen.support import rbee_processes

pytestmark = pytest.mark.model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "chaos.py"
DAEMONS = ("queen", "hive", "worker")
VICTIMS = ("keeper-sigint", "keeper-sigkill", *DAEMONS)


def failures(runs: list[dict], bad) -> list[str]:
    return [f"run {r['index']} ({r['victim']}, {r['mode']}, {r['phase']}): exit {r['exit_code']}, "
            f"{r['violations']}, keeper stderr: {r['stderr_tail']}" for r in runs if bad(r)]


def test_ten_seeded_chaos_runs_keep_every_must_hold(embedded_model: Path, tmp_path: Path) -> None:
    harness = RbeeProcess([sys.executable, str(SCRIPT), "--runs", "10", "--seed", "1", "--max-tokens", "48",
                           "--model-file", str(embedded_model), "--workdir", str(tmp_path)])
    try:
        code = harness.wait(900)
    finally:
        harness.stop()  # a timeout: SIGTERM, and the harness still ends its current run
    table = "\n".join(line for line in harness.stdout_lines if not line.startswith("CHAOS_JSON "))
    marked = [line for line in harness.stdout_lines if line.startswith("CHAOS_JSON ")]
    assert marked, harness.stderr_text()[-3000:]
    runs = json.loads(marked[-1].removeprefix("CHAOS_JSON "))["runs"]

    assert len(runs) == 10, table
    assert {(r["victim"], r["mode"]) for r in runs} == {(v, m) for v in VICTIMS for m in ("ephemeral", "persistent")}
    # The outcome is the truth: never exit 0 with part of the answer, never a traceback.
    assert not failures(runs, lambda r: r["exit_code"] == 0 and not r["whole_answer"]), table
    assert not failures(runs, lambda r: r["keeper_traceback"]), table
    assert not failures(runs, lambda r: r["hung"] is not None), table
    # A queen, hive or worker SIGKILLed between the first token and the end: exit non-zero
    # with "Failed: infer — <cause>" naming it. Ctrl-C there: 130 and "Cancelled.".
    mid = [r for r in runs if r["phase"] == "streaming" and r["victim"] in DAEMONS and not r["whole_answer"]]
    assert len(mid) >= 4, table  # seed 1 kills every daemon in the middle of an answer
    assert not failures(mid, lambda r: r["exit_code"] in (0, None) or r["victim"] not in r["failed_line"].lower()
                        or "Failed: infer — " not in r["failed_line"]), table
    assert not failures([r for r in runs if r["phase"] == "streaming" and r["victim"] == "keeper-sigint"],
                        lambda r: r["exit_code"] != 130 or not r["cancelled_line"]), table
    # Nothing left 10 s after the kill (nor after `queen stop`), nothing the harness had to
    # kill itself, and no worker PID file once the next hive has started.
    assert not failures(runs, lambda r: r["leftovers"] or r["left_after_stop"] or r["harness_killed"]), table
    assert not failures(runs, lambda r: any(f.startswith("workers/") for f in
                                            (r["stale_after_hive_start"] if r["stale_after_hive_start"] is not None
                                             else r["stale_at_end"]))), table
    # Every hive kill was followed by a hive start in that home, which swept its dead worker's record.
    assert all(r["stale_after_hive_start"] is not None for r in runs if r["victim"] == "hive"), table
    assert code == 0, table  # the harness's own verdict agrees
    assert not [pid for r in runs for pid in rbee_processes(Path(r["home"]))]
