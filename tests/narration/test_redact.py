"""Redaction: the rules as a table, secrets in any field never reach the wire, linear time."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rbee.narration import jsonlines, sse
from rbee.narration.events import Error, NarrationEvent, Token, UnknownEvent
from rbee.narration.redact import redact_event, redact_text

from .strategies import ENV_SECRET, events, secrets, text

KEY_BLOCK = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA1c2V0\nZm9vYmFy\n"
    "-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Authorization: Bearer eyJhbGciOi.J9.x-y_z", "Authorization: Bearer [REDACTED]"),
        ("bearer abc then more", "bearer [REDACTED] then more"),
        ("Bearer Bearer abc", "Bearer Bearer [REDACTED]"),
        ("GET /x?api_key=s3cr3t&q=1", "GET /x?api_key=[REDACTED]&q=1"),
        ("API-KEY: s3cr3t", "API-KEY: [REDACTED]"),
        ('{"api_key": "s3 cr3t"}', '{"api_key": [REDACTED]}'),
        (
            "llm-worker-rbee --api-key s3cr3t --port 0",
            "llm-worker-rbee --api-key [REDACTED] --port 0",
        ),
        ("HF_TOKEN=hf_abc export", "HF_TOKEN=[REDACTED] export"),
        ("HF_TOKEN = 'quoted value'", "HF_TOKEN = [REDACTED]"),
        ("access_token=abc;x", "access_token=[REDACTED];x"),
        ("password: hunter2", "password: [REDACTED]"),
        ("token hf_0123456789abcdefghijKLMNOPQRS in text", "token [REDACTED] in text"),
        ("before\n" + KEY_BLOCK + "\nafter", "before\n[REDACTED]\nafter"),
        ("-----BEGIN PRIVATE KEY-----\nMIIE (cut)", "[REDACTED]"),
        ("https://alice:pa55@example.org/x", "https://alice:[REDACTED]@example.org/x"),
        ("ssh://:p@ss@host:22", "ssh://:[REDACTED]@host:22"),
        (
            "redis://u:p@h and git+ssh://x:y@z",
            "redis://u:[REDACTED]@h and git+ssh://x:[REDACTED]@z",
        ),
        # ordinary narration stays as it is
        ("time to first token: 22 ms", "time to first token: 22 ms"),
        ("tokens_out=5 tokens_per_sec=44.1", "tokens_out=5 tokens_per_sec=44.1"),
        ("uses hf_transfer and hf_hub_download", "uses hf_transfer and hf_hub_download"),
        ("http://127.0.0.1:8080/v1/jobs", "http://127.0.0.1:8080/v1/jobs"),
        ("user@host:~/models", "user@host:~/models"),
        ("", ""),
    ],
)
def test_rules_table(raw, clean):
    assert redact_text(raw) == clean


def test_env_var_values_are_redacted_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-very-own-token-42")
    monkeypatch.setenv("RBEE_API_TOKEN", "short")  # under 8 characters: would blank words
    assert redact_text("x my-very-own-token-42 y short") == "x [REDACTED] y short"
    monkeypatch.delenv("HF_TOKEN")
    assert redact_text("x my-very-own-token-42") == "x my-very-own-token-42"


def test_extra_values_under_secret_names_are_redacted_whole():
    event = NarrationEvent(
        "a", "b", extra={"api_key": "plain", "hf_token": "x", "tokens_out": 5, "note": "ok"}
    )
    assert redact_event(event).extra == {
        "api_key": "[REDACTED]",
        "hf_token": "[REDACTED]",
        "tokens_out": 5,
        "note": "ok",
    }


def test_every_event_type_and_nested_unknown_data_are_redacted():
    assert redact_event(Error("e", "failed with Bearer abc")) == Error(
        "e", "failed with Bearer [REDACTED]"
    )
    assert redact_event(
        UnknownEvent("x", {"a": ["Bearer abc", {"password": "p"}]})
    ) == UnknownEvent("x", {"a": ["Bearer [REDACTED]", {"password": "[REDACTED]"}]})
    token = Token("clean", 0)
    assert redact_event(token) is token, "nothing to redact: the same object"


@pytest.mark.parametrize(
    "raw",
    [
        "a" * (1 << 20),
        "://" + "a" * (1 << 20),
        "a" * (1 << 20) + "://x:",
        "bearer " * (1 << 17),
        "api_key=" * (1 << 17),
        "-----BEGIN RSA PRIVATE KEY-----" * (1 << 14),
        "hf_" * (1 << 18),
        "x:" * (1 << 19),
    ],
    ids=["letters", "scheme", "no-at", "bearers", "keys", "begins", "hf", "colons"],
)
def test_megabyte_strings_take_linear_time(raw):
    start = time.perf_counter()
    redact_text(raw)
    # Quadratic backtracking on a MiB would take minutes; linear takes milliseconds.
    assert time.perf_counter() - start < 2.0


# --- property: a secret placed in any field never reaches the encoded bytes ----------------


def place(event, secret_text: str, where: int, prefix: str, suffix: str):
    """``event`` with ``prefix + secret_text + suffix`` in one of its string fields."""
    # Separators around the secret: arbitrary text glued to it could extend a token
    # (which only redacts more) but must not be needed to find it.
    value = f"{prefix} {secret_text} {suffix}"
    if isinstance(event, NarrationEvent):
        names = ["actor", "action", "target", "human", "cute", "story", "job_id", "node", "extra"]
    elif isinstance(event, UnknownEvent):
        names = ["data"]
    else:
        names = [f.name for f in dataclasses.fields(event) if f.type in ("str", "str | None")]
    if not names:
        return Error("e", value)
    name = names[where % len(names)]
    if name == "extra":
        return dataclasses.replace(event, extra={**event.extra, "note": value})
    if name == "data":
        return dataclasses.replace(event, data={**event.data, "note": [value]})
    return dataclasses.replace(event, **{name: value})


@settings(max_examples=300, deadline=None)
@given(events, secrets(), st.integers(0, 20), text, text)
def test_a_secret_in_any_field_never_reaches_the_wire(
    monkeypatch_env, event, secret, where, prefix, suffix
):
    secret_text, secret_value = secret
    # Hypothesis likes to reuse a drawn string elsewhere: that copy is not a secret.
    assume(not any(secret_value in s for s in (prefix, suffix, repr(event))))
    leaky = place(event, secret_text, where, prefix, suffix)
    clean = redact_event(leaky)
    needle = secret_value.encode("utf-8")
    assert needle not in sse.encode(clean)
    assert needle not in jsonlines.encode(clean)
    assert secret_value not in repr(clean)


@pytest.fixture(scope="module")
def monkeypatch_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBEE_API_TOKEN", ENV_SECRET)
        yield


@settings(max_examples=500, deadline=None)
@given(secrets(), text, text)
def test_a_secret_glued_to_arbitrary_text_is_still_found(monkeypatch_env, secret, prefix, suffix):
    secret_text, secret_value = secret
    assume(secret_value not in prefix and secret_value not in suffix)
    assert secret_value not in redact_text(prefix + secret_text + suffix)
