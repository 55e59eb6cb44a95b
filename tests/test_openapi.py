"""The OpenAPI 3.1 documents of the daemons (``rbee.openapi``): valid, complete, and what
the real programs answer.

Valid: each document against the OpenAPI 3.1 meta-schema (the one schemathesis ships and
checks documents with), each of its schemas against JSON Schema 2020-12, every reference
resolvable, and schemathesis loads every operation. Complete: its paths are exactly the
app's routes. True: real answers of a real worker (the embedded model), hive and queen,
with tokens configured (the document itself is open), match it: health, the document,
401, 404, 405, 400 with details, JSON answers, and SSE streams event by event.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import httpx
import jsonschema_rs
import pytest
import schemathesis
from schemathesis.specs.openapi.definitions import OPENAPI_31

from rbee import openapi
from rbee.errors import InternalError
from tests.contract import Contract, sse_blocks
from tests.hive.conftest import running_hive
from tests.hive.fakehub import write_small_gguf
from tests.processes import RbeeProcess, program
from tests.queen.support import wait_no_rbee_processes
from tests.worker.workers import COUNTING_PROMPT, start_worker, wait_ready

DAEMONS = (openapi.WORKER, openapi.HIVE, openapi.QUEEN)
TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def served(daemon: str) -> dict[str, Any]:
    """The document as it travels (JSON: tuples become lists)."""
    return json.loads(json.dumps(openapi.document(daemon)))


def apps() -> dict[str, Any]:
    """Each daemon's real app, built on a placeholder state: only its url_map is read."""
    from rbee.hive.app import create_app as hive_app
    from rbee.queen.app import create_app as queen_app
    from rbee.worker.app import create_app as worker_app

    return {
        openapi.WORKER: worker_app(SimpleNamespace(config=SimpleNamespace(worker_id="w", api_key=None))),
        openapi.HIVE: hive_app(SimpleNamespace()),
        openapi.QUEEN: queen_app(SimpleNamespace(nodes=None, hives=None, http=None)),
    }


# -- the documents themselves ---------------------------------------------------------------


@pytest.mark.parametrize("daemon", DAEMONS)
def test_each_document_is_valid_openapi_31(daemon: str) -> None:
    doc = served(daemon)
    assert doc["openapi"] == "3.1.0"
    errors = [f"{e.message} at {list(e.instance_path)}"
              for e in jsonschema_rs.Draft202012Validator(OPENAPI_31).iter_errors(doc)]
    assert errors == []
    contract = Contract(doc)
    for name, schema in doc["components"]["schemas"].items():
        jsonschema_rs.meta.validate(schema)  # a valid JSON Schema 2020-12
        contract.validator({"$ref": f"#/components/schemas/{name}"})  # its references resolve
    loaded = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in loaded.get_all_operations()]  # .ok() raises on an invalid one
    assert len(operations) == sum(len(item) for item in doc["paths"].values())


@pytest.mark.parametrize("daemon", DAEMONS)
def test_each_document_has_exactly_the_routes_of_its_app(daemon: str) -> None:
    app = apps()[daemon]
    rules = openapi.app_routes(app.url_map)
    documented = {(method, path) for path, item in served(daemon)["paths"].items() for method in item}
    assert documented == rules
    assert openapi.document(daemon, rules) == openapi.document(daemon)
    # A route added to the app without a row in the table is refused, by name.
    with pytest.raises(InternalError, match=r"/v1/secret"):
        openapi.document(daemon, rules | {("get", "/v1/secret")})


