"""A hive started over SSH must not outlive a queen it can no longer hear.

Real ``rbee-hive`` processes: one fed heartbeat lines on its stdin (as the queen does over
the SSH channel) that stops when they stop, and one started with ``--replace-stale`` that
ends the hive a lost queen left on the same RBEE_HOME.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.processes import RbeeProcess, pid_alive, program, wait_gone


def _hive(rbee_home: Path, *args: str) -> RbeeProcess:
    return RbeeProcess([program("rbee-hive"), "daemon", "--port", "0", *args],
                       env={"RBEE_HOME": str(rbee_home)}, stdin=subprocess.PIPE)


def test_a_hive_that_hears_no_heartbeat_stops_and_says_why(rbee_home: Path) -> None:
    hive = _hive(rbee_home, "--heartbeat-timeout", "1.5")
    try:
        hive.wait_for_action("hive_ready", 60)
        assert hive.proc.stdin is not None
        # Heartbeats keep it alive well past its timeout ...
        for _ in range(8):
            hive.proc.stdin.write(b"\n")
            hive.proc.stdin.flush()
            time.sleep(0.5)
        assert hive.proc.poll() is None
        assert (rbee_home / "run" / "hive.pid").is_file()
        # ... and silence (stdin still open: a cut network sends no EOF) ends it.
        silent_from = time.monotonic()
        assert hive.wait(15) == 0
        assert time.monotonic() - silent_from < 5
        said = hive.wait_for_action("heartbeat_lost", 1)
        assert "1.5 s" in said["human"] and said["level"] == "warn"
        assert "hive_stopped" in [o.get("action") for o in hive.json_lines()]
        assert not (rbee_home / "run" / "hive.pid").exists()
    finally:
        hive.stop()


def test_a_new_hive_with_replace_stale_ends_the_one_a_lost_queen_left(rbee_home: Path) -> None:
    stale = _hive(rbee_home)
    fresh: RbeeProcess | None = None
    try:
        stale.wait_for_action("hive_ready", 60)
        # Without --replace-stale two hives may share a home (their workers are apart).
        fresh = _hive(rbee_home, "--replace-stale")
        said = fresh.wait_for_action("stale_hive", 60)
        assert f"pid {stale.pid}" in said["human"] and said["outcome"] == "stopped with its workers"
        fresh.wait_for_action("hive_ready", 60)
        assert wait_gone([stale.pid], 5) == []
        assert "hive_stopped" in [o.get("action") for o in stale.json_lines()]
        assert pid_alive(fresh.pid)
    finally:
        if fresh is not None:
            fresh.stop()
        stale.stop()
    assert wait_gone([stale.pid] + ([fresh.pid] if fresh else []), 10) == []
