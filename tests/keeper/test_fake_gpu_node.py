"""Placement picks the node that offers the backend a job asks for, and a backend that the
node only claims fails fast.

No machine of this project has a GPU, so the "GPU node" here is a hive over real SSH whose
``RBEE_DETECT_OVERRIDE`` (for tests only) reports a CUDA device: a fake standing in for the
part that cannot run here. Everything else is real: keeper, queen, sshd, the hive's own
check of the backends its llama.cpp build really has.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, wait_no_rbee_processes

FAKE_CUDA = {
    "backends": ["cpu", "cuda"],
    "devices": [{"backend": "cuda", "index": 0, "name": "Fake RTX 4090", "memory_total_bytes": 24 * 2**30,
                 "memory_free_bytes": 23 * 2**30}],
}


def _keeper(home: Path, url: str, *args: str) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, url))


def test_a_cuda_job_goes_to_the_cuda_node_and_fails_fast_there(rbee_home: Path, sshd_server, tmp_path: Path) -> None:
    s = sshd_server
    url = dead_url()
    node_home = tmp_path / "gpu-node-home"
    hive = (f"env RBEE_HOME={shlex.quote(str(node_home))} RBEE_DETECT_OVERRIDE={shlex.quote(json.dumps(FAKE_CUDA))}"
            f" {program('rbee-hive')}")
    assert _keeper(rbee_home, url, "queen", "start").wait(60) == 0
    try:
        added = _keeper(rbee_home, url, "setup", "add-node", "gpu1", "--ssh-host", s.host, "--ssh-port", str(s.port),
                        "--ssh-user", s.user, "--ssh-key", str(s.key_path), "--rbee-hive-command", hive)
        assert added.wait(120) == 0, added.stderr_text()

        started = time.monotonic()
        job = _keeper(rbee_home, url, "infer", "--model", "gemma3-270m", "--prompt", "hi", "--max-tokens", "4",
                      "--backend", "cuda")
        assert job.wait(120) == 1, job.stderr_text()
        err = job.stderr_text()
        routed = [line for line in job.stderr_lines if "Routing job to node" in line]
        assert routed and "node gpu1: the only node with the cuda backend" in routed[0], err
        failed = [line for line in job.stderr_lines if "Failed: infer" in line]
        assert len(failed) == 1 and "cuda" in failed[0] and "--backend cpu" in failed[0], err
        # Fast: the hive refused before any worker loaded (its start over SSH is most of it).
        assert time.monotonic() - started < 30
        assert "llm-worker-rbee" not in err and "Loading" not in err
    finally:
        assert _keeper(rbee_home, url, "queen", "stop").wait(60) == 0
    assert not wait_no_rbee_processes(rbee_home, 20)