def test_shared_definitions_are_the_ones_the_code_uses() -> None:
    from rbee.errors import ERRORS
    from rbee.narration.events import EVENT_TYPES
    from rbee.requests import InferRequest, json_schema

    queen = served(openapi.QUEEN)["components"]["schemas"]
    # The infer job is rbee.requests' schema, plus what only a job has.
    infer = json.loads(json.dumps(json_schema(InferRequest)))
    assert {k: v for k, v in queen["InferJob"]["properties"].items() if k not in ("operation", "detach")} \
        == infer["properties"]
    # Every event type has its schema; every error code is in one status's list.
    assert {queen[openapi.event_component(cls)]["properties"]["type"]["const"] for cls in EVENT_TYPES.values()} \
        == set(EVENT_TYPES)
    responses = served(openapi.QUEEN)["components"]["responses"]
    # Never 500: the caller's faults are 4xx, trouble below 502/503/504.
    assert all(400 <= s < 500 or s in (502, 503, 504) for s in openapi.ERROR_STATUSES)
    assert {code for status in openapi.ERROR_STATUSES for code in openapi.codes_of(status)} == set(ERRORS)
    assert responses["Error503"]["content"]["application/json"]["schema"]["properties"]["error"]["properties"][
        "code"]["enum"] == openapi.codes_of(503)


# -- real answers -------------------------------------------------------------------------------


def read_stream(client: httpx.Client, method: str, path: str, *, until: Callable[[list[dict]], bool],
                seconds: float = 30, **kwargs: Any) -> tuple[httpx.Response, bytes]:
    """Open an SSE answer and read it until ``until(events so far)`` or its end."""
    raw = b""
    deadline = time.monotonic() + seconds
    with client.stream(method, path, **kwargs) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
            return response, response.content
        for chunk in response.iter_raw():
            raw += chunk
            if until(sse_blocks(raw)) or raw.endswith(b"data: [DONE]\n\n"):
                break
            assert time.monotonic() < deadline, f"{path}: no end in {seconds} s: {raw[-300:]!r}"
    return response, raw


def done(events: list[dict]) -> bool:
    return bool(events) and events[-1]["data"] == "[DONE]"


def check_edge_errors(contract: Contract, client: httpx.Client, open_path: str, closed_path: str) -> None:
    """401 without the token; 404 for an unknown route; 405 for a wrong method."""
    unauthorized = client.get(closed_path, headers={"Authorization": "Bearer wrong"})
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
    contract.check("GET", closed_path, unauthorized)
    for answer, status in ((client.get("/v1/no-such-route", headers=AUTH), 404),
                           (client.put(open_path, headers=AUTH), 405)):
        assert answer.status_code == status
        # Not a documented operation: the envelope of the shared edge.
        errors = [e.message for e in contract.validator({"$ref": "#/components/schemas/ErrorEnvelope"})
                  .iter_errors(answer.json())]
        assert errors == [] and answer.json()["error"]["code"] in ("not_found", "method_not_allowed")


@pytest.mark.model
def test_a_real_worker_answers_as_its_document_says(embedded_model: Path) -> None:
    proc = start_worker(embedded_model, worker_id="w-contract", env={"RBEE_WORKER_API_KEY": TOKEN})
    try:
        url = proc.bound_url()
        assert wait_ready(url, headers=AUTH)["ready"]
        with httpx.Client(base_url=url, timeout=60) as client:
            document = client.get(openapi.OPENAPI_PATH)  # no key: the document is open
            assert document.status_code == 200 and document.json() == served(openapi.WORKER)
            contract = Contract(document.json())
            contract.check("GET", openapi.OPENAPI_PATH, document)
            contract.check("GET", "/health", client.get("/health"))
            contract.check("GET", "/v1/ready", client.get("/v1/ready", headers=AUTH))
            check_edge_errors(contract, client, "/health", "/v1/ready")

            bad = client.post("/v1/inference", headers=AUTH, json={"prompt": "", "max_tokens": 0, "top_p": 2})
            assert bad.status_code == 400 and len(bad.json()["error"]["details"]) == 3
            contract.check("POST", "/v1/inference", bad)

            answer, raw = read_stream(client, "POST", "/v1/inference", until=done, headers=AUTH,
                                      json={"prompt": COUNTING_PROMPT, "max_tokens": 3, "temperature": 0})
            assert answer.status_code == 200 and answer.headers["cache-control"] == "no-cache"
            events = contract.check("POST", "/v1/inference", answer, raw)
            kinds = [e.get("event") for e in events]
            assert kinds[0] == "started" and kinds.count("token") == 3 and kinds[-2:] == ["end", None]

            answer, raw = read_stream(client, "GET", "/v1/loading/progress", until=done, headers=AUTH)
            assert [e.get("event") for e in contract.check("GET", "/v1/loading/progress", answer, raw)] \
                == ["ready", None]
            cancel = client.delete("/v1/inference/job-nope", headers=AUTH)
            assert cancel.json() == {"job_id": "job-nope", "cancelled": False}
            contract.check("DELETE", "/v1/inference/{job_id}", cancel)
    finally:
        assert proc.stop() == 0


