"""The JSON mapping shared by both wire forms (SSE and JSON lines).

``to_dict(event)`` gives the JSON object of an event, ``from_dict(obj)`` the event of a
JSON object, ``dumps(obj)`` / ``event_json(event)`` the UTF-8 bytes of one line of JSON and
``loads(text)`` the object of one. Rules:

- Every object carries ``"type"`` (the event class's wire name); ``"v"`` is the JSON-lines
  version marker and is ignored here.
- ``NarrationEvent.extra`` sits flat beside the named fields, so an extra key may not be a
  named field, ``"type"`` or ``"v"`` (``NarrationError`` on encode). Any key of a narration
  object that is not a named field is decoded into ``extra``.
- Fields that are ``None`` and default to ``None`` are left out; absent means ``None``.
- A known type with unknown keys keeps working (the keys are dropped: a newer producer may
  add fields); a known type missing a required key becomes ``UnknownEvent`` so nothing is
  lost. Value types are not checked.
- Strings are written with ``ensure_ascii=False`` (newlines and ``\\r`` are escaped, so a
  line stays one line). A string holding a lone surrogate has no UTF-8 form; such an
  object is written with ``\\uXXXX`` escapes instead, which is valid UTF-8 JSON and reads
  back to the very same string, so the round trip stays exact for every Python ``str``.
"""

from __future__ import annotations

import dataclasses
import json
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii
from json.scanner import make_scanner
from typing import Any, Callable, Mapping

from ..errors import NarrationError
from .events import (
    DONE,
    EVENT_TYPES,
    Done,
    Event,
    NarrationEvent,
    Token,
    UnknownEvent,
)

#: The named fields of a narration object, in wire order.
NARRATION_FIELDS: tuple[str, ...] = (
    "actor",
    "action",
    "target",
    "human",
    "cute",
    "story",
    "level",
    "job_id",
    "correlation_id",
    "worker_id",
    "node",
    "ts_ms",
)
_NARRATION_OPTIONAL = ("cute", "story", "job_id", "correlation_id", "worker_id", "node", "ts_ms")
_NARRATION_DEFAULTED = ("target", "human", "level") + _NARRATION_OPTIONAL

#: Keys that ``NarrationEvent.extra`` may not use (they would shadow a named field).
RESERVED_EXTRA_KEYS = frozenset(NARRATION_FIELDS) | {"type", "v"}
#: Keys that ``UnknownEvent.data`` may not use.
RESERVED_DATA_KEYS = frozenset({"type", "v"})


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_writer(escape_non_ascii: bool) -> Callable[[Any], str]:
    """obj -> compact JSON text, through the C encoder built once when there is one.

    ``json.dumps(obj, **options)`` builds a new encoder at every call, which costs more
    than the work itself for a token-sized object.
    """
    escape = encode_basestring_ascii if escape_non_ascii else encode_basestring
    if c_make_encoder is None:  # a Python without the _json accelerator (e.g. PyPy)
        encoder = json.JSONEncoder(
            ensure_ascii=escape_non_ascii, separators=(",", ":"), default=_not_json
        )
        return encoder.encode
    # markers=None: no cycle check (a cycle ends in RecursionError, which dumps() maps).
    c_encoder = c_make_encoder(None, _not_json, escape, None, ":", ",", False, False, True)
    return lambda obj: "".join(c_encoder(obj, 0))


_write_json = _json_writer(escape_non_ascii=False)
_write_ascii_json = _json_writer(escape_non_ascii=True)
# The scanner is what json.loads() calls after two layers of Python wrappers.
_scan_json = make_scanner(json.JSONDecoder())
_decode_json = json.JSONDecoder().decode


def _field_plan(cls: type) -> tuple[tuple[str, bool], ...]:
    """(name, leave out when None) for each dataclass field of ``cls``."""
    return tuple((f.name, f.default is None) for f in dataclasses.fields(cls))


# For the fixed-schema types (everything but narration and unknown).
_PLANS: dict[type, tuple[tuple[str, bool], ...]] = {
    cls: _field_plan(cls) for cls in EVENT_TYPES.values() if cls is not NarrationEvent
}
_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    cls.type: tuple(name for name, _ in plan) for cls, plan in _PLANS.items()
}


