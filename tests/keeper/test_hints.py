"""Errors that name the fix: the reserved node name ``localhost``, and a Hugging Face Hub
that cannot be reached (an offline node, a wrong ``HF_ENDPOINT``)."""

from __future__ import annotations

from pathlib import Path

import httpx

from rbee.queen.nodes import LOCALHOST_RESERVED
from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, rbee_processes, start_queen, wait_no_rbee_processes


def test_add_node_localhost_says_the_name_is_reserved_and_starts_nothing(rbee_home: Path) -> None:
    proc = RbeeProcess([program("rbee-keeper"), "setup", "add-node", "localhost", "--ssh-host", "127.0.0.1"],
                       env=keeper_env(rbee_home))
    assert proc.wait(60) == 2
    assert proc.stderr_lines == [f"Error: {LOCALHOST_RESERVED}"]
    assert "reserved for the built-in local node" in LOCALHOST_RESERVED and "another name" in LOCALHOST_RESERVED
    assert proc.stdout_lines == []
    assert list(rbee_home.iterdir()) == [] and rbee_processes(rbee_home) == []


def test_the_queen_refuses_localhost_naming_why_with_every_other_problem(rbee_home: Path) -> None:
    with start_queen(rbee_home) as queen:
        url = queen.bound_url()
        answer = httpx.post(f"{url}/v1/nodes", json={"name": "localhost", "ssh_host": "127.0.0.1", "ssh_port": 0},
                            timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"] == f"invalid node: {LOCALHOST_RESERVED}; ssh_port must be 1 to 65535"
    assert [d["field"] for d in error["details"]] == ["name", "ssh_port"]
    assert wait_no_rbee_processes(rbee_home, 15) == []


def test_models_download_with_the_hub_unreachable_names_every_way_out(rbee_home: Path, tmp_path: Path) -> None:
    hub = dead_url()  # as an offline node sees the Hub: nothing answers
    env = {**keeper_env(rbee_home), "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf-home")}
    proc = RbeeProcess([program("rbee-keeper"), "models", "download", "hf:rbee-test/small-GGUF"], env=env)
    assert proc.wait(120) == 1, proc.stderr_text()
    said = [line for line in proc.stderr_lines if "cannot reach the Hugging Face Hub" in line]
    assert said, proc.stderr_text()
    for needle in (f"at {hub} for hf:rbee-test/small-GGUF", "set HF_ENDPOINT", "HF_HUB_OFFLINE=1", "gemma3-270m",
                   "file:", "RBEE_MODEL_DIRS"):
        assert needle in said[-1], (needle, said[-1])
    assert "Traceback" not in proc.stderr_text()
    assert wait_no_rbee_processes(rbee_home, 15) == []
