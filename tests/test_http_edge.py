"""The HTTP edge of the three daemons (``rbee.http_common``), against the real programs.

One queen, one hive and one worker (the embedded model) serve the whole module. Each
malformed request must get the one JSON envelope with the status of its fault, and the
servers must let go of connections: at once after ``Connection: close``, when a body stops
arriving (``BODY_IDLE_TIMEOUT_S``) and when a keep-alive connection idles
(``KEEP_ALIVE_TIMEOUT_S``). Connection behaviour is checked on raw sockets, where what the
server does (answer, close) is what the test sees.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from rbee.errors import InvalidRequestError, PayloadTooLargeError
from rbee.http_common import BODY_IDLE_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S, MAX_BODY_BYTES, MAX_HEADER_BYTES
from rbee.requests import MAX_JSON_DEPTH, parse_json_object
from rbee.worker.validation import MAX_TOKEN_BYTES, check_fits_context, parse_inference_request
from tests.hive.conftest import running_hive
from tests.processes import RbeeProcess, program, wait_gone
from tests.worker.workers import CTX_SIZE, running_worker

ENVELOPE_KEYS = {"message", "type", "param", "code", "details"}


@dataclass(frozen=True)
class Daemon:
    """A running daemon: its URL, its health route, and one JSON route of its own."""

    name: str
    url: str
    health: str
    json_route: str
    #: A body whose only fault is ``"device": "x"`` (a wrong type in a real field).
    wrong_type: dict[str, Any]

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("queen-home")
    proc = RbeeProcess([program("queen-rbee"), "--port", "0"], env={"RBEE_HOME": str(home)})
    try:
        yield Daemon("queen-rbee", proc.bound_url(), "/health", "/v1/jobs",
                     {"model": "gemma3-270m", "prompt": "hi", "device": "x"})
    finally:
        proc.stop()
    assert wait_gone([proc.pid], 5) == []


@pytest.fixture(scope="module")
def hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("hive-home")
    with running_hive({"RBEE_HOME": str(home)}) as running:
        yield Daemon("rbee-hive", running.url, "/v1/health", "/v1/workers/spawn",
                     {"model": "gemma3-270m", "device": "x"})


@pytest.fixture(scope="module")
def worker(embedded_model: Path) -> Iterator[Daemon]:
    with running_worker(embedded_model, worker_id="w-edge") as (_, url):
        yield Daemon("llm-worker-rbee", url, "/health", "/v1/inference", {"prompt": "hi", "device": "x",
                                                                          "max_tokens": "x"})


@pytest.fixture(params=["queen", "hive", pytest.param("worker", marks=pytest.mark.model)])
def daemon(request: pytest.FixtureRequest) -> Daemon:
    return request.getfixturevalue(request.param)


def assert_envelope(status: int, body: Any, expected: int, code: str) -> dict[str, Any]:
    """``body`` is the one error envelope, with ``expected`` status and ``code``."""
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"], error
    return error


def body_problem(response: httpx.Response) -> dict[str, Any]:
    """The one ``details`` entry of a 400 about the body as a whole."""
    error = assert_envelope(response.status_code, response.json(), 400, "invalid_request")
    (detail,) = error["details"]
    return detail


# -- raw sockets ------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Seconds from the end of the answer to the server's close (None: still open).
    closed_after: float | None

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, *, close_within: float) -> RawAnswer:
    """Read one HTTP/1.1 answer, then wait up to ``close_within`` s for the server's close."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed before answering: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed in the middle of its answer"
        rest += chunk
    answered = time.monotonic()
    sock.settimeout(close_within)
    try:
        closed = sock.recv(1) == b""
    except socket.timeout:
        closed = False
    except ConnectionResetError:
        closed = True
    return RawAnswer(int(status_line.split()[1]), headers, rest[:length],
                     time.monotonic() - answered if closed else None)


def exchange(daemon: Daemon, request: bytes, *, close_within: float = 0.1) -> RawAnswer:
    with socket.create_connection(daemon.address, timeout=30) as sock:
        sock.sendall(request)
        return read_answer(sock, close_within=close_within)


