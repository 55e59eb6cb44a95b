"""The shared JSON mapping: to_dict / from_dict / dumps / loads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from rbee.errors import NarrationError
from rbee.narration import wire
from rbee.narration.events import (
    DONE,
    End,
    Error,
    Loading,
    NarrationEvent,
    Ready,
    Started,
    Token,
    UnknownEvent,
)

from .strategies import events


@settings(max_examples=300, deadline=None)
@given(events)
def test_dict_round_trip_is_exact(event):
    assert wire.from_dict(wire.to_dict(event)) == event


@settings(max_examples=300, deadline=None)
@given(events)
def test_event_json_is_one_valid_utf8_line_that_reads_back(event):
    data = wire.event_json(event)
    text = data.decode("utf-8")  # strict: always valid UTF-8, even with lone surrogates
    assert "\n" not in text and "\r" not in text
    assert wire.from_parsed(json.loads(text)) == event


def test_narration_extra_sits_flat_and_none_fields_are_left_out():
    event = NarrationEvent("hive", "spawn", target="w1", human="Spawning", extra={"port": 9300})
    assert wire.to_dict(event) == {
        "type": "narration",
        "actor": "hive",
        "action": "spawn",
        "target": "w1",
        "human": "Spawning",
        "level": "info",
        "port": 9300,
    }
    assert wire.to_dict(Started(job_id="j")) == {"type": "started", "job_id": "j"}


def test_token_short_path_matches_the_general_path():
    token = Token('a\n"é🐝', 7)
    assert wire.event_json(token) == wire.dumps(wire.to_dict(token))
    assert (
        wire.event_json(token, '{"v":1,')
        == b'{"v":1,"type":"token","t":"a\\n\\"\xc3\xa9\xf0\x9f\x90\x9d","i":7}'
    )


@pytest.mark.parametrize("key", ["actor", "job_id", "ts_ms", "type", "v", 3])
def test_extra_may_not_shadow_a_named_field(key):
    with pytest.raises(NarrationError):
        wire.to_dict(NarrationEvent("a", "b", extra={key: 1}))


@pytest.mark.parametrize("key", ["type", "v"])
def test_unknown_event_data_may_not_use_reserved_keys(key):
    with pytest.raises(NarrationError):
        wire.to_dict(UnknownEvent("zz", {key: 1}))


def test_unknown_keys_of_narration_become_extra():
    obj = {"type": "narration", "v": 1, "actor": "a", "action": "b", "speed": 2.5, "extra": "x"}
    assert wire.from_dict(obj) == NarrationEvent("a", "b", extra={"speed": 2.5, "extra": "x"})
    assert obj["type"] == "narration", "from_dict must not modify its argument"


def test_unknown_keys_of_fixed_types_are_dropped_for_forward_compatibility():
    assert wire.from_dict({"type": "token", "t": "x", "i": 1, "logprob": -0.5}) == Token("x", 1)
    assert wire.from_dict({"type": "ready", "future": True}) == Ready()


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "token", "t": "x"}, UnknownEvent("token", {"t": "x"})),
        ({"type": "end", "tokens_out": 1}, UnknownEvent("end", {"tokens_out": 1})),
        ({"type": "error", "v": 1, "code": "c"}, UnknownEvent("error", {"code": "c"})),
        ({"type": "narration", "actor": "a"}, UnknownEvent("narration", {"actor": "a"})),
        ({"type": "later", "a": [1]}, UnknownEvent("later", {"a": [1]})),
        ({"type": "done"}, DONE),
        ({"type": "loading", "stage": "s"}, Loading(stage="s")),
        ({"type": "error", "code": "c", "message": "m"}, Error("c", "m")),
        (
            {
                "type": "end",
                "tokens_out": 1,
                "decode_time_ms": 2,
                "tokens_per_sec": 3.5,
                "stop_reason": "eos",
            },
            End(1, 2, 3.5, "eos"),
        ),
    ],
)
def test_from_dict_table(obj, expected):
    assert wire.from_dict(obj) == expected


@pytest.mark.parametrize("obj", [{}, {"type": 3}, {"type": None}])
def test_from_dict_needs_a_string_type(obj):
    with pytest.raises(NarrationError):
        wire.from_dict(obj)


def test_lone_surrogates_are_escaped_and_read_back_exactly():
    token = Token("a\ud800b", 0)
    data = wire.event_json(token)
    assert data == b'{"type":"token","t":"a\\ud800b","i":0}'
    assert wire.from_parsed(wire.loads(data.decode("utf-8"))) == token


def test_dumps_refuses_what_json_cannot_hold():
    with pytest.raises(NarrationError):
        wire.dumps({"type": "narration", "x": object()})


@pytest.mark.parametrize("text", ["", "nope", "{", '{"a":1} x', "[" * 100_000])
def test_loads_raises_value_error_for_non_json(text):
    with pytest.raises(ValueError):
        wire.loads(text)


def test_loads_accepts_surrounding_whitespace_like_json_loads():
    assert wire.loads(' {"a": 1} \n') == {"a": 1}


def test_one_mebibyte_fields_round_trip():
    big = "x\n\r\u00e9\U0001f41d" * (1 << 18)  # 1 Mi characters, several MiB of UTF-8
    for candidate in (
        NarrationEvent("a", "b", human=big, extra={"blob": big}),
        Token(big, 0),
        Error("big", big),
    ):
        assert wire.from_parsed(json.loads(wire.event_json(candidate))) == candidate
