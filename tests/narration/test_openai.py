"""The OpenAI codec (rbee/narration/openai.py): byte tables and properties of its streams,
the whole answers, and the request mapping. The OpenAI SDK's own SSE decoder and types
read what it writes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from rbee.errors import InvalidRequestError, ModelNotFoundError
from rbee.narration import openai as oa
from rbee.narration.events import End, Error, Metrics, NarrationEvent, Prefill, Started, Token
from rbee.narration.wire import from_parsed, loads

from .strategies import narration_events, split_surrogate_pairs, text

MODEL, ID, CREATED = "gemma3-270m", "chatcmpl-1", 1700000000


def frames(data: bytes) -> list[bytes]:
    """The events of a stream, each checked to be exactly ``data: ...\\n\\n`` or a comment."""
    assert data.endswith(b"\n\n")
    out = data[:-2].split(b"\n\n")
    for frame in out:
        assert b"\n" not in frame and b"\r" not in frame, frame
        assert frame.startswith(b"data: ") or frame.startswith(b": narration "), frame
    return out


def payloads(data: bytes) -> list:
    """The JSON of every ``data:`` event ([DONE] as the string)."""
    return [f[6:].decode() if f == b"data: [DONE]" else json.loads(f[6:]) for f in frames(data)
            if f.startswith(b"data: ")]


def run(codec: oa.ChatStream | oa.TextStream, events: list) -> bytes:
    return b"".join(codec.feed(e) for e in events) + codec.close()


def sdk_events(data: bytes) -> list:
    return list(SSEDecoder().iter_bytes(iter([data])))


# -- byte tables --------------------------------------------------------------------------------


def test_chat_stream_table() -> None:
    codec = oa.ChatStream(MODEL, ID, CREATED)
    data = run(codec, [Started(), Token("Hi", 0), Token(" there", 1),
                       Metrics(prompt_tokens=5, tokens_out=2), End(2, 1.0, 2.0, "eos")])
    head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gemma3-270m","choices":['
    assert data == (
        head + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        + head + b'{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}\n\n'
        + head + b'{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":null}]}\n\n'
        + head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        + b"data: [DONE]\n\n"
    )


def test_text_stream_with_usage_table() -> None:
    codec = oa.TextStream(MODEL, "cmpl-1", CREATED, include_usage=True)
    got = payloads(run(codec, [Token("a", 0), Metrics(prompt_tokens=3, tokens_out=1, prompt_tokens_cached=2),
                               End(1, 1.0, 1.0, "max_tokens")]))
    assert [c["choices"] for c in got[:2]] == [
        [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
    ]
    assert got[0]["usage"] is None and got[0]["object"] == "text_completion"
    assert got[2]["choices"] == [] and got[2]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 2}}
    assert got[3] == "[DONE]"


@pytest.mark.parametrize(("stop", "reason"), [("eos", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                                              ("cancelled", "stop")])
def test_finish_reasons(stop: str, reason: str) -> None:
    assert oa.finish_reason(stop) == reason


def test_an_error_after_tokens_is_an_error_event_then_done_and_no_finish() -> None:
    codec = oa.ChatStream(MODEL, ID, CREATED, include_usage=True)
    data = run(codec, [Token("x", 0), Error(code="worker_error", message="the worker broke"), End(1, 0, 0, "eos")])
    got = payloads(data)
    assert got[-2] == {"error": {"message": "the worker broke", "type": "server_error", "param": None,
                                 "code": "worker_error"}}
    assert got[-1] == "[DONE]"
    assert not [c for c in got[:-1] if "choices" in c and any(ch["finish_reason"] for ch in c["choices"])]
    # What the SDK does with it: the error event raises APIError (tested with the queen).
    assert sdk_events(data)[-2].json()["error"]["code"] == "worker_error"


def test_a_stream_that_stops_without_end_says_so() -> None:
    got = payloads(run(oa.TextStream(MODEL, ID, CREATED), [Token("x", 0)]))
    assert got[-2]["error"]["code"] == "job_failed" and got[-1] == "[DONE]"


def test_narration_is_comments_only_when_asked() -> None:
    event = NarrationEvent("queen-rbee", "infer_queue", human="Waiting: position 1 of 2", extra={"position": 1})
    quiet = run(oa.ChatStream(MODEL, ID, CREATED), [event, Prefill(1, 2), Token("a", 0), End(1, 0, 0, "eos")])
    assert b": narration" not in quiet
    loud = run(oa.ChatStream(MODEL, ID, CREATED, narration=True),
               [event, Prefill(1, 2), Token("a", 0), End(1, 0, 0, "eos"), event])
    comments = [f for f in frames(loud) if f.startswith(b": ")]
    assert [from_parsed(loads(f[len(b": narration "):].decode())) for f in comments] == [event, Prefill(1, 2), event]
    # SSE readers skip comments: the SDK sees the same events as without narration.
    assert [e.data for e in sdk_events(loud)] == [e.data for e in sdk_events(quiet)]


def test_no_event_lines() -> None:
    data = run(oa.ChatStream(MODEL, ID, CREATED, include_usage=True, narration=True),
               [NarrationEvent("a", "b"), Token("event: x\n\ndata: [DONE]\n\n", 0), End(1, 0, 0, "eos")])
    assert b"\nevent:" not in data and not data.startswith(b"event:")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in payloads(data)[:-1] if c["choices"]) \
        == "event: x\n\ndata: [DONE]\n\n"


# -- properties ---------------------------------------------------------------------------------

token_texts = st.lists(text.map(split_surrogate_pairs), max_size=30)
noise = st.lists(st.one_of(narration_events, st.builds(Prefill, st.integers(0, 9), st.integers(0, 9)),
                           st.just(Started())), max_size=3)
stop_reasons = st.sampled_from(["eos", "stop_sequence", "max_tokens", "cancelled"])


@st.composite
def job_events(draw: st.DrawFn) -> tuple[list, list[str], str]:
    """A job's events: noise, tokens (noise between them), metrics, end."""
    texts = draw(token_texts)
    events: list = draw(noise)
    for i, t in enumerate(texts):
        events.append(Token(t, i))
        events += draw(st.lists(narration_events, max_size=1))
    stop = draw(stop_reasons)
    prompt = draw(st.integers(0, 10_000))
    events += [Metrics(prompt_tokens=prompt, tokens_out=len(texts)), End(len(texts), 1.0, 1.0, stop)]
    return events, texts, stop