def head(method: str, path: str, *extra: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra, "", ""]).encode("latin-1")


# -- malformed bodies -------------------------------------------------------------------


def test_a_body_that_is_not_utf8_is_a_400_naming_the_byte(daemon: Daemon) -> None:
    response = httpx.post(daemon.url + daemon.json_route, content=b'{"model": "\xff\xfe"}', timeout=30)
    detail = body_problem(response)
    assert detail["constraint"] == "utf-8"
    assert "offset 11" in detail["message"] and "0xff" in detail["message"]


def test_json_nested_50000_deep_is_a_400_without_recursing(daemon: Daemon) -> None:
    started = time.monotonic()
    response = httpx.post(daemon.url + daemon.json_route, content=b"[" * 50_000 + b"]" * 50_000, timeout=30)
    detail = body_problem(response)
    assert detail["constraint"] == f"max_depth:{MAX_JSON_DEPTH}"
    assert time.monotonic() - started < 2


def test_nan_and_infinity_are_a_400_naming_the_field(daemon: Daemon) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        response = httpx.post(daemon.url + daemon.json_route, timeout=30,
                              content=b'{"model": "gemma3-270m", "prompt": "hi", "max_tokens": ' + literal + b"}")
        error = assert_envelope(response.status_code, response.json(), 400, "invalid_request")
        assert error["param"] == "max_tokens"
        assert error["details"][0]["constraint"] == "finite"
        assert literal.decode() in error["message"]


def test_an_empty_body_and_a_body_that_is_no_object_are_400s(daemon: Daemon) -> None:
    assert body_problem(httpx.post(daemon.url + daemon.json_route, content=b"", timeout=30))["constraint"] == "required"
    for body, what in ((b"[1, 2]", "an array"), (b'"prompt"', "a string"), (b"null", "null")):
        detail = body_problem(httpx.post(daemon.url + daemon.json_route, content=body, timeout=30))
        assert detail["constraint"] == "object" and what in detail["message"]
    detail = body_problem(httpx.post(daemon.url + daemon.json_route, content=b'{"model": ', timeout=30))
    assert detail["constraint"] == "json"


def test_a_wrong_type_is_a_400_naming_the_field(daemon: Daemon) -> None:
    response = httpx.post(daemon.url + daemon.json_route, json=daemon.wrong_type, timeout=30)
    error = assert_envelope(response.status_code, response.json(), 400, "invalid_request")
    fields = {d["field"] for d in error["details"]}
    assert fields & {"device", "max_tokens"}, error


def test_queen_job_and_openai_bodies_check_their_types(queen: Daemon) -> None:
    cases = [
        ("/v1/jobs", {"model": "gemma3-270m", "prompt": "hi", "detach": "false"}, "detach"),
        ("/v1/jobs", {"operation": "download", "model": "gemma3-270m", "node": ["localhost"]}, "node"),
        ("/v1/workers/shutdown", {"node": 0}, "node"),
        ("/v1/chat/completions", {"model": "gemma3-270m", "messages": [{"role": [], "content": "hi"}]},
         "messages[0].role"),
        ("/v1/nodes", {"name": "n1", "ssh_host": "h", "ssh_port": "22"}, "ssh_port"),
    ]
    for route, body, field in cases:
        response = httpx.post(queen.url + route, json=body, timeout=30)
        error = assert_envelope(response.status_code, response.json(), 400, "invalid_request")
        assert field in {d["field"] for d in error["details"]}, (route, error)


def test_hive_model_bodies_check_their_types(hive: Daemon) -> None:
    for route in ("/v1/models/resolve", "/v1/models/download"):
        response = httpx.post(hive.url + route, json={"model": 7}, timeout=30)
        error = assert_envelope(response.status_code, response.json(), 400, "invalid_request")
        assert error["param"] == "model"


# -- routes, sizes, headers -------------------------------------------------------------


def test_unknown_route_and_wrong_method(daemon: Daemon) -> None:
    response = httpx.get(daemon.url + "/v1/no-such-route", timeout=30)
    assert_envelope(response.status_code, response.json(), 404, "not_found")
    response = httpx.put(daemon.url + daemon.health, timeout=30)
    error = assert_envelope(response.status_code, response.json(), 405, "method_not_allowed")
    assert "PUT" in error["message"]


