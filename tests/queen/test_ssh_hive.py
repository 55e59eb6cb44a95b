"""A hive started over real SSH: registered through the API, alive only as long as the
SSH session, i.e. as long as the queen."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.processes import RbeeProcess, program, wait_gone
from tests.queen.support import rbee_processes, start_queen, wait_no_rbee_processes

pytestmark = pytest.mark.sshd


def add_node(url: str, home: Path, s, **overrides) -> httpx.Response:
    body = {
        "name": "blep", "ssh_host": s.host, "ssh_port": s.port, "ssh_user": s.user, "ssh_key": str(s.key_path),
        "rbee_hive_command": f"env RBEE_HOME={home} {program('rbee-hive')}",
    }
    body.update(overrides)
    return httpx.post(f"{url}/v1/nodes", json=body, timeout=60)


@pytest.mark.parametrize("how", ["graceful", "killed"])
def test_the_ssh_hive_lives_as_long_as_the_queen(rbee_home: Path, sshd_server, how: str) -> None:
    queen = start_queen(rbee_home)
    try:
        url = queen.bound_url()
        refused = add_node(url, rbee_home, sshd_server, rbee_hive_command="/nonexistent/rbee-hive")
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "node_unreachable"
        assert "--rbee-hive-command" in refused.json()["error"]["message"]

        added = add_node(url, rbee_home, sshd_server)
        assert added.status_code == 201, added.text
        node = added.json()
        assert node["detect"]["backends"] and node["host_key"] == sshd_server.host_public_key
        assert [n["name"] for n in httpx.get(f"{url}/v1/nodes").json()["nodes"]] == ["localhost", "blep"]

        # Asking for the node's models starts its hive over SSH (no model needs loading).
        models = httpx.get(f"{url}/v1/nodes/blep/models", timeout=120)
        assert models.status_code == 200, models.text
        assert httpx.get(f"{url}/health").json()["hives"] == ["blep"]
        hive_pids = [p for p in rbee_processes(rbee_home) if p != queen.pid]
        assert hive_pids, "no rbee-hive runs under sshd"
        # The hive's startup narration reached the queen through the SSH channel.
        hive_lines = [o for o in queen.json_lines() if o.get("actor") == "rbee-hive"]
        assert "hive_ready" in [o.get("action") for o in hive_lines]
        # The hive needs the key the queen minted for it (sent over the channel into a
        # 0600 file on the node); nobody else on the node can drive it.
        hive_url = next(o["url"] for o in hive_lines if o.get("action") == "server_bind")
        assert httpx.get(f"{hive_url}/v1/workers").status_code == 401
        token_file = sshd_server.home / ".rbee" / "hive-blep.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in queen.stderr_text() + json.dumps(queen.json_lines())
        assert httpx.get(f"{hive_url}/v1/workers", headers={"Authorization": f"Bearer {token}"}).status_code == 200

        if how == "graceful":
            assert httpx.post(f"{url}/v1/shutdown").status_code == 202
            assert queen.wait(60) == 0
            actions = [o.get("action") for o in queen.json_lines()]
            assert actions.index("hive_stop") < actions.index("hive_exit") < actions.index("queen_stopped")
        else:
            # The queen dies without a word: the SSH connection closes, sshd closes the
            # hive's stdin, and the hive shuts itself down on that EOF.
            queen.signal(signal.SIGKILL)
            queen.wait(30)
        assert not wait_no_rbee_processes(rbee_home, 20)
    finally:
        queen.stop()

    # The registry outlives the queen: a new one sees the node.
    again = start_queen(rbee_home)
    try:
        again_url = again.bound_url()
        assert [n["name"] for n in httpx.get(f"{again_url}/v1/nodes").json()["nodes"]] == ["localhost", "blep"]
        assert httpx.delete(f"{again_url}/v1/nodes/blep").status_code == 200
        assert httpx.delete(f"{again_url}/v1/nodes/blep").status_code == 404
    finally:
        again.stop()


def test_a_hive_left_by_a_queen_that_went_silent_is_ended_by_the_next_hive_there(
        rbee_home: Path, sshd_server, tmp_path: Path) -> None:
    # Queen A starts the node's hive, then hangs (SIGSTOP): its TCP connection stays up, so
    # neither EOF nor a reset reaches the hive, and its heartbeat timeout (60 s) is far
    # off. Queen B, reaching the same node, must not leave a second hive beside it.
    node_home = tmp_path / "node-home"
    hive_command = f"env RBEE_HOME={node_home} {program('rbee-hive')}"
    second_home = tmp_path / "second-queen"
    second_home.mkdir()
    first = start_queen(rbee_home, "--hive-heartbeat-timeout", "60")
    second: RbeeProcess | None = None
    try:
        url = first.bound_url()
        assert add_node(url, rbee_home, sshd_server, rbee_hive_command=hive_command).status_code == 201
        assert httpx.get(f"{url}/v1/nodes/blep/models", timeout=120).status_code == 200
        stale = rbee_processes(node_home)
        assert len(stale) == 1, "one hive runs on the node"
        first.signal(signal.SIGSTOP)

        second = start_queen(second_home)
        second_url = second.bound_url()
        assert add_node(second_url, second_home, sshd_server, rbee_hive_command=hive_command).status_code == 201
        assert httpx.get(f"{second_url}/v1/nodes/blep/models", timeout=120).status_code == 200
        said = second.wait_for_action("stale_hive", 30)
        assert f"pid {stale[0]}" in said["human"] and said["outcome"] == "stopped with its workers"
        assert wait_gone(stale, 10) == []
        assert len(rbee_processes(node_home)) == 1  # the second queen's hive alone
    finally:
        first.signal(signal.SIGCONT)
        first.stop()
        if second is not None:
            second.stop()
    assert not wait_no_rbee_processes(node_home, 20)
    assert not wait_no_rbee_processes(rbee_home, 20) and not wait_no_rbee_processes(second_home, 20)