@settings(max_examples=150)
@given(job_events(), st.booleans(), st.booleans())
def test_chat_stream_properties(case, include_usage: bool, narration: bool) -> None:
    events, texts, stop = case
    data = run(oa.ChatStream(MODEL, ID, CREATED, include_usage=include_usage, narration=narration), events)
    got = payloads(data)
    assert got[-1] == "[DONE]" and data.endswith(b"\n\ndata: [DONE]\n\n")
    chunks = [ChatCompletionChunk.model_validate(c) for c in got[:-1]]  # the SDK's own type, validated
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant" and with_choices[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "".join(texts)
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == [oa.finish_reason(stop)] and with_choices[-1].choices[0].finish_reason
    if include_usage:
        assert not chunks[-1].choices and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(texts)
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + len(texts)
    else:
        assert all(c.choices for c in chunks)
    assert {c.id for c in chunks} == {ID}
    # The SDK's SSE decoder, fed the bytes cut anywhere, sees the very same events.
    cut = [data[i:i + 7] for i in range(0, len(data), 7)]
    decoded = list(SSEDecoder().iter_bytes(iter(cut)))
    assert decoded[-1].data == "[DONE]" and [json.loads(e.data) for e in decoded[:-1]] == got[:-1]
    assert all(e.event is None for e in decoded)


@settings(max_examples=100)
@given(job_events(), st.booleans())
def test_text_stream_properties(case, include_usage: bool) -> None:
    events, texts, stop = case
    got = payloads(run(oa.TextStream(MODEL, "cmpl-1", CREATED, include_usage=include_usage), events))
    assert got[-1] == "[DONE]"
    with_choices = [c for c in got[:-1] if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in with_choices) == "".join(texts)
    assert [c["choices"][0]["finish_reason"] for c in with_choices if c["choices"][0]["finish_reason"]] == [
        oa.finish_reason(stop)]
    assert all(c["object"] == "text_completion" for c in got[:-1])
    assert bool(include_usage) == (not got[-2]["choices"])


@settings(max_examples=100)
@given(token_texts, st.integers(0, 50), st.booleans())
def test_an_error_anywhere_ends_the_stream_without_a_finish(texts: list[str], at: int, chat: bool) -> None:
    events: list = [Token(t, i) for i, t in enumerate(texts)]
    events.insert(min(at, len(events)), Error(code="cancelled", message="job cancelled"))
    events.append(End(len(texts), 0, 0, "eos"))
    codec = oa.ChatStream(MODEL, ID, CREATED) if chat else oa.TextStream(MODEL, ID, CREATED)
    got = payloads(run(codec, events))
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "cancelled"
    assert [p for p in got if isinstance(p, dict) and "error" in p] == [got[-2]]
    assert not any(ch["finish_reason"] for c in got[:-2] for ch in c["choices"])


@settings(max_examples=100)
@given(job_events())
def test_results_equal_the_streams(case) -> None:
    events, texts, stop = case
    chat, plain = oa.ChatResult(), oa.TextResult()
    for event in events:
        chat.feed(event)
        plain.feed(event)
    chat.close()
    plain.close()
    assert chat.error is None and plain.error is None
    body = ChatCompletion.model_validate(chat.body(MODEL, ID, CREATED))
    assert body.choices[0].message.content == "".join(texts)
    assert body.choices[0].finish_reason == oa.finish_reason(stop)
    assert body.usage is not None and body.usage.completion_tokens == len(texts)
    text_body = Completion.model_validate(plain.body(MODEL, "cmpl-1", CREATED))
    assert text_body.choices[0].text == "".join(texts) and text_body.object == "text_completion"


