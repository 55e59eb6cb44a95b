"""``QueenState``: everything the queen's routes need, built once by ``serve()``.

Its own module so that every file of routes (``app.py``, ``openai_api.py``) can name it
without importing another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import trio

from .asyncio_bridge import AsyncioBridge
from .hives import HiveManager
from .infer import InferJob
from .jobs import JobRegistry
from .metrics import QueenMetrics
from .nodes import NodeRegistry
from .scheduler import Scheduler


@dataclass
class QueenState:
    """Everything the routes need; built by ``serve()``."""

    nodes: NodeRegistry
    hives: HiveManager
    jobs: JobRegistry
    http: httpx.AsyncClient
    bridge: AsyncioBridge
    scheduler: Scheduler
    infer: InferJob
    metrics: QueenMetrics
    shutdown: trio.Event = field(default_factory=trio.Event)
    #: Set once a shutdown began: new jobs get 503 ``shutting_down``, running ones finish.
    draining: bool = False
    api_token: str | None = None
    ping_interval_s: float = 15.0
    #: When this queen started (``time.monotonic()``), for ``/health``'s ``uptime_s``.
    started: float = field(default_factory=time.monotonic)
