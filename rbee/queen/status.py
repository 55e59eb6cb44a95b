"""``GET /v1/status``: the cluster at a glance, per node, from what the queen knows.

For each node of the registry (``localhost`` first): whether the queen can reach it,
whether its hive is up, its backends and devices and free memory, the scheduler's workers
on it, and the models on its disk. Sources, and what each costs:

- the node registry (``state.nodes``) and the scheduler's worker records: in memory;
- ``state.hives.unreachable``: why the queen could not reach a node (read, never written);
- each running hive, asked in parallel, each bounded by ``HIVE_ANSWER_S`` (a hive that
  does not answer in time is said as such): its facts measured now (``GET /v1/detect``:
  free memory and disk; kept as ``hive.facts``, so placement ranks by them too) and the
  models on its disk (``GET /v1/models``); else the ``detect`` cached in the registry when
  the node was added (none for ``localhost``);

Nothing is started to answer: a node without a running hive shows what the registry knows,
its models unknown (``null``). Reachable: ``true`` when its hive answered just now,
``false`` with the reason when the queen could not reach it (or its hive did not answer),
``null`` when no hive has run there yet (nobody can say).

The keeper builds the same document without a queen (``offline_status``): every hive
down, reachability unknown. Only light imports here (no trio, no httpx at import): the
keeper reads this module without starting anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from .nodes import Node
from .placement import memory_free_bytes

if TYPE_CHECKING:
    from .hives import Hive
    from .scheduler import Scheduler
    from .state import QueenState

#: How long one running hive may take to list its models before the status says it does
#: not answer (the other nodes' rows do not wait for it: hives are asked in parallel).
HIVE_ANSWER_S = 2.0


def public_workers(scheduler: "Scheduler") -> list[dict[str, Any]]:
    """The scheduler's worker records as clients see them (``GET /v1/workers``, and each
    node's ``workers`` in ``GET /v1/status``), by node and worker id.

    What the hives pushed, with this queen's leases as the busy slots (the one source of
    worker truth; nobody is probed here). The workers' keys are left out."""
    now = scheduler.clock()
    return [
        {
            "worker_id": w.worker_id, "node": w.node, "model": w.label or w.model.reference,
            "model_ref": w.model.reference, "sha256": w.model.sha256, "backend": w.backend,
            "device": w.device, "state": w.state, "slots": {"total": w.slots_total, "busy": len(w.leases)},
            "memory_bytes": w.memory_bytes, "unload_in_s": w.unload_in(now), "url": w.url,
        }
        for w in sorted(scheduler.workers.values(), key=lambda w: (w.node, w.worker_id))
    ]


def node_status(
    node: Node,
    *,
    hive_up: bool = False,
    hive_facts: dict[str, Any] | None = None,
    hive_error: str | None = None,
    unreachable: str | None = None,
    workers: Iterable[dict[str, Any]] = (),
    models: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One node's entry of the status document (the route's and the keeper's).

    ``hive_error``: the running hive did not answer (why); ``unreachable``: why the queen
    cannot reach the node; ``models``: the hive's catalog, None when nobody could ask."""
    if hive_facts:
        facts, facts_from = hive_facts, "hive"
    elif node.detect:
        facts, facts_from = node.detect, "registry"
    else:
        facts, facts_from = {}, None
    if hive_up and hive_error is None and models is not None:
        reachable, reason = True, None  # it answered just now: fresher than any old trouble
    elif unreachable:
        reachable, reason = False, unreachable
    elif hive_up and hive_error is not None:
        reachable, reason = False, hive_error
    else:
        reachable, reason = None, None
    return {
        "name": node.name,
        "local": node.is_local,
        "reachable": reachable,
        "unreachable_reason": reason,
        "hive_up": hive_up,
        "hive_error": hive_error,
        "facts_from": facts_from,
        "backends": [b for b in facts.get("backends") or [] if isinstance(b, str)],
        "devices": [d for d in facts.get("devices") or [] if isinstance(d, dict)],
        "memory_free_bytes": memory_free_bytes(facts),
        "workers": list(workers),
        "models": models,
    }


def offline_status(nodes: Iterable[Node], local_models: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The status document with no queen running (the keeper's, from ``nodes.db``): no
    hive is up, nobody can say whether a node is reachable, no worker runs; localhost's
    models are its catalog read on this machine (``local_models``, None if unreadable)."""
    return {"nodes": [node_status(n, models=local_models if n.is_local else None) for n in nodes]}


async def _ask_hive(hive: "Hive", answers: dict[str, Any]) -> None:
    """``answers[node] = [catalog entries]`` or the one line why the hive did not answer;
    the hive's facts (free memory, disk) are measured again on the way, and kept for
    placement."""
    import trio

    from ..errors import RbeeError

    name = hive.node.name
    answers[name] = f"rbee-hive on node {name} did not answer within {HIVE_ANSWER_S:g} s"
    with trio.move_on_after(HIVE_ANSWER_S):
        try:
            facts = await hive.request("GET", "/v1/detect")
            listing = await hive.request("GET", "/v1/models")
        except RbeeError as exc:
            answers[name] = exc.message
            return
        except ValueError as exc:  # not JSON: a hive of another kind, or a broken one
            answers[name] = f"rbee-hive on node {name} answered something that is not its model list ({exc})"
            return
        if isinstance(facts, dict):
            hive.facts = facts
        models = listing.get("models") if isinstance(listing, dict) else listing
        answers[name] = [m for m in models or [] if isinstance(m, dict)]


async def cluster_status(state: "QueenState") -> dict[str, Any]:
    """``GET /v1/status``'s document: every node of the registry, its running hive asked
    (in parallel, each within ``HIVE_ANSWER_S``), nothing started."""
    import trio

    nodes = state.nodes.list()
    hives = {n.name: hive for n in nodes if (hive := state.hives.get(n.name)) is not None}
    answers: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for hive in hives.values():
            nursery.start_soon(_ask_hive, hive, answers)
    workers = public_workers(state.scheduler)
    unreachable = dict(state.hives.unreachable)  # another task may change it meanwhile
    entries = []
    for node in nodes:
        hive = hives.get(node.name)
        answer = answers.get(node.name)
        entries.append(node_status(
            node,
            hive_up=hive is not None,
            hive_facts=hive.facts if hive is not None else None,
            hive_error=answer if isinstance(answer, str) else None,
            unreachable=unreachable.get(node.name),
            workers=[w for w in workers if w["node"] == node.name],
            models=answer if isinstance(answer, list) else None,
        ))
    return {"nodes": entries}
