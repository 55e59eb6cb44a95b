"""SSE codec: byte tables for the WHATWG parsing rules, and properties of the round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.errors import NarrationError
from rbee.narration import sse
from rbee.narration.events import DONE, End, NarrationEvent, Started, Token, UnknownEvent

from .strategies import MEBIBYTE, chunked, events, huge_event_settings, huge_events

TOKEN_JSON = b'{"type":"token","t":"a","i":0}'


def decode_all(*chunks: bytes) -> list:
    decoder = sse.Decoder()
    out = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    out += decoder.close()
    return out


# --- writing ---------------------------------------------------------------------------


def test_encode_table():
    assert sse.encode(Token("a", 0)) == b"event: token\ndata: " + TOKEN_JSON + b"\n\n"
    assert sse.encode(End(3, 1.5, 2.0, "eos")) == (
        b'event: end\ndata: {"type":"end","tokens_out":3,"decode_time_ms":1.5,'
        b'"tokens_per_sec":2.0,"stop_reason":"eos","prompt_tokens_cached":0}\n\n'
    )
    assert sse.encode(NarrationEvent("w", "x", human="a\nb\r")) == (
        b'event: narration\ndata: {"type":"narration","actor":"w","action":"x","target":"",'
        b'"human":"a\\nb\\r","level":"info"}\n\n'
    )
    assert sse.encode(DONE) == sse.encode_done() == b"data: [DONE]\n\n"
    assert sse.encode_ping() == b": ping\n\n"


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "\ud800"])
def test_an_event_name_that_cannot_be_a_line_is_left_out(name):
    data = sse.encode(UnknownEvent(name, {"x": 1}))
    assert data.startswith(b"data: {")
    assert decode_all(data) == [UnknownEvent(name, {"x": 1})]


# --- reading: the byte table ---------------------------------------------------------------

TABLE = [
    # our own form
    (b"event: token\ndata: " + TOKEN_JSON + b"\n\n", [Token("a", 0)]),
    # no space after the colon; the JSON type is enough without an event line
    (b"data:" + TOKEN_JSON + b"\n\n", [Token("a", 0)]),
    # CRLF and CR line ends
    (b"event: token\r\ndata: " + TOKEN_JSON + b"\r\n\r\n", [Token("a", 0)]),
    (b"event: token\rdata: " + TOKEN_JSON + b"\r\r", [Token("a", 0)]),
    (b"data: [DONE]\r\n\r\ndata: [DONE]\r\rdata: [DONE]\n\n", [DONE, DONE, DONE]),
    # several data lines are joined with \n (whitespace inside JSON is fine)
    (b'data: {"type":"token",\ndata: "t":"a","i":0}\n\n', [Token("a", 0)]),
    # only one space after the colon is dropped
    (b"data:  two\n\n", [UnknownEvent("message", {"data": " two"})]),
    # other servers' SSE: the payload is kept raw under the event name or "message"
    (b"data: hello\n\n", [UnknownEvent("message", {"data": "hello"})]),
    (b"event: foo\ndata: hello\ndata: world\n\n", [UnknownEvent("foo", {"data": "hello\nworld"})]),
    (b"event:\ndata: x\n\n", [UnknownEvent("message", {"data": "x"})]),
    (b"data: [1,2]\n\n", [UnknownEvent("message", {"data": "[1,2]"})]),
    (b'data: {"no":"type"}\n\n', [UnknownEvent("message", {"data": '{"no":"type"}'})]),
    (b"data: {broken\n\n", [UnknownEvent("message", {"data": "{broken"})]),
    (b"data: [DONE] \n\n", [UnknownEvent("message", {"data": "[DONE] "})]),
    # the JSON type wins over the event name
    (b"event: foo\ndata: " + TOKEN_JSON + b"\n\n", [Token("a", 0)]),
    # an unknown type keeps its JSON object; a malformed known type too
    (b'data: {"type":"later","a":1}\n\n', [UnknownEvent("later", {"a": 1})]),
    (b'data: {"type":"token","t":"x"}\n\n', [UnknownEvent("token", {"t": "x"})]),
    # a field without a colon has an empty value: "data" alone is an empty payload
    (b"data\n\n", [UnknownEvent("message", {"data": ""})]),
    (b"data:\n\n", [UnknownEvent("message", {"data": ""})]),
    (b"data\ndata\n\n", [UnknownEvent("message", {"data": "\n"})]),
    # comments and keep-alives give nothing
    (b": ping\n\n", []),
    (b":\n:comment with: colon\n\n", []),
    (b": ping\n\ndata: [DONE]\n\n", [DONE]),
    # no data, no event
    (b"event: foo\n\n", []),
    (b"id: 1\n\n", []),
    (b"\n\n\n", []),
    # unknown fields are ignored
    (b"foo: bar\ndata: [DONE]\nbaz\n\n", [DONE]),
    # DONE is DONE whatever the event name
    (b"event: done\ndata: [DONE]\n\n", [DONE]),
    # a leading BOM is dropped (once: a second one is part of the field name)
    (b"\xef\xbb\xbfdata: [DONE]\n\n", [DONE]),
    (b"\xef\xbb\xbf\xef\xbb\xbfdata: [DONE]\n\n", []),
    # bytes that are not UTF-8 become U+FFFD
    (b"data: \xff\xfe\n\n", [UnknownEvent("message", {"data": "\ufffd\ufffd"})]),
    # a field named data: with spaces before the colon is another field
    (b"data : x\n\n", []),
]


@pytest.mark.parametrize(("data", "expected"), TABLE)
def test_decode_table(data, expected):
    assert decode_all(data) == expected


@pytest.mark.parametrize(("data", "expected"), TABLE)
def test_decode_table_one_byte_at_a_time(data, expected):
    assert decode_all(*[data[i : i + 1] for i in range(len(data))]) == expected


def test_cr_at_a_chunk_end_and_lf_at_the_next_start_are_one_line_end():
    # Were they two line ends, the empty line between would dispatch "a" on its own.
    assert decode_all(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [
        UnknownEvent("message", {"data": "a\nb"})
    ]
    # ...but a CR, then an empty chunk, then LF is still one line end
    assert decode_all(b"data: a\r", b"", b"\ndata: b\r\n\r\n") == [
        UnknownEvent("message", {"data": "a\nb"})
    ]


def test_events_come_out_as_soon_as_their_blank_line_arrives():
    decoder = sse.Decoder()
    assert decoder.feed(b"data: [DONE]\n") == []
    assert decoder.feed(b"\n") == [DONE]
    # with CR line ends, too: no waiting for a possible LF
    assert decoder.feed(b"data: [DONE]\r\r") == [DONE]


def test_id_and_retry_are_kept_on_the_decoder():
    decoder = sse.Decoder()
    assert decoder.feed(b"id: 7\nretry: 3000\ndata: [DONE]\n\n") == [DONE]
    assert (decoder.last_event_id, decoder.retry_ms) == ("7", 3000)
    decoder.feed(b"id: a\x00b\nretry: 12x\nretry: \xd9\xa3\n\n")  # NUL id, non-digit retries
    assert (decoder.last_event_id, decoder.retry_ms) == ("7", 3000)
    decoder.feed(b"id\n\n")
    assert decoder.last_event_id == ""


@pytest.mark.parametrize(
    "stream",
    [
        b"data: [DONE]\n",  # no blank line after the event
        b"data: [DONE]",  # in the middle of a line
        b"event: token\n",
        b": ping",  # a cut line, even a comment
        b"data: \xc3",  # inside a UTF-8 character
        b"data: x\r",  # the CR ended the line, but the event never ended
    ],
)
def test_close_raises_when_the_stream_ended_inside_an_event(stream):
    decoder = sse.Decoder()
    decoder.feed(stream)
    with pytest.raises(NarrationError):
        decoder.close()


def test_close_after_a_whole_stream_gives_nothing_and_feeding_after_close_raises():
    decoder = sse.Decoder()
    assert decoder.feed(sse.encode(Started()) + sse.encode_ping() + sse.encode_done()) == [
        Started(),
        DONE,
    ]
    assert decoder.close() == []
    assert decoder.close() == []
    with pytest.raises(NarrationError):
        decoder.feed(b"data: x\n\n")


def test_a_one_mebibyte_field_survives():
    big = "data: [DONE]\r\n\u00e9" * (1 << 16)
    event = NarrationEvent("a", "b", human=big, extra={"k": big})
    data = sse.encode(event)
    assert len(data) > 1 << 20
    assert decode_all(*[data[i : i + 65_537] for i in range(0, len(data), 65_537)]) == [event]


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(events)
def test_round_trip_of_any_event(event):
    assert decode_all(sse.encode(event)) == [event]


@settings(max_examples=150, deadline=None)
@given(st.lists(events, max_size=6), st.data())
def test_any_chunking_of_a_stream_gives_the_same_events(stream, data):
    encoded = sse.encode_ping().join(sse.encode(e) for e in stream) + sse.encode_done()
    pieces = data.draw(chunked(encoded))
    assert decode_all(*pieces) == [*stream, DONE]


@settings(max_examples=100, deadline=None)
@given(st.lists(events, max_size=5), st.sampled_from([b"\r\n", b"\r"]), st.data())
def test_crlf_and_cr_streams_give_the_same_events_under_any_chunking(stream, line_end, data):
    # Our payloads hold no raw line breaks (JSON escapes them), so every LF is a line end.
    encoded = b"".join(sse.encode(e) for e in stream).replace(b"\n", line_end)
    pieces = data.draw(chunked(b"\xef\xbb\xbf" + encoded))
    assert decode_all(*pieces) == stream


@settings(max_examples=100, deadline=None)
@given(st.lists(events, min_size=1, max_size=4))
def test_splits_inside_every_utf8_character_and_crlf(stream):
    encoded = b"".join(sse.encode(e) for e in stream).replace(b"\n", b"\r\n")
    assert decode_all(*[encoded[i : i + 1] for i in range(len(encoded))]) == stream


@huge_event_settings
@given(huge_events())
def test_round_trip_of_any_event_with_a_one_mebibyte_field(event):
    data = sse.encode(event)
    assert len(data) > MEBIBYTE
    assert decode_all(*[data[i : i + 65_521] for i in range(0, len(data), 65_521)]) == [event]