def test_a_real_hive_answers_as_its_document_says(tmp_path: Path, rbee_home: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # A valid GGUF that llama.cpp cannot load: its worker starts, fails and exits.
    models = tmp_path / "models"
    models.mkdir()
    gguf = write_small_gguf(models / "small-Q4_K_M.gguf")
    env = {"RBEE_HOME": str(rbee_home), "RBEE_MODEL_DIRS": str(models), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    with running_hive(env, args=("--token-file", str(token_file))) as hive, \
            httpx.Client(base_url=hive.url, timeout=60, headers=AUTH) as client:
        document = httpx.get(hive.url + openapi.OPENAPI_PATH)  # no token
        assert document.status_code == 200 and document.json() == served(openapi.HIVE)
        contract = Contract(document.json())
        for path in ("/health", "/v1/health", "/v1/detect", "/v1/workers", "/v1/models"):
            contract.check("GET", path, client.get(path))
        check_edge_errors(contract, client, "/health", "/v1/workers")

        bad = client.post("/v1/workers/spawn", json={"model": 5})
        assert bad.status_code == 400
        contract.check("POST", "/v1/workers/spawn", bad)
        contract.check("POST", "/v1/workers/spawn", client.post("/v1/workers/spawn", content=b"[1,"))
        missing = client.post("/v1/models/resolve", json={"model": f"file:{tmp_path}/missing.gguf"})
        assert missing.status_code == 404
        contract.check("POST", "/v1/models/resolve", missing)
        resolved = client.post("/v1/models/resolve", json={"model": f"file:{gguf}"})
        assert resolved.status_code == 200
        contract.check("POST", "/v1/models/resolve", resolved)

        started = client.post("/v1/models/download", json={"model": f"file:{gguf}"})
        assert started.status_code == 202
        contract.check("POST", "/v1/models/download", started)
        progress = f"/v1/models/download/{started.json()['download_id']}/progress"
        answer, raw = read_stream(client, "GET", progress, until=done)
        events = contract.check("GET", "/v1/models/download/{download_id}/progress", answer, raw)
        assert events[-1]["data"] == "[DONE]" and any("download_complete" in e["data"] for e in events)
        contract.check("GET", "/v1/models", client.get("/v1/models"))  # now with its catalog entry
        contract.check("GET", "/v1/models/download/{download_id}/progress",
                       client.get("/v1/models/download/download-nope/progress"))

        # The worker events of a spawn whose worker fails to load, read while it happens.
        seen: dict[str, Any] = {}

        def watch() -> None:
            seen["answer"], seen["raw"] = read_stream(
                client, "GET", "/v1/events", seconds=60,
                until=lambda events: any('"change":"exited"' in e["data"] for e in events))

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.5)  # subscribed (its first bytes come at once)
        spawned = client.post("/v1/workers/spawn", json={"model": f"file:{gguf}", "ctx_size": 256, "parallel": 1})
        assert spawned.status_code == 201
        contract.check("POST", "/v1/workers/spawn", spawned)
        worker_id = spawned.json()["worker_id"]
        answer, raw = read_stream(client, "GET", f"/v1/workers/{worker_id}/narration", until=done, seconds=60)
        assert done(contract.check("GET", "/v1/workers/{worker_id}/narration", answer, raw))
        watcher.join(60)
        assert not watcher.is_alive()
        changes = contract.check("GET", "/v1/events", seen["answer"], seen["raw"])
        assert {json.loads(e["data"])["change"] for e in changes} >= {"spawned", "exited"}

        stopped = client.post("/v1/workers/nope/shutdown")
        assert stopped.status_code == 404
        contract.check("POST", "/v1/workers/{worker_id}/shutdown", stopped)
        callback = client.post("/v1/workers/ready", json={"worker_id": "nope"})
        assert callback.status_code == 401
        contract.check("POST", "/v1/workers/ready", callback)


def test_a_real_queen_answers_as_its_document_says(rbee_home: Path, silent_ssh_port: int) -> None:
    from rbee.queen.nodes import Node, NodeRegistry

    # A node whose SSH never answers: its jobs wait, quietly, until they are cancelled.
    NodeRegistry(rbee_home / "nodes.db").put(Node(name="stuck", ssh_host="127.0.0.1", ssh_port=silent_ssh_port))
    proc = RbeeProcess([program("queen-rbee"), "--port", "0", "--ping-interval", "0.2"],
                       env={"RBEE_HOME": str(rbee_home), "RBEE_API_TOKEN": TOKEN})
    try:
        url = proc.bound_url()
        with httpx.Client(base_url=url, timeout=30, headers=AUTH) as client:
            document = httpx.get(url + openapi.OPENAPI_PATH)  # no token
            assert document.status_code == 200 and document.json() == served(openapi.QUEEN)
            contract = Contract(document.json())
            for path in ("/health", "/v1/jobs", "/v1/nodes", "/v1/workers", "/metrics", "/v1/models"):
                contract.check("GET", path, client.get(path))
            check_edge_errors(contract, client, "/health", "/v1/jobs")

            infer = {"model": "gemma3-270m", "prompt": "p", "max_tokens": 3}
            for body, status in (({**infer, "max_tokens": 0, "temperature": -1}, 400),
                                 ({**infer, "node": "nowhere"}, 404)):
                answer = client.post("/v1/jobs", json=body)
                assert answer.status_code == status
                contract.check("POST", "/v1/jobs", answer)

            created = client.post("/v1/jobs", json={**infer, "node": "stuck"})
            assert created.status_code == 201
            contract.check("POST", "/v1/jobs", created)
            answer, raw = read_stream(client, "GET", created.json()["sse_url"], until=lambda events: len(events) >= 2)
            assert answer.headers["x-rbee-job-id"] == created.json()["job_id"]
            assert len(contract.check("GET", "/v1/jobs/{job_id}/stream", answer, raw)) >= 2
            answer, raw = read_stream(client, "POST", "/v2/tasks", json={**infer, "node": "stuck"},
                                      until=lambda events: len(events) >= 2)
            assert len(contract.check("POST", "/v2/tasks", answer, raw)) >= 2

            detached = client.post("/v1/jobs", json={**infer, "node": "stuck", "detach": True}).json()
            contract.check("GET", "/v1/jobs", client.get("/v1/jobs"))
            contract.check("DELETE", "/v1/jobs/{job_id}", client.delete(f"/v1/jobs/{detached['job_id']}"))
            contract.check("DELETE", "/v1/jobs/{job_id}", client.delete("/v1/jobs/job-nope"))

            for method, path, template, body, status in (
                ("GET", "/v1/models/nope", "/v1/models/{model_id}", None, 404),
                ("GET", "/v1/models/gemma3-270m", "/v1/models/{model_id}", None, 200),
                ("POST", "/v1/chat/completions", "/v1/chat/completions", {"model": "gemma3-270m", "n": 2}, 400),
                ("POST", "/v1/completions", "/v1/completions", {"model": "x", "prompt": "p"}, 404),
                ("POST", "/v1/nodes", "/v1/nodes", {"name": "localhost", "ssh_host": "-x"}, 400),
                ("DELETE", "/v1/nodes/nope", "/v1/nodes/{name}", None, 404),
                ("DELETE", "/v1/nodes/nope/models?model=gemma3-270m", "/v1/nodes/{name}/models", None, 404),
                ("DELETE", "/v1/nodes/localhost/models", "/v1/nodes/{name}/models", None, 400),
                ("POST", "/v1/workers/shutdown", "/v1/workers/shutdown", {}, 200),
            ):
                answer = client.request(method, path, json=body)
                assert answer.status_code == status, answer.text
                contract.check(method, template, answer)
    finally:
        proc.stop()
        assert wait_no_rbee_processes(rbee_home, 10) == []
