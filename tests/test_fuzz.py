"""Schemathesis against each running daemon, from the document it serves.

Each daemon is the real program on loopback port 0 with a token; schemathesis generates
requests from a copy of its ``GET /openapi.json`` (valid ones, and for routes with a body
invalid ones too), seeded (``derandomize``), a bounded number per operation, within a time
budget. Every answer must be: a documented status of 2xx, 4xx or 502/503/504 (never 500),
its body what the document says (schemathesis validates JSON and SSE bodies against it),
every error the envelope, and no ``internal_error`` (a bug, even when answered with 503).
The daemon is still running at the end, and stops cleanly.

Made safe and quick on purpose:

- the shutdown routes are left out, and routes that stop workers are pointed at none;
- ``max_tokens`` is capped to a few tokens in the fuzzed document, and a request that
  would generate more (``null``, a large value, none at all) is capped before it is sent;
- nothing can reach another host: ``HF_HUB_OFFLINE=1`` and ``HF_ENDPOINT`` on a dead
  loopback port; model references are the embedded alias or files under a temporary
  model directory (``RBEE_MODEL_DIRS``); ``POST /v1/nodes`` tests SSH to 127.0.0.1 on a
  closed port only;
- SSE answers are read for a few seconds or 20 events at most (schemathesis cuts them).

What it found is kept as plain tests in ``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rbee.openapi import OPENAPI_PATH
from rbee.requests import EMBEDDED_ALIAS
from tests.hive.conftest import running_hive
from tests.hive.fakehub import write_small_gguf
from tests.processes import RbeeProcess, program
from tests.queen.support import wait_no_rbee_processes
from tests.worker.workers import start_worker, wait_ready

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Generated requests per operation and mode (valid, invalid).
EXAMPLES = 12
#: Tokens a fuzzed generation may ask for.
MAX_TOKENS_CAP = 3
#: Seconds an endless SSE answer is read (then cut), and any other answer may take.
STREAM_SECONDS = 3.0
REQUEST_SECONDS = 60.0
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """What keeps every model lookup on this machine."""
    return {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "RBEE_MODEL_DIRS": str(tmp_path / "models")}


# -- the fuzzed copy of a document -------------------------------------------------------------


def request_components(doc: dict[str, Any]) -> set[str]:
    """The component schemas of request bodies, with those they refer to."""
    names: set[str] = set()
    todo = [op["requestBody"]["content"]["application/json"]["schema"]
            for item in doc["paths"].values() for op in item.values() if "requestBody" in op]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            name = node.get("$ref", "").removeprefix("#/components/schemas/")
            if name and name not in names:
                names.add(name)
                todo.append(doc["components"]["schemas"][name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return names


def fuzzed_document(doc: dict[str, Any], *, fields: dict[str, Any], params: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """A copy of ``doc`` without the shutdown routes, whose request fields named in
    ``fields`` take the schema given there (safe models, capped tokens, a local node), and
    whose path parameters named in ``params`` theirs (names that exist, beside others)."""
    doc = copy.deepcopy(doc)
    for item in doc["paths"].values():
        for method in [m for m, op in item.items() if op.get("x-rbee-shutdown")]:
            del item[method]
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] in (params or {}):
                    param["schema"] = params[param["name"]]
    for name in request_components(doc):
        properties = doc["components"]["schemas"][name].get("properties", {})
        for key, schema in fields.items():
            if key in properties:
                properties[key] = schema
    return doc


def capped_tokens() -> dict[str, Any]:
    tokens = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_CAP}
    return {"max_tokens": tokens, "max_completion_tokens": tokens}


def cap_generation(body: Any) -> None:
    """A request that would generate more than a few tokens asks for ``MAX_TOKENS_CAP``;
    invalid values stay as they are, to be refused."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key, "absent")
        if value is None or (type(value) is int and value > MAX_TOKENS_CAP):
            body[key] = MAX_TOKENS_CAP
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS_CAP


# -- the run -----------------------------------------------------------------------------------


