"""The typed requests: model references, sampling parameters, infer requests, their schema."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.errors import InvalidRequestError
from rbee.requests import (
    ACCEPTED_FORMS,
    BACKENDS,
    DEFAULT_SAMPLING,
    MAX_INT32,
    MAX_SEED,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    RESPONSE_FORMAT_TYPES,
    ROLES,
    FieldProblems,
    InferRequest,
    Message,
    ModelRef,
    SamplingParams,
    json_schema,
    parse_infer_request,
    parse_json_object,
    parse_reference,
    parse_sampling,
)
from rbee.worker.validation import parse_inference_request

GOOD = {"model": "gemma3-270m", "prompt": "Hello"}
FORMS = ("hf:org/repo", "hf:org/repo:Q4_K_M", "hf:org/repo/file.gguf", "file:/abs/path.gguf", "gemma3-270m")


def problems_of(body: dict[str, Any]) -> list[dict[str, str]]:
    with pytest.raises(InvalidRequestError) as caught:
        parse_infer_request(body)
    assert caught.value.code == "invalid_request" and caught.value.http_status == 400
    assert "\n" not in caught.value.message
    return caught.value.details


def accepted(body: dict[str, Any]) -> bool:
    try:
        parse_infer_request(body)
    except InvalidRequestError:
        return False
    return True


# -- model references ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("gemma3-270m", ModelRef("gemma3-270m", "embedded")),
        ("hf:org/repo", ModelRef("hf:org/repo", "hf", repo="org/repo")),
        ("hf:org/repo:q4_k_m", ModelRef("hf:org/repo:Q4_K_M", "hf", repo="org/repo", quant="Q4_K_M")),
        ("hf:org/repo/file.gguf", ModelRef("hf:org/repo/file.gguf", "hf", repo="org/repo", filename="file.gguf")),
        ("hf:Org-1/re.po_2/sub/f-Q8_0.gguf",
         ModelRef("hf:Org-1/re.po_2/sub/f-Q8_0.gguf", "hf", repo="Org-1/re.po_2", filename="sub/f-Q8_0.gguf")),
        ("file:/abs/path.gguf", ModelRef("file:/abs/path.gguf", "file", path="/abs/path.gguf")),
        ("  gemma3-270m ", ModelRef("gemma3-270m", "embedded")),
    ],
)
def test_accepted_forms(raw: str, expected: ModelRef) -> None:
    assert parse_reference(raw) == expected
    assert parse_infer_request({**GOOD, "model": raw}).ref == expected


BAD_REFERENCES = [
    "", "   ", None, 42, "llama3", "ollama:llama3", "hf:", "hf:org", "hf:/repo", "hf:org/repo/", "hf:org/repo/file.bin",
    "hf:org/repo/../x.gguf", "hf:org/repo/file.gguf:Q4_K_M", "hf:org/repo:Q4-K", "file:relative.gguf",
    "file:/a/../b.gguf", "file:/abs/model.bin", "hf:.org/repo",
]


@pytest.mark.parametrize("raw", BAD_REFERENCES)
def test_refusals_name_the_accepted_forms(raw: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_reference(raw)
    assert caught.value.http_status == 400
    for form in FORMS:
        assert form in caught.value.message
    assert caught.value.details[0]["field"] == "model"


@pytest.mark.parametrize("raw", [r for r in BAD_REFERENCES if isinstance(r, str) and r.strip()])
def test_an_infer_request_with_a_bad_reference_names_model_and_the_forms(raw: str) -> None:
    details = problems_of({**GOOD, "model": raw})
    assert [d["field"] for d in details] == ["model"]
    assert details[0]["constraint"] == ACCEPTED_FORMS
    assert all(form in details[0]["message"] for form in FORMS)


# -- defaults -----------------------------------------------------------------------------


def test_the_defaults() -> None:
    request = parse_infer_request(GOOD)
    assert request.sampling == DEFAULT_SAMPLING == SamplingParams()
    assert dataclasses.astuple(DEFAULT_SAMPLING) == (256, 0.8, 0.95, 40, 0.05, 1.0, 0.0, 0.0, None, ())
    assert (request.node, request.backend, request.device, request.cache_prompt, request.chat) == (
        None, None, None, True, False)
    assert (request.prompt, request.messages, request.response_format) == ("Hello", None, None)
    assert BACKENDS == ("cpu", "cuda", "metal")


def test_null_takes_the_default_and_unknown_fields_are_ignored() -> None:
    nulls = {name: None for name in json_schema(InferRequest)["properties"]
             if name not in ("model", "prompt", "max_tokens")}
    request = parse_infer_request({**GOOD, **nulls, "operation": "infer", "future_field": {"x": 1}})
    assert request == parse_infer_request(GOOD)


def test_max_tokens_absent_is_256_and_null_is_no_limit() -> None:
    assert parse_infer_request(GOOD).sampling.max_tokens == 256
    assert parse_infer_request({**GOOD, "max_tokens": None}).sampling.max_tokens is None
    assert parse_sampling({}).max_tokens == 256 and parse_sampling({"max_tokens": None}).max_tokens is None
    # In Python: the default is 256, an explicit None is no limit.
    assert SamplingParams().max_tokens == 256 and SamplingParams(max_tokens=None).max_tokens is None
    unlimited = parse_infer_request({**GOOD, "max_tokens": None})
    assert unlimited.worker_body("j")["max_tokens"] is None
    assert parse_inference_request(json.dumps(unlimited.worker_body("j")).encode(), n_ctx=512).max_tokens is None
    # Only max_tokens tells null from absent: another null still takes its default.
    assert parse_sampling({"temperature": None}).temperature == 0.8


def test_normalising_one_stop_string_and_integral_numbers() -> None:
    request = parse_infer_request({**GOOD, "stop": "\n", "temperature": 1, "top_p": 1, "repeat_penalty": 2})
    assert request.sampling.stop == ("\n",)
    assert [type(v) for v in (request.sampling.temperature, request.sampling.top_p,
                              request.sampling.repeat_penalty)] == [float] * 3
    # Built in Python, the same rules and the same normalisation.
    assert SamplingParams(stop=["a"], temperature=0, seed=None) == SamplingParams(
        stop=("a",), temperature=0.0, max_tokens=256)


# -- every rule ---------------------------------------------------------------------------

#: (id, changes to GOOD (``...`` removes a field), the field and constraint of the one problem)
BAD = [
    ("model-missing", {"model": ...}, "model", "required"),
    ("model-null", {"model": None}, "model", "required"),
    ("model-number", {"model": 7}, "model", "type:string"),
    ("model-empty", {"model": ""}, "model", "min_length:1"),
    ("model-unknown", {"model": "nonsense:x"}, "model", ACCEPTED_FORMS),
    ("prompt-missing", {"prompt": ...}, "prompt", "required"),
    ("prompt-empty", {"prompt": ""}, "prompt", "min_length:1"),
    ("prompt-list", {"prompt": ["a"]}, "prompt", "type:string"),
    ("node-slash", {"node": "a/b"}, "node", r"pattern:^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
    ("node-dash-first", {"node": "-x"}, "node", r"pattern:^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
    ("node-too-long", {"node": "n" * 64}, "node", r"pattern:^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
    ("node-newline", {"node": "mac\n"}, "node", r"pattern:^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
    ("node-number", {"node": 1}, "node", "type:string"),
    ("backend-unknown", {"backend": "rocm"}, "backend", "enum:cpu|cuda|metal"),
    ("backend-upper", {"backend": "CUDA"}, "backend", "enum:cpu|cuda|metal"),
    ("device-negative", {"device": -1}, "device", ">=0"),
    ("device-float", {"device": 1.0}, "device", "type:integer"),
    ("device-bool", {"device": False}, "device", "type:integer"),
    ("max-tokens-zero", {"max_tokens": 0}, "max_tokens", ">=1"),
    ("max-tokens-bool", {"max_tokens": True}, "max_tokens", "type:integer"),
    ("max-tokens-float", {"max_tokens": 7.0}, "max_tokens", "type:integer"),
    ("max-tokens-string", {"max_tokens": "5"}, "max_tokens", "type:integer"),
    ("temperature-negative", {"temperature": -0.1}, "temperature", ">=0"),
    ("temperature-string", {"temperature": "hot"}, "temperature", "type:number"),
    ("temperature-bool", {"temperature": False}, "temperature", "type:number"),
    ("temperature-nan", {"temperature": math.nan}, "temperature", "finite"),
    ("temperature-inf", {"temperature": math.inf}, "temperature", "finite"),
    ("temperature-huge-int", {"temperature": 10**400}, "temperature", "finite"),
    ("top-p-zero", {"top_p": 0}, "top_p", "in:(0,1]"),
    ("top-p-above-one", {"top_p": 1.5}, "top_p", "in:(0,1]"),
    ("top-k-negative", {"top_k": -1}, "top_k", ">=0"),
    ("top-k-beyond-int32", {"top_k": MAX_INT32 + 1}, "top_k", "<=2147483647"),
    ("top-k-float", {"top_k": 40.5}, "top_k", "type:integer"),
    ("min-p-negative", {"min_p": -0.01}, "min_p", "in:[0,1]"),
    ("min-p-above-one", {"min_p": 2}, "min_p", "in:[0,1]"),
    ("repeat-penalty-zero", {"repeat_penalty": 0}, "repeat_penalty", ">0"),
    ("repeat-penalty-negative", {"repeat_penalty": -1.0}, "repeat_penalty", ">0"),
    ("seed-negative", {"seed": -1}, "seed", "in:[0,4294967294]"),
    ("seed-random-marker", {"seed": 2**32 - 1}, "seed", "in:[0,4294967294]"),
    ("seed-bool", {"seed": True}, "seed", "type:integer"),
    ("seed-float", {"seed": 1.5}, "seed", "type:integer"),
    ("stop-number", {"stop": 5}, "stop", "type:array"),
    ("stop-object", {"stop": {"a": 1}}, "stop", "type:array"),
    ("stop-item-number", {"stop": ["ok", 1]}, "stop[1]", "type:string"),
    ("stop-item-empty", {"stop": [""]}, "stop[0]", "min_length:1"),
    ("stop-one-empty-string", {"stop": ""}, "stop[0]", "min_length:1"),
    ("stop-item-too-long", {"stop": ["x" * (MAX_STOP_LENGTH + 1)]}, "stop[0]", "max_length:256"),
    ("stop-item-nul", {"stop": ["a\0b"]}, "stop[0]", "no_nul"),
    ("stop-too-many", {"stop": [str(n) for n in range(MAX_STOP_SEQUENCES + 1)]}, "stop", "max_items:16"),
    ("cache-prompt-string", {"cache_prompt": "yes"}, "cache_prompt", "type:boolean"),
    ("chat-number", {"chat": 1}, "chat", "type:boolean"),
    ("presence-below", {"presence_penalty": -2.01}, "presence_penalty", "in:[-2,2]"),
    ("presence-above", {"presence_penalty": 3}, "presence_penalty", "in:[-2,2]"),
    ("presence-string", {"presence_penalty": "0"}, "presence_penalty", "type:number"),
    ("frequency-below", {"frequency_penalty": -3}, "frequency_penalty", "in:[-2,2]"),
    ("frequency-above", {"frequency_penalty": 2.5}, "frequency_penalty", "in:[-2,2]"),
    ("frequency-bool", {"frequency_penalty": True}, "frequency_penalty", "type:number"),
    ("prompt-and-messages", {"messages": [{"role": "user", "content": "hi"}]}, "prompt", "one_of:prompt|messages"),
    ("neither-prompt-nor-messages", {"prompt": None, "messages": None}, "prompt", "required"),
    ("messages-empty", {"prompt": ..., "messages": []}, "messages", "min_items:1"),
    ("messages-string", {"prompt": ..., "messages": "hi"}, "messages", "type:array"),
    ("messages-item-string", {"prompt": ..., "messages": ["hi"]}, "messages[0]", "type:object"),
    ("messages-bad-role", {"prompt": ..., "messages": [{"role": "bot", "content": "hi"}]},
     "messages[0].role", "enum:system|user|assistant"),
    ("messages-role-missing", {"prompt": ..., "messages": [{"content": "hi"}]}, "messages[0].role", "required"),
    ("messages-content-parts", {"prompt": ..., "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content", "type:string"),
    ("messages-content-nul", {"prompt": ..., "messages": [{"role": "user", "content": "a\0"}]},
     "messages[0].content", "no_nul"),
    ("messages-second-bad", {"prompt": ..., "messages": [{"role": "user", "content": "a"}, {"role": "tool",
                                                                                          "content": "b"}]},
     "messages[1].role", "enum:system|user|assistant"),
    ("response-format-string", {"response_format": "json"}, "response_format", "type:object"),
    ("response-format-type", {"response_format": {"type": "xml"}}, "response_format.type",
     "enum:text|json_object|json_schema"),
    ("response-format-no-type", {"response_format": {}}, "response_format.type", "enum:text|json_object|json_schema"),
    ("response-format-no-wrapper", {"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "type:object"),
    ("response-format-no-schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "type:object"),
    ("response-format-schema-list", {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
     "response_format.json_schema.schema", "type:object"),
    ("response-format-strict", {"response_format": {"type": "json_schema",
                                                     "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict", "type:boolean"),
    ("response-format-name", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "name": 5}}},
     "response_format.json_schema.name", "type:string"),
]


@pytest.mark.parametrize("changes, field, constraint", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_each_rule(changes: dict[str, Any], field: str, constraint: str) -> None:
    body = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    details = problems_of(body)
    assert [(d["field"], d["constraint"]) for d in details] == [(field, constraint)]
    message = details[0]["message"]
    assert message.startswith(field.split("[")[0]) or message.startswith("invalid model reference")


def test_messages_are_an_alternative_to_the_prompt() -> None:
    conversation = [{"role": "system", "content": "Answer with one word"},
                    {"role": "user", "content": "What colour is the sky?"},
                    {"role": "assistant", "content": "Blue", "name": "ignored"},
                    {"role": "user", "content": ""}]
    request = parse_infer_request({"model": "gemma3-270m", "messages": conversation, "prompt": None})
    assert request.prompt is None
    assert request.messages == (Message("system", "Answer with one word"), Message("user", "What colour is the sky?"),
                                Message("assistant", "Blue"), Message("user", ""))
    body = request.worker_body("job-1")
    assert "prompt" not in body
    assert body["messages"] == [{"role": m["role"], "content": m["content"]} for m in conversation]
    parsed = parse_inference_request(json.dumps(body).encode(), n_ctx=512)
    assert parsed.messages == request.messages and parsed.prompt is None and parsed.source == request.messages
    public = request.public()
    assert public["messages"] == 4 and public["prompt_chars"] == sum(len(m["content"]) for m in conversation)
    assert "Blue" not in json.dumps(public)
    # Built in Python: dicts become Messages; a bad role or both prompt and messages refused.
    assert InferRequest(model="gemma3-270m", messages=conversation).messages == request.messages
    with pytest.raises(InvalidRequestError) as caught:
        Message(role="tool", content="x")
    assert caught.value.details[0]["field"] == "role"
    with pytest.raises(InvalidRequestError) as caught:
        InferRequest(model="gemma3-270m", prompt="x", messages=[Message("user", "y")])
    assert [d["field"] for d in caught.value.details] == ["prompt"]
    assert "prompt and messages" in caught.value.message
    assert ROLES == ("system", "user", "assistant")


def test_both_or_neither_is_one_detail_naming_both() -> None:
    for body in ({"model": "gemma3-270m"}, {**GOOD, "messages": [{"role": "user", "content": "x"}]}):
        (detail,) = problems_of(body)
        assert detail["field"] == "prompt"
        assert "prompt" in detail["message"] and "messages" in detail["message"]


def test_response_format_is_passed_on_as_it_came() -> None:
    assert RESPONSE_FORMAT_TYPES == ("text", "json_object", "json_schema")
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "pick", "strict": True,
                                     "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    for response_format in ({"type": "text"}, {"type": "json_object"}, schema_format):
        request = parse_infer_request({**GOOD, "response_format": response_format})
        assert request.response_format == response_format
        assert request.worker_body("j")["response_format"] == response_format
        assert request.public()["response_format"] == response_format["type"]
    assert "response_format" not in parse_infer_request(GOOD).worker_body("j")


def test_the_messages_are_the_workers() -> None:
    assert problems_of({**GOOD, "seed": "x"})[0]["message"] == "seed must be an integer or null, not a string"
    assert problems_of({**GOOD, "max_tokens": True})[0]["message"] == (
        "max_tokens must be an integer or null, not a boolean")
    assert problems_of({**GOOD, "top_k": 2**31})[0]["message"] == "top_k must be at most 2147483647"
    assert problems_of({**GOOD, "repeat_penalty": 0})[0]["message"] == (
        "repeat_penalty must be greater than 0 (1.0 = off)")


def test_every_bad_field_is_reported_at_once_in_field_order() -> None:
    body = {"model": "ollama:x", "node": "a b", "max_tokens": 0, "top_p": 3, "stop": ["", 5], "chat": "no"}
    with pytest.raises(InvalidRequestError) as caught:
        parse_infer_request(body)
    fields = [d["field"] for d in caught.value.details]
    assert fields == ["model", "prompt", "node", "max_tokens", "top_p", "stop[0]", "stop[1]", "chat"]
    assert caught.value.message.startswith("invalid infer request: 8 problems: invalid model reference 'ollama:x'")
    assert "\n" not in caught.value.message


def test_a_body_that_is_not_an_object() -> None:
    for body in ([GOOD], "x", None):
        with pytest.raises(InvalidRequestError) as caught:
            parse_infer_request(body)  # type: ignore[arg-type]
        assert caught.value.details[0]["field"] == "(body)"
    with pytest.raises(InvalidRequestError):
        parse_json_object(b'{"prompt": NaN}')
    assert parse_json_object(b'{"prompt": "x"}') == {"prompt": "x"}


def test_building_in_python_checks_too() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(max_tokens=0, top_p=2)
    assert [d["field"] for d in caught.value.details] == ["max_tokens", "top_p"]
    assert caught.value.message.startswith("invalid sampling parameters: 2 problems")
    with pytest.raises(InvalidRequestError) as caught:
        InferRequest(model="llama3", prompt="")
    assert [d["field"] for d in caught.value.details] == ["model", "prompt"]
    with pytest.raises(InvalidRequestError):
        InferRequest(model="gemma3-270m", prompt="x", sampling={"max_tokens": 5})  # type: ignore[arg-type]
    request = InferRequest(model="hf:org/repo", prompt="x", sampling=SamplingParams(max_tokens=5))
    assert request.ref == ModelRef("hf:org/repo", "hf", repo="org/repo")


def test_parse_sampling_and_field_problems() -> None:
    assert parse_sampling({"max_tokens": 3, "prompt": "ignored"}) == SamplingParams(max_tokens=3)
    with pytest.raises(InvalidRequestError) as caught:
        parse_sampling({"max_tokens": 0, "min_p": 9})
    assert caught.value.message.startswith("invalid sampling parameters: 2 problems")
    problems = FieldProblems({"chat": True}, "thing")
    assert problems.field(InferRequest, "chat") is True and not problems
    problems.fail("x", "c", "x is wrong")
    assert problems and problems.bad("x") and problems.summary() == "invalid thing: x is wrong"


# -- the wire forms -----------------------------------------------------------------------

_no_nul_text = st.text(min_size=1, max_size=MAX_STOP_LENGTH).filter(lambda s: "\0" not in s)
valid_sampling = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 100_000),
    temperature=st.floats(0, 5),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(0, MAX_INT32),
    min_p=st.floats(0, 1),
    repeat_penalty=st.floats(0, 10, exclude_min=True),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    seed=st.none() | st.integers(0, MAX_SEED),
    stop=st.lists(_no_nul_text, max_size=MAX_STOP_SEQUENCES).map(tuple),
) | st.builds(SamplingParams, max_tokens=st.none())
_messages = st.lists(st.builds(Message, role=st.sampled_from(ROLES),
                               content=st.text().filter(lambda s: "\0" not in s)), min_size=1, max_size=4).map(tuple)
_response_formats = st.sampled_from([
    None, {"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": None}},
])
_request_fields = dict(
    model=st.sampled_from(["gemma3-270m", "hf:org/repo", "hf:org/repo:Q8_0", "file:/m/x.gguf"]),
    node=st.none() | st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z"),
    backend=st.none() | st.sampled_from(BACKENDS),
    device=st.none() | st.integers(0, 64),
    sampling=valid_sampling,
    cache_prompt=st.booleans(),
    chat=st.booleans(),
    response_format=_response_formats,
)
valid_requests = (st.builds(InferRequest, prompt=st.text(min_size=1), **_request_fields)
                  | st.builds(InferRequest, messages=_messages, **_request_fields))


@settings(max_examples=200, deadline=None)
@given(valid_requests)
def test_valid_requests_round_trip_through_the_worker_body(request: InferRequest) -> None:
    body = request.worker_body("job-1")
    wire = json.dumps(body).encode()
    assert isinstance(body["stop"], list)
    # A context with room for any prompt drawn here (the size bound has tests of its own).
    parsed = parse_inference_request(wire, n_ctx=(request.sampling.max_tokens or 1) + 2**20)
    assert (parsed.job_id, parsed.prompt, parsed.messages, parsed.cache_prompt, parsed.chat) == (
        "job-1", request.prompt, request.messages, request.cache_prompt, request.chat)
    assert parsed.response_format == request.response_format
    assert (parsed.grammar is None) == (request.response_format is None or request.response_format["type"] == "text")
    assert SamplingParams(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(SamplingParams)}) == (
        request.sampling)
    # ... and through the flat JSON form a client sends the queen.
    flat = {"model": request.model, "prompt": request.prompt, "node": request.node, "backend": request.backend,
            "device": request.device, **request.sampling.as_json(),
            "cache_prompt": request.cache_prompt, "chat": request.chat, "response_format": request.response_format,
            "messages": None if request.messages is None else [m.as_json() for m in request.messages]}
    assert parse_infer_request(json.loads(json.dumps(flat))) == request
    public = request.public()
    assert "prompt" not in public and public["prompt_chars"] == parsed.prompt_chars
    assert public["reference"] == request.ref.reference


_bad_values = {
    "max_tokens": st.integers(max_value=0) | st.booleans() | st.floats(allow_nan=False),
    "temperature": st.floats(max_value=-1e-9) | st.text(),
    "top_p": st.floats(min_value=1.0, exclude_min=True) | st.floats(max_value=0.0),
    "top_k": st.integers(max_value=-1) | st.integers(min_value=MAX_INT32 + 1),
    "seed": st.integers(max_value=-1) | st.integers(min_value=MAX_SEED + 1) | st.text(),
    "node": st.text().filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", s)),
    "backend": st.text().filter(lambda s: s not in BACKENDS),
    "chat": st.integers() | st.text(),
    "presence_penalty": st.floats(min_value=2.0, exclude_min=True) | st.floats(max_value=-2.0, exclude_max=True),
    "frequency_penalty": st.floats(min_value=2.0, exclude_min=True) | st.booleans(),
    "response_format": st.text() | st.fixed_dictionaries({"type": st.text().filter(
        lambda s: s not in RESPONSE_FORMAT_TYPES)}),
}


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_bad_values)), st.none(), min_size=1).flatmap(
    lambda keys: st.fixed_dictionaries({k: _bad_values[k] for k in keys})))
def test_every_bad_field_is_named(bad: dict[str, Any]) -> None:
    details = problems_of({**GOOD, **bad})
    assert {re.split(r"[.[]", d["field"])[0] for d in details} == set(bad)


# -- the JSON Schema ----------------------------------------------------------------------


def schema_accepts(prop: dict[str, Any], value: Any) -> bool:
    """The subset of JSON Schema ``json_schema`` emits, for values that JSON can carry.

    "integer" is a JSON integer literal here, as in our checks (``7.0`` is not one).
    """
    kinds = {
        "null": lambda v: v is None,
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if "type" in prop:
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        if not any(kinds[t](value) for t in types):
            return False
    if "enum" in prop and not any(value == e and type(value) is type(e) for e in prop["enum"]):
        return False
    if "const" in prop and not (value == prop["const"] and type(value) is type(prop["const"])):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in prop and value < prop["minimum"]:
            return False
        if "exclusiveMinimum" in prop and value <= prop["exclusiveMinimum"]:
            return False
        if "maximum" in prop and value > prop["maximum"]:
            return False
    if isinstance(value, str):
        if len(value) < prop.get("minLength", 0) or len(value) > prop.get("maxLength", math.inf):
            return False
        # Our patterns are anchored ^...$: ECMA-262's $ is the very end (Python's fullmatch).
        if "pattern" in prop and not re.fullmatch(prop["pattern"], value):
            return False
    if isinstance(value, list):
        if not prop.get("minItems", 0) <= len(value) <= prop.get("maxItems", math.inf):
            return False
        if "items" in prop and not all(schema_accepts(prop["items"], item) for item in value):
            return False
    if isinstance(value, dict):
        if any(name not in value for name in prop.get("required", ())):
            return False
        if not all(schema_accepts(sub, value[name]) for name, sub in prop.get("properties", {}).items()
                   if name in value):
            return False
        if "if" in prop and schema_accepts(prop["if"], value) and not schema_accepts(prop["then"], value):
            return False
        if "oneOf" in prop and sum(schema_accepts(branch, value) for branch in prop["oneOf"]) != 1:
            return False
    return True


def body_accepts(body: dict[str, Any]) -> bool:
    """Whether the whole InferRequest schema (every property and its ``oneOf``) takes ``body``."""
    return schema_accepts(json_schema(InferRequest), body)


def test_the_schema_describes_every_field_with_its_default() -> None:
    schema = json_schema(InferRequest)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["required"] == ["model"]
    assert schema["oneOf"] == [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                               {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]
    props = schema["properties"]
    assert list(props) == ["model", "prompt", "messages", "node", "backend", "device", *[
        f.name for f in dataclasses.fields(SamplingParams)], "cache_prompt", "chat", "response_format"]
    for name, value in DEFAULT_SAMPLING.as_json().items():
        assert props[name]["default"] == value
    defaults = parse_infer_request(GOOD)
    for name in ("node", "backend", "device", "cache_prompt", "chat", "response_format"):
        assert props[name]["default"] == getattr(defaults, name)
    assert all(p["description"] for p in props.values())
    assert props["backend"]["enum"] == [*BACKENDS, None]
    assert props["max_tokens"]["type"] == ["integer", "null"] and "null: no limit" in props["max_tokens"]["description"]
    assert props["presence_penalty"] == {"type": ["number", "null"], "default": 0.0, "minimum": -2, "maximum": 2,
                                         "description": props["presence_penalty"]["description"]}
    message = props["messages"]["items"]
    assert props["messages"]["type"] == ["array", "null"] and props["messages"]["minItems"] == 1
    assert message["required"] == ["role", "content"] and message["properties"]["role"]["enum"] == list(ROLES)
    assert json_schema(Message)["properties"] == message["properties"]
    assert props["response_format"]["properties"]["type"]["enum"] == list(RESPONSE_FORMAT_TYPES)
    assert props["response_format"]["then"]["required"] == ["json_schema"]
    assert json_schema(SamplingParams)["properties"] == {k: props[k] for k in DEFAULT_SAMPLING.as_json()}
    json.dumps(schema)  # plain JSON


def _outside_and_inside(prop: dict[str, Any]) -> list[tuple[Any, bool]]:
    """Values at and just beyond each bound of ``prop``, with whether they are valid."""
    integer = "integer" in prop["type"]
    below = (lambda b: b - 1) if integer else (lambda b: math.nextafter(b, -math.inf))
    above = (lambda b: b + 1) if integer else (lambda b: math.nextafter(b, math.inf))
    cases = []
    if "minimum" in prop:
        cases += [(prop["minimum"], True), (below(prop["minimum"]), False)]
    if "exclusiveMinimum" in prop:
        cases += [(prop["exclusiveMinimum"], False), (above(prop["exclusiveMinimum"]), True)]
    if "maximum" in prop:
        cases += [(prop["maximum"], True), (above(prop["maximum"]), False)]
    return cases


@pytest.mark.parametrize("name", [n for n, p in json_schema(InferRequest)["properties"].items()
                                  if {"minimum", "exclusiveMinimum", "maximum"} & set(p)])
def test_the_schema_bounds_are_the_checks_bounds(name: str) -> None:
    prop = json_schema(InferRequest)["properties"][name]
    cases = _outside_and_inside(prop)
    assert cases
    for value, valid in cases:
        assert accepted({**GOOD, name: value}) is valid, (name, value)
        assert schema_accepts(prop, value) is valid, (name, value)
        assert body_accepts({**GOOD, name: value}) is valid, (name, value)


_VALID_OBJECTS = [
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "a\0"},
    {"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
    {"type": "json_schema", "json_schema": {"schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}},
    {"type": "json_schema", "json_schema": {"schema": {}, "strict": 1}},
]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300) | st.sampled_from(["cpu", "cuda", "mac", "a\0", "\n", "x" * 256, "x" * 257])
    | st.sampled_from(_VALID_OBJECTS),
    lambda inner: st.lists(inner, max_size=18) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "json_schema", "schema", "name", "strict"]), inner, max_size=3),
    max_leaves=20,
)
_checked_by_schema = [n for n in json_schema(InferRequest)["properties"] if n != "model"]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(_checked_by_schema), _json_values, st.booleans())
def test_the_schema_and_the_checks_agree(name: str, value: Any, without_prompt: bool) -> None:
    # (model is the exception: its schema is "a non-empty string", parse_reference says more.)
    body = {**GOOD, name: value}
    if without_prompt and name != "prompt":
        del body["prompt"]  # messages alone, and every other field without a prompt
    assert accepted(body) is body_accepts(body), body
