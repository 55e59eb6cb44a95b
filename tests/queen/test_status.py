"""``GET /v1/status`` on a real queen: every node at a glance, from what the queen knows.

A real queen with a token, the real embedded model, a node in the registry that no hive
ever ran on. Before any job nothing runs and nothing is started to answer; after one, the
localhost row has its hive's facts, the scheduler's worker and the hive's catalog; with its
hive stopped (SIGSTOP), the answer still comes, within the hive's bound, saying so.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from rbee.openapi import OPENAPI_PATH
from rbee.queen.nodes import Node, NodeRegistry
from rbee.queen.status import HIVE_ANSWER_S
from tests.contract import Contract
from tests.processes import RbeeProcess, program
from tests.queen.support import rbee_processes, wait_no_rbee_processes

pytestmark = pytest.mark.model
TOKEN = "status-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GIB = 1 << 30
#: What ``rbee-hive detect`` said when the node "far" was added (kept in nodes.db).
FAR_DETECT = {"hostname": "far", "backends": ["cpu", "cuda"], "devices": [
    {"backend": "cpu", "index": 0, "name": "EPYC", "memory_total_bytes": 64 * GIB, "memory_free_bytes": 60 * GIB},
    {"backend": "cuda", "index": 0, "name": "RTX 4090", "memory_total_bytes": 24 * GIB,
     "memory_free_bytes": 23 * GIB}]}


def by_name(answer: httpx.Response) -> dict[str, dict]:
    return {n["name"]: n for n in answer.json()["nodes"]}


def without_countdown(workers: list[dict]) -> list[dict]:
    """Workers without ``unload_in_s``, which counts down between two answers."""
    return [{k: v for k, v in w.items() if k != "unload_in_s"} for w in workers]


def hive_pid(home: Path) -> int:
    """The pid of the local rbee-hive this test's queen started."""
    found = [p for p in rbee_processes(home) if b"rbee-hive" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(found) == 1, found
    return found[0]


def test_status_before_and_after_a_job_and_with_a_hive_that_does_not_answer(rbee_home: Path) -> None:
    NodeRegistry(rbee_home / "nodes.db").put(Node(name="far", ssh_host="192.0.2.1", detect=FAR_DETECT))
    queen = RbeeProcess([program("queen-rbee"), "--port", "0"],
                        env={"RBEE_HOME": str(rbee_home), "RBEE_API_TOKEN": TOKEN})
    try:
        url = queen.bound_url()
        contract = Contract(httpx.get(url + OPENAPI_PATH).json())
        with httpx.Client(base_url=url, timeout=120, headers=AUTH) as client:
            refused = httpx.get(url + "/v1/status")
            assert refused.status_code == 401
            contract.check("GET", "/v1/status", refused)

            before = client.get("/v1/status")
            contract.check("GET", "/v1/status", before)
            nodes = by_name(before)
            assert list(nodes) == ["localhost", "far"]
            # No hive has run anywhere: nobody can say whether a node is reachable.
            assert {k: nodes["localhost"][k] for k in ("local", "reachable", "hive_up", "facts_from", "models",
                                                       "workers", "backends")} == \
                {"local": True, "reachable": None, "hive_up": False, "facts_from": None, "models": None,
                 "workers": [], "backends": []}
            far = nodes["far"]
            assert far["facts_from"] == "registry" and far["backends"] == ["cpu", "cuda"]
            assert far["devices"] == FAR_DETECT["devices"] and far["memory_free_bytes"] == 60 * GIB
            assert far["hive_up"] is False and far["reachable"] is None and far["local"] is False
            assert rbee_processes(rbee_home) == [queen.pid]  # nothing was started to answer

            job = {"model": "gemma3-270m", "prompt": "one two three", "max_tokens": 2, "temperature": 0,
                   "node": "localhost"}
            with client.stream("POST", "/v2/tasks", json=job) as answer:
                assert answer.status_code == 200
                assert b"data: [DONE]" in answer.read()

            after = client.get("/v1/status")
            contract.check("GET", "/v1/status", after)
            local = by_name(after)["localhost"]
            assert local["hive_up"] is True and local["reachable"] is True and local["hive_error"] is None
            assert local["facts_from"] == "hive" and "cpu" in local["backends"] and local["memory_free_bytes"] > 0
            # The workers are the scheduler's, as GET /v1/workers lists them (one fact, one place).
            assert without_countdown(local["workers"]) == without_countdown(client.get("/v1/workers").json()["workers"])
            [worker] = local["workers"]
            assert worker["model"] == "gemma3-270m" and worker["state"] == "ready"
            assert worker["slots"]["busy"] == 0 and worker["slots"]["total"] >= 1
            assert [m["reference"] for m in local["models"]] == ["gemma3-270m"]
            assert by_name(after)["far"]["reachable"] is None  # still no hive there, none started

            hive = hive_pid(rbee_home)
            os.kill(hive, signal.SIGSTOP)
            try:
                asked = time.monotonic()
                stalled = client.get("/v1/status")
                took = time.monotonic() - asked
            finally:
                os.kill(hive, signal.SIGCONT)
            contract.check("GET", "/v1/status", stalled)
            assert took < HIVE_ANSWER_S + 2, took
            local = by_name(stalled)["localhost"]
            assert local["hive_up"] is True and local["reachable"] is False and local["models"] is None
            assert "did not answer within" in local["hive_error"] == local["unreachable_reason"]
            assert [w["worker_id"] for w in local["workers"]] == [worker["worker_id"]]  # the queen's own records
            assert json.dumps(by_name(stalled)["far"]) == json.dumps(by_name(after)["far"])
    finally:
        queen.stop()
        assert wait_no_rbee_processes(rbee_home, 15) == []
