"""Narration as this worker: ``Narrator(worker_id)("model_load", "Loading ...")``.

Fills ``actor="llm-worker-rbee"`` and ``worker_id`` on every event. Where an event goes
is decided by ``rbee.narration.narrate`` from the context: inside a request's
``narration_context`` it goes into that request's SSE stream, elsewhere to stdout as a
JSON line for the parent (the hive) to relay.
"""

from __future__ import annotations

from ..narration import NarrationEvent, narrate
from ..narration.events import ExtraValue
from .config import ACTOR


class Narrator:
    """Emits narration events as ``llm-worker-rbee`` for one worker id."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def __call__(
        self,
        action: str,
        human: str,
        *,
        target: str = "",
        level: str = "info",
        cute: str | None = None,
        **extra: ExtraValue,
    ) -> NarrationEvent:
        """Narrate ``human`` under ``action``; extra keyword arguments become extra fields."""
        return narrate(
            ACTOR, action, human, target=target, level=level, cute=cute,
            worker_id=self.worker_id, **extra,
        )
