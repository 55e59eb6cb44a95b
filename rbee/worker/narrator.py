"""Narration as this worker: ``Narrator(worker_id)("startup", "Starting ...")``.

Fills ``actor="llm-worker-rbee"`` (or the worker's ``model-loader``, as the seeds name the
part that loads the model: ``Narrator(worker_id, actor=rbee.narration.render.LOADER_ACTOR)``)
and ``worker_id`` on every event. Where an event goes is decided by ``rbee.narration.narrate`` from the context: inside a request's
``narration_context`` it goes into that request's SSE stream, elsewhere to stdout as a
JSON line for the parent (the hive) to relay.
"""

from __future__ import annotations

from ..narration import NarrationEvent, narrate
from ..narration.events import ExtraValue
from .config import ACTOR


class Narrator:
    """Emits narration events as one of this worker's actors for one worker id."""

    def __init__(self, worker_id: str, *, actor: str = ACTOR) -> None:
        self.worker_id = worker_id
        self.actor = actor

    def __call__(
        self,
        action: str,
        human: str,
        *,
        target: str = "",
        level: str = "info",
        cute: str | None = None,
        story: str | None = None,
        **extra: ExtraValue,
    ) -> NarrationEvent:
        """Narrate ``human`` under ``action``; extra keyword arguments become extra fields."""
        return narrate(
            self.actor, action, human, target=target, level=level, cute=cute, story=story,
            worker_id=self.worker_id, **extra,
        )
