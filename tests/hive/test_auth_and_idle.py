"""The hive's bearer token, and the idle timeout of workers (real hive, real worker)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.hive.conftest import running_hive
from tests.processes import wait_gone

pytestmark = pytest.mark.model


def test_with_a_token_every_route_but_health_needs_it(rbee_home: Path, tmp_path: Path) -> None:
    token = "hive-secret-" + "x" * 20
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    with running_hive(args=("--token-file", str(token_file))) as hive:
        assert hive.http.get("/v1/health").status_code == 200
        for method, path in (("GET", "/v1/workers"), ("GET", "/v1/models"), ("POST", "/v1/workers/spawn"),
                             ("POST", "/v1/shutdown"), ("GET", "/v1/workers/w/narration")):
            answer = hive.http.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
        assert hive.http.get("/v1/workers").status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        spawned = hive.http.post("/v1/workers/spawn", json={"model": "gemma3-270m"}, headers=auth).json()
        # The worker's ready callback carries its own key, not the hive's token: it gets through.
        deadline = time.monotonic() + 60
        while hive.http.get("/v1/workers", headers=auth).json()["workers"][0]["state"] != "idle":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The hive's token is not a worker's key.
        forged = hive.http.post("/v1/workers/ready", json={"worker_id": spawned["worker_id"]}, headers=auth)
        assert forged.status_code == 401
        assert token not in "\n".join(hive.proc.stdout_lines + hive.proc.stderr_lines)
        assert spawned["api_key"] not in "\n".join(hive.proc.stdout_lines)
        assert hive.http.post("/v1/shutdown", headers=auth).status_code == 202
        assert hive.proc.wait(30) == 0
        assert wait_gone([spawned["pid"]], 1) == []


def test_an_idle_worker_is_stopped_after_the_idle_timeout(rbee_home: Path) -> None:
    with running_hive(env={"RBEE_WORKER_IDLE_TIMEOUT": "2"}) as hive:
        spawned = hive.spawn().json()
        hive.wait_state(spawned["worker_id"], "idle", 60)
        idle_at = time.monotonic()
        stop = hive.proc.wait_for_action("worker_stop", 15)
        assert "idle for 2 s" in stop["human"] and stop["worker_id"] == spawned["worker_id"]
        hive.proc.wait_for_action("worker_exit", 15)
        assert time.monotonic() - idle_at >= 1.9
        assert hive.workers() == []
        assert wait_gone([spawned["pid"]], 2) == []
        assert httpx.get(f"{hive.url}/v1/health").json()["workers"] == 0
