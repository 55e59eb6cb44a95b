"""The shared line splitter: lines across chunks, and its bound on an endless line."""

from __future__ import annotations

import pytest

from rbee.errors import NarrationError
from rbee.narration import jsonlines, sse
from rbee.narration._lines import LineSplitter


def test_lines_across_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.split("ab") == []
    assert splitter.split("c\nd") == ["abc"]
    assert splitter.split("\n\n") == ["d", ""]
    assert splitter.take_rest() == ""


def test_endless_line_raises_when_not_cutting() -> None:
    splitter = LineSplitter(max_line_chars=8)
    assert splitter.split("12345") == []
    with pytest.raises(NarrationError, match="longer than 8"):
        splitter.split("6789")
    # The splitter forgot the overlong line: it can go on with the next one.
    assert splitter.split("ok\n") == ["ok"]


def test_long_complete_line_raises_when_not_cutting() -> None:
    with pytest.raises(NarrationError):
        LineSplitter(max_line_chars=4).split("123456\n")


def test_cutting_hands_out_whole_pieces_and_keeps_the_rest() -> None:
    splitter = LineSplitter(max_line_chars=4, cut=True)
    assert splitter.split("123") == []
    assert splitter.split("4567890") == ["1234", "5678"]
    assert splitter.split("\nabcdefghij\nxy") == ["90", "abcd", "efgh", "ij"]
    assert splitter.take_rest() == "xy"


def test_sse_decoder_refuses_an_endless_line() -> None:
    decoder = sse.Decoder(max_line_chars=64)
    with pytest.raises(NarrationError):
        for _ in range(10):
            decoder.feed(b"data: " + b"x" * 20)


def test_jsonlines_decoder_keeps_every_character_of_an_endless_line() -> None:
    decoder = jsonlines.Decoder(max_line_chars=16, redact=False)
    events = decoder.feed(b"y" * 40) + decoder.feed(b"\n") + decoder.close()
    assert [e.action for e in events] == ["stdout"] * 3
    assert "".join(e.human for e in events) == "y" * 40
