"""The hive's bearer token: where it comes from, and the constant-time check.

With a token configured (``--token-file`` or ``RBEE_API_TOKEN``), every route but health
needs ``Authorization: Bearer <token>``. The ready callback is the one other exception:
it carries the key the hive minted for that worker instead (checked in ``workers``).
A token is never narrated or logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AuthError
from ..http_common import check_bearer
from ..openapi import OPENAPI_PATH

#: Routes anyone may call: health, and the OpenAPI document (it holds nothing secret).
OPEN_PATHS = frozenset({"/v1/health", "/health", OPENAPI_PATH})
#: Routes that authenticate with a worker's own key rather than the hive token.
WORKER_KEY_PATHS = frozenset({"/v1/workers/ready"})


def load_token(token_file: Path | None) -> str | None:
    """The token from ``token_file`` (first line, stripped), else ``RBEE_API_TOKEN``, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise AuthError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise AuthError(f"the token file {token_file} is empty")
        return token
    return os.environ.get("RBEE_API_TOKEN") or None


def check_request(path: str, header: str | None, token: str | None) -> None:
    """``AuthError`` unless ``path`` is open or ``header`` carries the token."""
    if token is None or path in OPEN_PATHS or path in WORKER_KEY_PATHS:
        return
    check_bearer(token, header, hint="the hive's RBEE_API_TOKEN or --token-file")
