"""What schemathesis found (``tests/test_fuzz.py``), kept as plain requests to real daemons.

Each request once answered 503 ``internal_error`` (a bug behind the envelope) or did more
than it should; each must now be a 4xx envelope that names the field and matches the
daemon's document.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from rbee import openapi
from tests.contract import Contract
from tests.hive.conftest import Hive, running_hive
from tests.processes import RbeeProcess, program
from tests.queen.support import wait_no_rbee_processes

#: Bodies that are not UTF-8 (schemathesis sends such bytes as "invalid JSON").
NOT_UTF8 = (b"\x84\xa5\x01", b'{"model": "\xc2"}')


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RbeeProcess, httpx.Client, Contract]]:
    home = tmp_path_factory.mktemp("rbee-home")
    proc = RbeeProcess([program("queen-rbee"), "--port", "0"], env={"RBEE_HOME": str(home)})
    try:
        url = proc.bound_url()
        with httpx.Client(base_url=url, timeout=30) as client:
            yield proc, client, Contract(client.get(openapi.OPENAPI_PATH).json())
    finally:
        proc.stop()
        assert wait_no_rbee_processes(home, 10) == []


@pytest.fixture(scope="module")
def hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hive, Contract]]:
    home = tmp_path_factory.mktemp("rbee-home")
    with running_hive({"RBEE_HOME": str(home), "HF_HUB_OFFLINE": "1"}) as hive:
        yield hive, Contract(hive.http.get(openapi.OPENAPI_PATH).json())


def refused(contract: Contract, client: httpx.Client, path: str, *, status: int = 400, **request: Any) -> dict:
    """POST ``path``; it must be refused with ``status`` and the documented envelope."""
    answer = client.post(path, **request)
    assert answer.status_code == status, answer.text
    contract.check("POST", path, answer)
    return answer.json()["error"]


@pytest.mark.parametrize("body", [b"4194305", b'"{\\\\1}"', b"2.2e-16", b"[]", b"[1]"])
def test_workers_shutdown_refuses_a_body_that_is_not_an_object(queen, body: bytes) -> None:
    _, client, contract = queen
    error = refused(contract, client, "/v1/workers/shutdown", content=body)
    assert error["code"] == "invalid_request" and "JSON object" in error["message"]


def test_workers_shutdown_refuses_names_that_are_not_strings_and_takes_no_body(queen) -> None:
    _, client, contract = queen
    # A falsy non-string once meant "no filter": every worker of every hive.
    error = refused(contract, client, "/v1/workers/shutdown", json={"worker_id": 0, "node": []})
    assert [d["field"] for d in error["details"]] == ["node", "worker_id"]
    for request in ({}, {"json": {}}, {"json": {"node": None, "worker_id": None}}):
        answer = client.post("/v1/workers/shutdown", **request)
        assert answer.status_code == 200 and answer.json() == {"stopped": []}
        contract.check("POST", "/v1/workers/shutdown", answer)


@pytest.mark.parametrize("field, value", [
    ("ssh_user", "?\xa0\x18"),      # SASLprep refuses control characters (asyncssh raised inside the probe)
    ("ssh_host", "a..b"),          # an empty label: the resolver cannot encode it
    ("ssh_host", "blep\x00.lan"),
    ("ssh_key", "/home/me/.ssh/id\x00"),
])
def test_add_node_refuses_what_ssh_cannot_use_before_trying(queen, field: str, value: str) -> None:
    proc, client, contract = queen
    body = {"name": "fuzzed", "ssh_host": "127.0.0.1", field: value}
    error = refused(contract, client, "/v1/nodes", json=body)
    assert error["code"] == "invalid_request" and error["param"] == field
    # Refused before any connection was tried.
    assert not [o for o in proc.json_lines() if o.get("action") == "ssh_probe" and o.get("node") == "fuzzed"]


@pytest.mark.parametrize("body", NOT_UTF8)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v2/tasks", "/v1/nodes", "/v1/workers/shutdown",
                                  "/v1/chat/completions", "/v1/completions"])
def test_queen_refuses_a_body_that_is_not_utf8(queen, path: str, body: bytes) -> None:
    _, client, contract = queen
    error = refused(contract, client, path, content=body, headers={"Content-Type": "application/json"})
    assert error["code"] == "invalid_request"


@pytest.mark.parametrize("body", NOT_UTF8)
@pytest.mark.parametrize("path", ["/v1/workers/spawn", "/v1/workers/ready", "/v1/models/resolve",
                                  "/v1/models/download"])
def test_hive_refuses_a_body_that_is_not_utf8(hive, path: str, body: bytes) -> None:
    running, contract = hive
    error = refused(contract, running.http, path, content=body, headers={"Content-Type": "application/json"})
    assert error["code"] == "invalid_request"


def test_the_fuzzed_daemons_answer_json_bodies_as_documented(hive, queen) -> None:
    """A sample of the fuzzer's valid-but-odd bodies: unknown keys, nulls, nested junk."""
    running, hive_contract = hive
    odd = {"\u009a": [None, {"": 1e308}], "model": "file:/nowhere/x.gguf", "backend": None, "device": None}
    error = refused(hive_contract, running.http, "/v1/workers/spawn", status=404, json=odd)
    assert error["code"] == "model_not_found"
    _, client, contract = queen
    answer = client.post("/v1/completions", json={"model": "gemma3-270m", "prompt": ["a", "b"], "n": None})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    contract.check("POST", "/v1/completions", answer)
    assert json.loads(answer.content)["error"]["details"][0]["constraint"] == "max_items:1"
