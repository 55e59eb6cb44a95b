"""``rbee-hive detect`` and the CLI's usage errors, as real processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from tests.hive.conftest import running_hive
from tests.processes import RbeeProcess, program


def test_detect_prints_backends_devices_and_disk(rbee_home: Path) -> None:
    with RbeeProcess([program("rbee-hive"), "detect"]) as proc:
        assert proc.wait(60) == 0, proc.stderr_text()
        node = json.loads("\n".join(proc.stdout_lines))
    assert node["hostname"] == socket.gethostname()
    assert node["backends"][0] == "cpu" and set(node["backends"]) <= {"cpu", "cuda", "metal"}
    cpu = [d for d in node["devices"] if d["backend"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["index"] == 0 and cpu[0]["name"]
    assert 0 < cpu[0]["memory_free_bytes"] <= cpu[0]["memory_total_bytes"]
    assert node["disk_free_bytes"] > 0 and node["rbee_version"]


def test_usage_errors_exit_2(rbee_home: Path) -> None:
    cases = [(["daemon", "--port", "many"], "--port"), (["launch"], "launch"),
             (["daemon", "--token-file", str(rbee_home / "absent")], "cannot read the token file")]
    for argv, says in cases:
        with RbeeProcess([program("rbee-hive"), *argv]) as proc:
            assert proc.wait(60) == 2, (argv, proc.stderr_text())
            assert says in proc.stderr_text(), proc.stderr_text()


def test_a_running_hive_measures_its_node_again_at_each_ask(rbee_home: Path) -> None:
    # Free disk (and memory) change as models and workers come and go: GET /v1/detect is
    # what the node has now, not what it had when the hive started.
    with running_hive({"RBEE_HOME": str(rbee_home)}) as hive:
        before = hive.http.get("/v1/detect").json()
        ballast = rbee_home / "models" / "ballast.bin"
        ballast.parent.mkdir(parents=True, exist_ok=True)
        with open(ballast, "wb") as f:
            f.write(b"\1" * (64 << 20))
            f.flush()
            os.fsync(f.fileno())
        after = hive.http.get("/v1/detect").json()
        assert after["disk_free_bytes"] <= before["disk_free_bytes"] - (32 << 20), (before, after)
        assert after["backends"] == before["backends"] and after["hostname"] == before["hostname"]
