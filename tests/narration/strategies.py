"""Hypothesis strategies for arbitrary stream events of every type (shared by the tests)."""

from __future__ import annotations

import dataclasses
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from rbee.narration.events import (
    DONE,
    EVENT_TYPES,
    LEVELS,
    End,
    Error,
    Loading,
    Metrics,
    Prefill,
    NarrationEvent,
    Ready,
    Started,
    Token,
    UnknownEvent,
    WorkerChange,
)
from rbee.narration.wire import RESERVED_DATA_KEYS, RESERVED_EXTRA_KEYS

# Pieces that break naive SSE / JSON-lines handling when they sit inside a string.
TRICKY = (
    "[DONE]",
    "data: [DONE]",
    "data:",
    "event: token",
    ": ping",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\r",
    "\ufeff",
    '{"v":1,"type":"token","t":"x","i":0}',
    '"',
    "\\",
    "\x00",
    "\u2028",
    "é",
    "🐝",
    "\ud800",  # lone surrogates: no UTF-8 form, escaped as \uXXXX on the wire
    "\udfff",
)

any_char = st.one_of(
    st.characters(exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
)
_SURROGATE_PAIR = re.compile("([\ud800-\udbff])(?=[\udc00-\udfff])")


def split_surrogate_pairs(s: str) -> str:
    """``s`` with an "x" between a high and a low surrogate.

    JSON's ``\\uXXXX`` escapes are UTF-16: ``\\ud800\\udc00`` *is* U+10000, so a Python
    str holding those two code points reads back as the one character. That is the one str
    the wire cannot keep (docs/narration.md); every other string, lone surrogates
    included, round-trips exactly.
    """
    return _SURROGATE_PAIR.sub(r"\1x", s)


text = st.one_of(
    st.text(any_char, max_size=40),
    st.lists(st.one_of(st.sampled_from(TRICKY), st.text(any_char, max_size=8)), max_size=8).map(
        "".join
    ),
).map(split_surrogate_pairs)
opt_text = st.none() | text
ints = st.integers(min_value=-(2**63), max_value=2**64)
opt_ints = st.none() | ints
floats = st.floats(allow_nan=False)
scalar = st.none() | st.booleans() | ints | floats | text

extra_key = text.filter(lambda k: k not in RESERVED_EXTRA_KEYS)
data_key = text.filter(lambda k: k not in RESERVED_DATA_KEYS)
json_value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
unknown_type = text.filter(lambda t: t not in EVENT_TYPES and t != "done")

WORKER_CHANGES = ("present", "spawned", "ready", "capacity", "exited")
WORKER_STATES = ("loading", "idle", "busy", "full", "stopping", "exited")

narration_events = st.builds(
    NarrationEvent,
    actor=text,
    action=text,
    target=text,
    human=text,
    cute=opt_text,
    story=opt_text,
    level=st.sampled_from(LEVELS) | text,
    job_id=opt_text,
    correlation_id=opt_text,
    worker_id=opt_text,
    node=opt_text,
    ts_ms=opt_ints,
    extra=st.dictionaries(extra_key, scalar, max_size=4),
)

events = st.one_of(
    narration_events,
    st.builds(Started, job_id=opt_text, worker_id=opt_text, model=opt_text, ts_ms=opt_ints),
    st.builds(Token, t=text, i=ints),
    st.builds(Prefill, tokens_done=ints, tokens_total=ints),
    st.builds(Metrics, ints, ints, floats, floats, floats, floats),
    st.builds(
        End, tokens_out=ints, decode_time_ms=floats, tokens_per_sec=floats, stop_reason=text
    ),
    st.builds(Error, code=text, message=text),
    st.builds(
        Loading,
        stage=text,
        layers_done=opt_ints,
        layers_total=opt_ints,
        bytes_done=opt_ints,
        bytes_total=opt_ints,
    ),
    st.builds(Ready, worker_id=opt_text, url=opt_text),
    st.builds(
        WorkerChange,
        change=st.sampled_from(WORKER_CHANGES) | text,
        worker_id=text,
        state=st.sampled_from(WORKER_STATES) | text,
        model_ref=text,
        sha256=opt_text,
        backend=text,
        device=ints,
        url=text,
        api_key=opt_text,
        pid=opt_ints,
        ctx_size=opt_ints,
        slots_total=ints,
        slots_busy=ints,
        memory_bytes=ints,
        idle_timeout_s=floats,
        reason=opt_text,
        exit_code=opt_ints,
        ts_ms=opt_ints,
    ),
    st.builds(
        UnknownEvent, type=unknown_type, data=st.dictionaries(data_key, json_value, max_size=3)
    ),
    st.just(DONE),
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (possibly inside a UTF-8 character or a CRLF)."""
    if not data:
        return [b""]
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=12)))
    pieces, start = [], 0
    for cut in cuts + [len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces


# --- secrets, for the redaction properties ------------------------------------------------

# Secrets long enough that finding one by chance elsewhere in an event is impossible.
token_chars = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/",
    min_size=12,
    max_size=30,
)
alnum = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=20, max_size=40
)
#: The tests that use ``secrets()`` set RBEE_API_TOKEN to this value.
ENV_SECRET = "env-secret-value-1234"


@st.composite
def secrets(draw: st.DrawFn) -> tuple[str, str]:
    """(the text to place in a field, the secret part that must not leak)."""
    kind = draw(st.sampled_from(["bearer", "api_key", "hf_env", "hf_token", "key", "url", "env"]))
    if kind == "bearer":
        value = draw(token_chars)
        return (
            draw(st.sampled_from(["Bearer ", "bearer\t", "Authorization: Bearer "])) + value,
            value,
        )
    if kind == "api_key":
        value = "k" + draw(token_chars)
        return (
            draw(st.sampled_from(["api_key=", "api-key: ", "--api-key ", "apikey = "])) + value,
            value,
        )
    if kind == "hf_env":
        value = "v" + draw(token_chars)
        return "HF_TOKEN=" + value, value
    if kind == "hf_token":
        value = "hf_" + draw(alnum)
        return value, value
    if kind == "key":
        body = draw(alnum)
        return f"-----BEGIN EC PRIVATE KEY-----\n{body}\n-----END EC PRIVATE KEY-----", body
    if kind == "url":
        password = "p" + draw(token_chars).replace("/", "")
        return f"https://user:{password}@example.org/", password
    return ENV_SECRET, ENV_SECRET


MEBIBYTE = 1 << 20

#: Hypothesis settings for tests drawing ``huge_events``: few examples (each is over a
#: mebibyte), no deadline, and the size health checks off since the size is the point.
huge_event_settings = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def huge_events(draw: st.DrawFn):
    """An arbitrary event with one of its string fields grown to at least 1 Mi characters."""
    event = draw(events.filter(lambda e: e is not DONE))
    grow = lambda s: (s or "x") * (MEBIBYTE // max(1, len(s or "x")) + 1)  # noqa: E731
    if isinstance(event, UnknownEvent):
        return UnknownEvent(event.type, {**event.data, "blob": grow(draw(text))})
    names = [f.name for f in dataclasses.fields(event) if isinstance(getattr(event, f.name), str)]
    if isinstance(event, NarrationEvent):
        names.append("extra")
    if not names:  # Metrics has no string field: a token then
        return Token(grow(draw(text)), 0)
    name = draw(st.sampled_from(names))
    if name == "extra":
        return dataclasses.replace(event, extra={**event.extra, "blob": grow(draw(text))})
    return dataclasses.replace(event, **{name: grow(getattr(event, name))})