def test_a_body_over_the_limit_is_a_413_before_it_is_read(daemon: Daemon) -> None:
    request = head("POST", daemon.json_route, "Content-Type: application/json",
                   f"Content-Length: {MAX_BODY_BYTES + 1}") + b'{"prompt": "'
    answer = exchange(daemon, request, close_within=3)
    error = assert_envelope(answer.status, answer.json(), 413, "payload_too_large")
    assert str(MAX_BODY_BYTES) in error["message"]
    assert answer.closed_after is not None  # the rest of the body is not waited for


def test_oversized_header_fields_are_a_431(daemon: Daemon) -> None:
    answer = exchange(daemon, head("GET", daemon.health, "X-Filler: " + "a" * (MAX_HEADER_BYTES + 1024)))
    assert_envelope(answer.status, answer.json(), 431, "headers_too_large")


# -- connections ------------------------------------------------------------------------


def test_connection_close_is_honoured(daemon: Daemon) -> None:
    answer = exchange(daemon, head("GET", daemon.health, "Connection: close"), close_within=3)
    assert answer.status == 200
    assert answer.closed_after is not None and answer.closed_after < 1.0
    # An error answer too, with its body read or not.
    bad = b"[" * 100 + b"]" * 100
    answer = exchange(daemon, head("POST", daemon.json_route, "Connection: close",
                                   f"Content-Length: {len(bad)}") + bad, close_within=3)
    assert_envelope(answer.status, answer.json(), 400, "invalid_request")
    assert answer.closed_after is not None and answer.closed_after < 1.0


def test_keep_alive_serves_a_second_request_on_the_same_connection(daemon: Daemon) -> None:
    with socket.create_connection(daemon.address, timeout=30) as sock:
        for _ in range(2):
            sock.sendall(head("GET", daemon.health))
            answer = read_answer(sock, close_within=0.2)
            assert answer.status == 200 and answer.closed_after is None


