"""Server-sent events: rbee's stream events to bytes and back, with no I/O.

Writing: ``encode(event)`` gives ``event: <type>\\ndata: <one-line JSON with "type">\\n\\n``,
``encode_done()`` the end marker ``data: [DONE]\\n\\n``, ``encode_ping()`` the keep-alive
comment ``: ping\\n\\n``.

Reading: ``Decoder.feed(bytes)`` returns the events completed by those bytes, whatever the
chunking, following the WHATWG event-stream rules (https://html.spec.whatwg.org/multipage/
server-sent-events.html#event-stream-interpretation): a leading BOM is dropped; lines end
with LF, CRLF or CR (a CR at the end of one chunk and an LF at the start of the next are one
line end); ``field:value`` with one optional space after the colon; a line starting with
``:`` is a comment; a line without a colon is a field with an empty value; several
``data`` lines join with ``\\n``; an empty line dispatches; an event with no data is not
dispatched; ``id`` (without NUL) and ``retry`` (ASCII digits) are kept on the decoder.

A dispatched data payload becomes:
- ``DONE`` for ``[DONE]``;
- the typed event of a JSON object with a string ``"type"`` (the JSON type wins over the
  ``event:`` name, which is only a hint for readers that do not parse the JSON);
- otherwise (another server's SSE) ``UnknownEvent(type=<event name or "message">,
  data={"data": <the raw payload>})``.
"""

from __future__ import annotations

import codecs

from ..errors import NarrationError
from .events import DONE, Done, Event, UnknownEvent
from ._lines import MAX_LINE_CHARS, LineSplitter
from .wire import event_json, from_parsed, loads

_DONE_BYTES = b"data: [DONE]\n\n"
_PING_BYTES = b": ping\n\n"
# "event: <name>\ndata: " for each name seen, so encode() joins three pieces per event.
_prefixes: dict[str, bytes] = {}


def encode_done() -> bytes:
    """The end-of-stream marker, ``data: [DONE]\\n\\n``."""
    return _DONE_BYTES


def encode_ping() -> bytes:
    """A keep-alive comment, ``: ping\\n\\n`` (readers ignore it)."""
    return _PING_BYTES


def encode(event: Event) -> bytes:
    """The SSE bytes of one event (``DONE`` gives ``data: [DONE]\\n\\n``)."""
    if type(event) is Done:
        return _DONE_BYTES
    payload = event_json(event)
    name = event.type
    prefix = _prefixes.get(name)
    if prefix is None:
        prefix = _event_prefix(name)
    return prefix + payload + b"\n\n"


def _event_prefix(name: str) -> bytes:
    # A name that would break the line (or has no UTF-8 form) is left out: the JSON
    # carries the type anyway, and "event:" is only a hint for foreign readers.
    if not isinstance(name, str) or "\n" in name or "\r" in name:
        return b"data: "
    try:
        prefix = b"event: " + name.encode("utf-8") + b"\ndata: "
    except UnicodeEncodeError:
        return b"data: "
    if len(_prefixes) < 256:  # names of UnknownEvents are unbounded: cache a few only
        _prefixes[name] = prefix
    return prefix


def payload_to_event(data: str, name: str) -> Event:
    """The event for one dispatched SSE ``data`` payload with event name ``name``."""
    if data == "[DONE]":
        return DONE
    if data[:1] == "{":
        try:
            obj = loads(data)
        except ValueError:
            obj = None
        if type(obj) is dict and type(obj.get("type")) is str:
            return from_parsed(obj)
    return UnknownEvent(name or "message", {"data": data})


class Decoder:
    """Incremental SSE reader: ``feed(bytes) -> list`` of events, then ``close()``.

    ``last_event_id`` and ``retry_ms`` hold the last ``id:`` and ``retry:`` values seen
    (``None`` until one arrives); they are stream state, not part of any event.
    """

    def __init__(self, *, max_line_chars: int = MAX_LINE_CHARS) -> None:
        # utf-8-sig drops one leading BOM even when it arrives split over chunks;
        # "replace" because a foreign server may send bytes that are not UTF-8.
        self._text = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        # An endless line raises NarrationError rather than growing without bound.
        self._lines = LineSplitter(max_line_chars=max_line_chars)
        self._skip_lf = False  # the previous chunk ended with CR: an LF now is its pair
        self._data: list[str] = []
        self._name = ""
        self._fields_seen = False  # a field line since the last dispatch
        self._closed = False
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes of the stream; return the events they complete."""
        if self._closed:
            raise NarrationError("SSE decoder fed after close()")
        text = self._text.decode(data)
        if not text:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if "\r" in text:
            # A CR ends a line at once; if the next chunk starts with LF it belongs to it.
            self._skip_lf = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return self._take_lines(self._lines.split(text))

    def _take_lines(self, lines: list[str]) -> list[Event]:
        events: list[Event] = []
        data = self._data
        # Locals in the loop: this runs three times per event on every stream.
        name, seen = self._name, self._fields_seen
        for line in lines:
            if not line:
                if seen:
                    if data:
                        events.append(payload_to_event("\n".join(data), name))
                        data.clear()
                    name, seen = "", False
            elif line[:6] == "data: ":
                data.append(line[6:])
                seen = True
            elif line[:7] == "event: ":
                name, seen = line[7:], True
            elif line[0] == ":":
                continue  # a comment (keep-alive)
            else:
                self._name, self._fields_seen = name, seen
                self._take_field(line)
                name, seen = self._name, self._fields_seen
        self._name, self._fields_seen = name, seen
        return events

    def _take_field(self, line: str) -> None:
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        self._fields_seen = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._name = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        # Any other field name is ignored, as the standard says.

    def close(self) -> list[Event]:
        """End of stream: raises ``NarrationError`` if it stopped inside an event.

        Returns an empty list (an event is only complete at its blank line, so nothing is
        left to give), which keeps ``events += decoder.close()`` symmetric with
        ``jsonlines.Decoder``.
        """
        if self._closed:
            return []
        self._closed = True
        cut = self._lines.take_rest() + self._text.decode(b"", final=True)
        if cut:
            raise NarrationError(f"SSE stream ended in the middle of a line: {cut[:80]!r}")
        if self._fields_seen:
            raise NarrationError("SSE stream ended inside an event (no blank line after it)")
        return []
