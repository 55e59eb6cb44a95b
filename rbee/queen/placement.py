"""Where a job without ``node`` runs: a choice and its reason, with no I/O.

The queen knows its nodes from the running hives (their workers and catalogs) and from
the facts cached when a node was added (``rbee-hive detect``: backends, memory). It never
starts a hive just to ask. In order of preference:

1. a node with the model loaded and a free slot;
2. a node with the model on disk (a running hive's catalog; its preflight then decides
   whether the memory fits, and says so);
3. a node with the model loaded, every slot busy (the job queues there rather than
   load a copy somewhere else from scratch);
4. a running node with the backend;
5. with no fitting hive running: ``localhost``, unless another node is the only one with
   the backend asked for.

Within one rule, a running hive beats one that would have to start, then more free
memory, then the name (so the choice is stable). A node the queen cannot reach now (its
SSH connection was lost or cannot be made) is left out until it answers again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailableError, NodeUnreachableError


def memory_free_bytes(facts: dict[str, Any] | None) -> int | None:
    """A node's free memory (its cpu device's, i.e. RAM) from its facts; None if unknown."""
    for device in (facts or {}).get("devices") or []:
        if isinstance(device, dict) and device.get("backend") == "cpu":
            value = device.get("memory_free_bytes")
            return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return None


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the queen knows of one node at this moment."""

    name: str
    running: bool
    #: The backends its facts list (None: not known yet; ``cpu`` is then assumed).
    backends: tuple[str, ...] | None
    free_slots: int = 0
    loaded: bool = False
    #: Whether its catalog holds the model (None: unknown, its hive is not running).
    on_disk: bool | None = None
    memory_free_bytes: int | None = None
    is_local: bool = False
    #: False while the node cannot be reached (then it is never chosen).
    reachable: bool = True

    def has_backend(self, backend: str | None) -> bool:
        """Whether the node offers ``backend`` (None: any; unknown facts: cpu only)."""
        if backend is None or backend == "cpu":
            return True
        return self.backends is not None and backend in self.backends


@dataclass(frozen=True, slots=True)
class Placement:
    """The chosen node and why, in words for the narration."""

    node: str
    reason: str


def _rank(view: NodeView) -> tuple[bool, int, str]:
    return (not view.running, -(view.memory_free_bytes or 0), view.name)


def place(views: list[NodeView], *, backend: str | None = None) -> Placement:
    """Choose a node for a job (see the module doc); ``BackendUnavailableError`` when no
    node offers the backend."""
    offering = [v for v in views if v.has_backend(backend)]
    fit = [v for v in offering if v.reachable]
    if not fit:
        if offering:
            raise NodeUnreachableError(
                f"every node with the {backend or 'cpu'} backend is unreachable now"
                f" ({', '.join(v.name for v in offering)}); `rbee-keeper status` shows why"
            )
        raise BackendUnavailableError(
            f"no node offers the {backend} backend (known nodes: {', '.join(v.name for v in views)});"
            " add one with `rbee-keeper setup add-node`, or choose another backend"
        )
    rules = (
        (lambda v: v.loaded and v.free_slots > 0, "the model is loaded there with a free slot"),
        (lambda v: v.running and bool(v.on_disk), "the model is on its disk"),
        (lambda v: v.loaded, "the model is loaded there (every slot busy: the job waits for one)"),
        (lambda v: v.running, "its rbee-hive is running"),
    )
    for rule, reason in rules:
        chosen = sorted((v for v in fit if rule(v)), key=_rank)
        if chosen:
            return Placement(chosen[0].name, reason)
    local = [v for v in fit if v.is_local]
    if local:
        return Placement(local[0].name, "no rbee-hive is running; localhost is the default")
    only = sorted(fit, key=_rank)[0]
    return Placement(only.name, f"the only node with the {backend} backend")