def problems_of(case: schemathesis.Case, response: schemathesis.Response) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    found = []
    status = response.status_code
    if not (200 <= status < 300 or 400 <= status < 500 or status in (502, 503, 504)):
        found.append(f"status {status}")
    if status >= 400:
        try:
            error = json.loads(response.content)["error"]
            if not {"message", "type", "param", "code", "details"} <= set(error):
                found.append(f"not the envelope: {response.content[:300]!r}")
            elif error["code"] == "internal_error":
                found.append(f"a bug: {error['message']}")
        except (ValueError, KeyError, TypeError):
            found.append(f"not the envelope: {response.content[:300]!r}")
    try:
        case.validate_response(response, checks=CHECKS)
    except Exception as exc:  # a schemathesis Failure, or a group of them
        for failure in getattr(exc, "exceptions", None) or [exc]:
            found.append(" ".join(str(failure).split())[:600])
    return found


@dataclass
class Report:
    """What one fuzzing run saw: the problems, and the answers' statuses by operation."""

    findings: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    def check(self, doc: dict[str, Any]) -> None:
        """Every operation was called, and nothing was wrong."""
        operations = {f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item}
        called = {label for label, _ in self.statuses}
        seen = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(self.statuses.items()))
        assert called == operations, f"never called (time budget too small?): {operations - called}; seen: {seen}"
        assert self.findings == [], f"{len(self.findings)} findings:\n" + "\n".join(self.findings[:40]) + \
            f"\nstatuses: {seen}"


def fuzz(url: str, doc: dict[str, Any], *, prepare: Callable[[schemathesis.Case], None], budget_s: float,
         examples: int = EXAMPLES) -> Report:
    """Fuzz every operation of ``doc`` against ``url``: ``examples`` requests per operation
    and mode, fewer once ``budget_s`` is spent (but always one: every operation is tried)."""
    schema = schemathesis.openapi.from_dict(doc)
    report = Report()
    deadline = time.monotonic() + budget_s
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        definition = doc["paths"][operation.path][operation.method.lower()]
        # A GET of a stream may never end (a job's, the hive's events): read it briefly.
        success = next(iter(definition["responses"].values())).get("content", {})
        endless = operation.method.upper() == "GET" and "text/event-stream" in success
        modes = [schemathesis.GenerationMode.POSITIVE]
        if "requestBody" in definition:
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            sent = Counter()

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                                 phases=[hypothesis.Phase.generate], suppress_health_check=list(HealthCheck),
                                 print_blob=False)
            def run(case: schemathesis.Case) -> None:
                if sent["requests"] and time.monotonic() > deadline:
                    return
                sent["requests"] += 1
                prepare(case)
                try:
                    response = case.call(base_url=url, session=session, headers=AUTH,
                                         timeout=STREAM_SECONDS if endless else REQUEST_SECONDS)
                except requests.RequestException as exc:
                    report.statuses[(operation.label, "no answer")] += 1
                    report.findings.append(f"{operation.label} ({mode.value}): no answer: {exc}; "
                                           f"{case.as_curl_command()[:800]}")
                    return
                report.statuses[(operation.label, response.status_code)] += 1
                for problem in problems_of(case, response):
                    report.findings.append(f"{operation.label} ({mode.value}) -> {response.status_code}: {problem}; "
                                           f"{case.as_curl_command(headers=AUTH)[:800]}")

            run()
    session.close()
    return report


def served_document(url: str) -> dict[str, Any]:
    answer = httpx.get(url + OPENAPI_PATH, timeout=30)
    assert answer.status_code == 200
    return answer.json()


# -- the daemons ---------------------------------------------------------------------------------


@pytest.mark.model
def test_fuzz_the_worker(embedded_model: Path, tmp_path: Path) -> None:
    proc = start_worker(embedded_model, "--parallel", "2", worker_id="w-fuzz",
                        env={"RBEE_WORKER_API_KEY": TOKEN, **offline_env(tmp_path)})
    try:
        url = proc.bound_url()
        assert wait_ready(url, headers=AUTH)["ready"]
        doc = fuzzed_document(served_document(url), fields=capped_tokens())

        def prepare(case: schemathesis.Case) -> None:
            cap_generation(case.body) if case.path == "/v1/inference" else None

        report = fuzz(url, doc, prepare=prepare, budget_s=40)
        assert proc.proc.poll() is None, f"the worker exited: {proc.stderr_text()[-2000:]}"
        report.check(doc)
    finally:
        assert proc.stop() == 0