@pytest.mark.model
def test_half_sent_bodies_and_idle_connections_are_let_go(queen: Daemon, hive: Daemon, worker: Daemon) -> None:
    """Both at once on every daemon, so that the module waits for the longest once."""
    results: dict[tuple[str, str], RawAnswer | BaseException] = {}

    def half_body(daemon: Daemon) -> None:
        with socket.create_connection(daemon.address, timeout=30) as sock:
            sock.sendall(head("POST", daemon.json_route, "Content-Length: 100") + b'{"prompt": ')
            results[daemon.name, "half"] = read_answer(sock, close_within=3)

    def idle(daemon: Daemon) -> None:
        with socket.create_connection(daemon.address, timeout=30) as sock:
            sock.sendall(head("GET", daemon.health))
            results[daemon.name, "idle"] = read_answer(sock, close_within=KEEP_ALIVE_TIMEOUT_S + 3)

    def run(job: Any, daemon: Daemon, kind: str) -> None:
        try:
            job(daemon)
        except BaseException as exc:  # reported below, with the daemon's name
            results[daemon.name, kind] = exc

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(job, d, kind))
               for d in (queen, hive, worker) for job, kind in ((half_body, "half"), (idle, "idle"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(KEEP_ALIVE_TIMEOUT_S + 30)
    assert len(results) == 6, results
    for (name, kind), answer in results.items():
        assert isinstance(answer, RawAnswer), (name, kind, answer)
        if kind == "half":
            error = assert_envelope(answer.status, answer.json(), 408, "request_timeout")
            assert "11 of 100 bytes" in error["message"], (name, error)
            assert answer.closed_after is not None and answer.closed_after < 1.0, name
        else:
            assert answer.status == 200, name
            assert answer.closed_after is not None, f"{name} kept an idle connection open"
            assert KEEP_ALIVE_TIMEOUT_S - 1 < answer.closed_after, (name, answer.closed_after)
    assert time.monotonic() - started < KEEP_ALIVE_TIMEOUT_S + BODY_IDLE_TIMEOUT_S


# -- the prompt's size ------------------------------------------------------------------


@pytest.mark.model
def test_a_5_mb_prompt_is_refused_by_its_size_at_once(worker: Daemon) -> None:
    body = json.dumps({"prompt": "a " * 2_500_000, "max_tokens": 16}).encode()
    started = time.monotonic()
    response = httpx.post(worker.url + "/v1/inference", content=body, timeout=30)
    took = time.monotonic() - started
    error = assert_envelope(response.status_code, response.json(), 413, "payload_too_large")
    assert error["param"] == "prompt" and f"context of {CTX_SIZE} tokens" in error["message"]
    assert took < 0.5, f"refused in {took:.2f} s: it was tokenized"
    # The worker is free at once: the next request is served.
    assert httpx.get(worker.url + "/v1/ready", timeout=30).json()["state"] == "idle"


# -- the parser and the size bound, without a daemon ----------------------------------


def nested(depth: int, inner: bytes = b"1") -> bytes:
    """An object ``depth`` levels deep (the body itself is level 1), arrays and objects mixed."""
    body = inner
    for level in range(depth - 1):
        body = b"[" + body + b"]" if level % 2 else b'{"k": ' + body + b"}"
    return b'{"x": ' + body + b"}"


def test_the_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    assert parse_json_object(nested(MAX_JSON_DEPTH))
    with pytest.raises(InvalidRequestError) as caught:
        parse_json_object(nested(MAX_JSON_DEPTH + 1))
    assert caught.value.details[0]["constraint"] == f"max_depth:{MAX_JSON_DEPTH}"
    # Brackets inside strings, escaped quotes included, are text.
    text = '[{"\\"[' * 200
    assert parse_json_object(json.dumps({"prompt": text}).encode()) == {"prompt": text}
    # Depth built from many shallow siblings is not depth.
    wide = {"messages": [{"role": "user", "content": "[" * 10}] * 5000}
    assert parse_json_object(json.dumps(wide).encode()) == wide


def test_the_parser_names_what_is_wrong() -> None:
    cases = {
        b'\xef\xbb\xbf{"a": "\xc3"}': ("utf-8", "offset 10"),  # the offset counts the BOM
        b'{"a": ' + b"1" * 5000 + b"}": ("json", "more than"),
        b'{"a": [1, {"b": NaN}]}': ("finite", "a[1].b: NaN"),
        b"   \r\n\t": ("required", "empty"),
    }
    for body, (constraint, words) in cases.items():
        with pytest.raises(InvalidRequestError) as caught:
            parse_json_object(body)
        assert caught.value.details[0]["constraint"] == constraint, body[:20]
        assert words in caught.value.message, caught.value.message
    assert parse_json_object(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # RFC 8259 lets a parser skip a BOM
    assert parse_json_object(b" ", required=False) == {}


@pytest.mark.parametrize("max_tokens", [None, 1, 100])
def test_the_size_bound_refuses_only_what_tokenizing_would_refuse(max_tokens: int | None) -> None:
    n_ctx = 512
    room = n_ctx - (max_tokens or 1)
    fits = json.dumps({"prompt": "x" * (room * MAX_TOKEN_BYTES), "max_tokens": max_tokens}).encode()
    request = parse_inference_request(fits, n_ctx=n_ctx)
    # The fewest tokens those bytes can be passes the check made after tokenizing too.
    check_fits_context(request, request.prompt_bytes // MAX_TOKEN_BYTES, n_ctx)
    one_more = json.dumps({"prompt": "x" * (room * MAX_TOKEN_BYTES + 1), "max_tokens": max_tokens}).encode()
    with pytest.raises(PayloadTooLargeError) as caught:
        parse_inference_request(one_more, n_ctx=n_ctx)
    assert caught.value.details[0]["field"] == "prompt"
    # Through a chat template the whitespace around a message may be trimmed: not counted.
    spaces = json.dumps({"messages": [{"role": "user", "content": " " * 300_000 + "hi"}],
                         "max_tokens": max_tokens}).encode()
    assert parse_inference_request(spaces, n_ctx=n_ctx).prompt_bytes == 2
