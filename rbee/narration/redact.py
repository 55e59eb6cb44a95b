"""Secrets are replaced by ``[REDACTED]`` before an event leaves the process.

``redact_text(s)`` applies the rules below, in this order (an earlier rule's
``[REDACTED]`` never feeds a later one a partial secret):

1. the values of the environment variables in ``SECRET_ENV_VARS`` (read at each call, so
   a token set later is covered), when at least ``MIN_ENV_SECRET_LEN`` characters long:
   shorter values would blank out ordinary words;
2. private key blocks, ``-----BEGIN ... PRIVATE KEY-----`` through
   ``-----END ... PRIVATE KEY-----`` (or through the end of the string when the END line
   is missing: a truncated key is still a key);
3. passwords in URLs: ``scheme://user:pass@host`` -> ``scheme://user:[REDACTED]@host``;
4. bearer tokens: ``Bearer <token>`` -> ``Bearer [REDACTED]`` (case-insensitive, up to
   the next space);
5. ``key=value`` where the key ends in ``api_key``/``api-key``/``apikey``, ``token``
   (``HF_TOKEN=``, ``access_token=``), ``secret`` or ``password``/``passwd``; the same with
   ``:`` except for ``token`` (so "first token: 22 ms" survives); ``--api-key VALUE``,
   ``--token VALUE``, ``--password VALUE``. The value runs to the next space, quote,
   ``&``, ``,`` or ``;`` (or is the quoted string);
6. Hugging Face tokens, ``hf_`` followed by at least 20 letters or digits.

``redact_event(event)`` applies them to every string field of any stream event, including
``NarrationEvent.extra`` and ``UnknownEvent.data``; a str value under an extra key that
names a secret (``api_key``, ``token``, ``password`` ...) is replaced whole. The patterns
avoid unbounded backtracking so that megabyte strings stay linear.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from .events import Done, Event, NarrationEvent, UnknownEvent

REDACTED = "[REDACTED]"
#: Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RBEE_API_TOKEN")
MIN_ENV_SECRET_LEN = 8

_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY-----|.*)", re.S
)
# Anchored on "://" rather than on the scheme: a scheme pattern would backtrack over every
# long run of letters.
_URL_PASSWORD = re.compile(r"(://[^\s/?#@:]*):[^\s/?#]*@")
_BEARER = re.compile(r"(bearer(?:[ \t]+bearer)*[ \t]+)\S+", re.I)
_VALUE = r"(?:\"[^\"\r\n]*\"?|'[^'\r\n]*'?|[^\s'\"&,;]+)"
_KEY_VALUE = re.compile(
    r"((?:api[_-]?key|token|secret|passw(?:or)?d)[\"']?[ \t]*=[ \t]*"
    r"|(?:api[_-]?key|secret|passw(?:or)?d)[\"']?[ \t]*:[ \t]*"
    r"|--(?:api[_-]?key|token|password)[ \t]+)" + _VALUE,
    re.I,
)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_SECRET_KEY_NAME = re.compile(
    r"(?:api[_-]?key|token|secret|passw(?:or)?d|authorization|credentials?)$", re.I
)


def _env_secrets() -> list[str]:
    values = (os.environ.get(name) for name in SECRET_ENV_VARS)
    # Longest first, so that a value containing another is replaced whole.
    return sorted({v for v in values if v and len(v) >= MIN_ENV_SECRET_LEN}, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with every secret the rules above recognise replaced by ``[REDACTED]``."""
    for secret in _env_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "PRIVATE KEY-----" in text:
        text = _PRIVATE_KEY.sub(REDACTED, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1:" + REDACTED + "@", text)
    text = _BEARER.sub(r"\1" + REDACTED, text)
    text = _KEY_VALUE.sub(r"\1" + REDACTED, text)
    if "hf_" in text:
        text = _HF_TOKEN.sub(REDACTED, text)
    return text


def is_secret_key(key: str) -> bool:
    """True if a field named ``key`` holds a secret by its name alone (``api_key``...)."""
    return bool(_SECRET_KEY_NAME.search(key))


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return _redact_mapping(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value


def _redact_mapping(mapping: Any) -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, str) and isinstance(key, str) and is_secret_key(key):
            out[key] = REDACTED
        else:
            out[key] = _redact_value(value)
    return out


def redact_event(event: Event) -> Event:
    """``event`` with its secrets redacted (the same object when it holds none)."""
    if type(event) is Done:
        return event
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, str):
            clean = redact_text(value)
        elif f.name in ("extra", "data") and isinstance(event, (NarrationEvent, UnknownEvent)):
            clean = _redact_mapping(value)
        else:
            continue
        if clean != value:
            changes[f.name] = clean
    return dataclasses.replace(event, **changes) if changes else event
