"""How one ``rbee-hive`` runs: ``HiveConfig``, built by the CLI or a test, read by ``serve``."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

SECONDS = 1.0
ACTOR = "rbee-hive"
IDLE_TIMEOUT_ENV = "RBEE_WORKER_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT_S = 300 * SECONDS
WORKER_PARALLEL_ENV = "RBEE_WORKER_PARALLEL"
#: Slots (streams served at once) of a worker whose spawn request does not say (``parallel``).
DEFAULT_WORKER_PARALLEL = 4


def default_worker_command() -> list[str]:
    """``llm-worker-rbee`` beside our interpreter (a virtualenv's bin/), else on PATH."""
    sibling = Path(sys.executable).parent / "llm-worker-rbee"
    if sibling.exists():
        return [str(sibling)]
    return [shutil.which("llm-worker-rbee") or "llm-worker-rbee"]


def idle_timeout_from_env() -> float:
    """``RBEE_WORKER_IDLE_TIMEOUT`` in seconds (default 300; 0 or less: never)."""
    raw = os.environ.get(IDLE_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_IDLE_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{IDLE_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def check_parallel(value: object, where: str) -> int:
    """``value`` as a number of slots (an integer >= 1); ``ValueError`` naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an integer >= 1 (slots per worker), not {value!r}")
    return value


def worker_parallel_from_env() -> int:
    """``RBEE_WORKER_PARALLEL``: slots per worker when a spawn does not say (default 4)."""
    raw = os.environ.get(WORKER_PARALLEL_ENV)
    if not raw:
        return DEFAULT_WORKER_PARALLEL
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{WORKER_PARALLEL_ENV}={raw!r} is not an integer >= 1 (slots per worker)")
    return value


@dataclass
class HiveConfig:
    """Everything a hive needs; ``port=0`` picks a free port (announced by ``server_bind``)."""

    host: str = "127.0.0.1"
    port: int = 9200
    #: Bearer token every route but health needs; None: RBEE_API_TOKEN, if set.
    api_token: str | None = None
    #: Shut down on EOF of standard input (the SSH session or parent that started us left).
    watch_stdin: bool = False
    #: With ``watch_stdin``: shut down when nothing (the queen's heartbeat lines) arrives on
    #: standard input for this long; 0: only EOF counts. A node cut off the network gets no
    #: EOF for minutes (sshd keeps a dead session open), so a remote hive needs this.
    heartbeat_timeout_s: float = 0.0
    #: Stop a live hive recorded in ``$RBEE_HOME/run/hive.pid`` before starting: one that a
    #: queen which lost this node left running (the queen asks for it over SSH).
    replace_stale: bool = False
    #: SIGTERM/SIGINT start a graceful shutdown (the CLI sets it).
    handle_signals: bool = False
    idle_timeout_s: float = field(default_factory=idle_timeout_from_env)
    #: ``--parallel`` of a spawned worker whose spawn request has no ``parallel``.
    worker_parallel: int = field(default_factory=worker_parallel_from_env)
    worker_command: list[str] = field(default_factory=default_worker_command)
    #: The address workers bind (the hive and, through it or an SSH forward, the queen reach them).
    worker_host: str = "127.0.0.1"
    #: How long a worker gets after ``POST /v1/shutdown`` before SIGTERM, and after SIGTERM before SIGKILL.
    stop_grace_s: float = 5 * SECONDS
    kill_grace_s: float = 3 * SECONDS
    #: How often the hive asks a serving worker how many of its slots are busy (for the idle timeout).
    state_poll_s: float = 1 * SECONDS
    ping_interval_s: float = 15 * SECONDS

    def __post_init__(self) -> None:
        check_parallel(self.worker_parallel, "--worker-parallel")
