"""The queen and its state on disk: a damaged ``nodes.db`` is set aside and said once; a
read-only or full ``RBEE_HOME`` is one line and exit 1; a local hive that cannot start
says why through the queen; the local hive gets the Hugging Face token but not the
queen's own token.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import httpx
import pytest

from tests.processes import RbeeProcess, children_of, program
from tests.queen.support import wait_no_rbee_processes
from tests.state_dirs import full_home, home_under_a_file, read_only_home

QUEEN = [program("queen-rbee"), "--port", "0"]


def test_a_damaged_nodes_db_is_set_aside_and_the_queen_runs_on(rbee_home: Path) -> None:
    (rbee_home / "nodes.db").write_bytes(b"not a database at all\n" * 100)
    with RbeeProcess(QUEEN, env={"RBEE_HOME": str(rbee_home)}) as queen:
        url = queen.bound_url()
        said = [o for o in queen.json_lines() if o.get("action") == "nodes_db_damaged"]
        assert len(said) == 1 and said[0]["level"] == "warn", queen.stdout_lines
        assert "rbee-keeper setup add-node" in said[0]["human"]
        kept = Path(said[0]["target"])
        assert kept.name.startswith("nodes.db.corrupt-") and kept.name in said[0]["human"]
        assert kept.read_bytes().startswith(b"not a database at all")
        nodes = httpx.get(f"{url}/v1/nodes", timeout=30)
        assert nodes.status_code == 200 and [n["name"] for n in nodes.json()["nodes"]] == ["localhost"]
    assert "Traceback" not in queen.stderr_text()


@pytest.mark.parametrize("how", ["read-only", "full", "under-a-file"])
def test_an_unwritable_home_stops_the_queen_with_one_line(rbee_home: Path, tmp_path: Path, how: str) -> None:
    env = {"RBEE_HOME": str(rbee_home)}
    argv = {"read-only": read_only_home, "full": full_home}.get(how, lambda a: a)(QUEEN)
    if how == "under-a-file":
        env["RBEE_HOME"] = str(home_under_a_file(tmp_path))
    with RbeeProcess(argv, env=env) as queen:
        assert queen.wait(60) == 1, queen.stderr_text()
        assert len(queen.stderr_lines) == 1, queen.stderr_text()
        line = queen.stderr_lines[0]
        assert line.startswith(f"queen-rbee: RBEE_HOME={env['RBEE_HOME']} ") and "set RBEE_HOME to" in line
        assert ("full disk" in line) == (how == "full"), line


def test_a_local_hive_that_cannot_start_says_why_through_the_queen(rbee_home: Path, tmp_path: Path) -> None:
    # The hive gets an RBEE_HOME of its own that cannot be: the queen must pass its words on.
    hive_home = home_under_a_file(tmp_path)
    command = shlex.join(["env", f"RBEE_HOME={hive_home}", program("rbee-hive")])
    with RbeeProcess(QUEEN, env={"RBEE_HOME": str(rbee_home), "RBEE_HIVE_COMMAND": command}) as queen:
        url = queen.bound_url()
        answer = httpx.get(f"{url}/v1/nodes/localhost/models", timeout=60)
        assert answer.status_code == 502, answer.text
        message = answer.json()["error"]["message"]
        assert message.startswith("rbee-hive on node localhost could not start: ")
        assert f"RBEE_HOME={hive_home} is not writable" in message and "set RBEE_HOME to" in message
    assert not wait_no_rbee_processes(rbee_home, 10)


def test_the_local_hive_gets_the_hugging_face_token_but_not_the_queens_token(rbee_home: Path) -> None:
    token = "queen-token-not-for-hives"
    env = {"RBEE_HOME": str(rbee_home), "RBEE_API_TOKEN": token, "HF_TOKEN": "hf_for_downloads"}
    with RbeeProcess(QUEEN, env=env) as queen:
        url = queen.bound_url()
        answer = httpx.get(f"{url}/v1/nodes/localhost/models", headers={"Authorization": f"Bearer {token}"},
                           timeout=60)
        assert answer.status_code == 200, answer.text
        hives = [pid for pid in children_of(queen.pid)
                 if b"rbee-hive" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(hives) == 1
        environ = dict(entry.split(b"=", 1) for entry in
                       Path(f"/proc/{hives[0]}/environ").read_bytes().split(b"\0") if b"=" in entry)
        assert b"RBEE_API_TOKEN" not in environ and environ[b"HF_TOKEN"] == b"hf_for_downloads"
        assert token.encode() not in Path(f"/proc/{hives[0]}/cmdline").read_bytes()
    assert not wait_no_rbee_processes(rbee_home, 10)
