"""JSON-lines codec: byte tables, foreign lines, and properties of the round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.errors import NarrationError
from rbee.narration import jsonlines
from rbee.narration.events import DONE, NarrationEvent, Ready, Token, UnknownEvent

from .strategies import MEBIBYTE, chunked, events, huge_event_settings, huge_events, text


def decode_all(*chunks: bytes, **kwargs) -> list:
    decoder = jsonlines.Decoder(**kwargs)
    out = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out + decoder.close()


def stdout(line: str, actor: str = "stdout") -> NarrationEvent:
    return NarrationEvent(actor=actor, action="stdout", human=line)


def test_encode_table():
    assert jsonlines.encode(Token("a", 0)) == b'{"v":1,"type":"token","t":"a","i":0}\n'
    assert jsonlines.encode(Ready(url="http://127.0.0.1:9")) == (
        b'{"v":1,"type":"ready","url":"http://127.0.0.1:9"}\n'
    )
    assert jsonlines.encode(NarrationEvent("hive", "server_bind", extra={"port": 9})) == (
        b'{"v":1,"type":"narration","actor":"hive","action":"server_bind","target":"",'
        b'"human":"","level":"info","port":9}\n'
    )
    assert jsonlines.encode(DONE) == b'{"v":1,"type":"done"}\n'


TABLE = [
    (b'{"v":1,"type":"token","t":"a","i":0}\n', [Token("a", 0)]),
    # other key order and spacing are still ours; CRLF is a line end
    (b'{ "type": "token", "i": 0, "t": "a", "v": 1 }\r\n', [Token("a", 0)]),
    # a final line without a newline is flushed by close()
    (b'{"v":1,"type":"done"}', [DONE]),
    (b"plain text", [stdout("plain text")]),
    # what is not ours is kept whole, blank lines included
    (
        b"llama_model_load: 18 layers\n\nend\n",
        [stdout("llama_model_load: 18 layers"), stdout(""), stdout("end")],
    ),
    (b'{"type":"token","t":"a","i":0}\n', [stdout('{"type":"token","t":"a","i":0}')]),
    (b'{"v":2,"type":"token"}\n', [stdout('{"v":2,"type":"token"}')]),
    (b'{"v":true,"type":"token"}\n', [stdout('{"v":true,"type":"token"}')]),
    (b'{"v":1,"type":7}\n', [stdout('{"v":1,"type":7}')]),
    (b'{"v":1,"type":"done"} trailing\n', [stdout('{"v":1,"type":"done"} trailing')]),
    (b"[1,2]\n", [stdout("[1,2]")]),
    (b"{broken\n", [stdout("{broken")]),
    # ours, but a type this version does not know
    (b'{"v":1,"type":"later","x":[1]}\n', [UnknownEvent("later", {"x": [1]})]),
    # bytes that are not UTF-8 become U+FFFD
    (b"\xff ok\n", [stdout("\ufffd ok")]),
    (b"", []),
]


@pytest.mark.parametrize(("data", "expected"), TABLE)
def test_decode_table(data, expected):
    assert decode_all(data) == expected
    assert decode_all(*[data[i : i + 1] for i in range(len(data))]) == expected


def test_the_decoders_actor_names_foreign_lines():
    assert decode_all(b"hello\n", actor="llm-worker-rbee") == [stdout("hello", "llm-worker-rbee")]


def test_foreign_lines_are_redacted_unless_asked_not_to():
    data = (
        b"token is Bearer abc.def\n"
        b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
        b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
        b"-----END OPENSSH PRIVATE KEY-----\n"
        b"after\n"
    )
    assert decode_all(data) == [
        stdout("token is Bearer [REDACTED]"),
        stdout("[REDACTED]"),
        stdout("[REDACTED]"),
        stdout("[REDACTED]"),
        stdout("after"),
    ]
    assert decode_all(data, redact=False)[2] == stdout(
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"
    )


def test_lines_come_out_as_soon_as_they_end():
    decoder = jsonlines.Decoder()
    assert decoder.feed(b'{"v":1,"type":"to') == []
    assert decoder.feed(b'ken","t":"\xc3') == []
    assert decoder.feed(b'\xa9","i":1}\npartial') == [Token("\u00e9", 1)]
    assert decoder.close() == [stdout("partial")]
    assert decoder.close() == []
    with pytest.raises(NarrationError):
        decoder.feed(b"more\n")


def test_a_cut_utf8_character_at_the_end_is_kept_as_a_replacement_character():
    assert decode_all(b"abc\xc3") == [stdout("abc\ufffd")]


def test_a_one_mebibyte_field_survives():
    big = "line\nbreak\r\u00e9\U0001f41d" * (1 << 16)
    event = NarrationEvent("a", "b", human=big, extra={"k": big})
    data = jsonlines.encode(event)
    assert data.count(b"\n") == 1 and len(data) > 1 << 20
    assert decode_all(*[data[i : i + 65_537] for i in range(0, len(data), 65_537)]) == [event]


@settings(max_examples=200, deadline=None)
@given(events)
def test_round_trip_of_any_event(event):
    data = jsonlines.encode(event)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert decode_all(data) == [event]


# Foreign lines that do not look like JSON objects (a "{" line might be ours by chance).
foreign_lines = text.map(lambda s: s.replace("\n", " ").replace("\r", " ")).filter(
    lambda s: not s.startswith("{")
)


@settings(max_examples=150, deadline=None)
@given(st.lists(events | foreign_lines, max_size=6), st.booleans(), st.data())
def test_any_chunking_of_a_stream_with_foreign_lines_gives_the_same_events(items, crlf, data):
    end = b"\r\n" if crlf else b"\n"
    encoded = b"".join(
        (x.encode("utf-8", "surrogatepass") + end) if isinstance(x, str) else jsonlines.encode(x)
        for x in items
    )
    expected = [
        (
            stdout(x.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
            if isinstance(x, str)
            else x
        )
        for x in items
    ]
    assert decode_all(*data.draw(chunked(encoded)), redact=False) == expected


@huge_event_settings
@given(huge_events())
def test_round_trip_of_any_event_with_a_one_mebibyte_field(event):
    data = jsonlines.encode(event)
    assert len(data) > MEBIBYTE
    assert decode_all(*[data[i : i + 65_521] for i in range(0, len(data), 65_521)]) == [event]
