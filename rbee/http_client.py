"""The one way rbee builds an httpx client (keeper, client library, queen, hive, worker).

httpx's default TLS context loads the CA bundle when the client is built: 20-120 ms here,
which would be most of a warm job's time to first token. Our daemons talk plain HTTP on
loopback (or through an SSH forward), so a client for an ``http`` URL gets no TLS setup at
all; an ``https`` URL keeps httpx's checked default. Timeouts are off unless asked for:
callers bound their I/O with Trio's ``fail_after``/``move_on_after``.
"""

from __future__ import annotations

from typing import Any

# httpx imports its transport library lazily, when the first client is built: ~100 ms here,
# which then lands inside a command's first request (the keeper's time to first token).
# Loaded with httpx instead, while the program starts.
import httpcore  # noqa: F401
import httpx

#: What to pass as ``url`` for a client that only ever talks to our own daemons (hives,
#: workers): they speak plain HTTP.
OUR_DAEMONS = "http://127.0.0.1"


def tls_verify(url: str) -> bool:
    """httpx's ``verify`` for ``url``: checked certificates for https, no TLS setup for http."""
    return url.lower().startswith("https:")


def async_client(url: str, **options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for requests to ``url`` (and others of its scheme).

    ``options`` go to httpx (``base_url``, ``headers``, ...); ``timeout`` defaults to None.
    """
    options.setdefault("timeout", None)
    return httpx.AsyncClient(verify=tls_verify(url), **options)
