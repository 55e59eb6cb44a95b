"""The ``infer`` job: route to a node, schedule a worker, stream its tokens into the job.

Steps, each narrated by the queen (actor ``queen-rbee``):
``route_job`` (which node, its hive started if needed: the hive's startup narration is
relayed in between), ``infer_start``, ``infer_schedule`` (reuse an idle worker that has
the model loaded, else ask the hive to spawn one: the worker's startup narration is
relayed from the hive's narration SSE until it is ready), ``infer_worker``, then the
worker's inference events (``started``, ``narration``, ``token``*, ``metrics``, ``end``)
and ``infer_complete``.

Scheduling: a worker whose last job was this queen's and has ended is used at once (no
round trip to the hive; if it has gone meanwhile, nothing was relayed and the hive is
asked). Otherwise the hive's ``GET /v1/workers`` gives the candidates; ``hive.in_use``
keeps two jobs of this queen from sharing a worker.

Cancellation: leaving the worker's SSE closes that connection (the worker cancels on a
client disconnect) and a shielded ``DELETE /v1/inference/{job_id}`` makes it explicit, so
decode stops within one token and the worker is idle again at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import trio

from ..client.jobs import auth_headers, error_from_response
from ..errors import InvalidRequestError, JobError, WorkerError
from ..narration import narrate, sse
from ..narration.events import Done, End, Error, Event, NarrationEvent, Ready
from .hives import Hive, HiveManager
from .jobs import Job
from .nodes import LOCALHOST, NodeRegistry

ACTOR = "queen-rbee"
#: Sampling fields passed through to the worker as given (the worker validates them).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")
#: Worker narration actions that mean "loaded and registered with the hive".
READY_ACTIONS = frozenset({"callback_ready", "ready", "worker_ready"})
#: After the hive lists the worker as idle, how long the narration relay may still take
#: to deliver the worker's own "ready" line (keeps the startup narration whole).
READY_TAIL_S = 0.5
POLL_S = 0.1
CANCEL_GRACE_S = 1.0


class _WorkerGone(Exception):
    """A worker we remembered refused the request before anything was relayed."""


def validate_infer(body: dict[str, Any]) -> dict[str, Any]:
    """Check an ``infer`` request; returns it with defaults, or raises 400 with details."""
    problems = []
    for name in ("model", "prompt"):
        if not isinstance(body.get(name), str) or not body.get(name):
            problems.append({"field": name, "constraint": "non-empty string", "message": f"{name} is required"})
    node = body.get("node", LOCALHOST)
    if not isinstance(node, str) or not node:
        problems.append({"field": "node", "constraint": "string", "message": "a node name"})
    if problems:
        raise InvalidRequestError("invalid infer request: " + ", ".join(p["field"] for p in problems), details=problems)
    return {**body, "node": node}


class InferJob:
    """Runs one ``infer`` request (``await InferJob(...).run(job)``)."""

    def __init__(self, nodes: NodeRegistry, hives: HiveManager, http: httpx.AsyncClient) -> None:
        self.nodes = nodes
        self.hives = hives
        self.http = http

    async def run(self, job: Job) -> None:
        """The job's body; narration and events go to the job's stream."""
        req = job.request
        model, node_name = req["model"], req["node"]
        node = self.nodes.get(node_name)
        running = self.hives.get(node.name)
        narrate(
            ACTOR,
            "route_job",
            f"Routing job to node {node.name}"
            + (" (its rbee-hive is up)" if running else " (starting its rbee-hive)"),
            target=node.name,
            node=node.name,
        )
        hive = running or await self.hives.ensure(node, job.sink)
        narrate(ACTOR, "infer_start", f"Inference of {model} starts on node {node.name}", target=model, node=node.name)
        # Fast path: a worker whose last job was ours and has ended is idle as far as we
        # know; use it with no round trip to the hive. If it is gone (idle timeout, crash)
        # nothing was relayed yet, and the hive is asked as usual.
        worker = self._claim_released(hive, model)
        if worker is not None:
            self._narrate_reuse(node.name, model, worker)
            try:
                await self._use(job, hive, worker, req, fast=True)
                return
            except _WorkerGone as gone:
                hive.known.pop(worker["worker_id"], None)
                narrate(ACTOR, "infer_schedule", f"Worker {worker['worker_id']} is no longer available ({gone})",
                        level="warn", worker_id=worker["worker_id"], node=node.name)
        worker = await self._idle_worker(hive, model)
        if worker is not None:
            self._narrate_reuse(node.name, model, worker)
        else:
            narrate(
                ACTOR,
                "infer_schedule",
                f"No idle worker has {model} on {node.name}: asking rbee-hive to spawn one",
                target=model,
                node=node.name,
            )
            worker = await self._spawn(job, hive, model, req)
        await self._use(job, hive, worker, req, fast=False)

    def _narrate_reuse(self, node: str, model: str, worker: dict[str, Any]) -> None:
        narrate(
            ACTOR,
            "infer_schedule",
            f"Reusing idle worker {worker['worker_id']} on {node}: {model} is already loaded",
            target=model,
            worker_id=worker["worker_id"],
            node=node,
        )

    def _claim_released(self, hive: Hive, model: str) -> dict[str, Any] | None:
        wanted = {model, hive.model_refs.get(model)}
        for wid in list(hive.released):
            worker = hive.known.get(wid)
            if worker is not None and wid not in hive.in_use and worker.get("model_ref") in wanted:
                hive.released.discard(wid)
                hive.in_use.add(wid)
                return worker
        return None

    async def _use(self, job: Job, hive: Hive, worker: dict[str, Any], req: dict[str, Any], *, fast: bool) -> None:
        """Run the inference on a claimed worker; narrate ``infer_worker``/``infer_complete``."""
        wid, node = worker["worker_id"], hive.node.name
        released = False
        try:
            url = await hive.reach(worker["url"])
            narrate(ACTOR, "infer_worker", f"Worker {wid} is ready at {worker['url']}", target=wid, worker_id=wid, node=node)
            end = await self._infer(job, url, worker.get("api_key"), req, fast=fast)
            released = True
        except trio.Cancelled:
            released = True  # cancelled and DELETEd on the worker: idle again
            raise
        finally:
            hive.in_use.discard(wid)
            if released:
                # Our job on it is over: as far as this queen knows it is idle, whatever
                # the hive's last poll (about once a second) said.
                hive.released.add(wid)
        narrate(
            ACTOR,
            "infer_complete",
            f"Inference complete: {end.tokens_out} tokens at {end.tokens_per_sec:.1f} tok/s ({end.stop_reason})",
            target=job.job_id,
            worker_id=wid,
            node=node,
            tokens_out=end.tokens_out,
            tokens_per_sec=end.tokens_per_sec,
        )

    async def _idle_worker(self, hive: Hive, model: str) -> dict[str, Any] | None:
        """An idle worker with ``model`` loaded, claimed for this job (``hive.in_use``).

        The hive learns idle/busy by polling its workers (about once a second), so a
        worker it still calls busy may have finished already: one whose last job was
        ours is taken as idle (``hive.released``), any other is asked directly.
        Workers this queen's own jobs are using are never candidates, and the claim is
        made with no await between the last check and it, so two jobs never share one.
        """
        listing = await hive.request("GET", "/v1/workers")
        wanted = {model, hive.model_refs.get(model)}
        candidates = [
            w for w in listing.get("workers", [])
            if (w.get("model_ref") in wanted or w.get("model") in wanted) and w.get("state") in ("idle", "busy")
        ]
        candidates.sort(key=lambda w: w.get("state") != "idle")  # idle ones first
        for worker in candidates:
            if worker["worker_id"] in hive.in_use:
                continue
            wid = worker["worker_id"]
            if worker.get("state") != "idle" and wid not in hive.released:
                if await self._live_state(hive, worker) != "idle":
                    continue
            if wid not in hive.in_use:
                hive.in_use.add(wid)
                hive.released.discard(wid)
                hive.known[wid] = worker
                return worker
        return None

    async def _live_state(self, hive: Hive, worker: dict[str, Any]) -> str | None:
        """The worker's own answer to ``GET /v1/ready`` (None if it does not answer)."""
        return await live_worker_state(self.http, await hive.reach(worker["url"]), worker.get("api_key"))

    async def _spawn(self, job: Job, hive: Hive, model: str, req: dict[str, Any]) -> dict[str, Any]:
        body = {"model": model, "backend": req.get("backend") or _best_backend(hive), "device": int(req.get("device") or 0)}
        # The spawn request waits while the model is provisioned: the hive narrates the
        # download on its stdout meanwhile, which we relay live (progress bars). The
        # worker's narration SSE replays those same events from the spawn on: skip them.
        relayed: set[tuple[Any, ...]] = set()

        def live(event: Event) -> None:
            job.sink(event)
            if isinstance(event, NarrationEvent):
                relayed.add(_identity(event))

        with hive.listen(live):
            spawned = await hive.request("POST", "/v1/workers/spawn", json=body)
        hive.in_use.add(spawned["worker_id"])
        hive.known[spawned["worker_id"]] = spawned
        if spawned.get("model_ref"):
            hive.model_refs[model] = spawned["model_ref"]
        try:
            await self._wait_ready(job, hive, spawned, relayed)
        except BaseException:
            hive.in_use.discard(spawned["worker_id"])
            raise
        return spawned

    async def _wait_ready(self, job: Job, hive: Hive, spawned: dict[str, Any], seen: set[tuple[Any, ...]]) -> None:
        """Relay the worker's startup narration until the hive lists it idle.

        ``seen`` holds the identities of events already relayed live (skipped here).
        """
        worker_id = spawned["worker_id"]
        said_ready = trio.Event()
        async with trio.open_nursery() as nursery:

            async def relay() -> None:
                async with hive.open_sse(f"/v1/workers/{worker_id}/narration") as events:
                    async for event in events:
                        if isinstance(event, Done):
                            return
                        if isinstance(event, NarrationEvent) and _identity(event) in seen:
                            continue
                        job.sink(event)
                        if isinstance(event, Ready) or (
                            isinstance(event, NarrationEvent) and event.action in READY_ACTIONS
                        ):
                            said_ready.set()

            async def relay_then_stop() -> None:
                await relay()
                # The worker's narration ended: it exited. Let the poller report why.
                said_ready.set()

            nursery.start_soon(relay_then_stop)
            while True:
                state = await self._worker_state(hive, worker_id)
                if state == "idle" or state == "busy":
                    break
                if state in (None, "error", "stopped", "exited"):
                    raise WorkerError(
                        f"worker {worker_id} on node {hive.node.name} failed to start (state {state});"
                        " see its narration above"
                    )
                with trio.move_on_after(POLL_S):
                    await said_ready.wait()
            with trio.move_on_after(READY_TAIL_S):
                await said_ready.wait()
            nursery.cancel_scope.cancel()

    async def _worker_state(self, hive: Hive, worker_id: str) -> str | None:
        listing = await hive.request("GET", "/v1/workers")
        for worker in listing.get("workers", []):
            if worker.get("worker_id") == worker_id:
                return worker.get("state")
        return None

    async def _infer(self, job: Job, url: str, api_key: str | None, req: dict[str, Any], *, fast: bool) -> End:
        """Stream one inference from the worker into the job; returns its ``End``.

        With ``fast`` (a worker we did not just look up), a refusal before anything was
        relayed raises ``_WorkerGone`` so that the caller can ask the hive instead.
        """
        body = {"job_id": job.job_id, "prompt": req["prompt"]}
        body.update({k: req[k] for k in SAMPLING_FIELDS if req.get(k) is not None})
        headers = auth_headers(api_key)
        try:
            async with self.http.stream("POST", f"{url}/v1/inference", json=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    error = error_from_response(response)
                    if fast and response.status_code in (401, 404, 503):
                        raise _WorkerGone(error.message)
                    raise error
                return await self._relay_inference(job, response)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
                with contextlib.suppress(httpx.TransportError):
                    await self.http.delete(f"{url}/v1/inference/{job.job_id}", headers=headers)
            raise
        except httpx.ConnectError as exc:
            if fast:
                raise _WorkerGone(str(exc) or "connection refused") from None
            raise WorkerError(f"the worker at {url} does not answer ({exc})") from None
        except httpx.TransportError as exc:
            raise WorkerError(f"the worker at {url} broke the inference stream ({exc})") from None

    async def _relay_inference(self, job: Job, response: httpx.Response) -> End:
        decoder = sse.Decoder()
        end: End | None = None
        async for chunk in response.aiter_raw():
            for event in decoder.feed(chunk):
                kind = type(event)
                if kind is Done:
                    if end is None:
                        raise WorkerError("the worker ended the inference stream without an end event")
                    return end
                if kind is Error:
                    raise JobError(event.message, code=event.code)
                if kind is End:
                    end = event
                job.sink(event)
        raise WorkerError("the worker's inference stream stopped without [DONE]")


async def live_worker_state(http: httpx.AsyncClient, url: str, api_key: str | None) -> str | None:
    """A worker's state from its own ``GET /v1/ready`` (bounded; None if no answer)."""
    with trio.move_on_after(CANCEL_GRACE_S):
        try:
            response = await http.get(f"{url}/v1/ready", headers=auth_headers(api_key))
            if response.status_code == 200:
                return response.json().get("state")
        except (httpx.TransportError, ValueError):
            pass
    return None


def _identity(event: NarrationEvent) -> tuple[Any, ...]:
    """What makes one narration event the same event when it arrives twice."""
    return (event.actor, event.action, event.human, event.ts_ms, event.worker_id)


def _best_backend(hive: Hive) -> str:
    backends = hive.node.detect.get("backends") or []
    names = [b if isinstance(b, str) else b.get("name") for b in backends]
    for choice in ("cuda", "metal"):
        if choice in names:
            return choice
    return "cpu"