def to_dict(event: Event) -> dict[str, Any]:
    """The JSON object (a fresh dict) of ``event``; raises ``NarrationError`` if it has none."""
    cls = type(event)
    # Tokens are most of every stream: keep their path short.
    if cls is Token:
        return {"type": "token", "t": event.t, "i": event.i}
    if cls is NarrationEvent:
        return _narration_to_dict(event)
    plan = _PLANS.get(cls)
    if plan is not None:
        obj: dict[str, Any] = {"type": cls.type}
        for name, omit_none in plan:
            value = getattr(event, name)
            if value is None and omit_none:
                continue
            obj[name] = value
        return obj
    if cls is UnknownEvent:
        if not isinstance(event.type, str):
            raise NarrationError(f"UnknownEvent.type must be a str, not {event.type!r}")
        obj = {"type": event.type}
        for key, value in event.data.items():
            if not isinstance(key, str) or key in RESERVED_DATA_KEYS:
                raise NarrationError(f"UnknownEvent.data may not use the key {key!r}")
            obj[key] = value
        return obj
    if cls is Done:
        return {"type": Done.type}
    raise NarrationError(f"not a stream event: {event!r}")


def _narration_to_dict(event: NarrationEvent) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "narration",
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "human": event.human,
        "level": event.level,
    }
    for name in _NARRATION_OPTIONAL:
        value = getattr(event, name)
        if value is not None:
            obj[name] = value
    for key, value in event.extra.items():
        # A colliding key would silently overwrite a named field and break the round trip.
        if not isinstance(key, str) or key in RESERVED_EXTRA_KEYS:
            raise NarrationError(f"NarrationEvent.extra may not use the key {key!r}")
        obj[key] = value
    return obj


def from_dict(obj: Mapping[str, Any]) -> Event:
    """The event of the JSON object ``obj`` (not modified); ``obj["type"]`` must be a str."""
    return from_parsed(dict(obj))


def from_parsed(obj: dict[str, Any]) -> Event:
    """Like ``from_dict`` but may consume ``obj``: for dicts fresh from ``json.loads``."""
    kind = obj.get("type")
    if type(kind) is not str:
        raise NarrationError(f"a stream event needs a string 'type', got {kind!r}")
    if kind == "token":
        try:
            return Token(obj["t"], obj["i"])
        except KeyError:
            pass  # malformed: falls through to UnknownEvent below
    elif kind == "narration":
        return _narration_from_dict(obj)
    elif kind == "done":
        return DONE
    else:
        names = _FIELD_NAMES.get(kind)
        if names is not None:
            try:
                return EVENT_TYPES[kind](**{name: obj[name] for name in names if name in obj})
            except TypeError:
                pass  # a required field is missing: keep it whole as UnknownEvent
    del obj["type"]
    obj.pop("v", None)
    return UnknownEvent(kind, obj)


def _narration_from_dict(obj: dict[str, Any]) -> Event:
    del obj["type"]
    obj.pop("v", None)
    if "actor" not in obj or "action" not in obj:
        return UnknownEvent("narration", obj)
    actor = obj.pop("actor")
    action = obj.pop("action")
    named = {name: obj.pop(name) for name in _NARRATION_DEFAULTED if name in obj}
    return NarrationEvent(actor, action, **named, extra=obj)


def dumps(obj: dict[str, Any], head: str = "{") -> bytes:
    """One line of UTF-8 JSON for ``obj`` (no newline); lone surrogates become ``\\uXXXX``.

    ``head`` replaces the opening brace (the JSON-lines form puts ``{"v":1,`` there).
    """
    try:
        text = _write_json(obj)
    except (TypeError, ValueError, RecursionError) as exc:
        raise NarrationError(f"cannot encode as JSON: {exc}") from None
    try:
        return (head + text[1:]).encode("utf-8")
    except UnicodeEncodeError:
        # Only a lone surrogate gets here; the ASCII form escapes it and reads back exactly.
        return (head + _write_ascii_json(obj)[1:]).encode("utf-8")


def event_json(event: Event, head: str = "{") -> bytes:
    """``dumps(to_dict(event), head)``, with a short path for tokens (most of a stream)."""
    if type(event) is Token:
        t, i = event.t, event.i
        if type(t) is str and type(i) is int:
            text = f'{head}"type":"token","t":{encode_basestring(t)},"i":{int.__repr__(i)}}}'
            try:
                return text.encode("utf-8")
            except UnicodeEncodeError:
                pass  # a lone surrogate: the general path escapes it
    return dumps(to_dict(event), head)


def loads(text: str) -> Any:
    """Parse one JSON document; ``ValueError`` if it is not JSON (or nests too deep)."""
    try:
        obj, end = _scan_json(text, 0)
        if end == len(text):
            return obj
    except StopIteration:
        pass  # not JSON at index 0 (maybe leading space): the full parser decides
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    try:
        return _decode_json(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