def test_fuzz_the_hive(tmp_path: Path, rbee_home: Path) -> None:
    env = {"RBEE_HOME": str(rbee_home), **offline_env(tmp_path)}
    models = Path(env["RBEE_MODEL_DIRS"])
    models.mkdir()
    # A GGUF llama.cpp cannot load (a spawn of it starts a worker that exits), and one that is not there.
    small = write_small_gguf(models / "small-Q4_K_M.gguf")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running_hive(env, args=("--token-file", str(token_file))) as hive:
        fields = {"model": {"enum": [f"file:{small}", f"file:{models / 'missing.gguf'}"]}}
        # DELETE /v1/models?model= names the same files: removing a file: model forgets its
        # catalog entry and never deletes the file (nor anything outside this RBEE_HOME).
        doc = fuzzed_document(served_document(hive.url), fields=fields, params=fields)
        report = fuzz(hive.url, doc, prepare=lambda case: None, budget_s=40)
        assert hive.proc.proc.poll() is None, f"the hive exited: {hive.proc.stderr_text()[-2000:]}"
        report.check(doc)


@pytest.fixture
def queen(tmp_path: Path, rbee_home: Path) -> Iterator[tuple[RbeeProcess, str]]:
    """A queen with only localhost (its hive is its child), warmed: one worker is loaded."""
    (tmp_path / "models").mkdir()
    proc = RbeeProcess([program("queen-rbee"), "--port", "0", "--ping-interval", "1"],
                       env={"RBEE_HOME": str(rbee_home), "RBEE_API_TOKEN": TOKEN, **offline_env(tmp_path)})
    try:
        url = proc.bound_url()
        warm = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120,
                          json={"model": EMBEDDED_ALIAS, "prompt": "1, 2,", "max_tokens": 1})
        assert warm.status_code == 200, warm.text
        yield proc, url
    finally:
        proc.stop(grace=30)
        assert wait_no_rbee_processes(rbee_home, 15) == []


@pytest.mark.model
def test_fuzz_the_queen(queen: tuple[RbeeProcess, str]) -> None:
    proc, url = queen
    ssh_port = closed_port()
    fields = {
        **capped_tokens(),
        "model": {"enum": [EMBEDDED_ALIAS]},
        "node": {"enum": ["localhost", None]},
        # SSH to this machine, on a port where nothing listens: refused at once.
        "ssh_host": {"const": "127.0.0.1"},
        "ssh_port": {"const": ssh_port},
    }
    # DELETE /v1/nodes/{name}/models?model=: the embedded model is this queen's own copy (its
    # RBEE_HOME is this test's), held by the warm worker (409) unless that worker went away.
    params = {"name": {"enum": ["localhost", "nowhere"]},
              "model_id": {"enum": [EMBEDDED_ALIAS, f"{EMBEDDED_ALIAS}@localhost", "hf:nobody/nothing"]},
              "model": {"enum": [EMBEDDED_ALIAS, "hf:nobody/nothing"]}}
    doc = fuzzed_document(served_document(url), fields=fields, params=params)

    def prepare(case: schemathesis.Case) -> None:
        body = case.body
        if case.path in ("/v1/jobs", "/v2/tasks", "/v1/chat/completions", "/v1/completions"):
            cap_generation(body)
        elif case.path == "/v1/nodes" and isinstance(body, dict):
            # Whatever else is wrong with the request, no host but this one is ever tried.
            if isinstance(body.get("ssh_host"), str):
                body["ssh_host"] = "127.0.0.1"
            if type(body.get("ssh_port")) is int:
                body["ssh_port"] = ssh_port
        elif case.path == "/v1/workers/shutdown" and isinstance(body, dict) and not body.get("worker_id"):
            body["worker_id"] = "w-fuzz-none"  # stop no worker: the others' jobs keep theirs

    report = fuzz(url, doc, prepare=prepare, budget_s=70)
    assert proc.proc.poll() is None, f"the queen exited: {proc.stderr_text()[-2000:]}"
    report.check(doc)
