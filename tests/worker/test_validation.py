"""Bad inference requests get 400 with per-field details, never a 500 and never a stream.

Each case is checked twice: against ``parse_inference_request`` itself (fast, exact) and
against one real worker over HTTP (the answer a client gets).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from rbee.errors import InvalidRequestError
from rbee.worker.validation import (
    DEFAULT_MAX_TOKENS,
    check_fits_context,
    parse_inference_request,
)
from tests.processes import RbeeProcess
from tests.worker.workers import HTTP_TIMEOUT, infer, start_worker, wait_ready

N_CTX = 512  # the tests' workers run with --ctx-size 512
GOOD = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def body(**changes: Any) -> bytes:
    """GOOD with ``changes`` (a value of ``...`` removes the field), as JSON bytes."""
    obj = {**GOOD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


#: (id, request body, the field and constraint the first detail must name)
BAD_REQUESTS = [
    ("missing-prompt", body(prompt=...), "prompt", "required"),
    ("null-prompt", body(prompt=None), "prompt", "required"),
    ("empty-prompt", body(prompt=""), "prompt", "min_length:1"),
    ("prompt-number", body(prompt=42), "prompt", "type:string"),
    ("max-tokens-zero", body(max_tokens=0), "max_tokens", ">=1"),
    ("max-tokens-negative", body(max_tokens=-5), "max_tokens", ">=1"),
    ("max-tokens-beyond-context", body(max_tokens=N_CTX + 1), "max_tokens", f"<={N_CTX}"),
    ("max-tokens-bool", body(max_tokens=True), "max_tokens", "type:integer"),
    ("max-tokens-string", body(max_tokens="5"), "max_tokens", "type:integer"),
    ("max-tokens-float", body(max_tokens=2.5), "max_tokens", "type:integer"),
    ("temperature-negative", body(temperature=-0.1), "temperature", ">=0"),
    ("temperature-string", body(temperature="hot"), "temperature", "type:number"),
    ("temperature-bool", body(temperature=False), "temperature", "type:number"),
    ("temperature-infinite", b'{"prompt": "Hello", "temperature": 1e999}', "temperature", "finite"),
    ("top-p-zero", body(top_p=0), "top_p", "in:(0,1]"),
    ("top-p-above-one", body(top_p=1.5), "top_p", "in:(0,1]"),
    ("top-k-negative", body(top_k=-1), "top_k", ">=0"),
    ("top-k-bool", body(top_k=True), "top_k", "type:integer"),
    ("top-k-beyond-int32", body(top_k=2**31), "top_k", "<=2147483647"),
    ("min-p-above-one", body(min_p=2), "min_p", "in:[0,1]"),
    ("repeat-penalty-zero", body(repeat_penalty=0), "repeat_penalty", ">0"),
    ("seed-negative", body(seed=-1), "seed", "in:[0,4294967294]"),
    ("seed-bool", body(seed=True), "seed", "type:integer"),
    ("stop-number", body(stop=5), "stop", "type:array"),
    ("stop-item-number", body(stop=["ok", 1]), "stop[1]", "type:string"),
    ("stop-item-empty", body(stop=[""]), "stop[0]", "min_length:1"),
    ("stop-too-many", body(stop=[str(n) for n in range(17)]), "stop", "max_items:16"),
    ("chat-string", body(chat="yes"), "chat", "type:boolean"),
    ("prompt-and-messages", body(messages=[{"role": "user", "content": "Hi"}]), "prompt", "one_of:prompt|messages"),
    ("neither-prompt-nor-messages", body(prompt=..., messages=None), "prompt", "required"),
    ("messages-bad-role", body(prompt=..., messages=[{"role": "bot", "content": "Hi"}]),
     "messages[0].role", "enum:system|user|assistant"),
    ("messages-empty", body(prompt=..., messages=[]), "messages", "min_items:1"),
    ("messages-content-parts", body(prompt=..., messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "messages[0].content", "type:string"),
    ("presence-penalty-above", body(presence_penalty=2.5), "presence_penalty", "in:[-2,2]"),
    ("frequency-penalty-below", body(frequency_penalty=-2.01), "frequency_penalty", "in:[-2,2]"),
    ("response-format-type", body(response_format={"type": "yaml"}), "response_format.type",
     "enum:text|json_object|json_schema"),
    ("response-format-schema-missing", body(response_format={"type": "json_schema", "json_schema": {}}),
     "response_format.json_schema.schema", "type:object"),
    ("response-format-unconvertible", body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "no anchors"}}}), "response_format", "json_schema:convertible"),
    ("response-format-unknown-type-in-schema", body(response_format={"type": "json_schema", "json_schema": {
        "schema": {"type": "object", "properties": {"a": {"type": "color"}}}}}), "response_format",
     "json_schema:convertible"),
    ("job-id-slash", body(job_id="a/b"), "job_id", "pattern:[A-Za-z0-9._:-]{1,128}"),
    ("job-id-number", body(job_id=7), "job_id", "type:string"),
    ("not-json", b"prompt=Hello", "(body)", "json"),
    ("empty-body", b"", "(body)", "required"),
    ("nan-is-not-json", b'{"prompt": "Hello", "temperature": NaN}', "temperature", "finite"),
    ("not-utf8", b'{"prompt": "\xff"}', "(body)", "utf-8"),
    ("too-deep", b'{"prompt": "Hello", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "(body)", "max_depth:64"),
    ("array-body", b'["Hello"]', "(body)", "object"),
    ("string-body", b'"Hello"', "(body)", "object"),
]


@pytest.mark.parametrize("raw, field, constraint", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_parse_rejects(raw, field, constraint):
    with pytest.raises(InvalidRequestError) as caught:
        parse_inference_request(raw, n_ctx=N_CTX)
    error = caught.value
    assert error.code == "invalid_request" and error.http_status == 400
    assert error.details[0]["field"] == field
    assert error.details[0]["constraint"] == constraint
    assert error.details[0]["message"] and error.message.startswith(("invalid inference request", "the request body",
                                                                       f"{field}: "))


def test_parse_reports_every_bad_field_at_once():
    with pytest.raises(InvalidRequestError) as caught:
        parse_inference_request(body(prompt=..., max_tokens=0, top_p=3), n_ctx=N_CTX)
    assert [d["field"] for d in caught.value.details] == ["prompt", "max_tokens", "top_p"]
    assert "3 problems" in caught.value.message


def test_parse_fills_defaults_and_ignores_unknown_fields():
    request = parse_inference_request(b'{"prompt": "Hi", "future_field": {"x": 1}, "seed": null}', n_ctx=N_CTX)
    assert request.prompt == "Hi" and request.max_tokens == DEFAULT_MAX_TOKENS
    assert (request.temperature, request.top_p, request.top_k, request.min_p, request.repeat_penalty) == (
        0.8, 0.95, 40, 0.05, 1.0)
    assert request.seed is None and request.stop == () and request.chat is False
    assert request.job_id.startswith("job-")


def test_parse_accepts_one_stop_string_and_integral_numbers_for_floats():
    request = parse_inference_request(body(stop="\n", temperature=1, top_p=1, seed=7, job_id="j:1.a-b_c"), n_ctx=N_CTX)
    assert request.stop == ("\n",) and request.temperature == 1.0 and request.top_p == 1.0
    assert request.seed == 7 and request.job_id == "j:1.a-b_c"


def test_the_converters_refusal_is_in_the_message():
    raw = body(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "x"}}})
    with pytest.raises(InvalidRequestError) as caught:
        parse_inference_request(raw, n_ctx=N_CTX)
    (detail,) = caught.value.details
    assert detail["field"] == "response_format"
    assert 'Pattern must start with "^" and end with "$"' in detail["message"]


def test_messages_response_format_and_penalties_are_taken():
    conversation = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    request = parse_inference_request(body(prompt=..., messages=conversation, presence_penalty=-2,
                                           frequency_penalty=1.5, max_tokens=None,
                                           response_format={"type": "json_object"}), n_ctx=N_CTX)
    assert request.prompt is None and [m.as_json() for m in request.messages] == conversation
    assert request.source == request.messages and request.prompt_chars == len("Be brief") + len("Hi")
    assert (request.presence_penalty, request.frequency_penalty, request.max_tokens) == (-2.0, 1.5, None)
    assert request.response_format == {"type": "json_object"} and "root" in request.grammar
    text = parse_inference_request(body(response_format={"type": "text"}), n_ctx=N_CTX)
    assert text.grammar is None and text.source == "Hello"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    typed = parse_inference_request(body(response_format={"type": "json_schema", "json_schema": {"schema": schema}}),
                                    n_ctx=N_CTX)
    assert typed.grammar.count("root ::=") == 1 and '"\\"n\\""' in typed.grammar


def test_no_limit_needs_room_for_one_token():
    request = parse_inference_request(body(max_tokens=None), n_ctx=N_CTX)
    check_fits_context(request, N_CTX - 1, N_CTX)
    with pytest.raises(InvalidRequestError) as caught:
        check_fits_context(request, N_CTX, N_CTX)
    assert caught.value.details[0]["field"] == "prompt" and "no room" in caught.value.message


def test_prompt_plus_max_tokens_must_fit_the_context():
    request = parse_inference_request(body(max_tokens=500), n_ctx=N_CTX)
    check_fits_context(request, 12, N_CTX)
    with pytest.raises(InvalidRequestError) as caught:
        check_fits_context(request, 13, N_CTX)
    assert caught.value.details[0]["field"] == "max_tokens"
    assert "13 tokens" in caught.value.message


# -- over HTTP, one real worker --------------------------------------------------------


@pytest.fixture(scope="module")
def url(embedded_model) -> Iterator[str]:
    proc: RbeeProcess = start_worker(embedded_model, worker_id="w-validation")
    try:
        url = proc.bound_url()
        assert wait_ready(url)["ready"]
        yield url
    finally:
        assert proc.stop() == 0


@pytest.mark.model
@pytest.mark.parametrize("raw, field, constraint", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_http_400_with_envelope(url, raw, field, constraint):
    response = httpx.post(f"{url}/v1/inference", content=raw, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0] == {"field": field, "constraint": constraint, "message": error["details"][0]["message"]}
    assert error["message"]


@pytest.mark.model
def test_http_prompt_too_long_for_the_context(url):
    response = httpx.post(f"{url}/v1/inference", json={"prompt": "word " * 600, "max_tokens": 8}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "context of 512 tokens" in error["message"]
    assert error["details"][0]["field"] == "prompt"
    # ... and the worker is not left busy by the rejected request.
    assert httpx.get(f"{url}/v1/ready", timeout=HTTP_TIMEOUT).json()["state"] == "idle"


@pytest.mark.model
def test_http_body_over_the_limit_is_413(url):
    response = httpx.post(f"{url}/v1/inference", content=b"x" * (16 * 1024 * 1024 + 1), timeout=HTTP_TIMEOUT)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.model
def test_http_unknown_fields_are_fine(url):
    stream = infer(url, {**GOOD, "n_probs": 5, "model": "whatever", "stream": True})
    assert stream.status == 200
    assert stream.end.tokens_out == 2 and stream.end.stop_reason == "max_tokens"
