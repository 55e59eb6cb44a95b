"""JSON lines: rbee's stream events as one JSON object per line, with no I/O.

This is how a program narrates on stdout before its HTTP server is up (and how its parent
reads it). ``encode(event)`` gives ``{"v":1,"type":...}\\n``. ``Decoder.feed(bytes)``
returns the events of the complete lines so far; ``close()`` flushes a last line that has
no newline. A line that is not one of our objects (anything but a JSON object with
``"v": 1`` and a string ``"type"``) is kept as
``NarrationEvent(actor=<decoder's actor>, action="stdout", human=<the line>)``: nothing a
child prints is lost. A CRLF line end counts as LF; bytes that are not UTF-8 are read with
U+FFFD in their place. Secrets in such foreign lines are redacted (``redact=False`` keeps
them verbatim), because they are on their way out of the process.
"""

from __future__ import annotations

import codecs

from ..errors import NarrationError
from .events import Event, NarrationEvent
from .redact import redact_text
from ._lines import MAX_LINE_CHARS, LineSplitter
from .wire import event_json, from_parsed, loads

VERSION = 1
_HEAD = '{"v":%d,' % VERSION


def encode(event: Event) -> bytes:
    """One JSON line, ``{"v":1,"type":...}\\n``, for ``event``."""
    return event_json(event, _HEAD) + b"\n"


class Decoder:
    """Incremental JSON-lines reader; foreign lines become ``action="stdout"`` narration."""

    def __init__(self, actor: str = "stdout", *, redact: bool = True,
                 max_line_chars: int = MAX_LINE_CHARS) -> None:
        self.actor = actor
        self.redact = redact
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Cut, never refuse, an endless line: nothing a child prints may be lost.
        self._lines = LineSplitter(max_line_chars=max_line_chars, cut=True)
        self._in_key_block = False  # inside a private key block spread over lines
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes; return the events of the lines they complete."""
        if self._closed:
            raise NarrationError("JSON-lines decoder fed after close()")
        return [self._line_to_event(line) for line in self._lines.split(self._text.decode(data))]

    def close(self) -> list[Event]:
        """End of stream: the event of a last line without a newline, if any."""
        if self._closed:
            return []
        self._closed = True
        line = self._lines.take_rest() + self._text.decode(b"", final=True)
        return [self._line_to_event(line)] if line else []

    def _line_to_event(self, line: str) -> Event:
        if line[-1:] == "\r":
            line = line[:-1]
        # Only a line starting with "{" can be ours (any key order or spacing is accepted).
        if line[:1] == "{":
            try:
                obj = loads(line)
            except ValueError:
                obj = None
            if (
                type(obj) is dict
                and type(obj.get("v")) is int
                and obj["v"] == VERSION
                and type(obj.get("type")) is str
            ):
                return from_parsed(obj)
        return self._foreign(line)

    def _foreign(self, line: str) -> NarrationEvent:
        if self.redact:
            line = self._redact_line(line)
        return NarrationEvent(actor=self.actor, action="stdout", human=line)

    def _redact_line(self, line: str) -> str:
        # A private key printed line by line never has BEGIN and END on one line: hide
        # every line from BEGIN to END.
        if self._in_key_block:
            if "PRIVATE KEY-----" in line and "-----END" in line:
                self._in_key_block = False
            return "[REDACTED]"
        if "-----BEGIN" in line and "PRIVATE KEY-----" in line and "-----END" not in line:
            self._in_key_block = True
        return redact_text(line)