def test_a_result_keeps_the_error() -> None:
    result = oa.ChatResult()
    for event in (Token("a", 0), Error(code="model_not_found", message="no such file")):
        result.feed(event)
    result.close()
    assert result.error == Error(code="model_not_found", message="no such file")
    empty = oa.TextResult()
    empty.close()
    assert empty.error is not None and empty.error.code == "job_failed"


# -- requests -----------------------------------------------------------------------------------


def nodes(name: str) -> bool:
    return name in ("localhost", "blep")


def test_chat_request_mapping() -> None:
    req = oa.parse_chat_request({
        "model": "gemma3-270m@blep", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "bees"}]}],
        "max_completion_tokens": 12, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n",
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "response_format": {"type": "json_object"},
        "n": 1, "user": "someone", "cache_prompt": False, "top_k": 3, "unknown": {"x": 1},
    }, is_node=nodes)
    assert req.stream and req.include_usage and req.model == "gemma3-270m@blep"
    assert req.body == {
        "operation": "infer", "model": "gemma3-270m", "node": "blep",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nbees"}],
        "max_tokens": 12, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n", "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "response_format": {"type": "json_object"}, "cache_prompt": False, "top_k": 3,
    }


@pytest.mark.parametrize(("body", "max_tokens"), [({}, None), ({"max_tokens": None}, None), ({"max_tokens": 5}, 5),
                                                  ({"max_tokens": 5, "max_completion_tokens": 9}, 9)])
def test_chat_max_tokens(body: dict, max_tokens: int | None) -> None:
    req = oa.parse_chat_request({"model": "gemma3-270m", "messages": [{"role": "user", "content": "hi"}], **body},
                                is_node=nodes)
    assert "max_tokens" in req.body and req.body["max_tokens"] == max_tokens


def test_completion_request_mapping() -> None:
    req = oa.parse_completion_request({"model": "hf:org/repo:Q8_0", "prompt": ["Once"], "chat": True},
                                      is_node=nodes)
    assert req.body == {"operation": "infer", "model": "hf:org/repo:Q8_0", "prompt": "Once", "chat": True,
                        "max_tokens": oa.DEFAULT_COMPLETION_MAX_TOKENS}
    assert not req.stream and not req.include_usage


def test_model_at_an_unknown_node_is_one_reference() -> None:
    req = oa.parse_completion_request({"model": "file:/m/a@b.gguf", "prompt": "x"}, is_node=nodes)
    assert req.body["model"] == "file:/m/a@b.gguf" and "node" not in req.body
    with pytest.raises(ModelNotFoundError) as caught:
        oa.parse_completion_request({"model": "gemma3-270m@nowhere", "prompt": "x"}, is_node=nodes)
    assert "'nowhere' is not a known node" in caught.value.message
    assert caught.value.envelope()["error"]["param"] == "model"


@pytest.mark.parametrize(("body", "fields"), [
    ({"n": 2}, ["n"]),
    ({"n": True}, ["n"]),
    # with rbee's own checks of the other fields, so that every bad field is named at once
    ({"n": 2, "temperature": -1, "top_p": 5}, ["n", "temperature", "top_p"]),
    ({"logprobs": True, "tools": [{"type": "function"}]}, ["logprobs", "tools"]),
    ({"logit_bias": {"50256": -100}}, ["logit_bias"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"role": "tool", "content": "x"}]}, ["messages[0].role"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, ["messages[0].content[0]"]),
    ({"messages": [{"role": "assistant", "content": None}]}, ["messages[0].content"]),
    ({"stream": "yes", "stream_options": {"include_usage": 1}}, ["stream", "stream_options.include_usage"]),
    ({"model": None}, ["model"]),
    ({"model": "gemma3-270m@blep", "node": "localhost"}, ["node"]),
])
def test_chat_request_refusals(body: dict, fields: list[str]) -> None:
    full = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(InvalidRequestError) as caught:
        oa.parse_chat_request(full, is_node=nodes)
    assert [d["field"] for d in caught.value.details] == fields
    assert caught.value.http_status == 400 and caught.value.envelope()["error"]["param"] == fields[0]


@pytest.mark.parametrize(("body", "fields"), [
    ({"prompt": ["a", "b"]}, ["prompt"]),
    ({"prompt": [1, 2, 3]}, ["prompt"]),
    ({"prompt": "x", "echo": True, "best_of": 2, "logprobs": 1}, ["logprobs", "echo", "best_of"]),
])
def test_completion_request_refusals(body: dict, fields: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        oa.parse_completion_request({"model": "gemma3-270m", **body}, is_node=nodes)
    assert [d["field"] for d in caught.value.details] == fields


def test_a_body_that_is_no_object() -> None:
    with pytest.raises(InvalidRequestError):
        oa.parse_chat_request(None, is_node=nodes)  # type: ignore[arg-type]
